"""The "merge" job kind: ``merge.execute.run_merge`` on a recipe (MergeService.CreateMergeJob).

A merge is a job like any other (:mod:`service.jobs.kind`): :func:`admit` checks the request on the
server (options, the recipe validated and planned from headers, references resolved through the
server's roots, the output folder, the memory claim) and hands the manager a
:class:`service.jobs.manager.Submission`; :func:`run` is what runs in the worker; :func:`recover` what a
restarted server does with an attempt that died.

The job's spec is ``{"recipe": <the validated recipe, normalized>, "options": {...}}``, stored once as
JSON. The plan is made once, at admission, and handed to the worker in memory with the stamps of
the input files it was made from (:func:`merge.checkpoint.files_stamp`); the worker plans again
only when it cannot use it: after a server restart (a retry), for Hub models (resolved in the
worker), or when an input was replaced or written to while the job was queued.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.errors import WeightsmithError
from service.jobs.kind import JobKind, WorkerContext, register, remove_partials

if TYPE_CHECKING:
    from merge.plan import MergePlan
    from service.jobs.manager import JobManager, Submission
    from service.jobs.store import JobRecord

COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")
DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class PlannedMerge:
    """What admission hands the worker: the plan (its options' server hooks removed) and the stamps
    of the files it was made from."""

    plan: MergePlan
    stamps: list[tuple[str, list[int]]]


def normalize_options(options: dict[str, Any], default_workers: int) -> dict[str, Any]:
    """``MergeJobOptions`` checked: compute dtype, shard size (0: the default) and worker threads."""
    from service.jobs.store import ServiceError

    cd = options.get("compute_dtype") or ""
    if cd and cd not in COMPUTE_DTYPES:
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"options.compute_dtype: {cd!r} is not one of {', '.join(COMPUTE_DTYPES)}",
            "options.compute_dtype",
        )
    shard = int(options.get("shard_size") or 0)
    if shard < 0 or (0 < shard < 1024):
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"options.shard_size: {shard} (must be 0 for the default or >= 1024 bytes)",
            "options.shard_size",
        )
    workers = int(options.get("workers") or 0)
    if not 0 <= workers <= 16:
        raise ServiceError("INVALID_ARGUMENT", f"options.workers: {workers} (must be 0..16)", "options.workers")
    return {"compute_dtype": cd, "shard_size": shard, "workers": workers or default_workers}


def _merge_options(options: dict[str, Any], **kw: Any) -> Any:
    from merge.plan import MergeOptions

    return MergeOptions(
        compute_dtype=options.get("compute_dtype") or None,
        shard_size=int(options.get("shard_size") or DEFAULT_SHARD_SIZE),
        allow_pickle=False,
        workers=int(options.get("workers") or 2),
        **kw,
    )


async def admit(
    manager: JobManager, recipe: dict[str, Any], output_path: str, overwrite: bool, options: dict[str, Any],
    job_id: str,
) -> tuple[Submission, dict[str, Any] | None]:
    """Check a merge request (``options`` already normalized); returns the submission and the plan's
    summary (None when the recipe names Hub models: they are resolved and planned in the worker).
    Raises with the right status code, having written nothing."""
    from merge.checkpoint import files_stamp
    from merge.recipe import load_recipe
    from service.jobs.manager import Submission
    from service.jobs.store import ServiceError
    from service.paths import JOB_SCHEME, HubDisabledError

    r = load_recipe(recipe)
    refs = r.model_refs()
    if len(refs) > manager.config.max_models:
        raise ServiceError(
            "RESOURCE_EXHAUSTED",
            f"recipe: {len(refs)} models, more than this server's limit of {manager.config.max_models}",
            "recipe",
        )
    resolver = manager.resolver()
    kinds = {ref: resolver.kind(ref) for ref in refs}
    for ref, kind in kinds.items():
        if kind == "hub" and not manager.config.hub.enabled:
            raise HubDisabledError(
                f"model '{ref}': Hub references are disabled on this server "
                "(start it with --hub), and no such path exists under its roots"
            )
    # where the output goes, before planning: a plain refusal of an existing output comes first
    manager.output_folder(output_path, overwrite, job_id, [], check_replaceable=False)
    job_refs = {ref[len(JOB_SCHEME) :]: str(resolver(ref).path) for ref, k in kinds.items() if k == "job"}
    planned: PlannedMerge | None = None
    summary: dict[str, Any] | None = None
    if "hub" not in kinds.values():

        def plan() -> PlannedMerge:
            from merge.plan import plan_merge

            p = plan_merge(r, _merge_options(options, path_resolver=manager.confine_path), resolver=resolver)
            for c in p.checkpoints:
                c.close()
            # the server's path hook stays here; the worker confines paths with its own
            return PlannedMerge(replace(p, options=_merge_options(options)), files_stamp(p.input_paths))

        planned = await asyncio.to_thread(plan)
        inputs = [Path(p) for p in planned.plan.input_paths]
        summary = planned.plan.summary()
        est = int(planned.plan.peak_bytes_estimate)
    else:
        inputs = [Path(resolver(ref).path) for ref, k in kinds.items() if k != "hub"]
        est = 0
    out = manager.output_folder(output_path, overwrite, job_id, inputs)
    progress = {"tensors_total": summary["n_tensors"], "bytes_total": summary["bytes_out"]} if summary else {}
    sub = Submission(
        kind="merge",
        spec={"recipe": r.to_dict(), "options": options},
        summary=r.merge_method,
        output_path=out,
        overwrite=overwrite,
        est_bytes=est,
        progress=progress,
        job_refs=job_refs,
        prepared=planned,
    )
    return sub, summary


def recipe_yaml(spec: dict[str, Any]) -> str:
    """The recipe of a merge job's spec as normalized YAML (``MergeJob.recipe_yaml``)."""
    import yaml

    return yaml.safe_dump(spec.get("recipe", {}), sort_keys=False)


def _usable_plan(prepared: Any) -> MergePlan | None:
    """The admitted plan, if every input file is as it was when it was made."""
    from merge.checkpoint import files_stamp

    if not isinstance(prepared, PlannedMerge):
        return None
    try:
        same = files_stamp(prepared.plan.input_paths) == prepared.stamps
    except OSError:
        return None
    return prepared.plan if same else None


def run(ctx: WorkerContext) -> dict[str, Any]:
    """Run the merge; ``FilePath`` method parameters (a Git Re-Basin spec, a saved plan) are confined
    to the server's roots through the engine's ``path_resolver``."""
    from merge.execute import Progress, run_merge

    def progress(p: Progress) -> None:
        ctx.progress(force=p.tensors_done == p.tensors_total, **asdict(p))
        if ctx.delay and p.phase == "merging" and p.current:
            time.sleep(ctx.delay)

    options = _merge_options(
        ctx.spec.get("options", {}), device=ctx.device, overwrite=ctx.overwrite, path_resolver=ctx.confine
    )
    plan = _usable_plan(ctx.prepared)
    result = run_merge(
        ctx.spec["recipe"],
        str(ctx.output_path),
        options,
        progress=progress,
        cancel=ctx.cancel,
        resolver=ctx.resolver,
        plan=replace(plan, options=options) if plan is not None else None,
    )
    return {**result.to_json(), "planned_in_worker": plan is None}


def recover(rec: JobRecord) -> dict[str, Any] | None:
    """The worker died between renaming its output into place and writing ``result.json``.

    Only for jobs that may not overwrite: creation refused an existing output and no other active
    job may target it, so an output folder there now is this job's, complete (the rename is
    atomic). Its summary is rebuilt from the headers.
    """
    out = Path(rec.output_path)
    if rec.overwrite or not out.is_dir():
        return None
    try:
        from merge.checkpoint import open_checkpoint

        ckpt = open_checkpoint(out)
    except WeightsmithError:
        return None
    total = rec.progress.get("tensors_total")
    if total and len(ckpt) != total:
        return None
    return {
        "out_dir": str(out),
        "method": rec.summary,
        "n_tensors": len(ckpt),
        "bytes_written": ckpt.total_bytes,
        "shards": [f.name for f in ckpt.files],
        "seconds": 0.0,
        "models": [],
        "attempt": rec.attempt,
        "reconstructed": True,
    }


MERGE = register(
    JobKind(
        name="merge",
        summary="merge checkpoints with a recipe (mergekit's YAML) into a new checkpoint",
        create_rpcs=("weightsmith.v1.MergeService/CreateMergeJob",),
        result_type="weightsmith.v1.MergeResult",
        run=run,
        cleanup=remove_partials,
        recover=recover,
    )
)
