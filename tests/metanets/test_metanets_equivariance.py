"""Every metanet that claims invariance/equivariance keeps it under the project's own permutations.

A random spec permutation of an input network (``merge.symmetry``) must leave invariant outputs unchanged
and permute equivariant outputs the same way, to 1e-5 relative (float64 here, so the bound is loose;
float32 figures are in bench/metanets.py). The flat MLP is checked to *fail* the test, so it can fail.
"""

from __future__ import annotations

import pytest
import torch

from merge.errors import InvalidArgumentError
from merge.symmetry import apply_permutation
from metanets.base import predict_states
from metanets.baselines import DeepSets, FlatMLP, StatNN
from metanets.gmn import GMN
from metanets.graph import edges_to_state, nodes_to_state
from metanets.unf import UNF
from testkit.metanet_models import ARCHS, model_and_spec


def _shake(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero parameters (GMN blocks start as the identity; the test must exercise them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net.double().eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def _pair(arch: str):
    state, spec = model_and_spec(arch, torch.float64)
    perms = spec.random_perms(torch.Generator().manual_seed(11))
    return state, spec, perms, apply_permutation(spec, state, perms)


@pytest.mark.parametrize("arch", ARCHS)
def test_gmn_invariant_and_equivariant(arch):
    state, spec, perms, permuted = _pair(arch)
    net = _shake(GMN(out_dim=3, hidden=16, layers=2, io_slots=16, edge_out=2, node_out=1))
    y, yp = predict_states(net, [state, permuted], spec).double()
    assert _rel(y, yp) < 1e-5
    assert (
        _rel(
            net.embed(net.collate([net.featurize(state, spec)]))[0],
            predict_states(net, [permuted], spec, embed=True)[0].double(),
        )
        < 1e-5
    )
    g, gp = net.featurize(state, spec), net.featurize(permuted, spec)
    e, n = net.equivariant(net.collate([g]))
    ep, npp = net.equivariant(net.collate([gp]))
    want = apply_permutation(spec, edges_to_state(g, e[:, 0]), perms)
    got = edges_to_state(gp, ep[:, 0])
    assert max(_rel(want[k], got[k]) for k in want if want[k].is_floating_point()) < 1e-5
    want_n = apply_permutation(spec, nodes_to_state(g, n[:, 0]), perms)
    got_n = nodes_to_state(gp, npp[:, 0])
    assert max(_rel(want_n[k], got_n[k]) for k in want_n) < 1e-5


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_gmn_channel_mode_is_invariant(arch):
    state, spec, perms, permuted = _pair(arch)
    net = _shake(GMN(hidden=16, layers=2, graph_mode="channel", kernel_grid=(3, 3), edge_out=9))
    y, yp = predict_states(net, [state, permuted], spec).double()
    assert _rel(y, yp) < 1e-5
    g, gp = net.featurize(state, spec), net.featurize(permuted, spec)
    want = apply_permutation(spec, edges_to_state(g, net.equivariant(net.collate([g]))[0]), perms)
    got = edges_to_state(gp, net.equivariant(net.collate([gp]))[0])
    assert max(_rel(want[k], got[k]) for k in want if want[k].is_floating_point()) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_unf_invariant_and_equivariant(arch):
    state, spec, perms, permuted = _pair(arch)
    state = {k: v for k, v in state.items() if v.is_floating_point()}
    permuted = {k: v for k, v in permuted.items() if v.is_floating_point()}
    net = _shake(UNF(spec, out_dim=2, hidden=3, layers=2, embed_dim=8, edge_out=2))
    y, yp = predict_states(net, [state, permuted], spec).double()
    assert _rel(y, yp) < 1e-5
    out = net.equivariant(net.collate([net.featurize(state), net.featurize(permuted)]))
    for c in range(2):
        want = apply_permutation(spec, {k: v[0, ..., c] for k, v in out.items()}, perms)
        got = {k: v[1, ..., c] for k, v in out.items()}
        assert max(_rel(want[k], got[k]) for k in want) < 1e-5
    assert all(out[k].shape[1:-1] == state[k].shape for k in state)


@pytest.mark.parametrize("arch", ["mlp", "resnet", "transformer"])
def test_baselines_statnn_and_deepsets_are_invariant(arch):
    state, spec, _perms, permuted = _pair(arch)
    for net in (
        StatNN(StatNN.num_features(state, spec), out_dim=2),
        StatNN(StatNN.num_features(state, spec, pooled=True), out_dim=2, pooled=True),
        DeepSets(out_dim=2, hidden=16),
    ):
        net = _shake(net)
        y, yp = predict_states(net, [state, permuted], spec).double()
        assert _rel(y, yp) < 1e-5, type(net).__name__


def test_flat_mlp_is_not_invariant_so_the_test_can_fail():
    state, spec, _perms, permuted = _pair("mlp")
    n = sum(v.numel() for v in state.values() if v.is_floating_point())
    net = _shake(FlatMLP(n, out_dim=2, hidden=16))
    y, yp = predict_states(net, [state, permuted], spec).double()
    assert _rel(y, yp) > 1e-3


def test_flat_mlp_augmentation_permutes_training_samples_only():
    state, spec, _perms, _p = _pair("mlp")
    n = sum(v.numel() for v in state.values())
    net = FlatMLP(n, augment=True, spec=spec, seed=1).double()
    x = net.collate([net.featurize(state, spec)])
    moved = net._permute(x)
    assert not torch.equal(moved, x) and torch.equal(moved.sort().values, x.sort().values)
    net.eval()
    assert torch.equal(net(x), net(x))
    with pytest.raises(InvalidArgumentError, match="needs the spec"):
        FlatMLP(n, augment=True)


def test_batched_prediction_equals_one_by_one():
    graphs = [model_and_spec(a, torch.float64) for a in ("mlp", "cnn", "transformer")]
    net = _shake(GMN(hidden=8, layers=2, io_slots=4))
    together = predict_states(net, [s for s, _ in graphs], [p for _, p in graphs])
    alone = torch.cat([predict_states(net, [s], p) for s, p in graphs])
    assert torch.allclose(together, alone, rtol=1e-6, atol=1e-7)


def test_metanets_refuse_what_they_cannot_read():
    state, spec = model_and_spec("mlp", torch.float32)
    other, ospec = model_and_spec("cnn", torch.float32)
    other = {k: v for k, v in other.items() if v.is_floating_point()}
    with pytest.raises(InvalidArgumentError, match="UNF's weight space does not have|UNF reads one architecture"):
        UNF(spec).featurize(other)
    with pytest.raises(InvalidArgumentError, match="another architecture"):
        StatNN(StatNN.num_features(state, spec)).featurize(other, ospec)
    gmn = GMN(graph_mode="channel", kernel_grid=(3, 3))
    with pytest.raises(InvalidArgumentError, match="edges carry 1 values, this GMN reads 9"):
        gmn(GMN().collate([GMN().featurize(state, spec)]))
    with pytest.raises(InvalidArgumentError, match="needs kernel_grid"):
        GMN(graph_mode="channel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_metanets_run_on_cuda():
    state, spec = model_and_spec("resnet", torch.float32)
    for net in (GMN(hidden=16, layers=2, amp=torch.bfloat16), UNF(spec, hidden=4), DeepSets()):
        net = net.to("cuda")
        y = predict_states(net, [state], spec)
        assert y.shape[0] == 1 and torch.isfinite(y).all()
