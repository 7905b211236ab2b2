"""The function-preservation check: permute a module's weights at random and compare outputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from merge.errors import WeightsmithError
from merge.symmetry.apply import apply_permutation
from merge.symmetry.spec import Perms, PermutationSpec


class SpecCheckError(WeightsmithError):
    """A permutation spec does not preserve the model's function (the random-permutation test failed)."""


def _flat_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _flat_tensors(v)]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _flat_tensors(v)]
    if hasattr(x, "to_tuple"):  # HF ModelOutput
        return _flat_tensors(x.to_tuple())
    return []


def _max_err(ref: list[torch.Tensor], out: list[torch.Tensor]) -> tuple[float, float]:
    err, scale = 0.0, 0.0
    for r, o in zip(ref, out, strict=True):
        if r.is_floating_point():
            err = max(err, float((r.double() - o.double()).abs().max()) if r.numel() else 0.0)
            scale = max(scale, float(r.double().abs().max()) if r.numel() else 0.0)
        elif not torch.equal(r, o):
            err = math.inf
    return err, scale


def check_spec(
    module: torch.nn.Module,
    spec: PermutationSpec,
    example_inputs: Sequence[Any] | Any,
    *,
    trials: int = 1,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    output_fn: Callable[[Any], Any] | None = None,
) -> float:
    """The function-preservation test: permute at random, compare outputs (eval mode).

    Returns the largest absolute output difference seen. Raises :class:`SpecCheckError` naming
    the permutations that change the function (each tested alone) if the difference exceeds
    ``atol + rtol·max|output|``. This is the test every hand-written spec needs (Git Re-Basin
    issue #10 was a typo in a ResNet-50 spec). ``output_fn`` selects the outputs to compare (a
    backbone's hidden states live in the permuted basis; its pooled or logit outputs do not).
    """
    select = output_fn or (lambda o: o)
    inputs = tuple(example_inputs) if isinstance(example_inputs, list | tuple) else (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        state = dict(module.state_dict())
        with torch.no_grad():
            ref = _flat_tensors(select(module(*inputs)))
        g = torch.Generator().manual_seed(seed)

        def run(perms: Perms) -> tuple[float, float]:
            permuted = apply_permutation(spec, state, perms)
            with torch.no_grad():
                out = _flat_tensors(
                    select(torch.func.functional_call(module, permuted, inputs, tie_weights=False))
                )
            return _max_err(ref, out)

        worst = 0.0
        for _ in range(trials):
            perms = spec.random_perms(g)
            err, scale = run(perms)
            worst = max(worst, err)
            if err > atol + rtol * scale:
                bad = []
                for p in spec.perms:
                    one = spec.identity()
                    group = spec.heads[p].group if p in spec.heads else None
                    for q in spec.perms:
                        if q == p or (group is not None and q in spec.heads and spec.heads[q].group == group):
                            one[q] = perms[q]
                    e1, s1 = run(one)
                    if e1 > atol + rtol * s1:
                        bad.append(p)
                raise SpecCheckError(
                    f"permutation spec does not preserve the function: max |Δoutput| = {err:.3g} "
                    f"(tolerance {atol + rtol * scale:.3g}); "
                    f"failing permutation(s): {', '.join(bad) or 'only jointly'}"
                )
        return worst
    finally:
        module.train(was_training)
