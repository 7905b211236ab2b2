"""The continual-merging experiment (``examples/continual_digits.py``), reduced: OPCM's invariants hold
on trained models, the soup folder grown by the CLI is the library's OPCM bit for bit, and the saved
numbers are the run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.continual_digits import Config, main


@pytest.mark.slow
def test_continual_digits_reduced(tmp_path: Path) -> None:
    cfg = Config.quick(tmp_path)
    r = main(cfg, verbose=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(r["summary"]))
    assert (tmp_path / "continual_digits.png").stat().st_size > 10_000
    n = len(cfg.setup.tasks)
    for run in r["runs"]:
        c = run["curves"]
        assert sorted(run["order"]) == sorted(cfg.setup.tasks)
        # one task: OPCM (λ_1 = 1) and the average are the fine-tune itself
        assert run["opcm_steps"][0]["lambda"] == 1.0 and run["opcm_steps"][0]["kept"] == 1.0
        assert c["opcm"][0]["seen"] == c["average"][0]["seen"] == c["individual"][0]["seen"]
        # λ_t = ‖S_t‖ / mean ‖τ_i‖ ≤ t (triangle inequality), and grows as tasks arrive
        lams = [s["lambda"] for s in run["opcm_steps"]]
        assert all(1.0 <= lam <= t + 1 for t, lam in enumerate(lams)) and lams == sorted(lams)
        assert all(0.5 < s["kept"] <= 1.0 for s in run["opcm_steps"])
        assert len(c["opcm"]) == n and all(x["seen"] > 50 for x in c["opcm"])
        assert all(x["seen"] < 40 for x in c["pretrained"])
        # the merged models beat the pre-trained backbone and stay below the fine-tunes
        assert c["opcm"][-1]["seen"] < c["individual"][-1]["seen"]
        # on this run (fixed seeds, one thread): OPCM above averaging and TA at λ 0.3 after all tasks
        assert c["opcm"][-1]["seen"] > c["average"][-1]["seen"]
        assert c["opcm"][-1]["seen"] > c["ta_0.3"][-1]["seen"]
    cli = r["cli"]
    assert cli["identical_to_library"] and cli["step_lambdas_identical"] and cli["remove_replay_identical"]
    assert "OPCM (alpha 0.5)" in cli["show"] and all("OPCM step" in line for line in cli["add_output"])
    assert set(r["claims"]) == {
        "opcm_degrades_less_than_ta",
        "opcm_at_least_baselines_every_step",
        "opcm_5_points_above_baselines_at_T",
        "projection_matters",
    }
    assert "| OPCM (α 0.5) |" in r["table"]
