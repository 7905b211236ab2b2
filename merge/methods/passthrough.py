"""Passthrough: copy one input tensor, optionally scaled (mergekit's ``passthrough``).

Used with ``slices`` to stack layer ranges of models ("frankenmerges"); the engine resolves the
slices, so per tensor this is the identity on the single input, times ``scale`` when given.
"""

from __future__ import annotations

import torch

from merge.errors import RecipeError
from merge.methods.registry import PerModel, merge_method


@merge_method(
    "passthrough",
    paper="mergekit passthrough (layer stacking), Goddard et al., arXiv:2403.13257",
    url="https://arxiv.org/abs/2403.13257",
    base="ignored",
    min_models=1,
    max_models=1,
    elementwise=True,
)
def passthrough(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    scale: PerModel[float | None] = None,
) -> torch.Tensor:
    """Return the single input unchanged, or multiplied by ``scale`` when it is set."""
    if len(tensors) != 1:
        raise RecipeError(f"method 'passthrough' takes exactly one input per tensor, got {len(tensors)}")
    value = scale[0] if isinstance(scale, list | tuple) else scale
    return tensors[0] if value is None else tensors[0] * float(value)
