"""The parameter graph of a model: neurons are nodes, parameters are edges.

Graph Metanetworks (Lim, Maron, Law, Lorraine & Lucas, "Graph Metanetworks for Processing Diverse
Neural Architectures", ICLR 2024, §3) turn a network into a graph whose automorphisms include the
network's hidden-unit permutation symmetries, then process it with a GNN. Here the graph is built
from the one object the project already has for those symmetries, a
:class:`~merge.symmetry.PermutationSpec`, so any model whose spec ``merge.symmetry`` can build or
infer gets a graph, and permuting the model with the spec's permutations permutes the graph's nodes
(tested).

**Node sets.** Every permutation id of the spec is one set of *hidden* nodes (one node per unit, in
unit order). A non-permuted axis that carries neurons (the network's input features, its outputs,
a vocabulary) is a set of *fixed* nodes that carry their index as a feature (input/output neurons
are not permutable, Lim et al. §3.1). A residual stream is one permutation in the spec and hence one
node set that every block reads and writes: GMN's residual edges of value 1 (their §3.1) are
contracted, which loses no parameter. Multi-head attention permutations (a
:class:`~merge.symmetry.HeadStructure`) get one *head node* per head, shared by the q/k and v/o
permutations of one head group, with a structural edge to each of the head's units; with
``within=False`` (RoPE: features stay in place inside a head) that edge carries the feature's position
in the head.

**Edges.** Every parameter is on exactly one edge (the inverse map is exact, bit for bit):

- a weight ``W`` (torch layout ``[out, in, *kernel]``, or the spec's view of it) gives one edge
  ``in_j -> out_i`` per entry, carrying ``W[i, j, k...]`` and the kernel position ``k`` (at most three
  position axes; a fused ``in_proj`` viewed as ``(3, E, E)`` uses the position for q/k/v). Embedding
  tables ``(vocab, d)`` run ``token -> unit``;
- **bias nodes** (GMN's default, Lim et al. §3.1, Fig. 1): every 1-D tensor (bias, normalisation
  scale and shift, BatchNorm running mean and variance) gets one *parameter node* with an edge to each
  unit it acts on, carrying the value and the parameter's type. We chose parameter nodes over node
  features because a residual stream's units receive scales and shifts from many normalisation layers
  (node features would have a different width per node set); a norm's scale and shift are still
  attached to exactly the units they act on. Token tensors (``pos_embed``, ``cls_token``) are vectors
  with positions;
- in ``mode="channel"`` (the compact form of Kofinas et al., "Graph Neural Networks for Learning
  Equivariant Representations of Neural Networks", ICLR 2024) a convolution gives one edge per
  (input channel, output channel) pair whose value is the kernel, zero-padded and centred in a common
  kernel grid (``edge_value`` is ``[E, K]``); other parameters sit at the grid's centre, like a 1×1
  kernel. For a ResNet-18 this is ~6× fewer edges.

The graph is a :class:`torch_geometric.data.Data` with ``edge_index [2, E]``, ``edge_value [E, K]``
(``K = 1`` per entry), ``edge_type``, ``edge_layer``, ``edge_pos [E, 3]`` (``-1`` where absent),
``node_type``, ``node_layer``, ``node_io`` (a fixed node's index, ``-1`` otherwise) and ``layout`` (a
:class:`GraphLayout`, the inverse map). It is built with one vectorised fill per tensor (no Python
loop over weights) into preallocated arrays, and batches with :class:`torch_geometric.data.Batch`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from merge.checkpoint import require_finite
from merge.errors import InvalidArgumentError, MissingTensorError, ShapeMismatchError
from merge.symmetry import PermutationSpec, natural_key, resolve_spec

if TYPE_CHECKING:
    from torch_geometric.data import Batch, Data

__all__ = [
    "EDGE_TYPES",
    "NODE_TYPES",
    "GraphLayout",
    "GraphTooLargeError",
    "NodeSet",
    "TensorSlot",
    "build_graph",
    "count_edges",
    "edges_to_state",
    "nodes_to_state",
    "split_edge_values",
]

#: Edge types (``edge_type`` indexes this list).
EDGE_TYPES: tuple[str, ...] = (
    "weight",  # a dense / conv weight entry (or kernel, in channel mode)
    "embedding",  # an embedding table entry: token -> unit
    "bias",
    "norm_scale",
    "norm_shift",
    "running_mean",
    "running_var",
    "vector",  # another per-unit vector
    "token",  # a vector with positions (pos_embed, cls_token)
    "scalar",  # a 0-d parameter (self-loop on its parameter node)
    "head",  # structural: head node -> unit (no parameter)
)
#: Node types (``node_type`` indexes this list); parameter nodes are typed by their parameter.
NODE_TYPES: tuple[str, ...] = ("hidden", "input", "output", "head") + tuple(
    f"param_{t}" for t in EDGE_TYPES[:-1]
)
_ET = {t: i for i, t in enumerate(EDGE_TYPES)}
_NT = {t: i for i, t in enumerate(NODE_TYPES)}

_EMBED = re.compile(
    r"(?:^|\.)(?:word_embeddings|embed_tokens|tok_embeddings|token_embedding|tok_emb|wte|embedding|embed|"
    r"embeddings|position_embeddings|position_embedding|pos_emb|wpe|token_type_embeddings)\.weight$"
)
_NORM_MODULE = re.compile(r"(?:^|[._])(?:bn|norm|ln|layernorm|batchnorm|rmsnorm|gn|groupnorm)[_0-9]*$", re.I)


class GraphTooLargeError(InvalidArgumentError):
    """A parameter graph would exceed the edge budget (raised before anything is allocated)."""


@dataclass(frozen=True)
class NodeSet:
    """A contiguous block of nodes: one permutation's units, a fixed axis, a parameter node, heads."""

    key: str
    kind: str  # one of NODE_TYPES
    start: int
    size: int
    layer: int
    perm: str | None = None  # the permutation id acting on these nodes (hidden and head sets)


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's entries sit among the edges (the inverse map)."""

    name: str
    shape: tuple[int, ...]  # stored shape
    dtype: torch.dtype
    kind: str  # weight | embedding | vector | token | scalar
    edge_start: int
    edge_stop: int
    read_shape: tuple[int, ...]  # the shape whose row-major order the edges follow
    kernel: tuple[int, ...] = ()  # channel mode: this tensor's kernel shape (edges are [out, in])


