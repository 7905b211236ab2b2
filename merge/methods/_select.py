"""Exact top-k selection by magnitude over a stream of chunks, in bounded memory (radix select).

TIES and Model Breadcrumbs keep the ``k`` entries of a task vector with the largest magnitude
(Yadav et al., NeurIPS 2023, §3 "Trim"; Davari & Belilovsky, arXiv:2312.06795, §3). mergekit
finds them with a full ``argsort`` of the flattened tensor, which is both the hot path of a TIES
merge and impossible when the tensor is streamed in row chunks. Here the k-th largest value is
found exactly by a radix selection on the float32 bit patterns: for non-negative float32 values
(including ``+0``, subnormals and ``inf``), the order of the values is the order of their bit
patterns read as int32. So

1. pass 1 histograms the high 16 bits (sign, exponent, 7 mantissa bits) of every value with
   ``torch.bincount`` and finds the bin holding the k-th largest value;
2. pass 2 histograms the low 16 bits of the values inside that bin, which pins down the exact
   bit pattern of the k-th largest value (the *threshold*).

The selected set is ``{v > threshold}`` plus, when several entries equal the threshold, the first
ones in flat-index order (chunk 0 first, then row-major inside a chunk) until exactly ``k`` are
kept. When such tied entries straddle the cut, a third pass counts them per chunk (a compare and a
sum), so each chunk knows how many it keeps; continuous data rarely needs it. When the whole
tensor is a single chunk, pass 1 keeps it and later passes do not read it again.

Memory: two histograms (32768 and 65536 int64) per stream and selected bin, and one integer per
chunk for a straddling threshold: independent of the tensor size. (A first version kept each
chunk's sparse low-bit histogram instead of a third pass: 327 MB for one 65.5M-element
embedding at base + 3 models.)

Optionally the exact sums of the selected values are returned (for mergekit's L1 ``rescale``):
every value in a high bin ``h`` is ``base(h) + lo * ulp(h)``, so the bin's sum is
``count * base(h) + (Σ lo) * ulp(h)`` where ``Σ lo`` is an integer that float64 holds exactly.
The per-bin sums are identical however the tensor is chunked, so the totals are too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: Per chunk: one non-negative float32 tensor per stream (e.g. ``|τ_t|`` for each model t).
ValueSource = Callable[[], Iterator[list[torch.Tensor]]]

#: Work on at most this many elements at a time (fresh multi-MB temporaries page-fault).
_BLOCK_ELEMS = 1 << 20
_HI_BINS = 1 << 15  # high 16 bits of a non-negative float32: the sign bit is 0
_LO_BINS = 1 << 16
#: width of the one-pass window (:func:`_one_pass`) in high bins: 4 bins are ±1.5% of the value
_WINDOW = 4
#: in-window values are buffered and counted into the window's histogram in batches of this many
_WINDOW_FLUSH = 1 << 20


def _bits(values: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of a float32 tensor, flattened (a view when contiguous)."""
    if values.dtype != torch.float32:
        # bf16/f16 magnitudes convert exactly; float64 rounds (order kept, ties may merge)
        values = values.float()
    return values.contiguous().view(torch.int32).reshape(-1)


def _as_float(bits: int) -> float:
    """The float32 whose bit pattern is ``bits``, as a Python float."""
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _bin_base_ulp() -> tuple[torch.Tensor, torch.Tensor]:
    """Per high bin h: the value of bit pattern ``h << 16`` and the spacing of its low-bit steps."""
    h = torch.arange(_HI_BINS, dtype=torch.int32) << 16
    base = h.view(torch.float32).double()
    ulp = (h | 1).view(torch.float32).double() - base
    return base, ulp


