"""Arcee Fusion: take the other model's change only where it matters (importance above an outlier cut).

Arcee AI, "Arcee Fusion" (the merge behind Arcee's Virtuoso/SuperNova models, 2025), as mergekit
0.1.5's ``arcee_fusion``, with θ_0 the base and θ_1 the other model:

    importance = |θ_1 − θ_0| · KL(softmax(θ_1) ‖ softmax(θ_0)),   KL = Σ p log(p / q),
    p = softmax(θ_1) + 1e-8, q = softmax(θ_0) + 1e-8 along the last axis (one KL per row; a 1-D
    tensor is one row), threshold = median + 1.5 (Q3 − Q1) of the importance over the tensor,
    θ = θ_0 + (θ_1 − θ_0) · [importance >= threshold].

Quantiles are mergekit's: the sorted values at positions ⌊q (n − 1)⌋ for q = 1/4, 1/2, 3/4 (no
interpolation). mergekit takes them from a random sample of 1M entries (with replacement, from
torch's global generator) when the tensor is larger; weightsmith always computes them exactly, with
the streaming radix selection of :mod:`merge.methods._select` (the importance is computed chunk by
chunk in every pass; negative values, which only rounding of the KL can produce, are selected in a
second stream of their magnitudes). So below 1M entries the two agree exactly; above, mergekit's cut is
an estimate of ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from merge.errors import RecipeError
from merge.methods._select import select_top
from merge.methods.registry import ChunkSource, merge_method, whole

_EPS = 1e-8
_QUANTILES = (0.25, 0.5, 0.75)


def row_kl(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(other) ‖ softmax(base)) along the last axis (keepdim), both offset by 1e-8."""
    p = F.softmax(other, dim=-1) + _EPS
    q = F.softmax(base, dim=-1) + _EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(other: torch.Tensor, base: torch.Tensor, kl: torch.Tensor | None = None) -> torch.Tensor:
    """|θ_1 − θ_0| times the row's KL divergence (``kl`` given for 1-D tensors ranked whole)."""
    diff = (other - base).abs()
    return diff * (row_kl(other, base) if kl is None else kl)


def quantile_positions(n: int) -> list[int]:
    """⌊q (n − 1)⌋ computed as mergekit does (float32 product, truncated)."""
    return [int(v) for v in (torch.tensor(_QUANTILES) * (n - 1)).long()]


@dataclass(frozen=True)
class FusionStats:
    threshold: torch.Tensor  # 0-d float32
    kl: torch.Tensor | None  # the whole-vector KL of a 1-D tensor (None: per row, in each chunk)


def _pair(tensors: list[torch.Tensor], base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if base is None or len(tensors) != 1:
        raise RecipeError("method 'arcee_fusion' takes the base_model and exactly one other model")
    return tensors[0], base


def _fusion_stats(chunks: ChunkSource) -> FusionStats:
    kl = None
    first = next(iter(chunks()))
    other, base = _pair(*first)
    if base.dim() <= 1:  # one KL over the whole vector (1-D tensors are small)
        parts = list(chunks())
        kl = row_kl(
            torch.cat([t[0].reshape(-1) for t, _ in parts]), torch.cat([b.reshape(-1) for _, b in parts])
        ).reshape(())
    del first, other, base
    seen = {"n": 0, "neg": 0, "min": float("inf"), "max": float("-inf"), "passes": 0}

    def streams():
        seen["passes"] += 1
        for tensors, b in chunks():
            imp = importance(*_pair(tensors, b), kl=kl).reshape(-1)
            if seen["passes"] == 1:  # counts for ks(), which runs after the first pass
                neg = imp < 0
                seen["n"] += imp.numel()
                seen["neg"] += int(neg.sum())
                if imp.numel():
                    seen["min"] = min(seen["min"], float(imp.min()))
                    seen["max"] = max(seen["max"], float(imp.max()))
            yield [imp.clamp(min=0).add_(0.0), (-imp).clamp_(min=0).add_(0.0)]

    plan: list[tuple[str, int]] = []  # per quantile: ("min"|"max"|"pos"|"neg", k)

    def ks(numel: int) -> list[list[int]]:
        n, n_neg = seen["n"], seen["neg"]
        pos_k: list[int] = []
        neg_k: list[int] = []
        for r in quantile_positions(n):
            if r <= 0:
                plan.append(("min", 0))
            elif r >= n - 1:
                plan.append(("max", 0))
            elif r >= n_neg:  # the (n − r)-th largest overall is a non-negative value
                plan.append(("pos", len(pos_k)))
                pos_k.append(n - r)
            else:  # the (r + 1)-th most negative value
                plan.append(("neg", len(neg_k)))
                neg_k.append(r + 1)
        return [pos_k, neg_k]

    sel = select_top(streams, ks)
    values = []
    for kind, j in plan:
        if kind == "min":
            values.append(seen["min"])
        elif kind == "max":
            values.append(seen["max"])
        elif kind == "pos":
            values.append(sel[0].topk[j].threshold_value)
        else:
            values.append(-sel[1].topk[j].threshold_value)
    q1, median, q3 = torch.tensor(values, dtype=torch.float32).unbind()
    return FusionStats(median + 1.5 * (q3 - q1), kl)


@merge_method(
    "arcee_fusion",
    paper="Arcee AI, Arcee Fusion (importance-thresholded merging), 2025",
    url="https://arcee.ai",
    base="required",
    min_models=1,
    max_models=1,
    stats=_fusion_stats,
)
def arcee_fusion(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    stats: FusionStats | None = None,
) -> torch.Tensor:
    """θ_0 + (θ_1 − θ_0)·[importance >= median + 1.5 IQR], importance = |θ_1 − θ_0| · KL of the row."""
    other, b = _pair(tensors, base)
    if stats is None:
        stats = _fusion_stats(whole(tensors, base))
    mask = (importance(other, b, kl=stats.kl) >= stats.threshold).float()
    return b + (other - b) * mask
