"""Jobs: validation and admission, a persistent job store, worker processes, events.

One mechanism for every kind of job (DESIGN.md "Service"): a job has a *kind* ("merge", "align",
"soup", "greedy_soup", "zoo", "train"; :mod:`service.jobs.kind`) and a spec; each kind contributes an
admission function and one worker function that calls the library and reports progress. Everything
else is here and shared (ecosystem notes §1.6, §1.11, §5.4-§5.7):

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
import ctypes
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

from merge.atomic import replaceable
from merge.errors import MergeCancelled, OutputExistsError, WeightsmithError
from service.jobs.kind import CANCELLED as CANCELLED_WHY
from service.jobs.kind import FAILED as FAILED_WHY
from service.jobs.kind import INTERRUPTED as INTERRUPTED_WHY
from service.jobs.kind import get_kind
from service.paths import (
    JOB_SCHEME,
    UPLOAD_SCHEME,
    HubConfig,
    HubDisabledError,
    InvalidPathError,
    RefResolver,
    Roots,
    overlaps,
    redact_paths,
)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "INTERRUPTED",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({QUEUED, RUNNING, INTERRUPTED})
COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")
MAX_RECIPE_BYTES = 1 << 20
SCHEMA_VERSION = 2


class ServiceError(WeightsmithError):
    """A refusal decided by the service itself, with its gRPC code and the offending field."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.grpc_code = code
        self.field = field


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass
class JobRecord:
    id: str
    rowid: int
    state: str
    recipe_yaml: str
    method: str
    output_path: str
    overwrite: bool
    options: dict[str, Any]
    request_id: str
    request_hash: str
    est_bytes: int
    attempt: int
    cancel_requested: bool
    worker_pid: int | None
    create_time: float
    start_time: float | None
    end_time: float | None
    progress: dict[str, Any]
    error_code: str | None
    error_message: str | None
    result: dict[str, Any] | None
    job_refs: dict[str, str]
    last_seq: int
    kind: str = "merge"  # service.jobs.kind: what the worker runs
    spec: dict[str, Any] = field(default_factory=dict)  # the kind's normalized request (not merges)

    @property
    def name(self) -> str:
        return f"jobs/{self.id}"


@dataclass
class JobEvent:
    job_id: str
    seq: int
    time: float
    state: str
    progress: dict[str, Any]


_COLUMNS = (
    "id",
    "state",
    "recipe_yaml",
    "method",
    "output_path",
    "overwrite",
    "options_json",
    "request_id",
    "request_hash",
    "est_bytes",
    "attempt",
    "cancel_requested",
    "worker_pid",
    "create_time",
    "start_time",
    "end_time",
    "progress_json",
    "error_code",
    "error_message",
    "result_json",
    "job_refs_json",
    "last_seq",
    "kind",
    "spec_json",
)


def _locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper


