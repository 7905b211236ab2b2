"""Between the library and the wire: exceptions to status codes (with the message redacted for the caller)
and job records to protobuf messages, shared by every servicer (one module per service in service/rpc/)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from merge.errors import WeightsmithError
from service._proto.weightsmith.v1 import (
    job_pb2,
)

STATES = {
    "QUEUED": job_pb2.JOB_STATE_QUEUED,
    "RUNNING": job_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": job_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": job_pb2.JOB_STATE_FAILED,
    "CANCELLED": job_pb2.JOB_STATE_CANCELLED,
    "INTERRUPTED": job_pb2.JOB_STATE_INTERRUPTED,
}

log = logging.getLogger("weightsmith.server")


STATE_NAMES = {v: k for k, v in STATES.items()}


def status_code(name: str) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[name]
    except KeyError:
        return grpc.StatusCode.INVALID_ARGUMENT


async def abort_with(
    context: grpc.aio.ServicerContext, code_name: str, message: str, field: str | None
) -> None:
    """Abort the RPC with ``code_name``; INVALID_ARGUMENT carries a BadRequest naming ``field``."""
    code = status_code(code_name)
    try:  # rich details need grpcio-status (and googleapis-common-protos); plain status without
        from google.protobuf import any_pb2
        from google.rpc import error_details_pb2, status_pb2
        from grpc_status import rpc_status
    except ImportError:
        field = None
    if code is grpc.StatusCode.INVALID_ARGUMENT and field:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
        status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
        await context.abort_with_status(rpc_status.to_status(status))
    await context.abort(code, message)


def field_for(e: Exception, default: str | None) -> str | None:
    f = getattr(e, "field", None)
    if f:
        return f
    msg = str(e)
    for name in ("output_path", "options.", "request_id", "page_token"):
        if msg.startswith(name):
            return name.rstrip(".")
    return default


def sent_strings(msg: Any, out: list[str] | None = None) -> list[str]:
    """Every string field of a request message, nested, repeated and map ones too (what the caller sent)."""
    from google.protobuf.message import Message

    out = [] if out is None else out
    if not isinstance(msg, Message):
        return out
    for _fd, value in msg.ListFields():
        if isinstance(value, str | bytes | Message):
            values = [value]
        elif hasattr(value, "items"):  # a map
            values = list(value.values())
        else:  # a repeated field (or a scalar)
            values = list(value) if hasattr(value, "__iter__") else [value]
        for v in values:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, Message):
                sent_strings(v, out)
    return out


def shown_message(servicer: Any, e: Exception, request: Any) -> str:
    """The error message a caller sees: every server path outside the roots redacted (JobManager.redact)."""
    manager = getattr(servicer, "m", None)  # every servicer holds its JobManager as .m
    if manager is None:
        return str(e)
    return manager.redact(str(e), sent_strings(request))


async def _abort_for(
    e: Exception, servicer: Any, request: Any, context: grpc.aio.ServicerContext, default_field: str | None, rpc: str
) -> None:
    """End the RPC for ``e``: a WeightsmithError with its status code and the redacted message, anything
    else INTERNAL with no detail (the traceback goes to the log)."""
    if isinstance(e, WeightsmithError):
        await abort_with(
            context, getattr(e, "grpc_code", "INVALID_ARGUMENT"), shown_message(servicer, e, request),
            field_for(e, default_field),
        )  # fmt: skip
        return
    log.exception("internal error in %s", rpc, exc_info=e)
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error (see the server log)")


def handle_errors(default_field: str | None = None) -> Callable[[Any], Any]:
    """Map exceptions of a unary (or client-streaming) handler to status codes."""

    def deco(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await fn(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - mapped by _abort_for
                await _abort_for(e, self, request, context, default_field, fn.__name__)

        return wrapper

    return deco


def handle_stream_errors(default_field: str | None = None) -> Callable[[Any], Any]:
    """The same for server-streaming handlers (async generators)."""

    def deco(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - mapped by _abort_for
                await _abort_for(e, self, request, context, default_field, fn.__name__)

        return wrapper

    return deco


def ts(t: float | None) -> timestamp_pb2.Timestamp | None:
    if t is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def progress_pb(p: dict[str, Any]) -> job_pb2.JobProgress:
    return job_pb2.JobProgress(
        phase=str(p.get("phase", "")),
        tensors_done=int(p.get("tensors_done", 0)),
        tensors_total=int(p.get("tensors_total", 0)),
        bytes_done=int(p.get("bytes_done", 0)),
        bytes_total=int(p.get("bytes_total", 0)),
        current=str(p.get("current", "")),
        steps_done=int(p.get("steps_done", 0)),
        steps_total=int(p.get("steps_total", 0)),
        unit=str(p.get("unit", "")),
        metrics={k: float(v) for k, v in (p.get("metrics") or {}).items()},
    )


def json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def struct_of(d: dict[str, Any]) -> Any:
    """A ``google.protobuf.Struct`` of a JSON-like dict (anything else as its string)."""
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update(json_safe(d))
    return s


def integral(v: Any) -> Any:
    """A Struct carries every number as a double: whole ones back to ints (a config means integers there)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: integral(x) for k, x in v.items()}
    if isinstance(v, list):
        return [integral(x) for x in v]
    return v


def natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
