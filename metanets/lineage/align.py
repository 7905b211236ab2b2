"""The ``aligned`` lineage method: align every candidate to the child by Git Re-Basin weight matching first.

Renaming nothing but permuting hidden units (an MLP's neurons, a CNN's channels, a transformer's
residual features, heads and FFN units) leaves a network's function unchanged and hides lineage from
any comparison of weights by position. Weight matching (Ainsworth, Hayase & Srinivasa, "Git
Re-Basin", ICLR 2023, §3.2, Algorithm 1; :func:`merge.rebasin.matching.weight_matching`) finds the
permutations π maximising ``Σ_k ⟨θ_c[k], π(θ_p)[k]⟩``; the candidate is then compared as ``π(θ_p)``.

The spec comes from ``spec`` (a :class:`~merge.symmetry.PermutationSpec` or a JSON file),
``architecture`` (``mlp``, ``cnn``, ``resnet``, ``transformer`` with ``n_heads``), or the child
itself: ``transformer`` with the head count of a ``config.json`` next to it, else a feed-forward
chain (:func:`~merge.symmetry.mlp_spec`). Each candidate is matched on the tensors it shares with
the child (heads and resized tensors left out, so a new head does not steer the matching); a
candidate whose shapes do not fit the spec is incomparable and skipped with the reason.

Matching holds the permuted tensors of the child and one candidate in memory in float32 (unlike
``weights``, which streams).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merge.checkpoint import TensorSource
from merge.errors import InvalidArgumentError, WeightsmithError
from merge.symmetry import PermutationSpec, build_spec, mlp_spec, resolve_spec
from metanets.lineage.stats import Pairing, PermutedSource, read

if TYPE_CHECKING:
    from metanets.lineage.model import Model


def _config_heads(path: Path | None) -> int:
    if path is None:
        return 0
    folder = path if path.is_dir() else path.parent
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    n = cfg.get("num_attention_heads") or cfg.get("n_head") or cfg.get("num_heads") or 0
    return int(n) if isinstance(n, int) else 0


def child_spec(child: Model, spec: Any, architecture: str | None, n_heads: int) -> PermutationSpec:
    """The permutation spec of the child (see the module docstring)."""
    shapes = {n: child.source.shape(n) for n in child.source.keys()}
    if spec is not None or architecture:
        heads = n_heads or (_config_heads(child.path) if architecture == "transformer" else 0)
        return resolve_spec(shapes, spec=spec, architecture=architecture, n_heads=heads, check=False)
    heads = n_heads or _config_heads(child.path)
    if heads:
        return build_spec("transformer", shapes, n_heads=heads)
    try:
        return mlp_spec(shapes)
    except WeightsmithError as e:
        raise InvalidArgumentError(
            f"method 'aligned': cannot build a permutation spec for the child from its tensor names ({e}); "
            "pass architecture= (mlp, cnn, resnet, transformer with n_heads) or spec= (a JSON spec)"
        ) from None


def restrict(spec: PermutationSpec, keep: set[str]) -> PermutationSpec:
    """The spec on the tensors in ``keep`` only (permutations that no kept tensor carries vanish)."""
    names = [k for k in spec.axes_to_perm if k in keep]
    axes = {k: spec.axes_to_perm[k] for k in names}
    used = {p for a in axes.values() for p in a if p is not None}
    return PermutationSpec(
        axes,
        {k: spec.shapes[k] for k in names},
        views={k: v for k, v in spec.views.items() if k in axes},
        heads={p: h for p, h in spec.heads.items() if p in used},
    )


def fixed_fraction(perms: Mapping[str, torch.Tensor]) -> float:
    """Share of hidden units a permutation leaves in place."""
    total = sum(v.numel() for v in perms.values())
    fixed = sum(int((v == torch.arange(v.numel())).sum()) for v in perms.values())
    return fixed / total if total else 1.0


def align_candidates(
    child: Model,
    models: list[Model],
    pairings: dict[int, Pairing],
    *,
    spec: Any = None,
    architecture: str | None = None,
    n_heads: int = 0,
    max_iter: int = 100,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[int, TensorSource], dict[int, dict[str, Any]], dict[int, str], PermutationSpec]:
    """Weight-match every candidate to the child: ``(aligned sources, extras, incomparable, spec)``."""
    from merge.rebasin.matching import weight_matching

    full = child_spec(child, spec, architecture, n_heads)
    sources: dict[int, TensorSource] = {}
    extra: dict[int, dict[str, Any]] = {}
    bad: dict[int, str] = {}
    for i, m in enumerate(models):
        if progress is not None:
            progress("aligning candidates", i, len(models))
        keep = {k for k in pairings[m.index].shared if k in full.axes_to_perm}
        try:
            sub = restrict(full, keep)
            permuted = sub.permuted_tensors()
            if not permuted:
                bad[m.index] = (
                    "incomparable under the permutation spec: it shares none of the permuted tensors"
                )
                continue
            for k in permuted:
                if m.source.shape(k) != sub.shapes[k]:
                    raise InvalidArgumentError(
                        f"tensor '{k}' has shape {list(m.source.shape(k))}, the spec expects "
                        f"{list(sub.shapes[k])}"
                    )
            a = {k: read(child.source, k).float() for k in permuted}
            b = {k: read(m.source, k).float() for k in permuted}
            res = weight_matching(sub, a, b, max_iter=max_iter)
        except WeightsmithError as e:
            bad[m.index] = f"incomparable under the permutation spec: {e}"
            continue
        sources[m.index] = PermutedSource(m.source, sub, res.perms)
        extra[m.index] = {"fixed_fraction": fixed_fraction(res.perms), "match_seconds": res.seconds}
        del a, b
    if progress is not None:
        progress("aligning candidates", len(models), len(models))
    return sources, extra, bad, full