class JobStore:
    """SQLite persistence of jobs and their event logs.

    One connection, used mostly from the event-loop thread; planning threads read job outputs
    through it too, so every method holds a lock (a transaction never interleaves with a read).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self.db.executescript(
                """
                CREATE TABLE IF NOT EXISTS jobs (
                  rowid INTEGER PRIMARY KEY AUTOINCREMENT,
                  id TEXT NOT NULL UNIQUE,
                  state TEXT NOT NULL,
                  recipe_yaml TEXT NOT NULL,
                  method TEXT NOT NULL,
                  output_path TEXT NOT NULL,
                  overwrite INTEGER NOT NULL,
                  options_json TEXT NOT NULL,
                  request_id TEXT,
                  request_hash TEXT NOT NULL,
                  est_bytes INTEGER NOT NULL,
                  attempt INTEGER NOT NULL,
                  cancel_requested INTEGER NOT NULL DEFAULT 0,
                  worker_pid INTEGER,
                  create_time REAL NOT NULL,
                  start_time REAL,
                  end_time REAL,
                  progress_json TEXT NOT NULL,
                  error_code TEXT,
                  error_message TEXT,
                  result_json TEXT,
                  job_refs_json TEXT NOT NULL,
                  last_seq INTEGER NOT NULL DEFAULT 0
                );
                CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs(request_id)
                  WHERE request_id IS NOT NULL;
                CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
                CREATE TABLE IF NOT EXISTS events (
                  job_id TEXT NOT NULL REFERENCES jobs(id),
                  seq INTEGER NOT NULL,
                  time REAL NOT NULL,
                  state TEXT NOT NULL,
                  progress_json TEXT NOT NULL,
                  PRIMARY KEY (job_id, seq)
                );
                """
            )
            self.db.execute("PRAGMA user_version=1")
            version = 1
        if version == 1:  # v2: jobs of every kind (v1 stores held merge jobs only)
            self.db.executescript(
                """
                ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'merge';
                ALTER TABLE jobs ADD COLUMN spec_json TEXT NOT NULL DEFAULT '{}';
                CREATE INDEX IF NOT EXISTS jobs_kind ON jobs(kind);
                """
            )
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise RuntimeError(
                f"{path}: job store schema version {version}, this server knows {SCHEMA_VERSION}"
            )

    @_locked
    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"],
            rowid=row["rowid"],
            state=row["state"],
            recipe_yaml=row["recipe_yaml"],
            method=row["method"],
            output_path=row["output_path"],
            overwrite=bool(row["overwrite"]),
            options=json.loads(row["options_json"]),
            request_id=row["request_id"] or "",
            request_hash=row["request_hash"],
            est_bytes=row["est_bytes"],
            attempt=row["attempt"],
            cancel_requested=bool(row["cancel_requested"]),
            worker_pid=row["worker_pid"],
            create_time=row["create_time"],
            start_time=row["start_time"],
            end_time=row["end_time"],
            progress=json.loads(row["progress_json"]),
            error_code=row["error_code"],
            error_message=row["error_message"],
            result=json.loads(row["result_json"]) if row["result_json"] else None,
            job_refs=json.loads(row["job_refs_json"]),
            last_seq=row["last_seq"],
            kind=row["kind"],
            spec=json.loads(row["spec_json"]),
        )

    @_locked
    def insert(self, rec: JobRecord) -> JobRecord:
        vals = {
            "id": rec.id,
            "state": rec.state,
            "recipe_yaml": rec.recipe_yaml,
            "method": rec.method,
            "output_path": rec.output_path,
            "overwrite": int(rec.overwrite),
            "options_json": json.dumps(rec.options),
            "request_id": rec.request_id or None,
            "request_hash": rec.request_hash,
            "est_bytes": rec.est_bytes,
            "attempt": rec.attempt,
            "cancel_requested": 0,
            "worker_pid": None,
            "create_time": rec.create_time,
            "start_time": None,
            "end_time": None,
            "progress_json": json.dumps(rec.progress),
            "error_code": None,
            "error_message": None,
            "result_json": None,
            "job_refs_json": json.dumps(rec.job_refs),
            "last_seq": 0,
            "kind": rec.kind,
            "spec_json": json.dumps(rec.spec),
        }
        self.db.execute(
            f"INSERT INTO jobs ({', '.join(vals)}) VALUES ({', '.join('?' * len(vals))})",
            tuple(vals.values()),
        )
        got = self.get(rec.id)
        assert got is not None
        return got

    @_locked
    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._record(row) if row else None

    @_locked
    def by_request_id(self, request_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        return self._record(row) if row else None

    @_locked
    def in_states(self, states: frozenset[str] | set[str]) -> list[JobRecord]:
        q = f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(states))}) ORDER BY rowid"
        return [self._record(r) for r in self.db.execute(q, tuple(states))]

    @_locked
    def count(self, state: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0])

    @_locked
    def page(
        self, states: list[str], page_size: int, before_rowid: int | None, kinds: list[str] | None = None
    ) -> list[JobRecord]:
        where, args = [], []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        if kinds:
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            args += kinds
        if before_rowid is not None:
            where.append("rowid < ?")
            args.append(before_rowid)
        q = (
            "SELECT * FROM jobs"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY rowid DESC LIMIT ?"
        )
        return [self._record(r) for r in self.db.execute(q, (*args, page_size))]

    @_locked
    def update(self, job_id: str, **fields: Any) -> None:
        cols = []
        vals = []
        for k, v in fields.items():
            if k in ("progress", "result", "options", "spec"):
                k, v = f"{k}_json", (json.dumps(v) if v is not None else None)
            elif isinstance(v, bool):
                v = int(v)
            assert k in _COLUMNS, k
            cols.append(f"{k} = ?")
            vals.append(v)
        self.db.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", (*vals, job_id))

    @_locked
    def append_event(self, job_id: str, state: str, progress: dict[str, Any], **fields: Any) -> JobEvent:
        """Update the job and log an event, atomically; returns the event."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            seq = int(self.db.execute("SELECT last_seq FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]) + 1
            self.db.execute(
                "INSERT INTO events (job_id, seq, time, state, progress_json) VALUES (?, ?, ?, ?, ?)",
                (job_id, seq, now, state, json.dumps(progress)),
            )
            self.update(job_id, state=state, progress=progress, last_seq=seq, **fields)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return JobEvent(job_id, seq, now, state, progress)

    @_locked
    def events_after(self, job_id: str, seq: int, limit: int = 500) -> list[JobEvent]:
        rows = self.db.execute(
            "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, seq, limit)
        )
        return [
            JobEvent(r["job_id"], r["seq"], r["time"], r["state"], json.loads(r["progress_json"]))
            for r in rows
        ]


