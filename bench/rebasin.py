"""Benchmark: weightsmith weight matching vs. the PyPI package ``rebasin`` vs. a plain numpy loop.

The same pairs of models go to three implementations of Git Re-Basin weight matching
(permutation coordinate descent, Ainsworth et al. ICLR 2023, Algorithm 1):

- ``weightsmith``: :func:`merge.methods.rebasin.weight_matching` (torch float32 matmuls, scipy LAP,
  cached cost terms, skipping units whose neighbours did not change, relative tolerance);
- ``numpy``: a straightforward numpy coordinate-descent loop written here, as in the reference
  code: every sweep rebuilds every cost matrix, adopts each LAP answer, stops on the absolute
  ``1e-12`` progress test (float32 matmuls, scipy LAP, same sweep-order generator as ours);
- ``rebasin`` (PyPI 0.0.47, snimu): ``PermutationCoordinateDescent(...).rebasin()``, run in its own
  virtualenv ``bench/.venv-rebasin`` (created on first use: ``pip install rebasin==0.0.47
  torch==2.13.0``), timed from construction (which traces the model) to the end of ``rebasin()``.

Models: MLPs 784 → w → w → 10 and a CIFAR-style ResNet-20 (width 16, BatchNorm with random
statistics). ``independent``: two independent He/Kaiming inits (the hard case: 10–30 sweeps).
``related``: B = σ(A) + noise (noise std = ½ · weight std per tensor; a fine-tuned sibling seen
through a random permutation; few sweeps, large widths affordable on a CPU).

For each tool: wall time, sweeps, the objective ``Σ_k <θ_A[k], π(θ_B)[k]>`` over the spec's
tensors (computed by us on each tool's output), and ``max|f(B) − f(π(B))|`` in eval mode (the
``rebasin`` package does not permute BatchNorm running statistics). Prints a table, writes
``bench/out/rebasin.json``.

Run: ``.venv/bin/python bench/rebasin.py [--widths 256 512 1024 2048 4096] [--skip-peer]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# One BLAS/torch thread per tool by default (BENCH_THREADS=n to change): on a shared CPU,
# oversubscribed BLAS threads make timings swing by 10×. Set before numpy is imported.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, str(THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
VENV = ROOT / "bench" / ".venv-rebasin"


# ---------------------------------------------------------------------------------------------
# models (plain torch: also imported by the peer worker inside the rebasin virtualenv)
# ---------------------------------------------------------------------------------------------


def make_mlp(width: int, depth: int = 2, d_in: int = 784, d_out: int = 10) -> nn.Sequential:
    dims = [d_in] + [width] * depth + [d_out]
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(o)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-20 (3 stages × 3 blocks) with BatchNorm."""

    def __init__(self, w: int = 16, n: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(*[Block(w, w, 1) for _ in range(n)])
        self.layer2 = nn.Sequential(Block(w, 2 * w, 2), *[Block(2 * w, 2 * w, 1) for _ in range(n - 1)])
        self.layer3 = nn.Sequential(Block(2 * w, 4 * w, 2), *[Block(4 * w, 4 * w, 1) for _ in range(n - 1)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(self.conv1(x)))
        o = self.layer3(self.layer2(self.layer1(o)))
        return self.linear(self.flatten(self.pool(o)))


def build(arch: str, width: int) -> nn.Module:
    return make_mlp(width) if arch == "mlp" else ResNet(width)


def example_input(arch: str, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, 784, generator=g) if arch == "mlp" else torch.randn(n, 3, 32, 32, generator=g)


def random_model(arch: str, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = build(arch, width)
    g = torch.Generator().manual_seed(seed + 1000)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(0.5 * torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            with torch.no_grad():
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.num_features, generator=g))
                mod.bias.copy_(0.5 * torch.randn(mod.num_features, generator=g))
    return m.eval()


# ---------------------------------------------------------------------------------------------
# the peer (runs inside bench/.venv-rebasin, imports only torch and rebasin)
# ---------------------------------------------------------------------------------------------


def peer(job_path: str) -> None:
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # this file is also "rebasin"
    sys.modules.pop("rebasin", None)
    from rebasin import PermutationCoordinateDescent

    job = torch.load(job_path, weights_only=False)
    torch.set_num_threads(job["threads"])
    ma, mb = build(job["arch"], job["width"]), build(job["arch"], job["width"])
    ma.load_state_dict(job["a"])
    mb.load_state_dict(job["b"])
    ma.eval()
    mb.eval()
    x = job["x"]
    best = None
    for _ in range(job["repeats"]):
        mb.load_state_dict(job["b"])  # rebasin() permutes model_b in place
        t0 = time.perf_counter()
        pcd = PermutationCoordinateDescent(ma, mb, x)
        t1 = time.perf_counter()
        pcd.rebasin(max_iterations=100)
        t2 = time.perf_counter()
        if best is None or t2 - t0 < best[0]:
            best = (t2 - t0, t1 - t0)
    assert best is not None
    torch.save(
        {
            "b": {k: v.detach().clone() for k, v in mb.state_dict().items()},
            "seconds": best[0],
            "trace_seconds": best[1],
        },
        job["out"],
    )


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    ok = subprocess.run([str(py), "-c", "import rebasin, torch"], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "rebasin==0.0.47", "torch==2.13.0"], check=True
        )
    return py


def run_peer(
    py: Path,
    arch: str,
    width: int,
    a: dict,
    b: dict,
    x: torch.Tensor,
    threads: int,
    tmp: Path,
    timeout: int,
    repeats: int,
) -> dict[str, Any]:
    job = tmp / f"job_{arch}_{width}.pt"
    out = tmp / f"res_{arch}_{width}.pt"
    torch.save(
        {
            "arch": arch,
            "width": width,
            "a": a,
            "b": b,
            "x": x,
            "out": str(out),
            "threads": threads,
            "repeats": repeats,
        },
        job,
    )
    env = dict(os.environ, PYTHONPATH="")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(py), __file__, "--peer", str(job)], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s", "seconds": time.perf_counter() - t0}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return torch.load(out, weights_only=False)


