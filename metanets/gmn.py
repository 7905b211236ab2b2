"""Graph Metanetworks: an edge-updating message-passing network over parameter graphs.

Lim, Maron, Law, Lorraine & Lucas, "Graph Metanetworks for Processing Diverse Neural Architectures"
(ICLR 2024), process a network's parameter graph (:mod:`metanets.graph`) with a GNN that keeps node,
edge and global features and updates all three, the graph-network block of Battaglia et al.
("Relational inductive biases, deep learning, and graph networks", 2018, Eq. 1 and Algorithm 1),
which GMN uses (Lim et al. §3: message passing with node, edge and global features; their released
``EdgeMPNN`` is this block). In Battaglia et al.'s notation one block computes

- (Eq. 1a, edge update)   ``e'_k = φ^e(e_k, v_{r_k}, v_{s_k}, u)``
- (Eq. 1b, node update)   ``v'_i = φ^v(ρ^{e→v}(E'_i), v_i, u)``
- (Eq. 1c, global update) ``u' = φ^u(ρ^{e→u}(E'), ρ^{v→u}(V'), u)``

Our φ's are residual pre-LayerNorm MLPs (GMN's DiT-style variant, zero-initialised output layers so a
block starts as the identity), with two choices that matter for parameter graphs:

- ρ^{e→v} aggregates a node's *incoming* and *outgoing* edges separately (the graph is directed: a
  weight's input and output unit play different roles), by mean (default) or sum. Max is available
  but slow on CPU in torch 2.13 (``scatter_reduce`` regression, pytorch#183812).
- φ^e's first linear layer is split by input, ``W[e; v_s; v_r; u] = W_e e + (W_s v + W_u u)_s + (W_r v)_r``,
  so the node (and global) terms are projected once per node and gathered, instead of concatenating
  ``4h`` features on every edge (the same function, a fraction of the edge work).

Everything the network sees is invariant or equivariant by construction: hidden nodes carry no index
(only their type and layer), so permuting a model's hidden units with its spec permutes the graph's
nodes and edges and leaves ``forward``/``embed`` unchanged and ``equivariant`` permuted accordingly
(tested to 1e-5). The invariant read-out is a mean over edges and nodes (DeepSets, GMN §3.2) and the
global feature, optionally with the **ordered** features of the fixed (input and output) nodes
concatenated (``io_slots``): input and output neurons are not permutable, and a read-out that pools
them loses which input or output is which (NFN's HNP pooling and Neural Graphs' ``cat`` read-out do
the same; our research pilot needed it for task identification).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from merge.errors import InvalidArgumentError
from merge.symmetry import PermutationSpec
from metanets.base import Metanet
from metanets.graph import EDGE_TYPES, NODE_TYPES, build_graph

if TYPE_CHECKING:
    from torch_geometric.data import Batch, Data

__all__ = ["GMN", "GraphIndex", "sinusoid"]


def sinusoid(
    idx: torch.Tensor, dim: int, base: float = 1000.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Transformer-style sinusoidal features of an integer index (any value; no table to outgrow)."""
    half = dim // 2
    freq = torch.exp(-math.log(base) * torch.arange(half, device=idx.device, dtype=dtype) / half)
    ang = idx.to(dtype)[..., None] * freq
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class GraphIndex:
    """Per-batch index arrays every layer needs (computed once per forward)."""

    def __init__(self, g: Data | Batch) -> None:
        self.src = g.edge_index[0]
        self.dst = g.edge_index[1]
        self.num_nodes = int(g.num_nodes)
        nb = getattr(g, "batch", None)
        self.node_graph = (
            nb if nb is not None else torch.zeros(self.num_nodes, dtype=torch.long, device=self.src.device)
        )
        self.num_graphs = int(getattr(g, "num_graphs", 1) or 1)
        self.edge_graph = self.node_graph[self.src]
        dev = self.src.device

        def inv_count(idx: torch.Tensor, n: int) -> torch.Tensor:
            c = torch.bincount(idx, minlength=n).clamp_min(1).to(torch.float32)
            return (1.0 / c).to(dev)[:, None]

        self.inv_in = inv_count(self.dst, self.num_nodes)
        self.inv_out = inv_count(self.src, self.num_nodes)
        self.inv_graph_nodes = inv_count(self.node_graph, self.num_graphs)
        self.inv_graph_edges = inv_count(self.edge_graph, self.num_graphs)


