"""The worker process of a job: forked from the forkserver, dies with the server, reports over a pipe.

Each job runs in its own process (cancellation is a signal, memory accounting and crash isolation are
the operating system's); it holds an ``flock`` on its job folder while it lives, so a restarted server
can tell when an orphan has gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from merge.atomic import replace_file
from merge.errors import MergeCancelled, WeightsmithError
from service.paths import (
    HubConfig,
    RefResolver,
    Roots,
)

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
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(obj)))
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
            prepared=spec.get("prepared"),
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