@dataclass
class GraphLayout:
    """The inverse map of a parameter graph: node sets, tensor slots, tensors kept out of the graph."""

    name: str
    mode: str
    kernel_grid: tuple[int, ...]
    num_nodes: int
    num_edges: int
    node_sets: list[NodeSet]
    slots: list[TensorSlot]
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    unit_sets: dict[str, str] = field(default_factory=dict)  # 1-D tensor -> node set key it acts on
    names: list[str] = field(default_factory=list)  # the state dict's keys, in its order

    @property
    def edge_dim(self) -> int:
        return math.prod(self.kernel_grid) if self.mode == "channel" else 1

    def node_set(self, key: str) -> NodeSet:
        for s in self.node_sets:
            if s.key == key:
                return s
        raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# Planning: which axes are neurons, which node sets exist, how many edges
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    name: str
    kind: str
    etype: int
    layer: int
    read_shape: tuple[int, ...]
    out_set: str | None = None  # node set of the out (dst) axis
    in_set: str | None = None  # node set of the in (src) axis
    out_axis: int | None = None
    in_axis: int | None = None
    pos_axes: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()  # channel mode
    n_edges: int = 0


def _leaf_kind(name: str, state_names: set[str]) -> int:
    prefix, _, leaf = name.rpartition(".")
    is_norm = bool(_NORM_MODULE.search(prefix)) or (
        f"{prefix}.running_mean" in state_names if prefix else "running_mean" in state_names
    )
    if leaf == "running_mean":
        return _ET["running_mean"]
    if leaf == "running_var":
        return _ET["running_var"]
    if leaf == "bias":
        return _ET["norm_shift"] if is_norm else _ET["bias"]
    if leaf in ("weight", "scale", "gamma", "g"):
        return _ET["norm_scale"] if is_norm else _ET["vector"]
    if leaf in ("beta",):
        return _ET["norm_shift"]
    return _ET["vector"]


