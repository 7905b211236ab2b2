"""Run a recipe search: an optuna study (the resumable state) whose trials merge and score on Dask.

Evolutionary model merging (Akiba et al. 2024, §3.1) searches a recipe's numbers with CMA-ES against an
evaluation; here the optimiser is optuna (CMA-ES through ``cmaes``, TPE, NSGA-II for several objectives,
random), chosen over the ``cma`` package and nevergrad because its *study* is a database: stored in SQLite
in the output folder by default, it is what a killed search resumes from and what a finished one is
extended from, trial by trial, and the same study could live in any SQL database for many drivers.

Trials are asked ``batch`` at a time, evaluated in parallel (in this process, or on a Dask cluster:
a ``LocalCluster`` on 127.0.0.1 with ``workers`` processes, or ``scheduler="tcp://..."``), and told in
order, so for a fixed seed the search proposes the same trials whatever runs them. Each trial merges in
memory (:func:`merge.execute.merge_in_memory`: the streaming engine writing into tensors) when the model
fits, else into a scratch folder under the output that is removed after scoring; the objectives score the
state dict. A trial that raises is recorded as failed with its error; a search whose whole first batch
fails stops with that error (a config problem, not bad luck).

Output folder::

    study.db            the optuna study (resumable state)       search.json   the config and its fingerprint
    best_recipe.yml     the best trial's recipe: plain mergekit YAML (runnable by `weightsmith merge`, mergekit)
    pareto/trial_N.yml  with several objectives: every recipe on the Pareto front
    trials.csv/.json    every trial: number, state, method, parameters, values, seconds, error
    plots/*.png         optimisation history, parameter importance, the Pareto front (2 objectives)
    model/              the best merge, written by the engine (``save_model``)
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.checkpoint import ResolvedModel
from merge.errors import InvalidArgumentError, MergeCancelled, OutputExistsError, RecipeError, WeightsmithError
from merge.evolve.config import SearchConfig, SearchSpace, load_search_config, parse_space
from merge.evolve.objectives import ObjectiveContext, Score, parse_objectives
from merge.evolve.report import SearchResult, TrialRecord, n_done, write_report
from merge.plan import MergeOptions, plan_merge

STUDY = "study.db"
STUDY_NAME = "weightsmith-evolve"


@dataclass
class EvolveProgress:
    trials_done: int  # finished trials in the study (complete or failed)
    trials_total: int | None
    best: list[float] | None  # the best values so far (single objective: one)
    seconds: float
    eta_seconds: float | None
    last: dict[str, Any] | None = None  # the last finished trial (TrialRecord as JSON)


# --------------------------------------------------------------------------------------------------
# one trial (runs in this process or on a Dask worker)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialJob:
    number: int
    recipe: dict[str, Any]  # model references already resolved to paths (workers resolve nothing)
    objectives: list[dict[str, Any]]
    context: dict[str, Any]  # ObjectiveContext fields (no hooks: those stay in the driver)
    in_memory: bool
    scratch: str
    threads: int
    device: str


_SCORERS: dict[str, list[Score]] = {}  # per process: objectives built once (data loaded once)
_TUNED: list[bool] = []  # the allocator tuned in this process


def _scorers(job: TrialJob) -> list[Score]:
    key = json.dumps([job.objectives, job.context], sort_keys=True, default=str)
    if key not in _SCORERS:
        ctx = _context(job.context)
        _SCORERS.clear()  # a worker serves one search at a time
        _SCORERS[key] = [o.build(ctx) for o in parse_objectives(job.objectives, ctx)]
    return _SCORERS[key]


def _context(fields: dict[str, Any]) -> ObjectiveContext:
    return ObjectiveContext(allow_code=fields["allow_code"], device=fields["device"],
                            base_path=Path(fields["base_path"]) if fields["base_path"] else None,
                            plugins=tuple(fields["plugins"]))


def evaluate_trial(job: TrialJob, scorers: list[Score] | None = None,
                   cancel: threading.Event | None = None) -> dict[str, Any]:
    """Merge one trial's recipe and score it: ``{"values", "seconds"}`` or ``{"error"}``. Never raises
    for the trial's own failure (a bad combination is a failed trial, not a failed search)."""
    from merge.execute import merge_in_memory, run_merge, tune_allocator

    if not _TUNED:  # once per process: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which
        tune_allocator()  # made every chunk a fresh mmap (4-5x slower trials: bench/evolve.py)
        _TUNED.append(True)
    t0 = time.perf_counter()
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, job.threads))
    scratch = Path(job.scratch) / f"trial-{job.number}"
    try:
        scorers = scorers if scorers is not None else _scorers(job)
        options = MergeOptions(device=job.device, workers=1, overwrite=True)
        if job.in_memory:
            state = merge_in_memory(job.recipe, options, cancel=cancel)
        else:
            run_merge(job.recipe, scratch, options, cancel=cancel, progress=lambda p: None)
            from merge.checkpoint import open_checkpoint

            ck = open_checkpoint(scratch)
            try:
                state = {k: ck[k] for k in ck}
            finally:
                ck.close()
        values = [float(s(state)) for s in scorers]
        return {"values": values, "seconds": round(time.perf_counter() - t0, 4)}
    except MergeCancelled:
        raise
    except WeightsmithError as e:
        return {"error": str(e), "seconds": round(time.perf_counter() - t0, 4)}
    except Exception as e:  # noqa: BLE001 - a trial's failure is recorded, the search goes on
        return {"error": f"{type(e).__name__}: {e}", "seconds": round(time.perf_counter() - t0, 4)}
    finally:
        torch.set_num_threads(prev)
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------------------
class _Local:
    name = "local"

    def __init__(self, scorers: list[Score], cancel: threading.Event | None) -> None:
        self.scorers, self.cancel = scorers, cancel

    def map(self, jobs: list[TrialJob]) -> list[dict[str, Any]]:
        out = []
        for j in jobs:
            if self.cancel is not None and self.cancel.is_set():
                raise MergeCancelled("search cancelled")
            out.append(evaluate_trial(j, self.scorers, self.cancel))
        return out

    def close(self) -> None:
        pass


