"""Subspace merges: task matrices decomposed by SVD, merged in (near-)orthogonal or isotropic form.

A task matrix is a 2-D task vector ``Δ_t = θ_t − θ_0`` of one layer. Every tensor that is not a
matrix (biases, norms, embeddings of another rank) is merged by the mean of the task vectors, as
the papers' code does; ``θ = θ_0 + α Δ`` in both cases. The matrices are decomposed whole (an SVD
per task and layer: far slower than the elementwise methods on large models, whose cost is reading).

* **TSV-M** — Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri & Rodolà, "Task Singular
  Vectors: Reducing Task Interference in Model Merging", CVPR 2025 (arXiv:2412.00081), §4: each
  ``Δ_t = U_t Σ_t V_tᵀ`` keeps its top ``k = ⌊r / T⌋`` singular triplets (the "task singular
  vectors"; ``r`` the matrix rank bound, ``T`` the number of tasks); the kept vectors are
  concatenated, ``U = [U_1,k … U_T,k]``, ``V = [V_1,k … V_T,k]``, ``Σ = diag(Σ_1,k … Σ_T,k)``,
  and the interference between tasks removed by replacing ``U`` and ``V`` by their nearest
  orthogonal matrices (the polar factors ``P Qᵀ`` of ``U = P S Qᵀ``, Eq. 6, orthogonal Procrustes):
  ``Δ = U⊥ Σ V⊥ᵀ``. ``α = 1`` needs no validation (the paper's claim).
* **ISO-C** — Marczak, Magistri, Cygert, Twardowski, Bagdanov & van de Weijer, "No Task Left
  Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025
  (arXiv:2502.04959), §4.1: the task-arithmetic sum ``Δ_TA = Σ_t Δ_t = U S Vᵀ`` with its spectrum
  flattened to the mean singular value, ``Δ = σ̄ U Vᵀ``, ``σ̄ = (1/r) Σ_i σ_i`` (Eq. 6).
* **ISO-CTS** — the same paper, §4.2: the top ``k ≈ f r`` directions of ``Δ_TA`` (the common
  subspace, ``f = common_fraction``) are completed by each task's top ``(r − k) / T`` directions
  of what the common subspace misses, ``Δ_t − U_k U_kᵀ Δ_t``; the concatenated bases are
  orthogonalised as in TSV-M and every singular value set to the mean of the kept ones (Eq. 10–11).
"""

from __future__ import annotations

import torch

from merge.errors import RecipeError
from merge.methods.registry import merge_method
from merge.methods.task_arithmetic import _deltas


def _is_matrix(base: torch.Tensor) -> bool:
    return base.dim() == 2 and min(base.shape) > 1


def _mean(deltas: list[torch.Tensor]) -> torch.Tensor:
    out = deltas[0].clone()
    for d in deltas[1:]:
        out.add_(d)
    return out.div_(len(deltas))


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in the compute dtype (float32 unless float64 was asked for; half precision is raised to
    float32), as the authors' code. It is the cost of these methods: O(m n min(m, n)) per matrix and task."""
    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    return torch.linalg.svd(work, full_matrices=False)


