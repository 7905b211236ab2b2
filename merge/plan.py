"""Plan a recipe: one entry per output tensor, from headers only (execution: :mod:`merge.execute`).

The plan comes from tensor names and shapes alone, with no architecture table: the *layer stack*
is the most common ``<prefix>.<index>.`` pattern in the reference model's tensor names
(``model.layers.N.``, ``encoder.layer.N.``, ``blocks.N.``...), which gives layer indices for
gradients (``t = layer / (num_layers - 1)`` as in mergekit) and for ``slices``. Everything is
checked before a byte of tensor data is read: method contract, parameters, presence and shapes
of every input tensor.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge.blockio import ALIGN, BLOCK_SIZE, WRITE_BLOCKS_MAX
from merge.checkpoint import Checkpoint, OutputTensor, ResolvedModel
from merge.errors import (
    CodeRefusedError,
    MissingTensorError,
    ModelNotFoundError,
    RecipeError,
    ShapeMismatchError,
)
from merge.methods import get_method
from merge.methods.registry import MethodSpec
from merge.methods.runner import CHUNK_ELEMS
from merge.recipe import Recipe, evaluate_setting, load_recipe

_LAYER_RE = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass
class MergeOptions:
    device: str = "cpu"
    compute_dtype: str | None = None  # default float32 (float64 inputs stay float64)
    shard_size: int = 5 * 10**9
    allow_pickle: bool = False
    workers: int = 2
    overwrite: bool = False
    chunk_elems: int = CHUNK_ELEMS
    check_finite: bool = True
    direct_io: bool = True  # write the output with O_DIRECT where the file system allows (merge.blockio)
    allow_code: bool = False  # run the Python entry points a recipe names (data-driven methods); never in the service
    # ``FilePath`` parameters (a spec JSON, a saved plan) go through this hook, ``(value, field) -> path``,
    # before a method opens them: the service confines them to its roots (and raises for others).
    path_resolver: Callable[[str, str], str] | None = None






@dataclass
class Source:
    model: int  # index into MergePlan.models
    name: str  # tensor name in that model


@dataclass
class TensorTask:
    """One output tensor: where its inputs come from and how they are combined."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    sources: list[Source]  # non-base inputs, recipe order
    base: Source | None
    params: dict[str, Any]  # python argument name -> value (per-model ones as lists)
    copy: bool = False  # non-float tensor, or a single-source passthrough: copy sources[0]
    vocab: Any = None  # merge.vocab.VocabRows: rows re-indexed to the output vocabulary

    @property
    def nbytes(self) -> int:
        return OutputTensor(self.name, self.shape, self.out_dtype).nbytes


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    models: list[ResolvedModel]
    checkpoints: list[Checkpoint]
    tasks: list[TensorTask]
    aux_from: int | None  # model whose config/tokenizer files are copied
    compute_dtype: torch.dtype
    num_layers_out: int | None
    options: MergeOptions
    whole_model_plan: Any = None
    vocab: Any = None  # merge.vocab.VocabularyPlan when the inputs' vocabularies are re-indexed
    chat_template: str | None = None  # the output's, when the recipe chooses one (merge.chat_template)
    #: things that are not errors but probably not what was meant (a parameter filter that matches no tensor)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_tensors(self) -> int:
        return len(self.tasks)

    @property
    def input_paths(self) -> list[str]:
        """Every file or folder the plan reads: the models and their adapters."""
        return [str(p) for m in self.models for p in (m.path, *(a.path for a in m.adapters))]

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    @property
    def bytes_in(self) -> int:
        return sum(c.total_bytes for c in self.checkpoints)

    @property
    def peak_bytes_estimate(self) -> int:
        """A rough upper bound of the merge's working memory (not counting the interpreter)."""
        n_in = max((len(t.sources) + (t.base is not None) for t in self.tasks), default=1)
        elem = torch.empty((), dtype=self.compute_dtype).element_size()
        if self.method.kind == "whole_model":
            biggest = max((t.nbytes for t in self.tasks), default=0) * 4
            return biggest * (n_in + 3) + self.bytes_in // max(1, len(self.checkpoints))
        per_chunk = min(self.options.chunk_elems, max((_numel(t.shape) for t in self.tasks), default=1)) * elem
        # + the writer's staging blocks (pooled, queued, in flight, about two being filled per worker),
        # never more than the output itself: a block's untouched pages are not resident
        staging = min((WRITE_BLOCKS_MAX + 2 * self.options.workers) * BLOCK_SIZE, -(-self.bytes_out // ALIGN) * ALIGN)
        return self.options.workers * per_chunk * (2 * n_in + 4) + staging

    def param_groups(self) -> list[dict[str, Any]]:
        """The merged tensors grouped by their resolved parameters (recipe names, per-model ones as lists, in
        the recipe's model order), in plan order: what ``--dry-run`` shows, so a gradient, a filter or a layer
        group can be checked before any tensor is read. Copied tensors are one group with ``copied: true``."""
        public = {p.arg: p.name for p in self.method.params.values()}
        groups: dict[str, dict[str, Any]] = {}
        for t in self.tasks:
            if t.copy:
                params: dict[str, Any] = {"copied": True}
            else:
                params = {public.get(k, k): v for k, v in t.params.items() if not (public.get(k, k) == "seed")}
            key = repr(sorted(params.items()))
            groups.setdefault(key, {"params": params, "tensors": []})["tensors"].append(t.name)
        return list(groups.values())

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method.name,
            "models": [m.ref for m in self.models],
            "n_tensors": self.n_tensors,
            "n_merged": sum(not t.copy for t in self.tasks),
            "n_copied": sum(t.copy for t in self.tasks),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "peak_bytes_estimate": self.peak_bytes_estimate,
            **({"vocabulary": self.vocab.summary()} if self.vocab is not None else {}),
            **({"warnings": list(self.warnings)} if self.warnings else {}),
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------
# Resolving references
# ---------------------------------------------------------------------------------------------


def default_resolver(ref: str) -> ResolvedModel:
    """A local path wins; otherwise a Hub reference (``org/name[@rev]``, ``hf://...``)."""
    p = Path(ref).expanduser()
    if p.exists():
        return ResolvedModel(ref=ref, path=p)
    try:
        from merge import hub
    except ImportError:  # pragma: no cover - hub support is part of the package
        hub = None  # type: ignore[assignment]
    if hub is not None and hub.parse_hub_ref(ref) is not None:
        return hub.HubResolver()(ref)
    msg = hub.local_miss(ref) if hub is not None else f"model '{ref}': no such local path"
    raise ModelNotFoundError(f"{msg}, and it is not a Hub reference (org/name[@revision])")


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def layer_stack(names: list[str]) -> tuple[str | None, int]:
    """The dominant ``<prefix>.<N>.`` pattern and its layer count (None, 0 if there is none)."""
    counts: Counter[str] = Counter()
    maxidx: dict[str, int] = {}
    for n in names:
        m = _LAYER_RE.match(n)
        if m:
            counts[m.group(1)] += 1
            maxidx[m.group(1)] = max(maxidx.get(m.group(1), -1), int(m.group(2)))
    if not counts:
        return None, 0
    prefix = counts.most_common(1)[0][0]
    return prefix, maxidx[prefix] + 1


def _split_layer(name: str, prefix: str | None) -> tuple[int, str] | None:
    if prefix is None:
        return None
    m = _LAYER_RE.match(name)
    if m and m.group(1) == prefix:
        return int(m.group(2)), m.group(3)
    return None


_PRE_RE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type|patch_embed|cls_token|pos_embed")


class _Planner:
    def __init__(self, recipe: Recipe, options: MergeOptions, resolver: Callable[[str], ResolvedModel]):
        self.recipe = recipe
        self.options = options
        self.method = get_method(recipe.merge_method)
        self.refs: list[str] = []
        self.models: list[ResolvedModel] = []
        self.ckpts: list[Checkpoint] = []
        self.resolver = resolver
        self.out_dtype = DTYPES[recipe.out_dtype or recipe.dtype] if (recipe.out_dtype or recipe.dtype) else None
        if options.compute_dtype:
            self.compute_dtype = DTYPES[options.compute_dtype]
        else:
            self.compute_dtype = torch.float32

    def model(self, ref: str) -> int:
        if ref in self.refs:
            return self.refs.index(ref)
        # ``base+adapter`` references (mergekit's syntax) fold LoRA adapters into the base as it is read
        from merge.lora.bind import open_model, resolve_reference

        resolved = resolve_reference(ref, self.resolver)
        ckpt = open_model(resolved, allow_pickle=self.options.allow_pickle)
        self.refs.append(ref)
        self.models.append(resolved)
        self.ckpts.append(ckpt)
        return len(self.refs) - 1

    # parameters ---------------------------------------------------------------------------------
    def _param(self, pname: str, tensor: str, t: float, layers: list[dict[str, Any] | None]) -> Any:
        for scope in layers:
            if scope and pname in scope:
                v = evaluate_setting(scope[pname], tensor, t)
                if v is not None:
                    return v
        return None

    def _check_param_keys(self, params: dict[str, Any] | None, where: str, per_model: bool) -> None:
        for k in params or {}:
            if k not in self.method.params:
                known = ", ".join(sorted(self.method.params)) or "none"
                raise RecipeError(f"{where}: method '{self.method.name}' has no parameter '{k}' (known: {known})")
            if per_model and not self.method.params[k].per_model:
                raise RecipeError(
                    f"{where}: '{k}' is a global parameter of method '{self.method.name}'; "
                    "set it under the top-level 'parameters'"
                )

    def _check_code(self, params: dict[str, Any] | None) -> None:
        """Parameters that name Python code (``Code``) run it: only with ``allow_code``."""
        for p in self.method.params.values():
            if p.code and (params or {}).get(p.name) and not self.options.allow_code:
                raise CodeRefusedError(
                    f"method '{self.method.name}': parameter '{p.name}' = {params[p.name]!r} names Python code "
                    "to import and run; allow it with --allow-code (MergeOptions.allow_code), or give a saved plan"
                )

    def _check_paths(self, params: dict[str, Any] | None) -> None:
        """``FilePath`` parameters given globally: confined by ``MergeOptions.path_resolver`` at plan time."""
        for p in self.method.params.values():
            v = (params or {}).get(p.name)
            if p.path and isinstance(v, str) and v:
                confine_path(self.options, p.name, v)

    def resolve_params(self, tensor: str, t: float, model_scopes: list[dict[str, Any] | None],
                       slice_scope: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        glob = self.recipe.parameters
        where = f"tensor '{tensor}'"
        for p in self.method.params.values():
            if p.per_model:
                vals = []
                for ms in model_scopes:
                    v = self._param(p.name, tensor, t, [ms, slice_scope, glob])
                    if v is None:
                        if p.required:
                            raise RecipeError(f"{where}: method '{self.method.name}' needs parameter "
                                              f"'{p.name}' for every model")
                        v = p.default
                    v = self.method.validate_value(p.name, v, f"{where}: ")
                    vals.append(confine_path(self.options, p.name, v) if p.path and v else v)
                out[p.arg] = vals
            else:
                v = self._param(p.name, tensor, t, [slice_scope, glob])
                if v is None and p.name == "seed":
                    v = self.recipe.seed
                if v is None:
                    if p.required:
                        raise RecipeError(f"method '{self.method.name}' needs parameter '{p.name}'")
                    v = p.default
                v = self.method.validate_value(p.name, v, f"{where}: ")
                out[p.arg] = confine_path(self.options, p.name, v) if p.path and v else v
        return out

    # plan ---------------------------------------------------------------------------------------
    def plan(self) -> MergePlan:
        r = self.recipe
        self._check_param_keys(r.parameters, "parameters", per_model=False)
        self._check_code(r.parameters)
        self._check_paths(r.parameters)
        base_idx = self.model(r.base_model) if r.base_model else None
        self.vocab = self._plan_vocabulary(base_idx)
        if r.models is not None:
            tasks, layers_out = self._plan_models(base_idx)
        else:
            tasks, layers_out = self._plan_slices(base_idx)
        aux = self._aux_source(base_idx, tasks)
        from merge.chat_template import resolve

        chat = resolve(r.chat_template, [m.ref for m in self.models], self.ckpts, r.base_model)
        plan = MergePlan(r, self.method, self.models, self.ckpts, tasks, aux, self.compute_dtype,
                         layers_out, self.options, vocab=self.vocab, chat_template=chat,
                         warnings=_unmatched_filters(r, tasks))
        return plan

    def _plan_vocabulary(self, base_idx: int | None) -> Any:
        """Tokenizer source / union (``merge.vocab``): None when no input needs re-indexing."""
        r = self.recipe
        source = r.tokenizer.source if r.tokenizer is not None else r.tokenizer_source
        if source is None and r.tokenizer is None:
            return None
        source = source or "union"  # mergekit's default for a `tokenizer:` block
        from merge import vocab

        if r.models is not None:
            inputs = [m.model for m in r.models]
        else:
            inputs = [ref for s in r.slices or [] for ref in [s.base_model] + [x.model for x in s.sources] if ref]
        refs = list(dict.fromkeys(([r.base_model] if r.base_model else []) + inputs))
        idxs = [self.model(ref) for ref in refs]
        source_model = self.model(source) if source not in ("union", "base") else None
        if self.method.kind == "whole_model":
            raise RecipeError(f"method '{self.method.name}' cannot be combined with a tokenizer source or union")
        ref_model = base_idx if base_idx is not None else idxs[0]
        models = [(i, ref, self.ckpts[i]) for i, ref in zip(idxs, refs, strict=True)]
        if source_model is not None and source_model not in idxs:
            models.append((source_model, source, self.ckpts[source_model]))
        return vocab.plan_vocabulary(
            source=source, tokens=r.tokenizer.tokens if r.tokenizer else None,
            pad_to_multiple_of=r.tokenizer.pad_to_multiple_of if r.tokenizer else None,
            models=models, base=base_idx, source_model=source_model, tensor_models=idxs,
            names=list(self.ckpts[ref_model].keys()),
        )

    def _aux_source(self, base_idx: int | None, tasks: list[TensorTask]) -> int | None:
        src = self.recipe.tokenizer_from
        if src and src not in ("base", "union"):
            return self.model(src)
        if base_idx is not None:
            return base_idx
        return tasks[0].sources[0].model if tasks and tasks[0].sources else None

    def _inputs(self, base_idx: int | None, model_idxs: list[int]) -> tuple[list[int], int | None]:
        """Split inputs into (non-base models, base) following the method's base policy."""
        if self.method.base == "ignored":
            idxs = list(model_idxs)
            if base_idx is not None and base_idx not in idxs:
                idxs.append(base_idx)
            return idxs, None
        others = [i for i in model_idxs if i != base_idx]
        return others, base_idx

    def _check_tensor(self, tensor: str, srcs: list[Source]) -> tuple[tuple[int, ...], torch.dtype]:
        first = srcs[0]
        c0 = self.ckpts[first.model]
        if first.name not in c0:
            raise MissingTensorError(f"{c0.path}: tensor '{first.name}' is missing (needed for output '{tensor}')")
        shape, dtype = c0.shape(first.name), c0.dtype(first.name)
        for s in srcs[1:]:
            c = self.ckpts[s.model]
            if s.name not in c:
                raise MissingTensorError(
                    f"{c.path}: tensor '{s.name}' is missing (present in {c0.path}, needed for output '{tensor}')"
                )
            if c.shape(s.name) != shape:
                raise ShapeMismatchError(
                    f"tensor '{s.name}': {c.path} has shape {list(c.shape(s.name))}, "
                    f"expected {list(shape)} as in {c0.path}"
                )
        return shape, dtype

    def _task(self, out_name: str, sources: list[Source], base: Source | None, t: float,
              model_scopes: list[dict[str, Any] | None], slice_scope: dict[str, Any] | None) -> TensorTask:
        all_srcs = ([base] if base else []) + sources
        have = [s for s in all_srcs if s.name in self.ckpts[s.model]]
        if have and not self.ckpts[have[0].model].dtype(have[0].name).is_floating_point:
            # Integer buffers (position ids, num_batches_tracked...) are not merged: copied from the base
            # or first model that has them (newer transformers drop some that older checkpoints saved).
            c = self.ckpts[have[0].model]
            return TensorTask(out_name, c.shape(have[0].name), c.dtype(have[0].name), [have[0]], None, {},
                              copy=True)
        rows = None
        if self.vocab is not None and all(self.vocab.is_vocab_tensor(s.name) for s in all_srcs):
            shape, dtype = self._check_vocab_tensor(out_name, all_srcs)
            rows = self.vocab.rows_for([(s.model, self.ckpts[s.model], s.name) for s in all_srcs],
                                       base.model if base else None, self.compute_dtype)
        else:
            shape, dtype = self._check_tensor(out_name, all_srcs)
        out_dtype = self.out_dtype or dtype
        if self.method.kind == "whole_model":
            params: dict[str, Any] = {}
        else:
            params = self.resolve_params(out_name, t, model_scopes, slice_scope)
            self.method.check_params(params, f"tensor '{out_name}': ")
        return TensorTask(out_name, shape, out_dtype, sources, base, params, vocab=rows)

    def _check_vocab_tensor(self, tensor: str, srcs: list[Source]) -> tuple[tuple[int, ...], torch.dtype]:
        """A vocabulary-indexed tensor: rows re-indexed to the output vocabulary, other dims must match."""
        c0 = self.ckpts[srcs[0].model]
        rest = c0.shape(srcs[0].name)[1:]
        for s in srcs[1:]:
            c = self.ckpts[s.model]
            if c.shape(s.name)[1:] != rest:
                raise ShapeMismatchError(
                    f"tensor '{s.name}': {c.path} has shape {list(c.shape(s.name))}, expected [vocabulary, "
                    f"{', '.join(map(str, rest))}] as in {c0.path}"
                )
        return (self.vocab.size, *rest), c0.dtype(srcs[0].name)

    def _plan_models(self, base_idx: int | None) -> tuple[list[TensorTask], int | None]:
        r = self.recipe
        assert r.models is not None
        model_idxs = [self.model(m.model) for m in r.models]
        scopes_by_model = {}
        for m, i in zip(r.models, model_idxs, strict=True):
            self._check_param_keys(m.parameters, f"models[{m.model}].parameters", per_model=True)
            scopes_by_model[i] = m.parameters
        inputs, base = self._inputs(base_idx, model_idxs)
        self.method.check_inputs(len(inputs), base is not None)
        ref = base if base is not None else inputs[0]
        names = list(self.ckpts[ref].keys())
        for i in inputs:  # integer buffers only some inputs have are kept too
            c = self.ckpts[i]
            names += [n for n in c.keys() if n not in self.ckpts[ref] and not c.dtype(n).is_floating_point]
        names = sorted(dict.fromkeys(names), key=_natural_key)
        prefix, n_layers = layer_stack(names)
        tasks = []
        for name in names:
            split = _split_layer(name, prefix)
            t = (split[0] / (n_layers - 1) if n_layers > 1 else 1.0) if split else 0.0
            tasks.append(self._task(
                name, [Source(i, name) for i in inputs], Source(base, name) if base is not None else None,
                t, [scopes_by_model.get(i) for i in inputs], None,
            ))
        self._check_no_extra(names, inputs + ([base] if base is not None else []))
        return tasks, None

    def _check_no_extra(self, names: list[str], idxs: list[int]) -> None:
        known = set(names)
        for i in idxs:
            c = self.ckpts[i]
            extra = [n for n in c.keys() if n not in known and c.dtype(n).is_floating_point]
            if extra:
                raise MissingTensorError(
                    f"{self.ckpts[i].path}: tensor '{sorted(extra)[0]}' is not in the reference model "
                    f"{self.ckpts[idxs[0]].path if idxs else ''} ({len(extra)} such tensors); the models do not "
                    "share an architecture"
                )

    def _plan_slices(self, base_idx: int | None) -> tuple[list[TensorTask], int]:
        r = self.recipe
        assert r.slices is not None
        # resolve every source first (errors before planning)
        for s in r.slices:
            self._check_param_keys(s.parameters, "slices[].parameters", per_model=False)
            for src in s.sources:
                self.model(src.model)
                self._check_param_keys(src.parameters, f"slices[].sources[{src.model}].parameters", per_model=True)
        first_model = self.model(r.slices[0].sources[0].model)
        ref_names = sorted(self.ckpts[first_model].keys(), key=_natural_key)
        prefix, _ = layer_stack(ref_names)
        if prefix is None:
            raise RecipeError(
                f"{self.ckpts[first_model].path}: 'slices' need a layer stack, but no tensor name has a "
                "'<prefix>.<index>.' layer pattern"
            )
        per_layer: dict[int, dict[int, list[str]]] = {}  # model -> layer -> suffixes

        def layers_of(mi: int) -> dict[int, list[str]]:
            if mi not in per_layer:
                d: dict[int, list[str]] = {}
                for n in sorted(self.ckpts[mi].keys(), key=_natural_key):
                    sp = _split_layer(n, prefix)
                    if sp:
                        d.setdefault(sp[0], []).append(sp[1])
                per_layer[mi] = d
            return per_layer[mi]

        tasks: list[TensorTask] = []
        out_layer = 0

        def slice_inputs(s: Any) -> tuple[list[int], int | None, dict[int, Any]]:
            sb = self.model(s.base_model) if s.base_model else base_idx
            idxs = [self.model(src.model) for src in s.sources]
            inputs, base = self._inputs(sb, idxs)
            self.method.check_inputs(len(inputs), base is not None)
            return inputs, base, {self.model(src.model): src for src in s.sources}

        non_layer = [n for n in ref_names if _split_layer(n, prefix) is None]
        pre = [n for n in non_layer if _PRE_RE.search(n)]
        post = [n for n in non_layer if not _PRE_RE.search(n)]

        def non_layer_tasks(names: list[str], s: Any) -> None:
            inputs, base, srcmap = slice_inputs(s)
            for n in names:
                tasks.append(self._task(
                    n, [Source(i, n) for i in inputs], Source(base, n) if base is not None else None, 0.0,
                    [srcmap[i].parameters if i in srcmap else None for i in inputs], s.parameters,
                ))

        non_layer_tasks(pre, r.slices[0])
        for s in r.slices:
            inputs, base, srcmap = slice_inputs(s)
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            for off in range(length):
                t = off / (length - 1) if length > 1 else 1.0
                ref_src = s.sources[0]
                ref_mi = self.model(ref_src.model)
                suffixes = layers_of(ref_mi).get(ref_src.layer_range[0] + off)
                if suffixes is None:
                    raise RecipeError(
                        f"{self.ckpts[ref_mi].path}: layer {ref_src.layer_range[0] + off} requested by "
                        f"layer_range {list(ref_src.layer_range)} does not exist "
                        f"(the model has {len(layers_of(ref_mi))} layers)"
                    )

                def in_name(mi: int, suffix: str, _off: int = off, _map: dict[int, Any] = srcmap,
                            _default: tuple[int, int] = ref_src.layer_range) -> str:
                    rng = _map[mi].layer_range if mi in _map else _default
                    return f"{prefix}.{rng[0] + _off}.{suffix}"

                for suffix in suffixes:
                    out_name = f"{prefix}.{out_layer}.{suffix}"
                    tasks.append(self._task(
                        out_name, [Source(i, in_name(i, suffix)) for i in inputs],
                        Source(base, in_name(base, suffix)) if base is not None else None, t,
                        [srcmap[i].parameters if i in srcmap else None for i in inputs], s.parameters,
                    ))
                out_layer += 1
        non_layer_tasks(post, r.slices[-1])
        return tasks, out_layer


def _unmatched_filters(recipe: Recipe, tasks: list[TensorTask]) -> list[str]:
    """A warning per parameter filter that is a substring of no tensor the merge reads or writes: such a
    condition changes nothing (``{filter: self_attn}`` on a BERT, whose tensors say ``attention``)."""
    from merge.recipe import filters

    names = {t.name for t in tasks} | {s.name for t in tasks for s in (*t.sources, *([t.base] if t.base else []))}
    out = []
    for where, f in filters(recipe):
        if not any(f in n for n in names):
            out.append(f"{where}: filter '{f}' matches no tensor of the merge, so this condition changes nothing")
    return out


def plan_merge(recipe: Recipe | str | Path | dict[str, Any], options: MergeOptions | None = None, *,
               resolver: Callable[[str], ResolvedModel] | None = None) -> MergePlan:
    """Validate a recipe and build its plan, reading headers only (no tensor data)."""
    r = load_recipe(recipe)
    options = options or MergeOptions()
    return _Planner(r, options, resolver or default_resolver).plan()


def confine_path(options: MergeOptions, name: str, value: str) -> str:
    """A ``FilePath`` parameter's value through the options' ``path_resolver`` (unchanged without one)."""
    if options.path_resolver is None:
        return value
    return str(options.path_resolver(value, f"parameters.{name}"))
