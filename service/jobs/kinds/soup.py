"""The "soup" job kind: a living Diffusion Soup (``merge.soups.folder.Soup``) kept on the server.

Biggs, Seshadri et al., "Diffusion Soup" (arXiv:2406.08431): θ_soup = Σ_i w_i θ_i / Σ_i w_i over
members that can be added (continual learning) and removed (unlearning) after the fact. The library
keeps float64 running sums, makes a removal exact (re-sums the others) and every operation atomic
(a new ``state-<gen>/`` and one rename of ``soup.json``), so a failure, a cancel or a SIGKILL at any
point leaves the soup as it was; the service adds nothing to that but the roots and the job life
cycle. The operations that write (``create``, ``add``, ``remove``, ``build``) are jobs; the jobs of one
soup run one at a time in the order they were created (``serial_key``), so the soup's history is
the order of the requests. Cancellation lands at the library's next progress report before the
commit; once the manifest is renamed the operation has happened.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.errors import WeightsmithError
from service.jobs.kind import JobKind, WorkerContext, register, remove_partials

if TYPE_CHECKING:
    from service.jobs.manager import JobManager, Submission
    from service.jobs.store import JobRecord

OPS = ("create", "add", "remove", "build")


def soup_folder(manager: JobManager, ref: str, field: str = "soup") -> Path:
    """An existing soup: a folder under a root, or ``job://<id>`` of the job that created it."""
    from merge.soups.folder import MANIFEST
    from service.jobs.store import ServiceError

    if not ref:
        raise ServiceError("INVALID_ARGUMENT", f"{field}: a soup reference is required", field)
    path = Path(manager.resolver()(ref, field).path)
    if not (path / MANIFEST).is_file():
        raise ServiceError("NOT_FOUND", f"{field}: {ref!r} is not a soup (no {MANIFEST})", field)
    return path


def _member_path(manager: JobManager, ref: str, field: str) -> Path:
    from service.jobs.store import ServiceError

    resolver = manager.resolver()
    if resolver.kind(ref) == "hub":
        raise ServiceError(
            "FAILED_PRECONDITION",
            f"{field}: {ref!r}: soup members are server paths, upload:// or job://",
            field,
        )
    return Path(resolver(ref, field).path)


def _members(
    manager: JobManager, specs: list[dict[str, Any]], field: str
) -> tuple[list[dict[str, Any]], int]:
    """Members resolved inside the roots, with their ids; and the largest member's size in bytes."""
    from merge.soups.folder import _default_id
    from service.jobs.store import ServiceError

    out, biggest = [], 0
    for i, m in enumerate(specs):
        f = f"{field}[{i}]" if len(specs) > 1 or field == "members" else field
        path = _member_path(manager, str(m.get("model") or ""), f"{f}.model")
        w = float(m.get("weight") or 1.0)
        if not w > 0:
            raise ServiceError("INVALID_ARGUMENT", f"{f}.weight: {w} (must be > 0)", f"{f}.weight")
        out.append({"path": str(path), "id": str(m.get("id") or _default_id(path)), "weight": w})
        size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*.safetensors")))
        biggest = max(biggest, size)
    return out, biggest


async def admit(manager: JobManager, op: str, req: dict[str, Any], job_id: str) -> Submission:
    """Check a soup operation before anything is written (references, member ids, the output)."""
    from merge.soups.folder import OUT_DTYPES, Soup
    from service.jobs.manager import Submission
    from service.jobs.store import ServiceError

    est = 0
    if op == "create":
        members, est = _members(manager, list(req.get("members") or []), "members")
        dtype = req.get("dtype") or None
        if dtype is not None and dtype not in OUT_DTYPES:
            raise ServiceError(
                "INVALID_ARGUMENT", f"dtype: {dtype!r} (one of {', '.join(OUT_DTYPES)})", "dtype"
            )
        base = str(_member_path(manager, req["base"], "base")) if req.get("base") else None
        out = manager.output_folder(req.get("soup") or "", False, job_id, [Path(m["path"]) for m in members])
        ids = [m["id"] for m in members]
        if len(set(ids)) != len(ids):
            raise ServiceError("INVALID_ARGUMENT", "members: two members with the same id", "members")
        spec = {
            "op": op,
            "members": members,
            "base": base,
            "dtype": dtype,
            "name": req.get("display_name") or None,
        }
        summary = f"create soup ({len(members)} members)"
    else:
        soup = await asyncio.to_thread(soup_folder, manager, req.get("soup") or "")
        current = {m.id for m in Soup(soup).members}
        spec = {"op": op, "soup": str(soup)}
        if op == "add":
            (member,), est = _members(manager, [dict(req.get("member") or {})], "member")
            if member["id"] in current:
                raise ServiceError(
                    "ALREADY_EXISTS",
                    f"member.id: {member['id']!r} is already a member of the soup",
                    "member.id",
                )
            spec["member"] = member
            summary = f"add member {member['id']}"
        elif op == "remove":
            mid = req.get("member_id") or ""
            if mid not in current:
                raise ServiceError(
                    "NOT_FOUND",
                    f"member_id: {mid!r} is not a member of the soup (members: {', '.join(sorted(current)) or 'none'})",
                    "member_id",
                )
            spec["member_id"] = mid
            summary = f"remove member {mid}"
        else:
            if not current:
                raise ServiceError(
                    "FAILED_PRECONDITION", "soup: the soup has no members; nothing to build", "soup"
                )
            shard = int(req.get("shard_size") or 0)
            if 0 < shard < 1024:
                raise ServiceError("INVALID_ARGUMENT", "shard_size: at least 1024 bytes", "shard_size")
            spec["shard_size"] = shard or 5 * 10**9
            summary = "build soup"
        if op == "build":
            inputs = [soup, *(Path(m.path) for m in Soup(soup).members)]  # never overwrite a member
            out = manager.output_folder(req.get("output_path") or "", bool(req.get("overwrite")), job_id, inputs)
        else:
            out = soup  # the soup itself; jobs on other soups or outputs must not overlap it
            manager._check_output_free(soup, serial_key=str(soup))
        est = est or max(
            (Path(m.path).stat().st_size for m in Soup(soup).members if Path(m.path).is_file()), default=0
        )
    key = str(out) if op != "build" else spec["soup"]
    return Submission(
        kind="soup",
        spec={**spec, "soup_path": key},
        summary=summary,
        output_path=out,
        overwrite=op in ("add", "remove") or bool(req.get("overwrite")),
        est_bytes=4 * est,
        serial_key=key,
    )


