"""Models by Hub id: ``org/name[@revision]`` -> a local snapshot; push a merged folder back.

Resolving (:class:`HubResolver`) goes through ``huggingface_hub.snapshot_download`` into the
standard HF cache and downloads only what a merge reads, in two steps:

1. the small files that decide the rest (``model.safetensors.index.json``, ``config.json``) at
   the requested revision. This resolves a branch or tag to its commit (one ``/api/models``
   request; none when the revision is already a 40-hex commit) and caches the repo's file
   listing for that commit (``trees/<sha>.json``);
2. at that *commit*, the weight files the index names (or the top-level ``*.safetensors`` when
   there is no index) and the config/tokenizer/generation files that get copied next to the
   merged weights. Nested folders, pickles (``*.bin``), ONNX exports and duplicate consolidated
   files are never fetched.

Everything the client has already cached is reused without a download; with a pinned commit
and a warm cache no request is made at all, and ``offline=True`` (or ``HF_HUB_OFFLINE=1``)
uses the cache only. The resolved commit sha is recorded in the returned
:class:`~merge.checkpoint.ResolvedModel` so the model card can pin every input.

Client errors become one-line weightsmith errors naming the repo and revision:
unknown repo / revision / file -> :class:`~merge.errors.ModelNotFoundError`, gated, private or
bad-token -> :class:`~merge.errors.HubAccessError`, offline or unreachable and not cached ->
:class:`~merge.errors.HubUnavailableError`, a repo whose index names a shard it does not hold ->
:class:`~merge.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from merge.checkpoint import AUX_FILE_PATTERNS, INDEX_NAME, ResolvedModel
from merge.errors import (
    CheckpointError,
    HubAccessError,
    HubUnavailableError,
    ModelNotFoundError,
    WeightsmithError,
)

#: Files fetched first: they decide which weight files are needed.
FIRST_FILES = (INDEX_NAME, "config.json")
_AUX_RE = re.compile("|".join(f"(?:{p})" for p in AUX_FILE_PATTERNS))
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# Hub repo names: letters, digits, '-', '_', '.'; no leading/trailing '-'/'.', no '--'/'..'; <= 96 chars.
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_NOT_A_REPO_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".yaml", ".yml", ".gguf")
_TRUE = {"1", "true", "yes", "on"}


def _valid_name(part: str) -> bool:
    return bool(_NAME_RE.fullmatch(part)) and "--" not in part and ".." not in part


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``org/name``, ``org/name@rev`` or ``hf://org/name@rev`` -> ``(repo_id, revision or None)``.

    Returns None for anything that is not a Hub reference: absolute or ``./``/``../``/``~``
    paths, Windows paths, a single path component (except behind ``hf://``), more than two
    components, names that are not valid Hub repo names, and names ending in a checkpoint or
    recipe suffix (``a/model.safetensors`` is a mistyped path, not a repo). The revision is
    everything after the first ``@`` (a branch, a tag, a commit or ``refs/pr/N``).
    """
    if not isinstance(ref, str):
        return None
    text = ref.strip()
    explicit = text.startswith("hf://")
    if explicit:
        text = text[len("hf://") :]
    elif text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text or re.match(r"[A-Za-z]:", text):
        return None
    repo_id, at, revision = text.partition("@")
    if at and (not revision or any(c.isspace() for c in revision) or revision.startswith("/")):
        return None
    parts = repo_id.split("/")
    if len(parts) == 1 and not explicit:
        return None
    if len(parts) > 2 or not all(_valid_name(p) for p in parts):
        return None
    if parts[-1].lower().endswith(_NOT_A_REPO_SUFFIXES):
        return None
    return repo_id, (revision or None)


def local_miss(ref: str) -> str:
    """Say that ``ref`` is not on disk, first: where the path stops existing, and a near name if one is
    there (``models/ft-cdoe``: the folder 'models' has no 'ft-cdoe'; did you mean 'models/ft-code'?)."""
    import difflib

    p = Path(ref).expanduser()
    msg = f"model '{ref}': no such local path"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent != Path(".") and parent.is_dir():
        missing = p.relative_to(parent).parts[0]
        msg += f" (the folder '{parent}' has no '{missing}'"
        try:
            near = difflib.get_close_matches(missing, [c.name for c in parent.iterdir()], n=1, cutoff=0.6)
        except OSError:
            near = []
        msg += f"; did you mean '{parent / near[0]}'?)" if near else ")"
    return msg


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not re.fullmatch(r"\d{3} Client Error\.?", line):
            return line[:200]
    return type(e).__name__