class _Dask:
    def __init__(self, scheduler: str | None, workers: int) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InvalidArgumentError("parallel trials need Dask distributed: pip install 'weightsmith[evolve]'"
                                       ) from None
        self.cluster = None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise InvalidArgumentError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
            self.name = f"dask {scheduler}"
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        host="127.0.0.1", dashboard_address=None)
            self.client = Client(self.cluster)
            self.name = f"dask LocalCluster ({workers} workers)"

    def map(self, jobs: list[TrialJob]) -> list[dict[str, Any]]:
        futures = self.client.map(evaluate_trial, jobs, pure=False)
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# --------------------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------------------
def _sampler(cfg: SearchConfig, n_objectives: int, seed: int) -> Any:
    import optuna

    name = cfg.sampler or ("nsga2" if n_objectives > 1 else "cmaes")
    if name == "cmaes" and n_objectives > 1:
        raise RecipeError("sampler 'cmaes' optimises one objective; with several use nsga2, tpe or random")
    if name == "cmaes":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, cfg.batch))
    return optuna.samplers.RandomSampler(seed=seed)


def _suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if len(space.methods) > 1:
        values["method"] = trial.suggest_categorical("method", list(space.methods))
    method = values.get("method", space.methods[0])
    for g in space.expanded():
        if method not in g.methods:
            continue
        if g.choices is not None:
            values[g.name] = trial.suggest_categorical(g.name, list(g.choices))
        elif g.integer:
            values[g.name] = trial.suggest_int(g.name, int(g.low), int(g.high), log=g.log)
        else:
            values[g.name] = trial.suggest_float(g.name, g.low, g.high, log=g.log)
    return values


def _check_space(space: SearchSpace, options: MergeOptions,
                 resolver: Callable[[str], ResolvedModel] | None) -> tuple[Any, dict[str, str]]:
    """Plan (headers only) the recipe of every method at the middle of its ranges: bad references, shapes
    and values fail here, before any trial. Returns the first plan and the references' local paths."""
    def middle(method: str) -> dict[str, Any]:
        mid: dict[str, Any] = {"method": method}
        for g in space.expanded():
            if g.choices is not None:
                mid[g.name] = g.choices[0]
            else:
                m = (g.low * g.high) ** 0.5 if g.log else (g.low + g.high) / 2
                mid[g.name] = round(m) if g.integer else m
        return mid

    plan = None
    for method in space.methods:
        p = plan_merge(space.recipe(middle(method)), options, resolver=resolver)
        if plan is None:
            plan = p
            space.bind_layers([t.name for t in p.tasks])
            if space.config.layer_groups:  # again, with the groups' filters
                p = plan_merge(space.recipe(middle(method)), options, resolver=resolver)
        if p.warnings:
            raise RecipeError(f"method '{method}': {p.warnings[0]}")
    paths = {m.ref: str(Path(m.path).resolve()) for m in plan.models if not m.adapters}
    return plan, paths


