"""Universal Neural Functionals: permutation-equivariant linear maps generated from a weight-space spec.

Zhou, Finn & Harrison, "Universal Neural Functionals" (NeurIPS 2024). Given which permutation acts on
which axis of which tensor, Algorithm 1 of the paper generates a basis of every linear map between two
tensors that commutes with those permutations: one basis map per *valid partition* of the output
and input axes (each block holds axes of one permutation), acting by diagonal-taking on repeated input
labels, averaging input-only blocks, embedding on repeated output labels and broadcasting output-only
blocks. A layer sums, over input tensors and basis maps, the basis map followed by a channel mixing
matrix, plus a bias per output tensor (the paper's Eq. 5); stacking layers with pointwise
nonlinearities gives an equivariant network, and averaging every tensor over its permuted axes gives an
invariant one (the paper's invariant pooling).

Our weight-space specification is the project's :class:`~merge.symmetry.PermutationSpec`:

- a permuted axis is labelled by its permutation id;
- a non-permuted axis (input features, outputs, kernel positions, a q/k/v slot of a fused projection)
  is acted on trivially, so every linear map may treat each of its indices separately: such axes are
  folded into the channel dimension (``fixed``), which gives exactly the maps equivariant to the
  hidden-unit permutations only (the "HNP" setting of Zhou et al. 2023's NFNs);
- an attention axis with a :class:`~merge.symmetry.HeadStructure` is split into a head label ``σ``
  (shared by the head group) and a within-head label ``τ`` (its own), and the symmetry there is the
  wreath product (``τ_h`` may differ per head), so a basis map may keep ``τ`` only where it keeps ``σ``
  (otherwise it would mix feature ``i`` across heads whose ``τ_h`` differ). With ``within=False``
  (RoPE) the within-head axis is fixed and folded.

A permutation occurs at most once per tensor in a PermutationSpec, so no tensor has repeated labels:
the diagonal and embedding cases of Algorithm 1 never arise, and the valid partitions between tensors
``i`` and ``j`` are exactly the subsets ``S`` of their shared labels (the labels each block pairs).
The layer therefore computes, per input tensor ``j`` and subset ``S``, the mean over its other labels
once, and per output tensor ``i`` and subset ``S`` one matrix product over the concatenation of every
input's ``S``-reduction, broadcast back over ``i``'s other labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from merge.errors import InvalidArgumentError, MissingTensorError, ShapeMismatchError
from merge.symmetry import PermutationSpec
from metanets.base import Metanet

__all__ = ["UNF", "UNFLayer", "WeightSpace"]


@dataclass(frozen=True)
class _Space:
    name: str
    shape: tuple[int, ...]  # stored shape
    split: tuple[int, ...]  # the view with head axes split into (heads, head_dim)
    order: tuple[int, ...]  # permutation of split dims: labelled dims (canonical order), then fixed
    labels: tuple[str, ...]  # canonical order
    sizes: tuple[int, ...]
    fixed: int  # product of the folded dims


class WeightSpace:
    """The weight-space specification of a UNF, derived from a :class:`PermutationSpec`.

    Every tensor becomes a feature tensor ``[*labels, fixed]`` (its permuted axes in one canonical
    label order, its non-permuted axes folded into the last dimension); :meth:`to_features` and
    :meth:`from_features` convert both ways (exactly). ``tau_sigma`` maps each within-head label to its
    head label.
    """

    def __init__(self, spec: PermutationSpec) -> None:
        self.spec = spec
        self.label_size: dict[str, int] = {}
        self.tau_sigma: dict[str, str] = {}
        raw: list[tuple[str, tuple[int, ...], list[str | None]]] = []
        for name, axes in spec.axes_to_perm.items():
            view = spec.view_shape(name)
            split: list[int] = []
            labels: list[str | None] = []
            for n, p in zip(view, axes, strict=True):
                hs = spec.heads.get(p) if p is not None else None
                if p is None:
                    split.append(n)
                    labels.append(None)
                elif hs is None:
                    split.append(n)
                    labels.append(p)
                    self.label_size[p] = n
                else:
                    sig = f"σ:{hs.group}"
                    split += [hs.n_heads, hs.head_dim]
                    self.label_size[sig] = hs.n_heads
                    if hs.within:
                        tau = f"τ:{p}"
                        labels += [sig, tau]
                        self.label_size[tau] = hs.head_dim
                        self.tau_sigma[tau] = sig
                    else:
                        labels += [sig, None]
            raw.append((name, tuple(split), labels))
        rank = {lab: i for i, lab in enumerate(self.label_size)}
        self.tensors: list[_Space] = []
        for name, split, labels in raw:
            lab_dims = sorted((rank[lab], d) for d, lab in enumerate(labels) if lab is not None)
            fixed_dims = [d for d, lab in enumerate(labels) if lab is None]
            order = tuple(d for _, d in lab_dims) + tuple(fixed_dims)
            labs = tuple(labels[d] for _, d in lab_dims)  # type: ignore[misc]
            self.tensors.append(
                _Space(
                    name,
                    spec.shapes[name],
                    split,
                    order,
                    labs,  # type: ignore[arg-type]
                    tuple(split[d] for _, d in lab_dims),
                    math.prod(split[d] for d in fixed_dims),
                )
            )
        if not self.tensors:
            raise InvalidArgumentError("empty permutation spec: a UNF needs at least one tensor")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def valid(self, subset: Sequence[str]) -> bool:
        """A basis map may keep a within-head label only together with its head label."""
        s = set(subset)
        return all(self.tau_sigma[t] in s for t in s if t in self.tau_sigma)

    def to_features(
        self, state: Mapping[str, torch.Tensor], *, where: str = "model"
    ) -> dict[str, torch.Tensor]:
        """``{name: [*labels, fixed]}`` features of one model, float32 (float64 kept), shapes checked."""
        out: dict[str, torch.Tensor] = {}
        for t in self.tensors:
            if t.name not in state:
                raise MissingTensorError(f"{where}: tensor '{t.name}' of the UNF's weight space is missing")
            v = state[t.name]
            if tuple(v.shape) != t.shape:
                raise ShapeMismatchError(
                    f"{where}: tensor '{t.name}' has shape {list(v.shape)}, this UNF reads {list(t.shape)}"
                )
            f = v.detach().reshape(t.split).permute(t.order).reshape(*t.sizes, t.fixed)
            out[t.name] = f if f.dtype == torch.float64 else f.float()
        return out

    def from_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`to_features` for ``[B, *labels, fixed·C]`` features: ``[B, *shape, C]``
        (``[B, *shape]`` when ``C == 1``)."""
        out: dict[str, torch.Tensor] = {}
        for t in self.tensors:
            f = feats[t.name]
            b, c = f.shape[0], f.shape[-1] // t.fixed
            split_perm = [t.split[d] for d in t.order]
            x = f.reshape(b, *split_perm, c)
            inv = [0] * len(t.order)
            for i, d in enumerate(t.order):
                inv[d] = i
            x = x.permute(0, *[i + 1 for i in inv], len(t.order) + 1).reshape(b, *t.shape, c)
            out[t.name] = x[..., 0] if c == 1 else x
        return out


