"""Git Re-Basin on sklearn digits: linear mode connectivity after weight and activation matching.

Two MLPs 64 → h → h → 10 (ReLU, He-normal init, zero biases) are trained from different seeds
(and data orders) on sklearn's digits (offline; 1437 train / 360 test, standardised), Adam lr
1e-3, batch 32, no weight decay. For each width the script measures the loss barrier of
Git Re-Basin (``max_λ L((1-λ)θ_A + λθ_B) − ½(L_A + L_B)``, 25 λ points, train and test) for

- naive interpolation of A and B,
- A and π(B) with π from weight matching (data-free),
- A and π(B) with π from activation matching (train-set activations),
- optionally (``--ste``) the straight-through estimator,

plus the mid-point accuracy, REPAIR at the mid-point (Jordan et al. 2023), and
``max|f(B) − f(π(B))|`` on the test set (π(B) must compute the same function). It prints a table,
writes ``examples/out/rebasin_digits.json`` and a plot of test loss along λ,
``examples/out/rebasin_digits.png``.

Run: ``.venv/bin/python examples/rebasin_digits.py [--widths 128 512] [--epochs 60] [--ste]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge.rebasin.evaluation import evaluate, interpolate, loss_barrier, repair
from merge.rebasin.matching import activation_matching, ste_matching, weight_matching
from merge.symmetry import apply_permutation, mlp_spec  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits / 16, shuffled with ``seed``, 1437 train / 360 test, standardised with train statistics."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[idx], y[idx]
    xtr, ytr, xte, yte = x[:1437], y[:1437], x[1437:], y[1437:]
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    return (xtr - mu) / sd, ytr, (xte - mu) / sd, yte


def make_mlp(width: int, depth: int = 2, seed: int | None = None) -> nn.Sequential:
    if seed is not None:
        torch.manual_seed(seed)
    dims = [64] + [width] * depth + [10]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1])
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


Batch = tuple[torch.Tensor, torch.Tensor]


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int | None = None) -> list[Batch]:
    idx = (
        torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        if seed is not None
        else torch.arange(len(x))
    )
    return [(x[idx[i : i + size]], y[idx[i : i + size]]) for i in range(0, len(x), size)]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float = 1e-3,
    batch: int = 32,
) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for ep in range(epochs):
        for xb, yb in batches(x, y, batch, seed=seed * 100003 + ep):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    return model


def run_width(
    width: int,
    *,
    epochs: int = 60,
    depth: int = 2,
    steps: int = 25,
    ste: bool = False,
    ste_epochs: int = 20,
    seeds: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Train A and B at one width; barriers for naive / weight matching / activation matching (/ STE)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    xtr, ytr, xte, yte = load_data(0)
    t0 = time.perf_counter()
    model_a = train(make_mlp(width, depth, seeds[0]), xtr, ytr, epochs=epochs, seed=seeds[0])
    model_b = train(make_mlp(width, depth, seeds[1]), xtr, ytr, epochs=epochs, seed=seeds[1])
    t_train = time.perf_counter() - t0
    a = {k: v.detach().clone() for k, v in model_a.state_dict().items()}
    b = {k: v.detach().clone() for k, v in model_b.state_dict().items()}
    spec = mlp_spec(a)
    train_b = batches(xtr, ytr, 256)
    test_b = batches(xte, yte, 360)

    def model_fn(state: dict[str, torch.Tensor]) -> nn.Module:
        m = make_mlp(width, depth)
        m.load_state_dict(state)
        return m.eval()

    def barriers(b_state: dict[str, torch.Tensor]) -> dict[str, Any]:
        tr = loss_barrier(model_fn, a, b_state, train_b, steps)
        te = loss_barrier(model_fn, a, b_state, test_b, steps)
        mid = len(te.lambdas) // 2
        # REPAIR at the mid-point: rescale hidden channels to the interpolated endpoint statistics
        merged = model_fn(interpolate(a, b_state, 0.5))
        repair(merged, model_a, model_fn(b_state), train_b, 0.5)
        rep_loss, rep_acc = evaluate(merged, test_b)
        # the barrier's max includes the endpoints: once the path has no bump it only measures
        # ½|L_A − L_B|; the height above the chord, max_λ L(λ) − ((1-λ)L_A + λL_B), keeps resolving
        chord = max(
            lo - ((1 - lam) * te.losses[0] + lam * te.losses[-1])
            for lam, lo in zip(te.lambdas, te.losses, strict=True)
        )
        return {
            "train_barrier": tr.barrier,
            "test_barrier": te.barrier,
            "test_height_above_chord": chord,
            "test_losses": te.losses,
            "test_accuracies": te.accuracies,
            "train_losses": tr.losses,
            "mid_test_acc": te.accuracies[mid] if te.accuracies else None,
            "mid_test_loss": te.losses[mid],
            "mid_test_loss_repair": rep_loss,
            "mid_test_acc_repair": rep_acc,
        }

    with torch.no_grad():
        ref_b = model_b(xte)

    def preserved(perms: dict[str, torch.Tensor]) -> float:
        pb = apply_permutation(spec, b, perms)
        with torch.no_grad():
            return float((model_fn(pb)(xte) - ref_b).abs().max())

    out: dict[str, Any] = {"width": width, "depth": depth, "epochs": epochs, "train_seconds": t_train}
    out["endpoint_test_acc"] = [evaluate(model_a, test_b)[1], evaluate(model_b, test_b)[1]]
    out["naive"] = barriers(b)
    wm = weight_matching(spec, a, b, seed=0)
    out["weight_matching"] = {
        **barriers(apply_permutation(spec, b, wm.perms)),
        "seconds": wm.seconds,
        "iterations": wm.iterations,
        "max_abs_dfB": preserved(wm.perms),
    }
    am = activation_matching(model_a, model_b, train_b, spec=spec)
    out["activation_matching"] = {
        **barriers(apply_permutation(spec, b, am.perms)),
        "seconds": am.seconds,
        "max_abs_dfB": preserved(am.perms),
    }
    if ste:
        st = ste_matching(
            make_mlp(width, depth), spec, a, b, batches(xtr, ytr, 256, seed=7), epochs=ste_epochs
        )
        out["ste"] = {
            **barriers(apply_permutation(spec, b, st.perms)),
            "seconds": st.seconds,
            "max_abs_dfB": preserved(st.perms),
        }
    out["lambdas"] = [i / (steps - 1) for i in range(steps)]
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for key, label in (
            ("naive", "naive"),
            ("weight_matching", "weight matching"),
            ("activation_matching", "activation matching"),
            ("ste", "STE"),
        ):
            if key in r:
                ax.plot(r["lambdas"], r[key]["test_losses"], marker=".", label=label)
        ax.set_title(f"MLP 64-{r['width']}-{r['width']}-10, digits")
        ax.set_xlabel("λ  (0 = model A, 1 = model B)")
        ax.set_ylabel("test loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--ste", action="store_true", help="also run the straight-through estimator (slower)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    results = [
        run_width(w, epochs=args.epochs, depth=args.depth, steps=args.steps, ste=args.ste)
        for w in args.widths
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rebasin_digits.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "rebasin_digits.png")
    methods = [m for m in ("naive", "weight_matching", "activation_matching", "ste") if m in results[0]]
    print(
        f"{'width':>5} {'method':<20} {'train barrier':>13} {'test barrier':>12} {'ratio':>6} "
        f"{'above chord':>11} "
        f"{'mid acc':>7} {'mid acc REPAIR':>14} {'max|f(B)-f(πB)|':>15} {'match s':>8}"
    )
    for r in results:
        naive = r["naive"]["test_barrier"]
        for m in methods:
            x = r[m]
            ratio = naive / x["test_barrier"] if x["test_barrier"] > 0 else float("inf")
            print(
                f"{r['width']:>5} {m:<20} {x['train_barrier']:>13.4f} {x['test_barrier']:>12.4f} "
                f"{ratio:>6.2f} "
                f"{x['test_height_above_chord']:>11.4f} "
                f"{x['mid_test_acc']:>7.3f} {x['mid_test_acc_repair']:>14.3f} "
                f"{x.get('max_abs_dfB', 0.0):>15.2e} {x.get('seconds', 0.0):>8.3f}"
            )
        print(
            f"{r['width']:>5} endpoints test acc {r['endpoint_test_acc']}; "
            f"training took {r['train_seconds']:.1f} s"
        )
    print(f"wrote {args.out / 'rebasin_digits.json'} and {args.out / 'rebasin_digits.png'}")
    return results


if __name__ == "__main__":
    main()
