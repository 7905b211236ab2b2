"""What a soup member is: a checkpoint or a diffusers folder, its weight components, its files'
hashes, and whether two members can be souped together (merge/soups/folder.py uses these).

A member is a ``.safetensors`` file, a checkpoint folder (sharded or not) or a diffusers folder
(``model_index.json`` and one sub-folder per component). Its *components* are the parts that hold
weights in safetensors format (the whole checkpoint, or ``unet``, ``text_encoder``, ``vae``...);
every file's sha256 is recorded when the member joins a soup and checked before it is read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from merge.checkpoint import Checkpoint, file_stamp, open_checkpoint
from merge.errors import (
    CheckpointError,
    IntegrityError,
    MissingTensorError,
    ModelNotFoundError,
    ShapeMismatchError,
)

__all__ = [
    "Component",
    "Signature",
    "Member",
    "SoupLayout",
    "Verifier",
    "check_same",
    "copy_verified",
    "detect_layout",
    "new_member",
    "now_utc",
    "read_json",
    "sha256_file",
    "signature",
    "weight_files_of",
]

#: ``progress(event, done, total)``: events "hash", "sum", "write", "commit"
Progress = Callable[[str, int, int], None]

#: main (non-variant) weight files: ``model.safetensors``, ``diffusion_pytorch_model-00001-of-00002.safetensors``
_MAIN_WEIGHTS = re.compile(r"^[^.]+(?:-\d{5}-of-\d{5})?\.safetensors$")
_MAIN_INDEX = re.compile(r"^[^.]+\.safetensors\.index\.json$")
_WEIGHT_LIKE = re.compile(
    r".*\.(?:safetensors|bin|pt|pth|ckpt)$|.*\.safetensors\.index(?:\.[^.]+)?\.json$"
    r"|.*\.bin\.index(?:\.[^.]+)?\.json$"
)


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def hash_stamped(path: Path) -> tuple[str, list[int]]:
    """sha256 of a file and its :func:`file_stamp`, which must not change while the file is read."""
    before = file_stamp(path)
    digest = sha256_file(path)
    after = file_stamp(path)
    if after != before:
        raise IntegrityError(f"{path}: changed while it was being hashed; try again once nothing writes to it")
    return digest, after


# ---------------------------------------------------------------------------------------------
# Layout: what a member is made of
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One weight-bearing part of a member: the whole checkpoint (``name == ""``) or a diffusers
    component folder (``unet``, ``text_encoder``, ``vae``...)."""

    name: str
    folder: str  # relative to the member root ("" for the root)
    weights: tuple[str, ...]  # main weight files (and index), relative to the member root
    weights_name: str  # how the built soup names its weights (model.safetensors, diffusion_pytorch_model...)

    @property
    def prefix(self) -> str:
        return f"{self.name}/" if self.name else ""


@dataclass(frozen=True)
class SoupLayout:
    kind: str  # "checkpoint" | "diffusers"
    root: Path  # the member's folder, or the .safetensors file itself
    components: dict[str, Component]

    def open(self, comp: str) -> Checkpoint:
        c = self.components[comp]
        if self.root.is_file():
            return open_checkpoint(self.root)
        index = [w for w in c.weights if w.endswith(".index.json")]
        return open_checkpoint(self.root / c.folder if index else self.root / c.weights[0])

    def files(self) -> list[str]:
        """Every file of the member (relative paths, sorted); hidden files and folders are skipped."""
        if self.root.is_file():
            return [self.root.name]
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if not f.startswith("."):
                    out.append(str((Path(dirpath) / f).relative_to(self.root)))
        return sorted(out)

    def path_of(self, rel: str) -> Path:
        return self.root if self.root.is_file() else self.root / rel


def _component(root: Path, folder: str, name: str) -> Component | None:
    d = root / folder if folder else root
    names = sorted(f.name for f in d.iterdir() if f.is_file())
    index = [n for n in names if _MAIN_INDEX.fullmatch(n)]
    if len(index) > 1:
        raise CheckpointError(
            f"{d}: several weight indexes ({', '.join(index)}); cannot tell which is the model"
        )
    if index:
        data = read_json(d / index[0])
        shards = sorted(set(data.get("weight_map", {}).values())) if isinstance(data, dict) else []
        if not shards:
            raise CheckpointError(f"{d / index[0]}: malformed index (no weight_map)")
        rel = [str(Path(folder) / s) if folder else s for s in shards]
        stem = index[0].removesuffix(".index.json")
        return Component(
            name, folder, tuple([str(Path(folder) / index[0]) if folder else index[0], *rel]), stem
        )
    single = [n for n in names if _MAIN_WEIGHTS.fullmatch(n) and not re.search(r"-\d{5}-of-\d{5}", n)]
    if len(single) > 1:
        raise CheckpointError(
            f"{d}: several weight files ({', '.join(single)}) and no index; cannot tell which is the model"
        )
    if single:
        return Component(name, folder, (str(Path(folder) / single[0]) if folder else single[0],), single[0])
    if any(_WEIGHT_LIKE.fullmatch(n) for n in names):
        raise CheckpointError(
            f"{d}: weights are not in safetensors format (pickle .bin/.pt files are refused); "
            "convert them to safetensors"
        )
    return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from None


