"""The data-free subspace and mask merges (TSV-M, ISO-C, ISO-CTS, consensus task arithmetic, TALL masks)
against task arithmetic and TIES on the digits task models of ``examples/merge_digits.py``, offline, on a CPU.

Same set-up as ``merge_digits.py`` (sklearn's digits, four image transforms as tasks, an MLP backbone
pre-trained on one task and fine-tuned per task with cosine heads; the backbone is merged, each task is
scored with its own head, "the union" is the mean test accuracy over tasks), in the two regimes ``small``
and ``large`` (fine-tuning learning rate 1e-3 and 1e-2), over seeds. Every merge goes through
``merge.execute.run_merge`` with a mergekit-format recipe; scaling coefficients are chosen on the
validation split unless said otherwise, accuracies are test accuracies.

Claims checked (the script reports which hold; it does not assume they do):

1. **TSV-M** (Gargiulo et al., CVPR 2025): with the scaling fixed at α = 1 (no validation), it beats
   TIES with its λ and density chosen on validation;
2. **ISO-C** (Marczak et al., ICML 2025) beats TIES (both validated);
3. **ISO-CTS** ≥ ISO-C (the task-specific directions help, most when tasks differ);
4. **Consensus merging** (Wang et al., ICML 2024): dropping the weights that at most one task needs
   does not hurt task arithmetic (consensus TA ≥ TA − 0.5 points, both validated);
5. **TALL masks** (same paper, compression): each task's mask applied to the merged vector recovers
   at least 95 % of its fine-tuned model's accuracy on its own task (normalised accuracy).

Run: ``python examples/merge_digits_research.py`` (about two minutes on two busy cores); ``--quick`` is
the slow test's configuration. Writes ``results.json`` and ``merge_digits_research.png`` under
``examples/out/merge_digits_research/``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.merge_digits import (  # noqa: E402
    Merger,
    _ms,
    accuracies,
    init_backbone,
    load_data,
    mean,
    recipe,
    save_checkpoint,
    train,
)

OUT = ROOT / "examples" / "out" / "merge_digits_research"
METHODS = ("ta", "ties", "tsv_alpha1", "tsv", "iso_c", "iso_cts", "consensus_ta")
LABELS = {
    "ta": "task arithmetic",
    "ties": "TIES (sum)",
    "tsv_alpha1": "TSV-M, α = 1",
    "tsv": "TSV-M, α validated",
    "iso_c": "ISO-C",
    "iso_cts": "ISO-CTS",
    "consensus_ta": "consensus TA",
}


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("identity", "hflip", "rot90", "invert")
    hidden: int = 256
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 20
    regimes: dict[str, float] = field(default_factory=lambda: {"small": 1e-3, "large": 1e-2})
    seeds: tuple[int, ...] = (0, 1, 2)
    #: task arithmetic, TIES (sum of the agreeing entries, as FusionBench) and consensus TA: λ
    sum_lambdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
    #: TSV-M, ISO-C, ISO-CTS: α (their merged task matrices are on another scale than a sum)
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
    ties_density: float = 0.2
    tall_lambda: float = 0.4  # consensus TA's (one value for every task)
    tall_lambdas: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)  # a TALL mask's, chosen per task on validation
    consensus_k: int = 2
    common_fraction: float = 0.8
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        """The slow test's configuration: one seed, shorter fine-tuning, coarse grids."""
        return Config(
            seeds=(0,),
            finetune_epochs=12,
            sum_lambdas=(0.2, 0.3, 0.5, 1.0),
            alphas=(0.5, 1.0, 1.5),
            tall_lambdas=(0.2, 0.4, 0.6),
            out=out,
        )


