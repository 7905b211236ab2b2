"""The recipe method ``git_rebasin``: align the models modulo permutations, then interpolate.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023 (arXiv:2209.04836): find permutations π of B's hidden units (weight matching, paper §3.2,
Algorithm 1: :func:`merge.rebasin.matching.weight_matching`) so that π(B) computes the same function
as B but lies in A's basin, then interpolate ``(1-λ)·θ_A + λ·π(θ_B)``. The matchers, the evaluation
(interpolation, BatchNorm reset, REPAIR, loss barrier) and the library call :func:`merge.rebasin.api.rebasin`
live in :mod:`merge.rebasin`.

Permutations follow the gather convention of :mod:`merge.symmetry`: ``π(B)`` has unit ``π[i]`` of
B at position ``i``; if ``B = π_0(A)`` then weight matching returns ``argsort(π_0)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merge.checkpoint import shapes_of
from merge.errors import RecipeError
from merge.methods.registry import FilePath, merge_method
from merge.rebasin.matching import MatchResult, weight_matching
from merge.symmetry import (
    Perms,
    PermutationSpec,
    permute_tensor,
    resolve_spec,
)

StateDict = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The recipe method
# ---------------------------------------------------------------------------------------------


@dataclass
class RebasinPlan:
    """The alignment found by the first pass; ``apply`` is streamed tensor by tensor by the engine."""

    spec: PermutationSpec
    perms: list[Perms]
    lam: float
    has_base: bool
    results: list[MatchResult]

    def apply(self, name: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """``(1-λ)·θ_A[name] + λ·mean_i π_i(θ_{B_i})[name]`` (A = base model, else the first model)."""
        if self.has_base:
            if base is None:
                raise RecipeError(f"git_rebasin: no base tensor given for '{name}'")
            ref, others = base, tensors
        else:
            ref, others = tensors[0], tensors[1:]
        if not ref.is_floating_point():
            return ref
        aligned = [permute_tensor(self.spec, name, t, p) for t, p in zip(others, self.perms, strict=True)]
        mean = aligned[0].float() if len(aligned) == 1 else torch.stack([t.float() for t in aligned]).mean(0)
        return ref.float() * (1.0 - self.lam) + mean * self.lam

    @property
    def objective(self) -> list[float]:
        return [r.objective for r in self.results]


@merge_method(
    "git_rebasin",
    paper="Ainsworth, Hayase & Srinivasa, Git Re-Basin: Merging Models modulo Permutation Symmetries, "
    "ICLR 2023",
    url="https://arxiv.org/abs/2209.04836",
    kind="whole_model",
    base="optional",
    min_models=1,
    max_models=None,
)
def git_rebasin(
    models: list[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    *,
    lambda_: float = 0.5,
    architecture: str = "",
    spec: FilePath = "",
    n_heads: int = 0,
    rope: bool = False,
    max_iter: int = 100,
    n_restarts: int = 1,
    seed: int = 0,
) -> RebasinPlan:
    """Align models by weight matching (Git Re-Basin), then interpolate: (1-λ)·θ_A + λ·π(θ_B).

    ``base_model`` is the reference model A that the others are aligned to (without a base, the
    first of exactly two models is A). Each other model B is aligned to A by weight matching
    (permutation coordinate descent, data-free); the output is ``(1-λ)·θ_A + λ·π(θ_B)``, with
    several B's averaged after alignment. ``lambda`` = 0 gives A, 1 gives π(B), which computes
    the same function as B. The permutation spec comes from ``architecture`` (``mlp``, ``cnn``/
    ``vgg``, ``resnet``, ``transformer`` with ``n_heads`` and ``rope``), built from tensor names
    and shapes, or from ``spec``, a JSON file written by ``PermutationSpec.save``. BatchNorm
    running statistics are permuted and interpolated; recompute them on data afterwards
    (``merge.methods.rebasin.reset_bn``) for the best merged model.
    """
    if not math.isfinite(lambda_):
        raise RecipeError(f"git_rebasin: lambda must be finite, got {lambda_}")
    if base is not None:
        ref, others = base, list(models)
    else:
        if len(models) != 2:
            raise RecipeError(
                f"git_rebasin: without a base_model give exactly two models (A, then B); got {len(models)}"
            )
        ref, others = models[0], [models[1]]
    if bool(architecture) == bool(spec):
        raise RecipeError("git_rebasin: give exactly one of the parameters 'architecture' or 'spec'")
    ref_shapes = shapes_of(ref)
    pspec = resolve_spec(
        ref_shapes, spec=spec or None, architecture=architecture or None, n_heads=n_heads, rope=rope,
        where="base model" if base is not None else "model A",
    )  # fmt: skip
    needed = pspec.permuted_tensors()
    a_t = {k: ref[k].float() for k in needed}
    perms, results = [], []
    for i, m in enumerate(others):
        pspec.check_shapes(shapes_of(m), where=f"model {i + 1}", complete=False)
        b_t = {k: m[k].float() for k in needed}
        res = weight_matching(pspec, a_t, b_t, max_iter=max_iter, n_restarts=n_restarts, seed=seed)
        perms.append(res.perms)
        results.append(res)
        del b_t
    return RebasinPlan(pspec, perms, float(lambda_), base is not None, results)
