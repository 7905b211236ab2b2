"""The digits experiment for the methods added for mergekit parity (``examples/merge_digits_more.py``), reduced.

One seed, shorter fine-tuning, coarse grids. Asserted: the claims that the full run reproduces in both
regimes (DELLA's magnitude-ranked pruning beats DARE's uniform drop, SCE beats every single fine-tune,
Karcher keeps the mean norm while the soup shrinks it, Arcee Fusion keeps most of a fine-tune's gain with
a minority of its entries). DELLA-vs-DARE-TIES inside the merge and RAM-vs-averaging are reported, not
asserted: they do not hold in both regimes of the full run (see docs/experiments.md); nor is 4b (spherical
means within 2 points of the soup), which holds on 3 seeds but not on the quick run's one (2.3 points).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.merge_digits_more import Config, main


@pytest.mark.slow
def test_merge_digits_more_claims(tmp_path: Path) -> None:
    result = main(Config.quick(tmp_path / "more"), verbose=False)
    s, c = result["summary"], result["claims"]
    assert (tmp_path / "more" / "results.json").exists() and (
        tmp_path / "more" / "merge_digits_more.png"
    ).exists()
    for regime in ("small", "large"):
        assert s[regime]["single_own"] > 90 and s[regime]["best_single_union"] < 55
    for name, claim in c.items():
        if name.split()[0] in ("1", "3", "4a", "6"):
            assert claim["holds"], (name, claim)
    # the reported ones are computed from real merges
    for regime in ("small", "large"):
        for k in ("della", "dare_ties", "ram", "ramplus_tl", "sparse_average"):
            assert 10 < s[regime][k] <= 100
    # NearSwap moves from the base towards the fine-tune as t grows
    ns = s["small"]["nearswap"]
    assert ns[min(ns, key=float)] < ns[max(ns, key=float)]
