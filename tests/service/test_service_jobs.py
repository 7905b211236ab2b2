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
        recipe_yaml="merge_method: linear\n",
        method="linear",
        output_path=str(out),
        overwrite=False,
        options={},
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
    from service.paths import InvalidPathError
    from tests.support.service import linear_recipe

    root = tmp_path / "root"
    models = make_models(root, 2)
    m = JobManager(JobManagerConfig(data_dir=root / "state", roots=[root]))
    recipe = yaml.safe_load(linear_recipe(models))
    for out in ("state/jobs", "state", "state/outputs/x"):
        with pytest.raises(InvalidPathError, match="data folder"):
            asyncio.run(
                m.create(
                    recipe=recipe,
                    output_path=out,
                    overwrite=True,
                    options={},
                    request_id="",
                    validate_only=False,
                )
            )
    assert m.store.in_states({QUEUED, RUNNING}) == []
    m.store.close()
