"""Lineage detection: which candidate a checkpoint was fine-tuned from, and its ancestors.

The task of Yu & Wang, "Neural Lineage", CVPR 2024 (arXiv:2406.11129): given a child model and
candidate parents, name the parent, or say that none of them is. :func:`detect_lineage` takes
paths, Hub ids (``org/name@rev``) or state dicts, reads checkpoints lazily through
:mod:`merge.checkpoint` and answers with a :class:`~metanets.lineage.result.LineageResult`.

Methods
-------
``weights`` (data-free, streaming)
    Per-tensor distances ``q_k = N(θ_c − θ_p)_k / N(θ_c)_k`` over the tensors child and candidate
    share with the same shape (heads, resized and one-sided tensors excluded and reported), in the
    nuclear norm for matrices (on a fixed block of at most ``spectral_max_dim`` rows and columns)
    and the Frobenius norm for vectors (:mod:`metanets.lineage.stats` explains why low-rank fine-tuning makes the
    nuclear norm the sharper one). The score is the weighted geometric mean
    ``exp(Σ w_k log q_k / Σ w_k)`` (matrices weigh 1, vectors 0.1; ``q`` floored at 1e-4 so one
    bit-identical tensor cannot outvote the rest), i.e. the typical relative distance: 0 for the
    child itself, about 1–1.4 for an unrelated model of any architecture.
``aligned`` (permutation-robust)
    Every candidate is first aligned to the child by Git Re-Basin weight matching (Ainsworth et
    al., ICLR 2023, Algorithm 1; :func:`merge.rebasin.matching.weight_matching`) under a
    :class:`~merge.symmetry.PermutationSpec` (given, by ``architecture``, or built from the child's
    tensor names), then scored like ``weights``. ``fixed_fraction`` is the share of hidden units the
    matching left in place (≈1 for an unpermuted relative); a related candidate with a low one is
    reported ``permuted``.
``probe`` (a probe batch and a ``model_fn``)
    :mod:`metanets.lineage.probe`: representation L2, linear CKA, the paper's first-order
    fine-tuning approximation and the full linearised distance (``torch.func.jvp``); the candidates
    are ranked by ``probe_metric``.
``learned``
    A detector trained on a lineage zoo (:mod:`metanets.lineage.learned`), loaded from ``detector``.

The answer (open set)
---------------------
The best candidate is the parent if (1) it is related: score ≤ ``family_threshold`` (default 0.8;
unrelated models score ≈1 or more), and (2) for ``weights``/``aligned``, it passes the *path test*:
seen from each relative B' of the best candidate B (another related candidate), the child must lie
behind B. Per tensor, ``ρ = (N(C−B')ᵖ − N(C−B)ᵖ) / N(B−B')ᵖ`` (p = 1 for nuclear, 2 for Frobenius
tensors) is ≈1 when the path from the child to B' runs through B (fine-tuning updates add up
along a lineage) and ≈0 when B is a side branch, e.g. a sibling of the child's missing parent;
the weighted median over tensors, minimised over B', must be at least ``path_threshold`` (0.15).
Otherwise the answer is ``None`` ("no parent among the candidates"), with the reason.

The chain of ancestors starts at the parent; from each link L it moves to L's nearest remaining
relative A if most other remaining relatives lie behind A as seen from L (an ancestor connects the
rest of the family; L's own siblings and children hang off L), with the stricter threshold 0.5,
and stops when no relative qualifies. Direction is not identifiable from symmetric distances: when
a root's fine-tunes share a common update (siblings cluster away from their root), the root looks
like one more sibling and the chain stops early rather than guess (see ``bench/lineage.py``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge.checkpoint import TensorSource
from merge.errors import InvalidArgumentError, WeightsmithError
from metanets.lineage.methods import LineageMethod, Scoring, _geo_mean, _weight, get_lineage_method, lineage_methods
from metanets.lineage.model import Model, Scored
from metanets.lineage.model import default_resolver as _default_resolver
from metanets.lineage.model import named_refs as _names
from metanets.lineage.model import open_model as _open
from metanets.lineage.result import CandidateScore, LineageResult, Skipped, TreeEdge
from metanets.lineage.stats import (
    NUCLEAR,
    Pairing,
    TensorNorms,
    head_tensors,
    is_constant,
    pair_norms,
    pair_tensors,
    read,
    single_torch_thread,
)

__all__ = ["LineageMethod", "LineageResult", "detect_lineage", "get_lineage_method", "lineage_methods"]

ModelRef = str | Path | Mapping[str, torch.Tensor]
Progress = Callable[[str, int, int], None]
#: ``behind`` a chain step needs (stricter than the path test: a wrong ancestor is worse than a short chain)
CHAIN_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------
# Opening models
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Scoring from per-tensor norms (weights, aligned)
# ---------------------------------------------------------------------------------------------


def _pair_distance(
    a: Scored,
    b: Scored,
    norms: dict[str, TensorNorms],
    cache: dict[tuple[int, int], dict[str, float]],
    max_dim: int | None,
) -> tuple[float, dict[str, float]]:
    """Distance between two candidates on the child's yardstick: geometric mean of ``N(a−b)_k / N(c)_k``."""
    key = (min(a.model.index, b.model.index), max(a.model.index, b.model.index))
    if key not in cache:
        names = [n for n in a.q if n in b.q]
        kinds = {n: norms[n].kind for n in names}
        res = pair_norms(
            a.model.source,
            b.model.source,
            names,
            kinds,
            frob_from=norms,
            ia=a.model.index,
            ib=b.model.index,
            max_dim=max_dim,
        )
        cache[key] = res
    diffs = cache[key]
    q = {n: d / norms[n].child for n, d in diffs.items() if norms[n].child > 0}
    weights = {n: _weight(tuple(a.model.source.shape(n))) for n in q}
    return _geo_mean(q, weights), diffs


