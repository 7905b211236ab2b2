"""The "evolve" job kind: a recipe search (``merge.evolve.run_search``; EvolveService.CreateEvolveJob).

Evolutionary model merging (Akiba et al., "Evolutionary Optimization of Model Merging Recipes", 2024,
§3.1) searches the numbers of a mergekit recipe against objectives. The library keeps the search's
state in an optuna study (``<out>/study.db``) and resumes it trial by trial; the job adds the roots and
the job life cycle:

* admission checks the config (:func:`merge.evolve.load_search_config`, :func:`merge.evolve.parse_space`,
  the objectives' names), refuses the ``code`` objective (the service never runs a caller's code:
  ``allow_code`` is always off), resolves the recipe's models through the server's roots and claims
  memory from their sizes (planning every method at the middle of its ranges is left to the worker);
* the output folder is new, empty, or holds a search of the same config, which the job resumes (or
  extends, with a larger ``trials``); the worker passes ``resume=True`` whenever ``study.db`` is there;
* progress is one event per batch of trials (``steps_done`` of ``steps_total`` trials, the best
  values so far as ``metrics``); ``--slow-down`` sleeps after each batch, and a cancel lands there or
  at the next trial;
* a cancelled, failed or interrupted search keeps its study (finished trials are never repeated):
  ``RetryJob``, or creating the same search into the same folder again, resumes it.

Files the objectives open (data, heads, metanets) go through the roots (the library's ``path_resolver``),
and the recipe's models through the job's resolver, as in a merge.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.jobs.kind import JobKind, WorkerContext, register

if TYPE_CHECKING:
    from service.jobs.manager import JobManager, Submission
    from service.jobs.store import JobRecord

#: modules that register more objectives (the data-free ``metanet`` objective); ``merge`` never imports them
PLUGINS = ("metanets.objective",)
MAX_TRIALS = 1_000_000
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def _model_bytes(path: Path) -> int:
    """Bytes of a checkpoint's weight files (a file, or the weight files of a folder)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def _model_refs(space: Any) -> list[str]:
    """The recipe's model references (base first), from the recipe of one point of the space."""
    from merge.recipe import load_recipe

    values: dict[str, Any] = {"method": space.methods[0]}
    for g in space.genes:
        if g.choices is not None:
            values[g.name] = g.choices[0]
        else:
            values[g.name] = int(g.low) if g.integer else g.low
    return load_recipe(space.recipe(values)).model_refs()


def check_config(config: Any) -> tuple[Any, Any]:
    """The search config and its space, checked as the worker will read them (one line per problem);
    the ``code`` objective is refused (CodeRefusedError: FAILED_PRECONDITION)."""
    from merge.evolve import load_search_config, parse_space
    from merge.evolve.objectives import ObjectiveContext, parse_objectives

    cfg = load_search_config(config)
    space = parse_space(cfg)
    parse_objectives(cfg.objectives, ObjectiveContext(allow_code=False, plugins=PLUGINS))
    return cfg, space


def _existing_search(out: Path, fingerprint: str, shown: str) -> bool:
    """Whether ``out`` holds a search of this config (resumed); ALREADY_EXISTS when it holds anything else."""
    from merge.errors import OutputExistsError
    from merge.evolve.study import search_folder
    from service.jobs.store import ServiceError

    try:
        return search_folder(out, fingerprint)
    except OutputExistsError as e:  # the caller's name for the folder, not the server's path
        raise ServiceError("ALREADY_EXISTS", f"output_path: {str(e).replace(str(out), repr(shown))}",
                           "output_path") from None


