"""TALL masks and consensus merging: which weights of the merged task vector each task needs.

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret & Frossard, "Localizing Task Information for Improved
Model Merging and Compression", ICML 2024 (arXiv:2405.07813). With task vectors ``τ_t = θ_t − θ_0``
and the multi-task vector ``τ_MTL = Σ_t τ_t`` (task arithmetic's sum):

* the **TALL mask** of task t keeps the weights where the task's own vector dominates what the
  other tasks add, ``m_t = 1{|τ_t| ≥ λ_t |τ_MTL − τ_t|}`` (Eq. 5); ``θ_0 + m_t ⊙ τ_MTL`` recovers
  the fine-tuned model's ability from the merged vector (§4, compression: one merged vector and T
  binary masks instead of T models);
* **consensus merging** drops the weights that at most one task needs ("selfish", needed by one;
  "catastrophic", needed by none): ``m_cons = 1{Σ_t m_t ≥ k}`` (k = 2, Eq. 7) and
  ``θ = θ_0 + α m_cons ⊙ τ_MTL`` (consensus task arithmetic, §5).

Both are elementwise (every output element depends on the same element of the inputs only), so the
engine streams them in row chunks like task arithmetic.
"""

from __future__ import annotations

import torch

from merge.errors import RecipeError
from merge.methods.registry import PerModel, merge_method
from merge.methods.task_arithmetic import _deltas, _per_model


def _lambdas(value: object, n: int, method: str) -> list[float]:
    out = _per_model(value, n, "tall_lambda", method)
    for v in out:
        if not v >= 0:
            raise RecipeError(f"method '{method}': tall_lambda must be >= 0, got {v}")
    return out


def tall_masks(deltas: list[torch.Tensor], lambdas: list[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``τ_MTL`` and the TALL mask of every task, ``|τ_t| ≥ λ_t |τ_MTL − τ_t|`` (module docstring)."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    masks = [d.abs() >= lam * (total - d).abs() for d, lam in zip(deltas, lambdas, strict=True)]
    return total, masks


@merge_method(
    "consensus_ta",
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024",
    url="https://arxiv.org/abs/2405.07813",
    base="required",
    min_models=2,
    elementwise=True,
)
def consensus_ta(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    tall_lambda: PerModel[float] = 0.4,
    k: int = 2,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Consensus task arithmetic: θ_0 + λ (m_cons ⊙ Σ_t τ_t), keeping the weights at least ``k`` tasks' TALL masks keep.

    ``tall_lambda`` (per model, the paper tunes it in [0.2, 0.6]) sets how much a task's own vector
    must dominate the others' for the task to need a weight; ``k`` (2 in the paper) how many tasks must.
    """
    deltas = _deltas(tensors, base, "consensus_ta")
    assert base is not None
    if k < 1:
        raise RecipeError(f"method 'consensus_ta': k must be at least 1, got {k}")
    total, masks = tall_masks(deltas, _lambdas(tall_lambda, len(deltas), "consensus_ta"))
    votes = torch.zeros_like(base, dtype=torch.int32)
    for m in masks:
        votes.add_(m.to(torch.int32))
    return base + lambda_ * total * (votes >= k)


@merge_method(
    "tall_mask",
    paper="Wang et al., Localizing Task Information for Improved Model Merging and Compression, ICML 2024",
    url="https://arxiv.org/abs/2405.07813",
    base="required",
    min_models=1,
    elementwise=True,
)
def tall_mask(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    task: int = 0,
    tall_lambda: PerModel[float] = 0.4,
) -> torch.Tensor:
    """One task's model recovered from the merged vector: θ_0 + m_task ⊙ Σ_t τ_t (TALL mask, compression).

    ``task`` is the index of that task's model in the recipe's ``models`` (0-based).
    """
    deltas = _deltas(tensors, base, "tall_mask")
    assert base is not None
    if not 0 <= task < len(deltas):
        raise RecipeError(f"method 'tall_mask': task must be a model index in [0, {len(deltas) - 1}], got {task}")
    total, masks = tall_masks(deltas, _lambdas(tall_lambda, len(deltas), "tall_mask"))
    return base + total * masks[task]
