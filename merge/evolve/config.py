"""The search config: a mergekit recipe whose parameters may be ranges, an objective, a budget, a seed.

Evolutionary model merging (Akiba et al., "Evolutionary Optimization of Model Merging Recipes",
Sakana AI 2024, §3.1: the parameter-space search optimises TIES/DARE densities and weights per layer
with CMA-ES) and mergekit-evolve search a recipe's numbers; this module says which numbers. A config::

    recipe:                         # any weightsmith / mergekit recipe ...
      merge_method: {choice: [ties, dare_ties]}     # ... whose method may be a choice
      base_model: base
      models:
        - model: ft_a
          parameters: {weight: {min: 0, max: 1}, density: {min: 0.1, max: 1}}   # ranges: one gene each
        - model: ft_b
          parameters: {weight: {min: 0, max: 1}, density: {}}                    # {}: the registry's bounds
      parameters: {lambda: {min: 0.5, max: 1.5, log: true}}
    layer_groups: 2                 # granularity: one value per group of 2 layers (and one for the rest)
    objectives:
      - accuracy: {model: mlp, tasks: [{data: val.npz, head: heads.safetensors}]}
    budget: {trials: 64, seconds: 3600}
    sampler: cmaes                  # cmaes | tpe | nsga2 | random (default: cmaes, nsga2 for several objectives)
    seed: 0

Where a range is written decides its granularity: under a model's ``parameters`` one value per model,
under the top-level ``parameters`` one value for all (also for per-model parameters). ``layer_groups: N``
splits every gene into one value per N consecutive layers of the layer stack (and one for tensors outside
it), written into the recipe as ``filter`` conditions, so the best recipe stays a plain mergekit recipe.
Parameter types and bounds come from the method registry (``merge.methods.registry``): no per-method code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from merge.errors import RecipeError
from merge.methods import get_method
from merge.methods.registry import MethodSpec
from merge.recipe import load_config

SAMPLERS = ("cmaes", "tpe", "nsga2", "random")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    """When the search stops: ``trials`` finished trials in the study (a resumed or extended search
    counts the earlier ones), ``seconds`` of this run's wall time; whichever comes first."""

    trials: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.trials is None and self.seconds is None:
            raise ValueError("the budget is empty: give trials, seconds or both")
        return self


class SearchConfig(_Strict):
    recipe: dict[str, Any]
    objectives: list[dict[str, Any]] = Field(min_length=1)
    budget: Budget
    layer_groups: int | None = Field(default=None, ge=1)
    sampler: Literal["cmaes", "tpe", "nsga2", "random"] | None = None
    seed: int = 0
    #: trials proposed at once and evaluated in parallel; fixed, so a search gives the same trials
    #: whatever the number of workers (the sampler sees the same history)
    batch: int = Field(default=4, ge=1)
    #: merge each trial in memory (True), into a scratch folder (False), or by the model's size (auto)
    in_memory: bool | Literal["auto"] = "auto"


@dataclass(frozen=True)
class Gene:
    """One searched number (or choice): where it sits in the recipe and its domain."""

    name: str  # e.g. "models[0].weight", "parameters.lambda@layers 0-1"
    scope: tuple[Any, ...]  # path of the parameters mapping in the recipe dict
    param: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None
    methods: tuple[str, ...] = ()  # the methods of the choice that have this parameter
    group: int | None = None  # layer group index; None: the whole tensor set (or "the rest" with groups)


