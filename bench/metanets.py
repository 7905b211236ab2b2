"""Benchmark: parameter-graph construction, GMN and UNF speed (UNF side by side with ``nfn``).

Four tables, one JSON (``bench/out/metanets.json``):

1. **graph construction**: ``metanets.graph.build_graph`` on MLPs, plain CNNs (entry and channel mode)
   and LLaMA-shaped transformers from 10^3 to 10^8 weights: seconds, edges/s and the peak extra memory
   of the build (each size in a fresh subprocess: ``ru_maxrss`` after the build minus the RSS before it,
   so the model's own tensors are not counted). The first build in a process pays for touching fresh
   memory (slow on this VM, see bench/README.md); the table's seconds are the second build, the cold
   first one is in the JSON.
2. **GMN** forward+backward per edge per layer (hidden 32, 3 layers, mean aggregation) on batches of
   digits-sized MLP graphs from 10^4 to 10^6 edges (the research pilot measured 0.6 µs forward-only).
3. **UNF vs nfn** on the 64-32-32-10 MLP weight space (the HNP setting, batch 64): two equivariant
   layers of 16 channels with ReLU then invariant pooling — ours (``metanets.unf``) against
   ``nfn.layers.HNPLinear`` + ``HNPPool`` (nfn 0.1.2, the authors' layers), forward and
   forward+backward, interleaved rounds, medians.
4. **equivariance in float32**: relative change of GMN/UNF/StatNN/DeepSets invariant outputs and of
   GMN/UNF equivariant outputs under a random spec permutation, per architecture (the tests check the
   same in float64).

Run: ``.venv/bin/python bench/metanets.py [--max-params 1e8] [--threads 2] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
# this file's name would shadow the `metanets` package: drop bench/ from the path, load _common by file
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("_bench_common", REPO / "bench" / "_common.py")
_common = importlib.util.module_from_spec(_spec)
sys.modules["_bench_common"] = _common
_spec.loader.exec_module(_common)
machine_info, print_table = _common.machine_info, _common.print_table

import torch  # noqa: E402

# ---------------------------------------------------------------------------------------------
# models by size
# ---------------------------------------------------------------------------------------------


def mlp_state(n: int) -> dict[str, torch.Tensor]:
    """Four dense layers of width w with ~n weights (3w² + 64w)."""
    w = max(4, int(((64**2 + 12 * n) ** 0.5 - 64) / 6))
    dims = [32, w, w, w, 10]
    out = {}
    for i in range(4):
        out[f"layers.{i}.weight"] = torch.randn(dims[i + 1], dims[i]) * 0.05
        out[f"layers.{i}.bias"] = torch.zeros(dims[i + 1])
    return out


def cnn_state(n: int) -> dict[str, torch.Tensor]:
    """Four 3×3 convs of c channels (~27c² weights) + a classifier on the pooled channels."""
    c = max(2, int((n / 27) ** 0.5))
    chans = [3, c, c, c, c]
    out = {}
    for i in range(4):
        out[f"features.{i}.weight"] = torch.randn(chans[i + 1], chans[i], 3, 3) * 0.05
        out[f"features.{i}.bias"] = torch.zeros(chans[i + 1])
    out["head.weight"] = torch.randn(10, c) * 0.05
    out["head.bias"] = torch.zeros(10)
    return out


def llama_state(n: int) -> tuple[dict[str, torch.Tensor], int]:
    """LLaMA-shaped (q/k/v/o, gate/up/down, RMSNorm, untied head) with ~n weights; returns (state, heads)."""
    configs = [(16, 1, 64, 2), (32, 2, 256, 4), (64, 4, 1024, 4), (256, 4, 4096, 8), (512, 8, 16000, 8),
               (1024, 8, 32000, 16)]  # fmt: skip

    def total(c: tuple[int, int, int, int]) -> int:
        d, layers, vocab, _ = c
        return layers * (4 * d * d + 3 * d * int(2.6875 * d) + 2 * d) + 2 * vocab * d + d

    d, layers, vocab, heads = next((c for c in configs if total(c) >= n * 0.5), configs[-1])
    inter = int(2.6875 * d)
    g = torch.Generator().manual_seed(0)
    out = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=g) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}."
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{k}.weight"] = torch.randn(d, d, generator=g) * 0.02
        out[p + "mlp.gate_proj.weight"] = torch.randn(inter, d, generator=g) * 0.02
        out[p + "mlp.up_proj.weight"] = torch.randn(inter, d, generator=g) * 0.02
        out[p + "mlp.down_proj.weight"] = torch.randn(d, inter, generator=g) * 0.02
        out[p + "input_layernorm.weight"] = torch.ones(d)
        out[p + "post_attention_layernorm.weight"] = torch.ones(d)
    out["model.norm.weight"] = torch.ones(d)
    out["lm_head.weight"] = torch.randn(vocab, d, generator=g) * 0.02
    return out, heads


def _child_graph(arch: str, n: int, mode: str) -> dict[str, Any]:
    from merge.symmetry import transformer_spec
    from metanets.base import auto_spec
    from metanets.graph import build_graph

    if arch == "llama":
        state, heads = llama_state(n)
        spec = transformer_spec(state, n_heads=heads)
    else:
        state = mlp_state(n) if arch == "mlp" else cnn_state(n)
        spec = auto_spec(state)
    weights = sum(v.numel() for v in state.values())
    build_graph(mlp_state(1000), None)  # warm up the code paths
    rss0 = _rss_kb()
    t0 = time.perf_counter()
    g = build_graph(state, spec, mode=mode, max_edges=10**9)
    cold = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del g
    t0 = time.perf_counter()
    g = build_graph(state, spec, mode=mode, max_edges=10**9)
    dt = time.perf_counter() - t0
    return {
        "cold_seconds": cold,
        "arch": arch,
        "mode": mode,
        "weights": weights,
        "edges": int(g.num_edges),
        "nodes": int(g.num_nodes),
        "seconds": dt,
        "edges_per_s": g.num_edges / dt,
        "peak_extra_mb": max(0, peak - rss0) / 1024,
        "graph_mb": sum(
            v.numel() * v.element_size()
            for v in (g.edge_index, g.edge_value, g.edge_type, g.edge_layer, g.edge_pos)
        )
        / 2**20,
    }


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def graph_table(max_params: float, threads: int) -> list[dict[str, Any]]:
    rows = []
    sizes = [10**k for k in range(3, 9) if 10**k <= max_params]
    for arch, modes in (("mlp", ["entry"]), ("cnn", ["entry", "channel"]), ("llama", ["entry"])):
        for n in sizes:
            if arch == "llama" and n < 10**4:
                continue
            for mode in modes:
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    "graph",
                    "--arch",
                    arch,
                    "--n",
                    str(n),
                    "--mode",
                    mode,
                ]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
                if r.returncode != 0:
                    rows.append({"arch": arch, "mode": mode, "target": n, "error": r.stderr[-400:]})
                    print(f"[graph] {arch} {n:.0e} {mode}: FAILED {r.stderr[-200:]}", flush=True)
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"[graph] {arch:5s} {mode:7s} {row['weights']:>11,} weights {row['edges']:>11,} edges "
                    f"{row['seconds']:.3f} s {row['edges_per_s'] / 1e6:6.1f} M edges/s "
                    f"peak +{row['peak_extra_mb']:.0f} MB",
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------------------------------------
# GMN
# ---------------------------------------------------------------------------------------------


def digits_mlp(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = [64, 32, 32, 10]
    out = {}
    for i in range(3):
        out[f"layers.{i}.weight"] = torch.randn(dims[i + 1], dims[i], generator=g) / dims[i] ** 0.5
        out[f"layers.{i}.bias"] = torch.randn(dims[i + 1], generator=g) * 0.1
    return out


def gmn_table(rounds: int, compiled: bool = False) -> list[dict[str, Any]]:
    from metanets.gmn import GMN

    rows = []
    torch.manual_seed(0)
    eager = GMN(hidden=32, layers=3)
    net = torch.compile(eager, dynamic=True) if compiled else eager
    one = eager.featurize(digits_mlp(0))
    per = one.num_edges
    for target in (10**4, 10**5, 10**6):
        b = max(1, round(target / per))
        batch = eager.collate([eager.featurize(digits_mlp(i)) for i in range(b)])
        y = torch.rand(b, 1)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def step(batch: Any = batch, y: torch.Tensor = y, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(batch), y)
            loss.backward()
            opt.step()

        def fwd(batch: Any = batch) -> None:
            with torch.no_grad():
                net(batch)

        step()
        fwd()
        ts_step, ts_fwd = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            step()
            ts_step.append(time.perf_counter() - t)
            t = time.perf_counter()
            fwd()
            ts_fwd.append(time.perf_counter() - t)
        e = batch.num_edges
        row = {
            "compiled": compiled,
            "graphs": b,
            "edges": int(e),
            "fwd_bwd_s": statistics.median(ts_step),
            "fwd_s": statistics.median(ts_fwd),
            "us_per_edge_layer_fwd_bwd": statistics.median(ts_step) / (e * 3) * 1e6,
            "us_per_edge_layer_fwd": statistics.median(ts_fwd) / (e * 3) * 1e6,
            "graphs_per_s_train": b / statistics.median(ts_step),
        }
        rows.append(row)
        print(
            f"[gmn{' compiled' if compiled else ''}] {e:>9,} edges ({b} graphs): fwd+bwd {row['fwd_bwd_s']:.3f} s = "
            f"{row['us_per_edge_layer_fwd_bwd']:.3f} µs/edge/layer, fwd {row['us_per_edge_layer_fwd']:.3f}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# UNF vs nfn
# ---------------------------------------------------------------------------------------------


def unf_table(rounds: int, batch: int = 64, hidden: int = 16) -> dict[str, Any]:
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
    from nfn.layers import HNPLinear, HNPPool, TupleOp

    from metanets.base import auto_spec
    from metanets.unf import UNFLayer, WeightSpace, _pool

    states = [digits_mlp(i) for i in range(batch)]
    spec = auto_spec(states[0])
    space = WeightSpace(spec)
    feats = {n: torch.stack([space.to_features(s)[n] for s in states]) for n in space.names}
    ours = torch.nn.ModuleList([UNFLayer(space, 1, hidden), UNFLayer(space, hidden, hidden)])

    def ours_fwd() -> torch.Tensor:
        h = feats
        for layer in ours:
            h = {k: torch.relu(v) for k, v in layer(h).items()}
        return _pool(space, h)

    w = tuple(torch.stack([s[f"layers.{i}.weight"] for s in states])[:, None] for i in range(3))
    b = tuple(torch.stack([s[f"layers.{i}.bias"] for s in states])[:, None] for i in range(3))
    wsf = WeightSpaceFeatures(w, b)
    nspec = network_spec_from_wsfeat(wsf)
    theirs = torch.nn.Sequential(
        HNPLinear(nspec, 1, hidden), TupleOp(torch.nn.ReLU()), HNPLinear(nspec, hidden, hidden),
        TupleOp(torch.nn.ReLU()), HNPPool(nspec),
    )  # fmt: skip

    def theirs_fwd() -> torch.Tensor:
        return theirs(wsf)

    res: dict[str, Any] = {
        "batch": batch,
        "hidden": hidden,
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_nfn": sum(p.numel() for p in theirs.parameters()),
    }
    ours_fwd()
    theirs_fwd()
    times: dict[str, list[float]] = {"ours_fwd": [], "nfn_fwd": [], "ours_fwd_bwd": [], "nfn_fwd_bwd": []}
    for _ in range(rounds):
        for name, fn, mod in (("ours", ours_fwd, ours), ("nfn", theirs_fwd, theirs)):
            with torch.no_grad():
                t = time.perf_counter()
                for _ in range(5):
                    fn()
                times[f"{name}_fwd"].append((time.perf_counter() - t) / 5)
            t = time.perf_counter()
            for _ in range(5):
                mod.zero_grad()
                fn().sum().backward()
            times[f"{name}_fwd_bwd"].append((time.perf_counter() - t) / 5)
    for k, v in times.items():
        res[k + "_ms"] = statistics.median(v) * 1e3
    res["fwd_ratio_nfn_over_ours"] = res["nfn_fwd_ms"] / res["ours_fwd_ms"]
    res["fwd_bwd_ratio_nfn_over_ours"] = res["nfn_fwd_bwd_ms"] / res["ours_fwd_bwd_ms"]
    print(
        f"[unf] batch {batch}: ours fwd {res['ours_fwd_ms']:.2f} ms, nfn {res['nfn_fwd_ms']:.2f} ms "
        f"(nfn/ours {res['fwd_ratio_nfn_over_ours']:.2f}); fwd+bwd ours {res['ours_fwd_bwd_ms']:.2f}, "
        f"nfn {res['nfn_fwd_bwd_ms']:.2f} ({res['fwd_bwd_ratio_nfn_over_ours']:.2f})",
        flush=True,
    )
    return res


# ---------------------------------------------------------------------------------------------
# equivariance in float32
# ---------------------------------------------------------------------------------------------


def equivariance_table() -> list[dict[str, Any]]:
    from merge.symmetry import apply_permutation
    from metanets.base import predict_states
    from metanets.baselines import DeepSets, StatNN
    from metanets.gmn import GMN
    from metanets.graph import edges_to_state
    from metanets.unf import UNF
    from testkit.metanet_models import ARCHS, model_and_spec

    rows = []
    for arch in ARCHS:
        state, spec = model_and_spec(arch, torch.float32)
        perms = spec.random_perms(torch.Generator().manual_seed(5))
        permuted = apply_permutation(spec, state, perms)
        fl = {k: v for k, v in state.items() if v.is_floating_point()}
        flp = {k: v for k, v in permuted.items() if v.is_floating_point()}
        torch.manual_seed(0)
        nets = {
            "GMN": GMN(hidden=32, layers=3, io_slots=16, edge_out=1),
            "UNF": UNF(spec, hidden=4, layers=2, edge_out=1),
            "StatNN": StatNN(StatNN.num_features(state, spec)),
            "DeepSets": DeepSets(),
        }
        for name, net in nets.items():
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            net.eval()
            a, b = (fl, flp) if name == "UNF" else (state, permuted)
            y = predict_states(net, [a, b], spec)
            inv = float((y[0] - y[1]).abs().max() / y[0].abs().max())
            eq = None
            with torch.no_grad():
                if name == "GMN":
                    g1, g2 = net.featurize(a, spec), net.featurize(b, spec)
                    want = apply_permutation(
                        spec, edges_to_state(g1, net.equivariant(net.collate([g1]))[0][:, 0]), perms
                    )
                    got = edges_to_state(g2, net.equivariant(net.collate([g2]))[0][:, 0])
                elif name == "UNF":
                    o = net.equivariant(net.collate([net.featurize(a), net.featurize(b)]))
                    want = apply_permutation(spec, {k: v[0] for k, v in o.items()}, perms)
                    got = {k: v[1] for k, v in o.items()}
                if name in ("GMN", "UNF"):
                    num = max(
                        float((want[k] - got[k]).abs().max()) for k in want if want[k].is_floating_point()
                    )
                    den = max(float(want[k].abs().max()) for k in want if want[k].is_floating_point())
                    eq = num / den
            rows.append({"arch": arch, "metanet": name, "invariant_rel": inv, "equivariant_rel": eq})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-params", type=float, default=1e8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the GMN under torch.compile (inductor)")
    ap.add_argument("--skip", default="", help="comma list of tables to skip: graph,gmn,unf,equivariance")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="mlp", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="entry", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child == "graph":
        print(json.dumps(_child_graph(a.arch, a.n, a.mode)))
        return
    skip = set(a.skip.split(",")) - {""}
    result: dict[str, Any] = {"machine": machine_info(), "threads": a.threads, "load_before": os.getloadavg()}
    if "graph" not in skip:
        result["graph"] = graph_table(a.max_params, a.threads)
    if "gmn" not in skip:
        result["gmn"] = gmn_table(a.rounds)
        if a.compile:
            result["gmn"] += gmn_table(a.rounds, compiled=True)
    if "unf" not in skip:
        result["unf"] = unf_table(a.rounds)
    if "equivariance" not in skip:
        result["equivariance"] = equivariance_table()
    result["load_after"] = os.getloadavg()

    if "graph" in result:
        print()
        print_table(
            ["arch", "mode", "weights", "edges", "s", "cold s", "M edges/s", "peak +MB", "graph MB"],
            [
                [r["arch"], r["mode"], f"{r['weights']:,}", f"{r['edges']:,}", f"{r['seconds']:.3f}",
                 f"{r['cold_seconds']:.3f}",
                 f"{r['edges_per_s'] / 1e6:.1f}", f"{r['peak_extra_mb']:.0f}", f"{r['graph_mb']:.0f}"]
                for r in result["graph"] if "error" not in r
            ],
        )  # fmt: skip
    if "gmn" in result:
        print()
        print_table(
            ["GMN", "edges", "graphs", "fwd+bwd s", "µs/edge/layer fwd+bwd", "µs/edge/layer fwd", "graphs/s (train)"],
            [
                ["compiled" if r["compiled"] else "eager", f"{r['edges']:,}", r["graphs"], f"{r['fwd_bwd_s']:.3f}",
                 f"{r['us_per_edge_layer_fwd_bwd']:.3f}", f"{r['us_per_edge_layer_fwd']:.3f}",
                 f"{r['graphs_per_s_train']:.0f}"]
                for r in result["gmn"]
            ],
        )  # fmt: skip
    if "unf" in result:
        u = result["unf"]
        print()
        print_table(
            ["", "ours (metanets.unf)", "nfn 0.1.2 (HNPLinear)", "nfn ÷ ours"],
            [
                ["parameters", u["params_ours"], u["params_nfn"], ""],
                ["forward ms", f"{u['ours_fwd_ms']:.2f}", f"{u['nfn_fwd_ms']:.2f}",
                 f"{u['fwd_ratio_nfn_over_ours']:.2f}"],
                ["fwd+bwd ms", f"{u['ours_fwd_bwd_ms']:.2f}", f"{u['nfn_fwd_bwd_ms']:.2f}",
                 f"{u['fwd_bwd_ratio_nfn_over_ours']:.2f}"],
            ],
        )  # fmt: skip
    if "equivariance" in result:
        print()
        print_table(
            ["arch", "metanet", "invariant rel. change", "equivariant rel. error"],
            [
                [r["arch"], r["metanet"], f"{r['invariant_rel']:.1e}",
                 "" if r["equivariant_rel"] is None else f"{r['equivariant_rel']:.1e}"]
                for r in result["equivariance"]
            ],
        )  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metanets.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {OUT / 'metanets.json'} (load {result['load_before']} -> {result['load_after']})")


if __name__ == "__main__":
    main()
