"""MergeService: create merge jobs, list merge methods, and the merge-shaped view of the generic jobs.

A merge is an ordinary job kind (:mod:`service.jobs.kinds.merge`): ``CreateMergeJob`` runs the kind's
admission and the manager's one ``submit``; ``Get/Watch/Cancel/Retry/ListMergeJobs`` are the
JobService RPCs restricted to merges (a job of another kind is NOT_FOUND here), their answer the
generic ``weightsmith.v1.Job`` seen as a ``MergeJob`` (:func:`service.messages.merge_job_pb`). The wire contract of
``weightsmith.v1.MergeService`` is unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import json_format

from service._proto.weightsmith.v1 import merge_service_pb2 as mpb
from service._proto.weightsmith.v1 import merge_service_pb2_grpc as mpb_grpc
from service.jobs.kinds import merge as kind_merge
from service.jobs.manager import JobManager
from service.jobs.recipe_text import parse_recipe_text
from service.jobs.store import JobRecord, ServiceError
from service.messages import merge_job_pb
from service.rpc.convert import handle_errors, handle_stream_errors, json_safe
from service.rpc.jobs import CONVERT, job_pb, list_jobs, watch_jobs

MERGE_SERVICE = mpb.DESCRIPTOR.services_by_name["MergeService"].full_name


def result_pb(job_id: str, res: dict[str, Any]) -> mpb.MergeResult:
    return mpb.MergeResult(
        output_path=res.get("out_dir", ""),
        output_ref=f"job://{job_id}",
        method=res.get("method", ""),
        tensors_total=int(res.get("n_tensors", 0)),
        bytes_written=int(res.get("bytes_written", 0)),
        shards=list(res.get("shards", [])),
        seconds=float(res.get("seconds", 0.0)),
        models=[
            mpb.ResolvedModel(
                ref=m.get("ref") or "",
                path=m.get("path") or "",
                repo_id=m.get("repo_id") or "",
                revision=m.get("revision") or "",
                commit=m.get("commit") or "",
            )
            for m in res.get("models", [])
        ],
    )


def plan_pb(s: dict[str, Any] | None) -> mpb.MergePlanSummary | None:
    if not s:
        return None
    return mpb.MergePlanSummary(
        method=s["method"],
        models=list(s["models"]),
        tensors_total=s["n_tensors"],
        tensors_merged=s["n_merged"],
        tensors_copied=s["n_copied"],
        bytes_in=s["bytes_in"],
        bytes_out=s["bytes_out"],
        compute_dtype=s["compute_dtype"],
        peak_bytes_estimate=s["peak_bytes_estimate"],
    )


def _options_pb(options: dict[str, Any]) -> mpb.MergeJobOptions:
    return mpb.MergeJobOptions(
        compute_dtype=options.get("compute_dtype", ""),
        shard_size=int(options.get("shard_size", 0)),
        workers=int(options.get("workers", 0)),
    )


def _merge_spec(rec: JobRecord) -> mpb.CreateMergeJobRequest:
    return mpb.CreateMergeJobRequest(
        request_id=rec.request_id,
        recipe_yaml=kind_merge.recipe_yaml(rec.spec),
        output_path=rec.output_path,
        overwrite=rec.overwrite,
        options=_options_pb(rec.spec.get("options", {})),
    )


CONVERT["merge"] = (_merge_spec, lambda rec: result_pb(rec.id, rec.result or {}))


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
        if not self.m.accepting:
            raise ServiceError("UNAVAILABLE", "the server is shutting down and takes no new jobs")
        options = kind_merge.normalize_options(
            {
                "compute_dtype": request.options.compute_dtype,
                "shard_size": request.options.shard_size,
                "workers": request.options.workers,
            },
            self.m.config.job_workers,
        )
        resp = mpb.CreateMergeJobResponse()
        request_id = "" if request.validate_only else request.request_id
        prev, req_hash = self.m.previous_request(
            request_id,
            {"recipe": recipe, "output_path": request.output_path, "overwrite": request.overwrite, "options": options},
        )
        if prev is not None:
            resp.job.CopyFrom(merge_job_pb(job_pb(prev)))
            return resp
        job_id = uuid.uuid4().hex
        sub, plan = await kind_merge.admit(
            self.m, recipe, request.output_path, request.overwrite, options, job_id
        )
        if plan is not None:
            resp.plan.CopyFrom(plan_pb(plan))
        if request.validate_only:
            self.m.claim(sub)
            return resp
        rec = await self.m.submit(job_id, sub, request_id, req_hash)
        resp.job.CopyFrom(merge_job_pb(job_pb(rec)))
        return resp

    @handle_errors("name")
    async def GetMergeJob(self, request: mpb.GetMergeJobRequest, context: Any) -> mpb.GetMergeJobResponse:
        return mpb.GetMergeJobResponse(job=merge_job_pb(job_pb(self.m.get(request.name, "merge"))))

    @handle_stream_errors("name")
    async def WatchMergeJob(
        self, request: mpb.WatchMergeJobRequest, context: Any
    ) -> AsyncIterator[mpb.WatchMergeJobResponse]:
        async for ev in watch_jobs(self.m, request.name, request.from_sequence, "merge"):
            yield mpb.WatchMergeJobResponse(sequence=ev.sequence, time=ev.time, job=merge_job_pb(ev.job))

    @handle_errors("name")
    async def CancelMergeJob(
        self, request: mpb.CancelMergeJobRequest, context: Any
    ) -> mpb.CancelMergeJobResponse:
        return mpb.CancelMergeJobResponse(job=merge_job_pb(job_pb(await self.m.cancel(request.name, "merge"))))

    @handle_errors("name")
    async def RetryMergeJob(
        self, request: mpb.RetryMergeJobRequest, context: Any
    ) -> mpb.RetryMergeJobResponse:
        return mpb.RetryMergeJobResponse(job=merge_job_pb(job_pb(await self.m.retry(request.name, "merge"))))

    @handle_errors("states")
    async def ListMergeJobs(
        self, request: mpb.ListMergeJobsRequest, context: Any
    ) -> mpb.ListMergeJobsResponse:
        jobs, token = list_jobs(self.m, request.states, ["merge"], request.page_size, request.page_token)
        return mpb.ListMergeJobsResponse(jobs=[merge_job_pb(j) for j in jobs], next_page_token=token)

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


def add_servicers(manager: JobManager, server: Any) -> list[str]:
    """Register this module's service on ``server``; returns its full name (health, reflection)."""
    mpb_grpc.add_MergeServiceServicer_to_server(MergeServicer(manager), server)
    return [MERGE_SERVICE]


__all__ = ["MERGE_SERVICE", "MergeServicer", "add_servicers"]
