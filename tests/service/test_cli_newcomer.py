"""Rough edges of the first hour (issue 28): a positional merge output, filters that match nothing, the top help."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from merge.checkpoint import open_checkpoint
from service.cli.main import main
from tests.support.service import linear_recipe, make_models


def test_the_output_may_follow_the_recipe_as_in_mergekit(tmp_path: Path) -> None:
    models = make_models(tmp_path / "m", 2)
    rfile = tmp_path / "r.yaml"
    rfile.write_text(linear_recipe(models))
    run = CliRunner().invoke
    assert run(main, ["merge", str(rfile), str(tmp_path / "pos")]).exit_code == 0
    assert run(main, ["merge", str(rfile), "-o", str(tmp_path / "opt")]).exit_code == 0
    a, b = open_checkpoint(tmp_path / "pos"), open_checkpoint(tmp_path / "opt")
    assert all(a[k].equal(b[k]) for k in a)
    r = run(main, ["merge", str(rfile), str(tmp_path / "x"), "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "two outputs given" in r.output
    r = run(main, ["merge", str(rfile)])
    assert r.exit_code == 2 and "no output" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_filter_that_matches_no_tensor_is_a_warning_or_under_strict_an_error(tmp_path: Path) -> None:
    models = make_models(tmp_path / "m", 2)
    names = list(open_checkpoint(models[0]))
    assert not any("self_attn" in n for n in names)
    recipe = {"merge_method": "linear", "models": [
        {"model": str(models[0]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.5}]}},
        {"model": str(models[1]), "parameters": {"weight": 0.5}},
    ]}
    rfile = tmp_path / "r.yaml"
    rfile.write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(main, ["merge", str(rfile), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0 and "warning: models[0].parameters.weight: filter 'self_attn' matches no tensor" in r.stderr
    r = CliRunner().invoke(main, ["merge", str(rfile), "-o", str(tmp_path / "strict"), "--strict"])
    assert r.exit_code == 2 and "error: models[0].parameters.weight" in r.stderr
    assert not (tmp_path / "strict").exists()
    r = CliRunner().invoke(main, ["merge", str(rfile), "-o", str(tmp_path / "dry"), "--dry-run", "--json"])
    assert r.exit_code == 0 and "matches no tensor" in r.stdout  # the plan summary carries it too
    # a filter that matches is silent
    recipe["models"][0]["parameters"]["weight"][0]["filter"] = names[0].split(".")[0]
    rfile.write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(main, ["merge", str(rfile), "-o", str(tmp_path / "quiet")])
    assert r.exit_code == 0 and "warning" not in r.stderr


def test_the_top_help_names_the_whole_system() -> None:
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and all(w in r.output for w in ("metanets", "lineage", "server"))


def test_progress_for_a_log_is_a_line_every_so_often() -> None:
    from service.cli.common import LogEvery

    now = [0.0]
    log = LogEvery(10.0, clock=lambda: now[0])
    printed = []
    for step in range(100):  # one step a second for 100 s
        now[0] = float(step)
        printed.append(log.line(f"step {step}", force=step == 99))
    assert [i for i, p in enumerate(printed) if p] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]


def test_job_rows_have_a_header_times_and_no_stale_progress() -> None:
    from service._proto.weightsmith.v1 import job_pb2
    from service._proto.weightsmith.v1 import job_service_pb2 as jpb
    from service.cli.jobs import JOB_HEADER, _job_line

    job = jpb.Job(name="jobs/" + "a" * 32, kind="align", state=job_pb2.JOB_STATE_SUCCEEDED, summary="weight matching",
                  output_path="/srv/out/b-aligned",
                  progress=job_pb2.JobProgress(phase="writing", steps_done=2, steps_total=3, unit="phase"))
    job.create_time.FromSeconds(1_700_000_000)
    job.start_time.FromSeconds(1_700_000_001)
    job.end_time.FromSeconds(1_700_000_004)
    row = _job_line(job)
    assert "2/3" not in row and "-> /srv/out/b-aligned" in row and "3.0s" in row and "SUCCEEDED" in row
    assert JOB_HEADER.split()[:4] == ["JOB", "KIND", "STATE", "SUMMARY"]
    assert row.index("align") == JOB_HEADER.index("KIND")  # the columns line up
    running = jpb.Job(name="jobs/" + "b" * 32, kind="train", state=job_pb2.JOB_STATE_RUNNING, summary="gmn",
                      progress=job_pb2.JobProgress(phase="training", steps_done=4, steps_total=40, unit="epoch"))
    running.create_time.FromSeconds(1_700_000_000)
    assert "training 4/40 epoch" in _job_line(running)


def test_dry_run_shows_the_resolved_parameters_per_tensor_group(tmp_path: Path) -> None:
    models = make_models(tmp_path / "m", 2)
    names = list(open_checkpoint(models[0]))
    first = names[0]
    recipe = {"merge_method": "linear", "models": [
        {"model": str(models[0]), "parameters": {"weight": [{"filter": first, "value": 0.9}, {"value": 0.25}]}},
        {"model": str(models[1]), "parameters": {"weight": 0.5}},
    ]}
    rfile = tmp_path / "r.yaml"
    rfile.write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(main, ["merge", str(rfile), "-o", str(tmp_path / "dry"), "--dry-run", "--json"])
    assert r.exit_code == 0
    import json

    groups = json.loads(r.stdout)["param_groups"]
    by_weight = {tuple(g["params"]["weight"]): g["tensors"] for g in groups if not g["params"].get("copied")}
    assert by_weight[(0.9, 0.5)] == [first]
    assert set(by_weight[(0.25, 0.5)]) | {first} >= {n for n in names if n != first} and first not in by_weight[
        (0.25, 0.5)]
    r = CliRunner().invoke(main, ["merge", str(rfile), "-o", str(tmp_path / "dry"), "--dry-run"])
    assert r.exit_code == 0 and f"weight=[0.9, 0.5] normalize=True: {first}" in r.stdout
    assert not (tmp_path / "dry").exists()
