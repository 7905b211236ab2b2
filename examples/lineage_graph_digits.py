"""The whole model tree of a pool, with merges: weightsmith's model graph beside MoTHer's recipe.

MoTHer (Horwitz, Shul, Hoshen, "On the Origin of Llamas: Model Tree Heritage Recovery", 2024) claims
that weight distances plus a kurtosis direction, solved as a minimum spanning arborescence, recover
who was fine-tuned from whom. On an offline digits zoo with merges (:mod:`metanets.lineage.zoo`,
``merges=True``: per family a root, 3 fine-tunes, 4 children each, grandchildren of two of them and 3 merges:
linear, TIES, DARE) this example checks:

1. the direction of recovered fine-tune edges: weightsmith's, calibrated per family on the leaves of
   the tree, against MoTHer's kurtosis rule as published (kurtosis falls from parent to child) and
   flipped;
2. edge recall of the recovered tree: weightsmith's model graph against MoTHer's recipe (given the
   true families, which its code takes as input);
3. merges: recognised as merges of their true components, with shares, where MoTHer has no merge
   node at all.

Writes ``examples/out/lineage_graph_digits.json`` and the picture of one family
(``lineage_graph.png`` / ``.svg``: fine-tune arrows with their confidence, merges as joins).

Run: ``.venv/bin/python examples/lineage_graph_digits.py [--seed 0] [--out examples/out]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metanets.lineage import recover_model_graph  # noqa: E402
from metanets.lineage.mother import mother_tree  # noqa: E402
from metanets.lineage.zoo import ZooConfig, build_lineage_zoo  # noqa: E402


def main(seed: int = 0, out: Path | None = None) -> dict[str, Any]:
    out = Path(out or Path(__file__).resolve().parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = ZooConfig(roots=2, merges=True, seed=seed)  # the bench zoo (bench/lineage_graph.py), two families
    z = build_lineage_zoo(cfg, out / f"lineage_graph_zoo-s{seed}", progress=None)
    states = {n: z.state(n) for n in z.members}
    print(f"zoo: {len(states)} models in {time.perf_counter() - t0:.0f} s")
    g = recover_model_graph(states)
    ours = z.edge_scores({e.child: e.parent for e in g.edges if e.kind == "fine-tune"})
    families = [[n for n, m in z.members.items() if m.root == r] for r in z.names(1)]
    theirs = z.edge_scores(mother_tree(states, families))  # a merge's one parent counts as a wrong edge
    flipped = z.edge_scores(mother_tree(states, families, rev=True))
    true_merges = z.merge_shares()
    found = {n: dict(g.merges[n].components) for n in true_merges if n in g.merges}
    exact = [n for n in found if set(found[n]) == set(true_merges[n])]
    res = {
        "seed": seed,
        "models": len(states),
        "weightsmith": ours,
        "mother": theirs,
        "mother_flipped": flipped,
        "merges": {
            "true": len(true_merges),
            "found_with_exact_components": len(exact),
            "false": len(set(g.merges) - set(true_merges)),
            "shares": {n: {"found": found[n], "true": true_merges[n]} for n in exact},
        },
        "calibration": g.params["calibration"],
    }
    print(f"{'':24}{'edge recall':>12}{'precision':>11}{'direction':>11}")
    for name, r in (("weightsmith", ours), ("MoTHer (published rule)", theirs), ("MoTHer (kurtosis flipped)", flipped)):
        print(f"{name:24}{r['edge_recall']:>12.3f}{r['edge_precision']:>11.3f}{r['direction']:>11.3f}")
    print(f"merges: {len(exact)}/{len(true_merges)} recognised with their exact components, "
          f"{res['merges']['false']} false; MoTHer has no merge nodes")
    fam0 = {n: states[n] for n in families[0]}
    picture = recover_model_graph(fam0)
    picture.render(out / "lineage_graph.png", overwrite=True, title=f"model graph of family {z.names(1)[0]}")
    picture.render(out / "lineage_graph.svg", overwrite=True)
    (out / "lineage_graph_digits.json").write_text(json.dumps(res, indent=1, default=str))
    res["seconds"] = time.perf_counter() - t0
    print(f"picture: {out / 'lineage_graph.png'} (+ .svg); {res['seconds']:.0f} s in all")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    main(a.seed, a.out)
