"""NearSwap: take the other model's value where it is close to the base, keep the base elsewhere.

Alchemonaut, "QuartetAnemoi-70B" model card, 2024 (the NearSwap merge), as mergekit 0.1.5's
``nearswap``: per entry, with a = θ_0 (the base) and b = θ_1 (the other model),

    w = clamp(t / max(|a − b|, 1e-6), 0, 1),   θ = w b + (1 − w) a,

so entries that differ by at most ``t`` are swapped for the other model's value and entries that differ
more move only a distance ``t`` towards it.
"""

from __future__ import annotations

import torch

from merge.errors import RecipeError
from merge.methods.registry import merge_method


@merge_method(
    "nearswap",
    paper="Alchemonaut, QuartetAnemoi-70B (NearSwap merge), 2024",
    url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    base="required",
    min_models=1,
    max_models=1,
    elementwise=True,
)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor | None, *, t: float) -> torch.Tensor:
    """θ = w θ_1 + (1 − w) θ_0 with w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1), entry by entry."""
    if base is None or len(tensors) != 1:
        raise RecipeError("method 'nearswap' takes the base_model and exactly one other model")
    other = tensors[0]
    weight = (t / (base - other).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return weight * other + (1 - weight) * base
