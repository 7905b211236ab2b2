"""Model Stock: interpolate between the base and the average of fine-tuned models by their angle.

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(arXiv:2403.19522), Eq. (2)/(3): with k fine-tuned models θ_1..θ_k of a pre-trained θ_0 and
cos θ the average pairwise cosine between the task vectors τ_i = θ_i − θ_0,

    t = k cos θ / ((k − 1) cos θ + 1),   θ_H = t · (1/k) Σ_i θ_i + (1 − t) · θ_0.

Follows mergekit 0.1.5's ``model_stock``: each pairwise cosine is <τ_i, τ_j> / max(‖τ_i‖‖τ_j‖,
1e-6) clamped to [−1, 1]; where |(k − 1) cos θ + 1| < 1e-6, t = 0 (the base is kept).
``filter_wise=True`` computes one t per vector along the *last* axis (per output row of a 2-D
weight; a 1-D tensor is one vector), as mergekit does; otherwise one t per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge.errors import RecipeError
from merge.methods.registry import ChunkSource, merge_method, whole
from merge.methods.slerp import RowSums, row_dots


@dataclass(frozen=True)
class StockStats:
    """Whole-tensor Gram matrix of the task vectors (float64 totals of per-row float32 dots), or
    ``None`` when filter-wise."""

    gram: torch.Tensor | None


def _check(tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    if base is None:
        raise RecipeError("method 'model_stock' requires a base_model")
    if len(tensors) < 2:
        raise RecipeError(f"method 'model_stock' needs at least 2 models besides the base, got {len(tensors)}")
    return base


def _local(filter_wise: bool, base: torch.Tensor) -> bool:
    """Filter-wise on a tensor of 2+ dims: every vector lies inside one row chunk."""
    return filter_wise and base.dim() >= 2


def _model_stock_stats(chunks: ChunkSource, *, filter_wise: bool = False) -> StockStats:
    parts: dict[tuple[int, int], RowSums] = {}
    for tensors, base in chunks():
        base = _check(tensors, base)
        if _local(filter_wise, base):
            return StockStats(None)
        offsets = [t - base for t in tensors]
        for i, a in enumerate(offsets):
            for j in range(i, len(offsets)):
                parts.setdefault((i, j), RowSums()).add(row_dots(a, offsets[j]))
    n = max(j for _, j in parts) + 1 if parts else 0
    gram = torch.zeros((n, n), dtype=torch.float64)
    for (i, j), p in parts.items():
        gram[i, j] = gram[j, i] = p.total()
    return StockStats(gram)


def _t_from_cos(cos: torch.Tensor, k: int) -> torch.Tensor:
    """t = k cos / (1 + (k − 1) cos), 0 where the denominator is below 1e-6 in magnitude."""
    den = 1 + (k - 1) * cos
    singular = den.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(den), den)
    return torch.where(singular, torch.zeros_like(cos), (k * cos) / safe)


def stock_ratio(gram: torch.Tensor) -> float:
    """The interpolation ratio t from the Gram matrix of the k task vectors (Eq. 3)."""
    k = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    cos = [
        (gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    return float(_t_from_cos(torch.stack(cos).mean(), k).item())


@merge_method(
    "model_stock",
    paper="Jang, Yun & Han, Model Stock: All we need is just a few fine-tuned models, ECCV 2024",
    url="https://arxiv.org/abs/2403.19522",
    base="required",
    min_models=2,
    stats=_model_stock_stats,
)
def model_stock(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    filter_wise: bool = False,
    stats: StockStats | None = None,
) -> torch.Tensor:
    """Model Stock (Jang et al., Eq. 3): θ = t · mean_i θ_i + (1 − t) θ_0, t from the mean cosine.

    t = k cos θ / ((k − 1) cos θ + 1) over the k ≥ 2 task vectors τ_i = θ_i − θ_0; one t per
    tensor, or per last-axis vector with ``filter_wise``.
    """
    base = _check(tensors, base)
    k = len(tensors)
    average = sum(tensors) / k  # type: ignore[operator]
    if _local(filter_wise, base):
        offsets = [w - base for w in tensors]
        cos_list = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1 :]:
                norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cos_list.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cos_list).mean(dim=0).unsqueeze(-1)
        t = _t_from_cos(cos, k)
    else:
        if stats is None:
            stats = _model_stock_stats(whole(tensors, base), filter_wise=filter_wise)
        assert stats.gram is not None
        t = torch.tensor(stock_ratio(stats.gram), dtype=base.dtype)
    return t * average + (1 - t) * base
