"""The weightsmith gRPC server (``grpc.aio``): merge jobs, checkpoint inspection and transfer.

Serves ``weightsmith.v1.MergeService`` and ``weightsmith.v1.CheckpointService`` (contract in
``proto/weightsmith/v1``), the standard ``grpc.health.v1.Health`` service and server reflection.
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
import hashlib
import importlib
import logging
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from service._proto.weightsmith.v1 import (
    checkpoint_service_pb2 as cpb,
)
from service._proto.weightsmith.v1 import (
    checkpoint_service_pb2_grpc as cpb_grpc,
)
from service._proto.weightsmith.v1 import (
    merge_service_pb2 as mpb,
)
from service._proto.weightsmith.v1 import (
    merge_service_pb2_grpc as mpb_grpc,
)
from service.auth import BearerTokenInterceptor, server_credentials
from service.jobs.manager import JobManager, JobManagerConfig
from service.jobs.recipe_text import parse_recipe_text
from service.jobs.store import ServiceError
from service.paths import UPLOAD_SCHEME, HubConfig
from service.rpc.convert import (
    STATE_NAMES,
    handle_errors,
    handle_stream_errors,
    job_pb,
    json_safe,
    natural_key,
    plan_pb,
    ts,
)

log = logging.getLogger("weightsmith.server")

MERGE_SERVICE = mpb.DESCRIPTOR.services_by_name["MergeService"].full_name
CHECKPOINT_SERVICE = cpb.DESCRIPTOR.services_by_name["CheckpointService"].full_name
CHUNK = 1 << 20
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,199}$")


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
# Errors
# ---------------------------------------------------------------------------------------------
















# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------
















# ---------------------------------------------------------------------------------------------
# Servicers
# ---------------------------------------------------------------------------------------------


class MergeServicer(mpb_grpc.MergeServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.m = manager

    @handle_errors("recipe")
    async def CreateMergeJob(
        self, request: mpb.CreateMergeJobRequest, context: Any
    ) -> mpb.CreateMergeJobResponse:
        which = request.WhichOneof("recipe")
        if which is None:
            raise ServiceError("INVALID_ARGUMENT", "recipe: give recipe_yaml or recipe_struct", "recipe")
        if which == "recipe_yaml":
            recipe = parse_recipe_text(request.recipe_yaml)
        else:
            recipe = json_format.MessageToDict(request.recipe_struct)
        opts = {
            "compute_dtype": request.options.compute_dtype,
            "shard_size": request.options.shard_size,
            "workers": request.options.workers,
        }
        rec, plan = await self.m.create(
            recipe=recipe,
            output_path=request.output_path,
            overwrite=request.overwrite,
            options=opts,
            request_id=request.request_id,
            validate_only=request.validate_only,
        )
        resp = mpb.CreateMergeJobResponse()
        if rec is not None:
            resp.job.CopyFrom(job_pb(rec))
        p = plan_pb(plan)
        if p is not None:
            resp.plan.CopyFrom(p)
        return resp

    @handle_errors("name")
    async def GetMergeJob(self, request: mpb.GetMergeJobRequest, context: Any) -> mpb.GetMergeJobResponse:
        return mpb.GetMergeJobResponse(job=job_pb(self.m.get(request.name, "merge")))

    @handle_stream_errors("name")
    async def WatchMergeJob(
        self, request: mpb.WatchMergeJobRequest, context: Any
    ) -> AsyncIterator[mpb.WatchMergeJobResponse]:
        async for ev, rec in self.m.watch(request.name, request.from_sequence, "merge"):
            yield mpb.WatchMergeJobResponse(sequence=ev.seq, time=ts(ev.time), job=job_pb(rec, ev))

    @handle_errors("name")
    async def CancelMergeJob(
        self, request: mpb.CancelMergeJobRequest, context: Any
    ) -> mpb.CancelMergeJobResponse:
        return mpb.CancelMergeJobResponse(job=job_pb(await self.m.cancel(request.name, "merge")))

    @handle_errors("name")
    async def RetryMergeJob(
        self, request: mpb.RetryMergeJobRequest, context: Any
    ) -> mpb.RetryMergeJobResponse:
        return mpb.RetryMergeJobResponse(job=job_pb(await self.m.retry(request.name, "merge")))

    @handle_errors("states")
    async def ListMergeJobs(
        self, request: mpb.ListMergeJobsRequest, context: Any
    ) -> mpb.ListMergeJobsResponse:
        states = []
        for s in request.states:
            if s not in STATE_NAMES:
                raise ServiceError("INVALID_ARGUMENT", f"states: {s} is not a job state", "states")
            states.append(STATE_NAMES[s])
        recs, token = self.m.list(states, request.page_size, request.page_token, ["merge"])
        return mpb.ListMergeJobsResponse(jobs=[job_pb(r) for r in recs], next_page_token=token)

    @handle_errors()
    async def ListMethods(self, request: mpb.ListMethodsRequest, context: Any) -> mpb.ListMethodsResponse:
        from merge.methods import all_methods

        out = []
        for spec in all_methods():
            d = spec.describe()
            info = mpb.MethodInfo(
                name=d["name"],
                summary=d["summary"],
                paper=d["paper"],
                url=d["url"],
                kind=d["kind"],
                base_model=d["base"],
                min_models=int(d["min_models"]),
                max_models=int(d["max_models"] or 0),
                randomized=bool(d["randomized"]),
            )
            for p in d["params"]:
                mp = mpb.MethodParameter(
                    name=p["name"],
                    type=p["type"],
                    per_model=p["per_model"],
                    required=p["required"],
                    path=bool(p.get("path")),
                )
                json_format.ParseDict(json_safe(p["default"]), mp.default_value)
                info.parameters.append(mp)
            info.parameter_schema.update(json_safe(spec.json_schema()))
            out.append(info)
        return mpb.ListMethodsResponse(methods=out)


class CheckpointServicer(cpb_grpc.CheckpointServiceServicer):
    def __init__(self, manager: JobManager, max_transfer_bytes: int) -> None:
        self.m = manager
        self.max_bytes = max_transfer_bytes

    def _open(self, ref: str) -> Any:
        from merge.checkpoint import open_checkpoint

        if not ref:
            raise ServiceError("INVALID_ARGUMENT", "ref: empty model reference", "ref")
        resolved = self.m.resolver()(ref, "ref")
        return resolved, open_checkpoint(resolved.path, allow_pickle=False)

    @handle_errors("ref")
    async def InspectCheckpoint(
        self, request: cpb.InspectCheckpointRequest, context: Any
    ) -> cpb.InspectCheckpointResponse:
        _, ckpt = await asyncio.to_thread(self._open, request.ref)
        names = sorted(ckpt.keys(), key=natural_key)
        size = min(max(request.page_size or 10000, 1), 10000)
        try:
            start = int(request.page_token or 0)
        except ValueError:
            raise ServiceError(
                "INVALID_ARGUMENT", "page_token: not a token this server issued", "page_token"
            ) from None
        page = names[start : start + size]
        params = 0
        for n in names:
            k = 1
            for s in ckpt.shape(n):
                k *= s
            params += k
        root = ckpt.root
        resp = cpb.InspectCheckpointResponse(
            ref=request.ref,
            tensors_total=len(names),
            parameters_total=params,
            bytes_total=ckpt.total_bytes,
            files=[str(f.relative_to(root)) if f.is_relative_to(root) else f.name for f in ckpt.files],
            next_page_token=str(start + size) if start + size < len(names) else "",
        )
        for n in page:
            info = ckpt.info(n)
            resp.tensors.append(
                cpb.TensorInfo(
                    name=n,
                    dtype=str(info.dtype).removeprefix("torch."),
                    shape=list(info.shape),
                    nbytes=info.nbytes,
                    file=info.file.name,
                )
            )
        ckpt.close()
        return resp

    # -- upload -----------------------------------------------------------------------------------
    def _check_upload_name(self, name: str) -> None:
        from merge.checkpoint import AUX_FILE_PATTERNS, INDEX_NAME, PICKLE_SUFFIXES

        if not _UPLOAD_NAME.match(name or "") or ".." in name:
            raise ServiceError(
                "INVALID_ARGUMENT", f"file.name: {name!r} is not a plain file name", "file.name"
            )
        if name.endswith(PICKLE_SUFFIXES) or name.endswith(".pkl"):
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"file.name: {name!r}: pickle checkpoints are refused by the "
                "service (convert to safetensors)",
                "file.name",
            )
        aux = re.compile("|".join(f"(?:{p})" for p in AUX_FILE_PATTERNS))
        if not (name.endswith(".safetensors") or name in (INDEX_NAME, "README.md") or aux.fullmatch(name)):
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"file.name: {name!r}: only *.safetensors, {INDEX_NAME}, "
                "config and tokenizer files can be uploaded",
                "file.name",
            )

    @handle_errors("file")
    async def UploadCheckpoint(self, request_iterator: Any, context: Any) -> cpb.UploadCheckpointResponse:
        uid = uuid.uuid4().hex
        uploads = self.m.config.uploads_dir
        tmp = uploads / f".tmp-{uid}"
        tmp.mkdir(parents=True)
        files: list[cpb.FileHeader] = []
        cur: dict[str, Any] | None = None
        total = 0

        def close_current() -> None:
            nonlocal cur
            if cur is None:
                return
            cur["fh"].close()
            hdr = cur["header"]
            if cur["written"] != hdr.size:
                raise ServiceError(
                    "INVALID_ARGUMENT",
                    f"file {hdr.name!r}: received {cur['written']} bytes, header said {hdr.size}",
                    "file.size",
                )
            digest = cur["sha"].hexdigest()
            if hdr.sha256 and hdr.sha256.lower() != digest:
                raise ServiceError(
                    "DATA_LOSS",
                    f"file {hdr.name!r}: sha256 {digest} does not match the declared {hdr.sha256}",
                    "file.sha256",
                )
            files.append(cpb.FileHeader(name=hdr.name, size=hdr.size, sha256=digest))
            cur = None

        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("payload")
                if kind == "file":
                    close_current()
                    h = msg.file
                    self._check_upload_name(h.name)
                    if any(f.name == h.name for f in files):
                        raise ServiceError("INVALID_ARGUMENT", f"file {h.name!r} sent twice", "file.name")
                    if h.size < 0:
                        raise ServiceError("INVALID_ARGUMENT", f"file {h.name!r}: negative size", "file.size")
                    if total + h.size > self.max_bytes:
                        raise ServiceError(
                            "RESOURCE_EXHAUSTED",
                            f"upload larger than this server's limit of "
                            f"{self.max_bytes:,} bytes; use a path or Hub "
                            "reference for big models",
                        )
                    total += h.size
                    fh = open(tmp / h.name, "xb")  # noqa: SIM115 - closed in close_current
                    cur = {"header": h, "fh": fh, "written": 0, "sha": hashlib.sha256()}
                elif kind == "chunk":
                    if cur is None:
                        raise ServiceError("INVALID_ARGUMENT", "chunk before any file header", "chunk")
                    data = msg.chunk
                    if cur["written"] + len(data) > cur["header"].size:
                        raise ServiceError(
                            "INVALID_ARGUMENT",
                            f"file {cur['header'].name!r}: more bytes than its "
                            f"declared size {cur['header'].size}",
                            "chunk",
                        )
                    cur["fh"].write(data)
                    cur["sha"].update(data)
                    cur["written"] += len(data)
                else:
                    raise ServiceError("INVALID_ARGUMENT", "empty upload message", "payload")
            close_current()
            if not any(f.name.endswith(".safetensors") for f in files):
                raise ServiceError("INVALID_ARGUMENT", "upload holds no .safetensors file", "file")
            await asyncio.to_thread(self._validate_upload, tmp)
            os.rename(tmp, uploads / uid)
        except BaseException:
            if cur is not None:
                cur["fh"].close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cpb.UploadCheckpointResponse(ref=f"{UPLOAD_SCHEME}{uid}", files=files, bytes_total=total)

    @staticmethod
    def _validate_upload(folder: Path) -> None:
        from merge.checkpoint import open_checkpoint

        ckpt = open_checkpoint(folder, allow_pickle=False)
        ckpt.close()

    # -- download ---------------------------------------------------------------------------------
    def _download_files(self, ref: str) -> list[tuple[Path, str, int, str]]:
        from merge.checkpoint import INDEX_NAME

        resolved, ckpt = self._open(ref)
        path = Path(resolved.path)
        if path.is_file():
            files = [path]
        else:
            extra = [
                path / n for n in (INDEX_NAME, "README.md", "weightsmith_recipe.yml") if (path / n).is_file()
            ]
            files = list(dict.fromkeys([*ckpt.files, *extra, *ckpt.aux_files()]))
        ckpt.close()
        total = sum(f.stat().st_size for f in files)
        if total > self.max_bytes:
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"ref: checkpoint is {total:,} bytes, more than this server's "
                f"transfer limit of {self.max_bytes:,}; read it by path instead",
            )
        out = []
        folder = path if path.is_dir() else path.parent
        for f in files:
            if f.parent.resolve() != folder.resolve():
                raise ServiceError(
                    "FAILED_PRECONDITION", f"ref: {f} is not directly in the checkpoint folder"
                )
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
            out.append((f, f.name, f.stat().st_size, h.hexdigest()))
        return out

    @handle_stream_errors("ref")
    async def DownloadCheckpoint(
        self, request: cpb.DownloadCheckpointRequest, context: Any
    ) -> AsyncIterator[cpb.DownloadCheckpointResponse]:
        files = await asyncio.to_thread(self._download_files, request.ref)
        for path, name, size, sha in files:
            yield cpb.DownloadCheckpointResponse(file=cpb.FileHeader(name=name, size=size, sha256=sha))
            with open(path, "rb") as fh:
                sent = 0
                while sent < size:
                    block = fh.read(min(CHUNK, size - sent))
                    if not block:
                        raise ServiceError("DATA_LOSS", f"{path}: file shrank while being sent")
                    sent += len(block)
                    yield cpb.DownloadCheckpointResponse(chunk=block)


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
        mpb_grpc.add_MergeServiceServicer_to_server(MergeServicer(self.manager), self.server)
        cpb_grpc.add_CheckpointServiceServicer_to_server(
            CheckpointServicer(self.manager, cfg.max_upload_bytes), self.server
        )
        from service.rpc import align, jobs, lineage, metanet, soup

        services = [MERGE_SERVICE, CHECKPOINT_SERVICE]
        for mod in (jobs, align, lineage, metanet, soup):  # one module per service
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
            tmp = Path(f"{cfg.port_file}.tmp")
            tmp.write_text(f"{self.port}\n")
            os.replace(tmp, cfg.port_file)
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
