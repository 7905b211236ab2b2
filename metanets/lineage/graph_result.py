"""The model graph of a pool as :func:`metanets.lineage.graph.recover_model_graph` returns it.

:class:`ModelGraph`: families, fine-tune edges (with a confidence and the calibrated direction
signal), merge nodes (components with shares, the base they were fitted on); questions (``parent``,
``ancestors``, ``relation`` ...), ``to_json()``, ``summary()`` and ``render()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.errors import InvalidArgumentError

GRAPH_FORMAT = "weightsmith.model_graph"
#: leaf agreement a family's direction needs before detect_lineage trusts who is whose descendant
DIRECTED_AGREEMENT = 0.2


@dataclass
class GraphEdge:
    """``parent → child``: a fine-tune (``kind="fine-tune"``) or a merge component (``kind="merge"``)."""

    parent: str
    child: str
    kind: str
    distance: float
    confidence: float
    weight: float | None = None  # merge components: share of the merge
    direction: float | None = None  # fine-tunes: y(parent→child), calibrated, in [-1, 1]


@dataclass
class MergeNode:
    """A model recognised as a merge: its components with shares, the base it was fitted on."""

    name: str
    components: dict[str, float]
    base: str | None
    residual: float
    single_residual: float
    #: the residual's own size (not relative to the merge's delta from its base): how fits on different bases compare
    residual_norm: float = 0.0
    #: per component, how much the residual grows without it (≥ NEEDED; near it: a weak component, which may
    #: instead be a light fine-tune of the merge)
    need: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelGraph:
    """The directed model graph of a pool: families (clusters), fine-tune edges and merges."""

    models: list[str]
    refs: dict[str, str]
    clusters: list[list[str]]
    edges: list[GraphEdge]
    merges: dict[str, MergeNode]
    roots: list[str]
    distances: dict[tuple[str, str], float]
    params: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_read: int = 0

    # -- questions ----------------------------------------------------------------------------------
    def parents(self, name: str) -> list[str]:
        """The model's parents: one for a fine-tune, the components for a merge, none for a root."""
        return [e.parent for e in self.edges if e.child == name]

    def parent(self, name: str) -> str | None:
        """The fine-tuning parent (``None`` for a root or a merge)."""
        for e in self.edges:
            if e.child == name and e.kind == "fine-tune":
                return e.parent
        return None

    def children(self, name: str) -> list[str]:
        return [e.child for e in self.edges if e.parent == name]

    def ancestors(self, name: str) -> list[str]:
        """Fine-tuning ancestors, nearest first (the chain stops at a root or at a merge)."""
        out: list[str] = []
        cur = self.parent(name)
        while cur is not None and cur not in out:
            out.append(cur)
            cur = self.parent(cur)
        return out

    def descendants(self, name: str) -> list[str]:
        out: list[str] = []
        todo = [name]
        while todo:
            for c in self.children(todo.pop()):
                if c not in out and c != name:
                    out.append(c)
                    todo.append(c)
        return out

    def siblings(self, name: str) -> list[str]:
        p = self.parent(name)
        if p is None:
            return []
        return [c for c in self.children(p) if c != name and c not in self.merges]

    def cluster_of(self, name: str) -> int:
        for i, c in enumerate(self.clusters):
            if name in c:
                return i
        raise KeyError(name)

    def directed(self, name: str) -> bool:
        """Whether the direction of ``name``'s family was calibrated on its own leaves (not the prior)."""
        for c in self.params.get("calibration", []):
            if name in c.get("members", []):
                return c.get("leaf_agreement") is not None and c["leaf_agreement"] >= DIRECTED_AGREEMENT
        return False

    def relation(self, a: str, b: str) -> str:
        """What ``b`` is to ``a``: parent, child, ancestor, descendant, sibling, merge component, merge of
        it, relative (same family) or unrelated."""
        if a == b:
            return "self"
        if self.cluster_of(a) != self.cluster_of(b):
            return "unrelated"
        if b == self.parent(a):
            return "parent"
        if a in self.merges and b in self.merges[a].components:
            return "merge component"
        if b in self.merges and a in self.merges[b].components:
            return "merge of it"
        if b in self.ancestors(a):
            return "ancestor"
        if a == self.parent(b):
            return "child"
        if b in self.descendants(a):
            return "descendant"
        if b in self.siblings(a):
            return "sibling"
        return "relative"

    # -- output -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": GRAPH_FORMAT,
            "version": 1,
            "models": [{"name": m, "ref": self.refs.get(m, m), "cluster": self.cluster_of(m)} for m in self.models],
            "clusters": self.clusters,
            "roots": self.roots,
            "edges": [
                {
                    "parent": e.parent,
                    "child": e.child,
                    "kind": e.kind,
                    "distance": round(e.distance, 6),
                    "confidence": round(e.confidence, 4),
                    **({"weight": round(e.weight, 4)} if e.weight is not None else {}),
                    **({"direction": round(e.direction, 4)} if e.direction is not None else {}),
                }
                for e in self.edges
            ],
            "merges": [
                {
                    "name": m.name,
                    "components": {k: round(v, 4) for k, v in m.components.items()},
                    "base": m.base,
                    "residual": round(m.residual, 4),
                    "single_residual": round(m.single_residual, 4),
                    "need": {k: round(v, 3) for k, v in m.need.items()},
                }
                for m in self.merges.values()
            ],
            "skipped": [{"name": k, "reason": v} for k, v in self.skipped.items()],
            "params": self.params,
            "seconds": round(self.seconds, 3),
            "bytes_read": self.bytes_read,
        }

    def summary(self) -> list[str]:
        """Human-readable lines: one indented tree per family, merges as joins (the CLI's output)."""
        lines: list[str] = []
        for i, cl in enumerate(self.clusters):
            roots = [r for r in self.roots if r in cl]
            lines.append(f"family {i + 1} ({len(cl)} model{'s' if len(cl) != 1 else ''})")
            shown: set[str] = set()

            def walk(n: str, depth: int, shown: set[str] = shown) -> None:
                if n in shown:
                    return
                shown.add(n)
                for e in sorted((e for e in self.edges if e.parent == n and e.kind == "fine-tune"),
                                key=lambda e: e.child):
                    lines.append(
                        f"{'  ' * depth}└─ {e.child}   (d {e.distance:.3g}, confidence {e.confidence:.2f})"
                    )
                    walk(e.child, depth + 1)

            for r in roots:
                lines.append(f"  {r}" + ("   [merge]" if r in self.merges else "   [root]"))
                walk(r, 2)
            for m in (m for m in self.merges.values() if m.name in cl):
                parts = " + ".join(f"{w:.2f}·{c}" for c, w in m.components.items())
                base = f" on base {m.base}" if m.base else ""
                lines.append(f"  merge {m.name} = {parts}{base}   (residual {m.residual:.2f})")
                if m.name not in shown:
                    walk(m.name, 2)
        for k, v in self.skipped.items():
            lines.append(f"skipped {k}: {v}")
        return lines

    def render(self, path: str | Path, *, title: str | None = None, overwrite: bool = False) -> Path:
        """Draw the graph (families side by side, merges as joins); format from the suffix (png, svg, pdf)."""
        from merge.atomic import atomic_output
        from metanets.lineage.graph_draw import render_graph

        out = Path(path)
        fmt = out.suffix.lower().lstrip(".")
        if fmt not in ("png", "svg", "pdf"):
            raise InvalidArgumentError(f"graph picture '{out}': use a .png, .svg or .pdf suffix")
        with atomic_output(out, overwrite=overwrite, kind="file") as tmp:
            render_graph(self, tmp, fmt=fmt, title=title)
        return out
