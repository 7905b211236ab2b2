"""Statistics of a whole pool of models in one streamed pass: what :mod:`metanets.lineage.graph` needs.

For every weight matrix (a float tensor of two or more dimensions; classifier heads and tensors
matching ``exclude`` left out), grouped by name and shape across the models that have it, one pass
reads each model's tensor once and keeps:

- the **Gram matrix** of the models' flattened tensors, accumulated in float64 after subtracting the
  first member's tensor (exact for near-identical models: a fine-tune's delta of 1e-3 of the
  weights is a 1e-6 part of the squared norm, far below float32 rounding). Every pairwise distance
  ``‖θ_a − θ_b‖²`` and every inner product of differences ``⟨θ_x − θ_r, θ_p − θ_r⟩`` (what the merge
  fit needs) is read off it, so the ``n²`` pairs cost no second read;
- per model, the squared norm and the **excess kurtosis** of the weights (Horwitz et al., "On the
  Origin of Llamas: Model Tree Heritage Recovery", 2024, orient fine-tuning edges by it).

Memory: one tensor of every model that has it at a time (``workers`` tensors at once), whatever the
model size; compute ``O(n² · numel)`` per tensor as one float64 matrix product per chunk.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from merge.symmetry import natural_key
from metanets.lineage.model import Model
from metanets.lineage.stats import head_tensors, read, single_torch_thread

CHUNK = 1 << 18  # elements per chunk and model (float64: 2 MiB)


@dataclass
class TensorGroup:
    """One weight matrix across the models that have it with this shape."""

    name: str
    shape: tuple[int, ...]
    members: list[int]  # model indices, in Gram order
    gram: np.ndarray  # float64 Gram of (θ_i − θ_members[0]) over members
    sq_norm: np.ndarray  # ‖θ_i‖² per member
    kurtosis: np.ndarray  # excess kurtosis of θ_i's entries per member
    equal: np.ndarray  # fraction of entries exactly equal between members (members × members)

    def sq_dist(self) -> np.ndarray:
        """``‖θ_i − θ_j‖²`` between members (members × members)."""
        d = np.diag(self.gram)
        return np.maximum(d[:, None] + d[None, :] - 2 * self.gram, 0.0)


@dataclass
class PoolStats:
    """:class:`TensorGroup` per weight matrix, for models ``0..n-1``; what each model left out and why."""

    names: list[str]
    groups: list[TensorGroup]
    excluded: dict[int, dict[str, str]]
    bytes_read: int


def _rows(t: torch.Tensor, sample: int | None) -> torch.Tensor:
    """The tensor, or evenly spaced rows of it holding about ``sample`` entries (the same rows for every model)."""
    if sample is None or t.numel() <= sample or t.dim() < 2:
        return t
    keep = max(1, sample * t.shape[0] // t.numel())
    idx = torch.linspace(0, t.shape[0] - 1, keep).round().long().unique()
    return t[idx]


def _moments(x: torch.Tensor) -> tuple[float, float]:
    """(sum of squares, excess kurtosis) of a tensor's entries, in float64 chunks."""
    flat = x.reshape(-1)
    n = flat.numel()
    s1 = sum(float(flat[i : i + CHUNK].double().sum()) for i in range(0, n, CHUNK))
    mean = s1 / n
    m2 = m4 = 0.0
    sq = 0.0
    for i in range(0, n, CHUNK):
        c = flat[i : i + CHUNK].double()
        sq += float((c * c).sum())
        d = c - mean
        d2 = d * d
        m2 += float(d2.sum())
        m4 += float((d2 * d2).sum())
    m2, m4 = m2 / n, m4 / n
    kurt = m4 / (m2 * m2) - 3.0 if m2 > 0 else 0.0
    return sq, kurt


def _gram(tensors: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Float64 Gram of ``[t_i − t_0]`` over the flattened tensors, and the fraction of exactly equal
    entries per pair (a sparsified merge leaves its base's entries untouched), chunk by chunk."""
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    k = len(flats)
    g = torch.zeros(k, k, dtype=torch.float64)
    eq = torch.zeros(k, k, dtype=torch.float64)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        base = flats[0][s:e].double()
        x = torch.stack([f[s:e].double() - base for f in flats])
        g += x @ x.T
        for i in range(k):
            eq[i] += (x == x[i]).sum(1).double()
    return g.numpy(), (eq / n).numpy()


def pool_stats(
    models: Sequence[Model],
    *,
    heads: str | Sequence[str] | None = "auto",
    exclude: Sequence[str] = (),
    workers: int = 2,
    sample: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PoolStats:
    """One streamed pass over every model's weight matrices (module docstring).

    ``sample``: matrices with more entries are compared on the same evenly spaced rows in every model
    (about ``sample`` entries): distances, inner products, kurtosis and equal fractions are then
    estimates from those rows, at a fraction of the compute (``None``: every entry).
    ``heads``: ``"auto"`` leaves out classifier heads (by name, or the last layer of a plain chain),
    a list of regexes names them, ``None`` keeps them; ``exclude`` adds regexes of tensors to leave
    out. ``progress(done_bytes, total_bytes)`` is called after each tensor group.
    """
    rx = [re.compile(p) for p in exclude]
    by_key: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    excluded: dict[int, dict[str, str]] = {}
    for i, m in enumerate(models):
        src = m.source
        names = list(src.keys())
        shapes = {n: tuple(src.shape(n)) for n in names}
        if heads == "auto":
            hs = head_tensors(names, shapes)
        elif heads is None:
            hs = set()
        else:
            hs = head_tensors(names, shapes, [heads] if isinstance(heads, str) else list(heads))
        ex: dict[str, str] = {}
        for n in names:
            if not src.dtype(n).is_floating_point:
                ex[n] = "not floating point"
            elif len(shapes[n]) < 2:
                continue  # vectors (biases, norms) carry little lineage and are not compared
            elif n in hs:
                ex[n] = "classifier head"
            elif any(r.search(n) for r in rx):
                ex[n] = "excluded by pattern"
            elif math.prod(shapes[n]) == 0:
                ex[n] = "empty"
            else:
                by_key.setdefault((n, shapes[n]), []).append(i)
        excluded[i] = ex
    keys = sorted(by_key, key=lambda k: (natural_key(k[0]), k[1]))
    sizes = {k: math.prod(k[1]) * len(by_key[k]) for k in keys}
    total = sum(sizes.values())
    done = 0
    lock = threading.Lock()
    out: dict[tuple[str, tuple[int, ...]], TensorGroup] = {}
    nbytes = 0

    def one(key: tuple[str, tuple[int, ...]]) -> None:
        nonlocal done, nbytes
        name, shape = key
        members = by_key[key]
        ts = [_rows(read(models[i].source, name), sample) for i in members]
        mom = [_moments(t) for t in ts]
        g, eq = _gram(ts) if len(ts) > 1 else (np.zeros((1, 1)), np.ones((1, 1)))
        b = sum(t.numel() * t.element_size() for t in ts)
        grp = TensorGroup(
            name,
            shape,
            list(members),
            g,
            np.array([m[0] for m in mom]),
            np.array([m[1] for m in mom]),
            eq,
        )
        with lock:
            out[key] = grp
            done += sizes[key]
            nbytes += b
            if progress is not None:
                progress(done, total)

    with single_torch_thread():
        if workers <= 1 or len(keys) < 2:
            for k in keys:
                one(k)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lineage-pool") as pool:
                list(pool.map(one, keys))
    return PoolStats([m.name for m in models], [out[k] for k in keys], excluded, nbytes)
