"""The "align" job kind: Git Re-Basin weight matching of model B onto model A, writing pi(B).

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries", ICLR
2023: permutation coordinate descent (Algorithm 1) maximises ``sum_k <theta_A[k], pi(theta_B)[k]>``
(Eq. 3). The work is the library's :func:`merge.rebasin.api.rebasin`; this module checks a request
on the server (:func:`admit`, headers only, nothing written) and, in the job's worker (:func:`run`),
calls the library and writes ``pi(B)`` atomically (``merge.checkpoint.CheckpointWriter``: a
``.partial-`` folder renamed once) with B's config files, ``alignment/permutations.safetensors`` and
``alignment/permutation_spec.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.errors import CheckpointError
from service.jobs.kind import JobKind, WorkerContext, register, remove_partials

if TYPE_CHECKING:
    from service.jobs.manager import JobManager, Submission

METHODS = {"weight": "weight matching (data-free; Git Re-Basin Algorithm 1, permutation coordinate descent)"}
MAX_INLINE_INDICES = 1 << 20
PAPER = "Ainsworth, Hayase & Srinivasa, Git Re-Basin: Merging Models modulo Permutation Symmetries, ICLR 2023"
URL = "https://arxiv.org/abs/2209.04836"


def architectures() -> list[str]:
    from merge.symmetry.ready import ARCHITECTURES

    return sorted(ARCHITECTURES)


def _spec(req: dict[str, Any], shapes: dict[str, tuple[int, ...]], spec_path: str | None) -> Any:
    """The permutation spec of the request, checked against model A's shapes (merge.symmetry.resolve_spec)."""
    from merge.symmetry import resolve_spec

    return resolve_spec(
        shapes, spec=spec_path or None, architecture=req["architecture"] or None, n_heads=req["n_heads"],
        rope=req["rope"], where="model_a", what="an alignment",
    )  # fmt: skip


def _shapes(ckpt: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(ckpt.shape(k)) for k in ckpt}