async def admit(manager: JobManager, req: dict[str, Any], job_id: str) -> Submission:
    """Check a search request before anything is written: the config, the models (inside the roots),
    the output folder (new, empty, or a search of the same config to resume), the memory claim."""
    from merge.errors import RecipeError
    from service.jobs.manager import Submission
    from service.jobs.store import ServiceError
    from service.paths import JOB_SCHEME, HubDisabledError

    trials = int(req.get("trials") or 0)
    if not 0 <= trials <= MAX_TRIALS:
        raise ServiceError("INVALID_ARGUMENT", f"trials: {trials} (must be 0..{MAX_TRIALS:,})", "trials")
    cfg, space = await asyncio.to_thread(check_config, req["config"])
    try:
        refs = _model_refs(space)
    except RecipeError as e:
        raise ServiceError("INVALID_ARGUMENT", f"recipe: {e}", "config") from None
    if len(refs) > manager.config.max_models:
        raise ServiceError(
            "RESOURCE_EXHAUSTED",
            f"recipe: {len(refs)} models, more than this server's limit of {manager.config.max_models}",
            "config",
        )
    resolver = manager.resolver()
    inputs: list[Path] = []
    job_refs: dict[str, str] = {}
    sizes: list[int] = []
    for ref in refs:
        kind = resolver.kind(ref)
        if kind == "hub":
            if not manager.config.hub.enabled:
                raise HubDisabledError(
                    f"model '{ref}': Hub references are disabled on this server "
                    "(start it with --hub), and no such path exists under its roots"
                )
            continue  # resolved (downloaded) in the worker
        path = Path(resolver(ref).path)  # roots, pickles, existence: NOT_FOUND / PERMISSION_DENIED here
        inputs.append(path)
        sizes.append(await asyncio.to_thread(_model_bytes, path))
        if kind == "job":
            job_refs[ref[len(JOB_SCHEME) :]] = str(path)
    shown = req.get("output_path") or job_id
    out = manager.output_folder(req.get("output_path") or "", True, job_id, inputs, resumes=True)
    resumes = _existing_search(out, space.fingerprint(), shown)
    total = trials or cfg.budget.trials
    limits = [f"{total} trials"] if total else []
    if cfg.budget.seconds:
        limits.append(f"{cfg.budget.seconds:g} s")
    budget = " or ".join(limits)
    methods = "|".join(space.methods)
    return Submission(
        kind="evolve",
        spec={
            "config": cfg.model_dump(mode="json"),
            "trials": trials or None,
            "save_model": bool(req.get("save_model")),
        },
        summary=f"{'resume ' if resumes else ''}evolve {methods}: {budget}",
        output_path=out,
        overwrite=True,  # the folder may exist: a search of the same config, resumed
        # a trial holds the merged state dict (about one model) and the objective's copy of it, while
        # the inputs are read lazily (mmap): claim the inputs plus twice the largest
        est_bytes=sum(sizes) + 2 * max(sizes, default=0),
        progress={"steps_total": total or 0, "unit": "trial"},
        job_refs=job_refs,
    )


def _metric_names(objectives: list[dict[str, Any]]) -> list[str]:
    names = [next(iter(o)) if isinstance(o, dict) and o else f"objective_{i}" for i, o in enumerate(objectives)]
    if len(names) == 1:
        return [""]
    return [f"_{n}_{i}" if names.count(n) > 1 else f"_{n}" for i, n in enumerate(names)]


def run(ctx: WorkerContext) -> dict[str, Any]:
    """In the worker: ``run_search`` on the job's folder, resuming the study when it is there."""
    from merge.evolve import EvolveProgress, load_search_config, run_search
    from merge.evolve.study import STUDY

    spec = ctx.spec
    out = Path(str(ctx.output_path))
    cfg = load_search_config(spec["config"])
    total = spec.get("trials") or cfg.budget.trials or 0
    names = _metric_names(cfg.objectives)
    ctx.progress(force=True, phase="preparing", steps_done=0, steps_total=total, unit="trial")

    def progress(p: EvolveProgress) -> None:
        metrics: dict[str, float] = {}
        for n, v in zip(names, p.best or [], strict=False):
            metrics[f"best{n}"] = float(v)
        last = p.last or {}
        for n, v in zip(names, last.get("values") or [], strict=False):
            metrics[f"last{n}"] = float(v)
        if p.eta_seconds is not None:
            metrics["eta_seconds"] = float(p.eta_seconds)
        current = f"trial {last['number']} {str(last.get('state', '')).lower()}".strip() if last else ""
        ctx.progress(force=True, phase="searching", steps_done=p.trials_done, steps_total=p.trials_total or 0,
                     unit="trial", metrics=metrics, current=current)  # fmt: skip
        ctx.step()  # --slow-down, then stop here if cancelled (the batch's trials are in the study)

    r = run_search(
        spec["config"],
        out,
        resume=(out / STUDY).exists(),
        trials=spec.get("trials"),
        allow_code=False,  # never on the server
        save_model=bool(spec.get("save_model")),
        device=ctx.device,
        plugins=PLUGINS,
        resolver=ctx.resolver,
        path_resolver=ctx.confine,
        progress=progress,
        cancel=ctx.cancel,
    )
    result = r.to_json()
    result["best_recipe_yaml"] = Path(r.best_recipe).read_text() if r.best_recipe else ""
    return result


def cleanup(rec: JobRecord, why: str) -> None:
    """Whatever happened, the study stays (a retry, or the same search created again, resumes it);
    only what an attempt cut short leaves goes: scratch merges, temporary files, a half-written model."""
    from merge.atomic import recover

    out = Path(rec.output_path)
    if not out.is_dir():
        return
    shutil.rmtree(out / "scratch", ignore_errors=True)
    for tmp in [*out.glob("*.tmp"), *out.glob("pareto/*.tmp")]:
        tmp.unlink(missing_ok=True)
    recover(out / "model")


EVOLVE = register(
    JobKind(
        name="evolve",
        summary="search a merge recipe's numbers against objectives (merge.evolve.run_search; resumable study)",
        create_rpcs=("weightsmith.v1.EvolveService/CreateEvolveJob",),
        result_type="weightsmith.v1.EvolveResult",
        run=run,
        cleanup=cleanup,
        resumable=True,
    )
)

__all__ = ["EVOLVE", "PLUGINS", "admit", "check_config", "cleanup", "run"]
