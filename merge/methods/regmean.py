"""RegMean (and the machinery it shares with Fisher merging): data-driven merges from per-model statistics.

**RegMean** (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
arXiv:2212.09849). For a linear layer h = W x that each task model i applies to its own inputs
X_i (rows = examples), the merged W is the one that best reproduces every model's outputs on its
own inputs, min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², whose closed form (§3.2) is, with the Gram
G_i = X_iᵀ X_i of the layer's inputs on task i's data,

    Wᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ          (torch's layout: W is [out, in], G_i is [in, in]).

The non-diagonal entries of every G_i are scaled by α (§3.3, "reducing non-diagonal items"):
G̃_i = α G_i + (1 − α) diag(G_i); α = 1 is the exact regression solution, α = 0 the per-input-column
weighted average W[:, j] = Σ_i G_i[j, j] W_i[:, j] / Σ_i G_i[j, j]. Tensors that are not the weight of
an ``nn.Linear`` (biases, norms, embeddings) are averaged, as in the paper, or merged by task
arithmetic (``others``).

Here the Gram of each ``nn.Linear`` of the user's architecture is collected by a forward hook while
task model i's weights run (``torch.func.functional_call``, the module is never modified) on task
i's inputs from the same :class:`~merge.methods._fusion.FusionProblem` AdaMerging uses (named by an
``entry_point`` behind ``--allow-code``). Each G_i is the *mean* over the rows seen (X_iᵀX_i / n_i),
so ``num_examples`` is a budget, not a task weight. Input columns that no task ever activates (a
zero diagonal in every G_i, e.g. always-zero pixels or dead ReLUs) carry no data: those columns are
averaged. ``ridge`` (0 by default) adds ε·m·I to each G̃_i (m the mean diagonal entry), which pulls
the solution toward the average in the directions no data reaches; α = 1 on rank-deficient Grams
needs it.

The statistics are the plan: :class:`RegMeanPlan` keeps the Grams (T, in, in) of every merged layer
and applies the closed form tensor by tensor in the engine's streaming pass, so a saved plan
(``fusion_plan/`` in the merge's output, safetensors + JSON) merges again with no code and no data.

The parts shared with :mod:`merge.methods.fisher` (the module binding, the one-pass data iterator, the
plan files) are in :mod:`merge.methods._statistics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge.errors import (
    CheckpointError,
    MissingTensorError,
    NonFiniteError,
    RecipeError,
    ShapeMismatchError,
)
from merge.methods._fusion import (
    FusionProblem,
    resolve_device,
    run_recipe,
)
from merge.methods._fusion_plan import CARD_FILE, PlanMismatchError
from merge.methods._statistics import (
    OTHERS,
    LineFn,
    ModelBinding,
    StateDict,
    StatisticsPlan,
    _check_pass,
    _choice,
    _finite,
    _pattern,
    check_fingerprint,
    check_plan_models,
    fingerprint_of,
    merge_others,
    one_pass,
    reporter,
)
from merge.methods.registry import Code, FilePath, Fraction, merge_method
from merge.methods.runner import derive_seed

__all__ = [
    "RegMeanPlan",
    "compute_grams",
    "learn_regmean",
    "regmean",
    "regmean_weight",
]


_JIN = "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023"
_JIN_URL = "https://arxiv.org/abs/2212.09849"


# ---------------------------------------------------------------------------------------------
# RegMean: the closed form
# ---------------------------------------------------------------------------------------------


def _check_gram_shapes(weights: Sequence[torch.Tensor], grams: torch.Tensor, name: str) -> None:
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ShapeMismatchError(
            f"regmean: the Grams of '{name}' must be [n_models, in, in], got {list(grams.shape)}"
        )
    if len(weights) != grams.shape[0]:
        raise ShapeMismatchError(
            f"regmean: {len(weights)} weights of '{name}' for {grams.shape[0]} Gram matrices (one per model)"
        )
    d = grams.shape[1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != d or w.shape != weights[0].shape:
            raise ShapeMismatchError(
                f"regmean: weight '{name}' of model {i + 1} has shape {list(w.shape)}, expected "
                f"[{weights[0].shape[0] if weights[0].dim() == 2 else 'out'}, {d}] (a Linear weight whose "
                f"input dimension is the Gram's {d})"
            )


def regmean_weight(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor] | torch.Tensor,
    *,
    alpha: float = 1.0,
    ridge: float = 0.0,
    name: str = "weight",
) -> torch.Tensor:
    """RegMean's merged Linear weight (Jin et al., ICLR 2023, §3.2 with §3.3's α): float32, [out, in].

    ``weights`` are the models' W_i ([out, in], torch's layout: h = W x) and ``grams`` their input
    Grams G_i = X_iᵀ X_i ([in, in]). Computes, in float64,

        G̃_i = α G_i + (1 − α) diag(G_i) (+ ridge · m · I),   Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ

    where m is the mean diagonal entry of the G̃_i. Input columns whose diagonal is zero in every
    G_i (no data reaches them) are averaged. The system is solved by Cholesky; a singular Σ G̃_i
    (α = 1 on rank-deficient Grams) is an error that suggests α < 1 or ridge > 0.
    """
    _finite(alpha, "alpha", "regmean", low=0.0)
    if alpha > 1:
        raise RecipeError(f"regmean: parameter 'alpha' must be in [0, 1], got {alpha}")
    _finite(ridge, "ridge", "regmean", low=0.0)
    g = torch.stack(list(grams)) if not isinstance(grams, torch.Tensor) else grams
    _check_gram_shapes(weights, g, name)
    g = g.to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise NonFiniteError(f"regmean: the Gram matrices of '{name}' contain NaN or Inf values")
    for i, w in enumerate(weights):
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteError(f"regmean: weight '{name}' of model {i + 1} contains NaN or Inf values")
    w = torch.stack([x.to(g.device, torch.float64) for x in weights])  # (T, out, in)
    diag = g.diagonal(dim1=1, dim2=2)  # (T, in)
    if bool((diag < 0).any()):
        raise RecipeError(f"regmean: the Gram matrices of '{name}' have negative diagonal entries (not X^T X)")
    if alpha != 1.0:
        g = alpha * g + (1.0 - alpha) * torch.diag_embed(diag)
    dead = diag.sum(0) == 0
    if bool(dead.any()):
        g = g.clone()
        g.diagonal(dim1=1, dim2=2)[:, dead] = 1.0  # equal weights: those columns are averaged
    if ridge > 0:
        m = float(g.diagonal(dim1=1, dim2=2).mean())
        g = g + ridge * (m if m > 0 else 1.0) * torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
    a = g.sum(0)
    b = torch.einsum("tij,toj->io", g, w)  # Σ_i G̃_i W_iᵀ, (in, out)
    chol, info = torch.linalg.cholesky_ex(a)
    # a pivot that is (relative to its diagonal entry) at rounding level: linearly dependent columns
    if int(info) != 0 or float((chol.diagonal().square() / a.diagonal()).min()) < 1e-12:
        raise RecipeError(
            f"regmean: the summed Gram of '{name}' is singular (alpha = 1 on inputs that do not span every "
            "direction); use alpha < 1 or ridge > 0"
        )
    return torch.cholesky_solve(b, chol).T.contiguous().to(torch.float32)


# ---------------------------------------------------------------------------------------------
# RegMean: the statistics
# ---------------------------------------------------------------------------------------------


def compute_grams(
    models: Sequence[StateDict],
    problem: FusionProblem,
    *,
    keys: str = "",
    num_examples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: LineFn | None = None,
    method: str = "regmean",
) -> tuple[dict[str, torch.Tensor], torch.Tensor, ModelBinding]:
    """The input Gram G_i = X_iᵀX_i / n_i of every ``nn.Linear`` of the module, task model i on task i's data.

    Returns ``grams`` (checkpoint weight name → (T, in, in) float64, the mean over the n_i rows each
    layer saw), ``counts`` (T, K) int64 (n_i per layer; rows are all leading dimensions, so tokens for
    sequence models) and the binding. Forward hooks on the Linear modules read their inputs while
    ``torch.func.functional_call`` runs the module with task model i's weights; nothing is modified.
    """
    _check_pass(method, num_examples, batch_size)
    dev = resolve_device(device)
    binding = ModelBinding(problem, models, method, dev)
    linear = binding.linear_weights(_pattern(keys, method))
    if not linear:
        raise RecipeError(
            f"{method}: no nn.Linear of the module has its weight in the checkpoints"
            + (f" and matching keys={keys!r}" if keys else "")
        )
    names = list(linear)
    n_tasks = len(models)
    grams = {k: torch.zeros((n_tasks, linear[k].in_features, linear[k].in_features), dtype=torch.float64,
                            device=dev) for k in names}
    counts = torch.zeros((n_tasks, len(names)), dtype=torch.int64)
    for t, model in enumerate(models):
        task = problem.tasks[t]
        full = binding.full(model)
        acc: dict[str, torch.Tensor] = {k: grams[k][t] for k in names}
        n_rows = [0] * len(names)

        def make_hook(j: int, k: str, acc: dict[str, torch.Tensor], n_rows: list[int]) -> Callable[..., None]:
            d = linear[k].in_features

            def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
                x = args[0] if args else kwargs.get("input")
                if not isinstance(x, torch.Tensor) or x.shape[-1] != d:
                    raise ShapeMismatchError(
                        f"{method}: the input of Linear '{k}' has shape "
                        f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}, expected [..., {d}]"
                    )
                x2 = x.detach().reshape(-1, d).float()
                acc[k].add_((x2.T @ x2).double())
                n_rows[j] += x2.shape[0]

            return hook

        handles = [linear[k].register_forward_hook(make_hook(j, k, acc, n_rows), with_kwargs=True)
                   for j, k in enumerate(names)]
        batches, n_batches = one_pass(
            task.data, num_examples, batch_size, derive_seed(seed, f"{method}:rows:{task.name}"), dev,
            f"task '{task.name}'",
        )
        report = reporter(progress, method, "grams", task.name)
        try:
            with torch.no_grad():
                for b, batch in enumerate(batches):
                    binding.backbone_only(t, full, batch)
                    report(f"batch {b + 1}/{n_batches if n_batches is not None else '?'}")
        finally:
            for h in handles:
                h.remove()
        for j, k in enumerate(names):
            counts[t, j] = n_rows[j]
            if n_rows[j]:
                acc[k].div_(n_rows[j])
        del full
    return grams, counts, binding


@dataclass
class RegMeanPlan(StatisticsPlan):
    """The Grams (T, in, in) of the RegMean-merged Linear weights in ``keys``, and how to merge the rest.

    :meth:`apply` is the engine's per-tensor hook: a tensor in ``keys`` gets :func:`regmean_weight`
    with this plan's ``alpha`` and ``ridge``; any other floating tensor is averaged (``others:
    average``) or merged by task arithmetic with ``lambda_`` (``others: task_arithmetic``, needs a
    base). ``dataclasses.replace(plan, alpha=...)`` re-merges with another α and no data.
    """

    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    grams: dict[str, torch.Tensor]  # (T, in, in) float32
    alpha: float = 0.9
    ridge: float = 0.0
    others: str = "average"
    lambda_: float = 0.3
    counts: torch.Tensor | None = None  # (T, K) int64: rows each layer saw per task
    fingerprint: torch.Tensor | None = None  # (K, T) float64: ‖W_i‖
    task_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    verify: bool = True
    source: str = ""
    method: str = "regmean"
    FORMAT = "weightsmith-regmean-plan"
    STATS = "gram"
    WHAT = "Gram matrices"

    def __post_init__(self) -> None:
        _finite(self.alpha, "alpha", self.method, low=0.0)
        if self.alpha > 1:
            raise RecipeError(f"{self.method}: parameter 'alpha' must be in [0, 1], got {self.alpha}")
        _finite(self.ridge, "ridge", self.method, low=0.0)
        _choice(self.others, OTHERS, "others", self.method)
        _finite(self.lambda_, "lambda", self.method)
        self.grams = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.grams.items()}
        self._index = {k: i for i, k in enumerate(self.keys)}
        n = None
        for k in self.keys:
            if k not in self.grams:
                raise RecipeError(f"plan{self.where()}: no Gram matrices for '{k}'")
            g = self.grams[k]
            shape = tuple(self.shapes[k])
            if g.dim() != 3 or len(shape) != 2 or tuple(g.shape[1:]) != (shape[1], shape[1]):
                raise ShapeMismatchError(
                    f"plan{self.where()}: the Grams of '{k}' have shape {list(g.shape)}, expected "
                    f"[n_models, {shape[1] if len(shape) == 2 else 'in'}, same] for a weight of shape {list(shape)}"
                )
            if n is not None and g.shape[0] != n:
                raise RecipeError(f"plan{self.where()}: '{k}' has Grams for {g.shape[0]} models, others for {n}")
            n = int(g.shape[0])
            if not bool(torch.isfinite(g).all()):
                raise NonFiniteError(f"plan{self.where()}: the Gram matrices of '{k}' contain NaN or Inf values")
        self._n = n if n is not None else len(self.task_names)
        if self.fingerprint is not None and tuple(self.fingerprint.shape) != (len(self.keys), self._n):
            raise RecipeError(
                f"plan{self.where()}: fingerprint has shape {list(self.fingerprint.shape)}, "
                f"expected {[len(self.keys), self._n]}"
            )

    def where(self) -> str:
        return f" {self.source}" if self.source else ""

    @property
    def n_tasks(self) -> int:
        return self._n

    def check_models(self, base: StateDict | None, models: Sequence[StateDict]) -> None:
        """Count, names and shapes (headers only); raises :class:`PlanMismatchError`."""
        check_plan_models(self, base, models, needs_base=self.others == "task_arithmetic")

    def apply(self, name: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """One output tensor from its T task-model tensors (and the base's; engine contract)."""
        if len(tensors) != self.n_tasks:
            raise PlanMismatchError(
                f"plan{self.where()}: {len(tensors)} task tensors for '{name}', the plan has {self.n_tasks} tasks"
            )
        i = self._index.get(name)
        if i is None:
            return merge_others(self.method, self.others, self.lambda_, name, tensors, base)
        check_fingerprint(self, name, i, tensors)
        return regmean_weight(tensors, self.grams[name], alpha=self.alpha, ridge=self.ridge, name=name)

    def merge(self, base: StateDict | None, models: Sequence[StateDict]) -> dict[str, torch.Tensor]:
        """The merged state dict (in memory; float32 where floating): the same bytes as the engine."""
        self.check_models(base, models)
        out = {}
        for k in models[0].keys():
            for j, m in enumerate(models):
                if k not in m:
                    raise MissingTensorError(f"{self.method}: task model {j + 1} has no tensor '{k}'")
            ts = [m[k].float() if m[k].is_floating_point() else m[k] for m in models]
            b = None
            if base is not None and k in base:
                b = base[k].float() if base[k].is_floating_point() else base[k]
            out[k] = self.apply(k, ts, b).clone()
        return out

    # -- files --------------------------------------------------------------------------------------
    def card_params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "ridge": self.ridge, "others": self.others, "lambda": self.lambda_}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"gram.{k}": self.grams[k] for k in self.keys}
        if self.counts is not None:
            out["counts"] = self.counts.to(torch.int64)
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint.to(torch.float64)
        return out

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> RegMeanPlan:
        """Read a plan folder (or its ``plan.json``); every inconsistency is a clear error."""
        card, tensors, where, keys, shapes, grams = cls.read(path, "regmean")
        try:
            return cls(
                keys=keys,
                shapes=shapes,
                grams=grams,
                alpha=float(card["alpha"]),
                ridge=float(card.get("ridge", 0.0)),
                others=str(card.get("others", "average")),
                lambda_=float(card.get("lambda", 0.3)),
                counts=tensors.get("counts"),
                fingerprint=tensors.get("fingerprint"),
                task_names=list(card.get("task_names", [])),
                info=dict(card.get("info", {})),
                verify=verify,
                source=where,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}/{CARD_FILE}: malformed plan card: {e}") from None