def normalize(req: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and simple fields checked (INVALID_ARGUMENT naming the field)."""
    from service.jobs.store import ServiceError

    out = {
        "model_a": str(req.get("model_a") or ""),
        "model_b": str(req.get("model_b") or ""),
        "method": str(req.get("method") or "weight"),
        "architecture": str(req.get("architecture") or ""),
        "spec_ref": str(req.get("spec_ref") or ""),
        "n_heads": int(req.get("n_heads") or 0),
        "rope": bool(req.get("rope")),
        "max_iter": int(req.get("max_iter") or 100),
        "n_restarts": int(req.get("n_restarts") or 1),
        "seed": int(req.get("seed") or 0),
        "output_path": str(req.get("output_path") or ""),
        "overwrite": bool(req.get("overwrite")),
    }
    for f in ("model_a", "model_b"):
        if not out[f]:
            raise ServiceError("INVALID_ARGUMENT", f"{f}: a model reference is required", f)
    if out["method"] not in METHODS:
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"method: unknown alignment method {out['method']!r} (known: {', '.join(METHODS)})",
            "method",
        )
    if bool(out["architecture"]) == bool(out["spec_ref"]):
        raise ServiceError(
            "INVALID_ARGUMENT", "spec_source: give exactly one of architecture or spec_ref", "spec_source"
        )
    if out["architecture"] and out["architecture"].lower() not in architectures():
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"architecture: unknown architecture {out['architecture']!r} (known: {', '.join(architectures())})",
            "architecture",
        )
    if not (1 <= out["max_iter"] <= 10_000 and 1 <= out["n_restarts"] <= 100 and out["n_heads"] >= 0):
        raise ServiceError(
            "INVALID_ARGUMENT", "max_iter must be 1..10000, n_restarts 1..100, n_heads >= 0", "max_iter"
        )
    return out


async def admit(manager: JobManager, req: dict[str, Any], job_id: str) -> Submission:
    """Check an alignment request from headers: references inside the roots (no Hub models), the
    spec built or loaded and checked against both models' shapes, the output folder free."""
    import asyncio

    from merge.checkpoint import open_checkpoint
    from service.jobs.manager import JOB_SCHEME, Submission
    from service.jobs.store import ServiceError

    resolver = manager.resolver()
    paths: dict[str, Path] = {}
    job_refs: dict[str, str] = {}
    for f in ("model_a", "model_b"):
        ref = req[f]
        if resolver.kind(ref) == "hub":
            raise ServiceError(
                "FAILED_PRECONDITION",
                f"{f}: {ref!r}: alignment takes server paths, upload:// and job:// references, not Hub models",
                f,
            )
        paths[f] = Path(resolver(ref, f).path)
        if ref.startswith(JOB_SCHEME):
            job_refs[ref[len(JOB_SCHEME) :]] = str(paths[f])
    spec_path = manager.confine_path(req["spec_ref"], "spec_ref") if req["spec_ref"] else None

    def check() -> tuple[int, int]:
        a = open_checkpoint(paths["model_a"])
        b = open_checkpoint(paths["model_b"])
        try:
            spec = _spec(req, _shapes(a), spec_path)
            sb = _shapes(b)
            spec.check_shapes(sb, where="model_b", complete=False)
            if set(sb) != set(a):
                extra = sorted(set(sb) ^ set(a))[0]
                raise CheckpointError(
                    f"model_b: tensor '{extra}' is in one model and not the other; A and B must have the same tensors"
                )
            return a.total_bytes, b.total_bytes
        finally:
            a.close()
            b.close()

    a_bytes, b_bytes = await asyncio.to_thread(check)
    out = manager.output_folder(req["output_path"], req["overwrite"], job_id, list(paths.values()))
    # A and B in memory, the permuted float32 working copies of the permuted tensors, and pi(B)
    est = a_bytes + 2 * b_bytes + 2 * (a_bytes + b_bytes)
    return Submission(
        kind="align",
        spec={**req, "spec_path": spec_path or "", "paths": {k: str(v) for k, v in paths.items()}},
        summary=f"{req['method']} matching",
        output_path=out,
        overwrite=req["overwrite"],
        est_bytes=est,
        job_refs=job_refs,
    )


def run(ctx: WorkerContext) -> dict[str, Any]:
    """In the worker: :func:`merge.rebasin.api.rebasin`, then write pi(B) atomically."""
    import torch
    from safetensors.torch import save as save_bytes

    from merge.checkpoint import CheckpointWriter, OutputTensor, open_checkpoint
    from merge.rebasin.api import rebasin

    t0 = time.perf_counter()
    req = ctx.spec
    # references are resolved again here (a job:// output may have been re-checked; roots re-applied)
    a_path = ctx.resolver(req["model_a"], "model_a").path
    b_path = ctx.resolver(req["model_b"], "model_b").path
    spec_path = ctx.confine(req["spec_ref"], "spec_ref") if req["spec_ref"] else None
    ctx.progress(phase="loading", steps_done=0, steps_total=3, unit="phase")
    a_ck, b_ck = open_checkpoint(a_path), open_checkpoint(b_path)
    a = {k: a_ck[k] for k in a_ck}
    b = {k: b_ck[k] for k in b_ck}
    ctx.check_cancel()
    spec = _spec(req, _shapes(a_ck), spec_path)
    ctx.progress(phase="matching", steps_done=1, steps_total=3, unit="phase")
    al = rebasin(
        a,
        b,
        spec=spec,
        method=req["method"],
        max_iter=req["max_iter"],
        n_restarts=req["n_restarts"],
        seed=req["seed"],
    )
    ctx.check_cancel()
    del a
    names = list(b_ck)
    total = len(names)
    ctx.progress(
        phase="writing", steps_done=2, steps_total=3, unit="phase", tensors_done=0, tensors_total=total
    )
    tensors = [OutputTensor(k, tuple(al.state[k].shape), al.state[k].dtype) for k in names]
    perms = {str(p): v.to(torch.int64).contiguous() for p, v in al.perms.items()}
    n_idx = sum(v.numel() for v in perms.values())
    meta = {"weightsmith_alignment": "pi(model_b) aligned to model_a by Git Re-Basin weight matching"}
    with CheckpointWriter(ctx.output_path, tensors, overwrite=ctx.overwrite, metadata=meta) as w:
        for i, k in enumerate(names):
            w.write(k, al.state[k].contiguous())
            ctx.progress(phase="writing", tensors_done=i + 1, tensors_total=total, current=k)
            ctx.step()
        for f in b_ck.aux_files():
            w.add_file(f)
        w.add_bytes("alignment/permutations.safetensors", save_bytes(perms))
        w.add_bytes("alignment/permutation_spec.json", json.dumps(spec.to_dict(), indent=1).encode())
    fixed = sum(int((v == torch.arange(v.numel())).sum()) for v in perms.values())
    return {
        "out_dir": str(ctx.output_path),
        "method": req["method"],
        "objective": float(al.result.objective),
        "iterations": int(al.result.iterations),
        "restarts": [float(x) for x in (al.result.restarts or [al.result.objective])],
        "permutations": {k: v.tolist() for k, v in perms.items()} if n_idx <= MAX_INLINE_INDICES else None,
        "spec": spec.to_dict(),
        "n_tensors": total,
        "bytes_written": w.total_bytes,
        "units_fixed": fixed,
        "units_total": n_idx,
        "seconds": time.perf_counter() - t0,
    }


ALIGN = register(
    JobKind(
        name="align",
        summary="align model B to model A modulo permutations (Git Re-Basin) and write pi(B)",
        create_rpcs=("weightsmith.v1.AlignmentService/CreateAlignJob",),
        result_type="weightsmith.v1.AlignResult",
        run=run,
        cleanup=remove_partials,
    )
)

__all__ = ["ALIGN", "METHODS", "admit", "architectures", "normalize", "run"]
