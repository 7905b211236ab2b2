"""Protobuf views shared by the server and its clients (no server code: the client imports this).

A merge is an ordinary job: the server keeps one ``weightsmith.v1.Job`` per job, whatever its kind.
``MergeService`` (and ``weightsmith remote merge --json``) still answer the merge-shaped ``MergeJob``
of the contract; :func:`merge_job_pb` is the one place that shape is built, from the generic job.
"""

from __future__ import annotations

from service._proto.weightsmith.v1 import job_service_pb2 as jpb
from service._proto.weightsmith.v1 import merge_service_pb2 as mpb


def merge_job_pb(job: jpb.Job) -> mpb.MergeJob:
    """A merge job as ``MergeService`` shows it: the generic ``Job`` with its spec and result unpacked."""
    spec = mpb.CreateMergeJobRequest()
    job.spec.Unpack(spec)
    out = mpb.MergeJob(
        name=job.name,
        state=job.state,
        progress=job.progress,
        create_time=job.create_time,
        request_id=job.request_id,
        recipe_yaml=spec.recipe_yaml,
        method=job.summary,
        output_path=job.output_path,
        overwrite=spec.overwrite,
        options=spec.options,
        attempt=job.attempt,
        estimated_peak_bytes=job.estimated_peak_bytes,
        cancel_requested=job.cancel_requested,
        last_sequence=job.last_sequence,
    )
    for f in ("start_time", "end_time", "error"):
        if job.HasField(f):
            getattr(out, f).CopyFrom(getattr(job, f))
    if job.HasField("result"):
        job.result.Unpack(out.result)
    return out
