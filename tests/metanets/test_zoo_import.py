"""A zoo imported from state dicts one already has: read back, split by run, trained on, refused when wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from merge.errors import InvalidArgumentError, NonFiniteError, OutputExistsError, ShapeMismatchError
from merge.symmetry import auto_spec
from metanets.train import TrainConfig, predict, train_metanet
from metanets.zoo import Zoo, ZooDataset
from metanets.zoo_import import import_zoo

SHAPES = {"layers.0.weight": (16, 8), "layers.0.bias": (16,), "layers.2.weight": (4, 16), "layers.2.bias": (4,)}


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = 0.2 + 1.5 * torch.rand((), generator=g)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _acc(state: dict[str, torch.Tensor]) -> float:
    """A target the weights determine (the first layer's scale), in [0, 1]."""
    return round(float(torch.sigmoid(3 * (state["layers.0.weight"].std() - 0.9))), 6)


def _entries(n: int = 30, start: int = 0):
    for i in range(start, start + n):
        s = _state(i)
        yield s, {"test_acc": _acc(s), "task": "digits", "run": i // 2, "trial": i}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    return import_zoo(tmp_path_factory.mktemp("imp") / "z", _entries(), name="imported-mlps")


def test_an_imported_zoo_reads_back_like_a_built_one(zoo):
    z = Zoo(zoo.path)  # hash-checked
    assert len(z) == 30
    s = z.summary()
    assert s["name"] == "imported-mlps" and s["models"] == 30 and s["runs"] == 15 and s["architectures"] == 1
    assert s["tasks"] == ["digits"] and s["kinds"] == ["imported"]
    r = z.records[3]
    assert {"id", "run", "epoch", "task", "arch", "arch_id", "hparams", "seed", "test_acc", "n_params", "diverged",
            "lineage", "file", "sha256", "trial"} <= set(r)  # fmt: skip
    assert (r["run"], r["epoch"], r["hparams"], r["trial"], r["n_params"]) == (1, 0, {}, 3, 16 * 8 + 16 + 4 * 16 + 4)
    assert r["test_acc"] == _acc(_state(3))
    assert all(torch.equal(z.state_dict(3)[k], _state(3)[k]) for k in SHAPES)
    assert z.spec(3).to_dict() == auto_spec(_state(3)).to_dict()
    assert json.loads((z.path / "specs" / f"{r['arch_id']}.json").read_text())["spec"] == z.spec(0).to_dict()
    assert json.loads((z.path / "runs" / "r00001.json").read_text()) == z.records[2:4]
    tr, va, te = z.split((0.6, 0.2, 0.2))
    for a, b in ((tr, va), (tr, te), (va, te)):  # by run: both entries of a run on one side
        assert not {z.records[i]["run"] for i in a} & {z.records[i]["run"] for i in b}
    state, spec, rec = ZooDataset(z, [5])[0]
    assert rec["id"] == "m00005" and set(state) == set(SHAPES) and spec is z.spec(5)


@pytest.mark.parametrize("model", ["statnn", "gmn"])
def test_a_metanet_trains_on_an_imported_zoo_and_predicts(zoo, tmp_path, model):
    cfg = TrainConfig(model=model, epochs=2, batch_size=8, split=(0.6, 0.2, 0.2), patience=50,
                      model_args={"hidden": 8, "layers": 1} if model == "gmn" else {})  # fmt: skip
    r = train_metanet(zoo, cfg, tmp_path / model, progress=False)
    assert r is not None and len(r.history) == 2 and r.card["zoo"]["sha256"] == zoo.digest
    assert r.card["target"]["kind"] == "regression" and r.card["target"]["loss"] == "bce"
    (p,) = predict(r.path, [_state(1000)])  # a new state dict, its spec inferred from the names
    assert 0.0 <= p["prediction"] <= 1.0 and p["target"] == "test_acc"


def test_other_metadata_fields_are_targets_and_filters_and_paths_are_entries(tmp_path):
    for i in range(6):
        save_file(_state(i), str(tmp_path / f"c{i}.safetensors"))
    entries = [(tmp_path / f"c{i}.safetensors", {"test_acc": 0.5, "density": i / 10, "group": "ab"[i % 2]})
               for i in range(6)]  # fmt: skip
    z = import_zoo(tmp_path / "z", entries, name="files", spec=auto_spec(_state(0)))
    assert z.field("density") == [i / 10 for i in range(6)] and z.field("task") == ["imported"] * 6
    assert [r["run"] for r in z.records] == list(range(6))  # each entry its own run by default
    assert torch.equal(z.state_dict(4)["layers.2.bias"], _state(4)["layers.2.bias"])
    cfg = TrainConfig(model="statnn", target="group", epochs=1, batch_size=4, split=(0.5, 0.25, 0.25))
    r = train_metanet(z, cfg, tmp_path / "m", progress=False)
    assert r.card["target"]["kind"] == "classification" and r.card["target"]["classes"] == ["a", "b"]


def _bad_at(k: int, change):
    for i, (s, m) in enumerate(_entries(10)):
        if i == k:
            change(s)
        yield s, m


def _no_output(tmp_path, name="z"):
    return not (tmp_path / name).exists() and not list(tmp_path.glob(f"{name}.partial-*"))


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (lambda s: s.update({"layers.2.weight": torch.zeros(4, 17)}), ShapeMismatchError,
         ["entry 7", "'layers.2.weight'", "[4, 17]", "[4, 16]"]),
        (lambda s: s.pop("layers.0.bias"), ShapeMismatchError, ["entry 7", "lacks tensor 'layers.0.bias'"]),
        (lambda s: s.update({"extra": torch.zeros(2)}), ShapeMismatchError, ["entry 7", "'extra'"]),
        (lambda s: s["layers.0.weight"].__setitem__((0, 0), float("nan")), NonFiniteError,
         ["entry 7", "'layers.0.weight'", "NaN"]),
    ],
)  # fmt: skip
def test_a_bad_entry_is_named_and_leaves_nothing(tmp_path, change, error, words):
    with pytest.raises(error) as e:
        import_zoo(tmp_path / "z", _bad_at(7, change), name="bad")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert _no_output(tmp_path)


