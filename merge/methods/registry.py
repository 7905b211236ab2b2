"""The method registry: one decorated function per merge method, its signature is its schema.

A method is registered with :func:`merge_method`. Its keyword-only parameters are the method's
parameters: those annotated ``PerModel[T]`` take one value per input model (the recipe may give a
scalar, which applies to every model), the others are global. A trailing underscore is dropped
from the public name (``lambda_`` is ``lambda`` in a recipe). These names are injected by the
engine and are not parameters:

``stats``
    the result of the method's ``stats`` function (per-tensor statistics such as top-k
    thresholds or dot products), computed by streaming over chunks of the whole tensor before the
    chunks are merged. ``None`` when the function is called on whole tensors directly, in which
    case it computes its statistics itself.
``generator``
    a ``torch.Generator`` seeded from the recipe seed, the tensor name and the chunk index, for
    randomised methods (DELLA; DARE when called without the engine).
``stream``
    a :class:`merge.methods._random.ElementStream`: random words addressed by the flat element
    index (seeded from the recipe seed and the tensor name, positioned at the chunk's first
    element), so a randomised method's output does not depend on the chunk size (DARE). When a
    method takes ``stream`` the engine passes it instead of ``generator``.
``name``
    the output tensor name.
``progress``, ``device`` (whole-model methods)
    a callable that reports one line of progress of a long first pass (an optimisation step and
    its loss; it raises ``MergeCancelled`` once the merge is cancelled), and the engine's
    compute device (``MergeOptions.device``).
``chunk``
    the index of the current row chunk (0 for a whole tensor). Chunks split dim 0 on a grid that
    depends only on the tensor's shape, so a ``stats`` function may return per-chunk data (for
    example how many tied elements earlier chunks keep) and the function picks its entry.

A ``stats`` function may also take ``generators``: a function of the chunk index returning a fresh
``torch.Generator`` seeded exactly like the one the method gets for that chunk, so a randomised
method can draw its masks in the statistics pass (and keep what it needs, e.g. packed bits).

``check(params, where)`` (optional) validates one tensor's resolved parameters together (e.g.
DELLA's ``density ± epsilon`` in (0, 1)); the engine calls it while planning, before any tensor
is read, and raises its ``RecipeError``.

Two kinds of method (DESIGN.md, "Method contract"):

* ``per_tensor``: ``fn(tensors, base, **params) -> Tensor``; ``tensors`` are the non-base inputs in
  recipe order (float32 by default), ``base`` the base model's tensor or ``None``.
* ``whole_model``: ``fn(models, base, **params) -> ModelPlan``; ``models``/``base`` are lazy
  ``Mapping[str, Tensor]`` views (read only what you need), and the returned plan's
  ``apply(name, tensors, base)`` is then streamed tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

import annotated_types
import pydantic
import torch

from merge.errors import RecipeError

INJECTED = frozenset({"stats", "generator", "stream", "name", "chunk", "progress", "device"})


class _PerModelMarker:
    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return "PER_MODEL"


PER_MODEL = _PerModelMarker()


class _CodeMarker:
    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return "CODE"


CODE = _CodeMarker()
#: A parameter that names Python code to import and run (``package.module:function``). The engine
#: refuses a recipe that sets one unless ``MergeOptions.allow_code`` (the CLI's ``--allow-code``);
#: the service never sets it.
Code = Annotated[str, CODE]


class _FileMarker:
    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return "FILE"


FILE = _FileMarker()
#: A parameter whose value is a path the method opens (a spec JSON, a saved plan folder). The engine
#: passes such values through ``MergeOptions.path_resolver`` when one is set (the service sets it to
#: its roots, so a recipe cannot make the server open a file outside them).
FilePath = Annotated[str, FILE]


#: A number in [0, 1] (a density, a fraction of entries kept, an interpolation point): the bounds are
#: part of the parameter's schema. Recipes are checked against them, ``weightsmith methods`` lists them,
#: and the recipe search (``merge.evolve``) takes them as the range it may search and must stay inside.
#: Any ``annotated_types`` bound (``Ge``, ``Le``, ``Gt``, ``Lt``, ``Interval``) on a parameter works alike.
Fraction = Annotated[float, annotated_types.Interval(ge=0.0, le=1.0)]


class _VariantMarker:
    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return "VARIANT"


VARIANT = _VariantMarker()


class Variant:
    """``Variant[bool]``: a keyword that tells variants of one method apart (TIES's sign election on or
    off, the method's name for messages). It is not a recipe parameter: :func:`merge_variant` fixes it."""

    def __class_getitem__(cls, item: Any) -> Any:
        return Annotated[item, VARIANT]


class PerModel:
    """``PerModel[float]``: a parameter with one value per input model."""

    def __class_getitem__(cls, item: Any) -> Any:
        return Annotated[item, PER_MODEL]


#: An iterator factory over chunks ``(tensors, base)`` of the current output tensor; calling it
#: again starts a new pass. A whole tensor is one chunk.
ChunkSource = Callable[[], Iterator[tuple[list[torch.Tensor], torch.Tensor | None]]]


class ModelPlan(Protocol):
    """What a whole-model method's first pass returns."""

    def apply(self, name: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class ParamInfo:
    name: str  # public name (recipe key)
    arg: str  # python argument name
    type: Any  # the value type (inner type for PerModel)
    default: Any  # inspect.Parameter.empty when required
    per_model: bool
    code: bool = False  # names Python code to run (see Code)
    path: bool = False  # names a file or folder the method opens (see FilePath)
    #: (low, high) from the annotation's ``annotated_types`` bounds (``Fraction``); None where open
    bounds: tuple[float | None, float | None] = (None, None)

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def numeric(self) -> bool:
        """A number (int or float, not bool): what a recipe search can search over a range."""
        return self.type in (int, float)

    def check_bounds(self, value: Any, where: str, method: str) -> None:
        """Raise RecipeError when a number lies outside the declared bounds."""
        lo, hi = self.bounds
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise RecipeError(
                f"{where}parameter '{self.name}' of method '{method}' must be in "
                f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]: got {value!r}"
            )

    def type_name(self) -> str:
        t = self.type
        return getattr(t, "__name__", None) or str(t).replace("typing.", "")


@dataclass
class MethodSpec:
    name: str
    fn: Callable[..., Any]
    paper: str
    url: str
    kind: Literal["per_tensor", "whole_model"]
    base: Literal["required", "optional", "ignored"]
    min_models: int
    max_models: int | None
    elementwise: bool
    stats: Callable[..., Any] | None
    randomized: bool
    propagates_nonfinite: bool = False
    check: Callable[[dict[str, Any], str], None] | None = None
    params: dict[str, ParamInfo] = field(default_factory=dict)
    summary: str = ""
    # -- schema -----------------------------------------------------------------------------
    @property
    def per_model_params(self) -> dict[str, ParamInfo]:
        return {k: p for k, p in self.params.items() if p.per_model}

    @property
    def global_params(self) -> dict[str, ParamInfo]:
        return {k: p for k, p in self.params.items() if not p.per_model}

    def pydantic_model(self, per_model: bool) -> type[pydantic.BaseModel]:
        """A pydantic model validating one model's parameters (or the global ones)."""
        fields: dict[str, Any] = {}
        for p in self.params.values():
            if p.per_model != per_model:
                continue
            default = None if p.required else p.default
            fields[p.arg] = (p.type | None, pydantic.Field(default=default, alias=p.name))
        return pydantic.create_model(
            f"{self.name}_{'model' if per_model else 'global'}_params",
            __config__=pydantic.ConfigDict(extra="forbid", populate_by_name=True, strict=False),
            **fields,
        )

    def json_schema(self) -> dict[str, Any]:
        return {
            "global": self.pydantic_model(False).model_json_schema(by_alias=True),
            "per_model": self.pydantic_model(True).model_json_schema(by_alias=True),
        }

    def describe(self) -> dict[str, Any]:
        """A plain description (CLI ``weightsmith methods``, gRPC ``ListMethods``, docs)."""
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "url": self.url,
            "kind": self.kind,
            "base": self.base,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "randomized": self.randomized,
            "params": [
                {
                    "name": p.name,
                    "type": p.type_name(),
                    "per_model": p.per_model,
                    "required": p.required,
                    "default": None if p.required else p.default,
                    **({"code": True} if p.code else {}),
                    **({"path": True} if p.path else {}),
                    **({"bounds": list(p.bounds)} if p.bounds != (None, None) else {}),
                }
                for p in self.params.values()
            ],
        }

    # -- validation -------------------------------------------------------------------------
    def validate_value(self, param: str, value: Any, where: str = "") -> Any:
        """Validate and coerce one scalar parameter value; raise RecipeError naming it."""
        info = self.params.get(param)
        if info is None:
            known = ", ".join(sorted(self.params)) or "none"
            raise RecipeError(f"{where}method '{self.name}' has no parameter '{param}' (known: {known})")
        try:
            value = pydantic.TypeAdapter(info.type).validate_python(value)
        except pydantic.ValidationError as e:
            msg = e.errors()[0]["msg"]
            raise RecipeError(
                f"{where}parameter '{param}' of method '{self.name}' must be {info.type_name()}: "
                f"got {value!r} ({msg})"
            ) from None
        info.check_bounds(value, where, self.name)
        return value

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """The input contract, checked before any tensor is read."""
        if self.base == "required" and not has_base:
            raise RecipeError(f"method '{self.name}' requires a base_model")
        if n_models < self.min_models:
            raise RecipeError(
                f"method '{self.name}' needs at least {self.min_models} model(s) besides the base, "
                f"got {n_models}"
            )
        if self.max_models is not None and n_models > self.max_models:
            raise RecipeError(
                f"method '{self.name}' takes at most {self.max_models} model(s) besides the base, "
                f"got {n_models}"
            )

    def check_params(self, params: dict[str, Any], where: str = "") -> None:
        """Cross-parameter checks of one tensor's resolved parameters (python argument names)."""
        if self.check is not None:
            self.check(params, where)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, MethodSpec] = {}