def _weighted_median(values: list[tuple[float, float]]) -> float:
    values = sorted(values)
    total = sum(w for _, w in values)
    acc = 0.0
    for v, w in values:
        acc += w
        if acc >= total / 2:
            return v
    return values[-1][0] if values else math.nan


def _mst(nodes: list[str], dist: Callable[[str, str], float]) -> list[tuple[str, str, float]]:
    """Prim's minimum spanning tree."""
    if len(nodes) < 2:
        return []
    inside = {nodes[0]}
    edges = []
    best = {n: (dist(nodes[0], n), nodes[0]) for n in nodes[1:]}
    while best:
        n = min(best, key=lambda k: best[k][0])
        d, via = best.pop(n)
        edges.append((via, n, d))
        inside.add(n)
        for m in best:
            dm = dist(n, m)
            if dm < best[m][0]:
                best[m] = (dm, n)
    return edges


def _chain(
    parent: str,
    family: list[str],
    dist: Callable[[str, str], float],
    behind: Callable[[str, str, str], float],
    threshold: float,
) -> list[str]:
    """Ancestors from the parent upwards (module docstring): at each link ``cur``, the next one is the
    nearest remaining relative ``A`` behind which most of the other remaining relatives lie, as seen
    from ``cur`` (``behind(cur, A, B) >= threshold``); relatives that branch off before ``A`` are
    dropped. A single remaining relative is taken (a pure chain)."""
    chain = [parent]
    left = [m for m in family if m != parent]
    cur = parent
    while left:
        step = None
        for a in sorted(left, key=lambda m: (dist(cur, m), m)):
            others = [b for b in left if b != a]
            back = [b for b in others if behind(cur, a, b) >= threshold]
            if 2 * len(back) > len(others) or not others:
                step = (a, back)
                break
        if step is None:
            break
        chain.append(step[0])
        left = step[1]
        cur = step[0]
    return chain


# ---------------------------------------------------------------------------------------------
# The library call
# ---------------------------------------------------------------------------------------------


