"""``make demo`` (``examples/demo.py``) end to end, into a temporary folder: every step's outcome is checked
from the files it wrote, not only from the flags the demo computes itself.

The gRPC merge job succeeds, its progress is watched to the end and its output equals the library's merge of
the same recipe; the Hub merge used the pinned commit (not the branch head) and its card says so; lineage
names the model the child was really fine-tuned from; Git Re-Basin lowers the loss barrier without changing
B's function; the metanet's predictions are finite accuracies; the pictures exist; both servers stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from examples.demo import main
from merge.checkpoint import open_checkpoint


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {k: ckpt[k] for k in ckpt.keys()}


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
def test_demo_shows_every_part_of_the_system(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = main(out)
    assert res["ok"]

    # 0. CLI merges
    assert res["merge"]["ties_equals_direct_call"] and res["merge"]["ties_tensors"] == 51

    # 1. gRPC: SUCCEEDED, progress watched to the end, output == library merge, server stopped
    g = res["grpc"]
    assert g["state"] == "SUCCEEDED" and g["tensors"] == 51
    assert g["events"] >= 4 and g["progress"] == sorted(g["progress"]) and g["progress"][-1] == 51
    assert_same(out / "grpc_merge", out / "library_merge")
    base, ft_math, ft_code = (tensors(out / n) for n in ("base", "ft_math", "ft_code"))
    name = "model.layers.2.self_attn.q_proj.weight"
    grpc_t = tensors(out / "grpc_merge")[name].float()
    expect = (
        base[name].float()
        + 0.7 * (ft_math[name].float() - base[name].float())
        + 0.5 * (ft_code[name].float() - base[name].float())
    )
    torch.testing.assert_close(grpc_t, expect, atol=1e-6, rtol=2**-7)  # task arithmetic, stored in bf16
    assert res["server_exit_code"] == 0

    # 2. Hub: the pinned commit was recorded and used, not the branch head
    h = res["hub"]
    assert h["pinned"] != h["main"] and h["recorded_commit"] == h["pinned"]
    card = ModelCard.load(out / "hub_merge" / "README.md").data.to_dict()["weightsmith"]["models"]
    pinned = [m for m in card if m["repo_id"] == "hub-demo/math"]
    assert len(pinned) == 1 and pinned[0]["commit"] == h["pinned"]
    assert_same(out / "hub_merge", out / "hub_local_merge")  # = the local merge of v1's weights
    merged = tensors(out / "hub_merge")[name].float()
    torch.testing.assert_close(merged, 0.25 * base[name].float() + 0.75 * ft_math[name].float(), atol=1e-6, rtol=2**-7)

    # 3. lineage: the true parent is named, in the returned result and in the JSON written
    li = res["lineage"]
    assert li["parent"] == "merged_ties" == li["true_parent"]
    assert min(li["scores"], key=li["scores"].get) == "merged_ties" and li["scores"]["unrelated"] > 0.8
    assert json.loads((out / "lineage.json").read_text())["parent"] == "merged_ties"

    # 4. Git Re-Basin: the barrier drops; π(B) computes the same function as B
    rb = res["rebasin"]
    assert 0 <= rb["barrier_after"] < rb["barrier_before"]
    assert rb["function_drift"] < 1e-4 and min(rb["endpoint_acc"]) > 0.8

    # 5. metanet: finite accuracy predictions for held-out checkpoints
    mn = res["metanet"]
    assert len(mn["predictions"]) == len(mn["truth"]) > 0
    assert all(math.isfinite(v) and -0.5 < v < 1.5 for v in mn["predictions"])
    assert (Path(mn["metanet"]) / "card.json").exists()

    # the pictures and the summary
    for f in ("lineage_tree.png", "lineage_tree.svg", "rebasin.png", "predict_accuracy.png", "summary.json"):
        assert (out / f).stat().st_size > 1000, f
    assert len(res["summary"]) == 7 and res["seconds"] > 0
