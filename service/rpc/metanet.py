"""MetanetService: zoo builds and metanet training as jobs (:mod:`service.jobs.kinds.metanet`), the stored
metanets by id, and ``Predict`` / ``Embed`` (``metanets.train.predict`` / ``embed``) on checkpoints by
reference. Thin protobuf <-> library translations; every path goes through the server's roots.

A trained metanet is ``metanets/<id>``: the id of the "train" job that wrote it, so the job store is
the metanet registry (listed newest first, paged like jobs). ``Predict``/``Embed`` run in a server
thread (at most ``max_running`` calls at once) on the server's ``--device``.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from merge.errors import ModelNotFoundError
from service._proto.weightsmith.v1 import metanet_service_pb2 as npb
from service._proto.weightsmith.v1 import metanet_service_pb2_grpc as npb_grpc
from service.jobs.manager import SUCCEEDED, JobManager
from service.jobs.recipe_text import parse_recipe_text
from service.jobs.store import JobRecord, ServiceError
from service.rpc.convert import handle_errors, integral, struct_of, ts
from service.rpc.jobs import CONVERT, job_pb

METANET_SERVICE = npb.DESCRIPTOR.services_by_name["MetanetService"].full_name
MAX_CHECKPOINTS = 1024
_ID = re.compile(r"^[0-9a-f]{32}$")



def _dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)



def metanet_pb(rec: JobRecord) -> npb.Metanet:
    """The metanet a succeeded "train" job wrote."""
    msg = card_pb(f"metanets/{rec.id}", (rec.result or {}).get("card", {}), rec.output_path)
    msg.create_time.CopyFrom(ts(rec.end_time))
    return msg


def card_pb(name: str, card: dict[str, Any], path: str) -> npb.Metanet:
    t = card.get("target", {})
    return npb.Metanet(
        name=name,
        display_name=card.get("display_name", ""),
        model=card.get("model", ""),
        target=t.get("name", ""),
        target_kind=t.get("kind", ""),
        classes=[c if isinstance(c, str) else json.dumps(c) for c in t.get("classes") or []],
        zoo_path=card.get("zoo", {}).get("path", ""),
        zoo_sha256=card.get("zoo", {}).get("sha256", ""),
        metrics={k: float(v) for k, v in card.get("metrics", {}).items() if isinstance(v, int | float)},
        history=[
            npb.TrainEpoch(
                epoch=int(h["epoch"]),
                train_loss=float(h["train_loss"]),
                val_loss=float(h["val_loss"]),
                seconds=float(h.get("seconds", 0.0)),
            )
            for h in card.get("history", [])
        ],
        path=path,
        card=struct_of({k: v for k, v in card.items() if k != "test_predictions"}),
    )


def _zoo_result(rec: JobRecord) -> npb.ZooResult:
    r = rec.result or {}
    return npb.ZooResult(
        output_path=r.get("out_dir", ""),
        output_ref=f"job://{rec.id}",
        runs=int(r.get("runs", 0)),
        models=int(r.get("models", 0)),
        built_runs=int(r.get("built_runs", 0)),
        seconds=float(r.get("seconds", 0.0)),
        complete=bool(r.get("complete")),
        summary=struct_of(r.get("summary") or {}),
    )


def _zoo_spec(rec: JobRecord) -> npb.CreateZooJobRequest:
    return npb.CreateZooJobRequest(
        request_id=rec.request_id,
        config_struct=struct_of(rec.spec.get("config", {})),
        output_path=rec.output_path,
        workers=int(rec.spec.get("workers", 0)),
    )


def _train_spec(rec: JobRecord) -> npb.CreateTrainJobRequest:
    c = dict(rec.spec.get("config", {}))
    msg = npb.CreateTrainJobRequest(
        request_id=rec.request_id,
        zoo=rec.spec.get("zoo", ""),
        model=c.get("model", ""),
        target=c.get("target", ""),
        target_kind=c.get("kind", "") if c.get("kind") != "auto" else "",
        epochs=int(c.get("epochs", 0)),
        batch_size=int(c.get("batch_size", 0)),
        lr=float(c.get("lr", 0.0)),
        weight_decay=float(c.get("weight_decay", 0.0)),
        patience=int(c.get("patience", 0)),
        split=[float(x) for x in c.get("split", [])],
        split_seed=int(c.get("split_seed", 0)),
        train_fraction=float(c.get("train_fraction", 0.0)),
        seed=int(c.get("seed", 0)),
        output_path=rec.output_path,
        display_name=rec.spec.get("display_name", ""),
    )
    msg.where.update(c.get("where") or {})
    msg.model_args.update(c.get("model_args") or {})
    return msg


CONVERT["zoo"] = (_zoo_spec, _zoo_result)
CONVERT["train"] = (_train_spec, lambda rec: npb.TrainResult(metanet=metanet_pb(rec)))


def _checkpoint_bytes(path: Path) -> int:
    """Tensor bytes of a checkpoint, from its headers (a malformed one raises, naming the file)."""
    from merge.checkpoint import open_checkpoint

    ck = open_checkpoint(path)
    try:
        return ck.total_bytes
    finally:
        ck.close()


class MetanetServicer(npb_grpc.MetanetServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.m = manager
        self._slots = asyncio.Semaphore(max(1, manager.config.max_running))

    # -- jobs -----------------------------------------------------------------------------------------
    @handle_errors()
    async def CreateZooJob(self, request: npb.CreateZooJobRequest, context: Any) -> npb.CreateZooJobResponse:
        from service.jobs.kinds import metanet as kind_metanet

        which = request.WhichOneof("config")
        if which is None:
            raise ServiceError("INVALID_ARGUMENT", "config: give config_yaml or config_struct", "config")
        if which == "config_yaml":
            config = parse_recipe_text(request.config_yaml)
        else:  # a Struct carries every number as a double; zoo configs mean integers where they are whole
            config = integral(_dict(request.config_struct))
        req = {"config": config, "output_path": request.output_path, "workers": request.workers}
        prev, req_hash = self.m.previous_request(request.request_id, {"kind": "zoo", **req})
        if prev is not None:
            return npb.CreateZooJobResponse(job=job_pb(prev))
        job_id = uuid.uuid4().hex
        sub = await kind_metanet.admit_zoo(self.m, req, job_id)
        return npb.CreateZooJobResponse(
            job=job_pb(await self.m.submit(job_id, sub, request.request_id, req_hash))
        )

    @handle_errors()
    async def CreateTrainJob(
        self, request: npb.CreateTrainJobRequest, context: Any
    ) -> npb.CreateTrainJobResponse:
        from service.jobs.kinds import metanet as kind_metanet

        req = _dict(request)
        req.pop("request_id", None)
        prev, req_hash = self.m.previous_request(request.request_id, {"kind": "train", **req})
        if prev is not None:
            return npb.CreateTrainJobResponse(job=job_pb(prev))
        job_id = uuid.uuid4().hex
        sub = await kind_metanet.admit_train(self.m, req, job_id)
        return npb.CreateTrainJobResponse(
            job=job_pb(await self.m.submit(job_id, sub, request.request_id, req_hash))
        )

    # -- stored metanets ------------------------------------------------------------------------------
    def _trained(self, name: str) -> JobRecord | None:
        jid = name.removeprefix("metanets/")
        if not _ID.match(jid):
            if name.startswith("metanets/"):
                raise ServiceError("NOT_FOUND", f"metanet '{name}' not found", "metanet")
            return None
        rec = self.m.store.get(jid)
        if rec is None or rec.kind != "train" or rec.state != SUCCEEDED:
            raise ServiceError("NOT_FOUND", f"metanet '{name}' not found", "metanet")
        return rec

    def _metanet_path(self, name: str, field: str = "metanet") -> Path:
        """``metanets/<id>`` / ``<id>`` of a trained metanet, or a metanet folder under a root."""
        if not name:
            raise ServiceError("INVALID_ARGUMENT", f"{field}: a metanet name is required", field)
        rec = self._trained(name)
        if rec is not None:
            return Path(rec.output_path)
        try:
            return Path(self.m.confine_path(name, field))
        except ModelNotFoundError:
            raise ServiceError("NOT_FOUND", f"{field}: metanet '{name}' not found", field) from None

    @handle_errors("page_token")
    async def ListMetanets(self, request: npb.ListMetanetsRequest, context: Any) -> npb.ListMetanetsResponse:
        from metanets.train import METANETS

        recs, token = self.m.list([SUCCEEDED], request.page_size, request.page_token, ["train"])
        return npb.ListMetanetsResponse(
            metanets=[metanet_pb(r) for r in recs], next_page_token=token, models=list(METANETS)
        )

    @handle_errors("name")
    async def GetMetanet(self, request: npb.GetMetanetRequest, context: Any) -> npb.GetMetanetResponse:
        rec = self._trained(request.name)
        if rec is not None:
            return npb.GetMetanetResponse(metanet=metanet_pb(rec))
        from metanets.train import load_metanet

        path = self._metanet_path(request.name, "name")
        _, card = await asyncio.to_thread(load_metanet, path)
        return npb.GetMetanetResponse(metanet=card_pb(str(path), card, str(path)))

    # -- predict / embed ------------------------------------------------------------------------------
    def _inputs(self, metanet: str, checkpoints: list[str], spec_ref: str) -> tuple[Path, Any, Any]:
        path = self._metanet_path(metanet)
        if not checkpoints:
            raise ServiceError("INVALID_ARGUMENT", "checkpoints: give at least one checkpoint", "checkpoints")
        if len(checkpoints) > MAX_CHECKPOINTS:
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"checkpoints: {len(checkpoints)}, more than {MAX_CHECKPOINTS} in one call",
                "checkpoints",
            )
        resolver = self.m.resolver()
        for i, ref in enumerate(checkpoints):
            if resolver.kind(ref) == "hub":
                raise ServiceError(
                    "FAILED_PRECONDITION",
                    f"checkpoints[{i}]: {ref!r}: give server paths, upload:// or job:// references",
                    "checkpoints",
                )
            res = resolver(ref, f"checkpoints[{i}]")  # roots, pickles, existence: before any work
            size = _checkpoint_bytes(Path(res.path))
            if size > self.m.config.memory_budget:
                raise ServiceError(
                    "RESOURCE_EXHAUSTED",
                    f"checkpoints[{i}]: {ref!r} holds {size:,} bytes of tensors, more than this server's memory "
                    f"budget of {self.m.config.memory_budget:,} bytes (Predict loads one checkpoint at a time)",
                    "checkpoints",
                )
        spec = None
        if spec_ref:
            from merge.symmetry import PermutationSpec

            spec = PermutationSpec.load(self.m.confine_path(spec_ref, "spec_ref"))
        return path, spec, lambda ref: resolver(ref, f"checkpoint '{ref}'")

    async def _call(self, fn_name: str, request: Any) -> tuple[list[dict[str, Any]], str]:
        import metanets.train as train

        path, spec, resolver = self._inputs(request.metanet, list(request.checkpoints), request.spec_ref)
        device = self.m.config.device
        fn = getattr(train, fn_name)
        async with self._slots:
            out = await asyncio.to_thread(
                fn, path, list(request.checkpoints), spec=spec, resolver=resolver, device=device
            )
        return out, device

    @handle_errors("metanet")
    async def Predict(self, request: npb.PredictRequest, context: Any) -> npb.PredictResponse:
        out, device = await self._call("predict", request)
        preds = []
        for ref, r in zip(request.checkpoints, out, strict=True):
            p = npb.Prediction(checkpoint=ref, probabilities=r.get("probabilities", {}))
            v = r["prediction"]
            if "probabilities" in r:
                p.label = v if isinstance(v, str) else json.dumps(v)
            else:
                p.number = float(v)
            preds.append(p)
        return npb.PredictResponse(
            metanet=request.metanet, target=out[0]["target"] if out else "", predictions=preds, device=device
        )

    @handle_errors("metanet")
    async def Embed(self, request: npb.EmbedRequest, context: Any) -> npb.EmbedResponse:
        out, device = await self._call("embed", request)
        return npb.EmbedResponse(
            metanet=request.metanet,
            embeddings=[
                npb.Embedding(checkpoint=ref, values=r["embedding"])
                for ref, r in zip(request.checkpoints, out, strict=True)
            ],
            device=device,
        )

    @handle_errors("zoo")
    async def GetZoo(self, request: npb.GetZooRequest, context: Any) -> npb.GetZooResponse:
        from metanets.zoo import Zoo
        from service.jobs.kinds.metanet import resolve_zoo

        path = await asyncio.to_thread(resolve_zoo, self.m, request.zoo)
        return npb.GetZooResponse(summary=struct_of(Zoo(path, verify=False).summary()))


def add_servicers(manager: JobManager, server: Any) -> list[str]:
    npb_grpc.add_MetanetServiceServicer_to_server(MetanetServicer(manager), server)
    return [METANET_SERVICE]
