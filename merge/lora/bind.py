"""A LoRA adapter bound to a base checkpoint, and the base with adapters folded in, read lazily.

Folding (:class:`FoldedCheckpoint`) is a lazy view of ``base + Σ_k w_k s_k B_k A_k``: the engine reads
it row chunk by row chunk like any checkpoint (``weightsmith merge`` with ``model: base+adapter``
references, as mergekit writes them; ``base+adapter:0.5`` folds at weight 0.5), so a fold streams with
bounded memory and goes through every merge method. Each row chunk of ``ΔW`` is ``s B[r0:r1] A``,
computed in float32 (float64 for a float64 base) and added to the base rows before one rounding to the
output dtype.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge.checkpoint import Checkpoint, ResolvedModel, TensorInfo, open_checkpoint, shape_of
from merge.errors import (
    AdapterError,
    MissingTensorError,
    ShapeMismatchError,
)
from merge.lora.formats import _KOHYA_PREFIXES, LoraAdapter, read_adapter

# ---------------------------------------------------------------------------------------------
# Binding an adapter to a base checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass
class Binding:
    """Where an adapter's targets land in one base checkpoint."""

    adapter: LoraAdapter
    deltas: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter module
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor key


def _kohya_index(names: list[str]) -> dict[str, list[str]]:
    """Every dot-boundary suffix of each base module path, written with ``_``, -> module paths."""
    index: dict[str, list[str]] = {}
    for n in names:
        if not n.endswith(".weight"):
            continue
        parts = n[: -len(".weight")].split(".")
        for i in range(len(parts)):
            index.setdefault("_".join(parts[i:]), []).append(".".join(parts))
    return index


def _prefix_map(keys: list[str], base_names: set[str], where: str) -> Callable[[str], str]:
    """One rename rule for every tensor an adapter touches: drop ``k`` leading name components, or add a prefix.

    ``keys`` are full tensor names as the adapter writes them (``<module>.weight``); the rule is found on
    the first one (sorted) and must then hold for all of them (checked by the caller).
    """
    if all(k in base_names for k in keys):
        return lambda k: k
    probe = sorted(keys)[0]
    parts = probe.split(".")
    for n in range(1, len(parts) - 1):
        if ".".join(parts[n:]) in base_names:
            return lambda k, _n=n: ".".join(k.split(".")[_n:])
    hits = [b for b in base_names if b.endswith(f".{probe}")]
    if len(hits) == 1:
        prefix = hits[0][: -len(probe)]
        return lambda k, _p=prefix: _p + k
    raise MissingTensorError(
        f"{where}: targets '{probe.rsplit('.', 1)[0]}', but the base has no tensor '{probe}'"
        + (f" (several candidates: {', '.join(sorted(hits)[:3])})" if hits else "")
        + "; was the adapter trained on another model?"
    )


def bind(adapter: LoraAdapter, base: Checkpoint | Mapping[str, Any]) -> Binding:
    """Map the adapter's targets onto the base's tensor names and check every shape (no data read)."""
    names = list(base.keys())
    where = str(adapter.path)
    b = Binding(adapter)
    modules = list(adapter.targets)
    if adapter.format == "kohya":
        index = _kohya_index(names)
        for m in modules:
            key = next((m[len(p) :] for p in _KOHYA_PREFIXES if m.startswith(p)), m)
            hits = sorted(set(index.get(key, [])))
            if len(hits) != 1:
                raise MissingTensorError(
                    f"{where}: kohya module '{m}' "
                    + (
                        f"matches {len(hits)} base modules ({', '.join(hits[:3])})"
                        if hits
                        else "matches no weight of the base (names compared with '.' written as '_')"
                    )
                )
            b.deltas[f"{hits[0]}.weight"] = m
    else:
        keys = [f"{m}.weight" for m in modules] + list(adapter.modules_to_save)
        rename = _prefix_map(keys, set(names), where) if keys else (lambda k: k)
        for m in modules:
            name = rename(f"{m}.weight")
            if name not in base:
                raise MissingTensorError(
                    f"{where}: targets module '{m}', but the base has no tensor '{name}'"
                )
            b.deltas[name] = m
        for rel, key in adapter.modules_to_save.items():
            name = rename(rel)
            if name not in base:
                raise MissingTensorError(
                    f"{where}: modules_to_save tensor '{key}' has no counterpart '{name}' in the base"
                )
            b.replaced[name] = key
    for name, m in b.deltas.items():
        t = adapter.targets[m]
        shape = shape_of(base, name)
        want = t.delta_shape
        if shape != want:
            if t.layout == "linear" and len(shape) == 4 and shape[2:] == (1, 1) and shape[:2] == want:
                continue  # a linear LoRA on a 1x1 conv (kohya does this)
            raise ShapeMismatchError(
                f"{where}: module '{m}' (A {list(t.a_shape)}, B {list(t.b_shape)}) makes a ΔW of shape {list(want)}, "
                f"but the base tensor '{name}' has shape {list(shape)}"
            )
    for name, key in b.replaced.items():
        shape = shape_of(base, name)
        have = tuple(adapter._ckpt.shape(key))
        if have != shape:
            raise ShapeMismatchError(
                f"{where}: modules_to_save tensor '{key}' has shape {list(have)}, the base "
                f"tensor '{name}' {list(shape)}"
            )
    return b