def learn_regmean(
    base: StateDict | None,
    models: Sequence[StateDict],
    problem: FusionProblem,
    *,
    alpha: float = 0.9,
    ridge: float = 0.0,
    others: str = "average",
    lambda_: float = 0.3,
    num_examples: int = 256,
    batch_size: int = 32,
    keys: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: LineFn | None = None,
) -> RegMeanPlan:
    """RegMean (Jin et al., ICLR 2023): the Grams of every ``nn.Linear`` on each task's data, as a plan.

    Up to ``num_examples`` examples of task i's data (0: all), in batches of ``batch_size``, run
    through the module with task model i's weights; ``keys`` (a regular expression) restricts which
    Linear weights RegMean merges. ``plan.merge(base, models)`` gives the merged weights: Linear
    weights by :func:`regmean_weight` (``alpha``, ``ridge``), the rest averaged or, with ``others:
    task_arithmetic``, θ_0 + λ Σ_i (θ_i − θ_0) (needs ``base``).
    """
    method = "regmean"
    _choice(others, OTHERS, "others", method)
    if others == "task_arithmetic" and base is None:
        raise RecipeError(f"{method}: others: task_arithmetic needs a base_model")
    _finite(alpha, "alpha", method, low=0.0)
    if alpha > 1:
        raise RecipeError(f"{method}: parameter 'alpha' must be in [0, 1], got {alpha}")
    _finite(ridge, "ridge", method, low=0.0)
    _finite(lambda_, "lambda", method)
    t0 = time.perf_counter()
    grams, counts, binding = compute_grams(
        models, problem, keys=keys, num_examples=num_examples, batch_size=batch_size, seed=seed,
        device=device, progress=progress, method=method,
    )
    names = list(grams)
    fp = torch.tensor([fingerprint_of([m[k].float() for m in models]) for k in names], dtype=torch.float64)
    info = {
        "hyperparameters": {"alpha": alpha, "ridge": ridge, "others": others, "lambda": lambda_,
                            "num_examples": num_examples, "batch_size": batch_size, "keys": keys, "seed": seed},
        "seconds": round(time.perf_counter() - t0, 3),
        "device": str(binding.device),
        "rows_per_task": {t.name: int(counts[i].max()) if counts.numel() else 0
                          for i, t in enumerate(problem.tasks)},
        "linear_weights": len(names),
        "unreached_layers": [k for j, k in enumerate(names) if int(counts[:, j].min()) == 0],
    }
    return RegMeanPlan(
        keys=names,
        shapes={k: binding.shapes[k] for k in names},
        grams=grams,
        alpha=alpha,
        ridge=ridge,
        others=others,
        lambda_=lambda_,
        counts=counts,
        fingerprint=fp,
        task_names=[t.name for t in problem.tasks],
        info=info,
    )


