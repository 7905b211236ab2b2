"""DELLA: task vectors pruned by magnitude-ranked random drops (MAGPRUNE), then merged.

Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024 (arXiv:2406.11617), §3 (MAGPRUNE). Each entry of a task vector
τ_t = θ_t − θ_0 is kept with a probability that grows with its magnitude rank:

    p_i = (density − ε) + 2ε · r_i / (B − 1),     m_i ~ Bernoulli(p_i),

where r_i ∈ {0, …, B − 1} is the rank of |τ_i| among the B entries of its *row* (ascending, along
dim 1 as in mergekit 0.1.5's ``della_magprune``; a 1-D tensor is one row), so the kept fraction is
``density`` on average and large entries survive more often. Then, as mergekit does, the kept
entries are rescaled (``rescale``, default on) to the L1 norm of the whole un-pruned tensor,
τ̃ = m ⊙ τ · ‖τ‖₁ / ‖m ⊙ τ‖₁ (no rescale when either norm is below 1e-7), and the pruned task
vectors are combined like the rest of the task-vector family: ``della`` with TIES sign election
and the disjoint mean (``normalize``), ``della_linear`` as a weighted sum.

Streaming: the ranks are per row, so a row chunk holds everything they need (1-D tensors are
ranked whole). The L1 rescale needs the whole tensor's kept mass, which depends on the random
masks, so the statistics pass draws the masks (with the same per-chunk generators the method gets,
seeded from the recipe seed, the tensor name and the chunk index), sums ‖τ‖₁ and ‖m ⊙ τ‖₁, and
keeps each chunk's mask as packed bits (n/8 bytes per model); the merge pass then applies them
without ranking or drawing again. The ranking is one sort per row of the unique int64 keys
``bits(|τ|) << 32 | column`` (ties ranked by column, whatever sort runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from merge.errors import RecipeError
from merge.methods._sparsify import _rescale_factor
from merge.methods.registry import ChunkSource, Fraction, PerModel, Variant, merge_method, merge_variant, whole
from merge.methods.task_arithmetic import _check_density, _deltas, _n_models, _per_model, combine

_PAPER = "Deep, Bhardwaj & Poria, DELLA-Merging: Reducing Interference in Model Merging, 2024"
_URL = "https://arxiv.org/abs/2406.11617"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D [rows, B] tensor whose rows are the ranking groups (dim 1 last)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(1, -1)
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _unrows(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rows` for a mask of the same number of elements."""
    if like.dim() <= 2:
        return m.reshape(like.shape)
    moved = (*like.shape[:1], *like.shape[2:], like.shape[1])
    return m.reshape(moved).movedim(-1, 1)


def keep_probabilities(width: int, density: float, epsilon: float) -> torch.Tensor:
    """p_j = (density − ε) + 2ε · j / (B − 1) for ascending magnitude rank j of a row of B entries.

    A row of one entry keeps it with probability ``density`` (mergekit 0.1.5 fails there: 0/0).
    """
    if width <= 1:
        return torch.full((max(width, 1),), float(density), dtype=torch.float32)
    ramp = torch.arange(width, dtype=torch.float32) / (width - 1)
    return (density - epsilon) + ramp * 2 * epsilon


def magprune_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probabilities (float32, shape of ``delta``) from the magnitude ranks in each row.

    Ranks come from sorting, per row, the int64 keys ``bits(|τ|) << 32 | column``: unique keys, so any sort
    gives the same order (ties ranked by column) and numpy's vectorised sort can be used (~30x faster
    here than ``torch.sort`` of the same keys).
    """
    mags = _rows(delta.abs())
    rows, width = mags.shape
    ramp = keep_probabilities(width, density, epsilon).to(delta.device)
    if width <= 1:
        return _unrows(ramp.expand(rows, 1), delta).clone()
    key = mags.float().contiguous().view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    key.bitwise_or_(torch.arange(width, dtype=torch.int64, device=delta.device))
    if key.device.type == "cpu":
        order = torch.from_numpy(np.sort(key.numpy(), axis=1)).bitwise_and_(0xFFFFFFFF)
    else:
        order = torch.sort(key, dim=1).values.bitwise_and_(0xFFFFFFFF)
    del key
    probs = torch.empty((rows, width), dtype=torch.float32, device=delta.device)
    probs.scatter_(1, order, ramp.expand(rows, width))
    return _unrows(probs, delta)


def magprune_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None
) -> torch.Tensor:
    """MAGPRUNE's random keep mask (bool, shape of ``delta``): ``U < p(rank of |τ| in its row)``."""
    probs = magprune_probs(delta, density, epsilon)
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device)
    return u < probs


def _pack(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.reshape(-1).cpu().numpy())


