"""Representation-based lineage scores on a probe set (Yu & Wang, "Neural Lineage", CVPR 2024).

Given a ``model_fn`` that builds a module from a state dict (its forward returns the features to
compare, e.g. the network without its head) and a probe batch ``x``, every candidate parent θ_p is
compared with the child θ_c through:

``l2``
    ``‖f_p(x) − f_c(x)‖_F``, the paper's learning-free baseline (representation distance);
``cka``
    ``1 − CKA(f_p, f_c)`` with linear CKA (Kornblith et al., "Similarity of Neural Network
    Representations Revisited", ICML 2019), invariant to rotations and permutations of features;
``first_order``
    the paper's fine-tuning approximation, paper-faithful: the parent is linearised and moved a
    fraction α towards the child, ``f̃_p = f_p + α·J_p·(θ_c − θ_p)``, and instead of evaluating
    ``f̃_p`` the similarity ``s = −mean((f_p − f_c)²)`` is expanded to first order in α,
    ``s̃ = s + α·⟨∇_{θ_p} s, θ_c − θ_p⟩`` (one backward pass), clipped at 0 (a squared distance is
    not negative) and reported as ``√(−s̃)``. The released code uses α = 0.01 (``grad_scale``); with
    α = 1 the expansion overshoots (``s̃ ≈ −α²‖JΔ‖²`` turns positive and is clipped), which the
    research notes measured as near-chance accuracy;
``linearized``
    the full linearised distance ``‖f_p + α·J_p(θ_c − θ_p) − f_c‖_F`` with ``J_pΔ`` from one
    forward-mode Jacobian-vector product (``torch.func.jvp``), exact for the linearised model at any
    α (default 1: the child itself if fine-tuning were linear).

Only parameters that the parent and child share with the same shape move (``θ_c − θ_p`` is zero
on a new head, as in the paper, which replaces the parent's head). Distances are divided by
``‖f_c − mean f_c‖_F`` so that they compare across models (unrelated models score ≈ 1.4 on
``l2``); CKA distances are in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import functional_call, jvp

from merge.errors import InvalidArgumentError, ShapeMismatchError

PROBE_METRICS = ("linearized", "first_order", "l2", "cka")
ModelFn = Callable[[Mapping[str, torch.Tensor]], torch.nn.Module]


def _features(model: torch.nn.Module, probe: Any) -> torch.Tensor:
    out = model(probe)
    if isinstance(out, tuple | list):
        out = out[0]
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(
            f"probe: model_fn's module returned {type(out).__name__}, expected a tensor of features"
        )
    return out.reshape(out.shape[0], -1).double() if out.dim() > 1 else out.reshape(-1, 1).double()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices (rows = the same probe inputs): ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)``
    after centring each feature (Kornblith et al. 2019, Eq. 5)."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    num = float((y.T @ x).pow(2).sum())
    den = float((x.T @ x).norm() * (y.T @ y).norm())
    return num / den if den > 0 else 0.0


def _scale(f_c: torch.Tensor) -> float:
    s = float((f_c - f_c.mean(0, keepdim=True)).norm())
    return s if s > 0 else 1.0


def _tangent(
    params: Mapping[str, torch.Tensor], child: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``θ_c − θ_p`` on the parameters both share with the same shape; zero elsewhere."""
    out = {}
    for k, v in params.items():
        c = child.get(k)
        out[k] = (
            (c.to(v.dtype) - v).detach()
            if c is not None and tuple(c.shape) == tuple(v.shape)
            else torch.zeros_like(v)
        )
    return out


def probe_distances(
    child_state: Mapping[str, torch.Tensor],
    parent_state: Mapping[str, torch.Tensor],
    model_fn: ModelFn,
    probe: Any,
    *,
    alpha: float = 1.0,
    alpha_first_order: float = 0.01,
    child_features: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every metric of the module docstring for one (child, candidate parent) pair (lower = closer)."""
    child_model = model_fn(child_state).eval()
    parent_model = model_fn(parent_state).eval()
    with torch.no_grad():
        f_c = child_features if child_features is not None else _features(child_model, probe)
        f_p = _features(parent_model, probe)
    if f_p.shape != f_c.shape:
        raise ShapeMismatchError(
            f"probe: the candidate's features have shape {list(f_p.shape)}, the child's {list(f_c.shape)}"
        )
    scale = _scale(f_c)
    out = {"l2": float((f_p - f_c).norm()) / scale, "cka": 1.0 - linear_cka(f_p, f_c)}

    params = {k: v.detach() for k, v in parent_model.named_parameters()}
    tangent = _tangent(params, child_state)

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        o = functional_call(parent_model, p, (probe,))
        if isinstance(o, tuple | list):
            o = o[0]
        if hasattr(o, "last_hidden_state"):
            o = o.last_hidden_state
        return o.reshape(o.shape[0], -1)

    # full linearised distance: J_p Δ by one forward-mode JVP
    _, jd = jvp(f, (params,), (tangent,))
    out["linearized"] = float((f_p + alpha * jd.double() - f_c).norm()) / scale

    # the paper's first-order expansion of s = -mean((f_p - f_c)^2) in alpha (one backward pass)
    req = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    fp = f(req)
    s = -((fp.double() - f_c) ** 2).mean()
    grads = torch.autograd.grad(s, list(req.values()), allow_unused=True)
    ds = sum(
        float((g.double() * tangent[k].double()).sum())
        for k, g in zip(req, grads, strict=True)
        if g is not None
    )
    s_approx = min(0.0, float(s.detach()) + alpha_first_order * ds)
    out["first_order"] = (-s_approx * f_c.numel()) ** 0.5 / scale
    return out
