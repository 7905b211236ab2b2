"""LineageService: ``metanets.lineage.detect_lineage`` over gRPC (a thin protobuf <-> library translation).

The task of Yu & Wang, "Neural Lineage", CVPR 2024: which candidate was the child fine-tuned from, or
none of them. The call reads models by reference and writes nothing, so it is an RPC, not a job: it
runs in a thread of the server (at most ``max_running`` at once), streams the library's progress
reports as they come, then the ranked candidates one message each, then the answer. Every reference
is resolved through the server's roots first (PERMISSION_DENIED / INVALID_ARGUMENT for one outside
them or malformed, before any work); a candidate that is missing or unreadable is skipped with its
reason, as in the library. A client that cancels the call stops the computation at the library's
next progress report.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from merge.errors import ModelNotFoundError, WeightsmithError
from service._proto.weightsmith.v1 import lineage_service_pb2 as lpb
from service._proto.weightsmith.v1 import lineage_service_pb2_grpc as lpb_grpc
from service.jobs.manager import JobManager
from service.jobs.store import ServiceError
from service.rpc.convert import handle_errors, handle_stream_errors, struct_of

LINEAGE_SERVICE = lpb.DESCRIPTOR.services_by_name["LineageService"].full_name

class _Stopped(Exception):
    """Raised from the library's progress callback when the client went away."""



def _candidate_pb(c: Any, layers: bool) -> lpb.CandidateScore:
    msg = lpb.CandidateScore(
        name=c.name,
        ref=c.ref,
        rank=c.rank,
        score=float(c.score),
        related=bool(c.related),
        votes=float(c.votes),
        coverage=float(c.coverage),
        n_tensors=int(c.n_tensors),
        permuted=bool(c.permuted),
        metrics={k: float(v) for k, v in c.metrics.items()},
        details=struct_of(c.to_json(layers=layers)),
    )
    if c.fixed_fraction is not None:
        msg.fixed_fraction = float(c.fixed_fraction)
    if c.path is not None:
        msg.path = float(c.path)
    return msg


def _answer_pb(r: Any) -> lpb.LineageAnswer:
    msg = lpb.LineageAnswer(
        child=r.child,
        method=r.method,
        parent=r.parent or "",
        answer="parent" if r.parent is not None else "none",
        reason=r.reason,
        chain=list(r.chain),
        skipped=[lpb.LineageSkipped(name=s.name, ref=s.ref, reason=s.reason) for s in r.skipped],
        seconds=float(r.seconds),
        bytes_read=int(r.bytes_read),
        result=struct_of({k: v for k, v in r.to_json(layers=False).items() if k != "candidates"}),
    )
    if r.margin is not None:
        msg.margin = float(r.margin)
    return msg


def _graph_pb(g: Any) -> lpb.ModelGraph:
    return lpb.ModelGraph(
        models=list(g.models),
        families=[lpb.ModelGraphFamily(models=list(c)) for c in g.clusters],
        roots=list(g.roots),
        edges=[
            lpb.ModelGraphEdge(
                parent=e.parent, child=e.child, kind=e.kind, distance=e.distance, confidence=e.confidence,
                weight=e.weight,
            )
            for e in g.edges
        ],
        merges=[
            lpb.ModelGraphMerge(name=m.name, components=dict(m.components), base=m.base or "", residual=m.residual)
            for m in g.merges.values()
        ],
        skipped=[lpb.LineageSkipped(name=k, ref=g.refs.get(k, k), reason=v) for k, v in g.skipped.items()],
        seconds=g.seconds,
        bytes_read=g.bytes_read,
        graph=struct_of(g.to_json()),
    )


def _check_ref(resolver: Any, ref: str, field: str, *, required: bool) -> None:
    """A lineage input: a server path, upload:// or job:// reference inside the roots (not a Hub model);
    a missing one is an error only when ``required`` (the library skips a missing candidate, with why)."""
    if resolver.kind(ref) == "hub":
        raise ServiceError(
            "FAILED_PRECONDITION",
            f"{field}: {ref!r}: lineage takes server paths, upload:// and job:// references, not Hub models",
            field,
        )
    try:
        resolver(ref, field)
    except ModelNotFoundError:
        if required:
            raise