def _weight_axes(name: str, shape: tuple[int, ...], axes: Sequence[str | None]) -> tuple[int, int] | None:
    """``(out axis, in axis)`` of a weight-like tensor (2+ axes, not a token vector), else ``None``."""
    perm_axes = [a for a, p in enumerate(axes) if p is not None]
    if len(shape) < 2 or (len(perm_axes) == 1 and perm_axes[0] >= 2):
        return None
    if len(perm_axes) == 2:
        return perm_axes[0], perm_axes[1]
    if _EMBED.search(name) and len(shape) == 2:
        return 1, 0
    return 0, 1


def _module_layers(names: Sequence[str], spec: PermutationSpec) -> dict[str, int]:
    """Layer index of every module, independent of the order the tensors come in (safetensors files
    return them in a random order): top-level module groups (``features``, ``classifier``, ``layer2``...)
    ordered by their depth in the network (shortest path from the input units over the weights' unit
    sets), natural order of names within a group and between groups of equal depth."""
    edges: dict[str, set[str]] = {}
    w_in: dict[str, str] = {}
    vec: dict[str, str] = {}
    for name in names:
        shape, axes = spec.view_shape(name), spec.axes_to_perm[name]
        wa = _weight_axes(name, shape, axes)
        if wa is not None:
            o, i = (
                f"perm:{axes[a]}" if axes[a] is not None else f"{r}:{name}:{a}"
                for a, r in zip(wa, ("output", "input"), strict=True)
            )
            edges.setdefault(i, set()).add(o)
            w_in[name] = i
        elif axes and any(p is not None for p in axes):
            vec[name] = f"perm:{next(p for p in axes if p is not None)}"
    depth: dict[str, int] = {k: 0 for k in edges if not k.startswith("perm:")}
    frontier = sorted(depth)
    while frontier:
        nxt = []
        for k in frontier:
            for o in sorted(edges.get(k, ())):
                if o not in depth:
                    depth[o] = depth[k] + 1
                    nxt.append(o)
        frontier = nxt
    group_depth: dict[str, int] = {}
    for name in names:
        g = name.split(".")[0] if "." in name else ""
        if name in w_in:
            d = depth.get(w_in[name], 0)
        elif name in vec:
            d = max(0, depth.get(vec[name], 1) - 1)
        else:  # unpermuted vectors (an output bias) say nothing about depth
            group_depth.setdefault(g, 1 << 30)
            continue
        group_depth[g] = min(group_depth.get(g, d), d)
    mods = sorted(
        {n.rpartition(".")[0] for n in names},
        key=lambda m: (
            group_depth[m.split(".")[0] if m else ""],
            natural_key(m.split(".")[0] if m else ""),
            natural_key(m),
        ),
    )
    return {m: i for i, m in enumerate(mods)}


