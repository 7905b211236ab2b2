"""TSV-M, ISO-C, ISO-CTS (SVD of task matrices) and TALL-mask consensus merging on small tensors.

Hand-computed cases and invariants: task matrices in orthogonal subspaces add up unchanged under
TSV-M; ISO-C flattens the spectrum of the sum to its mean; ISO-CTS with the whole rank as common
subspace is ISO-C; all three commute with rotations of the rows and columns; TALL masks and the
consensus vote on a worked example.
"""

from __future__ import annotations

import pytest
import torch

from merge.errors import RecipeError
from merge.methods import get_method
from merge.methods.consensus import consensus_ta, tall_mask
from merge.methods.subspace import iso_c, iso_cts, polar, tsv


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _rank1(u: torch.Tensor, v: torch.Tensor, s: float) -> torch.Tensor:
    return s * torch.outer(u, v)


def test_tsv_of_task_matrices_in_orthogonal_subspaces_is_their_sum() -> None:
    """Each task keeps its top r/T = 2 singular vectors; orthonormal already, the polar step changes nothing."""
    U, V = _orthogonal(6, 0), _orthogonal(6, 1)
    d1 = _rank1(U[:, 0], V[:, 0], 3.0) + _rank1(U[:, 1], V[:, 1], 1.0)
    d2 = _rank1(U[:, 2], V[:, 2], 2.0) + _rank1(U[:, 3], V[:, 3], 0.5)
    d3 = _rank1(U[:, 4], V[:, 4], 1.5)
    base = torch.randn(6, 6, dtype=torch.float64)
    out = tsv([base + d1, base + d2, base + d3], base)
    torch.testing.assert_close(out, base + d1 + d2 + d3)
    # a task's directions beyond its r/T share are dropped: rank 3 for one task of two keeps 3 of 6
    d4 = d1 + _rank1(U[:, 5], V[:, 5], 0.1)
    out = tsv([base + d4, base + d2], base)
    torch.testing.assert_close(out, base + d4 + d2)  # 3 + 2 directions, all within the 6 // 2 = 3 kept


def test_tsv_drops_the_smallest_directions_and_decorrelates_overlapping_ones() -> None:
    U, V = _orthogonal(4, 2), _orthogonal(4, 3)
    d = _rank1(U[:, 0], V[:, 0], 2.0) + _rank1(U[:, 1], V[:, 1], 1.0) + _rank1(U[:, 2], V[:, 2], 0.25)
    base = torch.zeros(4, 4, dtype=torch.float64)
    out = tsv([d, d], base)  # two identical tasks: each keeps its top 2 directions, which coincide
    # U = [u0 u1 u0 u1]: its orthogonal factor is (1/√2)[u0 u1 u0 u1], V's likewise, so
    # U⊥ diag(2, 1, 2, 1) V⊥ᵀ = (1/2)(2 u0v0ᵀ + u1v1ᵀ) · 2: the top-2 truncation of the task matrix
    torch.testing.assert_close(out, _rank1(U[:, 0], V[:, 0], 2.0) + _rank1(U[:, 1], V[:, 1], 1.0))
    m = torch.randn(5, 3, dtype=torch.float64)
    p = polar(m)
    torch.testing.assert_close(p.T @ p, torch.eye(3, dtype=torch.float64))


def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean() -> None:
    base = torch.zeros(2, 2, dtype=torch.float64)
    d1 = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
    d2 = torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64))
    out = iso_c([d1, d2], base)  # sum = diag(3, 1): mean singular value 2, directions e1, e2
    torch.testing.assert_close(out, 2.0 * torch.eye(2, dtype=torch.float64))
    g = torch.Generator().manual_seed(4)
    tasks = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    out = iso_c(tasks, torch.zeros(7, 5, dtype=torch.float64), lambda_=0.5)
    s_sum = torch.linalg.svdvals(sum(tasks))
    flat = torch.full((5,), 0.5 * s_sum.mean().item(), dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.svdvals(out), flat)


