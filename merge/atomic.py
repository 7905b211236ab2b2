"""The one way any output appears: written beside the target under a temporary name, then swapped in.

Every command that writes a folder or a file (merge, adapter fold/merge/extract, soup build, moe,
zoo build, metanet train, lineage trees, fusion plans) goes through this module, so one rule holds:

* **Nothing half-written.** The output is written to ``<out>.partial-<id>`` beside the target,
  fsynced, and renamed into place once. An error removes the temporary name and nothing else.
* **Nothing lost under --overwrite.** An existing *folder* is replaced only if it is a previous
  output of weightsmith, recognised by the marker file :data:`MARKER` that every folder output
  carries (an empty folder is replaced too: there is nothing to lose). A folder without the marker,
  a user's folder, is refused with one line naming it. An existing *file* is replaced only by a file
  output of the same path and only if it is a regular file (never a folder).
* **Never an input.** An output that is, contains or lies inside one of the command's inputs is
  refused before any work (:func:`check_output`).
* **Old or new, never neither.** The swap is one ``renameat2(RENAME_EXCHANGE)`` where the kernel
  and file system offer it: the target holds the old output until the instant it holds the new one;
  the old one, now under the temporary name, is deleted afterwards. Elsewhere the old output is first
  renamed to ``.<out>.old-<id>`` and :func:`recover` puts it back if the process died before the new
  one was in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from merge.errors import OutputExistsError, OutputOverlapError

#: the file inside every folder output that says weightsmith wrote it (what --overwrite may replace)
MARKER = ".weightsmith-output"

Kind = Literal["dir", "file"]


def partial_name(out: Path) -> Path:
    """A fresh temporary name beside ``out``: ``<out>.partial-<id>`` (the one convention)."""
    return out.parent / f"{out.name}.partial-{uuid.uuid4().hex[:12]}"


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """An internal file written at once (a zoo's manifest, a job's result, a training state, a saved
    detector): ``write(tmp)`` fills :func:`partial_name` beside ``path``, which is fsynced and renamed
    over ``path`` (the folder fsynced too); on an error the temporary file is removed. No overwrite
    rule: these files belong to a folder weightsmith owns (outputs go through :func:`atomic_output`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def is_weightsmith_output(path: Path) -> bool:
    """A folder that a previous weightsmith command wrote (it carries :data:`MARKER`)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def _resolved(p: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(p))).resolve()


def check_output(
    out: str | Path,
    *,
    overwrite: bool,
    inputs: Iterable[str | Path] = (),
    kind: Kind = "dir",
) -> Path:
    """Refuse an output before any work is done; return it as a ``Path``.

    Raises :class:`OutputOverlapError` when ``out`` is, contains or lies inside an input (local
    paths only: Hub ids and other references that are not on disk are skipped), and
    :class:`OutputExistsError` when ``out`` exists and may not be replaced (see the module's rule).
    """
    out = Path(out)
    target = _resolved(out)
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        src = _resolved(inp)
        if target == src or src in target.parents or target in src.parents:
            relation = "is" if target == src else ("lies inside" if src in target.parents else "contains")
            raise OutputOverlapError(
                f"{out}: the output {relation} the input '{inp}'; a command never writes over its inputs "
                "(choose an output folder outside every input)"
            )
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise OutputExistsError(
            f"{out}: output already exists (to replace it: overwrite, --overwrite on the command line)"
        )
    replaceable(out, kind)
    return out


def replaceable(out: Path, kind: Kind, *, shown: str | None = None) -> None:
    """Raise :class:`OutputExistsError` unless ``--overwrite`` may replace what is at ``out``.

    ``shown``: how the message names the output (a server names it as the caller sent it)."""
    name = shown if shown is not None else str(out)
    if out.is_symlink():
        raise OutputExistsError(f"{name}: is a symbolic link; overwrite replaces only a previous output, not a link")
    if kind == "file":
        if not out.is_file():
            raise OutputExistsError(f"{name}: exists and is not a file; overwrite replaces only a file here")
        return
    if not out.is_dir():
        raise OutputExistsError(f"{name}: exists and is not a folder; overwrite replaces only an output folder")
    if is_weightsmith_output(out) or not any(out.iterdir()):
        return
    raise OutputExistsError(
        f"{name}: exists and is not a previous weightsmith output (it has no {MARKER} file); overwrite "
        "replaces only a folder weightsmith wrote. Move it away yourself or choose another output"
    )


def write_marker(folder: Path, what: str) -> None:
    """Mark ``folder`` (still under its temporary name) as a weightsmith output of command ``what``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("weightsmith")
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        v = "unknown"
    (folder / MARKER).write_text(json.dumps({"written_by": "weightsmith", "version": v, "command": what}) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and every folder, so the rename publishes durable data."""
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        return
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where it is not offered."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def publish(tmp: Path, out: Path, *, overwrite: bool, kind: Kind = "dir", synced: bool = False) -> None:
    """Put the finished ``tmp`` at ``out`` (see the module's rule); ``tmp`` is gone afterwards.

    ``synced``: the writer already fsynced every file and folder under ``tmp`` (a checkpoint's shards)."""
    if not synced:
        fsync_tree(tmp)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out}: output appeared while it was being written; not replaced")
        replaceable(out, kind)  # again: it may have changed while we worked
        if _exchange(tmp, out):
            fsync_dir(out.parent)
            _remove(tmp)  # the old output, now under the temporary name
            return
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        _remove(old)
        return
    os.rename(tmp, out)
    fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_output(
    out: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    kind: Kind = "dir",
    what: str = "output",
) -> Iterator[Path]:
    """Write an output under a temporary name and publish it on success.

    Yields the temporary path: a created, empty folder for ``kind="dir"`` (the marker is added on
    success), a path to create for ``kind="file"``. On an exception nothing but the temporary path
    is removed and the exception propagates; ``out`` is untouched.
    """
    out = check_output(out, overwrite=overwrite, inputs=inputs, kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(out)
    if kind == "dir":
        tmp.mkdir()
    try:
        yield tmp
        if kind == "dir":
            write_marker(tmp, what)
        elif not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the writer created no file")
        publish(tmp, out, overwrite=overwrite, kind=kind)
    except BaseException:
        _remove(tmp)
        raise


def recover(out: str | Path) -> list[Path]:
    """Clean up after a writer that was killed: remove its ``<out>.partial-*`` (and the older
    ``.<out>.partial-*``) leftovers; if it died between moving the previous output aside and renaming
    the new one in, put the previous output back. Returns the paths removed."""
    out = Path(out)
    removed: list[Path] = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for d in [*parent.glob(f"{out.name}.partial-*"), *parent.glob(f".{out.name}.partial-*")]:
        _remove(d)
        removed.append(d)
    olds = sorted(parent.glob(f".{out.name}.old-*"))
    if len(olds) == 1 and not (out.exists() or out.is_symlink()):
        os.rename(olds[0], out)
    else:
        for d in olds:
            _remove(d)
            removed.append(d)
    return removed
