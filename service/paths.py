"""Confinement of every server-side path to configured roots, and model-reference resolution.

The service accepts local paths only inside the folders it was started with (``--root``), plus
its own upload and output areas. The rules (docs/service.md, "Confinement rules"):

* no ``..`` component anywhere, no NUL byte, nothing empty;
* a relative path is taken relative to a root (inputs: the first root where it exists; outputs:
  the first root);
* the path is resolved with every symlink followed (``Path.resolve``) and must still lie inside
  an allowed folder, so a symlink that leaves a root is refused (PERMISSION_DENIED);
* a checkpoint folder's own entries are checked too: a ``model.safetensors`` or ``config.json``
  that is a symlink to a file outside the roots is refused, so a merge cannot be used to read
  (and copy into its output) a file the server should not expose;
* an output may not be a root, may not be a symlink, and may not overlap any input (writing
  into or over a model being read is refused).

References: ``upload://<id>`` (a checkpoint uploaded with ``UploadCheckpoint``), ``job://<id>``
(a finished merge job's output), a path, or a Hub id (``org/name[@rev]``, ``hf://org/name@rev``)
when the server allows the Hub. Time-of-check/time-of-use races against someone who can create
symlinks inside a root while a job runs are not covered: roots are meant to be folders that only
trusted users can write.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge.checkpoint import ResolvedModel
from merge.errors import ModelNotFoundError, WeightsmithError

UPLOAD_SCHEME = "upload://"
JOB_SCHEME = "job://"
FILE_SCHEME = "file://"
HF_SCHEME = "hf://"
ID_RE = re.compile(r"^[0-9a-f]{32}$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class PathNotAllowedError(WeightsmithError):
    """A path lies outside the server's roots (directly or through a symlink)."""

    grpc_code = "PERMISSION_DENIED"


class InvalidPathError(WeightsmithError):
    """A path is malformed (empty, ``..``, NUL byte, a root itself...)."""

    grpc_code = "INVALID_ARGUMENT"


class HubDisabledError(WeightsmithError):
    """A Hub reference was given to a server that does not allow the Hub."""

    grpc_code = "FAILED_PRECONDITION"


def _check_syntax(text: str, field: str) -> Path:
    if not isinstance(text, str) or not text.strip():
        raise InvalidPathError(f"{field}: empty path")
    if "\x00" in text:
        raise InvalidPathError(f"{field}: path contains a NUL byte")
    p = Path(text)
    if ".." in p.parts:
        raise InvalidPathError(f"{field}: path {text!r} contains '..' (not allowed)")
    return p


def inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def overlaps(a: Path, b: Path) -> bool:
    """True when one path is the other or contains it."""
    return inside(a, b) or inside(b, a)


#: an absolute path inside a message: from a '/' that starts a word up to a quote, space or bracket
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;()\[\]{}<>]*")


def redact_paths(
    message: str,
    *,
    keep: Sequence[Path] = (),
    sent: Sequence[str] = (),
    aliases: Sequence[tuple[Path, str]] = (),
) -> str:
    """``message`` with no server path the caller may not see (docs/service.md: errors never reveal
    paths outside the roots, nor where the server keeps its files).

    An absolute path stays when it is inside a folder of ``keep`` (the roots) or is, or lies below,
    a string the caller ``sent``; one inside a folder of ``aliases`` is written as the alias plus what
    follows its first component (``data/uploads/<id>/x`` -> ``upload://<id>/x``); any other becomes
    ``<server path>``.
    """
    sent_paths = [t.rstrip("/") for t in sent if t.startswith("/")]

    def sub(m: re.Match[str]) -> str:
        token = m.group(0)
        text = token.rstrip(".:")
        tail = token[len(text) :]
        if any(text == t or text.startswith(t + "/") for t in sent_paths):
            return token
        p = Path(text)
        if any(inside(p, k) for k in keep):
            return token
        for folder, scheme in aliases:
            if inside(p, folder) and p != folder:
                first, *rest = p.relative_to(folder).parts
                head = scheme + first if not first.startswith(".") else scheme.rstrip(":/")
                return "/".join([head, *rest]) + tail
        return "<server path>" + tail

    return _ABS_PATH.sub(sub, message)