# ---------------------------------------------------------------------------------------------
# Recipe loading (server side: no file paths, no YAML aliases, bounded size)
# ---------------------------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases (no "billion laughs" blow-up in validation)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"YAML aliases are not allowed in a recipe (line {event.start_mark.line + 1})"
            )
        return super().compose_node(parent, index)


def parse_recipe_text(text: str) -> dict[str, Any]:
    """YAML text -> dict, for the service (never read as a file path)."""
    if len(text.encode()) > MAX_RECIPE_BYTES:
        raise ServiceError("INVALID_ARGUMENT", f"recipe: larger than {MAX_RECIPE_BYTES} bytes", "recipe_yaml")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ServiceError("INVALID_ARGUMENT", f"recipe: not valid YAML: {e}", "recipe_yaml") from None
    if not isinstance(data, dict):
        raise ServiceError("INVALID_ARGUMENT", "recipe: a recipe must be a YAML mapping", "recipe_yaml")
    return data


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# ---------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent (the forkserver) dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _release_forkserver() -> None:
    """Close this child's copy of the forkserver's "alive" pipe, so that the forkserver (and with
    it, through PR_SET_PDEATHSIG, this worker) notices when the server dies."""
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver

        fd = forkserver._forkserver._forkserver_alive_fd  # noqa: SLF001 - no public API for this
        if fd is not None:
            os.close(fd)
            forkserver._forkserver._forkserver_alive_fd = None  # noqa: SLF001


def _watch_server(conn: Connection, cancel: threading.Event) -> None:
    """Thread: the server holds the other end of ``conn``; when it goes away (crash, SIGKILL),
    the pipe reports POLLERR and the merge is cancelled at the next tensor (no output)."""
    import select

    poller = select.poll()
    poller.register(conn.fileno(), select.POLLERR | select.POLLHUP)
    while not poller.poll():
        pass
    cancel.set()


