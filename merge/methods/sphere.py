"""Means on the hypersphere of more than two models: Karcher mean, Multi-SLERP, NuSLERP.

All three follow mergekit 0.1.5 (``karcher``, ``multislerp``, ``nuslerp``), whose parameter names and
edge cases they keep. Each output is a linear combination of the input tensors whose coefficients
depend only on their Gram matrix G_ij = <x_i, x_j> (over the flattened tensor): the unit vectors are
x_i / ‖x_i‖, every spherical mean, tangent vector and exponential-map step of these methods is a
linear combination of them, and every inner product of such combinations is a quadratic form in G.
So one streaming pass accumulates G (per-row float32 dot products added in float64 in row order, as
for SLERP and Model Stock; independent of the chunking), the iteration runs on N-vectors of
coefficients in float64, and the merge pass is a weighted sum chunk by chunk. mergekit runs the same
algebra on whole float32 tensors; the results agree to float32 rounding.

- ``karcher``: Karcher (Fréchet) mean on the unit sphere, Karcher, "Riemannian center of mass and
  mollifier smoothing", Comm. Pure Appl. Math. 1977; Buss & Fillmore, "Spherical averages and
  applications to spherical splines and interpolation", ACM TOG 2001 (the fixed-point iteration).
- ``multislerp``: barycentric interpolation on the sphere (weighted mean of unit vectors mapped
  through the tangent space at their normalised mean), Goddard 2025.
- ``nuslerp``: SLERP between two models with weights in place of ``t``, optionally per row/column,
  optionally of task vectors (with a base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from merge.errors import RecipeError
from merge.methods.registry import ChunkSource, PerModel, broadcast_per_model, merge_method, whole
from merge.methods.slerp import RowSums, row_dots


def gram(chunks: ChunkSource, vectors) -> torch.Tensor:  # noqa: ANN001 - a small adapter
    """Whole-tensor Gram matrix (float64) of ``vectors(tensors, base) -> list[Tensor]`` over chunks."""
    parts: dict[tuple[int, int], RowSums] = {}
    n = 0
    for tensors, base in chunks():
        xs = vectors(tensors, base)
        n = len(xs)
        for i in range(n):
            for j in range(i, n):
                parts.setdefault((i, j), RowSums()).add(row_dots(xs[i], xs[j]))
    g = torch.zeros((n, n), dtype=torch.float64)
    for (i, j), p in parts.items():
        g[i, j] = g[j, i] = p.total()
    return g


def _quad(g: torch.Tensor, c: torch.Tensor) -> float:
    """‖Σ_i c_i x_i‖ from the Gram matrix (0 where rounding makes the square negative)."""
    return math.sqrt(max(float(c @ g @ c), 0.0))


def _combine(xs: list[torch.Tensor], coef: list[float]) -> torch.Tensor:
    out = xs[0] * coef[0]
    for x, c in zip(xs[1:], coef[1:], strict=True):
        out.add_(x, alpha=c)
    return out


# --------------------------------------------------------------------------------------------------
# Karcher mean
# --------------------------------------------------------------------------------------------------
def karcher_coefficients(g: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """Coefficients c_i of the inputs x_i in mergekit's weighted Karcher mean (uniform weights).

    Unit vectors u_i = x_i/‖x_i‖ with ‖x_i‖ > tol enter; the mean starts at the normalised average
    of the units (the first unit when that average is below tol) and iterates
    m ← cos‖v‖ m + sin‖v‖ v/‖v‖, v = Σ_i α_i θ_i/sin θ_i (u_i − cos θ_i m), cos θ_i = <m, u_i>, skipping
    θ_i < tol, until ‖v‖ < tol or ``max_iter``; the result is (Σ_i ‖x_i‖/N) m.
    """
    g = g.double()
    n = g.shape[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * n
    idx = torch.tensor(valid)
    u = g[idx][:, idx] / (norms[idx].unsqueeze(1) * norms[idx].unsqueeze(0))  # Gram of the unit vectors
    k = len(valid)
    alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
    mean = alpha.clone()
    mean_norm = _quad(u, mean)
    if mean_norm < tol:
        mean = torch.zeros(k, dtype=torch.float64)
        mean[0] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(k, dtype=torch.float64)
        dots = (u @ mean).clamp(-1.0, 1.0)
        for i in range(k):
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            c = float(alpha[i]) * theta / math.sin(theta)
            tangent[i] += c
            tangent -= c * float(dots[i]) * mean
        t_norm = _quad(u, tangent)
        if t_norm < tol:
            break
        mean = math.cos(t_norm) * mean + math.sin(t_norm) * (tangent / t_norm)
        m_norm = _quad(u, mean)
        if m_norm > tol:
            mean = mean / m_norm
    scale = float(norms.sum()) / n
    coef = [0.0] * n
    for j, i in enumerate(valid):
        coef[i] = scale * float(mean[j]) / float(norms[i])
    return coef


@dataclass(frozen=True)
class Coefficients:
    """A linear combination of the method's vectors (plus the base, where it adds one back)."""

    coef: tuple[float, ...]