class Roots:
    """The folders a server may read and write, resolved once at start-up."""

    def __init__(self, roots: Sequence[str | Path], extra: Sequence[str | Path] = ()) -> None:
        resolved: list[Path] = []
        for r in roots:
            p = Path(r).expanduser()
            if not p.is_dir():
                raise InvalidPathError(f"root {str(r)!r} is not a folder")
            resolved.append(p.resolve(strict=True))
        self.roots = resolved
        #: server-owned areas (uploads, default outputs): readable as inputs, not named directly
        self.extra = [Path(e).resolve() for e in extra]

    @property
    def allowed(self) -> list[Path]:
        return self.roots + self.extra

    def is_allowed(self, real: Path) -> bool:
        return any(inside(real, a) for a in self.allowed)

    def _deny(self, field: str, text: str, real: Path, named: Path | None = None) -> PathNotAllowedError:
        """Refuse ``text`` (``named``: the path it names, before symlinks are followed): the message says
        what the caller sent and whether a symlink took it out, never where it resolved to."""
        via = " (through a symlink)" if named is not None and real != named else ""
        return PathNotAllowedError(f"{field}: path {text!r} is outside the server's roots{via}")

    def resolve_input(self, text: str, field: str = "path") -> Path:
        """An existing file or folder inside the roots (symlinks followed), or an error."""
        p = _check_syntax(text, field)
        if not p.is_absolute():
            if not self.roots:
                raise PathNotAllowedError(f"{field}: relative path {text!r} but the server has no --root")
            cands = [r / p for r in self.roots]
            p = next((c for c in cands if c.exists() or c.is_symlink()), cands[0])
        if not p.exists() and not p.is_symlink():
            if not self.is_allowed(p.parent.resolve()):
                raise self._deny(field, text, p)
            raise ModelNotFoundError(f"{field}: {text!r}: no such file or folder on the server")
        try:
            real = p.resolve(strict=True)
        except (FileNotFoundError, RuntimeError):  # dangling or looping symlink
            real = p.resolve()
            if not self.is_allowed(real):
                raise self._deny(field, text, real, p.absolute()) from None
            raise ModelNotFoundError(f"{field}: {text!r}: broken symlink") from None
        if not self.is_allowed(real):
            raise self._deny(field, text, real, p.absolute())
        if real.is_dir():
            self.check_folder_entries(real, field, shown=text)
        return real

    def check_folder_entries(self, folder: Path, field: str, *, shown: str | None = None) -> None:
        """Refuse a checkpoint folder whose files are symlinks leaving the allowed folders."""
        for entry in folder.iterdir():
            if entry.is_symlink():
                real = entry.resolve()
                if not self.is_allowed(real):
                    where = f"{shown.rstrip('/')}/{entry.name}" if shown else entry.name
                    raise PathNotAllowedError(f"{field}: {where} is a symlink that leaves the server's roots")

    def resolve_output(self, text: str, field: str = "output_path") -> Path:
        """Where a job may write its output folder (it need not exist yet)."""
        p = _check_syntax(text, field)
        if not p.is_absolute():
            if not self.roots:
                raise PathNotAllowedError(f"{field}: relative path {text!r} but the server has no --root")
            p = self.roots[0] / p
        if p.is_symlink():
            raise PathNotAllowedError(f"{field}: {text!r} is a symlink; give the real folder")
        real = p.parent.resolve() / p.name
        if not any(inside(real, r) for r in self.roots):
            raise self._deny(field, text, real, p.absolute())
        if any(real == r for r in self.allowed):
            raise InvalidPathError(f"{field}: {text!r} is a server root itself; name a folder inside it")
        if real.exists() and not real.is_dir():
            raise InvalidPathError(f"{field}: {text!r} exists and is not a folder")
        return real


@dataclass(frozen=True)
class HubConfig:
    """How (and whether) the server resolves Hub references."""

    enabled: bool = True
    offline: bool = False
    endpoint: str | None = None
    cache_dir: str | None = None
    token: str | None = None


