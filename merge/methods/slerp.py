"""Spherical linear interpolation (SLERP) between the base model and one other model.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (the slerp formula); used
for model merging as in mergekit 0.1.5's ``slerp`` method, whose semantics are kept: each tensor
is flattened to one vector, the angle between the two (normalised) vectors gives

    slerp(θ_0, θ_1; t) = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1,   cos Ω = <θ_0, θ_1>/(‖θ_0‖‖θ_1‖),

applied to the *unnormalised* tensors; norms at or below ``eps`` = 1e-8 count as 1; when the
vectors are (anti)parallel, |cos Ω| > ``DOT_THRESHOLD`` = 0.9995, it falls back to linear
interpolation (1−t) θ_0 + t θ_1. ``t = 0`` gives the base, ``t = 1`` the other model.

The norms and the dot product are whole-tensor statistics: :func:`_slerp_stats` accumulates
them over row chunks (per-row float32 dot products, added in float64 in row order once, so the
result is the same however the tensor is chunked).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import numpy as np
import torch

from merge.errors import RecipeError
from merge.methods.registry import ChunkSource, merge_method, whole

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0) dot products of ``a`` and ``b`` (float32 within a row, as mergekit), as float64.

    A 0-d tensor is one row. Adding the concatenated per-row partials of all chunks once, in
    float64, gives a total that does not depend on where the chunk boundaries fall.
    """
    rows = a.shape[0] if a.dim() > 0 else 1
    if a.numel() == 0:
        return torch.zeros(rows, dtype=torch.float64, device=a.device)
    return torch.linalg.vecdot(a.reshape(rows, -1), b.reshape(rows, -1), dim=1).double()


class RowSums:
    """Per-row float64 partial sums of every chunk, in row order, kept in one growing buffer.

    ``total()`` is ``torch.cat(parts).sum()`` of the same values (the same bits), without keeping one
    small tensor per chunk: thousands of small long-lived allocations between the chunks' freed
    temporaries fragmented the heap (a Karcher merge of the 1.5 GB bench models peaked at 2.8 GB).
    ``add`` takes any tensor; ``columns(shape)`` sums chunk-wise vectors of that shape instead.
    """

    def __init__(self) -> None:
        self._a = array("d")

    def add(self, t: torch.Tensor) -> None:
        self._a.frombytes(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())

    def _tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self._a, dtype=np.float64))

    def total(self) -> float:
        return float(self._tensor().sum().item()) if self._a else 0.0

    def columns(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Σ over the added vectors (each of ``shape``), as ``torch.cat`` of them then ``sum(0)``."""
        return self._tensor().reshape(-1, *shape).sum(0)


@dataclass(frozen=True)
class SlerpStats:
    """Whole-tensor Σθ_0², Σθ_1², Σθ_0θ_1 and the element count."""

    sq0: float
    sq1: float
    dot: float
    numel: int


def _slerp_stats(chunks: ChunkSource) -> SlerpStats:
    p00, p11, p01 = RowSums(), RowSums(), RowSums()
    numel = 0
    for tensors, base in chunks():
        if base is None or len(tensors) != 1:
            raise RecipeError("method 'slerp' interpolates between the base_model and exactly one other model")
        a, b = base, tensors[0]
        numel += a.numel()
        p00.add(row_dots(a, a))
        p11.add(row_dots(b, b))
        p01.add(row_dots(a, b))
    return SlerpStats(p00.total(), p11.total(), p01.total(), numel)


def slerp_coefficients(t: float, stats: SlerpStats) -> tuple[float, float]:
    """The coefficients (c_0, c_1) of θ_0 and θ_1, following mergekit 0.1.5's ``slerp``."""
    if stats.numel == 0:
        return 1.0 - t, t
    n0 = math.sqrt(stats.sq0)
    n1 = math.sqrt(stats.sq1)
    n0 = n0 if n0 > EPS else 1.0
    n1 = n1 if n1 > EPS else 1.0
    dot = min(1.0, max(-1.0, stats.dot / n0 / n1))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


@merge_method(
    "slerp",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985 (slerp of weights)",
    url="https://en.wikipedia.org/wiki/Slerp",
    base="required",
    min_models=1,
    max_models=1,
    stats=_slerp_stats,
)
def slerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: float,
    stats: SlerpStats | None = None,
) -> torch.Tensor:
    """SLERP from the base (t = 0) to the other model (t = 1) over the flattened tensor.

    c_0 = sin((1−t)Ω)/sin Ω, c_1 = sin(tΩ)/sin Ω with cos Ω the cosine between the two tensors
    (linear interpolation when |cos Ω| > 0.9995); returns c_0 θ_0 + c_1 θ_1. ``t`` may vary by
    layer (the engine resolves gradients).
    """
    if base is None or len(tensors) != 1:
        raise RecipeError("method 'slerp' interpolates between the base_model and exactly one other model")
    if stats is None:
        stats = _slerp_stats(whole(tensors, base))
    c0, c1 = slerp_coefficients(float(t), stats)
    return base * c0 + tensors[0] * c1
