"""Metanet training: resumable, data-parallel = single process, cards that reload, predict/embed, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from merge.errors import CheckpointError, InvalidArgumentError, OutputExistsError
from merge.symmetry import apply_permutation
from metanets.train import TrainConfig, embed, load_metanet, predict, train_metanet
from metanets.zoo import Zoo, build_zoo
from tests.metanets.test_metanets_zoo import TINY

ZOO = dict(
    TINY,
    name="train-zoo",
    runs=10,
    architectures=[{"kind": "mlp", "depth": [1, 2], "width": 16, "activation": ["relu", "tanh"], "norm": "none"}],
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "z"
    build_zoo(ZOO, out, workers=1, progress=False)
    return Zoo(out)


def _cfg(**kw):
    base = {"model": "gmn", "epochs": 3, "batch_size": 6, "split": (0.5, 0.25, 0.25), "patience": 50,
            "model_args": {"hidden": 8, "layers": 1}}  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_file(str(path / "metanet.safetensors"))


def test_interrupted_training_resumes_to_the_same_metanet(zoo, tmp_path):
    full = train_metanet(zoo, _cfg(), tmp_path / "full", progress=False)
    assert full is not None and len(full.history) == 3
    assert train_metanet(zoo, _cfg(), tmp_path / "cut", progress=False, stop_after_epochs=1) is None
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial" / "train_state.pt").exists()
    again = train_metanet(zoo, _cfg(), tmp_path / "cut", progress=False)
    assert again is not None and [h["epoch"] for h in again.history] == [1, 2, 3]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut.partial").exists()


def test_a_partial_run_of_another_config_is_not_reused(zoo, tmp_path):
    assert train_metanet(zoo, _cfg(lr=1e-2), tmp_path / "m", progress=False, stop_after_epochs=1) is None
    r = train_metanet(zoo, _cfg(), tmp_path / "m", progress=False)
    ref = train_metanet(zoo, _cfg(), tmp_path / "ref", progress=False)
    a, b = _weights(r.path), _weights(ref.path)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_ddp_match_one_process(zoo, tmp_path):
    one = train_metanet(zoo, _cfg(epochs=2), tmp_path / "one", progress=False)
    two = train_metanet(zoo, _cfg(epochs=2), tmp_path / "two", nproc=2, progress=False)
    assert two is not None and two.card["train"]["world_size"] == 2
    a, b = _weights(one.path), _weights(two.path)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert two.metrics["kendall_tau"] == pytest.approx(one.metrics["kendall_tau"], abs=1e-6)


@pytest.mark.parametrize("model", ["gmn", "unf", "statnn", "flat", "flat_aug", "deepsets"])
def test_every_metanet_trains_reloads_and_predicts(zoo, tmp_path, model):
    where = (
        {"arch.depth": 1, "arch.width": 16, "arch.norm": "none"}
        if model in ("unf", "flat", "flat_aug")
        else {}
    )
    sub = [
        i
        for i, r in enumerate(zoo.records)
        if all(r["arch"].get(k.split(".")[1]) == v for k, v in where.items())
    ]
    if len({zoo.records[i]["run"] for i in sub}) < 3:
        pytest.skip("the tiny zoo has too few runs of one architecture")
    r = train_metanet(zoo, _cfg(model=model, model_args={}, where=where), tmp_path / model, progress=False)
    card = json.loads((r.path / "card.json").read_text())
    assert card["zoo"]["sha256"] == zoo.digest and card["target"]["kind"] == "regression"
    assert {"kendall_tau", "r2", "spearman"} <= set(r.metrics)
    net, _ = load_metanet(r.path)
    rec = zoo.records[sub[0]]
    path = zoo.path / rec["file"]
    p = predict(r.path, [str(path)], spec=zoo.spec(sub[0]))[0]
    assert 0.0 <= p["prediction"] <= 1.0 and p["target"] == "test_acc"
    e = embed(r.path, [str(path)], spec=zoo.spec(sub[0]))[0]["embedding"]
    assert len(e) == net.embed_dim


def test_gmn_prediction_ignores_a_hidden_permutation(zoo, tmp_path):
    r = train_metanet(zoo, _cfg(), tmp_path / "g", progress=False)
    state, spec = zoo.state_dict(3), zoo.spec(3)
    permuted = apply_permutation(spec, state, spec.random_perms(torch.Generator().manual_seed(0)))
    a, b = predict(r.path, [state, permuted], spec=spec)
    assert a["prediction"] == pytest.approx(b["prediction"], abs=1e-5)


def test_predict_and_embed_in_batches_answer_as_one_at_a_time(zoo, tmp_path):
    """Checkpoints are read one at a time and run ``batch_size`` at a time: the batch size changes nothing."""
    r = train_metanet(zoo, _cfg(), tmp_path / "g", progress=False)
    refs = [str(zoo.path / zoo.records[i]["file"]) for i in range(5)]
    one = predict(r.path, refs, spec=zoo.spec(0), batch_size=1)
    many = predict(r.path, refs, spec=zoo.spec(0), batch_size=2)  # batches of 2, 2 and 1
    assert [x["checkpoint"] for x in many] == refs
    assert [x["prediction"] for x in many] == pytest.approx([x["prediction"] for x in one], abs=1e-5)
    e1 = embed(r.path, refs, spec=zoo.spec(0), batch_size=1)
    e5 = embed(r.path, refs, spec=zoo.spec(0), batch_size=5)
    z1, z5 = (torch.tensor([x["embedding"] for x in e]) for e in (e1, e5))
    assert torch.allclose(z1, z5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        predict(r.path, refs, spec=zoo.spec(0), batch_size=0)


def test_classification_targets_and_errors(zoo, tmp_path):
    r = train_metanet(zoo, _cfg(target="task"), tmp_path / "task", progress=False)
    assert r.card["target"] == {
        "name": "task",
        "kind": "classification",
        "loss": "ce",
        "classes": ["digits", "parity"],
    }
    p = predict(r.path, [zoo.state_dict(0)], spec=zoo.spec(0))[0]
    assert p["prediction"] in ("digits", "parity") and sum(p["probabilities"].values()) == pytest.approx(1.0)
    with pytest.raises(InvalidArgumentError, match="unknown metanet"):
        train_metanet(zoo, _cfg(model="transformer"), tmp_path / "x", progress=False)
    with pytest.raises(OutputExistsError, match="exists"):  # the one output rule (merge.atomic)
        train_metanet(zoo, _cfg(target="task"), tmp_path / "task", progress=False)
    with pytest.raises(InvalidArgumentError, match="no field 'nonsense'"):
        train_metanet(zoo, _cfg(target="nonsense"), tmp_path / "y", progress=False)
    with pytest.raises(InvalidArgumentError, match="reads one architecture"):
        train_metanet(zoo, _cfg(model="unf"), tmp_path / "u", progress=False)


def test_unreadable_checkpoints_and_metanets_are_named(zoo, tmp_path):
    where = {"arch.depth": 1}
    r = train_metanet(zoo, _cfg(model="statnn", model_args={}, where=where), tmp_path / "s", progress=False)
    other = next(i for i, rec in enumerate(zoo.records) if rec["arch"]["depth"] == 2)
    with pytest.raises(InvalidArgumentError, match="cannot read this checkpoint.*another architecture"):
        predict(r.path, [str(zoo.path / zoo.records[other]["file"])], spec=zoo.spec(other))
    with pytest.raises(CheckpointError, match="no card.json"):
        load_metanet(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    card = json.loads((r.path / "card.json").read_text())
    card["config"]["hidden"] = 7
    (bad / "card.json").write_text(json.dumps(card))
    (bad / "metanet.safetensors").write_bytes((r.path / "metanet.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="weights do not fit its card|unreadable"):
        load_metanet(bad)


def test_cli_zoo_and_metanet_commands(tmp_path):
    from service.cli.main import main

    cfg = tmp_path / "zoo.json"
    cfg.write_text(json.dumps(dict(ZOO, runs=4, name="cli")))
    run = CliRunner().invoke
    res = run(main, ["zoo", "build", str(cfg), "-o", str(tmp_path / "z"), "--workers", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["complete"] is True
    res = run(main, ["zoo", "show", str(tmp_path / "z"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["runs"] == 4
    res = run(main, ["metanet", "train", str(tmp_path / "z"), "--model", "statnn", "--epochs", "2", "-o",
                     str(tmp_path / "m"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    files = sorted(str(p) for p in (tmp_path / "z" / "models").glob("*.safetensors"))[:2]
    res = run(main, ["metanet", "predict", str(tmp_path / "m"), *files, "--json"])
    assert res.exit_code == 0, res.output
    assert [r["checkpoint"] for r in json.loads(res.stdout)] == files
    res = run(main, ["metanet", "embed", str(tmp_path / "m"), *files])
    assert res.exit_code == 0 and len(res.stdout.strip().splitlines()) == 2
    res = run(main, ["metanet", "predict", str(tmp_path / "m"), str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 2 and "error:" in res.output


@pytest.mark.parametrize("model", ["gmn", "unf", "statnn"])
def test_predict_and_embed_refuse_nan_weights_naming_the_tensor(zoo, tmp_path, model):
    """One NaN/Inf policy wherever weights are read (issue 22): predict / embed refuse, naming the tensor."""
    from merge.errors import NonFiniteError

    where = {"arch.depth": 1, "arch.width": 16, "arch.norm": "none"} if model == "unf" else {}
    args = {} if model != "gmn" else {"hidden": 8, "layers": 1}
    r = train_metanet(zoo, _cfg(model=model, epochs=1, model_args=args, where=where), tmp_path / model, progress=False)
    i = next(i for i, rec in enumerate(zoo.records) if rec["arch"].get("depth") == 1)
    state = {k: v.clone() for k, v in zoo.state_dict(i).items()}
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name].view(-1)[0] = float("inf")
    for fn in (predict, embed):
        with pytest.raises(NonFiniteError, match=f"tensor '{name}' has 1 NaN/Inf"):
            fn(r.path, [state])


def test_a_collapsed_metanet_is_reported_whatever_its_rank_correlation() -> None:
    """A metanet whose predictions barely vary can still rank well (τ high): the spread and R² say it."""
    from metanets.train import collapse_warning, regression_metrics

    true = [0.1, 0.3, 0.5, 0.7, 0.9]
    flat = [0.4166 + 1e-4 * i for i in range(5)]  # ranks perfectly, predicts ~a constant
    m = regression_metrics(flat, true)
    assert m["kendall_tau"] == pytest.approx(1.0) and m["prediction_spread"] < 0.01 and m["r2"] < 0
    w = collapse_warning(m, 24)
    assert w is not None and "spread is 0.00" in w and "24 records" in w
    good = regression_metrics([0.12, 0.28, 0.55, 0.66, 0.93], true)
    assert good["prediction_spread"] > 0.9 and collapse_warning(good, 24) is None