def _karcher_stats(chunks: ChunkSource, *, max_iter: int = 10, tol: float = 1e-5) -> Coefficients:
    return Coefficients(tuple(karcher_coefficients(gram(chunks, lambda ts, _b: ts), max_iter, tol)))


@merge_method(
    "karcher",
    paper="Karcher, Riemannian center of mass and mollifier smoothing, CPAM 1977 (Karcher mean of weights)",
    url="https://doi.org/10.1002/cpa.3160300502",
    base="ignored",
    min_models=1,
    stats=_karcher_stats,
)
def karcher(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    stats: Coefficients | None = None,
) -> torch.Tensor:
    """Karcher mean of the inputs on the unit sphere, rescaled by their mean norm (uniform weights).

    The Riemannian centre of mass of u_i = θ_i/‖θ_i‖ (fixed-point iteration of Buss & Fillmore, at most
    ``max_iter`` steps, tolerance ``tol``), times (1/N) Σ_i ‖θ_i‖. One input is returned unchanged; inputs
    with norm <= ``tol`` only enter the scale; all of them that small gives zeros.
    """
    if len(tensors) == 1:
        return tensors[0]
    if stats is None:
        stats = _karcher_stats(whole(tensors, base), max_iter=max_iter, tol=tol)
    return _combine(tensors, list(stats.coef))


# --------------------------------------------------------------------------------------------------
# Multi-SLERP
# --------------------------------------------------------------------------------------------------
def _weights(weight: object, n: int, method: str) -> list[float]:
    try:
        return [float(w) for w in broadcast_per_model(weight, n)]
    except RecipeError as e:
        raise RecipeError(f"method '{method}': parameter 'weight': {e}") from None


