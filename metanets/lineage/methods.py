"""Lineage methods: how :func:`metanets.lineage.api.detect_lineage` scores candidates, as a registry.

Like merge methods (:mod:`merge.methods.registry`), each lineage method describes itself once
(:class:`LineageMethod`: name, summary, paper, what it needs) and the library, the CLI
(``weightsmith lineage --method``) and the service (``LineageService.ListLineageMethods``) list the
registry instead of repeating the names. A method turns the child and its comparable candidates
(a :class:`Scoring`) into one :class:`~metanets.lineage.model.Scored` per candidate; the answer
(family threshold, path test, chain) is :mod:`metanets.lineage.api`'s.

``weights`` and ``aligned`` score by streamed per-tensor distances (Yu & Wang, "Neural Lineage",
CVPR 2024, the data-free setting; the score is the weighted geometric mean of
``q_k = N(θ_c − θ_p)_k / N(θ_c)_k``), ``aligned`` after Git Re-Basin weight matching of each
candidate to the child (Ainsworth et al., ICLR 2023, Algorithm 1); ``probe`` compares the models'
representations on a probe batch (the paper's linearised fine-tuning approximation); ``learned``
uses a detector trained on a lineage zoo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from merge.checkpoint import TensorSource
from merge.errors import InvalidArgumentError, WeightsmithError
from metanets.lineage.model import Model, Scored
from metanets.lineage.result import LayerEvidence, Skipped
from metanets.lineage.stats import Pairing, TensorNorms, read, stream_distances

Progress = Callable[[str, int, int], None]
Q_FLOOR = 1e-4
VECTOR_WEIGHT = 0.1


@dataclass
class Scoring:
    """What a method scores: the child, its comparable candidates and their tensor pairings, the
    call's options. A method may drop candidates (``candidates``, with a reason in ``skipped``), and
    records what it used in ``params`` and, for distance methods, the per-tensor norms in ``norms``."""

    child: Model
    candidates: list[Model]
    pairings: dict[int, Pairing]
    skipped: list[Skipped]
    progress: Progress | None
    options: dict[str, Any]
    params: dict[str, Any]
    norms: dict[str, TensorNorms] = field(default_factory=dict)


@dataclass(frozen=True)
class LineageMethod:
    name: str
    summary: str
    paper: str
    score: Callable[[Scoring], list[Scored]]
    #: keyword arguments of ``detect_lineage`` the method cannot do without
    needs: tuple[str, ...] = ()
    #: what a service request must or may carry for it; None: not served (it needs Python code)
    service_needs: tuple[str, ...] | None = ()
    #: scores from streamed weight distances: the path test, the chain and ``bytes_read`` apply
    reads_weights: bool = False
    #: the family threshold decides "none of them" (False: the method answers that itself)
    open_set_by_threshold: bool = True

    def check(self, options: Mapping[str, Any]) -> None:
        missing = [k for k in self.needs if options.get(k) is None]
        if missing:
            raise InvalidArgumentError(f"method '{self.name}' needs {' and '.join(missing)} ({self.summary})")


_REGISTRY: dict[str, LineageMethod] = {}


def register(method: LineageMethod) -> LineageMethod:
    _REGISTRY[method.name] = method
    return method


def get_lineage_method(name: str) -> LineageMethod:
    """The lineage method ``name``; InvalidArgumentError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidArgumentError(
            f"detect_lineage: unknown method '{name}' (known: {', '.join(_REGISTRY)})"
        ) from None


def lineage_methods(served: bool = False) -> list[LineageMethod]:
    """Every lineage method, in registration order (``served``: only those a service request can use)."""
    return [m for m in _REGISTRY.values() if not served or m.service_needs is not None]


# ---------------------------------------------------------------------------------------------
# Distances (weights, aligned)
# ---------------------------------------------------------------------------------------------


def _weight(shape: tuple[int, ...]) -> float:
    return 1.0 if len(shape) >= 2 else VECTOR_WEIGHT