@dataclass
class SearchSpace:
    """The parsed config: the genes, the method choice, and how to write a trial's recipe."""

    config: SearchConfig
    methods: tuple[str, ...]
    genes: list[Gene]
    layer_prefix: str | None = None
    n_layers: int = 0
    rest: bool = True  # tensors outside the layer stack exist (they get their own value per gene)

    @property
    def groups(self) -> list[tuple[int, int]]:
        """[start, end) layers of each group."""
        n = self.config.layer_groups
        if not n or not self.n_layers:
            return []
        return [(s, min(s + n, self.n_layers)) for s in range(0, self.n_layers, n)]

    def expanded(self) -> list[Gene]:
        """The genes with layer groups applied: each gene once per group, plus once for the rest."""
        groups = self.groups
        if not groups:
            return self.genes
        out = []
        for g in self.genes:
            for i, (s, e) in enumerate(groups):
                label = f"layer {s}" if e - s == 1 else f"layers {s}-{e - 1}"
                out.append(_replace(g, name=f"{g.name}@{label}", group=i))
            if self.rest:
                out.append(_replace(g, name=f"{g.name}@rest", group=None))
        return out

    def recipe(self, values: dict[str, Any]) -> dict[str, Any]:
        """The recipe of one trial: ``values`` maps gene names (and ``method`` when there is a choice)
        to numbers; genes of parameters the chosen method lacks are dropped."""
        r = copy.deepcopy(self.config.recipe)
        method = values.get("method", self.methods[0])
        r["merge_method"] = method
        groups = self.groups
        settings: dict[tuple[tuple[Any, ...], str], Any] = {}
        for g in self.expanded():
            if method not in g.methods:
                continue
            key = (g.scope, g.param)
            v = values[g.name]
            if not groups:
                settings[key] = v
                continue
            conds = settings.setdefault(key, [])  # expanded(): the groups in order, then the rest
            if g.group is None:
                conds.append({"value": v})
            else:
                s, e = groups[g.group]
                conds += [{"filter": f"{self.layer_prefix}.{i}.", "value": v} for i in range(s, e)]
        # clear every ranged setting first (a parameter the chosen method lacks must not stay a range)
        for g in self.genes:
            _scope(r, g.scope).pop(g.param, None)
        for (scope, param), v in settings.items():
            _scope(r, scope)[param] = v
        for g in self.genes:  # empty parameter mappings left behind
            holder = _scope(r, g.scope[:-1]) if g.scope[:-1] else r
            if not _scope(r, g.scope):
                holder.pop(g.scope[-1], None)
        r.setdefault("seed", self.config.seed)
        return r

    def bind_layers(self, tensor_names: list[str]) -> None:
        """Find the layer stack (``model.layers.N.``) the layer groups split, from the merge's tensor names."""
        if not self.config.layer_groups:
            return
        from merge.plan import layer_stack

        self.layer_prefix, self.n_layers = layer_stack(tensor_names)
        if not self.n_layers:
            raise RecipeError("layer_groups: the models have no layer stack (no '<prefix>.<N>.' tensor names)")
        self.rest = any(not n.startswith(f"{self.layer_prefix}.") for n in tensor_names)

    def fingerprint(self) -> str:
        """What a resumed search must share with the study it continues (not its budget)."""
        data = self.config.model_dump(mode="json", exclude={"budget"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _replace(g: Gene, **kw: Any) -> Gene:
    import dataclasses

    return dataclasses.replace(g, **kw)


def _scope(recipe: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    node: Any = recipe
    for k in path:
        node = node[k]
    return node


def load_search_config(src: str | Path | dict[str, Any] | SearchConfig) -> SearchConfig:
    """A search config from a YAML file, YAML text or a dict; one clear line per problem."""
    return src if isinstance(src, SearchConfig) else load_config(src, SearchConfig, "search config")


def _is_range(v: Any) -> bool:
    return isinstance(v, dict) and set(v) <= {"min", "max", "log", "step"} and not ({"filter", "value"} & set(v))


def _is_choice(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"choice"}


def parse_space(config: SearchConfig) -> SearchSpace:
    """The genes of a config, checked against the registry (unknown parameter, a global parameter under a
    model, a range outside the parameter's bounds, a range of a non-number: one line each)."""
    r = config.recipe
    mm = r.get("merge_method")
    if _is_choice(mm):
        methods = tuple(mm["choice"])
        if not methods or not all(isinstance(m, str) for m in methods):
            raise RecipeError("recipe.merge_method: choice must be a non-empty list of method names")
    elif isinstance(mm, str):
        methods = (mm,)
    else:
        raise RecipeError("recipe.merge_method: expected a method name or {choice: [names]}")
    specs = {m: get_method(m) for m in methods}  # unknown method: RecipeError naming the known ones
    scopes: list[tuple[tuple[Any, ...], bool]] = [(("parameters",), False)]
    scopes += [(("models", i, "parameters"), True) for i in range(len(r.get("models") or []))]
    for i, sl in enumerate(r.get("slices") or []):
        scopes.append((("slices", i, "parameters"), False))
        scopes += [(("slices", i, "sources", j, "parameters"), True) for j in range(len(sl.get("sources") or []))]
    genes: list[Gene] = []
    for scope, per_model_scope in scopes:
        try:
            params = _scope(r, scope)
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(params, dict):
            continue
        for pname, setting in params.items():
            if not (_is_range(setting) or _is_choice(setting)):
                continue
            genes.append(_gene(scope, pname, setting, specs, per_model_scope))
    if not genes and len(methods) == 1:
        raise RecipeError("the recipe has nothing to search: give at least one parameter a range "
                          "({min: .., max: ..}) or a choice, or merge_method a choice")
    return SearchSpace(config, methods, genes)


def _where(scope: tuple[Any, ...], pname: str) -> str:
    out = ""
    for k in scope:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return f"recipe.{out}.{pname}"


def _gene(scope: tuple[Any, ...], pname: str, setting: dict[str, Any], specs: dict[str, MethodSpec],
          per_model_scope: bool) -> Gene:
    where = _where(scope, pname)
    having = [s for s in specs.values() if pname in s.params]
    if not having:
        known = sorted({p for s in specs.values() for p in s.params})
        raise RecipeError(f"{where}: no method of {sorted(specs)} has a parameter '{pname}' (known: "
                          f"{', '.join(known) or 'none'})")
    infos = [s.params[pname] for s in having]
    if per_model_scope and not any(i.per_model for i in infos):
        raise RecipeError(f"{where}: '{pname}' is a global parameter; search it under the top-level 'parameters'")
    name = _short(scope) + pname
    if _is_choice(setting):
        choices = tuple(setting["choice"] or ())
        if not choices:
            raise RecipeError(f"{where}: choice must be a non-empty list")
        for s in having:
            for c in choices:
                s.validate_value(pname, c, f"{where}: ")
        return Gene(name, scope, pname, choices=choices, methods=tuple(s.name for s in having))
    if not all(i.numeric for i in infos):
        raise RecipeError(f"{where}: '{pname}' is {infos[0].type_name()}, not a number: give a choice, not a range")
    lo = max((i.bounds[0] for i in infos if i.bounds[0] is not None), default=None)
    hi = min((i.bounds[1] for i in infos if i.bounds[1] is not None), default=None)
    low = setting.get("min", lo)
    high = setting.get("max", hi)
    if low is None or high is None:
        raise RecipeError(f"{where}: '{pname}' has no bounds in the registry: give min and max")
    for v, side in ((low, "min"), (high, "max")):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise RecipeError(f"{where}: {side} must be a finite number, got {v!r}")
    if not low < high:
        raise RecipeError(f"{where}: min ({low}) must be below max ({high})")
    if (lo is not None and low < lo) or (hi is not None and high > hi):
        raise RecipeError(f"{where}: the range [{low}, {high}] is outside the bounds "
                          f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}] of '{pname}'"
                          f" ({', '.join(s.name for s in having)})")
    log = bool(setting.get("log", False))
    if log and low <= 0:
        raise RecipeError(f"{where}: a log range needs min > 0, got {low}")
    return Gene(name, scope, pname, low=float(low), high=float(high), log=log,
                integer=all(i.type is int for i in infos), methods=tuple(s.name for s in having))


def _short(scope: tuple[Any, ...]) -> str:
    """``("models", 0, "parameters")`` -> ``"models[0]."``; the top level -> ``""``."""
    out = ""
    for k in scope:
        if k == "parameters":
            continue
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return f"{out}." if out else ""


__all__ = ["Budget", "Gene", "SAMPLERS", "SearchConfig", "SearchSpace", "load_search_config", "parse_space"]
