"""Sparsifiers of task vectors: magnitude trim (TIES), outlier-and-small trim (Breadcrumbs), DARE.

Each follows mergekit 0.1.5's ``mergekit/sparsify.py`` semantics (parameter names, defaults and
edge cases), with two deliberate differences documented in ``docs/methods.md``:

* the magnitude selections are exact top-k by radix selection over row chunks
  (:mod:`merge.methods._select`), ties at the threshold kept in flat-index order, instead of a
  full ``argsort`` of the flattened tensor (whose order among exactly equal magnitudes is
  unspecified);
* DARE's ``rescale`` divides the kept entries by ``density`` (Yu et al., ICML 2024, Eq. 2),
  where mergekit 0.1.5 rescales to the L1 norm of the un-dropped vector (equal in expectation).

The two magnitude trims need whole-tensor statistics (thresholds, and the L1 norms used by
``rescale``): :func:`trim_stats` computes them from a :data:`ChunkSource` in two streaming
passes, and :meth:`Trim.apply` sparsifies one row chunk with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from merge.methods._random import ElementStream
from merge.methods._select import KEEP_NONE, TieCursor, TopK, select_top
from merge.methods.registry import ChunkSource

#: mergekit's ``rescaled_masked_tensor`` tolerance: below it, no rescaling.
RESCALE_EPS = 1e-7


def magnitude_k(density: float, numel: int) -> int | None:
    """How many entries TIES keeps: ``max(1, int(density * numel))``; None = keep all (density >= 1).

    (mergekit ``sparsify.magnitude``: density >= 1 returns the tensor, density <= 0 or an empty
    tensor returns zeros, otherwise at least one entry is kept.)
    """
    if density >= 1:
        return None
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def breadcrumbs_ks(density: float, gamma: float, numel: int) -> tuple[int, int] | None:
    """Breadcrumbs keeps the entries ranked ``[k_lo, k_hi)`` by decreasing magnitude.

    Davari & Belilovsky (arXiv:2312.06795, §3) mask out the ``gamma`` fraction of largest
    magnitudes (outliers) and the smallest ones, keeping ``density``. As in mergekit's
    ``magnitude_outliers``: ``target = int(density n)``, ``top = int(gamma n)``,
    ``bottom = max(0, n - target - top)``; the ``bottom`` smallest entries are dropped and the next
    ``target`` kept, so when ``target + top > n`` fewer than ``top`` outliers are removed.
    Returns ``(k_hi, k_lo)`` = (n - bottom, n - bottom - target), clamped to ``[0, n]``; None =
    keep all (density >= 1).
    """
    if density >= 1:
        return None
    target = int(density * numel)
    top = int(gamma * numel)
    bottom = max(0, numel - target - top)
    k_hi = min(max(numel - bottom, 0), numel)
    k_lo = min(max(numel - bottom - target, 0), numel)
    return k_hi, k_lo


@dataclass(frozen=True)
class Trim:
    """How one model's task vector is sparsified on every chunk of one output tensor.

    ``mode``: ``keep`` (unchanged), ``zero`` (all dropped) or ``mask`` (keep ``upper``'s top-k
    minus ``lower``'s top-k). ``scale``: the L1 rescale factor ``‖τ‖₁ / ‖τ ⊙ m‖₁`` (None: none).
    """

    mode: Literal["keep", "zero", "mask"]
    upper: TopK | None = None
    lower: TopK | None = None
    scale: float | None = None
    _cursors: tuple[TieCursor | None, TieCursor | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lower = self.lower if self.lower is not None and self.lower.k > 0 else None
        cursors = (TieCursor(self.upper) if self.upper is not None else None,
                   TieCursor(lower) if lower is not None else None)
        object.__setattr__(self, "_cursors", cursors)

    def apply(self, delta: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Sparsify (in place when possible) row chunk ``chunk`` of the task vector ``delta``.

        Chunks of one tensor are visited in order (0, 1, ...) the first time: where entries tied at
        a threshold straddle the cut, the ones kept are the first in flat-index order
        (:class:`~merge.methods._select.TieCursor`).
        """
        if self.mode == "keep":
            return delta
        if self.mode == "zero":
            return torch.zeros_like(delta)
        up, lo = self._cursors
        assert up is not None
        if delta.dtype != torch.float32 or not delta.is_contiguous():
            return self._apply_bool(delta, chunk)
        bits = torch.abs(delta).view(torch.int32).reshape(-1)
        r_up = up.rule(bits, chunk)
        r_lo = lo.rule(bits, chunk) if lo is not None else None
        if isinstance(r_up, int) and r_up >= KEEP_NONE:
            return delta.zero_()
        if isinstance(r_up, int) and (r_lo is None or isinstance(r_lo, int)):
            # all in int32 ops (no bool tensors, ~4x cheaper): keep where t_up <= bits (< t_lo)
            keep = None
            if r_lo is not None:
                keep = torch.sub(bits, r_lo).bitwise_right_shift_(31)  # -1 where bits < t_lo
            m = bits.sub_(r_up).bitwise_not_().bitwise_right_shift_(31)  # ~(b - t) = t - 1 - b: -1 where b >= t
            if keep is not None:
                m.bitwise_and_(keep)
            delta.view(torch.int32).reshape(-1).bitwise_and_(m)
        else:
            keep_b = r_up if isinstance(r_up, torch.Tensor) else bits >= r_up
            if r_lo is not None:
                keep_b &= ~(r_lo if isinstance(r_lo, torch.Tensor) else bits >= r_lo)
            delta.mul_(keep_b.reshape(delta.shape))  # (× a bool mask: 5x faster than masked_fill_)
        if self.scale is not None:
            delta.mul_(self.scale)
        return delta

    def _apply_bool(self, delta: torch.Tensor, chunk: int) -> torch.Tensor:
        """The same selection for other dtypes (bf16 compute): the magnitudes as float32 bits."""
        up, lo = self._cursors
        assert up is not None
        bits = delta.abs().float().contiguous().view(torch.int32).reshape(-1)
        r_up = up.rule(bits, chunk)
        keep = r_up if isinstance(r_up, torch.Tensor) else bits >= r_up
        if lo is not None:
            r_lo = lo.rule(bits, chunk)
            keep &= ~(r_lo if isinstance(r_lo, torch.Tensor) else bits >= r_lo)
        out = delta.mul_(keep.reshape(delta.shape))
        if self.scale is not None:
            out.mul_(self.scale)
        return out


def _rescale_factor(before: float | None, after: float | None) -> float | None:
    """mergekit's L1 ``rescaled_masked_tensor``: no rescale when either norm is below 1e-7."""
    if before is None or after is None or before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return before / after


def trim_stats(
    chunks: ChunkSource,
    density: list[float],
    gamma: list[float] | None = None,
    rescale: bool = False,
    numel: int | None = None,
) -> list[Trim]:
    """Per model, the magnitude trim of ``τ_t = θ_t - θ_0`` over the whole tensor (two passes).

    ``gamma is None``: TIES magnitude trim (keep the top ``density``); otherwise Breadcrumbs
    (drop the top ``gamma`` and keep the next ``density``). ``rescale``: mergekit's L1 rescale.
    ``numel`` (elements of the whole tensor, when known) lets the selection find its thresholds in
    one pass over the chunks in the usual case (:func:`~merge.methods._select.select_top`).
    """
    n = len(density)
    if gamma is not None and len(gamma) != n:
        raise ValueError(f"{n} densities but {len(gamma)} gammas")
    # which models need a selection at all (density < 1); the others do not enter the passes
    active = [i for i in range(n) if density[i] < 1 and (gamma is not None or density[i] > 0)]
    numel_box: list[int] = []

    def ks(numel: int) -> list[list[int]]:
        numel_box.append(numel)
        out = []
        for i in active:
            if gamma is None:
                k = magnitude_k(density[i], numel)
                out.append([k if k is not None else numel])
            else:
                kk = breadcrumbs_ks(density[i], gamma[i], numel)
                out.append(list(kk) if kk is not None else [numel, 0])
        return out

    def magnitudes():
        for tensors, base in chunks():
            assert base is not None
            yield [(tensors[i] - base).abs() for i in active]

    sels = select_top(magnitudes, ks, sums=rescale, numel_hint=numel, count_ties=False) if active else []
    trims: list[Trim] = []
    for i in range(n):
        if density[i] >= 1:
            trims.append(Trim("keep"))
        elif i not in active:
            trims.append(Trim("zero"))
        else:
            sel = sels[active.index(i)]
            if sel.numel == 0:
                trims.append(Trim("zero"))
                continue
            upper = sel.topk[0]
            lower = sel.topk[1] if gamma is not None else None
            scale = None
            if rescale:
                after = upper.kept_sum
                if lower is not None and after is not None and lower.kept_sum is not None:
                    after = after - lower.kept_sum
                scale = _rescale_factor(sel.total_sum, after)
            trims.append(Trim("mask", upper, lower, scale))
    return trims


def random_drop(
    delta: torch.Tensor,
    density: float,
    rescale: bool,
    generator: torch.Generator | None = None,
    *,
    stream: ElementStream | None = None,
    index: int = 0,
) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024, Eq. 2): keep each entry with probability ``density``.

    ``m ~ Bernoulli(density)``, ``τ̃ = m ⊙ τ / density`` with ``rescale`` (so ``E[τ̃] = τ``), else
    ``m ⊙ τ``. density >= 1 returns ``delta`` unchanged (no draw), density <= 0 zeros. In place on
    ``delta``. The mask comes from ``stream`` (sub-stream ``index``, one per model: the engine's
    chunk-size-independent :class:`~merge.methods._random.ElementStream`) when given, else it is
    ``U < density`` for ``U ~ Uniform[0, 1)`` drawn from ``generator`` (torch's float32 ``rand``).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if stream is not None and delta.dtype == torch.float32 and delta.is_contiguous() and delta.device.type == "cpu":
        keep = stream.keep_mask(index, delta.numel(), density)
        delta.view(torch.int32).reshape(-1).bitwise_and_(keep)
        out = delta
    elif stream is not None:
        keep = stream.keep_mask(index, delta.numel(), density).to(delta.device).reshape(delta.shape)
        out = delta.mul_(keep != 0)
    else:
        u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device)
        out = delta.mul_(u < density)
    if rescale:
        out.div_(density)
    return out


__all__ = ["RESCALE_EPS", "Trim", "breadcrumbs_ks", "magnitude_k", "random_drop", "trim_stats"]