def _agg(src: torch.Tensor, idx: torch.Tensor, n: int, how: str, inv: torch.Tensor) -> torch.Tensor:
    if how == "max":
        from torch_geometric.utils import scatter

        return scatter(src, idx, dim=0, dim_size=n, reduce="max")
    out = src.new_zeros(n, src.shape[1]).index_add_(0, idx, src)
    return out * inv.to(out.dtype) if how == "mean" else out


def _mlp(i: int, h: int, o: int, zero: bool = False) -> nn.Sequential:
    last = nn.Linear(h, o)
    if zero:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), last)


class _Block(nn.Module):
    """One graph-network block (Battaglia et al. 2018, Eq. 1a–c) with residual pre-LN updates."""

    def __init__(self, h: int, aggregation: str, dropout: float) -> None:
        super().__init__()
        self.aggregation = aggregation
        self.ln_e, self.ln_x, self.ln_u = nn.LayerNorm(h), nn.LayerNorm(h), nn.LayerNorm(h)
        # φ^e: the first layer split by input (W_e e + W_s x_src + W_r x_dst + W_u u), then SiLU, Linear
        self.e_self = nn.Linear(h, h)
        self.e_nodes = nn.Linear(h, 2 * h, bias=False)  # [W_s; W_r] on the nodes, gathered per edge
        self.e_glob = nn.Linear(h, h, bias=False)
        self.e_out = nn.Linear(h, h)
        nn.init.zeros_(self.e_out.weight)
        nn.init.zeros_(self.e_out.bias)
        self.phi_x = _mlp(4 * h, h, h, zero=True)  # [x, agg_in(e'), agg_out(e'), u]
        self.phi_u = _mlp(3 * h, h, h, zero=True)  # [u, mean(x'), mean(e')]
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, e: torch.Tensor, u: torch.Tensor, gi: GraphIndex
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, us = self.ln_x(x), self.ln_u(u)
        # Eq. 1a: edge update
        h = x.shape[1]
        sd = self.e_nodes(xs)
        # the global term joins the source projection per node (one gather per edge instead of two)
        # (e_self's bias joins it too), and the edge term is one fused multiply-add (addmm)
        ps = sd[:, :h] + self.e_glob(us).index_select(0, gi.node_graph) + self.e_self.bias
        pre = ps.index_select(0, gi.src) + sd[:, h:].index_select(0, gi.dst)
        m = torch.addmm(pre, self.ln_e(e), self.e_self.weight.t())
        upd = torch.addmm(self.e_out.bias, F.silu(m), self.e_out.weight.t())
        e = e + self.drop(upd)
        # Eq. 1b: node update from incoming and outgoing edges, aggregated separately
        a_in = _agg(e, gi.dst, gi.num_nodes, self.aggregation, gi.inv_in)
        a_out = _agg(e, gi.src, gi.num_nodes, self.aggregation, gi.inv_out)
        x = x + self.drop(self.phi_x(torch.cat([xs, a_in, a_out, us.index_select(0, gi.node_graph)], dim=1)))
        # Eq. 1c: global update from the mean node and edge
        xm = _agg(x, gi.node_graph, gi.num_graphs, "mean", gi.inv_graph_nodes)
        em = _agg(e, gi.edge_graph, gi.num_graphs, "mean", gi.inv_graph_edges)
        u = u + self.drop(self.phi_u(torch.cat([us, xm, em], dim=1)))
        return x, e, u


