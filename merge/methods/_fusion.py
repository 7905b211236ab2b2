"""The differentiable merge shared by AdaMerging and the Concrete subspace methods.

A frozen base θ_0 and frozen task vectors τ_t = θ_t − θ_0 are merged with learnable coefficients
λ (one per task, or one per task and tensor) and an optional shared mask m:

    θ[k] = θ_0[k] + m[k] ⊙ Σ_t λ_{t,k} τ_t[k]

(Yang et al., "AdaMerging: Adaptive Model Merging for Multi-task Learning", ICLR 2024, Eq. 3
task-wise and Eq. 4 layer-wise; Tang et al., "Concrete Subspace Learning based Interference
Elimination for Multi-task Model Fusion", arXiv:2312.06173, Eq. 5 with the mask). The merged
tensors are handed to the user's architecture through ``torch.func.functional_call``: only λ and
the mask logits carry gradients, no merged ``nn.Module`` is built per step, and neither the
caller's module nor its state dicts are modified (module parameters outside the merge are passed
in detached; heads that are modules are called the same way).

One optimisation step runs each task's forward and backward on its own, down to the merged
tensors, and then one backward through the merge (:meth:`DifferentiableMerge.backward`), so the
activations of one task are alive at a time and the memory beyond the task vectors is a few
copies of the learned tensors, whatever the number of tasks.

What the user supplies is a :class:`FusionProblem`: the architecture, and per task its unlabelled
inputs, its frozen head and its loss (the Shannon entropy of the predictions by default, as in
both papers; any ``loss(logits, batch)``, e.g. a labelled cross-entropy, plugs in instead).
:func:`load_entry_point` builds one from a ``module:function`` named in a recipe.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from merge.checkpoint import dtype_of, shape_of
from merge.entry_point import import_callable
from merge.errors import MissingTensorError, RecipeError, ShapeMismatchError

StateDict = Mapping[str, torch.Tensor]
#: ``progress(phase, step, steps, loss)``, called after every optimisation step.
ProgressFn = Callable[[str, int, int, float], None]


def entropy_loss(logits: torch.Tensor, batch: Any = None) -> torch.Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over the batch (AdaMerging §3.2, Eq. 6).

    The surrogate objective of AdaMerging and Concrete AdaMerging: it needs no labels.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def cross_entropy_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """Labelled cross-entropy, for batches ``(inputs, labels)`` or dicts with ``labels``.

    Not what the papers optimise (their objective is label-free); it is here to test the mechanism
    with an oracle objective and for users who do have a few labelled examples.
    """
    labels = batch["labels"] if isinstance(batch, Mapping) else batch[1]
    return F.cross_entropy(logits.float(), labels)


@dataclass
class FusionTask:
    """One task of the merge: its data, its frozen head and its loss.

    ``data`` is either tensors (one tensor of inputs, or a tuple of tensors with the same first
    dimension such as ``(inputs, labels)``), from which batches of ``batch_size`` rows are drawn
    with a seeded generator, reshuffled after each pass; or any other re-iterable source of
    batches (a ``DataLoader``, a list), cycled through as it comes.

    The merged backbone is called with the batch itself (a tensor), its first element (a tuple or
    list) or its items except ``labels``/``label`` as keyword arguments (a dict); ``head`` maps
    its output to logits. ``forward(backbone, batch) -> logits`` replaces both for anything else
    (pooling with an attention mask, several inputs...). ``loss(logits, batch)`` defaults to
    :func:`entropy_loss`.
    """

    name: str
    data: Any
    head: Callable[[Any], torch.Tensor] | None = None
    forward: Callable[[Callable[..., Any], Any], torch.Tensor] | None = None
    loss: Callable[[torch.Tensor, Any], torch.Tensor] = entropy_loss


@dataclass
class FusionProblem:
    """The architecture and the tasks, in the order of the task models.

    ``model`` is any ``nn.Module`` whose parameter names are the checkpoints' tensor names with
    ``prefix`` prepended (``prefix="bert."`` when the checkpoints hold a bare encoder and the
    module wraps it). Its own weights are not used where the checkpoints have a tensor; they are
    never modified. With ``batch_tasks`` (the default) the tasks' tensor inputs go through one
    forward, concatenated: the module must treat the rows of a batch independently (eval-mode
    BatchNorm, no dropout), and all tasks' activations are alive at once; False runs one task
    after the other (large models).
    """

    model: nn.Module
    tasks: list[FusionTask]
    prefix: str = ""
    batch_tasks: bool = True


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def load_entry_point(ref: str, *, device: str = "cpu", where: str = "entry_point") -> FusionProblem:
    """Import ``package.module:function`` (or ``path/to/file.py:function``), call it, check the result.

    The function is called with ``device=`` if it takes that argument, and must return a
    :class:`FusionProblem` (or a mapping with its fields). This runs the user's code: the engine
    allows it only with ``MergeOptions.allow_code`` (the CLI's ``--allow-code``).
    """
    fn = import_callable(ref, where=where)
    kwargs = {"device": device} if "device" in inspect.signature(fn).parameters else {}
    try:
        problem = fn(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise RecipeError(f"{where} {ref!r}: the function raised {type(e).__name__}: {e}") from None
    if isinstance(problem, Mapping):
        problem = FusionProblem(**problem)
    if not isinstance(problem, FusionProblem):
        raise RecipeError(
            f"{where} {ref!r}: returned {type(problem).__name__}, expected a FusionProblem "
            "(merge.methods.concrete.FusionProblem: model, tasks, prefix)"
        )
    return problem


def check_problem(problem: FusionProblem, n_models: int, method: str) -> None:
    """The problem has a module and one task (head, data) per task model."""
    if not isinstance(problem.model, nn.Module):
        raise RecipeError(
            f"{method}: FusionProblem.model must be an nn.Module, got {type(problem.model).__name__}"
        )
    if len(problem.tasks) != n_models:
        raise RecipeError(
            f"{method}: the problem has {len(problem.tasks)} task(s) (heads and data) for {n_models} task "
            f"model(s); give one FusionTask per model, in the recipe's order"
        )
    names = [t.name for t in problem.tasks]
    if len(set(names)) != len(names):
        raise RecipeError(f"{method}: task names must be unique, got {names}")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_to(v, device) for v in x)
    return x


class Batches:
    """An endless, seeded stream of batches for one task (see :class:`FusionTask`)."""

    def __init__(self, data: Any, batch_size: int, seed: int, device: torch.device, where: str) -> None:
        self.device = device
        self.batch_size = batch_size
        self.tensors: tuple[torch.Tensor, ...] | None = None
        if isinstance(data, torch.Tensor):
            self.tensors, self.single = (data,), True
        elif isinstance(data, tuple | list) and data and all(isinstance(t, torch.Tensor) for t in data):
            self.tensors, self.single = tuple(data), False
        if self.tensors is not None:
            n = {len(t) for t in self.tensors}
            if len(n) != 1 or 0 in n:
                raise RecipeError(
                    f"{where}: data tensors must be non-empty and share their first dimension, "
                    f"got lengths {[len(t) for t in self.tensors]}"
                )
            self.n = n.pop()
            self.gen = torch.Generator().manual_seed(seed)
            self.order = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        else:
            if not isinstance(data, Iterable):
                raise RecipeError(
                    f"{where}: data must be a tensor, a tuple of tensors or an iterable of batches, "
                    f"got {type(data).__name__}"
                )
            self.source = data
            self.it: Iterator[Any] = iter(data)

    def __next__(self) -> Any:
        if self.tensors is None:
            try:
                return _to(next(self.it), self.device)
            except StopIteration:
                self.it = iter(self.source)
                try:
                    return _to(next(self.it), self.device)
                except StopIteration:
                    raise RecipeError("a task's data source yields no batches") from None
        bs = min(self.batch_size, self.n)
        if self.pos + bs > self.n:
            self.order = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.order[self.pos : self.pos + bs]
        self.pos += bs
        out = tuple(t[idx].to(self.device) for t in self.tensors)
        return out[0] if self.single else out


def _inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in ("labels", "label")}
    if isinstance(batch, tuple | list):
        return (batch[0],), {}
    return (batch,), {}


# ---------------------------------------------------------------------------------------------
# the differentiable merge
# ---------------------------------------------------------------------------------------------


def run_recipe(
    method: str,
    models: Sequence[Any],
    base: Any,
    *,
    entry_point: str,
    plan: str,
    verify: bool,
    device: str,
    learn: Callable[..., Any],
    load: Callable[..., Any],
    progress: Any = None,
    needs_base: bool = False,
    **kwargs: Any,
) -> Any:
    """A data-driven method's whole-model first pass from a recipe: learn its plan from the ``entry_point``
    (a :class:`FusionProblem`) or apply a saved ``plan`` folder (no code, no data; checked against the models).
    One mechanism for AdaMerging, the Concrete methods, RegMean, Fisher and FW-Merging."""
    if needs_base and base is None:
        raise RecipeError(f"method '{method}' requires a base_model (task vectors are θ_t − θ_0)")
    if bool(entry_point) == bool(plan):
        raise RecipeError(
            f"method '{method}': give exactly one of the parameters 'entry_point' (package.module:function "
            "returning the architecture, heads and data; learns the plan) or 'plan' (a saved plan folder; "
            "applies it)"
        )
    if plan:
        p = load(plan, verify=verify)
        learned_by = getattr(p, "method", method)
        if learned_by != method:
            raise RecipeError(f"{plan}: this plan was learned by '{learned_by}'; apply it with merge_method: "
                              f"{learned_by}")
        p.check_models(base, models)
        return p
    resolve_device(device)
    problem = load_entry_point(entry_point, device=device)
    p = learn(base, models, problem, device=device, progress=progress, **kwargs)
    p.verify = verify
    return p


def step_lines(method: str, progress: Callable[[str], None] | None) -> Callable[[str, int, int, float], None] | None:
    """An optimisation's ``(phase, step, steps, loss)`` reports as the engine's progress lines."""
    if progress is None:
        return None

    def report(phase: str, step: int, steps: int, loss: float) -> None:
        progress(f"{method} {phase} step {step}/{steps} loss {loss:.5g}")

    return report


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device '{device}' was asked for, but no CUDA device is available")
    return dev


def _shape(sd: StateDict, name: str) -> tuple[int, ...]:
    return shape_of(sd, name)


def _floating(sd: StateDict, name: str) -> bool:
    return bool(dtype_of(sd, name).is_floating_point)


class DifferentiableMerge:
    """Frozen θ_0 and τ_t of the learned tensors, and the merged tensors as a function of (λ, m).

    ``learned`` are the floating checkpoint tensors whose module names are parameters of
    ``problem.model`` and that match ``keys`` (a regular expression, searched in the name; all of
    them by default). Every other floating checkpoint tensor the module uses is merged by plain task
    arithmetic with ``fallback_lambda`` (what the plan will write for it), non-floating ones are
    the base's, and module tensors the checkpoints do not have are the module's own, detached.
    """

    def __init__(
        self,
        base: StateDict,
        models: Sequence[StateDict],
        problem: FusionProblem,
        *,
        keys: str = "",
        fallback_lambda: float = 0.3,
        device: str | torch.device = "cpu",
        method: str = "merge",
    ) -> None:
        self.method = method
        self.device = resolve_device(device)
        self.problem = problem
        self.module = problem.model
        self.n_tasks = len(models)
        if self.n_tasks < 1:
            raise RecipeError(f"{method}: needs at least one task model besides the base")
        check_problem(problem, self.n_tasks, method)
        try:
            pattern = re.compile(keys) if keys else None
        except re.error as e:
            raise RecipeError(f"{method}: parameter 'keys' is not a valid regular expression: {e}") from None
        prefix = problem.prefix
        mod_params = dict(self.module.named_parameters())
        mod_all = {**dict(self.module.named_buffers()), **mod_params}
        names = list(base.keys())
        self.keys: list[str] = []  # learned checkpoint names, in checkpoint order
        self.module_name: dict[str, str] = {}
        fallback: list[str] = []
        consts: dict[str, torch.Tensor] = {}
        for k in names:
            mk = prefix + k
            if mk not in mod_all:
                continue
            if not _floating(base, k):
                consts[mk] = base[k].to(self.device)
                continue
            if mk in mod_params and (pattern is None or pattern.search(k)):
                self.keys.append(k)
                self.module_name[k] = mk
            else:
                fallback.append(k)
        if not self.keys:
            sample_ck = ", ".join(names[:3])
            sample_mod = ", ".join(list(mod_params)[:3])
            raise RecipeError(
                f"{method}: no checkpoint tensor is a parameter of the module"
                + (f" and matches keys={keys!r}" if keys else "")
                + f" (checkpoint names: {sample_ck}...; module names: {sample_mod}...; prefix={prefix!r})"
            )
        self.shapes: dict[str, tuple[int, ...]] = {}
        for k in self.keys + fallback:
            shape = _shape(base, k)
            mk = prefix + k
            if tuple(mod_all[mk].shape) != shape:
                raise ShapeMismatchError(
                    f"{method}: tensor '{k}' has shape {list(shape)} in the base model, but the module's "
                    f"'{mk}' has shape {list(mod_all[mk].shape)}"
                )
            for i, m in enumerate(models):
                if k not in m:
                    raise MissingTensorError(
                        f"{method}: task model {i + 1} has no tensor '{k}' (the base has it)"
                    )
                if _shape(m, k) != shape:
                    raise ShapeMismatchError(
                        f"{method}: tensor '{k}' has shape {list(_shape(m, k))} in task model {i + 1}, "
                        f"expected {list(shape)} as in the base model (task vectors must match)"
                    )
            self.shapes[k] = shape
        # frozen tensors: θ_0 and τ_t stacked, (T, *shape), float32 on the device
        self.base: dict[str, torch.Tensor] = {}
        self.tau: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for k in self.keys:
                b = base[k].to(self.device, torch.float32)
                self.base[k] = b
                tau = torch.empty((self.n_tasks, *b.shape), device=self.device)
                for i, m in enumerate(models):  # written in place: no second copy of the task vectors
                    torch.sub(m[k].to(self.device, torch.float32), b, out=tau[i])
                self.tau[k] = tau
            for k in fallback:
                b = base[k].to(self.device, torch.float32)
                s = torch.zeros_like(b)
                for m in models:
                    s.add_(m[k].to(self.device, torch.float32) - b)
                consts[prefix + k] = (b + fallback_lambda * s).to(mod_all[prefix + k].dtype)
        for mk, t in mod_all.items():
            if mk not in consts and mk not in self.module_name.values():
                consts[mk] = t.detach().to(self.device)
        self.consts = consts
        self.fallback_keys = fallback
        self.fallback_lambda = float(fallback_lambda)
        self._heads = [self._head_params(t.head) for t in problem.tasks]

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def n_learned(self) -> int:
        return len(self.keys)

    @property
    def numel(self) -> int:
        return sum(self.base[k].numel() for k in self.keys)

    def task_vector_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tau.values())

    def fingerprint(self) -> torch.Tensor:
        """``(K, T + 1)`` float64: ‖θ_0[k]‖ and ‖τ_t[k]‖ of every learned tensor (checked by the plan)."""
        rows = []
        for k in self.keys:
            rows.append(
                [float(self.base[k].double().norm())] + [float(t.double().norm()) for t in self.tau[k]]
            )
        return torch.tensor(rows, dtype=torch.float64)

    # -- merging ----------------------------------------------------------------------------------
    def coefficients(self, init: float, mode: str) -> torch.Tensor:
        """A fresh leaf λ: ``(T,)`` task-wise or ``(T, K)`` layer-wise, filled with ``init``."""
        shape = (self.n_tasks,) if mode == "task" else (self.n_tasks, self.n_learned)
        return torch.full(shape, float(init), device=self.device, requires_grad=True)

    def mix(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_t λ_{t,k} τ_t[k] for every learned k (differentiable in λ)."""
        out = {}
        for i, k in enumerate(self.keys):
            lk = lam if lam.dim() == 1 else lam[:, i]
            out[k] = torch.tensordot(lk, self.tau[k], dims=1)
        return out

    def combine(
        self, mixed: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """θ_0 + m ⊙ mixed for the learned tensors (the mask broadcasts: element, row or tensor)."""
        out = {}
        for k in self.keys:
            out[k] = (
                self.base[k] + mixed[k] if mask is None else torch.addcmul(self.base[k], mixed[k], mask[k])
            )
        return out

    # -- forward / backward -----------------------------------------------------------------------
    def _head_params(self, head: Any) -> dict[str, torch.Tensor] | None:
        if isinstance(head, nn.Module):
            return {
                k: v.detach().to(self.device)
                for k, v in {**dict(head.named_buffers()), **dict(head.named_parameters())}.items()
            }
        return None

    def _full(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = dict(self.consts)
        for k, v in params.items():
            full[self.module_name[k]] = v
        return full

    def _head(self, t: int, out: Any) -> torch.Tensor:
        head = self.problem.tasks[t].head
        if head is None:
            return out
        hp = self._heads[t]
        return functional_call(head, hp, (out,)) if hp is not None else head(out)

    def task_logits(self, params: Mapping[str, torch.Tensor], t: int, batch: Any) -> torch.Tensor:
        """Task ``t``'s logits on ``batch`` with the learned tensors ``params`` (checkpoint names)."""
        task = self.problem.tasks[t]
        full = self._full(params)

        def backbone(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.module, full, args, kwargs)

        if task.forward is not None:
            return task.forward(backbone, batch)
        args, kwargs = _inputs(batch)
        return self._head(t, backbone(*args, **kwargs))

    def _stackable(self, batches: Sequence[Any]) -> list[torch.Tensor] | None:
        """The tasks' inputs, if one forward over their concatenation can stand for the T forwards."""
        if not self.problem.batch_tasks or any(t.forward is not None for t in self.problem.tasks):
            return None
        xs = []
        for b in batches:
            args, kwargs = _inputs(b)
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0:
                return None
            xs.append(args[0])
        if len({(tuple(x.shape[1:]), x.dtype) for x in xs}) != 1:
            return None
        return xs

    def _check_loss(self, t: int, loss: torch.Tensor) -> float:
        name = self.problem.tasks[t].name
        if loss.dim() != 0:
            raise RecipeError(
                f"{self.method}: the loss of task '{name}' must be a scalar, got shape {list(loss.shape)}"
            )
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RecipeError(
                f"{self.method}: the loss of task '{name}' is not finite (check the data and heads, "
                "or lower the learning rate)"
            )
        return value

    def losses(self, params: Mapping[str, torch.Tensor], batches: Sequence[Any]) -> list[float]:
        """Each task's loss, no gradients (for evaluation)."""
        with torch.no_grad():
            return [
                float(self.problem.tasks[t].loss(self.task_logits(params, t, b), b))
                for t, b in enumerate(batches)
            ]

    def backward(self, merged: Mapping[str, torch.Tensor], batches: Sequence[Any]) -> list[float]:
        """Σ_t L_t(θ) backpropagated to whatever ``merged`` depends on (λ, mask logits); the losses.

        The tasks' forward and backward stop at detached copies of the merged tensors; their
        gradient then flows through the merge once. The tasks run as one forward over their
        concatenated inputs when they can (tensor inputs of one shape, no custom ``forward``,
        ``FusionProblem.batch_tasks``), else one after the other, so that one task's activations are
        alive at a time.
        """
        leaves = {k: v.detach().requires_grad_(True) for k, v in merged.items()}
        losses: list[float] = []
        xs = self._stackable(batches)
        out = None
        if xs is not None:
            out = functional_call(self.module, self._full(leaves), (torch.cat(xs),))
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != sum(len(x) for x in xs):
                out = None  # not one output row per input row: one task at a time
        if out is not None:
            total = None
            for t, (part, batch) in enumerate(zip(out.split([len(x) for x in xs]), batches, strict=True)):
                loss = self.problem.tasks[t].loss(self._head(t, part), batch)
                losses.append(self._check_loss(t, loss))
                total = loss if total is None else total + loss
            assert total is not None
            total.backward()
        else:
            for t, batch in enumerate(batches):
                loss = self.problem.tasks[t].loss(self.task_logits(leaves, t, batch), batch)
                losses.append(self._check_loss(t, loss))
                loss.backward()
        outs = [v for k, v in merged.items() if v.requires_grad and leaves[k].grad is not None]
        grads = [leaves[k].grad for k, v in merged.items() if v.requires_grad and leaves[k].grad is not None]
        if outs:
            torch.autograd.backward(outs, grads)
        return losses


# ---------------------------------------------------------------------------------------------
# AdaMerging: the coefficients by entropy minimisation
# ---------------------------------------------------------------------------------------------


@dataclass
class History:
    """Loss per step of each phase, and the seconds each phase took."""

    loss: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self, max_points: int = 200) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "loss": {}}
        for phase, xs in self.loss.items():
            stride = max(1, -(-len(xs) // max_points))
            out["loss"][phase] = {
                "stride": stride,
                "values": [round(x, 6) for x in xs[::stride]],
                "first": xs[0] if xs else None,
                "last": xs[-1] if xs else None,
            }
        return out


def task_batches(
    problem: FusionProblem, batch_size: int, seed: int, device: torch.device, stream: int = 0
) -> list[Batches]:
    """One seeded batch stream per task (``stream`` tells independent streams of one run apart)."""
    from merge.methods.runner import derive_seed

    return [
        Batches(
            t.data, batch_size, derive_seed(seed, f"batches:{stream}:{t.name}"), device, f"task '{t.name}'"
        )
        for t in problem.tasks
    ]


def effective(lam: torch.Tensor, clamp: bool) -> torch.Tensor:
    """λ as used in the merge: clamped to [0, 1] when ``clamp`` (as AdaMerging's reference code)."""
    return lam.clamp(0.0, 1.0) if clamp else lam


def fit_coefficients(
    dm: DifferentiableMerge,
    *,
    init: float,
    mode: str,
    steps: int,
    lr: float,
    clamp: bool,
    batch_size: int,
    seed: int,
    mask: Mapping[str, torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
    phase: str = "adamerging",
    history: History | None = None,
) -> torch.Tensor:
    """AdaMerging (Yang et al., ICLR 2024, §3.2): λ = argmin Σ_t L_t(θ_0 + m ⊙ Σ_t λ τ_t), Adam.

    ``mode`` is ``"task"`` (Eq. 3, one λ_t per task) or ``"layer"`` (Eq. 4, one λ_{t,k} per task
    and tensor); λ starts at ``init``; ``mask`` (fixed, e.g. a Concrete read-out) is applied
    inside the merge. Returns the effective λ, detached, ``(T,)`` or ``(T, K)``.
    """
    import time

    lam = dm.coefficients(init, mode)
    opt = torch.optim.Adam([lam], lr=lr)
    batches = task_batches(dm.problem, batch_size, seed, dm.device, stream=1)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        merged = dm.combine(dm.mix(effective(lam, clamp)), mask)
        opt.zero_grad(set_to_none=True)
        loss = sum(dm.backward(merged, [next(b) for b in batches]))
        opt.step()
        losses.append(loss)
        if progress is not None:
            progress(phase, step + 1, steps, loss)
    if history is not None:
        history.loss[phase] = losses
        history.seconds[phase] = time.perf_counter() - t0
    return effective(lam, clamp).detach()
