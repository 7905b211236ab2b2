"""Exact radix top-k selection (merge/methods/_select.py) against torch.topk / kthvalue."""

from __future__ import annotations

import pytest
import torch

from merge.methods._select import TieCursor, select_top, topk_mask


def _bf16_deltas(n: int, seed: int) -> torch.Tensor:
    """|θ_t − θ_0| of bf16 checkpoints computed in float32: coarse values, many exact ties."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(n, generator=g)).bfloat16()
    ft = (base.float() + 0.002 * torch.randn(n, generator=g)).bfloat16()
    return (ft.float() - base.float()).abs()


def _chunks(x: torch.Tensor, rows: int) -> list[torch.Tensor]:
    return list(x.split(rows))


def _check_topk(x: torch.Tensor, mask: torch.Tensor, k: int) -> None:
    flat, m = x.reshape(-1), mask.reshape(-1)
    assert int(m.sum()) == k
    if k == 0:
        return
    kth = torch.topk(flat, k).values[-1]
    # the same value torch finds as the k-th largest (= the (n-k+1)-th smallest)
    assert kth == torch.kthvalue(flat, flat.numel() - k + 1).values
    assert torch.equal(flat[m].sort().values, torch.topk(flat, k).values.sort().values)
    assert bool((flat[~m] <= kth).all())
    # ties at the threshold: the kept ones are the first in flat-index order
    tied = torch.nonzero(flat == kth).squeeze(1)
    n_kept = int((m & (flat == kth)).sum())
    assert bool(m[tied[:n_kept]].all()) and not bool(m[tied[n_kept:]].any())


@pytest.mark.parametrize("seed", range(4))
def test_random_float32_matches_topk(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3001, generator=g).abs()
    for k in (1, 2, 100, 1500, 2999, 3000):
        mask = topk_mask(x, k)
        _check_topk(x, mask, k)
        # random float32 data has no ties here: the set is exactly torch.topk's
        ref = torch.zeros(x.numel(), dtype=torch.bool)
        ref[torch.topk(x, k).indices] = True
        assert torch.equal(mask, ref)


@pytest.mark.parametrize("seed", range(4))
def test_many_ties_keeps_exactly_k(seed: int) -> None:
    x = _bf16_deltas(20000, seed).reshape(200, 100)
    n_distinct = torch.unique(x).numel()
    assert n_distinct < 3000  # the data really is tie-heavy
    for k in (1, 37, 5000, 10000, 15001, 19999):
        _check_topk(x, topk_mask(x, k), k)


def test_chunked_equals_whole_and_exact_sums() -> None:
    x = _bf16_deltas(30000, 7).reshape(300, 100)
    ks = [1, 999, 15000, 29999]
    whole = select_top(lambda: iter([[x]]), [ks], sums=True)[0]
    for rows in (1, 7, 64, 299):
        parts = _chunks(x, rows)
        sel = select_top(lambda parts=parts: iter([[p] for p in parts]), [ks], sums=True)[0]
        assert sel.numel == x.numel()
        assert sel.total_sum == whole.total_sum
        for a, b in zip(sel.topk, whole.topk, strict=True):
            assert (a.threshold, a.n_greater, a.kept_sum) == (b.threshold, b.n_greater, b.kept_sum)
            mask = torch.cat([a.mask(p, i) for i, p in enumerate(parts)])
            assert torch.equal(mask, b.mask(x, 0))
    x64 = x.double().reshape(-1)
    assert whole.total_sum == pytest.approx(float(x64.sum()), rel=1e-15)
    for t in whole.topk:
        assert t.kept_sum == pytest.approx(float(x64[t.mask(x).reshape(-1)].sum()), rel=1e-14)


def test_several_streams_and_ks_in_one_pass() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(4000, generator=g), _bf16_deltas(4000, 9)
    calls = []

    def source():
        calls.append(1)
        return iter([[a[i : i + 500], b[i : i + 500]] for i in range(0, 4000, 500)])

    sels = select_top(source, lambda n: [[n // 2], [10, n // 3]])
    # two passes whatever the number of selections, and a third because the bf16-derived stream has
    # entries tied at a threshold that straddle the cut (their per-chunk counts are needed)
    assert len(calls) == 3
    assert [t.k for t in sels[0].topk] == [2000] and [t.k for t in sels[1].topk] == [10, 1333]
    _check_topk(a, torch.cat([sels[0].topk[0].mask(a[i : i + 500], i // 500) for i in range(0, 4000, 500)]), 2000)
    for t in sels[1].topk:
        _check_topk(b, torch.cat([t.mask(b[i : i + 500], i // 500) for i in range(0, 4000, 500)]), t.k)


def test_untied_streams_take_two_passes() -> None:
    a = torch.rand(4000, generator=torch.Generator().manual_seed(5))
    calls = []

    def source():
        calls.append(1)
        return iter([[a[i : i + 500]] for i in range(0, 4000, 500)])

    sel = select_top(source, [[1234]])[0].topk[0]
    assert len(calls) == 2 and sel.quotas is None
    _check_topk(a, torch.cat([sel.mask(a[i : i + 500], i // 500) for i in range(0, 4000, 500)]), 1234)


def test_single_chunk_is_read_once() -> None:
    x = torch.rand(100)
    calls = []

    def source():
        calls.append(1)
        return iter([[x]])

    select_top(source, [[10]])
    assert len(calls) == 1


def test_special_values_and_degenerate_k() -> None:
    sub = torch.tensor([1e-45, 3e-42, 1e-40], dtype=torch.float32)  # subnormals
    x = torch.cat([torch.zeros(5), sub, torch.tensor([1.0, 1.0, 2.0, float("inf")])])
    for k in range(x.numel() + 1):
        _check_topk(x, topk_mask(x, k), k)
    sel = select_top(lambda: iter([[x[:4]], [x[4:]]]), [[0, x.numel(), 3]])[0]
    assert sel.topk[0].k == 0 and sel.topk[1].k == x.numel()
    assert sel.topk[2].threshold_value == 1.0  # inf, 2, then the first of the two 1.0s
    assert sel.topk[2].quotas == (0, 1) and sel.topk[2].eq_counts == (0, 2)


def test_half_precision_magnitudes_select_like_float32() -> None:
    x = torch.rand(1000, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert torch.equal(topk_mask(x, 300), topk_mask(x.float(), 300))
    assert int(topk_mask(x, 300).sum()) == 300


def _cursor_mask(sel, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The kept set chunk by chunk with a TieCursor (chunks visited in order, as the engine does)."""
    cur = TieCursor(sel)
    parts = []
    for i, c in enumerate(_chunks(x, rows)):
        bits = c.contiguous().view(torch.int32).reshape(-1)
        r = cur.rule(bits, i)
        parts.append((r if isinstance(r, torch.Tensor) else bits >= r).reshape(c.shape))
    return torch.cat(parts)


