"""Small models for the metanet tests: the shared small models (testkit.models) plus specs, in float32 or float64."""

from __future__ import annotations

import torch

import testkit.models as zoo_mod  # noqa: E402
from merge.symmetry import PermutationSpec, infer_spec, transformer_spec
from metanets.base import auto_spec

ARCHS = ("mlp", "cnn", "resnet", "transformer", "rope_transformer", "mha")


def model_and_spec(
    arch: str, dtype: torch.dtype = torch.float64
) -> tuple[dict[str, torch.Tensor], PermutationSpec]:
    """A state dict (floating tensors in ``dtype``, others as they are) and its permutation spec."""
    torch.manual_seed(0)
    if arch == "rope_transformer":
        m: torch.nn.Module = zoo_mod.Transformer(use_rope=True)
        spec = transformer_spec(m.state_dict(), n_heads=4, rope=True)
    elif arch == "mha":
        m = zoo_mod.MHANet()
        spec = infer_spec(m, torch.randn(2, 5, 6))
    else:
        m, _x = zoo_mod.zoo()[arch]
        spec = (
            transformer_spec(m.state_dict(), n_heads=4)
            if arch == "transformer"
            else auto_spec(m.state_dict())
        )
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    if arch == "mha":  # infer_spec lists floating tensors only; the rest pass through
        state = {k: v for k, v in state.items() if v.is_floating_point()}
    return state, spec
