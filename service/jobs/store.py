"""The job store: states, records, events, and the SQLite file (WAL) that holds them all.

One SQLite file under the server's data folder holds every job and every event of every job, so jobs,
their progress history and watch resumption survive a restart (the manager, :mod:`service.jobs.manager`,
is the only writer).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.errors import WeightsmithError

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
SCHEMA_VERSION = 3


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
    """One job of any kind. ``spec`` is the kind's normalized request (a merge's: its validated recipe and
    options, :mod:`service.jobs.kinds.merge`), stored once as JSON; ``summary`` a few words for listings."""

    id: str
    kind: str
    summary: str
    spec: dict[str, Any]
    output_path: str
    overwrite: bool
    request_id: str
    request_hash: str
    est_bytes: int
    state: str = QUEUED
    rowid: int = 0
    attempt: int = 1
    cancel_requested: bool = False
    worker_pid: int | None = None
    create_time: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    progress: dict[str, Any] = field(default_factory=lambda: {"phase": "queued"})
    error_code: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None
    job_refs: dict[str, str] = field(default_factory=dict)  # job://<id> inputs -> their output folders
    last_seq: int = 0

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
    "kind",
    "summary",
    "spec_json",
    "output_path",
    "overwrite",
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
)

_JOBS_TABLE = """
CREATE TABLE {name} (
  rowid INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  state TEXT NOT NULL,
  kind TEXT NOT NULL,
  summary TEXT NOT NULL,
  spec_json TEXT NOT NULL,
  output_path TEXT NOT NULL,
  overwrite INTEGER NOT NULL,
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
)"""
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs(request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs(kind);
"""
_EVENTS_TABLE = """
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  seq INTEGER NOT NULL,
  time REAL NOT NULL,
  state TEXT NOT NULL,
  progress_json TEXT NOT NULL,
  PRIMARY KEY (job_id, seq)
);
"""


def merge_spec_from_v2(recipe_yaml: str, options_json: str) -> dict[str, Any]:
    """A merge job of a version-1/2 store (its recipe as normalized YAML, its options in their own
    column) as the merge kind's spec of version 3."""
    import yaml

    return {"recipe": yaml.safe_load(recipe_yaml) or {}, "options": json.loads(options_json)}


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
            self.db.executescript(_JOBS_TABLE.format(name="jobs") + ";" + _INDEXES + _EVENTS_TABLE)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version in (1, 2):
            self._migrate(version)
        elif version != SCHEMA_VERSION:
            raise RuntimeError(
                f"{path}: job store schema version {version}, this server knows {SCHEMA_VERSION}"
            )

    def _migrate(self, version: int) -> None:
        """Versions 1 (merge jobs only) and 2 (``kind`` and ``spec_json`` added; merges kept their
        ``recipe_yaml``, ``method`` and ``options_json`` columns) -> 3: every kind in the same columns.
        One transaction; the events table is kept as it is."""
        self.db.execute("PRAGMA foreign_keys=OFF")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if version == 1:
                self.db.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'merge'")
                self.db.execute("ALTER TABLE jobs ADD COLUMN spec_json TEXT NOT NULL DEFAULT '{}'")
            self.db.execute(_JOBS_TABLE.format(name="jobs_v3"))
            kept = [c for c in _COLUMNS if c not in ("summary", "spec_json")]
            for row in self.db.execute("SELECT * FROM jobs ORDER BY rowid").fetchall():
                spec = (
                    merge_spec_from_v2(row["recipe_yaml"], row["options_json"])
                    if row["kind"] == "merge"
                    else json.loads(row["spec_json"])
                )
                cols = ["rowid", *kept, "summary", "spec_json"]
                vals = [row["rowid"], *(row[c] for c in kept), row["method"], json.dumps(spec)]
                self.db.execute(
                    f"INSERT INTO jobs_v3 ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals
                )
            self.db.execute("DROP TABLE jobs")
            self.db.execute("ALTER TABLE jobs_v3 RENAME TO jobs")
            for stmt in filter(None, (x.strip() for x in _INDEXES.split(";"))):
                self.db.execute(stmt)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            self.db.execute("PRAGMA foreign_keys=ON")

    @_locked
    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"],
            rowid=row["rowid"],
            state=row["state"],
            kind=row["kind"],
            summary=row["summary"],
            spec=json.loads(row["spec_json"]),
            output_path=row["output_path"],
            overwrite=bool(row["overwrite"]),
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
        )

    @_locked
    def insert(self, rec: JobRecord) -> JobRecord:
        vals = {
            "id": rec.id,
            "state": rec.state,
            "kind": rec.kind,
            "summary": rec.summary,
            "spec_json": json.dumps(rec.spec),
            "output_path": rec.output_path,
            "overwrite": int(rec.overwrite),
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
            if k in ("progress", "result", "spec", "job_refs"):
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
