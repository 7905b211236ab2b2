"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only), and its pytest fixtures.

It speaks just enough of the Hub's HTTP API for the real ``huggingface_hub`` client (2.x) to
download and upload through its ordinary code paths:

download
    ``GET /api/models/{ns}/{name}[/revision/{rev}]`` (model info with ``sha``),
    ``GET /api/models/{ns}/{name}/tree/{rev}[/{path}]`` (file listing, ``recursive``),
    ``POST /api/models/{ns}/{name}/paths-info/{rev}``,
    ``HEAD|GET /{ns}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit`` and ``ETag`` (git blob
    sha1, or the sha256 for LFS files, which also get ``X-Linked-Etag`` / ``X-Linked-Size``), and
    ``Range: bytes=N-`` resumption;
upload
    ``POST /api/repos/create``, ``POST /api/validate-yaml``,
    ``POST /api/models/{repo}/preupload/{rev}`` (every file in "regular" mode, so no LFS/Xet
    protocol) and ``POST /api/models/{repo}/commit/{rev}`` (NDJSON, base64 contents).

Errors carry the Hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``), which the client turns into its typed exceptions. Tokens are
checked: private and gated repos need a token that grants access, writes need a write token, and
an unknown token gets the Hub's ``Invalid credentials in Authorization header`` 401.

Every request is logged (:attr:`HubServer.requests`) so tests can count what the client did,
e.g. ``server.downloads()`` lists the file GETs. Repositories live in memory; commits are
content-addressed, so the same files give the same commit sha in every run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

