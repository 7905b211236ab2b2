"""The RegMean / Fisher digits example (``examples/merge_digits_regmean_fisher.py``), reduced: it runs end to end.

One seed, both regimes, shorter fine-tuning and coarse grids. What is asserted would fail if the
methods or the pipeline were broken: the fine-tunes learned their tasks, RegMean's α changes the
merge and RegMean beats the simple average by a wide margin (its Grams really come from each task's
inputs), the Fisher merge is not the average, the statistics came from the data the example says
(training labels: the empirical Fisher), and the engine (recipe, entry point, ``allow_code``) writes
what the library computes, again from the saved plan alone. Fisher ≥ average is reported by the
example, not asserted (it does not hold for the empirical Fisher in the large-Δ regime).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.merge_digits_regmean_fisher import Config, main


@pytest.mark.slow
def test_regmean_fisher_example(tmp_path: Path) -> None:
    cfg = Config.quick(tmp_path / "rf")
    result = main(cfg, verbose=False)
    s, runs = result["summary"], result["runs"]
    out = Path(result["config"]["out"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["small"]["regmean"]["mean"] == pytest.approx(s["small"]["regmean"]["mean"])
    assert (out / "merge_digits_regmean_fisher.png").stat().st_size > 10_000
    assert "RegMean (α on val)" in result["table"]

    for regime in ("small", "large"):
        r = s[regime]
        assert r["single_own_task"]["mean"] > 90 and r["best_single_union"]["mean"] < 55
        # RegMean: a working merge, far above the average; α matters
        assert r["regmean"]["mean"] - r["average"]["mean"] >= 10, regime
        curve = r["regmean_alpha_curve"]
        assert abs(curve["0.0"]["mean"] - curve["1.0"]["mean"]) >= 5, curve
        # Fisher weighting is not the average
        run = next(x for x in runs if x["regime"] == regime)
        assert run["fisher"]["test_per_task"] != run["average"]["test_per_task"]
        info = run["fisher_info"]
        assert all(v["labels"] == ["data"] and v["per_example"] == "vmap" for v in info.values())
        assert all(v["examples"] == cfg.num_examples for v in info.values())
        assert result["claims"][f"regmean_ge_fisher_{regime}"]["holds"]
        assert result["claims"][f"regmean_competitive_with_ta_ties_{regime}"]["holds"]

    # the engine, from recipes: the library's bytes, and again from the saved plan alone
    eng = next(x["engine"] for x in runs if "engine" in x)
    for method in ("regmean", "fisher"):
        assert eng[method]["identical_to_library"] and eng[method]["saved_plan_identical"], eng
        assert eng[method]["replay_identical"], eng
