"""The FW-Merging digits example (``examples/fw_merging_digits.py``), reduced: it runs end to end.

One seed, k = 0 and 16 irrelevant checkpoints, a 128-wide backbone and short runs. What is asserted
would fail if FW-Merging or the pipeline were broken: the fine-tunes learned their tasks, task
arithmetic over the pool collapses when the irrelevant checkpoints join it while FW-Merging keeps
most of its accuracy and puts more weight on the relevant members than a uniform merge, FW's
resident memory does not grow with the pool (AdaMerging's task vectors do), and the CLI (entry
point, ``--allow-code``) writes what the library computes, again from the saved plan alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from examples.fw_merging_digits import Config, main


@pytest.mark.slow
def test_fw_merging_example(tmp_path: Path) -> None:
    n = torch.get_num_threads()
    try:
        result = main(Config.quick(tmp_path / "fw"), verbose=False)
    finally:
        torch.set_num_threads(n)
    out = tmp_path / "fw"
    saved = json.loads((out / "results.json").read_text())
    s = result["summary"]
    assert saved["summary"]["fw_layer"]["16"]["mean"] == pytest.approx(s["fw_layer"]["16"]["mean"])
    assert (out / "fw_merging_digits.png").stat().st_size > 10_000
    assert "FW-Merging" in (out / "table.txt").read_text()
    run = result["runs"][0]
    assert run["individual"]["mean"] > 90
    assert run["cli"]["library_identical"] and run["cli"]["replay_identical"]
    k0, k16 = run["by_k"]
    assert k16["n_pool"] == 20 and k0["n_pool"] == 4
    # task arithmetic over the pool collapses; FW-Merging keeps most of its accuracy and beats it by far
    assert k16["ta"]["mean"] < k0["ta"]["mean"] - 15
    assert k16["fw_layer"]["mean"] > k0["fw_layer"]["mean"] - 10
    assert k16["fw_layer"]["mean"] > k16["ta"]["mean"] + 15
    # FW's weight is on the relevant members more than a uniform merge's (4 of 20)
    assert k0["fw_layer"]["mass"]["relevant"] == pytest.approx(1.0)
    assert k16["fw_layer"]["mass"]["relevant"] > 0.3
    # constant memory in the pool's size; AdaMerging holds every task vector
    assert k16["fw_layer"]["resident_bytes"] == k0["fw_layer"]["resident_bytes"]
    ada = k16["ada_entropy_paper"]["task_vector_bytes"] / k0["ada_entropy_paper"]["task_vector_bytes"]
    assert ada == pytest.approx(5.0)
    assert set(result["claims"]) >= {"fw_layer_stable_with_irrelevant", "ta_falls_with_irrelevant"}
