"""EvolveService against the real server on 127.0.0.1: a recipe search as a job of kind "evolve" (progress
per batch of trials, the best recipe), bad configs refused before anything is written, the code objective
refused, a search extended in its folder, a cancel, and a search interrupted by a server SIGKILL and
resumed by RetryJob without repeating a finished trial."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merge.recipe import load_recipe
from service.client import RemoteError, state_name
from tests.support.service import ServerProcess, tree_digest, wait_for

TRIALS = 6


def _write_inputs(root: Path) -> None:
    """base, a = base + τa, b = base + τb (an MLP 4 -> 8 -> 3) and val.npz labelled by the base model."""
    g = torch.Generator().manual_seed(0)
    base = {}
    for i, (n_out, n_in) in enumerate([(8, 4), (3, 8)]):
        base[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g)
        base[f"layers.{i}.bias"] = torch.randn(n_out, generator=g)
    models = {"base": base}
    for name in ("a", "b"):
        models[name] = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for name, sd in models.items():
        (root / name).mkdir(parents=True)
        save_file(sd, str(root / name / "model.safetensors"))
    x = torch.randn(64, 4, generator=g)
    h = torch.relu(x @ base["layers.0.weight"].T + base["layers.0.bias"])
    y = (h @ base["layers.1.weight"].T + base["layers.1.bias"]).argmax(-1)
    np.savez(root / "val.npz", x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))


def _config(trials: int = TRIALS, **kw: object) -> dict:
    rng = {"weight": {"min": 0, "max": 1}, "density": {"min": 0.1, "max": 1}}
    cfg = {
        "recipe": {"merge_method": "ties", "base_model": "base",
                   "models": [{"model": "a", "parameters": dict(rng)}, {"model": "b", "parameters": dict(rng)}]},
        "objectives": [{"accuracy": {"model": "mlp", "data": "val.npz"}}],
        "budget": {"trials": trials}, "batch": 2, "seed": 0,
        "sampler": "random",  # the service adds nothing per sampler; CMA-ES's import alone takes seconds
    }  # fmt: skip
    cfg.update(kw)
    return cfg


def _study_trials(folder: Path) -> dict[int, tuple[str, list[float] | None, dict]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="weightsmith-evolve", storage=f"sqlite:///{folder / 'study.db'}")
    return {t.number: (t.state.name, t.values, t.params) for t in study.trials}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("evolve")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    _write_inputs(root)
    (outside / "secret").mkdir()
    save_file({"layers.0.weight": torch.zeros(8, 4)}, str(outside / "secret" / "model.safetensors"))
    srv = ServerProcess(base / "data", [root], args=["--job-threads", "1", "--slow-down", "0.2"]).start()
    client = srv.client()
    client.wait_ready()
    yield {"base": base, "root": root, "outside": outside, "srv": srv, "client": client}
    client.close()
    srv.stop()


def test_evolve_job_searches_and_writes_the_best_recipe(env: dict) -> None:
    c, root = env["client"], env["root"]
    job = c.create_evolve_job(_config(), "search")
    assert job.kind == "evolve" and job.progress.steps_total == TRIALS and job.progress.unit == "trial"
    seen = []
    for ev in c.watch(job.name):
        p = ev.job.progress
        if p.phase == "searching":
            seen.append((p.steps_done, p.steps_total, dict(p.metrics)))
    done = c.get_job(job.name)
    assert state_name(done.state) == "SUCCEEDED", done.error.message
    assert [s[:2] for s in seen] == [(2, TRIALS), (4, TRIALS), (6, TRIALS)]
    assert all(0.0 <= s[2]["best"] <= 1.0 and "last" in s[2] for s in seen)
    assert [s[2]["best"] for s in seen] == sorted(s[2]["best"] for s in seen)  # the best so far never drops
    res = c.job_result(done)
    assert res.trials == TRIALS and res.complete == TRIALS and res.stopped == "trials"
    assert list(res.objectives) == ["accuracy"] and list(res.directions) == ["maximize"]
    assert Path(res.output_path) == root / "search" and res.output_ref == f"job://{job.name[5:]}"
    best = res.best[0]
    assert best.method == "ties" and best.values[0] == pytest.approx(seen[-1][2]["best"])
    assert set(best.params) == {"models[0].weight", "models[0].density", "models[1].weight", "models[1].density"}
    recipe = Path(res.best_recipe)
    assert recipe == root / "search" / "best_recipe.yml" and recipe.read_text() == res.best_recipe_yaml
    r = load_recipe(str(recipe))
    assert r.merge_method == "ties" and [m.model for m in r.models] == ["a", "b"]
    assert "trials.csv" in res.files and (root / "search" / "study.db").exists()
    assert not (root / "search" / "scratch").exists()
    kinds = {k.name: k for k in c.list_job_kinds()}
    assert kinds["evolve"].result_type == "weightsmith.v1.EvolveResult"
    assert list(kinds["evolve"].create_rpcs) == ["weightsmith.v1.EvolveService/CreateEvolveJob"]


def test_bad_requests_get_the_right_code_and_write_nothing(env: dict) -> None:
    c, root, outside = env["client"], env["root"], env["outside"]
    (root / "not-a-search").mkdir()
    (root / "not-a-search" / "notes.txt").write_text("mine")
    before = tree_digest(root)
    n_jobs = len(c.list_jobs(page_size=1000)[0])
    bad_density = _config()
    bad_density["recipe"]["models"][0]["parameters"]["density"] = {"min": 0.1, "max": 1.5}
    outside_model = _config()
    outside_model["recipe"]["models"][1]["model"] = str(outside / "secret")
    missing_model = _config()
    missing_model["recipe"]["base_model"] = "nope"
    cases = [
        # the service never runs code: the 'code' objective is refused like a code method in a merge
        (_config(objectives=[{"code": {"function": "os:getpid"}}]), "", "FAILED_PRECONDITION", "allow-code"),
        (bad_density, "", "INVALID_ARGUMENT", "recipe.models[0].parameters.density"),
        (_config(objectives=[{"nope": {}}]), "", "INVALID_ARGUMENT", "unknown objective 'nope'"),
        (_config(budget={}), "", "INVALID_ARGUMENT", "budget"),
        (_config(colour="red"), "", "INVALID_ARGUMENT", "colour: unknown key"),
        (_config(recipe={"merge_method": "ties", "models": [{"model": "a"}]}), "", "INVALID_ARGUMENT",
         "nothing to search"),
        (outside_model, "", "PERMISSION_DENIED", "outside the server's roots"),
        (missing_model, "", "NOT_FOUND", "nope"),
        (_config(), "not-a-search", "ALREADY_EXISTS", "not a search folder"),
        (_config(), str(outside / "out"), "PERMISSION_DENIED", "output_path"),
        (_config(seed=1), "search", "ALREADY_EXISTS", "another config"),
    ]  # fmt: skip
    if not (root / "search").exists():
        cases.pop()  # needs the search of the first test
    for cfg, out, code, text in cases:
        with pytest.raises(RemoteError) as e:
            c.create_evolve_job(cfg, out)
        assert e.value.code == code and text in e.value.message, (code, text, e.value)
        assert "Traceback" not in e.value.message
        if code == "INVALID_ARGUMENT":
            assert e.value.field == "config"
    with pytest.raises(RemoteError) as e:
        c.create_evolve_job("budget: [", "x")
    assert e.value.code == "INVALID_ARGUMENT" and e.value.field == "config_yaml"
    with pytest.raises(RemoteError) as e:
        c.create_evolve_job(_config(), "x", trials=-1)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.field == "trials"
    assert tree_digest(root) == before
    assert len(c.list_jobs(page_size=1000)[0]) == n_jobs


def test_cancelled_search_stops_and_keeps_its_study(env: dict) -> None:
    c, root = env["client"], env["root"]
    job = c.create_evolve_job(_config(trials=10_000), "cancelled")
    wait_for(lambda: c.get_job(job.name).progress.steps_done >= 2, 120, what="first batch")
    c.cancel_job(job.name)
    end = c.wait(job.name, timeout=60)
    assert state_name(end.state) == "CANCELLED" and "what it did is kept" in end.error.message
    trials = _study_trials(root / "cancelled")
    assert 2 <= len(trials) < 100 and not (root / "cancelled" / "scratch").exists()


def test_cli_remote_evolve_extends_a_search_in_its_folder(env: dict) -> None:
    """``weightsmith remote evolve`` with the same config into the same folder and a larger ``--trials``:
    the search is resumed and extended; nothing finished is repeated."""
    from click.testing import CliRunner

    from service.cli.main import main
    from tests.support.service import TOKEN

    root = env["root"]
    if not (root / "search" / "study.db").exists():
        pytest.skip("needs the search of test_evolve_job_searches_and_writes_the_best_recipe")
    before = _study_trials(root / "search")
    cfg = env["base"] / "search.yml"
    cfg.write_text(json.dumps(_config()))
    conn = ["--server", env["srv"].target, "--token", TOKEN]
    args = ["remote", "evolve", str(cfg), "-o", "search", "--trials", str(TRIALS + 2), "--json", *conn]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["job"]["kind"] == "evolve" and out["job"]["summary"].startswith("resume")
    assert out["result"]["trials"] == str(TRIALS + 2)  # int64 as JSON text
    after = _study_trials(root / "search")
    assert len(after) == TRIALS + 2 and all(after[n] == t for n, t in before.items())
    cfg.write_text(json.dumps(_config(objectives=[{"code": {"function": "os:getpid"}}])))
    r = CliRunner().invoke(main, ["remote", "evolve", str(cfg), "-o", "cli2", *conn])
    assert r.exit_code == 2 and "error: FAILED_PRECONDITION" in r.output

def test_search_interrupted_by_a_server_kill_resumes_on_retry(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _write_inputs(root)
    trials = 8
    srv = ServerProcess(tmp_path / "data", [root], args=["--slow-down", "0.5", "--job-threads", "1"]).start()
    try:
        c = srv.client()
        job = c.create_evolve_job(_config(trials=trials), "s")
        wait_for(lambda: c.get_job(job.name).progress.steps_done >= 2, 120, what="first batch")
        srv.signal(signal.SIGKILL)
        srv.wait()
        c.close()
    finally:
        srv.kill()
    srv = ServerProcess(tmp_path / "data", [root], args=["--job-threads", "1"]).start()
    try:
        c = srv.client()
        got = c.get_job(job.name)
        assert state_name(got.state) == "INTERRUPTED" and "kept" in got.error.message
        kept = {n: t for n, t in _study_trials(root / "s").items() if t[0] == "COMPLETE"}
        assert 2 <= len(kept) < trials
        c.retry_job(job.name)
        end = c.wait(job.name, timeout=120)
        assert state_name(end.state) == "SUCCEEDED", end.error.message
        assert end.attempt == 2 and c.job_result(end).trials == trials
        c.close()
    finally:
        srv.stop()
    after = _study_trials(root / "s")
    assert all(after[n] == t for n, t in kept.items())  # the finished trials were kept, not run again
    assert sum(t[0] == "COMPLETE" for t in after.values()) >= trials - 1  # at most one cut short and re-asked
