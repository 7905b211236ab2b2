"""A small synchronous Python client for the weightsmith gRPC service.

    from service.client import Client
    with Client("127.0.0.1:50051", token="...") as c:
        job = c.create_merge_job(open("recipe.yaml").read(), output_path="merged/m1")
        for event in c.watch(job.name):           # reconnects and resumes by sequence number
            print(event.job.progress.tensors_done, "/", event.job.progress.tensors_total)
        print(c.get_job(job.name).result.output_path)

Every unary call has a deadline (``timeout``, default 30 s). Failures raise :class:`RemoteError`
carrying the status code name, the server's message and, for INVALID_ARGUMENT, the field it
named (from the ``google.rpc.BadRequest`` detail).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from service._proto.weightsmith.v1 import alignment_service_pb2 as apb
from service._proto.weightsmith.v1 import alignment_service_pb2_grpc as apb_grpc
from service._proto.weightsmith.v1 import checkpoint_service_pb2 as cpb
from service._proto.weightsmith.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from service._proto.weightsmith.v1 import evolve_service_pb2 as epb
from service._proto.weightsmith.v1 import evolve_service_pb2_grpc as epb_grpc
from service._proto.weightsmith.v1 import job_pb2
from service._proto.weightsmith.v1 import job_service_pb2 as jpb
from service._proto.weightsmith.v1 import job_service_pb2_grpc as jpb_grpc
from service._proto.weightsmith.v1 import lineage_service_pb2 as lpb
from service._proto.weightsmith.v1 import lineage_service_pb2_grpc as lpb_grpc
from service._proto.weightsmith.v1 import merge_service_pb2 as mpb
from service._proto.weightsmith.v1 import merge_service_pb2_grpc as mpb_grpc
from service._proto.weightsmith.v1 import metanet_service_pb2 as npb
from service._proto.weightsmith.v1 import metanet_service_pb2_grpc as npb_grpc
from service._proto.weightsmith.v1 import soup_service_pb2 as spb
from service._proto.weightsmith.v1 import soup_service_pb2_grpc as spb_grpc
from service.auth import channel_credentials

CHUNK = 1 << 20
TERMINAL_STATES = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def state_name(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


class RemoteError(Exception):
    """An RPC failed: ``code`` (e.g. "NOT_FOUND"), ``message``, ``field`` (INVALID_ARGUMENT only)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> RemoteError:
        code = e.code().name if hasattr(e, "code") and e.code() is not None else "UNKNOWN"
        message = e.details() if hasattr(e, "details") else str(e)
        field = None
        try:
            from google.rpc import error_details_pb2
            from grpc_status import rpc_status

            status = rpc_status.from_call(e)  # type: ignore[arg-type]
            if status is not None:
                for d in status.details:
                    if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                        br = error_details_pb2.BadRequest()
                        d.Unpack(br)
                        if br.field_violations:
                            field = br.field_violations[0].field
        except Exception:  # noqa: BLE001 - details are optional
            pass
        return cls(code, message or "", field)