def _with_paths(recipe: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    import copy

    r = copy.deepcopy(recipe)
    for holder, key in [(r, "base_model"), *[(m, "model") for m in r.get("models") or []],
                        *[(sl, "base_model") for sl in r.get("slices") or []],
                        *[(s, "model") for sl in r.get("slices") or [] for s in sl.get("sources") or []]]:
        if holder.get(key) in paths:
            holder[key] = paths[holder[key]]
    return r


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def run_search(
    config: str | Path | dict[str, Any] | SearchConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    trials: int | None = None,
    scheduler: str | None = None,
    workers: int = 1,
    allow_code: bool = False,
    save_model: bool = False,
    device: str = "cpu",
    plugins: tuple[str, ...] = (),
    resolver: Callable[[str], ResolvedModel] | None = None,
    path_resolver: Callable[[str, str], str] | None = None,
    progress: Callable[[EvolveProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> SearchResult:
    """Search the recipe ``config`` describes; write the study, the best recipe, trials and plots to ``out_dir``.

    ``resume`` continues the study in ``out_dir`` (a killed search, or a finished one with a larger budget:
    ``trials`` overrides ``budget.trials``, counting the study's earlier trials). ``workers > 1`` or
    ``scheduler`` runs trials on Dask. ``plugins`` are modules that register more objectives
    (``metanets.objective``). ``path_resolver`` confines the files objectives open (the service's roots).
    """
    import optuna

    t0 = time.perf_counter()
    cfg = load_search_config(config)
    if trials is not None:
        cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"trials": trials})})
    space = parse_space(cfg)
    out = Path(out_dir)
    fingerprint = space.fingerprint()
    holds = search_folder(out, fingerprint)
    if holds and not resume:
        raise OutputExistsError(f"{out} holds a search already: --resume to continue or extend it, "
                                "or choose another folder")
    if resume and not holds:
        raise RecipeError(f"--resume: {out} holds no search to resume (no {STUDY})")
    options = MergeOptions(device=device, workers=1, path_resolver=path_resolver)
    plan, paths = _check_space(space, options, resolver)
    base = next((m for m in plan.models if m.ref == space.config.recipe.get("base_model")), plan.models[0])
    base_path = Path(base.path) if Path(base.path).is_dir() else Path(base.path).parent
    ctx = ObjectiveContext(allow_code=allow_code, base_path=base_path, device=device,
                           path_resolver=path_resolver, plugins=tuple(plugins))
    objectives = parse_objectives(cfg.objectives, ctx)
    scorers = [o.build(ctx) for o in objectives]  # data and models load (and fail) here, before any trial
    directions = [o.direction for o in objectives]
    in_memory = cfg.in_memory if cfg.in_memory != "auto" else plan.bytes_out * 3 * max(1, workers) < _available_memory()
    parallel = scheduler is not None or workers > 1

    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)  # one search per folder at a time (held until this process ends the search)
    try:
        meta = out / "search.json"
        _write_text(meta, json.dumps({"fingerprint": fingerprint, "config": cfg.model_dump(mode="json")}, indent=2))
        scratch = out / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)  # a killed run's scratch merges

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(out / STUDY).resolve()}")
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=directions,
                                    load_if_exists=True)
        _requeue_interrupted(study)
        threads = max(1, (os.cpu_count() or 1) // max(1, workers)) if parallel else torch.get_num_threads()
        context = {"allow_code": allow_code, "device": device, "base_path": str(base_path), "plugins": list(plugins)}
        executor: Any = _Dask(scheduler, workers) if parallel else _Local(scorers, cancel)
        stopped = "trials"
        first_batch = not study.trials
        ran = 0
        try:
            while True:
                done = n_done(study)
                if cfg.budget.trials is not None and done >= cfg.budget.trials:
                    stopped = "trials"
                    break
                if cfg.budget.seconds is not None and time.perf_counter() - t0 >= cfg.budget.seconds:
                    stopped = "time"
                    break
                if cancel is not None and cancel.is_set():
                    raise MergeCancelled("search cancelled; the study keeps its finished trials")
                k = cfg.batch if cfg.budget.trials is None else min(cfg.batch, cfg.budget.trials - done)
                # the sampler is seeded by the study's size: the same history proposes the same trials,
                # in one run or resumed, on one process or on a cluster
                study.sampler = _sampler(cfg, len(objectives), cfg.seed + len(study.trials))
                asked = [study.ask() for _ in range(k)]
                chosen = [_suggest(t, space) for t in asked]
                for t in asked:  # its parameters are complete: a killed run asks them again (_requeue_interrupted)
                    t.set_user_attr("evaluating", True)
                jobs = [TrialJob(t.number, _with_paths(space.recipe(v), paths), cfg.objectives, context,
                                 in_memory, str(scratch), threads, device) for t, v in zip(asked, chosen, strict=True)]
                results = executor.map(jobs)
                for t, r in zip(asked, results, strict=True):
                    t.set_user_attr("seconds", r["seconds"])
                    if "error" in r:
                        t.set_user_attr("error", r["error"])
                        study.tell(t, state=optuna.trial.TrialState.FAIL)
                    else:
                        study.tell(t, r["values"])
                if first_batch and all("error" in r for r in results):
                    raise RecipeError(f"every trial of the first batch failed; the first: {results[0]['error']}")
                first_batch = False
                ran += len(results)
                if progress is not None:
                    progress(_progress(study, cfg, t0, ran))
        finally:
            executor.close()
            shutil.rmtree(scratch, ignore_errors=True)
        result = write_report(study, space, [o.name for o in objectives], out, save_model=save_model,
                              model_options=MergeOptions(device=device, overwrite=True, path_resolver=path_resolver),
                              resolver=resolver)
        result.stopped = stopped
        result.executor = executor.name
        result.seconds = round(time.perf_counter() - t0, 3)
        return result
    finally:
        lock.close()


def _lock(out: Path) -> Any:
    """An exclusive ``flock`` on ``OUT/.lock``: a second search (or resume) of the same folder while one runs
    is refused, instead of two drivers writing one study."""
    import fcntl

    f = (out / ".lock").open("a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OutputExistsError(f"{out}: another search is running in this folder") from None
    return f


def search_folder(out: Path, fingerprint: str) -> bool:
    """Whether ``out`` holds a search of the config with this fingerprint (True: it can be resumed or
    extended) or nothing yet (False); :class:`OutputExistsError` when it holds anything else: a file, other
    files, or a search of another config. Nothing of a user's is ever written over."""
    if not (out.exists() or out.is_symlink()):
        return False
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a search folder")
    meta, db = out / "search.json", out / STUDY
    if meta.exists() or db.exists():
        try:
            old = json.loads(meta.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            old = None
        if old != fingerprint:
            raise OutputExistsError(f"{out} holds a search of another config (the config differs; only the "
                                    "budget may change): use a new folder")
        return db.exists()
    if any(p.name != ".lock" for p in out.iterdir()):
        raise OutputExistsError(f"{out} exists and is not a search folder")
    return False


def _requeue_interrupted(study: Any) -> None:
    """Trials a killed run left RUNNING: marked failed (interrupted); those it was evaluating have their
    parameters asked again first, so nothing finished is repeated and nothing started is lost (a trial killed
    while its parameters were being proposed has none worth keeping)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.user_attrs.get("evaluating"):
            study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})


def _progress(study: Any, cfg: SearchConfig, t0: float, ran: int) -> EvolveProgress:
    import optuna

    done = n_done(study)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = None
    if complete:
        if len(study.directions) == 1:
            best = [study.best_value]
        else:
            best = [
                (max if d == optuna.study.StudyDirection.MAXIMIZE else min)(t.values[i] for t in complete)
                for i, d in enumerate(study.directions)
            ]
    elapsed = time.perf_counter() - t0
    eta = None
    if cfg.budget.trials is not None and ran:
        eta = round(max(0, cfg.budget.trials - done) * elapsed / ran, 1)
    last = study.trials[-1]
    return EvolveProgress(done, cfg.budget.trials, best, round(elapsed, 3), eta,
                          {"number": last.number, "state": last.state.name, "values": last.values,
                           "params": last.params})


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


__all__ = ["EvolveProgress", "SearchResult", "TrialRecord", "evaluate_trial", "run_search"]
