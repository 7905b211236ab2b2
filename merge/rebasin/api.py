"""The library call :func:`rebasin`: align ``b`` to ``a`` by a spec that is given, built or inferred.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023 (arXiv:2209.04836); the matchers are in
:mod:`merge.rebasin.matching`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.errors import RecipeError
from merge.rebasin.evaluation import interpolate
from merge.rebasin.matching import MatchResult, activation_matching, batch_input, ste_matching, weight_matching
from merge.symmetry import (
    Perms,
    PermutationSpec,
    apply_permutation,
    resolve_spec,
    trace_spec,
)

StateDict = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Library call
# ---------------------------------------------------------------------------------------------


@dataclass
class Alignment:
    """What :func:`rebasin` returns: the permutations, ``π(θ_B)`` and how they were found."""

    perms: Perms
    state: dict[str, torch.Tensor]
    spec: PermutationSpec
    result: MatchResult

    def merge(self, a: StateDict, lam: float = 0.5) -> dict[str, torch.Tensor]:
        """``(1-λ)·θ_A + λ·π(θ_B)``."""
        return interpolate(a, self.state, lam)


def rebasin(
    a: StateDict,
    b: StateDict,
    *,
    spec: PermutationSpec | str | Path | None = None,
    architecture: str | None = None,
    method: str = "weight",
    model: torch.nn.Module | None = None,
    model_b: torch.nn.Module | None = None,
    data: Iterable[Any] | None = None,
    example_inputs: Any = None,
    n_heads: int = 0,
    rope: bool = False,
    **kwargs: Any,
) -> Alignment:
    """Align ``b`` to ``a`` and return the permutations and the permuted state dict ``π(θ_B)``.

    The spec is given (a :class:`PermutationSpec` or a JSON path), built by ``architecture``
    (``mlp``, ``cnn``, ``resnet``, ``transformer`` with ``n_heads``/``rope``), or inferred by
    ``torch.fx`` from ``model`` and ``example_inputs``. ``method``:

    - ``"weight"`` (default, data-free): :func:`weight_matching` (``kwargs``: ``max_iter``,
      ``seed``, ``n_restarts``, ``tol``...);
    - ``"activation"``: :func:`activation_matching`; needs ``model`` (loaded with A), ``model_b``
      (loaded with B) and ``data``;
    - ``"ste"``: :func:`ste_matching`; needs ``model`` (architecture) and labelled ``data``.
    """
    if isinstance(spec, str | Path):
        spec = PermutationSpec.load(spec)
    if method == "activation":
        if model is None or model_b is None or data is None:
            raise RecipeError(
                "activation matching needs model (with A's weights), model_b (with B's) and data"
            )
        res = activation_matching(model, model_b, data, spec=spec, **kwargs)
        if spec is None:
            first = next(iter(data))
            spec = trace_spec(model, batch_input(first), check=False).spec
    else:
        spec = resolve_spec(
            a, spec=spec, architecture=architecture, n_heads=n_heads, rope=rope, model=model,
            example_inputs=example_inputs, check=False,
        )  # fmt: skip
        if method == "weight":
            res = weight_matching(spec, a, b, **kwargs)
        elif method == "ste":
            if model is None or data is None:
                raise RecipeError("STE matching needs model and labelled data")
            res = ste_matching(model, spec, a, b, data, **kwargs)
        else:
            raise RecipeError(f"unknown matching method '{method}' (weight, activation, ste)")
    assert spec is not None
    return Alignment(res.perms, apply_permutation(spec, b, res.perms), spec, res)
