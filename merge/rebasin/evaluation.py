"""What interpolation breaks and how much: interpolate, BatchNorm reset, REPAIR, the loss barrier.

- :func:`loss_barrier` (the paper's definition, from its plots): ``max_λ L((1-λ)θ_A + λθ_B) −
  ½(L(θ_A) + L(θ_B))`` on a 25-point λ grid; :func:`reset_bn` (recompute BatchNorm statistics of
  an interpolated model) and :func:`repair` (Jordan et al., "REPAIR: REnormalizing Permuted
  Activations for Interpolation Repair", ICLR 2023, §4) for what interpolation breaks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from merge.rebasin.matching import batch_input

StateDict = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Interpolation, BatchNorm reset, REPAIR, loss barrier
# ---------------------------------------------------------------------------------------------


def interpolate(a: StateDict, b: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """``(1-λ)·θ_A + λ·θ_B`` for floating tensors; integer buffers (``num_batches_tracked``) come from A."""
    out = {}
    for k, va in a.items():
        vb = b[k]
        if va.is_floating_point():
            out[k] = va.float() * (1.0 - lam) + vb.float() * lam
        else:
            out[k] = va.clone()
    return out


def reset_bn(
    module: torch.nn.Module, data: Iterable[Any], *, max_batches: int | None = None
) -> torch.nn.Module:
    """Recompute every BatchNorm's running statistics on ``data`` ("reset BN", Git Re-Basin's ImageNet
    script; Jordan et al. 2023 §3): interpolation leaves statistics that no longer match the merged
    weights. Uses a cumulative average (momentum None) over the batches; returns ``module``."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return module
    saved = [(m.momentum, m.training) for m in bns]
    was_training = module.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    try:
        with torch.no_grad():
            for i, batch in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    break
                module(*batch_input(batch))
    finally:
        module.train(was_training)
        for m, (mom, _tr) in zip(bns, saved, strict=True):
            m.momentum = mom
    return module


