"""Drawing a :class:`~metanets.lineage.graph_result.ModelGraph` (matplotlib, no pyplot state).

Each family is a top-down tree from its root (fine-tune edges as arrows, labelled with their
confidence); a merge sits one row below its deepest component and its component edges join in it
(dashed purple, labelled with the shares). Families stand side by side, left to right by size.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metanets.lineage.graph_result import ModelGraph


def layout(graph: ModelGraph) -> dict[str, tuple[float, float]]:
    """Node positions: x in leaf slots (depth-first), y = −depth."""
    pos: dict[str, tuple[float, float]] = {}
    slot = 0.0
    for cl in sorted(graph.clusters, key=len, reverse=True):
        kids: dict[str, list[str]] = {}
        for e in graph.edges:
            if e.kind == "fine-tune" and e.child in cl:
                kids.setdefault(e.parent, []).append(e.child)
        depth: dict[str, int] = {}

        def place(n: str, dep: int, depth: dict[str, int] = depth, kids: dict[str, list[str]] = kids) -> float:
            nonlocal slot
            depth[n] = dep
            ks = sorted(kids.get(n, []))
            if not ks:
                x = slot
                slot += 1.0
            else:
                xs = [place(k, dep + 1) for k in ks]
                x = sum(xs) / len(xs)
            pos[n] = (x, -float(dep))
            return x

        for r in [r for r in graph.roots if r in cl]:
            place(r, 0)
        bottom = 1 + max(depth.values(), default=0)
        for n in cl:  # merges (on a row of their own) and anything a cycle-free walk did not reach
            if n in pos:
                continue
            comps = graph.merges[n].components if n in graph.merges else {}
            dep = bottom
            xs = [pos[c][0] for c in comps if c in pos]
            x = sum(xs) / len(xs) if xs else slot
            if not xs:
                slot += 1.0
            depth[n] = dep
            pos[n] = (x, -float(dep))
            for k in sorted(kids.get(n, [])):
                place(k, dep + 1)
        slot += 0.6  # a gap between families
    return pos


def render_graph(graph: ModelGraph, path: Path, *, fmt: str, title: str | None = None) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dev extra
        from merge.errors import WeightsmithError

        raise WeightsmithError("drawing a model graph needs matplotlib (pip install matplotlib)") from None
    pos = layout(graph)
    width = max([p[0] for p in pos.values()] + [1]) + 1
    height = max([-p[1] for p in pos.values()] + [0]) + 1
    fig = Figure(figsize=(max(5.0, 1.6 * width), max(3.0, 1.3 * height + 0.8)))
    ax = fig.add_subplot()
    ax.set_axis_off()
    for e in graph.edges:
        if e.parent not in pos or e.child not in pos:
            continue
        (x0, y0), (x1, y1) = pos[e.parent], pos[e.child]
        merge = e.kind == "merge"
        colour = "#8e44ad" if merge else "#34495e"
        ax.annotate(
            "",
            xy=(x1, y1 + 0.18),
            xytext=(x0, y0 - 0.18),
            arrowprops=dict(arrowstyle="->", color=colour, lw=1.3, ls="--" if merge else "-"),
            zorder=1,
        )
        label = f"{e.weight:.2f}" if merge and e.weight is not None else f"{e.confidence:.2f}"
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, label, fontsize=7, color=colour, ha="center", va="center",
                zorder=2, bbox=dict(boxstyle="round,pad=0.12", fc="white", ec="none", alpha=0.85))
    for name, (x, y) in pos.items():
        colour = "#d7bde2" if name in graph.merges else "#82e0aa" if name in graph.roots else "#d6eaf8"
        ax.text(x, y, name, ha="center", va="center", fontsize=8, zorder=3,
                bbox=dict(boxstyle="round,pad=0.3", fc=colour, ec="#333333", lw=0.8))
    fig.text(0.01, 0.01, "green: family roots; arrows: fine-tuned from (label: confidence); dashed purple: "
             "merge components (label: share)", fontsize=7, color="#555555")
    n_fam = len(graph.clusters)
    ax.set_title(title or f"model graph: {len(graph.models)} models, {n_fam} famil{'y' if n_fam == 1 else 'ies'}, "
                 f"{len(graph.merges)} merge{'s' if len(graph.merges) != 1 else ''}", fontsize=10)
    ax.set_xlim(-0.8, width - 0.2)
    ax.set_ylim(-height + 0.4, 0.6)
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=130)
