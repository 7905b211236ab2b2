"""Jobs: validation and admission, a persistent job store, worker processes, events.

One mechanism for every kind of job (DESIGN.md "Service"): a job has a *kind* ("merge", "align",
"soup", "greedy_soup", "zoo", "train"; :mod:`service.jobs.kind`) and a spec; each kind contributes an
admission function and one worker function that calls the library and reports progress. Everything
else is here and shared (docs/service.md, "Crashes, restarts and shutdown"):

* **Store**: one SQLite file (WAL) under the server's data folder holds every job and every
  event of every job, so jobs, their progress history and watch resumption survive a restart.
* **Admission**: creating a job runs the kind's ``admit`` (references resolved through
  :class:`service.paths.RefResolver` - roots, symlinks, pickles - and checked from headers), so bad
  input fails the RPC with the right status code and nothing is written. The admission's memory
  estimate (+ a fixed worker overhead) is the job's claim: a job larger than the budget is refused,
  and a queued job starts only when the running jobs' claims leave room for it. The queue is
  bounded (RESOURCE_EXHAUSTED when full) and at most ``max_running`` jobs run at once; jobs with the
  same lock key (operations on one soup) run one at a time, in order.
* **Workers**: each job runs in its own process, forked from a ``forkserver`` that has already
  imported torch and the engine (a job starts in milliseconds, not seconds). A process per job
  makes cancellation (SIGTERM sets the job's cancel event; SIGKILL as a last resort), memory
  accounting and crash isolation simple. Workers hold an ``flock`` on their job folder while they
  live and die with the server (``PR_SET_PDEATHSIG`` through the forkserver), so a restarted server
  can tell when an orphan has gone.
* **Crash safety**: the library writes outputs atomically (``<out>.partial-<id>/`` renamed once,
  soups commit with one manifest rename, a metanet appears when training finished); on restart,
  jobs found RUNNING are reconciled: finished (a ``result.json`` of the attempt, or an output the
  kind recognises as complete) -> SUCCEEDED, otherwise INTERRUPTED after the kind's clean-up (zoo
  builds and trainings keep what they did, so a retry resumes). INTERRUPTED jobs are retried by
  ``RetryJob``/``RetryMergeJob`` or, with ``resume_interrupted``, automatically at start-up. A merge
  retry starts from the first tensor (the engine has no shard-level resume); merges are
  deterministic, so the bytes are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from merge.atomic import replaceable
from merge.errors import OutputExistsError
from service.jobs.kind import CANCELLED as CANCELLED_WHY
from service.jobs.kind import FAILED as FAILED_WHY
from service.jobs.kind import INTERRUPTED as INTERRUPTED_WHY
from service.jobs.kind import get_kind
from service.jobs.store import (
    ACTIVE,
    CANCELLED,
    FAILED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobEvent,
    JobRecord,
    JobStore,
    ServiceError,
)
from service.jobs.worker import worker_main, write_json_atomic
from service.paths import (
    JOB_SCHEME,
    UPLOAD_SCHEME,
    HubConfig,
    InvalidPathError,
    RefResolver,
    Roots,
    overlaps,
    redact_paths,
)

# ---------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------


@dataclass
class Submission:
    """A checked request of any kind, ready to be queued (:meth:`JobManager.submit`)."""

    kind: str
    spec: dict[str, Any]  # the normalized request, stored with the job and handed to the worker
    summary: str  # a few words for listings ("weight matching")
    output_path: Path
    overwrite: bool = False
    est_bytes: int = 0  # working memory beyond the fixed worker overhead
    progress: dict[str, Any] = field(default_factory=dict)  # the first progress report
    job_refs: dict[str, str] = field(default_factory=dict)  # job://<id> inputs -> their output folders
    serial_key: str | None = None  # what JobKind.serial_key will say of the job (checked at submission)
    #: what admission computed that the worker may reuse (a merge's plan): handed over in memory when
    #: the job starts in this server's life (WorkerContext.prepared), never stored
    prepared: Any = None


@dataclass
class JobManagerConfig:
    data_dir: Path
    roots: list[Path]
    max_running: int = 1
    max_queued: int = 16
    memory_budget: int = 4 << 30
    worker_overhead_bytes: int = 64 << 20  # measured: ~15 MB private per forked worker
    max_models: int = 32
    job_workers: int = 2
    job_threads: int = 1
    device: str = "cpu"
    hub: HubConfig = field(default_factory=lambda: HubConfig(enabled=False))
    resume_interrupted: bool = False
    kill_grace: float = 10.0
    delay_per_tensor: float = 0.0

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"


@dataclass
class _Running:
    job_id: str
    process: Any
    est_bytes: int
    interrupt: bool = False  # set by shutdown: the job ends INTERRUPTED, not CANCELLED
    outcome: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _left_behind(rec: JobRecord) -> str:
    """What an interrupted attempt leaves, for its error message."""
    retry = f"retry {rec.name}: weightsmith remote job retry, Client.retry_job or the RetryJob RPC"
    if get_kind(rec.kind).resumable:
        return f"what it did is kept ({retry} resumes it)"
    return f"no output was written ({retry})"


def _check_replaceable(out: Path, overwrite: bool, shown: str) -> None:
    """An existing output may be replaced only with ``overwrite`` and only if weightsmith wrote it
    (merge.atomic's rule); the message names the output as the caller sent it."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"output_path: '{shown}' already exists (set overwrite to replace it)")
    replaceable(out, "dir", shown=f"output_path: '{shown}'")


def _lock_free(lock_path: Path) -> bool:
    if not lock_path.exists():
        return True
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _wait_worker_gone(job_dir: Path, pid: int | None, grace: float) -> None:
    """Block until no process holds the job's lock; SIGTERM then SIGKILL the recorded worker."""
    lock = job_dir / "lock"
    if _lock_free(lock):
        return
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if _lock_free(lock):
                return
            time.sleep(0.05)
    raise RuntimeError(f"{job_dir}: a worker still holds the job lock; refusing to reconcile it")


class JobManager:
    """Owns the store, the queue and the worker processes. Runs on one asyncio loop."""

    def __init__(self, config: JobManagerConfig) -> None:
        self.config = config
        for d in (config.data_dir, config.uploads_dir, config.outputs_dir, config.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.roots = Roots(config.roots, [config.uploads_dir, config.outputs_dir])
        self.store = JobStore(config.data_dir / "jobs.sqlite3")
        self.accepting = True
        self._running: dict[str, _Running] = {}
        self._prepared: dict[str, Any] = {}  # job id -> Submission.prepared, until the job starts
        self._changed: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sched_lock: asyncio.Lock | None = None
        self._forkserver_ready: asyncio.Future[None] | None = None
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(
            ["service.jobs.worker", "service.jobs.manager", "merge.plan", "merge.execute", "merge.methods", "torch"]
        )

    # -- life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sched_lock = asyncio.Lock()
        await self._recover()
        # Start the forkserver (it imports torch once) in the background while the server comes up;
        # the first job's spawn waits for it if needed.
        from multiprocessing import forkserver

        self._forkserver_ready = asyncio.ensure_future(asyncio.to_thread(forkserver.ensure_running))
        await self._schedule()

    async def _recover(self) -> None:
        for stale in self.config.uploads_dir.glob(".tmp-*"):  # uploads cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        for rec in self.store.in_states({RUNNING}):
            job_dir = self.config.jobs_dir / rec.id
            await asyncio.to_thread(_wait_worker_gone, job_dir, rec.worker_pid, self.config.kill_grace)
            kind = get_kind(rec.kind)
            result = self._read_result(rec)
            if result is None:
                kind.cleanup(rec, INTERRUPTED_WHY)
                result = kind.recover(rec)
            else:
                kind.cleanup(rec, "finished")
            if result is not None:
                self._finish(rec.id, SUCCEEDED, result=result)
                continue
            msg = (
                f"the server stopped while attempt {rec.attempt} ran; {_left_behind(rec)}"
            )
            self._finish(
                rec.id,
                CANCELLED if rec.cancel_requested else INTERRUPTED,
                error=("CANCELLED" if rec.cancel_requested else "ABORTED", msg),
            )
        if self.config.resume_interrupted:
            for rec in self.store.in_states({INTERRUPTED}):
                self._requeue(rec)

    def _read_result(self, rec: JobRecord) -> dict[str, Any] | None:
        path = self.config.jobs_dir / rec.id / "result.json"
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if res.get("attempt") != rec.attempt or not Path(res.get("out_dir", "")).is_dir():
            return None
        return res

    async def shutdown(self, grace: float) -> None:
        """Stop taking jobs; let running jobs finish for ``grace`` s, then interrupt them."""
        self.accepting = False
        deadline = time.monotonic() + grace
        while self._running and time.monotonic() < deadline:
            waits = [asyncio.create_task(r.done.wait()) for r in self._running.values()]
            await asyncio.wait(
                waits, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            for w in waits:
                w.cancel()
        for r in list(self._running.values()):
            r.interrupt = True
            self._signal(r, signal.SIGTERM)
        if self._running:
            waits = [asyncio.create_task(r.done.wait()) for r in self._running.values()]
            _, pending = await asyncio.wait(waits, timeout=self.config.kill_grace)
            for r in list(self._running.values()):
                self._signal(r, signal.SIGKILL)
            for w in pending:
                w.cancel()
            if self._running:
                waits = [asyncio.create_task(r.done.wait()) for r in self._running.values()]
                await asyncio.wait(waits, timeout=10)
        for ev in self._changed.values():
            ev.set()

    def close(self) -> None:
        self.store.close()

    # -- helpers ------------------------------------------------------------------------------------
    def _notify(self, job_id: str) -> None:
        ev = self._changed.pop(job_id, None)
        if ev is not None:
            ev.set()

    def _event(self, job_id: str, state: str, progress: dict[str, Any], **fields: Any) -> JobEvent:
        ev = self.store.append_event(job_id, state, progress, **fields)
        self._notify(job_id)
        return ev

    def _finish(
        self,
        job_id: str,
        state: str,
        *,
        result: dict[str, Any] | None = None,
        error: tuple[str, str] | None = None,
    ) -> None:
        self._prepared.pop(job_id, None)
        rec = self.store.get(job_id)
        assert rec is not None
        progress = dict(rec.progress)
        if state == SUCCEEDED:
            progress.update(
                phase="done",
                tensors_done=progress.get("tensors_total", 0),
                bytes_done=progress.get("bytes_total", 0),
            )
        self._event(
            job_id,
            state,
            progress,
            end_time=time.time(),
            worker_pid=None,
            result=result,
            error_code=error[0] if error else None,
            error_message=self.redact(error[1]) if error else None,
        )

    def _requeue(self, rec: JobRecord) -> None:
        self._event(
            rec.id,
            QUEUED,
            {"phase": "queued"},
            attempt=rec.attempt + 1,
            start_time=None,
            end_time=None,
            error_code=None,
            error_message=None,
            result=None,
            cancel_requested=False,
        )

    def get(self, job_id: str, kind: str | None = None) -> JobRecord:
        """The job ``jobs/<id>`` (or ``<id>``); NOT_FOUND when unknown or, with ``kind``, of another kind."""
        jid = job_id.removeprefix("jobs/")
        rec = self.store.get(jid) if jid else None
        if rec is None or (kind is not None and rec.kind != kind):
            raise ServiceError("NOT_FOUND", f"job '{job_id}' not found", "name")
        return rec

    def job_output(self, job_id: str) -> Path | None:
        rec = self.store.get(job_id)
        if rec is None or rec.state != SUCCEEDED:
            return None
        return Path(rec.output_path)

    def redact(self, message: str, sent: Sequence[str] = ()) -> str:
        """An error message as a caller may see it: no path outside the roots (paths.redact_paths);
        uploads and default outputs named by their references."""
        return redact_paths(
            message,
            keep=self.roots.roots,
            sent=sent,
            aliases=[
                (self.config.uploads_dir.resolve(), UPLOAD_SCHEME),
                (self.config.outputs_dir.resolve(), JOB_SCHEME),
            ],
        )

    def confine_path(self, value: str, field_name: str) -> str:
        """A file or folder a request names (a method's ``FilePath`` parameter...), inside the roots:
        PERMISSION_DENIED outside them, NOT_FOUND when missing (the engine's ``path_resolver``)."""
        return str(self.roots.resolve_input(value, field_name))

    def resolver(self) -> RefResolver:
        return RefResolver(
            self.roots, self.config.uploads_dir, job_output=self.job_output, hub=self.config.hub
        )

    # -- create (the shared half of every Create RPC; each kind's admit does the rest) ------------
    def previous_request(self, request_id: str, request: Any) -> tuple[JobRecord | None, str]:
        """Idempotency: the job an earlier request with this ``request_id`` created (None if none) and
        the request's hash; ALREADY_EXISTS when the id was used for a different request."""
        req_hash = hashlib.sha256(
            json.dumps(request, sort_keys=True, separators=(",", ":"), default=str).encode()
        ).hexdigest()
        if not request_id:
            return None, req_hash
        if len(request_id) > 200:
            raise ServiceError("INVALID_ARGUMENT", "request_id: longer than 200 characters", "request_id")
        prev = self.store.by_request_id(request_id)
        if prev is not None and prev.request_hash != req_hash:
            raise ServiceError(
                "ALREADY_EXISTS",
                f"request_id '{request_id}' was used by {prev.name} for a different request",
                "request_id",
            )
        return prev, req_hash

    def output_folder(
        self,
        output_path: str,
        overwrite: bool,
        job_id: str,
        inputs: list[Path],
        serial_key: str | None = None,
        *,
        resumes: bool = False,
        check_replaceable: bool = True,
    ) -> Path:
        """The folder a new job writes: inside a root (or ``data-dir/outputs/<job>``), not existing
        unless ``overwrite`` (and then only a previous weightsmith output: merge.atomic), overlapping no
        input and no other active job's output. ``resumes``: the kind resumes an existing folder of its
        own and checks it itself (zoo builds). ``check_replaceable=False``: only the checks that need no
        inputs (a kind calls it again once it knows them: a merge, after planning)."""
        if not self.accepting:
            raise ServiceError("UNAVAILABLE", "the server is shutting down and takes no new jobs")
        if output_path:
            out = self.roots.resolve_output(output_path, "output_path")
            if overlaps(out, self.config.data_dir.resolve()):
                raise InvalidPathError(f"output_path: {out} is inside the server's data folder")
        else:
            out = self.config.outputs_dir / job_id
        if not overwrite:  # the plain refusal first, as before; the overwrite rule after the overlap checks
            _check_replaceable(out, overwrite, output_path or job_id)
        if not check_replaceable:
            self._check_output_free(out, serial_key=serial_key)
            return out
        for p in inputs:
            if overlaps(Path(p).resolve(), out):
                raise InvalidPathError(f"output_path: {out} overlaps input {p}")
        if not resumes:
            _check_replaceable(out, overwrite, output_path or job_id)
        self._check_output_free(out, serial_key=serial_key)
        return out

    def claim(self, sub: Submission) -> int:
        """Memory admission: the bytes ``sub`` claims (its estimate + a worker's overhead);
        RESOURCE_EXHAUSTED when more than the budget."""
        est = self.config.worker_overhead_bytes + int(sub.est_bytes)
        if est > self.config.memory_budget:
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"the {sub.kind} job needs about {est:,} bytes of memory, more than this server's budget "
                f"of {self.config.memory_budget:,} bytes",
            )
        return est

    def _admit(self, request_id: str) -> JobRecord | None:
        """Queue room and shutdown checks of every Create RPC; a concurrent twin's job if it won meanwhile."""
        if self.store.count(QUEUED) >= self.config.max_queued:
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"the job queue is full ({self.config.max_queued} queued jobs); retry later",
            )
        if not self.accepting:
            raise ServiceError("UNAVAILABLE", "the server is shutting down and takes no new jobs")
        return self.store.by_request_id(request_id) if request_id else None

    async def submit(self, job_id: str, sub: Submission, request_id: str, request_hash: str) -> JobRecord:
        """Queue a checked job of any kind (the shared half of every Create RPC)."""
        est = self.claim(sub)
        prev = self._admit(request_id)
        if prev is not None:
            return prev
        self._check_output_free(sub.output_path, serial_key=sub.serial_key)  # again: admission awaited
        rec = JobRecord(
            id=job_id,
            kind=sub.kind,
            summary=sub.summary,
            spec=sub.spec,
            output_path=str(sub.output_path),
            overwrite=sub.overwrite,
            request_id=request_id,
            request_hash=request_hash,
            est_bytes=est,
            progress={"phase": "queued", **sub.progress},
            job_refs=sub.job_refs,
        )
        (self.config.jobs_dir / job_id).mkdir(parents=True, exist_ok=False)
        self.store.insert(rec)
        if sub.prepared is not None:
            self._prepared[job_id] = sub.prepared
        self._event(job_id, QUEUED, rec.progress)
        await self._schedule()
        return self.get(job_id)

    def _check_output_free(self, out: Path, exclude: str | None = None, serial_key: str | None = None) -> None:
        """No other active job writes where ``out`` is, but jobs with the same ``serial_key`` (they run one
        after the other, in order: operations on one soup)."""
        for other in self.store.in_states(ACTIVE):
            if serial_key is not None and get_kind(other.kind).serial_key(other) == serial_key:
                continue
            if other.id != exclude and overlaps(Path(other.output_path), out):
                raise ServiceError(
                    "ALREADY_EXISTS",
                    f"output_path: {out} overlaps the output of {other.name}, which is {other.state.lower()}",
                    "output_path",
                )

    # -- scheduling ---------------------------------------------------------------------------------
    async def _schedule(self) -> None:
        assert self._sched_lock is not None
        async with self._sched_lock:
            while self.accepting and len(self._running) < self.config.max_running:
                queued = self.store.in_states({QUEUED})
                if not queued:
                    return
                rec = queued[0]
                key = get_kind(rec.kind).serial_key(rec)
                if key is not None and any(
                    (o := self.store.get(jid)) is not None and get_kind(o.kind).serial_key(o) == key
                    for jid in self._running
                ):
                    return  # first in, first out: it waits for the job before it on the same resource
                used = sum(r.est_bytes for r in self._running.values())
                if self._running and used + rec.est_bytes > self.config.memory_budget:
                    return
                await self._start(rec)

    async def _start(self, rec: JobRecord) -> None:
        cfg = self.config
        job_dir = cfg.jobs_dir / rec.id
        job_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (job_dir / "result.json").unlink()
        spec = {
            "job_id": rec.id,
            "attempt": rec.attempt,
            "job_dir": str(job_dir),
            "kind": rec.kind,
            "data_dir": str(cfg.data_dir),
            "job": {
                "output_path": rec.output_path,
                "overwrite": rec.overwrite,
                "spec": rec.spec,
            },
            "roots": [str(p) for p in self.roots.roots],
            "extra_roots": [str(p) for p in self.roots.extra],
            "uploads_dir": str(cfg.uploads_dir),
            "job_refs": rec.job_refs,
            "hub": asdict(cfg.hub),
            "device": cfg.device,
            "threads": cfg.job_threads,
            "delay_per_tensor": cfg.delay_per_tensor,
        }
        write_json_atomic(
            job_dir / "spec.json", {**spec, "hub": {**spec["hub"], "token": None}}
        )  # for humans
        spec["prepared"] = self._prepared.pop(rec.id, None)
        self._event(
            rec.id,
            RUNNING,
            {**rec.progress, "phase": "starting"},
            start_time=time.time(),
            end_time=None,
            worker_pid=None,
        )
        run = _Running(rec.id, None, rec.est_bytes)
        self._running[rec.id] = run
        try:
            if self._forkserver_ready is not None:
                await self._forkserver_ready
            proc, conn = await asyncio.to_thread(self._spawn, spec)
        except Exception as e:  # noqa: BLE001 - e.g. the forkserver could not start
            del self._running[rec.id]
            run.done.set()
            self._finish(rec.id, FAILED, error=("INTERNAL", f"could not start a worker process: {e}"))
            return
        run.process = proc
        self.store.update(rec.id, worker_pid=proc.pid)
        if self.store.get(rec.id).cancel_requested:  # type: ignore[union-attr]
            self._signal(run, signal.SIGTERM)
        threading.Thread(
            target=self._reader, args=(rec.id, proc, conn), daemon=True, name=f"job-{rec.id[:8]}"
        ).start()

    def _spawn(self, spec: dict[str, Any]) -> tuple[Any, Connection]:
        r, w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main, args=(spec, w), name=f"weightsmith-job-{spec['job_id'][:8]}", daemon=False
        )
        proc.start()
        w.close()
        return proc, r

    def _reader(self, job_id: str, proc: Any, conn: Connection) -> None:
        """Thread: forward the worker's messages to the loop, then report its exit."""
        assert self._loop is not None
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - a garbled message; keep reading
                continue
            self._loop.call_soon_threadsafe(self._on_message, job_id, msg)
        conn.close()
        proc.join()
        self._loop.call_soon_threadsafe(self._on_exit, job_id, proc.exitcode)

    def _on_message(self, job_id: str, msg: dict[str, Any]) -> None:
        run = self._running.get(job_id)
        if run is None:
            return
        kind = msg.get("type")
        if kind == "progress":
            p = msg["progress"]
            self._event(job_id, RUNNING, p)
        elif kind in ("result", "error", "cancelled"):
            run.outcome = msg

    def _on_exit(self, job_id: str, exitcode: int | None) -> None:
        run = self._running.pop(job_id, None)
        if run is None:
            return
        rec = self.store.get(job_id)
        assert rec is not None
        out = run.outcome or {}
        kind = out.get("type")
        if kind == "result":
            self._finish(job_id, SUCCEEDED, result=out["result"])
        else:
            if kind != "error" and run.interrupt:
                why = INTERRUPTED_WHY
            elif kind != "error" and (rec.cancel_requested or kind == "cancelled"):
                why = CANCELLED_WHY
            else:
                why = FAILED_WHY
            get_kind(rec.kind).cleanup(rec, why)
            if kind == "error":
                self._finish(job_id, FAILED, error=(out["code"], out["message"]))
            elif run.interrupt:
                self._finish(
                    job_id,
                    INTERRUPTED,
                    error=(
                        "ABORTED",
                        f"the server shut down before attempt {rec.attempt} finished; {_left_behind(rec)}",
                    ),
                )
            elif rec.cancel_requested or kind == "cancelled":
                kept = "what it did is kept" if get_kind(rec.kind).resumable else "no output was written"
                self._finish(job_id, CANCELLED, error=("CANCELLED", f"the job was cancelled; {kept}"))
            else:
                how = (
                    f"signal {-exitcode}"
                    if exitcode is not None and exitcode < 0
                    else f"exit code {exitcode}"
                )
                self._finish(
                    job_id,
                    FAILED,
                    error=(
                        "ABORTED",
                        f"the {rec.kind} worker died ({how}; out of memory?); {_left_behind(rec)}",
                    ),
                )
        run.done.set()
        if self._loop is not None and self.accepting:
            self._loop.create_task(self._schedule())

    def _signal(self, run: _Running, sig: int) -> None:
        if run.process is not None and run.process.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(run.process.pid, sig)

    # -- cancel / retry -----------------------------------------------------------------------------
    async def cancel(self, job_id: str, kind: str | None = None) -> JobRecord:
        rec = self.get(job_id, kind)
        if rec.state in TERMINAL:
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"{rec.name} already ended ({rec.state.lower()}); nothing to cancel",
                "name",
            )
        if rec.state in (QUEUED, INTERRUPTED):
            self._finish(rec.id, CANCELLED, error=("CANCELLED", "the job was cancelled before it ran"))
        elif rec.state == RUNNING and not rec.cancel_requested:
            self._event(rec.id, RUNNING, rec.progress, cancel_requested=True)
            run = self._running.get(rec.id)
            if run is not None:
                self._signal(run, signal.SIGTERM)
                assert self._loop is not None
                self._loop.create_task(self._kill_later(run))
        return self.get(rec.id)

    async def _kill_later(self, run: _Running) -> None:
        try:
            await asyncio.wait_for(run.done.wait(), self.config.kill_grace)
        except TimeoutError:
            self._signal(run, signal.SIGKILL)

    async def retry(self, job_id: str, kind: str | None = None) -> JobRecord:
        rec = self.get(job_id, kind)
        if rec.state not in (INTERRUPTED, FAILED):
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"{rec.name} is {rec.state.lower()}; only interrupted or failed jobs can be retried",
                "name",
            )
        if not self.accepting:
            raise ServiceError("UNAVAILABLE", "the server is shutting down and takes no new jobs")
        out = Path(rec.output_path)
        if out.exists() and not rec.overwrite and not get_kind(rec.kind).resumable:
            raise OutputExistsError(f"output_path: {out} exists now; cannot retry {rec.name}")
        self._check_output_free(out, exclude=rec.id, serial_key=get_kind(rec.kind).serial_key(rec))
        if self.store.count(QUEUED) >= self.config.max_queued:
            raise ServiceError(
                "RESOURCE_EXHAUSTED", f"the job queue is full ({self.config.max_queued} queued jobs)"
            )
        self._requeue(rec)
        await self._schedule()
        return self.get(rec.id)

    # -- list / watch -------------------------------------------------------------------------------
    def list(
        self, states: list[str], page_size: int, page_token: str, kinds: list[str] | None = None
    ) -> tuple[list[JobRecord], str]:
        size = min(max(page_size or 50, 1), 1000)
        before = None
        if page_token:
            try:
                before = int(page_token)
            except ValueError:
                raise ServiceError(
                    "INVALID_ARGUMENT", "page_token: not a token this server issued", "page_token"
                ) from None
        recs = self.store.page(states, size + 1, before, kinds)
        more = len(recs) > size
        recs = recs[:size]
        return recs, (str(recs[-1].rowid) if more and recs else "")

    async def watch(
        self, job_id: str, from_sequence: int, kind: str | None = None
    ) -> AsyncIterator[tuple[JobEvent, JobRecord]]:
        rec = self.get(job_id, kind)
        seq = max(0, from_sequence)
        while True:
            events = self.store.events_after(rec.id, seq)
            current = self.store.get(rec.id)
            assert current is not None
            for ev in events:
                yield ev, current
                seq = ev.seq
                if ev.state in TERMINAL:
                    return
            if events:
                continue
            if current.state in TERMINAL and seq >= current.last_seq:
                return
            if not self.accepting and current.state != RUNNING:
                return
            waiter = self._changed.setdefault(rec.id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), timeout=5.0)

    # -- stats ----------------------------------------------------------------------------------------
    @property
    def running_ids(self) -> list[str]:
        return list(self._running)


__all__ = [
    "ACTIVE",
    "CANCELLED",
    "FAILED",
    "INTERRUPTED",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "TERMINAL",
    "JobEvent",
    "JobManager",
    "JobManagerConfig",
    "JobRecord",
    "JobStore",
    "ServiceError",
    "worker_main",
]