# ---------------------------------------------------------------------------------------------
# A base with adapters folded in, read lazily
# ---------------------------------------------------------------------------------------------


class FoldedCheckpoint(Mapping[str, torch.Tensor]):
    """``base + Σ_k w_k ΔW_k`` as a lazy checkpoint (the ``Checkpoint`` interface the engine reads).

    Tensors no adapter touches are the base's, bit for bit. An adapted tensor's rows are computed as
    ``base[r0:r1] + Σ_k w_k s_k B_k[r0:r1] A_k`` in float32 (float64 for a float64 base) and returned in
    that dtype; ``dtype(name)`` still reports the base's, which the engine writes unless told otherwise.
    ``modules_to_save`` tensors replace the base's (two adapters replacing one tensor is an error).
    """

    def __init__(
        self,
        base: Checkpoint,
        adapters: list[LoraAdapter],
        weights: list[float] | None = None,
        ref: str | None = None,
    ) -> None:
        self.base = base
        self.path = base.path
        self.root = base.root
        self.ref = ref
        self.adapters = adapters
        self.weights = [float(w) for w in (weights if weights is not None else [1.0] * len(adapters))]
        if len(self.weights) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters but {len(self.weights)} weights")
        self._deltas: dict[str, list[tuple[LoraAdapter, str, float]]] = {}
        self._replaced: dict[str, tuple[LoraAdapter, str]] = {}
        for ad, w in zip(adapters, self.weights, strict=True):
            b = bind(ad, base)
            for name, m in b.deltas.items():
                self._deltas.setdefault(name, []).append((ad, m, w))
            for name, key in b.replaced.items():
                if name in self._replaced:
                    raise AdapterError(
                        f"tensor '{name}' is replaced (modules_to_save) by two adapters: "
                        f"{self._replaced[name][0].path} and {ad.path}"
                    )
                self._replaced[name] = (ad, key)
        for name in self._replaced:
            if name in self._deltas:
                raise AdapterError(f"tensor '{name}' is both replaced (modules_to_save) and LoRA-adapted")

    @property
    def adapted(self) -> list[str]:
        """Base tensor names that adapters change (LoRA targets and modules_to_save)."""
        return sorted({*self._deltas, *self._replaced})

    # Mapping ----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.rows(name, 0, info.shape[0] if info.shape else 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    # Checkpoint interface ---------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    @property
    def files(self) -> list[Path]:
        return self.base.files + [a.file for a in self.adapters]

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    def aux_files(self) -> list[Path]:
        return self.base.aux_files()

    def close(self) -> None:
        self.base.close()
        for a in self.adapters:
            a.close()

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        if name in self._replaced:
            ad, key = self._replaced[name]
            return ad._ckpt.rows(key, r0, r1)
        x = self.base.rows(name, r0, r1)
        parts = self._deltas.get(name)
        if not parts:
            return x
        r1 = min(r1, self.base.shape(name)[0])
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.to(dtype, copy=True)
        for ad, m, w in parts:
            d = ad.delta_rows(m, r0, r1, dtype)
            y.add_(d.reshape(y.shape), alpha=w)
        return y


_WEIGHT_RE = re.compile(r"^(?P<ref>.+):(?P<w>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


def split_reference(ref: str) -> tuple[str, list[tuple[str, float]]] | None:
    """``base+adapter[:w]+...`` -> ``(base, [(adapter, w), ...])``; None for a plain reference.

    A reference that exists as a local path is plain whatever it contains; ``hf://`` parts and Hub ids
    are allowed on either side of ``+``.
    """
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    base, *rest = ref.split("+")
    if not base.strip() or not rest or any(not r.strip() for r in rest):
        raise AdapterError(f"model reference {ref!r}: expected 'base+adapter' (each side non-empty)")
    out = []
    for r in rest:
        m = _WEIGHT_RE.match(r)
        if m and not Path(r).expanduser().exists():
            out.append((m.group("ref"), float(m.group("w"))))
        else:
            out.append((r, 1.0))
    return base, out


def resolve_reference(ref: str, resolver: Callable[[str], ResolvedModel]) -> ResolvedModel:
    """Resolve a model reference; ``base+adapter`` references resolve both parts (adapters recorded)."""
    split = split_reference(ref)
    if split is None:
        return resolver(ref)
    base_ref, parts = split
    base = resolver(base_ref)
    adapters = tuple(resolver(a) for a, _ in parts)
    return ResolvedModel(
        ref=ref,
        path=base.path,
        repo_id=base.repo_id,
        revision=base.revision,
        commit=base.commit,
        adapters=adapters,
        adapter_weights=tuple(w for _, w in parts),
    )


def open_model(resolved: ResolvedModel, *, allow_pickle: bool = False) -> Checkpoint | FoldedCheckpoint:
    """The checkpoint a resolved reference names: the base itself, or the base with its adapters folded in."""
    base = open_checkpoint(resolved.path, allow_pickle=allow_pickle)
    if not resolved.adapters:
        return base
    adapters = [read_adapter(a.path, allow_pickle=allow_pickle) for a in resolved.adapters]
    return FoldedCheckpoint(base, adapters, list(resolved.adapter_weights) or None, ref=resolved.ref)
