"""What the data-driven merges that read per-model statistics share (RegMean, Fisher merging).

A task model's weights bound to the user's architecture (:class:`ModelBinding`, ``torch.func.functional_call``:
the module is never modified), one pass over a task's data from the
:class:`~merge.methods._fusion.FusionProblem` AdaMerging uses (:func:`one_pass`), the checks of their
parameters, and the plan files (safetensors + JSON under ``fusion_plan/``) that make a merge re-run with no
code and no data (:func:`plan_artifacts`, :func:`save_plan`, :func:`read_plan`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from merge.checkpoint import dtype_of, shape_of
from merge.errors import (
    CheckpointError,
    MissingTensorError,
    RecipeError,
    ShapeMismatchError,
)
from merge.methods._fusion import (
    FusionProblem,
    _inputs,
    _to,
    check_problem,
)
from merge.methods._fusion_plan import (
    TENSORS_FILE,
    PlanMismatchError,
    plan_artifacts,
    read_plan,
    save_plan,
)

StateDict = Mapping[str, torch.Tensor]
LineFn = Callable[[str], None]
OTHERS = ("average", "task_arithmetic")
#: relative tolerance of the check that a plan is applied to the models it was computed on
FINGERPRINT_RTOL = 1e-3

_JIN = "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023"
_JIN_URL = "https://arxiv.org/abs/2212.09849"

StateDict = Mapping[str, torch.Tensor]
LineFn = Callable[[str], None]
OTHERS = ("average", "task_arithmetic")
#: relative tolerance of the check that a plan is applied to the models it was computed on
FINGERPRINT_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def _choice(value: str, options: tuple[str, ...], param: str, method: str) -> str:
    if value not in options:
        raise RecipeError(f"{method}: parameter '{param}' must be one of {', '.join(options)}; got {value!r}")
    return value


def _finite(value: float, param: str, method: str, *, low: float | None = None, strict: bool = False) -> None:
    ok = isinstance(value, int | float) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise RecipeError(f"{method}: parameter '{param}' must be a finite number{bound}, got {value!r}")


def _check_pass(method: str, num_examples: int, batch_size: int) -> None:
    if num_examples < 0:
        raise RecipeError(f"{method}: parameter 'num_examples' must be >= 0 (0: all), got {num_examples}")
    if batch_size < 1:
        raise RecipeError(f"{method}: parameter 'batch_size' must be >= 1, got {batch_size}")


def _pattern(keys: str, method: str) -> re.Pattern[str] | None:
    try:
        return re.compile(keys) if keys else None
    except re.error as e:
        raise RecipeError(f"{method}: parameter 'keys' is not a valid regular expression: {e}") from None


# ---------------------------------------------------------------------------------------------
# the module with one task model's weights
# ---------------------------------------------------------------------------------------------


class ModelBinding:
    """Which checkpoint tensors the problem's module uses, checked in every model; one model as the module.

    ``used`` maps checkpoint names to module names (``FusionProblem.prefix`` + name) for every tensor
    the module has (parameter or buffer); ``params`` are the floating ones that are parameters. Names
    and shapes are checked against the module and every task model (headers only).
    """

    def __init__(
        self, problem: FusionProblem, models: Sequence[StateDict], method: str, device: torch.device
    ) -> None:
        self.method = method
        self.device = device
        self.problem = problem
        self.module = problem.model
        if len(models) < 1:
            raise RecipeError(f"{method}: needs at least one task model")
        check_problem(problem, len(models), method)
        prefix = problem.prefix
        mod_params = dict(self.module.named_parameters())
        self.mod_all = {**dict(self.module.named_buffers()), **mod_params}
        names = list(models[0].keys())
        self.used: dict[str, str] = {k: prefix + k for k in names if prefix + k in self.mod_all}
        if not self.used:
            raise RecipeError(
                f"{method}: no checkpoint tensor is a tensor of the module (checkpoint names: "
                f"{', '.join(names[:3])}...; module names: {', '.join(list(self.mod_all)[:3])}...; "
                f"prefix={prefix!r})"
            )
        self.shapes: dict[str, tuple[int, ...]] = {}
        for k, mk in self.used.items():
            want = tuple(self.mod_all[mk].shape)
            for i, m in enumerate(models):
                if k not in m:
                    raise MissingTensorError(f"{method}: task model {i + 1} has no tensor '{k}' (task model 1 has it)")
                got = shape_of(m, k)
                if got != want:
                    raise ShapeMismatchError(
                        f"{method}: tensor '{k}' has shape {list(got)} in task model {i + 1}, but the module's "
                        f"'{mk}' has shape {list(want)}"
                    )
            self.shapes[k] = want
        self.params = [
            k for k, mk in self.used.items() if mk in mod_params and dtype_of(models[0], k).is_floating_point
        ]
        self.head_params = [_head_params(t.head, device) for t in problem.tasks]

    def full(self, model: StateDict) -> dict[str, torch.Tensor]:
        """Every module tensor: the model's where it has one (floating ones as float32), else the module's."""
        out: dict[str, torch.Tensor] = {}
        for k, mk in self.used.items():
            v = model[k]
            out[mk] = v.to(self.device, torch.float32) if v.is_floating_point() else v.to(self.device)
        for mk, v in self.mod_all.items():
            if mk not in out:
                out[mk] = v.detach().to(self.device)
        return out

    def linear_weights(self, pattern: re.Pattern[str] | None) -> dict[str, nn.Linear]:
        """Checkpoint names of the ``nn.Linear`` weights of the module (matching ``pattern``), and their modules."""
        prefix = self.problem.prefix
        out: dict[str, nn.Linear] = {}
        for mn, mod in self.module.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            wname = f"{mn}.weight" if mn else "weight"
            if not wname.startswith(prefix):
                continue
            k = wname[len(prefix) :]
            if k in self.used and k in self.params and (pattern is None or pattern.search(k)):
                out[k] = mod
        return out

    def logits(self, t: int, full: Mapping[str, torch.Tensor], batch: Any) -> Any:
        """Task ``t``'s output on ``batch`` with the module's tensors ``full`` (its custom forward or head)."""
        task = self.problem.tasks[t]

        def backbone(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.module, dict(full), args, kwargs)

        if task.forward is not None:
            return task.forward(backbone, batch)
        args, kwargs = _inputs(batch)
        out = backbone(*args, **kwargs)
        if task.head is None:
            return out
        hp = self.head_params[t]
        return functional_call(task.head, hp, (out,)) if hp is not None else task.head(out)

    def backbone_only(self, t: int, full: Mapping[str, torch.Tensor], batch: Any) -> Any:
        """The module's forward on ``batch`` (the task's custom forward when it has one: it calls the module)."""
        task = self.problem.tasks[t]
        if task.forward is not None:
            return self.logits(t, full, batch)
        args, kwargs = _inputs(batch)
        return functional_call(self.module, dict(full), args, kwargs)


def _head_params(head: Any, device: torch.device) -> dict[str, torch.Tensor] | None:
    if isinstance(head, nn.Module):
        return {
            k: v.detach().to(device)
            for k, v in {**dict(head.named_buffers()), **dict(head.named_parameters())}.items()
        }
    return None


# ---------------------------------------------------------------------------------------------
# one pass over a task's data
# ---------------------------------------------------------------------------------------------


def batch_rows(batch: Any) -> int:
    """The number of examples in a batch (a tensor, a tuple/list of tensors, or a dict of them)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim():
                return int(v.shape[0])
    if isinstance(batch, tuple | list):
        for v in batch:
            if isinstance(v, torch.Tensor) and v.dim():
                return int(v.shape[0])
    raise RecipeError(f"cannot tell the number of examples of a batch of type {type(batch).__name__}")