def run_one(cfg: Config, data: dict[str, Any], regime: str, lr: float, seed: int, merger: Merger) -> dict[str, Any]:
    folder = cfg.out / regime / f"seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    gen = torch.Generator().manual_seed(seed)
    base_sd = init_backbone(cfg.hidden, gen)
    head0 = torch.randn(10, cfg.hidden, generator=gen) * 0.1
    base_sd, _ = train(base_sd, head0, data["train"].x["identity"], data["train"].y,
                       epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=seed)
    base = save_checkpoint(folder / "base", base_sd, cfg.hidden, "pre-trained on identity digits")
    heads: dict[str, torch.Tensor] = {}
    paths: list[Path] = []
    own: dict[str, float] = {}
    for i, t in enumerate(cfg.tasks):
        g = torch.Generator().manual_seed(1000 * seed + 100 + i)
        head = torch.randn(10, cfg.hidden, generator=g) * 0.1
        sd, heads[t] = train(base_sd, head, data["train"].x[t], data["train"].y,
                             epochs=cfg.finetune_epochs, lr=lr, seed=1000 * seed + i)
        paths.append(save_checkpoint(folder / f"ft_{t}", sd, cfg.hidden, f"fine-tuned on {t} (lr {lr})"))
        own[t] = accuracies(sd, {t: heads[t]}, data["test"])[t]

    def evaluate(sd: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"val": mean(accuracies(sd, heads, data["val"]).values()),
                "test": mean(accuracies(sd, heads, data["test"]).values())}

    def sweep(method: str, values: tuple[float, ...], key: str = "lam", **params: Any) -> dict[str, Any]:
        curve = {}
        for v in values:
            curve[v] = evaluate(merger(recipe(method, paths, base, seed=seed, **{key: v}, **params)))
        best = max(curve, key=lambda v: (curve[v]["val"], -abs(v - 1.0)))
        return {"curve": {str(v): r for v, r in curve.items()}, "chosen": best, **curve[best]}

    res: dict[str, Any] = {"regime": regime, "lr": lr, "seed": seed, "fine_tuned_own_task": own}
    res["pretrained"] = evaluate(base_sd)
    res["ta"] = sweep("task_arithmetic", cfg.sum_lambdas)
    res["ties"] = sweep("ties", cfg.sum_lambdas, per_model={"density": cfg.ties_density}, normalize=False)
    res["tsv"] = sweep("tsv", cfg.alphas)
    res["tsv_alpha1"] = evaluate(merger(recipe("tsv", paths, base, seed=seed, lam=1.0)))
    res["iso_c"] = sweep("iso_c", cfg.alphas)
    res["iso_cts"] = sweep("iso_cts", cfg.alphas, common_fraction=cfg.common_fraction)
    res["consensus_ta"] = sweep("consensus_ta", cfg.sum_lambdas, per_model={"tall_lambda": cfg.tall_lambda},
                                k=cfg.consensus_k)
    # TALL masks: each task's model recovered from the merged vector, scored on its own task; λ_t chosen
    # per task on its own validation accuracy, as in the paper (grid [0.2, 0.6])
    res["tall_mask"] = {}
    for i, t in enumerate(cfg.tasks):
        tried = {}
        for lam in cfg.tall_lambdas:
            sd = merger(recipe("tall_mask", paths, base, seed=seed, per_model={"tall_lambda": lam}, task=i))
            tried[lam] = (accuracies(sd, {t: heads[t]}, data["val"])[t], accuracies(sd, {t: heads[t]}, data["test"])[t])
        lam = max(tried, key=lambda v: tried[v][0])
        res["tall_mask"][t] = {"lambda": lam, "test": tried[lam][1], "normalised": tried[lam][1] / own[t]}
    return res


