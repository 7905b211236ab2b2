"""Parameter graphs: hand-checked structure, exact round trips, permutation = node relabelling, errors."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

from merge.errors import InvalidArgumentError, MissingTensorError, NonFiniteError, ShapeMismatchError
from merge.symmetry import PermutationSpec, apply_permutation, mlp_spec
from metanets.base import auto_spec, node_permutation
from metanets.graph import (
    EDGE_TYPES,
    NODE_TYPES,
    GraphTooLargeError,
    build_graph,
    count_edges,
    edges_to_state,
    nodes_to_state,
    split_edge_values,
)
from testkit.metanet_models import ARCHS, model_and_spec


def tiny_mlp() -> dict[str, torch.Tensor]:
    return {
        "0.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        "0.bias": torch.tensor([7.0, 8.0, 9.0]),
        "2.weight": torch.tensor([[10.0, 11.0, 12.0]]),
        "2.bias": torch.tensor([13.0]),
    }


def test_tiny_mlp_graph_by_hand():
    g = build_graph(tiny_mlp())
    # nodes: inputs 0,1; hidden 2,3,4; output 5; bias nodes 6 (layer 0) and 7 (layer 1)
    assert g.num_nodes == 8
    assert [NODE_TYPES[t] for t in g.node_type.tolist()] == [
        "input", "input", "hidden", "hidden", "hidden", "output", "param_bias", "param_bias",
    ]  # fmt: skip
    assert g.node_io.tolist() == [0, 1, -1, -1, -1, 0, -1, -1]
    assert g.node_layer.tolist() == [0, 0, 1, 1, 1, 2, 0, 1]
    src, dst = g.edge_index.tolist()
    # tensors in layer order, by name within a layer (bias before weight)
    assert list(zip(src, dst, g.edge_value[:, 0].tolist(), strict=True)) == [
        (6, 2, 7.0), (6, 3, 8.0), (6, 4, 9.0),  # bias node -> hidden unit
        (0, 2, 1.0), (1, 2, 2.0), (0, 3, 3.0), (1, 3, 4.0), (0, 4, 5.0), (1, 4, 6.0),  # W1[i, j]: j -> i
        (7, 5, 13.0),
        (2, 5, 10.0), (3, 5, 11.0), (4, 5, 12.0),  # W2
    ]  # fmt: skip
    assert [EDGE_TYPES[t] for t in g.edge_type.tolist()] == ["bias"] * 3 + ["weight"] * 6 + ["bias"] + [
        "weight"
    ] * 3
    assert g.edge_layer.tolist() == [0] * 9 + [1] * 4
    assert (g.edge_pos == -1).all()
    assert count_edges(tiny_mlp()) == 13


def test_conv_kernel_positions_and_channel_mode():
    state = {
        "c.weight": torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3),
        "c.bias": torch.ones(2),
    }
    spec = PermutationSpec(
        {"c.weight": ("P", None, None, None), "c.bias": ("P",)}, {k: v.shape for k, v in state.items()}
    )
    g = build_graph(state, spec)
    assert g.num_edges == 2 * 3 * 9 + 2
    w = next(s for s in g.layout.slots if s.name == "c.weight")
    first = g.edge_pos[w.edge_start : w.edge_start + 9].tolist()  # W[0, 0, kh, kw] -> (kh, kw)
    assert first == [[kh, kw, -1] for kh in range(3) for kw in range(3)]
    gc = build_graph(state, spec, mode="channel")
    assert gc.num_edges == 2 * 3 + 2 and gc.edge_value.shape == (8, 9)
    wc = next(s for s in gc.layout.slots if s.name == "c.weight").edge_start
    bc = next(s for s in gc.layout.slots if s.name == "c.bias").edge_start
    assert torch.equal(gc.edge_value[wc], state["c.weight"][0, 0].reshape(-1))
    assert gc.edge_value[bc].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]  # a bias sits at the grid's centre
    # a smaller kernel is centred in a larger grid
    g5 = build_graph(state, spec, mode="channel", kernel_grid=(5, 5))
    assert torch.equal(g5.edge_value[wc].reshape(5, 5)[1:4, 1:4], state["c.weight"][0, 0])
    for graph in (g, gc, g5):
        back = edges_to_state(graph)
        assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_round_trip_is_bit_exact(arch, dtype):
    state, spec = model_and_spec(arch, dtype)
    for mode in ("entry", "channel"):
        back = edges_to_state(build_graph(state, spec, mode=mode))
        assert list(back) == list(state)
        for k, v in state.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), (arch, mode, k)


@pytest.mark.parametrize("arch", ARCHS)
def test_permuting_the_model_relabels_the_graph(arch):
    """A spec permutation of the model = a relabelling of the graph's nodes (same edges, same features)."""
    state, spec = model_and_spec(arch, torch.float32)
    perms = spec.random_perms(torch.Generator().manual_seed(3))
    for mode in ("entry", "channel"):
        g = build_graph(state, spec, mode=mode)
        gp = build_graph(apply_permutation(spec, state, perms), spec, mode=mode)
        relabel = node_permutation(g.layout, spec, perms)
        assert not torch.equal(relabel, torch.arange(g.num_nodes))

        def edges(ei, gr):
            cols = [ei[0], ei[1], gr.edge_type.long(), gr.edge_layer.long(), *gr.edge_pos.long().T]
            key = torch.stack(cols, 1).tolist()
            return sorted(zip(map(tuple, key), map(tuple, gr.edge_value.tolist()), strict=True))

        assert edges(g.edge_index, g) == edges(relabel[gp.edge_index], gp)
        for f in ("node_type", "node_layer", "node_io"):
            assert torch.equal(getattr(g, f)[relabel], getattr(gp, f))


