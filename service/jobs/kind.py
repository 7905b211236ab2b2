"""Kinds of job: what differs between a merge, an alignment, a soup operation, a zoo build and a training.

DESIGN.md "Service": jobs are one mechanism. :mod:`service.jobs.manager` owns everything they share (the
SQLite store and event log, the bounded queue, memory admission, worker processes, cancellation,
crash reconciliation, the watch stream); a :class:`JobKind` adds only

* ``run(ctx)``: in the job's worker process: call the library, report progress through
  :class:`WorkerContext`, return the result (a JSON object);
* how to clean up after a cancel, a failure or an interruption, and how to tell, after a crash,
  that an attempt finished although its ``result.json`` was never written.

Admission (checking a request, resolving its references through the server's roots, the memory
claim) happens in the kind's create RPC before anything is written; it hands
:meth:`service.jobs.manager.JobManager.submit` a :class:`service.jobs.manager.Submission`.

Kinds register themselves at import (:func:`register`); :func:`get_kind` imports the built-in ones.
Kind modules import neither gRPC nor the stubs: workers load them in the forkserver's children.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.errors import MergeCancelled

if TYPE_CHECKING:
    from service.jobs.store import JobRecord
    from service.paths import RefResolver, Roots

#: why a job stopped without a result, for :attr:`JobKind.cleanup`
CANCELLED, FAILED, INTERRUPTED = "cancelled", "failed", "interrupted"


@dataclass
class WorkerContext:
    """What a kind's ``run`` gets in the worker process."""

    job_id: str
    attempt: int
    job_dir: Path
    data_dir: Path
    output_path: Path | None
    overwrite: bool
    spec: dict[str, Any]  # the job's normalized request (JobRecord.spec)
    resolver: RefResolver
    roots: Roots
    device: str
    threads: int
    delay: float  # --slow-down: seconds to sleep per step (tests and demos)
    cancel: threading.Event
    send: Callable[[dict[str, Any]], None]
    #: what admission computed and handed over in memory (a merge's plan), None after a restart
    prepared: Any = None
    _last: dict[str, Any] = field(default_factory=lambda: {"t": 0.0, "phase": None})
    _state: dict[str, Any] = field(default_factory=dict)

    def progress(self, force: bool = False, **fields: Any) -> None:
        """Report progress (``phase``, ``tensors_done``..., ``steps_done``, ``metrics``...): the fields
        update the job's last report; at most one message per 50 ms unless the phase changes or
        ``force``."""
        now = time.monotonic()
        phase = fields.get("phase", self._last["phase"])
        self._state.update(fields)
        if force or phase != self._last["phase"] or now - self._last["t"] >= 0.05:
            self._last["t"], self._last["phase"] = now, phase
            self.send({"type": "progress", "progress": dict(self._state)})

    def check_cancel(self) -> None:
        """Raise :class:`MergeCancelled` once the job is cancelled (or its server went away)."""
        if self.cancel.is_set():
            raise MergeCancelled("job cancelled; nothing was written")

    def step(self) -> None:
        """One unit of work done: honour ``--slow-down``, then stop here if cancelled."""
        if self.delay:
            time.sleep(self.delay)
        self.check_cancel()

    def confine(self, value: str, field_name: str) -> str:
        """A file or folder a request names, inside the roots (the engine's ``path_resolver``)."""
        return str(self.roots.resolve_input(value, field_name))


def remove_partials(rec: JobRecord, why: str) -> None:
    """The default clean-up: ``<out>.partial-*`` folders of an atomic writer, and a moved-aside previous
    output put back (:func:`merge.atomic.recover`)."""
    from merge.atomic import recover

    if rec.output_path:
        recover(Path(rec.output_path))


@dataclass(frozen=True)
class JobKind:
    name: str
    summary: str
    create_rpcs: tuple[str, ...]
    result_type: str  # the proto message a finished job's result converts to
    run: Callable[[WorkerContext], dict[str, Any]]
    #: ``cleanup(rec, why)`` after a job stopped without a result (why: cancelled, failed, interrupted)
    cleanup: Callable[[JobRecord, str], None] = remove_partials
    #: ``recover(rec)``: after a crash, the result of an attempt whose output is complete but whose
    #: result.json was never written; None when it did not finish
    recover: Callable[[JobRecord], dict[str, Any] | None] = lambda rec: None
    #: an interrupted attempt keeps what it did, in its output folder (which may therefore exist), and
    #: a retry resumes from it (zoo builds, trainings)
    resumable: bool = False
    #: jobs with the same key run one at a time, in the order they were created, and may write into
    #: the same folder (operations on one soup); None: no such constraint
    serial_key: Callable[[JobRecord], str | None] = lambda rec: None


_KINDS: dict[str, JobKind] = {}
_BUILTIN = tuple(f"service.jobs.kinds.{k}" for k in ("merge", "align", "metanet", "soup", "evolve"))


def register(kind: JobKind) -> JobKind:
    _KINDS[kind.name] = kind
    return kind


def _load_builtin() -> None:
    import importlib

    for mod in _BUILTIN:
        importlib.import_module(mod)


def get_kind(name: str) -> JobKind:
    if name not in _KINDS:
        _load_builtin()
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown job kind {name!r} (known: {', '.join(sorted(_KINDS))})") from None


def all_kinds() -> list[JobKind]:
    _load_builtin()
    return [_KINDS[k] for k in sorted(_KINDS)]


__all__ = [
    "CANCELLED",
    "FAILED",
    "INTERRUPTED",
    "JobKind",
    "WorkerContext",
    "all_kinds",
    "get_kind",
    "register",
    "remove_partials",
]
