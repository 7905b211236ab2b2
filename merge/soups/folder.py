"""A living soup folder: Diffusion Soup's members can be added and removed after the fact.

Biggs, Seshadri et al., "Diffusion Soup: Model Merging for Text-to-Image Diffusion Models"
(arXiv:2406.08431): models fine-tuned from one pretrained checkpoint on separate data shards are
averaged, θ_soup = Σ_i w_i θ_i / Σ_i w_i (§3, uniform w_i in the paper); adding a shard's model
is continual learning, removing one unlearns its shard.

A soup is a folder::

    soup.json          manifest: members (path, weight, content hashes), base, dtype, history
    state-<gen>/       float64 running sums Σ_i w_i θ_i of the components that differ between members
    .lock              flock(2) target: one add/remove at a time, builds see a consistent state

Members are checkpoints (a ``.safetensors`` file or a folder, sharded or not) or **diffusers
folders** (``model_index.json`` and one sub-folder per component). Components whose weights
differ between members are summed; identical ones (a frozen text encoder or VAE) are copied
byte for byte at build time; config, scheduler and tokenizer files come from the first member.

Exactness. ``add`` updates the running sum, ``S ← S + w·θ`` in float64; ``remove`` recomputes
the sum from the remaining members (in their order), because subtraction does not undo a
rounded addition exactly. Both follow the same sequence of float64 operations as souping the
members from scratch (``init``), so removing a member gives exactly the bits of a soup built
without it, and add-then-remove restores the previous soup bit for bit.

OPCM soups (``method="opcm"``, :mod:`merge.soups.opcm`): Tang et al., "Merging Models on the Fly
Without Retraining" (arXiv:2501.09522). Members are task models fine-tuned from the soup's ``base``
and arrive in order; ``add`` is one OPCM step, S ← S + P(τ) with the new task vector projected away
from the merged update's top singular directions; the state folder holds S (float64) and the
manifest the task-vector norms, λ and every step's figures; ``build`` writes θ_0 + S/λ. OPCM is
order-dependent and its projection discards what overlaps earlier members, so a member cannot be
subtracted: ``remove`` replays OPCM over the remaining members in their order (reading each again),
which gives exactly the soup that never had the member.

Integrity and atomicity. Every member file's sha256 is recorded when it joins, and checked
before the file is read again (a changed file is an :class:`~merge.errors.IntegrityError`
naming it); the state's files are hashed too. An operation writes a new ``state-<gen>/`` and
then replaces ``soup.json`` with one rename, so a failure or a kill at any point leaves the
soup as it was (a leftover state folder is removed by the next ``add``/``remove``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from merge.atomic import atomic_output, check_output, fsync_dir, replace_file
from merge.checkpoint import Checkpoint, CheckpointWriter, OutputTensor
from merge.errors import (
    IntegrityError,
    InvalidArgumentError,
    ModelNotFoundError,
    OutputExistsError,
    SoupError,
)
from merge.methods.runner import CHUNK_ELEMS, chunk_grid
from merge.soups import opcm as _opcm
from merge.soups.members import (
    Component,
    Member,
    Progress,
    SoupLayout,
    Verifier,
    check_same,
    copy_verified,
    detect_layout,
    new_member,
    now_utc,
    read_json,
    signature,
    weight_files_of,
)
from merge.soups.state import (
    RowsFn,
    _differing,
    _mean_of,
    _opcm_of,
    _open_state,
    _write_opcm_state,
    _write_state,
)

__all__ = ["Member", "Soup", "SoupLayout", "detect_layout"]

MANIFEST = "soup.json"
LOCK = ".lock"
FORMAT = "weightsmith-soup"
VERSION = 1
#: the manifest version of an OPCM soup (a weightsmith that reads only version 1 refuses it, rather than
#: building its projected sum as if it were a running sum of members)
OPCM_VERSION = 2
METHODS = ("average", "opcm")
BUILD_INFO = "weightsmith_soup.json"
OUT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# ---------------------------------------------------------------------------------------------
# The soup
# ---------------------------------------------------------------------------------------------


class Soup:
    """A soup folder. Every operation re-reads ``soup.json`` under the folder's lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = self._read()

    # -- manifest --------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        f = self.path / MANIFEST
        if not f.is_file():
            if not self.path.exists():
                raise ModelNotFoundError(f"{self.path}: no such soup folder")
            raise SoupError(
                f"{self.path}: not a soup folder (no {MANIFEST}; create one with 'weightsmith soup init')"
            )
        data = read_json(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SoupError(f"{f}: not a weightsmith soup manifest")
        if data.get("version") not in (VERSION, OPCM_VERSION):
            raise SoupError(
                f"{f}: soup format version {data.get('version')}, this weightsmith reads {VERSION} and {OPCM_VERSION}"
            )
        if data.get("method", "average") not in METHODS:
            raise SoupError(f"{f}: unknown soup method {data.get('method')!r} (known: {', '.join(METHODS)})")
        return data

    @property
    def members(self) -> list[Member]:
        return [Member.from_json(m) for m in self.manifest["members"]]

    @property
    def method(self) -> str:
        """``average`` (Diffusion Soup: the weighted mean) or ``opcm`` (continual merging by projection)."""
        return self.manifest.get("method", "average")

    @property
    def alpha(self) -> float | None:
        return self.manifest["opcm"]["alpha"] if self.method == "opcm" else None

    @property
    def soup_id(self) -> str:
        return _soup_id(self.members, self.alpha)

    @property
    def total_weight(self) -> float:
        return _total_weight(self.members)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            self.manifest = self._read()
            yield
        finally:
            os.close(fd)

    # -- creating --------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        path: str | Path,
        members: list[str | Path] | None = None,
        *,
        ids: list[str] | None = None,
        weights: list[float] | None = None,
        base: str | Path | None = None,
        dtype: str | None = None,
        name: str | None = None,
        method: str = "average",
        alpha: float | None = None,
        progress: Progress | None = None,
    ) -> Soup:
        """Create a soup folder at ``path`` (which must not exist) with the given members, atomically.

        ``method="opcm"`` (needs ``base``; ``alpha`` default 0.5) makes a continual OPCM soup: the members
        are merged in the given order, one OPCM step each (Tang et al., arXiv:2501.09522)."""
        path = Path(path)
        if path.exists():
            raise OutputExistsError(f"{path}: already exists (a soup is created in a new folder)")
        if method not in METHODS:
            raise SoupError(f"soup method {method!r}: expected one of {', '.join(METHODS)}")
        if method == "opcm":
            alpha = _opcm.check_alpha(_opcm.ALPHA if alpha is None else alpha)
            if base is None:
                raise SoupError(
                    "an OPCM soup needs a base (--base): the pretrained model its members' task vectors "
                    "are taken from"
                )
        elif alpha is not None:
            raise InvalidArgumentError("alpha is a parameter of OPCM soups (method 'opcm'), not of averaging soups")
        check_output(path, overwrite=False, inputs=[*(members or []), *([base] if base is not None else [])])
        if dtype is not None and dtype not in OUT_DTYPES:
            raise SoupError(f"dtype {dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
        members = [Path(m) for m in members or []]
        ids = list(ids) if ids is not None else [_default_id(m) for m in members]
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(ids) != len(members) or len(weights) != len(members):
            raise SoupError(f"{len(members)} members but {len(ids)} ids and {len(weights)} weights")
        if method == "opcm":
            for mid, w in zip(ids, weights, strict=True):
                _check_opcm_weight(w, mid)
        base_rec = None
        ref: tuple[str, Any, str] | None = None  # kind, signature, what it is
        if base is not None:
            bm, blayout = new_member(Path(base), "base", 1.0, progress)
            base_rec = {k: v for k, v in bm.to_json().items() if k not in ("id", "weight")}
            ref = (blayout.kind, signature(blayout), "the base")
        recs: list[Member] = []
        for m, mid, w in zip(members, ids, weights, strict=True):
            _check_id(mid, recs)
            rec, layout = new_member(m, mid, _check_weight(w, mid), progress)
            if ref is None:
                ref = (layout.kind, signature(layout), f"member '{mid}'")
            else:
                check_same(ref[0], ref[1], ref[2], layout, f"member '{mid}'")
            recs.append(rec)
        with atomic_output(path, what="soup") as tmp:
            (tmp / LOCK).touch()
            manifest = {
                "format": FORMAT,
                "version": OPCM_VERSION if method == "opcm" else VERSION,
                "name": name or path.name,
                "created": now_utc(),
                "method": method,
                "kind": ref[0] if ref else None,
                "signature": ref[1] if ref else None,
                "signature_from": ref[2] if ref else None,
                "dtype": dtype,
                "base": base_rec,
                "generation": 1,
                "members": [],
                "state": None,
                "history": [],
            }
            ver = Verifier()
            for r in recs:
                ver.trust(r)
            if method == "opcm":
                assert base_rec is not None and alpha is not None
                ver.trust(_base_member(base_rec))
                manifest["state"], manifest["opcm"] = _write_opcm_state(
                    tmp, 1, recs, None, None, ver, progress, _base_member(base_rec), {"alpha": alpha}
                )
            else:
                manifest["state"] = _write_state(tmp, 1, recs, None, None, ver, progress)
            manifest["members"] = [r.to_json() for r in recs]
            manifest["history"].append(_event("init", None, recs, alpha))
            _write_manifest(tmp, manifest)
        return cls(path)

    # -- membership ------------------------------------------------------------------------------
    def add(
        self,
        member: str | Path,
        *,
        id: str | None = None,
        weight: float = 1.0,
        progress: Progress | None = None,
    ) -> Soup:
        """Add a member (continual learning: S ← S + w·θ; in an OPCM soup, one OPCM step). Atomic: on any
        error the soup is unchanged."""
        member = Path(member)
        with self._locked(exclusive=True):
            self._cleanup()
            members = self.members
            mid = id or _default_id(member)
            _check_id(mid, members)
            if self.method == "opcm":
                _check_opcm_weight(weight, mid)
            rec, layout = new_member(member, mid, _check_weight(weight, mid), progress)
            ver = Verifier()
            ver.trust(rec)  # hashed a moment ago
            if self.manifest.get("signature") is None:  # the soup's first member (and no base)
                self.manifest["kind"] = layout.kind
                self.manifest["signature"] = signature(layout)
                self.manifest["signature_from"] = f"member '{mid}'"
            else:
                check_same(
                    self.manifest["kind"],
                    self.manifest["signature"],
                    self.manifest["signature_from"],
                    layout,
                    f"member '{mid}'",
                )
            self._commit("add", mid, [*members, rec], (members, rec), ver, progress)
        return self

    def remove(self, member_id: str, *, progress: Progress | None = None) -> Soup:
        """Remove a member (unlearning): the sums are recomputed from the remaining members, so the
        result is exactly the soup of the others. In an OPCM soup, OPCM is replayed over the remaining
        members in their order (the projection cannot be undone). Atomic: on any error the soup is unchanged."""
        with self._locked(exclusive=True):
            self._cleanup()
            members = self.members
            if member_id not in {m.id for m in members}:
                known = ", ".join(m.id for m in members) or "none"
                raise SoupError(f"{self.path}: '{member_id}' is not a member of the soup (members: {known})")
            rest = [m for m in members if m.id != member_id]
            self._commit("remove", member_id, rest, None, Verifier(), progress)
        return self

    def _commit(
        self,
        op: str,
        mid: str,
        members: list[Member],
        incremental: tuple[list[Member], Member] | None,
        ver: Verifier,
        progress: Progress | None,
    ) -> None:
        old_state = self.manifest.get("state")
        gen = int(self.manifest.get("generation", 1)) + 1
        opcm = None
        if self.method == "opcm":
            state, opcm = _write_opcm_state(
                self.path, gen, members, incremental, old_state, ver, progress,
                _base_member(self.manifest["base"]), self.manifest["opcm"],
            )  # fmt: skip
        else:
            state = _write_state(self.path, gen, members, incremental, old_state, ver, progress)
        try:
            if progress:
                progress("commit", 0, 1)
            manifest = dict(self.manifest)
            manifest["generation"] = gen
            manifest["members"] = [m.to_json() for m in members]
            manifest["state"] = state
            if opcm is not None:
                manifest["opcm"] = opcm
            manifest["history"] = [*manifest["history"], _event(op, mid, members, self.alpha)]
            _write_manifest(self.path, manifest)
        except BaseException:
            if state is not None:
                shutil.rmtree(self.path / state["dir"], ignore_errors=True)
            raise
        self.manifest = manifest
        if old_state is not None and (state is None or old_state["dir"] != state["dir"]):
            shutil.rmtree(self.path / old_state["dir"], ignore_errors=True)
        if progress:
            progress("commit", 1, 1)

    def _cleanup(self) -> None:
        """Remove what an interrupted operation left (unreferenced state folders, temp files)."""
        for f in self._leftovers():
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)

    def _leftovers(self) -> list[Path]:
        keep = (self.manifest.get("state") or {}).get("dir")
        out = []
        for f in sorted(self.path.iterdir()):
            if f.name in (MANIFEST, LOCK) or f.name == keep:
                continue
            if f.name.startswith(("state-", f"{MANIFEST}.partial-", f"{MANIFEST}.tmp-")):  # .tmp-: older releases
                out.append(f)
        return out

    # -- reading ---------------------------------------------------------------------------------
    def show(self, *, verify: bool = False) -> dict[str, Any]:
        """The manifest in brief; with ``verify``, every member file is hashed and checked."""
        with self._locked(exclusive=False):
            members = self.members
            rows = []
            for m in members:
                row = {"id": m.id, "weight": m.weight, "path": m.path, "hash": m.hash, "added": m.added}
                if verify:
                    try:
                        v = Verifier()
                        layout = v.layout(m)
                        v.check(m, layout, sorted(m.files))
                        row["status"] = "ok"
                    except (ModelNotFoundError, IntegrityError) as e:
                        row["status"] = f"error: {e}"
                rows.append(row)
            state = self.manifest.get("state")
            base = self.manifest.get("base")
            if verify and base:
                bm = _base_member(base)
                try:
                    v = Verifier()
                    v.check(bm, v.layout(bm), sorted(bm.files))
                    base = {**base, "status": "ok"}
                except (ModelNotFoundError, IntegrityError) as e:
                    base = {**base, "status": f"error: {e}"}
            return {
                "path": str(self.path),
                "name": self.manifest.get("name"),
                "kind": self.manifest.get("kind"),
                "method": self.method,
                "opcm": self.manifest.get("opcm"),
                "dtype": self.manifest.get("dtype"),
                "soup_id": _soup_id(members, self.alpha),
                "members": rows,
                "total_weight": _total_weight(members),
                "summed": state["summed"] if state else [],
                "copied": [] if self.method == "opcm" else _copied(members),
                "base": base,
                "history": self.manifest["history"],
                "leftovers": [f.name for f in self._leftovers()],
            }

    def build(
        self,
        out: str | Path,
        *,
        overwrite: bool = False,
        shard_size: int = 5 * 10**9,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Write the soup Σ w_i θ_i / Σ w_i (an OPCM soup: θ_0 + S/λ) as a checkpoint (or diffusers)
        folder at ``out``, atomically."""
        with self._locked(exclusive=False):
            members = self.members
            if not members:
                raise SoupError(f"{self.path}: the soup has no members; nothing to build")
            if self.method == "opcm":
                return self._build_opcm(out, overwrite, shard_size, progress)
            out = check_output(out, overwrite=overwrite, inputs=[self.path, *(m.path for m in members)])
            state = self.manifest.get("state")
            ver = Verifier()
            ref = members[0]
            rlayout = ver.layout(ref)
            summed = state["summed"] if state else []
            # Every member's souped files are still the ones in the running sums (a changed member is
            # named); a file whose stamp is unchanged since it was hashed is not read again.
            for m in members:
                for comp in summed:
                    ver.weights(m, comp, stamped=True)
            sums = _open_state(self.path, state) if state else None
            dtype = OUT_DTYPES.get(self.manifest.get("dtype") or "")
            total = _total_weight(members)
            try:
                with atomic_output(out, overwrite=overwrite, what="soup build") as tree:
                    skip: set[str] = set()
                    for comp in summed:
                        c = rlayout.components[comp]
                        skip |= weight_files_of(rlayout, c)
                        ck = rlayout.open(comp)
                        try:
                            _build_component(tree, c, ck, _mean_of(sums, comp, total), dtype, shard_size, progress)
                        finally:
                            ck.close()
                    copied = [rel for rel in rlayout.files() if rel not in skip and rel != BUILD_INFO]
                    for i, rel in enumerate(copied):
                        dst = tree / (rlayout.components[""].weights_name if rlayout.root.is_file() else rel)
                        copy_verified(ref, rlayout, rel, dst)
                        if progress:
                            progress("write", i + 1, len(copied))
                    info = {
                        "soup": str(self.path.resolve()),
                        "soup_id": _soup_id(members),
                        "kind": self.manifest["kind"],
                        "total_weight": total,
                        "summed": summed,
                        "copied": _copied(members),
                        "members": [
                            {"id": m.id, "path": m.path, "weight": m.weight, "hash": m.hash} for m in members
                        ],
                        "paper": "Biggs, Seshadri et al., Diffusion Soup, arXiv:2406.08431",
                    }
                    (tree / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
            finally:
                if sums is not None:
                    sums.close()
        return {"out": str(out), **info}

    def _build_opcm(
        self, out: str | Path, overwrite: bool, shard_size: int, progress: Progress | None
    ) -> dict[str, Any]:
        """θ_0 + S/λ from the base and the state alone (the members are not read: OPCM's point is that
        merged models need not be kept); the base's other files (config...) are copied, verified."""
        members = self.members
        base = _base_member(self.manifest["base"])
        out = check_output(out, overwrite=overwrite, inputs=[self.path, base.path, *(m.path for m in members)])
        state = self.manifest["state"]
        opcm = self.manifest["opcm"]
        lam = float(opcm["lambda"])
        ver = Verifier()
        blayout = ver.layout(base)
        for comp in state["summed"]:
            ver.weights(base, comp, stamped=True)
        sums = _open_state(self.path, state)
        dtype = OUT_DTYPES.get(self.manifest.get("dtype") or "")
        try:
            with atomic_output(out, overwrite=overwrite, what="soup build") as tree:
                skip: set[str] = set()
                for comp in state["summed"]:
                    c = blayout.components[comp]
                    skip |= weight_files_of(blayout, c)
                    ck = blayout.open(comp)
                    try:
                        _build_component(tree, c, ck, _opcm_of(sums, ck, comp, lam), dtype, shard_size, progress)
                    finally:
                        ck.close()
                copied = [rel for rel in blayout.files() if rel not in skip and rel != BUILD_INFO]
                for i, rel in enumerate(copied):
                    copy_verified(base, blayout, rel, tree / rel)
                    if progress:
                        progress("write", i + 1, len(copied))
                info = {
                    "soup": str(self.path.resolve()),
                    "soup_id": _soup_id(members, self.alpha),
                    "kind": self.manifest["kind"],
                    "method": "opcm",
                    "alpha": opcm["alpha"],
                    "lambda": lam,
                    "task_norms": [s["task_norm"] for s in opcm["steps"]],
                    "summed": state["summed"],
                    "copied": [],
                    "base": {"path": base.path, "hash": base.hash},
                    "members": [{"id": m.id, "path": m.path, "hash": m.hash} for m in members],
                    "paper": _opcm.PAPER,
                }
                (tree / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        finally:
            sums.close()
        return {"out": str(out), **info}


# ---------------------------------------------------------------------------------------------
# Helpers: ids, events, state
# ---------------------------------------------------------------------------------------------


def _default_id(path: Path) -> str:
    return path.stem if path.suffix == ".safetensors" else path.resolve().name


def _check_id(mid: str, members: list[Member]) -> None:
    if not mid or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@+-]*", mid):
        raise SoupError(f"member id {mid!r}: use letters, digits and . _ @ + - (pass --id)")
    if mid in {m.id for m in members}:
        raise SoupError(f"member id '{mid}' is already in the soup (pass another --id)")


def _check_weight(w: float, mid: str) -> float:
    w = float(w)
    if not math.isfinite(w) or w <= 0:
        raise SoupError(f"member '{mid}': weight must be a positive number, got {w}")
    return w


def _check_opcm_weight(w: float, mid: str) -> None:
    if float(w) != 1.0:
        raise SoupError(
            f"member '{mid}': OPCM soups have no member weights (got {w}); OPCM scales the merged update "
            "by λ_t from the task-vector norms"
        )


def _base_member(base: dict[str, Any]) -> Member:
    """The soup's recorded base as a :class:`Member`, for the Verifier. Its id, ``(base)``, cannot be a
    member's (ids start with a letter or digit), so the Verifier's and the readers' caches keep them apart."""
    return Member("(base)", base["path"], 1.0, base["files"], base["components"], stamps=base.get("stamps", {}))


def _total_weight(members: list[Member]) -> float:
    total = 0.0
    for m in members:
        total += m.weight
    return total


def _soup_id(members: list[Member], opcm_alpha: float | None = None) -> str:
    """A digest of what the soup is made of (and, for OPCM, of alpha; the member order is in the list)."""
    rows: list[Any] = [[m.id, m.hash, m.weight] for m in members]
    if opcm_alpha is not None:
        rows = ["opcm", opcm_alpha, *rows]
    h = hashlib.sha256(json.dumps(rows).encode())
    return h.hexdigest()[:16]


def _event(op: str, mid: str | None, members: list[Member], opcm_alpha: float | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"op": op, "time": now_utc()}
    if mid is not None:
        e["member"] = mid
    e["members"] = [m.id for m in members]
    e["soup_id"] = _soup_id(members, opcm_alpha)
    return e


def _copied(members: list[Member]) -> list[str]:
    if not members:
        return []
    d = set(_differing(members))
    return sorted(c for c in members[0].components if c not in d)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    replace_file(folder / MANIFEST, lambda tmp: tmp.write_text(text))


def _build_component(
    tree: Path,
    comp: Component,
    ref: Checkpoint,
    value: RowsFn,
    dtype: torch.dtype | None,
    shard_size: int,
    progress: Progress | None,
) -> None:
    """Write one component: floating tensors from ``value``, the others copied from ``ref`` (which also
    gives the names, shapes and default dtypes)."""
    names = list(ref.keys())
    outputs = [
        OutputTensor(
            t,
            ref.shape(t),
            dtype if dtype is not None and ref.dtype(t).is_floating_point else ref.dtype(t),
        )
        for t in names
    ]
    target = tree / comp.folder if comp.folder else tree
    target.parent.mkdir(parents=True, exist_ok=True)
    with CheckpointWriter(
        target,
        outputs,
        shard_size=shard_size,
        metadata={"weightsmith": "soup"},
        weights_name=comp.weights_name,
        overwrite=True,  # the root component fills the build's own (empty) temporary folder
        what=None,
    ) as w:
        for i, o in enumerate(outputs):
            for r0, r1 in chunk_grid(o.shape, CHUNK_ELEMS):
                if ref.dtype(o.name).is_floating_point:
                    x = value(o.name, r0, r1, o.dtype)
                else:
                    x = ref.rows(o.name, r0, r1)
                w.write_rows(o.name, r0, r1, x)
            if progress:
                progress("write", i + 1, len(outputs))


def _fsync_tree(folder: Path) -> None:
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            with open(Path(dirpath) / f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))