def _param_infos(fn: Callable[..., Any]) -> dict[str, ParamInfo]:
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    out: dict[str, ParamInfo] = {}
    for arg, p in sig.parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or arg in INJECTED:
            continue
        hint = hints.get(arg, Any)
        per_model = code = path = False
        bounds: tuple[float | None, float | None] = (None, None)
        if typing.get_origin(hint) is Annotated:
            base_t, *meta = typing.get_args(hint)
            bounds = _bounds(meta)
            if bounds != (None, None):
                hint = base_t
            if any(m is VARIANT for m in meta):
                continue
            if any(m is PER_MODEL for m in meta):
                per_model = True
                hint = base_t
            if any(m is CODE for m in meta):
                code = True
                hint = base_t
            if any(m is FILE for m in meta):
                path = True
                hint = base_t
        public = arg[:-1] if arg.endswith("_") else arg
        out[public] = ParamInfo(public, arg, hint, p.default, per_model, code, path, bounds)
    return out


def _bounds(meta: list[Any]) -> tuple[float | None, float | None]:
    """(low, high) of ``annotated_types`` bounds among an annotation's metadata (strict ones as closed)."""
    lo = hi = None
    for m in meta:
        for b in list(m) if isinstance(m, annotated_types.Interval) else [m]:
            if isinstance(b, annotated_types.Ge | annotated_types.Gt):
                lo = float(b.ge if isinstance(b, annotated_types.Ge) else b.gt)
            elif isinstance(b, annotated_types.Le | annotated_types.Lt):
                hi = float(b.le if isinstance(b, annotated_types.Le) else b.lt)
    return lo, hi


