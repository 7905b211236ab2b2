"""OPCM: continual model merging by orthogonal projection and adaptive scaling.

Tang, Yang, Shen, Luo, Hu, Du & Tao, "Merging Models on the Fly Without Retraining: A Sequential
Approach to Scalable Continual Model Merging" (arXiv:2501.09522, 2025; FusionBench's ``opcm``).

Models fine-tuned from one pretrained θ_0 arrive one at a time, τ_t = θ_t − θ_0. OPCM keeps the
running sum of *projected* task vectors and rescales it::

    S_1 = τ_1,        S_t = S_{t-1} + P_{t-1}(τ_t)
    θ^(t) = θ_0 + S_t / λ_t,        λ_t = ‖S_t‖ / ((1/t) Σ_{i≤t} ‖τ_i‖)

so the merged update always has the average task-vector norm (λ_1 = 1: one task gives θ_1 itself;
t mutually orthogonal task vectors of equal norm give λ_t = √t). Norms are taken over the whole
model (every floating tensor), as in the paper's reference code.

The projection, per 2-D tensor (a linear layer's weight). With S_{t-1} = U diag(σ) Vᵀ (its rank-k
SVD, singular values above the usual ``max(m, n)·eps·σ_1`` tolerance), write the new task vector in
that basis, C = Uᵀ τ V (k × k), and remove

* the block C_ij, i, j ≤ r, where r is the smallest number of leading singular values whose sum
  reaches the fraction ``alpha`` of Σσ (α = 0: r = 0; α = 1: r = k): the subspace of the directions
  that carry the merged update, left *and* right;
* the diagonal C_ii, i ≤ k: the component along every singular direction u_i v_iᵀ of the merged
  update, so that P(τ) is Frobenius-orthogonal to S_{t-1} (⟨P(τ), S_{t-1}⟩ = 0, the paper's
  orthogonality property);

P(τ) = τ − U (C ⊙ M) Vᵀ, an orthogonal projection (idempotent) in the Frobenius inner product.
Everything else of τ (the parts outside the merged update's row and column spaces, and the
off-diagonal parts beyond r) is kept. Tensors that are not matrices (biases, norms) are not
projected: their task vectors are summed and scaled by the same 1/λ_t.

Where this differs from FusionBench's ``OPCMForCLIP`` (read, not copied): its SVD is full
(``full_matrices=True``) and it zeroes the whole diagonal, including the directions of zero singular
values, which are an arbitrary completion of the basis (a rank-deficient merged update would then
remove arbitrary parts of a new task vector, differently on every LAPACK); here only the k directions
the merged update really has are used. Its split index counts the singular values *below* the
threshold (``argmax(cumsum/sum > α)``), so the value that crosses it is outside its block; here r
includes it ("the smallest set of top directions that holds α of Σσ"). It projects ``nn.Linear``
weights only; on a state dict there are no modules, so every 2-D floating tensor is projected
(an embedding table too). It takes the SVD of S_{t-1}/λ_{t-1}; the subspaces are those of S_{t-1}.

Arithmetic: float64 throughout, on one torch thread (the SVD's and the reductions' bits depend on
the thread count), tensors in sorted name order, so the library call, a soup folder grown one
``add`` at a time and a soup re-built from its members give the same bits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch

from merge.checkpoint import require_finite
from merge.errors import InvalidArgumentError, MissingTensorError, ShapeMismatchError

__all__ = [
    "ALPHA",
    "ContinualOPCM",
    "OPCMStep",
    "check_alpha",
    "merged_tensor",
    "opcm_merge",
    "project",
    "split_rank",
    "step_stats",
    "step_tensor",
]

#: the paper's (and FusionBench's) default energy threshold
ALPHA = 0.5
PAPER = "Tang et al., Merging Models on the Fly Without Retraining (OPCM), arXiv:2501.09522"


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float in [0, 1], or an :class:`InvalidArgumentError` saying what it must be."""
    ok = isinstance(alpha, int | float) and not isinstance(alpha, bool)
    a = float(alpha) if ok else math.nan  # type: ignore[arg-type]
    if not (ok and math.isfinite(a) and 0.0 <= a <= 1.0):
        raise InvalidArgumentError(
            f"OPCM alpha {alpha!r}: must be a number in [0, 1] (the fraction of the merged update's "
            "singular-value sum whose directions a new task vector is projected away from; default 0.5)"
        )
    return a


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    prev = torch.get_num_threads()
    if prev != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if prev != 1:
            torch.set_num_threads(prev)