def test_a_failure_midway_leaves_nothing(tmp_path):
    def entries():
        yield from _entries(5)
        raise RuntimeError("the source died")

    with pytest.raises(RuntimeError, match="the source died"):
        import_zoo(tmp_path / "z", entries(), name="cut")
    assert _no_output(tmp_path)


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"task": "digits"}, "needs 'test_acc'"),
        ({"test_acc": 1.5}, "needs 'test_acc'"),
        ({"test_acc": float("nan")}, "needs 'test_acc'"),
        ({"test_acc": 0.5, "run": -1}, "'run' must be a non-negative integer"),
        ({"test_acc": 0.5, "sha256": "x"}, "may not set ['sha256']"),
        ({"test_acc": 0.5, "when": object()}, "not plain JSON"),
    ],
)
def test_bad_metadata_is_refused_naming_the_entry(tmp_path, meta, words):
    entries = [(_state(0), {"test_acc": 0.5}), (_state(1), meta)]
    with pytest.raises(InvalidArgumentError) as e:
        import_zoo(tmp_path / "z", entries, name="bad")
    assert "entry 1" in str(e.value) and words in str(e.value)
    assert _no_output(tmp_path)


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    first = import_zoo(tmp_path / "z", _entries(4), name="one")
    with pytest.raises(OutputExistsError):
        import_zoo(tmp_path / "z", _entries(3, start=10), name="two")
    assert Zoo(tmp_path / "z").digest == first.digest
    second = import_zoo(tmp_path / "z", _entries(3, start=10), name="two", overwrite=True)
    assert len(second) == 3 and second.summary()["name"] == "two"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError):  # a folder weightsmith did not write is never replaced
        import_zoo(tmp_path / "mine", _entries(3), name="x", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(InvalidArgumentError, match="no entries"):
        import_zoo(tmp_path / "empty", [], name="none")
    assert _no_output(tmp_path, "empty")