class HubResolver:
    """Resolve model references for the engine: a local path wins, else a Hub snapshot.

    ``revision`` is the default for references without ``@rev`` (the reference's own revision
    wins). ``progress=False`` silences the download bars (they go to stderr otherwise).
    ``resolved`` lists every model this resolver returned, in order.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        offline: bool = False,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        progress: bool = True,
    ) -> None:
        self.token = token
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.offline = bool(offline) or _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
        self.cache_dir = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
        self.revision = revision
        self.progress = progress
        self.resolved: list[ResolvedModel] = []
        self._snapshots: dict[tuple[str, str], tuple[Path, str]] = {}

    # -- public -----------------------------------------------------------------------------------
    def __call__(self, ref: str) -> ResolvedModel:
        if not ref.startswith("hf://"):
            local = Path(ref).expanduser()
            if local.exists():
                model = ResolvedModel(ref=ref, path=local)
                self.resolved.append(model)
                return model
        parsed = parse_hub_ref(ref)
        if parsed is None:
            raise ModelNotFoundError(f"{local_miss(ref)}, and it is not a Hub reference (org/name[@revision])")
        repo_id, rev = parsed
        revision = rev or self.revision or "main"
        key = (repo_id, revision)
        if key not in self._snapshots:
            try:
                self._snapshots[key] = self._fetch(ref, repo_id, revision)
            except ModelNotFoundError as e:  # the Hub's answer, after the local path's: both are said
                if ref.startswith("hf://"):
                    raise
                raise type(e)(f"{local_miss(ref)}; also tried as a Hub id: {e}") from None
        path, commit = self._snapshots[key]
        model = ResolvedModel(ref=ref, path=path, repo_id=repo_id, revision=revision, commit=commit)
        self.resolved.append(model)
        return model

    # -- internals --------------------------------------------------------------------------------
    @property
    def _endpoint_name(self) -> str:
        if self.endpoint:
            return self.endpoint
        from huggingface_hub import constants

        return constants.ENDPOINT

    def _download(self, repo_id: str, revision: str, patterns: list[str]) -> Path:
        from huggingface_hub import snapshot_download

        kwargs: dict[str, Any] = {}
        if not self.progress:
            kwargs["tqdm_class"] = _silent_tqdm()
        with _quiet_no_match():  # step 1 may match nothing (a repo with neither index nor config)
            folder = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                cache_dir=self.cache_dir,
                token=self.token,
                endpoint=self.endpoint,
                local_files_only=self.offline,
                **kwargs,
            )
        return Path(folder)

    def _listing(self, repo_id: str, commit: str, folder: Path) -> set[str]:
        """Every file of the repo at ``commit`` (from the cached tree; offline, what the snapshot holds)."""
        try:
            from huggingface_hub import get_cached_repo_tree

            return {f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=self.cache_dir)}
        except Exception:  # noqa: BLE001 - no cached listing (older client, or a cache filled elsewhere)
            pass
        if not self.offline:
            from huggingface_hub import HfApi
            from huggingface_hub.hf_api import RepoFile

            api = HfApi(endpoint=self.endpoint, token=self.token)
            return {
                f.path
                for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                if isinstance(f, RepoFile)
            }
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}

    def _select(self, where: str, files: set[str], folder: Path) -> list[str]:
        """The files a merge needs: the weights (per the index, if any) and the aux files."""
        top = {f for f in files if "/" not in f}
        aux = sorted(f for f in top if _AUX_RE.fullmatch(f) or f == "adapter_config.json")  # + PEFT adapters
        if INDEX_NAME in top:
            index = folder / INDEX_NAME
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{where}: malformed {INDEX_NAME}: {e}") from None
            for shard in shards:
                p = PurePosixPath(str(shard))
                if p.is_absolute() or ".." in p.parts or not str(shard).endswith(".safetensors"):
                    raise CheckpointError(f"{where}: {INDEX_NAME} names an unsafe shard path {shard!r}")
                if str(shard) not in files:
                    raise CheckpointError(
                        f"{where}: {INDEX_NAME} names shard {shard}, which the repo does not hold"
                    )
            return sorted(set(shards) | set(aux) | {INDEX_NAME})
        weights = sorted(f for f in top if f.endswith(".safetensors"))
        if "model.safetensors" in weights:
            weights = ["model.safetensors"]
        if not weights:
            pickles = sorted(f for f in top if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            hint = (
                f"; it has pickle weights ({', '.join(pickles[:3])}), which are never downloaded: "
                "convert them to safetensors"
                if pickles
                else ""
            )
            raise ModelNotFoundError(f"{where}: no .safetensors weights in the repo{hint}")
        return sorted(set(weights) | set(aux))

    def _fetch(self, ref: str, repo_id: str, revision: str) -> tuple[Path, str]:
        where = f"Hub model '{repo_id}' (revision '{revision}')"
        try:
            folder = self._download(repo_id, revision, list(FIRST_FILES))
            commit = folder.name
            if not _COMMIT_RE.fullmatch(
                commit
            ):  # pragma: no cover - the client always returns snapshots/<sha>
                raise CheckpointError(f"{where}: unexpected snapshot folder {folder}")
            files = self._listing(repo_id, commit, folder)
            needed = self._select(where, files, folder)
            folder = self._download(repo_id, commit, needed)
        except WeightsmithError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped below; anything else is re-raised
            raise self._map_error(e, ref, repo_id, revision) from None
        return folder, commit

    def _map_error(self, e: Exception, ref: str, repo_id: str, revision: str) -> Exception:
        from huggingface_hub import errors as hf

        where = f"Hub model '{repo_id}' (revision '{revision}')"
        incomplete = getattr(hf, "IncompleteSnapshotError", ())
        if isinstance(e, hf.GatedRepoError):
            return HubAccessError(
                f"{where} is gated: accept its terms on the Hub and pass a token (--token or HF_TOKEN) of an "
                "account that was granted access "
                f"({'the token was refused' if self._has_token else 'no token given'})"
            )
        if isinstance(e, hf.RepositoryNotFoundError):
            return ModelNotFoundError(
                f"{where}: no such repo at {self._endpoint_name}, or it is private and "
                f"{'the token has no access' if self._has_token else 'no token was given'}"
            )
        if isinstance(e, hf.RevisionNotFoundError):
            return ModelNotFoundError(
                f"{where}: the repo has no revision '{revision}' (branch, tag or commit)"
            )
        if isinstance(e, hf.RemoteEntryNotFoundError):
            return ModelNotFoundError(f"{where}: a file is missing on the Hub: {_first_line(e)}")
        if incomplete and isinstance(e, incomplete):
            return HubUnavailableError(
                f"{where}: the cached snapshot is incomplete and the Hub was not asked "
                f"({'offline mode' if self.offline else 'unreachable'}); run once online to complete it"
            )
        if isinstance(e, hf.LocalEntryNotFoundError):
            if self.offline:
                return HubUnavailableError(
                    f"{where} is not in the local Hub cache ({self._cache_name}) and offline mode is on"
                    " (--offline / HF_HUB_OFFLINE=1); run once online first"
                )
            cause = f" ({_first_line(e.__cause__)})" if e.__cause__ is not None else ""
            return HubUnavailableError(
                f"{where}: cannot get it from the Hub at {self._endpoint_name}{cause} and it is not in the "
                f"local cache ({self._cache_name})"
            )
        if isinstance(e, hf.OfflineModeIsEnabled):
            return HubUnavailableError(f"{where} is not in the local Hub cache and offline mode is on")
        if isinstance(e, hf.HfHubHTTPError):
            status = e.response.status_code if getattr(e, "response", None) is not None else None
            if status in (401, 403):
                return HubAccessError(
                    f"{where}: access denied by {self._endpoint_name} (HTTP {status}: {_first_line(e)})"
                )
            return HubUnavailableError(
                f"{where}: the Hub at {self._endpoint_name} answered HTTP {status}: {_first_line(e)}"
            )
        if _is_network_error(e):
            return HubUnavailableError(
                f"{where}: cannot reach the Hub at {self._endpoint_name}: {_first_line(e)}"
            )
        if isinstance(e, ValueError):
            return ModelNotFoundError(f"{where}: {_first_line(e)}")
        return e

    @property
    def _has_token(self) -> bool:
        if self.token:
            return True
        try:
            from huggingface_hub import get_token

            return bool(get_token())
        except Exception:  # noqa: BLE001 - no token store
            return False

    @property
    def _cache_name(self) -> str:
        if self.cache_dir:
            return self.cache_dir
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE


def _is_network_error(e: BaseException) -> bool:
    try:
        import httpx2

        if isinstance(e, httpx2.HTTPError):
            return True
    except ImportError:  # pragma: no cover - older clients use requests
        pass
    return isinstance(e, ConnectionError | TimeoutError)


class _NoMatchFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No files matched")


@contextmanager
def _quiet_no_match() -> Iterator[None]:
    """Drop the client's "No files matched allow_patterns" warning (expected in step 1)."""
    log = logging.getLogger("huggingface_hub._snapshot_download")
    flt = _NoMatchFilter()
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


