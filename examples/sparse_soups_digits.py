"""Sparse Model Soups vs iterative magnitude pruning on sklearn's digits, offline, on a CPU.

Zimmer, Spiegel & Pokutta, "Sparse Model Soups: A Recipe for Improved Pruning via Model
Averaging", ICLR 2024 (arXiv:2306.16788). The set-up follows the research note
(``/work/shared/research/merge_algorithms.md`` §2.7, §3.7):

* data: ``sklearn.datasets.load_digits`` (1,797 8×8 images, no download), stratified split
  60 / 15 / 25 % train / validation / test (fixed);
* model: MLP 64 → 256 → 256 → 10 with BatchNorm after each hidden layer (so the soups need
  BatchNorm recalibration, as the paper's ResNets do), trained dense first;
* pruning: global unstructured magnitude pruning of the three weight matrices to 95 % in T = 4
  phases (52.7, 77.6, 89.4, 95.0 %: each phase prunes q = 1 − 0.05^{1/4} of what is left);
* retraining: SGD (momentum 0.9, weight decay 1e-4) with the paper's default "LLR" schedule
  (linear warm-up over 10 %, then linear decay to 0), E = 5 epochs per retrain;
* **SMS**: m = 4 retrains per phase from the one pruned model, varied by batch order (the SMS
  code's default ``ensemble_by: pruned_seed``); uniform soup, and greedy soup on validation; BN
  statistics recalibrated on 20 % of the training set; the next phase prunes the soup;
* **IMP** at equal total retraining: one retrain of m·E = 20 epochs per phase; and IMP with
  E = 5 epochs (the length of one SMS ingredient's retrain), for reference.

Everything runs through ``merge.methods.soups`` (``sparse_model_soup``,
``iterative_magnitude_pruning``); the last phase's ingredients of the first seed are also saved as
safetensors checkpoints and souped with the ``sparse_soup`` recipe method by the real CLI
(``weightsmith merge``), which must give the library's soup exactly.

Claims checked (the script reports what it sees, it does not assume it):

1. at every phase, the soup is at least as accurate as its best ingredient (Zimmer et al. §4);
2. SMS beats IMP at equal retraining budget, increasingly so at high sparsity.

Run: ``python examples/sparse_soups_digits.py`` (about 2 minutes of CPU); ``--quick`` is the
configuration of the slow test. Writes ``results.json`` and ``sparse_soups_digits.png`` under
``examples/out/sparse_soups_digits/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge.methods.soups import (  # noqa: E402
    SparseSoupResult,
    iterative_magnitude_pruning,
    prunable_weights,
    sparse_model_soup,
    sparsity_schedule,
)
from merge.rebasin.evaluation import reset_bn  # noqa: E402

OUT = ROOT / "examples" / "out" / "sparse_soups_digits"


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    hidden: int = 256
    dense_epochs: int = 30
    goal_sparsity: float = 0.95
    phases: int = 4
    m: int = 4  # ingredients per phase
    epochs: int = 5  # per retrain
    lr: float = 0.05  # peak of the retrains' LLR schedule
    dense_lr: float = 0.05
    batch: int = 64
    bn_fraction: float = (
        1.0  # the SMS code uses 0.2 of CIFAR/ImageNet; 20 % of digits (216 images) is too few
    )
    greedy: bool = True
    #: what varies between a phase's ingredients: "seed" (batch order, the SMS code's default) or "lr"
    #: (batch order and the peak learning rate, spread over ×0.5 .. ×2)
    vary: str = "seed"
    cli: bool = True
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        """The slow test's configuration: 2 seeds, shorter retraining, no greedy run."""
        return Config(seeds=(0, 1), dense_epochs=20, m=3, epochs=3, greedy=False, out=out)


# --------------------------------------------------------------------------------------------------
# data, model, training
# --------------------------------------------------------------------------------------------------
@dataclass
class Data:
    xtr: torch.Tensor
    ytr: torch.Tensor
    xva: torch.Tensor
    yva: torch.Tensor
    xte: torch.Tensor
    yte: torch.Tensor


def load_data() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    xtr, xva, ytr, yva = train_test_split(xtr, ytr, test_size=0.2, stratify=ytr, random_state=0)
    t = torch.from_numpy
    return Data(t(xtr), t(ytr).long(), t(xva), t(yva).long(), t(xte), t(yte).long())