@merge_method("regmean", paper=_JIN, url=_JIN_URL, kind="whole_model", base="optional", min_models=1)
def regmean(
    models: list[StateDict],
    base: StateDict | None,
    *,
    entry_point: Code = "",
    plan: FilePath = "",
    verify: bool = True,
    alpha: Fraction = 0.9,
    ridge: float = 0.0,
    others: str = "average",
    lambda_: float = 0.3,
    num_examples: int = 256,
    batch_size: int = 32,
    keys: str = "",
    seed: int = 0,
    device: str = "cpu",
    progress: LineFn | None = None,
) -> RegMeanPlan:
    """RegMean: each Linear weight as the least-squares fit of every model's outputs on its own inputs.

    Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ with G_i = X_iᵀX_i the Gram of the layer's inputs on task i's data
    and G̃_i its non-diagonal entries scaled by ``alpha`` (Jin et al., ICLR 2023, §3.2–3.3);
    ``ridge`` adds a multiple of I (0: none). Other tensors: ``others`` ``average`` (the paper) or
    ``task_arithmetic`` with ``lambda`` (needs a base). The Grams use up to ``num_examples`` examples
    per task (0: all), in batches of ``batch_size``; ``keys`` (a regular expression) restricts the
    Linear weights merged by RegMean.

    Computes the Grams from the FusionProblem the ``entry_point`` function returns (``package.module:
    function`` or ``file.py:function``; needs ``--allow-code``), or applies a saved ``plan`` folder (no
    code, no data; ``verify`` checks the models are the ones it was computed on). The output has the
    plan in ``fusion_plan/``.
    """
    return run_recipe(
        "regmean", models, base, entry_point=entry_point, plan=plan, verify=verify, device=device,
        progress=progress, learn=learn_regmean, load=RegMeanPlan.load, alpha=alpha, ridge=ridge,
        others=others, lambda_=lambda_, num_examples=num_examples, batch_size=batch_size, keys=keys, seed=seed,
    )