class GMN(Metanet):
    """A Graph Metanetwork over :func:`metanets.graph.build_graph` graphs.

    ``forward(batch)`` gives the invariant prediction ``[B, out_dim]``, ``embed(batch)`` the invariant
    embedding ``[B, embed_dim]`` it is read from, and ``equivariant(batch)`` per-edge ``[E, edge_out]``
    and per-node ``[N, node_out]`` outputs (map them back to tensors with
    :func:`metanets.graph.edges_to_state`). ``graph_mode="channel"`` with a ``kernel_grid`` reads the
    compact CNN graphs (edge values ``[E, prod(kernel_grid)]``).
    """

    input_kind = "graph"

    def __init__(
        self,
        out_dim: int = 1,
        hidden: int = 32,
        layers: int = 3,
        *,
        embed_dim: int | None = None,
        aggregation: str = "mean",
        io_slots: int = 0,
        io_dim: int = 4,
        edge_out: int = 0,
        node_out: int = 0,
        graph_mode: str = "entry",
        kernel_grid: Sequence[int] | None = None,
        max_edges: int = 50_000_000,
        fourier: int = 8,
        dropout: float = 0.0,
        amp: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if aggregation not in ("mean", "sum", "max"):
            raise InvalidArgumentError(f"GMN aggregation must be mean, sum or max, not '{aggregation}'")
        if graph_mode == "channel" and kernel_grid is None:
            raise InvalidArgumentError(
                "GMN with graph_mode='channel' needs kernel_grid (e.g. (3, 3)) so every graph has one edge width"
            )
        self.out_dim, self.hidden, self.n_layers = out_dim, hidden, layers
        self.embed_dim = embed_dim or hidden
        self.aggregation, self.io_slots, self.io_dim = aggregation, io_slots, io_dim
        self.edge_out_dim, self.node_out_dim = edge_out, node_out
        self.graph_mode = graph_mode
        self.kernel_grid = tuple(kernel_grid) if kernel_grid is not None else None
        self.max_edges, self.n_fourier, self.dropout = max_edges, fourier, dropout
        self.amp = amp
        k = math.prod(self.kernel_grid) if graph_mode == "channel" else 1
        self.edge_dim = k
        self.register_buffer(
            "freqs", torch.randn(k, fourier, generator=torch.Generator().manual_seed(0)) * 2.0
        )
        self.d_idx = 16
        self.e_value = nn.Linear(k + 2 * fourier, hidden)
        self.e_type = nn.Embedding(len(EDGE_TYPES), hidden)
        self.e_index = nn.Linear(4 * self.d_idx, hidden)
        self.e_mix = _mlp(hidden, hidden, hidden)
        self.x_type = nn.Embedding(len(NODE_TYPES), hidden)
        self.x_index = nn.Linear(2 * self.d_idx, hidden)
        self.x_mix = _mlp(hidden, hidden, hidden)
        self.u0 = nn.Parameter(torch.zeros(hidden))
        self.blocks = nn.ModuleList([_Block(hidden, aggregation, dropout) for _ in range(layers)])
        self.ln_e, self.ln_x, self.ln_u = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.io_proj = nn.Linear(hidden, io_dim) if io_slots else None
        self.readout = _mlp(3 * hidden + io_slots * io_dim, hidden, self.embed_dim)
        self.head = nn.Linear(self.embed_dim, out_dim)
        self.edge_head = nn.Linear(hidden, edge_out) if edge_out else None
        self.node_head = nn.Linear(hidden, node_out) if node_out else None

    def config(self) -> dict[str, Any]:
        return {
            "out_dim": self.out_dim,
            "hidden": self.hidden,
            "layers": self.n_layers,
            "embed_dim": self.embed_dim,
            "aggregation": self.aggregation,
            "io_slots": self.io_slots,
            "io_dim": self.io_dim,
            "edge_out": self.edge_out_dim,
            "node_out": self.node_out_dim,
            "graph_mode": self.graph_mode,
            "kernel_grid": list(self.kernel_grid) if self.kernel_grid else None,
            "max_edges": self.max_edges,
            "fourier": self.n_fourier,
            "dropout": self.dropout,
        }

    # -- the shared call shape ---------------------------------------------------------------------
    def featurize(self, state: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None) -> Data:
        return build_graph(
            state, spec, mode=self.graph_mode, kernel_grid=self.kernel_grid, max_edges=self.max_edges
        )

    def collate(self, samples: Sequence[Data]) -> Batch:
        from torch_geometric.data import Batch

        return Batch.from_data_list(list(samples))

    # -- the network -------------------------------------------------------------------------------
    def _encode(self, g: Data | Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, GraphIndex]:
        if g.edge_value.shape[1] != self.edge_dim:
            raise InvalidArgumentError(
                f"graph edges carry {g.edge_value.shape[1]} values, this GMN reads {self.edge_dim} "
                f"(graph_mode={self.graph_mode!r}, kernel_grid={self.kernel_grid})"
            )
        gi = GraphIndex(g)
        v = g.edge_value.to(self.freqs.dtype)
        ang = 2 * math.pi * v @ self.freqs
        e = self.e_value(torch.cat([v, ang.sin(), ang.cos()], dim=1))
        e = e + self.e_type(g.edge_type.long())
        pos = g.edge_pos.long() + 1
        idx = torch.cat(
            [sinusoid(g.edge_layer, self.d_idx, dtype=v.dtype)]
            + [sinusoid(pos[:, j], self.d_idx, dtype=v.dtype) for j in range(3)],
            1,
        )
        e = self.e_mix(e + self.e_index(idx))
        x = self.x_type(g.node_type.long())
        nidx = torch.cat(
            [
                sinusoid(g.node_layer, self.d_idx, dtype=v.dtype),
                sinusoid(g.node_io.long() + 1, self.d_idx, dtype=v.dtype),
            ],
            1,
        )
        x = self.x_mix(x + self.x_index(nidx))
        u = self.u0.expand(gi.num_graphs, -1)
        for blk in self.blocks:
            x, e, u = blk(x, e, u, gi)
        return self.ln_x(x), self.ln_e(e), self.ln_u(u), gi

    def _pool(
        self, g: Data | Batch, x: torch.Tensor, e: torch.Tensor, u: torch.Tensor, gi: GraphIndex
    ) -> torch.Tensor:
        xm = _agg(x, gi.node_graph, gi.num_graphs, "mean", gi.inv_graph_nodes)
        em = _agg(e, gi.edge_graph, gi.num_graphs, "mean", gi.inv_graph_edges)
        parts = [u, xm, em]
        if self.io_proj is not None:
            from torch_geometric.utils import to_dense_batch

            fixed = (g.node_type == NODE_TYPES.index("input")) | (g.node_type == NODE_TYPES.index("output"))
            dense, _ = to_dense_batch(
                self.io_proj(x[fixed]),
                gi.node_graph[fixed],
                max_num_nodes=self.io_slots,
                batch_size=gi.num_graphs,
            )
            parts.append(dense.reshape(gi.num_graphs, -1))
        return self.readout(torch.cat(parts, dim=1))

    def embed(self, g: Data | Batch) -> torch.Tensor:
        """The invariant embedding ``[B, embed_dim]``."""
        with self._autocast():
            x, e, u, gi = self._encode(g)
            return self._pool(g, x, e, u, gi).float()

    def forward(self, g: Data | Batch) -> torch.Tensor:
        """The invariant prediction ``[B, out_dim]``."""
        with self._autocast():
            x, e, u, gi = self._encode(g)
            return self.head(self._pool(g, x, e, u, gi)).float()

    def equivariant(self, g: Data | Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-edge ``[E, edge_out]`` and per-node ``[N, node_out]`` outputs (``None`` where not configured)."""
        if self.edge_head is None and self.node_head is None:
            raise InvalidArgumentError("this GMN has no equivariant head (construct it with edge_out= or node_out=)")
        with self._autocast():
            x, e, _, _ = self._encode(g)
            eo = self.edge_head(e).float() if self.edge_head is not None else None
            no = self.node_head(x).float() if self.node_head is not None else None
        return eo, no