def summarise(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for regime in cfg.regimes:
        rs = [r for r in runs if r["regime"] == regime]
        s: dict[str, Any] = {
            "pretrained": _ms([r["pretrained"]["test"] for r in rs]),
            "fine_tuned_own_task": _ms([mean(r["fine_tuned_own_task"].values()) for r in rs]),
        }
        for m in METHODS:
            s[m] = _ms([r[m]["test"] for r in rs])
            if "chosen" in rs[0][m]:
                s[m]["chosen"] = [r[m]["chosen"] for r in rs]
        s["tall_mask_normalised"] = _ms([mean(v["normalised"] for v in r["tall_mask"].values()) for r in rs])
        s["tall_mask_min_normalised"] = min(v["normalised"] for r in rs for v in r["tall_mask"].values())
        out[regime] = s
    return out


def claims(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    def both(fn: Any) -> dict[str, Any]:
        per = {regime: bool(fn(s)) for regime, s in summary.items()}
        return {"per_regime": per, "holds": all(per.values())}

    def m(s: dict[str, Any], k: str) -> float:
        return s[k]["mean"]

    return {
        "1 TSV-M at α = 1 beats validated TIES": both(lambda s: m(s, "tsv_alpha1") > m(s, "ties")),
        "2 ISO-C beats TIES": both(lambda s: m(s, "iso_c") > m(s, "ties")),
        "3 ISO-CTS >= ISO-C": both(lambda s: m(s, "iso_cts") >= m(s, "iso_c")),
        "4 consensus TA >= TA - 0.5": both(lambda s: m(s, "consensus_ta") >= m(s, "ta") - 0.5),
        "5 TALL masks recover >= 95% of each fine-tune": both(lambda s: s["tall_mask_min_normalised"] >= 0.95),
    }


def table(summary: dict[str, Any]) -> str:
    regimes = list(summary)
    lines = ["| method | " + " | ".join(f"{r} (test %, mean ± std)" for r in regimes) + " |",
             "|---|" + "---|" * len(regimes)]

    def row(label: str, key: str) -> None:
        cells = [f"{summary[r][key]['mean']:.1f} ± {summary[r][key]['std']:.1f}" for r in regimes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("pre-trained θ0", "pretrained")
    for k in METHODS:
        row(LABELS[k], k)
    row("fine-tuned, own task (upper bound)", "fine_tuned_own_task")
    lines.append("| TALL masks, normalised own-task accuracy | " + " | ".join(
        f"{summary[r]['tall_mask_normalised']['mean']:.3f} (min {summary[r]['tall_mask_min_normalised']:.3f})"
        for r in regimes) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    regimes = list(summary)
    width = 0.8 / len(regimes)
    for j, regime in enumerate(regimes):
        means = [summary[regime][k]["mean"] for k in METHODS]
        stds = [summary[regime][k]["std"] for k in METHODS]
        ax.bar(np.arange(len(METHODS)) + j * width, means, width, yerr=stds, label=f"{regime} fine-tuning", capsize=3)
    ax.set_xticks(np.arange(len(METHODS)) + width * (len(regimes) - 1) / 2)
    ax.set_xticklabels([LABELS[k] for k in METHODS], rotation=20, ha="right")
    ax.set_ylabel("mean test accuracy over 4 tasks (%)")
    lo = min(summary[r][k]["mean"] for r in regimes for k in METHODS)
    ax.set_ylim(max(0, lo - 10), 100)
    ax.legend()
    ax.set_title("Data-free merges of four digits task models")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: Config | None = None, *, verbose: bool = True) -> dict[str, Any]:
    cfg = cfg or Config()
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = load_data(cfg.tasks)
    merger = Merger()
    runs = []
    try:
        for regime, lr in cfg.regimes.items():
            for seed in cfg.seeds:
                runs.append(run_one(cfg, data, regime, lr, seed, merger))
                if verbose:
                    r = runs[-1]
                    print(f"{regime} seed {seed}: " + ", ".join(f"{k} {r[k]['test']:.1f}" for k in METHODS),
                          flush=True)
    finally:
        merger.close()
    summary = summarise(cfg, runs)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "runs": runs,
        "summary": summary,
        "claims": claims(cfg, summary),
        "seconds": time.perf_counter() - t0,
        "merges": merger.n,
    }
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    plot(summary, cfg.out / "merge_digits_research.png")
    if verbose:
        print(table(summary))
        for name, c in result["claims"].items():
            print(f"claim {name}: {'holds' if c['holds'] else 'does not hold'} {c['per_regime']}")
        print(f"{merger.n} merges in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the slow test's configuration")
    args = ap.parse_args()
    main(Config.quick() if args.quick else Config())
