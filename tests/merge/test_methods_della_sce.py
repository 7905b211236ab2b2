"""DELLA / DELLA-linear (MAGPRUNE) and SCE on hand-computed examples, invariants and streaming."""

from __future__ import annotations

import pytest
import torch

from merge.errors import RecipeError
from merge.methods import get_method
from merge.methods.della import della, della_linear, keep_probabilities, magprune_mask, magprune_probs
from merge.methods.runner import derive_seed, merge_tensors
from merge.methods.sce import sce
from merge.methods.task_arithmetic import task_arithmetic, ties
from merge.plan import plan_merge

T = torch.tensor


# --------------------------------------------------------------------------------------------------
# DELLA
# --------------------------------------------------------------------------------------------------
def test_keep_probabilities_ramp() -> None:
    assert torch.allclose(keep_probabilities(5, 0.5, 0.1), T([0.4, 0.45, 0.5, 0.55, 0.6]))
    assert torch.allclose(keep_probabilities(1, 0.3, 0.1), T([0.3]))  # one entry: p = density


def test_magprune_probs_rank_within_rows_ties_by_index() -> None:
    # row 0 ascending |τ|: 0.5 (col 3), -1 (col 1), 2 (col 2), 3 (col 0) -> ranks 3, 1, 2, 0 of 0..3
    # row 1: all tied -> ranked by column index
    delta = T([[3.0, -1.0, 2.0, 0.5], [1.0, -1.0, 1.0, 1.0]])
    p = magprune_probs(delta, 0.5, 0.15)
    ramp = [0.35, 0.45, 0.55, 0.65]
    assert torch.allclose(p[0], T([ramp[3], ramp[1], ramp[2], ramp[0]]))
    assert torch.allclose(p[1], T(ramp))
    # a 1-D tensor is one row; a 3-D tensor is ranked along dim 1 (as mergekit's della_magprune)
    assert torch.allclose(magprune_probs(T([0.1, -0.3, 0.2]), 0.5, 0.1), T([0.4, 0.6, 0.5]))
    x = torch.randn(2, 4, 3)
    p3 = magprune_probs(x, 0.5, 0.1)
    for i in range(2):
        for k in range(3):
            assert torch.allclose(p3[i, :, k], magprune_probs(x[i, :, k], 0.5, 0.1))


def test_magprune_mask_is_u_below_p_and_keeps_large_entries_more_often() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(200, 500, generator=g)
    g1 = torch.Generator().manual_seed(7)
    mask = magprune_mask(delta, 0.5, 0.2, g1)
    u = torch.rand(delta.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(mask, u < magprune_probs(delta, 0.5, 0.2))
    assert abs(mask.float().mean().item() - 0.5) < 0.01  # E[kept fraction] = density
    big = delta.abs() > delta.abs().median(dim=1, keepdim=True).values
    assert abs(mask[big].float().mean().item() - 0.6) < 0.01  # upper half: mean p = 0.5 + ε/2
    assert abs(mask[~big].float().mean().item() - 0.4) < 0.01


def test_della_linear_l1_rescale_restores_the_norm_and_density_edges() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 80, generator=g)
    ft = base + torch.randn(64, 80, generator=g)
    tau = ft - base
    out = della_linear([ft], base, density=[0.4], epsilon=[0.1], generator=torch.Generator().manual_seed(3))
    kept = out - base
    assert 0.35 < (kept != 0).float().mean().item() < 0.45
    # mergekit's rescale: the kept entries are scaled to the L1 norm of the whole task vector
    assert abs(kept.abs().sum().item() / tau.abs().sum().item() - 1) < 1e-5
    nz = kept != 0
    factor = tau.abs().sum() / tau[nz].abs().sum()  # one factor for the whole tensor
    assert 1 / 0.4 > factor > 1  # large entries survive more often: less than 1/density
    assert torch.allclose(kept, tau * nz * factor, rtol=1e-5, atol=1e-6)
    no = della_linear(
        [ft], base, density=[0.4], epsilon=[0.1], rescale=False, generator=torch.Generator().manual_seed(3)
    )
    assert torch.allclose((no - base)[nz], tau[nz]) and torch.equal((no - base)[~nz], tau[~nz] * 0)
    # density >= 1 keeps τ (no draw, no rescale); 0 drops it
    assert torch.equal(della_linear([ft], base, density=[1.0]), task_arithmetic([ft], base))
    assert torch.equal(della_linear([ft], base, density=[0.0]), base)