def detect_layout(path: str | Path) -> SoupLayout:
    """What a member (or base) is: a plain checkpoint or a diffusers folder, and its weight components."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelNotFoundError(f"{root}: no such file or folder")
    if root.is_file():
        if root.suffix != ".safetensors":
            raise CheckpointError(f"{root}: not a safetensors checkpoint")
        return SoupLayout("checkpoint", root, {"": Component("", "", (root.name,), "model.safetensors")})
    index = root / "model_index.json"
    if index.is_file():
        data = read_json(index)
        if not isinstance(data, dict):
            raise CheckpointError(f"{index}: not a JSON object")
        comps: dict[str, Component] = {}
        for key, value in sorted(data.items()):
            if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
                continue
            if not (root / key).is_dir():
                raise CheckpointError(f"{index}: component '{key}' has no folder {root / key}")
            c = _component(root, key, key)
            if c is not None:
                comps[key] = c
        if not comps:
            raise CheckpointError(
                f"{root}: a diffusers folder with no weight component in safetensors format"
            )
        return SoupLayout("diffusers", root, comps)
    c = _component(root, "", "")
    if c is None:
        raise ModelNotFoundError(f"{root}: no checkpoint found (no .safetensors file)")
    return SoupLayout("checkpoint", root, {"": c})


# ---------------------------------------------------------------------------------------------
# Members
# ---------------------------------------------------------------------------------------------


@dataclass
class Member:
    id: str
    path: str
    weight: float
    files: dict[str, str]  # relative path -> sha256
    components: dict[str, str]  # component -> digest of its weight files
    added: str = ""
    #: relative path -> file_stamp when its sha256 was taken (not part of the hash; may be absent)
    stamps: dict[str, list[int]] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for rel, d in sorted(self.files.items()):
            h.update(f"{rel}\0{d}\n".encode())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "weight": self.weight,
            "hash": self.hash,
            "added": self.added,
            "components": self.components,
            "files": self.files,
            "stamps": self.stamps,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Member:
        return Member(
            d["id"],
            d["path"],
            float(d["weight"]),
            dict(d["files"]),
            dict(d["components"]),
            d.get("added", ""),
            {k: list(v) for k, v in d.get("stamps", {}).items()},
        )


def _component_digest(layout: SoupLayout, comp: Component, files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel in comp.weights:
        key = layout.root.name if layout.root.is_file() else rel
        h.update(f"{Path(rel).name}\0{files[key]}\n".encode())
    return h.hexdigest()


def new_member(path: Path, mid: str, weight: float, progress: Progress | None) -> tuple[Member, SoupLayout]:
    layout = detect_layout(path)
    rels = layout.files()
    files, stamps = {}, {}
    for i, rel in enumerate(rels):
        files[rel], stamps[rel] = hash_stamped(layout.path_of(rel))
        if progress:
            progress("hash", i + 1, len(rels))
    comps = {name: _component_digest(layout, c, files) for name, c in layout.components.items()}
    return Member(mid, str(path.resolve()), weight, files, comps, now_utc(), stamps), layout


class Verifier:
    """Checks member files against their recorded hashes, each file at most once per operation."""

    def __init__(self) -> None:
        self.done: set[tuple[str, str]] = set()

    def trust(self, m: Member) -> None:
        self.done |= {(m.id, rel) for rel in m.files}

    def layout(self, m: Member) -> SoupLayout:
        p = Path(m.path)
        if not p.exists():
            raise ModelNotFoundError(f"soup member '{m.id}': {p} is missing from disk")
        return detect_layout(p)

    def check(self, m: Member, layout: SoupLayout, rels: list[str], *, stamped: bool = False) -> None:
        """Each file of ``rels`` is the one recorded: same sha256 (or, with ``stamped``, the same
        :func:`file_stamp` as when it was hashed, else the sha256 again)."""
        for rel in rels:
            if (m.id, rel) in self.done:
                continue
            if rel not in m.files:
                raise IntegrityError(
                    f"soup member '{m.id}': {layout.path_of(rel)} was not part of the member when "
                    "it was added (its layout changed)"
                )
            f = layout.path_of(rel)
            if not f.exists():
                raise IntegrityError(
                    f"soup member '{m.id}': {f} is missing (recorded sha256 {m.files[rel][:12]}...)"
                )
            if stamped and m.stamps.get(rel) is not None and file_stamp(f) == m.stamps[rel]:
                self.done.add((m.id, rel))
                continue
            got = sha256_file(f)
            if got != m.files[rel]:
                raise IntegrityError(
                    f"soup member '{m.id}': {f} has changed since it was added "
                    f"(sha256 {got[:12]}..., recorded {m.files[rel][:12]}...)"
                )
            self.done.add((m.id, rel))

    def weights(self, m: Member, comp: str, *, stamped: bool = False) -> SoupLayout:
        layout = self.layout(m)
        if comp not in layout.components:
            raise IntegrityError(f"soup member '{m.id}': {m.path} no longer has component '{comp}'")
        c = layout.components[comp]
        self.check(m, layout, [layout.root.name] if layout.root.is_file() else list(c.weights), stamped=stamped)
        return layout


# ---------------------------------------------------------------------------------------------
# Compatibility
# ---------------------------------------------------------------------------------------------


#: component -> tensor -> [shape, is floating]: what members of one soup must agree on
Signature = dict[str, dict[str, list[Any]]]


def signature(layout: SoupLayout) -> Signature:
    """The architecture of a member, from its safetensors headers: recorded in the soup manifest, so a
    new member is checked against it without reading the other members."""
    out: Signature = {}
    for name in layout.components:
        ck = layout.open(name)
        try:
            out[name] = {t: [list(ck.shape(t)), ck.dtype(t).is_floating_point] for t in ck}
        finally:
            ck.close()
    return out


def check_same(kind: str, ref: Signature, ref_name: str, new: SoupLayout, new_name: str) -> Signature:
    """``new`` is a ``kind`` member with the tensors (names, shapes, float or not) of ``ref``; returns
    its signature. Errors name the member's file and the first tensor that differs."""
    if kind != new.kind:
        raise CheckpointError(f"{new.root}: {new_name} is a {new.kind} folder, but {ref_name} is a {kind}")
    if set(ref) != set(new.components):
        missing = sorted(set(ref) - set(new.components))
        extra = sorted(set(new.components) - set(ref))
        raise CheckpointError(
            f"{new.root}: {new_name} has weight components {sorted(new.components)}, expected "
            f"{sorted(ref)} as in {ref_name}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (extra: {', '.join(extra)})" if extra else "")
        )
    b = signature(new)
    for comp in ref:
        where = f"{new.root / comp}" if comp else f"{new.root}"
        for t, (shape, flt) in ref[comp].items():
            if t not in b[comp]:
                raise MissingTensorError(
                    f"{where}: tensor '{t}' is missing (present in {ref_name}); the models do "
                    "not share an architecture"
                )
            if b[comp][t][0] != shape:
                raise ShapeMismatchError(
                    f"{where}: tensor '{t}' has shape {b[comp][t][0]}, expected {shape} as in {ref_name}"
                )
            if b[comp][t][1] != flt:
                raise ShapeMismatchError(
                    f"{where}: tensor '{t}' is {'' if b[comp][t][1] else 'not '}floating point, "
                    f"unlike in {ref_name}"
                )
        extra = sorted(set(b[comp]) - set(ref[comp]))
        if extra:
            raise MissingTensorError(
                f"{where}: tensor '{extra[0]}' is not in {ref_name} ({len(extra)} such tensors); "
                "the models do not share an architecture"
            )
    return b


