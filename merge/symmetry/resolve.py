"""The one way to get a permutation spec: given, by architecture name, inferred by torch.fx, or from names.

Every caller (the library's :func:`merge.rebasin.api.rebasin`, the recipe method ``git_rebasin``, lineage's
``aligned`` method, the service's alignment jobs, metanets) asks here instead of choosing for itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merge.errors import RecipeError
from merge.symmetry.ready import auto_spec, build_spec
from merge.symmetry.spec import PermutationSpec


def resolve_spec(
    shapes: Mapping[str, Any],
    *,
    spec: PermutationSpec | str | Path | None = None,
    architecture: str | None = None,
    n_heads: int = 0,
    rope: bool = False,
    model: Any = None,
    example_inputs: Any = None,
    from_names: bool = False,
    check: bool = True,
    where: str = "model",
    what: str = "rebasin",
) -> PermutationSpec:
    """The permutation spec of a model whose tensors (or shapes) are ``shapes``, in this order of choice:

    1. ``spec``: a :class:`PermutationSpec` or the path of one saved as JSON (``PermutationSpec.save``),
       checked against ``shapes`` (every tensor listed, shapes equal) unless ``check=False``;
    2. ``architecture``: a ready spec (``mlp``, ``cnn``/``vgg``, ``resnet``, ``transformer`` with
       ``n_heads`` and ``rope``: Ainsworth et al., Git Re-Basin, ICLR 2023, §2; Appendix A.1 for the
       transformer's heads) built from the names and shapes;
    3. ``model`` and ``example_inputs``: inferred by tracing the module with ``torch.fx``
       (:func:`merge.symmetry.infer.trace_spec`);
    4. with ``from_names``: :func:`merge.symmetry.ready.auto_spec` (a ResNet or an MLP/CNN chain).

    Otherwise a :class:`RecipeError` says what ``what`` needs.
    """
    if isinstance(spec, str | Path):
        spec = PermutationSpec.load(spec)
    if isinstance(spec, PermutationSpec):
        if check:
            spec.check_shapes({k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}, where=where)
        return spec
    if architecture:
        kw = {"n_heads": n_heads, "rope": rope} if architecture.lower() == "transformer" else {}
        return build_spec(architecture, shapes, **kw)
    if model is not None and example_inputs is not None:
        from merge.symmetry.infer import trace_spec

        return trace_spec(model, example_inputs).spec
    if from_names:
        return auto_spec(shapes, name=where)
    raise RecipeError(f"{what} needs spec, architecture, or model and example_inputs")