def _channel_stats(
    module: torch.nn.Module, targets: list[torch.nn.Module], data: Iterable[Any], max_batches: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sums: dict[int, list[Any]] = {i: [0.0, 0.0, 0] for i in range(len(targets))}

    def hook(i: int) -> Callable[..., None]:
        def fn(_m: Any, _inp: Any, out: torch.Tensor) -> None:
            ch = (
                1 if out.dim() > 2 or isinstance(_m, torch.nn.modules.batchnorm._BatchNorm) else out.dim() - 1
            )
            z = out.detach().double().movedim(ch, 0).reshape(out.shape[ch], -1)
            s = sums[i]
            s[0] = s[0] + z.sum(1)
            s[1] = s[1] + (z * z).sum(1)
            s[2] += z.shape[1]

        return fn

    handles = [t.register_forward_hook(hook(i)) for i, t in enumerate(targets)]
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            for j, batch in enumerate(data):
                if max_batches is not None and j >= max_batches:
                    break
                module(*batch_input(batch))
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    out = []
    for i in range(len(targets)):
        s, ss, n = sums[i]
        mean = s / max(1, n)
        var = (ss / max(1, n) - mean * mean).clamp_min(0.0)
        out.append((mean, var.sqrt()))
    return out


def _repair_targets(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    mods = list(module.named_modules())
    bns = [(n, m) for n, m in mods if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        return bns
    layers = [
        (n, m)
        for n, m in mods
        if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d)
    ]
    return layers[:-1]


def repair(
    merged: torch.nn.Module,
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    data: Iterable[Any],
    lam: float = 0.5,
    *,
    max_batches: int | None = None,
    eps: float = 1e-5,
) -> torch.nn.Module:
    """REPAIR (Jordan et al., ICLR 2023, §4): undo the variance collapse of interpolated networks.

    For each repaired layer (every BatchNorm if the model has any, else every Linear/Conv but the
    last, in module order) the per-channel mean μ and std σ of its output are measured on
    ``data`` for A, for the *aligned* B and, layer by layer, for the merged model; the merged
    layer is then rescaled in place so its channels have the interpolated statistics
    ``μ_t = (1-λ)μ_A + λμ_B``, ``σ_t = (1-λ)σ_A + λσ_B`` (the affine correction is folded into the
    layer's weight and bias). ``model_b`` must already be permuted onto A.
    """
    targets = _repair_targets(merged)
    names = [n for n, _ in targets]
    mods_a = dict(model_a.named_modules())
    mods_b = dict(model_b.named_modules())
    data = list(data) if not isinstance(data, list) else data
    stats_a = _channel_stats(model_a, [mods_a[n] for n in names], data, max_batches)
    stats_b = _channel_stats(model_b, [mods_b[n] for n in names], data, max_batches)
    for i, (_name, m) in enumerate(targets):
        ((mu_m, sd_m),) = _channel_stats(merged, [m], data, max_batches)
        mu_t = (1 - lam) * stats_a[i][0] + lam * stats_b[i][0]
        sd_t = (1 - lam) * stats_a[i][1] + lam * stats_b[i][1]
        scale = (sd_t / (sd_m + eps)).float()
        shift = (mu_t - mu_m * scale.double()).float()
        with torch.no_grad():
            w = m.weight
            w.mul_(scale.view(-1, *([1] * (w.dim() - 1))))
            if m.bias is None:
                m.bias = torch.nn.Parameter(torch.zeros_like(scale))
            m.bias.mul_(scale).add_(shift)
    return merged


@dataclass
class BarrierResult:
    """Loss (and accuracy) along ``(1-λ)θ_A + λθ_B``, with Git Re-Basin's barrier.

    ``barrier = max_λ L(λ) − ½(L(0) + L(1))``; ``acc_barrier = ½(acc(0) + acc(1)) − min_λ acc(λ)``.
    """

    lambdas: list[float]
    losses: list[float]
    accuracies: list[float] | None
    barrier: float
    acc_barrier: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambdas": self.lambdas,
            "losses": self.losses,
            "accuracies": self.accuracies,
            "barrier": self.barrier,
            "acc_barrier": self.acc_barrier,
        }


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate(
    module: torch.nn.Module, data: Iterable[Any], loss_fn: LossFn = F.cross_entropy
) -> tuple[float, float | None]:
    """Mean loss over ``data`` (batches ``(x, y)``) and, for integer labels, accuracy."""
    total, n, correct, classify = 0.0, 0, 0, True
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            for x, y in data:
                out = module(x)
                total += float(loss_fn(out, y)) * len(y)
                n += len(y)
                if y.dtype in (torch.int64, torch.int32) and out.dim() == 2:
                    correct += int((out.argmax(1) == y).sum())
                else:
                    classify = False
    finally:
        module.train(was)
    return total / max(1, n), (correct / max(1, n) if classify else None)


def loss_barrier(
    model_fn: Callable[[StateDict], torch.nn.Module],
    a: StateDict,
    b: StateDict,
    data: Iterable[Any],
    steps: int = 25,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    reset_bn_data: Iterable[Any] | None = None,
) -> BarrierResult:
    """The loss barrier of Git Re-Basin: ``max_λ L((1-λ)θ_A + λθ_B) − ½(L(θ_A) + L(θ_B))``.

    ``λ`` runs over ``steps`` evenly spaced points of [0, 1] (25 in the reference plots);
    ``model_fn`` builds a module from a state dict; ``data`` is a list of ``(x, y)`` batches. With
    ``reset_bn_data`` every interpolated model's BatchNorm statistics are recomputed first.
    """
    data = list(data)
    lambdas = [i / (steps - 1) for i in range(steps)] if steps > 1 else [0.0]
    losses, accs = [], []
    for lam in lambdas:
        m = model_fn(interpolate(a, b, lam))
        if reset_bn_data is not None:
            reset_bn(m, reset_bn_data)
        loss, acc = evaluate(m, data, loss_fn)
        losses.append(loss)
        accs.append(acc)
    barrier = max(losses) - 0.5 * (losses[0] + losses[-1])
    if all(x is not None for x in accs):
        acc_list = [float(x) for x in accs if x is not None]
        return BarrierResult(
            lambdas, losses, acc_list, barrier, 0.5 * (acc_list[0] + acc_list[-1]) - min(acc_list)
        )
    return BarrierResult(lambdas, losses, None, barrier, None)
