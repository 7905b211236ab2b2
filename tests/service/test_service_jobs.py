"""The job store and crash reconciliation, in process (no server): fast checks of each recovery rule."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from service.jobs.manager import INTERRUPTED, QUEUED, RUNNING, SUCCEEDED, JobManager, JobManagerConfig
from service.jobs.store import JobRecord, JobStore
from tests.support.service import make_models, tiny_state_dict, write_model


def _record(job_id: str, out: Path, **kw: object) -> JobRecord:
    base = dict(
        id=job_id,
        rowid=0,
        state=QUEUED,
        kind="merge",
        summary="linear",
        spec={"recipe": {"merge_method": "linear"}, "options": {}},
        output_path=str(out),
        overwrite=False,
        request_id="",
        request_hash="h",
        est_bytes=1,
        attempt=1,
        cancel_requested=False,
        worker_pid=None,
        create_time=time.time(),
        start_time=None,
        end_time=None,
        progress={"phase": "queued", "tensors_total": 10},
        error_code=None,
        error_message=None,
        result=None,
        job_refs={},
        last_seq=0,
    )
    base.update(kw)
    return JobRecord(**base)  # type: ignore[arg-type]


def test_store_events_are_sequenced_and_persist(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    s = JobStore(db)
    s.insert(_record("a" * 32, tmp_path / "o"))
    e1 = s.append_event("a" * 32, QUEUED, {"phase": "queued"})
    e2 = s.append_event("a" * 32, RUNNING, {"phase": "merging", "tensors_done": 3})
    assert (e1.seq, e2.seq) == (1, 2)
    s.close()
    s = JobStore(db)  # reopened: state, progress and the event log survive
    rec = s.get("a" * 32)
    assert (
        rec is not None and rec.state == RUNNING and rec.progress["tensors_done"] == 3 and rec.last_seq == 2
    )
    assert [e.seq for e in s.events_after("a" * 32, 0)] == [1, 2]
    assert [e.state for e in s.events_after("a" * 32, 1)] == [RUNNING]
    s.insert(_record("b" * 32, tmp_path / "p", request_id="r"))
    with pytest.raises(sqlite3.IntegrityError):  # one request id, one job
        s.insert(_record("c" * 32, tmp_path / "q", request_id="r"))


def test_recovery_rules(tmp_path: Path) -> None:
    """Jobs found RUNNING after a crash: finished -> SUCCEEDED, else INTERRUPTED with no partials."""
    root = tmp_path / "root"
    make_models(root, 1)
    data = tmp_path / "data"
    cfg = JobManagerConfig(data_dir=data, roots=[root])
    m = JobManager(cfg)
    ids = {k: k[0] * 32 for k in ("done", "renamed", "partial", "cancelling", "queued")}
    outs = {k: root / "out" / k for k in ids}
    for k, jid in ids.items():
        m.store.insert(_record(jid, outs[k]))
        (cfg.jobs_dir / jid).mkdir(parents=True)
        if k != "queued":
            m.store.append_event(
                jid, RUNNING, {"phase": "merging", "tensors_total": 10}, cancel_requested=(k == "cancelling")
            )
    # "done": the worker wrote result.json (and its output) before the crash
    write_model(outs["done"], tiny_state_dict(1))
    (cfg.jobs_dir / ids["done"] / "result.json").write_text(
        json.dumps({"out_dir": str(outs["done"]), "method": "linear", "n_tensors": 10, "attempt": 1})
    )
    # "renamed": the output was renamed into place, result.json never written
    write_model(outs["renamed"], tiny_state_dict(2))
    # "partial": killed mid-write
    (root / "out" / "partial.partial-0123").mkdir(parents=True)
    (root / "out" / "partial.partial-0123" / "model.safetensors").write_bytes(b"half")
    (cfg.uploads_dir / ".tmp-0123").mkdir(parents=True)  # an upload cut short
    m.store.close()

    m = JobManager(cfg)

    async def recover() -> None:
        m._loop = asyncio.get_running_loop()  # noqa: SLF001 - exercising the recovery step alone
        await m._recover()  # noqa: SLF001

    asyncio.run(recover())
    got = {k: m.store.get(jid) for k, jid in ids.items()}
    assert got["done"].state == SUCCEEDED and got["done"].result["n_tensors"] == 10
    assert got["renamed"].state == SUCCEEDED and got["renamed"].result["reconstructed"] is True
    assert got["renamed"].result["n_tensors"] == 10
    assert got["partial"].state == INTERRUPTED and got["partial"].error_code == "ABORTED"
    assert not (root / "out" / "partial.partial-0123").exists() and not outs["partial"].exists()
    assert got["cancelling"].state == "CANCELLED"
    assert got["queued"].state == QUEUED
    assert list(cfg.uploads_dir.iterdir()) == []
    m.store.close()


def test_output_may_not_touch_the_data_folder(tmp_path: Path) -> None:
    from service.jobs.kinds import merge as kind_merge
    from service.paths import InvalidPathError
    from tests.support.service import linear_recipe

    root = tmp_path / "root"
    models = make_models(root, 2)
    m = JobManager(JobManagerConfig(data_dir=root / "state", roots=[root]))
    recipe = yaml.safe_load(linear_recipe(models))
    for out in ("state/jobs", "state", "state/outputs/x"):
        with pytest.raises(InvalidPathError, match="data folder"):
            asyncio.run(kind_merge.admit(m, recipe, out, True, {}, "f" * 32))
    assert m.store.in_states({QUEUED, RUNNING}) == []
    m.store.close()


def test_a_version_2_store_is_migrated_with_nothing_lost(tmp_path: Path) -> None:
    """Schema 2 kept a merge's recipe (YAML), method and options in merge-only columns; schema 3 holds
    every kind in the same columns: the merge's spec is its recipe and options, its summary the method."""
    db = tmp_path / "jobs.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(
        """
        CREATE TABLE jobs (rowid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, state TEXT NOT NULL,
          recipe_yaml TEXT NOT NULL, method TEXT NOT NULL, output_path TEXT NOT NULL, overwrite INTEGER NOT NULL,
          options_json TEXT NOT NULL, request_id TEXT, request_hash TEXT NOT NULL, est_bytes INTEGER NOT NULL,
          attempt INTEGER NOT NULL, cancel_requested INTEGER NOT NULL DEFAULT 0, worker_pid INTEGER,
          create_time REAL NOT NULL, start_time REAL, end_time REAL, progress_json TEXT NOT NULL, error_code TEXT,
          error_message TEXT, result_json TEXT, job_refs_json TEXT NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0,
          kind TEXT NOT NULL DEFAULT 'merge', spec_json TEXT NOT NULL DEFAULT '{}');
        CREATE UNIQUE INDEX jobs_request_id ON jobs(request_id) WHERE request_id IS NOT NULL;
        CREATE TABLE events (job_id TEXT NOT NULL REFERENCES jobs(id), seq INTEGER NOT NULL, time REAL NOT NULL,
          state TEXT NOT NULL, progress_json TEXT NOT NULL, PRIMARY KEY (job_id, seq));
        PRAGMA user_version=2;
        """
    )
    row = "INSERT INTO jobs (id, state, recipe_yaml, method, output_path, overwrite, options_json, request_id, "
    row += "request_hash, est_bytes, attempt, create_time, progress_json, result_json, job_refs_json, last_seq, "
    row += "kind, spec_json) VALUES (?, 'SUCCEEDED', ?, ?, '/o', 0, ?, ?, 'h', 5, 2, 1.0, '{}', ?, '{}', 1, ?, ?)"
    con.execute(
        row,
        ("m" * 32, "merge_method: slerp\nmodels:\n- model: a\n", "slerp", '{"workers": 3}', "r1", '{"x": 1}',
         "merge", "{}"),
    )
    con.execute(row, ("a" * 32, "", "weight matching", "{}", None, None, "align", '{"model_a": "p"}'))
    con.execute("INSERT INTO events VALUES (?, 1, 1.0, 'SUCCEEDED', '{}')", ("m" * 32,))
    con.commit()
    con.close()
    s = JobStore(db)
    m, a = s.get("m" * 32), s.get("a" * 32)
    assert m is not None and a is not None
    assert (m.kind, m.summary, m.attempt, m.request_id, m.result) == ("merge", "slerp", 2, "r1", {"x": 1})
    assert m.spec == {"recipe": {"merge_method": "slerp", "models": [{"model": "a"}]}, "options": {"workers": 3}}
    assert (a.kind, a.summary, a.spec) == ("align", "weight matching", {"model_a": "p"})
    assert [e.seq for e in s.events_after("m" * 32, 0)] == [1]
    assert s.by_request_id("r1") is not None and s.by_request_id("r1").id == "m" * 32
    cols = {r[1] for r in s.db.execute("PRAGMA table_info(jobs)")}
    assert not cols & {"recipe_yaml", "method", "options_json"}
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == 3
    s.close()


def test_the_admitted_plan_is_used_only_while_its_inputs_are_unchanged(tmp_path: Path) -> None:
    import pickle

    from service.jobs.kinds import merge as kind_merge
    from tests.support.service import linear_recipe

    root = tmp_path / "root"
    models = make_models(root, 2)
    m = JobManager(JobManagerConfig(data_dir=root / "state", roots=[root]))
    recipe = yaml.safe_load(linear_recipe(models))
    options = kind_merge.normalize_options({}, 2)
    sub, summary = asyncio.run(kind_merge.admit(m, recipe, "out/x", False, options, "e" * 32))
    handed = pickle.loads(pickle.dumps(sub.prepared))  # as the worker process gets it
    plan = kind_merge._usable_plan(handed)
    assert plan is not None and plan.summary() == summary and plan.options.path_resolver is None
    assert sub.spec == {"recipe": yaml.safe_load(kind_merge.recipe_yaml(sub.spec)), "options": options}
    f = models[0] / "model.safetensors"
    f.write_bytes(f.read_bytes())  # written to while the job waited: the worker plans again
    assert kind_merge._usable_plan(handed) is None
    m.store.close()
