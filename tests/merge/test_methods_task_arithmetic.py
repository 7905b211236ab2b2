"""Task arithmetic, TIES, DARE and Model Breadcrumbs on hand-computed examples and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merge.errors import RecipeError
from merge.methods import get_method
from merge.methods._random import ElementStream
from merge.methods.runner import derive_seed, merge_tensors
from merge.methods.task_arithmetic import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    task_arithmetic,
    ties,
)

T = torch.tensor


def _models(base: torch.Tensor, *taus: list[float]) -> list[torch.Tensor]:
    return [base + T(t) for t in taus]


# --------------------------------------------------------------------------------------------------
# task arithmetic
# --------------------------------------------------------------------------------------------------
def test_task_arithmetic_hand_example() -> None:
    base = T([1.0, 2.0, 3.0, 4.0])
    ms = _models(base, [1, 0, 2, -4], [-1, 1, 0, 0])
    # θ0 + λ Σ w τ = base + 0.5 * ([1,0,2,-4] + 0.5 [-1,1,0,0]) = base + [0.25, 0.25, 1, -2]
    out = task_arithmetic(ms, base, weight=[1.0, 0.5], lambda_=0.5)
    assert torch.allclose(out, T([1.25, 2.25, 4.0, 2.0]), atol=0, rtol=1e-7)
    # normalize divides the weighted sum by Σ w = 1.5
    out = task_arithmetic(ms, base, weight=[1.0, 0.5], lambda_=0.5, normalize=True)
    assert torch.allclose(out, base + T([1 / 6, 1 / 6, 2 / 3, -4 / 3]), rtol=1e-6)


def test_task_arithmetic_lambda_zero_is_base_and_linear_in_lambda() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, 30, generator=g)
    ms = [base + torch.randn(20, 30, generator=g) for _ in range(3)]
    assert torch.equal(task_arithmetic(ms, base, weight=[0.3, 1.0, -0.5], lambda_=0.0), base)
    one = task_arithmetic(ms, base, lambda_=1.0) - base
    three = task_arithmetic(ms, base, lambda_=3.0) - base
    assert torch.allclose(three, 3 * one, rtol=1e-5, atol=1e-5)
    # θ0 + τ − τ = θ0 (a task vector and its negation cancel)
    assert torch.allclose(task_arithmetic([ms[0], ms[0]], base, weight=[1.0, -1.0]), base, atol=0)
    # λ = 1/T with normalize=False is the uniform average of the inputs
    avg = task_arithmetic(ms, base, lambda_=1 / 3)
    assert torch.allclose(avg, sum(ms) / 3, atol=1e-6)


def test_task_arithmetic_accepts_mergekit_noop_flags() -> None:
    base = T([0.0, 1.0])
    ms = _models(base, [1, 2], [3, -1])
    ref = task_arithmetic(ms, base)
    assert torch.equal(task_arithmetic(ms, base, density=[0.1, 0.1], rescale=True, int8_mask=True), ref)


def test_opposite_equal_task_vectors_vanish_without_consensus() -> None:
    base = T([1.0, -2.0, 0.5])
    ms = _models(base, [2, -3, 1], [-2, 3, -1])
    assert torch.equal(task_arithmetic(ms, base), base)
    assert torch.equal(dare_linear(ms, base, density=[1.0, 1.0]), base)
    assert torch.equal(breadcrumbs(ms, base), base)  # density 1: no trim


def test_zero_weight_sum_is_not_divided() -> None:
    base = torch.zeros(2)
    ms = _models(base, [1, 1], [2, 2])
    out = task_arithmetic(ms, base, weight=[1.0, -1.0], normalize=True)
    assert torch.equal(out, T([-1.0, -1.0]))  # Σ w = 0 → divisor 1 (mergekit: |Σ w| < 1e-8)


# --------------------------------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------------------------------
TIES_TAUS = ([3, -1, 0.5, 2, -4], [-2, -2, 1, 1, 4], [1, 3, -0.2, -3, 4])


def test_ties_hand_example() -> None:
    base = torch.zeros(5)
    ms = _models(base, *TIES_TAUS)
    # density 0.6 → k = 3 per model:
    #   τ̂1 = [3, 0, 0, 2, -4], τ̂2 = [-2, -2, 0, 0, 4], τ̂3 = [0, 3, 0, -3, 4]
    #   Σ = [1, 1, 0, -1, 4] → γ = [+, +, + (0 counts as +), −, +]
    #   disjoint mean: [3/1, 3/1, 0 (nobody), -3/1, (4+4)/2]
    out = ties(ms, base, density=[0.6] * 3)
    assert torch.equal(out, T([3.0, 3.0, 0.0, -3.0, 4.0]))
    # normalize=False: the agreeing entries are summed
    assert torch.equal(ties(ms, base, density=[0.6] * 3, normalize=False), T([3.0, 3.0, 0.0, -3.0, 8.0]))
    # λ scales the merged task vector
    out = ties([m + 1 for m in ms], base + 1, density=[0.6] * 3, lambda_=0.5)
    assert torch.equal(out, 1 + T([1.5, 1.5, 0.0, -1.5, 2.0]))


def test_ties_weights_enter_the_election() -> None:
    # mergekit semantics: w_t τ̂_t elect the sign; weighted disjoint mean Σ_A w τ̂ / Σ_A w
    base = torch.zeros(5)
    ms = _models(base, *TIES_TAUS)
    #   w τ̂ = [3,0,0,2,-4], [-4,-4,0,0,8], [0,3,0,-3,4]; Σ = [-1,-1,0,-1,8] → γ = [−,−,+,−,+]
    #   idx0: -4 (w 2) → -4/2; idx1: -4/2; idx2: 0; idx3: -3/1; idx4: (8+4)/(2+1)
    out = ties(ms, base, weight=[1.0, 2.0, 1.0], density=[0.6] * 3)
    assert torch.equal(out, T([-2.0, -2.0, 0.0, -3.0, 4.0]))


def test_ties_magnitude_ties_kept_in_flat_order() -> None:
    base = torch.zeros(6)
    ms = _models(base, [1, -1, 1, 1, -1, 0.5])
    # density 0.5 → k = 3 of five entries of magnitude 1: the first three by index are kept
    out = ties(ms, base, density=[0.5])
    assert torch.equal(out, T([1.0, -1.0, 1.0, 0.0, 0.0, 0.0]))
    # density > 0 keeps at least one entry; density <= 0 drops everything
    assert int((ties(ms, base, density=[1e-9]) != 0).sum()) == 1
    assert torch.equal(ties(ms, base, density=[0.0]), base)


def test_ties_rescale_matches_l1_norm() -> None:
    base = torch.zeros(4)
    ms = _models(base, [4, -3, 2, 1])
    # keep [4, -3]: ‖τ‖₁ = 10, ‖τ̂‖₁ = 7 → τ̂ · 10/7
    out = ties(ms, base, density=[0.5], rescale=True)
    assert torch.allclose(out, T([40 / 7, -30 / 7, 0.0, 0.0]), rtol=1e-6, atol=0)


def test_ties_density_one_without_conflict_is_task_arithmetic() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 20, generator=g)
    ms = [base + 0.1 + torch.rand(30, 20, generator=g) for _ in range(3)]  # every τ > 0
    w = [0.2, 0.5, 0.3]
    ta = task_arithmetic(ms, base, weight=w, lambda_=0.7, normalize=True)
    assert torch.allclose(ties(ms, base, weight=w, density=[1.0] * 3, lambda_=0.7), ta, rtol=1e-6, atol=1e-6)
    ta = task_arithmetic(ms, base, weight=w, normalize=False)
    assert torch.allclose(ties(ms, base, weight=w, normalize=False), ta, rtol=1e-6, atol=1e-6)


def test_ties_opposite_equal_entries() -> None:
    base = torch.zeros(3)
    ms = _models(base, [2, -1, 5], [-2, 1, 5])
    # equal and opposite: Σ = 0 elects + (mergekit's `>= 0`), so only the positive entry survives;
    # the agreeing identical entries average to themselves
    assert torch.equal(ties(ms, base), T([2.0, 1.0, 5.0]))
    # an entry where every model disagrees with the elected sign is 0
    ms = _models(base, [-2, 0, 0], [3, 0, 0], [-2, 0, 0])  # Σ = -1 → γ = −: the 3 is dropped
    assert torch.equal(ties(ms, base), T([-2.0, 0.0, 0.0]))


def test_ties_permutation_invariant_over_models() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(50, generator=g)
    ms = [base + torch.randn(50, generator=g) for _ in range(3)]
    a = ties(ms, base, weight=[0.2, 0.3, 0.5], density=[0.3, 0.5, 0.7])
    b = ties(ms[::-1], base, weight=[0.5, 0.3, 0.2], density=[0.7, 0.5, 0.3])
    assert torch.allclose(a, b, atol=1e-6)


def test_int8_mask_is_a_noop() -> None:
    base = torch.zeros(5)
    ms = _models(base, *TIES_TAUS)
    for fn in (ties, breadcrumbs_ties):
        assert torch.equal(fn(ms, base, density=[0.6] * 3, int8_mask=True), fn(ms, base, density=[0.6] * 3))


# --------------------------------------------------------------------------------------------------
# Model Breadcrumbs
# --------------------------------------------------------------------------------------------------
def test_breadcrumbs_hand_examples() -> None:
    base = torch.zeros(10)
    ms = _models(base, [10, 9, 8, 7, 6, 5, 4, 3, 2, 1])
    # density 0.5, gamma 0.1: keep 5, drop the top 1 and the bottom 10-5-1 = 4
    out = breadcrumbs(ms, base, density=[0.5], gamma=[0.1])
    assert torch.equal(out, T([0.0, 9, 8, 7, 6, 5, 0, 0, 0, 0]))
    # density 0.8, gamma 0.3: 8 + 3 > 10 → bottom = 0, only the top 2 go (fewer outliers removed)
    out = breadcrumbs(ms, base, density=[0.8], gamma=[0.3])
    assert torch.equal(out, T([0.0, 0, 8, 7, 6, 5, 4, 3, 2, 1]))
    # density >= 1 keeps the task vector whole, gamma notwithstanding (mergekit's early return)
    assert torch.equal(breadcrumbs(ms, base, density=[1.0], gamma=[0.5]), ms[0])
    # gamma 0 is a plain magnitude trim, like TIES's
    assert torch.equal(breadcrumbs(ms, base, density=[0.3], gamma=[0.0]), T([10.0, 9, 8, 0, 0, 0, 0, 0, 0, 0]))
    # rescale: ‖τ‖₁ = 55, kept 9+8+7+6+5 = 35
    out = breadcrumbs(ms, base, density=[0.5], gamma=[0.1], rescale=True)
    assert torch.allclose(out, T([0.0, 9, 8, 7, 6, 5, 0, 0, 0, 0]) * (55 / 35), rtol=1e-6)


def test_breadcrumbs_ties_hand_example() -> None:
    base = torch.zeros(6)
    ms = _models(base, [6, 5, -4, 3, 2, 1], [-6, -5, 4, -3, -2, 1])
    # density 0.5, gamma 0.2: n_top = 1, keep 3 → ranks 1..3: τ̂1 = [0,5,-4,3,0,0], τ̂2 = [0,-5,4,-3,0,0]
    # Σ = 0 everywhere → γ = +: the positive entries survive
    out = breadcrumbs_ties(ms, base, density=[0.5] * 2, gamma=[0.2] * 2)
    assert torch.equal(out, T([0.0, 5, 4, 3, 0, 0]))
    # breadcrumbs (no consensus) cancels them instead
    assert torch.equal(breadcrumbs(ms, base, density=[0.5] * 2, gamma=[0.2] * 2), base)


# --------------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_dare_reproducible_by_seed_and_different_across_seeds() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 50, generator=g)
    ms = [base + torch.randn(40, 50, generator=g) for _ in range(2)]
    for fn in (dare_linear, dare_ties):
        a = fn(ms, base, density=[0.5, 0.3], generator=_gen(11))
        b = fn(ms, base, density=[0.5, 0.3], generator=_gen(11))
        c = fn(ms, base, density=[0.5, 0.3], generator=_gen(12))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_zero_fraction_is_binomial(density: float) -> None:
    n = 200_000
    base = torch.zeros(n)
    ms = [torch.ones(n)]
    out = dare_linear(ms, base, density=[density], generator=_gen(5))
    zeros = int((out == 0).sum())
    mean, sd = n * (1 - density), math.sqrt(n * density * (1 - density))
    assert abs(zeros - mean) < 5 * sd
    # the kept entries are rescaled by 1/density
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / density), rtol=1e-6)


def test_dare_mean_over_seeds_is_the_task_vector() -> None:
    g = torch.Generator().manual_seed(3)
    n, seeds, p = 500, 400, 0.3
    base = torch.randn(n, generator=g)
    tau = torch.randn(n, generator=g)
    acc = torch.zeros(n, dtype=torch.float64)
    for s in range(seeds):
        acc += dare_linear([base + tau], base, density=[p], generator=_gen(s)).double() - base.double()
    mean = acc / seeds
    # per entry, the mean of S draws of τ·B/p has standard deviation |τ| sqrt((1-p)/(p S))
    sd = tau.abs().double() * math.sqrt((1 - p) / (p * seeds))
    assert bool(((mean - tau.double()).abs() <= 6 * sd + 1e-6).all())
    # without rescale the mean shrinks to p τ
    acc.zero_()
    for s in range(100):
        acc += dare_linear([base + tau], base, density=[p], rescale=False, generator=_gen(s)).double()
    mean = acc / 100 - base.double()
    assert torch.allclose(mean.mean() / tau.double().mean(), torch.tensor(p, dtype=torch.float64), atol=0.1)


def test_dare_density_one_is_task_arithmetic_and_zero_is_base() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(100, generator=g)
    ms = [base + torch.randn(100, generator=g) for _ in range(3)]
    w = [0.5, 0.2, 0.9]
    assert torch.equal(dare_linear(ms, base, weight=w, lambda_=0.3), task_arithmetic(ms, base, weight=w, lambda_=0.3))
    assert torch.equal(dare_ties(ms, base, weight=w, normalize=True), ties(ms, base, weight=w, normalize=True))
    assert torch.equal(dare_linear(ms, base, density=[0.0] * 3), base)


def test_dare_ties_elects_signs_after_drop() -> None:
    base = torch.zeros(4)
    ms = _models(base, [1, -1, 2, 2], [-3, 3, 2, -2])
    out = dare_ties(ms, base, density=[1.0, 1.0])
    # Σ = [-2, 2, 4, 0] → γ = [−, +, +, +]; normalize off: sums of the agreeing entries
    assert torch.equal(out, T([-3.0, 3.0, 4.0, 2.0]))


def test_dare_in_the_runner_draws_on_a_fixed_element_grid() -> None:
    g = torch.Generator().manual_seed(6)
    base = torch.randn(12, 5, generator=g)
    ms = [base + torch.randn(12, 5, generator=g) for _ in range(2)]
    spec = get_method("dare_ties")
    params = {"weight": [1.0, 0.5], "density": [0.4, 0.6], "lambda_": 1.0, "normalize": False,
              "rescale": True, "int8_mask": False}
    out = merge_tensors(spec, ms, base, params, name="w", seed=99, chunk_elems=20)  # 4 rows per chunk
    # the same bytes for any chunk size (rows of 5 elements: odd offsets into the 64-bit words too)
    for chunk_elems in (5, 15, 35, 60, 1 << 20):
        assert torch.equal(out, merge_tensors(spec, ms, base, params, name="w", seed=99, chunk_elems=chunk_elems))
    # = the method on the whole tensor with the tensor's stream; each chunk = its slice of it
    stream = ElementStream(derive_seed(99, "w"))
    assert torch.equal(out, dare_ties(ms, base, weight=[1.0, 0.5], density=[0.4, 0.6], stream=stream))
    part = dare_ties([m[4:8] for m in ms], base[4:8], weight=[1.0, 0.5], density=[0.4, 0.6],
                     stream=ElementStream(stream.seed, 4 * 5))
    assert torch.equal(out[4:8], part)
    assert not torch.equal(out, merge_tensors(spec, ms, base, params, name="w", seed=98, chunk_elems=20))
    assert not torch.equal(out, merge_tensors(spec, ms, base, params, name="w2", seed=99, chunk_elems=20))


def test_element_stream_words_do_not_depend_on_the_split() -> None:
    s = ElementStream(12345)
    whole = s.words(1, 1001)
    for cut in (0, 1, 2, 3, 500, 999, 1001):
        left = ElementStream(12345, 0).words(1, cut)
        right = ElementStream(12345, cut).words(1, 1001 - cut)
        assert (np.concatenate([left, right]) == whole).all()
    assert not (ElementStream(12345).words(0, 1001) == whole).all()  # models draw independently
    # the keep test is Bernoulli(density) on the top 31 bits
    keep = ElementStream(7).keep_mask(0, 200_000, 0.3)
    assert set(keep.unique().tolist()) <= {-1, 0}
    frac = float((keep == -1).double().mean())
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 200_000)
    assert int((ElementStream(7).keep_mask(0, 1000, 0.0) == -1).sum()) == 0


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_errors_name_the_method() -> None:
    x = torch.zeros(3)
    with pytest.raises(RecipeError, match="'ties' requires a base_model"):
        ties([x], None)
    with pytest.raises(RecipeError, match="task_arithmetic.*weight.*expected 2 per-model values"):
        task_arithmetic([x, x], x, weight=[1.0, 2.0, 3.0])
    with pytest.raises(RecipeError, match="shape"):
        dare_linear([torch.zeros(4)], x)


def test_ties_divisor_of_no_agreeing_model_is_one_with_any_weights() -> None:
    """Entries where no model agrees with the elected sign (or the agreeing weights cancel) are divided
    by 1, with positive weights (the fast clamp) and with mixed-sign weights (the bit trick) alike."""
    base = torch.zeros(4)
    ms = _models(base, [1.0, -1.0, 0.0, 2.0], [-1.0, 1.0, 0.0, 2.0])
    # Σ = [0, 0, 0, 4]: γ = + everywhere (0 counts as +); entry 2 has no non-zero τ: 0 / 1
    out = ties(ms, base, density=[1.0, 1.0], normalize=True)
    assert torch.equal(out, T([1.0, 1.0, 0.0, 2.0]))
    # weights +1 and −1 on equal task vectors: w τ = ±τ, and for a weight of −1 the divisor sums −1
    ms2 = _models(base, [1.0, 2.0, 0.0, 3.0], [1.0, 2.0, 0.0, 3.0])
    out2 = ties(ms2, base, weight=[1.0, -1.0], density=[1.0, 1.0], normalize=True)
    # Σ w τ = 0 → γ = +: only model 1 agrees (w τ = +τ), divisor 1
    assert torch.equal(out2, T([1.0, 2.0, 0.0, 3.0]))
    # both agree (w τ = +1 each) but the weights cancel: divisor 1 + (−1) = 0 → 1, the sum 2 stays
    ms3 = _models(base, [1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0])
    out3 = ties(ms3, base, weight=[1.0, -1.0], density=[1.0, 1.0], normalize=True)
    assert torch.equal(out3, T([2.0, 2.0, 0.0, 0.0]))


def test_variants_are_configuration_not_copies() -> None:
    """dare_ties / breadcrumbs_ties / della_linear are registered as configurations of one function
    (registry.merge_variant): the Variant keywords are no recipe parameters, a changed default shows."""
    from merge.methods import get_method
    from merge.methods.registry import merge_variant

    pairs = (("dare_linear", "dare_ties"), ("breadcrumbs", "breadcrumbs_ties"), ("della", "della_linear"))
    for base_name, variant in pairs:
        b, v = get_method(base_name), get_method(variant)
        assert v.fn.func is b.fn and v.fn.keywords["method"] == variant
        assert not {"method", "consensus"} & (set(b.params) | set(v.params))
        assert set(b.params) == set(v.params)
    assert get_method("della").params["normalize"].default is True
    assert get_method("della_linear").params["normalize"].default is False
    with pytest.raises(ValueError, match="not Variant keywords"):
        merge_variant("nope", get_method("ties"), fixed={"consensus": False}, summary="x")
