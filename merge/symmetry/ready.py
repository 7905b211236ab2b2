"""Ready specs from tensor names and shapes: MLP, CNN/VGG, ResNet and transformer."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from merge.errors import RecipeError, ShapeMismatchError, WeightsmithError
from merge.symmetry.spec import HeadStructure, PermId, PermutationSpec, natural_key

Shapes = Mapping[str, Sequence[int]]


def _shapes_of(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for k in state:
        v = state[k]
        out[k] = tuple(v.shape) if hasattr(v, "shape") else tuple(v)
    return out


def _modules(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """Group tensors by module prefix (``a.b.weight`` -> ``a.b``), modules in natural order."""
    mods: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".")
        mods.setdefault(prefix, {})[leaf] = shape
    return sorted(mods.items(), key=lambda kv: natural_key(kv[0]))


_NORM_LEAVES = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


class _Builder:
    """Accumulates axes for a spec; every tensor of the model is listed (``None`` where not permuted)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = dict(shapes)
        self.axes: dict[str, list[PermId | None]] = {k: [None] * len(s) for k, s in shapes.items()}
        self.views: dict[str, tuple[int, ...]] = {}
        self.heads: dict[PermId, HeadStructure] = {}

    def set(self, name: str, axis: int, perm: PermId | None) -> None:
        self.axes[name][axis] = perm

    def view(self, name: str, view: tuple[int, ...]) -> None:
        self.views[name] = view
        self.axes[name] = [None] * len(view)

    def norm(self, prefix: str, leaves: Mapping[str, tuple[int, ...]], perm: PermId | None) -> None:
        for leaf, shape in leaves.items():
            if len(shape) == 1:
                self.set(f"{prefix}.{leaf}", 0, perm)

    def spec(self) -> PermutationSpec:
        return PermutationSpec(self.axes, self.shapes, views=self.views, heads=self.heads)


def _is_layer(leaves: Mapping[str, tuple[int, ...]]) -> bool:
    return "weight" in leaves and len(leaves["weight"]) >= 2


def _is_norm(leaves: Mapping[str, tuple[int, ...]]) -> bool:
    return set(leaves) <= _NORM_LEAVES and "weight" in leaves and len(leaves["weight"]) == 1


