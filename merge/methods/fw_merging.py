"""FW-Merging: merging a large pool of checkpoints by Frank-Wolfe steps on a data objective.

Chen, Hu, Luk, Hospedales & Fan, "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization",
ICCV 2025 (arXiv:2503.12649). A pool of N checkpoints θ_j of partly unknown origin (some fine-tuned
for the target tasks, some irrelevant) shares a base θ_0; τ_j = θ_j − θ_0. The merge is the
constrained problem

    min_θ f(θ) = Σ_t L_t(θ)   subject to   θ − θ_0 ∈ D

where the L_t are the target tasks' losses (any :class:`~merge.methods._fusion.FusionTask` loss:
labelled cross-entropy on a small proxy set as in the paper, or AdaMerging's entropy) and D is the
convex hull of the scaled task vectors, ``conv{s·τ_1, …, s·τ_N}`` (``include_base: false``), or
``conv{0, s·τ_1, …, s·τ_N}`` (``include_base: true``, the default: θ_0 itself is a vertex, so the
merged task vector is Σ_j α_j τ_j with α ≥ 0 and Σ_j α_j ≤ s). Frank-Wolfe, from
θ^(0) = θ_0, for k = 0 … K−1:

1. g = ∇f(θ^(k)) on one batch per target task (relevance evaluation);
2. the linear minimisation oracle (LMO): v = argmin_{v ∈ vertices} ⟨v, g⟩, i.e. the member j* with
   the most negative ⟨τ_j, g⟩ (model selection); with ``include_base`` a member is chosen only if
   its ⟨τ_j, g⟩ is negative, otherwise the vertex is θ_0 (no member helps the linear model);
3. θ^(k+1) = (1 − γ_k) θ^(k) + γ_k (θ_0 + s·τ_{j*}) (the local merge, a Frank-Wolfe update), with
   γ_k = 2/(k + 2) (``step_rule: fw``) or a line search on the same batches (``line_search``: the
   quadratic through f(θ), its slope ⟨g, v − θ⟩ and f at γ = 1, minimised on [0, 1], then halved
   until f decreases; exact on a quadratic objective; γ = 0 when no tried γ lowers f). Without
   ``include_base`` the start α = 0 is not in the simplex, so the first step is γ_0 = 1 under
   either rule (it lands on a vertex).

``lmo: layer`` (the default, the paper's layer-wise LMO and its reference code's default) solves
the LMO for each tensor k on its own: D is then the product of per-tensor hulls, each tensor
picks its own member, and the coefficients are α_{j,k}. ``lmo: task`` picks one member for the whole
model (α_j). ``oracle: cosine`` ranks members by ⟨τ_j, g⟩ / ‖τ_j‖ over the group (the reference
code's normalised alignment; it does not favour task vectors for their length) instead of the LMO's
plain inner product (``inner``, the default). In ``examples/fw_merging_digits.py`` the cosine oracle
was the more robust one when the pool held checkpoints of another base (task vectors ~6× longer,
which the inner product favours in a few tensors). The final merge is θ_0 + Σ_j α_{j,k} τ_j[k]: a
member never chosen has α = 0 exactly, however many irrelevant members the pool holds.

What is not reproduced: the paper's FW-Soft variant, and its use of another merging function (e.g.
TIES) as the local merge;
the reference code also starts from a TIES merge of the whole pool, where this starts from θ_0
(with γ_0 = 1 the first step lands on a vertex whatever the start).

**Memory.** The pool is never held: the LMO needs ⟨τ_j, g⟩ only, so every step streams each member's
learned tensors once, one tensor at a time, and then the members that were chosen once more to
build the vertex. A member given as a path is opened for its pass and closed after it; a
``Checkpoint`` given as a source is closed (its file mappings released, reopened on the next read)
after each pass. Progress is reported after every member of the oracle's pass (phase ``lmo``) and
after every step (phase ``fw``), so a cancel does not wait for a whole step. Resident: θ_0, θ and
either the gradient or the vertex (three copies of the learned tensors; a fourth, transient, at the
trial points of a line search), whatever N. Each step reads N + (chosen) members: the price of
constant memory is I/O.

Tensors that get no gradient (module buffers such as BatchNorm statistics, parameters ``keys``
leaves out, floating tensors the module does not use) follow the learned ones: each member's
coefficient for them is its mean coefficient over the learned tensors (exactly α_j task-wise), and
buffers the module uses are updated along with θ at every step.

The result is a :class:`~merge.methods._fusion_plan.FusionPlan` with one coefficient per member and
tensor (the same for every tensor task-wise), saved in the merge's ``fusion_plan/`` and applied by
the engine tensor by tensor; a saved plan re-runs with no code and no data. Library calls:
:func:`learn_fw_merging` (the plan, from state dicts, TensorSources or checkpoint paths) and
:func:`fw_merge` (the plan and the merged state dict). Recipe method: ``fw_merging``.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from merge.checkpoint import dtype_of, open_checkpoint, require_finite, shape_of
from merge.errors import MissingTensorError, NonFiniteError, RecipeError, ShapeMismatchError
from merge.methods._fusion import (
    FusionProblem,
    History,
    ProgressFn,
    _inputs,
    resolve_device,
    run_recipe,
    step_lines,
    task_batches,
)
from merge.methods._fusion_plan import FusionPlan
from merge.methods.registry import Code, FilePath, merge_method

__all__ = ["fw_merge", "fw_merging", "learn_fw_merging"]

METHOD = "fw_merging"
PAPER = "Chen et al., FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization, ICCV 2025"
URL = "https://arxiv.org/abs/2503.12649"
STEP_RULES = ("fw", "line_search")
LMOS = ("task", "layer")
ORACLES = ("inner", "cosine")
#: halvings of the line search's step before it gives up (γ = 0)
LINE_SEARCH_HALVINGS = 8

Source = Mapping[str, torch.Tensor] | str | Path


# ---------------------------------------------------------------------------------------------
# reading the pool one member at a time
# ---------------------------------------------------------------------------------------------


def _name_of(src: Any, j: int | None) -> str:
    if isinstance(src, str | Path):
        return str(src)
    path = getattr(src, "path", None)
    if path is not None and str(path) != "state dict":
        return str(path)
    return "base" if j is None else f"member{j + 1}"


@contextmanager
def _reading(src: Source) -> Iterator[Mapping[str, torch.Tensor]]:
    """The source for one pass: a path is opened and closed; a source with ``close`` is released after."""
    if isinstance(src, str | Path):
        ck = open_checkpoint(src)
        try:
            yield ck
        finally:
            ck.close()
        return
    try:
        yield src
    finally:
        close = getattr(src, "close", None)
        if callable(close):
            close()


# ---------------------------------------------------------------------------------------------
# the objective: Σ_t L_t at the merged weights, and its gradient
# ---------------------------------------------------------------------------------------------


class _Objective:
    """f(θ) = Σ_t L_t(θ) through the user's module, by ``functional_call`` (the module is not modified)."""

    def __init__(
        self, problem: FusionProblem, consts: dict[str, torch.Tensor], learned: list[str], device: torch.device
    ) -> None:
        self.problem = problem
        self.consts = consts
        self.learned = learned
        self.device = device
        self.heads = [
            {
                k: v.detach().to(device)
                for k, v in {**dict(t.head.named_buffers()), **dict(t.head.named_parameters())}.items()
            }
            if isinstance(t.head, nn.Module)
            else None
            for t in problem.tasks
        ]

    def _full(self, theta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = dict(self.consts)
        p = self.problem.prefix
        for k, v in theta.items():
            full[p + k] = v
        return full

    def _loss(self, full: dict[str, torch.Tensor], t: int, batch: Any) -> torch.Tensor:
        task = self.problem.tasks[t]
        module = self.problem.model

        def backbone(*args: Any, **kwargs: Any) -> Any:
            return functional_call(module, full, args, kwargs)

        if task.forward is not None:
            out = task.forward(backbone, batch)
        else:
            args, kwargs = _inputs(batch)
            out = backbone(*args, **kwargs)
            if task.head is not None:
                hp = self.heads[t]
                out = functional_call(task.head, hp, (out,)) if hp is not None else task.head(out)
        loss = task.loss(out, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise RecipeError(
                f"{METHOD}: the loss of task '{task.name}' must be a scalar tensor, got "
                f"{list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}"
            )
        if not math.isfinite(float(loss.detach())):
            raise RecipeError(f"{METHOD}: the loss of task '{task.name}' is not finite (check the data and heads)")
        return loss

    def value(self, theta: Mapping[str, torch.Tensor], batches: Sequence[Any]) -> float:
        with torch.no_grad():
            full = self._full(theta)
            return sum(float(self._loss(full, t, b)) for t, b in enumerate(batches))

    def value_and_grad(
        self, theta: Mapping[str, torch.Tensor], batches: Sequence[Any]
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """f and ∇f w.r.t. the learned tensors; one task's activations alive at a time."""
        leaves = {k: theta[k].detach().requires_grad_(True) for k in self.learned}
        full = self._full({**theta, **leaves})
        total = 0.0
        for t, b in enumerate(batches):
            loss = self._loss(full, t, b)
            loss.backward()
            total += float(loss.detach())
        grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
        return total, grads


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def _choice(value: str, options: tuple[str, ...], param: str) -> str:
    if value not in options:
        raise RecipeError(f"{METHOD}: parameter '{param}' must be one of {', '.join(options)}; got {value!r}")
    return value


def _check_params(steps: int, step_rule: str, lmo: str, oracle: str, scale: float, batch_size: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RecipeError(f"{METHOD}: parameter 'steps' must be an integer >= 1, got {steps!r}")
    _choice(step_rule, STEP_RULES, "step_rule")
    _choice(lmo, LMOS, "lmo")
    _choice(oracle, ORACLES, "oracle")
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise RecipeError(f"{METHOD}: parameter 'scale' must be a positive finite number, got {scale!r}")
    if batch_size < 1:
        raise RecipeError(f"{METHOD}: parameter 'batch_size' must be >= 1, got {batch_size}")


def _check_problem(problem: FusionProblem) -> None:
    if not isinstance(problem, FusionProblem):
        raise RecipeError(f"{METHOD}: expected a FusionProblem (module, target tasks), got {type(problem).__name__}")
    if not isinstance(problem.model, nn.Module):
        raise RecipeError(f"{METHOD}: FusionProblem.model must be an nn.Module, got {type(problem.model).__name__}")
    if not problem.tasks:
        raise RecipeError(f"{METHOD}: the problem has no target task (give at least one FusionTask)")
    names = [t.name for t in problem.tasks]
    if len(set(names)) != len(names):
        raise RecipeError(f"{METHOD}: task names must be unique, got {names}")


def _check_pool(base: Mapping[str, torch.Tensor], members: Sequence[Source], names: list[str],
                floating: list[str]) -> None:
    """Every member has the base's floating tensors with the base's shapes (headers only)."""
    for j, src in enumerate(members):
        with _reading(src) as m:
            for k in floating:
                if k not in m:
                    raise MissingTensorError(
                        f"{METHOD}: pool member {j + 1} ({names[j]}) has no tensor '{k}' (the base has it)"
                    )
                if shape_of(m, k) != shape_of(base, k):
                    raise ShapeMismatchError(
                        f"{METHOD}: tensor '{k}' has shape {list(shape_of(m, k))} in pool member {j + 1} "
                        f"({names[j]}), expected {list(shape_of(base, k))} as in the base model "
                        "(task vectors must match)"
                    )


# ---------------------------------------------------------------------------------------------
# the library calls
# ---------------------------------------------------------------------------------------------


def _line_search(f0: float, slope: float, evaluate: Callable[[float], float]) -> tuple[float, int]:
    """γ ∈ [0, 1] from f(0) = f0, f'(0) = slope and f(1): the quadratic's minimiser, halved until f < f0."""
    if not slope < 0:
        return 0.0, 0
    f1 = evaluate(1.0)
    evals = 1
    c = f1 - f0 - slope
    gamma = 1.0 if c <= 0 else min(1.0, -slope / (2.0 * c))
    fg = f1 if gamma == 1.0 else evaluate(gamma)
    evals += gamma != 1.0
    for _ in range(LINE_SEARCH_HALVINGS):
        if fg < f0:
            return gamma, evals
        gamma /= 2.0
        fg = evaluate(gamma)
        evals += 1
    return (gamma, evals) if fg < f0 else (0.0, evals)


def _trial(
    objective: _Objective,
    theta: dict[str, torch.Tensor],
    vertex: dict[str, torch.Tensor],
    batches: list[Any],
    gamma: float,
) -> float:
    """f((1 − γ) θ + γ v) on the step's batches (a line-search trial point)."""
    return objective.value({k: torch.lerp(theta[k], vertex[k], gamma) for k in theta}, batches)


def learn_fw_merging(
    base: Source,
    members: Sequence[Source],
    problem: FusionProblem,
    *,
    steps: int = 10,
    step_rule: str = "fw",
    lmo: str = "layer",
    oracle: str = "inner",
    scale: float = 1.0,
    include_base: bool = True,
    batch_size: int = 64,
    keys: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
    member_names: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> FusionPlan:
    """FW-Merging (Chen et al., ICCV 2025): Frank-Wolfe steps over the pool's scaled task vectors.

    ``base`` and each of ``members`` is a state dict, a TensorSource or a checkpoint path; members are
    read one at a time, once per step (plus the chosen ones once more), never held together.
    ``problem`` gives the architecture and the *target* tasks (any number, unrelated to the pool's
    size): f = Σ_t L_t on one batch of ``batch_size`` per task and step (seeded by ``seed``).
    ``steps`` Frank-Wolfe steps with γ_k = 2/(k+2) (``step_rule: fw``) or a line search; ``lmo``
    ``layer`` (one member per tensor) or ``task`` (one per model); ``oracle`` ``inner`` (⟨τ_j, g⟩) or
    ``cosine``; vertices s·τ_j with s = ``scale``, plus θ_0 when ``include_base``; ``keys`` (a regular
    expression) restricts the learned tensors. Returns the plan (coefficients (N, K)); its ``info``
    has the objective, the Frank-Wolfe gap and the step size per step, and the members chosen.
    """
    t_start = time.perf_counter()
    _check_params(steps, step_rule, lmo, oracle, scale, batch_size)
    _check_problem(problem)
    members = list(members)
    if not members:
        raise RecipeError(f"{METHOD}: the pool is empty; give at least one checkpoint to merge besides the base")
    names = list(member_names) if member_names is not None else [_name_of(m, j) for j, m in enumerate(members)]
    if len(names) != len(members):
        raise RecipeError(f"{METHOD}: {len(names)} member names for {len(members)} pool members")
    try:
        pattern = re.compile(keys) if keys else None
    except re.error as e:
        raise RecipeError(f"{METHOD}: parameter 'keys' is not a valid regular expression: {e}") from None
    dev = resolve_device(device)
    n = len(members)
    base_opened = isinstance(base, str | Path)
    base_src: Mapping[str, torch.Tensor] = open_checkpoint(base) if base_opened else base  # type: ignore[arg-type]
    try:
        return _learn(
            base_src, members, names, problem, pattern, steps=steps, step_rule=step_rule, lmo=lmo,
            oracle=oracle, scale=float(scale), include_base=include_base, batch_size=batch_size,
            keys=keys, seed=seed, device=dev, progress=progress, t_start=t_start, n=n,
        )
    finally:
        if base_opened:
            base_src.close()  # type: ignore[attr-defined]


def _learn(
    base: Mapping[str, torch.Tensor],
    members: list[Source],
    names: list[str],
    problem: FusionProblem,
    pattern: re.Pattern[str] | None,
    *,
    steps: int,
    step_rule: str,
    lmo: str,
    oracle: str,
    scale: float,
    include_base: bool,
    batch_size: int,
    keys: str,
    seed: int,
    device: torch.device,
    progress: ProgressFn | None,
    t_start: float,
    n: int,
) -> FusionPlan:
    # -- which tensors: learned (module parameters), followers (used by the module, no gradient), others
    prefix = problem.prefix
    module = problem.model
    mod_params = dict(module.named_parameters())
    mod_all = {**dict(module.named_buffers()), **mod_params}
    floating = [k for k in base.keys() if dtype_of(base, k).is_floating_point]
    learned: list[str] = []
    followers: list[str] = []
    consts: dict[str, torch.Tensor] = {}
    for k in base.keys():
        mk = prefix + k
        if mk not in mod_all:
            continue
        shape = shape_of(base, k)
        if tuple(mod_all[mk].shape) != shape:
            raise ShapeMismatchError(
                f"{METHOD}: tensor '{k}' has shape {list(shape)} in the base model, but the module's "
                f"'{mk}' has shape {list(mod_all[mk].shape)}"
            )
        if not dtype_of(base, k).is_floating_point:
            consts[mk] = base[k].to(device)
        elif mk in mod_params and (pattern is None or pattern.search(k)):
            learned.append(k)
        else:
            followers.append(k)
    if not learned:
        sample_ck = ", ".join(list(base.keys())[:3])
        sample_mod = ", ".join(list(mod_params)[:3])
        raise RecipeError(
            f"{METHOD}: no checkpoint tensor is a parameter of the module"
            + (f" and matches keys={keys!r}" if keys else "")
            + f" (checkpoint names: {sample_ck}...; module names: {sample_mod}...; prefix={prefix!r})"
        )
    _check_pool(base, members, names, floating)
    in_module = {prefix + k for k in learned + followers} | set(consts)
    for mk, t in mod_all.items():
        if mk not in in_module:
            consts[mk] = t.detach().to(device)
    tracked = learned + followers  # resident: θ_0 and θ of these
    col = {k: i for i, k in enumerate(learned)}
    n_groups = len(learned) if lmo == "layer" else 1

    def group(k: str) -> int:
        return col[k] if lmo == "layer" else 0

    theta0 = {k: base[k].to(device, torch.float32) for k in tracked}
    theta = {k: v.clone() for k, v in theta0.items()}
    objective = _Objective(problem, consts, learned, device)
    streams = task_batches(problem, batch_size, seed, device)

    # α (N, K_learned): the coefficient of τ_j in tensor k; float64 bookkeeping
    alpha = torch.zeros(n, len(learned), dtype=torch.float64)
    fingerprint = torch.zeros(len(floating), n + 1, dtype=torch.float64)
    fp_row = {k: i for i, k in enumerate(floating)}
    for k in floating:
        b = theta0[k] if k in theta0 else base[k].float()
        fingerprint[fp_row[k], 0] = float(b.double().norm())
        del b
    history = History()
    losses: list[float] = []
    gaps: list[float] = []
    gammas: list[float] = []
    selected: list[Any] = []
    reads: list[int] = []
    evals_total = 0

    for step in range(steps):
        batches = [next(s) for s in streams]
        f0, grad = objective.value_and_grad(theta, batches)
        # <g, θ − θ_0> (for the gap and the line search's slope)
        g_delta = sum(float(torch.dot(grad[k].flatten(), (theta[k] - theta0[k]).flatten())) for k in learned)
        # -- LMO: ⟨τ_j, g⟩ per group, streaming each member once --------------------------------------
        raw = torch.zeros(n, n_groups, dtype=torch.float64, device=device)
        sq = torch.zeros(n, n_groups, dtype=torch.float64, device=device)
        fp = torch.zeros(len(floating), n, dtype=torch.float64, device=device) if step == 0 else None
        n_reads = 0
        for j, src in enumerate(members):
            with _reading(src) as m:
                for k in learned if fp is None else floating:
                    t = m[k]
                    if fp is not None:
                        require_finite(t, names[j], k)
                    tau = t.to(device, torch.float32)
                    del t
                    tau = tau - (theta0[k] if k in theta0 else base[k].to(device, torch.float32))
                    n_reads += 1
                    if fp is not None:
                        fp[fp_row[k], j] = tau.double().norm()
                    if k in col:
                        gi = group(k)
                        raw[j, gi] += torch.dot(tau.flatten(), grad[k].flatten()).double()
                        if oracle == "cosine":
                            sq[j, gi] += torch.dot(tau.flatten(), tau.flatten()).double()
                    del tau
            if progress is not None:  # a long pass over a large pool: report (and let a cancel through) per member
                progress("lmo", j + 1, n, f0)
        raw, sq = raw.cpu(), sq.cpu()
        if fp is not None:
            fingerprint[:, 1:] = fp.cpu()
        for j in range(n):
            if not bool(torch.isfinite(raw[j]).all()):
                raise NonFiniteError(f"{METHOD}: ⟨τ, g⟩ of pool member {j + 1} ({names[j]}) is not finite")
        del grad
        if oracle == "cosine":
            norms = sq.sqrt()
            score = torch.where(norms > 0, raw / norms.clamp_min(1e-300), torch.zeros_like(raw))
        else:
            score = raw
        choice: list[int] = []  # per group: the member, or -1 for θ_0
        for gi in range(n_groups):
            col_scores = score[:, gi].tolist()
            best = min(range(n), key=lambda j: (col_scores[j], j))
            if include_base and not col_scores[best] < 0:
                best = -1
            choice.append(best)
        lin = sum(scale * float(raw[j, gi]) for gi, j in enumerate(choice) if j >= 0)
        slope = lin - g_delta  # ⟨g, v − θ⟩ = −(Frank-Wolfe gap)
        # -- the vertex v = θ_0 + s·τ_{j*} per group; followers move with the members' mean share -------
        share = torch.zeros(n, dtype=torch.float64)  # u_j: s × the fraction of learned tensors choosing j
        for k in learned:
            j = choice[group(k)]
            if j >= 0:
                share[j] += scale / len(learned)
        vertex = {k: v.clone() for k, v in theta0.items()}
        touched = sorted({j for j in choice if j >= 0})
        for j in touched:
            with _reading(members[j]) as m:
                for k in learned:
                    if choice[group(k)] == j:
                        t = m[k]
                        vertex[k].add_(t.to(device, torch.float32) - theta0[k], alpha=scale)
                        del t
                        n_reads += 1
                if share[j] > 0:
                    for k in followers:
                        t = m[k]
                        vertex[k].add_(t.to(device, torch.float32) - theta0[k], alpha=float(share[j]))
                        del t
                        n_reads += 1
        # -- step size -------------------------------------------------------------------------------
        if step_rule == "fw" or (step == 0 and not include_base):
            # without θ_0 among the vertices the start is not feasible: the first step lands on a vertex
            gamma = 2.0 / (step + 2.0)
        else:
            at = functools.partial(_trial, objective, theta, vertex, batches)
            gamma, evals = _line_search(f0, slope, at)
            evals_total += evals
        # -- update ----------------------------------------------------------------------------------
        if gamma > 0:
            for k in tracked:
                theta[k].lerp_(vertex[k], gamma)
            alpha.mul_(1.0 - gamma)
            for k in learned:
                j = choice[group(k)]
                if j >= 0:
                    alpha[j, col[k]] += gamma * scale
        del vertex
        losses.append(f0)
        gaps.append(-slope)
        gammas.append(gamma)
        reads.append(n_reads)
        if lmo == "task":
            selected.append(choice[0])
        else:
            counts: dict[int, int] = {}
            for j in choice:
                counts[j] = counts.get(j, 0) + 1
            selected.append({str(j): c for j, c in sorted(counts.items())})
        if progress is not None:
            progress("fw", step + 1, steps, f0)

    history.loss["objective"] = losses
    history.loss["fw_gap"] = gaps
    history.loss["step_size"] = gammas
    history.seconds["fw"] = time.perf_counter() - t_start
    # -- the plan: learned tensors their α, the others each member's mean α --------------------------
    mean_alpha = alpha.mean(1)
    lambdas = torch.stack(
        [alpha[:, col[k]] if k in col else mean_alpha for k in floating], dim=1
    ).float()
    resident = sum(v.numel() * v.element_size() for v in theta0.values())
    info = {
        "hyperparameters": {
            "steps": steps,
            "step_rule": step_rule,
            "lmo": lmo,
            "oracle": oracle,
            "scale": scale,
            "include_base": include_base,
            "batch_size": batch_size,
            "keys": keys,
            "seed": seed,
        },
        "history": history.summary(),
        "selected": selected,
        "target_tasks": [t.name for t in problem.tasks],
        "members": names,
        "learned_tensors": len(learned),
        "follower_tensors": len(followers),
        "coefficient_sum_per_member": alpha.sum(1).tolist(),
        "mean_coefficient_per_member": mean_alpha.tolist(),
        "members_used": int((alpha.abs().sum(1) > 0).sum()),
        "tensor_reads_per_step": reads,
        "line_search_evaluations": evals_total,
        # θ_0, θ and the gradient or the vertex, whatever the pool size
        "resident_bytes": 3 * resident,
        "seconds": round(time.perf_counter() - t_start, 3),
        "device": str(device),
    }
    return FusionPlan(
        method=METHOD,
        keys=floating,
        shapes={k: tuple(shape_of(base, k)) for k in floating},
        lambdas=lambdas,
        mask=None,
        fallback_lambda=0.0,
        fingerprint=fingerprint,
        task_names=names,
        info=info,
    )


def fw_merge(
    base: Source, members: Sequence[Source], problem: FusionProblem, **kwargs: Any
) -> tuple[dict[str, torch.Tensor], FusionPlan]:
    """:func:`learn_fw_merging`, then the plan applied: (merged state dict (float32 floating tensors), plan).

    The merged weights are what the engine writes for the same recipe (``FusionPlan.merge``).
    Paths are opened as checkpoints (lazily) for the application and closed after it.
    """
    plan = learn_fw_merging(base, members, problem, **kwargs)
    opened = []

    def src(x: Source) -> Mapping[str, torch.Tensor]:
        if isinstance(x, str | Path):
            ck = open_checkpoint(x)
            opened.append(ck)
            return ck
        return x

    try:
        merged = plan.merge(src(base), [src(m) for m in members])
    finally:
        for ck in opened:
            ck.close()
    return merged, plan


# ---------------------------------------------------------------------------------------------
# recipe method
# ---------------------------------------------------------------------------------------------


@merge_method(METHOD, paper=PAPER, url=URL, kind="whole_model", base="required", min_models=1)
def fw_merging(
    models: list[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    *,
    entry_point: Code = "",
    plan: FilePath = "",
    verify: bool = True,
    steps: int = 10,
    step_rule: str = "fw",
    lmo: str = "layer",
    oracle: str = "inner",
    scale: float = 1.0,
    include_base: bool = True,
    batch_size: int = 64,
    keys: str = "",
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> FusionPlan:
    """FW-Merging: Frank-Wolfe steps over a pool of checkpoints towards the member whose task vector
    best lowers the target tasks' loss (per tensor or per model); unused members get weight 0.

    θ − θ_0 ∈ conv{0, s·τ_j} (``include_base``) or conv{s·τ_j}, s = ``scale``; per step the gradient
    of Σ_t L_t (one batch of ``batch_size`` per target task), the LMO argmin_j ⟨τ_j, g⟩ (``oracle``
    ``inner``; ``cosine`` normalises by ‖τ_j‖) per tensor (``lmo: layer``) or for the whole model
    (``task``), and θ ← (1 − γ) θ + γ (θ_0 + s·τ_j*) with γ = 2/(k+2) (``step_rule: fw``) or a line
    search; ``steps`` steps. Members are streamed one at a time, never held together; irrelevant
    ones that are never chosen get coefficient 0.

    Learns from the FusionProblem (architecture and *target* tasks: any number of them, whatever
    the pool's size) the ``entry_point`` function returns (``package.module:function`` or
    ``file.py:function``; needs ``--allow-code``), or applies a saved ``plan`` folder (no data;
    ``verify`` checks the models are the ones it was learned on). The output has the plan
    (coefficient per member and tensor) in ``fusion_plan/``.
    """
    _check_params(steps, step_rule, lmo, oracle, scale, batch_size)
    return run_recipe(
        METHOD,
        models,
        base,
        entry_point=entry_point,
        plan=plan,
        verify=verify,
        device=device,
        progress=step_lines(METHOD, progress),
        needs_base=True,
        load=FusionPlan.load,
        learn=learn_fw_merging,
        steps=steps,
        step_rule=step_rule,
        lmo=lmo,
        oracle=oracle,
        scale=scale,
        include_base=include_base,
        batch_size=batch_size,
        keys=keys,
        seed=seed,
    )