def _rank(s: torch.Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values are not zero to working precision (numpy's ``matrix_rank`` rule)."""
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > s[0] * max(shape) * torch.finfo(s.dtype).eps).sum())


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of ``m`` nearest to it in Frobenius norm: ``P Qᵀ`` for ``m = P S Qᵀ``
    (orthogonal Procrustes; TSV-M Eq. 6), orthonormal columns when ``m`` has full column rank.

    When ``m`` is rank-deficient (tasks sharing directions) only the non-zero singular values count
    (the partial isometry ``P_r Q_rᵀ``): unique, where the completion of the full factor is arbitrary."""
    p, s, qh = _svd(m)
    r = _rank(s, tuple(m.shape))
    return p[:, :r] @ qh[:r]


def _finish(delta: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    return base + (alpha * delta).to(base.dtype)


def _check_fraction(value: float, name: str, method: str) -> None:
    if not 0.0 < value <= 1.0:
        raise RecipeError(f"method '{method}': {name} must be in (0, 1], got {value}")


def task_singular_vectors(deltas: list[torch.Tensor], fraction: float | None = None) -> torch.Tensor:
    """TSV-M's merged task matrix ``U⊥ Σ V⊥ᵀ`` of 2-D task matrices (module docstring).

    ``fraction``: the share of the rank bound each task keeps (default ``1/T``, the paper's). Singular
    values that are zero to working precision are not kept (their vectors are arbitrary and carry
    nothing; kept, they would bend the other tasks' bases in the orthogonalisation)."""
    r = min(deltas[0].shape)
    keep = max(1, int(r * (fraction if fraction is not None else 1.0 / len(deltas))))
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = _svd(d)
        k = min(keep, _rank(s, tuple(d.shape)))
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    if not any(len(x) for x in ss):
        return torch.zeros_like(deltas[0])
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    return polar(u_cat) @ torch.diag(s_cat) @ polar(vh_cat)


def isotropic(delta_sum: torch.Tensor) -> torch.Tensor:
    """ISO-C: ``σ̄ U Vᵀ`` for ``Δ_TA = U S Vᵀ`` (module docstring)."""
    u, s, vh = _svd(delta_sum)
    return s.mean() * (u @ vh)


def isotropic_common_and_task(deltas: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """ISO-CTS: the common subspace of ``Σ_t Δ_t`` completed by each task's own directions, orthogonalised,
    with a flat spectrum at the mean of the kept singular values (module docstring).

    The common subspace takes ``k = r − T ⌊(r − ⌊f r⌋ + T/2) / T⌋`` directions, so that the rest splits
    evenly between the T tasks (the authors' rounding)."""
    r, t = min(deltas[0].shape), len(deltas)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    u, s, vh = _svd(total)
    per_task = round((r - int(r * common_fraction)) / t)
    k = max(1, r - per_task * t)
    per_task = (r - k) // t
    if per_task == 0:
        return s[:k].mean() * (u[:, :k] @ vh[:k])
    u_k = u[:, :k]
    us, ss, vhs = [u_k], [s[:k]], [vh[:k]]
    for d in deltas:
        d = d.to(u_k.dtype)
        rest = d - u_k @ (u_k.T @ d)
        ut, st, vht = _svd(rest)
        n = min(per_task, _rank(st, tuple(rest.shape)))
        us.append(ut[:, :n])
        ss.append(st[:n])
        vhs.append(vht[:n])
    return torch.cat(ss).mean() * (polar(torch.cat(us, 1)) @ polar(torch.cat(vhs, 0)))


@merge_method(
    "tsv",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
    url="https://arxiv.org/abs/2412.00081",
    base="required",
    min_models=1,
)
def tsv(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    lambda_: float = 1.0,
    sv_fraction: float | None = None,
) -> torch.Tensor:
    """TSV-M: each task's top singular vectors, decorrelated (nearest orthogonal bases), summed; θ_0 + λ Δ.

    ``sv_fraction``: the share of each matrix's rank kept per task (default 1/number of models).
    Tensors that are not matrices: the mean task vector.
    """
    deltas = _deltas(tensors, base, "tsv")
    assert base is not None
    if sv_fraction is not None:
        _check_fraction(sv_fraction, "sv_fraction", "tsv")
    if not _is_matrix(base):
        return _finish(_mean(deltas), base, lambda_)
    return _finish(task_singular_vectors(deltas, sv_fraction), base, lambda_)


@merge_method(
    "iso_c",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, ICML 2025",
    url="https://arxiv.org/abs/2502.04959",
    base="required",
    min_models=1,
)
def iso_c(tensors: list[torch.Tensor], base: torch.Tensor | None, *, lambda_: float = 1.0) -> torch.Tensor:
    """ISO-C: the task-arithmetic sum with a flat singular spectrum (its mean singular value); θ_0 + λ Δ.

    Tensors that are not matrices: the mean task vector.
    """
    deltas = _deltas(tensors, base, "iso_c")
    assert base is not None
    if not _is_matrix(base):
        return _finish(_mean(deltas), base, lambda_)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    return _finish(isotropic(total), base, lambda_)


@merge_method(
    "iso_cts",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, ICML 2025",
    url="https://arxiv.org/abs/2502.04959",
    base="required",
    min_models=1,
)
def iso_cts(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    lambda_: float = 1.0,
    common_fraction: float = 0.8,
) -> torch.Tensor:
    """ISO-CTS: the common subspace of the sum plus each task's own directions, orthogonalised, flat spectrum.

    ``common_fraction``: the share of each matrix's rank given to the common subspace (the paper's 0.8).
    Tensors that are not matrices: the mean task vector.
    """
    deltas = _deltas(tensors, base, "iso_cts")
    assert base is not None
    _check_fraction(common_fraction, "common_fraction", "iso_cts")
    if not _is_matrix(base):
        return _finish(_mean(deltas), base, lambda_)
    return _finish(isotropic_common_and_task(deltas, common_fraction), base, lambda_)
