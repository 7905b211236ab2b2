"""The "merge" job kind: ``merge.execute.run_merge`` on a recipe (MergeService.CreateMergeJob).

Admission (recipe, references, plan from headers, memory claim) is
:meth:`service.jobs.manager.JobManager.create`; this module is what runs in the worker and what a restarted
server does with an attempt that died.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from merge.errors import WeightsmithError
from service.jobs.kind import JobKind, WorkerContext, register, remove_partials

if TYPE_CHECKING:
    from service.jobs.store import JobRecord


def run(ctx: WorkerContext) -> dict[str, Any]:
    """Run the merge; ``FilePath`` method parameters (a Git Re-Basin spec, a saved plan) are confined
    to the server's roots through the engine's ``path_resolver``."""
    from merge.execute import Progress, run_merge
    from merge.plan import MergeOptions

    def progress(p: Progress) -> None:
        ctx.progress(force=p.tensors_done == p.tensors_total, **asdict(p))
        if ctx.delay and p.phase == "merging" and p.current:
            time.sleep(ctx.delay)

    opts = ctx.options
    options = MergeOptions(
        device=ctx.device,
        compute_dtype=opts.get("compute_dtype") or None,
        shard_size=int(opts.get("shard_size") or 5 * 10**9),
        allow_pickle=False,
        workers=int(opts.get("workers") or 2),
        overwrite=ctx.overwrite,
        path_resolver=ctx.confine,
    )
    result = run_merge(
        yaml.safe_load(ctx.recipe_yaml),
        str(ctx.output_path),
        options,
        progress=progress,
        cancel=ctx.cancel,
        resolver=ctx.resolver,
    )
    return result.to_json()


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
        "method": rec.method,
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