def _plan(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, mode: str, kernel_grid: tuple[int, ...] | None
) -> tuple[list[_Plan], dict[str, NodeSet], list[str], tuple[int, ...], dict[str, str]]:
    names = [k for k in state if state[k].is_floating_point()]
    layers = _module_layers(names, spec)
    names.sort(key=lambda k: (layers[k.rpartition(".")[0]], natural_key(k)))
    state_names = set(state)
    sets: dict[str, NodeSet] = {}
    order: list[str] = []
    cursor = 0

    def add_set(key: str, kind: str, size: int, layer: int, perm: str | None = None) -> str:
        nonlocal cursor
        if key not in sets:
            sets[key] = NodeSet(key, kind, cursor, size, layer, perm)
            order.append(key)
            cursor += size
        return key

    def unit_set(name: str, axis: int, size: int, layer: int, role: str) -> str:
        p = spec.axes_to_perm[name][axis]
        if p is not None:
            return add_set(f"perm:{p}", "hidden", spec.sizes[p], layer + (role == "output"), p)
        return add_set(f"{role}:{name}:{axis}", role, size, layer + (role == "output"))

    plans: list[_Plan] = []
    conv_kernels: list[tuple[int, ...]] = []
    pending_vectors: list[tuple[str, int]] = []
    for name in names:
        t = state[name]
        shape = spec.view_shape(name)
        axes = spec.axes_to_perm[name]
        layer = layers[name.rpartition(".")[0]]
        nd = len(shape)
        perm_axes = [a for a, p in enumerate(axes) if p is not None]
        if nd == 0:
            pl = _Plan(name, "scalar", _ET["scalar"], layer, (1,), n_edges=1)
            pl.out_set = add_set(f"param:{name}", "param_scalar", 1, layer)
            plans.append(pl)
            continue
        if nd == 1:
            pending_vectors.append((name, layer))
            plans.append(_Plan(name, "vector", _leaf_kind(name, state_names), layer, shape, n_edges=shape[0]))
            continue
        if len(perm_axes) > 2:
            raise InvalidArgumentError(
                f"tensor '{name}': {len(perm_axes)} permuted axes; a parameter graph edge joins two units"
            )
        wa = _weight_axes(name, shape, axes)
        if wa is not None:
            out_ax, in_ax = wa
        else:
            # a vector over units with positions (pos_embed (1, N, d), cls_token (1, 1, d))
            a = perm_axes[0]
            pl = _Plan(name, "token", _ET["token"], layer, shape, out_axis=a, n_edges=t.numel())
            pl.pos_axes = tuple(i for i in range(nd) if i != a)
            pl.out_set = unit_set(name, a, shape[a], layer, "output")
            pl.in_set = add_set(f"param:{name}", "param_token", 1, layer)
            plans.append(pl)
            continue
        pos = tuple(i for i in range(nd) if i not in (out_ax, in_ax))
        if len(pos) > 3:
            raise InvalidArgumentError(f"tensor '{name}' of shape {list(shape)} has more than three position axes")
        is_conv = mode == "channel" and name not in spec.views and t.dim() >= 3 and (out_ax, in_ax) == (0, 1)
        kind = "embedding" if (out_ax, in_ax) == (1, 0) else "weight"
        pl = _Plan(name, kind, _ET[kind], layer, shape, out_axis=out_ax, in_axis=in_ax, pos_axes=pos)
        pl.in_set = unit_set(name, in_ax, shape[in_ax], layer, "input")
        pl.out_set = unit_set(name, out_ax, shape[out_ax], layer, "output")
        if is_conv:
            pl.kernel = tuple(shape[2:])
            pl.pos_axes = ()
            pl.n_edges = shape[0] * shape[1]
            conv_kernels.append(pl.kernel)
        else:
            pl.n_edges = t.numel()
        plans.append(pl)

    # 1-D tensors act on the units of their permutation, or on the fixed output units of the sibling
    # weight ('fc.bias' -> 'fc.weight' axis 0), or on a fixed set of their own
    by_name = {p.name: p for p in plans}
    unit_sets: dict[str, str] = {}
    for name, layer in pending_vectors:
        pl = by_name[name]
        n = pl.read_shape[0]
        p = spec.axes_to_perm[name][0]
        if p is not None:
            target = add_set(f"perm:{p}", "hidden", spec.sizes[p], layer + 1, p)
        else:
            prefix = name.rpartition(".")[0]
            sib = next(
                (
                    q
                    for q in plans
                    if q.name.rpartition(".")[0] == prefix and q.kind in ("weight", "embedding") and q.out_set
                ),
                None,
            )
            if sib is not None and sets[sib.out_set].size == n and sets[sib.out_set].kind != "hidden":
                target = sib.out_set
            else:
                target = add_set(f"output:{name}:0", "output", n, layer + 1)
        pl.out_set = target
        unit_sets[name] = target
        pl.in_set = add_set(f"param:{name}", f"param_{EDGE_TYPES[pl.etype]}", 1, layer)

    # head nodes: one per head of each head group, shared by the group's permutations
    for p, hs in spec.heads.items():
        if f"perm:{p}" in sets:
            add_set(f"heads:{hs.group}", "head", hs.n_heads, sets[f"perm:{p}"].layer, f"heads:{hs.group}")

    if mode == "channel":
        if kernel_grid is None:
            ranks = {len(k) for k in conv_kernels}
            if len(ranks) > 1:
                raise InvalidArgumentError(
                    f"model mixes convolutions of {sorted(ranks)} spatial dimensions; pass kernel_grid="
                )
            kernel_grid = (
                tuple(max(k[i] for k in conv_kernels) for i in range(len(conv_kernels[0])))
                if conv_kernels
                else (1,)
            )
        for pl in plans:
            if pl.kernel and (
                len(pl.kernel) != len(kernel_grid)
                or any(k > g for k, g in zip(pl.kernel, kernel_grid, strict=True))
            ):
                raise ShapeMismatchError(
                    f"tensor '{pl.name}': kernel {list(pl.kernel)} does not fit the kernel grid {list(kernel_grid)}"
                )
    else:
        kernel_grid = (1,)
    return plans, sets, order, kernel_grid, unit_sets


