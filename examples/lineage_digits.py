"""Neural Lineage on sklearn digits: which parent a fine-tune came from, learning-free and learned.

Reproduces the qualitative claims of Yu & Wang, "Neural Lineage" (CVPR 2024) on an offline zoo
(:mod:`metanets.lineage.zoo`: 4 roots, 12 sibling parents, 48 children with new heads and four
fine-tuning budgets, 24 grandchildren; MLP 64-64-64-5):

1. lineage is detectable far above chance (1/12) without data, and the nearest root is found;
2. across generations: grandchild→grandparent is harder than child→parent for representation
   methods (the paper's Table 1 trend);
3. the paper's first-order fine-tuning approximation of the L2 representation distance is on par
   with plain L2 at the released α = 0.01 and collapses at α = 1 (the expansion overshoots), while
   the full linearised distance (``torch.func.jvp``) does not need a small α;
4. the learned detector (``--detector``, trained with ``metanets.lineage.learned.train_detector`` on
   the seed-0 zoo) matches or beats the learning-free representation methods.

Also shown: the issue's baseline (median relative weight distance), our ``weights`` score (nuclear
norms of per-tensor differences) and accuracy by fine-tuning budget. Writes
``examples/out/lineage_digits.json``, ``lineage_digits.png`` (accuracy by method and task, and by
budget) and the family tree of one child (``lineage_tree.png`` / ``.svg``).

Run: ``.venv/bin/python examples/lineage_digits.py [--seed 1] [--detector bench/out/lineage/detector-mlp.safetensors]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge.checkpoint import StateDictSource  # noqa: E402
from metanets.lineage import detect_lineage  # noqa: E402
from metanets.lineage.probe import probe_distances  # noqa: E402
from metanets.lineage.stats import head_tensors, pair_tensors  # noqa: E402
from metanets.lineage.zoo import ZooConfig, build_lineage_zoo, build_model, probe_inputs  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def median_rel_top1(child: dict[str, torch.Tensor], cands: dict[str, dict[str, torch.Tensor]]) -> str:
    shapes = {k: tuple(v.shape) for k, v in child.items()}
    heads = head_tensors(list(shapes), shapes)
    best, best_s = "", float("inf")
    for n, sd in cands.items():
        shared = pair_tensors(StateDictSource(child), StateDictSource(sd), heads=heads).shared
        s = statistics.median(float((child[k] - sd[k]).norm() / sd[k].norm()) for k in shared)
        if s < best_s:
            best, best_s = n, s
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--detector", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    zoo = build_lineage_zoo(ZooConfig(seed=a.seed), OUT / f"lineage_zoo_s{a.seed}")
    print(f"zoo: {len(zoo.members)} models in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    s = {n: zoo.state(n) for n in zoo.names()}
    x = probe_inputs("mlp", 128, seed=a.seed)

    def feats(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
        m = build_model("mlp")
        m.load_state_dict(sd)
        return m[:2]  # the first hidden layer, post-ReLU

    tasks = {
        "child→parent": (zoo.names(3), zoo.names(2), lambda q: zoo.parent(q)),
        "child→grandparent": (zoo.names(3), zoo.names(1), lambda q: zoo.ancestors(q)[1]),
        "grandchild→grandparent": (zoo.names(4), zoo.names(2), lambda q: zoo.ancestors(q)[1]),
    }
    methods = [
        "median-rel (baseline)",
        "weights",
        "probe l2",
        "probe first-order α=0.01",
        "probe first-order α=1",
        "probe linearised α=1",
        "probe 1−CKA",
    ]
    if a.detector:
        methods.append("learned")
    acc: dict[str, dict[str, float]] = {m: {} for m in methods}
    by_budget: dict[str, dict[int, list[bool]]] = {m: {} for m in methods}
    for task, (queries, cands, target) in tasks.items():
        hits: dict[str, list[bool]] = {m: [] for m in methods}
        for q in queries:
            cs = {c: s[c] for c in cands}
            top = {
                "median-rel (baseline)": median_rel_top1(s[q], cs),
                "weights": detect_lineage(s[q], cs).ranking()[0],
            }
            probe: dict[str, dict[str, float]] = {}
            for c in cands:
                d = probe_distances(s[q], s[c], feats, x, alpha=1.0)
                d1 = probe_distances(s[q], s[c], feats, x, alpha=1.0, alpha_first_order=1.0)
                probe[c] = {
                    "probe l2": d["l2"],
                    "probe first-order α=0.01": d["first_order"],
                    "probe first-order α=1": d1["first_order"],
                    "probe linearised α=1": d["linearized"],
                    "probe 1−CKA": d["cka"],
                }
            for m in methods[2:7]:
                top[m] = min(cands, key=lambda c, m=m: (probe[c][m], c))
            if a.detector:
                top["learned"] = detect_lineage(s[q], cs, method="learned", detector=a.detector).ranking()[0]
            for m in methods:
                hits[m].append(top[m] == target(q))
                if task == "child→parent":
                    by_budget[m].setdefault(int(q.rsplit("c", 1)[1]), []).append(top[m] == target(q))
        for m in methods:
            acc[m][task] = sum(hits[m]) / len(hits[m])
        print(f"{task}: " + ", ".join(f"{m} {acc[m][task]:.3f}" for m in methods), file=sys.stderr)

    budgets = [f"{b.steps} steps @ {b.lr:g}" for b in zoo.config.child_budgets]
    budget_acc = {m: {budgets[k]: sum(v) / len(v) for k, v in sorted(by_budget[m].items())} for m in methods}
    child = zoo.names(3)[-1]
    r = detect_lineage(s[child], {c: s[c] for c in zoo.names(1) + zoo.names(2)}, child_name=child)
    r.render_tree(OUT / "lineage_tree.png")
    r.render_tree(OUT / "lineage_tree.svg")

    header = "| method | " + " | ".join(tasks) + " |"
    print(header)
    print("|" + "---|" * (len(tasks) + 1))
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{acc[m][t]:.3f}" for t in tasks) + " |")
    print("\nchild→parent by fine-tuning budget:")
    print("| method | " + " | ".join(budgets) + " |")
    print("|" + "---|" * (len(budgets) + 1))
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{budget_acc[m][b]:.3f}" for b in budgets) + " |")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax1.bar([j + i * width for j in range(len(tasks))], [acc[m][t] for t in tasks], width, label=m)
        ax2.plot(budgets, [budget_acc[m][b] for b in budgets], marker="o", label=m)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], list(tasks))
    ax1.axhline(1 / 12, color="grey", ls=":", lw=1)
    ax1.set_ylabel("top-1 accuracy")
    ax1.set_title(f"lineage detection, digits MLP zoo (seed {a.seed}); dotted: chance 1/12")
    ax1.legend(fontsize=7)
    ax2.set_title("child→parent by the child's fine-tuning budget")
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(OUT / "lineage_digits.png", dpi=120)
    (OUT / "lineage_digits.json").write_text(
        json.dumps(
            {
                "seed": a.seed,
                "accuracy": acc,
                "by_budget": budget_acc,
                "seconds": time.perf_counter() - t0,
                "member_accuracy": {
                    g: statistics.mean(zoo.members[n].accuracy for n in zoo.names(g)) for g in (1, 2, 3, 4)
                },
            },
            indent=2,
        )
    )
    print(
        f"\nwrote {OUT / 'lineage_digits.png'}, lineage_tree.png/.svg, lineage_digits.json", file=sys.stderr
    )


if __name__ == "__main__":
    main()