def run(ctx: WorkerContext) -> dict[str, Any]:
    """In the worker: the library operation, with its progress reports; then the manifest in brief."""
    from merge.soups.folder import Soup

    t0 = time.perf_counter()
    spec, op = ctx.spec, ctx.spec["op"]

    def progress(stage: str, done: int, total: int) -> None:
        ctx.progress(phase=stage, steps_done=done, steps_total=total, unit=stage)
        if stage != "commit":  # past the commit's first report the operation must not be interrupted
            ctx.step()

    out: dict[str, Any] = {"operation": op}
    if op == "create":
        ms = spec["members"]
        soup = Soup.init(
            ctx.output_path, [m["path"] for m in ms], ids=[m["id"] for m in ms], weights=[m["weight"] for m in ms],
            base=spec["base"], dtype=spec["dtype"], name=spec["name"], progress=progress,
        )  # fmt: skip
    else:
        soup = Soup(spec["soup"])
        if op == "add":
            m = spec["member"]
            soup.add(m["path"], id=m["id"], weight=m["weight"], progress=progress)
        elif op == "remove":
            soup.remove(spec["member_id"], progress=progress)
        else:
            built = soup.build(
                ctx.output_path, overwrite=ctx.overwrite, shard_size=spec["shard_size"], progress=progress
            )
            out["built"] = {k: v for k, v in built.items() if isinstance(v, str | int | float | list)}
            out["out_dir"] = str(ctx.output_path)
    out["soup"] = soup.show()
    out.setdefault("out_dir", str(ctx.output_path))
    out["seconds"] = time.perf_counter() - t0
    return out


def recover(rec: JobRecord) -> dict[str, Any] | None:
    """After a crash: did the operation commit before the worker died (its result.json unwritten)?"""
    from merge.soups.folder import Soup

    op = rec.spec.get("op")
    try:
        if op == "build":
            return None  # a build writes an output folder atomically; redo it
        soup = Soup(rec.spec["soup_path"])
    except (WeightsmithError, OSError, ValueError):
        return None
    ids = {m.id for m in soup.members}
    done = (
        op == "create"
        or (op == "add" and rec.spec["member"]["id"] in ids)
        or (op == "remove" and rec.spec["member_id"] not in ids)
    )
    if not done:
        return None
    return {
        "operation": op,
        "soup": soup.show(),
        "out_dir": rec.output_path,
        "seconds": 0.0,
        "reconstructed": True,
    }


def _cleanup(rec: JobRecord, why: str) -> None:
    """create / build: the library's ``.partial-`` folder; add / remove leave no more than unreferenced
    state folders, which the soup's next add or remove removes (GetSoup lists them as leftovers)."""
    if rec.spec.get("op") in ("create", "build"):
        remove_partials(rec, why)


SOUP = register(
    JobKind(
        name="soup",
        summary="create a living soup, add or remove a member, build it (merge.soups.folder; Diffusion Soup)",
        create_rpcs=tuple(
            f"weightsmith.v1.SoupService/{r}"
            for r in ("CreateSoup", "AddSoupMember", "RemoveSoupMember", "BuildSoup")
        ),
        result_type="weightsmith.v1.SoupResult",
        run=run,
        cleanup=_cleanup,
        recover=recover,
        serial_key=lambda rec: rec.spec.get("soup_path"),
    )
)

__all__ = ["OPS", "SOUP", "admit", "recover", "run", "soup_folder"]