def _unpack(bits: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    flat = np.unpackbits(bits, count=like.numel()).view(np.bool_)
    return torch.from_numpy(flat).reshape(like.shape).to(like.device)


@dataclass(frozen=True)
class DellaStats:
    """Per model: ``keep`` (τ unchanged), ``zero``, or ``mask`` with one packed mask per chunk and
    the L1 rescale factor (None: no rescale)."""

    modes: tuple[str, ...]
    masks: tuple[tuple[np.ndarray, ...] | None, ...]
    scales: tuple[float | None, ...]


def _check(params: dict[str, Any], where: str = "", method: str = "della") -> None:
    density = params.get("density", 1.0)
    epsilon = params.get("epsilon", 0.15)
    n = len(density) if isinstance(density, list) else (len(epsilon) if isinstance(epsilon, list) else 1)
    dens = _per_model(density, n, "density", method)
    eps = _per_model(epsilon, n, "epsilon", method)
    _check_density(dens, method)
    for i, (d, e) in enumerate(zip(dens, eps, strict=True)):
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise RecipeError(
                f"{where}method '{method}': model {i + 1}: density ± epsilon must lie in (0, 1), "
                f"got density {d} and epsilon {e}"
            )


def _della_stats(
    chunks: ChunkSource,
    *,
    density: Any = 1.0,
    epsilon: Any = 0.15,
    rescale: bool = True,
    generators: Callable[[int], torch.Generator | None] | None = None,
) -> DellaStats:
    n = _n_models(chunks, density, epsilon)
    dens = _per_model(density, n, "density", "della")
    eps = _per_model(epsilon, n, "epsilon", "della")
    _check({"density": dens, "epsilon": eps})
    modes = tuple("keep" if d >= 1 else "zero" if d <= 0 else "mask" for d in dens)
    active = [i for i, m in enumerate(modes) if m == "mask"]
    masks: list[list[np.ndarray]] = [[] for _ in range(n)]
    total = [0.0] * n
    kept = [0.0] * n

    def add(i: int, delta: torch.Tensor, mask: torch.Tensor) -> None:
        mags = delta.abs_()
        total[i] += float(mags.sum(dtype=torch.float64))
        kept[i] += float((mags * mask).sum(dtype=torch.float64))
        masks[i].append(_pack(mask))

    it = chunks() if active else iter(())
    first = next(it, None)
    if first is not None and first[1] is not None and first[1].dim() <= 1:
        # a 1-D tensor is one ranking row: rank it whole (1-D tensors are small), draw chunk by chunk
        parts = [first, *it]
        base = torch.cat([b.reshape(-1) for _, b in parts])
        sizes = [b.numel() for _, b in parts]
        probs = {
            i: magprune_probs(torch.cat([t[i].reshape(-1) for t, _ in parts]) - base, dens[i], eps[i])
            for i in active
        }
        off = 0
        for ci, (tensors, b) in enumerate(parts):
            g = generators(ci) if generators is not None else None
            for i in active:
                u = torch.rand(b.shape, generator=g, dtype=torch.float32, device=b.device)
                add(i, tensors[i] - b, u < probs[i][off : off + sizes[ci]].reshape(b.shape))
            off += sizes[ci]
    elif first is not None:
        for ci, (tensors, b) in enumerate(_chain(first, it)):
            assert b is not None
            g = generators(ci) if generators is not None else None
            for i in active:
                delta = tensors[i] - b
                add(i, delta, magprune_mask(delta, dens[i], eps[i], g))
    scales = tuple(
        _rescale_factor(total[i], kept[i]) if rescale and modes[i] == "mask" else None for i in range(n)
    )
    return DellaStats(
        modes, tuple(tuple(m) if modes[i] == "mask" else None for i, m in enumerate(masks)), scales
    )


def _chain(first: Any, rest: Any) -> Any:
    yield first
    yield from rest


def _della(
    method: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Any,
    density: Any,
    epsilon: Any,
    rescale: bool,
    stats: DellaStats | None,
    generator: torch.Generator | None,
    chunk: int,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    deltas = _deltas(tensors, base, method)
    assert base is not None
    if not deltas:
        return base.clone()
    if stats is None:
        stats = _della_stats(
            whole(tensors, base),
            density=_per_model(density, len(deltas), "density", method),
            epsilon=epsilon,
            rescale=rescale,
            generators=lambda _i: generator,
        )
        chunk = 0
    w = _per_model(weight, len(deltas), "weight", method)
    out = []
    for i, d in enumerate(deltas):
        mode = stats.modes[i]
        if mode == "zero":
            d = torch.zeros_like(d)
        elif mode == "mask":
            masks = stats.masks[i]
            assert masks is not None
            d.mul_(_unpack(masks[chunk], d))
            if stats.scales[i] is not None:
                d.mul_(stats.scales[i])
        out.append(d)
    return combine(out, w, base, consensus=consensus, normalize=normalize, lambda_=lambda_)


@merge_method(
    "della",
    paper=_PAPER,
    url=_URL,
    base="required",
    min_models=1,
    stats=_della_stats,
    check=lambda p, where: _check(p, where, "della"),
)
def della(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Fraction] = 1.0,
    epsilon: PerModel[float] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = True,
    int8_mask: bool = False,
    stats: DellaStats | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 0,
    method: Variant[str] = "della",
    consensus: Variant[bool] = True,
) -> torch.Tensor:
    """DELLA: MAGPRUNE each τ_t (keep w.p. (density − ε) + 2ε·rank/(B−1) per row), rescale, TIES.

    Deep et al., §3: drop probabilities from magnitude ranks, then the kept entries are rescaled
    (mergekit: to the L1 norm of τ_t) and merged with TIES's sign election and disjoint mean
    (``normalize``, on by default); θ = θ_0 + λ τ_m. ``density >= 1`` keeps τ_t whole (no draw),
    ``density <= 0`` drops it; otherwise density ± epsilon must lie in (0, 1).
    """
    return _della(
        method,
        tensors,
        base,
        weight=weight,
        density=density,
        epsilon=epsilon,
        rescale=rescale,
        stats=stats,
        generator=generator,
        chunk=chunk,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
    )


della_linear = merge_variant(
    "della_linear",
    della,
    fixed={"method": "della_linear", "consensus": False},
    defaults={"normalize": False},
    summary="DELLA without sign election: MAGPRUNE and rescale each τ_t, then θ = θ_0 + λ Σ_t w_t τ̃_t.",
    check=lambda p, where: _check(p, where, "della_linear"),
)
