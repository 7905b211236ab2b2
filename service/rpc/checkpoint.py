"""CheckpointService: inspect a checkpoint from its headers, upload one into the server, download one.

Uploads land in ``data-dir/uploads/<name>`` (a temporary folder renamed once complete, validated as
a checkpoint first, within ``--max-upload-bytes``); downloads stream the files of any readable
reference (a path under the roots, ``upload://``, ``job://``) in chunks with their sha256.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from service._proto.weightsmith.v1 import checkpoint_service_pb2 as cpb
from service._proto.weightsmith.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from service.jobs.manager import JobManager
from service.jobs.store import ServiceError
from service.paths import UPLOAD_SCHEME
from service.rpc.convert import handle_errors, handle_stream_errors, natural_key

CHECKPOINT_SERVICE = cpb.DESCRIPTOR.services_by_name["CheckpointService"].full_name
CHUNK = 1 << 20
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,199}$")


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


def add_servicers(manager: JobManager, server: Any, *, max_upload_bytes: int) -> list[str]:
    """Register this module's service on ``server``; returns its full name (health, reflection)."""
    cpb_grpc.add_CheckpointServiceServicer_to_server(CheckpointServicer(manager, max_upload_bytes), server)
    return [CHECKPOINT_SERVICE]
