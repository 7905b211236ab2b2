"""The small networks and tasks of a model zoo: MLPs and CNNs on sklearn's digits (and a synthetic task).

Everything here is deterministic given a seed: the data split, the task transforms (a fixed pixel
permutation, a relabelling), the architecture sampled for a run, its initialisation and its training
batches. The zoo generator (:mod:`metanets.zoo`) calls :func:`train_run` once per run.

Tasks (research note metanets.md §4.2, zoos A–C): ``digits`` (the 10 digits), ``digits_permuted`` (a
fixed pixel permutation of the inputs), ``digits_relabel`` (labels ``(y + 3) mod 10``), ``parity``
(``y mod 2``, on the same 10 outputs), ``synthetic`` (``make_classification``, 64 features, 10 classes).
Tasks ``digits``/``digits_permuted``/``digits_relabel`` give identically distributed weight statistics:
telling them apart needs to know which input or output neuron is which.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from merge.errors import InvalidArgumentError

__all__ = ["TASKS", "ZooCNN", "ZooMLP", "arch_id", "build_model", "load_task", "train_run"]

TASKS = ("digits", "digits_permuted", "digits_relabel", "parity", "synthetic")
ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class TaskData:
    x_train: torch.Tensor  # [n, 64]
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int = 10


@lru_cache(maxsize=16)
def load_task(task: str, seed: int = 0, test_fraction: float = 0.3) -> TaskData:
    """The task's data: 64 features in [0, 1] (8×8 images for digits), a stratified split by ``seed``."""
    if task not in TASKS:
        raise InvalidArgumentError(f"unknown zoo task '{task}' (known: {', '.join(TASKS)})")
    from sklearn.datasets import load_digits, make_classification
    from sklearn.model_selection import train_test_split

    if task == "synthetic":
        x, y = make_classification(
            n_samples=1800, n_features=64, n_informative=24, n_redundant=8, n_classes=10,
            n_clusters_per_class=1, random_state=seed,
        )  # fmt: skip
        x = (x - x.min(0)) / (x.max(0) - x.min(0) + 1e-9)
    else:
        d = load_digits()
        x, y = d.data / 16.0, d.target.copy()
        if task == "digits_permuted":
            g = torch.Generator().manual_seed(1000 + seed)
            x = x[:, torch.randperm(64, generator=g).numpy()]
        elif task == "digits_relabel":
            y = (y + 3) % 10
        elif task == "parity":
            y = y % 2
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return TaskData(f(xtr), g(ytr), f(xte), g(yte))


def _norm(kind: str, n: int, conv: bool) -> nn.Module | None:
    if kind in ("none", None):
        return None
    if kind == "batchnorm":
        return nn.BatchNorm2d(n) if conv else nn.BatchNorm1d(n)
    if kind == "layernorm":
        return nn.GroupNorm(1, n) if conv else nn.LayerNorm(n)
    raise InvalidArgumentError(f"unknown normalisation '{kind}' (none, batchnorm, layernorm)")


class ZooMLP(nn.Module):
    """``64 → width × depth → 10``: Linear, optional norm, activation (``layers.<i>`` in a Sequential)."""

    def __init__(
        self, depth: int, width: int, activation: str = "relu", norm: str = "none", n_in: int = 64
    ) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        d = n_in
        for _ in range(depth):
            mods.append(nn.Linear(d, width))
            nm = _norm(norm, width, conv=False)
            if nm is not None:
                mods.append(nm)
            mods.append(ACTIVATIONS[activation]())
            d = width
        mods.append(nn.Linear(d, 10))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.reshape(x.shape[0], -1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, norm: str, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, k, padding=k // 2, bias=norm == "none")
        self.bn1 = _norm(norm, cout, conv=True) or nn.Identity()
        self.act = ACTIVATIONS[act]()
        self.conv2 = nn.Conv2d(cout, cout, k, padding=k // 2, bias=norm == "none")
        self.bn2 = _norm(norm, cout, conv=True) or nn.Identity()
        self.shortcut = nn.Sequential()
        if cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), _norm(norm, cout, conv=True) or nn.Identity()
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(o)) + self.shortcut(x))