def _deprecated(old: str, new: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    warnings.warn(f"Client.{old} is deprecated; use Client.{new} (jobs of every kind)", DeprecationWarning, 3)
    return fn


def _job_name(name: str) -> str:
    return name if name.startswith("jobs/") else f"jobs/{name}"


class Client:
    """Talks to one server. ``target`` is ``host:port``."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        timeout: float = 30.0,
        server_name_override: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 8 << 20),
            # a restarted server is found again within seconds (default backoff grows to 120 s)
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 3000),
        ]
        if server_name_override:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        if tls or tls_ca or tls_cert:
            self.channel = grpc.secure_channel(
                target, channel_credentials(tls_ca, tls_cert, tls_key), options=options
            )
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.merge = mpb_grpc.MergeServiceStub(self.channel)
        self.checkpoints = cpb_grpc.CheckpointServiceStub(self.channel)
        self.jobs = jpb_grpc.JobServiceStub(self.channel)
        self.alignment = apb_grpc.AlignmentServiceStub(self.channel)
        self.lineage = lpb_grpc.LineageServiceStub(self.channel)
        self.metanets = npb_grpc.MetanetServiceStub(self.channel)
        self.soups = spb_grpc.SoupServiceStub(self.channel)
        self.evolve = epb_grpc.EvolveServiceStub(self.channel)

    # -- plumbing ---------------------------------------------------------------------------------
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e) from None

    # -- health -------------------------------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """ "SERVING", "NOT_SERVING"... for ``service`` ("" = the whole server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except RemoteError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.target} not ready after {timeout} s")
            time.sleep(0.1)

    # -- merge jobs ---------------------------------------------------------------------------------
    def create_merge_job(
        self,
        recipe: str | dict[str, Any],
        *,
        output_path: str = "",
        overwrite: bool = False,
        request_id: str | None = None,
        compute_dtype: str = "",
        shard_size: int = 0,
        workers: int = 0,
        validate_only: bool = False,
    ) -> mpb.CreateMergeJobResponse:
        """Queue a merge (``recipe``: YAML text or a dict). Returns the response (``.job``, ``.plan``)."""
        req = mpb.CreateMergeJobRequest(
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            output_path=output_path,
            overwrite=overwrite,
            validate_only=validate_only,
            options=mpb.MergeJobOptions(compute_dtype=compute_dtype, shard_size=shard_size, workers=workers),
        )
        if isinstance(recipe, dict):
            req.recipe_struct.update(recipe)
        else:
            req.recipe_yaml = recipe
        # Safe to retry: the request id makes creation idempotent.
        for attempt in range(3):
            try:
                return self.merge.CreateMergeJob(req, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == 2 or not req.request_id:
                    raise RemoteError.from_rpc(e) from None
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    # -- jobs of every kind (JobService): one set of calls ------------------------------------------
    def get_job(self, name: str) -> jpb.Job:
        """The job ``jobs/<id>`` (or ``<id>``), whatever its kind (its result: :meth:`job_result`)."""
        return self._call(self.jobs.GetJob, jpb.GetJobRequest(name=_job_name(name))).job

    def cancel_job(self, name: str) -> jpb.Job:
        return self._call(self.jobs.CancelJob, jpb.CancelJobRequest(name=_job_name(name))).job

    def retry_job(self, name: str) -> jpb.Job:
        return self._call(self.jobs.RetryJob, jpb.RetryJobRequest(name=_job_name(name))).job

    def list_jobs(
        self,
        states: list[str] | None = None,
        page_size: int = 50,
        page_token: str = "",
        *,
        kinds: list[str] | None = None,
    ) -> tuple[list[jpb.Job], str]:
        """A page of jobs, newest first, in ``states`` ("queued", "running"...) of ``kinds`` ("merge"...)."""
        st = [job_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in states or []]
        resp = self._call(
            self.jobs.ListJobs,
            jpb.ListJobsRequest(page_size=page_size, page_token=page_token, states=st, kinds=kinds or []),
        )
        return list(resp.jobs), resp.next_page_token

    def iter_jobs(
        self, states: list[str] | None = None, page_size: int = 100, *, kinds: list[str] | None = None
    ) -> Iterator[jpb.Job]:
        token = ""
        while True:
            jobs, token = self.list_jobs(states, page_size, token, kinds=kinds)
            yield from jobs
            if not token:
                return

    def list_job_kinds(self) -> list[jpb.JobKind]:
        return list(self._call(self.jobs.ListJobKinds, jpb.ListJobKindsRequest()).kinds)

    def watch(
        self,
        name: str,
        from_sequence: int = 0,
        *,
        reconnect: bool = True,
        max_reconnect_s: float = 60.0,
        timeout: float | None = None,
    ) -> Iterator[jpb.WatchJobResponse]:
        """Events of a job of any kind until it ends; on a dropped stream, reconnects after the last
        sequence. ``timeout`` bounds the whole watch (TimeoutError); ``max_reconnect_s`` how long the
        server may stay unreachable before the error is raised."""
        return self._watch(
            lambda seq, remaining: self.jobs.WatchJob(
                jpb.WatchJobRequest(name=_job_name(name), from_sequence=seq),
                metadata=self.metadata,
                timeout=remaining,
            ),
            name,
            from_sequence,
            reconnect=reconnect,
            max_reconnect_s=max_reconnect_s,
            timeout=timeout,
        )

    def _watch(
        self,
        open_stream: Callable[[int, float | None], Any],
        name: str,
        from_sequence: int,
        *,
        reconnect: bool,
        max_reconnect_s: float,
        timeout: float | None,
    ) -> Iterator[Any]:
        seq = from_sequence
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                for ev in open_stream(seq, remaining):
                    down_since = None
                    seq = ev.sequence
                    yield ev
                return
            except grpc.RpcError as e:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"watching {name}: no end within {timeout} s") from None
                if not reconnect or e.code() not in RETRYABLE:
                    raise RemoteError.from_rpc(e) from None
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > max_reconnect_s:
                    raise RemoteError.from_rpc(e) from None
                time.sleep(0.2)

    def still_interrupted(self, event_job: jpb.Job) -> bool:
        """Whether an event ends a watch as INTERRUPTED: only if the job is INTERRUPTED *now*. A watch
        from the start of the log replays the INTERRUPTED event of an attempt that was retried since."""
        if event_job.state != job_pb2.JOB_STATE_INTERRUPTED:
            return False
        return self.get_job(event_job.name).state == job_pb2.JOB_STATE_INTERRUPTED

    def wait(self, name: str, timeout: float | None = None) -> jpb.Job:
        """Block until a job of any kind ends (SUCCEEDED/FAILED/CANCELLED) or is INTERRUPTED; return it."""
        job = self.get_job(name)
        if job.state in TERMINAL_STATES or job.state == job_pb2.JOB_STATE_INTERRUPTED:
            return job
        for ev in self.watch(name, from_sequence=job.last_sequence, timeout=timeout):
            if self.still_interrupted(ev.job):
                break
        return self.get_job(name)

    # -- the names of the previous release, kept for one release (docs/service.md, "Clients") ---------
    def get_any_job(self, name: str) -> jpb.Job:
        """Deprecated: :meth:`get_job`."""
        return _deprecated("get_any_job", "get_job", self.get_job)(name)

    def cancel_any_job(self, name: str) -> jpb.Job:
        """Deprecated: :meth:`cancel_job`."""
        return _deprecated("cancel_any_job", "cancel_job", self.cancel_job)(name)

    def retry_any_job(self, name: str) -> jpb.Job:
        """Deprecated: :meth:`retry_job`."""
        return _deprecated("retry_any_job", "retry_job", self.retry_job)(name)

    def list_any_jobs(
        self, kinds: list[str] | None = None, states: list[str] | None = None, page_size: int = 50,
        page_token: str = "",
    ) -> tuple[list[jpb.Job], str]:
        """Deprecated: :meth:`list_jobs` (``kinds`` is a keyword there)."""
        return _deprecated("list_any_jobs", "list_jobs", self.list_jobs)(states, page_size, page_token, kinds=kinds)

    def watch_any(self, name: str, from_sequence: int = 0, **kw: Any) -> Iterator[jpb.WatchJobResponse]:
        """Deprecated: :meth:`watch`."""
        return _deprecated("watch_any", "watch", self.watch)(name, from_sequence, **kw)

    def wait_any(self, name: str, timeout: float | None = None) -> jpb.Job:
        """Deprecated: :meth:`wait`."""
        return _deprecated("wait_any", "wait", self.wait)(name, timeout)

    @staticmethod
    def job_result(job: jpb.Job) -> Any:
        """A finished job's result message (MergeResult, AlignResult...), unpacked; None before."""
        if not job.HasField("result"):
            return None
        cls = {
            "merge": mpb.MergeResult,
            "align": apb.AlignResult,
            "zoo": npb.ZooResult,
            "train": npb.TrainResult,
            "soup": spb.SoupResult,
            "evolve": epb.EvolveResult,
        }[job.kind]
        out = cls()
        job.result.Unpack(out)
        return out

    # -- alignment (AlignmentService) ---------------------------------------------------------------
    def create_align_job(self, model_a: str, model_b: str, **fields: Any) -> jpb.Job:
        """Queue ``align B to A`` (fields of CreateAlignJobRequest: architecture or spec_ref,
        n_heads, rope, max_iter, n_restarts, seed, output_path, overwrite, request_id)."""
        req = apb.CreateAlignJobRequest(model_a=model_a, model_b=model_b, **fields)
        return self._call(self.alignment.CreateAlignJob, req).job

    def list_alignment_methods(self) -> apb.ListAlignmentMethodsResponse:
        return self._call(self.alignment.ListAlignmentMethods, apb.ListAlignmentMethodsRequest())

    # -- lineage (LineageService) -------------------------------------------------------------------
    def detect_lineage(
        self,
        child: str,
        candidates: list[str] | dict[str, str],
        *,
        timeout: float | None = 600.0,
        **fields: Any,
    ) -> Iterator[lpb.DetectLineageResponse]:
        """Stream ``DetectLineage``: progress reports, the ranked candidates, then the answer.
        ``candidates``: references, or ``{name: reference}``; ``fields``: of DetectLineageRequest."""
        items = candidates.items() if isinstance(candidates, dict) else [("", c) for c in candidates]
        req = lpb.DetectLineageRequest(
            child=child, candidates=[lpb.LineageCandidate(name=n, model=m) for n, m in items], **fields
        )
        try:
            yield from self.lineage.DetectLineage(req, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e) from None

    def lineage_answer(
        self, child: str, candidates: list[str] | dict[str, str], **fields: Any
    ) -> tuple[list[lpb.CandidateScore], lpb.LineageAnswer, list[lpb.LineageProgress]]:
        """``DetectLineage`` collected: (ranked candidates, answer, progress reports)."""
        cands, progress, answer = [], [], None
        for ev in self.detect_lineage(child, candidates, **fields):
            which = ev.WhichOneof("event")
            if which == "candidate":
                cands.append(ev.candidate)
            elif which == "progress":
                progress.append(ev.progress)
            else:
                answer = ev.answer
        if answer is None:
            raise RemoteError("INTERNAL", "DetectLineage ended without an answer")
        return cands, answer, progress

    def recover_model_graph(
        self,
        models: list[str] | dict[str, str],
        *,
        timeout: float | None = 600.0,
        progress: Any = None,
        **fields: Any,
    ) -> lpb.ModelGraph:
        """``RecoverModelGraph``: the directed model graph of a pool on the server. ``models``: references,
        or ``{name: reference}``; ``progress(LineageProgress)`` is called as the server reports;
        ``fields``: of RecoverModelGraphRequest."""
        items = models.items() if isinstance(models, dict) else [("", m) for m in models]
        req = lpb.RecoverModelGraphRequest(models=[lpb.LineageCandidate(name=n, model=m) for n, m in items], **fields)
        graph = None
        try:
            for ev in self.lineage.RecoverModelGraph(req, timeout=timeout, metadata=self.metadata):
                if ev.WhichOneof("event") == "graph":
                    graph = ev.graph
                elif progress is not None:
                    progress(ev.progress)
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e) from None
        if graph is None:
            raise RemoteError("INTERNAL", "RecoverModelGraph ended without a graph")
        return graph

    def list_lineage_methods(self) -> list[lpb.LineageMethod]:
        return list(self._call(self.lineage.ListLineageMethods, lpb.ListLineageMethodsRequest()).methods)

    # -- metanetworks (MetanetService) ---------------------------------------------------------------
    def create_zoo_job(
        self, config: dict[str, Any] | str, output_path: str = "", *, workers: int = 0, request_id: str = ""
    ) -> jpb.Job:
        """Queue a zoo build (``config``: a ZooConfig as a dict, or YAML/JSON text)."""
        req = npb.CreateZooJobRequest(output_path=output_path, workers=workers, request_id=request_id)
        # as JSON text (YAML's subset): a Struct would turn every integer into a double
        req.config_yaml = config if isinstance(config, str) else json.dumps(config)
        return self._call(self.metanets.CreateZooJob, req).job

    def create_train_job(self, zoo: str, **fields: Any) -> jpb.Job:
        """Queue a metanet training on ``zoo`` (fields of CreateTrainJobRequest; ``where`` and
        ``model_args`` as dicts)."""
        structs = {k: fields.pop(k) for k in ("where", "model_args") if k in fields}
        req = npb.CreateTrainJobRequest(zoo=zoo, **fields)
        for k, v in structs.items():
            getattr(req, k).update(v)
        return self._call(self.metanets.CreateTrainJob, req).job

    def list_metanets(self, page_size: int = 50, page_token: str = "") -> npb.ListMetanetsResponse:
        return self._call(
            self.metanets.ListMetanets, npb.ListMetanetsRequest(page_size=page_size, page_token=page_token)
        )

    def get_metanet(self, name: str) -> npb.Metanet:
        return self._call(self.metanets.GetMetanet, npb.GetMetanetRequest(name=name)).metanet

    def predict(self, metanet: str, checkpoints: list[str], spec_ref: str = "") -> npb.PredictResponse:
        req = npb.PredictRequest(metanet=metanet, checkpoints=checkpoints, spec_ref=spec_ref)
        return self._call(self.metanets.Predict, req, timeout=max(self.timeout, 600.0))

    def embed(self, metanet: str, checkpoints: list[str], spec_ref: str = "") -> npb.EmbedResponse:
        req = npb.EmbedRequest(metanet=metanet, checkpoints=checkpoints, spec_ref=spec_ref)
        return self._call(self.metanets.Embed, req, timeout=max(self.timeout, 600.0))

    def get_zoo(self, zoo: str) -> dict[str, Any]:
        resp = self._call(self.metanets.GetZoo, npb.GetZooRequest(zoo=zoo))
        return json_format.MessageToDict(resp.summary)

    # -- recipe search (EvolveService) ----------------------------------------------------------------
    def create_evolve_job(self, config: dict[str, Any] | str | Path, output_path: str = "", **fields: Any) -> jpb.Job:
        """Queue a recipe search (``config``: a search config as a dict, YAML/JSON text, or a local YAML
        file's path; ``output_path``: the search folder under a root, empty: kept as job://<id>; fields of
        CreateEvolveJobRequest: trials, save_model, request_id)."""
        if isinstance(config, Path) or (
            isinstance(config, str) and "\n" not in config and config.endswith((".yml", ".yaml", ".json"))
        ):
            config = Path(config).read_text()  # a local file, sent as its text (never read by the server)
        req = epb.CreateEvolveJobRequest(output_path=output_path, **fields)
        # as JSON text (YAML's subset): a Struct would turn every integer into a double
        req.config_yaml = config if isinstance(config, str) else json.dumps(config)
        return self._call(self.evolve.CreateEvolveJob, req).job

    # -- soups (SoupService) ------------------------------------------------------------------------
    @staticmethod
    def _member(m: str | dict[str, Any]) -> spb.SoupMemberSpec:
        return spb.SoupMemberSpec(model=m) if isinstance(m, str) else spb.SoupMemberSpec(**m)

    def create_soup(
        self, soup: str = "", members: list[str | dict[str, Any]] | None = None, **fields: Any
    ) -> jpb.Job:
        """Queue the creation of a soup folder (``soup``: under a root; empty: kept as job://<id>);
        members are references or ``{"model", "id", "weight"}``; fields: base, dtype, display_name."""
        req = spb.CreateSoupRequest(soup=soup, members=[self._member(m) for m in members or []], **fields)
        return self._call(self.soups.CreateSoup, req).job

    def add_soup_member(self, soup: str, member: str | dict[str, Any], request_id: str = "") -> jpb.Job:
        req = spb.AddSoupMemberRequest(soup=soup, member=self._member(member), request_id=request_id)
        return self._call(self.soups.AddSoupMember, req).job

    def remove_soup_member(self, soup: str, member_id: str, request_id: str = "") -> jpb.Job:
        req = spb.RemoveSoupMemberRequest(soup=soup, member_id=member_id, request_id=request_id)
        return self._call(self.soups.RemoveSoupMember, req).job

    def build_soup(self, soup: str, output_path: str = "", **fields: Any) -> jpb.Job:
        req = spb.BuildSoupRequest(soup=soup, output_path=output_path, **fields)
        return self._call(self.soups.BuildSoup, req).job

    def get_soup(self, soup: str, verify: bool = False) -> spb.Soup:
        return self._call(self.soups.GetSoup, spb.GetSoupRequest(soup=soup, verify=verify)).soup

    def list_methods(self) -> list[mpb.MethodInfo]:
        return list(self._call(self.merge.ListMethods, mpb.ListMethodsRequest()).methods)

    # -- checkpoints --------------------------------------------------------------------------------
    def inspect(self, ref: str) -> dict[str, Any]:
        """All tensors of a checkpoint (pages joined), as a dict."""
        token = ""
        tensors: list[dict[str, Any]] = []
        while True:
            resp = self._call(
                self.checkpoints.InspectCheckpoint, cpb.InspectCheckpointRequest(ref=ref, page_token=token)
            )
            # numbers as numbers (protobuf's JSON mapping writes int64 as strings)
            tensors += [
                {"name": t.name, "dtype": t.dtype, "shape": [int(d) for d in t.shape], "nbytes": int(t.nbytes),
                 "file": t.file}
                for t in resp.tensors
            ]
            token = resp.next_page_token
            if not token:
                break
        return {
            "ref": resp.ref,
            "tensors": tensors,
            "tensors_total": resp.tensors_total,
            "parameters_total": resp.parameters_total,
            "bytes_total": resp.bytes_total,
            "files": list(resp.files),
        }

    def upload(self, path: str | Path, timeout: float = 600.0) -> str:
        """Upload a small checkpoint (a .safetensors file or a folder); returns its ``upload://`` ref."""
        from merge.checkpoint import AUX_FILE_PATTERNS, INDEX_NAME

        p = Path(path)
        if p.is_file():
            files = [p]
        else:
            import re

            aux = re.compile("|".join(f"(?:{a})" for a in AUX_FILE_PATTERNS))
            files = sorted(
                f
                for f in p.iterdir()
                if f.is_file()
                and (f.suffix == ".safetensors" or f.name == INDEX_NAME or aux.fullmatch(f.name))
            )
        if not files:
            raise RemoteError("INVALID_ARGUMENT", f"{p}: nothing to upload (no .safetensors file)")

        def requests() -> Iterator[cpb.UploadCheckpointRequest]:
            for f in files:
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while block := fh.read(CHUNK):
                        h.update(block)
                yield cpb.UploadCheckpointRequest(
                    file=cpb.FileHeader(name=f.name, size=f.stat().st_size, sha256=h.hexdigest())
                )
                with open(f, "rb") as fh:
                    while block := fh.read(CHUNK):
                        yield cpb.UploadCheckpointRequest(chunk=block)

        return self._call(self.checkpoints.UploadCheckpoint, requests(), timeout=timeout).ref

    def download(self, ref: str, dest: str | Path, timeout: float = 600.0, *, overwrite: bool = False) -> list[Path]:
        """Download a checkpoint into folder ``dest``, atomically (merge.atomic: a complete folder or
        nothing; ``overwrite`` replaces only a previous output); files are checked against sha256."""
        from merge.atomic import atomic_output

        dest = Path(dest)
        names: list[str] = []
        with atomic_output(dest, overwrite=overwrite, what="download") as tmp:
            fh = None
            cur: cpb.FileHeader | None = None
            h = hashlib.sha256()
            got = 0

            def finish() -> None:
                if cur is None:
                    return
                assert fh is not None
                fh.close()
                if got != cur.size or h.hexdigest() != cur.sha256:
                    raise RemoteError(
                        "DATA_LOSS",
                        f"{cur.name}: received {got} bytes / sha256 {h.hexdigest()}, "
                        f"expected {cur.size} / {cur.sha256}",
                    )
                names.append(cur.name)

            try:
                for msg in self.checkpoints.DownloadCheckpoint(
                    cpb.DownloadCheckpointRequest(ref=ref), timeout=timeout, metadata=self.metadata
                ):
                    if msg.WhichOneof("payload") == "file":
                        finish()
                        cur = msg.file
                        if "/" in cur.name or cur.name in ("", ".", "..") or "\\" in cur.name or cur.name in names:
                            raise RemoteError("DATA_LOSS", f"server sent a bad file name {cur.name!r}")
                        fh = open(tmp / cur.name, "wb")  # noqa: SIM115
                        h = hashlib.sha256()
                        got = 0
                    else:
                        if fh is None:
                            raise RemoteError("DATA_LOSS", "server sent data before a file header")
                        fh.write(msg.chunk)
                        h.update(msg.chunk)
                        got += len(msg.chunk)
                finish()
            except grpc.RpcError as e:
                raise RemoteError.from_rpc(e) from None
            finally:
                if fh is not None and not fh.closed:
                    fh.close()
        return [dest / n for n in names]
