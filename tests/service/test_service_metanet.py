"""MetanetService against the real server on 127.0.0.1: a zoo job and a training job equal to
metanets.zoo.build_zoo / metanets.train.train_metanet; stored metanets listed by id; Predict and
Embed equal to metanets.train.predict / embed; bad input; a training cancelled, and one interrupted
by a server SIGKILL and resumed to the same metanet (never a half-written one)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from metanets.lineage.stats import single_torch_thread
from metanets.train import TrainConfig, embed, predict, train_metanet
from metanets.zoo import Zoo, build_zoo
from service.client import RemoteError, state_name
from tests.metanets.test_metanets_train import ZOO
from tests.support.service import ServerProcess, tree_digest, wait_for, write_model

CONFIG = dict(ZOO, runs=6, name="svc-zoo")
TRAIN = {"model": "gmn", "epochs": 3, "batch_size": 6, "split": [0.5, 0.25, 0.25], "patience": 50}
MODEL_ARGS = {"hidden": 8, "layers": 1}


def _cfg(**kw: object) -> TrainConfig:
    d = {**TRAIN, "split": tuple(TRAIN["split"]), "model_args": MODEL_ARGS, **kw}
    return TrainConfig(**d)  # type: ignore[arg-type]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "metanet.safetensors"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("metanet")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    srv = ServerProcess(
        base / "data", [root], args=["--slow-down", "0.3", "--job-threads", "1", "--memory-budget", "1GB"]
    )
    srv.start()
    client = srv.client()
    client.wait_ready()
    zoo_job = client.create_zoo_job(CONFIG, "zoo")
    lib_zoo = base / "lib-zoo"
    with single_torch_thread():  # as the server's workers (--job-threads 1)
        build_zoo(CONFIG, lib_zoo, workers=1, progress=False)
    done = client.wait(zoo_job.name, timeout=300)
    assert state_name(done.state) == "SUCCEEDED", done.error.message
    yield {"base": base, "root": root, "outside": outside, "srv": srv, "client": client, "zoo_job": done,
           "lib_zoo": lib_zoo}  # fmt: skip
    client.close()
    srv.stop()


def test_zoo_job_equals_build_zoo(env: dict) -> None:
    c, job = env["client"], env["zoo_job"]
    res = c.job_result(job)
    assert res.complete and res.runs == 6 and res.models == 18 and res.built_runs == 6
    assert Path(res.output_path) == env["root"] / "zoo" and res.output_ref == f"job://{job.name[5:]}"
    assert Zoo(res.output_path).digest == Zoo(env["lib_zoo"]).digest  # same files, same hashes
    assert c.get_zoo(res.output_ref)["models"] == 18
    assert job.progress.unit == "run" and job.progress.steps_total == 6


def test_train_predict_embed_equal_the_library(env: dict) -> None:
    c, root = env["client"], env["root"]
    zoo_ref = c.job_result(env["zoo_job"]).output_ref
    job = c.create_train_job(zoo_ref, model_args=MODEL_ARGS, display_name="acc", **TRAIN)
    done = c.wait(job.name, timeout=300)
    assert state_name(done.state) == "SUCCEEDED", done.error.message
    mn = c.job_result(done).metanet
    assert mn.name == f"metanets/{job.name[5:]}" and mn.display_name == "acc" and mn.model == "gmn"
    assert [h.epoch for h in mn.history] == [1, 2, 3] and "kendall_tau" in mn.metrics
    with single_torch_thread():  # as the server's workers (--job-threads 1): float sums depend on threads
        lib = train_metanet(root / "zoo", _cfg(), env["base"] / "lib-mn", progress=False)
    got, want = _weights(Path(mn.path)), _weights(lib.path)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert mn.name in [m.name for m in c.list_metanets().metanets]
    assert c.get_metanet(mn.name).path == mn.path
    assert "gmn" in c.list_metanets().models
    files = [str(root / "zoo" / r["file"]) for r in Zoo(root / "zoo").records[:4]]
    pred = c.predict(mn.name, files)
    with single_torch_thread():
        lib_pred = predict(lib.path, files)
    assert [p.checkpoint for p in pred.predictions] == files and pred.device == "cpu"
    assert [p.number for p in pred.predictions] == pytest.approx(
        [r["prediction"] for r in lib_pred], abs=1e-6
    )
    emb = c.embed(mn.name[len("metanets/") :], files)
    with single_torch_thread():
        lib_emb = embed(lib.path, files)
    for e, le in zip(emb.embeddings, lib_emb, strict=True):
        assert list(e.values) == pytest.approx(le["embedding"], abs=1e-6)
    # a metanet folder under a root is accepted by path too; the server's own store is not a root
    shutil.copytree(mn.path, root / "copied-metanet")
    by_path = c.predict(str(root / "copied-metanet"), files[:1]).predictions[0].number
    assert by_path == pytest.approx(lib_pred[0]["prediction"], abs=1e-6)
    with pytest.raises(RemoteError) as e:
        c.predict(mn.path, files[:1])
    assert e.value.code == "PERMISSION_DENIED"


def test_metanet_bad_input_gets_the_right_code_and_writes_nothing(env: dict) -> None:
    c, root, outside = env["client"], env["root"], env["outside"]
    zoo_ref = c.job_result(env["zoo_job"]).output_ref
    mns = c.list_metanets().metanets
    if not mns:
        pytest.skip("needs the metanet trained by test_train_predict_embed_equal_the_library")
    name = mns[0].name
    good = str(root / "zoo" / Zoo(root / "zoo").records[0]["file"])
    save_file({"w": torch.randn(2, 3, 4)}, str(root / "odd.safetensors"))
    (root / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    write_model(outside / "secret", {"0.weight": torch.randn(4, 4)})
    # a checkpoint larger than the server's 1 GB budget (a sparse file: its header claims 1.2 GB)
    hdr = b'{"w":{"dtype":"F32","shape":[300000000],"data_offsets":[0,1200000000]}}'
    with open(root / "huge.safetensors", "wb") as fh:
        fh.write(len(hdr).to_bytes(8, "little") + hdr)
        fh.truncate(8 + len(hdr) + 1_200_000_000)
    with pytest.raises(RemoteError) as e:
        c.predict(name, [good, str(root / "huge.safetensors")])
    assert e.value.code == "RESOURCE_EXHAUSTED" and "memory budget" in e.value.message
    (root / "huge.safetensors").unlink()
    cases = [
        (lambda: c.predict("metanets/" + "0" * 32, [good]), "NOT_FOUND", "not found"),
        (lambda: c.predict("metanets/nope", [good]), "NOT_FOUND", "not found"),
        (lambda: c.embed(str(root / "no-such-metanet"), [good]), "NOT_FOUND", "not found"),
        (lambda: c.predict(str(root / "zoo"), [good]), "INVALID_ARGUMENT", "not a metanet folder"),
        (lambda: c.predict(str(outside), [good]), "PERMISSION_DENIED", "outside the server's roots"),
        (lambda: c.predict(name, [str(root / "odd.safetensors")]), "INVALID_ARGUMENT", "odd.safetensors"),
        (lambda: c.predict(name, [str(root / "broken.safetensors")]), "INVALID_ARGUMENT", "broken"),
        (lambda: c.predict(name, [str(outside / "secret")]), "PERMISSION_DENIED", "checkpoints[0]"),
        (lambda: c.embed(name, [good, str(root / "missing")]), "NOT_FOUND", "checkpoints[1]"),
        (lambda: c.predict(name, []), "INVALID_ARGUMENT", "checkpoints"),
        (lambda: c.predict(name, [good], spec_ref=str(outside / "s.json")), "PERMISSION_DENIED", "spec_ref"),
        (lambda: c.get_metanet("metanets/" + "1" * 32), "NOT_FOUND", "not found"),
        (lambda: c.create_train_job(zoo_ref, model="resnet"), "INVALID_ARGUMENT", "unknown metanet"),
        (lambda: c.create_train_job(str(outside)), "PERMISSION_DENIED", "zoo"),
        (lambda: c.create_train_job(str(root / "odd.safetensors")), "INVALID_ARGUMENT", "not a zoo"),
        (
            lambda: c.create_train_job(zoo_ref, output_path=str(outside / "m")),
            "PERMISSION_DENIED",
            "output_path",
        ),
        (lambda: c.create_zoo_job({"runs": 0}, "zoo2"), "INVALID_ARGUMENT", "runs"),
        (lambda: c.create_zoo_job(dict(CONFIG, seed=9), "zoo"), "ALREADY_EXISTS", "another config"),
        (lambda: c.create_zoo_job(CONFIG, str(outside / "z")), "PERMISSION_DENIED", "output_path"),
    ]
    n_jobs = len(c.list_jobs(page_size=1000)[0])
    before = tree_digest(root), tree_digest(outside), tree_digest(env["srv"].data_dir / "jobs")
    for call, code, text in cases:
        with pytest.raises(RemoteError) as e:
            call()
        assert (e.value.code, text in e.value.message) == (code, True), e.value.message
        assert "Traceback" not in e.value.message
    assert (tree_digest(root), tree_digest(outside), tree_digest(env["srv"].data_dir / "jobs")) == before
    assert len(c.list_jobs(page_size=1000)[0]) == n_jobs


def test_cancelled_training_leaves_nothing(env: dict) -> None:
    c = env["client"]
    zoo_ref = c.job_result(env["zoo_job"]).output_ref
    job = c.create_train_job(zoo_ref, model_args=MODEL_ARGS, **{**TRAIN, "epochs": 50})
    wait_for(lambda: c.get_job(job.name).progress.steps_done >= 1, 120, what="first epoch")
    c.cancel_job(job.name)
    end = c.wait(job.name, timeout=60)
    assert state_name(end.state) == "CANCELLED"
    out = Path(end.output_path)
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert f"metanets/{job.name[5:]}" not in [m.name for m in c.list_metanets().metanets]


def test_training_interrupted_by_a_server_kill_resumes_to_the_same_metanet(tmp_path: Path) -> None:
    root = tmp_path / "root"
    build_zoo(CONFIG, root / "zoo", workers=1, progress=False)
    cfg = dict(TRAIN, epochs=5)
    srv = ServerProcess(tmp_path / "data", [root], args=["--slow-down", "0.5", "--job-threads", "1"]).start()
    try:
        c = srv.client()
        job = c.create_train_job(str(root / "zoo"), model_args=MODEL_ARGS, output_path="mn", **cfg)
        wait_for(lambda: c.get_job(job.name).progress.steps_done >= 2, 120, what="two epochs")
        srv.signal(signal.SIGKILL)
        srv.wait()
        c.close()
    finally:
        srv.kill()
    assert not (root / "mn").exists()  # never a half-written metanet
    srv = ServerProcess(tmp_path / "data", [root], args=["--job-threads", "1"]).start()
    try:
        c = srv.client()
        got = c.get_job(job.name)
        assert state_name(got.state) == "INTERRUPTED" and "kept" in got.error.message
        assert (root / "mn.partial" / "train_state.pt").exists()
        c.retry_job(job.name)
        end = c.wait(job.name, timeout=300)
        assert state_name(end.state) == "SUCCEEDED", end.error.message
        mn = c.job_result(end).metanet
        assert [h.epoch for h in mn.history] == [1, 2, 3, 4, 5] and end.attempt == 2
        c.close()
    finally:
        srv.stop()
    with single_torch_thread():  # as the server's workers (--job-threads 1)
        lib = train_metanet(root / "zoo", _cfg(epochs=5), tmp_path / "lib", progress=False)
    got_w, want = _weights(root / "mn"), _weights(lib.path)
    assert all(torch.equal(got_w[k], want[k]) for k in want)
    assert not (root / "mn.partial").exists()


def test_cli_remote_metanet_commands(env: dict) -> None:
    import json

    from click.testing import CliRunner

    from service.cli.main import main
    from tests.support.service import TOKEN

    c, root = env["client"], env["root"]
    conn = ["--server", env["srv"].target, "--token", TOKEN]
    zoo_ref = c.job_result(env["zoo_job"]).output_ref
    args = ["remote", "train", zoo_ref, "--epochs", "1", "--batch-size", "6", "--model", "statnn",
            "--name", "cli", "--json", *conn]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    name = json.loads(r.stdout)["result"]["metanet"]["name"]
    r = CliRunner().invoke(main, ["remote", "metanets", *conn])
    assert r.exit_code == 0 and name in r.stdout and "cli" in r.stdout
    files = [str(root / "zoo" / rec["file"]) for rec in Zoo(root / "zoo").records[:2]]
    r = CliRunner().invoke(main, ["remote", "predict", name, *files, "--json", *conn])
    assert r.exit_code == 0, r.output
    got = [p["number"] for p in json.loads(r.stdout)["predictions"]]
    assert got == pytest.approx([p.number for p in c.predict(name, files).predictions])
    r = CliRunner().invoke(main, ["remote", "embed", name, *files, *conn])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2
    r = CliRunner().invoke(main, ["remote", "predict", "metanets/" + "0" * 32, *files, *conn])
    assert r.exit_code == 2 and "error: NOT_FOUND" in r.output