def _subsets(labels: Sequence[str]) -> list[tuple[str, ...]]:
    return [s for r in range(len(labels) + 1) for s in combinations(labels, r)]


class UNFLayer(nn.Module):
    """One equivariant linear layer (Zhou et al. 2024, Algorithm 1 and Eq. 5) over a :class:`WeightSpace`.

    Input and output: ``{name: [B, *labels, fixed·c]}``. ``num_basis()`` is the number of basis maps
    with one channel (the dimension of the space of equivariant linear maps, without biases).
    """

    def __init__(self, space: WeightSpace, c_in: int, c_out: int) -> None:
        super().__init__()
        self.space, self.c_in, self.c_out = space, c_in, c_out
        self.terms: list[tuple[int, tuple[str, ...], list[int]]] = []  # (out tensor, S, input tensors)
        self.weights = nn.ParameterList()
        self.needed: set[tuple[int, tuple[str, ...]]] = set()
        ts = space.tensors
        fan: list[int] = [0] * len(ts)
        for i, ti in enumerate(ts):
            for s in _subsets(ti.labels):
                if not space.valid(s):
                    continue
                js = [j for j, tj in enumerate(ts) if set(s) <= set(tj.labels)]
                if not js:
                    continue
                self.terms.append((i, s, js))
                fan[i] += sum(ts[j].fixed * c_in for j in js)
                self.needed.update((j, s) for j in js)
        for i, _s, js in self.terms:
            w = torch.randn(sum(ts[j].fixed for j in js) * c_in, ts[i].fixed * c_out) / math.sqrt(fan[i])
            self.weights.append(nn.Parameter(w))
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(t.fixed * c_out)) for t in ts])

    def num_basis(self) -> int:
        ts = self.space.tensors
        return sum(ts[i].fixed * ts[j].fixed for i, _s, js in self.terms for j in js)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ts = self.space.tensors
        xs = [feats[t.name] for t in ts]
        red: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}
        for j, s in self.needed:
            tj = ts[j]
            dims = tuple(1 + k for k, lab in enumerate(tj.labels) if lab not in s)
            red[(j, s)] = xs[j].mean(dim=dims) if dims else xs[j]
        outs: list[torch.Tensor | None] = [None] * len(ts)
        for (i, s, js), w in zip(self.terms, self.weights, strict=True):
            ti = ts[i]
            z = torch.cat([red[(j, s)] for j in js], dim=-1) if len(js) > 1 else red[(js[0], s)]
            y = z @ w
            shape = (
                [y.shape[0]]
                + [ti.sizes[k] if lab in s else 1 for k, lab in enumerate(ti.labels)]
                + [y.shape[-1]]
            )
            y = y.reshape(shape)
            outs[i] = y if outs[i] is None else outs[i] + y
        result: dict[str, torch.Tensor] = {}
        for i, ti in enumerate(ts):
            o = outs[i] + self.bias[i]
            result[ti.name] = o.expand(o.shape[0], *ti.sizes, o.shape[-1])
        return result


