"""What a recipe search maximises or minimises: a registry of objectives over merged state dicts.

An objective is built once per process from its options (``build(options, ctx)``, which loads data,
tokenizers, a metanet ...) and then scores each trial's merged weights (``score(state_dict) -> float``).
Built in, no code needed:

``accuracy``
    classification accuracy on a dataset file (``.npz`` or ``.safetensors`` holding ``x`` and ``y``), of
    the merged weights read as an MLP (``model: mlp``: the ``*.weight``/``*.bias`` pairs in natural name
    order, ReLU between layers) with an optional *named head* from another file (``head: heads.safetensors``
    or ``heads.safetensors:task.`` for the tensors under a prefix; a task model's own head, as in the task
    arithmetic protocol, ReLU after every merged layer), or as a Hugging Face model built from the base
    model's ``config.json`` (``model: transformers``; ``input_ids``, optional ``attention_mask``, ``y``).
    Several ``tasks`` (each ``{data, head}``) give their mean.
``perplexity``
    perplexity of a causal LM (transformers, built from the base model's config and tokenizer) on a text
    file, over windows of ``max_length`` tokens (at most ``max_tokens``); minimised.
``code``
    ``function: package.module:function`` or ``file.py:function``, called with the state dict, returning a
    number; it runs the user's code, so it needs ``allow_code`` (``--allow-code``); ``direction`` says
    which way is better (default maximize).

``metanets`` registers ``metanet`` (the accuracy a trained metanet predicts: data-free), since ``merge``
never imports ``metanets`` (DESIGN.md); ``weightsmith evolve`` imports it.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from merge.errors import CodeRefusedError, RecipeError

Score = Callable[[Mapping[str, torch.Tensor]], float]


@dataclass
class ObjectiveContext:
    """What building an objective may use besides its options."""

    allow_code: bool = False
    base_path: Path | None = None  # the base (or first) model's folder: config.json, tokenizer
    device: str = "cpu"
    #: files an objective opens go through this hook ``(value, field) -> path`` (the service's roots)
    path_resolver: Callable[[str, str], str] | None = None
    #: modules imported first, which register more objectives (``metanets.objective``); they travel to workers
    plugins: tuple[str, ...] = field(default_factory=tuple)

    def path(self, value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{what}: expected a file path, got {value!r}")
        p = Path(self.path_resolver(value, what) if self.path_resolver else value).expanduser()
        if not p.exists():
            raise RecipeError(f"{what}: no such file {p}")
        return p


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    direction: Literal["maximize", "minimize"] | None  # None: the options say (``direction``)
    build: Callable[[dict[str, Any], ObjectiveContext], Score]
    summary: str
    code: bool = False


_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, *, direction: Literal["maximize", "minimize"] | None, code: bool = False
                       ) -> Callable[[Callable[[dict[str, Any], ObjectiveContext], Score]], ObjectiveSpec]:
    """Register ``build(options, ctx) -> score`` as objective ``name`` (its docstring's first line is the summary)."""

    def deco(build: Callable[[dict[str, Any], ObjectiveContext], Score]) -> ObjectiveSpec:
        spec = ObjectiveSpec(name, direction, build, (build.__doc__ or "").strip().split("\n")[0], code)
        _OBJECTIVES[name] = spec
        return spec

    return deco


def all_objectives() -> list[ObjectiveSpec]:
    return [_OBJECTIVES[k] for k in sorted(_OBJECTIVES)]


@dataclass(frozen=True)
class Objective:
    """One objective of a search: its spec, options, and which way is better."""

    spec: ObjectiveSpec
    options: dict[str, Any]
    direction: Literal["maximize", "minimize"]

    @property
    def name(self) -> str:
        return self.spec.name

    def build(self, ctx: ObjectiveContext) -> Score:
        opts = {k: v for k, v in self.options.items() if k != "direction"}
        return self.spec.build(opts, ctx)


def parse_objectives(entries: list[dict[str, Any]], ctx: ObjectiveContext) -> list[Objective]:
    """``[{accuracy: {...}}, {perplexity: {...}}]`` -> objectives; unknown names, code without
    ``allow_code`` and a bad ``direction`` are one line each."""
    for mod in ctx.plugins:
        importlib.import_module(mod)
    out = []
    for i, e in enumerate(entries):
        where = f"objectives[{i}]"
        if not isinstance(e, dict) or len(e) != 1:
            raise RecipeError(f"{where}: expected one objective name with its options, e.g. {{accuracy: {{...}}}}")
        (name, opts), = e.items()
        opts = dict(opts or {})
        spec = _OBJECTIVES.get(name)
        if spec is None:
            known = ", ".join(sorted(_OBJECTIVES))
            raise RecipeError(f"{where}: unknown objective '{name}' (known: {known}; 'metanet' comes with "
                              "metanets.objective)")
        if spec.code and not ctx.allow_code:
            raise CodeRefusedError(f"{where}: objective '{name}' imports and runs Python code "
                                   f"({opts.get('function')!r}); allow it with --allow-code")
        direction = opts.get("direction", spec.direction or "maximize")
        if spec.direction is not None and "direction" in opts:
            raise RecipeError(f"{where}: objective '{name}' is always {spec.direction}d; drop 'direction'")
        if direction not in ("maximize", "minimize"):
            raise RecipeError(f"{where}: direction must be maximize or minimize, got {direction!r}")
        out.append(Objective(spec, opts, direction))
    return out


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _load_arrays(path: Path, keys: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(z[k]) for k in keys if k in z.files}
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        arrays = {k: v for k, v in load_file(str(path)).items() if k in keys}
    else:
        raise RecipeError(f"{what}: {path}: expected a .npz or .safetensors file")
    return arrays


def _require(arrays: dict[str, torch.Tensor], key: str, path: Path, what: str) -> torch.Tensor:
    if key not in arrays:
        raise RecipeError(f"{what}: {path} has no array '{key}'")
    return arrays[key]


def _head(spec: str | None, ctx: ObjectiveContext, what: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """A named head: ``file.safetensors`` or ``file.safetensors:prefix`` -> its Linear layers in order."""
    if not spec:
        return []
    file, _, prefix = spec.partition(":") if ".safetensors:" in spec else (spec, "", "")
    from safetensors.torch import load_file

    tensors = {k[len(prefix):]: v.float() for k, v in load_file(str(ctx.path(file, what))).items()
               if k.startswith(prefix)}
    if not tensors:
        raise RecipeError(f"{what}: {file} has no tensor under '{prefix}'")
    if list(tensors) == [""]:  # "heads.safetensors:task" naming one matrix
        return [(tensors[""], None)]
    return _linear_layers(tensors, f"{what} ({file})")


def _linear_layers(state: Mapping[str, torch.Tensor], what: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``*.weight`` (2-D) with their ``*.bias`` in natural name order; anything else is an error."""
    layers = []
    names = sorted(state, key=_natural)
    used = set()
    for n in names:
        if n.endswith("bias"):
            continue
        w = state[n]
        if w.dim() != 2:
            raise RecipeError(f"{what}: model 'mlp' reads Linear layers only; tensor '{n}' has shape {tuple(w.shape)}")
        b_name = n[: -len("weight")] + "bias" if n.endswith("weight") else None
        b = state.get(b_name) if b_name else None
        used |= {n, b_name}
        layers.append((w, b))
    stray = [n for n in names if n not in used]
    if stray:
        raise RecipeError(f"{what}: model 'mlp': tensor '{stray[0]}' is not the bias of a Linear layer")
    return layers


def _mlp_logits(body: list[tuple[torch.Tensor, torch.Tensor | None]],
                head: list[tuple[torch.Tensor, torch.Tensor | None]], x: torch.Tensor) -> torch.Tensor:
    layers = body + head
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        x = torch.nn.functional.linear(x, w.float(), None if b is None else b.float())
        if i != last:
            x = torch.relu(x)
    return x


# --------------------------------------------------------------------------------------------------
# built-in objectives
# --------------------------------------------------------------------------------------------------
@register_objective("accuracy", direction="maximize")
def _accuracy(opts: dict[str, Any], ctx: ObjectiveContext) -> Score:
    """Classification accuracy on a dataset file (mean over tasks), the model an MLP or a transformers model."""
    what = "objective 'accuracy'"
    unknown = set(opts) - {"model", "tasks", "data", "head", "x", "y", "batch_size"}
    if unknown:
        raise RecipeError(f"{what}: unknown option '{sorted(unknown)[0]}' "
                          "(known: model, tasks, data, head, x, y, batch_size)")
    model = opts.get("model", "mlp")
    if model not in ("mlp", "transformers"):
        raise RecipeError(f"{what}: model must be mlp or transformers, got {model!r}")
    tasks = opts.get("tasks") or [{"data": opts.get("data"), "head": opts.get("head")}]
    x_key, y_key = opts.get("x", "input_ids" if model == "transformers" else "x"), opts.get("y", "y")
    batch = int(opts.get("batch_size", 512))
    loaded = []
    for i, t in enumerate(tasks):
        w = f"{what}, tasks[{i}]" if "tasks" in opts else what
        if not isinstance(t, dict) or set(t) - {"data", "head"}:
            raise RecipeError(f"{w}: expected {{data: FILE, head: FILE[:PREFIX]}}")
        path = ctx.path(t.get("data"), f"{w}: data")
        arrays = _load_arrays(path, (x_key, y_key, "attention_mask"), f"{w}: data")
        x, y = _require(arrays, x_key, path, w), _require(arrays, y_key, path, w).long()
        if len(x) != len(y):
            raise RecipeError(f"{w}: {path}: '{x_key}' has {len(x)} rows, '{y_key}' {len(y)}")
        loaded.append((x, y, arrays.get("attention_mask"), _head(t.get("head"), ctx, f"{w}: head")))
    if model == "transformers":
        if any(h for *_, h in loaded):
            raise RecipeError(f"{what}: a named head is for model 'mlp'; a transformers model has its own")
        net = _transformers_model(ctx, what, "AutoModelForSequenceClassification")

    @torch.no_grad()
    def score(state: Mapping[str, torch.Tensor]) -> float:
        accs = []
        if model == "mlp":
            body = _linear_layers(state, what)
        else:
            _load_into(net, state, what)
        for x, y, mask, head in loaded:
            correct = 0
            for s in range(0, len(x), batch):
                xb = x[s:s + batch]
                if model == "mlp":
                    logits = _mlp_logits(body, head, xb.float())
                else:
                    kw = {"attention_mask": mask[s:s + batch]} if mask is not None else {}
                    logits = net(input_ids=xb.long(), **kw).logits
                correct += int((logits.argmax(-1) == y[s:s + batch]).sum())
            accs.append(correct / max(1, len(x)))
        return sum(accs) / len(accs)

    return score


def _transformers_model(ctx: ObjectiveContext, what: str, auto: str) -> Any:
    if ctx.base_path is None or not (ctx.base_path / "config.json").is_file():
        raise RecipeError(f"{what}: a transformers model is built from the base model's config.json; "
                          f"{ctx.base_path or 'the base model'} has none")
    try:
        import transformers
    except ImportError:
        raise RecipeError(f"{what}: needs transformers (pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(str(ctx.base_path))
    net = getattr(transformers, auto).from_config(config)
    return net.eval().to(ctx.device)


def _load_into(net: Any, state: Mapping[str, torch.Tensor], what: str) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied to the embeddings
    if set(missing) - tied:
        raise RecipeError(f"{what}: the merged model lacks '{sorted(set(missing) - tied)[0]}' of the "
                          f"{type(net).__name__} built from the base config")
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


@register_objective("perplexity", direction="minimize")
def _perplexity(opts: dict[str, Any], ctx: ObjectiveContext) -> Score:
    """Perplexity of a causal LM (built from the base model's config and tokenizer) on a text file."""
    what = "objective 'perplexity'"
    unknown = set(opts) - {"text", "max_length", "max_tokens"}
    if unknown:
        raise RecipeError(f"{what}: unknown option '{sorted(unknown)[0]}' (known: text, max_length, max_tokens)")
    text = ctx.path(opts.get("text"), f"{what}: text").read_text()
    max_length, max_tokens = int(opts.get("max_length", 128)), int(opts.get("max_tokens", 4096))
    net = _transformers_model(ctx, what, "AutoModelForCausalLM")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(ctx.base_path))
    ids = tok(text, return_tensors="pt")["input_ids"][0][:max_tokens]
    if len(ids) < 2:
        raise RecipeError(f"{what}: the text has fewer than 2 tokens")
    windows = [ids[s:s + max_length] for s in range(0, len(ids) - 1, max_length)]
    windows = [w for w in windows if len(w) > 1]

    @torch.no_grad()
    def score(state: Mapping[str, torch.Tensor]) -> float:
        _load_into(net, state, what)
        nll, n = 0.0, 0
        for w in windows:
            out = net(input_ids=w[None].to(ctx.device), labels=w[None].to(ctx.device))
            nll += float(out.loss) * (len(w) - 1)
            n += len(w) - 1
        return math.exp(nll / n)

    return score


@register_objective("code", direction=None, code=True)
def _code(opts: dict[str, Any], ctx: ObjectiveContext) -> Score:
    """A user's function(state_dict) -> number (package.module:function or file.py:function; --allow-code)."""
    what = "objective 'code'"
    unknown = set(opts) - {"function"}
    if unknown:
        raise RecipeError(f"{what}: unknown option '{sorted(unknown)[0]}' (known: function, direction)")
    from merge.entry_point import import_callable

    fn = import_callable(opts.get("function"), where=f"{what}: function")

    def score(state: Mapping[str, torch.Tensor]) -> float:
        value = fn(dict(state))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RecipeError(f"{what}: {opts['function']} returned {value!r}, expected a finite number")
        return float(value)

    return score


__all__ = [
    "Objective",
    "ObjectiveContext",
    "ObjectiveSpec",
    "Score",
    "all_objectives",
    "parse_objectives",
    "register_objective",
]