def batch_slice(batch: Any, r0: int, r1: int) -> Any:
    """Rows ``r0:r1`` of every tensor of a batch (other values unchanged)."""
    if isinstance(batch, torch.Tensor):
        return batch[r0:r1]
    if isinstance(batch, Mapping):
        return {k: batch_slice(v, r0, r1) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(batch_slice(v, r0, r1) for v in batch)
    return batch


def one_pass(
    data: Any, num_examples: int, batch_size: int, seed: int, device: torch.device, where: str
) -> tuple[Iterator[Any], int | None]:
    """At most ``num_examples`` examples (0: all) of a task's data, once, in batches; and the batch count.

    Tensor data (a tensor, or a tuple of tensors such as ``(inputs, labels)``): a seeded random subset
    of ``num_examples`` rows, each once. Any other iterable of batches: its batches in order, the last
    one cut, until ``num_examples`` examples (the whole iterable when 0); the count is then unknown.
    """
    tensors: tuple[torch.Tensor, ...] | None = None
    single = False
    if isinstance(data, torch.Tensor):
        tensors, single = (data,), True
    elif isinstance(data, tuple | list) and data and all(isinstance(t, torch.Tensor) for t in data):
        tensors = tuple(data)
    if tensors is not None:
        lengths = {len(t) for t in tensors}
        if len(lengths) != 1 or 0 in lengths:
            raise RecipeError(
                f"{where}: data tensors must be non-empty and share their first dimension, "
                f"got lengths {[len(t) for t in tensors]}"
            )
        n = lengths.pop()
        m = n if num_examples == 0 else min(n, num_examples)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]

        def gen_tensors() -> Iterator[Any]:
            for i in range(0, m, batch_size):
                idx = order[i : i + batch_size]
                out = tuple(t[idx].to(device) for t in tensors)
                yield out[0] if single else out

        return gen_tensors(), -(-m // batch_size)
    if not hasattr(data, "__iter__"):
        raise RecipeError(
            f"{where}: data must be a tensor, a tuple of tensors or an iterable of batches, got {type(data).__name__}"
        )

    def gen_iter() -> Iterator[Any]:
        seen = 0
        any_batch = False
        for b in data:
            any_batch = True
            b = _to(b, device)
            r = batch_rows(b)
            if num_examples and seen + r > num_examples:
                b = batch_slice(b, 0, num_examples - seen)
                r = num_examples - seen
            if r > 0:
                yield b
            seen += r
            if num_examples and seen >= num_examples:
                return
        if not any_batch:
            raise RecipeError(f"{where}: the data source yields no batches")

    return gen_iter(), None


def reporter(progress: LineFn | None, method: str, what: str, task: str) -> LineFn:
    """``progress`` lines ``"<method> <what> task '<task>' <line>"`` (the engine's cancel point)."""

    def report(line: str) -> None:
        if progress is not None:
            progress(f"{method} {what} task '{task}' {line}")

    return report


# ---------------------------------------------------------------------------------------------
# the plan files (shared with Fisher merging)
# ---------------------------------------------------------------------------------------------


def fingerprint_of(tensors: Sequence[torch.Tensor]) -> list[float]:
    """‖θ_i[k]‖ of each task model's tensor (float64): a plan refuses models it was not computed on."""
    return [float(t.double().norm()) for t in tensors]


def check_fingerprint(
    plan: Any, name: str, i: int, tensors: Sequence[torch.Tensor]
) -> None:
    if not plan.verify or plan.fingerprint is None:
        return
    want = plan.fingerprint[i].tolist()
    got = fingerprint_of(tensors)
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        if not math.isclose(g, w, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-6):
            raise PlanMismatchError(
                f"plan{plan.where()}: tensor '{name}': ‖θ_{j + 1}‖ (task model {j + 1}) is {g:.6g}, the plan was "
                f"computed where it was {w:.6g}: these are not the models it was computed on (or not in the "
                "same order); set verify: false to apply it anyway"
            )


def check_plan_models(
    plan: Any, base: StateDict | None, models: Sequence[StateDict], *, needs_base: bool
) -> None:
    """Model count, names and shapes of the plan's tensors (headers only); raises :class:`PlanMismatchError`."""
    if len(models) != plan.n_tasks:
        raise PlanMismatchError(
            f"plan{plan.where()} was computed for {plan.n_tasks} task model(s) "
            f"({', '.join(plan.task_names)}), the recipe gives {len(models)}"
        )
    if needs_base and base is None:
        raise RecipeError(
            f"{plan.method}: the plan merges the other tensors by task arithmetic (others: task_arithmetic), "
            "which needs a base_model"
        )
    for i, m in enumerate(models):
        for k in plan.keys:
            if k not in m:
                raise PlanMismatchError(
                    f"plan{plan.where()}: tensor '{k}' is not in task model {i + 1}; the plan was computed "
                    "for another model"
                )
            shape = shape_of(m, k)
            if shape != tuple(plan.shapes[k]):
                raise PlanMismatchError(
                    f"plan{plan.where()}: tensor '{k}' has shape {list(shape)} in task model {i + 1}, the plan "
                    f"was computed for shape {list(plan.shapes[k])}"
                )


def merge_others(
    method: str,
    others: str,
    lambda_: float,
    name: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """A tensor the statistics do not cover: the (weighted) average, or task arithmetic from the base."""
    if base is not None and not base.is_floating_point():
        return base
    if not tensors[0].is_floating_point():
        return tensors[0]
    if others == "task_arithmetic":
        if base is None:
            raise RecipeError(f"{method}: tensor '{name}' is merged by task arithmetic and needs the base model's")
        b = base.float()
        acc = torch.zeros_like(b)
        for t in tensors:
            acc.add_(t.float() - b)
        return acc.mul_(lambda_).add_(b)
    if weights is None:
        acc = torch.zeros_like(tensors[0], dtype=torch.float32)
        for t in tensors:
            acc.add_(t.float())
        return acc.div_(len(tensors))
    total = float(sum(weights))
    acc = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights, strict=True):
        acc.add_(t.float(), alpha=w / total)
    return acc


def _card_keys(card: dict[str, Any], card_path: str) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    try:
        keys = list(card["keys"])
        shapes = {k: tuple(int(s) for s in v) for k, v in card["keys"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{card_path}: malformed plan card: {e}") from None
    return keys, shapes


class StatisticsPlan:
    """The files of a plan made of per-model statistics (:class:`merge.methods.regmean.RegMeanPlan`,
    :class:`merge.methods.fisher.FisherPlan`): a card (the method's parameters) and one tensor of statistics
    per merged tensor (``<STATS>.<name>``), saved as a merge's ``fusion_plan/`` or a folder of their own."""

    FORMAT: ClassVar[str]
    STATS: ClassVar[str]  # the tensors-file prefix of the statistics: "gram", "fisher"
    WHAT: ClassVar[str]  # what they are called in messages: "Gram matrices", "Fisher"
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    task_names: list[str]
    info: dict[str, Any]
    method: str
    n_tasks: int

    def card_params(self) -> dict[str, Any]:
        """The method's own parameters in the card."""
        raise NotImplementedError

    def card(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": 1, "method": self.method, "n_tasks": self.n_tasks,
                "task_names": self.task_names, "keys": {k: list(self.shapes[k]) for k in self.keys},
                **self.card_params(), "info": self.info}

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def artifacts(self) -> dict[str, bytes]:
        """The plan's files, keyed by their path inside a merge's output folder (engine hook)."""
        return plan_artifacts(self.FORMAT, self.card(), self.tensors())

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the plan folder atomically (a temp folder, fsync, one rename)."""
        return save_plan(self.artifacts(), folder, overwrite, f"{self.method} plan")

    @classmethod
    def read(cls, path: str | Path, method: str
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor], str, list[str], dict[str, Any], dict[str, Any]]:
        """``(card, tensors, where, keys, shapes, statistics)`` of a plan folder (or its ``plan.json``)."""
        card, tensors, where = read_plan(path, cls.FORMAT, method)
        keys, shapes = _card_keys(card, where)
        stats = {}
        for k in keys:
            if f"{cls.STATS}.{k}" not in tensors:
                raise CheckpointError(f"{where}: no {cls.WHAT} for '{k}' in {TENSORS_FILE}")
            stats[k] = tensors[f"{cls.STATS}.{k}"]
        return card, tensors, where, keys, shapes, stats
