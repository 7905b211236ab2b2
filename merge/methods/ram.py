"""RAM and RAM+ (tensor-local): average task vectors only where several models changed a weight.

"Reinforced Agent Merging", arXiv:2601.13572 (2026), as mergekit 0.1.5's ``ram`` and ``ramplus_tl``.
With task vectors τ_t = θ_t − θ_0, an entry *contributes* in model t when |τ_t| > ε; let
c = #{t : |τ_t| > ε} per entry. Entries changed by one model keep that model's change, entries
changed by several take the mean of the contributing changes, unchanged entries stay at the base:

    ram:        θ = θ_0 + Σ_t [c = 1] τ̂_t + Σ_t [c > 1] τ̂_t / c,      τ̂_t = τ_t [|τ_t| > ε]

``ramplus_tl`` ("tensor-local" RAM+) also amplifies each model's unique entries by
λ_t = 1 + r · clamp(ρ_t, 0, α), ρ_t = #(shared entries of t) / max(#(unique entries of t), ε), counted
over the whole tensor, which rebalances models whose changes overlap with others'.

``ram`` is element-wise; ``ramplus_tl`` needs the two counts per model (a statistics pass, exact
integers, so any chunking gives the same result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge.methods.registry import ChunkSource, merge_method, whole
from merge.methods.task_arithmetic import _deltas

_PAPER = "Reinforced Agent Merging (RAM), arXiv:2601.13572, 2026"
_URL = "https://arxiv.org/abs/2601.13572"


def _contributions(deltas: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per model the mask |τ_t| > ε, and per entry the number of contributing models."""
    masks = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(deltas[0].shape, dtype=torch.int64, device=deltas[0].device)
    for m in masks:
        count.add_(m)
    return masks, count


def _ram_merge(
    deltas: list[torch.Tensor], base: torch.Tensor, epsilon: float, lambdas: list[torch.Tensor] | None
) -> torch.Tensor:
    masks, count = _contributions(deltas, epsilon)
    unique = count == 1
    overlap = count > 1
    count = count.clamp_(min=1)
    merged = torch.zeros_like(base)
    for i, (d, m) in enumerate(zip(deltas, masks, strict=True)):
        dz = d * m
        part = dz * unique
        if lambdas is not None:
            part = part * lambdas[i]
        merged.add_(part + dz * overlap / count)  # (the same operations, in mergekit's order)
    return merged.add_(base)


@merge_method("ram", paper=_PAPER, url=_URL, base="required", min_models=1, elementwise=True)
def ram(tensors: list[torch.Tensor], base: torch.Tensor | None, *, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM: θ = θ_0 + Σ_t τ̂_t / c where c models changed the entry by more than ``epsilon`` (c >= 1)."""
    deltas = _deltas(tensors, base, "ram")
    assert base is not None
    if not deltas:
        return base.clone()
    return _ram_merge(deltas, base, epsilon, None)


@dataclass(frozen=True)
class RamPlusStats:
    """Per model: entries it shares with other models, and entries only it changed."""

    shared: tuple[int, ...]
    unique: tuple[int, ...]


def _ramplus_stats(chunks: ChunkSource, *, epsilon: float = 1e-5) -> RamPlusStats:
    shared: list[int] = []
    unique: list[int] = []
    for tensors, base in chunks():
        deltas = _deltas(tensors, base, "ramplus_tl")
        masks, count = _contributions(deltas, epsilon)
        if not shared:
            shared, unique = [0] * len(deltas), [0] * len(deltas)
        for i, m in enumerate(masks):
            shared[i] += int((m & (count > 1)).sum())
            unique[i] += int((m & (count == 1)).sum())
    return RamPlusStats(tuple(shared), tuple(unique))


def ramplus_lambdas(stats: RamPlusStats, r: float, alpha: float, epsilon: float) -> list[torch.Tensor]:
    """λ_t = 1 + r clamp(shared_t / max(unique_t, ε), 0, α), in float32 as mergekit computes it."""
    shared = torch.tensor(stats.shared, dtype=torch.int64)
    unique = torch.tensor(stats.unique, dtype=torch.int64)
    rho = shared / unique.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    return list(lam.unbind())


@merge_method("ramplus_tl", paper=_PAPER, url=_URL, base="required", min_models=1, stats=_ramplus_stats)
def ramplus_tl(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    stats: RamPlusStats | None = None,
) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with each model's unique entries scaled by λ_t = 1 + r clamp(ρ_t, 0, α).

    ρ_t = (entries model t shares) / max(entries only t changed, ``epsilon``), counted over the tensor.
    """
    deltas = _deltas(tensors, base, "ramplus_tl")
    assert base is not None
    if not deltas:
        return base.clone()
    if stats is None:
        stats = _ramplus_stats(whole(tensors, base), epsilon=epsilon)
    return _ram_merge(deltas, base, epsilon, ramplus_lambdas(stats, r, alpha, epsilon))
