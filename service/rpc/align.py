"""AlignmentService: Git Re-Basin alignment as jobs of kind "align" (:mod:`service.jobs.kinds.align`).

A thin protobuf <-> library translation; the job is watched, cancelled and retried with JobService.
"""

from __future__ import annotations

import uuid
from typing import Any

from google.protobuf import json_format

from service._proto.weightsmith.v1 import alignment_service_pb2 as apb
from service._proto.weightsmith.v1 import alignment_service_pb2_grpc as apb_grpc
from service.jobs.manager import JobManager
from service.jobs.store import JobRecord
from service.rpc.convert import handle_errors, struct_of
from service.rpc.jobs import CONVERT, job_pb

ALIGNMENT_SERVICE = apb.DESCRIPTOR.services_by_name["AlignmentService"].full_name



def _align_spec(rec: JobRecord) -> Any:
    fields = {f.name for f in apb.CreateAlignJobRequest.DESCRIPTOR.fields}
    msg = json_format.ParseDict(
        {k: v for k, v in rec.spec.items() if k in fields and v not in ("", None)},
        apb.CreateAlignJobRequest(),
    )
    msg.request_id = rec.request_id
    msg.output_path = rec.output_path
    return msg


def align_result_pb(rec: JobRecord) -> apb.AlignResult:
    r = rec.result or {}
    perms = r.get("permutations")
    return apb.AlignResult(
        output_path=r.get("out_dir", ""),
        output_ref=f"job://{rec.id}",
        method=r.get("method", ""),
        objective=float(r.get("objective", 0.0)),
        iterations=int(r.get("iterations", 0)),
        restarts=[float(x) for x in r.get("restarts", [])],
        permutations=[apb.Permutation(id=k, indices=v) for k, v in (perms or {}).items()],
        permutations_inline=perms is not None,
        spec=struct_of(r.get("spec") or {}),
        tensors_total=int(r.get("n_tensors", 0)),
        bytes_written=int(r.get("bytes_written", 0)),
        units_fixed=int(r.get("units_fixed", 0)),
        units_total=int(r.get("units_total", 0)),
        seconds=float(r.get("seconds", 0.0)),
    )


CONVERT["align"] = (_align_spec, align_result_pb)


class AlignmentServicer(apb_grpc.AlignmentServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.m = manager

    @handle_errors()
    async def CreateAlignJob(
        self, request: apb.CreateAlignJobRequest, context: Any
    ) -> apb.CreateAlignJobResponse:
        from service.jobs.kinds import align as kind_align

        req = kind_align.normalize(
            json_format.MessageToDict(
                request, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )
        prev, req_hash = self.m.previous_request(request.request_id, {"kind": "align", **req})
        if prev is not None:
            return apb.CreateAlignJobResponse(job=job_pb(prev))
        job_id = uuid.uuid4().hex
        sub = await kind_align.admit(self.m, req, job_id)
        rec = await self.m.submit(job_id, sub, request.request_id, req_hash)
        return apb.CreateAlignJobResponse(job=job_pb(rec))

    @handle_errors()
    async def ListAlignmentMethods(
        self, request: apb.ListAlignmentMethodsRequest, context: Any
    ) -> apb.ListAlignmentMethodsResponse:
        from service.jobs.kinds import align as kind_align

        return apb.ListAlignmentMethodsResponse(
            methods=[apb.AlignmentMethod(name=k, summary=v) for k, v in kind_align.METHODS.items()],
            architectures=kind_align.architectures(),
            paper=kind_align.PAPER,
            url=kind_align.URL,
        )


def add_servicers(manager: JobManager, server: Any) -> list[str]:
    apb_grpc.add_AlignmentServiceServicer_to_server(AlignmentServicer(manager), server)
    return [ALIGNMENT_SERVICE]