def merge_method(
    name: str,
    *,
    paper: str,
    url: str,
    kind: Literal["per_tensor", "whole_model"] = "per_tensor",
    base: Literal["required", "optional", "ignored"] = "required",
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = False,
    stats: Callable[..., Any] | None = None,
    propagates_nonfinite: bool = False,
    check: Callable[[dict[str, Any], str], None] | None = None,
) -> Callable[[Callable[..., Any]], MethodSpec]:
    """Register a merge method.

    ``elementwise=True`` declares that the function applied to row chunks equals the row chunks
    of the function applied to whole tensors (the engine may then stream it in chunks with no
    statistics pass). A method whose result depends on whole-tensor statistics (top-k
    thresholds, norms) supplies ``stats`` instead; its function takes ``stats=`` and is then also
    applied chunk by chunk.

    ``propagates_nonfinite=True`` declares that a NaN or Inf in any input element makes the
    output element non-finite too (sums and differences with any weights: 0·Inf is NaN). The
    engine then checks only the output for NaN/Inf and looks at the inputs when it finds one,
    instead of checking every input (one reduction per chunk instead of one per input).
    """

    def deco(fn: Callable[..., Any]) -> MethodSpec:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        params = _param_infos(fn)
        sig = inspect.signature(fn)
        doc = inspect.getdoc(fn) or ""
        spec = MethodSpec(
            name=name,
            fn=fn,
            paper=paper,
            url=url,
            kind=kind,
            base=base,
            min_models=min_models,
            max_models=max_models,
            elementwise=elementwise,
            stats=stats,
            randomized="generator" in sig.parameters or "stream" in sig.parameters,
            propagates_nonfinite=propagates_nonfinite,
            check=check,
            params=params,
            summary=doc.split("\n\n", 1)[0].replace("\n", " "),
        )
        _REGISTRY[name] = spec
        return spec

    return deco


