"""Data-driven merging: AdaMerging and Concrete subspace masks (Concrete TA, Concrete AdaMerging).

- **AdaMerging** (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-task Learning",
  ICLR 2024, arXiv:2310.02575): θ = θ_0 + Σ_t λ_t τ_t (task-wise, Eq. 3) or
  θ[k] = θ_0[k] + Σ_t λ_{t,k} τ_t[k] (layer-wise, Eq. 4), λ by minimising the entropy of each
  task's predictions on its unlabelled inputs through its own frozen head (§3.2, Eq. 6).
- **Concrete subspace masks** (Tang et al., "Concrete Subspace Learning based Interference
  Elimination for Multi-task Model Fusion", arXiv:2312.06173): one mask m shared by all task
  vectors, θ = θ_0 + Σ_t λ_t (m ⊙ τ_t) (Eq. 5), relaxed to a Concrete (binary Gumbel-softmax)
  distribution with logits x and temperature κ (§3.2): u ~ U(0, 1),
  m̂ = σ((x + log u − log(1 − u)) / κ), rescaled m = m̂ / mean(m̂) per tensor (as the reference
  code, so sparsifying does not shrink the update), and learned by the same entropy objective:

  * **Concrete Task Arithmetic**: λ_t fixed (0.3), min_x E_m Σ_t H_t(θ(m, λ)).
  * **Concrete AdaMerging** (the bi-level problem of Eq. 7, first-order): per step, sample m;
    inner: reset λ to its initial value, one Adam step on λ with m detached; outer: with that λ
    held constant and a fresh batch per task, one Adam step on x. Then read the mask out, fix it
    and run AdaMerging for λ inside it (the reference code's phase 2). The reference code builds
    the inner step's merged weights *before* it resets λ (so the inner gradient is taken at the
    previous step's λ); here the order is reset, merge, evaluate, step.

  Read-outs of the learned mask: ``sample`` (one relaxed sample at κ, the reference default;
  seeded), ``bernoulli`` (a discrete sample, seeded), ``expected`` (σ(x)) and ``threshold``
  (1[x > 0]), each rescaled by its mean. The mask is per parameter (the paper) or, for large
  models, per row or per tensor; with ``tensor`` granularity the rescale uses the model-wide mean
  (per tensor it would always be 1).

The learned result is a :class:`~merge.methods._fusion_plan.FusionPlan` (mask + coefficients),
saved as safetensors + a JSON card and applied by the streaming engine. Library calls:
:func:`learn_adamerging`, :func:`learn_concrete_task_arithmetic`, :func:`learn_concrete_adamerging`
(state dicts + a :class:`FusionProblem`). Recipe methods: ``adamerging``, ``concrete_task_arithmetic``,
``concrete_adamerging``, with the architecture, heads and unlabelled data from the ``entry_point``
a user names (``package.module:function`` returning a FusionProblem; needs ``--allow-code``), or a
saved ``plan``; the merge's output folder holds the plan in ``fusion_plan/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from merge.errors import RecipeError
from merge.methods._fusion import (
    DifferentiableMerge,
    FusionProblem,
    FusionTask,
    History,
    ProgressFn,
    cross_entropy_loss,
    effective,
    entropy_loss,
    fit_coefficients,
    run_recipe,
    step_lines,
    task_batches,
)
from merge.methods._fusion_plan import FusionPlan, PlanMismatchError
from merge.methods.registry import Code, FilePath, merge_method
from merge.methods.runner import derive_seed

__all__ = [
    "ConcreteMask",
    "FusionPlan",
    "FusionProblem",
    "FusionTask",
    "PlanMismatchError",
    "adamerging",
    "concrete_adamerging",
    "concrete_task_arithmetic",
    "cross_entropy_loss",
    "entropy_loss",
    "learn_adamerging",
    "learn_concrete_adamerging",
    "learn_concrete_task_arithmetic",
]

StateDict = Mapping[str, torch.Tensor]
GRANULARITIES = ("element", "row", "tensor")
READOUTS = ("sample", "bernoulli", "expected", "threshold")
MODES = ("task", "layer")
_EPS = 1e-6

_TANG = (
    "Tang et al., Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion, 2023"
)
_TANG_URL = "https://arxiv.org/abs/2312.06173"
_YANG = "Yang et al., AdaMerging: Adaptive Model Merging for Multi-task Learning, ICLR 2024"
_YANG_URL = "https://arxiv.org/abs/2310.02575"


def _choice(value: str, options: tuple[str, ...], param: str, method: str) -> str:
    if value not in options:
        raise RecipeError(f"{method}: parameter '{param}' must be one of {', '.join(options)}; got {value!r}")
    return value


def _positive(value: float, param: str, method: str, *, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise RecipeError(
            f"{method}: parameter '{param}' must be a {'non-negative' if allow_zero else 'positive'} "
            f"finite number, got {value}"
        )


# ---------------------------------------------------------------------------------------------
# the Concrete mask
# ---------------------------------------------------------------------------------------------


class ConcreteMask:
    """Mask logits x over the learned tensors, their Concrete samples and read-outs (Tang et al. §3.2).

    ``granularity``: ``element`` (x has the tensor's shape), ``row`` (one logit per row of dim 0)
    or ``tensor`` (one logit per tensor). Samples are drawn from one generator per tensor, seeded
    from ``seed`` and the tensor's name, so a run is reproducible whatever else changes.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        granularity: str = "element",
        init_logits: float = 0.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.granularity = _choice(granularity, GRANULARITIES, "granularity", "concrete")
        self.device = torch.device(device)
        self.shapes = dict(shapes)
        self.seed = seed
        self.logits: dict[str, torch.Tensor] = {}
        for k, shape in self.shapes.items():
            self.logits[k] = torch.full(
                self.logit_shape(shape), float(init_logits), device=self.device, requires_grad=True
            )
        self._gens = {k: self._gen(f"concrete:{k}") for k in self.shapes}

    def logit_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.granularity == "element" or not shape:
            return tuple(shape)
        if self.granularity == "row":
            return (shape[0],) + (1,) * (len(shape) - 1)
        return (1,) * len(shape)

    def _gen(self, stream: str) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, stream))
        return g

    def parameters(self) -> list[torch.Tensor]:
        return list(self.logits.values())

    @property
    def numel(self) -> int:
        return sum(x.numel() for x in self.logits.values())

    def _noise(self, k: str, gen: torch.Generator) -> torch.Tensor:
        """Logistic noise log u − log(1 − u), u ~ U(0, 1) (in place: one buffer)."""
        x = self.logits[k]
        u = torch.rand(x.shape, generator=gen, device=self.device).clamp_(_EPS, 1 - _EPS)
        return u.logit_()

    def rescale(self, m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """m / mean(m): per tensor (element, row), model-wide for ``tensor`` granularity; 0 stays 0."""
        if self.granularity == "tensor":
            total = sum(math.prod(self.shapes[k]) for k in m)
            mean = sum(v.sum() * (math.prod(self.shapes[k]) / v.numel()) for k, v in m.items()) / max(
                1, total
            )
            return {k: v / mean.clamp_min(1e-12) for k, v in m.items()}
        return {k: v / v.mean().clamp_min(1e-12) for k, v in m.items()}

    def sample(self, temperature: float, *, rescale: bool = True) -> dict[str, torch.Tensor]:
        """A relaxed sample m̂ = σ((x + log u − log(1 − u)) / κ), differentiable in x (rescaled)."""
        m = {
            k: torch.sigmoid((x + self._noise(k, self._gens[k])).div_(temperature))
            for k, x in self.logits.items()
        }
        return self.rescale(m) if rescale else m

    @torch.no_grad()
    def readout(
        self, kind: str, temperature: float = 0.5, *, rescale: bool = True
    ) -> dict[str, torch.Tensor]:
        """The final mask: ``sample``, ``bernoulli`` (seeded), ``expected`` σ(x), ``threshold`` 1[x > 0]."""
        _choice(kind, READOUTS, "readout", "concrete")
        m: dict[str, torch.Tensor] = {}
        for k, x in self.logits.items():
            if kind == "expected":
                m[k] = torch.sigmoid(x)
            elif kind == "threshold":
                m[k] = (x > 0).float()
            else:
                gen = self._gen(f"readout:{k}")
                if kind == "sample":
                    m[k] = torch.sigmoid((x + self._noise(k, gen)) / temperature)
                else:
                    u = torch.rand(x.shape, generator=gen, device=self.device)
                    m[k] = (u < torch.sigmoid(x)).float()
        return {k: v.detach() for k, v in (self.rescale(m) if rescale else m).items()}

    @torch.no_grad()
    def keep_probability(self) -> float:
        """Mean σ(x) over the learned entries (weighted by how many entries each logit covers)."""
        tot = n = 0.0
        for k, x in self.logits.items():
            w = math.prod(self.shapes[k]) / x.numel()
            tot += float(torch.sigmoid(x).sum()) * w
            n += math.prod(self.shapes[k])
        return tot / max(1.0, n)


# ---------------------------------------------------------------------------------------------
# library calls
# ---------------------------------------------------------------------------------------------


def _info(
    dm: DifferentiableMerge,
    history: History,
    hyper: dict[str, Any],
    t0: float,
    mask: ConcreteMask | None = None,
) -> dict[str, Any]:
    out = {
        "hyperparameters": hyper,
        "history": history.summary(),
        "seconds": round(time.perf_counter() - t0, 3),
        "device": str(dm.device),
        "learned_tensors": dm.n_learned,
        "learned_elements": dm.numel,
        "fallback_tensors": len(dm.fallback_keys),
        "task_vector_bytes": dm.task_vector_bytes(),
    }
    if mask is not None:
        out["mask_logits"] = mask.numel
        out["keep_probability"] = round(mask.keep_probability(), 6)
    return out


def _plan(
    method: str,
    dm: DifferentiableMerge,
    lam: torch.Tensor,
    mask: dict[str, torch.Tensor] | None,
    info: dict[str, Any],
) -> FusionPlan:
    lam = lam.detach().float().cpu()
    if lam.dim() == 1:
        lam = lam[:, None].expand(-1, dm.n_learned)
    return FusionPlan(
        method=method,
        keys=list(dm.keys),
        shapes={k: dm.shapes[k] for k in dm.keys},
        lambdas=lam.contiguous(),
        mask=mask,
        fallback_lambda=dm.fallback_lambda,
        fingerprint=dm.fingerprint(),
        task_names=[t.name for t in dm.problem.tasks],
        info=info,
    )


def learn_adamerging(
    base: StateDict,
    models: Sequence[StateDict],
    problem: FusionProblem,
    *,
    coefficients: str = "layer",
    lambda_: float = 0.3,
    steps: int = 500,
    lr: float = 1e-3,
    clamp: bool = True,
    batch_size: int = 16,
    keys: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> FusionPlan:
    """AdaMerging (Yang et al., ICLR 2024): task-wise (Eq. 3) or layer-wise (Eq. 4) λ by entropy.

    λ starts at ``lambda_`` (the paper's prior 0.3), Adam with ``lr`` for ``steps`` steps, one batch
    of ``batch_size`` unlabelled inputs per task per step, λ clamped to [0, 1] when ``clamp`` (as
    the reference code). Returns the plan; ``plan.merge(base, models)`` gives the merged weights.
    """
    method = "adamerging"
    _choice(coefficients, MODES, "coefficients", method)
    _check_common(method, steps=steps, lr=lr, batch_size=batch_size, lambda_=lambda_)
    t0 = time.perf_counter()
    dm = DifferentiableMerge(
        base, models, problem, keys=keys, fallback_lambda=lambda_, device=device, method=method
    )
    history = History()
    lam = fit_coefficients(
        dm,
        init=lambda_,
        mode=coefficients,
        steps=steps,
        lr=lr,
        clamp=clamp,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        phase="coefficients",
        history=history,
    )
    hyper = {
        "coefficients": coefficients,
        "lambda": lambda_,
        "steps": steps,
        "lr": lr,
        "clamp": clamp,
        "batch_size": batch_size,
        "keys": keys,
        "seed": seed,
    }
    return _plan(method, dm, lam, None, _info(dm, history, hyper, t0))


def _check_common(method: str, *, steps: int, lr: float, batch_size: int, lambda_: float) -> None:
    if steps < 0:
        raise RecipeError(f"{method}: parameter 'steps' must be >= 0, got {steps}")
    if batch_size < 1:
        raise RecipeError(f"{method}: parameter 'batch_size' must be >= 1, got {batch_size}")
    _positive(lr, "lr", method, allow_zero=True)
    if not math.isfinite(lambda_):
        raise RecipeError(f"{method}: parameter 'lambda' must be finite, got {lambda_}")


def _check_mask_params(
    method: str, temperature: float, init_logits: float, granularity: str, readout: str
) -> None:
    _positive(temperature, "temperature", method)
    if not math.isfinite(init_logits):
        raise RecipeError(f"{method}: parameter 'init_logits' must be finite, got {init_logits}")
    _choice(granularity, GRANULARITIES, "granularity", method)
    _choice(readout, READOUTS, "readout", method)


def learn_concrete_task_arithmetic(
    base: StateDict,
    models: Sequence[StateDict],
    problem: FusionProblem,
    *,
    lambda_: float = 0.3,
    steps: int = 2000,
    lr: float = 1e-3,
    temperature: float = 0.5,
    init_logits: float = 0.0,
    granularity: str = "element",
    readout: str = "sample",
    rescale: bool = True,
    batch_size: int = 16,
    keys: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> FusionPlan:
    """Concrete Task Arithmetic (Tang et al., §3.2, Eq. 5 with λ fixed): learn the shared mask.

    Each step samples a relaxed mask (temperature κ = ``temperature``, logits starting at
    ``init_logits``; 0 is keep-probability 0.5 as in the reference scripts), rescales it, merges
    θ_0 + λ m ⊙ Σ_t τ_t and takes one Adam step (``lr``) on the logits against the summed task
    losses (entropy by default) on one batch per task. The plan holds the ``readout`` mask and λ.
    """
    method = "concrete_task_arithmetic"
    _check_common(method, steps=steps, lr=lr, batch_size=batch_size, lambda_=lambda_)
    _check_mask_params(method, temperature, init_logits, granularity, readout)
    t0 = time.perf_counter()
    dm = DifferentiableMerge(
        base, models, problem, keys=keys, fallback_lambda=lambda_, device=device, method=method
    )
    mask = ConcreteMask(
        {k: dm.shapes[k] for k in dm.keys},
        granularity=granularity,
        init_logits=init_logits,
        seed=seed,
        device=dm.device,
    )
    lam = torch.full((dm.n_tasks,), float(lambda_), device=dm.device)
    with torch.no_grad():
        mixed = dm.mix(lam)  # fixed λ: Σ_t λ τ_t once
    opt = torch.optim.Adam(mask.parameters(), lr=lr)
    batches = task_batches(problem, batch_size, seed, dm.device)
    losses: list[float] = []
    t1 = time.perf_counter()
    for step in range(steps):
        merged = dm.combine(mixed, mask.sample(temperature, rescale=rescale))
        opt.zero_grad(set_to_none=True)
        loss = sum(dm.backward(merged, [next(b) for b in batches]))
        opt.step()
        losses.append(loss)
        if progress is not None:
            progress("mask", step + 1, steps, loss)
    history = History({"mask": losses}, {"mask": time.perf_counter() - t1})
    final = mask.readout(readout, temperature, rescale=rescale)
    hyper = {
        "lambda": lambda_,
        "steps": steps,
        "lr": lr,
        "temperature": temperature,
        "init_logits": init_logits,
        "granularity": granularity,
        "readout": readout,
        "rescale": rescale,
        "batch_size": batch_size,
        "keys": keys,
        "seed": seed,
    }
    return _plan(method, dm, lam, final, _info(dm, history, hyper, t0, mask))


def learn_concrete_adamerging(
    base: StateDict,
    models: Sequence[StateDict],
    problem: FusionProblem,
    *,
    coefficients: str = "layer",
    lambda_: float = 0.3,
    mask_steps: int = 1000,
    steps: int = 1000,
    lr: float = 1e-3,
    inner_lr: float = 1.0,
    coefficient_lr: float = 1e-3,
    clamp: bool = False,
    temperature: float = 0.5,
    init_logits: float = 0.0,
    granularity: str = "element",
    readout: str = "sample",
    rescale: bool = True,
    batch_size: int = 16,
    keys: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> FusionPlan:
    """Concrete AdaMerging (Tang et al., §3.3, Eq. 7, first-order), task-wise or layer-wise λ.

    Phase 1 (``mask_steps``): sample m; reset λ to ``lambda_``; one inner Adam step on λ
    (``inner_lr``, the reference's 1.0; its optimiser state persists across steps as there) with
    m detached; with that λ fixed, one outer Adam step (``lr``) on the mask logits on fresh batches.
    Phase 2 (``steps``): the ``readout`` mask fixed, λ reset to ``lambda_`` and learned by AdaMerging
    (Adam, ``coefficient_lr``). ``clamp`` keeps λ in [0, 1] (off in the reference configuration).
    """
    method = "concrete_adamerging"
    _choice(coefficients, MODES, "coefficients", method)
    _check_common(method, steps=steps, lr=lr, batch_size=batch_size, lambda_=lambda_)
    _check_mask_params(method, temperature, init_logits, granularity, readout)
    if mask_steps < 0:
        raise RecipeError(f"{method}: parameter 'mask_steps' must be >= 0, got {mask_steps}")
    _positive(inner_lr, "inner_lr", method, allow_zero=True)
    _positive(coefficient_lr, "coefficient_lr", method, allow_zero=True)
    t0 = time.perf_counter()
    dm = DifferentiableMerge(
        base, models, problem, keys=keys, fallback_lambda=lambda_, device=device, method=method
    )
    mask = ConcreteMask(
        {k: dm.shapes[k] for k in dm.keys},
        granularity=granularity,
        init_logits=init_logits,
        seed=seed,
        device=dm.device,
    )
    lam = dm.coefficients(lambda_, coefficients)
    init = lam.detach().clone()
    inner = torch.optim.Adam([lam], lr=inner_lr)
    outer = torch.optim.Adam(mask.parameters(), lr=lr)
    batches = task_batches(problem, batch_size, seed, dm.device)
    history = History()
    inner_losses: list[float] = []
    outer_losses: list[float] = []
    shifts: list[float] = []  # mean |λ after the inner step − λ_init|
    t1 = time.perf_counter()
    for step in range(mask_steps):
        m = mask.sample(temperature, rescale=rescale)
        with torch.no_grad():
            lam.copy_(init)
        # inner: one step on λ, mask held fixed
        merged = dm.combine(dm.mix(effective(lam, clamp)), {k: v.detach() for k, v in m.items()})
        inner.zero_grad(set_to_none=True)
        inner_losses.append(sum(dm.backward(merged, [next(b) for b in batches])))
        inner.step()
        # outer: one step on the mask logits, λ held at its updated value
        with torch.no_grad():
            lam_inner = effective(lam, clamp)
            shifts.append(float((lam_inner - effective(init, clamp)).abs().mean()))
            mixed = dm.mix(lam_inner)
        merged = dm.combine(mixed, m)
        outer.zero_grad(set_to_none=True)
        loss = sum(dm.backward(merged, [next(b) for b in batches]))
        outer.step()
        outer_losses.append(loss)
        if progress is not None:
            progress("mask", step + 1, mask_steps, loss)
    history.loss["mask_inner"] = inner_losses
    history.loss["mask"] = outer_losses
    history.seconds["mask"] = time.perf_counter() - t1
    final = mask.readout(readout, temperature, rescale=rescale)
    lam_final = fit_coefficients(
        dm,
        init=lambda_,
        mode=coefficients,
        steps=steps,
        lr=coefficient_lr,
        clamp=clamp,
        batch_size=batch_size,
        seed=seed,
        mask=final,
        progress=progress,
        phase="coefficients",
        history=history,
    )
    hyper = {
        "coefficients": coefficients,
        "lambda": lambda_,
        "mask_steps": mask_steps,
        "steps": steps,
        "lr": lr,
        "inner_lr": inner_lr,
        "coefficient_lr": coefficient_lr,
        "clamp": clamp,
        "temperature": temperature,
        "init_logits": init_logits,
        "granularity": granularity,
        "readout": readout,
        "rescale": rescale,
        "batch_size": batch_size,
        "keys": keys,
        "seed": seed,
    }
    info = _info(dm, history, hyper, t0, mask)
    if shifts:
        info["inner_lambda_shift"] = {
            "first": shifts[0],
            "mean": sum(shifts) / len(shifts),
            "last": shifts[-1],
        }
    return _plan(method, dm, lam_final, final, info)


# ---------------------------------------------------------------------------------------------
# recipe methods
# ---------------------------------------------------------------------------------------------


def _recipe_run(method: str, models: list[StateDict], base: StateDict | None, *,
                progress: Callable[[str], None] | None, **kwargs: Any) -> FusionPlan:
    """The first pass of a method whose plan is a :class:`FusionPlan` of learned coefficients (task vectors:
    a base is needed; progress lines carry the optimisation step and loss)."""
    return run_recipe(method, models, base, progress=step_lines(method, progress), needs_base=True,
                      load=FusionPlan.load, **kwargs)


@merge_method("adamerging", paper=_YANG, url=_YANG_URL, kind="whole_model", base="required", min_models=1)
def adamerging(
    models: list[StateDict],
    base: StateDict | None,
    *,
    entry_point: Code = "",
    plan: FilePath = "",
    verify: bool = True,
    coefficients: str = "layer",
    lambda_: float = 0.3,
    steps: int = 500,
    lr: float = 1e-3,
    clamp: bool = True,
    batch_size: int = 16,
    keys: str = "",
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> FusionPlan:
    """AdaMerging: task-wise or layer-wise coefficients λ learned by entropy minimisation on unlabelled data.

    θ[k] = θ_0[k] + Σ_t λ_{t,k} τ_t[k] (Yang et al., ICLR 2024, Eq. 3/4); ``coefficients``: ``task``
    or ``layer`` (per tensor); λ starts at ``lambda``, Adam ``lr`` for ``steps`` steps on batches of
    ``batch_size`` per task, clamped to [0, 1] when ``clamp``; ``keys`` (a regular expression)
    restricts which tensors are learned (the others: task arithmetic with ``lambda``).

    Learns from the FusionProblem the ``entry_point`` function returns (``package.module:function``
    or ``file.py:function``; needs ``--allow-code``), or applies a saved ``plan`` folder (no data;
    ``verify`` checks the models are the ones it was learned on). The output has the plan in
    ``fusion_plan/``.
    """
    return _recipe_run(
        "adamerging",
        models,
        base,
        entry_point=entry_point,
        plan=plan,
        verify=verify,
        device=device,
        progress=progress,
        learn=learn_adamerging,
        coefficients=coefficients,
        lambda_=lambda_,
        steps=steps,
        lr=lr,
        clamp=clamp,
        batch_size=batch_size,
        keys=keys,
        seed=seed,
    )


@merge_method(
    "concrete_task_arithmetic", paper=_TANG, url=_TANG_URL, kind="whole_model", base="required", min_models=1
)
def concrete_task_arithmetic(
    models: list[StateDict],
    base: StateDict | None,
    *,
    entry_point: Code = "",
    plan: FilePath = "",
    verify: bool = True,
    lambda_: float = 0.3,
    steps: int = 2000,
    lr: float = 1e-3,
    temperature: float = 0.5,
    init_logits: float = 0.0,
    granularity: str = "element",
    readout: str = "sample",
    rescale: bool = True,
    batch_size: int = 16,
    keys: str = "",
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> FusionPlan:
    """Concrete Task Arithmetic: a shared Concrete mask over the task vectors, learned by entropy; λ fixed.

    θ = θ_0 + λ Σ_t m ⊙ τ_t (Tang et al., Eq. 5), m relaxed-Bernoulli with ``temperature`` and
    logits from ``init_logits``, rescaled by its mean, Adam ``lr`` for ``steps`` steps; the plan keeps
    the ``readout`` mask (sample, bernoulli, expected, threshold) at ``granularity`` element, row or
    tensor.

    Learns from the FusionProblem the ``entry_point`` function returns (``package.module:function``
    or ``file.py:function``; needs ``--allow-code``), or applies a saved ``plan`` folder (no data;
    ``verify`` checks the models are the ones it was learned on). The output has the plan in
    ``fusion_plan/``.
    """
    return _recipe_run(
        "concrete_task_arithmetic",
        models,
        base,
        entry_point=entry_point,
        plan=plan,
        verify=verify,
        device=device,
        progress=progress,
        learn=learn_concrete_task_arithmetic,
        lambda_=lambda_,
        steps=steps,
        lr=lr,
        temperature=temperature,
        init_logits=init_logits,
        granularity=granularity,
        readout=readout,
        rescale=rescale,
        batch_size=batch_size,
        keys=keys,
        seed=seed,
    )


@merge_method(
    "concrete_adamerging", paper=_TANG, url=_TANG_URL, kind="whole_model", base="required", min_models=1
)
def concrete_adamerging(
    models: list[StateDict],
    base: StateDict | None,
    *,
    entry_point: Code = "",
    plan: FilePath = "",
    verify: bool = True,
    coefficients: str = "layer",
    lambda_: float = 0.3,
    mask_steps: int = 1000,
    steps: int = 1000,
    lr: float = 1e-3,
    inner_lr: float = 1.0,
    coefficient_lr: float = 1e-3,
    clamp: bool = False,
    temperature: float = 0.5,
    init_logits: float = 0.0,
    granularity: str = "element",
    readout: str = "sample",
    rescale: bool = True,
    batch_size: int = 16,
    keys: str = "",
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> FusionPlan:
    """Concrete AdaMerging: a shared Concrete mask meta-learned with AdaMerging inside it (bi-level, first order).

    Tang et al., Eq. 7: ``mask_steps`` outer steps on the mask logits (``lr``), each after one
    inner Adam step on λ (``inner_lr``) from ``lambda``; then ``steps`` AdaMerging steps on λ
    (``coefficient_lr``) inside the ``readout`` mask. ``coefficients``: ``task`` or ``layer``.

    Learns from the FusionProblem the ``entry_point`` function returns (``package.module:function``
    or ``file.py:function``; needs ``--allow-code``), or applies a saved ``plan`` folder (no data;
    ``verify`` checks the models are the ones it was learned on). The output has the plan in
    ``fusion_plan/``.
    """
    return _recipe_run(
        "concrete_adamerging",
        models,
        base,
        entry_point=entry_point,
        plan=plan,
        verify=verify,
        device=device,
        progress=progress,
        learn=learn_concrete_adamerging,
        coefficients=coefficients,
        lambda_=lambda_,
        mask_steps=mask_steps,
        steps=steps,
        lr=lr,
        inner_lr=inner_lr,
        coefficient_lr=coefficient_lr,
        clamp=clamp,
        temperature=temperature,
        init_logits=init_logits,
        granularity=granularity,
        readout=readout,
        rescale=rescale,
        batch_size=batch_size,
        keys=keys,
        seed=seed,
    )
