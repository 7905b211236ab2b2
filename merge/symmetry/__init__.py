"""Permutation symmetries of a model's weight space.

Hidden units of a network can be reordered without changing the function it computes, provided
every tensor that reads or writes those units is reordered the same way. A
:class:`PermutationSpec` says which axes of which tensors each such permutation acts on. It is the
object Git Re-Basin aligns over (Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models
modulo Permutation Symmetries", ICLR 2023, §2 and the ``permutation_spec`` of their reference
code) and the object ``metanets/graph.py`` builds parameter graphs from.

The spec has two views of one piece of information:

``axes_to_perm``
    tensor name -> a tuple with one entry per axis of the tensor (of its *view*, see below): a
    permutation id (a string) or ``None`` when that axis is not permuted.
``perm_to_axes``
    permutation id -> list of ``(tensor name, axis)`` pairs, derived from ``axes_to_perm``.

Two refinements keep real architectures expressible in that form:

``views``
    tensor name -> a shape with the same number of elements that the tensor is reshaped to before
    its axes are read (row-major). A classifier reading a flattened ``C×H×W`` feature map has
    weight ``(out, C·H·W)``; with the view ``(out, C, H·W)`` the channel permutation acts on
    axis 1. A fused attention projection ``(3E, E)`` gets the view ``(3, E, E)``.
``heads``
    permutation id -> :class:`HeadStructure`. Multi-head attention is only invariant under
    *block-structured* permutations of the ``n_heads·head_dim`` axis: whole heads move (one
    permutation σ of the heads) and the features inside each head may be permuted (one τ_h per
    head). Permutations with the same ``HeadStructure.group`` share σ (the q/k and the v/o
    permutations of one attention layer). A structured permutation is still stored as one flat
    index vector of length ``n_heads·head_dim``; only the solver and the validity check know
    about the block structure.

**Gather convention** (pinned here, tested with a planted permutation): a permutation ``perm`` is
a ``LongTensor`` of length n, and applying it to axis ``ax`` of ``t`` gives ``out`` with
``out.select(ax, i) == t.select(ax, perm[i])``, i.e. ``out = t.index_select(ax, perm)``. So
``perm[i]`` is the old unit placed at position ``i``. If ``B = apply(A, σ)`` then the permutation
that maps ``B`` back onto ``A`` is ``argsort(σ)``.

Ready specs are built from tensor names and shapes alone (:func:`mlp_spec`, :func:`cnn_spec`,
:func:`resnet_spec`, :func:`transformer_spec`, dispatched by :func:`build_spec`), and
:func:`infer_spec` infers one for an arbitrary ``torch.nn.Module`` by ``torch.fx`` tracing (a
union-find over tensor axes in the style of PLeaS, Nakhleh et al. 2024), then checks it by
permuting at random and comparing outputs.
"""

from merge.symmetry.apply import apply_permutation, compose, invert, permute_tensor
from merge.symmetry.check import SpecCheckError, check_spec
from merge.symmetry.infer import FxTrace, infer_spec, trace_spec
from merge.symmetry.ready import (
    ARCHITECTURES,
    auto_spec,
    build_spec,
    cnn_spec,
    mlp_spec,
    resnet_spec,
    transformer_spec,
)
from merge.symmetry.resolve import resolve_spec
from merge.symmetry.spec import (
    HeadStructure,
    PermId,
    Perms,
    PermutationSpec,
    flat_to_heads,
    heads_to_flat,
    natural_key,
)

__all__ = [
    "resolve_spec",
    "auto_spec",
    "ARCHITECTURES",
    "FxTrace",
    "HeadStructure",
    "PermId",
    "Perms",
    "PermutationSpec",
    "SpecCheckError",
    "apply_permutation",
    "build_spec",
    "check_spec",
    "cnn_spec",
    "compose",
    "flat_to_heads",
    "heads_to_flat",
    "infer_spec",
    "invert",
    "mlp_spec",
    "natural_key",
    "permute_tensor",
    "resnet_spec",
    "trace_spec",
    "transformer_spec",
]