def test_transformer_heads_are_nodes_and_rope_keeps_positions():
    state, spec = model_and_spec("transformer", torch.float32)
    g = build_graph(state, spec)
    heads = [s for s in g.layout.node_sets if s.kind == "head"]
    assert [(s.key, s.size) for s in heads] == [("heads:attn0", 4), ("heads:attn1", 4)]
    head_edges = g.edge_type == EDGE_TYPES.index("head")
    assert int(head_edges.sum()) == 2 * 2 * 16  # 2 layers × (qk, vo) × 16 units
    assert (g.edge_pos[head_edges] == -1).all()  # q/k features may move inside a head
    state, spec = model_and_spec("rope_transformer", torch.float32)
    g = build_graph(state, spec)
    pos = g.edge_pos[g.edge_type == EDGE_TYPES.index("head")][:, 0]
    assert set(pos.tolist()) == set(range(4)) | {-1}  # q/k (RoPE) keep positions, v/o do not


def test_inverse_maps_for_edge_and_node_outputs():
    state, spec = model_and_spec("cnn", torch.float32)
    g = build_graph(state, spec)
    out = torch.randn(g.num_edges, 3)
    back = edges_to_state(g, out)
    assert back["features.0.weight"].shape == (*state["features.0.weight"].shape, 3)
    nodes = nodes_to_state(g, torch.arange(g.num_nodes, dtype=torch.float32))
    s = g.layout.node_set(g.layout.unit_sets["features.1.weight"])
    assert nodes["features.1.weight"].tolist() == list(range(s.start, s.start + s.size))
    with pytest.raises(ShapeMismatchError, match="edge values given"):
        edges_to_state(g, torch.zeros(5))


def test_batches_of_different_architectures_split_back():
    graphs = [build_graph(*model_and_spec(a, torch.float32)) for a in ("mlp", "resnet", "transformer")]
    b = Batch.from_data_list(graphs)
    assert b.num_graphs == 3 and b.num_edges == sum(g.num_edges for g in graphs)
    parts = split_edge_values(b, b.edge_value)
    for g, p in zip(graphs, parts, strict=True):
        assert torch.equal(p, g.edge_value)
        state = edges_to_state(g, p, cast=True)
        assert all(torch.equal(state[k], v) for k, v in edges_to_state(g).items())