def _check_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec, name: str) -> None:
    floating = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floating:
        raise InvalidArgumentError(f"model '{name}' has no floating-point tensors: nothing to build a graph from")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise InvalidArgumentError(f"model '{name}': entry '{k}' is a {type(v).__name__}, not a tensor")
    for k in spec.axes_to_perm:
        if k not in state:
            raise MissingTensorError(f"model '{name}': tensor '{k}' of the permutation spec is missing")
        if tuple(state[k].shape) != spec.shapes[k]:
            raise ShapeMismatchError(
                f"model '{name}': tensor '{k}' has shape {list(state[k].shape)}, the permutation spec expects "
                f"{list(spec.shapes[k])}"
            )
    extra = [k for k in floating if k not in spec.axes_to_perm]
    if extra:
        raise InvalidArgumentError(
            f"model '{name}': tensor '{sorted(extra, key=natural_key)[0]}' is not in the permutation spec "
            f"({len(extra)} such tensors); the spec must list every floating-point tensor"
        )
    for k in floating:
        require_finite(state[k], f"model '{name}'", k)


def count_edges(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec | None = None,
    *,
    mode: str = "entry",
    name: str = "model",
) -> int:
    """The number of edges :func:`build_graph` would create, from shapes alone (no allocation)."""
    spec = resolve_spec(state, spec=spec, from_names=True, check=False, where=name)
    plans, sets, _, _, _ = _plan(state, spec, mode, None)
    heads = sum(hs.n_heads * hs.head_dim for p, hs in spec.heads.items() if f"perm:{p}" in sets)
    return sum(p.n_edges for p in plans) + heads


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _grid_index(kernel: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """Flat positions of a kernel's entries when centred in the grid (row-major)."""
    ranges = [torch.arange(k) + (g - k) // 2 for k, g in zip(kernel, grid, strict=True)]
    mesh = torch.meshgrid(*ranges, indexing="ij")
    flat = torch.zeros_like(mesh[0])
    for m, g in zip(mesh, grid, strict=True):
        flat = flat * g + m
    return flat.reshape(-1)


def _bcast(v: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return v.view(view).expand(shape)


def build_graph(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec | None = None,
    *,
    mode: str = "entry",
    kernel_grid: Sequence[int] | None = None,
    max_edges: int = 50_000_000,
    dtype: torch.dtype | None = None,
    name: str = "model",
) -> Data:
    """The parameter graph of ``state`` under ``spec`` (see the module docstring for its layout).

    ``spec`` defaults to :func:`merge.symmetry.auto_spec` (ResNet or MLP/CNN chain from names and
    shapes; pass a spec from :func:`merge.symmetry.infer_spec` or ``transformer_spec`` for anything
    else). ``mode`` is ``"entry"`` (one edge per parameter) or ``"channel"`` (one edge per conv channel
    pair carrying the kernel in ``kernel_grid``). A graph over ``max_edges`` raises
    :class:`GraphTooLargeError` before allocating. ``edge_value`` has ``dtype`` (default: float32, or
    float64 when the model has float64 tensors), so the inverse map :func:`edges_to_state` returns
    the original tensors bit for bit. Non-floating tensors (``num_batches_tracked``, position ids) are
    kept in the layout, not the graph. Errors name the model and the tensor: a tensor the spec lists
    but the model lacks, a shape the spec does not expect, a NaN/Inf weight, an empty model.
    """
    if mode not in ("entry", "channel"):
        raise InvalidArgumentError(f"unknown graph mode '{mode}' (expected 'entry' or 'channel')")
    spec = resolve_spec(state, spec=spec, from_names=True, check=False, where=name)
    _check_state(state, spec, name)
    grid = tuple(int(g) for g in kernel_grid) if kernel_grid is not None else None
    plans, sets, order, grid, unit_sets = _plan(state, spec, mode, grid)
    head_sets = [
        (p, hs) for p, hs in spec.heads.items() if f"perm:{p}" in sets and f"heads:{hs.group}" in sets
    ]
    n_edges = sum(p.n_edges for p in plans) + sum(hs.n_heads * hs.head_dim for _, hs in head_sets)
    if n_edges > max_edges:
        hint = ""
        if mode == "entry" and any(state[p.name].dim() >= 3 for p in plans if p.kind == "weight"):
            hint = f", or mode='channel' ({count_edges(state, spec, mode='channel', name=name):,} edges)"
        raise GraphTooLargeError(
            f"model '{name}': its parameter graph would have {n_edges:,} edges, over the edge budget of "
            f"{max_edges:,}; pass a larger max_edges{hint}"
        )
    floating = [state[p.name] for p in plans]
    if dtype is None:
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in floating) else torch.float32
    K = math.prod(grid) if mode == "channel" else 1
    centre = int(_grid_index((1,) * len(grid), grid)[0]) if mode == "channel" else 0
    n_nodes = sum(s.size for s in sets.values())

    edge_index = torch.empty(2, n_edges, dtype=torch.long)
    edge_value = torch.zeros(n_edges, K, dtype=dtype)
    edge_type = torch.empty(n_edges, dtype=torch.int16)
    edge_layer = torch.empty(n_edges, dtype=torch.int16)
    edge_pos = torch.full((n_edges, 3), -1, dtype=torch.int16)

    slots: list[TensorSlot] = []
    e0 = 0
    for pl in plans:
        t = state[pl.name].detach()
        e1 = e0 + pl.n_edges
        src, dst = edge_index[0, e0:e1], edge_index[1, e0:e1]
        edge_type[e0:e1] = pl.etype
        edge_layer[e0:e1] = pl.layer
        col = centre
        if pl.kind == "scalar":
            node = sets[pl.out_set].start
            src.fill_(node)
            dst.fill_(node)
            read = (1,)
        elif pl.kind == "vector":
            src.fill_(sets[pl.in_set].start)
            torch.arange(sets[pl.out_set].start, sets[pl.out_set].start + pl.read_shape[0], out=dst)
            read = pl.read_shape
        elif pl.kind == "token":
            shape = pl.read_shape
            src.fill_(sets[pl.in_set].start)
            units = torch.arange(shape[pl.out_axis]) + sets[pl.out_set].start
            dst.view(shape).copy_(_bcast(units, shape, pl.out_axis))
            for j, a in enumerate(pl.pos_axes[:3]):
                edge_pos[e0:e1, j].view(shape).copy_(
                    _bcast(torch.arange(shape[a], dtype=torch.int16), shape, a)
                )
            read = shape
        elif pl.kernel:
            # channel mode: one edge per (out, in) pair, the kernel centred in the grid
            n_out, n_in = pl.read_shape[0], pl.read_shape[1]
            pair = (n_out, n_in)
            dst.view(pair).copy_(_bcast(torch.arange(n_out) + sets[pl.out_set].start, pair, 0))
            src.view(pair).copy_(_bcast(torch.arange(n_in) + sets[pl.in_set].start, pair, 1))
            idx = _grid_index(pl.kernel, grid)
            edge_value[e0:e1].index_copy_(1, idx, t.reshape(n_out * n_in, -1).to(dtype))
            read = pair
            col = -1
        else:
            shape = pl.read_shape
            dst.view(shape).copy_(
                _bcast(torch.arange(shape[pl.out_axis]) + sets[pl.out_set].start, shape, pl.out_axis)
            )
            src.view(shape).copy_(
                _bcast(torch.arange(shape[pl.in_axis]) + sets[pl.in_set].start, shape, pl.in_axis)
            )
            for j, a in enumerate(pl.pos_axes):
                edge_pos[e0:e1, j].view(shape).copy_(
                    _bcast(torch.arange(shape[a], dtype=torch.int16), shape, a)
                )
            read = shape
        if col >= 0:
            edge_value[e0:e1, col] = t.reshape(-1).to(dtype)
        slots.append(
            TensorSlot(
                pl.name, tuple(t.shape), t.dtype, pl.kind, e0, e1, tuple(read), pl.kernel if pl.kernel else ()
            )
        )
        e0 = e1

    # structural head edges: head h -> unit h·d + i of every permutation of the head group
    for p, hs in head_sets:
        units, heads = sets[f"perm:{p}"], sets[f"heads:{hs.group}"]
        e1 = e0 + hs.n_heads * hs.head_dim
        grid2 = (hs.n_heads, hs.head_dim)
        edge_index[0, e0:e1].view(grid2).copy_(_bcast(torch.arange(hs.n_heads) + heads.start, grid2, 0))
        torch.arange(units.start, units.start + units.size, out=edge_index[1, e0:e1])
        edge_type[e0:e1] = _ET["head"]
        edge_layer[e0:e1] = units.layer
        if not hs.within:
            edge_pos[e0:e1, 0].view(grid2).copy_(
                _bcast(torch.arange(hs.head_dim, dtype=torch.int16), grid2, 1)
            )
        e0 = e1
    assert e0 == n_edges

    node_type = torch.empty(n_nodes, dtype=torch.int16)
    node_layer = torch.empty(n_nodes, dtype=torch.int16)
    node_io = torch.full((n_nodes,), -1, dtype=torch.int32)
    for s in sets.values():
        node_type[s.start : s.start + s.size] = _NT[s.kind]
        node_layer[s.start : s.start + s.size] = s.layer
        if s.kind in ("input", "output"):
            torch.arange(s.size, dtype=torch.int32, out=node_io[s.start : s.start + s.size])

    layout = GraphLayout(
        name=name,
        mode=mode,
        kernel_grid=grid,
        num_nodes=n_nodes,
        num_edges=n_edges,
        node_sets=[sets[k] for k in order],
        slots=slots,
        passthrough={k: v.detach().clone() for k, v in state.items() if not v.is_floating_point()},
        unit_sets=unit_sets,
        names=list(state),
    )
    from torch_geometric.data import Data

    data = Data(
        edge_index=edge_index,
        edge_value=edge_value,
        edge_type=edge_type,
        edge_layer=edge_layer,
        edge_pos=edge_pos,
        node_type=node_type,
        node_layer=node_layer,
        node_io=node_io,
        num_nodes=n_nodes,
    )
    data.layout = layout
    return data


# ---------------------------------------------------------------------------------------------
# The inverse map
# ---------------------------------------------------------------------------------------------


def _layout_of(graph: Data | GraphLayout) -> GraphLayout:
    if isinstance(graph, GraphLayout):
        return graph
    layout = getattr(graph, "layout", None)
    if not isinstance(layout, GraphLayout):
        raise InvalidArgumentError(
            "not a single parameter graph (no GraphLayout; split a Batch with split_edge_values)"
        )
    return layout


def edges_to_state(
    graph: Data | GraphLayout,
    edge_values: torch.Tensor | None = None,
    *,
    cast: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Per-edge values back to a state dict of the original names and shapes (the inverse map).

    With ``edge_values=None`` the graph's own ``edge_value`` is used and every tensor comes back in its
    original dtype, bit for bit (passthrough tensors included). With an equivariant output ``[E]`` or
    ``[E, C]`` (entry mode; ``[E, K]`` with the kernel grid in channel mode) each tensor comes back with
    its original shape (``+ [C]`` when ``C > 1``), in the output's dtype unless ``cast``.
    """
    layout = _layout_of(graph)
    own = edge_values is None
    if own:
        edge_values = graph.edge_value  # type: ignore[union-attr]
    ev = edge_values if edge_values.dim() == 2 else edge_values[:, None]
    if ev.shape[0] != layout.num_edges:
        raise ShapeMismatchError(
            f"model '{layout.name}': {ev.shape[0]} edge values given, the graph has {layout.num_edges} edges"
        )
    cast = own if cast is None else cast
    out: dict[str, torch.Tensor] = {}
    channel = layout.mode == "channel"
    centre = int(_grid_index((1,) * len(layout.kernel_grid), layout.kernel_grid)[0]) if channel else 0
    for s in layout.slots:
        block = ev[s.edge_start : s.edge_stop]
        if channel:
            if s.kernel:
                vals = block.index_select(1, _grid_index(s.kernel, layout.kernel_grid).to(block.device))
                t = vals.reshape(s.shape)
            else:
                t = block[:, centre].reshape(s.shape)
        else:
            c = block.shape[1]
            t = block.reshape(s.shape) if c == 1 else block.reshape(*s.shape, c)
        out[s.name] = t.to(s.dtype) if cast else t
    for k, v in layout.passthrough.items():
        out[k] = v.clone()
    return {k: out[k] for k in layout.names} if set(layout.names) == set(out) else out


def nodes_to_state(graph: Data | GraphLayout, node_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-node outputs ``[N]`` / ``[N, C]`` back to every 1-D tensor (bias, norm scale/shift...).

    Each 1-D tensor takes the values of the units it acts on, in unit order: the per-node read-out
    for equivariant tasks that predict one value per neuron.
    """
    layout = _layout_of(graph)
    if node_values.shape[0] != layout.num_nodes:
        raise ShapeMismatchError(
            f"model '{layout.name}': {node_values.shape[0]} node values given, the graph has {layout.num_nodes}"
        )
    sets = {s.key: s for s in layout.node_sets}
    out: dict[str, torch.Tensor] = {}
    for name, key in layout.unit_sets.items():
        s = sets[key]
        out[name] = node_values[s.start : s.start + s.size]
    return out


def split_edge_values(batch: Batch, edge_values: torch.Tensor) -> list[torch.Tensor]:
    """Split per-edge outputs of a :class:`~torch_geometric.data.Batch` into one tensor per graph."""
    ptr = batch._slice_dict["edge_index"]
    return [edge_values[int(ptr[i]) : int(ptr[i + 1])] for i in range(batch.num_graphs)]
