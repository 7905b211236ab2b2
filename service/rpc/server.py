"""The weightsmith gRPC server (``grpc.aio``): the app that serves every service of ``weightsmith.v1``.

Each service lives in its own module of :mod:`service.rpc` (jobs, merge, checkpoint, align, lineage,
metanet, soup, evolve; contract in ``proto/weightsmith/v1``) and registers itself through ``add_servicers``;
this module adds the standard ``grpc.health.v1.Health`` service and server reflection.
Bearer-token auth runs in an interceptor (health exempt), TLS and mTLS are optional. On SIGTERM
(or SIGINT) the server shuts down gracefully: health goes NOT_SERVING at once, new jobs are
refused (UNAVAILABLE) while reads keep working, running jobs get ``shutdown_grace`` seconds to
finish and are then interrupted (no output; INTERRUPTED, retried later), queued jobs stay queued
in the store for the next start.

Errors map to status codes through ``WeightsmithError.grpc_code`` (INVALID_ARGUMENT for a bad
recipe, shape mismatch or malformed checkpoint, with a ``google.rpc.BadRequest`` detail naming
the field; NOT_FOUND; PERMISSION_DENIED for paths outside the roots; FAILED_PRECONDITION for
pickles; RESOURCE_EXHAUSTED for full queues, memory budget and upload caps). Unexpected errors
answer INTERNAL with no traceback; the traceback goes to the server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from merge.atomic import replace_file
from service.auth import BearerTokenInterceptor, server_credentials
from service.jobs.manager import JobManager, JobManagerConfig
from service.paths import HubConfig

log = logging.getLogger("weightsmith.server")



@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = field(default_factory=lambda: Path("~/.weightsmith/server").expanduser())
    roots: list[Path] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_running: int = 1
    max_queued: int = 16
    memory_budget: int = 4 << 30
    max_models: int = 32
    job_workers: int = 2
    job_threads: int = 1
    max_upload_bytes: int = 256 << 20
    shutdown_grace: float = 30.0
    resume_interrupted: bool = False
    reflection: bool = True
    port_file: Path | None = None
    max_concurrent_rpcs: int = 1024
    hub: HubConfig = field(default_factory=lambda: HubConfig(enabled=False))
    delay_per_tensor: float = 0.0
    device: str = "cpu"

    def manager_config(self) -> JobManagerConfig:
        return JobManagerConfig(
            data_dir=self.data_dir,
            roots=list(self.roots),
            max_running=self.max_running,
            max_queued=self.max_queued,
            memory_budget=self.memory_budget,
            max_models=self.max_models,
            job_workers=self.job_workers,
            job_threads=self.job_threads,
            hub=self.hub,
            resume_interrupted=self.resume_interrupted,
            delay_per_tensor=self.delay_per_tensor,
            device=self.device,
        )


# ---------------------------------------------------------------------------------------------
# Running the server
# ---------------------------------------------------------------------------------------------


class DataDirBusy(RuntimeError):
    pass


def _lock_data_dir(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirBusy(f"{data_dir}: another weightsmith server uses this data folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Server:
    """A running server: ``await start()``, then ``await wait()``; ``await stop()`` to shut down."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port: int | None = None
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._lock_fd: int | None = None

    async def start(self) -> int:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        cfg = self.config
        self._lock_fd = _lock_data_dir(cfg.data_dir)
        self.manager = JobManager(cfg.manager_config())
        await self.manager.start()
        # Import the method registry in the background (it pulls scipy & co.; the first ListMethods
        # or CreateMergeJob would otherwise pay for it).
        self._warm = asyncio.ensure_future(asyncio.to_thread(importlib.import_module, "merge.methods"))
        interceptors = [BearerTokenInterceptor(cfg.tokens)] if cfg.tokens else []
        self.server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 << 20)],
        )
        from service.rpc import align, checkpoint, evolve, jobs, lineage, merge, metanet, soup

        services = checkpoint.add_servicers(self.manager, self.server, max_upload_bytes=cfg.max_upload_bytes)
        for mod in (jobs, merge, align, lineage, metanet, soup, evolve):  # one module per service
            services += mod.add_servicers(self.manager, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", *services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
            )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            if not cfg.tls_key:
                raise ValueError("--tls-cert needs --tls-key")
            creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            self.port = self._bind(lambda: self.server.add_secure_port(address, creds), address)
        else:
            if cfg.tls_client_ca:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            self.port = self._bind(lambda: self.server.add_insecure_port(address), address)
        await self.server.start()
        if cfg.port_file:
            replace_file(Path(cfg.port_file), lambda tmp: tmp.write_text(f"{self.port}\n"))
        return self.port

    @staticmethod
    def _bind(add: Callable[[], int], address: str) -> int:
        try:
            port = add()
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from None
        if not port:
            raise OSError(f"cannot listen on {address}")
        return port

    async def stop(self) -> None:
        """Graceful shutdown (idempotent)."""
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        self._stopping.set()
        log.info(
            "shutting down: health NOT_SERVING, draining jobs for up to %.0f s", self.config.shutdown_grace
        )
        await self.health.enter_graceful_shutdown()
        self.manager.accepting = False
        await self.manager.shutdown(self.config.shutdown_grace)
        log.info("jobs drained; stopping RPCs")
        await self.server.stop(5)
        log.info("RPCs stopped")
        self.manager.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    srv = Server(config)
    port = await srv.start()
    auth = "token auth" if config.tokens else "NO AUTH"
    tls = ("mTLS" if config.tls_client_ca else "TLS") if config.tls_cert else "plaintext"
    print(
        f"weightsmith server listening on {config.host}:{port} ({tls}, {auth}); data in {config.data_dir}",
        file=sys.stderr,
        flush=True,
    )
    if not config.tokens and config.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "warning: no --token given and the server listens beyond loopback: anyone who can reach it can "
            "run merges",
            file=sys.stderr,
            flush=True,
        )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(srv.stop()))
    await srv.wait()


def run(config: ServerConfig) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))
    log.info("event loop closed")
