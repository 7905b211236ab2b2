"""Evolutionary model merging on sklearn's digits: does the searched recipe beat every hand-set one?

Akiba et al. ("Evolutionary Optimization of Model Merging Recipes", Sakana AI 2024, §3.1, Table 1) search
TIES/DARE densities and weights per layer with CMA-ES against a task score and report that the evolved
merge beats every hand-set recipe and every source model (EvoLLM-JP: MGSM-JA 52-56 against 10-30). This
script checks that claim at toy scale, offline, on two CPU cores, with ``weightsmith evolve``'s library call
(:func:`merge.evolve.run_search`):

* the four digits tasks of ``examples/merge_digits.py`` (identity, hflip, rot90, invert; a 64-256-256 ReLU
  backbone pre-trained on identity, one fine-tune per task with its own cosine head, the *large* regime
  lr 1e-2 where task vectors interfere); data split train / validation / test as there;
* the search: ``merge_method: {choice: [ties, dare_ties]}``, per model a weight in [0, 1.5] and a density
  in [0.1, 1] (the registry's bounds), one value per layer (``layer_groups: 1``), λ in [0.1, 2] (log); the
  objective is the built-in ``accuracy`` (model ``mlp`` with each task's *named head*) on the
  **validation** split, mean over tasks; TPE by default (``--sampler cmaes``: the paper's CMA-ES, which
  needs more trials than this budget for 19 numbers), ``trials`` trials;
* hand-set baselines, each tuned on the same validation split: task arithmetic with λ on a grid, TIES with
  density × λ on a grid, DARE-TIES likewise, AdaMerging (layer-wise, entropy on unlabelled test inputs,
  Yang et al. 2024), and each source model alone;
* everything is reported on the held-out **test** split, per seed.

Run ``python examples/evolve_digits.py`` (a few minutes); ``--quick`` is the reduced configuration the slow
test runs. Writes ``results.json``, ``evolve_digits.png`` and each seed's search folder (study, best recipe,
trials, plots) under ``examples/out/evolve_digits/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from merge_digits import (  # noqa: E402
    LOGIT_SCALE,
    accuracies,
    init_backbone,
    load_data,
    save_checkpoint,
    train,
)

from merge.evolve import run_search  # noqa: E402
from merge.execute import merge_in_memory  # noqa: E402
from merge.plan import MergeOptions  # noqa: E402

OUT = ROOT / "examples" / "out" / "evolve_digits"


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("identity", "hflip", "rot90", "invert")
    hidden: int = 256
    pretrain_epochs: int = 3
    finetune_epochs: int = 20
    lr: float = 1e-2  # merge_digits' "large" regime: the task vectors interfere
    seeds: tuple[int, ...] = (0, 1, 2)
    trials: int = 96
    batch: int = 8
    sampler: str = "tpe"
    ta_lambdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
    densities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    ties_lambdas: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    dare_lambdas: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    adamerging_steps: int = 200
    #: the data-free search: a metanet trained on this many random merges of the same genome (their
    #: validation accuracy as the target), then a search with the ``metanet`` objective alone
    metanet: str = "statnn"
    merge_zoo: int = 200
    metanet_epochs: int = 60


QUICK = Config(seeds=(0,), trials=32, finetune_epochs=12, densities=(0.2, 0.5, 1.0), ties_lambdas=(0.75, 1.0, 1.5),
               dare_lambdas=(0.3, 0.5, 1.0), ta_lambdas=(0.2, 0.3, 0.5, 0.8), adamerging_steps=60, merge_zoo=60,
               metanet_epochs=20)


def mean(xs: Any) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs))


def _recipe(method: str, base: Path, models: list[Path], *, seed: int, weight: float = 1.0,
            density: float | None = None, lam: float = 1.0) -> dict[str, Any]:
    per = {"weight": weight, **({"density": density} if density is not None else {})}
    return {"merge_method": method, "base_model": str(base), "seed": seed, "dtype": "float32",
            "models": [{"model": str(m), "parameters": per} for m in models], "parameters": {"lambda": lam}}


def _grid(name: str, recipes: list[tuple[dict[str, Any], dict[str, Any]]], evaluate: Any) -> dict[str, Any]:
    """Every recipe scored on val; the best one (on val) reported on test."""
    rows = []
    for params, r in recipes:
        sd = merge_in_memory(r, MergeOptions(workers=1))
        rows.append((evaluate(sd, "val"), params, sd))
    val, params, sd = max(rows, key=lambda t: t[0])
    return {"method": name, "chosen": params, "val": val, "test": evaluate(sd, "test"), "grid": len(rows)}


def run_seed(cfg: Config, data: dict[str, Any], seed: int, out_dir: Path = OUT) -> dict[str, Any]:
    folder = out_dir / f"seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    # --- the base and one fine-tune per task (as merge_digits) -----------------------------------------
    base_sd = init_backbone(cfg.hidden, gen)
    base_sd, _ = train(base_sd, torch.randn(10, cfg.hidden, generator=gen) * 0.1, data["train"].x["identity"],
                       data["train"].y, epochs=cfg.pretrain_epochs, lr=1e-3, seed=seed)
    base = save_checkpoint(folder / "base", base_sd, cfg.hidden, "pre-trained on identity digits")
    heads: dict[str, torch.Tensor] = {}
    paths: list[Path] = []
    fts = []
    for i, t in enumerate(cfg.tasks):
        g = torch.Generator().manual_seed(1000 * seed + 100 + i)
        sd, heads[t] = train(base_sd, torch.randn(10, cfg.hidden, generator=g) * 0.1, data["train"].x[t],
                             data["train"].y, epochs=cfg.finetune_epochs, lr=cfg.lr, seed=1000 * seed + i)
        fts.append(sd)
        paths.append(save_checkpoint(folder / f"ft_{t}", sd, cfg.hidden, f"fine-tuned on {t}"))

    def evaluate(sd: dict[str, torch.Tensor], split: str) -> float:
        return mean(accuracies(sd, heads, data[split]).values())

    # --- the search's data: each task's validation split and its named head ---------------------------
    # a cosine head's argmax is the argmax of the features against the unit-norm class rows: a Linear head
    save_file({f"{t}.weight": F.normalize(h, dim=1).contiguous() for t, h in heads.items()},
              str(folder / "heads.safetensors"))
    tasks = []
    for t in cfg.tasks:
        np.savez(folder / f"val_{t}.npz", x=data["val"].x[t].numpy(), y=data["val"].y.numpy())
        tasks.append({"data": str(folder / f"val_{t}.npz"), "head": f"{folder / 'heads.safetensors'}:{t}."})
    search = {
        "recipe": {
            "merge_method": {"choice": ["ties", "dare_ties"]},
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": {"min": 0.1}}}
                       for p in paths],
            "parameters": {"lambda": {"min": 0.1, "max": 2.0, "log": True}},
            "dtype": "float32",
        },
        "layer_groups": 1,
        "objectives": [{"accuracy": {"model": "mlp", "tasks": tasks}}],
        "budget": {"trials": cfg.trials},
        "sampler": cfg.sampler,
        "batch": cfg.batch,
        "seed": seed,
    }
    t0 = time.perf_counter()
    res = run_search(search, folder / "search")
    search_s = time.perf_counter() - t0
    best = merge_in_memory(folder / "search" / "best_recipe.yml", MergeOptions(workers=1))
    b = res.best[0]
    out: dict[str, Any] = {
        "seed": seed,
        "evolved": {"method": b.method, "val": evaluate(best, "val"), "test": evaluate(best, "test"),
                    "search_val": 100.0 * b.values[0], "trials": res.complete, "seconds": round(search_s, 1),
                    "trial_of_best": b.number},
    }
    # history: the best validation score after n trials
    vals = [(t.number, t.values[0]) for t in _trials(folder / "search")]
    out["evolved"]["history"] = [100.0 * max(v for n, v in vals if n <= k) for k in range(res.trials)]
    # --- hand-set recipes, tuned on validation ------------------------------------------------------
    r = seed
    out["task_arithmetic"] = _grid("task_arithmetic", [
        ({"lambda": lam}, _recipe("task_arithmetic", base, paths, seed=r, lam=lam)) for lam in cfg.ta_lambdas
    ], evaluate)
    out["ties"] = _grid("ties", [
        ({"density": d, "lambda": lam}, _recipe("ties", base, paths, seed=r, density=d, lam=lam))
        for d in cfg.densities for lam in cfg.ties_lambdas
    ], evaluate)
    out["dare_ties"] = _grid("dare_ties", [
        ({"density": d, "lambda": lam}, _recipe("dare_ties", base, paths, seed=r, density=d, lam=lam))
        for d in cfg.densities for lam in cfg.dare_lambdas
    ], evaluate)
    out["adamerging"] = _adamerging(cfg, base_sd, fts, heads, data, evaluate)
    searched_val = [100.0 * t.values[0] for t in _trials(folder / "search")]
    out["metanet"] = _data_free(cfg, search, folder, evaluate, searched_val)
    out["sources"] = {t: {"val": evaluate(sd, "val"), "test": evaluate(sd, "test")}
                      for t, sd in zip(cfg.tasks, fts, strict=True)}
    out["base"] = {"val": evaluate(base_sd, "val"), "test": evaluate(base_sd, "test")}
    return out


def _data_free(cfg: Config, search: dict[str, Any], folder: Path, evaluate: Any,
               searched_val: list[float]) -> dict[str, Any]:
    """The same search with no data: the ``metanet`` objective, a metanet trained on random merges of this
    genome (their validation accuracy as its target: ``metanets.zoo_import``). Reported: the metanet's held-out
    fit, and where its chosen recipe's real validation accuracy ranks among the data-driven search's trials."""
    from merge.evolve import load_search_config, parse_space
    from metanets.train import TrainConfig, train_metanet
    from metanets.zoo_import import import_zoo

    space = parse_space(load_search_config(search))
    space.bind_layers(["layers.0.weight", "layers.1.weight"])
    rng = np.random.default_rng(1234)
    genes = space.expanded()

    def entries() -> Any:
        for i in range(cfg.merge_zoo):
            values: dict[str, Any] = {"method": str(rng.choice(space.methods))}
            for g in genes:
                lo, hi = (np.log(g.low), np.log(g.high)) if g.log else (g.low, g.high)
                v = float(rng.uniform(lo, hi))
                values[g.name] = float(np.exp(v)) if g.log else v
            sd = merge_in_memory(space.recipe(values), MergeOptions(workers=1))
            yield sd, {"test_acc": evaluate(sd, "val") / 100.0, "run": i, "task": "digits-4 merges"}

    t0 = time.perf_counter()
    zoo = import_zoo(folder / "merge_zoo", entries(), name="evolve_digits merges", overwrite=True)
    res = train_metanet(zoo, TrainConfig(model=cfg.metanet, epochs=cfg.metanet_epochs, patience=cfg.metanet_epochs,
                                         seed=0), folder / "metanet", progress=False, overwrite=True)
    zoo_s = time.perf_counter() - t0
    data_free = {**search, "objectives": [{"metanet": {"metanet": str(folder / "metanet")}}]}
    t0 = time.perf_counter()
    r = run_search(data_free, folder / "search_metanet", plugins=("metanets.objective",))
    sd = merge_in_memory(folder / "search_metanet" / "best_recipe.yml", MergeOptions(workers=1))
    val, test = evaluate(sd, "val"), evaluate(sd, "test")
    zoo_vals = [100.0 * a for a in zoo.field("test_acc")]
    return {
        "metanet": cfg.metanet, "merges": cfg.merge_zoo,
        "fit": {k: res.metrics[k] for k in ("kendall_tau", "r2", "prediction_spread", "test_records")},
        "predicted": 100.0 * r.best[0].values[0], "val": val, "test": test,
        "val_rank_among_search_trials": 1 + sum(v > val for v in searched_val), "search_trials": len(searched_val),
        "val_percentile_among_random_merges": 100.0 * sum(v <= val for v in zoo_vals) / len(zoo_vals),
        "seconds": {"zoo_and_training": round(zoo_s, 1), "search": round(time.perf_counter() - t0, 1)},
    }


def _trials(folder: Path) -> list[Any]:
    import optuna

    st = optuna.load_study(study_name="weightsmith-evolve", storage=f"sqlite:///{folder / 'study.db'}")
    return [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _adamerging(cfg: Config, base_sd: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]],
                heads: dict[str, torch.Tensor], data: dict[str, Any], evaluate: Any) -> dict[str, Any]:
    """Layer-wise AdaMerging (Yang et al. 2024, Eq. 4): λ per task and layer by entropy on unlabelled test inputs."""
    from concrete_merging import Backbone, CosineHead

    from merge.methods.concrete import FusionProblem, FusionTask, entropy_loss, learn_adamerging

    tasks = [FusionTask(t, data["test"].x[t], head=CosineHead(heads[t], LOGIT_SCALE), loss=entropy_loss)
             for t in cfg.tasks]
    plan = learn_adamerging(base_sd, fts, FusionProblem(Backbone(cfg.hidden), tasks), coefficients="layer",
                            steps=cfg.adamerging_steps, lr=1e-2, seed=0)
    sd = plan.merge(base_sd, fts)
    return {"method": "adamerging (layer-wise)", "val": evaluate(sd, "val"), "test": evaluate(sd, "test"),
            "steps": cfg.adamerging_steps}


HAND_SET = ("task_arithmetic", "ties", "dare_ties", "adamerging")


def summarise(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "n": len(xs)}

    s: dict[str, Any] = {"evolved": ms([r["evolved"]["test"] for r in runs])}
    for k in HAND_SET:
        s[k] = ms([r[k]["test"] for r in runs])
    s["metanet"] = ms([r["metanet"]["test"] for r in runs])
    s["best_source"] = ms([max(v["test"] for v in r["sources"].values()) for r in runs])
    s["base"] = ms([r["base"]["test"] for r in runs])
    beats = {k: sum(r["evolved"]["test"] > r[k]["test"] for r in runs) for k in HAND_SET}
    best_hand = [max(r[k]["test"] for k in HAND_SET) for r in runs]
    s["claims"] = {
        "evolved beats every hand-set recipe (test, every seed)": all(
            r["evolved"]["test"] > b for r, b in zip(runs, best_hand, strict=True)),
        "evolved beats every source model (test, every seed)": all(
            r["evolved"]["test"] > max(v["test"] for v in r["sources"].values()) for r in runs),
        "seeds where evolved beats each hand-set recipe": beats,
        "mean margin over the best hand-set recipe (test, points)": float(np.mean(
            [r["evolved"]["test"] - b for r, b in zip(runs, best_hand, strict=True)])),
        "data-free (metanet) choice: rank of its real val accuracy among the data-driven search's trials":
            [f"{r['metanet']['val_rank_among_search_trials']}/{r['metanet']['search_trials']}" for r in runs],
        "data-free (metanet) choice beats the best source model (test, every seed)": all(
            r["metanet"]["test"] > max(v["test"] for v in r["sources"].values()) for r in runs),
    }
    return s


def table(cfg: Config, runs: list[dict[str, Any]], s: dict[str, Any]) -> str:
    lines = [f"mean test accuracy over {len(cfg.tasks)} tasks (%), {len(runs)} seed(s); chosen on validation",
             f"{'recipe':44s} {'test mean ± std':>16s}   per seed"]

    def row(name: str, key: str, per: list[float]) -> None:
        lines.append(f"{name:44s} {s[key]['mean']:7.2f} ± {s[key]['std']:5.2f}   "
                     + " ".join(f"{v:6.2f}" for v in per))

    row(f"evolved ({cfg.sampler}, {cfg.trials} trials)", "evolved", [r["evolved"]["test"] for r in runs])
    for k in HAND_SET:
        row(f"{k} (grid on val)" if k != "adamerging" else "adamerging (layer-wise)", k, [r[k]["test"] for r in runs])
    row(f"evolved, {cfg.metanet} metanet objective (no data)", "metanet", [r["metanet"]["test"] for r in runs])
    row("best single source model", "best_source", [max(v["test"] for v in r["sources"].values()) for r in runs])
    row("base (pre-trained)", "base", [r["base"]["test"] for r in runs])
    lines.append("")
    for r in runs:
        e = r["evolved"]
        lines.append(f"seed {r['seed']}: evolved {e['method']}, val {e['val']:.2f} (search {e['search_val']:.2f}), "
                     f"best at trial {e['trial_of_best']}, {e['trials']} trials in {e['seconds']} s; "
                     f"TIES chose {r['ties']['chosen']}, DARE {r['dare_ties']['chosen']}")
    for r in runs:
        m = r["metanet"]
        lines.append(f"seed {r['seed']}: metanet ({m['merges']} random merges) held-out fit "
                     f"(test split of {m['fit']['test_records']}): Kendall τ {m['fit']['kendall_tau']:.2f}, "
                     f"R² {m['fit']['r2']:.2f}; its choice: predicted {m['predicted']:.2f}, real val {m['val']:.2f} "
                     f"(rank {m['val_rank_among_search_trials']}/{m['search_trials']} among the data search's "
                     f"trials, above {m['val_percentile_among_random_merges']:.0f} % of the random merges), "
                     f"test {m['test']:.2f}")
    lines.append("")
    for k, v in s["claims"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def plot(cfg: Config, runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for i, r in enumerate(runs):
        ax.plot(range(1, len(r["evolved"]["history"]) + 1), r["evolved"]["history"], label=f"seed {r['seed']}",
                color=f"C{i}")
        ax.axhline(max(r[k]["val"] for k in HAND_SET), ls="--", lw=0.8, color=f"C{i}")
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title("search history (dashed: the seed's best hand-set recipe, val)")
    ax.legend(fontsize=8)
    ax = axes[1]
    names = ["evolved", "metanet\n(no data)", "TA", "TIES", "DARE\nTIES", "Ada-\nMerging", "best\nsource"]
    vals = [[r["evolved"]["test"] for r in runs], [r["metanet"]["test"] for r in runs],
            *[[r[k]["test"] for r in runs] for k in HAND_SET],
            [max(v["test"] for v in r["sources"].values()) for r in runs]]
    ax.bar(names, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], color=["C3", "C1"] + ["C0"] * 5)
    ax.set_ylim(min(np.mean(v) for v in vals) - 10, 100)
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title("held-out test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(cfg: Config | None = None, *, verbose: bool = True, out_dir: Path = OUT) -> dict[str, Any]:
    cfg = cfg or Config()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = load_data(cfg.tasks)
    runs = []
    for seed in cfg.seeds:
        runs.append(run_seed(cfg, data, seed, out_dir))
        if verbose:
            e = runs[-1]["evolved"]
            print(f"seed {seed}: evolved {e['test']:.2f} test ({e['trials']} trials, {e['seconds']} s)", flush=True)
    s = summarise(cfg, runs)
    result = {"config": asdict(cfg), "runs": runs, "summary": s, "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    plot(cfg, runs, out_dir / "evolve_digits.png")
    if verbose:
        print(table(cfg, runs, s))
        print(f"\n{result['seconds']} s; results.json and evolve_digits.png in {out_dir}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration the slow test runs")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--sampler", default=None, choices=["cmaes", "tpe", "random"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    a = ap.parse_args()
    c = QUICK if a.quick else Config()
    from dataclasses import replace

    c = replace(c, **{k: v for k, v in (("trials", a.trials), ("sampler", a.sampler),
                                        ("seeds", tuple(a.seeds) if a.seeds else None)) if v is not None})
    main(c)