@pytest.mark.parametrize("seed", range(3))
def test_one_pass_with_numel_hint_and_tie_cursor_keep_the_same_set(seed: int) -> None:
    """The window fast path (numel_hint) reads the chunks once and, with count_ties=False, a TieCursor
    hands out the tied quota in order: the same kept set as the three-pass selection."""
    x = _bf16_deltas(40000, seed).reshape(400, 100)  # tie-heavy: the cut straddles tied entries
    calls: list[int] = []

    def source():
        calls.append(1)
        return iter([[c] for c in _chunks(x, 40)])

    for k in (1, 777, 20000, 39999):
        ref = select_top(source, [[k]])[0].topk[0]
        ref_mask = torch.cat([ref.mask(c, i) for i, c in enumerate(_chunks(x, 40))])
        calls.clear()
        fast = select_top(source, [[k]], numel_hint=x.numel(), count_ties=False)[0].topk[0]
        if k == 20000:  # (a quantile far in a tail may miss the first chunk's window: then two passes)
            assert len(calls) == 1, k  # the threshold fell in the window: one pass
        assert (fast.threshold, fast.n_greater) == (ref.threshold, ref.n_greater)
        mask = _cursor_mask(fast, x, 40)
        assert torch.equal(mask, ref_mask)
        _check_topk(x, mask, k)
        # revisiting a chunk gives the same answer; skipping ahead is refused
        cur = TieCursor(fast)
        b0 = x[:40].contiguous().view(torch.int32).reshape(-1)
        first = cur.rule(b0, 0)
        again = cur.rule(b0, 0)
        assert (torch.equal(first, again) if isinstance(first, torch.Tensor) else first == again)
        if fast.tie_need is not None:
            with pytest.raises(RuntimeError, match="visited before"):
                cur.rule(b0, 5)
            with pytest.raises(ValueError, match="TieCursor"):
                fast.mask(x[:40], 0)


def test_a_window_miss_falls_back_to_the_classic_passes() -> None:
    """A first chunk unlike the rest puts the window in the wrong place: still exact, two more passes."""
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.rand(500, generator=g) * 1e-3, torch.rand(3500, generator=g)])
    calls: list[int] = []

    def source():
        calls.append(1)
        return iter([[x[i : i + 500]] for i in range(0, 4000, 500)])

    sel = select_top(source, [[2000]], numel_hint=4000, count_ties=False)[0].topk[0]
    assert len(calls) == 3
    _check_topk(x, _cursor_mask(sel, x, 500), 2000)