def _silent_tqdm() -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Silent(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a merged model folder: ``create_repo(exist_ok=True)`` then ``upload_folder``.

    Returns the commit URL. ``private`` applies when the repo is created (an existing repo keeps
    its visibility). Errors: bad repo id -> WeightsmithError; token refused -> HubAccessError;
    Hub unreachable or failing -> HubUnavailableError.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf

    folder = Path(folder)
    parsed = parse_hub_ref(repo_id)
    if parsed is None or parsed[1] is not None or repo_id.startswith("hf://") or "/" not in repo_id:
        raise WeightsmithError(f"--push-to-hub '{repo_id}': expected a Hub repo id 'org/name' (no @revision)")
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: nothing to push (not a folder)")
    api = HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token)
    where = f"push to Hub repo '{repo_id}'"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message or f"Upload merged model ({folder.name}) with weightsmith",
        )
    except hf.HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status in (401, 403) or isinstance(e, hf.RepositoryNotFoundError):
            raise HubAccessError(
                f"{where}: refused by {api.endpoint} (HTTP {status}): "
                f"{'the token cannot write there' if token else 'no token given (--token or HF_TOKEN)'}"
            ) from None
        raise HubUnavailableError(
            f"{where}: {api.endpoint} answered HTTP {status}: {_first_line(e)}"
        ) from None
    except Exception as e:  # noqa: BLE001
        if _is_network_error(e):
            raise HubUnavailableError(f"{where}: cannot reach {api.endpoint}: {_first_line(e)}") from None
        raise
    return str(info.commit_url)


__all__ = ["HubResolver", "parse_hub_ref", "push_to_hub"]