def make_model(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


def train(model: torch.nn.Module, data: Data, *, epochs: int, lr: float, seed: int, batch: int) -> None:
    """SGD with the LLR schedule (linear warm-up over 10 % of the steps, then linear decay to 0)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    n = len(data.xtr)
    steps_per_epoch = -(-n // batch)
    total = epochs * steps_per_epoch
    warm = max(1, int(0.1 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(data.xtr[idx]), data.ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------------------------------
# one seed
# --------------------------------------------------------------------------------------------------
def run_seed(cfg: Config, data: Data, seed: int, save_last: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    dense = make_model(cfg.hidden, seed)
    train(dense, data, epochs=cfg.dense_epochs, lr=cfg.dense_lr, seed=10_000 + seed, batch=cfg.batch)
    n_bn = int(cfg.bn_fraction * len(data.xtr))
    bn_batches = [(data.xtr[i : min(i + cfg.batch, n_bn)],) for i in range(0, n_bn, cfg.batch)]

    def retrain(model: torch.nn.Module, var: dict[str, Any], phase: int) -> None:
        train(
            model,
            data,
            epochs=var["epochs"],
            lr=var.get("lr", cfg.lr),
            seed=var["seed"] + 97 * phase,
            batch=cfg.batch,
        )

    def evaluate(model: torch.nn.Module) -> float:
        return accuracy(model, data.xva, data.yva)

    def test(model: torch.nn.Module) -> dict[str, float]:
        return {"test": accuracy(model, data.xte, data.yte)}

    def recal(model: torch.nn.Module) -> None:
        reset_bn(model, bn_batches)

    ensemble_logits: dict[int, list[torch.Tensor]] = {}

    def saver(phase: int, j: int, model: torch.nn.Module) -> None:
        model.eval()
        with torch.no_grad():  # for the prediction ensemble of the phase's ingredients (a reference)
            ensemble_logits.setdefault(phase, []).append(F.softmax(model(data.xte), 1))
        if save_last is not None and phase == cfg.phases:
            folder = save_last / f"ingredient{j}"
            folder.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
            )

    variations: list[dict[str, Any]] = [{"seed": 1000 * seed + j, "epochs": cfg.epochs} for j in range(cfg.m)]
    if cfg.vary == "lr":
        for j, v in enumerate(variations):
            v["lr"] = cfg.lr * 2.0 ** (-1 + 2 * j / max(1, cfg.m - 1))
    common = dict(goal_sparsity=cfg.goal_sparsity, phases=cfg.phases, recalibrate=recal, metrics=test)
    runs: dict[str, SparseSoupResult] = {}
    runs["sms_uniform"] = sparse_model_soup(
        dense, retrain, evaluate, variations=variations, soup="uniform", on_ingredient=saver, **common
    )
    if cfg.greedy:
        runs["sms_greedy"] = sparse_model_soup(
            dense, retrain, evaluate, variations=variations, soup="greedy", **common
        )
    runs["imp_equal"] = iterative_magnitude_pruning(
        dense,
        retrain,
        evaluate,
        variation={"seed": 1000 * seed + 500, "epochs": cfg.m * cfg.epochs},
        **common,
    )
    runs["imp_short"] = iterative_magnitude_pruning(
        dense, retrain, evaluate, variation={"seed": 1000 * seed + 700, "epochs": cfg.epochs}, **common
    )
    out: dict[str, Any] = {
        "seed": seed,
        "dense_test": test(dense)["test"],
        "dense_val": evaluate(dense),
        "phases": [],
    }
    sms = runs["sms_uniform"]
    for i in range(cfg.phases):
        p = sms.phases[i]
        best = p.best_ingredient  # chosen on validation, reported on test
        row = {
            "phase": p.phase,
            "sparsity": p.sparsity,
            "target": p.target_sparsity,
            "soup": p.metrics["test"],
            "best_ingredient": best.metrics["test"],
            "mean_ingredient": float(np.mean([r.metrics["test"] for r in p.ingredients])),
            "ensemble": 100.0
            * float((torch.stack(ensemble_logits[p.phase]).mean(0).argmax(1) == data.yte).float().mean()),
            "max_ingredient": float(np.max([r.metrics["test"] for r in p.ingredients])),
            "soup_val": p.score,
            "best_ingredient_val": best.score,
            "pruned": p.pruned_score,
            "imp_equal": runs["imp_equal"].phases[i].metrics["test"],
            "imp_short": runs["imp_short"].phases[i].metrics["test"],
        }
        if "sms_greedy" in runs:
            g = runs["sms_greedy"].phases[i]
            row["greedy"] = g.metrics["test"]
            row["greedy_kept"] = len(g.kept)
        out["phases"].append(row)
    # the invariants, on the final models: the zero pattern is the final mask, the sparsity is the goal
    for name, r in runs.items():
        for k, w in prunable_weights(r.model).items():
            if not torch.equal(w != 0, r.masks[k]):
                raise AssertionError(f"{name}: tensor {k} does not have the mask's zero pattern")
    out["final_sparsity"] = {name: r.phases[-1].sparsity for name, r in runs.items()}
    out["soup_models"] = {"sms_uniform": sms.model}  # dropped before JSON
    out["seconds"] = time.perf_counter() - t0
    return out


def cli_check(cfg: Config, data: Data, folder: Path, library_soup: torch.nn.Module) -> dict[str, Any]:
    """The last phase's ingredients souped by ``weightsmith merge`` with the ``sparse_soup`` method."""
    ingredients = sorted(p for p in folder.iterdir() if p.name.startswith("ingredient"))
    recipe = {
        "merge_method": "sparse_soup",
        "models": [{"model": str(p)} for p in ingredients],
        "dtype": "float32",
    }
    rpath = folder / "sparse_soup.yaml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
    exe = Path(sys.executable).with_name("weightsmith")
    out = folder / "merged"
    cmd = [str(exe), "merge", str(rpath), "-o", str(out), "--json", "--overwrite"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    sd = load_file(out / "model.safetensors")
    model = make_model(cfg.hidden, 0)
    model.load_state_dict(sd)
    n_bn = int(cfg.bn_fraction * len(data.xtr))
    reset_bn(model, [(data.xtr[i : min(i + cfg.batch, n_bn)],) for i in range(0, n_bn, cfg.batch)])
    lib = library_soup.state_dict()
    weights_equal = all(
        torch.equal(model.state_dict()[k], lib[k])
        for k in lib
        if "running" not in k and "num_batches" not in k
    )
    zero = {k: float((sd[k] == 0).float().mean()) for k in prunable_weights(model)}
    n_zero = sum(int((sd[k] == 0).sum()) for k in prunable_weights(model))
    n_all = sum(sd[k].numel() for k in prunable_weights(model))
    # a soup of ingredients with *different* masks is refused, naming the tensor
    bad = folder / "other_mask"
    bad.mkdir(exist_ok=True)
    other = load_file(ingredients[0] / "model.safetensors")
    w = other["0.weight"]
    other["0.weight"] = torch.where(w == 0, torch.full_like(w, 1e-3), w)
    save_file(other, bad / "model.safetensors")
    recipe["models"].append({"model": str(bad)})
    rbad = folder / "sparse_soup_bad.yaml"
    rbad.write_text(yaml.safe_dump(recipe, sort_keys=False))
    pb = subprocess.run(
        [str(exe), "merge", str(rbad), "-o", str(folder / "merged_bad")], capture_output=True, text=True
    )
    return {
        "identical_weights_to_library": weights_equal,
        "test_accuracy": accuracy(model, data.xte, data.yte),
        "zero_fraction_per_tensor": zero,
        "sparsity": n_zero / n_all,
        "different_masks_exit_code": pb.returncode,
        "different_masks_error": pb.stderr.strip().splitlines()[-1] if pb.stderr.strip() else "",
        "different_masks_wrote_nothing": not (folder / "merged_bad").exists(),
    }


# --------------------------------------------------------------------------------------------------
# summary, claims, table, figure
# --------------------------------------------------------------------------------------------------
METHODS = [
    ("soup", "SMS soup (uniform)"),
    ("greedy", "SMS soup (greedy)"),
    ("best_ingredient", "best ingredient"),
    ("mean_ingredient", "mean ingredient"),
    ("ensemble", "ingredients' ensemble"),
    ("imp_equal", "IMP, m·E epochs"),
    ("imp_short", "IMP, E epochs"),
]


def summarise(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for i in range(cfg.phases):
        ph = [r["phases"][i] for r in runs]
        row: dict[str, Any] = {"phase": i + 1, "sparsity": float(np.mean([p["sparsity"] for p in ph]))}
        for key, _ in METHODS:
            if key in ph[0]:
                v = [p[key] for p in ph]
                row[key] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
        row["soup_minus_best"] = [p["soup"] - p["best_ingredient"] for p in ph]
        row["soup_minus_max"] = [p["soup"] - p["max_ingredient"] for p in ph]
        row["soup_minus_imp_equal"] = [p["soup"] - p["imp_equal"] for p in ph]
        row["soup_minus_imp_short"] = [p["soup"] - p["imp_short"] for p in ph]
        rows.append(row)
    return {
        "dense": {
            "mean": float(np.mean([r["dense_test"] for r in runs])),
            "std": float(np.std([r["dense_test"] for r in runs])),
        },
        "phases": rows,
    }


def claims(summary: dict[str, Any]) -> dict[str, Any]:
    ph = summary["phases"]
    d_best = [float(np.mean(p["soup_minus_best"])) for p in ph]
    d_imp = [float(np.mean(p["soup_minus_imp_equal"])) for p in ph]
    wins_imp = [sum(x > 0 for x in p["soup_minus_imp_equal"]) for p in ph]
    n = len(ph[0]["soup_minus_best"])
    return {
        "soup_ge_best_ingredient": {
            "holds": all(x >= 0 for x in d_best),
            "mean_diff_per_phase": d_best,
            "seeds_soup_ge_best": [sum(x >= 0 for x in p["soup_minus_best"]) for p in ph],
            "seeds": n,
        },
        "soup_beats_imp_equal_compute": {
            "holds": all(x > 0 for x in d_imp),
            "mean_diff_per_phase": d_imp,
            "seeds_soup_wins": wins_imp,
            "seeds": n,
        },
        "gap_grows_with_sparsity": {"holds": d_imp[-1] > d_imp[0], "first": d_imp[0], "last": d_imp[-1]},
    }


def table(cfg: Config, summary: dict[str, Any]) -> str:
    keys = [(k, label) for k, label in METHODS if k in summary["phases"][0]]
    head = "| phase | sparsity | " + " | ".join(label for _, label in keys) + " | soup − IMP(m·E) |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for p in summary["phases"]:
        cells = [f"{p[k]['mean']:.2f} ± {p[k]['std']:.2f}" for k, _ in keys]
        d = p["soup_minus_imp_equal"]
        wins = sum(x > 0 for x in d)
        lines.append(
            f"| {p['phase']} | {100 * p['sparsity']:.1f} % | "
            + " | ".join(cells)
            + f" | {np.mean(d):+.2f} ({wins}/{len(d)} seeds) |"
        )
    lines.append(
        f"\ndense model: {summary['dense']['mean']:.2f} ± {summary['dense']['std']:.2f} % test accuracy; "
        f"test accuracy in %, mean ± std over {len(cfg.seeds)} seeds; m = {cfg.m}, E = {cfg.epochs}"
    )
    return "\n".join(lines)


def plot(cfg: Config, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    xs = [100 * p["sparsity"] for p in summary["phases"]]
    styles = {
        "soup": ("C0", "o", "-"),
        "greedy": ("C4", "s", "--"),
        "best_ingredient": ("C1", "^", ":"),
        "mean_ingredient": ("C1", "v", ":"),
        "ensemble": ("C2", "*", ":"),
        "imp_equal": ("C3", "D", "-"),
        "imp_short": ("C7", "x", "-"),
    }
    for key, label in METHODS:
        if key not in summary["phases"][0]:
            continue
        c, mk, ls = styles[key]
        ms = [p[key]["mean"] for p in summary["phases"]]
        sd = [p[key]["std"] for p in summary["phases"]]
        ax[0].errorbar(xs, ms, yerr=sd, color=c, marker=mk, linestyle=ls, capsize=3, label=label)
    ax[0].axhline(summary["dense"]["mean"], color="k", lw=0.8, ls=":", label="dense")
    ax[0].set(
        title="test accuracy after each prune–retrain phase", xlabel="sparsity (%)", ylabel="accuracy (%)"
    )
    for key, label, c in [
        ("soup_minus_imp_equal", "soup − IMP (equal epochs)", "C3"),
        ("soup_minus_best", "soup − best ingredient", "C1"),
    ]:
        for j, p in enumerate(summary["phases"]):
            ax[1].scatter(
                [xs[j]] * len(p[key]), p[key], color=c, alpha=0.5, s=14, label=label if j == 0 else None
            )
        ax[1].plot(xs, [np.mean(p[key]) for p in summary["phases"]], color=c)
    ax[1].axhline(0, color="k", lw=0.8)
    ax[1].set(
        title="paired differences per seed (points) and their mean",
        xlabel="sparsity (%)",
        ylabel="accuracy points",
    )
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(
        f"Sparse Model Soups on digits (MLP 64-{cfg.hidden}-{cfg.hidden}-10 + BN, m = {cfg.m}, "
        f"E = {cfg.epochs}, {len(cfg.seeds)} seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(cfg: Config | None = None, *, verbose: bool = True) -> dict[str, Any]:
    cfg = cfg or Config()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = load_data()
    runs = []
    try:
        for seed in cfg.seeds:
            save = cfg.out / "last_phase" if cfg.cli and seed == cfg.seeds[0] else None
            if save is not None:
                shutil.rmtree(save, ignore_errors=True)
            r = run_seed(cfg, data, seed, save)
            runs.append(r)
            if verbose:
                last = r["phases"][-1]
                print(
                    f"[seed {seed}] {r['seconds']:.1f} s: at {100 * last['sparsity']:.1f} % soup {last['soup']:.2f}, "
                    f"best ingredient {last['best_ingredient']:.2f}, IMP {last['imp_equal']:.2f}",
                    flush=True,
                )
        cli = (
            cli_check(cfg, data, cfg.out / "last_phase", runs[0]["soup_models"]["sms_uniform"])
            if cfg.cli
            else None
        )
    finally:
        torch.set_num_threads(threads)
    for r in runs:
        r.pop("soup_models")
    summary = summarise(cfg, runs)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "schedule": sparsity_schedule(cfg.goal_sparsity, cfg.phases),
        "summary": summary,
        "claims": claims(summary),
        "cli": cli,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
    }
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(cfg, summary, cfg.out / "sparse_soups_digits.png")
    result["table"] = table(cfg, summary)
    if verbose:
        print()
        print(result["table"])
        print()
        for name, cl in result["claims"].items():
            print(
                f"{'HOLDS' if cl['holds'] else 'FAILS'} {name}: "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in cl.items() if k != "holds")
            )
        if cli:
            print(
                f"\nCLI sparse_soup of the last phase (seed {cfg.seeds[0]}): identical weights to the library "
                f"{cli['identical_weights_to_library']}, test {cli['test_accuracy']:.2f} %; different masks: exit "
                f"{cli['different_masks_exit_code']}, {cli['different_masks_error']}"
            )
        print(
            f"\ntotal {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU; wrote "
            f"{cfg.out / 'results.json'} and {cfg.out / 'sparse_soups_digits.png'}"
        )
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration of the slow test")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick: 2)")
    ap.add_argument("--goal", type=float, default=None, help="goal sparsity (default 0.95)")
    ap.add_argument("--phases", type=int, default=None, help="prune-retrain phases (default 4)")
    ap.add_argument("--m", type=int, default=None, help="ingredients per phase (default 4)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per retrain (default 5)")
    ap.add_argument(
        "--lr", type=float, default=None, help="peak learning rate of the retrains (default 0.05)"
    )
    ap.add_argument("--hidden", type=int, default=None, help="hidden width (default 256)")
    ap.add_argument("--vary", choices=["seed", "lr"], default=None, help="what varies between ingredients")
    ap.add_argument("--no-greedy", action="store_true", help="skip the greedy-soup run")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI sparse_soup check")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    c = Config.quick(a.out) if a.quick else Config(out=a.out)
    if a.seeds:
        c = replace(c, seeds=tuple(range(a.seeds)))
    for name, key in [
        ("goal", "goal_sparsity"),
        ("phases", "phases"),
        ("m", "m"),
        ("epochs", "epochs"),
        ("lr", "lr"),
        ("hidden", "hidden"),
    ]:
        if getattr(a, name) is not None:
            c = replace(c, **{key: getattr(a, name)})
    if a.vary:
        c = replace(c, vary=a.vary)
    if a.no_greedy:
        c = replace(c, greedy=False)
    if a.no_cli:
        c = replace(c, cli=False)
    main(c)
