"""JobService: every job, whatever its kind (a thin protobuf <-> job store translation).

Jobs are one mechanism (:mod:`service.jobs.manager`, :mod:`service.jobs.kind`); this module turns a job record of
any kind into ``weightsmith.v1.Job`` (its normalized request and its result packed as ``Any``) and
serves the RPCs that read, watch, cancel, retry and list jobs. Each kind's service module registers
how its request and result convert (:data:`CONVERT`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from service._proto.weightsmith.v1 import job_service_pb2 as jpb
from service._proto.weightsmith.v1 import job_service_pb2_grpc as jpb_grpc
from service.jobs.kind import all_kinds
from service.jobs.manager import INTERRUPTED, SUCCEEDED, JobManager
from service.jobs.store import TERMINAL, JobEvent, JobRecord, ServiceError
from service.rpc.convert import (
    STATE_NAMES,
    STATES,
    handle_errors,
    handle_stream_errors,
    progress_pb,
    ts,
)

JOB_SERVICE = jpb.DESCRIPTOR.services_by_name["JobService"].full_name


#: per kind: (its normalized request as the Create message, its result message); each kind's service
#: module adds its own
CONVERT: dict[str, tuple[Callable[[JobRecord], Any], Callable[[JobRecord], Any]]] = {}


def job_pb(rec: JobRecord, event: JobEvent | None = None) -> jpb.Job:
    """A job of any kind as ``weightsmith.v1.Job``; with ``event``, as of that event."""
    latest = event is None or event.seq >= rec.last_seq
    state = rec.state if event is None else event.state
    job = jpb.Job(
        name=rec.name,
        kind=rec.kind,
        state=STATES[state],
        progress=progress_pb(rec.progress if event is None else event.progress),
        create_time=ts(rec.create_time),
        request_id=rec.request_id,
        attempt=rec.attempt,
        estimated_peak_bytes=rec.est_bytes,
        cancel_requested=rec.cancel_requested and latest,
        last_sequence=rec.last_seq if event is None else event.seq,
        summary=rec.summary,
        output_path=rec.output_path,
    )
    spec_of, result_of = CONVERT[rec.kind]
    job.spec.Pack(spec_of(rec))
    if rec.start_time is not None and (latest or state != "QUEUED"):
        job.start_time.CopyFrom(ts(rec.start_time))
    if latest:
        if rec.end_time is not None:
            job.end_time.CopyFrom(ts(rec.end_time))
        if rec.error_code and (state in TERMINAL or state == INTERRUPTED):
            job.error.code = rec.error_code
            job.error.message = rec.error_message or ""
        if rec.result is not None and state == SUCCEEDED:
            job.result.Pack(result_of(rec))
    return job


def list_jobs(
    manager: JobManager, states: Any, kinds: list[str], page_size: int, page_token: str
) -> tuple[list[jpb.Job], str]:
    """A page of jobs (newest first) in ``states`` (JobState values) of ``kinds`` (all when empty)."""
    names = []
    for s in states:
        if s not in STATE_NAMES:
            raise ServiceError("INVALID_ARGUMENT", f"states: {s} is not a job state", "states")
        names.append(STATE_NAMES[s])
    known = {k.name for k in all_kinds()}
    for k in kinds:
        if k not in known:
            raise ServiceError(
                "INVALID_ARGUMENT", f"kinds: {k!r} is not a job kind (known: {', '.join(sorted(known))})", "kinds"
            )
    recs, token = manager.list(names, page_size, page_token, list(kinds) or None)
    return [job_pb(r) for r in recs], token


async def watch_jobs(
    manager: JobManager, name: str, from_sequence: int, kind: str | None = None
) -> AsyncIterator[jpb.WatchJobResponse]:
    """The events of a job after ``from_sequence``, each with the job as of that event, until it ends."""
    async for ev, rec in manager.watch(name, from_sequence, kind):
        yield jpb.WatchJobResponse(sequence=ev.seq, time=ts(ev.time), job=job_pb(rec, ev))


class JobServicer(jpb_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.m = manager

    @handle_errors("name")
    async def GetJob(self, request: jpb.GetJobRequest, context: Any) -> jpb.GetJobResponse:
        return jpb.GetJobResponse(job=job_pb(self.m.get(request.name)))

    @handle_stream_errors("name")
    async def WatchJob(
        self, request: jpb.WatchJobRequest, context: Any
    ) -> AsyncIterator[jpb.WatchJobResponse]:
        async for ev in watch_jobs(self.m, request.name, request.from_sequence):
            yield ev

    @handle_errors("name")
    async def CancelJob(self, request: jpb.CancelJobRequest, context: Any) -> jpb.CancelJobResponse:
        return jpb.CancelJobResponse(job=job_pb(await self.m.cancel(request.name)))

    @handle_errors("name")
    async def RetryJob(self, request: jpb.RetryJobRequest, context: Any) -> jpb.RetryJobResponse:
        return jpb.RetryJobResponse(job=job_pb(await self.m.retry(request.name)))

    @handle_errors("states")
    async def ListJobs(self, request: jpb.ListJobsRequest, context: Any) -> jpb.ListJobsResponse:
        jobs, token = list_jobs(self.m, request.states, list(request.kinds), request.page_size, request.page_token)
        return jpb.ListJobsResponse(jobs=jobs, next_page_token=token)

    @handle_errors()
    async def ListJobKinds(self, request: jpb.ListJobKindsRequest, context: Any) -> jpb.ListJobKindsResponse:
        return jpb.ListJobKindsResponse(
            kinds=[
                jpb.JobKind(
                    name=k.name, summary=k.summary, create_rpcs=list(k.create_rpcs), result_type=k.result_type
                )
                for k in all_kinds()
            ]
        )


def add_servicers(manager: JobManager, server: Any) -> list[str]:
    """Register this module's services on ``server``; returns their full names (health, reflection)."""
    jpb_grpc.add_JobServiceServicer_to_server(JobServicer(manager), server)
    return [JOB_SERVICE]