def _single_thread(fn: Callable[..., LineageResult]) -> Callable[..., LineageResult]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> LineageResult:
        with single_torch_thread():
            return fn(*args, **kwargs)

    return wrapper


@_single_thread
def detect_lineage(
    child: ModelRef,
    candidates: Sequence[ModelRef] | Mapping[str, ModelRef],
    *,
    method: str = "weights",
    probe: Any = None,
    model_fn: Callable[[Mapping[str, torch.Tensor]], torch.nn.Module] | None = None,
    detector: str | Path | None = None,
    heads: str | Sequence[str] | None = "auto",
    exclude: Sequence[str] = (),
    spectral: bool | str = "auto",
    spectral_max_dim: int = 256,
    family_threshold: float = 0.8,
    path_threshold: float = 0.15,
    spec: Any = None,
    architecture: str | None = None,
    n_heads: int = 0,
    probe_metric: str = "linearized",
    alpha: float = 1.0,
    max_family: int = 6,
    child_name: str | None = None,
    resolver: Callable[[str], Any] | None = None,
    allow_pickle: bool = False,
    workers: int = 2,
    progress: Progress | None = None,
) -> LineageResult:
    """Rank ``candidates`` as the parent of ``child`` and answer which one is, or that none is.

    ``child`` and each candidate are a local path (file or folder), a Hub id (``org/name@rev``,
    resolved by ``resolver``, by default :func:`merge.plan.default_resolver`) or a state dict;
    ``candidates`` is a list or a ``{name: model}`` mapping. A candidate that cannot be read, shares
    no comparable tensor with the child or does not fit the alignment spec is skipped with its
    reason (``result.skipped``); the others are still ranked. Errors about the child itself raise.

    See the module docstring for the methods, the score, the open-set answer (``family_threshold``,
    ``path_threshold``) and the chain of ancestors. ``heads``: ``"auto"`` excludes classifier heads
    found by name or as the last layer of a plain chain, a list of regexes names them, ``None``
    keeps them; ``exclude`` adds regexes of tensors to leave out. ``spectral``: ``"auto"`` (nuclear
    norm of every matrix on a block of at most ``spectral_max_dim`` rows and columns), ``True``
    (nuclear norm of the whole matrix: exact, ``O(n³)``) or ``False`` (Frobenius only). ``progress(stage,
    done, total)`` is called as work proceeds.
    """
    t0 = time.perf_counter()
    how = get_lineage_method(method)
    how.check({"probe": probe, "model_fn": model_fn, "detector": detector})
    if not (0 < family_threshold) or not math.isfinite(path_threshold):
        raise InvalidArgumentError("detect_lineage: family_threshold must be > 0 and path_threshold finite")
    resolver = resolver or _default_resolver()
    cname = child_name or (str(child) if isinstance(child, str | Path) else "child")
    c = _open(cname, child, resolver, allow_pickle)
    models: list[Model] = []
    skipped: list[Skipped] = []
    for i, (name, ref) in enumerate(_names(candidates)):
        try:
            m = _open(name, ref, resolver, allow_pickle)
        except WeightsmithError as e:
            skipped.append(Skipped(name, str(ref) if not isinstance(ref, Mapping) else name, str(e)))
            continue
        except OSError as e:
            skipped.append(Skipped(name, str(ref), f"cannot read: {e}"))
            continue
        m.index = i
        models.append(m)
    if not models and not skipped:
        raise InvalidArgumentError("detect_lineage: no candidates given")

    child_shapes = {n: c.source.shape(n) for n in c.source.keys()}
    if heads == "auto":
        head_set = head_tensors(list(child_shapes), child_shapes)
    elif heads is None:
        head_set = set()
    else:
        head_set = head_tensors(
            list(child_shapes), child_shapes, list([heads] if isinstance(heads, str) else heads)
        )
    constant = {
        n for n in child_shapes if c.source.dtype(n).is_floating_point and _small_constant(c.source, n)
    }
    pairings: dict[int, Pairing] = {}
    comparable: list[Model] = []
    for m in models:
        pr = pair_tensors(c.source, m.source, heads=head_set, exclude=exclude, constant=constant)
        if not pr.shared:
            reasons = sorted(set(pr.excluded.values()))
            skipped.append(
                Skipped(
                    m.name,
                    m.ref,
                    "no comparable tensors shared with the child"
                    + (f" ({'; '.join(reasons[:3])})" if reasons else ""),
                )
            )
            continue
        pairings[m.index] = pr
        comparable.append(m)

    ctx = Scoring(
        child=c,
        candidates=comparable,
        pairings=pairings,
        skipped=skipped,
        progress=progress,
        options={
            "probe": probe,
            "model_fn": model_fn,
            "detector": detector,
            "spec": spec,
            "architecture": architecture,
            "n_heads": n_heads,
            "probe_metric": probe_metric,
            "alpha": alpha,
            "workers": workers,
        },
        params={"spectral": spectral, "spectral_max_dim": spectral_max_dim},
    )
    scored = how.score(ctx)
    comparable, norms, params = ctx.candidates, ctx.norms, ctx.params
    scored = [s for s in scored if math.isfinite(s.score)]
    scored.sort(key=lambda s: (s.score, s.model.index))
    result = _decide(
        c,
        scored,
        norms,
        how,
        family_threshold,
        path_threshold,
        max_family,
        None if spectral is True else spectral_max_dim,
    )
    result.skipped = skipped
    result.params = params
    result.bytes_read = _bytes_read(c, comparable, pairings) if how.reads_weights else 0
    result.seconds = time.perf_counter() - t0
    return result


