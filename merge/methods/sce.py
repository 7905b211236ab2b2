"""SCE: select, calculate, erase (the merge step of FuseChat).

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (arXiv:2408.07990), §3.3, as
mergekit 0.1.5's ``sce`` computes it, on task vectors τ_t = θ_t − θ_0:

1. **Select**: with ``select_topk`` < 1, keep the entries where the task vectors disagree most:
   the k = ⌊select_topk · #{var ≠ 0}⌋ entries with the largest variance across models,
   var = (1/T) Σ_t (τ_t − τ̄)² (one mask shared by all τ_t); ``select_topk`` <= 0 keeps none.
2. **Calculate**: one weight per model from the (selected) task vector's mean square,
   w_t = mean(τ_t²) / Σ_s mean(τ_s²) (uniform 1/T when that sum is below 1e-6).
3. **Erase**: TIES's sign election on the unweighted sum, γ = sgn(Σ_t τ_t) (0 counts as +);
   entries disagreeing with γ are dropped: τ_m = Σ_t w_t A_t τ_t / max(Σ_t w_t A_t, 1e-6).

θ = θ_0 + τ_m. Streaming: the variance top-k is an exact radix selection over row chunks
(:mod:`merge.methods._select`, ties at the cut kept in flat-index order, where mergekit's
``torch.topk`` picks arbitrarily), counting the non-zero variances in its first pass; the mean
squares are a further pass over the selected entries (per-row float32 sums added in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge.methods._select import TopK, select_top
from merge.methods.registry import ChunkSource, Fraction, merge_method, whole
from merge.methods.slerp import RowSums
from merge.methods.task_arithmetic import _deltas


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models, entry by entry, bit-identical to ``torch.var(unbiased=False)``.

    torch's CPU kernel runs Welford's update in float64 one entry at a time (slow: 0.4 s per 512K entries
    of three models); the same float64 updates on whole tensors give the same bits, ~5x faster. So the
    ranking (and thus the selection) is mergekit's exactly.
    """
    mean = deltas[0].double()
    m2 = torch.zeros_like(mean)
    for i, d in enumerate(deltas[1:], start=2):
        x = d.double()
        delta = x - mean
        mean.add_(delta / i)
        m2.add_(delta.mul_(x.sub_(mean)))
    return m2.div_(len(deltas)).to(deltas[0].dtype)


@dataclass(frozen=True)
class SceStats:
    """The variance selection (None: keep all; ``zero``: keep none) and the model weights."""

    select: TopK | None
    select_none: bool
    weights: tuple[float, ...]


def _mask(stats: SceStats, deltas: list[torch.Tensor], chunk: int) -> torch.Tensor | None:
    if stats.select_none:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    if stats.select is None:
        return None
    return stats.select.mask(_variance(deltas).abs_(), chunk)


def _sce_stats(chunks: ChunkSource, *, select_topk: float = 1.0) -> SceStats:
    select = None
    select_none = select_topk <= 0
    if 0 < select_topk < 1:
        nonzero = [0]

        def variances():
            for tensors, base in chunks():
                var = _variance(_deltas(tensors, base, "sce")).abs_()
                nonzero[0] += int(torch.count_nonzero(var))
                yield [var]

        def ks(numel: int) -> list[list[int]]:
            # counted during the first pass, which ks() follows; the product is a float32 tensor
            # product as in mergekit (``int(count_nonzero(var) * select_topk)``)
            return [[int(torch.tensor(nonzero[0], dtype=torch.int64) * select_topk)]]

        sel = select_top(variances, ks)
        select = sel[0].topk[0] if sel else None
        if select is not None and select.k == 0:
            select, select_none = None, True
    partial = SceStats(select, select_none, ())
    sq: list[RowSums] = []
    numel = 0
    for ci, (tensors, base) in enumerate(chunks()):
        deltas = _deltas(tensors, base, "sce")
        mask = _mask(partial, deltas, ci)
        if not sq:
            sq = [RowSums() for _ in deltas]
        numel += deltas[0].numel()
        for t, d in enumerate(deltas):
            if mask is not None:
                d = d * mask
            rows = d.shape[0] if d.dim() > 0 else 1
            sq[t].add(d.reshape(rows, -1).square().sum(1) if d.numel() else torch.zeros(rows))
    means = [p.total() / numel if numel else float("nan") for p in sq]
    total = sum(means)
    if abs(total) < 1e-6:
        weights = tuple(1.0 / len(means) for _ in means)
    else:
        weights = tuple(m / total for m in means)
    return SceStats(select, select_none, weights)


@merge_method(
    "sce",
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models, 2024 (SCE merging)",
    url="https://arxiv.org/abs/2408.07990",
    base="required",
    min_models=1,
    stats=_sce_stats,
)
def sce(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    select_topk: Fraction = 1.0,
    int8_mask: bool = False,
    stats: SceStats | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """SCE (FuseChat §3.3): select high-variance entries, weight models by mean square, erase by sign.

    θ = θ_0 + Σ_t w_t A_t τ_t / max(Σ_t w_t A_t, 1e-6) with w_t = mean(τ̂_t²)/Σ_s mean(τ̂_s²) over the
    selected τ̂_t and A_t = [sgn τ̂_t = sgn Σ_s τ̂_s]. ``int8_mask`` has no effect (mergekit's mask dtype).
    """
    deltas = _deltas(tensors, base, "sce")
    assert base is not None
    if not deltas:
        return base.clone()
    if stats is None:
        stats = _sce_stats(whole(tensors, base), select_topk=select_topk)
        chunk = 0
    mask = _mask(stats, deltas, chunk)
    if mask is not None:
        for d in deltas:
            d.mul_(mask)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    majority = (total >= 0).to(base.dtype).mul_(2).sub_(1)
    del total
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for d, w in zip(deltas, stats.weights, strict=True):
        agree = (d.sign() == majority).to(base.dtype).mul_(w)
        merged.add_(d * agree)
        divisor.add_(agree)
    return merged.div_(divisor.clamp_(min=1e-6)).add_(base)
