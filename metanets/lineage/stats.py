"""Per-tensor distances between a child checkpoint and candidate checkpoints, streamed tensor by tensor.

What :func:`metanets.lineage.detect_lineage` (methods ``weights`` and ``aligned``) scores with:

- :func:`pair_tensors` decides which tensors a (child, candidate) pair is compared on: shared names
  with the same shape and a floating dtype; classifier heads (by name, or the last layer of a
  plain chain), resized tensors (new vocabulary, new class count), tensors on one side only and
  tensors that are constant in the child are excluded, each with its reason.
- :func:`stream_distances` reads every tensor once for all candidates (``Checkpoint`` maps the file;
  a few tensors are in memory at a time, whatever the model size) and returns, per candidate and
  tensor, the norm of the difference ``N(θ_c − θ_p)`` and the child's own norm ``N(θ_c)``.

Two norms, chosen per tensor by shape so that every candidate is measured alike on a tensor:

``nuclear`` (Schatten-1, the sum of singular values) for matrices (convolutions reshaped to
    ``out × in·k·k``), on a fixed block of at most ``spectral_max_dim`` rows and columns (the same
    block, drawn by the tensor's name, for every model; exact when the matrix fits). Fine-tuning moves weights by
    low-rank updates (Hu et al., "LoRA", ICLR 2022; Aghajanyan et al., "Intrinsic Dimensionality
    Explains the Effectiveness of Language Model Fine-Tuning", ACL 2021), while two fine-tunes of
    one root differ by a noise-like, high-rank matrix. A sibling's difference ``ε + (δ₁ − δ₂)``
    therefore gains nuclear norm on every singular direction that ``ε`` does not cover, where the
    Frobenius norm only gains ``‖δ₁ − δ₂‖²`` on top of a large ``‖ε‖²``. Computed exactly, as
    ``Σ √eig(DᵀD)`` of the Gram matrix of the smaller side in float64.
``frobenius`` for vectors (and for every tensor with ``spectral=False``), from one pass of float32 chunks: the
    Gram matrix of ``[θ_c, θ_p1 − θ_c, θ_p2 − θ_c, ...]`` per tensor. Differences are taken before
    any product, so near-identical models lose no precision, and the Gram gives every
    candidate–candidate distance too (the pass runs for every tensor: it also gives the relative
    Frobenius distance reported next to the nuclear one). 1-D tensors are centred (their scalar mean removed), so
    norm gains near 1 do not make unrelated models look alike.

:func:`pair_norms` computes the same norms between two candidates (for the path test and the
family tree).
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from merge.checkpoint import TensorSource, require_finite
from merge.symmetry import natural_key

NUCLEAR = "nuclear"
FROBENIUS = "frobenius"

#: Classifier heads and poolers by name (HF, timm, torchvision conventions).
HEAD_PATTERNS = (
    r"(?:^|\.)(?:lm_head|classifier|head|heads|score|fc|pooler(?:\.dense)?|qa_outputs|cls\.predictions)"
    r"(?:\.[A-Za-z_]+)?\.(?:weight|bias)$",
)
CHUNK = 1 << 19  # float32 elements per chunk and model (2 MiB)


def read(source: TensorSource, name: str) -> torch.Tensor:
    """One tensor of a child or candidate, under the one NaN/Inf policy (refused, the tensor named)."""
    return require_finite(source[name], getattr(source, "path", "model"), name)


class PermutedSource:
    """A source seen through permutations of its hidden units (a candidate aligned to the child)."""

    def __init__(self, inner: TensorSource, spec: Any, perms: Mapping[str, torch.Tensor]) -> None:
        self.inner, self.spec, self.perms = inner, spec, perms
        self.path = getattr(inner, "path", "model")

    def keys(self) -> Any:
        return self.inner.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        from merge.symmetry import permute_tensor

        return permute_tensor(self.spec, name, read(self.inner, name), self.perms)


# ---------------------------------------------------------------------------------------------
# Which tensors a pair is compared on
# ---------------------------------------------------------------------------------------------


@dataclass
class Pairing:
    """The tensors a (child, candidate) pair shares, and what was left out and why."""

    shared: list[str]
    excluded: dict[str, str] = field(default_factory=dict)


def head_tensors(
    names: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    patterns: Sequence[str] | None = HEAD_PATTERNS,
) -> set[str]:
    """Tensors of classifier heads: names matching ``patterns``; if none match, the last layer of a
    plain chain (numbered modules such as ``0, 2, 4`` of an ``nn.Sequential``, at least three of
    them with matrix weights), which is what a new-head fine-tune replaces."""
    if patterns is None:
        return set()
    rx = [re.compile(p) for p in patterns]
    out = {n for n in names if any(r.search(n) for r in rx)}
    if out:
        return out
    modules: dict[str, list[str]] = {}
    for n in names:
        modules.setdefault(n.rpartition(".")[0], []).append(n)
    layered = [m for m, ts in modules.items() if any(len(shapes[t]) >= 2 for t in ts)]
    if len(layered) >= 3 and all(re.fullmatch(r"(?:.*\.)?\d+", m) for m in layered):
        last = max(layered, key=natural_key)
        return set(modules[last])
    return set()


def pair_tensors(
    child: TensorSource,
    candidate: TensorSource,
    *,
    heads: set[str],
    exclude: Sequence[str] = (),
    constant: set[str] | None = None,
) -> Pairing:
    """Shared, comparable tensors of a pair (see the module docstring); order is the child's natural order."""
    rx = [re.compile(p) for p in exclude]
    c_names = set(child.keys())
    p_names = set(candidate.keys())
    shared: list[str] = []
    excluded: dict[str, str] = {}
    for n in sorted(c_names | p_names, key=natural_key):
        if n not in p_names:
            excluded[n] = "only in the child"
        elif n not in c_names:
            excluded[n] = "only in the candidate"
        elif not child.dtype(n).is_floating_point or not candidate.dtype(n).is_floating_point:
            excluded[n] = "not floating point"
        elif child.shape(n) != candidate.shape(n):
            excluded[n] = f"shape differs ({list(child.shape(n))} vs {list(candidate.shape(n))}): resized"
        elif n in heads:
            excluded[n] = "classifier head"
        elif any(r.search(n) for r in rx):
            excluded[n] = "excluded by pattern"
        elif math.prod(child.shape(n)) == 0:
            excluded[n] = "empty"
        elif constant is not None and n in constant:
            excluded[n] = "constant in the child (carries no lineage)"
        else:
            shared.append(n)
    return Pairing(shared, excluded)


# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(rows, cols)`` a tensor is read as for the nuclear norm (``None`` for vectors and scalars)."""
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def norm_kind(shape: tuple[int, ...], spectral: bool | str) -> str:
    """``nuclear`` for matrices (unless ``spectral`` is False), ``frobenius`` for vectors and scalars."""
    mv = matrix_view(shape)
    if mv is None or spectral is False or min(mv) < 2:
        return FROBENIUS
    return NUCLEAR


def spectral_block(
    name: str, shape: tuple[int, ...], max_dim: int | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rows and columns of the block a matrix's nuclear norm is taken on (``None``: all of them).

    A side longer than ``max_dim`` is subsampled to ``max_dim`` indices drawn once from a generator
    seeded by the tensor's name, so every model is measured on the same block. A random block of a
    low-rank update is still low-rank and a block of a noise-like difference still full-rank, so
    the block keeps the nuclear norm's sensitivity (module docstring) at a bounded cost:
    ``O(max_dim³)`` per matrix whatever its size.
    """
    mv = matrix_view(shape)
    if mv is None or max_dim is None:
        return None, None
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    out: list[torch.Tensor | None] = []
    for n in mv:
        out.append(None if n <= max_dim else torch.sort(torch.randperm(n, generator=gen)[:max_dim]).values)
    return out[0], out[1]


def block_of(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """The float64 block of ``t`` (read as a matrix) that its nuclear norm is taken on."""
    mv = matrix_view(tuple(t.shape))
    assert mv is not None
    m = t.reshape(mv)
    if rows is not None:
        m = m.index_select(0, rows)
    if cols is not None:
        m = m.index_select(1, cols)
    return m.double()


def nuclear_norm(m: torch.Tensor) -> float:
    """``Σ σ_i(m)`` from the eigenvalues of the smaller Gram matrix, in float64."""
    m = m.double()
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(g).clamp_(min=0).sqrt_().sum())


def is_constant(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return flat.numel() <= 1 or bool((flat == flat[0]).all())


@dataclass
class TensorNorms:
    """Norms of one tensor: the child's own, and of the difference to each candidate."""

    name: str
    kind: str
    numel: int
    child: float
    diff: dict[int, float]  # candidate index -> N(θ_c − θ_p)
    fro_rel: dict[int, float]  # candidate index -> ‖θ_c − θ_p‖_F / ‖θ_c‖_F (for reports)
    gram: torch.Tensor | None = None  # Frobenius tensors: Gram of [c, p_i − c, ...] (float64)
    order: list[int] = field(default_factory=list)  # candidate indices in gram order


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread while the block runs (restored after).

    The work here is many small kernels (chunks, 256×256 eigendecompositions); torch's OpenMP
    threads spin-wait between them, which on a busy 2-core machine made ``eigvalsh`` ~10× slower.
    Parallelism comes from worker threads over tensors instead.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class _Buffers(threading.local):
    def get(self, rows: int, n: int) -> torch.Tensor:
        buf = getattr(self, "buf", None)
        if buf is None or buf.shape[0] < rows or buf.shape[1] < n:
            buf = torch.empty(max(rows, buf.shape[0] if buf is not None else 0), max(n, CHUNK))
            self.buf = buf
        return buf[:rows, :n]


_buffers = _Buffers()


def _frobenius_gram(child: torch.Tensor, others: list[torch.Tensor], centre: bool) -> torch.Tensor:
    """Gram matrix (float64) of ``[c, p_1 − c, ..., p_k − c]`` over the flattened tensor, in float32 chunks."""
    c = child.reshape(-1)
    ps = [o.reshape(-1) for o in others]
    n = c.numel()
    k = len(ps) + 1
    gram = torch.zeros(k, k, dtype=torch.float64)
    mean_c = mean_ps = None
    if centre:  # 1-D tensors are small: centre them exactly
        mean_c = float(c.double().mean())
        mean_ps = [float(p.double().mean()) for p in ps]
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        x = _buffers.get(k, e - s)
        x[0].copy_(c[s:e])
        for j, p in enumerate(ps):
            x[j + 1].copy_(p[s:e])
            x[j + 1].sub_(x[0])
        if centre:
            assert mean_c is not None and mean_ps is not None
            x[0].sub_(mean_c)
            for j, mp in enumerate(mean_ps):
                x[j + 1].sub_(mp - mean_c)
        gram += (x @ x.T).double()
    return gram


def tensor_norms(
    name: str,
    kind: str,
    child: torch.Tensor,
    candidates: dict[int, torch.Tensor],
    max_dim: int | None = None,
) -> TensorNorms:
    """Norms of one tensor of the child and its difference to every candidate that shares it."""
    numel = child.numel()
    order = sorted(candidates)
    gram = _frobenius_gram(child, [candidates[i] for i in order], centre=child.dim() < 2)
    c_fro = math.sqrt(max(float(gram[0, 0]), 0.0))
    fro_rel = {
        i: math.sqrt(max(float(gram[j + 1, j + 1]), 0.0)) / c_fro if c_fro > 0 else math.inf
        for j, i in enumerate(order)
    }
    if kind == NUCLEAR:
        rows, cols = spectral_block(name, tuple(child.shape), max_dim)
        cm = block_of(child, rows, cols)
        c_norm = nuclear_norm(cm)
        diff = {i: nuclear_norm(cm - block_of(candidates[i], rows, cols)) for i in order}
    else:
        c_norm = c_fro
        diff = {i: math.sqrt(max(float(gram[j + 1, j + 1]), 0.0)) for j, i in enumerate(order)}
    return TensorNorms(name, kind, numel, c_norm, diff, fro_rel, gram if kind == FROBENIUS else None, order)


def stream_distances(
    child: TensorSource,
    candidates: dict[int, TensorSource],
    pairings: dict[int, Pairing],
    *,
    spectral: bool | str = "auto",
    spectral_max_dim: int = 256,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, TensorNorms]:
    """One pass over the child's tensors: :class:`TensorNorms` for every tensor some candidate shares.

    Each tensor of the child is read once and each candidate's tensor once; ``workers`` threads
    handle different tensors (torch runs one thread each while the pass lasts: its intra-op
    threads spin-wait and are slower on small chunks). ``progress(done_bytes, total_bytes)`` is
    called after each tensor.
    """
    by_tensor: dict[str, list[int]] = {}
    for i, pr in pairings.items():
        for n in pr.shared:
            by_tensor.setdefault(n, []).append(i)
    names = sorted(by_tensor, key=natural_key)
    sizes = {n: math.prod(child.shape(n)) * (1 + len(by_tensor[n])) for n in names}
    total = sum(sizes.values())
    done = 0
    lock = threading.Lock()
    out: dict[str, TensorNorms] = {}

    def one(n: str) -> None:
        nonlocal done
        kind = norm_kind(child.shape(n), spectral)
        block = None if spectral is True else spectral_max_dim
        tn = tensor_norms(n, kind, read(child, n), {i: read(candidates[i], n) for i in by_tensor[n]}, block)
        with lock:
            out[n] = tn
            done += sizes[n]
            if progress is not None:
                progress(done, total)

    with single_torch_thread():
        if workers <= 1 or len(names) < 2:
            for n in names:
                one(n)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lineage") as pool:
                list(pool.map(one, names))
    return {n: out[n] for n in names}


def pair_norms(
    a: TensorSource,
    b: TensorSource,
    names: Sequence[str],
    kinds: Mapping[str, str],
    *,
    frob_from: Mapping[str, TensorNorms] | None = None,
    ia: int | None = None,
    ib: int | None = None,
    max_dim: int | None = 256,
) -> dict[str, float]:
    """``{tensor: N(a − b)}`` between two candidates, in each tensor's norm (and block).

    Frobenius tensors are read off the Gram matrices of the child pass when ``frob_from`` and the
    candidates' indices ``ia``/``ib`` are given (no second read); nuclear ones are computed.
    """
    out: dict[str, float] = {}
    for n in names:
        tn = frob_from.get(n) if frob_from is not None else None
        if (
            kinds[n] == FROBENIUS
            and tn is not None
            and tn.gram is not None
            and ia in tn.order
            and ib in tn.order
        ):
            g = tn.gram
            ja, jb = tn.order.index(ia) + 1, tn.order.index(ib) + 1
            # p_a − p_b = d_a − d_b with d = p − c: ‖p_a − p_b‖² = G_aa + G_bb − 2 G_ab
            out[n] = math.sqrt(max(float(g[ja, ja] + g[jb, jb] - 2 * g[ja, jb]), 0.0))
            continue
        ta, tb = read(a, n), read(b, n)
        if kinds[n] == NUCLEAR:
            rows, cols = spectral_block(n, tuple(ta.shape), max_dim)
            out[n] = nuclear_norm(block_of(ta, rows, cols) - block_of(tb, rows, cols))
        else:
            fa, fb = ta.double().reshape(-1), tb.double().reshape(-1)
            if ta.dim() < 2:
                fa, fb = fa - fa.mean(), fb - fb.mean()
            out[n] = float((fa - fb).norm())
    return out
