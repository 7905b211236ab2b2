"""Continual model merging on "digits-8": OPCM against task arithmetic and averaging as tasks arrive.

Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
Continual Model Merging" (arXiv:2501.09522, 2025) merge fine-tuned models one at a time: each new
task vector is projected away from the merged update's top singular directions (per linear layer)
and the sum is rescaled so that its norm stays the average task-vector norm. The paper's claim
(CLIP ViT, 8–20 tasks): sequential OPCM keeps its accuracy as tasks arrive, 5–8 points above the
continual baselines, where task arithmetic degrades. This example checks that claim on digits.

Set-up: the "digits-8" of ``examples/concrete_merging.py`` (its :class:`DigitsSetup`: sklearn's
digits, eight fixed transforms: rotations by 90°/180°/270°, both flips, transpose, inversion, a
pixel permutation; a 64 → 1024 → 1024 MLP pre-trained 3 epochs on the plain digits, each task
fine-tuned with its own cosine head for 10 epochs at Adam 5e-4; the backbone is merged, each task
read by its own head). Per model seed the tasks arrive in a random order (seeded). After each
arrival t, every method's merged model is evaluated on the t tasks seen so far (test split):

* **OPCM** (α = 0.5, the paper's default), through :class:`merge.soups.opcm.ContinualOPCM`, and
  two ablations: α = 0 and 0.9; and *scaling only* (no projection: θ_0 + Σ τ_i / λ_t, the same λ rule);
* **task arithmetic**, θ_0 + λ Σ_{i≤t} τ_i: λ = 0.3 (the papers'), λ chosen once on the validation
  split of the first two tasks and then kept (what a continual user could do), and λ re-chosen at
  every t on the validation split of all tasks seen so far (an oracle: it needs every earlier
  task's data at every step);
* **simple averaging**, θ_0 + (1/t) Σ τ_i (the continual weight average);
* the **individual fine-tunes** (each on its own task) and the pre-trained θ_0.

The first seed also goes through the real CLI: ``weightsmith soup init SOUP --base θ_0 --method opcm
--alpha 0.5 FIRST SECOND`` (a replay of two steps), ``soup add`` for every further task, ``soup build``,
``soup show --json``, then ``soup remove`` of the second task (a replay of the others) and a second
build; the script checks that the built models are the library's bit for bit and that the soup's
per-step λ_t are the library's.

Run: ``python examples/continual_digits.py`` (3 seeds, about 7 minutes on two busy cores);
``--quick`` is the slow test's configuration (4 tasks, 256 wide, one seed). Writes
``results.json`` and ``continual_digits.png`` under ``examples/out/continual_digits/`` (and, with
``--doc-figure``, the figure to ``docs/img/continual_digits.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.concrete_merging import TASKS8, DigitsSetup, SetupConfig, load_data, mean  # noqa: E402
from examples.merge_digits import save_checkpoint  # noqa: E402
from merge.soups.opcm import ContinualOPCM, opcm_merge  # noqa: E402

OUT = ROOT / "examples" / "out" / "continual_digits"
DOC_FIGURE = ROOT / "docs" / "img" / "continual_digits.png"



@dataclass(frozen=True)
class Config:
    setup: SetupConfig = field(default_factory=lambda: SetupConfig(tasks=TASKS8))
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha: float = 0.5
    ablation_alphas: tuple[float, ...] = (0.0, 0.9)
    ta_lambda: float = 0.3
    ta_grid: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
    tune_on: int = 2  # task arithmetic's λ chosen on the validation of the first `tune_on` tasks, then kept
    cli: bool = True
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        """The slow test's configuration: one seed, 4 tasks, 256 wide, short fine-tunes."""
        return Config(
            setup=SetupConfig(tasks=("rot90", "hflip", "invert", "permute"), hidden=256, finetune_epochs=6),
            seeds=(0,),
            ablation_alphas=(0.0,),
            ta_grid=(0.1, 0.2, 0.3, 0.4, 0.6, 1.0),
            out=out,
        )