def _small_constant(src: TensorSource, name: str) -> bool:
    shape = src.shape(name)
    if math.prod(shape) > 1 << 16:  # large tensors are not read here; a constant one is rare
        return False
    return is_constant(read(src, name))


def _bytes_read(c: Model, models: list[Model], pairings: dict[int, Pairing]) -> int:
    names: set[str] = set()
    total = 0
    for m in models:
        for n in pairings[m.index].shared:
            b = math.prod(m.source.shape(n)) * torch.empty((), dtype=m.source.dtype(n)).element_size()
            total += b
            names.add(n)
    for n in names:
        total += math.prod(c.source.shape(n)) * torch.empty((), dtype=c.source.dtype(n)).element_size()
    return total


def _decide(
    c: Model,
    scored: list[Scored],
    norms: dict[str, TensorNorms],
    method: LineageMethod,
    family_threshold: float,
    path_threshold: float,
    max_family: int,
    max_dim: int | None = 256,
) -> LineageResult:
    thresholds: dict[str, Any] = {
        "family": family_threshold,
        "family_rule": "the parent must score at most this (0 = the child itself; unrelated models score about 1 "
        "or more)",
    }
    path_ok = method.reads_weights
    if path_ok:
        thresholds |= {
            "path": path_threshold,
            "path_rule": "seen from each relative B' of the best candidate B, the child must lie behind B: "
            "weighted median over tensors of (N(C-B')^p - N(C-B)^p) / N(B-B')^p >= this "
            "(p = 1 nuclear, 2 Frobenius)",
            "chain": CHAIN_THRESHOLD,
            "chain_rule": "the next ancestor of a link L is its nearest remaining relative A such that most other "
            "remaining relatives lie behind A as seen from L (the same statistic >= this)",
        }
    cands = []
    for rank, s in enumerate(scored, 1):
        cs = CandidateScore(
            s.model.name,
            s.model.ref,
            rank,
            s.score,
            s.score <= family_threshold,
            s.votes,
            s.coverage,
            len(s.q),
            s.layers,
            dict(s.pairing.excluded),
        )
        if "fixed_fraction" in s.extra:
            cs.fixed_fraction = s.extra["fixed_fraction"]
            cs.permuted = cs.related and cs.fixed_fraction < 0.5
        cs.metrics = dict(s.extra.get("metrics", {}))
        cands.append(cs)
    result = LineageResult(c.name, method.name, cands, None, "", thresholds)
    if not scored:
        result.reason = "no candidate could be scored (see skipped)"
        return result
    best = scored[0]
    result.margin = math.log(scored[1].score / best.score) if len(scored) > 1 and best.score > 0 else None
    if not method.open_set_by_threshold:
        return _decide_learned(result, scored)
    lookalikes = _permuted_lookalikes(c, scored, cands, family_threshold) if method.name == "weights" else []
    look_hint = (
        f"; {', '.join(lookalikes)} look{'s' if len(lookalikes) == 1 else ''} like a relative with permuted hidden "
        "units (its rows match the child's one to one): try method 'aligned'"
        if lookalikes
        else ""
    )
    if best.score > family_threshold:
        hint = " (hidden units may have been permuted: try method 'aligned')" if method.name == "weights" else ""
        result.reason = (
            f"no candidate is related: the nearest, {best.model.name}, scores {best.score:.3g} > the "
            f"family threshold {family_threshold:g}{look_hint or hint}"
        )
        return result
    runner = (
        f"; runner-up {scored[1].model.name} at {scored[1].score:.3g}, margin {result.margin:.3g}"
        if len(scored) > 1 and result.margin is not None
        else ""
    )
    if not path_ok:
        result.parent = best.model.name
        result.chain = [best.model.name]
        result.reason = f"{best.model.name} is the nearest related candidate (score {best.score:.3g}{runner})"
        result.tree = [TreeEdge(c.name, best.model.name, best.score, "chain")]
        return result

    related = [s for s in scored if s.score <= family_threshold][: max(2, max_family)]
    by_name = {s.model.name: s for s in related}
    pair_cache: dict[tuple[int, int], dict[str, float]] = {}

    def diffs(a: str, b: str) -> dict[str, float]:
        if c.name in (a, b):
            o = by_name[b if a == c.name else a]
            return {n: norms[n].diff[o.model.index] for n in o.q}
        return _pair_distance(by_name[a], by_name[b], norms, pair_cache, max_dim)[1]

    def dist(a: str, b: str) -> float:
        if c.name in (a, b):
            return by_name[b if a == c.name else a].score
        return _pair_distance(by_name[a], by_name[b], norms, pair_cache, max_dim)[0]

    def behind(cur: str, a: str, b: str) -> float:
        """Does the path from ``cur`` to ``b`` run through ``a``? (~1 yes, ~0 ``a`` is a side branch)."""
        da, db, dab = diffs(cur, a), diffs(cur, b), diffs(a, b)
        vals = []
        for n, d in dab.items():
            if d <= 0 or n not in da or n not in db:
                continue
            p = 1.0 if norms[n].kind == NUCLEAR else 2.0
            vals.append(((db[n] ** p - da[n] ** p) / d**p, _weight(tuple(c.source.shape(n)))))
        return _weighted_median(vals) if vals else math.nan

    # the directed model graph of the child and its relatives: direction, merges, descendants
    every_related = [s for s in scored if s.score <= family_threshold]
    graph = _family_graph(c, every_related, family_threshold)
    by_name |= {s.model.name: s for s in every_related}
    rel = {cs.name: graph.relation(c.name, cs.name) for cs in cands if graph is not None and cs.name in by_name}
    if graph is not None and not graph.directed(c.name):
        # who descends from whom is not known where the direction was not calibrated: merges only
        rel = {k: v if v in ("merge of it", "merge component", "unrelated") else "relative" for k, v in rel.items()}
    for cs in cands:
        cs.relation = rel.get(cs.name)
    if graph is not None and c.name in graph.merges:
        mn = graph.merges[c.name]
        result.merge_of = dict(mn.components)
        parts = ", ".join(f"{k} ({v:.2f})" for k, v in mn.components.items())
        result.reason = (
            f"the child is a merge of {parts}" + (f" on base {mn.base}" if mn.base else "")
            + f" (fit residual {mn.residual:.2f}): it has several parents, not one"
        )
        result.tree = [TreeEdge(c.name, k, dist(c.name, k), "chain") for k in mn.components]
        return result
    from metanets.lineage.graph import WEAK_NEED

    # a merge the child is only a weak component of may be the child's parent (a light fine-tune of the merge)
    weak = {
        n for n, r in rel.items()
        if r == "merge of it" and graph is not None and graph.merges[n].need.get(c.name, math.inf) < WEAK_NEED
    }
    # descendants only where the family's direction was calibrated on its own leaves; merges of it always
    young_kinds = ("descendant", "child", "merge of it") if graph is not None and graph.directed(c.name) else (
        "merge of it",
    )
    younger = {n for n, r in rel.items() if r in young_kinds} - weak
    if graph is not None and graph.parent(c.name) is None and younger:
        result.reason = (
            f"the related candidates are the child's descendants or merges of it ({', '.join(sorted(younger))}), "
            "not its ancestors: the parent is probably not among the candidates"
        )
        result.tree = [TreeEdge(e.child, e.parent, e.distance, "family") for e in graph.edges if e.kind == "fine-tune"]
        result.tree = _acyclic(result.tree)
        return result
    # the nearest is younger than the child (or a merge): the nearest candidate that is not, unless it is a merge
    # the child is only a weak part of (it stays the answer, subject to the path test)
    if graph is not None and best.model.name not in weak and best.model.name in younger | set(graph.merges):
        best = next((s for s in every_related if s.model.name not in younger | set(graph.merges)), best)
    name = best.model.name
    path_val, path_from = math.nan, None
    # seen from the parent's other relatives (not the child's descendants or merges); where the directed graph
    # agrees that it is the parent, from its ancestors only (its other children and its siblings share
    # updates with the child or with it, which the statistic would read as a side branch)
    agreed = graph is not None and graph.directed(c.name) and graph.parent(c.name) == name
    viewers = set(graph.ancestors(name)) if agreed else None
    for other in every_related if agreed else related:
        o = other.model.name
        if o in (name, *younger) or o in (graph.merges if graph else {}):
            continue
        if viewers is not None and o not in viewers:
            continue
        if dist(name, other.model.name) > family_threshold:
            continue
        rho = behind(c.name, name, other.model.name)
        if math.isfinite(rho) and (not math.isfinite(path_val) or rho < path_val):
            path_val, path_from = rho, other.model.name
    chosen = next(cs for cs in cands if cs.name == name)
    chosen.path = path_val if math.isfinite(path_val) else None
    family = [s.model.name for s in related]
    if graph is not None:  # the graph's directed edges among the candidates (the child's own are drawn apart)
        edges = [(e.parent, e.child, e.distance) for e in graph.edges if c.name not in (e.parent, e.child)]
    else:
        edges = _mst(family, dist)
    if math.isfinite(path_val) and path_val < path_threshold:
        result.reason = (
            f"{name} is related (score {best.score:.3g}) but not an ancestor: seen from its relative "
            f"{path_from}, the child does not lie behind it (path {path_val:.3g} < {path_threshold:g}); "
            "the parent is probably not among the candidates"
        )
        result.tree = [TreeEdge(c.name, name, best.score, "guess")] + [TreeEdge(a, b, d) for a, b, d in edges]
        return result
    result.parent = name
    if chosen.relation is not None:
        chosen.relation = "parent"
    if best is not scored[0]:
        near = scored[0].model.name
        runner = f"; nearest candidate {near} ({scored[0].score:.3g}) is its {rel.get(near)}"
    if math.isfinite(path_val):
        test = (
            f"; the child lies behind it as seen from {path_from} (path {path_val:.3g} >= {path_threshold:g})"
        )
    else:
        test = "; path test not applicable (no relative of it among the candidates)"
    what = (
        "the nearest related candidate"
        if best is scored[0]
        else "the nearest related candidate that is not the child's descendant or a merge of it"
    )
    result.reason = f"{name} is {what} (score {best.score:.3g}{runner}){test}{look_hint}"
    if graph is not None:
        result.chain = [name] + [a for a in graph.ancestors(name) if a in by_name]
    else:
        result.chain = _chain(name, family, dist, behind, CHAIN_THRESHOLD)
    links = list(zip(result.chain, result.chain[1:], strict=False))
    on_chain = {frozenset(e) for e in links}
    result.tree = [TreeEdge(c.name, name, best.score, "chain")]
    result.tree += [TreeEdge(a, b, dist(a, b), "chain") for a, b in links]
    result.tree += [TreeEdge(a, b, d) for a, b, d in edges if frozenset((a, b)) not in on_chain]
    # the drawing is a tree: drop family edges that would close a cycle with the chain
    result.tree = _acyclic(result.tree)
    return result


