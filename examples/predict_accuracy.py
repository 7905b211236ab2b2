"""Predict a network's test accuracy (and its task) from its weights: GMN, UNF and the baselines.

Reproduces the qualitative claims of Graph Metanetworks (Lim et al., ICLR 2024, §5.1: accuracy
prediction, GMN ≥ the non-equivariant baselines, the gap widest with little training data and on
diverse architectures) and of the metanet literature it builds on (Unterthiner et al. 2020: StatNN is a
strong baseline; Zhou et al. 2023/2024: equivariant > flat), on zoos generated offline from sklearn's
digits (research note metanets.md §4.2):

- **zoo A** (homogeneous): MLPs 64-32-32-10, relu/tanh, varied lr, weight decay, init scale, data
  fraction, label noise and length, checkpoints along training. Target: test accuracy (Kendall τ, R²)
  at 5 %, 25 % and 100 % of the training runs.
- **zoo B** (heterogeneous): MLPs of depth 1–3 and CNNs (plain and residual, BatchNorm or not) mixed;
  only the graph metanets and pooled statistics apply.
- **zoo C** (task identification): the same MLP trained on digits, pixel-permuted digits, relabelled
  digits or parity: which task? (chance 0.25; weight statistics cannot tell tasks 0–2 apart).

Every predictor gets the same budget (epochs, batch size, learning rate; early stopping on the
validation split); splits are by run. Prints the tables, writes ``examples/out/predict_accuracy.json``
and a scatter plot ``examples/out/predict_accuracy.png`` (predicted vs true accuracy on zoo A's test
runs).

Run: ``.venv/bin/python examples/predict_accuracy.py [--quick]`` (``--quick``: small zoos and few
epochs, a couple of minutes; the full run is what ``bench/metanets_accuracy.py`` reports).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "examples" / "out"

MLP_A = {"kind": "mlp", "depth": 2, "width": 32, "activation": ["relu", "tanh"], "norm": "none"}


def zoo_a(runs: int, seed: int = 0) -> dict[str, Any]:
    return {"name": f"A-homogeneous-{runs}", "seed": seed, "runs": runs, "tasks": ["digits"],
            "checkpoints": [0, 1, 2, 5, 10, 20], "architectures": [MLP_A]}  # fmt: skip


def zoo_b(runs: int, seed: int = 1) -> dict[str, Any]:
    return {
        "name": f"B-heterogeneous-{runs}", "seed": seed, "runs": runs, "tasks": ["digits"], "checkpoints": [1, 3, 10],
        "architectures": [
            {"kind": "mlp", "depth": [1, 2, 3], "width": [16, 32, 64], "norm": ["none", "layernorm", "batchnorm"],
             "activation": ["relu", "tanh", "gelu", "sigmoid", "leaky_relu"]},
            {"kind": "cnn", "layers": [1, 2, 3], "width": [4, 8, 16], "kernel": [3, 5], "residual": [False, True],
             "activation": ["relu", "gelu", "tanh"], "norm": ["none", "batchnorm"]},
        ],
        "hparams": {"epochs": {"int": [2, 12]}},
    }  # fmt: skip


def zoo_c(runs: int, seed: int = 2) -> dict[str, Any]:
    return {
        "name": f"C-task-id-{runs}", "seed": seed, "runs": runs,
        "tasks": ["digits", "digits_permuted", "digits_relabel", "parity"], "checkpoints": [],
        "architectures": [{"kind": "mlp", "depth": 2, "width": 32, "activation": "relu", "norm": "none"}],
        "hparams": {"epochs": {"int": [5, 20]}, "label_noise": {"uniform": [0.0, 0.2]},
                    "train_fraction": {"uniform": [0.3, 1.0]}},
    }  # fmt: skip


def build(cfg: dict[str, Any], root: Path, workers: int | None = None) -> Path:
    from metanets.zoo import build_zoo

    path = root / cfg["name"]
    s = build_zoo(cfg, path, workers=workers, progress=sys.stderr.isatty())
    print(f"[zoo] {cfg['name']}: {s.runs} runs, {s.models} models, built {s.built_runs} runs in {s.seconds:.0f} s "
          f"({s.models_per_s:.1f} models/s, {s.executor})", flush=True)  # fmt: skip
    return path


def gbt_baseline(
    zoo_path: Path, target: str, train_fraction: float, seed: int = 0, pooled: bool = False
) -> dict[str, Any]:
    """StatNN features + sklearn gradient-boosted trees (Unterthiner et al.'s best), the same split."""
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    from metanets.baselines import StatNN
    from metanets.train import TrainConfig, regression_metrics, split_records, targets_of
    from metanets.zoo import Zoo

    zoo = Zoo(zoo_path)
    cfg = TrainConfig(target=target, train_fraction=train_fraction, seed=seed)
    idx, (tr, va, te) = split_records(zoo, cfg)
    kind, y, _classes = targets_of(zoo, cfg, idx)
    y_of = dict(zip(idx, y, strict=True))
    t0 = time.perf_counter()
    feat = {i: StatNN.features(zoo.state_dict(i), zoo.spec(i), pooled=pooled).numpy() for i in tr + va + te}
    x = lambda ids: np.stack([feat[i] for i in ids])  # noqa: E731
    yy = lambda ids: np.array([y_of[i] for i in ids])  # noqa: E731
    model = (HistGradientBoostingRegressor if kind == "regression" else HistGradientBoostingClassifier)(
        random_state=seed
    )
    model.fit(x(tr + va), yy(tr + va))
    pred = model.predict(x(te))
    if kind == "regression":
        m = regression_metrics(pred.tolist(), yy(te).tolist())
    else:
        m = {"accuracy": float((pred == yy(te)).mean())}
    m["seconds"] = time.perf_counter() - t0
    m["train_records"] = len(tr)
    return {"metrics": m, "pred": pred.tolist(), "true": yy(te).tolist()}


MODEL_ARGS: dict[str, dict[str, Any]] = {
    "gmn": {"hidden": 32, "layers": 3},
    "unf": {"hidden": 16, "layers": 2},
    "statnn": {},
    "flat": {},
    "flat_aug": {},
    "deepsets": {},
}


def train_one(zoo_path: Path, model: str, target: str, fraction: float, epochs: int, out: Path,
              seed: int = 0, patience: int = 8) -> dict[str, Any]:  # fmt: skip
    from metanets.train import TrainConfig, train_metanet

    if model.startswith("statnn_gbt"):
        return gbt_baseline(zoo_path, target, fraction, seed, pooled=model.endswith("pooled"))
    cfg = TrainConfig(model=model, target=target, epochs=epochs, train_fraction=fraction, seed=seed, patience=patience,
                      model_args=dict(MODEL_ARGS.get(model, {})))  # fmt: skip
    t0 = time.perf_counter()
    r = train_metanet(zoo_path, cfg, out / f"{Path(zoo_path).name}-{model}-{target}-{fraction}", overwrite=True,
                      progress=sys.stderr.isatty())  # fmt: skip
    assert r is not None
    m = dict(r.metrics)
    m["seconds"] = time.perf_counter() - t0
    m["epochs_run"] = len(r.history)
    m["graphs_per_s"] = max((h["graphs_per_s"] for h in r.history), default=0.0)
    tp = r.card["test_predictions"]
    return {"metrics": m, "pred": tp["pred"], "true": tp["true"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.zoo_dir)
    out = OUT / "metanets"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"args": vars(args), "tables": {}}
    za = build(zoo_a(args.runs_a), root, args.workers)
    zb = build(zoo_b(args.runs_b), root, args.workers) if args.runs_b else None
    zc = build(zoo_c(args.runs_c), root, args.workers) if args.runs_c else None

    t1: dict[str, Any] = {}
    for frac in args.fractions:
        for model in args.models_a:
            r = train_one(za, model, "test_acc", frac, args.epochs, out)
            t1[f"{model}@{frac}"] = r
            m = r["metrics"]
            print(f"[T1 zoo A] {model:14s} {frac:5.2f}: τ {m['kendall_tau']:.3f} R² {m['r2']:.3f} "
                  f"({m['train_records']} train records, {m['seconds']:.0f} s)", flush=True)  # fmt: skip
    result["tables"]["T1"] = t1
    if zb is not None:
        t2: dict[str, Any] = {}
        for frac in args.fractions_b:
            for model in args.models_b:
                r = train_one(zb, model, "test_acc", frac, args.epochs, out)
                t2[f"{model}@{frac}"] = r
                m = r["metrics"]
                print(f"[T2 zoo B] {model:14s} {frac:5.2f}: τ {m['kendall_tau']:.3f} R² {m['r2']:.3f} "
                      f"({m['seconds']:.0f} s)", flush=True)  # fmt: skip
        result["tables"]["T2"] = t2
    if zc is not None:
        t3: dict[str, Any] = {}
        for model in args.models_c:
            r = train_one(zc, model, "task", 1.0, args.epochs_c, out)
            t3[model] = r
            print(f"[T3 zoo C] {model:14s}: accuracy {r['metrics']['accuracy']:.3f} ({r['metrics']['seconds']:.0f} s)",
                  flush=True)  # fmt: skip
        result["tables"]["T3"] = t3
    return result


def report(result: dict[str, Any]) -> str:
    lines = []
    t1 = result["tables"].get("T1", {})
    if t1:
        fracs = sorted({float(k.split("@")[1]) for k in t1})
        models = list(dict.fromkeys(k.split("@")[0] for k in t1))
        lines.append(
            "T1, zoo A (homogeneous MLPs): Kendall τ / R² of predicted test accuracy, by share of training runs"
        )
        lines.append("| predictor | " + " | ".join(f"{f:.0%} τ | {f:.0%} R²" for f in fracs) + " |")
        lines.append("|---|" + "---|---|" * len(fracs))
        for m in models:
            cells = []
            for f in fracs:
                r = t1.get(f"{m}@{f}")
                cells += (
                    [f"{r['metrics']['kendall_tau']:.3f}", f"{r['metrics']['r2']:.3f}"] if r else ["", ""]
                )
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    t2 = result["tables"].get("T2", {})
    if t2:
        lines.append("\nT2, zoo B (MLPs and CNNs mixed): Kendall τ / R²")
        lines.append("| predictor@share | τ | R² |\n|---|---|---|")
        for k, r in t2.items():
            lines.append(f"| {k} | {r['metrics']['kendall_tau']:.3f} | {r['metrics']['r2']:.3f} |")
    t3 = result["tables"].get("T3", {})
    if t3:
        lines.append("\nT3, zoo C: which of 4 tasks (chance 0.25)")
        lines.append("| predictor | accuracy |\n|---|---|")
        for k, r in t3.items():
            lines.append(f"| {k} | {r['metrics']['accuracy']:.3f} |")
    return "\n".join(lines)


def figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t1 = result["tables"].get("T1", {})
    full = [k for k in t1 if k.endswith("@1.0")]
    if not full:
        return
    fig, axes = plt.subplots(1, len(full), figsize=(3.2 * len(full), 3.2), squeeze=False)
    for ax, k in zip(axes[0], full, strict=True):
        r = t1[k]
        ax.scatter(r["true"], r["pred"], s=5, alpha=0.5)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"{k.split('@')[0]}: τ {r['metrics']['kendall_tau']:.2f}", fontsize=9)
        ax.set_xlabel("true test accuracy", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("predicted", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small zoos, few epochs (minutes)")
    ap.add_argument("--zoo-dir", default=str(OUT / "zoos"))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--runs-a", type=int, default=400)
    ap.add_argument("--runs-b", type=int, default=400)
    ap.add_argument("--runs-c", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--epochs-c", type=int, default=40)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.25, 1.0])
    ap.add_argument("--fractions-b", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument(
        "--models-a",
        nargs="+",
        default=["gmn", "unf", "statnn", "statnn_gbt", "flat", "flat_aug", "deepsets"],
    )
    ap.add_argument("--models-b", nargs="+", default=["gmn", "statnn", "statnn_gbt_pooled", "deepsets"])
    ap.add_argument(
        "--models-c",
        nargs="+",
        default=["gmn", "unf", "statnn", "statnn_gbt", "flat", "flat_aug", "deepsets"],
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.runs_a, args.runs_b, args.runs_c, args.epochs, args.epochs_c = 80, 60, 120, 12, 15
        args.fractions, args.fractions_b = [1.0], [1.0]
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - t0
    text = report(result)
    print("\n" + text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "predict_accuracy.json").write_text(json.dumps(result, indent=1))
    figure(result, OUT / "predict_accuracy.png")
    print(
        f"\nwrote {OUT / 'predict_accuracy.json'} and predict_accuracy.png in {result['seconds'] / 60:.1f} min"
    )
    return result


if __name__ == "__main__":
    main()
