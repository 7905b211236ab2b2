"""Weighted averaging: linear merge and the uniform model soup.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 (arXiv:2203.05482), Eq. (1) for the uniform soup.
"""

from __future__ import annotations

import torch

from merge.errors import RecipeError
from merge.methods.registry import PerModel, merge_method


@merge_method(
    "linear",
    paper="Wortsman et al., Model soups, ICML 2022",
    url="https://arxiv.org/abs/2203.05482",
    base="ignored",
    min_models=1,
    elementwise=True,
    propagates_nonfinite=True,
)
def linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted average of the inputs, θ = Σ_i w_i θ_i / Σ_i w_i (uniform soup when all w_i = 1).

    With ``normalize=False`` the weighted sum Σ_i w_i θ_i is returned as is. ``weight`` is a list
    with one entry per input model.
    """
    weights = weight if isinstance(weight, list) else [weight] * len(tensors)
    out = torch.zeros_like(tensors[0], dtype=torch.promote_types(tensors[0].dtype, torch.float32))
    for w, t in zip(weights, tensors, strict=True):
        out.add_(t, alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if total == 0.0:
            raise RecipeError("linear: the weights sum to 0, cannot normalize (set normalize: false)")
        out.div_(total)
    return out
