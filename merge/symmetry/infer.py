"""Inference of a permutation spec for any ``nn.Module`` by ``torch.fx`` tracing.

A union-find over tensor axes in the style of PLeaS (Nakhleh et al. 2024); see :func:`infer_spec`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from merge.errors import RecipeError
from merge.symmetry.check import check_spec
from merge.symmetry.spec import HeadStructure, PermId, PermutationSpec

_FROZEN: tuple[str, ...] = ("frozen",)
Elem = tuple[Any, ...]


class _UnionFind:
    """Union-find over tensor axes; every axis has a size, the special element ``_FROZEN`` marks axes
    that must not be permuted (model inputs and outputs, spatial axes, sliced axes...)."""

    def __init__(self) -> None:
        self.parent: dict[Elem, Elem] = {_FROZEN: _FROZEN}
        self.size: dict[Elem, int] = {_FROZEN: -1}

    def add(self, e: Elem, n: int) -> Elem:
        if e not in self.parent:
            self.parent[e] = e
            self.size[e] = int(n)
            if n <= 1:
                self.freeze(e)
        return e

    def find(self, e: Elem) -> Elem:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def union(self, a: Elem, b: Elem) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        fr = self.find(_FROZEN)
        if rb == fr:
            ra, rb = rb, ra
        if ra != fr and self.size[ra] != self.size[rb]:
            # only a rule bug links axes of different sizes; refuse to permute either
            self.freeze(ra)
            self.freeze(rb)
            return
        self.parent[rb] = ra

    def freeze(self, e: Elem) -> None:
        self.union(_FROZEN, e)

    def frozen(self, e: Elem) -> bool:
        return self.find(e) == self.find(_FROZEN)


class _Ax(list):  # the axis elements of one tensor value
    pass


_ELEMENTWISE_FN: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.pow,
    operator.neg,
    operator.pos,
    operator.abs,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.mod,
    operator.and_,
    operator.or_,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    torch.add,
    torch.sub,
    torch.subtract,
    torch.mul,
    torch.multiply,
    torch.div,
    torch.divide,
    torch.true_divide,
    torch.pow,
    torch.neg,
    torch.abs,
    torch.exp,
    torch.log,
    torch.sqrt,
    torch.rsqrt,
    torch.sin,
    torch.cos,
    torch.tanh,
    torch.sigmoid,
    torch.relu,
    torch.erf,
    torch.maximum,
    torch.minimum,
    torch.clamp,
    torch.clip,
    torch.where,
    torch.sign,
    torch.square,
    torch.reciprocal,
    torch.masked_fill,
    torch.nan_to_num,
    torch.lerp,
    torch.softmax,
    torch.log_softmax,
    torch.exp2,
    torch.log1p,
    torch.expm1,
    torch.nn.functional.relu,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.elu,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.softplus,
    torch.nn.functional.mish,
    torch.nn.functional.hardswish,
    torch.nn.functional.hardtanh,
    torch.nn.functional.relu6,
    torch.nn.functional.sigmoid,
    torch.nn.functional.tanh,
    torch.nn.functional.dropout,
    torch.nn.functional.softmax,
    torch.nn.functional.log_softmax,
    torch.nn.functional.normalize,
    torch.nn.functional.selu,
    torch.nn.functional.celu,
    torch.nn.functional.hardsigmoid,
    torch.nn.functional.logsigmoid,
    torch.nn.functional.softsign,
    torch.nn.functional.tanhshrink,
}
_ELEMENTWISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "true_divide",
    "pow",
    "neg",
    "abs",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "sin",
    "cos",
    "sigmoid",
    "tanh",
    "relu",
    "clamp",
    "clamp_min",
    "clamp_max",
    "clip",
    "masked_fill",
    "softmax",
    "log_softmax",
    "contiguous",
    "clone",
    "detach",
    "square",
    "reciprocal",
    "sign",
    "erf",
    "maximum",
    "minimum",
    "where",
    "exp2",
    "log1p",
    "expm1",
    "lerp",
    "nan_to_num",
    "__add__",
    "__sub__",
    "__mul__",
    "__truediv__",
    "__radd__",
    "__rsub__",
    "__rmul__",
    "__rtruediv__",
    "__neg__",
    "__pow__",
}
_CAST_METHODS = {"float", "double", "half", "bfloat16", "to", "type", "type_as", "requires_grad_"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"}
_VALUE_REDUCE = {
    "sum",
    "mean",
    "amax",
    "amin",
    "prod",
    "var",
    "std",
    "norm",
    "logsumexp",
    "nansum",
    "nanmean",
    "all",
    "any",
}
_INDEX_REDUCE = {
    "max",
    "min",
    "argmax",
    "argmin",
    "cumsum",
    "cumprod",
    "sort",
    "argsort",
    "topk",
    "median",
    "mode",
    "kthvalue",
    "cummax",
    "cummin",
}
_FREE_CREATE = {
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
}
_FROZEN_CREATE = {
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.tensor,
    torch.as_tensor,
    torch.eye,
    torch.rand_like,
    torch.randn_like,
}
_FREE_CREATE_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}
_NOOP_METHODS = {
    "size",
    "dim",
    "numel",
    "element_size",
    "data_ptr",
    "is_contiguous",
    "item",
    "tolist",
    "get_device",
}


def _leaf_types() -> tuple[type, ...]:
    nn = torch.nn
    names = [
        "Linear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "LayerNorm",
        "GroupNorm",
        "RMSNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "Embedding",
        "MultiheadAttention",
        "Flatten",
        "Unflatten",
        "ReLU",
        "ReLU6",
        "GELU",
        "SiLU",
        "Tanh",
        "Sigmoid",
        "LeakyReLU",
        "ELU",
        "SELU",
        "CELU",
        "Softplus",
        "Mish",
        "Hardswish",
        "Hardsigmoid",
        "Hardtanh",
        "LogSigmoid",
        "Softsign",
        "Tanhshrink",
        "PReLU",
        "Identity",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "AlphaDropout",
        "Softmax",
        "LogSoftmax",
        "MaxPool1d",
        "MaxPool2d",
        "MaxPool3d",
        "AvgPool1d",
        "AvgPool2d",
        "AvgPool3d",
        "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d",
        "AdaptiveAvgPool3d",
        "AdaptiveMaxPool1d",
        "AdaptiveMaxPool2d",
        "AdaptiveMaxPool3d",
    ]
    return tuple(getattr(nn, n) for n in names if hasattr(nn, n))


class _LeafTracer(torch.fx.Tracer):
    """Trace through every module except those with a rule (so user blocks and containers are inlined)."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _leaf_types())


