"""Accuracy prediction from weights (``examples/predict_accuracy.py``), reduced to what must hold in CI.

A small zoo A (digits MLPs, varied hyperparameters, checkpoints along training), a GMN trained on the
runs of the training split: its Kendall τ on held-out *runs* is well above chance (0), and a copy of a
test network with its hidden units permuted gets the same prediction. The orderings between predictors
are reported by the example and the bench, not asserted here (small zoos are noisy; research note
metanets.md §4.3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.predict_accuracy import build, train_one, zoo_a
from merge.symmetry import apply_permutation
from metanets.train import predict
from metanets.zoo import Zoo


@pytest.mark.slow
def test_gmn_predicts_accuracy_well_above_chance_and_ignores_permutations(tmp_path: Path) -> None:
    path = build(zoo_a(40, seed=5), tmp_path, workers=2)
    r = train_one(path, "gmn", "test_acc", 1.0, epochs=12, out=tmp_path / "m", patience=12)
    tau = r["metrics"]["kendall_tau"]
    assert tau > 0.3, r["metrics"]
    zoo = Zoo(path)
    model = next((tmp_path / "m").iterdir())
    i = len(zoo) - 1
    state, spec = zoo.state_dict(i), zoo.spec(i)
    permuted = apply_permutation(spec, state, spec.random_perms(torch.Generator().manual_seed(1)))
    assert not torch.equal(permuted["layers.0.weight"], state["layers.0.weight"])
    a, b = predict(model, [state, permuted], spec=spec)
    assert a["prediction"] == pytest.approx(b["prediction"], abs=1e-5)