def _named_refs(resolver: Any, entries: Any, field: str) -> dict[str, str]:
    """``{name: reference}`` of repeated LineageCandidate ``entries``, each checked (:func:`_check_ref`)."""
    names: dict[str, str] = {}
    for i, c in enumerate(entries):
        if not c.model:
            raise ServiceError("INVALID_ARGUMENT", f"{field}[{i}].model: empty reference", field)
        _check_ref(resolver, c.model, f"{field}[{i}].model", required=False)
        name = c.name or c.model
        if name in names:
            raise ServiceError("INVALID_ARGUMENT", f"{field}[{i}]: duplicate name {name!r}", field)
        names[name] = c.model
    return names


class LineageServicer(lpb_grpc.LineageServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.m = manager
        self._slots = asyncio.Semaphore(max(1, manager.config.max_running))

    def _kwargs(self, request: lpb.DetectLineageRequest) -> dict[str, Any]:
        """The library call's arguments, every reference checked against the roots (nothing read yet)."""
        from metanets.lineage.methods import lineage_methods

        method = request.method or "weights"
        served = [m.name for m in lineage_methods(served=True)]
        if method not in served:
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"method: unknown lineage method {method!r} (served: {', '.join(served)})",
                "method",
            )
        if not request.child:
            raise ServiceError("INVALID_ARGUMENT", "child: a model reference is required", "child")
        if not request.candidates:
            raise ServiceError("INVALID_ARGUMENT", "candidates: give at least one candidate", "candidates")
        if len(request.candidates) > self.m.config.max_models:
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"candidates: {len(request.candidates)}, more than this server's limit of {self.m.config.max_models}",
                "candidates",
            )
        resolver = self.m.resolver()
        _check_ref(resolver, request.child, "child", required=True)
        names = _named_refs(resolver, request.candidates, "candidates")
        if method == "learned" and not request.detector_ref:
            raise ServiceError(
                "INVALID_ARGUMENT", "detector_ref: method 'learned' needs a detector", "detector_ref"
            )
        if request.architecture and request.spec_ref:
            raise ServiceError("INVALID_ARGUMENT", "give architecture or spec_ref, not both", "spec_ref")
        kw: dict[str, Any] = {
            "method": method,
            "child_name": request.child,
            "heads": None if request.keep_heads else "auto",
            "exclude": list(request.exclude),
            "spectral": {"": "auto", "auto": "auto", "on": True, "off": False}.get(request.spectral, None),
            "spectral_max_dim": request.spectral_max_dim or 256,
            "resolver": lambda ref: resolver(ref, f"model '{ref}'"),
            "allow_pickle": False,
            "workers": 1,
        }
        if kw["spectral"] is None:
            raise ServiceError("INVALID_ARGUMENT", "spectral: 'auto', 'on' or 'off'", "spectral")
        if request.HasField("family_threshold"):
            kw["family_threshold"] = request.family_threshold
        if request.HasField("path_threshold"):
            kw["path_threshold"] = request.path_threshold
        if request.architecture:
            kw["architecture"], kw["n_heads"] = request.architecture, request.n_heads
        if request.spec_ref:
            kw["spec"] = self.m.confine_path(request.spec_ref, "spec_ref")
        if request.detector_ref:
            kw["detector"] = self.m.confine_path(request.detector_ref, "detector_ref")
        return {"child": request.child, "candidates": names, **kw}

    async def _in_thread(self, fn: Any) -> Any:
        """Run ``fn(progress)`` in a worker thread under the server's slots; yield ``("progress", (stage,
        done, total))`` as it reports and finally ``("result", value)``. Closing the stream (a cancelled
        call) stops the work at its next progress report."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def progress(stage: str, done: int, total: int) -> None:
            if stop.is_set():
                raise _Stopped()
            loop.call_soon_threadsafe(queue.put_nowait, ("progress", (stage, done, total)))

        def work() -> None:
            try:
                out: tuple[str, Any] = ("result", fn(progress))
            except BaseException as e:  # noqa: BLE001 - handed to the RPC, which maps it to a status
                out = ("error", e)
            loop.call_soon_threadsafe(queue.put_nowait, out)

        async with self._slots:
            task = asyncio.ensure_future(asyncio.to_thread(work))
            try:
                while True:
                    what, value = await queue.get()
                    if what == "error":
                        if isinstance(value, WeightsmithError | _Stopped):
                            raise value
                        raise RuntimeError("lineage work failed") from value
                    yield what, value
                    if what == "result":
                        break
            finally:
                stop.set()
                await asyncio.shield(task)

    @handle_stream_errors()
    async def DetectLineage(self, request: lpb.DetectLineageRequest, context: Any) -> Any:
        from metanets.lineage import detect_lineage

        kw = self._kwargs(request)
        value = None
        async for what, v in self._in_thread(lambda progress: detect_lineage(**kw, progress=progress)):
            if what == "progress":
                yield lpb.DetectLineageResponse(progress=lpb.LineageProgress(stage=v[0], done=v[1], total=v[2]))
            else:
                value = v
        for c in value.candidates:
            yield lpb.DetectLineageResponse(candidate=_candidate_pb(c, request.layers))
        yield lpb.DetectLineageResponse(answer=_answer_pb(value))

    def _graph_kwargs(self, request: lpb.RecoverModelGraphRequest) -> dict[str, Any]:
        """recover_model_graph's arguments, every reference checked against the roots (nothing read yet)."""
        if len(request.models) < 2:
            raise ServiceError("INVALID_ARGUMENT", "models: give at least two models", "models")
        if len(request.models) > self.m.config.max_models:
            raise ServiceError(
                "RESOURCE_EXHAUSTED",
                f"models: {len(request.models)}, more than this server's limit of {self.m.config.max_models}",
                "models",
            )
        if request.direction not in ("", "auto", "norm", "kurtosis", "none"):
            raise ServiceError("INVALID_ARGUMENT", "direction: auto, norm, kurtosis or none", "direction")
        resolver = self.m.resolver()
        names = _named_refs(resolver, request.models, "models")
        kw: dict[str, Any] = {
            "direction": request.direction or "auto",
            "merges": not request.no_merges,
            "heads": None if request.keep_heads else "auto",
            "exclude": list(request.exclude),
            "resolver": lambda ref: resolver(ref, f"model '{ref}'"),
            "allow_pickle": False,
            "workers": 1,
        }
        if request.HasField("family_threshold"):
            kw["family_threshold"] = request.family_threshold
        if request.HasField("merge_threshold"):
            kw["merge_threshold"] = request.merge_threshold
        return {"models": names, **kw}

    @handle_stream_errors()
    async def RecoverModelGraph(self, request: lpb.RecoverModelGraphRequest, context: Any) -> Any:
        from metanets.lineage import recover_model_graph

        kw = self._graph_kwargs(request)
        g = None
        async for what, v in self._in_thread(lambda progress: recover_model_graph(**kw, progress=progress)):
            if what == "progress":
                yield lpb.RecoverModelGraphResponse(
                    progress=lpb.LineageProgress(stage=v[0], done=v[1], total=v[2])
                )
            else:
                g = v
        yield lpb.RecoverModelGraphResponse(graph=_graph_pb(g))

    @handle_errors()
    async def ListLineageMethods(
        self, request: lpb.ListLineageMethodsRequest, context: Any
    ) -> lpb.ListLineageMethodsResponse:
        from metanets.lineage.methods import lineage_methods

        return lpb.ListLineageMethodsResponse(
            methods=[
                lpb.LineageMethod(name=m.name, summary=m.summary, needs=list(m.service_needs or ()))
                for m in lineage_methods(served=True)
            ]
        )


def add_servicers(manager: JobManager, server: Any) -> list[str]:
    lpb_grpc.add_LineageServiceServicer_to_server(LineageServicer(manager), server)
    return [LINEAGE_SERVICE]
