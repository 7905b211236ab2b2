"""Applying, inverting and composing permutations (gather convention of :mod:`merge.symmetry`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from merge.errors import ShapeMismatchError
from merge.symmetry.spec import Perms, PermutationSpec


def invert(perms: Mapping[str, torch.Tensor]) -> Perms:
    """The inverse permutations (``argsort``): applying ``perms`` then ``invert(perms)`` is the identity."""
    return {p: torch.argsort(torch.as_tensor(v)) for p, v in perms.items()}


def compose(first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Perms:
    """The permutation equal to applying ``first`` and then ``then`` (gather convention)."""
    return {p: torch.as_tensor(first[p])[torch.as_tensor(then[p])] for p in first}


def permute_tensor(
    spec: PermutationSpec, name: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Apply ``perms`` to one tensor: ``out.select(ax, i) = t.select(ax, perm[i])`` on every permuted axis.

    Tensors the spec does not list (or lists with no permuted axis) are returned unchanged. The
    input is never modified.
    """
    axes = spec.axes_to_perm.get(name)
    if axes is None or all(p is None for p in axes):
        return tensor
    if tuple(tensor.shape) != spec.shapes[name]:
        raise ShapeMismatchError(
            f"tensor '{name}' has shape {list(tensor.shape)}, the permutation spec expects {list(spec.shapes[name])}"
        )
    out = tensor.reshape(spec.view_shape(name))
    for ax, p in enumerate(axes):
        if p is not None:
            out = out.index_select(ax, torch.as_tensor(perms[p], device=out.device))
    return out.reshape(tensor.shape)


def apply_permutation(
    spec: PermutationSpec, state: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict with ``perms`` applied (gather convention of the module docstring).

    BatchNorm ``running_mean``/``running_var`` are permuted like any listed tensor; tensors that
    are not listed (``num_batches_tracked``, position ids) are passed through.
    """
    return {k: permute_tensor(spec, k, v, perms) for k, v in state.items()}
