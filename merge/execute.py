"""Execute a merge plan: stream each output tensor to disk with bounded memory.

Execution streams each output tensor in row chunks (``merge.methods.runner``) on a small
thread pool (torch ops release the GIL, so reading and compute overlap), handing each chunk to
the ``CheckpointWriter``, whose I/O threads write it behind the merge. Peak memory is a few
chunks per worker plus a few 8 MiB write blocks, independent of model size. Compute is float32 by default (exact results
where mergekit computes in bf16 when a recipe says ``dtype: bfloat16``); the output is stored in
``out_dtype``, else ``dtype``, else each tensor's input dtype.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge.atomic import check_output
from merge.checkpoint import CheckpointWriter, OutputTensor, ResolvedModel
from merge.errors import (
    MergeCancelled,
    NonFiniteError,
    RecipeError,
    WeightsmithError,
)
from merge.methods.runner import merge_chunks
from merge.plan import (
    MergeOptions,
    MergePlan,
    Source,
    TensorTask,
    confine_path,
    default_resolver,
    layer_stack,
    plan_merge,
)
from merge.recipe import Recipe, evaluate_setting


@dataclass
class Progress:
    phase: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    current: str = ""


@dataclass
class MergeResult:
    out_dir: str
    method: str
    n_tensors: int
    bytes_written: int
    shards: list[str]
    seconds: float
    models: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------


def _config_update(text: str, plan: MergePlan) -> str:
    import json

    try:
        cfg = json.loads(text)
    except ValueError:
        return text
    if not isinstance(cfg, dict):
        return text
    if plan.num_layers_out is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                cfg[key] = plan.num_layers_out
    out_dtype = plan.recipe.out_dtype or plan.recipe.dtype
    if out_dtype:
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = out_dtype
    if plan.vocab is not None:  # the re-indexed vocabulary
        for c in (cfg, cfg.get("text_config")):
            if isinstance(c, dict) and "vocab_size" in c:
                c["vocab_size"] = plan.vocab.size
    # FP8 inputs are read dequantized (merge.quantized): the merge is not quantized
    cfg.pop("quantization_config", None)
    return json.dumps(cfg, indent=2) + "\n"


class _Execution:
    """One run of a plan: progress reports, cancellation, the whole-model first pass, and the streamed
    tasks, handing every output row chunk to ``write_rows`` (a checkpoint writer's, or tensors in memory)."""

    def __init__(self, plan: MergePlan, progress: Callable[[Progress], None] | None,
                 cancel: threading.Event | None) -> None:
        self.plan, self.progress, self.cancel = plan, progress, cancel
        self.options = plan.options
        self.device = torch.device(self.options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RecipeError("--device cuda was asked for, but no CUDA device is available")
        self.state = {"tensors": 0, "bytes": 0}
        self.lock = threading.Lock()
        self.whole_plan: Any = None

    def report(self, phase: str, current: str = "") -> None:
        if self.progress is not None:
            p = self.plan
            with self.lock:  # a snapshot and its report in one step: the reports' counts never go back
                self.progress(Progress(phase, self.state["tensors"], p.n_tensors, self.state["bytes"], p.bytes_out,
                                       current))

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise MergeCancelled("merge cancelled; nothing was written")

    def first_pass(self) -> None:
        """A whole-model method's plan (its first pass over the inputs); nothing for per-tensor methods."""
        plan = self.plan
        if plan.method.kind != "whole_model":
            return
        self.report("planning", plan.method.name)
        merged = next((t for t in plan.tasks if not t.copy), None)
        inputs = [s.model for s in merged.sources] if merged else []  # recipe order
        base_i = merged.base.model if merged and merged.base else None
        params = _whole_model_params(plan)
        accepts = inspect.signature(plan.method.fn).parameters
        if "progress" in accepts:  # a long first pass (an optimisation) reports steps and can be cancelled

            def step_report(line: str) -> None:
                self.check_cancel()
                self.report("planning", line)

            params["progress"] = step_report
        if "device" in accepts:
            params["device"] = self.options.device
        # whole-model methods read the inputs as TensorSources (merge.checkpoint): lazy, headers first
        self.whole_plan = plan.method.fn([plan.checkpoints[i] for i in inputs],
                                         plan.checkpoints[base_i] if base_i is not None else None, **params)

    def stream(self, write_rows: Callable[[str, int, int, torch.Tensor], None]) -> None:
        """Every task, on ``options.workers`` threads (one torch thread each when there are several)."""
        # Parallelism comes from our workers, one torch thread each: torch's OpenMP threads spin-wait,
        # and several pools on few cores made a linear merge 10x slower in CPU time under load.
        prev_threads = torch.get_num_threads()
        if self.options.workers > 1:
            torch.set_num_threads(1)
        try:
            self.report("merging")
            _run_tasks(self.plan.tasks, lambda task: self._task(task, write_rows), max(1, self.options.workers),
                       self.check_cancel)
            self.check_cancel()
        finally:
            torch.set_num_threads(prev_threads)

    # NaN/Inf: every floating input chunk is checked as it is read, or, for methods whose output is
    # non-finite wherever an input is (sums), the output chunk is, and the inputs only when it fails.
    @property
    def _check_inputs(self) -> bool:
        return self.options.check_finite and not self.plan.method.propagates_nonfinite

    def _reader(self, task: TensorTask, src: Source, check: bool) -> Callable[[int, int], torch.Tensor]:
        plan = self.plan
        ckpt = plan.checkpoints[src.model]
        src_dtype = ckpt.dtype(src.name) if task.vocab is None else torch.float32
        checked: set[tuple[int, int]] = set()  # rows already checked (a stats pass reads them twice)

        def read(r0: int, r1: int) -> torch.Tensor:
            self.check_cancel()
            x = None
            if task.vocab is None and not task.copy and src_dtype != plan.compute_dtype and src_dtype.is_floating_point:
                # converting anyway: read the page cache in place (no intermediate copy of the rows)
                x = ckpt.rows_view(src.name, r0, r1)
            if x is None:
                x = task.vocab.rows(src.model, r0, r1) if task.vocab is not None else ckpt.rows(src.name, r0, r1)
            if task.copy or not x.is_floating_point():
                return x
            x = x.to(device=self.device, dtype=plan.compute_dtype)
            if check and (r0, r1) not in checked:
                if _nonfinite(x):
                    raise NonFiniteError(f"{ckpt.path}: tensor '{src.name}' contains NaN or Inf values")
                checked.add((r0, r1))
            return x

        return read

    def _task(self, task: TensorTask, write_rows: Callable[[str, int, int, torch.Tensor], None]) -> None:
        self.check_cancel()
        plan, options = self.plan, self.options
        check_outputs = options.check_finite and plan.method.propagates_nonfinite
        rows = task.shape[0] if task.shape else 0

        def emit(r0: int, r1: int, out: torch.Tensor) -> None:
            if check_outputs and not task.copy and out.is_floating_point() and _nonfinite(out):
                for src in [*task.sources, *([task.base] if task.base else [])]:
                    self._reader(task, src, True)(r0, r1)  # raises naming the input
                # all inputs finite: an overflow of the merge itself, written as computed
            out = out.to(task.out_dtype)
            write_rows(task.name, r0, r1, out)
            with self.lock:
                self.state["bytes"] += out.numel() * out.element_size()

        if task.copy:
            read = self._reader(task, task.sources[0], options.check_finite)
            if task.shape and task.shape[0] > 0:
                from merge.methods.runner import chunk_grid

                for r0, r1 in chunk_grid(task.shape, options.chunk_elems):
                    emit(r0, r1, read(r0, r1))
            else:
                emit(0, 0, read(0, 0))
        elif self.whole_plan is not None:
            tensors = [self._reader(task, s, options.check_finite)(0, rows).to(plan.compute_dtype)
                       for s in task.sources]
            base = (self._reader(task, task.base, options.check_finite)(0, rows).to(plan.compute_dtype)
                    if task.base else None)
            emit(0, rows, self.whole_plan.apply(task.name, tensors, base))
        else:
            merge_chunks(
                plan.method, task.params, name=task.name, shape=task.shape,
                readers=[self._reader(task, s, self._check_inputs) for s in task.sources],
                base_reader=self._reader(task, task.base, self._check_inputs) if task.base else None,
                emit=emit, seed=plan.recipe.seed, chunk_elems=options.chunk_elems, device=self.device,
                compute_dtype=plan.compute_dtype,
            )
        with self.lock:
            self.state["tensors"] += 1
        self.report("merging", task.name)


def _nonfinite(x: torch.Tensor) -> bool:
    # A sum is ~30x cheaper than isfinite().all(); NaN/Inf anywhere makes it non-finite, and
    # the exact check runs only then (it also tells a mere overflow of the sum apart).
    return not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all())


def run_merge(recipe: Recipe | str | Path | dict[str, Any], out_dir: str | Path,
              options: MergeOptions | None = None, *,
              progress: Callable[[Progress], None] | None = None,
              cancel: threading.Event | None = None,
              resolver: Callable[[str], ResolvedModel] | None = None,
              plan: MergePlan | None = None) -> MergeResult:
    """Plan and run a merge, writing a complete checkpoint folder at ``out_dir`` (or nothing)."""
    t0 = time.perf_counter()
    options = options or MergeOptions()
    plan = plan or plan_merge(recipe, options, resolver=resolver)
    input_paths = plan.input_paths
    check_output(out_dir, overwrite=options.overwrite, inputs=input_paths)  # before any work
    total_bytes = plan.bytes_out
    bar = _progress_bar(total_bytes, plan.n_tensors) if progress is None else None
    run = _Execution(plan, progress or (bar.update_to if bar is not None else None), cancel)
    try:
        run.first_pass()
        outputs = [OutputTensor(t.name, t.shape, t.out_dtype) for t in plan.tasks]
        meta = {"weightsmith_method": plan.method.name}
        writer = CheckpointWriter(out_dir, outputs, shard_size=options.shard_size, overwrite=options.overwrite,
                                  metadata=meta, direct_io=options.direct_io, inputs=input_paths, what="merge")
        with writer:
            run.stream(writer.write_rows)
            _write_aux(plan, writer)
            from merge.chat_template import check_tokenizer

            check_tokenizer(writer.tmp, {t.name: t.shape for t in plan.tasks})
            # a plan's own files (e.g. a learned mask and coefficients) travel with the output
            artifacts = getattr(run.whole_plan, "artifacts", dict)() if run.whole_plan is not None else {}
            for rel, data in artifacts.items():
                writer.add_bytes(rel, data)
            run.report("finalizing")
    finally:
        if bar is not None:
            bar.close()
    result = MergeResult(
        out_dir=str(out_dir), method=plan.method.name, n_tensors=plan.n_tensors, bytes_written=total_bytes,
        shards=writer.shard_names, seconds=round(time.perf_counter() - t0, 3),
        models=[{"ref": m.ref, "path": str(m.path), "repo_id": m.repo_id, "revision": m.revision,
                 "commit": m.commit,
                 **({"adapters": [{"ref": a.ref, "path": str(a.path), "commit": a.commit, "weight": w}
                                  for a, w in zip(m.adapters, m.adapter_weights, strict=True)]}
                    if m.adapters else {})} for m in plan.models],
    )
    if progress:
        progress(Progress("done", plan.n_tensors, plan.n_tensors, total_bytes, total_bytes))
    return result


def merge_in_memory(recipe: Recipe | str | Path | dict[str, Any], options: MergeOptions | None = None, *,
                    progress: Callable[[Progress], None] | None = None,
                    cancel: threading.Event | None = None,
                    resolver: Callable[[str], ResolvedModel] | None = None,
                    plan: MergePlan | None = None) -> dict[str, torch.Tensor]:
    """Plan and run a merge into a state dict in memory (CPU tensors, the output dtypes): the same
    streaming engine as :func:`run_merge`, so the tensors are bit-identical to the files it would write;
    no file is written. For searches (``merge.evolve``) and scorers that need the merged weights at once."""
    options = options or MergeOptions()
    plan = plan or plan_merge(recipe, options, resolver=resolver)
    out = {t.name: torch.empty(t.shape, dtype=t.out_dtype) for t in plan.tasks}

    def write_rows(name: str, r0: int, r1: int, rows: torch.Tensor) -> None:
        dst = out[name]
        if dst.dim() == 0 or dst.shape[0] == 0:
            dst.copy_(rows.reshape(dst.shape))
        else:
            dst[r0:r1].copy_(rows.reshape(r1 - r0, *dst.shape[1:]))

    run = _Execution(plan, progress, cancel)
    run.first_pass()
    run.stream(write_rows)
    return out


def tune_allocator() -> None:
    """Process-wide glibc malloc tuning for streaming merges (called by the CLI and service workers).

    Chunk buffers are a few MiB; by default glibc hands such blocks back to the kernel on free, so
    every new chunk page-faults its memory in again. Keeping them in the heap cut page faults of a
    linear merge from ~420k to ~14k and its system time by 2-3x. A no-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MiB of freed heap
    except (OSError, AttributeError):
        pass


def _whole_model_params(plan: MergePlan) -> dict[str, Any]:
    """A whole-model method's parameters: global ones from the recipe's ``parameters``; per-model ones, one
    value per non-base model in recipe order, from the model's own ``parameters`` (else the global value)."""
    planner_params: dict[str, Any] = {}
    glob = plan.recipe.parameters or {}
    scopes = [m.parameters for m in (plan.recipe.models or []) if m.model != plan.recipe.base_model]
    for p in plan.method.params.values():
        if p.per_model:
            vals = []
            for sc in scopes or [None]:
                v = evaluate_setting((sc or {}).get(p.name), "", 0.0)
                if v is None:
                    v = evaluate_setting(glob.get(p.name), "", 0.0)
                if v is None and p.required:
                    raise RecipeError(f"method '{plan.method.name}' needs parameter '{p.name}' for every model")
                vals.append(p.default if v is None else plan.method.validate_value(p.name, v))
            planner_params[p.arg] = vals
            continue
        v = evaluate_setting(glob.get(p.name), "", 0.0)
        if v is None and p.name == "seed":
            v = plan.recipe.seed
        if v is None:
            if p.required:
                raise RecipeError(f"method '{plan.method.name}' needs parameter '{p.name}'")
            v = p.default
        else:
            v = plan.method.validate_value(p.name, v)
            if p.path and isinstance(v, str) and v:
                v = confine_path(plan.options, p.name, v)
        planner_params[p.arg] = v
    return planner_params




def _run_tasks(tasks: list[TensorTask], fn: Callable[[TensorTask], None], workers: int,
               check_cancel: Callable[[], None]) -> None:
    """Run tasks on a thread pool with at most ``workers`` in flight (bounded memory)."""
    if workers == 1:
        for t in tasks:
            fn(t)
        return
    # Big tensors first would help balance, but plan order keeps writes mostly sequential on disk.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
        pending: set[Future[None]] = set()
        it = iter(tasks)
        try:
            for t in it:
                pending.add(pool.submit(fn, t))
                if len(pending) >= workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _write_aux(plan: MergePlan, writer: CheckpointWriter) -> None:
    if plan.aux_from is not None:
        for f in plan.checkpoints[plan.aux_from].aux_files():
            if f.name == "config.json":
                writer.add_text("config.json", _config_update(f.read_text(), plan))
            elif plan.vocab is None or not _is_tokenizer_file(f.name):
                writer.add_file(f)
    if plan.vocab is not None:  # the merged / re-indexed vocabulary's tokenizer replaces the inputs'
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            for f in plan.vocab.save_tokenizer(Path(d)):
                writer.add_file(f)
    if plan.chat_template is not None:  # the recipe's choice (merge.chat_template), in one place
        from merge.chat_template import tokenizer_config_without_template

        for stale in ("chat_template.json", "chat_template.jinja"):
            (writer.tmp / stale).unlink(missing_ok=True)
        cfg = writer.tmp / "tokenizer_config.json"
        if cfg.is_file():
            cfg.write_text(tokenizer_config_without_template(cfg.read_text()))
        writer.add_text("chat_template.jinja", plan.chat_template)
    writer.add_text("weightsmith_recipe.yml", plan.recipe.to_yaml())
    from merge.card import render_model_card

    base = None
    if plan.recipe.base_model:
        base = plan.models[[m.ref for m in plan.models].index(plan.recipe.base_model)]
    others = [m for m in plan.models if base is None or m.ref != base.ref]
    writer.add_text("README.md", render_model_card(plan.recipe.to_yaml(), plan.method, others, base))


def _is_tokenizer_file(name: str) -> bool:
    from merge.vocab import TOKENIZER_FILES

    return TOKENIZER_FILES.fullmatch(name) is not None


class _Bar:
    def __init__(self, total_bytes: int, n: int) -> None:
        from tqdm import tqdm

        self.t = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
                      file=sys.stderr, dynamic_ncols=True)
        self.n = n

    def update_to(self, p: Progress) -> None:
        if p.phase == "planning" and p.current:  # a whole-model method's first pass (e.g. optimisation steps)
            self.t.set_postfix_str(p.current, refresh=True)
            return
        self.t.set_postfix_str(f"{p.tensors_done}/{self.n} tensors", refresh=False)
        self.t.update(p.bytes_done - self.t.n)

    def close(self) -> None:
        self.t.close()


def _progress_bar(total_bytes: int, n: int) -> _Bar | None:
    if not sys.stderr.isatty():
        return None
    return _Bar(total_bytes, n)


__all__ = [
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "Progress",
    "WeightsmithError",
    "default_resolver",
    "tune_allocator",
    "layer_stack",
    "merge_in_memory",
    "plan_merge",
    "run_merge",
]
