"""LoRA factor algebra: residuals, combining adapters, re-factorising, extracting (pure tensor functions).

A LoRA target adapts one weight ``W`` (``out × in``, conv kernels flattened to ``out × in·k·k``) by
``ΔW = s · B A`` with ``A`` (``r × in``), ``B`` (``out × r``) and the scale ``s`` (``α / r``, or
``α / √r`` for rsLoRA; Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, Eq. 3;
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023). Everything
here works on those matrices; ``merge.lora.formats`` owns the files and the layouts (embeddings, conv,
``fan_in_fan_out``).

Combining several adapters ``(A_i, B_i, s_i)`` with weights ``w_i`` into one (peft's
``add_weighted_adapter`` names, same semantics):

* ``cat``: ``A = [w_1 s_1 A_1; …; w_n s_n A_n]``, ``B = [B_1 … B_n]``, scale 1. Exact:
  ``B A = Σ_i w_i s_i B_i A_i``, at rank ``Σ_i r_i``.
* ``linear``: ``A = Σ_i σ_i √|w_i s_i| A_i``, ``B = Σ_i √|w_i s_i| B_i`` (σ_i the sign of ``w_i s_i``),
  scale 1, equal ranks only. *Not* the sum of the residuals: ``B A`` has cross terms ``B_i A_j``; peft
  calls it "a very rough approximation". Kept because users have it.
* ``svd``: the rank-``k`` truncated SVD of ``ΔW = Σ_i w_i ΔW_i`` (Eckart–Young: the best rank-k
  approximation in Frobenius norm), ``B = U_k Σ_k``, ``A = V_kᵀ``, scale 1; optionally the summed
  residual is first combined with TIES or DARE (``merge.methods.task_arithmetic``) instead of summed.

Extraction (mergekit's LoRA extract) is the same truncated SVD applied to ``θ_ft − θ_base``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from merge.errors import ShapeMismatchError


@dataclass(frozen=True)
class Factors:
    """One LoRA target as matrices: ``ΔW = scale · B @ A`` (2-D, conv kernels flattened)."""

    A: torch.Tensor  # r × in
    B: torch.Tensor  # out × r
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale · B A`` as an ``out × in`` matrix in ``dtype``."""
        return (self.B.to(dtype) @ self.A.to(dtype)).mul_(self.scale)


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """``α / r`` (Hu et al., Eq. 3), or ``α / √r`` with rank-stabilised scaling (rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _check_same_shape(parts: list[Factors], what: str) -> None:
    out, inn = parts[0].B.shape[0], parts[0].A.shape[1]
    for i, p in enumerate(parts[1:], 1):
        if p.B.shape[0] != out or p.A.shape[1] != inn:
            raise ShapeMismatchError(
                f"{what}: adapter {i} adapts a {p.B.shape[0]} × {p.A.shape[1]} weight, adapter 0 a {out} × {inn} one"
            )


def cat_factors(
    parts: list[Factors], weights: list[float], dtype: torch.dtype = torch.float32, what: str = "target"
) -> Factors:
    """Concatenate ranks: ``B A = Σ_i w_i s_i B_i A_i`` exactly (peft ``combination_type="cat"``)."""
    _check_same_shape(parts, what)
    A = torch.cat([p.A.to(dtype) * (w * p.scale) for p, w in zip(parts, weights, strict=True)], dim=0)
    B = torch.cat([p.B.to(dtype) for p in parts], dim=1)
    return Factors(A, B, 1.0)


def linear_factors(
    parts: list[Factors], weights: list[float], dtype: torch.dtype = torch.float32, what: str = "target"
) -> Factors:
    """peft's ``combination_type="linear"``: factor-wise weighted sums (equal ranks; cross terms remain).

    With ``c_i = w_i s_i``: ``A = Σ_i sgn(c_i) √|c_i| A_i`` and ``B = Σ_i √|c_i| B_i``, scale 1, so that a
    single adapter is reproduced exactly and negative weights negate it.
    """
    _check_same_shape(parts, what)
    ranks = {p.rank for p in parts}
    if len(ranks) != 1:
        raise ShapeMismatchError(
            f"{what}: 'linear' sums the factors and needs equal ranks, got {sorted(ranks)} (use 'cat' or 'svd')"
        )
    A = torch.zeros_like(parts[0].A, dtype=dtype)
    B = torch.zeros_like(parts[0].B, dtype=dtype)
    for p, w in zip(parts, weights, strict=True):
        c = w * p.scale
        root = math.sqrt(abs(c))
        A.add_(p.A.to(dtype), alpha=root if c >= 0 else -root)
        B.add_(p.B.to(dtype), alpha=root)
    return Factors(A, B, 1.0)


@dataclass(frozen=True)
class Truncation:
    """A truncated SVD ``ΔW ≈ B A`` and how much of ``ΔW`` it keeps."""

    factors: Factors
    energy: float  # Σ_{j<k} σ_j² / Σ_j σ_j² (1.0 for ΔW = 0)
    rel_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F (0.0 for ΔW = 0)
    sigma: torch.Tensor  # the singular values computed, descending (all of them for a full SVD)


#: rank / min(out, in) at or below which truncated_svd uses the randomized SVD (and the matrix is large)
RANDOMIZED_MAX_FRACTION = 0.125
RANDOMIZED_MIN_ELEMENTS = 1 << 18


def randomized_svd(m: torch.Tensor, q: int, *, power_iters: int = 6, seed: int = 0) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``q`` singular triplets of ``m`` by the randomized range finder with power iterations
    (Halko, Martinsson & Tropp, SIAM Review 2011, Algorithms 4.4 and 5.1): ``Y = (M Mᵀ)^p M Ω`` with a
    Gaussian ``Ω`` from a fixed seed (so the result is the same run to run), re-orthonormalised by QR at
    each step, then the exact SVD of the small ``Qᵀ M``. Returns ``U (m×q), S (q), Vh (q×n)``."""
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(m.shape[1], q, generator=g, dtype=m.dtype)
    y, _ = torch.linalg.qr(m @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(m.T @ y)
        y, _ = torch.linalg.qr(m @ z)
    u_small, s, vh = torch.linalg.svd(y.T @ m, full_matrices=False)
    return y @ u_small, s, vh


def truncated_svd(delta: torch.Tensor, rank: int, *, clamp: float | None = None,
                  exact: bool | None = None) -> Truncation:
    """The best rank-``rank`` approximation of a 2-D ``delta`` (Eckart–Young), ``B = U_k Σ_k``, ``A = V_kᵀ``.

    The exact SVD runs in float64 for matrices up to 2²² elements and in float32 above (the result is
    stored in float32 either way). ``rank`` larger than ``min(out, in)`` is clipped to it, so the
    factorisation at full rank is exact. ``exact=None`` (the default) uses :func:`randomized_svd` (rank +
    10 vectors, 6 power iterations, float32) when the rank is at most 1/8 of ``min(out, in)`` and the
    matrix has 2¹⁸ elements or more — tens of times faster on the dense SVDs of ``adapter extract`` and
    ``ties_svd``; ``exact=True`` always takes the full SVD. Either way ``energy`` and ``rel_error`` are
    exact (from ``‖ΔW‖_F``), so the report says what the rank kept; ``sigma`` holds the singular values
    computed (all of them for the full SVD). ``clamp`` (a quantile in (0, 1], peft's ``svd_clamp``) clips
    the entries of both factors to ±(that quantile of all their entries), as kohya's ``svd_merge_lora`` does.
    """
    if delta.dim() != 2:
        raise ShapeMismatchError(f"truncated_svd needs a 2-D matrix, got shape {list(delta.shape)}")
    small = min(delta.shape)
    randomized = (exact is False or (exact is None and delta.numel() >= RANDOMIZED_MIN_ELEMENTS)) and \
        rank <= RANDOMIZED_MAX_FRACTION * small
    if randomized:
        work = delta.to(torch.float32)
        U, S, Vh = randomized_svd(work, min(small, rank + 10))
    else:
        work = delta.to(torch.float64 if delta.numel() <= 1 << 22 else torch.float32)
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    k = max(1, min(rank, S.numel()))
    B = U[:, :k] * S[:k]
    A = Vh[:k, :]
    if clamp is not None:
        if not 0 < clamp <= 1:
            raise ValueError(f"svd clamp must be a quantile in (0, 1], got {clamp}")
        flat = torch.cat([B.flatten(), A.flatten()])
        hi = (
            float(torch.quantile(flat.float(), clamp)) if flat.numel() <= 1 << 24 else float(flat.abs().max())
        )
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if randomized:  # measured, not inferred from the few singular values computed
        norm = float(torch.linalg.matrix_norm(work.double()))
        rel = float(torch.linalg.matrix_norm((work - B @ A).double())) / norm if norm > 0 else 0.0
        energy = max(0.0, 1.0 - rel * rel) if clamp is None else \
            min(1.0, float((S[:k].double() ** 2).sum()) / (norm * norm)) if norm > 0 else 1.0
        return Truncation(Factors(A.float().contiguous(), B.float().contiguous(), 1.0), energy, rel, S.float())
    total = float((S.double() ** 2).sum())
    kept = float((S[:k].double() ** 2).sum())
    energy = kept / total if total > 0 else 1.0
    if clamp is None:
        rel = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    else:
        norm = math.sqrt(total)
        rel = float(torch.linalg.matrix_norm(work - B @ A)) / norm if norm > 0 else 0.0
    return Truncation(Factors(A.float().contiguous(), B.float().contiguous(), 1.0), energy, rel, S.float())


def lowrank_svd(parts: list[Factors], weights: list[float], rank: int, *, clamp: float | None = None,
                what: str = "target") -> Truncation:
    """The truncated SVD of ``ΔW = Σ_i w_i s_i B_i A_i`` without forming ``ΔW`` (same result as
    :func:`truncated_svd` of the dense sum, to float rounding; singular vectors up to sign).

    With ``B = [B_1 … B_n]`` (``out × R``), ``A = [w_1 s_1 A_1; …]`` (``R × in``), ``R = Σ r_i``: QR
    ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, so ``ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ``; the SVD of the small ``R × R``
    core ``U' Σ V'ᵀ`` gives ``ΔW = (Q_B U') Σ (Q_A V')ᵀ``. Cost O((out + in) R²) instead of
    O(out · in · min(out, in)), in float64.
    """
    c = cat_factors(parts, weights, torch.float64, what=what)
    qb, rb = torch.linalg.qr(c.B)
    qa, ra = torch.linalg.qr(c.A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = max(1, min(rank, s.numel()))
    B = (qb @ u[:, :k]) * s[:k]
    A = vh[:k] @ qa.T
    if clamp is not None:
        dense = truncated_svd(c.delta(torch.float64), rank, clamp=clamp)
        return dense
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    energy = kept / total if total > 0 else 1.0
    rel = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    return Truncation(Factors(A.float().contiguous(), B.float().contiguous(), 1.0), energy, rel, s.float())


def combine_residuals(
    deltas: list[torch.Tensor],
    weights: list[float],
    method: str,
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine residual matrices ``ΔW_i`` into one: ``Σ_i w_i ΔW_i`` or TIES / DARE on them.

    ``method``: ``sum``; ``ties`` (trim each ΔW_i to its top ``density`` magnitudes, elect signs on the
    weighted values, disjoint mean; Yadav et al., NeurIPS 2023, §3); ``dare_linear`` / ``dare_ties`` (drop
    entries with probability 1 − ``density`` and rescale by 1/``density``, Yu et al., ICML 2024, Eq. 2,
    then sum / TIES-combine); ``magnitude_prune`` (trim, then sum). These are the task-vector methods of
    ``merge.methods.task_arithmetic`` with a zero base; TIES' disjoint mean divides by the sum of the
    agreeing weights (mergekit's convention; peft divides by their count, the same for weights of 1).
    """
    from merge.methods import task_arithmetic as ta

    zero = torch.zeros_like(deltas[0])
    if method == "sum":
        out = deltas[0] * weights[0]
        for d, w in zip(deltas[1:], weights[1:], strict=True):
            out.add_(d, alpha=w)
        return out
    if method == "ties":
        return ta.ties(deltas, zero, weight=weights, density=density, normalize=True)
    if method == "magnitude_prune":
        return _magnitude_prune(deltas, weights, density)
    if method == "dare_linear":
        return ta.dare_linear(
            deltas, zero, weight=weights, density=density, rescale=True, generator=generator
        )
    if method == "dare_ties":
        return ta.dare_ties(
            deltas, zero, weight=weights, density=density, rescale=True, normalize=True, generator=generator
        )
    raise ValueError(
        f"unknown residual combination {method!r} (sum, ties, dare_linear, dare_ties, magnitude_prune)"
    )


def _magnitude_prune(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    from merge.methods._sparsify import trim_stats
    from merge.methods.registry import whole

    trims = trim_stats(whole(deltas, torch.zeros_like(deltas[0])), [density] * len(deltas), None, False)
    out = torch.zeros_like(deltas[0])
    for tr, d, w in zip(trims, deltas, weights, strict=True):
        out.add_(tr.apply(d.clone(), 0), alpha=w)
    return out


def frobenius_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``⟨a, b⟩_F / (‖a‖_F ‖b‖_F)`` in float64 (0 when either is zero)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = float(a64.norm()), float(b64.norm())
    return float(a64 @ b64) / (na * nb) if na > 0 and nb > 0 else 0.0
