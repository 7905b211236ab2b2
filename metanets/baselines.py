"""Baseline metanets with the same call shape as GMN and UNF: StatNN, a flat MLP, DeepSets over neurons.

- :class:`StatNN` (Unterthiner, Keysers, Gelly, Bousquet & Tolstikhin, "Predicting Neural Network
  Accuracy from Weights", 2020, §3): per-tensor statistics (mean, variance and the 0/25/50/75/100 %
  quantiles; the features of ``nfn.layers.StatFeaturizer``) and a small MLP. Invariant to every hidden
  permutation (statistics of a tensor do not depend on the order of its entries). ``pooled=True`` pools
  the statistics over tensors of one kind, so models of different architectures have one feature width.
  The paper's best regressor was gradient-boosted trees on these features; ``metanets.train`` offers
  that too.
- :class:`FlatMLP`: an MLP on the concatenated parameter vector: the baseline that ignores the
  symmetry (it is *not* invariant; a test checks that). With ``augment=True`` every training sample is
  permuted by a random hidden-unit permutation of its spec first (Shamsian et al., "Improved Generalization
  of Weight Space Networks via Augmentations", ICML 2024).
- :class:`DeepSets` over neurons (Zaheer et al., "Deep Sets", NeurIPS 2017): each node of the parameter
  graph is a set element described by its type, layer and the statistics of its incoming and outgoing
  parameter values; φ per element, mean over the set, ρ. Invariant, but blind to how neurons connect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from merge.errors import InvalidArgumentError
from merge.symmetry import PermutationSpec, apply_permutation, natural_key
from metanets.base import Metanet, auto_spec
from metanets.graph import EDGE_TYPES, NODE_TYPES, build_graph

if TYPE_CHECKING:
    from torch_geometric.data import Batch, Data

__all__ = ["DeepSets", "FlatMLP", "StatNN", "tensor_stats"]

_Q = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])


def tensor_stats(t: torch.Tensor) -> torch.Tensor:
    """``[mean, variance, q0, q25, q50, q75, q100]`` of a tensor's entries (float32)."""
    v = t.detach().reshape(-1).float()
    if v.numel() == 0:
        return torch.zeros(7)
    var = v.var(unbiased=False) if v.numel() > 1 else torch.zeros(())
    return torch.cat([v.mean()[None], var[None], torch.quantile(v, _Q)])


def _floating(state: Mapping[str, torch.Tensor], spec: PermutationSpec | None) -> list[str]:
    if spec is not None:
        return list(spec.axes_to_perm)
    return sorted((k for k, v in state.items() if v.is_floating_point()), key=natural_key)