def test_iso_cts_with_the_whole_rank_in_common_is_iso_c_and_its_spectrum_is_flat() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 6, generator=g, dtype=torch.float64)
    models = [base + torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    torch.testing.assert_close(iso_cts(models, base, common_fraction=1.0), iso_c(models, base))
    # r = 6, f = 0.5: the 3 non-common directions round to 2 per task, so 2 common + 2 × 2 task-specific
    for f, k in ((0.5, 2), (0.7, 4)):  # int(4.2) = 4 common, 1 per task
        out = iso_cts(models, base, common_fraction=f) - base
        s = torch.linalg.svdvals(out)
        assert torch.linalg.matrix_rank(out) == 6 and torch.allclose(s, s.mean().expand(6))  # flat
        u_k = torch.linalg.svd(sum(m - base for m in models))[0][:, :k]
        assert torch.allclose(u_k.T @ torch.linalg.svd(out)[0] @ torch.linalg.svd(out)[0].T @ u_k,
                              torch.eye(k, dtype=torch.float64))  # the common subspace is kept


@pytest.mark.parametrize("method", [tsv, iso_c, iso_cts])
def test_subspace_merges_commute_with_rotations(method) -> None:
    """M(Q Δ_t R) = Q M(Δ_t) R: they depend on the task matrices' singular structure only."""
    g = torch.Generator().manual_seed(6)
    deltas = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    Q, R = _orthogonal(6, 7), _orthogonal(4, 8)
    zero6, zero4 = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64)
    rotated = method([Q @ d @ R for d in deltas], zero6)
    torch.testing.assert_close(rotated, Q @ method(deltas, zero4) @ R)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_vectors_get_the_mean_task_vector_and_bad_input_is_refused(name: str) -> None:
    fn = get_method(name).fn
    base = torch.tensor([1.0, 2.0, 3.0])
    out = fn([base + torch.tensor([1.0, 0.0, 2.0]), base + torch.tensor([3.0, 2.0, 0.0])], base, lambda_=0.5)
    torch.testing.assert_close(out, base + 0.5 * torch.tensor([2.0, 1.0, 1.0]))
    with pytest.raises(RecipeError, match="requires a base_model"):
        fn([base], None)
    with pytest.raises(RecipeError, match="does not match"):
        fn([torch.zeros(4)], base)


def test_fractions_are_checked() -> None:
    b = torch.zeros(3, 3)
    with pytest.raises(RecipeError, match="sv_fraction"):
        tsv([b], b, sv_fraction=0.0)
    with pytest.raises(RecipeError, match="common_fraction"):
        iso_cts([b], b, common_fraction=1.5)


def test_tall_masks_and_consensus_on_a_worked_example() -> None:
    """τ_MTL = [3, 0.9, 0.3]. With λ = 0.4: m_1 = [1, 1, 1]; m_2 = [1, 0, 1] (0.1 < 0.4·1.0);
    m_3 = [1, 0, 1] (0 < 0.4·0.9). Votes [3, 1, 3]: k = 2 keeps elements 0 and 2."""
    base = torch.zeros(3)
    t1, t2, t3 = torch.tensor([1.0, 1.0, 0.1]), torch.tensor([1.0, -0.1, 0.1]), torch.tensor([1.0, 0.0, 0.1])
    out = consensus_ta([t1, t2, t3], base, tall_lambda=0.4, k=2)
    torch.testing.assert_close(out, torch.tensor([3.0, 0.0, 0.3]))
    torch.testing.assert_close(consensus_ta([t1, t2, t3], base, tall_lambda=0.4, k=1), torch.tensor([3.0, 0.9, 0.3]))
    torch.testing.assert_close(consensus_ta([t1, t2, t3], base, tall_lambda=0.4, k=4), torch.zeros(3))
    torch.testing.assert_close(tall_mask([t1, t2, t3], base, task=0, tall_lambda=0.4), torch.tensor([3.0, 0.9, 0.3]))
    torch.testing.assert_close(tall_mask([t1, t2, t3], base, task=1, tall_lambda=0.4), torch.tensor([3.0, 0.0, 0.3]))
    with pytest.raises(RecipeError, match="task must be a model index"):
        tall_mask([t1, t2], base, task=2)
    with pytest.raises(RecipeError, match="k must be at least 1"):
        consensus_ta([t1, t2], base, k=0)


def test_the_new_methods_run_through_the_engine(tmp_path) -> None:
    from merge.checkpoint import open_checkpoint
    from merge.execute import run_merge
    from testkit.checkpoints import llama_like, write_checkpoint

    paths = [tmp_path / f"m{i}" for i in range(3)]
    for i, p in enumerate(paths):
        write_checkpoint(p, llama_like(i))
    for method in ("tsv", "iso_c", "iso_cts", "consensus_ta"):
        rec = {"merge_method": method, "base_model": str(paths[0]), "models": [{"model": str(p)} for p in paths[1:]]}
        out = tmp_path / method
        run_merge(rec, out)
        merged, base = open_checkpoint(out), open_checkpoint(paths[0])
        assert set(merged) == set(base) and all(torch.isfinite(merged[k]).all() for k in merged)