def _geo_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted geometric mean of per-tensor distances, each floored at ``Q_FLOOR`` (exactly 0 if all are)."""
    if values and all(v == 0 for v in values.values()):
        return 0.0
    num = sum(weights[k] * math.log(max(v, Q_FLOOR)) for k, v in values.items())
    den = sum(weights[k] for k in values)
    return math.exp(num / den) if den > 0 else math.inf


def _score_norms(
    child: Model, models: list[Model], pairings: dict[int, Pairing], norms: dict[str, TensorNorms]
) -> list[Scored]:
    shapes = {n: child.source.shape(n) for n in norms}
    weights = {n: _weight(shapes[n]) for n in norms}
    total = sum(
        math.prod(child.source.shape(n))
        for n in child.source.keys()
        if child.source.dtype(n).is_floating_point
    )
    best_q: dict[str, float] = {}
    for n, tn in norms.items():
        if tn.child > 0 and tn.diff:
            best_q[n] = min(tn.diff.values()) / tn.child
    out = []
    for m in models:
        q: dict[str, float] = {}
        layers: list[LayerEvidence] = []
        votes = 0.0
        for n in pairings[m.index].shared:
            tn = norms.get(n)
            if tn is None or tn.child <= 0 or m.index not in tn.diff:
                continue
            q[n] = tn.diff[m.index] / tn.child
            nearest = q[n] <= best_q[n] * (1 + 1e-12)
            votes += weights[n] if nearest else 0.0
            layers.append(LayerEvidence(n, tn.kind, q[n], tn.fro_rel[m.index], nearest))
        wsum = sum(weights[n] for n in q)
        covered = sum(norms[n].numel for n in q)
        out.append(
            Scored(
                m,
                _geo_mean(q, weights),
                q,
                layers,
                pairings[m.index],
                covered / total if total else 0.0,
                votes / wsum if wsum else 0.0,
            )
        )
    return out


def _distances(ctx: Scoring, extra: Mapping[int, dict[str, Any]] | None = None) -> list[Scored]:
    c, comparable, pairings = ctx.child, ctx.candidates, ctx.pairings
    ctx.norms = stream_distances(
        c.source,
        {m.index: m.source for m in comparable},
        {m.index: pairings[m.index] for m in comparable},
        spectral=ctx.params["spectral"],
        spectral_max_dim=ctx.params["spectral_max_dim"],
        workers=ctx.options["workers"],
        progress=(lambda d, t: ctx.progress("reading tensors", d, t)) if ctx.progress else None,
    )
    scored = _score_norms(c, comparable, pairings, ctx.norms)
    for s in scored:
        s.extra = dict((extra or {}).get(s.model.index, {}))
    return scored


def score_weights(ctx: Scoring) -> list[Scored]:
    """Per-tensor relative distances of the candidates as they are."""
    return _distances(ctx)


def score_aligned(ctx: Scoring) -> list[Scored]:
    """Every candidate aligned to the child by weight matching first (``fixed_fraction`` reported),
    then :func:`score_weights`; a candidate that does not fit the spec is skipped with the reason."""
    from metanets.lineage.align import align_candidates

    sources, extra, bad, spec_used = align_candidates(
        ctx.child,
        ctx.candidates,
        ctx.pairings,
        spec=ctx.options.get("spec"),
        architecture=ctx.options.get("architecture"),
        n_heads=ctx.options.get("n_heads", 0),
        progress=ctx.progress,
    )
    ctx.params["spec"] = repr(spec_used)
    for m in ctx.candidates:
        if m.index in bad:
            ctx.skipped.append(Skipped(m.name, m.ref, bad[m.index]))
    ctx.candidates = [m for m in ctx.candidates if m.index not in bad]
    for m in ctx.candidates:
        m.source = sources[m.index]
    return _distances(ctx, extra)


# ---------------------------------------------------------------------------------------------
# Probe, learned
# ---------------------------------------------------------------------------------------------


def score_probe(ctx: Scoring) -> list[Scored]:
    """Representation distances on a probe batch, ranked by ``probe_metric``."""
    from metanets.lineage.probe import PROBE_METRICS

    metric, alpha = ctx.options.get("probe_metric", "linearized"), ctx.options.get("alpha", 1.0)
    if metric not in PROBE_METRICS:
        raise InvalidArgumentError(f"probe_metric must be one of {', '.join(PROBE_METRICS)}, got {metric!r}")
    ctx.params |= {"probe_metric": metric, "alpha": alpha}
    return _score_probe(
        ctx.child, ctx.candidates, ctx.pairings, ctx.options["probe"], ctx.options["model_fn"], metric, alpha,
        ctx.skipped, ctx.progress,
    )


def score_learned(ctx: Scoring) -> list[Scored]:
    """A detector trained on a lineage zoo (:mod:`metanets.lineage.learned`)."""
    from metanets.lineage.learned import score_learned as score

    detector = ctx.options["detector"]
    ctx.params["detector"] = str(detector)
    return score(ctx.child, ctx.candidates, ctx.pairings, detector, ctx.skipped, ctx.progress)


def _full_state(src: TensorSource) -> dict[str, torch.Tensor]:
    return {k: read(src, k) for k in src.keys()}


def _score_probe(
    c: Model,
    models: list[Model],
    pairings: dict[int, Pairing],
    probe: Any,
    model_fn: Callable[[Mapping[str, torch.Tensor]], torch.nn.Module],
    metric: str,
    alpha: float,
    skipped: list[Skipped],
    progress: Progress | None,
) -> list[Scored]:
    from metanets.lineage.probe import _features, probe_distances

    child_state = _full_state(c.source)
    try:
        with torch.no_grad():
            f_c = _features(model_fn(child_state).eval(), probe)
    except WeightsmithError:
        raise
    except Exception as e:  # noqa: BLE001 - user code
        raise InvalidArgumentError(f"probe: model_fn failed on the child: {type(e).__name__}: {e}") from None
    out = []
    for i, m in enumerate(models):
        if progress is not None:
            progress("probing candidates", i, len(models))
        try:
            metrics = probe_distances(
                child_state, _full_state(m.source), model_fn, probe, alpha=alpha, child_features=f_c
            )
        except WeightsmithError as e:
            skipped.append(Skipped(m.name, m.ref, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - user code (model_fn) may raise anything
            skipped.append(Skipped(m.name, m.ref, f"model_fn failed: {type(e).__name__}: {e}"))
            continue
        out.append(Scored(m, metrics[metric], {}, [], pairings[m.index], 1.0, 0.0, {"metrics": metrics}))
    if progress is not None:
        progress("probing candidates", len(models), len(models))
    return out


NEURAL_LINEAGE = "Yu & Wang, Neural Lineage, CVPR 2024"
register(
    LineageMethod(
        "weights",
        "per-tensor relative distances (nuclear/Frobenius norms), data-free and streaming",
        NEURAL_LINEAGE,
        score_weights,
        reads_weights=True,
    )
)
register(
    LineageMethod(
        "aligned",
        "Git Re-Basin weight matching of every candidate to the child first, then 'weights' (permutation-robust)",
        f"{NEURAL_LINEAGE}; Ainsworth, Hayase & Srinivasa, Git Re-Basin, ICLR 2023",
        score_aligned,
        service_needs=("architecture or spec_ref (else built from the child's tensor names)",),
        reads_weights=True,
    )
)
register(
    LineageMethod(
        "probe",
        "representation distances on a probe batch (L2, CKA, the linearised fine-tuning approximation)",
        NEURAL_LINEAGE,
        score_probe,
        needs=("probe", "model_fn"),
        service_needs=None,
    )
)
register(
    LineageMethod(
        "learned",
        "a detector trained on a lineage zoo (metanets.lineage.learned)",
        NEURAL_LINEAGE,
        score_learned,
        needs=("detector",),
        service_needs=("detector_ref",),
        open_set_by_threshold=False,
    )
)