@dataclass(frozen=True)
class TopK:
    """The ``k`` largest entries of one stream; ties at the threshold kept in flat-index order.

    ``threshold`` is the int32 bit pattern of the k-th largest value, ``n_greater`` how many
    entries are strictly larger. ``quotas[i]`` is how many entries equal to the threshold chunk
    ``i`` keeps, ``eq_counts[i]`` how many it has; both are ``None`` when every tied entry is kept.
    ``kept_sum`` is the sum of the kept values (only when sums were asked for).
    """

    k: int
    numel: int
    threshold: int
    n_greater: int
    quotas: tuple[int, ...] | None
    eq_counts: tuple[int, ...] | None
    kept_sum: float | None
    #: with ``select_top(count_ties=False)``: how many entries equal to the threshold are kept in all
    #: (in flat-index order, handed out to the chunks in order by a :class:`TieCursor`); None: all
    tie_need: int | None = None

    @property
    def threshold_value(self) -> float:
        """The k-th largest value itself (``nan`` when ``k`` is 0)."""
        return _as_float(self.threshold) if self.k > 0 else float("nan")

    def mask(self, values: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Boolean mask (shape of ``values``) of the selected entries of chunk ``chunk``.

        ``values`` must be the same float32 magnitudes the selection saw for that chunk.
        """
        if self.k <= 0:
            return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
        if self.k >= self.numel:
            return torch.ones(values.shape, dtype=torch.bool, device=values.device)
        bits = _bits(values)
        if self.tie_need is not None:
            raise ValueError("TopK.mask: ties at this threshold straddle the cut; use a TieCursor")
        if self.quotas is None:
            return (bits >= self.threshold).reshape(values.shape)
        assert self.eq_counts is not None
        return _keep_with_quota(bits, self.threshold, self.quotas[chunk], self.eq_counts[chunk]).reshape(
            values.shape
        )


def _keep_with_quota(bits: torch.Tensor, threshold: int, q: int, eq_count: int) -> torch.Tensor:
    """``bits > threshold`` plus the first ``q`` (of ``eq_count``) entries equal to it (flat order)."""
    keep = bits > threshold
    if q > 0:
        eq = bits == threshold
        if q >= eq_count:
            keep |= eq
        else:
            cut = _position_of(eq, q) + 1
            keep[:cut] |= eq[:cut]
    return keep


#: ``TieCursor.rule`` for "keep nothing": no int32 bit pattern is >= 2**31
KEEP_NONE = 1 << 31


def _count_equal(bits: torch.Tensor, value: int) -> int:
    """``(bits == value).sum()`` for non-negative int32 ``bits`` and ``value``, in integer ops (no bool tensor)."""
    x = torch.bitwise_xor(bits, value)  # 0 exactly where equal, else in (0, 2**31)
    return -int(x.sub_(1).bitwise_right_shift_(31).sum().item())


class TieCursor:
    """Walks a :class:`TopK` over its chunks in order, handing out the tied entries' quota.

    For a selection from ``select_top(count_ties=False)`` whose threshold ties straddle the cut, the
    ``tie_need`` entries equal to the threshold that are kept are the first ones in flat-index order:
    every chunk before the cut keeps all of its tied entries, the chunk holding the cut keeps the
    first few, the later chunks none. The cursor learns each chunk's count of tied entries when it
    visits it (one integer per chunk), so chunks must be visited in order the first time; a chunk
    already visited can be visited again. This replaces a third pass over the data that counted the
    tied entries of every chunk beforehand; the kept set is the same.
    """

    def __init__(self, sel: TopK) -> None:
        self.sel = sel
        self._left = [sel.tie_need or 0]  # quota left at the start of chunk i

    def rule(self, bits: torch.Tensor, chunk: int = 0) -> int | torch.Tensor:
        """What chunk ``chunk`` keeps, given its flat int32 magnitude bits: an int ``t`` (keep exactly
        ``bits >= t``; :data:`KEEP_NONE` keeps nothing) or, where the cut falls inside it, a bool mask."""
        sel = self.sel
        if sel.k <= 0:
            return KEEP_NONE
        if sel.k >= sel.numel:
            return 0
        if sel.tie_need is None:
            if sel.quotas is None:
                return sel.threshold
            assert sel.eq_counts is not None
            return _keep_with_quota(bits, sel.threshold, sel.quotas[chunk], sel.eq_counts[chunk])
        if chunk >= len(self._left):
            raise RuntimeError(f"TieCursor: chunk {chunk} visited before chunk {len(self._left) - 1}")
        left = self._left[chunk]
        out: int | torch.Tensor
        if left == 0:
            out, nxt = sel.threshold + 1, 0
        else:
            eq = _count_equal(bits, sel.threshold)
            if eq <= left:
                out, nxt = sel.threshold, left - eq
            else:
                out, nxt = _keep_with_quota(bits, sel.threshold, left, eq), 0
        if chunk == len(self._left) - 1:
            self._left.append(nxt)
        return out


_SEARCH_BLOCK = 1 << 16


def _position_of(flags: torch.Tensor, q: int) -> int:
    """Flat index of the q-th (1-based) True entry of a 1-D bool tensor holding at least q."""
    n = flags.numel()
    nb = n // _SEARCH_BLOCK
    start = 0
    if nb > 1:
        # locate the block first, so the exact search touches one block only
        counts = flags[: nb * _SEARCH_BLOCK].view(nb, _SEARCH_BLOCK).sum(1).cumsum(0)
        j = int(torch.searchsorted(counts, q).item())
        if j < nb:
            start = j * _SEARCH_BLOCK
            q -= int(counts[j - 1].item()) if j > 0 else 0
            flags = flags[start : start + _SEARCH_BLOCK]
        else:
            start = nb * _SEARCH_BLOCK
            q -= int(counts[-1].item())
            flags = flags[start:]
    return start + int(torch.nonzero(flags)[q - 1].item())


@dataclass(frozen=True)
class StreamSelection:
    """Result of :func:`select_top` for one stream: its size, total sum and one TopK per k."""

    numel: int
    total_sum: float | None
    topk: tuple[TopK, ...]


def _suffix_counts(hist: torch.Tensor) -> torch.Tensor:
    """``c[b] = Σ_{j >= b} hist[j]``."""
    return hist.flip(0).cumsum(0).flip(0)


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1 <= k <= hist.sum()) and how many lie above it."""
    c = _suffix_counts(hist)
    b = int((c >= k).sum().item()) - 1
    above = int(c[b + 1].item()) if b + 1 < hist.numel() else 0
    return b, above


class _Histogram:
    """Counts (and optionally sums of the low 16 bits) per high-16-bit bin, over many chunks.

    Small chunks are buffered and counted together, so the per-chunk cost does not include a
    32768-bin histogram each time.
    """

    _FLUSH = _BLOCK_ELEMS

    def __init__(self, bins: int, sums: bool) -> None:
        self.bins = bins
        self.sums = sums
        self.pending: list[torch.Tensor] = []
        self.n_pending = 0
        self._counts: torch.Tensor | None = None
        self._lo_sums: torch.Tensor | None = None

    def add(self, bits: torch.Tensor) -> None:
        for block in bits.split(self._FLUSH):  # big tensors in blocks: small temporaries
            self.pending.append(block)
            self.n_pending += block.numel()
            if self.n_pending >= self._FLUSH:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        bits = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending)
        self.pending, self.n_pending = [], 0
        hi = bits >> 16
        c = torch.bincount(hi, minlength=self.bins).cpu()
        self._counts = c if self._counts is None else self._counts + c
        if self.sums:
            w = torch.bincount(hi, weights=(bits & 0xFFFF).double(), minlength=self.bins).cpu()
            self._lo_sums = w if self._lo_sums is None else self._lo_sums + w

    def counts(self) -> torch.Tensor:
        self._flush()
        return self._counts if self._counts is not None else torch.zeros(self.bins, dtype=torch.int64)

    def lo_sums(self) -> torch.Tensor:
        self._flush()
        return self._lo_sums if self._lo_sums is not None else torch.zeros(self.bins, dtype=torch.float64)


