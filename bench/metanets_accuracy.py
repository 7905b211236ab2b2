"""Benchmark: accuracy prediction and task identification from weights; zoo and training throughput.

Runs the full experiment of ``examples/predict_accuracy.py`` (zoos A, B, C; GMN, UNF, StatNN with an
MLP and with gradient-boosted trees, flat MLP with and without permutation augmentation, DeepSets; the
same training budget; 5 %, 25 % and 100 % of the training runs) and adds:

- zoo generation throughput, models/s, local processes vs a Dask ``LocalCluster`` on 127.0.0.1 (same
  config, same run, the zoos compared byte for byte);
- metanet training throughput (graphs/s, best epoch) from the training histories;
- whether each ordering of the literature reproduces (GMN ≥ StatNN on accuracy prediction; GMN ≥ 0.95 on
  task identification; on the heterogeneous zoo GMN above StatNN), stated as measured.

Prints tables, writes ``bench/out/metanets_accuracy.json``.
Run: ``.venv/bin/python bench/metanets_accuracy.py [--quick] [--workers 2]`` (full: about an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def zoo_throughput(runs: int, workers: int, tmp: Path) -> dict[str, Any]:
    from distributed import LocalCluster

    from examples.predict_accuracy import zoo_a
    from metanets.zoo import build_zoo

    cfg = dict(zoo_a(runs, seed=11), name="throughput")
    res: dict[str, Any] = {"runs": runs, "workers": workers}
    shutil.rmtree(tmp, ignore_errors=True)
    s = build_zoo(cfg, tmp / "local", workers=workers, progress=False)
    res["local_models"] = s.models
    res["local_seconds"] = s.seconds
    res["local_models_per_s"] = s.models / s.seconds
    with LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as c:
        t0 = time.perf_counter()
        s = build_zoo(cfg, tmp / "dask", scheduler=c.scheduler_address, progress=False)
        res["dask_seconds"] = time.perf_counter() - t0
    res["dask_models_per_s"] = s.models / res["dask_seconds"]
    res["identical_bytes"] = _hashes(tmp / "local") == _hashes(tmp / "dask")
    print(f"[zoo throughput] local {res['local_models_per_s']:.2f} models/s, dask {res['dask_models_per_s']:.2f} "
          f"models/s, identical: {res['identical_bytes']}", flush=True)  # fmt: skip
    return res


def orderings(tables: dict[str, Any]) -> dict[str, Any]:
    t1, t2, t3 = tables.get("T1", {}), tables.get("T2", {}), tables.get("T3", {})
    tau = lambda t, k: t[k]["metrics"]["kendall_tau"] if k in t else None  # noqa: E731
    out: dict[str, Any] = {}
    for frac in sorted({k.split("@")[1] for k in t1}):
        g, s, gb = tau(t1, f"gmn@{frac}"), tau(t1, f"statnn@{frac}"), tau(t1, f"statnn_gbt@{frac}")
        f, fa, d = tau(t1, f"flat@{frac}"), tau(t1, f"flat_aug@{frac}"), tau(t1, f"deepsets@{frac}")
        out[f"T1@{frac}"] = {
            "gmn>=statnn_mlp": None if g is None or s is None else g >= s,
            "gmn>=statnn_gbt": None if g is None or gb is None else g >= gb,
            "statnn>flat": None if s is None or f is None else max(s, gb or s) > f,
            "flat_aug>flat": None if fa is None or f is None else fa > f,
            "flat>deepsets": None if f is None or d is None else f > d,
        }
    if t2:
        g = max((v["metrics"]["kendall_tau"] for k, v in t2.items() if k.startswith("gmn@")), default=None)
        s = max((v["metrics"]["kendall_tau"] for k, v in t2.items() if k.startswith("statnn")), default=None)
        out["T2"] = {"gmn>statnn (best of MLP, GBT)": None if g is None or s is None else g > s}
    if t3:
        out["T3"] = {"gmn>=0.95": t3["gmn"]["metrics"]["accuracy"] >= 0.95 if "gmn" in t3 else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--throughput-runs", type=int, default=40)
    ap.add_argument("--skip-throughput", action="store_true")
    a, rest = ap.parse_known_args()
    from examples import predict_accuracy as ex

    argv = (
        ["--zoo-dir", str(OUT / "zoos"), "--workers", str(a.workers)]
        + (["--quick"] if a.quick else [])
        + rest
    )
    result: dict[str, Any] = {"load_before": os.getloadavg()}
    if not a.skip_throughput:
        result["zoo_throughput"] = zoo_throughput(a.throughput_runs, a.workers, OUT / "zoo-throughput")
    res = ex.main(argv)
    result.update({k: v for k, v in res.items()})
    for t in result["tables"].values():
        for r in t.values():
            r.pop("pred", None)
            r.pop("true", None)
    result["orderings"] = orderings(result["tables"])
    result["load_after"] = os.getloadavg()
    print("\norderings (measured):")
    for k, v in result["orderings"].items():
        print(f"  {k}: {v}")
    train_rows = [(k, r["metrics"].get("graphs_per_s")) for t in result["tables"].values() for k, r in t.items()
                  if r["metrics"].get("graphs_per_s")]  # fmt: skip
    result["training_graphs_per_s"] = dict(train_rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metanets_accuracy.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {OUT / 'metanets_accuracy.json'}")


if __name__ == "__main__":
    main()
