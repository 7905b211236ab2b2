"""What :func:`metanets.lineage.detect_lineage` returns: ranked candidates, the answer, the family tree.

:class:`LineageResult` is plain data: candidates ranked by score (lower = closer) with their
per-tensor evidence, the answer (a parent, or ``None`` = "no parent among the candidates" with the
reason and the thresholds that decided it), the chain of ancestors, what was skipped or excluded,
and the edges of the reconstructed family tree. ``to_json()`` gives a JSON-ready dict (the
service's and the CLI's ``--json`` answer), ``render_tree(path)`` draws the tree with matplotlib
(PNG, SVG or PDF by suffix; written to a temporary name and renamed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "weightsmith.lineage"


def _num(x: float | None, nd: int = 6) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), nd)


@dataclass
class LayerEvidence:
    """One tensor's share of the evidence for a candidate."""

    tensor: str
    statistic: str  # "nuclear" | "frobenius"
    distance: float  # N(θ_c − θ_p) / N(θ_c)
    frobenius: float  # ‖θ_c − θ_p‖_F / ‖θ_c‖_F
    nearest: bool = False  # this candidate is the nearest one on this tensor


@dataclass
class CandidateScore:
    """A candidate as ranked: ``score`` is a normalised distance (0 = the child itself, ≈1 or more = unrelated)."""

    name: str
    ref: str
    rank: int
    score: float
    related: bool
    votes: float = 0.0  # weighted share of tensors on which this candidate is the nearest
    coverage: float = 0.0  # share of the child's parameters compared
    n_tensors: int = 0
    layers: list[LayerEvidence] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    fixed_fraction: float | None = None  # aligned: share of hidden units weight matching left in place
    permuted: bool | None = None  # aligned: related, but its hidden units had been permuted
    metrics: dict[str, float] = field(default_factory=dict)  # probe / learned: every metric computed
    path: float | None = None  # path test of the best candidate (see LineageResult.thresholds)
    #: what the candidate is to the child in the recovered model graph (weights/aligned): parent, ancestor,
    #: sibling, descendant, child, merge of it, merge component, relative
    relation: str | None = None

    def to_json(self, *, layers: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "ref": self.ref,
            "rank": self.rank,
            "score": _num(self.score),
            "related": self.related,
            "votes": _num(self.votes, 4),
            "coverage": _num(self.coverage, 4),
            "n_tensors": self.n_tensors,
        }
        if self.fixed_fraction is not None:
            d["fixed_fraction"] = _num(self.fixed_fraction, 4)
            d["permuted"] = self.permuted
        elif self.permuted:
            d["permuted"] = True
        if self.metrics:
            d["metrics"] = {k: _num(v) for k, v in self.metrics.items()}
        if self.path is not None:
            d["path"] = _num(self.path, 4)
        if self.relation is not None:
            d["relation"] = self.relation
        if layers:
            d["layers"] = [
                {**asdict(e), "distance": _num(e.distance), "frobenius": _num(e.frobenius)}
                for e in self.layers
            ]
            d["excluded"] = dict(self.excluded)
        return d


@dataclass
class Skipped:
    """A candidate that could not be scored, and why (unreadable, missing, nothing shared, another architecture)."""

    name: str
    ref: str
    reason: str


@dataclass
class TreeEdge:
    """An edge of the reconstructed family tree; ``kind``: ``chain`` (child → parent → ...), ``family``, ``guess``."""

    a: str
    b: str
    distance: float
    kind: str = "family"