def _sparse_low_histogram(bits: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct low 16 bits, counts) of the entries of ``bits`` whose high 16 bits are ``b`` (CPU)."""
    los = [(blk & 0xFFFF)[(blk >> 16) == b] for blk in bits.split(_BLOCK_ELEMS)]
    m = sum(lo.numel() for lo in los)
    if m > _LO_BINS // 8:
        h = torch.zeros(_LO_BINS, dtype=torch.int64, device=bits.device)
        for lo in los:
            h += torch.bincount(lo, minlength=_LO_BINS)
        vals = torch.nonzero(h).squeeze(1)
        return vals.cpu(), h[vals].cpu()
    lo = los[0] if len(los) == 1 else torch.cat(los)
    vals, cnt = torch.unique(lo.to(torch.int64), return_counts=True)
    return vals.cpu(), cnt.cpu()

def _window_start(values: torch.Tensor, fraction: float) -> int:
    """First bit pattern of a ``_WINDOW``-high-bin window around this chunk's ``1 - fraction`` quantile."""
    bits = _bits(values)
    hist = torch.bincount(bits >> 16, minlength=_HI_BINS).cpu()
    k = min(bits.numel(), max(1, round(fraction * bits.numel())))
    b = _locate(hist, k)[0]
    return min(max(0, b - _WINDOW // 2 + 1), _HI_BINS - _WINDOW) << 16


class _Window:
    """Exact counts of the bit patterns in ``[lo, lo + span)`` of one stream, and how many lie above.

    Per chunk: one subtraction, two compares and a gather of the (few) in-window values, in numpy
    (whose bool kernels are ~5x faster than torch's on CPU); no full histogram of the chunk, whose
    serial count loop stalls on the few hot bins of a bell-shaped distribution.
    """

    def __init__(self, lo: int) -> None:
        self.lo = lo
        self.span = _WINDOW << 16
        self.above = 0
        self.hist = np.zeros(self.span, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, bits: np.ndarray) -> None:
        v = np.subtract(bits, np.int32(self.lo))  # bits >= 0 and lo >= 0: no overflow
        self.above += int(np.count_nonzero(v >= self.span))
        inside = v[v.view(np.uint32) < self.span]
        if inside.size:
            self.pending.append(inside)
            self.n_pending += inside.size
            if self.n_pending >= _WINDOW_FLUSH:
                self._flush()

    def _flush(self) -> None:
        if self.pending:
            v = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
            self.hist += np.bincount(v, minlength=self.span)
            self.pending, self.n_pending = [], 0

    def locate(self, k: int) -> tuple[int, int, int] | None:
        """(threshold bits, number above it, number equal) of the k-th largest, if it is in the window."""
        self._flush()
        if k <= self.above:
            return None
        h = torch.from_numpy(self.hist)
        if k > self.above + int(h.sum()):
            return None
        idx, above_in = _locate(h, k - self.above)
        return self.lo + idx, self.above + above_in, int(h[idx])


def _one_pass(
    source: ValueSource, ks: Sequence[Sequence[int]] | Callable[[int], Sequence[Sequence[int]]],
    numel_hint: int, count_ties: bool,
) -> list[StreamSelection] | None:
    """:func:`select_top` in one pass over the chunks, or None when a threshold missed its window.

    The first chunk's own quantiles place, per wanted k, a ``_WINDOW``-high-bin window of bit
    patterns; the pass counts every in-window pattern exactly and how many values lie above. A
    threshold inside its window is then exact. A tensor that is a single chunk is selected from that
    chunk directly.
    """
    it = source()
    first = next(it, None)
    if first is None:
        return []
    if first[0].numel() >= numel_hint:  # one chunk: the classic two steps on it, read once
        return select_top(lambda: iter([first]), ks, count_ties=count_ties)
    hint = ks(numel_hint) if callable(ks) else ks
    if len(hint) != len(first):
        raise ValueError(f"select_top: {len(first)} streams but k values for {len(hint)}")
    windows: list[dict[int, _Window]] = [{} for _ in first]
    for s, kk in enumerate(hint):
        for k in kk:
            if 0 < k < numel_hint:
                lo = _window_start(first[s], k / numel_hint)
                windows[s].setdefault(lo, _Window(lo))
    numel = [0] * len(first)
    chunk_values: Iterator[list[torch.Tensor]] = itertools.chain([first], it)
    for values in chunk_values:
        for s, v in enumerate(values):
            bits = _bits(v)
            numel[s] += bits.numel()
            if windows[s]:
                b = bits.numpy() if bits.device.type == "cpu" else bits.cpu().numpy()
                for w in windows[s].values():
                    w.add(b)
        del values
    wanted = ks(numel[0]) if callable(ks) else ks
    out: list[StreamSelection] = []
    for s, kk in enumerate(wanted):
        n = numel[s]
        sels = []
        for k in kk:
            k = int(k)
            if k <= 0 or k >= n:
                sels.append(TopK(max(0, min(k, n)), n, 0, min(max(k, 0), n), None, None, None))
                continue
            found = None
            for w in windows[s].values():
                found = w.locate(k)
                if found is not None:
                    break
            if found is None:
                return None
            threshold, n_greater, eq = found
            need = k - n_greater
            if need < eq and count_ties:
                return None  # per-chunk quotas need the third pass of the classic path
            sels.append(TopK(k, n, threshold, n_greater, None, None, None, need if need < eq else None))
        out.append(StreamSelection(n, None, tuple(sels)))
    return out


def select_top(
    source: ValueSource,
    ks: Sequence[Sequence[int]] | Callable[[int], Sequence[Sequence[int]]],
    *,
    sums: bool = False,
    numel_hint: int | None = None,
    count_ties: bool = True,
) -> list[StreamSelection]:
    """Exact top-k of several streams of non-negative float32 values, streamed over chunks.

    ``source()`` yields, per chunk, one tensor per stream (the same number of streams and the
    same chunk sizes across streams and passes). ``ks[s]`` lists the k values wanted for stream
    ``s``; it may be a function of the number of elements per stream, called after the first pass.
    ``sums=True`` also computes each stream's total and each selection's kept sum (float64,
    independent of the chunking). Reads the source once (single chunk) or twice, and a third time
    only when entries tied with a threshold straddle the cut (to count them per chunk).

    ``numel_hint`` (the number of elements per stream, when the caller knows it) turns on the
    one-pass path (:func:`_one_pass`): the first chunk's quantiles place a narrow window around
    each threshold and one pass counts the bit patterns inside it exactly; when every threshold
    falls in its window that is the whole selection (the same result), else the classic passes run.
    ``count_ties=False`` skips the third pass: a straddling threshold gets ``tie_need`` instead of
    per-chunk quotas, and a :class:`TieCursor` hands the ties out as the chunks are visited in order.
    """
    if numel_hint and not sums:
        fast = _one_pass(source, ks, numel_hint, count_ties)
        if fast is not None:
            return fast
    hist_hi: list[_Histogram] = []
    numel: list[int] = []
    n_chunks = 0
    cached: list[torch.Tensor] | None = None
    for values in source():
        if n_chunks == 0:
            hist_hi = [_Histogram(_HI_BINS, sums) for _ in values]
            numel = [0] * len(values)
            cached = values
        else:
            cached = None
        n_chunks += 1
        for s, v in enumerate(values):
            bits = _bits(v)
            numel[s] += bits.numel()
            hist_hi[s].add(bits)
    if n_chunks == 0:
        return []
    counts_hi = [h.counts() for h in hist_hi]
    lo_sum_hi = [h.lo_sums() for h in hist_hi] if sums else []
    wanted = ks(numel[0]) if callable(ks) else ks
    if len(wanted) != len(numel):
        raise ValueError(f"select_top: {len(numel)} streams but k values for {len(wanted)}")

    # high bins to resolve, per stream: from a pass-1 window when one holds the bin, else in pass 2
    targets: list[set[int]] = [set() for _ in numel]
    hist_lo: list[dict[int, torch.Tensor]] = [{} for _ in numel]
    for s, kk in enumerate(wanted):
        for k in kk:
            if 0 < k < numel[s]:
                targets[s].add(_locate(counts_hi[s], k)[0])
    del hist_hi

    # pass 2: per stream and target bin, the histogram of the low 16 bits of the in-bin entries,
    # accumulated over chunks (memory: one 65536-bin histogram per target, whatever the tensor size)
    for s, t in enumerate(targets):
        for b in t:
            hist_lo[s][b] = torch.zeros(_LO_BINS, dtype=torch.int64)
    if any(targets):
        passes: Iterator[list[torch.Tensor]] = iter([cached]) if cached is not None else source()
        for values in passes:
            for s, v in enumerate(values):
                if not targets[s]:
                    continue
                bits = _bits(v)
                for b in targets[s]:
                    vals, cnt = _sparse_low_histogram(bits, b)
                    hist_lo[s][b].index_add_(0, vals, cnt)

    # thresholds; where entries tied with a threshold straddle the cut, a third pass counts the tied
    # entries of every chunk (one compare-and-sum per chunk) to hand out the tie quota in index order
    cuts: dict[tuple[int, int], tuple[int, int, int, int]] = {}  # (s, j) -> (threshold, n_greater, need, eq)
    straddling: list[tuple[int, int]] = []
    for s, kk in enumerate(wanted):
        for j, k in enumerate(kk):
            k = int(k)
            if 0 < k < numel[s]:
                b, above = _locate(counts_hi[s], k)
                low, above_lo = _locate(hist_lo[s][b], k - above)
                eq = int(hist_lo[s][b][low].item())
                cuts[(s, j)] = ((b << 16) | low, above + above_lo, k - above - above_lo, eq)
                if cuts[(s, j)][2] < eq and count_ties:
                    straddling.append((s, j))
    eq_per_chunk: dict[tuple[int, int], list[int]] = {key: [] for key in straddling}
    if straddling:
        passes = iter([cached]) if cached is not None else source()
        for values in passes:
            for s, j in straddling:
                eq_per_chunk[(s, j)].append(int((_bits(values[s]) == cuts[(s, j)][0]).sum().item()))
    cached = None

    base_v = ulp_v = None
    if sums:
        base_v, ulp_v = _bin_base_ulp()
    out: list[StreamSelection] = []
    for s, kk in enumerate(wanted):
        n = numel[s]
        bin_sums = None
        total = None
        if sums:
            assert base_v is not None and ulp_v is not None
            cnt = counts_hi[s]
            bin_sums = torch.where(cnt > 0, cnt.double() * base_v + lo_sum_hi[s] * ulp_v, 0.0)
            total = float(bin_sums.sum().item())
        sels = []
        for j, k in enumerate(kk):
            k = int(k)
            if k <= 0 or k >= n:
                kept = (0.0 if k <= 0 else total) if sums else None
                sels.append(TopK(max(0, min(k, n)), n, 0, min(max(k, 0), n), None, None, kept))
                continue
            threshold, n_greater, tie_need, eq_total = cuts[(s, j)]
            b, low = threshold >> 16, threshold & 0xFFFF
            h_lo = hist_lo[s][b]
            quotas = eq_counts = None
            need = tie_need if not count_ties and tie_need < eq_total else None
            if (s, j) in eq_per_chunk:
                eq_list = eq_per_chunk[(s, j)]
                q_list = []
                left = tie_need
                for e in eq_list:
                    q = min(left, e)
                    q_list.append(q)
                    left -= q
                quotas, eq_counts = tuple(q_list), tuple(eq_list)
            kept = None
            if sums:
                assert bin_sums is not None and base_v is not None and ulp_v is not None
                lows = torch.arange(_LO_BINS, dtype=torch.float64)
                vals = base_v[b] + lows * ulp_v[b]
                above_in_bin = (h_lo[low + 1 :].double() * vals[low + 1 :]).sum()
                kept = float((bin_sums[b + 1 :].sum() + above_in_bin + tie_need * vals[low]).item())
            sels.append(TopK(k, n, threshold, n_greater, quotas, eq_counts, kept, need))
        out.append(StreamSelection(n, total, tuple(sels)))
    return out


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries of one in-memory non-negative float32 tensor (ties by index)."""
    sel = select_top(lambda: iter([[values]]), [[k]])[0].topk[0]
    return sel.mask(values, 0)


__all__ = ["KEEP_NONE", "StreamSelection", "TieCursor", "TopK", "ValueSource", "select_top", "topk_mask"]