#: Files stored as LFS objects (what ``.gitattributes`` does on the real Hub for weights).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx")

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def etag_of(path: str, data: bytes) -> str:
    """The blob identity the Hub reports: sha256 for LFS files, the git blob sha1 otherwise."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_sha1(data)


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    owner: str | None = None  # the one user allowed to read a private repo
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users who accepted a gated repo's terms
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        return self.commits.get(sha) if sha else None


@dataclass
class Request:
    method: str
    path: str  # URL path, percent-decoded
    query: dict[str, list[str]]
    token: str | None
    range: str | None = None


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class HubServer:
    """An in-memory Hub on ``127.0.0.1:<free port>``; use as a context manager or via the fixture.

    ``tokens`` maps a token to ``(user, can_write)``.
    """

    def __init__(self, tokens: dict[str, tuple[str, bool]] | None = None) -> None:
        self.tokens = (
            tokens
            if tokens is not None
            else {
                "hf_write_alice": ("alice", True),
                "hf_read_bob": ("bob", False),
            }
        )
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.faults: list[list[Any]] = []  # [path substring, status, times left]
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- repository content -----------------------------------------------------------------------
    def create_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        gated: bool = False,
        owner: str | None = None,
        granted: set[str] | None = None,
    ) -> Repo:
        """A repo with an initial commit holding ``.gitattributes`` (as the Hub creates them)."""
        with self._lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id, owner=owner, private=private, gated=gated, granted=set(granted or ()))
            self.repos[repo_id] = repo
        self.commit(repo_id, {".gitattributes": GITATTRIBUTES}, message="initial commit")
        return repo

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes | str | Path],
        *,
        branch: str = "main",
        message: str = "update",
        delete: tuple[str, ...] = (),
    ) -> str:
        """Add/replace ``files`` (and delete paths) on ``branch``; returns the new commit sha."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent].files) if parent else {}
            for path, content in files.items():
                if isinstance(content, Path):
                    content = content.read_bytes()
                elif isinstance(content, str):
                    content = content.encode()
                tree[path] = content
            for path in delete:
                tree = {
                    p: d for p, d in tree.items() if p != path and not p.startswith(path.rstrip("/") + "/")
                }
            h = hashlib.sha1(f"{repo_id}\n{parent}\n{message}\n".encode())
            for path in sorted(tree):
                h.update(f"{path}\0{etag_of(path, tree[path])}\n".encode())
            sha = h.hexdigest()
            repo.commits[sha] = Commit(sha, tree, message, parent)
            repo.branches[branch] = sha
            return sha

    def upload_folder(self, repo_id: str, folder: Path, **kw: Any) -> str:
        """Commit every file below ``folder`` (test set-up helper, not the client's upload path)."""
        files = {
            str(p.relative_to(folder)).replace("\\", "/"): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return self.commit(repo_id, files, **kw)

    def publish_model(
        self,
        repo_id: str,
        state_dict: dict[str, Any],
        folder: Path,
        *,
        shards: int = 1,
        extra: dict[str, bytes | str] | None = None,
        branch: str = "main",
        message: str = "upload model",
        **repo_kw: Any,
    ) -> str:
        """Write ``state_dict`` as a checkpoint folder (``testkit.checkpoints.write_checkpoint``), add
        ``extra`` files, and commit it all to ``repo_id`` (creating the repo). Returns the commit sha."""
        from testkit.checkpoints import write_checkpoint

        if folder.exists():
            shutil.rmtree(folder)
        write_checkpoint(folder, state_dict, shards=shards)
        for name, content in (extra or {}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
        if repo_id not in self.repos:
            self.create_repo(repo_id, **repo_kw)
        return self.upload_folder(repo_id, folder, branch=branch, message=message)

    def tag(self, repo_id: str, tag: str, sha: str) -> None:
        self.repos[repo_id].tags[tag] = sha

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None
        return dict(commit.files)

    def fail(self, path_contains: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests whose path contains ``path_contains`` with ``status``."""
        with self._lock:
            self.faults.append([path_contains, status, times])

    def fault_for(self, path: str) -> int | None:
        with self._lock:
            for f in self.faults:
                if f[0] in path and f[2] > 0:
                    f[2] -= 1
                    return int(f[1])
        return None

    # -- request log ------------------------------------------------------------------------------
    def log(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloads(self) -> list[str]:
        """Paths of the file bodies served (``GET .../resolve/...``), in order."""
        return [r.path for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    def downloaded_files(self) -> list[str]:
        """File names (path inside the repo) of every file body served."""
        return [p.split("/resolve/", 1)[1].split("/", 1)[1] for p in self.downloads()]

    # -- access control ---------------------------------------------------------------------------
    def user(self, token: str | None) -> tuple[str, bool] | None:
        if token is None:
            return None
        if token not in self.tokens:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def repo_for_read(self, repo_id: str, token: str | None, *, files: bool) -> Repo:
        user = self.user(token)
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(401 if user is None else 404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.private and (user is None or user[0] != repo.owner):
            raise HubError(401 if user is None else 404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.gated and files and (user is None or user[0] not in repo.granted):
            raise HubError(
                401 if user is None else 403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be "
                "authenticated to access it.",
            )
        return repo

    def commit_for(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def writer(self, token: str | None) -> str:
        user = self.user(token)
        if user is None:
            raise HubError(401, None, "You must be authenticated to write")
        if not user[1]:
            raise HubError(403, None, "You don't have the rights to write with this token (read-only)")
        return user[0]


def _tree_entry(path: str, data: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
    if is_lfs(path):
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{etag_of(path, data)}\n"
            f"size {len(data)}\n"
        ).encode()
        entry["oid"] = git_blob_sha1(pointer)
        entry["size"] = len(data)
        entry["lfs"] = {"oid": etag_of(path, data), "size": len(data), "pointerSize": len(pointer)}
    return entry


def _listing(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = prefix.strip("/")
    out: list[dict[str, Any]] = []
    dirs: set[str] = set()
    for path in sorted(files):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rel = path[len(prefix) + 1 :] if prefix else path
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(([prefix] if prefix else []) + parts[:i])
            if d not in dirs and (recursive or i == 1):
                dirs.add(d)
                out.append(
                    {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                )
        if recursive or len(parts) == 1:
            out.append(_tree_entry(path, files[path]))
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :].strip() or None if auth.startswith("Bearer ") else None

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n else b""
        if self.headers.get("Content-Encoding") == "gzip":
            import gzip

            data = gzip.decompress(data)
        return data

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json({"error": e.message}, e.status, headers)

    def _route(self) -> None:
        split = urlsplit(self.path)
        raw_parts = split.path.split("/")[1:]
        parts = [unquote(p) for p in raw_parts]
        token = self._token()
        self.hub.log(
            Request(
                self.command, unquote(split.path), parse_qs(split.query), token, self.headers.get("Range")
            )
        )
        try:
            status = self.hub.fault_for(unquote(split.path))
            if status is not None:
                raise HubError(status, None, f"injected fault (HTTP {status})")
            handler = self._dispatch(parts)
            if handler is None:
                raise HubError(404, None, f"no route for {self.command} {split.path}")
            handler(parts, parse_qs(split.query), token)
        except HubError as e:
            self._error(e)

    def _dispatch(self, parts: list[str]) -> Any:
        m = self.command
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            if m == "GET" and (len(parts) == 4 or (len(parts) == 6 and parts[4] == "revision")):
                return self._model_info
            if m == "GET" and len(parts) >= 6 and parts[4] == "tree":
                return self._tree
            if m == "POST" and len(parts) == 6 and parts[4] == "paths-info":
                return self._paths_info
            if m == "POST" and len(parts) == 6 and parts[4] == "preupload":
                return self._preupload
            if m == "POST" and len(parts) == 6 and parts[4] == "commit":
                return self._commit
        if m == "POST" and parts == ["api", "repos", "create"]:
            return self._create
        if m == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml
        if m in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve
        return None

    do_GET = do_HEAD = do_POST = _route  # noqa: N815 - stdlib naming

    # -- download side ----------------------------------------------------------------------------
    def _model_info(self, parts: list[str], q: dict[str, list[str]], token: str | None) -> None:
        repo_id = f"{parts[2]}/{parts[3]}"
        repo = self.hub.repo_for_read(repo_id, token, files=False)
        commit = self.hub.commit_for(repo, parts[5] if len(parts) == 6 else "main")
        self._json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit.sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2024-01-01T00:00:00.000Z",
                "createdAt": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            }
        )

    def _tree(self, parts: list[str], q: dict[str, list[str]], token: str | None) -> None:
        repo = self.hub.repo_for_read(f"{parts[2]}/{parts[3]}", token, files=False)
        commit = self.hub.commit_for(repo, parts[5])
        prefix = "/".join(parts[6:])
        recursive = q.get("recursive", ["false"])[0].lower() == "true"
        if prefix and prefix in commit.files:
            raise HubError(404, "EntryNotFound", f"{prefix} is a file, not a folder")
        self._json(_listing(commit.files, prefix, recursive))

    def _paths_info(self, parts: list[str], q: dict[str, list[str]], token: str | None) -> None:
        repo = self.hub.repo_for_read(f"{parts[2]}/{parts[3]}", token, files=False)
        commit = self.hub.commit_for(repo, parts[5])
        body = self._body()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        self._json([_tree_entry(p, commit.files[p]) for p in paths if p in commit.files])

    def _resolve(self, parts: list[str], q: dict[str, list[str]], token: str | None) -> None:
        repo = self.hub.repo_for_read(f"{parts[0]}/{parts[1]}", token, files=True)
        commit = self.hub.commit_for(repo, parts[3])
        path = "/".join(parts[4:])
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {commit.sha}")
        data = commit.files[path]
        etag = etag_of(path, data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if is_lfs(path):
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
        status = 200
        rng = self.headers.get("Range")
        if self.command == "GET" and rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[len("bytes=") :].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        self._send(status, data, headers, content_type="application/octet-stream")

    # -- upload side ------------------------------------------------------------------------------
    def _create(self, parts: list[str], q: dict[str, list[str]], token: str | None) -> None:
        user = self.hub.writer(token)
        body = json.loads(self._body() or b"{}")
        name, org = body.get("name"), body.get("organization")
        repo_id = f"{org or user}/{name}"
        if body.get("type") not in (None, "model"):
            raise HubError(400, None, "only model repos are supported by this server")
        if repo_id in self.hub.repos:
            self._json(
                {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"}, 409
            )
            return
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.hub.create_repo(repo_id, private=private, owner=user)
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, parts: list[str], q: dict[str, list[str]], token: str | None) -> None:
        body = json.loads(self._body() or b"{}")
        errors = []
        try:
            data = yaml.safe_load(body.get("content", "") or "")
            if data is not None and not isinstance(data, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
        except yaml.YAMLError as e:
            errors.append({"message": f"invalid YAML: {e}"})
        self._json({"errors": errors, "warnings": []})

    def _writable_repo(self, parts: list[str], token: str | None) -> Repo:
        self.hub.writer(token)
        repo_id = f"{parts[2]}/{parts[3]}"
        if repo_id not in self.hub.repos:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return self.hub.repos[repo_id]

    def _preupload(self, parts: list[str], q: dict[str, list[str]], token: str | None) -> None:
        self._writable_repo(parts, token)
        body = json.loads(self._body() or b"{}")
        self._json(
            {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in body.get("files", [])
                ],
                "commitOid": None,
            }
        )

    def _commit(self, parts: list[str], q: dict[str, list[str]], token: str | None) -> None:
        repo = self._writable_repo(parts, token)
        branch = parts[5]
        if branch not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        summary, added, deleted = "", {}, []
        for line in self._body().decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(
                    400, None, f"unsupported commit operation {key!r} (this server takes regular files)"
                )
        sha = self.hub.commit(repo.repo_id, added, branch=branch, message=summary, delete=tuple(deleted))
        self._json(
            {
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            }
        )


# -- pytest fixtures --------------------------------------------------------------------------------


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A started :class:`HubServer` (stopped after the test)."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HF cache folder for this test; no ambient token or offline flag leaks in."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    return cache