def rows(cfg: Config) -> list[tuple[str, str]]:
    """(key, label) of the methods, in table order."""
    return [
        ("individual", "individual fine-tunes"),
        ("opcm", f"OPCM (α {cfg.alpha:g})"),
        *[(f"opcm_a{a:g}", f"OPCM (α {a:g})") for a in cfg.ablation_alphas],
        ("scale_only", "scaling only (no projection)"),
        ("ta_oracle", "TA (λ re-tuned each step on seen tasks' val: oracle)"),
        ("ta_fixed", f"TA (λ on the first {cfg.tune_on} tasks' val, then kept)"),
        ("ta_0.3", f"TA (λ {cfg.ta_lambda:g})"),
        ("average", "simple averaging"),
        ("pretrained", "pre-trained θ_0"),
    ]


# --------------------------------------------------------------------------------------------------
# one seed
# --------------------------------------------------------------------------------------------------
def _norm(sd: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in sd.values()))


def run_seed(cfg: Config, data: Any, seed: int, log: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    setup = DigitsSetup.build(replace(cfg.setup, seed=seed), data)
    tasks = cfg.setup.tasks
    perm = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(10_000 + seed)).tolist()
    order = [tasks[i] for i in perm]
    model = dict(zip(tasks, setup.models, strict=True))
    base = setup.base
    taus = {t: {k: model[t][k] - base[k] for k in base} for t in tasks}
    train_s = time.perf_counter() - t0

    def evaluate(sd: dict[str, torch.Tensor], split: str = "test") -> dict[str, float]:
        return setup.evaluate(sd, split)["per_task"]

    def ta(lam: float, t: int) -> dict[str, torch.Tensor]:
        return {k: base[k] + lam * sum(taus[o][k] for o in order[:t]) for k in base}

    def seen(per_task: dict[str, float], t: int) -> float:
        return mean(per_task[o] for o in order[:t])

    # λ for "TA, tuned on the first tasks": the best on the validation of the first tune_on tasks
    k0 = min(cfg.tune_on, len(order))
    val0 = {lam: seen(evaluate(ta(lam, k0), "val"), k0) for lam in cfg.ta_grid}
    lam_fixed = max(cfg.ta_grid, key=lambda lam: val0[lam])

    individual = {t: evaluate(model[t])[t] for t in tasks}
    pre = evaluate(base)
    runs = {"opcm": ContinualOPCM(base, cfg.alpha)}
    runs |= {f"opcm_a{a:g}": ContinualOPCM(base, a) for a in cfg.ablation_alphas}
    curves: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in rows(cfg)}
    steps: list[dict[str, Any]] = []
    tau_norms: list[float] = []
    for t in range(1, len(order) + 1):
        new = order[t - 1]
        tau_norms.append(_norm(taus[new]))
        merged: dict[str, dict[str, torch.Tensor]] = {}
        for key, run in runs.items():
            st = run.add(model[new], new)
            if key == "opcm":
                steps.append(st.to_json())
            merged[key] = run.merged()
        total = {k: sum(taus[o][k] for o in order[:t]) for k in base}
        lam_s = _norm(total) / (sum(tau_norms) / t)
        merged["scale_only"] = {k: base[k] + total[k] / lam_s for k in base}
        merged["ta_0.3"] = ta(cfg.ta_lambda, t)
        merged["ta_fixed"] = ta(lam_fixed, t)
        val = {lam: seen(evaluate(ta(lam, t), "val"), t) for lam in cfg.ta_grid}
        lam_oracle = max(cfg.ta_grid, key=lambda lam: val[lam])
        merged["ta_oracle"] = ta(lam_oracle, t)
        merged["average"] = {k: base[k] + total[k] / t for k in base}
        for key, sd in merged.items():
            per = evaluate(sd)
            curves[key].append({"seen": seen(per, t), "per_task": per})
        curves["ta_oracle"][-1]["lambda"] = lam_oracle
        curves["scale_only"][-1]["lambda"] = lam_s
        curves["individual"].append({"seen": mean(individual[o] for o in order[:t]), "per_task": individual})
        curves["pretrained"].append({"seen": seen(pre, t), "per_task": pre})
        log(
            f"  seed {seed} t={t} (+{new}): OPCM {curves['opcm'][-1]['seen']:.1f} "
            f"(λ {steps[-1]['lambda']:.3f}, kept {100 * steps[-1]['kept']:.1f} %), "
            f"TA 0.3 {curves['ta_0.3'][-1]['seen']:.1f}, TA λ={lam_fixed:g} {curves['ta_fixed'][-1]['seen']:.1f}, "
            f"average {curves['average'][-1]['seen']:.1f}, individual {curves['individual'][-1]['seen']:.1f}"
        )
    theta0 = _norm(base)
    return {
        "seed": seed,
        "order": order,
        "lambda_fixed": lam_fixed,
        "val_first_tasks": {str(k): v for k, v in val0.items()},
        "tau_over_theta0": mean(n / theta0 for n in tau_norms),
        "curves": curves,
        "opcm_steps": steps,
        "train_seconds": round(train_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "_setup": setup,
        "_order": order,
        "_opcm": runs["opcm"],
    }


# --------------------------------------------------------------------------------------------------
# the CLI: a soup folder grown one member at a time equals the library
# --------------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("weightsmith")
    return subprocess.run([str(exe), *args], capture_output=True, text=True)


def _ok(*args: str) -> str:
    p = _cli(*args)
    if p.returncode != 0:
        raise RuntimeError(f"weightsmith {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def cli_check(cfg: Config, run: dict[str, Any], folder: Path) -> dict[str, Any]:
    setup: DigitsSetup = run["_setup"]
    order: list[str] = run["_order"]
    lib: ContinualOPCM = run["_opcm"]
    if folder.exists():
        shutil.rmtree(folder)
    model = dict(zip(cfg.setup.tasks, setup.models, strict=True))
    base = save_checkpoint(folder / "base", setup.base, cfg.setup.hidden, "pre-trained on plain digits")
    paths = [save_checkpoint(folder / "tasks" / t, model[t], cfg.setup.hidden, f"fine-tuned on {t}") for t in order]
    soup = folder / "soup"
    t0 = time.perf_counter()
    _ok("soup", "init", str(soup), "--base", str(base), "--method", "opcm", "--alpha", f"{cfg.alpha}",
        *map(str, paths[:2]))  # fmt: skip
    add_lines = [_ok("soup", "add", str(soup), str(p)).strip() for p in paths[2:]]
    _ok("soup", "build", str(soup), "-o", str(folder / "built"))
    shown = json.loads(_ok("soup", "show", str(soup), "--json"))
    text = _ok("soup", "show", str(soup))
    built = load_file(folder / "built" / "model.safetensors")
    want = lib.merged()
    identical = all(torch.equal(built[k], want[k]) for k in want) and built.keys() == want.keys()
    steps_equal = [s["lambda"] for s in shown["opcm"]["steps"]] == [s.lam for s in lib.steps]
    # remove the second arrival: OPCM replayed over the others, in order
    _ok("soup", "remove", str(soup), order[1])
    _ok("soup", "build", str(soup), "-o", str(folder / "removed"))
    removed = load_file(folder / "removed" / "model.safetensors")
    rest = [model[t] for i, t in enumerate(order) if i != 1]
    want_removed = opcm_merge(setup.base, rest, cfg.alpha)
    removed_identical = all(torch.equal(removed[k], want_removed[k]) for k in want_removed)
    return {
        "identical_to_library": identical,
        "step_lambdas_identical": steps_equal,
        "remove_replay_identical": removed_identical,
        "removed": order[1],
        "test_accuracy_built": mean(setup.evaluate(built)["per_task"][t] for t in order),
        "add_output": add_lines,
        "show": text,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------------
# summary, claims, table, figure
# --------------------------------------------------------------------------------------------------
def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "n": len(xs)}


def summarise(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(runs[0]["order"])
    out: dict[str, Any] = {}
    for key, _ in rows(cfg):
        out[key] = {
            "seen": [_ms([r["curves"][key][t]["seen"] for r in runs]) for t in range(n)],
            "first_task": [_ms([r["curves"][key][t]["per_task"][r["order"][0]] for r in runs]) for t in range(n)],
        }
    out["opcm_lambda"] = [_ms([r["opcm_steps"][t]["lambda"] for r in runs]) for t in range(n)]
    out["opcm_kept"] = [_ms([r["opcm_steps"][t]["kept"] for r in runs]) for t in range(n)]
    out["tau_over_theta0"] = _ms([r["tau_over_theta0"] for r in runs])
    return out


def claims(runs: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    n = len(runs[0]["order"])

    def at(key: str, t: int) -> float:
        return summary[key]["seen"][t - 1]["mean"]

    def drop(key: str) -> float:  # from two tasks to all of them
        return at(key, 2) - at(key, n)

    baselines = ("ta_0.3", "ta_fixed", "average")
    wins = {
        b: f"{sum(r['curves']['opcm'][t]['seen'] >= r['curves'][b][t]['seen'] for r in runs for t in range(1, n))}"
        f"/{len(runs) * (n - 1)}"
        for b in baselines
    }
    gains = {b: [r["curves"]["opcm"][-1]["seen"] - r["curves"][b][-1]["seen"] for r in runs] for b in baselines}
    return {
        # TA at λ 0.3 starts low (0.3·τ_1 is far from θ_1) and rises with t; the continual user's TA is the
        # one whose λ was tuned on the first tasks
        "opcm_degrades_less_than_ta": {
            "holds": drop("opcm") < drop("ta_fixed") and at("opcm", n) > at("ta_fixed", n),
            "drop_2_to_T": {k: drop(k) for k in ("opcm", "ta_0.3", "ta_fixed", "ta_oracle", "average", "individual")},
        },
        "opcm_at_least_baselines_every_step": {
            "holds": all(w.split("/")[0] == w.split("/")[1] for w in wins.values()),
            "opcm_ge_baseline_steps_t_ge_2": wins,
        },
        "opcm_5_points_above_baselines_at_T": {
            "holds": all(float(np.mean(g)) >= 5 for g in gains.values()),
            "gain_at_T": {b: _ms(g) for b, g in gains.items()},
            "paper": "5-8 points average accuracy (abstract; CLIP ViT, 8-20 tasks)",
        },
        "projection_matters": {
            "holds": at("opcm", n) > at("scale_only", n),
            "opcm": at("opcm", n),
            "scaling_only": at("scale_only", n),
        },
    }


def table(cfg: Config, summary: dict[str, Any], n: int) -> str:
    head = "| method | " + " | ".join(f"t = {t}" for t in range(1, n + 1)) + " | drop 2 → T |"
    lines = [head, "|---" * (n + 2) + "|"]
    for key, label in rows(cfg):
        s = summary[key]["seen"]
        cells = [f"{x['mean']:.1f} ± {x['std']:.1f}" if x["n"] > 1 else f"{x['mean']:.1f}" for x in s]
        d = s[1]["mean"] - s[-1]["mean"] if n > 1 else 0.0
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {d:+.1f} |")
    lam = summary["opcm_lambda"]
    kept = summary["opcm_kept"]
    lam_cells = [f"{x['mean']:.2f} ({math.sqrt(t + 1):.2f})" for t, x in enumerate(lam)]
    lines.append("| OPCM λ_t (√t) | " + " | ".join(lam_cells) + " | |")
    lines.append("| OPCM kept ‖P(τ_t)‖/‖τ_t‖ | " + " | ".join(f"{100 * x['mean']:.1f} %" for x in kept) + " | |")
    return "\n".join(lines)


def plot(cfg: Config, runs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs[0]["order"])
    xs = np.arange(1, n + 1)
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {
        "individual": ("k", "--"), "opcm": ("C3", "-"), "scale_only": ("C4", "-."), "ta_oracle": ("C0", ":"),
        "ta_fixed": ("C0", "-"), "ta_0.3": ("C9", "-"), "average": ("C2", "-"), "pretrained": ("0.5", "--"),
    }  # fmt: skip
    for i, a in enumerate(cfg.ablation_alphas):
        styles[f"opcm_a{a:g}"] = (("C1", "C5", "C6", "C8")[i % 4], ":")
    for key, label in rows(cfg):
        c, ls = styles[key]
        for a, what in ((ax[0], "seen"), (ax[1], "first_task")):
            m = np.array([x["mean"] for x in summary[key][what]])
            s = np.array([x["std"] for x in summary[key][what]])
            a.plot(xs, m, color=c, ls=ls, lw=2 if key == "opcm" else 1.3, label=label, marker="o", ms=3)
            if len(runs) > 1:
                a.fill_between(xs, m - s, m + s, color=c, alpha=0.12)
    ax[0].set(title="average test accuracy over the tasks seen so far", xlabel="number of tasks merged",
              ylabel="accuracy (%)")  # fmt: skip
    ax[1].set(title="accuracy on the first task as more arrive", xlabel="number of tasks merged",
              ylabel="accuracy (%)")  # fmt: skip
    lam = np.array([x["mean"] for x in summary["opcm_lambda"]])
    ax[2].plot(xs, lam, "C3-o", ms=3, label="OPCM λ_t")
    ax[2].plot(xs, np.sqrt(xs), "k:", label="√t (orthogonal task vectors)")
    ax[2].set(title="OPCM: scaling λ_t and the share of τ_t kept", xlabel="number of tasks merged", ylabel="λ_t")
    twin = ax[2].twinx()
    twin.plot(xs, [100 * x["mean"] for x in summary["opcm_kept"]], "C7--s", ms=3, label="‖P(τ_t)‖ / ‖τ_t‖ (right)")
    twin.set(ylabel="kept (%)", ylim=(80, 101))
    ax[2].legend(handles=[*ax[2].get_lines(), *twin.get_lines()], fontsize=8, loc="lower right")
    for a in ax:
        a.grid(alpha=0.3)
        a.set_xticks(xs)
    ax[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"Continual merging on digits ({len(cfg.setup.tasks)} transforms, MLP 64-{cfg.setup.hidden}-"
        f"{cfg.setup.hidden}, {len(runs)} seed(s), random task order per seed)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(cfg: Config | None = None, *, verbose: bool = True, doc_figure: bool = False) -> dict[str, Any]:
    cfg = cfg or Config()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # training results depend on the thread count: keep it fixed

    def log(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    cfg.out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.setup.tasks)
    runs = []
    try:
        for seed in cfg.seeds:
            runs.append(run_seed(cfg, data, seed, log))
            log(f"[seed {seed}] order {', '.join(runs[-1]['order'])}: {runs[-1]['seconds']:.0f} s")
        cli = cli_check(cfg, runs[0], cfg.out / "cli") if cfg.cli else None
        if cli:
            log(f"[cli] soup built by the CLI identical to the library: {cli['identical_to_library']} "
                f"({cli['seconds']:.0f} s)")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for r in runs:
        for k in [k for k in r if k.startswith("_")]:
            r.pop(k)
    n = len(runs[0]["order"])
    summary = summarise(cfg, runs)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "summary": summary,
        "claims": claims(runs, summary),
        "cli": cli,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
    }
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    plot(cfg, runs, summary, cfg.out / "continual_digits.png")
    if doc_figure:
        shutil.copyfile(cfg.out / "continual_digits.png", DOC_FIGURE)
    result["table"] = table(cfg, summary, n)
    if verbose:
        print()
        print("average test accuracy (%) over the tasks seen so far, mean ± std over seeds")
        print(result["table"])
        print()
        for name, c in result["claims"].items():
            print(f"{'HOLDS' if c['holds'] else 'FAILS'} {name}: " + json.dumps({k: v for k, v in c.items()
                                                                                  if k != "holds"}, default=str))
        if cli:
            print(f"\nCLI: built = library {cli['identical_to_library']}, per-step λ = library "
                  f"{cli['step_lambdas_identical']}, remove '{cli['removed']}' = replay "
                  f"{cli['remove_replay_identical']}\n{cli['show']}")  # fmt: skip
        print(f"total {result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU; wrote {cfg.out}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration of the slow test")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="model seeds (default 0 1 2)")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI soup check")
    ap.add_argument("--doc-figure", action="store_true", help="also write docs/img/continual_digits.png")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    c = Config.quick(a.out) if a.quick else Config(out=a.out)
    if a.seeds is not None:
        c = replace(c, seeds=tuple(a.seeds))
    if a.no_cli:
        c = replace(c, cli=False)
    main(c, doc_figure=a.doc_figure)