def _pool(space: WeightSpace, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Invariant pooling: every tensor averaged over its permuted axes, concatenated ``[B, Σ fixed·c]``."""
    parts = []
    for t in space.tensors:
        f = feats[t.name]
        parts.append(f.mean(dim=tuple(range(1, f.dim() - 1))) if f.dim() > 2 else f)
    return torch.cat(parts, dim=1)


class UNF(Metanet):
    """A stack of :class:`UNFLayer` with ReLU, then invariant pooling and an MLP (or an equivariant head).

    One UNF reads one weight space (the spec it is built with): ``featurize`` refuses a model of
    another architecture, naming the first tensor that does not fit. ``forward`` → ``[B, out_dim]``;
    ``embed`` → ``[B, embed_dim]``; ``equivariant(batch)`` → ``{name: [B, *shape, edge_out]}``.
    """

    input_kind = "weights"

    def __init__(
        self,
        spec: PermutationSpec | Mapping[str, Any],
        out_dim: int = 1,
        hidden: int = 8,
        layers: int = 2,
        *,
        embed_dim: int = 64,
        edge_out: int = 0,
        amp: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        spec = spec if isinstance(spec, PermutationSpec) else PermutationSpec.from_dict(spec)
        self.space = WeightSpace(spec)
        self.out_dim, self.hidden, self.n_layers, self.embed_dim = out_dim, hidden, layers, embed_dim
        self.edge_out_dim, self.amp = edge_out, amp
        chans = [1] + [hidden] * layers
        self.layers = nn.ModuleList(
            UNFLayer(self.space, a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        pooled = sum(t.fixed for t in self.space.tensors) * chans[-1]
        self.readout = nn.Sequential(nn.Linear(pooled, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))
        self.head = nn.Linear(embed_dim, out_dim)
        self.eq_head = UNFLayer(self.space, chans[-1], edge_out) if edge_out else None

    def config(self) -> dict[str, Any]:
        return {
            "spec": self.space.spec.to_dict(),
            "out_dim": self.out_dim,
            "hidden": self.hidden,
            "layers": self.n_layers,
            "embed_dim": self.embed_dim,
            "edge_out": self.edge_out_dim,
        }

    def featurize(
        self, state: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None
    ) -> dict[str, torch.Tensor]:
        extra = [
            k for k, v in state.items() if v.is_floating_point() and k not in self.space.spec.axes_to_perm
        ]
        if extra:
            raise InvalidArgumentError(
                f"model has tensor '{extra[0]}' that this UNF's weight space does not have "
                f"({len(extra)} such tensors): a UNF reads one architecture"
            )
        return self.space.to_features(state)

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {n: torch.stack([s[n] for s in samples]) for n in self.space.names}

    def _trunk(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = dict(batch)
        for layer in self.layers:
            h = {k: F.relu(v) for k, v in layer(h).items()}
        return h

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return self.readout(_pool(self.space, self._trunk(batch))).float()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return self.head(self.readout(_pool(self.space, self._trunk(batch)))).float()

    def equivariant(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.eq_head is None:
            raise InvalidArgumentError("this UNF has no equivariant head (construct it with edge_out=)")
        with self._autocast():
            return {
                k: v.float() for k, v in self.space.from_features(self.eq_head(self._trunk(batch))).items()
            }

