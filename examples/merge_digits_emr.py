"""EMR-Merging on digits-4: each task's EMR model against task arithmetic, TIES and the fine-tunes.

Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024: elect one
unified task vector τ_uni, and give each task a 1-bit mask M_i and a scalar λ_i; task i is served by
θ_0 + λ_i M_i ⊙ τ_uni. The paper's claim (§4, Tables 1–3) is that these task models come *close to the
individual fine-tuned models* and lie *well above* single-model merges such as task arithmetic and
TIES, *with no tuning* (no data, no validation search), for the price of T bits per parameter.

Set-up: exactly ``examples/merge_digits.py``'s digits-4 (its functions are imported: the data, the
64 → 256 → 256 MLP backbone with cosine heads, pre-training θ_0 on the identity task and fine-tuning
one model per task, identity / hflip / rot90 / invert, with the same seeds), in its two regimes
(fine-tuning lr 1e-3 "small" and 1e-2 "large" task vectors), 3 seeds. The backbone is merged; each
task is evaluated on the test split with its own head:

* **individual**: each fine-tune on its own task (the ceiling EMR aims at);
* **EMR** (``merge_method: emr``, ``task: i``, through the engine): task i's EMR model on task i; no
  hyperparameter. The engine's output is checked bit for bit against the library call
  (:func:`merge.methods.emr.emr_plan`), and every task model is rebuilt from the saved plan folder
  (``emr_plan/``) and the base alone, without the fine-tunes, and checked to be the same bytes;
* **task arithmetic** (λ chosen on the validation split) and **TIES** (density k and λ on
  validation; the paper's disjoint mean and the summed variant, the better on validation);
* single-model read-outs of the EMR plan (no per-task modulators): ``mean`` (the default output of
  ``emr``: the average of the task models), ``unified`` (θ_0 + τ_uni) and θ_0 + mean(λ)·τ_uni;
* ablations (library): Elect + Mask (λ = 1), Elect + Rescale (no mask: θ_0 + λ_i τ_uni), the
  authors' code's rescaler (per-tensor means) and a λ per tensor.

Storage: the masks are packed 8 to a byte (1 bit per parameter per task); the script reports the
bits per parameter and the bytes of the plan against the fine-tunes.

Run: ``python examples/merge_digits_emr.py`` (a few minutes on two busy cores); ``--quick`` runs the
reduced configuration of the slow test. Writes ``results.json`` and ``merge_digits_emr.png`` (and the
checkpoints, recipes and one merged EMR output with its plan per run) under
``examples/out/merge_digits_emr/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from merge_digits import accuracies, init_backbone, load_data, save_checkpoint, train  # noqa: E402

from merge.execute import merge_in_memory, run_merge  # noqa: E402
from merge.methods.emr import EMRPlan, emr_plan  # noqa: E402
from merge.plan import MergeOptions  # noqa: E402

OUT = ROOT / "examples" / "out" / "merge_digits_emr"
#: what "close to the individual models" and "well above TA/TIES" mean here, fixed before running
CLOSE_NORMALIZED = 0.95  # EMR accuracy / the fine-tune's, mean over tasks (the paper: 0.98 ViT-B/32)
WELL_ABOVE_POINTS = 10.0  # EMR − max(TA, TIES), points, every seed (the paper: +16 over TIES, ViT-B/32)


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("identity", "hflip", "rot90", "invert")
    hidden: int = 256
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 20
    regimes: dict[str, float] = field(default_factory=lambda: {"small": 1e-3, "large": 1e-2})
    seeds: tuple[int, ...] = (0, 1, 2)
    ta_lambdas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
    ties_lambdas: tuple[float, ...] = (0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5)  # disjoint mean
    ties_sum_lambdas: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)  # sum
    ties_densities: tuple[float, ...] = (0.2, 0.5)
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        """The reduced configuration of the slow test: one seed, shorter fine-tuning, coarse grids."""
        return Config(seeds=(0,), finetune_epochs=12, ta_lambdas=(0.1, 0.2, 0.3, 0.5, 1.0),
                      ties_lambdas=(0.5, 1.0), ties_sum_lambdas=(0.2, 0.4), ties_densities=(0.2,), out=out)


def mean(xs: Any) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs))


def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "n": len(xs)}


def recipe(method: str, models: list[Path], base: Path, *, per_model: dict[str, Any] | None = None,
           **params: Any) -> dict[str, Any]:
    if "lam" in params:
        params["lambda"] = params.pop("lam")
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(m), **({"parameters": dict(per_model)} if per_model else {})} for m in models],
            **({"parameters": params} if params else {}), "dtype": "float32"}


class Engine:
    """Recipes through the real engine (``run_merge`` into a folder, or ``merge_in_memory``), timed."""

    def __init__(self) -> None:
        self.n = 0
        self.seconds = 0.0

    def __call__(self, r: dict[str, Any], out: Path | None = None) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        self.n += 1
        if out is None:
            sd = merge_in_memory(r, MergeOptions(workers=1))
        else:
            run_merge(r, out, MergeOptions(workers=1, overwrite=True), progress=lambda _p: None)
            sd = load_file(out / "model.safetensors")
        self.seconds += time.perf_counter() - t0
        return sd


# --------------------------------------------------------------------------------------------------
# one (regime, seed) run
# --------------------------------------------------------------------------------------------------
def finetunes(cfg: Config, data: dict[str, Any], lr: float, seed: int, folder: Path
              ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, torch.Tensor], Path,
                         list[Path]]:
    """θ_0 and the task models exactly as ``merge_digits.run_one`` trains them (same generators and seeds)."""
    gen = torch.Generator().manual_seed(seed)
    base_sd = init_backbone(cfg.hidden, gen)
    head0 = torch.randn(10, cfg.hidden, generator=gen) * 0.1
    base_sd, _ = train(base_sd, head0, data["train"].x["identity"], data["train"].y,
                       epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=seed)
    base = save_checkpoint(folder / "base", base_sd, cfg.hidden, "pre-trained on identity digits")
    fts, heads, paths = [], {}, []
    for i, t in enumerate(cfg.tasks):
        g = torch.Generator().manual_seed(1000 * seed + 100 + i)
        head = torch.randn(10, cfg.hidden, generator=g) * 0.1
        sd, heads[t] = train(base_sd, head, data["train"].x[t], data["train"].y,
                             epochs=cfg.finetune_epochs, lr=lr, seed=1000 * seed + i)
        fts.append(sd)
        paths.append(save_checkpoint(folder / f"ft_{t}", sd, cfg.hidden, f"fine-tuned on {t} (lr {lr})"))
    save_file(heads, folder / "heads.safetensors")
    return base_sd, fts, heads, base, paths


def run_one(cfg: Config, data: dict[str, Any], regime: str, lr: float, seed: int, engine: Engine) -> dict[str, Any]:
    folder = cfg.out / regime / f"seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    tasks = cfg.tasks
    base_sd, fts, heads, base, paths = finetunes(cfg, data, lr, seed, folder)

    def own(sd: dict[str, torch.Tensor], t: str, split: str = "test") -> float:
        return accuracies(sd, {t: heads[t]}, data[split])[t]

    def evaluate(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
        va, te = accuracies(sd, heads, data["val"]), accuracies(sd, heads, data["test"])
        return {"val": mean(va.values()), "test": mean(te.values()), "test_per_task": te}

    def per_task(sds: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        te = {t: own(sds[t], t) for t in tasks}
        return {"test": mean(te.values()), "test_per_task": te}

    res: dict[str, Any] = {"regime": regime, "lr": lr, "seed": seed}
    taus = torch.cat([torch.cat([(ft[k] - base_sd[k]).flatten() for k in base_sd]) for ft in fts])
    theta0 = torch.cat([v.flatten() for v in base_sd.values()])
    res["tau_over_theta0"] = float(taus.norm() / (len(fts) ** 0.5 * theta0.norm()))
    res["pretrained"] = evaluate(base_sd)
    res["individual"] = per_task({t: ft for t, ft in zip(tasks, fts, strict=True)})
    recipes: dict[str, Any] = {}

    # --- task arithmetic and TIES: the hyperparameters on the validation split ---------------------
    ta = {lam: evaluate(engine(recipe("task_arithmetic", paths, base, lam=lam))) for lam in cfg.ta_lambdas}
    lam_ta = max(cfg.ta_lambdas, key=lambda lam: ta[lam]["val"])
    res["ta_curve"] = {str(k): v for k, v in ta.items()}
    res["ta"] = {"lambda": lam_ta, **ta[lam_ta]}
    recipes["task_arithmetic"] = recipe("task_arithmetic", paths, base, lam=lam_ta)
    for variant, normalize, grid in (("ties", True, cfg.ties_lambdas), ("ties_sum", False, cfg.ties_sum_lambdas)):
        sweep = {(d, lam): evaluate(engine(recipe("ties", paths, base, per_model={"density": d}, lam=lam,
                                                  normalize=normalize)))
                 for d in cfg.ties_densities for lam in grid}
        d, lam = max(sweep, key=lambda dl: sweep[dl]["val"])
        res[variant] = {"density": d, "lambda": lam, **sweep[(d, lam)]}
        recipes[variant] = recipe("ties", paths, base, per_model={"density": d}, lam=lam, normalize=normalize)
    best = max(("ties", "ties_sum"), key=lambda v: res[v]["val"])
    res["ties_any"] = {"variant": best, **res[best]}

    # --- EMR through the engine: one output per task, no hyperparameter ------------------------------
    t0 = time.perf_counter()
    plan = emr_plan(base_sd, fts, names=[str(p) for p in paths])
    res["emr_plan_seconds"] = time.perf_counter() - t0
    emr_sds: dict[str, dict[str, torch.Tensor]] = {}
    identical, rebuilt_identical = True, True
    merged = folder / "merged" / "emr_task0"
    for i, t in enumerate(tasks):
        r = recipe("emr", paths, base, task=i)
        recipes[f"emr_{t}"] = r
        sd = engine(r, merged if i == 0 else None)
        emr_sds[t] = sd
        lib = plan.task_model(i, base_sd)
        identical &= all(torch.equal(sd[k], lib[k]) for k in lib) and set(sd) == set(lib)
    # every task model from the saved plan and the base alone (no fine-tune read)
    saved = EMRPlan.load(merged / "emr_plan")
    base_only = load_file(base / "model.safetensors")
    for i, t in enumerate(tasks):
        sd = saved.task_model(i, base_only)
        rebuilt_identical &= all(torch.equal(sd[k], emr_sds[t][k]) for k in sd)
    # the task chosen by its model's folder name writes the same bytes
    by_name = engine(recipe("emr", paths, base, task=f"ft_{tasks[-1]}"))
    identical &= all(torch.equal(by_name[k], emr_sds[tasks[-1]][k]) for k in by_name)
    res["emr"] = per_task(emr_sds)
    res["engine_identical_to_library"] = bool(identical)
    res["rebuilt_from_plan_identical"] = bool(rebuilt_identical)
    res["lambda"] = dict(zip(tasks, plan.task_lambda, strict=True))
    res["mask_kept_fraction"] = dict(zip(tasks, plan.kept_fraction(), strict=True))
    plan_file = merged / "emr_plan" / "plan.safetensors"
    res["storage"] = {**plan.storage(), "plan_file_bytes": plan_file.stat().st_size,
                      "finetune_file_bytes": sum((p / "model.safetensors").stat().st_size for p in paths)}

    # --- single-model read-outs of the plan (no task modulators) --------------------------------------
    res["readout_mean"] = evaluate(engine(recipe("emr", paths, base)))  # the default output
    res["readout_unified"] = evaluate(plan.model("unified", base_sd))
    lam_bar = mean(plan.task_lambda)
    res["readout_unified_mean_lambda"] = evaluate({k: base_sd[k] + lam_bar * plan.tau[k] for k in base_sd})

    # --- ablations (library): which of mask and rescale matter -----------------------------------------
    for name, rescale in (("elect_mask", "none"), ("rescale_reference", "reference"), ("rescale_tensor", "tensor")):
        p = emr_plan(base_sd, fts, rescale=rescale)
        res[name] = per_task({t: p.task_model(i, base_sd) for i, t in enumerate(tasks)})
    res["elect_rescale"] = per_task({t: {k: base_sd[k] + plan.task_lambda[i] * plan.tau[k] for k in base_sd}
                                     for i, t in enumerate(tasks)})
    (folder / "recipes").mkdir(parents=True, exist_ok=True)
    for name, r in recipes.items():
        (folder / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    return res


# --------------------------------------------------------------------------------------------------
# summary, claims, table, plot
# --------------------------------------------------------------------------------------------------
ROWS = [
    ("individual", "each fine-tune on its own task"),
    ("emr", "EMR task model (task i's mask and λ_i)"),
    ("ta", "task arithmetic (λ on val)"),
    ("ties", "TIES, disjoint mean (k, λ on val)"),
    ("ties_sum", "TIES, sum (k, λ on val)"),
    ("ties_any", "TIES, variant, k and λ on val"),
    ("pretrained", "pre-trained θ0 (task heads)"),
    ("readout_mean", "EMR one model: mean of task models (default)"),
    ("readout_unified", "EMR one model: θ0 + τ_uni"),
    ("readout_unified_mean_lambda", "EMR one model: θ0 + mean(λ)·τ_uni"),
    ("elect_mask", "ablation: Elect + Mask (λ = 1)"),
    ("elect_rescale", "ablation: Elect + Rescale (no mask)"),
    ("rescale_reference", "EMR, authors' code rescaler (tensor means)"),
    ("rescale_tensor", "EMR, λ per task and tensor"),
]


def summarise(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for regime in cfg.regimes:
        rs = [r for r in runs if r["regime"] == regime]
        s: dict[str, Any] = {key: _ms([r[key]["test"] for r in rs]) for key, _ in ROWS}
        s["per_task"] = {key: {t: _ms([r[key]["test_per_task"][t] for r in rs]) for t in cfg.tasks}
                         for key in ("individual", "emr", "ta", "ties_any", "readout_mean")}
        s["normalized_emr"] = _ms([mean(r["emr"]["test_per_task"][t] / r["individual"]["test_per_task"][t]
                                        for t in cfg.tasks) for r in rs])
        s["normalized_ta"] = _ms([mean(r["ta"]["test_per_task"][t] / r["individual"]["test_per_task"][t]
                                       for t in cfg.tasks) for r in rs])
        s["lambda"] = _ms([x for r in rs for x in r["lambda"].values()])
        s["mask_kept_fraction"] = _ms([x for r in rs for x in r["mask_kept_fraction"].values()])
        s["tau_over_theta0"] = _ms([r["tau_over_theta0"] for r in rs])
        s["chosen"] = {k: [{kk: r[k][kk] for kk in ("lambda", "density", "variant") if kk in r[k]} for r in rs]
                       for k in ("ta", "ties", "ties_sum", "ties_any")}
        s["engine_identical_to_library"] = all(r["engine_identical_to_library"] for r in rs)
        s["rebuilt_from_plan_identical"] = all(r["rebuilt_from_plan_identical"] for r in rs)
        s["storage"] = rs[0]["storage"]
        s["emr_plan_seconds"] = _ms([r["emr_plan_seconds"] for r in rs])
        out[regime] = s
    return out


def claims(cfg: Config, runs: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = {}
    for regime in cfg.regimes:
        rs = [r for r in runs if r["regime"] == regime]
        s = summary[regime]
        margins = [r["emr"]["test"] - max(r["ta"]["test"], r["ties_any"]["test"]) for r in rs]
        c[f"emr_close_to_individual_{regime}"] = {
            "holds": s["normalized_emr"]["mean"] >= CLOSE_NORMALIZED,
            "normalized_accuracy": s["normalized_emr"]["mean"], "threshold": CLOSE_NORMALIZED,
            "individual_minus_emr_points": s["individual"]["mean"] - s["emr"]["mean"]}
        c[f"emr_well_above_ta_ties_{regime}"] = {
            "holds": all(m >= WELL_ABOVE_POINTS for m in margins), "threshold_points": WELL_ABOVE_POINTS,
            "emr_minus_best_of_ta_ties_per_seed": margins}
        c[f"mask_matters_{regime}"] = {
            "holds": s["emr"]["mean"] - s["elect_rescale"]["mean"] >= 5,
            "emr_minus_elect_rescale": s["emr"]["mean"] - s["elect_rescale"]["mean"]}
        c[f"rescale_helps_{regime}"] = {
            "holds": s["emr"]["mean"] > s["elect_mask"]["mean"],
            "emr_minus_elect_mask": s["emr"]["mean"] - s["elect_mask"]["mean"]}
    c["no_tuning"] = {"holds": True, "note": "EMR used no validation data and has no hyperparameter searched here"}
    return c


def table(cfg: Config, summary: dict[str, Any]) -> str:
    def f(ms: dict[str, float]) -> str:
        return f"{ms['mean']:5.1f} ± {ms['std']:3.1f}"

    regimes = list(cfg.regimes)
    head = f"{'test accuracy, mean over tasks (%)':48s}" + "".join(
        f"{r + ' Δ (lr ' + format(cfg.regimes[r], 'g') + ')':>22s}" for r in regimes)
    lines = [head, "-" * len(head)]

    def row(label: str, key: Any) -> None:
        lines.append(f"{label:48s}" + "".join(f"{key(summary[r]):>22s}" for r in regimes))

    for key, label in ROWS:
        row(label, lambda s, key=key: f(s[key]))
    lines.append("")
    row("EMR / individual (normalized accuracy)", lambda s: f"{s['normalized_emr']['mean']:10.3f}")
    row("TA / individual (normalized accuracy)", lambda s: f"{s['normalized_ta']['mean']:10.3f}")
    row("λ_i (mean ± std over tasks and seeds)", lambda s: f"{s['lambda']['mean']:.3f} ± {s['lambda']['std']:.3f}")
    row("mask: fraction of entries kept per task", lambda s: f"{s['mask_kept_fraction']['mean']:10.3f}")
    row("‖τ_i‖ / ‖θ0‖ (rms over tasks)", lambda s: f"{s['tau_over_theta0']['mean']:10.2f}")
    lines.append("")
    lines.append("per task (test %, mean over seeds): individual / EMR / TA / TIES")
    for t in cfg.tasks:
        row(f"  {t}", lambda s, t=t: "/".join(f"{s['per_task'][k][t]['mean']:.0f}"
                                            for k in ("individual", "emr", "ta", "ties_any")))
    lines.append("")
    st = summary[regimes[0]]["storage"]
    lines.append("storage (one run; float32): "
                 f"{st['parameters']:,} merged parameters, {st['n_tasks']} tasks; masks "
                 f"{st['mask_bits_per_parameter_per_task']:.3f} bit per parameter per task "
                 f"({st['mask_bits_per_parameter']:.2f} bits/parameter for all tasks, {st['mask_bytes']:,} bytes); "
                 f"plan file {st['plan_file_bytes']:,} bytes (τ_uni + masks + λ); base + plan "
                 f"{st['emr_bytes_with_base'] / st['finetunes_bytes_with_base']:.0%} of base + {st['n_tasks']} "
                 "fine-tunes")
    return "\n".join(lines)


def plot(cfg: Config, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(cfg.regimes)
    fig, axs = plt.subplots(2, 2, figsize=(14, 9))
    colors = {"individual": "0.3", "emr": "tab:green", "ta": "tab:blue", "ties_any": "tab:orange",
              "readout_mean": "tab:olive"}
    labels = {"individual": "individual fine-tune", "emr": "EMR task model", "ta": "task arithmetic (val λ)",
              "ties_any": "TIES (val k, λ)", "readout_mean": "EMR mean of task models (one model)"}
    for a, regime in zip(axs[0], regimes, strict=False):
        s = summary[regime]
        x = np.arange(len(cfg.tasks) + 1)
        w = 0.16
        for j, key in enumerate(colors):
            vals = [s["per_task"][key][t]["mean"] for t in cfg.tasks] + [s[key]["mean"]]
            errs = [s["per_task"][key][t]["std"] for t in cfg.tasks] + [s[key]["std"]]
            a.bar(x + (j - 2) * w, vals, w, yerr=errs, color=colors[key], label=labels[key], capsize=2)
        a.set_xticks(x, [*cfg.tasks, "mean"])
        a.set_yticks(range(0, 101, 20))
        a.set(title=f"{regime} Δ (lr {cfg.regimes[regime]:g}): test accuracy per task", ylabel="accuracy (%)",
              ylim=(0, 128))
        a.grid(axis="y", alpha=0.3)
        a.legend(fontsize=7, loc="upper center", ncol=3)
    keys = ["individual", "emr", "rescale_reference", "rescale_tensor", "elect_mask", "elect_rescale", "ta",
            "ties_any", "readout_mean", "readout_unified_mean_lambda", "readout_unified", "pretrained"]
    a = axs[1][0]
    y = np.arange(len(keys))
    for j, regime in enumerate(regimes):
        s = summary[regime]
        a.barh(y + (j - 0.5) * 0.4, [s[k]["mean"] for k in keys], 0.4, xerr=[s[k]["std"] for k in keys],
               label=f"{regime} Δ", color=["tab:blue", "tab:red"][j % 2], alpha=0.8, capsize=2)
    a.set_yticks(y, [dict(ROWS)[k] for k in keys], fontsize=7)
    a.invert_yaxis()
    a.set(title="mean test accuracy over tasks (± std over seeds)", xlabel="accuracy (%)")
    a.grid(axis="x", alpha=0.3)
    a.legend(fontsize=8)
    a = axs[1][1]
    st = summary[regimes[0]]["storage"]
    n = st["parameters"]
    parts = {"base θ0": 4 * n, "fine-tunes (T × float32)": 4 * n * st["n_tasks"], "τ_uni (float32)": 4 * n,
             "masks (T bits/param)": st["mask_bytes"]}
    a.bar(["base + T fine-tunes", "base + EMR plan"], [parts["base θ0"]] * 2, color="0.6", label="base θ0")
    a.bar(["base + T fine-tunes"], [parts["fine-tunes (T × float32)"]], bottom=[4 * n], color="tab:blue",
          label=f"{st['n_tasks']} fine-tunes")
    a.bar(["base + EMR plan"], [parts["τ_uni (float32)"]], bottom=[4 * n], color="tab:green", label="τ_uni")
    a.bar(["base + EMR plan"], [parts["masks (T bits/param)"]], bottom=[8 * n], color="tab:red",
          label=f"masks ({st['mask_bits_per_parameter']:.2f} bits/param)")
    a.set(title="storage, bytes (float32)", ylabel="bytes")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    return o


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def main(cfg: Config | None = None, *, verbose: bool = True) -> dict[str, Any]:
    cfg = cfg or Config()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.tasks)
    engine = Engine()
    runs = []
    try:
        for regime, lr in cfg.regimes.items():
            for seed in cfg.seeds:
                t1 = time.perf_counter()
                runs.append(run_one(cfg, data, regime, lr, seed, engine))
                if verbose:
                    print(f"[{regime} Δ, seed {seed}] done in {time.perf_counter() - t1:.1f} s", flush=True)
    finally:
        torch.set_num_threads(threads)
    summary = summarise(cfg, runs)
    result = {"config": asdict(cfg), "summary": summary, "claims": claims(cfg, runs, summary), "runs": runs,
              "merges": engine.n, "merge_seconds": engine.seconds, "seconds": time.perf_counter() - t0}
    result = _jsonable(result)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(cfg, summary, cfg.out / "merge_digits_emr.png")
    result["table"] = table(cfg, summary)
    if verbose:
        print()
        print(result["table"])
        print()
        for name, cl in result["claims"].items():
            print(f"{'HOLDS ' if cl['holds'] else 'FAILS '} {name}: "
                  + ", ".join(f"{k}={_fmt(v)}" for k, v in cl.items() if k != "holds"))
        print(f"\n{engine.n} merges ({engine.seconds:.1f} s in the engine), total {result['seconds']:.1f} s; "
              "engine output identical to the library's: "
              f"{all(s['engine_identical_to_library'] for s in summary.values())}; task models rebuilt from "
              f"the saved plan and the base alone identical: "
              f"{all(s['rebuilt_from_plan_identical'] for s in summary.values())}")
        print(f"wrote {cfg.out / 'results.json'} and {cfg.out / 'merge_digits_emr.png'}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration of the slow test")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    main(Config.quick(a.out) if a.quick else Config(out=a.out))