def test_della_is_ties_combination_of_the_magpruned_vectors() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(30, 40, generator=g)
    ms = [base + torch.randn(30, 40, generator=g) for _ in range(3)]
    w, d, e = [1.0, 0.5, 0.8], [0.5, 0.4, 0.6], [0.1, 0.2, 0.15]
    out = della(
        ms, base, weight=w, density=d, epsilon=e, lambda_=0.7, generator=torch.Generator().manual_seed(5)
    )
    # redraw the same masks (one generator, models in order), prune by hand, merge with TIES at density 1
    gen = torch.Generator().manual_seed(5)
    pruned = []
    for m, di, ei in zip(ms, d, e, strict=True):
        tau = m - base
        mask = magprune_mask(tau, di, ei, gen)
        pruned.append(base + tau * mask * (tau.abs().sum() / (tau.abs() * mask).sum()))
    exp = ties(pruned, base, weight=w, lambda_=0.7)
    assert torch.allclose(out, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(41, 13), (3000,), (6, 5, 7)], ids=str)
def test_della_streamed_in_chunks_draws_per_chunk_and_rescales_globally(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(shape, generator=g)
    ft = base + torch.randn(shape, generator=g)
    spec = get_method("della_linear")
    params = {"weight": [1.0], "density": [0.5], "epsilon": [0.2], "rescale": False}
    a = merge_tensors(spec, [ft], base, params, name="w", seed=9, chunk_elems=64)
    assert torch.equal(
        a, merge_tensors(spec, [ft], base, params, name="w", seed=9, chunk_elems=64)
    )  # reproducible
    assert not torch.equal(a, merge_tensors(spec, [ft], base, params, name="w", seed=10, chunk_elems=64))
    from merge.methods.runner import chunk_grid

    grid = chunk_grid(shape, 64)
    assert len(grid) > 1
    tau = ft - base
    if len(shape) >= 2:  # rows are ranked inside their chunk: each chunk is the direct call with its seed
        for i, (r0, r1) in enumerate(grid):
            gi = torch.Generator().manual_seed(derive_seed(9, "w", i))
            exp = della_linear(
                [ft[r0:r1]], base[r0:r1], density=[0.5], epsilon=[0.2], rescale=False, generator=gi
            )
            assert torch.equal(a[r0:r1], exp)
    else:  # a 1-D tensor is ranked whole, then drawn chunk by chunk
        probs = magprune_probs(tau, 0.5, 0.2)
        for i, (r0, r1) in enumerate(grid):
            u = torch.rand(r1 - r0, generator=torch.Generator().manual_seed(derive_seed(9, "w", i)))
            assert torch.equal(a[r0:r1] - base[r0:r1] != 0, u < probs[r0:r1])
    # with the L1 rescale, the same masks, scaled by one whole-tensor factor
    r = merge_tensors(spec, [ft], base, {**params, "rescale": True}, name="w", seed=9, chunk_elems=64)
    kept = a - base
    factor = tau.abs().sum(dtype=torch.float64) / kept.abs().sum(dtype=torch.float64)
    assert torch.allclose(r - base, kept * float(factor), rtol=1e-5, atol=1e-6)


def test_della_parameter_checks_at_plan_time(make_models) -> None:
    base, ft = make_models(2)
    rec = {
        "merge_method": "della",
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"density": 0.9, "epsilon": 0.15}}],
    }
    with pytest.raises(RecipeError, match=r"density ± epsilon must lie in \(0, 1\)"):
        plan_merge(rec)
    rec["models"][0]["parameters"] = {"density": 0.5, "epsilon": 0.15, "gamma": 0.1}
    with pytest.raises(RecipeError, match="has no parameter 'gamma'"):
        plan_merge(rec)
    rec["models"][0]["parameters"] = {"density": 0.5}
    assert plan_merge(rec).n_tensors > 0
    with pytest.raises(RecipeError, match="density ± epsilon"):
        della([T([1.0])], T([0.0]), density=[0.1], epsilon=[0.2])