def _sq(t: torch.Tensor) -> float:
    """‖t‖² of a float64 tensor (one reduction over the whole tensor: same bits wherever it is called)."""
    return float(torch.sum(t * t)) if t.numel() else 0.0


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """r: how many leading singular values (``s``, descending, all > 0) it takes for their sum to reach
    ``alpha`` of the total (0 for α = 0, len(s) for α = 1)."""
    k = int(s.numel())
    if k == 0 or alpha <= 0.0:
        return 0
    cums = torch.cumsum(s, 0)
    return min(k, int((cums < alpha * cums[-1]).sum()) + 1)


def project(prev_sum: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """P_{t-1}(τ) of one matrix (float64): τ without its components in the block of the top-r singular
    directions (left × right) of ``prev_sum`` and along each of its singular directions u_i v_iᵀ."""
    if prev_sum.dim() != 2 or tau.shape != prev_sum.shape:
        raise ShapeMismatchError(f"OPCM projection: shapes {tuple(prev_sum.shape)} and {tuple(tau.shape)}")
    u, s, vh = torch.linalg.svd(prev_sum, full_matrices=False)
    if s.numel() == 0 or not bool(s[0] > 0):
        return tau.clone()
    tol = float(s[0]) * max(prev_sum.shape) * torch.finfo(s.dtype).eps
    k = int((s > tol).sum())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    r = split_rank(s, alpha)
    c = u.T @ tau @ vh.T
    mask = torch.zeros(k, k, dtype=torch.bool)
    mask[:r, :r] = True
    mask.fill_diagonal_(True)
    return tau - u @ (c * mask) @ vh


def step_tensor(
    prev_sum: torch.Tensor | None, base: torch.Tensor, model: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, float, float, float]:
    """One OPCM step for one tensor: ``(S_t, ‖τ_t‖², ‖P(τ_t)‖², ‖S_t‖²)`` with τ_t = model − base and
    S_t = S_{t-1} + P_{t-1}(τ_t) (float64; a 2-D tensor is projected, any other one is not)."""
    with _one_thread():
        tau = model.to(torch.float64) - base.to(torch.float64)
        kept = project(prev_sum, tau, alpha) if prev_sum is not None and tau.dim() == 2 else tau
        new = kept if prev_sum is None else prev_sum + kept
        return new, _sq(tau), _sq(kept), _sq(new)


@dataclass(frozen=True)
class OPCMStep:
    """What one arrival did: ‖τ_t‖, the fraction of it the projection kept, ‖S_t‖ and λ_t."""

    step: int
    task_norm: float
    kept: float
    sum_norm: float
    lam: float
    name: str = ""

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        return d


def step_stats(norms: list[float], tau_sq: float, kept_sq: float, sum_sq: float, name: str = "") -> OPCMStep:
    """Close a step: append ‖τ_t‖ to ``norms`` (in place) and compute λ_t = ‖S_t‖ / mean_i ‖τ_i‖
    (1 when the merged update is zero: every task vector so far was zero or projected away)."""
    norms.append(math.sqrt(tau_sq))
    mean = sum(norms) / len(norms)
    sum_norm = math.sqrt(sum_sq)
    lam = sum_norm / mean if sum_norm > 0 and mean > 0 else 1.0
    kept = math.sqrt(kept_sq) / norms[-1] if norms[-1] > 0 else 1.0
    return OPCMStep(len(norms), norms[-1], kept, sum_norm, lam, name)


def merged_tensor(base: torch.Tensor, s: torch.Tensor, lam: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """θ_0 + S_t / λ_t in float64, stored as ``dtype`` (default: the base's). Elementwise, so rows of it
    computed apart (a soup build streams row chunks) have the same bits."""
    return (base.to(torch.float64) + s / lam).to(dtype or base.dtype)


@dataclass
class ContinualOPCM:
    """OPCM in memory: ``add`` each arriving model (a state dict with the base's tensors), read
    ``merged()`` at any point. Holds θ_0 and S_t (float64), never the models that were added.

    Tang et al. 2025 (arXiv:2501.09522), §3: θ^(t) = θ_0 + (1/λ_t) Σ_i P_{i-1}(τ_i)."""

    base: Mapping[str, torch.Tensor]
    alpha: float = ALPHA
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    norms: list[float] = field(default_factory=list)
    steps: list[OPCMStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.alpha = check_alpha(self.alpha)
        for k, v in self.base.items():
            require_finite(v, "the base", k)
        self.floats = sorted(k for k, v in self.base.items() if v.is_floating_point())

    @property
    def lam(self) -> float:
        return self.steps[-1].lam if self.steps else 1.0

    def add(self, model: Mapping[str, torch.Tensor], name: str | None = None) -> OPCMStep:
        """One arrival: S ← S + P(τ), λ re-computed. Errors name the model and the tensor; on an error
        nothing changes."""
        name = name or f"model {len(self.steps)}"
        _check_model(self.base, model, name)
        new: dict[str, torch.Tensor] = {}
        tau_sq = kept_sq = sum_sq = 0.0
        for k in self.floats:
            x = require_finite(model[k], name, k)
            new[k], t2, p2, s2 = step_tensor(self.sums.get(k), self.base[k], x, self.alpha)
            tau_sq += t2
            kept_sq += p2
            sum_sq += s2
        norms = list(self.norms)
        step = step_stats(norms, tau_sq, kept_sq, sum_sq, name)
        self.sums, self.norms = new, norms
        self.steps.append(step)
        return step

    def merged(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """θ_0 + S_t / λ_t (θ_0 itself before the first model); non-floating tensors are the base's."""
        out = {}
        for k, v in self.base.items():
            if k in self.sums:
                with _one_thread():
                    out[k] = merged_tensor(v, self.sums[k], self.lam, dtype)
            else:
                out[k] = v.clone()
        return out


def _check_model(base: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], name: str) -> None:
    missing = [k for k in base if k not in model]
    if missing:
        raise MissingTensorError(f"{name}: tensor '{missing[0]}' is missing (present in the base)")
    extra = [k for k in model if k not in base]
    if extra:
        raise MissingTensorError(f"{name}: tensor '{extra[0]}' is not in the base ({len(extra)} such tensors)")
    for k, v in base.items():
        if tuple(model[k].shape) != tuple(v.shape):
            raise ShapeMismatchError(
                f"{name}: tensor '{k}' has shape {list(model[k].shape)}, expected {list(v.shape)} as in the base"
            )


def opcm_merge(
    base: Mapping[str, torch.Tensor],
    models: Iterable[Mapping[str, torch.Tensor]],
    alpha: float = ALPHA,
    *,
    dtype: torch.dtype | None = None,
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """OPCM of ``models`` arriving in the given order (Tang et al. 2025, arXiv:2501.09522, §3):
    θ_0 + (1/λ_T) Σ_t P_{t-1}(τ_t). A pure function on state dicts; ``models`` may be a generator,
    so only one model is held at a time. Non-floating tensors come from ``base``; floating ones are
    stored as ``dtype`` (default: the base's). Equals, bit for bit, a soup folder of method ``opcm``
    with the same base, alpha and members in this order."""
    run = ContinualOPCM(base, alpha)
    n = 0
    for i, m in enumerate(models):
        run.add(m, names[i] if names is not None else f"model {i}")
        n += 1
    if n == 0:
        raise InvalidArgumentError("opcm_merge: no models to merge")
    return run.merged(dtype)