def _permuted_lookalikes(
    c: Model, scored: list[Scored], cands: list[CandidateScore], family_threshold: float
) -> list[str]:
    """Unrelated-looking candidates whose rows match the child's one to one (:mod:`.lookalike`); flagged
    ``permuted`` on their :class:`CandidateScore`."""
    from metanets.lineage.lookalike import LOOKALIKE, permuted_match

    out = []
    for s, cs in zip(scored, cands, strict=True):
        if s.score <= family_threshold:
            continue
        match = permuted_match(c.source, s.model.source, s.pairing.shared)
        cs.metrics["row_match"] = match
        if match >= LOOKALIKE:
            cs.permuted = True
            out.append(s.model.name)
    return out


def _family_graph(c: Model, related: list[Scored], family_threshold: float) -> Any:
    """The model graph of the child and its related candidates (None with fewer than two of them: a
    lone candidate's answer needs no direction)."""
    from metanets.lineage.graph import graph_of_models

    if len(related) < 2 or any(s.score == 0 for s in related):  # an identical copy is the answer as it is
        return None
    models = [Model(c.name, c.ref, c.source)] + [Model(s.model.name, s.model.ref, s.model.source) for s in related]
    g = graph_of_models(models, family_threshold=max(family_threshold, 0.8), workers=1, sample=1 << 16)
    if c.name not in g.models or len(g.clusters[g.cluster_of(c.name)]) < 2:
        return None
    return g


