"""Drawing a :class:`~metanets.lineage.result.LineageResult` as a family tree (matplotlib, no pyplot state).

Layout: the family component (the tree edges of the result) is rooted at the oldest ancestor of
the chain (else at the child's nearest relative), drawn top-down with leaves in depth-first order
and each node above the middle of its children. The child is orange, its parent green, the chain
of ancestors is drawn bold, a "no parent" answer as a dashed edge to the nearest relative marked
"?"; candidates outside the family sit in a grey row at the bottom with their scores.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metanets.lineage.result import LineageResult


def _layout(result: LineageResult) -> tuple[dict[str, tuple[float, float]], list[str]]:
    adj: dict[str, list[str]] = defaultdict(list)
    for e in result.tree:
        adj[e.a].append(e.b)
        adj[e.b].append(e.a)
    if result.chain:
        root = result.chain[-1]
    elif adj.get(result.child):
        root = adj[result.child][0]
    else:
        root = result.child
    kids: dict[str, list[str]] = defaultdict(list)
    depth = {root: 0}
    order = [root]
    for n in order:  # breadth-first
        for m in sorted(adj[n]):
            if m not in depth:
                depth[m] = depth[n] + 1
                kids[n].append(m)
                order.append(m)
    # chain members first among siblings, so the lineage reads as a straight-ish line
    on_chain = {result.child, *result.chain}
    for n in kids:
        kids[n].sort(key=lambda m: (m not in on_chain, m))
    x: dict[str, float] = {}
    slot = [0.0]

    def place(n: str) -> float:
        if not kids[n]:
            x[n] = slot[0]
            slot[0] += 1.0
        else:
            xs = [place(m) for m in kids[n]]
            x[n] = sum(xs) / len(xs)
        return x[n]

    place(root)
    pos = {n: (x[n], -float(depth[n])) for n in depth}
    outside = [c.name for c in result.candidates if c.name not in pos] + [s.name for s in result.skipped]
    return pos, outside


def render(result: LineageResult, path: Path, *, fmt: str, title: str | None = None) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dev extra
        from merge.errors import WeightsmithError

        raise WeightsmithError("rendering a lineage tree needs matplotlib (pip install matplotlib)") from None
    pos, outside = _layout(result)
    scores = {c.name: c.score for c in result.candidates}
    skipped = {s.name for s in result.skipped}
    per_row = max(6, int(max([p[0] for p in pos.values()] + [0])) + 1)
    rows = [outside[i : i + per_row] for i in range(0, len(outside), per_row)]
    width = max([p[0] for p in pos.values()] + [min(len(outside), per_row) - 1, 1]) + 1
    height = max([-p[1] for p in pos.values()] + [0]) + 1 + (0.5 + 0.8 * len(rows) if outside else 0)
    fig = Figure(figsize=(max(5.0, 1.9 * width), max(3.0, 1.25 * height + 0.8)))
    ax = fig.add_subplot()
    ax.set_axis_off()
    for e in result.tree:
        if e.a not in pos or e.b not in pos:
            continue
        (x0, y0), (x1, y1) = pos[e.a], pos[e.b]
        style = {
            "chain": dict(color="#2a7d2e", lw=2.6, ls="-"),
            "guess": dict(color="#c0392b", lw=1.4, ls="--"),
        }.get(e.kind, dict(color="#888888", lw=1.0, ls="-"))
        ax.plot([x0, x1], [y0, y1], zorder=1, **style)
        label = f"{e.distance:.3g}" + (" ?" if e.kind == "guess" else "")
        ax.text(
            (x0 + x1) / 2,
            (y0 + y1) / 2,
            label,
            fontsize=7,
            ha="center",
            va="center",
            zorder=2,
            color=style["color"],
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85),
        )

    def node(name: str, xy: tuple[float, float], colour: str, text_colour: str = "black") -> None:
        sub = ""
        if name == result.child:
            sub = "child"
        elif name in scores:
            sub = f"score {scores[name]:.3g}"
        elif name in skipped:
            sub = "skipped"
        ax.text(
            xy[0],
            xy[1],
            f"{name}\n{sub}",
            ha="center",
            va="center",
            fontsize=8,
            color=text_colour,
            zorder=3,
            bbox=dict(boxstyle="round,pad=0.35", fc=colour, ec="#333333", lw=0.8),
        )

    for name, xy in pos.items():
        colour = "#f5b041" if name == result.child else "#82e0aa" if name == result.parent else "#d6eaf8"
        node(name, xy, colour)
    if outside:
        y0 = -(max([-p[1] for p in pos.values()] + [0]) + 1.2)
        ax.text(
            -0.45, y0 + 0.45, "not related to the child (or skipped):", fontsize=8, color="#555555", ha="left"
        )
        for r, row in enumerate(rows):
            for i, name in enumerate(row):
                node(name, (float(i), y0 - 0.8 * r), "#eeeeee", "#555555")
    answer = f"parent: {result.parent}" if result.parent else "no parent among the candidates"
    fig.text(
        0.01,
        0.01,
        "bold green: the child and its chain of ancestors; grey: nearest-relative edges among "
        "related candidates (undirected); dashed red: nearest relative when no parent qualifies",
        fontsize=7,
        color="#555555",
    )
    ax.set_title(title or f"lineage of {result.child} ({result.method}): {answer}", fontsize=10)
    ax.set_xlim(-0.8, width - 0.2)
    ax.set_ylim(-height - 0.2, 0.6)
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=130)