# ---------------------------------------------------------------------------------------------
# the plain numpy loop (the reference algorithm, no caching, no skipping)
# ---------------------------------------------------------------------------------------------


def numpy_weight_matching(
    axes_to_perm: dict[str, tuple],
    sizes: dict[str, int],
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], int]:
    from scipy.optimize import linear_sum_assignment

    perm_to_axes: dict[str, list[tuple[str, int]]] = {}
    for k, axes in axes_to_perm.items():
        for ax, p in enumerate(axes):
            if p is not None:
                perm_to_axes.setdefault(p, []).append((k, ax))
    names = list(perm_to_axes)
    perm = {p: np.arange(sizes[p]) for p in names}
    rng = np.random.default_rng([seed, 0])
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        progress = False
        for pi in rng.permutation(len(names)):
            p = names[pi]
            n = sizes[p]
            c = np.zeros((n, n), dtype=np.float32)
            for k, ax in perm_to_axes[p]:
                wa = np.moveaxis(a[k], ax, 0).reshape(n, -1)
                wb = b[k]
                for j, q in enumerate(axes_to_perm[k]):
                    if q is not None and j != ax:
                        wb = np.take(wb, perm[q], axis=j)
                wb = np.moveaxis(wb, ax, 0).reshape(n, -1)
                c += wa @ wb.T
            ri, ci = linear_sum_assignment(c, maximize=True)
            old = float(np.sum(c[np.arange(n), perm[p]], dtype=np.float64))
            new = float(np.sum(c[np.arange(n), ci], dtype=np.float64))
            if new > old + 1e-12:
                progress = True
            perm[p] = ci
        if not progress:
            break
    return perm, it


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def related(spec: Any, a: dict[str, torch.Tensor], seed: int, noise: float) -> dict[str, torch.Tensor]:
    from merge.symmetry import apply_permutation

    g = torch.Generator().manual_seed(seed)
    noisy = {
        k: (v + noise * v.std() * torch.randn(v.shape, generator=g))
        if v.is_floating_point() and v.numel() > 1
        else v.clone()
        for k, v in a.items()
    }
    return apply_permutation(spec, noisy, spec.random_perms(g))


def objective(spec: Any, a: dict[str, torch.Tensor], pb: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() * pb[k].double()).sum() for k in spec.permuted_tensors()))