def _offsets(tensors: list[torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    return list(tensors) if base is None else [t - base for t in tensors]


@dataclass(frozen=True)
class MultiSlerpStats:
    coef: tuple[float, ...]
    linear: bool  # the weighted mean of the unit vectors vanished: plain weighted sum of two


def _multislerp_stats(
    chunks: ChunkSource,
    *,
    weight: object = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    name: str = "",
) -> MultiSlerpStats:
    g = gram(chunks, _offsets)
    n = g.shape[0]
    w32 = torch.tensor(_weights(weight, n, "multislerp"), dtype=torch.float32)
    if normalize_weights:
        w32 = w32 / w32.sum()
    w = w32.double()
    norms = g.diagonal().clamp(min=0).sqrt()
    k = 1.0 / (norms + eps)  # unit vectors u_i = k_i x_i
    mean = w * k  # Σ_i w_i u_i as coefficients of the x_i
    mean_norm = _quad(g, mean)
    if mean_norm < eps:
        if n == 2:
            return MultiSlerpStats(tuple(float(x) for x in w), True)
        raise RecipeError(
            f"method 'multislerp': tensor '{name}': the weighted sum of the unit task vectors is zero "
            "(antipodal inputs with balancing weights); use different weights"
        )
    mean = mean / mean_norm
    dots = k * (g @ mean)  # <u_i, m>
    tangent = w * k - float((w * dots).sum()) * mean  # Σ_i w_i (u_i − <u_i, m> m)
    t_norm = _quad(g, tangent) + eps
    result = mean * math.cos(t_norm) + tangent * (math.sin(t_norm) / t_norm)
    avg_norm = float((norms * w).sum())
    return MultiSlerpStats(tuple(float(c) * avg_norm for c in result), False)


@merge_method(
    "multislerp",
    paper="Goddard, Multi-SLERP: barycentric interpolation on the hypersphere, 2025",
    url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    base="optional",
    min_models=1,
    stats=_multislerp_stats,
)
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
    stats: MultiSlerpStats | None = None,
    name: str = "",
) -> torch.Tensor:
    """Multi-SLERP: the weighted mean of unit vectors, through the tangent space at its normalised mean.

    x_i = θ_i (− θ_0 with a base), u_i = x_i/(‖x_i‖ + eps), m = Σ w_i u_i / ‖Σ w_i u_i‖, tangent
    v = Σ w_i (u_i − <u_i, m> m), result (Σ w_i ‖x_i‖)(cos‖v‖ m + sin‖v‖ v/‖v‖) (+ θ_0). Weights are
    normalised to sum 1 (``normalize_weights``). One model is returned unchanged; two antipodal
    models fall back to the weighted sum, more raise an error.
    """
    if len(tensors) == 1:
        return tensors[0]
    if stats is None:
        stats = _multislerp_stats(
            whole(tensors, base), weight=weight, normalize_weights=normalize_weights, eps=eps, name=name
        )
    out = _combine(_offsets(tensors, base), list(stats.coef))
    return out if base is None else out.add_(base)


# --------------------------------------------------------------------------------------------------
# NuSLERP
# --------------------------------------------------------------------------------------------------
_NORM_EPS = 1e-7  # mergekit's clamp of vector norms
_COLINEAR_EPS = 1e-8


def _slerp_coef(
    t: float, s00: torch.Tensor, s11: torch.Tensor, s01: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) per vector from its squared norms and dot product (float64), as mergekit's ``nuslerp``."""
    n0 = s00.clamp(min=0).sqrt().clamp(min=_NORM_EPS)
    n1 = s11.clamp(min=0).sqrt().clamp(min=_NORM_EPS)
    cos = (s01 / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / safe)
    return c0, c1


def _nuslerp_t(weight: object) -> float:
    w = _weights(weight, 2, "nuslerp")
    total = w[0] + w[1]
    return 0.5 if abs(total) < 1e-6 else w[1] / total


def _local(flatten: bool, row_wise: bool, ndim: int) -> bool:
    """Vectors along the last axis of a tensor of 2+ dims lie inside one row chunk."""
    return not flatten and not row_wise and ndim >= 2


@dataclass(frozen=True)
class NuSlerpStats:
    """Per-vector squared norms and dot products (whole tensor, or per column for row-wise)."""

    s00: torch.Tensor | None
    s11: torch.Tensor | None
    s01: torch.Tensor | None


def _pair(tensors: list[torch.Tensor], base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if len(tensors) != 2:
        raise RecipeError(f"method 'nuslerp' takes exactly 2 models besides the base, got {len(tensors)}")
    v0, v1 = _offsets(tensors, base)
    return v0, v1


def _nuslerp_stats(
    chunks: ChunkSource, *, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True
) -> NuSlerpStats:
    acc = [RowSums(), RowSums(), RowSums()]
    cols: tuple[int, ...] | None = None
    for tensors, base in chunks():
        v0, v1 = _pair(tensors, base)
        if _local(nuslerp_flatten, nuslerp_row_wise, v0.dim()):
            return NuSlerpStats(None, None, None)
        if nuslerp_flatten or v0.dim() <= 1:
            acc[0].add(row_dots(v0, v0))
            acc[1].add(row_dots(v1, v1))
            acc[2].add(row_dots(v0, v1))
        else:  # row-wise: one vector per column (dim 0 runs across chunks); per-chunk float64 column sums
            cols = tuple(v0.shape[1:])
            acc[0].add((v0 * v0).sum(0, dtype=torch.float64))
            acc[1].add((v1 * v1).sum(0, dtype=torch.float64))
            acc[2].add((v0 * v1).sum(0, dtype=torch.float64))
    if cols is not None:
        s = [a.columns(cols) for a in acc]
    else:
        s = [torch.tensor(a.total(), dtype=torch.float64) for a in acc]
    return NuSlerpStats(s[0], s[1], s[2])


@merge_method(
    "nuslerp",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985 (mergekit's NuSLERP variant)",
    url="https://en.wikipedia.org/wiki/Slerp",
    base="optional",
    min_models=2,
    max_models=2,
    stats=_nuslerp_stats,
)
def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    stats: NuSlerpStats | None = None,
) -> torch.Tensor:
    """SLERP between two models (or their task vectors, with a base) at t = w_1/(w_0 + w_1).

    c_0 = sin((1−t)Ω)/sin Ω, c_1 = sin(tΩ)/sin Ω, cos Ω = <v_0, v_1>/(‖v_0‖‖v_1‖) (norms clamped at
    1e-7; linear interpolation where 1 − cos²Ω <= 1e-16), applied to the unnormalised v_i. Over the
    flattened tensor (``nuslerp_flatten``, default), else per vector along the last axis, or along
    dim 0 (per column) with ``nuslerp_row_wise``. t = 0.5 when |w_0 + w_1| < 1e-6.
    """
    v0, v1 = _pair(tensors, base)
    t = _nuslerp_t(weight)
    if _local(nuslerp_flatten, nuslerp_row_wise, v0.dim()):
        # mergekit's float32 formula per last-axis vector, row chunk by row chunk
        n0 = torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_EPS)
        n1 = torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_EPS)
        cos = torch.sum((v0 / n0) * (v1 / n1), dim=-1, keepdim=True).clamp(-1, 1)
        colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
        out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    else:
        if stats is None or stats.s00 is None:
            stats = _nuslerp_stats(
                whole(tensors, base), nuslerp_row_wise=nuslerp_row_wise, nuslerp_flatten=nuslerp_flatten
            )
        assert stats.s00 is not None and stats.s11 is not None and stats.s01 is not None
        c0, c1 = _slerp_coef(t, stats.s00, stats.s11, stats.s01)
        out = v0 * c0.to(v0.dtype) + v1 * c1.to(v1.dtype)
    return out if base is None else out.add_(base)
