"""Our UNF layer against the NFN/UNF authors' PyPI package ``nfn`` 0.1.2 on MLP weight spaces.

Two settings of Zhou et al. (NFN, NeurIPS 2023): NP (every neuron permutable, inputs and outputs too;
``nfn.layers.NPLinear``) and HNP (hidden neurons only; ``HNPLinear``). For each we compare the number
of basis maps and the *space* of linear maps each layer spans, by the rank of the Jacobian of the layer's
output with respect to its weights (biases off) on random inputs: equal ranks and an equal joint rank
mean the same space.

Found (and pinned here, so a change in either shows): NP is identical (62 basis maps for 64-32-32-10,
the same span). In HNP our 210 maps (5-4-3-2) are independent and contain nfn's span, which is two
dimensions smaller: nfn's 247 HNP weights have rank 208, and the missing maps write the last layer's
weight from the previous layer's per-unit statistics (an HNP term nfn 0.1.2 does not have).
"""

from __future__ import annotations

import pytest
import torch

nfn = pytest.importorskip("nfn")
from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat  # noqa: E402
from nfn.layers import HNPLinear, NPLinear  # noqa: E402

from merge.symmetry import PermutationSpec, apply_permutation, mlp_spec  # noqa: E402
from metanets.unf import UNFLayer, WeightSpace  # noqa: E402


def _shapes(dims):
    out = {}
    for l in range(len(dims) - 1):
        out[f"{2 * l}.weight"] = (dims[l + 1], dims[l])
        out[f"{2 * l}.bias"] = (dims[l + 1],)
    return out


def _np_spec(shapes, n_layers):
    axes = {}
    for l in range(n_layers):
        axes[f"{2 * l}.weight"] = (f"P{l + 1}", f"P{l}")
        axes[f"{2 * l}.bias"] = (f"P{l + 1}",)
    return PermutationSpec(axes, shapes)


def _to_nfn(states, n_layers):
    w = tuple(torch.stack([s[f"{2 * l}.weight"] for s in states])[:, None] for l in range(n_layers))
    b = tuple(torch.stack([s[f"{2 * l}.bias"] for s in states])[:, None] for l in range(n_layers))
    return WeightSpaceFeatures(w, b)


def _nfn_apply(layer, states, n_layers):
    o = layer(_to_nfn(states, n_layers))
    out = []
    for i in range(len(states)):
        d = {}
        for l in range(n_layers):
            d[f"{2 * l}.weight"] = o.weights[l][i, 0]
            d[f"{2 * l}.bias"] = o.biases[l][i, 0]
        out.append(d)
    return out


def _ours_apply(layer, states):
    sp = layer.space
    feats = {n: torch.stack([sp.to_features(s)[n] for s in states]) for n in sp.names}
    o = sp.from_features(layer(feats))
    return [{k: v[i] for k, v in o.items()} for i in range(len(states))]


def _flat(outs):
    return torch.cat([torch.cat([v.reshape(-1) for _, v in sorted(o.items())]) for o in outs])


def _jacobian(layer, apply, weights):
    """Columns: the layer's output on fixed inputs with one weight entry 1 and every parameter else 0."""
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        cols = []
        for p in weights:
            flat = p.view(-1)
            for i in range(flat.numel()):
                flat[i] = 1.0
                cols.append(_flat(apply(layer)))
                flat[i] = 0.0
    return torch.stack(cols, 1)


def _rank(j: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(j))


def _nfn_weights(layer):
    return [p for n, p in layer.named_parameters() if not n.endswith(".bias")]


def _ours_weights(layer):
    return list(layer.weights)


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_np_basis_count_matches_nfn_on_the_digits_mlp():
    dims = (64, 32, 32, 10)
    shapes = _shapes(dims)
    ours = UNFLayer(WeightSpace(_np_spec(shapes, 3)), 1, 1)
    states = [{k: torch.zeros(s) for k, s in shapes.items()}]
    theirs = NPLinear(network_spec_from_wsfeat(_to_nfn(states, 3)), 1, 1)
    assert ours.num_basis() == sum(p.numel() for p in _nfn_weights(theirs)) == 62


@pytest.mark.parametrize("setting", ["NP", "HNP"])
def test_spans_compared_with_nfn(setting, f64):
    dims = (5, 4, 3, 2)
    shapes = _shapes(dims)
    spec = _np_spec(shapes, 3) if setting == "NP" else mlp_spec(shapes)
    g = torch.Generator().manual_seed(0)
    xs = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(12)]
    ours = UNFLayer(WeightSpace(spec), 1, 1)
    theirs = (NPLinear if setting == "NP" else HNPLinear)(network_spec_from_wsfeat(_to_nfn(xs[:1], 3)), 1, 1)
    jo = _jacobian(ours, lambda m: _ours_apply(m, xs), _ours_weights(ours))
    jt = _jacobian(theirs, lambda m: _nfn_apply(m, xs, 3), _nfn_weights(theirs))
    ro, rt, joint = _rank(jo), _rank(jt), _rank(torch.cat([jo, jt], 1))
    assert ro == ours.num_basis()  # our basis maps are linearly independent
    assert joint == ro  # nfn's maps lie in our space
    if setting == "NP":
        assert rt == ro  # identical spaces
    else:
        assert (ro, jt.shape[1], rt) == (210, 247, 208)


@pytest.mark.parametrize("setting", ["NP", "HNP"])
def test_both_layers_pass_the_same_equivariance_test(setting, f64):
    dims = (6, 5, 4, 3)
    shapes = _shapes(dims)
    spec = _np_spec(shapes, 3) if setting == "NP" else mlp_spec(shapes)
    g = torch.Generator().manual_seed(1)
    x = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    perms = spec.random_perms(g)
    xp = apply_permutation(spec, x, perms)
    ours = UNFLayer(WeightSpace(spec), 1, 1)
    theirs = (NPLinear if setting == "NP" else HNPLinear)(network_spec_from_wsfeat(_to_nfn([x], 3)), 1, 1)
    with torch.no_grad():
        for m in (ours, theirs):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        for apply in (lambda v: _ours_apply(ours, [v])[0], lambda v: _nfn_apply(theirs, [v], 3)[0]):
            want = apply_permutation(spec, apply(x), perms)
            got = apply(xp)
            for k in want:
                assert torch.allclose(want[k], got[k], rtol=1e-9, atol=1e-9), k
        # a permutation the setting does not allow breaks it (HNP: permuting the input features)
        if setting == "HNP":
            bad = dict(x, **{"0.weight": x["0.weight"][:, torch.randperm(6, generator=g)]})
            out, outb = _ours_apply(ours, [x])[0], _ours_apply(ours, [bad])[0]
            assert not torch.allclose(out["4.weight"], outb["4.weight"])