class ZooCNN(nn.Module):
    """A small CNN on the 8×8 image: ``features`` (plain) or residual ``layer1`` blocks, global pooling, linear.

    ``residual=False``: conv(+norm)+activation per entry of ``channels``. ``residual=True``: a stem conv to
    ``channels[0]`` then one residual block (two convs, identity or projection shortcut) per channel count.
    """

    def __init__(
        self,
        channels: list[int],
        kernel: int = 3,
        activation: str = "relu",
        norm: str = "none",
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.residual = residual
        if residual:
            self.conv1 = nn.Conv2d(1, channels[0], kernel, padding=kernel // 2, bias=norm == "none")
            self.bn1 = _norm(norm, channels[0], conv=True) or nn.Identity()
            self.act = ACTIVATIONS[activation]()
            cin = channels[0]
            blocks = []
            for c in channels:
                blocks.append(_Block(cin, c, kernel, norm, activation))
                cin = c
            self.layer1 = nn.Sequential(*blocks)
        else:
            mods: list[nn.Module] = []
            cin = 1
            for c in channels:
                mods.append(nn.Conv2d(cin, c, kernel, padding=kernel // 2))
                nm = _norm(norm, c, conv=True)
                if nm is not None:
                    mods.append(nm)
                mods.append(ACTIVATIONS[activation]())
                cin = c
            self.features = nn.Sequential(*mods)
        self.linear = nn.Linear(channels[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 8, 8)
        if self.residual:
            x = self.layer1(self.act(self.bn1(self.conv1(x))))
        else:
            x = self.features(x)
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_model(arch: Mapping[str, Any]) -> nn.Module:
    """The network of an architecture dict (``{"kind": "mlp", "depth": 2, "width": 32, ...}``)."""
    kind = arch.get("kind")
    if kind == "mlp":
        return ZooMLP(
            int(arch["depth"]), int(arch["width"]), arch.get("activation", "relu"), arch.get("norm", "none")
        )
    if kind == "cnn":
        return ZooCNN(
            [int(c) for c in arch["channels"]],
            int(arch.get("kernel", 3)),
            arch.get("activation", "relu"),
            arch.get("norm", "none"),
            bool(arch.get("residual", False)),
        )
    raise InvalidArgumentError(f"unknown zoo architecture kind {kind!r} (mlp, cnn)")


def arch_id(arch: Mapping[str, Any]) -> str:
    """A short stable id of an architecture (its canonical JSON's hash)."""
    return hashlib.sha256(json.dumps(dict(arch), sort_keys=True).encode()).hexdigest()[:12]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    model.train()
    return acc, loss


def train_run(
    arch: Mapping[str, Any],
    hparams: Mapping[str, Any],
    task: str,
    *,
    seed: int,
    checkpoints: list[int],
    data_seed: int = 0,
) -> list[dict[str, Any]]:
    """Train one run and return its checkpoints: ``[{"epoch", "state", "train_acc", "test_acc", ...}]``.

    Deterministic for a given seed (one thread: the caller sets ``torch.set_num_threads(1)``). Hyper-
    parameters: ``lr``, ``weight_decay`` (Adam), ``init_scale`` (multiplies the default initialisation),
    ``train_fraction`` (a seeded subset of the training split), ``label_noise`` (that fraction of the
    training labels replaced by random ones), ``epochs``, ``batch_size``. Epoch 0 is the initialisation.
    """
    data = load_task(task, data_seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(arch)
    scale = float(hparams.get("init_scale", 1.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    n = data.x_train.shape[0]
    keep = torch.randperm(n, generator=g)[
        : max(10, int(round(float(hparams.get("train_fraction", 1.0)) * n)))
    ]
    x, y = data.x_train[keep], data.y_train[keep].clone()
    noise = float(hparams.get("label_noise", 0.0))
    if noise > 0:
        flip = torch.rand(len(y), generator=g) < noise
        y[flip] = torch.randint(0, data.n_classes, (int(flip.sum()),), generator=g)
    opt = torch.optim.Adam(
        model.parameters(), lr=float(hparams["lr"]), weight_decay=float(hparams.get("weight_decay", 0.0))
    )
    epochs = int(hparams["epochs"])
    bs = int(hparams.get("batch_size", 32))
    save_at = sorted({e for e in checkpoints if e <= epochs} | {epochs})
    out: list[dict[str, Any]] = []

    def snapshot(epoch: int) -> None:
        tr, _ = _accuracy(model, x, y)
        te, te_loss = _accuracy(model, data.x_test, data.y_test)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out.append({"epoch": epoch, "state": state, "train_acc": tr, "test_acc": te, "test_loss": te_loss})

    if 0 in save_at:
        snapshot(0)
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            idx = order[i : i + bs]
            if len(idx) < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch in save_at:
            snapshot(epoch)
    for c in out:
        if not all(
            math.isfinite(float(v.float().abs().max())) for v in c["state"].values() if v.is_floating_point()
        ):
            c["diverged"] = True
    return out