def merge_variant(
    name: str,
    of: MethodSpec,
    *,
    fixed: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    summary: str,
    check: Callable[[dict[str, Any], str], None] | None = None,
) -> MethodSpec:
    """Register ``name`` as a configuration of method ``of``: the same function and parameters, with
    ``fixed`` (its :class:`Variant` keywords) set and ``defaults`` changed (e.g. ``normalize``), instead
    of a wrapper that lists the whole signature again."""
    if name in _REGISTRY:
        raise ValueError(f"merge method {name!r} registered twice")
    variant_args = set(inspect.signature(of.fn).parameters) - {p.arg for p in of.params.values()}
    unknown = set(fixed) - variant_args
    if unknown:
        raise ValueError(f"variant {name!r}: {sorted(unknown)} are not Variant keywords of {of.name!r}")
    defaults = dict(defaults or {})
    params = dict(of.params)
    for public, value in defaults.items():
        params[public] = dataclasses.replace(params[public], default=value)
    call_defaults = {params[k].arg: v for k, v in defaults.items()}
    spec = dataclasses.replace(
        of,
        name=name,
        fn=functools.partial(of.fn, **fixed, **call_defaults),
        params=params,
        summary=summary,
        check=check if check is not None else of.check,
    )
    _REGISTRY[name] = spec
    return spec


def registered(name: str) -> MethodSpec:
    """The method registered as ``name`` (the catalogue, with every built-in loaded: ``merge.methods``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise RecipeError(f"unknown merge method '{name}' (known: {known})") from None


def all_registered() -> list[MethodSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def broadcast_per_model(value: Any, n: int) -> list[Any]:
    """A per-model parameter given once applies to every model."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) != n:
            raise RecipeError(f"expected {n} per-model values, got {len(value)}")
        return list(value)
    return [value] * n


def whole(tensors: list[torch.Tensor], base: torch.Tensor | None) -> ChunkSource:
    """A ChunkSource over whole tensors (one chunk), for calling a method outside the engine."""
    return lambda: iter([(tensors, base)])


__all__ = [
    "ChunkSource",
    "Code",
    "FilePath",
    "Fraction",
    "Mapping",
    "MethodSpec",
    "ModelPlan",
    "PerModel",
    "all_registered",
    "broadcast_per_model",
    "registered",
    "merge_method",
    "merge_variant",
    "Variant",
    "whole",
]
