"""What a recipe search leaves behind: the best recipe(s) as mergekit YAML, the trials table, the plots."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from merge.checkpoint import ResolvedModel
from merge.evolve.config import SearchSpace
from merge.plan import MergeOptions
from merge.recipe import load_recipe


@dataclass
class TrialRecord:
    number: int
    state: str
    method: str
    params: dict[str, Any]
    values: list[float] | None
    seconds: float | None
    error: str | None = None


@dataclass
class SearchResult:
    out_dir: str
    objectives: list[str]
    directions: list[str]
    trials: int  # finished trials in the study
    complete: int
    best: list[TrialRecord]  # the best trial, or the Pareto front
    best_recipe: str
    stopped: str  # "trials" | "time" | "cancelled"
    seconds: float
    files: list[str]
    executor: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def n_done(study: Any) -> int:
    """Trials evaluated (complete, or failed with an error): not those a killed run left unfinished."""
    return sum(t.state.is_finished() and "seconds" in t.user_attrs for t in study.get_trials(deepcopy=False))


def trial_records(study: Any, space: SearchSpace) -> list[TrialRecord]:
    out = []
    for t in study.trials:
        params = {k: v for k, v in t.params.items() if k != "method"}
        out.append(TrialRecord(
            number=t.number, state=t.state.name, method=t.params.get("method", space.methods[0]), params=params,
            values=list(t.values) if t.values is not None else None, seconds=t.user_attrs.get("seconds"),
            error=t.user_attrs.get("error"),
        ))
    return out


def trial_recipe(space: SearchSpace, params: dict[str, Any], values: list[float] | None,
                 objectives: list[str]) -> str:
    """A trial's recipe as plain YAML (validated as a recipe), its scores in a comment on top."""
    recipe = load_recipe(space.recipe(params)).to_yaml()
    scores = ", ".join(f"{n} {v:.6g}" for n, v in zip(objectives, values or [], strict=False))
    return f"# weightsmith evolve: {scores}\n{recipe}"


def write_report(study: Any, space: SearchSpace, objectives: list[str], out: Path, *, save_model: bool,
                 model_options: MergeOptions, resolver: Callable[[str], ResolvedModel] | None) -> SearchResult:
    import optuna

    records = trial_records(study, space)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    files: list[str] = []
    best_trials = (study.best_trials if len(objectives) > 1 else [study.best_trial]) if complete else []
    by_number = {r.number: r for r in records}
    best = [by_number[t.number] for t in best_trials]
    if len(objectives) > 1 and best:  # the front, best on the first objective first
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
        best.sort(key=lambda r: -sign * r.values[0])
    best_recipe = ""
    if best:
        top = best_trials[[t.number for t in best_trials].index(best[0].number)]
        text = trial_recipe(space, top.params, top.values, objectives)
        _write(out / "best_recipe.yml", text)
        best_recipe = str(out / "best_recipe.yml")
        files.append("best_recipe.yml")
        if len(objectives) > 1:
            (out / "pareto").mkdir(exist_ok=True)
            for old in (out / "pareto").glob("trial_*.yml"):
                old.unlink()
            for t in best_trials:
                _write(out / "pareto" / f"trial_{t.number}.yml", trial_recipe(space, t.params, t.values, objectives))
                files.append(f"pareto/trial_{t.number}.yml")
        if save_model:
            from merge.execute import run_merge

            run_merge(load_recipe(space.recipe(top.params)), out / "model", model_options, resolver=resolver)
            files.append("model/")
    _write(out / "trials.json", json.dumps({"objectives": objectives,
                                            "directions": [d.name.lower() for d in study.directions],
                                            "trials": [r.__dict__ for r in records]}, indent=2))
    _write(out / "trials.csv", _csv(records, objectives))
    files += ["trials.json", "trials.csv"]
    files += plot(records, objectives, [d.name.lower() for d in study.directions], study, out / "plots")
    return SearchResult(
        out_dir=str(out), objectives=objectives, directions=[d.name.lower() for d in study.directions],
        trials=n_done(study), complete=len(complete), best=best,
        best_recipe=best_recipe, stopped="", seconds=0.0, files=files, executor="",
    )


def _csv(records: list[Any], objectives: list[str]) -> str:
    names = sorted({k for r in records for k in r.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "method", *objectives, "seconds", *names, "error"])
    for r in records:
        vals = r.values or [None] * len(objectives)
        w.writerow([r.number, r.state, r.method, *vals, r.seconds, *[r.params.get(n) for n in names], r.error or ""])
    return buf.getvalue()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot(records: list[Any], objectives: list[str], directions: list[str], study: Any, folder: Path) -> list[str]:
    """history.png (each objective per trial, best so far), importance.png, pareto.png (2 objectives)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    done = [r for r in records if r.values is not None]
    if not done:
        return []
    folder.mkdir(exist_ok=True)
    files = []
    fig, axes = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 3.6), squeeze=False)
    for i, (name, direction) in enumerate(zip(objectives, directions, strict=True)):
        ax = axes[0][i]
        xs = [r.number for r in done]
        ys = [r.values[i] for r in done]
        pick = max if direction == "maximize" else min
        best = [pick(ys[: j + 1]) for j in range(len(ys))]
        ax.scatter(xs, ys, s=14, alpha=0.6, label="trial")
        ax.step(xs, best, where="post", color="C3", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{name} ({direction})")
        ax.legend(fontsize=8)
    fig.suptitle("optimisation history")
    fig.tight_layout()
    fig.savefig(folder / "history.png", dpi=110)
    plt.close(fig)
    files.append("plots/history.png")
    importance = _importance(study)
    if importance:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(importance) + 1.2))
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names])
        ax.set_xlabel(f"importance for {objectives[0]} (PED-ANOVA)")
        fig.tight_layout()
        fig.savefig(folder / "importance.png", dpi=110)
        plt.close(fig)
        files.append("plots/importance.png")
    if len(objectives) == 2:
        front = {t.number for t in study.best_trials}
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([r.values[0] for r in done], [r.values[1] for r in done], s=14, alpha=0.5, label="trial")
        pf = sorted((r for r in done if r.number in front), key=lambda r: r.values[0])
        ax.plot([r.values[0] for r in pf], [r.values[1] for r in pf], "o-", color="C3", label="Pareto front")
        ax.set_xlabel(f"{objectives[0]} ({directions[0]})")
        ax.set_ylabel(f"{objectives[1]} ({directions[1]})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=110)
        plt.close(fig)
        files.append("plots/pareto.png")
    return files


def _importance(study: Any) -> dict[str, float]:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 4 or not any(len(t.distributions) for t in complete):
        return {}
    import warnings

    try:
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes", category=UserWarning)
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        # PED-ANOVA ranks parameters by how they reach *low* target values
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        return optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                       target=lambda t: sign * t.values[0])
    except Exception:  # noqa: BLE001 - a plot, not a result: a failing importance estimate leaves it out
        return {}
