"""The merge recipe: YAML in, validated by pydantic; mergekit's config format is a subset.

Accepted (as mergekit 0.1.5 writes it): ``merge_method``, ``base_model``, ``models: [{model,
parameters}]`` or ``slices: [{sources: [{model, layer_range, parameters}], parameters}]``, global
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` / ``tokenizer: {source, tokens,
pad_to_multiple_of}`` (vocabulary merging: ``merge.vocab``),
``chat_template``, ``name``; plus weightsmith's own ``seed``.

A parameter value may be a scalar, a *gradient* (a list of numbers interpolated over layer depth,
``[0, 0.5, 1]``), or a list of ``{filter: <substring of the tensor name>, value: ...}`` conditions
(the first matching one wins; no filter or ``"*"`` matches everything). :func:`evaluate_setting`
resolves them with mergekit's semantics (t = layer / (num_layers - 1) within an output slice;
0 for tensors outside the layer stack).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge.errors import RecipeError

M = TypeVar("M", bound=BaseModel)
Scalar = Union[float, int, bool, str]  # noqa: UP007 - pydantic smart-union order matters


class Condition(BaseModel):
    """``{filter: self_attn, value: 0.3}``: applies where ``filter`` is a substring of the tensor name."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: ParameterSetting


ParameterSetting = Union[Scalar, list[Scalar], list[Condition], Condition]  # noqa: UP007
Condition.model_rebuild()

Parameters = dict[str, ParameterSetting]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputModel(_Strict):
    model: str
    parameters: Parameters | None = None

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return _check_ref(v)


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return _check_ref(v)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) != 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        return self


class TokenizerConfig(_Strict):
    source: str | None = None
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}


class Recipe(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None
    seed: int = 0

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.lower() not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {v!r} (expected one of float32, float16, bfloat16, float64)")
        return DTYPE_ALIASES[v.lower()]

    @field_validator("base_model")
    @classmethod
    def _base_ref(cls, v: str | None) -> str | None:
        return _check_ref(v) if v is not None else v

    @model_validator(mode="after")
    def _one_layout(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("a recipe needs exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give 'tokenizer' or 'tokenizer_source', not both")
        return self

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def tokenizer_from(self) -> str | None:
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    def model_refs(self) -> list[str]:
        """Every model reference, base first, each once, in recipe order."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        if self.models:
            refs += [m.model for m in self.models]
        for s in self.slices or []:
            if s.base_model:
                refs.append(s.base_model)
            refs += [src.model for src in s.sources]
        src = self.tokenizer_from
        if src and src not in ("base", "union"):
            refs.append(src)
        return list(dict.fromkeys(refs))

    def to_dict(self) -> dict[str, Any]:
        """The recipe, normalized, as plain data (what the service stores; ``load_recipe`` takes it back)."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_ref(v: str) -> str:
    if not v or not v.strip():
        raise ValueError("empty model reference")
    if "+" in v and not Path(v).exists() and any(not part.strip() for part in v.split("+")):
        raise ValueError(f"model reference {v!r}: expected 'base+adapter' (LoRA folded in), each side non-empty")
    return v


def load_config(src: str | Path | dict[str, Any], model: type[M], what: str) -> M:
    """A YAML config (a file path, YAML text or a dict) validated by the pydantic ``model``; one
    :class:`RecipeError` line per problem, naming the file (or ``what``) and the bad key. Recipes, MoE
    configs and search configs are read by this one function."""
    where = what
    if isinstance(src, dict):
        data: Any = src
    else:
        text = str(src)
        if isinstance(src, Path) or ("\n" not in text and text.endswith((".yml", ".yaml"))):
            path = Path(src)
            where = str(path)
            try:
                text = path.read_text()
            except FileNotFoundError:
                raise RecipeError(f"{path}: {what} file not found") from None
            except OSError as e:
                raise RecipeError(f"{path}: cannot read {what}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a {what} must be a YAML mapping")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise RecipeError(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}") from None


def load_recipe(src: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """Load a recipe from a YAML file path, YAML text, a dict, or pass a Recipe through."""
    return src if isinstance(src, Recipe) else load_config(src, Recipe, "recipe")


def filters(recipe: Recipe) -> list[tuple[str, str]]:
    """Every ``filter`` of the recipe's parameter conditions, as ``(where, filter)`` (``where``: e.g.
    ``parameters.weight``, ``models[1].parameters.density``); ``*`` and absent filters left out."""
    out: list[tuple[str, str]] = []

    def walk(setting: Any, where: str) -> None:
        if isinstance(setting, Condition):
            if setting.filter not in (None, "*"):
                out.append((where, setting.filter))
            walk(setting.value, where)
        elif isinstance(setting, list):
            for e in setting:
                walk(e, where)

    def scope(params: Parameters | None, prefix: str) -> None:
        for name, setting in (params or {}).items():
            walk(setting, f"{prefix}parameters.{name}")

    scope(recipe.parameters, "")
    for i, m in enumerate(recipe.models or []):
        scope(m.parameters, f"models[{i}].")
    for i, sl in enumerate(recipe.slices or []):
        scope(sl.parameters, f"slices[{i}].")
        for j, src in enumerate(sl.sources):
            scope(src.parameters, f"slices[{i}].sources[{j}].")
    return out


def evaluate_setting(setting: ParameterSetting | None, tensor_name: str, t: float) -> Any:
    """Resolve filters and gradients for one tensor (mergekit's ``evaluate_setting`` semantics).

    A list of numbers is a gradient: linear interpolation at position ``t * (len - 1)``; a list of
    non-numbers picks ``values[int(t * (len - 1))]``; conditions pick the first whose filter is a
    substring of ``tensor_name``. Returns None when no condition matches.
    """
    if setting is None:
        return None
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, float | int | bool | str):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, float | int | bool | str) for e in setting):
            if not all(isinstance(e, int | float) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, Condition):
                raise RecipeError(f"cannot mix conditions and plain values in one parameter list: {setting!r}")
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    raise RecipeError(f"unexpected parameter value {setting!r}")