@dataclass
class FxTrace:
    """What :func:`trace_spec` found: the spec, plus where each permutation lives in the activations.

    ``sites`` maps a permutation id to ``(node name, output path, axis)`` triples: the traced
    activations whose axis that permutation acts on (used by activation matching). ``unsupported``
    lists ops the tracer had no rule for; their axes were frozen (left unpermuted), which is safe
    but may lose permutations.
    """

    spec: PermutationSpec
    graph_module: torch.fx.GraphModule
    sites: dict[PermId, list[tuple[str, tuple[int, ...], int]]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)


class _Inference:
    """Runs the traced graph once and unions the axes that must share a permutation."""

    def __init__(self, gm: torch.fx.GraphModule, state: Mapping[str, torch.Tensor]) -> None:
        self.gm = gm
        self.uf = _UnionFind()
        self.el: dict[str, Any] = {}  # node name -> axis structure of its value
        self.relations: list[tuple[Elem, list[Elem], list[int]]] = []
        self.unsupported: list[str] = []
        self.state = state
        self._virtual = 0

    # -- elements --------------------------------------------------------------------------------
    def p(self, name: str, axis: int) -> Elem:
        t = self.state.get(name)
        if t is None or not t.is_floating_point():
            e = self.uf.add(("c", name, axis), 2)
            self.uf.freeze(e)
            return e
        return self.uf.add(("p", name, axis), t.shape[axis])

    def virtual(self, n: int) -> Elem:
        self._virtual += 1
        return self.uf.add(("v", self._virtual), n)

    def make(self, node: str, value: Any, path: tuple[int, ...] = ()) -> Any:
        if isinstance(value, torch.Tensor):
            return _Ax(self.uf.add(("n", node, path, i), s) for i, s in enumerate(value.shape))
        if isinstance(value, list | tuple) and not isinstance(value, torch.Size):
            return tuple(self.make(node, v, (*path, i)) for i, v in enumerate(value))
        return None

    def st(self, a: Any) -> Any:
        return self.el.get(a.name) if isinstance(a, torch.fx.Node) else None

    # -- generic links ---------------------------------------------------------------------------
    def link(self, a: Elem, b: Elem) -> None:
        self.uf.union(a, b)

    def freeze_all(self, s: Any) -> None:
        if isinstance(s, _Ax):
            for e in s:
                self.uf.freeze(e)
        elif isinstance(s, tuple):
            for x in s:
                self.freeze_all(x)

    def broadcast(self, out: _Ax, ins: Iterable[Any]) -> None:
        for s in ins:
            if not isinstance(s, _Ax) or len(s) > len(out):
                self.freeze_all(s)
                continue
            for i in range(1, len(s) + 1):
                if self.uf.size[s[-i]] == self.uf.size[out[-i]]:
                    self.link(s[-i], out[-i])

    def reshape(self, a: _Ax, ashape: Sequence[int], b: _Ax, bshape: Sequence[int]) -> None:
        """Link the axes of a row-major reshape; a split or merge of axes is recorded as a relation."""
        i = j = 0
        while True:
            while i < len(ashape) and ashape[i] == 1:
                i += 1
            while j < len(bshape) and bshape[j] == 1:
                j += 1
            if i >= len(ashape) or j >= len(bshape):
                break
            bi, bj, pi, pj = [i], [j], ashape[i], bshape[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    bi.append(i)
                    pi *= ashape[i]
                    i += 1
                else:
                    bj.append(j)
                    pj *= bshape[j]
                    j += 1
            bi = [k for k in bi if ashape[k] != 1]
            bj = [k for k in bj if bshape[k] != 1]
            if len(bi) == 1 and len(bj) == 1:
                self.link(a[bi[0]], b[bj[0]])
            elif len(bi) == 1:
                self.relations.append((a[bi[0]], [b[k] for k in bj], [bshape[k] for k in bj]))
            elif len(bj) == 1:
                self.relations.append((b[bj[0]], [a[k] for k in bi], [ashape[k] for k in bi]))
            else:
                for k in bi:
                    self.uf.freeze(a[k])
                for k in bj:
                    self.uf.freeze(b[k])

    def unknown(self, n: torch.fx.Node, out: Any, what: str) -> None:
        self.unsupported.append(what)
        for a in n.all_input_nodes:
            self.freeze_all(self.st(a))
        self.freeze_all(out)

    # -- the visit ---------------------------------------------------------------------------------
    def visit(self, n: torch.fx.Node, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        out = self.make(n.name, value)
        self.el[n.name] = out
        if n.op == "placeholder":
            self.freeze_all(out)
        elif n.op == "output":
            for a in n.all_input_nodes:
                self.freeze_all(self.st(a))
        elif n.op == "get_attr":
            if isinstance(out, _Ax):
                for i, e in enumerate(out):
                    self.link(e, self.p(str(n.target), i))
        elif n.op == "call_module":
            self.module_rule(n, self.gm.get_submodule(str(n.target)), out, args, kwargs)
        elif n.op == "call_function":
            self.function_rule(n, n.target, out, args, kwargs)
        elif n.op == "call_method":
            self.method_rule(n, str(n.target), out, args, kwargs)

    def arg(self, n: torch.fx.Node, i: int, key: str | None = None) -> Any:
        if i < len(n.args):
            return self.st(n.args[i])
        if key is not None and key in n.kwargs:
            return self.st(n.kwargs[key])
        return None

    def tensor_args(self, n: torch.fx.Node) -> list[Any]:
        return [self.st(a) for a in n.all_input_nodes if isinstance(self.st(a), _Ax)]

    # -- modules ---------------------------------------------------------------------------------
    def module_rule(
        self, n: torch.fx.Node, m: torch.nn.Module, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        nn = torch.nn
        t = str(n.target)
        x = self.arg(n, 0, "input")
        xv = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(m, nn.Linear):
            self.link(x[-1], self.p(f"{t}.weight", 1))
            self.link(out[-1], self.p(f"{t}.weight", 0))
            if m.bias is not None:
                self.link(out[-1], self.p(f"{t}.bias", 0))
            for a, b in zip(x[:-1], out[:-1], strict=True):
                self.link(a, b)
        elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            self.conv(
                x,
                out,
                len(m.kernel_size),
                m.groups,
                f"{t}.weight",
                f"{t}.bias" if m.bias is not None else None,
            )
        elif isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            sd = len(m.kernel_size)
            c = len(x) - sd - 1
            if m.groups == 1:
                self.link(x[c], self.p(f"{t}.weight", 0))
                self.link(out[c], self.p(f"{t}.weight", 1))
                if m.bias is not None:
                    self.link(out[c], self.p(f"{t}.bias", 0))
            else:
                self.uf.freeze(x[c])
                self.uf.freeze(out[c])
            for k in range(c):
                self.link(x[k], out[k])
            self.freeze_all(_Ax(x[c + 1 :]))
            self.freeze_all(_Ax(out[c + 1 :]))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = 1 if len(x) > 1 else 0
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, leaf, None) is not None:
                    self.link(out[c], self.p(f"{t}.{leaf}", 0))
            for a, b in zip(x, out, strict=True):
                self.link(a, b)
        elif isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
            k = len(tuple(m.normalized_shape))
            for i in range(k):
                for leaf in ("weight", "bias"):
                    if getattr(m, leaf, None) is not None:
                        self.link(out[len(out) - k + i], self.p(f"{t}.{leaf}", i))
            for a, b in zip(x, out, strict=True):
                self.link(a, b)
        elif isinstance(m, nn.GroupNorm | nn.modules.instancenorm._InstanceNorm):
            c = 1 if len(x) > 2 or isinstance(m, nn.GroupNorm) else 0
            groups = m.num_groups if isinstance(m, nn.GroupNorm) else m.num_features
            channels = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
            if groups in (1, channels):
                for leaf in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, leaf, None) is not None:
                        self.link(out[c], self.p(f"{t}.{leaf}", 0))
            else:
                self.uf.freeze(out[c])
            for a, b in zip(x, out, strict=True):
                self.link(a, b)
        elif isinstance(m, nn.Embedding):
            self.link(out[-1], self.p(f"{t}.weight", 1))
            self.uf.freeze(self.p(f"{t}.weight", 0))
            for a, b in zip(x, out[:-1], strict=True):
                self.link(a, b)
        elif isinstance(m, nn.Flatten | nn.Unflatten):
            self.reshape(x, xv.shape, out, value_shape(out, self.uf))
        elif isinstance(m, nn.PReLU):
            if m.num_parameters == 1:
                for a, b in zip(x, out, strict=True):
                    self.link(a, b)
            else:
                self.link(out[1 if len(out) > 1 else 0], self.p(f"{t}.weight", 0))
                for a, b in zip(x, out, strict=True):
                    self.link(a, b)
        elif isinstance(m, nn.MultiheadAttention):
            self.mha(n, m, t, out)
        elif isinstance(
            m,
            nn.modules.pooling._MaxPoolNd
            | nn.modules.pooling._AvgPoolNd
            | nn.modules.pooling._AdaptiveAvgPoolNd
            | nn.modules.pooling._AdaptiveMaxPoolNd,
        ):
            if not isinstance(out, _Ax):
                self.unknown(n, out, f"{type(m).__name__}(return_indices)")
                return
            sd = int(type(m).__name__[-2])
            self.pool(x, out, sd)
        else:  # elementwise activations, dropout, identity, softmax
            for a, b in zip(x, out, strict=True):
                self.link(a, b)

    def conv(self, x: _Ax, out: _Ax, sd: int, groups: int, w: str, b: str | None) -> None:
        c = len(x) - sd - 1
        wt = self.state.get(w)
        if groups == 1:
            self.link(x[c], self.p(w, 1))
            self.link(out[c], self.p(w, 0))
        elif wt is not None and wt.shape[1] == 1 and self.uf.size[x[c]] == self.uf.size[out[c]] == groups:
            self.link(x[c], out[c])  # depthwise: channel i only reads channel i
            self.link(out[c], self.p(w, 0))
        else:
            self.uf.freeze(x[c])
            self.uf.freeze(out[c])
        if b is not None:
            self.link(out[c], self.p(b, 0))
        for k in range(c):
            self.link(x[k], out[k])
        self.freeze_all(_Ax(x[c + 1 :]))
        self.freeze_all(_Ax(out[c + 1 :]))

    def pool(self, x: _Ax, out: _Ax, sd: int) -> None:
        for a, b in zip(x[:-sd], out[:-sd], strict=True):
            self.link(a, b)
        self.freeze_all(_Ax(x[-sd:]))
        self.freeze_all(_Ax(out[-sd:]))

    def mha(self, n: torch.fx.Node, m: torch.nn.MultiheadAttention, t: str, out: Any) -> None:
        q, k, v = (self.arg(n, i, key) for i, key in enumerate(("query", "key", "value")))
        ok = m._qkv_same_embed_dim and m.bias_k is None and isinstance(out, tuple) and isinstance(out[0], _Ax)
        if not ok:
            self.unknown(n, out, "MultiheadAttention(kdim/vdim/add_bias_kv)")
            return
        e, h = m.embed_dim, m.num_heads
        y, three = self.virtual(e), self.virtual(3)
        self.uf.freeze(three)
        self.relations.append((self.p(f"{t}.in_proj_weight", 0), [three, y], [3, e]))
        if m.in_proj_bias is not None:
            self.relations.append((self.p(f"{t}.in_proj_bias", 0), [three, y], [3, e]))
        self.relations.append((y, [self.virtual(h), self.virtual(e // h)], [h, e // h]))
        self.link(self.p(f"{t}.out_proj.weight", 1), y)
        for s in (q, k, v):
            self.link(s[-1], self.p(f"{t}.in_proj_weight", 1))
        o = out[0]
        self.link(o[-1], self.p(f"{t}.out_proj.weight", 0))
        if m.out_proj.bias is not None:
            self.link(o[-1], self.p(f"{t}.out_proj.bias", 0))
        for a, b in zip(q[:-1], o[:-1], strict=True):
            self.link(a, b)
        for a, b in zip(k[:-1], v[:-1], strict=True):
            self.link(a, b)
        self.freeze_all(out[1])

    # -- functions -------------------------------------------------------------------------------
    def function_rule(
        self, n: torch.fx.Node, fn: Any, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        F = torch.nn.functional
        name = getattr(fn, "__name__", str(fn))
        if fn is operator.getitem:
            self.getitem(n, out, args)
        elif fn is getattr:
            x = self.arg(n, 0)
            if not isinstance(out, _Ax):
                return
            if args[1] in ("T", "mT", "mH", "H"):
                order = (
                    list(range(len(x)))[::-1]
                    if args[1] in ("T", "H")
                    else [*range(len(x) - 2), len(x) - 1, len(x) - 2]
                )
                for i, j in enumerate(order):
                    self.link(out[i], x[j])
            elif args[1] in ("data",):
                for a, b in zip(x, out, strict=True):
                    self.link(a, b)
            else:
                self.unknown(n, out, f"getattr {args[1]}")
        elif fn in _ELEMENTWISE_FN:
            if isinstance(out, _Ax):
                self.broadcast(out, self.tensor_args(n))
            elif out is not None:
                self.unknown(n, out, name)
        elif fn in (torch.matmul, operator.matmul, torch.bmm, torch.mm):
            self.matmul(self.arg(n, 0), self.arg(n, 1), out)
        elif fn is F.linear:
            x, w, b = self.arg(n, 0, "input"), self.arg(n, 1, "weight"), self.arg(n, 2, "bias")
            self.link(x[-1], w[1])
            self.link(out[-1], w[0])
            if b is not None:
                self.link(out[-1], b[0])
            for a, c in zip(x[:-1], out[:-1], strict=True):
                self.link(a, c)
        elif fn in (F.conv1d, F.conv2d, F.conv3d):
            x, w, b = self.arg(n, 0, "input"), self.arg(n, 1, "weight"), self.arg(n, 2, "bias")
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            sd = len(w) - 2
            c = len(x) - sd - 1
            wv = args[1] if len(args) > 1 else kwargs["weight"]
            if groups == 1:
                self.link(x[c], w[1])
                self.link(out[c], w[0])
            elif wv.shape[1] == 1 and self.uf.size[x[c]] == groups:
                self.link(x[c], out[c])
                self.link(out[c], w[0])
            else:
                self.uf.freeze(x[c])
                self.uf.freeze(out[c])
            if b is not None:
                self.link(out[c], b[0])
            for k in range(c):
                self.link(x[k], out[k])
            self.freeze_all(_Ax(x[c + 1 :]))
            self.freeze_all(_Ax(out[c + 1 :]))
            self.freeze_all(_Ax(w[2:]))
        elif fn in (F.layer_norm, F.group_norm, F.batch_norm, getattr(F, "rms_norm", None)):
            x = self.arg(n, 0, "input")
            for a, b in zip(x, out, strict=True):
                self.link(a, b)
            if fn is F.batch_norm:
                ch = [
                    self.arg(n, i, k)
                    for i, k in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
                ]
                for s in ch:
                    if s is not None:
                        self.link(out[1 if len(out) > 1 else 0], s[0])
            elif fn is F.group_norm:
                g = args[1] if len(args) > 1 else kwargs["num_groups"]
                if g not in (1, self.uf.size[out[1]]):
                    self.uf.freeze(out[1])
                for i, key in ((2, "weight"), (3, "bias")):
                    s = self.arg(n, i, key)
                    if s is not None:
                        self.link(out[1], s[0])
            else:
                ns = args[1] if len(args) > 1 else kwargs["normalized_shape"]
                k = len(ns) if isinstance(ns, list | tuple | torch.Size) else 1
                for i, key in ((2, "weight"), (3, "bias")):
                    s = self.arg(n, i, key)
                    if s is not None:
                        for j in range(k):
                            self.link(out[len(out) - k + j], s[j])
        elif fn is F.embedding:
            idx, w = self.arg(n, 0, "input"), self.arg(n, 1, "weight")
            self.link(out[-1], w[1])
            self.uf.freeze(w[0])
            for a, b in zip(idx, out[:-1], strict=True):
                self.link(a, b)
        elif fn is F.scaled_dot_product_attention:
            q, k, v = self.arg(n, 0, "query"), self.arg(n, 1, "key"), self.arg(n, 2, "value")
            self.link(q[-1], k[-1])
            self.link(k[-2], v[-2])
            self.link(out[-2], q[-2])
            self.link(out[-1], v[-1])
            batch = _Ax(out[:-2])
            self.broadcast(batch, [_Ax(q[:-2]), _Ax(k[:-2]), _Ax(v[:-2])])
            self.freeze_all(self.arg(n, 3, "attn_mask"))
        elif fn in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten):
            self.reshape(self.arg(n, 0), args[0].shape, out, value_shape(out, self.uf))
        elif fn in (
            torch.permute,
            torch.transpose,
            torch.swapaxes,
            torch.swapdims,
            torch.t,
            torch.movedim,
            torch.moveaxis,
        ):
            self.permute(self.arg(n, 0), out, args[0].ndim, name, args[1:], kwargs)
        elif fn in (torch.cat, torch.concat, torch.stack):
            self.cat(n, out, args, kwargs, stack=fn is torch.stack)
        elif fn in (torch.chunk, torch.split, torch.unbind, torch.tensor_split):
            self.split(self.arg(n, 0), out, args, kwargs, unbind=fn is torch.unbind, ndim=args[0].ndim)
        elif name in _VALUE_REDUCE | _INDEX_REDUCE and getattr(torch, name, None) is fn:
            if len(n.all_input_nodes) > 1 and name in ("max", "min"):
                self.broadcast(out, self.tensor_args(n))
            else:
                self.reduce(self.arg(n, 0), out, args, kwargs, name)
        elif fn in (
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.adaptive_max_pool2d,
            F.interpolate,
        ):
            if not isinstance(out, _Ax):
                self.unknown(n, out, name)
                return
            sd = {"1d": 1, "2d": 2, "3d": 3}.get(name[-2:], len(out) - 2)
            self.pool(self.arg(n, 0), out, sd)
        elif fn in _FREE_CREATE:
            pass  # a constant tensor is invariant under every permutation
        elif fn in _FROZEN_CREATE:
            self.freeze_all(out)  # positions, random values: not invariant
        elif fn in (torch.tril, torch.triu):
            self.freeze_all(out)
            self.freeze_all(self.arg(n, 0))
        elif isinstance(out, _Ax | tuple) or any(isinstance(self.st(a), _Ax) for a in n.all_input_nodes):
            self.unknown(n, out, name)

    def method_rule(
        self, n: torch.fx.Node, meth: str, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        x = self.arg(n, 0)
        base = meth[:-1] if meth.endswith("_") and not meth.startswith("__") else meth
        if base in _NOOP_METHODS or not isinstance(x, _Ax):
            if isinstance(out, _Ax | tuple) and base not in _NOOP_METHODS:
                self.unknown(n, out, f".{meth}")
            return
        if base in _CAST_METHODS:
            for a, b in zip(x, out, strict=True):
                self.link(a, b)
        elif base in _ELEMENTWISE_METHODS:
            self.broadcast(out, self.tensor_args(n))
        elif base in _RESHAPE:
            self.reshape(x, args[0].shape, out, value_shape(out, self.uf))
        elif base in _PERMUTE:
            self.permute(x, out, args[0].ndim, base, args[1:], kwargs)
        elif base in ("expand", "expand_as", "broadcast_to"):
            self.broadcast(out, [x])
        elif base in ("repeat", "tile"):
            for i in range(1, len(x) + 1):
                if self.uf.size[x[-i]] == self.uf.size[out[-i]]:
                    self.link(x[-i], out[-i])
                else:
                    self.uf.freeze(x[-i])
                    self.uf.freeze(out[-i])
            self.freeze_all(_Ax(out[: len(out) - len(x)]))
        elif base in _VALUE_REDUCE | _INDEX_REDUCE:
            if len(n.all_input_nodes) > 1 and base in ("max", "min"):
                self.broadcast(out, self.tensor_args(n))
            else:
                self.reduce(x, out, args, kwargs, base)
        elif base in ("chunk", "split", "unbind", "tensor_split"):
            self.split(x, out, args, kwargs, unbind=base == "unbind", ndim=args[0].ndim)
        elif base in _FREE_CREATE_METHODS:
            pass
        elif base in ("tril", "triu"):
            self.freeze_all(out)
            self.freeze_all(x)
        else:
            self.unknown(n, out, f".{meth}")

    # -- shared op rules -------------------------------------------------------------------------
    def matmul(self, a: _Ax, b: _Ax, out: Any) -> None:
        if len(a) == 1 and len(b) == 1:
            self.link(a[0], b[0])
            return
        if len(a) == 1:
            self.link(a[0], b[-2])
            self.link(out[-1], b[-1])
            self.broadcast(_Ax(out[:-1]), [_Ax(b[:-2])])
            return
        if len(b) == 1:
            self.link(a[-1], b[0])
            self.link(out[-1], a[-2])
            self.broadcast(_Ax(out[:-1]), [_Ax(a[:-2])])
            return
        self.link(a[-1], b[-2])
        self.link(out[-2], a[-2])
        self.link(out[-1], b[-1])
        self.broadcast(_Ax(out[:-2]), [_Ax(a[:-2]), _Ax(b[:-2])])

    def permute(
        self, x: _Ax, out: _Ax, ndim: int, name: str, rest: Sequence[Any], kwargs: dict[str, Any]
    ) -> None:
        order = list(range(ndim))
        if name == "permute":
            dims = (
                rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else (rest or kwargs["dims"])
            )
            order = [d % ndim for d in dims]
        elif name in ("transpose", "swapaxes", "swapdims"):
            d0, d1 = (list(rest) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2]
            d0, d1 = d0 % ndim, d1 % ndim
            order[d0], order[d1] = order[d1], order[d0]
        elif name == "t":
            order = order[::-1]
        else:  # movedim
            src, dst = rest[0], rest[1]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [s % ndim for s in src], [d % ndim for d in dst]
            others = [d for d in range(ndim) if d not in src]
            order = [-1] * ndim
            for s, d in zip(src, dst, strict=True):
                order[d] = s
            it = iter(others)
            order = [o if o >= 0 else next(it) for o in order]
        for i, j in enumerate(order):
            self.link(out[i], x[j])

    def reduce(self, x: _Ax, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> None:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis"))
        if name in ("argmax", "argmin", "max", "min", "median", "mode") and dim is None:
            self.freeze_all(x)
            return
        if name in ("sort", "argsort") and dim is None:
            dim = -1
        if name in ("cumsum", "cumprod", "cummax", "cummin", "sort", "argsort", "topk", "kthvalue"):
            if name in ("topk", "kthvalue"):
                dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            dims = {dim % len(x)}
            outs = out if isinstance(out, tuple) else (out,)
            for o in outs:
                if isinstance(o, _Ax):
                    for i, (a, b) in enumerate(zip(x, o, strict=True)):
                        if i in dims:
                            self.uf.freeze(a)
                            self.uf.freeze(b)
                        else:
                            self.link(a, b)
            return
        if dim is None:
            return  # full reduction: a permutation-invariant scalar
        dims = {d % len(x) for d in (dim if isinstance(dim, list | tuple) else [dim])}
        if name in _INDEX_REDUCE:
            for d in dims:
                self.uf.freeze(x[d])  # the index of the extremum would move
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if not isinstance(o, _Ax):
                continue
            keep = [a for i, a in enumerate(x) if i not in dims]
            if len(o) == len(x):  # keepdim
                keep = [a if i not in dims else None for i, a in enumerate(x)]
            for a, b in zip(keep, o, strict=True):
                if a is not None:
                    self.link(a, b)

    def cat(
        self, n: torch.fx.Node, out: _Ax, args: tuple[Any, ...], kwargs: dict[str, Any], stack: bool
    ) -> None:
        parts = n.args[0] if n.args else n.kwargs["tensors"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        nd = len(out)
        dim %= nd
        for pn in parts:
            s = self.st(pn)
            if not isinstance(s, _Ax):
                continue
            if stack:
                for i, a in enumerate(s):
                    self.link(a, out[i if i < dim else i + 1])
            else:
                for i, a in enumerate(s):
                    if i == dim:
                        self.uf.freeze(a)
                    else:
                        self.link(a, out[i])
        if not stack:
            self.uf.freeze(out[dim])

    def split(
        self, x: _Ax, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any], unbind: bool, ndim: int
    ) -> None:
        dim = (
            (args[1] if len(args) > 1 else kwargs.get("dim", 0))
            if unbind
            else (args[2] if len(args) > 2 else kwargs.get("dim", 0))
        )
        dim %= ndim
        self.uf.freeze(x[dim])
        for o in out if isinstance(out, tuple) else (out,):
            if not isinstance(o, _Ax):
                continue
            if unbind:
                for i, a in enumerate(x):
                    if i != dim:
                        self.link(a, o[i if i < dim else i - 1])
            else:
                for i, (a, b) in enumerate(zip(x, o, strict=True)):
                    if i == dim:
                        self.uf.freeze(b)
                    else:
                        self.link(a, b)

    def getitem(self, n: torch.fx.Node, out: Any, args: tuple[Any, ...]) -> None:
        base = self.arg(n, 0)
        idx = args[1]
        if isinstance(base, tuple):
            if isinstance(idx, int) and out is not None:
                self._same(base[idx], out)
            else:
                for i in range(len(base))[idx] if isinstance(idx, slice) else []:
                    self._same(base[i], out[i - (idx.start or 0)] if isinstance(out, tuple) else None)
            return
        if not isinstance(base, _Ax):
            return
        shape = args[0].shape
        items = idx if isinstance(idx, tuple) else (idx,)
        consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
        i = j = 0
        for it in items:
            if it is Ellipsis:
                for _ in range(len(base) - consumed):
                    self.link(base[i], out[j])
                    i, j = i + 1, j + 1
            elif it is None:
                j += 1
            elif isinstance(it, int) and not isinstance(it, bool):
                self.uf.freeze(base[i])
                i += 1
            elif isinstance(it, slice):
                full = (
                    it.start in (None, 0)
                    and it.step in (None, 1)
                    and (it.stop is None or it.stop >= shape[i])
                )
                if full:
                    self.link(base[i], out[j])
                else:
                    self.uf.freeze(base[i])
                    self.uf.freeze(out[j])
                i, j = i + 1, j + 1
            else:  # advanced indexing
                self.freeze_all(base)
                self.freeze_all(out)
                self.unsupported.append("advanced indexing")
                return
        while i < len(base):
            self.link(base[i], out[j])
            i, j = i + 1, j + 1

    def _same(self, a: Any, b: Any) -> None:
        if isinstance(a, _Ax) and isinstance(b, _Ax):
            for x, y in zip(a, b, strict=True):
                self.link(x, y)
        elif isinstance(a, tuple) and isinstance(b, tuple):
            for x, y in zip(a, b, strict=True):
                self._same(x, y)


def value_shape(s: _Ax, uf: _UnionFind) -> list[int]:
    return [uf.size[e] for e in s]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, inf: _Inference) -> None:
        super().__init__(gm)
        self.inf = inf

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self.inf.visit(n, value, args, kwargs)
        return value


def _resolve(inf: _Inference) -> tuple[dict[Elem, Any], dict[Elem, Any]]:
    """Decide how every split/merge of a permuted axis is represented.

    Returns ``(kron, head)``: ``kron[F]`` = ``(sizes, subs)`` for a flat class F whose permutation
    is the Kronecker product of its factors' permutations (parameters in F get a view);
    ``head[F]`` = ``(sizes, subs, pos, H, T)`` for a flat class whose factors ``(H, T)`` at
    ``pos, pos+1`` are attention heads and the features inside them (a block-structured
    permutation with a free τ per head; T None = heads only).
    """
    uf = inf.uf
    rels: dict[Elem, tuple[list[int], list[Elem]]] = {}
    changed = True
    while changed:
        changed = False
        rels = {}
        for flat, subs, sizes in inf.relations:
            f = uf.find(flat)
            if uf.frozen(f):
                for s in subs:
                    if not uf.frozen(s):
                        uf.freeze(s)
                        changed = True
                continue
            if f in rels:
                osizes, osubs = rels[f]
                if osizes != sizes:
                    uf.freeze(f)
                    changed = True
                else:
                    for a, b in zip(osubs, subs, strict=True):
                        if uf.find(a) != uf.find(b):
                            uf.union(a, b)
                            changed = True
            else:
                rels[f] = (list(sizes), list(subs))
        for f, (_sizes, subs) in rels.items():
            if not uf.frozen(f) and all(uf.frozen(s) for s in subs):
                uf.freeze(f)
                changed = True
    rels = {f: (sz, [uf.find(s) for s in subs]) for f, (sz, subs) in rels.items() if not uf.frozen(f)}

    members: dict[Elem, list[Elem]] = {}
    for e in uf.parent:
        members.setdefault(uf.find(e), []).append(e)

    def has_param(c: Elem) -> bool:
        return any(e[0] == "p" for e in members.get(c, []))

    sub_pairs: dict[Elem, set[Elem | None]] = {}
    for _f, (_sz, subs) in rels.items():
        for i, s in enumerate(subs):
            if uf.frozen(s):
                continue
            nxt = subs[i - 1] if i > 0 else None
            sub_pairs.setdefault(s, set()).add(nxt)

    def head_ok(h: Elem, t: Elem) -> bool:
        if has_param(h) or has_param(t) or sub_pairs.get(t, set()) != {h}:
            return False
        for s in inf.el.values():
            for ax in _iter_ax(s):
                roots = {uf.find(e) for e in ax}
                if t in roots and h not in roots:
                    return False
        return True

    cand: dict[Elem, tuple[int, Elem, Elem | None]] = {}
    for f, (_sz, subs) in rels.items():
        nf = [i for i, s in enumerate(subs) if not uf.frozen(s)]
        if len(nf) == 2 and nf[1] == nf[0] + 1 and head_ok(subs[nf[0]], subs[nf[1]]):
            cand[f] = (nf[0], subs[nf[0]], subs[nf[1]])
        elif len(nf) == 1 and nf[0] + 1 < len(subs) and not has_param(subs[nf[0]]):
            cand[f] = (nf[0], subs[nf[0]], None)
    changed = True
    while changed:
        changed = False
        kron_subs = {s for f, (_sz, subs) in rels.items() if f not in cand for s in subs if not uf.frozen(s)}
        free_heads = {h for (_p, h, t) in cand.values() if t is not None}
        for f in list(cand):
            _pos, h, t = cand[f]
            if h in kron_subs or (t is None and h not in free_heads):
                del cand[f]
                changed = True
    kron = {f: v for f, v in rels.items() if f not in cand}
    head = {f: (*rels[f], *cand[f]) for f in cand}
    return kron, head


def _iter_ax(s: Any) -> Iterable[_Ax]:
    if isinstance(s, _Ax):
        yield s
    elif isinstance(s, tuple):
        for x in s:
            yield from _iter_ax(x)


def trace_spec(
    module: torch.nn.Module,
    example_inputs: Sequence[Any] | Any,
    *,
    check: bool = True,
    strict: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> FxTrace:
    """Infer a :class:`PermutationSpec` for ``module`` by ``torch.fx`` tracing; see :func:`infer_spec`.

    Returns an :class:`FxTrace` with the spec, the traced graph and the activation sites of
    every permutation (for activation matching).
    """
    inputs = tuple(example_inputs) if isinstance(example_inputs, list | tuple) else (example_inputs,)
    try:
        graph = _LeafTracer().trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        raise RecipeError(
            f"cannot trace {type(module).__name__} with torch.fx ({type(e).__name__}: {e}); "
            "use a ready architecture spec or a spec JSON"
        ) from e
    gm = torch.fx.GraphModule(module, graph)
    state = dict(module.state_dict(keep_vars=True))
    inf = _Inference(gm, {k: v.detach() for k, v in state.items()})
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            _Recorder(gm, inf).run(*inputs)
    finally:
        module.train(was_training)
    if strict and inf.unsupported:
        raise RecipeError(f"no permutation rule for: {', '.join(sorted(set(inf.unsupported)))}")
    uf = inf.uf
    # tied parameters (one tensor under two names) share every axis
    by_id: dict[int, list[str]] = {}
    for k, v in state.items():
        by_id.setdefault(id(v), []).append(k)
    for names in by_id.values():
        for other in names[1:]:
            for ax in range(state[names[0]].dim()):
                uf.union(inf.p(names[0], ax), inf.p(other, ax))
    kron, head = _resolve(inf)

    # expand parameter axes through views until every axis is a terminal class
    head_key = {f: ("hs", h, t) for f, (_sz, _subs, _pos, h, t) in head.items()}
    views: dict[str, tuple[int, ...]] = {}
    keys: dict[str, list[Any]] = {}
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    for name, t in floating.items():
        axes: list[tuple[int, Any]] = [(int(s), uf.find(inf.p(name, i))) for i, s in enumerate(t.shape)]
        for _ in range(8):
            new: list[tuple[int, Any]] = []
            for size, c in axes:
                if c in kron:
                    sizes, subs = kron[c]
                    new.extend((sz, uf.find(s)) for sz, s in zip(sizes, subs, strict=True))
                elif c in head:
                    sizes, subs, pos, _h, tt = head[c]
                    for i, (sz, s) in enumerate(zip(sizes, subs, strict=True)):
                        if i == pos:
                            new.append((sz * sizes[pos + 1], head_key[c]))
                        elif i != pos + 1:
                            new.append((sz, uf.find(s)))
                else:
                    new.append((size, c))
            if new == axes:
                break
            axes = new
        if len(axes) != t.dim() or any(a[0] != s for a, s in zip(axes, t.shape, strict=False)):
            views[name] = tuple(a[0] for a in axes)
        keys[name] = [a[1] for a in axes]

    members: dict[Elem, list[Elem]] = {}
    for e in uf.parent:
        members.setdefault(uf.find(e), []).append(e)

    def live(c: Any) -> bool:
        if isinstance(c, tuple) and c and c[0] == "hs":
            return True
        return not uf.frozen(c) and any(e[0] in ("n", "v") for e in members.get(c, []))

    # a class on two axes of one tensor (e.g. a square layer between tied embeddings) is a valid
    # symmetry that weight matching cannot solve as a LAP; leave it unpermuted
    dead: set[Any] = set()
    for name in floating:
        live_keys = [c for c in keys[name] if live(c)]
        dead.update(c for c in live_keys if live_keys.count(c) > 1)
    ids: dict[Any, PermId] = {}
    axes_to_perm: dict[str, list[PermId | None]] = {}
    for name in floating:
        row: list[PermId | None] = []
        for ax, c in enumerate(keys[name]):
            if live(c) and c not in dead:
                if c not in ids:
                    ids[c] = f"{name}:{ax}"
                row.append(ids[c])
            else:
                row.append(None)
        axes_to_perm[name] = row
    heads_spec: dict[PermId, HeadStructure] = {}
    group_names: dict[Elem, str] = {}
    for c, pid in ids.items():
        if isinstance(c, tuple) and c and c[0] == "hs":
            f = next(f for f, k in head_key.items() if k == c)
            sizes, _subs, pos, h, t = head[f]
            group = group_names.setdefault(h, f"heads[{pid}]")
            heads_spec[pid] = HeadStructure(sizes[pos], sizes[pos + 1], group, within=t is not None)
    spec = PermutationSpec(
        axes_to_perm, {k: tuple(v.shape) for k, v in floating.items()}, views=views, heads=heads_spec
    )

    # activation sites: node axes of each permutation's class (flat head classes included)
    site_key: dict[Elem, PermId] = {}
    for c, pid in ids.items():
        if isinstance(c, tuple) and c and c[0] == "hs":
            for f, k in head_key.items():
                if k == c:
                    site_key[f] = pid
        else:
            site_key[c] = pid
    sites: dict[PermId, list[tuple[str, tuple[int, ...], int]]] = {}
    skip = _RESHAPE | _PERMUTE | _CAST_METHODS | {"contiguous", "clone", "detach", "getitem", "dropout"}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_method" and node.target in skip:
            continue
        if node.op == "call_function" and getattr(node.target, "__name__", "") in skip:
            continue
        if node.op == "call_module" and isinstance(
            gm.get_submodule(str(node.target)), torch.nn.Dropout | torch.nn.Identity | torch.nn.Flatten
        ):
            continue
        s = inf.el.get(node.name)
        for e in (e for ax in _iter_ax(s) for e in ax):
            pid = site_key.get(uf.find(e))
            if pid is not None:
                sites.setdefault(pid, []).append((node.name, e[2], e[3]))
    result = FxTrace(spec, gm, sites, sorted(set(inf.unsupported)))
    if check:
        check_spec(module, spec, inputs, rtol=rtol, atol=atol)
    return result


def infer_spec(
    module: torch.nn.Module,
    example_inputs: Sequence[Any] | Any,
    *,
    check: bool = True,
    strict: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> PermutationSpec:
    """Infer the permutation spec of an arbitrary ``nn.Module`` by ``torch.fx`` tracing.

    The module is traced (leaf modules are those with a rule: Linear, Conv, norms, Embedding,
    MultiheadAttention, activations, pooling; everything else is inlined), run once on
    ``example_inputs``, and every tensor axis and parameter axis becomes an element of a
    union-find. Per-op rules union the axes that must share a permutation (a Linear's output axis
    with its weight's axis 0 and bias; both operands of ``+`` (residual streams); the contracted
    axes of a matmul...) and *freeze* axes that must stay (model inputs and outputs, spatial and
    sliced axes, ops without a rule). A reshape that splits or merges a permuted axis is kept as a
    relation: a ``C×H×W`` flatten gives the dense weight a view, and an ``n_heads×head_dim``
    split whose inner axis is only ever used per head gives a block-structured head permutation
    (attention heads, :class:`HeadStructure`). Every class that reaches a parameter and an
    activation, and is not frozen, becomes one permutation, named ``<first tensor>:<axis>``.

    With ``check`` (default) the spec is verified by :func:`check_spec` (random permutations,
    outputs compared in eval mode); a failure raises :class:`SpecCheckError` naming the
    permutation. ``strict`` raises on ops without a rule instead of freezing their axes.
    """
    return trace_spec(module, example_inputs, check=check, strict=strict, rtol=rtol, atol=atol).spec