def preserved(
    arch: str, width: int, b: dict[str, torch.Tensor], pb: dict[str, torch.Tensor], x: torch.Tensor
) -> float:
    mb, mp = build(arch, width), build(arch, width)
    mb.load_state_dict(b)
    mp.load_state_dict(pb)
    with torch.no_grad():
        return float((mb.eval()(x) - mp.eval()(x)).abs().max())


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` runs (the machine is shared: the minimum is the least disturbed run)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_case(
    arch: str, width: int, kind: str, *, py: Path | None, threads: int, tmp: Path, timeout: int, repeats: int
) -> dict[str, Any]:
    from merge.rebasin.matching import weight_matching
    from merge.symmetry import apply_permutation, build_spec

    ma = random_model(arch, width, 0)
    a = {k: v.detach().clone() for k, v in ma.state_dict().items()}
    spec = build_spec(arch, a)
    if kind == "independent":
        b = {k: v.detach().clone() for k, v in random_model(arch, width, 1).state_dict().items()}
    else:
        b = related(spec, a, 7, 0.5)
    x = example_input(arch)
    row: dict[str, Any] = {
        "arch": arch,
        "width": width,
        "case": kind,
        "params": sum(v.numel() for v in a.values() if v.is_floating_point()),
    }

    an = {k: spec_view(spec, k, v).numpy().astype(np.float32) for k, v in a.items() if k in spec.axes_to_perm}
    bn = {k: spec_view(spec, k, v).numpy().astype(np.float32) for k, v in b.items() if k in spec.axes_to_perm}
    # interleave the two in-process tools so both see the same load on a shared machine
    t_ws = t_np = float("inf")
    for _ in range(repeats):
        t, ws = timed(lambda: weight_matching(spec, a, b, seed=0), 1)
        t_ws = min(t_ws, t)
        t, (perms, sweeps) = timed(
            lambda: numpy_weight_matching(spec.axes_to_perm, spec.sizes, an, bn, seed=0), 1
        )
        t_np = min(t_np, t)
    pb = apply_permutation(spec, b, ws.perms)
    row["weightsmith"] = {
        "seconds": t_ws,
        "sweeps": ws.iterations,
        "objective": objective(spec, a, pb),
        "max_abs_df": preserved(arch, width, b, pb, x),
        "solves": ws.solves,
        "skipped": ws.skipped,
    }

    pb = apply_permutation(spec, b, {p: torch.from_numpy(v) for p, v in perms.items()})
    row["numpy"] = {
        "seconds": t_np,
        "sweeps": sweeps,
        "objective": objective(spec, a, pb),
        "max_abs_df": preserved(arch, width, b, pb, x),
    }

    if py is not None:
        peer_repeats = repeats if width <= 1024 or arch == "resnet" else 1
        res = run_peer(py, arch, width, a, b, x, threads, tmp, timeout, peer_repeats)
        if "error" in res:
            row["rebasin"] = {"error": res["error"], "seconds": res.get("seconds")}
        else:
            pb = res["b"]
            row["rebasin"] = {
                "seconds": res["seconds"],
                "trace_seconds": res["trace_seconds"],
                "objective": objective(spec, a, pb),
                "max_abs_df": preserved(arch, width, b, pb, x),
            }
    row["identity_objective"] = objective(spec, a, b)
    return row


def spec_view(spec: Any, name: str, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(spec.view_shape(name)) if name in spec.shapes else t


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 2048, 4096],
        help="MLP widths for the 'related' case",
    )
    ap.add_argument(
        "--independent-widths",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 2048],
        help="MLP widths for the 'independent' case (many sweeps: costly beyond 2048 on a CPU)",
    )
    ap.add_argument("--resnet-width", type=int, default=16)
    ap.add_argument("--skip-peer", action="store_true", help="do not run the rebasin package")
    ap.add_argument(
        "--timeout", type=int, default=900, help="seconds allowed to the rebasin package per case"
    )
    ap.add_argument(
        "--threads", type=int, default=THREADS, help="torch threads (BLAS threads: BENCH_THREADS)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (best time kept) for small cases")
    ap.add_argument("--repeat-max-width", type=int, default=1024, help="larger MLPs are run twice")
    args = ap.parse_args(argv)
    if args.peer:
        peer(args.peer)
        return []
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "tmp"
    tmp.mkdir(exist_ok=True)
    py = None if args.skip_peer else ensure_venv()
    cases = [("mlp", w, "independent") for w in args.independent_widths]
    cases += [("resnet", args.resnet_width, "independent")]
    cases += [("mlp", w, "related") for w in args.widths]
    # warm up torch and BLAS so the first timed case pays no one-time costs
    from merge.rebasin.matching import weight_matching
    from merge.symmetry import build_spec

    wa, wb = random_model("mlp", 64, 0).state_dict(), random_model("mlp", 64, 1).state_dict()
    weight_matching(build_spec("mlp", wa), wa, wb)
    rows = []
    hdr = (
        f"{'model':<7}{'width':>6} {'case':<12}{'tool':<12}{'seconds':>9}{'sweeps':>7}{'objective':>14}"
        f"{'Δobj vs best':>13}{'max|f(B)-f(πB)|':>16}"
    )
    print(hdr)
    for arch, w, kind in cases:
        repeats = args.repeat if (arch == "resnet" or w <= args.repeat_max_width) else 2
        row = bench_case(
            arch, w, kind, py=py, threads=args.threads, tmp=tmp, timeout=args.timeout, repeats=repeats
        )
        row["repeats"] = repeats
        rows.append(row)
        tools = [t for t in ("weightsmith", "numpy", "rebasin") if t in row]
        best = max(row[t].get("objective", -np.inf) for t in tools)
        for t in tools:
            r = row[t]
            r["speedup_vs_weightsmith"] = (
                r["seconds"] / row["weightsmith"]["seconds"] if "seconds" in r and r["seconds"] else None
            )
            if "error" in r:
                print(f"{arch:<7}{w:>6} {kind:<12}{t:<12}  error: {r['error']}")
                continue
            print(
                f"{arch:<7}{w:>6} {kind:<12}{t:<12}{r['seconds']:>9.3f}{r.get('sweeps', ''):>7}"
                f"{r['objective']:>14.2f}{r['objective'] - best:>13.3g}{r['max_abs_df']:>16.2e}"
            )
        (OUT / "rebasin.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {OUT / 'rebasin.json'}")
    return rows


if __name__ == "__main__":
    main()