# --------------------------------------------------------------------------------------------------
# SCE
# --------------------------------------------------------------------------------------------------
def test_sce_hand_example_without_selection() -> None:
    base = T([0.0, 0.0, 0.0, 0.0])
    t1, t2 = T([1.0, -2.0, 3.0, 0.0]), T([3.0, 2.0, -1.0, 0.0])
    # mean squares 3.5 and 3.5 -> w = 1/2 each; signs of the sum [4, 0, 2, 0] elect + everywhere;
    # entry 0: both agree -> (0.5*1 + 0.5*3)/1 = 2; entry 1: only t2 -> 1/0.5 = 2; entry 2: only t1 -> 3
    out = sce([t1, t2], base)
    assert torch.allclose(out, T([2.0, 2.0, 3.0, 0.0]))
    assert torch.allclose(sce([t1 + 1, t2 + 1], base + 1), T([3.0, 3.0, 4.0, 1.0]))


def test_sce_select_topk_keeps_the_highest_variance_entries() -> None:
    base = torch.zeros(4)
    t1, t2 = T([1.0, -2.0, 3.0, 0.0]), T([3.0, 2.0, -1.0, 0.0])
    # variances [1, 4, 4, 0]: 3 non-zero, k = int(3 * 0.5) = 1: the first of the tied 4s (index 1) is kept;
    # then t1 = [0,-2,0,0], t2 = [0,2,0,0], weights 1/2 each, sum 0 elects +: only t2 agrees -> 2
    assert torch.allclose(sce([t1, t2], base, select_topk=0.5), T([0.0, 2.0, 0.0, 0.0]))
    assert torch.equal(sce([t1, t2], base, select_topk=0.0), base)  # nothing selected


def test_sce_weights_are_mean_squares_and_uniform_when_tiny() -> None:
    base = torch.zeros(2)
    t1, t2 = T([1.0, 1.0]), T([3.0, 3.0])  # mean squares 1 and 9 -> w = 0.1, 0.9
    assert torch.allclose(sce([t1, t2], base), T([0.1 * 1 + 0.9 * 3] * 2))
    s1, s2 = t1 * 1e-4, t2 * 1e-4  # Σ mean squares < 1e-6: uniform weights (as mergekit)
    assert torch.allclose(sce([s1, s2], base), T([2e-4, 2e-4]), rtol=1e-5)


@pytest.mark.parametrize(
    "name,params,n",
    [
        ("sce", {"select_topk": 0.3}, 3),
        ("sce", {"select_topk": 1.0}, 3),
        ("della_linear", {"weight": [1.0, 0.5], "density": [1.0, 0.0]}, 2),
    ],
)
def test_chunked_equals_whole(name: str, params: dict, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(41, 13), (120,), (6, 5, 7), ()]:
        base = torch.randn(shape, generator=g)
        ms = [(base + 0.05 * torch.randn(shape, generator=g)).bfloat16().float() for _ in range(n)]
        spec = get_method(name)
        whole = spec.fn(ms, base, **params)
        for ce in (5, 16, 50):
            assert torch.equal(merge_tensors(spec, ms, base, params, chunk_elems=ce), whole), (shape, ce)


def test_sce_variance_is_bit_identical_to_torch_var() -> None:
    from merge.methods.sce import _variance

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5):
        xs = [torch.randn(5000, generator=g) * 0.01 for _ in range(n)]
        for v in (xs, [x.bfloat16().float() for x in xs]):
            assert torch.equal(_variance(v), torch.var(torch.stack(v), dim=0, unbiased=False))
