"""Whole-pool lineage: recover the directed model graph (families, fine-tune edges, merges).

:func:`recover_model_graph` answers for a folder or list of models what :func:`detect_lineage`
answers for one child: who was fine-tuned from whom, which models are merges of which, and which
models are unrelated families. Following MoTHer (Horwitz, Shul, Hoshen, "On the Origin of Llamas:
Model Tree Heritage Recovery", 2024): pairwise distances, a direction signal from per-model weight
statistics, and the minimum spanning arborescence of the directed graph (Edmonds' algorithm,
networkx), one per family; extended with merge nodes (several parents) and calibrated direction.

Steps (one streamed read per model: :func:`metanets.lineage.pool.pool_stats`)
------------------------------------------------------------------------------
1. **Distance** ``d(a, b) = sqrt(mean_k ‖θ_a − θ_b‖²_k / ½(‖θ_a‖²_k + ‖θ_b‖²_k))`` over the weight
   matrices ``k`` both share: the RMS relative distance (0 for a copy, ≈√2 for independent
   initialisations of any scale). Squared, it adds up along a chain of independent updates.
2. **Families**: connected components of ``d ≤ family_threshold`` (0.8).
3. **Merges**: a member ``X`` is a merge if, for a base ``R`` of its family, its delta ``X − R`` is
   a non-negative combination of two to four other members' deltas ``P − R`` (NNLS on the Gram
   matrices; DARE's random drops and TIES' trimming leave the expected combination) with a
   relative residual ``≤ merge_threshold`` (0.3) and clearly better than any single member's
   (``≤ 0.7 ×``); or lies on the segment between two members (a linear merge without its base in the
   pool: weight 0.1–0.9). Components' shares are the fitted weights normalised to sum 1. A merge
   gets its components as parents instead of one tree parent.
4. **Direction**: per pair, ``y(a→b) ∈ [−1, 1]`` is the weighted mean over shared matrices of
   ``sign(s_b − s_a)`` for the statistic ``s`` (``norm``: log of the Frobenius norm; ``kurtosis``:
   excess kurtosis, MoTHer's). Which sign means "younger" depends on the training regime (MoTHer
   flips it by hand for continued pre-training). ``auto`` starts from the prior "the norm grows" (an
   update unrelated to the weights adds to their norm) and checks it per family on the leaves of the
   undirected minimum spanning tree (a leaf is usually a descendant of its only neighbour): a mean
   leaf vote below −0.5 overrules it with the statistic and sign the leaves agree on most. The
   agreement is recorded; :func:`detect_lineage` trusts descendants only where it is ≥ 0.2.
5. **Tree**: edge cost ``c(a→b) = d(a, b) · (1 + λ (1 − y(a→b)) / 2)`` (``λ = direction_weight``,
   default 1: a fully contradicted direction doubles the cost), minimum spanning arborescence per
   family over the non-merge members plus a virtual root (free edges to merges, so merges may
   have fine-tunes of their own). Confidence of an edge ``p→b``: ``1 − c(p→b) / c(q→b)`` for the
   cheapest other parent ``q``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from merge.errors import InvalidArgumentError, WeightsmithError
from metanets.lineage.graph_result import GraphEdge, MergeNode, ModelGraph
from metanets.lineage.model import Model
from metanets.lineage.pool import PoolStats, pool_stats

ModelRef = Any  # str | Path | Mapping[str, torch.Tensor]
STATISTICS = ("norm", "kurtosis")
MIN_SHARE = 0.1
MAX_COMPONENTS = 4
#: a member that keeps its base's entries exactly this much more often than its components: sparsified merge
SPARSE_MIN = 0.08
#: a merge must fit this much better than the best single member (relative residual ratio)
SINGLE_RATIO = 0.7
#: a linear merge without its base lies on the segment between its two components (relative residual)
SEGMENT_RESIDUAL = 0.15
#: a merge component must be needed: dropping it raises the fit's residual by more than this factor
NEEDED = 1.15
#: mean leaf vote against the prior (norm grows from parent to child) that overrules it
FLIP_VOTE = 0.5
#: a component whose need is below this may be the merge's light fine-tune rather than its part
WEAK_NEED = 1.3
#: cosines of unrelated updates below this are noise (no path penalty)
PATH_FLOOR = 0.05
#: leaf edges a family needs before its own leaves choose the direction statistic and sign
MIN_LEAVES = 3


# ---------------------------------------------------------------------------------------------
# Pairwise quantities from the pool statistics
# ---------------------------------------------------------------------------------------------


def distance_matrix(stats: PoolStats) -> np.ndarray:
    """RMS relative distance between every pair (``inf`` where they share no weight matrix)."""
    n = len(stats.names)
    acc = np.zeros((n, n))
    cnt = np.zeros((n, n))
    for g in stats.groups:
        idx = np.array(g.members)
        sq = g.sq_dist()
        scale = 0.5 * (g.sq_norm[:, None] + g.sq_norm[None, :])
        rel = np.where(scale > 0, sq / np.where(scale > 0, scale, 1.0), 0.0)
        acc[np.ix_(idx, idx)] += rel
        cnt[np.ix_(idx, idx)] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(cnt > 0, np.sqrt(acc / np.maximum(cnt, 1)), np.inf)
    np.fill_diagonal(d, 0.0)
    return d


def direction_matrix(stats: PoolStats, statistic: str) -> np.ndarray:
    """``y[a, b]``: mean over shared matrices of ``sign(s_b − s_a)`` (antisymmetric, in [-1, 1])."""
    n = len(stats.names)
    acc = np.zeros((n, n))
    cnt = np.zeros((n, n))
    for g in stats.groups:
        idx = np.array(g.members)
        s = np.log(np.maximum(g.sq_norm, 1e-300)) if statistic == "norm" else g.kurtosis
        acc[np.ix_(idx, idx)] += np.sign(s[None, :] - s[:, None])
        cnt[np.ix_(idx, idx)] += 1
    return np.where(cnt > 0, acc / np.maximum(cnt, 1), 0.0)


def family_gram(stats: PoolStats, members: Sequence[int]) -> np.ndarray:
    """Gram of the family's weights (each matrix scaled by its mean squared norm, then averaged over the
    matrices every member has): inner products of differences are read off it."""
    m = len(members)
    out = np.zeros((m, m))
    used = 0
    for g in stats.groups:
        if not all(i in g.members for i in members):
            continue
        sel = [g.members.index(i) for i in members]
        scale = float(np.mean(g.sq_norm[sel]))
        if scale <= 0:
            continue
        out += g.gram[np.ix_(sel, sel)] / scale
        used += 1
    return out / max(used, 1)


def _delta_gram(G: np.ndarray, r: int, idx: Sequence[int]) -> np.ndarray:
    """Gram of ``θ_i − θ_r`` for ``i`` in ``idx``."""
    idx = np.asarray(idx)
    return G[np.ix_(idx, idx)] - G[idx, r][:, None] - G[r, idx][None, :] + G[r, r]


def _nnls_gram(A: np.ndarray, b: np.ndarray, xx: float) -> tuple[np.ndarray, float]:
    """``min_w≥0 ‖Σ w_i p_i − x‖²`` given ``A = PᵀP``, ``b = Pᵀx``, ``xx = ‖x‖²``: (w, relative residual)."""
    k = len(b)
    jitter = 1e-10 * max(float(np.trace(A)) / max(k, 1), 1e-300)
    try:
        L = np.linalg.cholesky(A + jitter * np.eye(k))
    except np.linalg.LinAlgError:
        L = np.linalg.cholesky(A + 1e-6 * max(float(np.trace(A)), 1e-300) * np.eye(k))
    w, _ = nnls(L.T, np.linalg.solve(L, b))
    res2 = max(xx - 2 * float(w @ b) + float(w @ A @ w), 0.0)
    return w, math.sqrt(res2 / xx) if xx > 0 else math.inf


def family_equal(stats: PoolStats, members: Sequence[int]) -> list[np.ndarray]:
    """Per weight matrix every member has: the fraction of exactly equal entries between members."""
    out = []
    for g in stats.groups:
        if all(i in g.members for i in members):
            sel = [g.members.index(i) for i in members]
            out.append(g.equal[np.ix_(sel, sel)])
    return out


def sparse_excess(equal: Sequence[np.ndarray], x: int, r: int, comps: Sequence[int]) -> float:
    """How much more often ``x`` keeps base ``r``'s entries exactly than its components do, in the matrix
    where that is least (frozen matrices aside): > 0 when ``x − r`` is sparse where the components'
    deltas are not, as after TIES trimming or DARE dropping (a fine-tune changes what it trains; units
    that never train, such as dead ReLUs, stay equal in every relative alike)."""
    vals = [float(e[x, r] - max(e[c, r] for c in comps)) for e in equal if e[x, r] < 0.99]
    return min(vals) if vals else 0.0


def _fit_merge(
    G: np.ndarray,
    equal: Sequence[np.ndarray],
    x: int,
    others: Sequence[int],
    d: np.ndarray,
    neighbours: int,
    threshold: float,
    older: np.ndarray | None = None,
) -> MergeNode | None:
    """The best accepted merge explanation of member ``x`` of a family, or None (module docstring).

    ``G``: the family Gram, ``equal``: :func:`family_equal`, ``d``: distances, all in family indices;
    ``older[r, c]``: the direction signal says ``r`` is older than ``c`` (a merge's base is older than
    its components; among the members of one linear relation, only the merge has such a fit)."""
    near = sorted(others, key=lambda j: d[x, j])[:neighbours]
    fits: list[MergeNode] = []
    for r in near:
        comps = [j for j in near if j != r]
        if not comps:
            continue
        A = _delta_gram(G, r, comps)
        b = G[x, comps] - G[x, r] - G[r, comps] + G[r, r]
        xx = float(G[x, x] - 2 * G[x, r] + G[r, r])
        if xx <= 0:
            continue
        w1s = [max(b[t] / A[t, t], 0.0) if A[t, t] > 0 else 0.0 for t in range(len(comps))]
        singles = [math.sqrt(max(xx - 2 * w1 * b[t] + w1 * w1 * A[t, t], 0.0) / xx) for t, w1 in enumerate(w1s)]
        r_single = min(singles)
        w, _ = _nnls_gram(A, b, xx)
        order = [int(t) for t in np.argsort(-w) if w[t] > 0][:MAX_COMPONENTS]
        total = float(sum(w[t] for t in order))
        keep = [t for t in order if total > 0 and w[t] / total >= MIN_SHARE]
        fit: MergeNode | None = None
        if len(keep) >= 2:
            w2, res = _nnls_gram(A[np.ix_(keep, keep)], b[keep], xx)
            # drop components the fit does not need (removing one raises the residual by less than NEEDED ×)
            while len(keep) > 2:
                trials = []
                for t in keep:
                    rest = [u for u in keep if u != t]
                    wr, rr = _nnls_gram(A[np.ix_(rest, rest)], b[rest], xx)
                    trials.append((rr, t, rest, wr))
                rr, t, rest, wr = min(trials, key=lambda z: z[0])
                if rr > NEEDED * res:
                    break
                keep, w2, res = rest, wr, rr
            need = {}
            for t in keep:
                rest = [u for u in keep if u != t]
                need[str(comps[t])] = _nnls_gram(A[np.ix_(rest, rest)], b[rest], xx)[1] / max(res, 1e-12)
            sparse = sparse_excess(equal, x, r, [comps[t] for t in keep]) >= SPARSE_MIN
            ok = res <= threshold and (res <= SINGLE_RATIO * r_single or (sparse and res < r_single))
            if older is not None and not all(older[r, comps[t]] for t in keep):
                ok = False
            if ok and all(v > 0 for v in w2):
                fit = MergeNode(str(x), {str(comps[t]): float(v) for t, v in zip(keep, w2, strict=True)},
                                str(r), res, r_single, res * math.sqrt(xx), need)
        else:
            # x on the segment between r and one other member: a linear merge whose base is not in the pool
            t = int(np.argmin(singles))
            if MIN_SHARE <= w1s[t] <= 1 - MIN_SHARE and singles[t] <= SEGMENT_RESIDUAL:
                fit = MergeNode(str(x), {str(r): 1.0 - w1s[t], str(comps[t]): w1s[t]}, None, singles[t],
                                min([s for u, s in enumerate(singles) if u != t] + [1.0]), singles[t] * math.sqrt(xx))
        if fit is not None:
            fits.append(fit)
    best = None
    if fits:
        # a merge whose weights sum to 1 is an affine combination: any component can pose as the base and
        # fit as well; the fit that names the most components (the true base among them) is the merge's
        low = min(f.residual_norm for f in fits)
        close = [f for f in fits if f.residual_norm <= 1.15 * low + 1e-12]
        best = max(close, key=lambda f: (len(f.components), -f.residual_norm))
    if best is not None:
        tot = sum(best.components.values())
        best.components = {k: v / tot for k, v in sorted(best.components.items(), key=lambda kv: -kv[1])}
    return best


# ---------------------------------------------------------------------------------------------
# The library call
# ---------------------------------------------------------------------------------------------


def _components(n: int, close: np.ndarray) -> list[list[int]]:
    seen = [False] * n
    out = []
    for s in range(n):
        if seen[s]:
            continue
        comp, todo = [], [s]
        seen[s] = True
        while todo:
            i = todo.pop()
            comp.append(i)
            for j in np.nonzero(close[i])[0]:
                if not seen[j]:
                    seen[j] = True
                    todo.append(int(j))
        out.append(sorted(comp))
    return out


def _backtrack(G: np.ndarray, older: np.ndarray) -> np.ndarray:
    """``β[a, b]``: the largest cosine between the step ``b − a`` and the way back ``q − a`` to any member
    ``q`` older than ``a`` (``older[q, a]``, from the direction signal). A fine-tune's update is unrelated
    to its parent's history (``β ≈ 0``); a step from a sibling to a sibling that share an update goes
    partly back towards their parent (``β > 0``): the path test of :mod:`metanets.lineage.api` as an
    edge cost."""
    m = len(G)
    out = np.zeros((m, m))
    for a in range(m):
        # V[i, j] = <i − a, j − a>
        V = G - G[a][None, :] - G[:, a][:, None] + G[a, a]
        nrm = np.sqrt(np.maximum(np.diag(V), 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            C = V / (nrm[:, None] * nrm[None, :])
        C[~np.isfinite(C)] = 0.0
        olders = [q for q in range(m) if q != a and older[q, a]]
        for b in range(m):
            if b == a:
                continue
            qs = [q for q in olders if q != b]
            out[a, b] = max((C[b, q] for q in qs), default=0.0)
    return out


def _undirected_mst(members: list[int], d: np.ndarray) -> list[tuple[int, int]]:
    from scipy.sparse.csgraph import minimum_spanning_tree

    sub = d[np.ix_(members, members)].copy()
    sub[~np.isfinite(sub)] = 0  # no edge
    sub = np.where(sub > 0, sub, 0) + np.where((sub == 0) & ~np.eye(len(members), dtype=bool), 1e-12, 0)
    t = minimum_spanning_tree(sub).tocoo()
    return [(members[i], members[j]) for i, j in zip(t.row, t.col, strict=True)]


def _calibrate(members: list[int], d: np.ndarray, ys: Mapping[str, np.ndarray], which: str) -> tuple[str, float, float]:
    """(statistic, sign, agreement): which statistic orients the family's edges and which way.

    On the undirected minimum spanning tree, a leaf is a descendant of its only neighbour (roots with
    one child aside); the statistic and sign that agree with most leaf edges win."""
    edges = _undirected_mst(members, d)
    deg: dict[int, int] = {}
    for a, b in edges:
        deg[a] = deg.get(a, 0) + 1
        deg[b] = deg.get(b, 0) + 1
    leaf_edges = [(b, a) if deg[a] == 1 else (a, b) for a, b in edges if deg[a] == 1 or deg[b] == 1]
    names = [which] if which in STATISTICS else list(STATISTICS)
    # the prior: an update unrelated to the weights adds to their norm (Pythagoras); MoTHer's kurtosis falls
    best = (names[0], 1.0 if names[0] == "norm" else -1.0, 0.0)
    if len(leaf_edges) < MIN_LEAVES:  # too few leaves to overrule the prior (a chain's root is a leaf too)
        return (*best[:2], math.nan)
    votes = {s: float(np.mean([ys[s][p, c] for p, c in leaf_edges])) for s in names}
    first = names[0]
    prior = 1.0 if first == "norm" else -1.0
    if votes[first] * prior > -FLIP_VOTE:
        # the prior holds unless the leaves clearly contradict it (a root can be a leaf of the tree too);
        # a weak or negative agreement leaves the family undirected for detect_lineage (DIRECTED_AGREEMENT)
        return (first, prior, votes[first] * prior)
    s = max(names, key=lambda k: abs(votes[k]))
    return (s, 1.0 if votes[s] >= 0 else -1.0, abs(votes[s]))


def recover_model_graph(
    models: Sequence[ModelRef] | Mapping[str, ModelRef],
    *,
    family_threshold: float = 0.8,
    merge_threshold: float = 0.6,
    merges: bool = True,
    direction: str = "auto",
    direction_weight: float = 1.0,
    path_weight: float = 4.0,
    neighbours: int = 12,
    sample: int | None = 1 << 18,
    heads: str | Sequence[str] | None = "auto",
    exclude: Sequence[str] = (),
    resolver: Callable[[str], Any] | None = None,
    allow_pickle: bool = False,
    workers: int = 2,
    progress: Callable[[str, int, int], None] | None = None,
) -> ModelGraph:
    """The directed model graph of a pool of models (module docstring).

    ``models``: a list of paths, Hub ids or state dicts, a ``{name: model}`` mapping, or one folder
    whose sub-folders and ``*.safetensors`` files are the models. ``direction``: ``"auto"``
    (calibrated per family), ``"norm"``, ``"kurtosis"`` (MoTHer's: kurtosis falls from parent to
    child) or ``"none"``. ``sample``: matrices with more entries are compared on the same evenly spaced
    rows of every model (about this many entries; ``None``: all of them). A model that cannot be read is
    skipped with its reason (``graph.skipped``).
    """
    from metanets.lineage.model import default_resolver as _default_resolver
    from metanets.lineage.model import named_refs as _names
    from metanets.lineage.model import open_model as _open

    t0 = time.perf_counter()
    _check_options(direction, family_threshold, merge_threshold)
    items = _pool_items(models)
    resolver = resolver or _default_resolver()
    opened: list[Model] = []
    skipped: dict[str, str] = {}
    for name, ref in _names(items):
        try:
            m = _open(name, ref, resolver, allow_pickle)
        except (WeightsmithError, OSError) as e:
            skipped[name] = str(e)
            continue
        m.index = len(opened)
        opened.append(m)
    if len(opened) < 2:
        raise InvalidArgumentError(
            f"recover_model_graph: need at least two readable models, got {len(opened)}"
            + (f" (skipped: {'; '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else "")
        )
    g = graph_of_models(
        opened,
        family_threshold=family_threshold,
        merge_threshold=merge_threshold,
        merges=merges,
        direction=direction,
        direction_weight=direction_weight,
        path_weight=path_weight,
        neighbours=neighbours,
        sample=sample,
        heads=heads,
        exclude=exclude,
        workers=workers,
        progress=progress,
    )
    g.skipped = {**skipped, **g.skipped}
    g.seconds = time.perf_counter() - t0
    return g


def _check_options(direction: str, family_threshold: float, merge_threshold: float) -> None:
    if direction not in (*STATISTICS, "auto", "none"):
        raise InvalidArgumentError(
            f"recover_model_graph: direction must be auto, norm, kurtosis or none, got {direction!r}"
        )
    if not 0 < family_threshold or not 0 < merge_threshold < 1:
        raise InvalidArgumentError(
            "recover_model_graph: family_threshold must be > 0 and merge_threshold in (0, 1)"
        )


def graph_of_models(
    opened: Sequence[Model],
    *,
    family_threshold: float = 0.8,
    merge_threshold: float = 0.6,
    merges: bool = True,
    direction: str = "auto",
    direction_weight: float = 1.0,
    path_weight: float = 4.0,
    neighbours: int = 12,
    sample: int | None = 1 << 18,
    heads: str | Sequence[str] | None = "auto",
    exclude: Sequence[str] = (),
    workers: int = 2,
    progress: Callable[[str, int, int], None] | None = None,
) -> ModelGraph:
    """:func:`recover_model_graph` on models already opened (what :func:`detect_lineage` calls)."""
    import networkx as nx

    from metanets.lineage.stats import single_torch_thread

    t0 = time.perf_counter()
    _check_options(direction, family_threshold, merge_threshold)
    skipped: dict[str, str] = {}
    opened = list(opened)
    with single_torch_thread():
        stats = pool_stats(
            opened, heads=heads, exclude=exclude, workers=workers, sample=sample,
            progress=(lambda a, b: progress("read", a, b)) if progress else None,
        )
    names = [m.name for m in opened]
    n = len(names)
    for i, m in enumerate(opened):
        if not any(i in g.members for g in stats.groups):
            skipped[m.name] = "no weight matrix to compare (heads and vectors are not compared)"
    d = distance_matrix(stats)
    ys = {s: direction_matrix(stats, s) for s in STATISTICS}
    live = [i for i in range(n) if names[i] not in skipped]
    close = np.zeros((n, n), dtype=bool)
    close[np.ix_(live, live)] = d[np.ix_(live, live)] <= family_threshold
    clusters = [c for c in _components(n, close) if all(names[i] not in skipped for i in c)]
    edges: list[GraphEdge] = []
    merge_nodes: dict[str, MergeNode] = {}
    roots: list[str] = []
    calib: list[dict[str, Any]] = []
    for ci, cl in enumerate(clusters):
        if progress:
            progress("families", ci, len(clusters))
        found: dict[int, MergeNode] = {}
        G = family_gram(stats, cl) if len(cl) >= 3 else None
        if merges and G is not None:
            S = family_equal(stats, cl)
            dl = d[np.ix_(cl, cl)]
            older = None
            if direction != "none":
                stat0, sign0, _ = _calibrate(cl, d, ys, direction)
                older = (sign0 * ys[stat0])[np.ix_(cl, cl)] >= 0
            fits1 = {
                j: _fit_merge(G, S, j, [o for o in range(len(cl)) if o != j], dl, neighbours, merge_threshold, older)
                for j in range(len(cl))
            }
            first = {j for j, f in fits1.items() if f is not None}
            for j, x in enumerate(cl):
                if j not in first:
                    continue
                # refit without the other merges: a merge is made of models, not of merges of the same models
                mn = _fit_merge(
                    G, S, j, [o for o in range(len(cl)) if o != j and o not in first], dl,
                    neighbours, merge_threshold, older,
                )
                if mn is not None:
                    mn.name = names[x]
                    mn.components = {names[cl[int(k)]]: v for k, v in mn.components.items()}
                    mn.need = {names[cl[int(k)]]: v for k, v in mn.need.items()}
                    mn.base = None if mn.base is None else names[cl[int(mn.base)]]
                    found[x] = mn
            # a component of a merge is not itself a merge of the others (keep the better-fitting one)
            for x in sorted(found, key=lambda i: found[i].residual):
                if x in found and any(names[x] in found[o].components for o in found if o != x):
                    if any(found[o].residual <= found[x].residual for o in found if names[x] in found[o].components):
                        del found[x]
        tree_nodes = [i for i in cl if i not in found]
        if direction == "none":
            stat, sign, agree = "none", 1.0, math.nan
            y = np.zeros((n, n))
        else:
            stat, sign, agree = _calibrate(tree_nodes if len(tree_nodes) > 1 else cl, d, ys, direction)
            y = sign * ys[stat]
        calib.append(
            {
                "family": ci,
                "members": [names[i] for i in cl],
                "statistic": stat,
                "sign": "+" if sign > 0 else "-",
                # nan: too few leaves, the prior decided (norm grows from parent to child)
                "leaf_agreement": None if math.isnan(agree) else round(agree, 3),
            }
        )
        for x, mn in found.items():
            merge_nodes[mn.name] = mn
            for c, w in mn.components.items():
                edges.append(GraphEdge(c, mn.name, "merge", float(d[names.index(c), x]), 1.0 - mn.residual, w))

        pos = {i: j for j, i in enumerate(cl)}
        old_q = y[np.ix_(cl, cl)] > 0
        for x, mn in found.items():  # a merge's components and base are older than it, whatever the statistic
            for q in [*mn.components, *([mn.base] if mn.base else [])]:
                old_q[pos[names.index(q)], pos[x]] = True
                old_q[pos[x], pos[names.index(q)]] = False
        back = _backtrack(G, old_q) if G is not None else np.zeros((len(cl),) * 2)

        def cost(a: int, b: int, back: np.ndarray = back, pos: dict[int, int] = pos, y: np.ndarray = y) -> float:
            turn = 1.0 + path_weight * max(float(back[pos[a], pos[b]]) - PATH_FLOOR, 0.0)
            return float(d[a, b]) * (1.0 + direction_weight * (1.0 - float(y[a, b])) / 2.0) * turn

        g = nx.DiGraph()
        top = "\x00root"
        g.add_node(top)
        big = 1e6 * (1.0 + float(np.nanmax(np.where(np.isfinite(d), d, 0))))
        for b in cl:
            g.add_node(b)
            g.add_edge(top, b, weight=0.0 if b in found else big)
            if b in found:
                continue
            for a in cl:
                if a != b and a not in found and math.isfinite(d[a, b]):  # merges are leaves (docstring)
                    g.add_edge(a, b, weight=cost(a, b))
        arb = nx.minimum_spanning_arborescence(g, attr="weight")
        for a, b in arb.edges():
            if a == top:
                if b not in found:
                    roots.append(names[b])
                continue
            alts = [
                cost(q, b)
                for q in cl
                if q not in (a, b) and q not in found and math.isfinite(d[q, b])
            ]
            c_best = cost(a, b)
            conf = 1.0 - c_best / min(alts) if alts and min(alts) > 0 else 1.0
            edges.append(
                GraphEdge(names[a], names[b], "fine-tune", float(d[a, b]), max(conf, 0.0), None, float(y[a, b]))
            )
    dist = {
        (names[i], names[j]): float(d[i, j])
        for i in range(n)
        for j in range(i + 1, n)
        if math.isfinite(d[i, j])
    }
    return ModelGraph(
        models=[nm for nm in names if nm not in skipped],
        refs={m.name: m.ref for m in opened},
        clusters=[[names[i] for i in c] for c in clusters],
        edges=edges,
        merges=merge_nodes,
        roots=roots,
        distances=dist,
        params={
            "family_threshold": family_threshold,
            "merge_threshold": merge_threshold,
            "direction": direction,
            "direction_weight": direction_weight,
            "calibration": calib,
            "tensors": len(stats.groups),
            "sample": sample,
        },
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        bytes_read=stats.bytes_read,
    )


def _pool_items(models: Any) -> Any:
    """A folder of models becomes its sub-folders and ``*.safetensors`` files, by name."""
    if isinstance(models, str | Path) and Path(models).is_dir():
        folder = Path(models)
        found = {}
        for p in sorted(folder.iterdir()):
            if p.is_dir() and any(p.glob("*.safetensors")) or p.suffix == ".safetensors":
                found[p.stem if p.is_file() else p.name] = str(p)
        if len(found) < 2:
            raise InvalidArgumentError(f"recover_model_graph: '{folder}' holds fewer than two models "
                                       "(sub-folders with *.safetensors, or *.safetensors files)")
        return found
    if isinstance(models, str | Path):
        raise InvalidArgumentError(f"recover_model_graph: '{models}' is not a folder; give a list of models")
    return models
