"""The Sparse Model Soups experiment (``examples/sparse_soups_digits.py``), reduced: its invariants hold,
the recipe method and the CLI agree with the library, and the numbers are the run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.sparse_soups_digits import Config, main
from merge.methods.soups import sparsity_schedule


@pytest.mark.slow
def test_sparse_soups_digits_reduced(tmp_path: Path) -> None:
    cfg = Config.quick(tmp_path)
    r = main(cfg, verbose=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(r["summary"]))
    assert (tmp_path / "sparse_soups_digits.png").stat().st_size > 10_000
    schedule = sparsity_schedule(cfg.goal_sparsity, cfg.phases)
    n_weights = 64 * cfg.hidden + cfg.hidden * cfg.hidden + cfg.hidden * 10
    for run in r["runs"]:
        assert run["dense_test"] > 95
        for i, p in enumerate(run["phases"]):
            # sparsity after phase i is the schedule's, within rounding (half an entry per phase)
            assert abs(p["sparsity"] - schedule[i]) <= (i + 1) / n_weights
        assert all(
            abs(s - cfg.goal_sparsity) <= cfg.phases / n_weights for s in run["final_sparsity"].values()
        )
        assert run["phases"][-1]["soup"] > 90  # a working model at 95 % sparsity
    # the sparse_soup recipe method, run by the CLI on the saved last-phase ingredients, is the library's soup
    cli = r["cli"]
    assert cli["identical_weights_to_library"]
    assert cli["test_accuracy"] == pytest.approx(r["runs"][0]["phases"][-1]["soup"])
    assert abs(cli["sparsity"] - cfg.goal_sparsity) <= cfg.phases / n_weights  # global: over all matrices
    assert all(0 < z < 1 for z in cli["zero_fraction_per_tensor"].values())
    assert cli["different_masks_exit_code"] == 2 and "different zero pattern" in cli["different_masks_error"]
    assert cli["different_masks_wrote_nothing"]
    assert set(r["claims"]) == {
        "soup_ge_best_ingredient",
        "soup_beats_imp_equal_compute",
        "gap_grows_with_sparsity",
    }
