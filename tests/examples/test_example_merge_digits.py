"""The digits merging experiment (``examples/merge_digits.py``), reduced: the papers' claims hold.

One seed, shorter fine-tuning and coarse grids; the models are trained, saved as safetensors
checkpoints and merged by the real engine (and two recipes by the real CLI). Each assertion
would fail if the method it concerns were broken (λ ignored, no trimming, no sign election,
DARE not dropping or not rescaling, the CLI diverging from the library).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from examples.merge_digits import Config, main


@pytest.mark.slow
def test_merge_digits_claims(tmp_path: Path) -> None:
    cfg = Config.quick(tmp_path / "merge_digits")
    result = main(cfg, verbose=False)
    s, runs = result["summary"], result["runs"]
    small, large = s["small"], s["large"]
    by = {r["regime"]: r for r in runs}

    # the outputs are there and readable
    out = Path(result["config"]["out"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["small"]["ta"]["mean"] == pytest.approx(small["ta"]["mean"])
    assert (out / "merge_digits.png").stat().st_size > 10_000
    assert (out / "small" / "seed0" / "recipes" / "ties.yaml").exists()

    # the fine-tunes learned their tasks, and are poor on the union (each knows one task)
    for regime in (small, large):
        assert regime["single_own_task"]["mean"] > 90
        assert regime["best_single_union"]["mean"] < 55

    # engine identities and CLI == library (DARE's seeded masks included)
    assert by["small"]["ta_lambda0_is_base"] and by["large"]["ta_lambda0_is_base"]
    assert small["soup_equals_ta_1_over_T"] and large["soup_equals_ta_1_over_T"]
    cli = by["small"]["cli"]
    assert set(cli) == {"task_arithmetic", "dare_ties"}
    assert all(c["identical_to_library"] for c in cli.values())
    assert cli["task_arithmetic"]["test"] == pytest.approx(by["small"]["ta_selected"]["test"])

    # 1. task arithmetic is peaked in λ: interior maximum, far above both ends
    curve = [small["ta_curve"][str(lam)]["mean"] for lam in cfg.ta_lambdas]
    peak = max(curve)
    i = curve.index(peak)
    assert 0 < i < len(curve) - 1, curve
    assert peak - curve[0] >= 20, curve
    assert peak - curve[-1] >= 8, curve
    lcurve = [large["ta_curve"][str(lam)]["mean"] for lam in cfg.ta_lambdas]
    assert 0 < lcurve.index(max(lcurve)) < len(lcurve) - 1, lcurve

    # 2. the merged model beats every single fine-tune on the union of tasks, by a wide margin
    for name in ("small", "large"):
        r = by[name]
        best_single = max(v["test"] for v in r["single"].values())
        assert r["ta_selected"]["test"] - best_single >= 10, name
        assert r["ties_any_selected"]["test"] - best_single >= 10, name

    # 3. TIES >= TA where the deltas are large (it is not, by a little, where they are small;
    #    docs/experiments.md); TIES is a working merge in both regimes
    assert by["large"]["ties_any_selected"]["test"] >= by["large"]["ta_selected"]["test"]
    assert by["small"]["ties_any_selected"]["test"] >= by["small"]["ta_selected"]["test"] - 10
    assert by["small"]["ties_any_selected"]["test"] - by["small"]["pretrained"]["test"] >= 20
    # trimming to 20 % changes the merge (else density would be ignored), and so does the sign
    # election (TIES-sum vs the same trim summed without it: Breadcrumbs with γ = 0)
    d = str(cfg.ties_densities[0])
    for lam in ("0.2", "0.3"):
        assert by["small"]["ties_sum"][d][lam]["test_per_task"] != by["small"]["ta"][lam]["test_per_task"]
        assert (
            by["small"]["ties_sum"][d][lam]["test_per_task"]
            != by["small"]["trim_only"][d][lam]["test_per_task"]
        )

    # 4. DARE: at p = 0.9 small deltas survive, large ones break; the 1/(1-p) rescale is what works;
    #    at p = 0.99 even small deltas break (so entries really are dropped)
    def kept(reg: dict[str, Any], key: str) -> float:
        return reg["dare_single"][key]["mean"] / reg["single_own_task"]["mean"]

    assert kept(small, "p=0.5,rescale=True") >= 0.95
    assert kept(small, "p=0.9,rescale=True") >= 0.8
    assert kept(large, "p=0.9,rescale=True") <= 0.6
    assert kept(small, "p=0.9,rescale=True") - kept(large, "p=0.9,rescale=True") >= 0.2
    assert kept(small, "p=0.9,rescale=True") - kept(small, "p=0.9,rescale=False") >= 0.2
    assert kept(small, "p=0.99,rescale=True") <= 0.5

    # the example's own verdicts agree with the assertions above
    claims = result["claims"]
    for name in (
        "ta_peaked_small",
        "merge_beats_singles_small",
        "merge_beats_singles_large",
        "ties_ge_ta_large",
        "dare_small_deltas_survive_p0.9",
        "dare_large_deltas_break_p0.9",
        "dare_rescale_matters_p0.9",
    ):
        assert claims[name]["holds"], (name, claims[name])
