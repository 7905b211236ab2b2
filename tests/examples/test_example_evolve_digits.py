"""Evolutionary merging on the digits task models (``examples/evolve_digits.py``), reduced: one seed, 32 trials.

Asserted: the search ran its budget; its objective (the built-in ``accuracy`` with each task's named head on
the validation files) agrees with the example's own cosine-head evaluation of the best recipe; the evolved
merge is a real merge (above the pre-trained model and every single fine-tune on the union of tasks, test).
Reported, not asserted: whether it beats the hand-set recipes (the paper's claim; see docs/evolve.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.evolve_digits import QUICK, main


@pytest.mark.slow
def test_evolve_digits_quick(tmp_path: Path) -> None:
    result = main(QUICK, verbose=False, out_dir=tmp_path / "evolve")
    (run,) = result["runs"]
    e = run["evolved"]
    assert e["trials"] == QUICK.trials
    # the objective = the example's evaluation (whose per-task accuracy is a float32 mean: 1e-4 of a point)
    assert e["val"] == pytest.approx(e["search_val"], abs=1e-4)
    assert e["test"] > run["base"]["test"]
    assert e["test"] > max(v["test"] for v in run["sources"].values())
    assert (tmp_path / "evolve" / "seed0" / "search" / "best_recipe.yml").exists()
    assert (tmp_path / "evolve" / "evolve_digits.png").exists()