def _decide_learned(result: LineageResult, scored: list[Scored]) -> LineageResult:
    """The detector's own open set: the most probable candidate, unless "no parent" is more probable."""
    best = scored[0]
    p_none = float(best.extra.get("p_none", 0.0))
    p_best = 1.0 - best.score
    result.thresholds = {
        "rule": "softmax of the detector over the candidates and 'no parent': the most probable candidate is the "
        "parent if it is more probable than 'no parent'; score = 1 - p(candidate)",
        "p_none": round(p_none, 6),
    }
    for cs, s in zip(result.candidates, scored, strict=True):
        cs.related = 1.0 - s.score > p_none
    p_second = 1.0 - scored[1].score if len(scored) > 1 else 0.0
    result.margin = math.log(p_best / p_second) if p_second > 0 and p_best > 0 else None
    if p_best <= p_none:
        result.reason = (
            f"the detector finds 'no parent' most probable (p = {p_none:.3g}; best candidate "
            f"{best.model.name} at p = {p_best:.3g})"
        )
        return result
    result.parent = best.model.name
    result.chain = [best.model.name]
    result.reason = f"the detector gives {best.model.name} p = {p_best:.3g} ('no parent' p = {p_none:.3g})"
    result.tree = [TreeEdge(result.child, best.model.name, best.score, "chain")]
    return result


def _acyclic(edges: list[TreeEdge]) -> list[TreeEdge]:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    out = []
    for e in edges:  # chain edges come first and are always kept
        ra, rb = find(e.a), find(e.b)
        if ra != rb:
            parent[ra] = rb
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------------