def weight_files_of(layout: SoupLayout, comp: Component) -> set[str]:
    """Files a souped component replaces: its weights, and stale variants (``*.fp16.safetensors``...)."""
    if layout.root.is_file():
        return {layout.root.name}
    out = set(comp.weights)
    folder = layout.root / comp.folder if comp.folder else layout.root
    for f in folder.iterdir():
        if f.is_file() and _WEIGHT_LIKE.fullmatch(f.name):
            out.add(str(Path(comp.folder) / f.name) if comp.folder else f.name)
    return out


def copy_verified(m: Member, layout: SoupLayout, rel: str, dst: Path) -> None:
    """Copy one member file, hashing it on the way; a file that changed since it was added is an error."""
    src = layout.path_of(rel)
    if rel not in m.files:
        raise IntegrityError(f"soup member '{m.id}': {src} was not part of the member when it was added")
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            while chunk := fi.read(1 << 22):
                h.update(chunk)
                fo.write(chunk)
    except OSError as e:
        raise CheckpointError(f"{src}: cannot copy: {e.strerror or e}") from None
    if h.hexdigest() != m.files[rel]:
        raise IntegrityError(
            f"soup member '{m.id}': {src} has changed since it was added "
            f"(sha256 {h.hexdigest()[:12]}..., recorded {m.files[rel][:12]}...)"
        )
