"""The EMR-Merging digits experiment (``examples/merge_digits_emr.py``), reduced: its checks and the paper's ordering.

One seed, shorter fine-tuning, coarse grids for task arithmetic and TIES. The EMR task models go
through the real engine; each assertion would fail if the method were broken (no mask, no per-task
output, λ ignored, the engine diverging from the library, a plan that does not rebuild the models).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from examples.merge_digits_emr import Config, main
from merge.methods.emr import EMRPlan


@pytest.mark.slow
def test_merge_digits_emr_example(tmp_path: Path) -> None:
    n = torch.get_num_threads()
    try:
        result = main(Config.quick(tmp_path / "emr"), verbose=False)
    finally:
        torch.set_num_threads(n)
    out = tmp_path / "emr"
    saved = json.loads((out / "results.json").read_text())
    s = result["summary"]
    assert saved["summary"]["small"]["emr"]["mean"] == pytest.approx(s["small"]["emr"]["mean"])
    assert (out / "merge_digits_emr.png").stat().st_size > 10_000
    assert (out / "small" / "seed0" / "recipes" / "emr_hflip.yaml").exists()
    plan = EMRPlan.load(out / "large" / "seed0" / "merged" / "emr_task0" / "emr_plan")
    assert plan.n_tasks == 4 and plan.task == 0 and plan.rescale == "model"
    for regime in ("small", "large"):
        r = s[regime]
        # the engine writes the library's bytes, and the saved plan + base rebuild every task model
        assert r["engine_identical_to_library"] and r["rebuilt_from_plan_identical"], regime
        # the fine-tunes know their tasks; EMR's task models are far above task arithmetic and TIES
        assert r["individual"]["mean"] > 90, regime
        assert r["emr"]["mean"] - r["ta"]["mean"] >= 10, regime
        assert r["emr"]["mean"] - r["ties_any"]["mean"] >= 10, regime
        assert r["normalized_emr"]["mean"] >= 0.8, regime
        # the mask is what does it: without it (θ0 + λ_i τ_uni) the task models are single-model merges
        assert r["emr"]["mean"] - r["elect_rescale"]["mean"] >= 15, regime
        assert 0.5 < r["lambda"]["mean"] < 1.0, regime
        assert 0.3 < r["mask_kept_fraction"]["mean"] < 0.8, regime
        # one bit per parameter per task (every tensor here has a multiple of 8 entries)
        assert r["storage"]["mask_bits_per_parameter_per_task"] == 1.0
        assert r["storage"]["emr_bytes_with_base"] < 0.5 * r["storage"]["finetunes_bytes_with_base"]
    assert set(result["claims"]) >= {"emr_close_to_individual_small", "emr_well_above_ta_ties_small",
                                     "emr_well_above_ta_ties_large", "mask_matters_large", "no_tuning"}
    assert result["claims"]["emr_well_above_ta_ties_small"]["holds"]
    assert "EMR task model" in result["table"] and "bit per parameter per task" in result["table"]