def test_bad_inputs_name_the_model_and_the_tensor():
    state = tiny_mlp()
    spec = mlp_spec(state)
    missing = {k: v for k, v in state.items() if k != "2.bias"}
    with pytest.raises(MissingTensorError, match="'m'.*'2.bias'"):
        build_graph(missing, spec, name="m")
    wrong = dict(state, **{"2.weight": torch.zeros(1, 4)})
    with pytest.raises(ShapeMismatchError, match=r"'2.weight' has shape \[1, 4\].*expects \[1, 3\]"):
        build_graph(wrong, spec)
    nan = dict(state, **{"0.bias": torch.tensor([1.0, float("nan"), 2.0])})
    with pytest.raises(NonFiniteError, match="'0.bias' has 1 NaN"):
        build_graph(nan, spec)
    with pytest.raises(InvalidArgumentError, match="no floating-point tensors"):
        build_graph({}, spec)
    with pytest.raises(InvalidArgumentError, match="not in the permutation spec"):
        build_graph(dict(state, extra=torch.zeros(3)), spec)
    with pytest.raises(InvalidArgumentError, match="cannot build a permutation spec.*pass spec="):
        build_graph({"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(5, 7)}, name="odd")
    with pytest.raises(InvalidArgumentError, match="unknown graph mode"):
        build_graph(state, spec, mode="dense")


def test_edge_budget_refuses_before_allocating():
    state, spec = model_and_spec("resnet", torch.float32)
    n = count_edges(state, spec)
    assert n == build_graph(state, spec).num_edges
    with pytest.raises(
        GraphTooLargeError, match=rf"'resnet18ish'.*{n:,} edges.*budget of 1,000.*mode='channel'"
    ):
        build_graph(state, spec, max_edges=1000, name="resnet18ish")
    assert build_graph(state, spec, mode="channel").num_edges < n / 5


def test_non_floating_tensors_pass_through():
    state, spec = model_and_spec("cnn", torch.float32)
    assert any(not v.is_floating_point() for v in state.values())  # BatchNorm's num_batches_tracked
    g = build_graph(state, spec)
    assert g.num_edges == sum(v.numel() for v in state.values() if v.is_floating_point())
    back = edges_to_state(g)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_auto_spec_recognises_resnets_and_chains():
    resnet, _ = model_and_spec("resnet", torch.float32)
    assert any(p.startswith("P_stream") for p in auto_spec(resnet).perms)
    assert auto_spec(tiny_mlp()).perms == ["P_0"]


@pytest.mark.parametrize("arch", ["cnn", "resnet", "transformer"])
def test_graph_does_not_depend_on_the_order_of_the_tensors(arch):
    """safetensors files hand tensors back in any order: the graph (layer indices included) must not care."""
    state, spec = model_and_spec(arch, torch.float32)
    g = build_graph(state, spec)
    names = list(state)
    for seed in range(3):
        order = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
        gs = build_graph({k: state[k] for k in order}, spec)
        for f in (
            "edge_index",
            "edge_value",
            "edge_type",
            "edge_layer",
            "edge_pos",
            "node_type",
            "node_layer",
        ):
            assert torch.equal(getattr(g, f), getattr(gs, f)), f
    layers = {s.name: g.edge_layer[s.edge_start].item() for s in g.layout.slots}
    if arch == "cnn":  # 'features' before 'classifier', whatever the alphabet says
        assert layers["features.0.weight"] < layers["features.4.weight"] < layers["classifier.1.weight"]
    if arch == "resnet":
        chain = ["conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight", "linear.weight"]
        assert [layers[k] for k in chain] == sorted(layers[k] for k in chain)