@dataclass
class LineageResult:
    """The answer to "which of these candidates is this model's parent, or none of them?"."""

    child: str
    method: str
    candidates: list[CandidateScore]
    parent: str | None
    reason: str
    thresholds: dict[str, Any]
    margin: float | None = None
    chain: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    tree: list[TreeEdge] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    #: the child is a merge of these candidates (name -> share), when the model graph recognises one
    merge_of: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> CandidateScore | None:
        return self.candidates[0] if self.candidates else None

    def candidate(self, name: str) -> CandidateScore:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(name)

    def ranking(self) -> list[str]:
        return [c.name for c in self.candidates]

    def excluded(self) -> dict[str, dict[str, list[str]]]:
        """``{tensor: {reason: [candidates]}}`` over all candidates."""
        out: dict[str, dict[str, list[str]]] = {}
        for c in self.candidates:
            for t, why in c.excluded.items():
                out.setdefault(t, {}).setdefault(why, []).append(c.name)
        return out

    def to_json(self, *, layers: bool = True) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            "child": self.child,
            "method": self.method,
            "parent": self.parent,
            "answer": "parent" if self.parent is not None else "none",
            "reason": self.reason,
            "margin": _num(self.margin, 4),
            "chain": list(self.chain),
            "merge_of": {k: _num(v, 4) for k, v in self.merge_of.items()},
            "thresholds": dict(self.thresholds),
            "candidates": [c.to_json(layers=layers) for c in self.candidates],
            "skipped": [asdict(s) for s in self.skipped],
            "excluded": [
                {"tensor": t, "reason": why, "candidates": names}
                for t, reasons in self.excluded().items()
                for why, names in reasons.items()
            ],
            "tree": [{**asdict(e), "distance": _num(e.distance)} for e in self.tree],
            "seconds": _num(self.seconds, 3),
            "bytes_read": self.bytes_read,
            "params": self.params,
        }

    def summary(self) -> list[str]:
        """Human-readable lines (the CLI's output)."""
        lines = []
        if self.parent is not None:
            chain = " -> ".join([self.child, *self.chain])
            lines.append(f"parent: {self.parent}   (chain: {chain})")
        else:
            lines.append("parent: none of the candidates")
        lines.append(f"why: {self.reason}")
        width = max([len(c.name) for c in self.candidates] + [9])
        lines.append(
            f"{'rank':>4}  {'candidate':<{width}}  {'score':>8}  {'related':>7}  {'votes':>5}  extra"
        )
        for c in self.candidates:
            extra = []
            if c.fixed_fraction is not None:
                extra.append(f"fixed {c.fixed_fraction:.2f}" + (" PERMUTED" if c.permuted else ""))
            elif c.permuted:
                extra.append("looks PERMUTED (try --method aligned)")
            if c.path is not None:
                extra.append(f"path {c.path:.2f}")
            if c.relation is not None and c.relation not in ("parent", "relative"):
                extra.append(c.relation.upper() if c.relation in ("descendant", "child", "merge of it") else c.relation)
            if c.coverage < 0.999:
                extra.append(f"coverage {c.coverage:.0%}")
            lines.append(
                f"{c.rank:>4}  {c.name:<{width}}  {c.score:>8.4f}  {'yes' if c.related else 'no':>7}  "
                f"{c.votes:>5.2f}  {', '.join(extra)}"
            )
        for s in self.skipped:
            lines.append(f"   -  {s.name:<{width}}  skipped: {s.reason}")
        return lines

    # -- the family tree ----------------------------------------------------------------------------
    def render_tree(self, path: str | Path, *, title: str | None = None, overwrite: bool = False) -> Path:
        """Draw the family tree (child highlighted, ancestors' chain bold, unrelated candidates aside).

        The format follows the suffix (``.png``, ``.svg``, ``.pdf``). Needs matplotlib. An existing file
        is replaced only with ``overwrite`` (atomically: :mod:`merge.atomic`).
        """
        from merge.atomic import atomic_output
        from metanets.lineage.tree import render

        out = Path(path)
        fmt = out.suffix.lower().lstrip(".")
        if fmt not in ("png", "svg", "pdf"):
            from merge.errors import InvalidArgumentError

            raise InvalidArgumentError(f"tree file '{out}': use a .png, .svg or .pdf suffix")
        with atomic_output(out, overwrite=overwrite, kind="file") as tmp:
            render(self, tmp, fmt=fmt, title=title)
        return out
