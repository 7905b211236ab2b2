"""The Diffusion Soup experiment (``examples/diffusion_soup_digits.py``): the 2-D version's prediction
(seconds) and the reduced digits run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from examples.diffusion_soup_digits import Config, MixtureConfig, main, mixture2d


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mixture2d_soup_samples_the_geometric_mean_and_removal_moves_it(tmp_path: Path) -> None:
    """Averaging weights averages scores (Biggs et al. §4): the soup of one-Gaussian shard models
    samples one Gaussian at the centroid of the modes, not the union the paragon samples; removing
    shard 0 from the soup folder moves the samples to the centroid of the other two."""
    # a shorter run than the example's (same verdicts on seeds 0-2, margins as wide; ~5 s of CPU)
    r = mixture2d(
        MixtureConfig(out=tmp_path, pretrain_steps=1000, finetune_steps=300, samples=600), plot=False
    )
    st, pred = r["stats"], r["prediction"]
    for k in ("shard0", "shard1", "shard2"):
        assert st[k]["near_mode"] > 0.9, (k, st[k])  # each shard model learned its mode
    assert st["paragon"]["near_mode"] >= 0.7  # the union: samples at the modes
    assert st["soup"]["near_mode"] <= 0.25 and st["soup"]["near_centroid"] >= 0.5
    assert torch.dist(torch.tensor(st["soup"]["median"]), torch.tensor(pred["soup_centre"])) < 0.5
    assert (
        torch.dist(torch.tensor(st["soup_minus0"]["median"]), torch.tensor(pred["soup_minus0_centre"])) < 0.5
    )
    assert st["soup_minus0"]["near_centroid"] >= 0.5
    assert all(c["holds"] for c in r["claims"].values())


@pytest.mark.slow
def test_diffusion_soup_digits_reduced(tmp_path: Path) -> None:
    out = main(Config.quick(tmp_path), verbose=False)
    d = out["digits"]
    res, s = d["results"], d["summary"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["digits"]["summary"]["unlearning"] == s["unlearning"]
    for png in ("diffusion_soup_samples.png", "diffusion_soup_unlearning.png", "mixture2d.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png
    # the soup folder was a real diffusers pipeline, souped component by component
    assert s["souped_components"] == ["unet"] and s["copied_components"] == []
    assert (tmp_path / "built" / "soup" / "model_index.json").exists()
    assert s["add_then_remove_restores_bits"]
    # each shard model learned its shard: its classes dominate its samples
    for k in range(5):
        own = sum(res[f"shard{k}"]["class_share"][c] for c in (2 * k, 2 * k + 1))
        assert own >= 0.5, (k, own)
    # the soup is a far better model of the union than any shard model, and better than where it started
    assert res["soup"]["heldout_loss"] < min(res[f"shard{k}"]["heldout_loss"] for k in range(5))
    assert res["soup"]["heldout_loss"] < res["pretrained"]["heldout_loss"]
    assert res["soup"]["fd"] < min(res[f"shard{k}"]["fd"] for k in range(5))
    # removal unlearns: the removed shard's classes lose at least 30 % of their share
    u = s["unlearning"][0]
    assert u["share_soup_minus"] <= 0.7 * u["share_soup"], u
    assert d["claims"]["removal_unlearns"]["holds"]
