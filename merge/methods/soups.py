"""Soups that need more than one averaging pass: greedy model soups and Sparse Model Soups.

- :func:`greedy_soup`: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
  models improves accuracy without increasing inference time", ICML 2022 (arXiv:2203.05482),
  Recipe 1 ("GreedySoup"): sort the ingredients by held-out score, then add each to the soup only
  if the soup's held-out score does not drop. Streaming: one float32 running sum, never all
  ingredients in memory at once (the sum, the candidate and the candidate soup: three models).
- :func:`sparse_soup` (the recipe method ``sparse_soup``): the soup step of Zimmer, Spiegel &
  Pokutta, "Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging", ICLR 2024
  (arXiv:2306.16788), §3: average ingredients that share one sparsity mask; the average keeps
  the mask exactly. Different zero patterns are refused unless the union is asked for.
- :func:`sparse_model_soup` (SMS, the paper's Algorithm 1) and :func:`iterative_magnitude_pruning`
  (IMP, its m = 1 baseline): prune–retrain phases with global magnitude pruning
  (:func:`global_magnitude_prune`, the schedule of :func:`sparsity_schedule`), m retrains per
  phase from one shared pruned model, a uniform or greedy soup, BatchNorm recalibration, and the
  next phase pruning the soup.

Uniform soups are the ``linear`` method (merge/methods/linear.py); Diffusion Soup's living soup
folder is merge/soups/folder.py.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from merge.errors import MaskMismatchError, MissingTensorError, RecipeError, ShapeMismatchError
from merge.methods.registry import PerModel, merge_method

__all__ = [
    "GreedySoupResult",
    "GreedyStep",
    "PhaseRecord",
    "SparseSoupResult",
    "global_magnitude_prune",
    "greedy_soup",
    "iterative_magnitude_pruning",
    "prunable_weights",
    "sparse_model_soup",
    "sparse_soup",
    "sparsity",
    "sparsity_schedule",
]

StateDict = dict[str, torch.Tensor]
#: An ingredient: a state dict, a checkpoint path (file or folder), or a callable that loads one.
Ingredient = Mapping[str, torch.Tensor] | str | Path | Callable[[], Mapping[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Greedy soup
# ---------------------------------------------------------------------------------------------


@dataclass
class GreedyStep:
    """One decision of the greedy soup: ``soup_score`` is the score of the candidate soup (the
    soup so far plus this ingredient); ``kept`` says whether the ingredient stayed in."""

    name: str
    individual: float
    soup_score: float
    kept: bool
    soup_size: int


@dataclass
class GreedySoupResult:
    state_dict: StateDict
    kept: list[str]  # in the order they entered the soup (best first)
    score: float  # held-out score of the final soup
    steps: list[GreedyStep]  # one per ingredient, in the order they were tried
    individual: dict[str, float]
    seconds: float = 0.0

    @property
    def best_individual(self) -> float:
        return max(self.individual.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "score": self.score,
            "best_individual": self.best_individual,
            "individual": self.individual,
            "steps": [asdict(s) for s in self.steps],
            "seconds": round(self.seconds, 3),
        }


def _default_name(x: Ingredient, i: int) -> str:
    if isinstance(x, str | Path):
        p = Path(x)
        return p.stem if p.suffix == ".safetensors" else p.name
    return f"ingredient{i}"


def load_state_dict(x: Ingredient) -> StateDict:
    """Materialise an ingredient (a Mapping, a checkpoint path, or a loader callable)."""
    if isinstance(x, str | Path):
        from merge.checkpoint import open_checkpoint

        ckpt = open_checkpoint(x)
        try:
            return {k: ckpt[k] for k in ckpt}
        finally:
            ckpt.close()
    if callable(x) and not isinstance(x, Mapping):
        x = x()
    return {k: v for k, v in x.items()}


def _check_compatible(
    ref: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor], ref_name: str, name: str
) -> None:
    """``sd`` has exactly the tensor names of ``ref`` (name -> shape), with the same shapes."""
    missing = [k for k in ref if k not in sd]
    if missing:
        raise MissingTensorError(
            f"ingredient '{name}': tensor '{missing[0]}' is missing (present in '{ref_name}'; "
            f"{len(missing)} such tensors): the ingredients do not share an architecture"
        )
    extra = [k for k in sd if k not in ref]
    if extra:
        raise MissingTensorError(
            f"ingredient '{name}': tensor '{extra[0]}' is not in '{ref_name}' "
            f"({len(extra)} such tensors): the ingredients do not share an architecture"
        )
    for k, v in ref.items():
        if tuple(sd[k].shape) != tuple(v):
            raise ShapeMismatchError(
                f"ingredient '{name}': tensor '{k}' has shape {list(sd[k].shape)}, "
                f"expected {list(v)} as in '{ref_name}'"
            )


def _finite_score(value: Any, what: str) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise RecipeError(
            f"greedy soup: the scorer returned {value!r} for {what}, expected a number"
        ) from None
    if not math.isfinite(s):
        raise RecipeError(f"greedy soup: the scorer returned {s} for {what}, expected a finite number")
    return s


def greedy_soup(
    ingredients: Sequence[Ingredient],
    score: Callable[[StateDict], float],
    *,
    names: Sequence[str] | None = None,
    individual_scores: Sequence[float] | None = None,
    strict: bool = False,
    progress: Callable[[GreedyStep], None] | None = None,
) -> GreedySoupResult:
    """Greedy soup (Wortsman et al. 2022, Recipe 1).

    ``score(state_dict) -> float`` is the held-out score (higher is better). Ingredients are
    scored one at a time (unless ``individual_scores`` are given), sorted by score (descending,
    ties in input order), and the soup starts from the best; each next ingredient is kept if
    ``score(avg(soup ∪ {c})) >= score(avg(soup))`` (``>`` with ``strict=True``). Every candidate
    soup's score and decision is in :attr:`GreedySoupResult.steps` (and passed to ``progress``).

    The soup is a float32 running sum divided by its size and cast to each tensor's dtype — the
    same arithmetic, in the same order, as the ``linear`` method, so ``weightsmith merge`` of a
    linear recipe over ``result.kept`` writes exactly ``result.state_dict``. Non-floating tensors
    come from the best ingredient. By construction the final score is never below the best
    ingredient's score (on the held-out data ``score`` uses).
    """
    t0 = time.perf_counter()
    if not ingredients:
        raise RecipeError("greedy soup: no ingredients")
    names = list(names) if names is not None else [_default_name(x, i) for i, x in enumerate(ingredients)]
    if len(names) != len(ingredients) or len(set(names)) != len(names):
        raise RecipeError(f"greedy soup: need one distinct name per ingredient, got {names}")
    ref: dict[str, tuple[int, ...]] = {}  # the first ingredient loaded: name -> shape
    ref_name = ""

    def load(i: int) -> StateDict:
        nonlocal ref_name
        sd = load_state_dict(ingredients[i])
        if not ref:
            ref.update({k: tuple(v.shape) for k, v in sd.items()})
            ref_name = names[i]
        else:
            _check_compatible(ref, sd, ref_name, names[i])
        return sd

    if individual_scores is not None:
        if len(individual_scores) != len(ingredients):
            raise RecipeError(
                f"greedy soup: {len(individual_scores)} individual scores for {len(ingredients)} ingredients"
            )
        individual = [
            _finite_score(s, f"ingredient '{n}'") for s, n in zip(individual_scores, names, strict=True)
        ]
    else:
        individual = []
        for i in range(len(ingredients)):
            sd = load(i)
            individual.append(_finite_score(score(sd), f"ingredient '{names[i]}'"))
            del sd
    order = sorted(range(len(ingredients)), key=lambda i: -individual[i])

    first = load(order[0])
    dtypes = {k: v.dtype for k, v in first.items()}
    acc: StateDict = {}
    fixed: StateDict = {}
    for k, v in first.items():
        if v.is_floating_point():
            acc[k] = torch.zeros(v.shape, dtype=torch.float32).add_(v.to(torch.float32), alpha=1.0)
        else:
            fixed[k] = v
    del first
    size = 1
    current = individual[order[0]]
    steps = [GreedyStep(names[order[0]], current, current, True, 1)]
    if progress:
        progress(steps[-1])

    def averaged(extra: StateDict | None, n: int) -> StateDict:
        out: StateDict = {}
        for k, s in acc.items():
            t = s.clone()
            if extra is not None:
                t.add_(extra[k].to(torch.float32), alpha=1.0)
            out[k] = t.div_(float(n)).to(dtypes[k])
        return {**out, **fixed}

    for i in order[1:]:
        cand = load(i)
        s = _finite_score(score(averaged(cand, size + 1)), f"the soup with '{names[i]}'")
        keep = s > current if strict else s >= current
        if keep:
            for k in acc:
                acc[k].add_(cand[k].to(torch.float32), alpha=1.0)
            size += 1
            current = s
        del cand
        steps.append(GreedyStep(names[i], individual[i], s, keep, size))
        if progress:
            progress(steps[-1])
    kept = [st.name for st in steps if st.kept]
    return GreedySoupResult(
        averaged(None, size),
        kept,
        current,
        steps,
        dict(zip(names, individual, strict=True)),
        time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# The sparse soup step (recipe method)
# ---------------------------------------------------------------------------------------------


@merge_method(
    "sparse_soup",
    paper="Zimmer, Spiegel & Pokutta, Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging, ICLR 2024",
    url="https://arxiv.org/abs/2306.16788",
    base="ignored",
    min_models=1,
    elementwise=True,
    propagates_nonfinite=True,
)
def sparse_soup(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 1.0,
    union: bool = False,
    mask_min_dims: int = 2,
    name: str = "",
) -> torch.Tensor:
    """Average sparse models that share one sparsity mask; the soup keeps that zero pattern exactly.

    Sparse Model Soups (Zimmer et al., ICLR 2024, §3): θ = Σ_i w_i θ_i / Σ_i w_i over ingredients
    retrained from one pruned model, so every ingredient is zero where the mask M is, and so is
    the soup (θ = M ⊙ θ). Tensors with at least ``mask_min_dims`` dimensions (the prunable weights
    of linear and convolution layers) must have identical zero patterns, else the merge is refused
    naming the tensor; ``union: true`` averages them anyway (zero only where every model is zero,
    the paper's "average models with different masks" baseline). Biases and norm parameters
    (fewer dimensions) are averaged as they are.
    """
    weights = weight if isinstance(weight, list) else [weight] * len(tensors)
    mask = tensors[0] != 0
    check = tensors[0].dim() >= mask_min_dims
    for i, t in enumerate(tensors[1:], 1):
        m = t != 0
        if torch.equal(m, mask):
            continue
        if check and not union:
            n = int((m != mask).sum())
            raise MaskMismatchError(
                f"sparse_soup: tensor '{name}': model {i} (in recipe order) has a different zero pattern from model 0 "
                f"({n} of {t.numel()} elements differ); Sparse Model Soups average ingredients that share one "
                "sparsity mask (retrain them from one pruned model), or set 'union: true' to average over the "
                "union of their masks"
            )
        mask |= m
    out = torch.zeros_like(tensors[0], dtype=torch.promote_types(tensors[0].dtype, torch.float32))
    for w, t in zip(weights, tensors, strict=True):
        out.add_(t, alpha=float(w))
    total = float(sum(weights))
    if total == 0.0:
        raise RecipeError("sparse_soup: the weights sum to 0")
    out.div_(total)
    # exact zeros where the mask is (also turns -0.0 into +0.0)
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype))


# ---------------------------------------------------------------------------------------------
# Global magnitude pruning
# ---------------------------------------------------------------------------------------------


def sparsity_schedule(goal: float, phases: int) -> list[float]:
    """Sparsity after each of ``phases`` prune–retrain phases reaching ``goal`` (SMS/IMP schedule).

    Each phase prunes the fraction q = 1 − (1 − s_T)^{1/T} of the *remaining* weights, so the
    sparsity after phase i is s_i = 1 − (1 − q)^i = 1 − (1 − s_T)^{i/T} (Zimmer et al. 2024, §4).
    """
    if not 0.0 <= goal < 1.0:
        raise RecipeError(f"goal sparsity must be in [0, 1), got {goal}")
    if phases < 1:
        raise RecipeError(f"need at least one phase, got {phases}")
    return [1.0 - (1.0 - goal) ** (i / phases) for i in range(1, phases + 1)]


def prunable_weights(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The prunable tensors of SMS/IMP: every module's ``weight`` with at least 2 dimensions
    (linear, convolution, embedding); norm layers' weights and all biases are not pruned."""
    out: dict[str, torch.nn.Parameter] = {}
    for mname, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() >= 2:
            out[f"{mname}.weight" if mname else "weight"] = w
    return out


def global_magnitude_prune(
    weights: Mapping[str, torch.Tensor], amount: float, masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Global unstructured magnitude (L1) pruning: new boolean masks (True = kept).

    Prunes ``round(amount · n_remaining)`` of the weights that ``masks`` still keeps (all of them
    without masks): those of smallest |w| over all tensors together, as
    ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=amount)`` does (the
    SMS reference code's pruning selector). Pruned entries stay pruned.
    """
    if not 0.0 <= amount <= 1.0:
        raise RecipeError(f"prune amount must be in [0, 1], got {amount}")
    names = list(weights)
    if masks is None:
        masks = {k: torch.ones(weights[k].shape, dtype=torch.bool) for k in names}
    for k in names:
        if k not in masks or tuple(masks[k].shape) != tuple(weights[k].shape):
            raise ShapeMismatchError(
                f"global_magnitude_prune: no mask of shape {list(weights[k].shape)} for tensor '{k}'"
            )
    flat_mask = torch.cat([masks[k].reshape(-1).to(torch.bool) for k in names])
    scores = torch.cat([weights[k].detach().reshape(-1).abs().to(torch.float32) for k in names])
    remaining = scores[flat_mask]
    n_prune = round(amount * remaining.numel())
    keep_remaining = torch.ones(remaining.numel(), dtype=torch.bool)
    if n_prune > 0:
        idx = torch.topk(remaining, n_prune, largest=False).indices
        keep_remaining[idx] = False
    new_flat = torch.zeros_like(flat_mask)
    new_flat[flat_mask] = keep_remaining
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for k in names:
        n = weights[k].numel()
        out[k] = new_flat[pos : pos + n].reshape(weights[k].shape).clone()
        pos += n
    return out


def sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of pruned entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, total)


def _zero_pattern_matches(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    for k, m in masks.items():
        nz = state[k] != 0
        if bool((nz & ~m).any()):
            raise MaskMismatchError(
                f"tensor '{k}': {int((nz & ~m).sum())} pruned entries are not zero in the soup"
            )


# ---------------------------------------------------------------------------------------------
# Sparse Model Soups: the prune–retrain loop
# ---------------------------------------------------------------------------------------------


@dataclass
class IngredientRecord:
    variation: dict[str, Any]
    score: float  # evaluate() of the retrained ingredient (as trained, no recalibration)
    metrics: dict[str, float] = field(default_factory=dict)
    drift: int = 0  # pruned entries the train function made non-zero (set back to zero)
    seconds: float = 0.0


@dataclass
class PhaseRecord:
    phase: int  # 1-based
    target_sparsity: float  # the schedule's value
    sparsity: float  # measured on the phase mask (fraction of prunable weights that are zero)
    pruned_score: float  # evaluate() right after pruning, before retraining
    ingredients: list[IngredientRecord]
    soup: str  # "uniform" | "greedy"
    kept: list[int]  # indices of the ingredients in the soup
    score: float  # evaluate() of the soup (after BN recalibration)
    metrics: dict[str, float] = field(default_factory=dict)
    greedy: dict[str, Any] | None = None  # the greedy soup's log

    @property
    def best_ingredient(self) -> IngredientRecord:
        return max(self.ingredients, key=lambda r: r.score)


@dataclass
class SparseSoupResult:
    model: torch.nn.Module  # the last phase's soup (sparsity = goal), masks applied
    masks: dict[str, torch.Tensor]
    phases: list[PhaseRecord]

    def to_json(self) -> dict[str, Any]:
        return {"phases": [asdict(p) for p in self.phases]}


TrainFn = Callable[[torch.nn.Module, Mapping[str, Any], int], Any]


def _apply_masks(module: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Zero the pruned entries in place; return how many were non-zero."""
    params = prunable_weights(module)
    drift = 0
    with torch.no_grad():
        for k, m in masks.items():
            p = params[k]
            drift += int(((p != 0) & ~m).sum())
            p.mul_(m.to(p.dtype))
    return drift


def sparse_model_soup(
    model: torch.nn.Module,
    train: TrainFn,
    evaluate: Callable[[torch.nn.Module], float],
    *,
    goal_sparsity: float,
    phases: int,
    variations: Sequence[Mapping[str, Any]],
    soup: Literal["uniform", "greedy"] = "uniform",
    recalibrate: Callable[[torch.nn.Module], Any] | None = None,
    metrics: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
    on_ingredient: Callable[[int, int, torch.nn.Module], Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SparseSoupResult:
    """Sparse Model Soups (Zimmer, Spiegel & Pokutta, ICLR 2024, Algorithm 1).

    For phase i = 1..T: prune the current model globally by magnitude to the schedule's
    sparsity s_i (:func:`sparsity_schedule`), giving mask M_i; retrain one copy per entry of
    ``variations`` (m ingredients: ``train(copy, variation, i)`` trains in place, for example with
    its own seed / batch order / learning rate), with M_i held fixed (gradients of pruned entries
    are masked, and pruned entries are set back to zero afterwards); average them — all, or
    greedily on ``evaluate`` (:func:`greedy_soup`) — which keeps M_i exactly; recalibrate
    BatchNorm statistics (``recalibrate``, e.g. ``lambda m: reset_bn(m, loader)`` from
    ``merge.methods.rebasin``); and start the next phase from the soup.

    ``evaluate(module) -> float`` is the held-out score (greedy selection and the records);
    ``metrics(module) -> {name: value}`` optional extra numbers (e.g. test accuracy) recorded for
    every ingredient and soup; ``on_ingredient(phase, j, module)`` is called with each retrained
    ingredient (to save it, for instance). ``model`` is not modified. Ingredient state dicts of one phase are
    kept in memory (m models) while the soup is made.
    """
    if not variations:
        raise RecipeError("sparse_model_soup: need at least one variation (one ingredient per phase)")
    if soup not in ("uniform", "greedy"):
        raise RecipeError(f"sparse_model_soup: soup must be 'uniform' or 'greedy', got {soup!r}")
    schedule = sparsity_schedule(goal_sparsity, phases)
    q = 1.0 - (1.0 - goal_sparsity) ** (1.0 / phases)
    current = copy.deepcopy(model)
    params = prunable_weights(current)
    if not params:
        raise RecipeError(
            "sparse_model_soup: the model has no prunable weights (no weight with 2+ dimensions)"
        )
    masks: dict[str, torch.Tensor] | None = None
    records: list[PhaseRecord] = []
    say = progress or (lambda _msg: None)

    def extra(m: torch.nn.Module) -> dict[str, float]:
        return {k: float(v) for k, v in (metrics(m) if metrics else {}).items()}

    for phase in range(1, phases + 1):
        masks = global_magnitude_prune({k: p.detach() for k, p in params.items()}, q, masks)
        _apply_masks(current, masks)
        pruned_score = float(evaluate(current))
        say(
            f"phase {phase}/{phases}: pruned to {sparsity(masks):.4f} (target {schedule[phase - 1]:.4f}), "
            f"score {pruned_score:.4f}"
        )
        states: list[StateDict] = []
        ingredients: list[IngredientRecord] = []
        for j, var in enumerate(variations):
            t0 = time.perf_counter()
            m = copy.deepcopy(current)
            mp = prunable_weights(m)
            hooks = [mp[k].register_hook(lambda g, mk=masks[k]: g * mk.to(g.dtype)) for k in masks]
            try:
                train(m, var, phase)
            finally:
                for h in hooks:
                    h.remove()
            drift = _apply_masks(m, masks)
            rec = IngredientRecord(dict(var), float(evaluate(m)), extra(m), drift, time.perf_counter() - t0)
            ingredients.append(rec)
            states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
            if on_ingredient is not None:
                on_ingredient(phase, j, m)
            say(f"phase {phase}: ingredient {j} {dict(var)} score {rec.score:.4f}")
            del m
        greedy_log = None
        if soup == "greedy" and len(states) > 1:
            probe = copy.deepcopy(current)

            def score_fn(sd: StateDict, _probe: torch.nn.Module = probe) -> float:
                _probe.load_state_dict(sd)
                if recalibrate is not None:
                    recalibrate(_probe)
                return float(evaluate(_probe))

            g = greedy_soup(states, score_fn, names=[str(j) for j in range(len(states))])
            soup_state, kept = g.state_dict, [int(n) for n in g.kept]
            greedy_log = g.to_json()
        else:
            kept = list(range(len(states)))
            soup_state = {}
            for k in states[0]:
                ts = [s[k] for s in states]
                if ts[0].is_floating_point():
                    soup_state[k] = sparse_soup([t.to(torch.float32) for t in ts], None, name=k).to(
                        ts[0].dtype
                    )
                else:
                    soup_state[k] = ts[0]
        _zero_pattern_matches(soup_state, masks)
        del states
        current.load_state_dict(soup_state)
        params = prunable_weights(current)
        if recalibrate is not None:
            recalibrate(current)
        rec = PhaseRecord(
            phase,
            schedule[phase - 1],
            sparsity(masks),
            pruned_score,
            ingredients,
            soup,
            kept,
            float(evaluate(current)),
            extra(current),
            greedy_log,
        )
        records.append(rec)
        say(
            f"phase {phase}: soup of {len(kept)} score {rec.score:.4f} "
            f"(best ingredient {rec.best_ingredient.score:.4f})"
        )
    assert masks is not None
    return SparseSoupResult(current, masks, records)


def iterative_magnitude_pruning(
    model: torch.nn.Module,
    train: TrainFn,
    evaluate: Callable[[torch.nn.Module], float],
    *,
    goal_sparsity: float,
    phases: int,
    variation: Mapping[str, Any] | None = None,
    recalibrate: Callable[[torch.nn.Module], Any] | None = None,
    metrics: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SparseSoupResult:
    """IMP (Han et al. 2015; the baseline of Zimmer et al. 2024): prune–retrain phases with one
    retrain per phase — :func:`sparse_model_soup` with m = 1."""
    return sparse_model_soup(
        model,
        train,
        evaluate,
        goal_sparsity=goal_sparsity,
        phases=phases,
        variations=[dict(variation or {})],
        soup="uniform",
        recalibrate=recalibrate,
        metrics=metrics,
        progress=progress,
    )
