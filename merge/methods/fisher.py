"""Fisher merging: a per-parameter weighted average by each model's diagonal Fisher information.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832),
§2, the Fisher-weighted average with the diagonal Fisher:

    θ*[j] = Σ_i λ_i F_i[j] θ_i[j] / Σ_i λ_i F_i[j],      F_i = E_x E_y [ (∂ log p_θi(y|x) / ∂θ)² ]

elementwise over every parameter j, with per-model scalings λ_i (all 1 by default) and a floor ε on
each F_i, so an entry no model is sensitive to gets the λ-weighted average. F_i is estimated on N
examples of task i's own data, N = ``num_examples``: F̂_i = (1/N) Σ_n (∂ log p(y_n | x_n) / ∂θ)²,
per-example gradients (``torch.func.vmap`` of ``torch.func.grad``; an example-by-example loop when
the module cannot be vmapped). Which y (``labels``):

* ``data``: the task's labels (the *empirical* Fisher; batches ``(inputs, labels)`` or dicts with
  ``labels``);
* ``sample``: y ~ p_θi(y|x), one seeded draw per example (a Monte-Carlo estimate of the true Fisher);
* ``exact``: the expectation over y computed exactly, Σ_c p(c|x) (∂ log p(c|x)/∂θ)², one pass per
  class: the true Fisher's expectation over the model's predictions (C times the compute);
* ``auto`` (the default): ``data`` when the task's batches carry labels, else ``sample``.

``normalize`` (not in the paper) divides each model's Fisher by its mean over the merged entries
first, so that the models weigh the same overall and only where their curvature lies differs.
Parameters the Fisher does not cover (buffers, tensors the module does not use, ``keys`` excluded)
are λ-averaged, or merged by task arithmetic (``others``).

Logits come from the same :class:`~merge.methods._fusion.FusionProblem` AdaMerging and RegMean use
(the module with each task model's weights through ``torch.func.functional_call``, then the task's
frozen head): the head's output must be [examples, classes] logits. The plan keeps every F_i
(the size of the task models) in ``fusion_plan/``, so a saved plan merges again with no code or data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from merge.errors import (
    CheckpointError,
    MissingTensorError,
    NonFiniteError,
    RecipeError,
    ShapeMismatchError,
    WeightsmithError,
)
from merge.methods._fusion import FusionProblem, resolve_device, run_recipe
from merge.methods._fusion_plan import CARD_FILE, PlanMismatchError
from merge.methods._statistics import (
    OTHERS,
    LineFn,
    ModelBinding,
    StatisticsPlan,
    _check_pass,
    _choice,
    _finite,
    _pattern,
    batch_rows,
    batch_slice,
    check_fingerprint,
    check_plan_models,
    fingerprint_of,
    merge_others,
    one_pass,
    reporter,
)
from merge.methods.registry import Code, FilePath, PerModel, merge_method
from merge.methods.runner import derive_seed

__all__ = ["FisherPlan", "compute_fisher", "fisher", "fisher_average", "learn_fisher"]

StateDict = Mapping[str, torch.Tensor]
LABELS = ("auto", "data", "sample", "exact")

_MATENA = "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022"
_MATENA_URL = "https://arxiv.org/abs/2111.09832"


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------


def _check_weights(weights: Sequence[float], n: int, method: str) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) == 1 and n > 1:
        w = w * n
    if len(w) != n:
        raise RecipeError(f"{method}: {len(w)} per-model weights for {n} task models")
    for i, x in enumerate(w):
        if not math.isfinite(x) or x < 0:
            raise RecipeError(f"{method}: the weight of task model {i + 1} must be a finite number >= 0, got {x}")
    if sum(w) <= 0:
        raise RecipeError(f"{method}: the per-model weights sum to 0; give at least one positive weight")
    return w


def _check_fisher(f: torch.Tensor, name: str, i: int, method: str) -> None:
    if not bool(torch.isfinite(f).all()):
        raise NonFiniteError(f"{method}: the Fisher of '{name}' for task model {i + 1} contains NaN or Inf values")
    if bool((f < 0).any()):
        raise RecipeError(
            f"{method}: the Fisher of '{name}' for task model {i + 1} has negative entries (a diagonal "
            "Fisher is a mean of squares)"
        )


def fisher_average(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor] | torch.Tensor,
    *,
    weights: Sequence[float] | None = None,
    epsilon: float = 1e-6,
    name: str = "tensor",
) -> torch.Tensor:
    """Fisher-weighted average (Matena & Raffel, NeurIPS 2022, §2, diagonal Fisher): float32.

    θ* = Σ_i λ_i max(F_i, ε) θ_i / Σ_i λ_i max(F_i, ε), elementwise; ``weights`` are the λ_i (all 1
    by default; one value applies to every model), ``epsilon`` the floor ε > 0. Computed in float64.
    """
    method = "fisher"
    n = len(tensors)
    if n < 1:
        raise RecipeError(f"{method}: no tensors to merge for '{name}'")
    _finite(epsilon, "epsilon", method, low=0.0, strict=True)
    lam = _check_weights(weights if weights is not None else [1.0], n, method)
    fs = list(fishers) if not isinstance(fishers, torch.Tensor) else list(fishers.unbind(0))
    if len(fs) != n:
        raise ShapeMismatchError(f"{method}: {n} tensors of '{name}' for {len(fs)} Fishers (one per model)")
    shape = tensors[0].shape
    num = torch.zeros(shape, dtype=torch.float64, device=tensors[0].device)
    den = torch.zeros_like(num)
    for i, (t, f, w) in enumerate(zip(tensors, fs, lam, strict=True)):
        if t.shape != shape or f.shape != shape:
            raise ShapeMismatchError(
                f"{method}: tensor '{name}' of model {i + 1} has shape {list(t.shape)} and its Fisher "
                f"{list(f.shape)}; expected both {list(shape)}"
            )
        _check_fisher(f, name, i, method)
        if w == 0:
            continue
        fw = f.to(num.device, torch.float64).clamp_min(epsilon).mul_(w)
        num.addcmul_(fw, t.to(torch.float64))
        den.add_(fw)
    return num.div_(den).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# the statistics
# ---------------------------------------------------------------------------------------------


def _labels_of(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        for k in ("labels", "label"):
            if isinstance(batch.get(k), torch.Tensor):
                return batch[k]
        return None
    if isinstance(batch, tuple | list) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return {k: _unsqueeze(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_unsqueeze(v) for v in x)
    return x


class _PerExample:
    """Σ_n w_n (∂ log p(y_n | x_n) / ∂θ)² over a batch: vmap(grad) when it works, else one example at a time."""

    def __init__(self, binding: ModelBinding, t: int, params: dict[str, torch.Tensor],
                 consts: dict[str, torch.Tensor], method: str) -> None:
        self.binding, self.t, self.params, self.consts, self.method = binding, t, params, consts, method
        self.mode: str | None = None  # "vmap" or "loop: <why>"

    def _logp(self, ps: dict[str, torch.Tensor], batch: Any, y: torch.Tensor) -> torch.Tensor:
        lg = self.binding.logits(self.t, {**self.consts, **ps}, batch)
        lp = F.log_softmax(lg.float(), dim=-1)
        return torch.gather(lp, 1, y.reshape(-1, 1)).sum()

    def _vmap(self, batch: Any, y: torch.Tensor) -> dict[str, torch.Tensor]:
        def one(ps: dict[str, torch.Tensor], ex: Any, yy: torch.Tensor) -> torch.Tensor:
            return self._logp(ps, _unsqueeze(ex), yy)

        return vmap(grad(one), in_dims=(None, 0, 0), randomness="error")(self.params, batch, y)

    def _loop(self, batch: Any, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: torch.zeros((len(y), *v.shape), dtype=v.dtype, device=v.device) for k, v in self.params.items()}
        for j in range(len(y)):
            ps = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
            with torch.enable_grad():
                lp = self._logp(ps, batch_slice(batch, j, j + 1), y[j : j + 1])
                gs = torch.autograd.grad(lp, list(ps.values()), allow_unused=True)
            for k, g in zip(ps, gs, strict=True):
                if g is not None:
                    out[k][j] = g
        return out

    def add_squares(self, acc: dict[str, torch.Tensor], batch: Any, y: torch.Tensor, w: torch.Tensor | None) -> None:
        if self.mode is None or self.mode == "vmap":
            try:
                g = self._vmap(batch, y)
                self.mode = "vmap"
            except WeightsmithError:
                raise
            except Exception as e:  # noqa: BLE001 - vmap does not cover every module: fall back, say why
                if self.mode == "vmap":
                    raise
                self.mode = f"loop: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                g = self._loop(batch, y)
        else:
            g = self._loop(batch, y)
        for k, v in g.items():
            sq = v.square()
            if w is not None:
                sq = sq * w.reshape(-1, *([1] * (sq.dim() - 1))).to(sq.dtype)
            acc[k].add_(sq.sum(0))


def compute_fisher(
    models: Sequence[StateDict],
    problem: FusionProblem,
    *,
    labels: str = "auto",
    keys: str = "",
    num_examples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: LineFn | None = None,
    method: str = "fisher",
) -> tuple[dict[str, torch.Tensor], ModelBinding, dict[str, Any]]:
    """The diagonal Fisher F_i of each task model on its own task's data (Matena & Raffel §2).

    Returns ``fishers`` (checkpoint name → (T, *shape) float32, the mean over the examples of the
    squared per-example gradients of log p(y|x)), the binding, and per-task details (examples, which
    labels were used, how per-example gradients were taken). Covers the floating checkpoint tensors
    that are parameters of the module (and match ``keys``, a regular expression).
    """
    _choice(labels, LABELS, "labels", method)
    _check_pass(method, num_examples, batch_size)
    dev = resolve_device(device)
    binding = ModelBinding(problem, models, method, dev)
    pattern = _pattern(keys, method)
    names = [k for k in binding.params if pattern is None or pattern.search(k)]
    if not names:
        raise RecipeError(
            f"{method}: no checkpoint tensor is a parameter of the module"
            + (f" matching keys={keys!r}" if keys else "")
        )
    n_tasks = len(models)
    fishers = {k: torch.zeros((n_tasks, *binding.shapes[k]), dtype=torch.float32) for k in names}
    details: dict[str, Any] = {}
    for t, model in enumerate(models):
        task = problem.tasks[t]
        full = binding.full(model)
        mnames = {k: binding.used[k] for k in names}
        params = {mk: full[mk] for mk in mnames.values()}
        consts = {mk: v for mk, v in full.items() if mk not in params}
        acc = {mk: torch.zeros_like(v) for mk, v in params.items()}
        pe = _PerExample(binding, t, params, consts, method)
        gen = torch.Generator().manual_seed(derive_seed(seed, f"{method}:labels:{task.name}"))
        batches, n_batches = one_pass(
            task.data, num_examples, batch_size, derive_seed(seed, f"{method}:rows:{task.name}"), dev,
            f"task '{task.name}'",
        )
        report = reporter(progress, method, "fisher", task.name)
        n = 0
        used: set[str] = set()
        for b, batch in enumerate(batches):
            rows = batch_rows(batch)
            with torch.no_grad():
                lg = binding.logits(t, full, batch)
            if not isinstance(lg, torch.Tensor) or lg.dim() != 2 or lg.shape[0] != rows:
                raise RecipeError(
                    f"{method}: task '{task.name}': the head must give [examples, classes] logits, got "
                    f"{list(lg.shape) if isinstance(lg, torch.Tensor) else type(lg).__name__} for {rows} examples"
                )
            if not bool(torch.isfinite(lg).all()):
                raise NonFiniteError(f"{method}: task '{task.name}': task model {t + 1} gives NaN or Inf logits")
            p = F.softmax(lg.float(), dim=-1)
            n_classes = p.shape[1]
            mode = labels
            y_data = _labels_of(batch)
            if mode == "auto":
                mode = "data" if y_data is not None else "sample"
            used.add(mode)
            if mode == "data":
                if y_data is None:
                    raise RecipeError(
                        f"{method}: labels: data, but task '{task.name}' gives no labels (batches (inputs, labels) "
                        "or dicts with 'labels')"
                    )
                y = y_data.reshape(-1).to(dev).long()
                if len(y) != rows or bool((y < 0).any()) or bool((y >= n_classes).any()):
                    raise RecipeError(
                        f"{method}: task '{task.name}': labels must be one class index in [0, {n_classes}) per example"
                    )
                pe.add_squares(acc, batch, y, None)
            elif mode == "sample":
                y = torch.multinomial(p.cpu().double(), 1, generator=gen).reshape(-1).to(dev)
                pe.add_squares(acc, batch, y, None)
            else:  # exact: Σ_c p(c|x) g_c²
                for c in range(n_classes):
                    pe.add_squares(acc, batch, torch.full((rows,), c, dtype=torch.long, device=dev), p[:, c])
            n += rows
            report(f"batch {b + 1}/{n_batches if n_batches is not None else '?'}")
        if n == 0:
            raise RecipeError(f"{method}: task '{task.name}' gave no examples")
        for k, mk in mnames.items():
            f = acc[mk].div_(n).to("cpu", torch.float32)
            _check_fisher(f, k, t, method)
            fishers[k][t] = f
        details[task.name] = {"examples": n, "labels": sorted(used), "per_example": pe.mode,
                              "mean_fisher": float(sum(fishers[k][t].double().sum() for k in names)
                                                   / sum(fishers[k][t].numel() for k in names))}
        del full, params, consts, acc
    return fishers, binding, details


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


@dataclass
class FisherPlan(StatisticsPlan):
    """Each task model's diagonal Fisher (T, *shape) of the tensors in ``keys``, and how to merge the rest.

    :meth:`apply` is the engine's per-tensor hook: a tensor in ``keys`` gets :func:`fisher_average`
    with the per-model ``weights`` (λ_i) and floor ``epsilon`` (after dividing each model's Fisher by
    its mean when ``normalize``); any other floating tensor is λ-averaged (``others: average``) or
    merged by task arithmetic with ``lambda_``. ``dataclasses.replace(plan, weights=...)`` re-merges
    with other λ_i and no data.
    """

    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    fishers: dict[str, torch.Tensor]  # (T, *shape) float32
    weights: list[float] | None = None
    epsilon: float = 1e-6
    normalize: bool = False
    others: str = "average"
    lambda_: float = 0.3
    fingerprint: torch.Tensor | None = None  # (K, T) float64: ‖θ_i[k]‖
    task_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    verify: bool = True
    source: str = ""
    method: str = "fisher"
    FORMAT = "weightsmith-fisher-plan"
    STATS = "fisher"
    WHAT = "Fisher"

    def __post_init__(self) -> None:
        m = self.method
        _finite(self.epsilon, "epsilon", m, low=0.0, strict=True)
        _choice(self.others, OTHERS, "others", m)
        _finite(self.lambda_, "lambda", m)
        self.fishers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.fishers.items()}
        n = None
        for k in self.keys:
            if k not in self.fishers:
                raise RecipeError(f"plan{self.where()}: no Fisher for '{k}'")
            f = self.fishers[k]
            if tuple(f.shape[1:]) != tuple(self.shapes[k]):
                raise ShapeMismatchError(
                    f"plan{self.where()}: the Fisher of '{k}' has shape {list(f.shape)}, expected "
                    f"[n_models, {', '.join(map(str, self.shapes[k]))}]"
                )
            if n is not None and f.shape[0] != n:
                raise RecipeError(f"plan{self.where()}: '{k}' has Fishers for {f.shape[0]} models, others for {n}")
            n = int(f.shape[0])
            for i in range(n):
                _check_fisher(f[i], k, i, m)
        self._n = n if n is not None else len(self.task_names)
        self.weights = _check_weights(self.weights if self.weights is not None else [1.0], self._n, m)
        self._index = {k: i for i, k in enumerate(self.keys)}
        if self.fingerprint is not None and tuple(self.fingerprint.shape) != (len(self.keys), self._n):
            raise RecipeError(
                f"plan{self.where()}: fingerprint has shape {list(self.fingerprint.shape)}, "
                f"expected {[len(self.keys), self._n]}"
            )
        # per-model normalisers: the mean Fisher over every merged entry (1 when not normalising)
        self.scales = [1.0] * self._n
        if self.normalize and self.keys:
            total = sum(self.fishers[k][0].numel() for k in self.keys)
            for i in range(self._n):
                s = float(sum(self.fishers[k][i].double().sum() for k in self.keys)) / total
                self.scales[i] = s if s > 0 else 1.0

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
            return merge_others(self.method, self.others, self.lambda_, name, tensors, base, self.weights)
        check_fingerprint(self, name, i, tensors)
        f = self.fishers[name]
        fs = [f[j] / self.scales[j] if self.scales[j] != 1.0 else f[j] for j in range(self.n_tasks)]
        return fisher_average(tensors, fs, weights=self.weights, epsilon=self.epsilon, name=name)

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
        return {"weights": self.weights, "epsilon": self.epsilon, "normalize": self.normalize,
                "others": self.others, "lambda": self.lambda_}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"fisher.{k}": self.fishers[k] for k in self.keys}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint.to(torch.float64)
        return out

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> FisherPlan:
        """Read a plan folder (or its ``plan.json``); every inconsistency is a clear error."""
        card, tensors, where, keys, shapes, fishers = cls.read(path, "fisher")
        try:
            return cls(
                keys=keys,
                shapes=shapes,
                fishers=fishers,
                weights=[float(x) for x in card["weights"]],
                epsilon=float(card["epsilon"]),
                normalize=bool(card.get("normalize", False)),
                others=str(card.get("others", "average")),
                lambda_=float(card.get("lambda", 0.3)),
                fingerprint=tensors.get("fingerprint"),
                task_names=list(card.get("task_names", [])),
                info=dict(card.get("info", {})),
                verify=verify,
                source=where,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}/{CARD_FILE}: malformed plan card: {e}") from None


def learn_fisher(
    base: StateDict | None,
    models: Sequence[StateDict],
    problem: FusionProblem,
    *,
    weights: Sequence[float] | float | None = None,
    epsilon: float = 1e-6,
    normalize: bool = False,
    labels: str = "auto",
    others: str = "average",
    lambda_: float = 0.3,
    num_examples: int = 256,
    batch_size: int = 32,
    keys: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: LineFn | None = None,
) -> FisherPlan:
    """Fisher merging (Matena & Raffel, NeurIPS 2022): each task model's diagonal Fisher on its own data, as a plan.

    Up to ``num_examples`` examples of task i's data (0: all) in batches of ``batch_size``, labels as
    ``labels`` says (module docstring); ``plan.merge(base, models)`` gives the merged weights.
    """
    method = "fisher"
    _choice(others, OTHERS, "others", method)
    if others == "task_arithmetic" and base is None:
        raise RecipeError(f"{method}: others: task_arithmetic needs a base_model")
    _finite(epsilon, "epsilon", method, low=0.0, strict=True)
    _finite(lambda_, "lambda", method)
    w = [weights] if isinstance(weights, int | float) else (list(weights) if weights is not None else [1.0])
    w = _check_weights(w, len(models), method)
    t0 = time.perf_counter()
    fishers, binding, details = compute_fisher(
        models, problem, labels=labels, keys=keys, num_examples=num_examples, batch_size=batch_size,
        seed=seed, device=device, progress=progress, method=method,
    )
    names = list(fishers)
    fp = torch.tensor([fingerprint_of([m[k].float() for m in models]) for k in names], dtype=torch.float64)
    info = {
        "hyperparameters": {"weights": w, "epsilon": epsilon, "normalize": normalize, "labels": labels,
                            "others": others, "lambda": lambda_, "num_examples": num_examples,
                            "batch_size": batch_size, "keys": keys, "seed": seed},
        "seconds": round(time.perf_counter() - t0, 3),
        "device": str(binding.device),
        "tasks": details,
        "tensors": len(names),
    }
    return FisherPlan(
        keys=names,
        shapes={k: binding.shapes[k] for k in names},
        fishers=fishers,
        weights=w,
        epsilon=epsilon,
        normalize=normalize,
        others=others,
        lambda_=lambda_,
        fingerprint=fp,
        task_names=[t.name for t in problem.tasks],
        info=info,
    )


@merge_method("fisher", paper=_MATENA, url=_MATENA_URL, kind="whole_model", base="optional", min_models=1)
def fisher(
    models: list[StateDict],
    base: StateDict | None,
    *,
    entry_point: Code = "",
    plan: FilePath = "",
    verify: bool = True,
    weight: PerModel[float] = 1.0,
    epsilon: float = 1e-6,
    normalize: bool = False,
    labels: str = "auto",
    others: str = "average",
    lambda_: float = 0.3,
    num_examples: int = 256,
    batch_size: int = 32,
    keys: str = "",
    seed: int = 0,
    device: str = "cpu",
    progress: LineFn | None = None,
) -> FisherPlan:
    """Fisher merging: each parameter averaged with weights λ_i F_i, F_i the model's diagonal Fisher on its task.

    θ* = Σ_i λ_i max(F_i, ε) θ_i / Σ_i λ_i max(F_i, ε) elementwise (Matena & Raffel, NeurIPS 2022,
    §2); λ_i = ``weight``, ε = ``epsilon``; ``normalize`` divides each F_i by its mean first. F_i
    is the mean squared per-example gradient of log p(y|x) over up to ``num_examples`` examples of
    task i (0: all), batches of ``batch_size``; y per ``labels``: ``data`` (the task's labels: the
    empirical Fisher), ``sample`` (y ~ p(y|x), seeded), ``exact`` (Σ_c p(c|x) ·, the true Fisher), ``auto``
    (data when the batches carry labels, else sample). Other tensors: ``others`` ``average`` or
    ``task_arithmetic`` with ``lambda`` (needs a base); ``keys`` (a regular expression) restricts the
    Fisher-weighted tensors.

    Computes the Fishers from the FusionProblem the ``entry_point`` function returns
    (``package.module:function`` or ``file.py:function``; needs ``--allow-code``), or applies a saved
    ``plan`` folder (no code, no data; ``verify`` checks the models are the ones it was computed on).
    The output has the plan in ``fusion_plan/``.
    """
    return run_recipe(
        "fisher", models, base, entry_point=entry_point, plan=plan, verify=verify, device=device,
        progress=progress, learn=learn_fisher, load=FisherPlan.load, weights=weight, epsilon=epsilon,
        normalize=normalize, labels=labels, others=others, lambda_=lambda_, num_examples=num_examples,
        batch_size=batch_size, keys=keys, seed=seed,
    )