def _chain_layer(
    b: _Builder,
    prefix: str,
    leaves: Mapping[str, tuple[int, ...]],
    cur: PermId | None,
    cur_size: int | None,
    out_perm: PermId | None,
) -> PermId | None:
    """Wire one Linear/Conv layer: input axis ``cur``, output axis ``out_perm``; returns the new current."""
    wname = f"{prefix}.weight"
    w = leaves["weight"]
    n_out, n_in = w[0], w[1]
    if cur is not None and cur_size is not None and n_in != cur_size:
        if len(w) == 2 and n_in % cur_size == 0:
            # a flattened C×H×W feature map read by a dense layer: view (out, C, H·W)
            b.view(wname, (n_out, cur_size, n_in // cur_size))
        elif n_in == 1 and n_out == cur_size and len(w) > 2:
            # depthwise convolution: channels pass through, the output axis carries the input's permutation
            b.set(wname, 0, cur)
            if "bias" in leaves:
                b.set(f"{prefix}.bias", 0, cur)
            return cur
        else:
            raise ShapeMismatchError(
                f"tensor '{wname}' of shape {list(w)} reads {n_in} input features, but the previous layer "
                f"produces {cur_size}; the layers do not form a chain (give a spec JSON instead)"
            )
    b.set(wname, 1, cur)
    b.set(wname, 0, out_perm)
    if "bias" in leaves:
        b.set(f"{prefix}.bias", 0, out_perm)
    return out_perm


_Mods = list[tuple[str, dict[str, tuple[int, ...]]]]


_NORM_NAME = re.compile(r"^(?:bn|norm|ln|batchnorm|layernorm|batch_norm|layer_norm)_?(\d+)$")


def _norm_owners(mods: _Mods) -> dict[str, str | None]:
    """Which layer's output each norm module normalises: ``bnK``/``normK`` -> the sibling ``convK``/``fcK``,
    otherwise the nearest preceding layer in ``mods`` order (``features.0`` -> ``features.1``)."""
    layers = [m for m, lv in mods if _is_layer(lv)]
    owners: dict[str, str | None] = {}
    prev: str | None = None
    for prefix, leaves in mods:
        if _is_layer(leaves):
            prev = prefix
        elif _is_norm(leaves):
            parent, _, leaf = prefix.rpartition(".")
            m = _NORM_NAME.match(leaf)
            owner = None
            if m:
                pat = re.compile(rf"^(?:conv|fc|linear|lin|dense|layer)_?{m[1]}$")
                owner = next(
                    (x for x in layers if x.rpartition(".")[0] == parent and pat.match(x.rpartition(".")[2])),
                    None,
                )
            owners[prefix] = owner or prev
    return owners


def _chain(
    shapes: Mapping[str, tuple[int, ...]],
    mods: _Mods,
    *,
    first_in: PermId | None = None,
    first_size: int | None = None,
    last_out: PermId | None = None,
    b: _Builder | None = None,
) -> tuple[_Builder, PermId | None, int | None]:
    """Wire a chain of layers (with their norms); returns the builder and the output permutation and size."""
    b = b or _Builder(shapes)
    layers = [(m, lv) for m, lv in mods if _is_layer(lv)]
    if not layers:
        raise RecipeError("no weight matrix found (expected '<module>.weight' of 2+ axes)")
    last = layers[-1][0]
    cur, cur_size = first_in, first_size
    outs: dict[str, tuple[PermId | None, int]] = {}
    for prefix, leaves in layers:
        cur = _chain_layer(b, prefix, leaves, cur, cur_size, last_out if prefix == last else f"P_{prefix}")
        cur_size = leaves["weight"][0]
        outs[prefix] = (cur, cur_size)
    for prefix, owner in _norm_owners(mods).items():
        leaves = dict(mods)[prefix]
        if owner is None or outs[owner][1] != leaves["weight"][0]:
            raise ShapeMismatchError(
                f"tensor '{prefix}.weight' has {leaves['weight'][0]} channels, "
                "but no preceding layer produces "
                f"that many" + (f" ('{owner}' produces {outs[owner][1]})" if owner else "")
            )
        b.norm(prefix, leaves, outs[owner][0])
    for prefix, leaves in mods:
        if not (_is_layer(leaves) or _is_norm(leaves)) and any(len(s) > 0 for s in leaves.values()):
            name = f"{prefix}.{next(iter(leaves))}" if prefix else next(iter(leaves))
            raise RecipeError(
                f"tensor '{name}' is neither a layer weight/bias nor a norm; give a spec JSON instead"
            )
    return b, cur, cur_size


def _module_orders(shapes: Mapping[str, tuple[int, ...]]) -> Iterable[_Mods]:
    """Candidate layer orders: as given, natural, then natural within top-level groups in any group order."""
    given: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".")
        given.setdefault(prefix, {})[leaf] = shape
    yield list(given.items())
    nat = _modules(shapes)
    yield nat
    groups: dict[str, _Mods] = {}
    for m in nat:
        groups.setdefault(m[0].split(".")[0], []).append(m)
    if 1 < len(groups) <= 6:
        for order in itertools.permutations(groups):
            yield [m for g in order for m in groups[g]]


def mlp_spec(state_or_shapes: Mapping[str, Any]) -> PermutationSpec:
    """Spec of a feed-forward chain of Linear (or Conv) layers with optional norms between them.

    Layers are taken in the order that chains (each layer's input size equals the previous
    layer's output size): the mapping's own order (a torch ``state_dict``), else the natural
    order of module names (``0, 2, 10``; ``fc1, fc2``), else natural order within top-level
    groups (``features.*``, ``classifier.*``) in whichever group order chains. Hidden layer ``i``
    gets the permutation ``P_<module>``: ``W_i: (P_i, P_{i-1})``, ``b_i: (P_i,)`` (torch layout of
    Git Re-Basin's MLP spec). The first input axis and the last layer's output axis are not
    permuted. 1-D norm tensors (BatchNorm weight, bias, running_mean, running_var; LayerNorm
    weight, bias) carry the preceding layer's permutation.
    """
    shapes = _shapes_of(state_or_shapes)
    first: WeightsmithError | None = None
    for mods in _module_orders(shapes):
        try:
            return _chain(shapes, mods)[0].spec()
        except (ShapeMismatchError, RecipeError) as e:
            first = first or e
    assert first is not None
    raise first


def cnn_spec(state_or_shapes: Mapping[str, Any]) -> PermutationSpec:
    """Spec of a VGG-style CNN: convs (with BatchNorm/LayerNorm channels) then a dense classifier.

    Same chain rule as :func:`mlp_spec`: each conv output channel axis is one permutation, its
    norm (including BatchNorm running statistics) shares it, the next conv reads it on axis 1.
    The first dense layer after a ``Flatten`` of ``C×H×W`` gets the view ``(out, C, H·W)`` so the
    last conv's permutation acts on its channel axis (Git Re-Basin's VGG-16 spec, with the
    flatten made explicit). Depthwise convs pass the channel permutation through.
    """
    return mlp_spec(state_or_shapes)


_BLOCK = re.compile(r"^(?P<stage>(?:.*\.)?layer\d+)\.(?P<block>\d+)\.(?P<rest>.+)$")
_CONV = re.compile(r"^conv(\d+)$")
_NORM = re.compile(r"^(?:bn|norm)(\d+)$")
_SHORT = re.compile(r"^(?:downsample|shortcut)\.(\d+)$")


def resnet_spec(state_or_shapes: Mapping[str, Any]) -> PermutationSpec:
    """Spec of a ResNet with BatchNorm (or LayerNorm/GroupNorm(1)) in torchvision / CIFAR naming.

    Blocks are ``…layer<k>.<j>.`` with ``conv1..convN`` and ``bn1..bnN`` (or ``norm1..``), and an
    optional projection ``downsample.0/1`` or ``shortcut.0/1``; everything before the first block
    is the stem (a chain ending in the stream), everything after the last block the head (reads
    the stream). As in Git Re-Basin's ResNet specs, the residual stream of a stage is **one**
    permutation ``P_stream<k>`` shared by the stem output, every block's last conv/norm and the
    projection shortcut (``x + f(x)`` is equivariant only if both terms are permuted alike); a
    projection block starts a new stream permutation; each block's inner convs get private
    permutations ``P_<stage>.<block>.conv<j>``. BatchNorm running statistics are permuted too.
    """
    shapes = _shapes_of(state_or_shapes)
    b = _Builder(shapes)
    mods = _modules(shapes)
    stem: list[tuple[str, dict[str, tuple[int, ...]]]] = []
    head: list[tuple[str, dict[str, tuple[int, ...]]]] = []
    blocks: dict[tuple[str, int], dict[str, dict[str, tuple[int, ...]]]] = {}
    for prefix, leaves in mods:
        m = _BLOCK.match(prefix + ".")
        if m is None:
            (head if blocks else stem).append((prefix, leaves))
            continue
        key = (m["stage"], int(m["block"]))
        blocks.setdefault(key, {})[m["rest"].rstrip(".")] = leaves
    if not blocks:
        raise RecipeError(
            "architecture 'resnet': no residual blocks found (expected '…layer<k>.<j>.conv1.weight')"
        )
    n_stream = 0
    stream: PermId | None = "P_stream0"
    if not any(_is_layer(lv) for _, lv in stem):
        raise RecipeError("architecture 'resnet': the stem has no conv layer")
    b, _, size = _chain(shapes, stem, last_out=stream, b=b)
    for (stage, j), parts in sorted(blocks.items(), key=lambda kv: (natural_key(kv[0][0]), kv[0][1])):
        bp = f"{stage}.{j}"
        convs = sorted((int(_CONV.match(k)[1]), k) for k in parts if _CONV.match(k))
        norms = {int(_NORM.match(k)[1]): k for k in parts if _NORM.match(k)}
        short = {int(_SHORT.match(k)[1]): k for k in parts if _SHORT.match(k)}
        unknown = [k for k in parts if not (_CONV.match(k) or _NORM.match(k) or _SHORT.match(k))]
        if not convs or unknown:
            raise RecipeError(
                f"architecture 'resnet': block '{bp}' has unexpected modules {unknown or 'and no conv'}; "
                "expected conv<i>, bn<i>/norm<i>, downsample/shortcut"
            )
        in_stream, in_size = stream, size
        out_size = parts[convs[-1][1]]["weight"][0]
        if short:
            n_stream += 1
            stream = f"P_stream{n_stream}"
        elif out_size != in_size:
            raise ShapeMismatchError(
                f"block '{bp}': identity shortcut but channels change {in_size} -> {out_size} "
                "(zero-padding shortcuts are not supported; give a spec JSON)"
            )
        cur, size = in_stream, in_size
        for i, (idx, cname) in enumerate(convs):
            out = stream if i == len(convs) - 1 else f"P_{bp}.{cname}"
            leaves = parts[cname]
            cur = _chain_layer(b, f"{bp}.{cname}", leaves, cur, size, out)
            size = leaves["weight"][0]
            if idx in norms:
                b.norm(f"{bp}.{norms[idx]}", parts[norms[idx]], cur)
        for k in sorted(short):
            leaves, name = parts[short[k]], f"{bp}.{short[k]}"
            if _is_layer(leaves):
                _chain_layer(b, name, leaves, in_stream, in_size, stream)
            elif _is_norm(leaves):
                b.norm(name, leaves, stream)
    for prefix, leaves in head:
        if _is_layer(leaves):
            _chain_layer(b, prefix, leaves, stream, size, None)
            stream, size = None, None  # a second head layer would read an unpermuted input
        elif any(len(s) for s in leaves.values()):
            raise RecipeError(f"architecture 'resnet': unexpected head tensor under '{prefix}'")
    return b.spec()


# -- transformers -----------------------------------------------------------------------------

_T_EMBED = re.compile(
    r"(?:^|\.)(?:word_embeddings|embed_tokens|tok_embeddings|token_embedding|tok_emb|wte|"
    r"embedding|embed|position_embeddings|position_embedding|pos_emb|wpe|"
    r"token_type_embeddings)\.weight$"
)
_T_TOKENS = re.compile(
    r"(?:^|\.)(?:pos_embed|pos_embedding|pos_emb|wpe|cls_token|position_embedding|register_tokens)$"
)
_T_Q = re.compile(r"(?:^|\.)(?:query|q_proj|q|wq|to_q)\.(weight|bias)$")
_T_K = re.compile(r"(?:^|\.)(?:key|k_proj|k|wk|to_k)\.(weight|bias)$")
_T_V = re.compile(r"(?:^|\.)(?:value|v_proj|v|wv|to_v)\.(weight|bias)$")
_T_O = re.compile(
    r"(?:^|\.)(?:attention\.output\.dense|o_proj|out_proj|wo|attn\.proj|attn\.o|o|to_out\.0|"
    r"attn_out)\.(weight|bias)$"
)
_T_QKV = re.compile(r"(?:^|\.)in_proj_(weight|bias)$")
_T_FF_IN = re.compile(
    r"(?:^|\.)(?:intermediate\.dense|fc1|up_proj|gate_proj|w1|w3|linear1|mlp\.0|ff\.0|"
    r"fc_in|lin1|ffn\.0)\.(weight|bias)$"
)
_T_FF_OUT = re.compile(
    r"(?:^|\.)(?:output\.dense|fc2|down_proj|w2|linear2|mlp\.2|ff\.2|fc_out|lin2|"
    r"ffn\.2)\.(weight|bias)$"
)
_T_NORM = re.compile(r"(?:^|\.)(?:[A-Za-z_]*(?:norm|Norm|ln)[A-Za-z_0-9]*)\.(weight|bias)$")
_T_HEAD = re.compile(r"(?:^|\.)(?:lm_head|head|classifier|pooler\.dense|score|fc|out|output)\.(weight|bias)$")
_T_LAYER = re.compile(r"\.(\d+)\.")


def transformer_spec(
    state_or_shapes: Mapping[str, Any], n_heads: int, *, rope: bool = False, head_dim: int | None = None
) -> PermutationSpec:
    """Spec of a transformer from its tensor names: one residual-stream permutation, heads, FFNs.

    - **Residual stream** ``P_res`` (one permutation for the whole model, since every block reads
      and writes the stream): token/position/type embeddings (feature axis only), every
      LayerNorm/RMSNorm, the input axis of q, k, v and the FFN input, the output axis of the
      attention output projection and the FFN output, and the input axis of heads (``lm_head``,
      ``classifier``, ``pooler.dense``), whose output axis is never permuted.
    - **Attention** of layer ``l``: ``P_attn<l>_qk`` on the q/k output axes and ``P_attn<l>_vo`` on
      the v output and o input axes, both block-structured over ``n_heads`` heads with one shared
      head permutation (head group ``attn<l>``) and free within-head permutations; with
      ``rope=True`` the q/k permutation keeps the features inside each head (heads only), since
      rotary pairs and frequencies must stay in place. A fused ``in_proj_weight`` (3E, E) (torch's
      ``nn.MultiheadAttention``) is viewed as (3, E, E) and q, k, v, o share one structured
      permutation.
    - **FFN** of layer ``l``: ``P_ffn<l>`` on the hidden axis (``up``/``gate``/``fc1`` output, ``down``/
      ``fc2`` input).

    Recognised names cover HF BERT (``attention.self.query``, ``intermediate.dense``, ``output.dense``),
    Llama-style (``q_proj``…``o_proj``, ``gate_proj``/``up_proj``/``down_proj``, ``input_layernorm``),
    torch ``nn.TransformerEncoderLayer`` (``self_attn.in_proj_weight``, ``linear1``, ``norm1``) and
    plain ``attn.q``/``mlp.fc1`` modules. Grouped-query attention and GPT-2's transposed ``Conv1D``
    are refused. A tensor that is not recognised but has an axis of the model width raises, naming
    it, rather than being silently left unpermuted. This spec is not in Git Re-Basin; the head
    structure follows the function-preservation argument of Verma & Elbayad (2024).
    """
    shapes = _shapes_of(state_or_shapes)
    b = _Builder(shapes)
    if n_heads < 1:
        raise RecipeError("architecture 'transformer' needs n_heads >= 1 (the number of attention heads)")
    width = None
    for name, s in shapes.items():
        if _T_EMBED.search(name) and len(s) == 2:
            width = s[1]
            break
        if _T_NORM.search(name) and len(s) == 1:
            width = s[0]
            break
    if width is None:
        raise RecipeError("architecture 'transformer': cannot find the model width (no embedding or norm)")
    res = "P_res"

    def layer_of(name: str) -> int:
        m = _T_LAYER.search(name)
        if m is None:
            raise RecipeError(f"architecture 'transformer': tensor '{name}' has no layer index")
        return int(m[1])

    def heads(perm: PermId, n: int, layer: int, within: bool, name: str) -> None:
        d = head_dim or n // n_heads
        if n != n_heads * d:
            raise ShapeMismatchError(
                f"tensor '{name}': attention axis of size {n} is not n_heads·head_dim = {n_heads}·{d}"
                + (" (grouped-query attention is not supported; give a spec JSON)" if n < width else "")
            )
        b.heads[perm] = HeadStructure(n_heads, d, f"attn{layer}", within)

    for name, s in shapes.items():
        if "c_attn" in name or "c_fc" in name:
            raise RecipeError(
                f"tensor '{name}': GPT-2 style Conv1D layers are not supported; give a spec JSON"
            )
        if _T_QKV.search(name):
            layer = layer_of(name)
            p = f"P_attn{layer}"
            e = s[0] // 3
            b.view(name, (3, e, *s[1:]))
            b.set(name, 1, p)
            if len(s) == 2:
                b.set(name, 2, res)
            heads(p, e, layer, not rope, name)
        elif (mq := _T_Q.search(name)) or (mk := _T_K.search(name)):
            layer = layer_of(name)
            p = f"P_attn{layer}_qk"
            b.set(name, 0, p)
            if (mq or mk)[1] == "weight":
                b.set(name, 1, res)
            heads(p, s[0], layer, not rope, name)
        elif mv := _T_V.search(name):
            layer = layer_of(name)
            p = f"P_attn{layer}_vo"
            b.set(name, 0, p)
            if mv[1] == "weight":
                b.set(name, 1, res)
            heads(p, s[0], layer, True, name)
        elif mo := _T_O.search(name):
            layer = layer_of(name)
            fused = any(_T_QKV.search(k) and layer_of(k) == layer for k in shapes)
            p = f"P_attn{layer}" if fused else f"P_attn{layer}_vo"
            b.set(name, 0, res)
            if mo[1] == "weight":
                b.set(name, 1, p)
                heads(p, s[1], layer, not rope if fused else True, name)
        elif mi := _T_FF_IN.search(name):
            p = f"P_ffn{layer_of(name)}"
            b.set(name, 0, p)
            if mi[1] == "weight":
                b.set(name, 1, res)
        elif mf := _T_FF_OUT.search(name):
            b.set(name, 0, res)
            if mf[1] == "weight":
                b.set(name, 1, f"P_ffn{layer_of(name)}")
        elif _T_EMBED.search(name):
            b.set(name, len(s) - 1, res)
        elif _T_TOKENS.search(name) and s and s[-1] == width:
            b.set(name, len(s) - 1, res)
        elif _T_NORM.search(name) and len(s) == 1:
            b.set(name, 0, res)
        elif mh := _T_HEAD.search(name):
            if mh[1] == "weight" and len(s) == 2:
                b.set(name, 1, res)
        elif width in s:
            raise RecipeError(
                f"architecture 'transformer': tensor '{name}' of shape {list(s)} "
                "has an axis of the model width "
                f"{width} but its role is not recognised; give a spec JSON"
            )
    return b.spec()


ARCHITECTURES: dict[str, Callable[..., PermutationSpec]] = {
    "mlp": mlp_spec,
    "cnn": cnn_spec,
    "vgg": cnn_spec,
    "resnet": resnet_spec,
    "transformer": transformer_spec,
}


def build_spec(architecture: str, state_or_shapes: Mapping[str, Any], **kwargs: Any) -> PermutationSpec:
    """A ready spec by architecture name (``mlp``, ``cnn``/``vgg``, ``resnet``, ``transformer``)."""
    fn = ARCHITECTURES.get(architecture.lower())
    if fn is None:
        raise RecipeError(
            f"unknown architecture '{architecture}' (known: {', '.join(sorted(ARCHITECTURES))}; or give a spec JSON)"
        )
    if fn is transformer_spec:
        return fn(state_or_shapes, **kwargs)
    return fn(state_or_shapes)


_RESNET_BLOCK = re.compile(r"(?:^|\.)layer\d+\.\d+\.conv\d+\.weight$")


def auto_spec(state: Mapping[str, Any], *, name: str = "model") -> PermutationSpec:
    """A permutation spec from tensor names and shapes: a ResNet if the names have residual blocks
    (``layer<k>.<j>.conv<i>``), else a chain of Linear/Conv layers with norms (:func:`merge.symmetry.mlp_spec`).

    Transformers need ``merge.symmetry.transformer_spec(state, n_heads)``; any ``nn.Module`` can get one
    from ``merge.symmetry.infer_spec(module, example_inputs)``. A model neither fits raises naming why.
    """
    floating = {k: v for k, v in state.items() if not hasattr(v, "is_floating_point") or v.is_floating_point()}
    if not floating:
        raise RecipeError(f"model '{name}' has no floating-point tensors")
    try:
        if any(_RESNET_BLOCK.search(k) for k in floating):
            return resnet_spec(floating)
        return mlp_spec(floating)
    except (RecipeError, ShapeMismatchError) as e:
        raise RecipeError(
            f"model '{name}': cannot build a permutation spec from names and shapes ({e}); pass spec= "
            "(merge.symmetry.transformer_spec(state, n_heads), infer_spec(module, example_inputs), "
            "or a spec JSON)"
        ) from None