def _mlp(i: int, h: int, o: int, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = i
    for _ in range(layers - 1):
        mods += [nn.Linear(d, h), nn.ReLU()]
        d = h
    mods.append(nn.Linear(d, o))
    return nn.Sequential(*mods)


class _Standardize(nn.Module):
    """Fixed input standardisation (set from training features with :meth:`fit`)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))

    def fit(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class StatNN(Metanet):
    """Per-tensor statistics + MLP (see the module docstring). ``in_features`` from :meth:`num_features`."""

    input_kind = "stats"
    _KINDS = (
        "weight",
        "embedding",
        "bias",
        "norm_scale",
        "norm_shift",
        "running_mean",
        "running_var",
        "vector",
    )

    def __init__(
        self, in_features: int, out_dim: int = 1, hidden: int = 64, *, pooled: bool = False, layers: int = 3
    ) -> None:
        super().__init__()
        self.in_features, self.out_dim, self.hidden, self.pooled, self.n_layers = (
            in_features,
            out_dim,
            hidden,
            pooled,
            layers,
        )
        self.embed_dim = hidden
        self.norm = _Standardize(in_features)
        self.body = _mlp(in_features, hidden, hidden, layers - 1) if layers > 1 else nn.Identity()
        self.act = nn.ReLU()
        self.head = nn.Linear(hidden if layers > 1 else in_features, out_dim)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_dim": self.out_dim,
            "hidden": self.hidden,
            "pooled": self.pooled,
            "layers": self.n_layers,
        }

    @classmethod
    def num_features(
        cls, state: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None, *, pooled: bool = False
    ) -> int:
        return len(cls.features(state, spec, pooled=pooled))

    @classmethod
    def features(
        cls, state: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None, *, pooled: bool = False
    ) -> torch.Tensor:
        names = _floating(state, spec)
        if not names:
            raise InvalidArgumentError("model has no floating-point tensors: no statistics to compute")
        if not pooled:
            return torch.cat([tensor_stats(state[k]) for k in names])
        from metanets.graph import _leaf_kind

        groups: dict[str, list[torch.Tensor]] = {k: [] for k in cls._KINDS}
        keys = set(state)
        for k in names:
            t = state[k]
            kind = "weight" if t.dim() >= 2 else EDGE_TYPES[_leaf_kind(k, keys)] if t.dim() == 1 else "vector"
            groups.setdefault(kind, []).append(t.reshape(-1).float())
        feats = []
        for kind in cls._KINDS:
            vs = groups[kind]
            feats.append(tensor_stats(torch.cat(vs)) if vs else torch.zeros(7))
        n_weights = sum(1 for k in names if state[k].dim() >= 2)
        n_params = sum(state[k].numel() for k in names)
        feats.append(torch.tensor([float(n_weights), float(torch.log(torch.tensor(float(n_params))))]))
        return torch.cat(feats)

    def featurize(
        self, state: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None
    ) -> torch.Tensor:
        f = self.features(state, spec, pooled=self.pooled)
        if f.numel() != self.in_features:
            raise InvalidArgumentError(
                f"model gives {f.numel()} statistics, this StatNN reads {self.in_features} "
                "(another architecture; use pooled=True for mixed architectures)"
            )
        return f

    def collate(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(samples))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x.to(self.head.weight.dtype))
        return self.act(self.body(z)) if self.n_layers > 1 else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class FlatMLP(Metanet):
    """An MLP on the flat parameter vector; ``augment`` permutes training samples at random (needs ``spec``)."""

    input_kind = "flat"

    def __init__(
        self,
        in_features: int,
        out_dim: int = 1,
        hidden: int = 256,
        layers: int = 3,
        *,
        augment: bool = False,
        spec: PermutationSpec | Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if augment and spec is None:
            raise InvalidArgumentError("FlatMLP(augment=True) needs the spec whose permutations it samples")
        self.spec = (
            spec if spec is None or isinstance(spec, PermutationSpec) else PermutationSpec.from_dict(spec)
        )
        self.in_features, self.out_dim, self.hidden, self.n_layers = in_features, out_dim, hidden, layers
        self.augment, self.seed = augment, seed
        self.embed_dim = hidden
        self.norm = _Standardize(in_features)
        self.body = _mlp(in_features, hidden, hidden, layers - 1)
        self.head = nn.Linear(hidden, out_dim)
        self._gen = torch.Generator().manual_seed(seed)
        self._index: dict[str, torch.Tensor] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_dim": self.out_dim,
            "hidden": self.hidden,
            "layers": self.n_layers,
            "augment": self.augment,
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "seed": self.seed,
        }

    def featurize(
        self, state: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None
    ) -> torch.Tensor:
        names = _floating(state, self.spec if self.spec is not None else spec)
        missing = [k for k in names if k not in state]
        if missing:
            raise InvalidArgumentError(f"model lacks tensor '{missing[0]}' that this FlatMLP reads")
        v = torch.cat([state[k].detach().reshape(-1).float() for k in names])
        if v.numel() != self.in_features:
            raise InvalidArgumentError(
                f"model has {v.numel()} parameters, this FlatMLP reads {self.in_features} (another architecture)"
            )
        return v

    def collate(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(samples))

    def _permute(self, x: torch.Tensor) -> torch.Tensor:
        assert self.spec is not None
        if self._index is None:
            off, idx = 0, {}
            for k in self.spec.axes_to_perm:
                n = int(torch.Size(self.spec.shapes[k]).numel())
                idx[k] = torch.arange(off, off + n).reshape(self.spec.shapes[k])
                off += n
            self._index = idx
        rows = []
        for i in range(x.shape[0]):
            perms = self.spec.random_perms(self._gen)
            moved = apply_permutation(self.spec, self._index, perms)
            gather = torch.cat([moved[k].reshape(-1) for k in self.spec.axes_to_perm]).to(x.device)
            rows.append(x[i].index_select(0, gather))
        return torch.stack(rows)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.head.weight.dtype)
        if self.augment and self.training:
            x = self._permute(x)
        return torch.relu(self.body(self.norm(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class DeepSets(Metanet):
    """DeepSets over the neurons of the parameter graph (see the module docstring)."""

    input_kind = "graph"

    def __init__(self, out_dim: int = 1, hidden: int = 64, *, max_edges: int = 50_000_000) -> None:
        super().__init__()
        self.out_dim, self.hidden, self.max_edges = out_dim, hidden, max_edges
        self.embed_dim = hidden
        self.type_emb = nn.Embedding(len(NODE_TYPES), hidden)
        self.layer_emb = nn.Linear(16, hidden)
        self.stats = nn.Linear(8, hidden)
        self.phi = _mlp(hidden, hidden, hidden)
        self.rho = _mlp(hidden, hidden, hidden)
        self.head = nn.Linear(hidden, out_dim)

    def config(self) -> dict[str, Any]:
        return {"out_dim": self.out_dim, "hidden": self.hidden, "max_edges": self.max_edges}

    def featurize(self, state: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None) -> Data:
        return build_graph(state, spec or auto_spec(state), max_edges=self.max_edges)

    def collate(self, samples: Sequence[Data]) -> Batch:
        from torch_geometric.data import Batch

        return Batch.from_data_list(list(samples))

    def embed(self, g: Data | Batch) -> torch.Tensor:
        from metanets.gmn import GraphIndex, _agg, sinusoid

        gi = GraphIndex(g)
        dt = self.head.weight.dtype
        v = g.edge_value.to(dt).mean(1, keepdim=True)
        m = torch.cat([v, v * v, v.abs(), torch.ones_like(v)], 1)
        n = gi.num_nodes
        s_in = m.new_zeros(n, 4).index_add_(0, gi.dst, m)
        s_out = m.new_zeros(n, 4).index_add_(0, gi.src, m)

        def moments(s: torch.Tensor) -> torch.Tensor:
            c = s[:, 3:4].clamp_min(1)
            mean = s[:, 0:1] / c
            std = (s[:, 1:2] / c - mean * mean).clamp_min(0).sqrt()
            return torch.cat([mean, std, s[:, 2:3] / c, torch.log1p(s[:, 3:4])], 1)

        feats = torch.cat([moments(s_in), moments(s_out)], 1)
        x = (
            self.type_emb(g.node_type.long())
            + self.layer_emb(sinusoid(g.node_layer, 16, dtype=dt))
            + self.stats(feats)
        )
        pooled = _agg(self.phi(x), gi.node_graph, gi.num_graphs, "mean", gi.inv_graph_nodes)
        return torch.relu(self.rho(pooled))

    def forward(self, g: Data | Batch) -> torch.Tensor:
        return self.head(self.embed(g))
