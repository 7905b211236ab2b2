"""EvolveService: recipe searches (``merge.evolve.run_search``) as jobs of kind "evolve"
(:mod:`service.jobs.kinds.evolve`).

A thin protobuf <-> library translation; the job is watched, cancelled and retried with JobService.
"""

from __future__ import annotations

import uuid
from typing import Any

from google.protobuf import json_format

from service._proto.weightsmith.v1 import evolve_service_pb2 as epb
from service._proto.weightsmith.v1 import evolve_service_pb2_grpc as epb_grpc
from service.jobs.manager import JobManager
from service.jobs.recipe_text import parse_recipe_text
from service.jobs.store import JobRecord, ServiceError
from service.rpc.convert import handle_errors, integral, struct_of
from service.rpc.jobs import CONVERT, job_pb

EVOLVE_SERVICE = epb.DESCRIPTOR.services_by_name["EvolveService"].full_name




def _trial_pb(t: dict[str, Any]) -> epb.EvolveTrial:
    return epb.EvolveTrial(
        number=int(t.get("number", 0)),
        state=str(t.get("state", "")),
        method=str(t.get("method", "")),
        params=struct_of(t.get("params") or {}),
        values=[float(v) for v in t.get("values") or []],
        seconds=float(t.get("seconds") or 0.0),
        error=str(t.get("error") or ""),
    )


def evolve_result_pb(rec: JobRecord) -> epb.EvolveResult:
    r = rec.result or {}
    return epb.EvolveResult(
        output_path=r.get("out_dir", ""),
        output_ref=f"job://{rec.id}",
        objectives=list(r.get("objectives", [])),
        directions=list(r.get("directions", [])),
        trials=int(r.get("trials", 0)),
        complete=int(r.get("complete", 0)),
        best=[_trial_pb(t) for t in r.get("best", [])],
        best_recipe=r.get("best_recipe", ""),
        best_recipe_yaml=r.get("best_recipe_yaml", ""),
        stopped=r.get("stopped", ""),
        seconds=float(r.get("seconds", 0.0)),
        files=list(r.get("files", [])),
        executor=r.get("executor", ""),
    )


def _evolve_spec(rec: JobRecord) -> epb.CreateEvolveJobRequest:
    return epb.CreateEvolveJobRequest(
        request_id=rec.request_id,
        config_struct=struct_of(rec.spec.get("config", {})),
        output_path=rec.output_path,
        trials=int(rec.spec.get("trials") or 0),
        save_model=bool(rec.spec.get("save_model")),
    )


CONVERT["evolve"] = (_evolve_spec, evolve_result_pb)


class EvolveServicer(epb_grpc.EvolveServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.m = manager

    @handle_errors("config")
    async def CreateEvolveJob(
        self, request: epb.CreateEvolveJobRequest, context: Any
    ) -> epb.CreateEvolveJobResponse:
        from service.jobs.kinds import evolve as kind_evolve

        which = request.WhichOneof("config")
        if which is None:
            raise ServiceError("INVALID_ARGUMENT", "config: give config_yaml or config_struct", "config")
        if which == "config_yaml":
            try:
                config = parse_recipe_text(request.config_yaml)
            except ServiceError as e:  # it speaks of a recipe; here the text is a search config
                msg = str(e).removeprefix("recipe: ").replace("a recipe must", "a search config must")
                raise ServiceError(e.grpc_code, f"config_yaml: {msg}", "config_yaml") from None
        else:
            config = integral(json_format.MessageToDict(request.config_struct))
        req = {
            "config": config,
            "output_path": request.output_path,
            "trials": request.trials,
            "save_model": request.save_model,
        }
        prev, req_hash = self.m.previous_request(request.request_id, {"kind": "evolve", **req})
        if prev is not None:
            return epb.CreateEvolveJobResponse(job=job_pb(prev))
        job_id = uuid.uuid4().hex
        sub = await kind_evolve.admit(self.m, req, job_id)
        return epb.CreateEvolveJobResponse(
            job=job_pb(await self.m.submit(job_id, sub, request.request_id, req_hash))
        )


def add_servicers(manager: JobManager, server: Any) -> list[str]:
    epb_grpc.add_EvolveServiceServicer_to_server(EvolveServicer(manager), server)
    return [EVOLVE_SERVICE]
