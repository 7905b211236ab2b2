"""The methods added for mergekit parity (DELLA, SCE, Karcher, Multi-SLERP, NuSLERP, RAM, Arcee Fusion,
NearSwap) on the digits task models of ``examples/merge_digits.py``, offline, on a CPU.

Same set-up as ``merge_digits.py`` (sklearn's digits, four image transforms as tasks, an MLP backbone
pre-trained on one task and fine-tuned per task with cosine heads; the backbone is merged, each task is
scored with its own head, "the union" is the mean over tasks), in the two regimes ``small`` and ``large``
(fine-tuning learning rate 1e-3 and 1e-2). Every merge goes through ``merge.execute.run_merge`` with a
mergekit-format recipe; hyperparameters are chosen on the validation split, accuracies are test accuracies.

Claims checked (the script reports which hold; it does not assume they do):

1. **DELLA** (Deep et al., 2024): dropping by magnitude-ranked probabilities (MAGPRUNE) keeps a fine-tune's
   accuracy better than DARE's uniform drop at the same keep rate, when most entries are dropped;
2. and inside the merge, DELLA ≥ DARE-TIES at the same density;
3. **SCE** (Wan et al., FuseChat, 2024): the fused model beats every single fine-tune on the union;
4. **Karcher / Multi-SLERP**: Karcher keeps each tensor at the inputs' mean norm (where the linear soup
   shrinks it) and, for nearby models (small regime), both score within 2 points of the linear soup;
5. **RAM** (arXiv:2601.13572): on sparse task vectors (each trimmed to its top 20 % as sparse fine-tunes
   are), keeping unique updates at full strength beats averaging them (task arithmetic with λ = 1/T);
6. **Arcee Fusion**: fusing a fine-tune into the base keeps at least half of its own-task gain while taking
   fewer than a quarter of its changed entries.

NuSLERP (two models) and NearSwap are reported without a claim of their own (NuSLERP of two task vectors
against their average; NearSwap's own-task accuracy as its ``t`` grows).

Run: ``python examples/merge_digits_more.py`` (a few minutes on two busy cores); ``--quick`` is the slow
test's configuration. Writes ``results.json`` and ``merge_digits_more.png`` under
``examples/out/merge_digits_more/``.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.merge_digits import (  # noqa: E402
    Merger,
    accuracies,
    init_backbone,
    load_data,
    mean,
    recipe,
    save_checkpoint,
    train,
)

OUT = ROOT / "examples" / "out" / "merge_digits_more"


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("identity", "hflip", "rot90", "invert")
    hidden: int = 256
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 20
    regimes: dict[str, float] = field(default_factory=lambda: {"small": 1e-3, "large": 1e-2})
    seeds: tuple[int, ...] = (0, 1, 2)
    lambdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    #: DELLA (a disjoint *mean*, normalize: true as in mergekit) against DARE-TIES (a sum): both on this grid
    mean_lambdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.25, 1.5, 2.0)
    prune_densities: tuple[float, ...] = (0.1, 0.05)  # keep rates for the one-model pruning comparison
    prune_epsilon: float = 0.04  # DELLA's ε at those densities (density ± ε inside (0, 1))
    merge_density: float = 0.3
    merge_epsilon: float = 0.1
    mask_seeds: int = 2
    sce_topk: tuple[float, ...] = (0.5, 1.0)
    ram_trim: float = 0.2
    nearswap_t: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        return Config(
            seeds=(0,),
            finetune_epochs=12,
            lambdas=(0.2, 0.4, 0.7, 1.0),
            mean_lambdas=(0.2, 0.5, 1.0, 1.5),
            prune_densities=(0.1,),
            mask_seeds=1,
            sce_topk=(1.0,),
            nearswap_t=(1e-3, 1e-1),
            out=out,
        )


def _flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([sd[k].flatten() for k in sorted(sd)])


def run_one(
    cfg: Config, data: dict[str, Any], regime: str, lr: float, seed: int, merger: Merger
) -> dict[str, Any]:
    folder = cfg.out / regime / f"seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    tasks = cfg.tasks
    gen = torch.Generator().manual_seed(seed)
    base_sd = init_backbone(cfg.hidden, gen)
    head0 = torch.randn(10, cfg.hidden, generator=gen) * 0.1
    base_sd, _ = train(
        base_sd,
        head0,
        data["train"].x["identity"],
        data["train"].y,
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_lr,
        seed=seed,
    )
    base = save_checkpoint(folder / "base", base_sd, cfg.hidden, "pre-trained on identity digits")
    fts, heads, paths = [], {}, []
    for i, t in enumerate(tasks):
        g = torch.Generator().manual_seed(1000 * seed + 100 + i)
        sd, heads[t] = train(
            base_sd,
            torch.randn(10, cfg.hidden, generator=g) * 0.1,
            data["train"].x[t],
            data["train"].y,
            epochs=cfg.finetune_epochs,
            lr=lr,
            seed=1000 * seed + i,
        )
        fts.append(sd)
        paths.append(save_checkpoint(folder / f"ft_{t}", sd, cfg.hidden, f"fine-tuned on {t} (lr {lr})"))

    def evaluate(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
        va, te = accuracies(sd, heads, data["val"]), accuracies(sd, heads, data["test"])
        return {"val": mean(va.values()), "test": mean(te.values()), "test_per_task": te}

    def own(sd: dict[str, torch.Tensor], t: str) -> float:
        return accuracies(sd, {t: heads[t]}, data["test"])[t]

    def best(
        method: str, models: list[Any], b: Any, grid: list[dict[str, Any]], **fixed: Any
    ) -> dict[str, Any]:
        """The grid point with the best validation union accuracy."""
        scored = []
        for params in grid:
            r = recipe(method, models, b, seed=seed, **{**fixed, **params})
            scored.append((evaluate(merger(r)), params))
        top, params = max(scored, key=lambda x: x[0]["val"])
        return {**params, **top}

    res: dict[str, Any] = {"regime": regime, "seed": seed}
    res["pretrained"] = evaluate(base_sd)
    res["single"] = {t: evaluate(sd) for t, sd in zip(tasks, fts, strict=True)}
    res["single_own"] = {t: res["single"][t]["test_per_task"][t] for t in tasks}
    res["best_single_union"] = max(r["test"] for r in res["single"].values())
    soup = merger(recipe("linear", paths, None, seed=seed))
    res["linear"] = evaluate(soup)
    lam_grid = [{"lam": lam} for lam in cfg.lambdas]
    res["ta"] = best("task_arithmetic", paths, base, lam_grid)

    # 1. one model pruned: DELLA's magnitude-ranked drop vs DARE's uniform drop, both rescaled
    prune: dict[str, Any] = {}
    for d in cfg.prune_densities:
        dare, della = [], []
        for k in range(cfg.mask_seeds):
            for t, p in zip(tasks, paths, strict=True):
                s = 1000 * seed + k
                dare.append(
                    own(merger(recipe("dare_linear", [p], base, seed=s, per_model={"density": d})), t)
                )
                della.append(
                    own(
                        merger(
                            recipe(
                                "della_linear",
                                [p],
                                base,
                                seed=s,
                                per_model={"density": d, "epsilon": cfg.prune_epsilon},
                            )
                        ),
                        t,
                    )
                )
        prune[str(d)] = {
            "dare": mean(dare),
            "della": mean(della),
            "finetuned": mean(res["single_own"].values()),
        }
    res["prune_single"] = prune

    # 2. inside the merge: DELLA vs DARE-TIES at the same density (λ on validation, same mask seeds)
    dm = {"density": cfg.merge_density}
    wide = [{"lam": lam} for lam in cfg.mean_lambdas]
    res["dare_ties"] = best("dare_ties", paths, base, wide, per_model=dm)
    res["della"] = best("della", paths, base, wide, per_model={**dm, "epsilon": cfg.merge_epsilon})

    # 3. SCE
    res["sce"] = best("sce", paths, base, [{"select_topk": s} for s in cfg.sce_topk])

    # 4. spherical means: norms and accuracy
    kar = merger(recipe("karcher", paths, None, seed=seed))
    msl = merger(recipe("multislerp", paths, base, seed=seed, per_model={"weight": 1.0}))

    def norm_ratios(sd: dict[str, torch.Tensor]) -> list[float]:
        """Per tensor (the methods work tensor by tensor): ‖merged‖ / mean_i ‖θ_i‖."""
        return [sd[k].norm().item() / mean(f[k].norm().item() for f in fts) for k in sorted(sd)]

    kr, lr_ = norm_ratios(kar), norm_ratios(soup)
    res["karcher"] = {**evaluate(kar), "norm_max_dev": max(abs(x - 1) for x in kr)}
    res["multislerp"] = evaluate(msl)
    res["linear"]["norm_ratio_min"] = min(lr_)
    taus = [_flat(sd) - _flat(base_sd) for sd in fts]
    res["multislerp"]["tau_norm_over_mean"] = (_flat(msl) - _flat(base_sd)).norm().item() / mean(
        t.norm().item() for t in taus
    )
    res["linear"]["tau_norm_over_mean"] = (_flat(soup) - _flat(base_sd)).norm().item() / mean(
        t.norm().item() for t in taus
    )

    # 5. RAM on sparse task vectors (each fine-tune trimmed to its top ram_trim by magnitude)
    sparse = []
    for t, p in zip(tasks, paths, strict=True):
        sd = merger(recipe("ties", [p], base, seed=seed, per_model={"density": cfg.ram_trim}))
        sparse.append(save_checkpoint(folder / f"sparse_{t}", sd, cfg.hidden, f"top-{cfg.ram_trim} of τ_{t}"))
    res["sparse_single_own"] = mean(
        own(merger(recipe("task_arithmetic", [p], base, seed=seed)), t)
        for t, p in zip(tasks, sparse, strict=True)
    )
    res["sparse_average"] = evaluate(
        merger(recipe("task_arithmetic", sparse, base, seed=seed, lam=1 / len(tasks)))
    )
    res["sparse_ta"] = best("task_arithmetic", sparse, base, lam_grid)
    res["ram"] = evaluate(merger(recipe("ram", sparse, base, seed=seed, epsilon=1e-8)))
    res["ramplus_tl"] = evaluate(merger(recipe("ramplus_tl", sparse, base, seed=seed, epsilon=1e-8)))

    # 6. Arcee Fusion of each fine-tune into the base; NearSwap's t sweep
    fusion = []
    for t, p, sd in zip(tasks, paths, fts, strict=True):
        out = merger(recipe("arcee_fusion", [p], base, seed=seed))
        changed = (_flat(sd) != _flat(base_sd)).sum().item()
        taken = (_flat(out) != _flat(base_sd)).sum().item()
        gain = res["single_own"][t] - accuracies(base_sd, {t: heads[t]}, data["test"])[t]
        kept = own(out, t) - accuracies(base_sd, {t: heads[t]}, data["test"])[t]
        fusion.append(
            {
                "task": t,
                "own": own(out, t),
                "gain_kept": kept / gain if gain > 0 else float("nan"),
                "entries_taken": taken / changed,
            }
        )
    res["arcee_fusion"] = {
        "per_task": fusion,
        "gain_kept": mean(f["gain_kept"] for f in fusion),
        "entries_taken": mean(f["entries_taken"] for f in fusion),
    }
    res["nearswap"] = {
        str(tv): mean(
            own(merger(recipe("nearswap", [p], base, seed=seed, t=tv)), t)
            for t, p in zip(tasks, paths, strict=True)
        )
        for tv in cfg.nearswap_t
    }

    # NuSLERP of the first two task models vs their average (union of those two tasks)
    two = tasks[:2]

    def union2(sd: dict[str, torch.Tensor]) -> float:
        return mean(accuracies(sd, {t: heads[t] for t in two}, data["test"]).values())

    res["nuslerp_two"] = {
        "nuslerp": union2(merger(recipe("nuslerp", paths[:2], base, seed=seed, per_model={"weight": 1.0}))),
        "average": union2(merger(recipe("task_arithmetic", paths[:2], base, seed=seed, lam=0.5))),
    }
    return res


def summarise(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for regime in cfg.regimes:
        rs = [r for r in runs if r["regime"] == regime]

        def m(f: Any, rs: list[dict[str, Any]] = rs) -> float:
            return mean(f(r) for r in rs)

        s: dict[str, Any] = {
            "single_own": m(lambda r: mean(r["single_own"].values())),
            "best_single_union": m(lambda r: r["best_single_union"]),
            **{
                k: m(lambda r, k=k: r[k]["test"])
                for k in (
                    "pretrained",
                    "linear",
                    "ta",
                    "dare_ties",
                    "della",
                    "sce",
                    "karcher",
                    "multislerp",
                    "sparse_average",
                    "sparse_ta",
                    "ram",
                    "ramplus_tl",
                )
            },
            "sparse_single_own": m(lambda r: r["sparse_single_own"]),
            "karcher_norm_dev": max(r["karcher"]["norm_max_dev"] for r in rs),
            "linear_norm_min": min(r["linear"]["norm_ratio_min"] for r in rs),
            "multislerp_tau_norm": m(lambda r: r["multislerp"]["tau_norm_over_mean"]),
            "linear_tau_norm": m(lambda r: r["linear"]["tau_norm_over_mean"]),
            "fusion_gain_kept": m(lambda r: r["arcee_fusion"]["gain_kept"]),
            "fusion_entries_taken": m(lambda r: r["arcee_fusion"]["entries_taken"]),
            "prune": {
                d: {k: m(lambda r, d=d, k=k: r["prune_single"][d][k]) for k in ("dare", "della", "finetuned")}
                for d in rs[0]["prune_single"]
            },
            "nearswap": {t: m(lambda r, t=t: r["nearswap"][t]) for t in rs[0]["nearswap"]},
            "nuslerp_two": {k: m(lambda r, k=k: r["nuslerp_two"][k]) for k in ("nuslerp", "average")},
        }
        out[regime] = s
    return out


def claims(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    s, lg = summary["small"], summary["large"]
    c: dict[str, Any] = {}
    d = str(min(cfg.prune_densities))
    c["1 DELLA pruning keeps more than DARE at the lowest keep rate"] = {
        "holds": all(summary[r]["prune"][d]["della"] > summary[r]["prune"][d]["dare"] for r in cfg.regimes),
        **{
            f"{r}_della_vs_dare": [summary[r]["prune"][d]["della"], summary[r]["prune"][d]["dare"]]
            for r in cfg.regimes
        },
    }
    c["2 DELLA merge >= DARE-TIES merge"] = {
        "holds": all(summary[r]["della"] >= summary[r]["dare_ties"] - 0.5 for r in cfg.regimes),
        **{f"{r}_della_vs_dare_ties": [summary[r]["della"], summary[r]["dare_ties"]] for r in cfg.regimes},
    }
    c["3 SCE beats every single fine-tune on the union"] = {
        "holds": all(summary[r]["sce"] > summary[r]["best_single_union"] for r in cfg.regimes),
        **{
            f"{r}_sce_vs_best_single": [summary[r]["sce"], summary[r]["best_single_union"]]
            for r in cfg.regimes
        },
    }
    c["4a Karcher keeps each tensor at the mean norm, the linear soup shrinks it"] = {
        "holds": s["karcher_norm_dev"] < 1e-4
        and lg["karcher_norm_dev"] < 1e-4
        and lg["linear_norm_min"] < 0.95,
        "karcher_norm_max_dev": [s["karcher_norm_dev"], lg["karcher_norm_dev"]],
        "linear_norm_ratio_min": [s["linear_norm_min"], lg["linear_norm_min"]],
    }
    c["4b for nearby models (small regime) Karcher and Multi-SLERP score within 2 points of the soup"] = {
        "holds": abs(s["karcher"] - s["linear"]) <= 2 and abs(s["multislerp"] - s["linear"]) <= 2,
        "small_karcher_multislerp_linear": [s["karcher"], s["multislerp"], s["linear"]],
    }
    c["5 RAM beats averaging on sparse task vectors"] = {
        "holds": all(summary[r]["ram"] > summary[r]["sparse_average"] for r in cfg.regimes),
        **{f"{r}_ram_vs_average": [summary[r]["ram"], summary[r]["sparse_average"]] for r in cfg.regimes},
    }
    c["6 Arcee Fusion keeps >= half the gain with < 1/4 of the entries"] = {
        "holds": all(
            summary[r]["fusion_gain_kept"] >= 0.5 and summary[r]["fusion_entries_taken"] < 0.25
            for r in cfg.regimes
        ),
        **{
            f"{r}_gain_kept_entries_taken": [
                summary[r]["fusion_gain_kept"],
                summary[r]["fusion_entries_taken"],
            ]
            for r in cfg.regimes
        },
    }
    return c


def table(summary: dict[str, Any]) -> str:
    regimes = list(summary)
    rows = [
        ("pre-trained θ0", "pretrained"),
        ("best single fine-tune", "best_single_union"),
        ("linear soup", "linear"),
        ("task arithmetic", "ta"),
        ("DARE-TIES", "dare_ties"),
        ("DELLA", "della"),
        ("SCE", "sce"),
        ("Karcher mean", "karcher"),
        ("Multi-SLERP", "multislerp"),
        ("sparse τ: average (TA λ=1/T)", "sparse_average"),
        ("sparse τ: TA (λ on val)", "sparse_ta"),
        ("sparse τ: RAM", "ram"),
        ("sparse τ: RAM+", "ramplus_tl"),
    ]
    lines = ["| union test accuracy % | " + " | ".join(regimes) + " |", "|---|" + "---|" * len(regimes)]
    lines += [
        f"| {label} | " + " | ".join(f"{summary[r][k]:.1f}" for r in regimes) + " |" for label, k in rows
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = ["linear", "ta", "dare_ties", "della", "sce", "karcher", "multislerp", "sparse_average", "ram"]
    for ax, regime in zip(axes, summary, strict=True):
        s = summary[regime]
        ax.bar(range(len(keys)), [s[k] for k in keys], color="#4c72b0")
        ax.axhline(s["best_single_union"], color="k", ls="--", lw=1, label="best single fine-tune")
        ax.set_xticks(range(len(keys)), keys, rotation=40, ha="right")
        ax.set_title(f"{regime} task vectors: union test accuracy")
        ax.set_ylim(0, 100)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(cfg: Config | None = None, *, verbose: bool = True) -> dict[str, Any]:
    cfg = cfg or Config()
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.tasks)
    merger = Merger()
    runs = []
    try:
        for regime, lr in cfg.regimes.items():
            for seed in cfg.seeds:
                runs.append(run_one(cfg, data, regime, lr, seed, merger))
                if verbose:
                    print(f"[{regime}, seed {seed}] done ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        merger.close()
        torch.set_num_threads(threads)
    summary = summarise(cfg, runs)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "summary": summary,
        "claims": claims(cfg, summary),
        "runs": runs,
        "merges": merger.n,
        "seconds": time.perf_counter() - t0,
    }
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    plot(summary, cfg.out / "merge_digits_more.png")
    result["table"] = table(summary)
    if verbose:
        print("\n" + result["table"] + "\n")
        for name, cl in result["claims"].items():
            print(
                ("HOLDS " if cl["holds"] else "FAILS ")
                + name
                + ": "
                + ", ".join(f"{k}={v}" for k, v in cl.items() if k != "holds")
            )
        for regime, s in summary.items():
            print(f"{regime}: prune {s['prune']}, nearswap {s['nearswap']}, nuslerp(two) {s['nuslerp_two']}")
        print(f"\n{merger.n} merges, {result['seconds']:.0f} s; wrote {cfg.out / 'results.json'}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration of the slow test")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    main(Config.quick(a.out) if a.quick else Config(out=a.out))