def looks_like_hub(ref: str) -> bool:
    if ref.startswith(HF_SCHEME):
        return True
    try:
        from merge import hub  # type: ignore[attr-defined]
    except ImportError:
        hub = None  # type: ignore[assignment]
    parse = getattr(hub, "parse_hub_ref", None) if hub is not None else None
    if parse is not None:
        try:
            return parse(ref) is not None
        except Exception:  # noqa: BLE001 - a parser that raises means "not a Hub ref"
            return False
    return bool(_HUB_RE.match(ref))


class RefResolver:
    """Turns a recipe's model references into confined local paths (a ``resolver`` for the engine)."""

    def __init__(
        self,
        roots: Roots,
        uploads_dir: Path,
        *,
        job_output: Callable[[str], Path | None] | None = None,
        hub: HubConfig | None = None,
    ) -> None:
        self.roots = roots
        self.uploads_dir = uploads_dir
        self.job_output = job_output
        self.hub = hub or HubConfig(enabled=False)
        self._hub_resolver: Any = None

    def kind(self, ref: str) -> str:
        """ "upload", "job", "path" or "hub" (without touching the file system beyond exists())."""
        if ref.startswith(UPLOAD_SCHEME):
            return "upload"
        if ref.startswith(JOB_SCHEME):
            return "job"
        if ref.startswith(FILE_SCHEME):
            return "path"
        if ref.startswith(HF_SCHEME):
            return "hub"
        p = Path(ref)
        if p.is_absolute() or ref.startswith(("./", "~")):
            return "path"
        if (
            "\x00" not in ref
            and ".." not in p.parts
            and any((r / p).exists() or (r / p).is_symlink() for r in self.roots.roots)
        ):
            return "path"
        return "hub" if looks_like_hub(ref) else "path"

    def __call__(self, ref: str, field: str | None = None) -> ResolvedModel:
        field = field or f"model '{ref}'"
        kind = self.kind(ref)
        if kind == "upload":
            uid = ref[len(UPLOAD_SCHEME) :]
            if not ID_RE.match(uid):
                raise InvalidPathError(
                    f"{field}: malformed upload reference {ref!r} (expected upload://<32 hex>)"
                )
            path = self.uploads_dir / uid
            if not path.is_dir():
                raise ModelNotFoundError(f"{field}: no upload {uid}")
            return ResolvedModel(ref=ref, path=path)
        if kind == "job":
            jid = ref[len(JOB_SCHEME) :]
            if not ID_RE.match(jid):
                raise InvalidPathError(f"{field}: malformed job reference {ref!r} (expected job://<32 hex>)")
            out = self.job_output(jid) if self.job_output else None
            if out is None:
                raise ModelNotFoundError(f"{field}: job {jid} does not exist or has not succeeded")
            real = self.roots.resolve_input(str(out), field)
            return ResolvedModel(ref=ref, path=real)
        if kind == "hub":
            return self._resolve_hub(ref, field)
        text = ref[len(FILE_SCHEME) :] if ref.startswith(FILE_SCHEME) else ref
        if text.startswith("~"):
            raise InvalidPathError(f"{field}: '~' paths are not allowed on the server")
        return ResolvedModel(ref=ref, path=self.roots.resolve_input(text, field))

    def _resolve_hub(self, ref: str, field: str) -> ResolvedModel:
        if not self.hub.enabled:
            raise HubDisabledError(
                f"{field}: Hub references are disabled on this server (start it with --hub)"
            )
        try:
            from merge import hub  # type: ignore[attr-defined]
        except ImportError:
            raise HubDisabledError(
                f"{field}: this weightsmith has no Hub support (merge.hub missing)"
            ) from None
        if self._hub_resolver is None:
            self._hub_resolver = hub.HubResolver(
                token=self.hub.token,
                endpoint=self.hub.endpoint,
                offline=self.hub.offline,
                cache_dir=self.hub.cache_dir,
                progress=False,
            )
        # Always through "hf://": the resolver's own "a local path wins" rule would accept a path
        # relative to the server's working directory, outside the roots.
        resolved = self._hub_resolver(ref if ref.startswith(HF_SCHEME) else HF_SCHEME + ref)
        if resolved.ref != ref:
            resolved = ResolvedModel(
                ref=ref,
                path=resolved.path,
                repo_id=resolved.repo_id,
                revision=resolved.revision,
                commit=resolved.commit,
            )
        return resolved