def worker_main(spec: dict[str, Any], conn: Connection) -> None:
    """Entry point of a job's worker process: run one job of its kind, report over ``conn``, exit."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(3)
    _release_forkserver()
    job_dir = Path(spec["job_dir"])
    log = os.open(job_dir / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    lock_fd = os.open(job_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # held until this process exits
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    signal.signal(signal.SIGINT, lambda *_: cancel.set())
    threading.Thread(target=_watch_server, args=(conn, cancel), daemon=True, name="watch-server").start()
    send_lock = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        with send_lock:
            with contextlib.suppress(OSError, ValueError):
                conn.send(msg)

    code = 0
    try:
        import torch

        from service.jobs.kind import WorkerContext, get_kind

        torch.set_num_threads(max(1, int(spec.get("threads", 1))))
        roots = Roots(spec["roots"], spec["extra_roots"])
        job_refs = {k: Path(v) for k, v in spec["job_refs"].items()}
        resolver = RefResolver(
            roots, Path(spec["uploads_dir"]), job_output=job_refs.get, hub=HubConfig(**spec["hub"])
        )
        job = spec["job"]
        ctx = WorkerContext(
            job_id=spec["job_id"],
            attempt=int(spec["attempt"]),
            job_dir=job_dir,
            data_dir=Path(spec["data_dir"]),
            output_path=Path(job["output_path"]) if job["output_path"] else None,
            overwrite=bool(job["overwrite"]),
            spec=job["spec"],
            recipe_yaml=job["recipe_yaml"],
            options=job["options"],
            resolver=resolver,
            roots=roots,
            device=spec.get("device", "cpu"),
            threads=max(1, int(spec.get("threads", 1))),
            delay=float(spec.get("delay_per_tensor", 0.0)),
            cancel=cancel,
            send=send,
        )
        out = get_kind(spec["kind"]).run(ctx)
        out["attempt"] = spec["attempt"]
        write_json_atomic(job_dir / "result.json", out)
        send({"type": "result", "result": out})
    except MergeCancelled as e:
        send({"type": "cancelled", "message": str(e)})
        code = 4
    except WeightsmithError as e:
        send({"type": "error", "code": getattr(e, "grpc_code", "INVALID_ARGUMENT"), "message": str(e)})
        code = 3
    except BaseException as e:  # noqa: BLE001 - report, never leak a traceback to the client
        import traceback

        traceback.print_exc()
        send(
            {
                "type": "error",
                "code": "INTERNAL",
                "message": f"internal error in the job's worker ({type(e).__name__}); "
                "see the job's worker.log",
            }
        )
        code = 5
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------


@dataclass
class Submission:
    """A checked request of a kind other than "merge", ready to be queued (:meth:`JobManager.submit`)."""

    kind: str
    spec: dict[str, Any]  # the normalized request, stored with the job and handed to the worker
    summary: str  # a few words for listings ("weight matching")
    output_path: Path
    overwrite: bool = False
    est_bytes: int = 0  # working memory beyond the fixed worker overhead
    progress: dict[str, Any] = field(default_factory=dict)  # the first progress report
    job_refs: dict[str, str] = field(default_factory=dict)  # job://<id> inputs -> their output folders
    serial_key: str | None = None  # what JobKind.serial_key will say of the job (checked at submission)


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
    retry = "RetryMergeJob" if rec.kind == "merge" else "JobService.RetryJob"
    if get_kind(rec.kind).resumable:
        return f"what it did is kept (retry the job with {retry} to resume)"
    return f"no output was written (retry the job with {retry})"


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
        self._changed: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sched_lock: asyncio.Lock | None = None
        self._forkserver_ready: asyncio.Future[None] | None = None
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["service.jobs.manager", "merge.engine", "merge.methods", "torch"])

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

    # -- create -------------------------------------------------------------------------------------
    async def create(
        self,
        *,
        recipe: dict[str, Any],
        output_path: str,
        overwrite: bool,
        options: dict[str, Any],
        request_id: str,
        validate_only: bool,
    ) -> tuple[JobRecord | None, dict[str, Any] | None]:
        if not self.accepting:
            raise ServiceError("UNAVAILABLE", "the server is shutting down and takes no new jobs")
        options = self._check_options(options)
        req_hash = hashlib.sha256(
            _canonical(
                {"recipe": recipe, "output_path": output_path, "overwrite": overwrite, "options": options}
            ).encode()
        ).hexdigest()
        if request_id and not validate_only:
            if len(request_id) > 200:
                raise ServiceError("INVALID_ARGUMENT", "request_id: longer than 200 characters", "request_id")
            prev = self.store.by_request_id(request_id)
            if prev is not None:
                if prev.request_hash != req_hash:
                    raise ServiceError(
                        "ALREADY_EXISTS",
                        f"request_id '{request_id}' was used by {prev.name} for a different request",
                        "request_id",
                    )
                return prev, None
        from merge.recipe import load_recipe

        r = load_recipe(recipe)
        refs = r.model_refs()
        if len(refs) > self.config.max_models:
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"recipe: {len(refs)} models, more than this server's limit of {self.config.max_models}",
                "recipe",
            )
        resolver = self.resolver()
        kinds = {ref: resolver.kind(ref) for ref in refs}
        for ref, kind in kinds.items():
            if kind == "hub" and not self.config.hub.enabled:
                raise HubDisabledError(
                    f"model '{ref}': Hub references are disabled on this server "
                    "(start it with --hub), and no such path exists under its roots"
                )
        job_id = uuid.uuid4().hex
        if output_path:
            out = self.roots.resolve_output(output_path, "output_path")
        else:
            out = self.config.outputs_dir / job_id
        if output_path and overlaps(out, self.config.data_dir.resolve()):
            raise InvalidPathError(f"output_path: {out} is inside the server's data folder")
        if not overwrite:  # a plain refusal before planning; the overwrite rule after the overlap checks
            _check_replaceable(out, overwrite, output_path or job_id)
        self._check_output_free(out)
        plan_summary: dict[str, Any] | None = None
        est = self.config.worker_overhead_bytes
        job_refs: dict[str, str] = {}
        for ref, kind in kinds.items():
            if kind == "job":
                res = resolver(ref)
                job_refs[ref[len(JOB_SCHEME) :]] = str(res.path)
        if "hub" not in kinds.values():
            plan = await asyncio.to_thread(self._plan, r, options, resolver)
            for m in plan.models:
                if overlaps(Path(m.path).resolve(), out):
                    raise InvalidPathError(f"output_path: {out} overlaps input model '{m.ref}' ({m.path})")
            plan_summary = plan.summary()
            est += int(plan.peak_bytes_estimate)
        else:
            for ref, kind in kinds.items():
                if kind != "hub":
                    res = resolver(ref)
                    if overlaps(Path(res.path), out):
                        raise InvalidPathError(
                            f"output_path: {out} overlaps input model '{ref}' ({res.path})"
                        )
        _check_replaceable(out, overwrite, output_path or job_id)
        self._check_budget(est, "the merge")
        if validate_only:
            return None, plan_summary
        prev = self._admit(request_id)
        if prev is not None:
            return prev, plan_summary
        self._check_output_free(out)  # again: planning awaited, another request may have taken it
        rec = JobRecord(
            id=job_id,
            rowid=0,
            state=QUEUED,
            recipe_yaml=r.to_yaml(),
            method=r.merge_method,
            output_path=str(out),
            overwrite=overwrite,
            options=options,
            request_id=request_id,
            request_hash=req_hash,
            est_bytes=est,
            attempt=1,
            cancel_requested=False,
            worker_pid=None,
            create_time=time.time(),
            start_time=None,
            end_time=None,
            progress={
                "phase": "queued",
                **(
                    {"tensors_total": plan_summary["n_tensors"], "bytes_total": plan_summary["bytes_out"]}
                    if plan_summary
                    else {}
                ),
            },
            error_code=None,
            error_message=None,
            result=None,
            job_refs=job_refs,
            last_seq=0,
        )
        (self.config.jobs_dir / job_id).mkdir(parents=True, exist_ok=False)
        self.store.insert(rec)
        self._event(job_id, QUEUED, rec.progress)
        await self._schedule()
        return self.get(job_id), plan_summary

    def previous_request(self, request_id: str, request: Any) -> tuple[JobRecord | None, str]:
        """Idempotency: the job an earlier request with this ``request_id`` created (None if none) and
        the request's hash; ALREADY_EXISTS when the id was used for a different request."""
        req_hash = hashlib.sha256(_canonical(request).encode()).hexdigest()
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
    ) -> Path:
        """The folder a new job writes: inside a root (or ``data-dir/outputs/<job>``), not existing
        unless ``overwrite`` (and then only a previous weightsmith output: merge.atomic), overlapping no
        input and no other active job's output. ``resumes``: the kind resumes an existing folder of its
        own and checks it itself (zoo builds)."""
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
        for p in inputs:
            if overlaps(Path(p).resolve(), out):
                raise InvalidPathError(f"output_path: {out} overlaps input {p}")
        if not resumes:
            _check_replaceable(out, overwrite, output_path or job_id)
        self._check_output_free(out, serial_key=serial_key)
        return out

    def _check_budget(self, est: int, what: str) -> None:
        """Memory admission: ``what`` ("the merge", "the job") needs ``est`` bytes."""
        if est > self.config.memory_budget:
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"{what} needs about {est:,} bytes of memory, more than this server's budget "
                f"of {self.config.memory_budget:,} bytes",
            )

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
        est = self.config.worker_overhead_bytes + int(sub.est_bytes)
        self._check_budget(est, "the job")
        prev = self._admit(request_id)
        if prev is not None:
            return prev
        self._check_output_free(sub.output_path, serial_key=sub.serial_key)
        rec = JobRecord(
            id=job_id,
            rowid=0,
            state=QUEUED,
            recipe_yaml="",
            method=sub.summary,
            output_path=str(sub.output_path),
            overwrite=sub.overwrite,
            options={},
            request_id=request_id,
            request_hash=request_hash,
            est_bytes=est,
            attempt=1,
            cancel_requested=False,
            worker_pid=None,
            create_time=time.time(),
            start_time=None,
            end_time=None,
            progress={"phase": "queued", **sub.progress},
            error_code=None,
            error_message=None,
            result=None,
            job_refs=sub.job_refs,
            last_seq=0,
            kind=sub.kind,
            spec=sub.spec,
        )
        (self.config.jobs_dir / job_id).mkdir(parents=True, exist_ok=False)
        self.store.insert(rec)
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

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        cd = options.get("compute_dtype") or ""
        if cd and cd not in COMPUTE_DTYPES:
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"options.compute_dtype: {cd!r} is not one of {', '.join(COMPUTE_DTYPES)}",
                "options.compute_dtype",
            )
        shard = int(options.get("shard_size") or 0)
        if shard < 0 or (0 < shard < 1024):
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"options.shard_size: {shard} (must be 0 for the default or >= 1024 bytes)",
                "options.shard_size",
            )
        workers = int(options.get("workers") or 0)
        if not 0 <= workers <= 16:
            raise ServiceError(
                "INVALID_ARGUMENT", f"options.workers: {workers} (must be 0..16)", "options.workers"
            )
        return {"compute_dtype": cd, "shard_size": shard, "workers": workers or self.config.job_workers}

    def _plan(self, recipe: Any, options: dict[str, Any], resolver: RefResolver) -> Any:
        from merge.engine import MergeOptions, plan_merge

        mo = MergeOptions(
            compute_dtype=options["compute_dtype"] or None,
            shard_size=options["shard_size"] or 5 * 10**9,
            allow_pickle=False,
            workers=options["workers"],
            path_resolver=self.confine_path,
        )
        plan = plan_merge(recipe, mo, resolver=resolver)
        for c in plan.checkpoints:
            c.close()
        return plan

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
                "recipe_yaml": rec.recipe_yaml,
                "options": rec.options,
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
                self._finish(
                    job_id, CANCELLED, error=("CANCELLED", "the job was cancelled; no output was written")
                )
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
                        f"the {rec.kind} worker died ({how}; out of memory?); no output was written",
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
    "parse_recipe_text",
    "worker_main",
]
