"""A tiny multi-task merge problem for the AdaMerging / Concrete tests (and the entry-point tests).

A 6 → 12 → 12 ReLU MLP backbone (``layers.0``, ``layers.1``; a LayerNorm ``norm`` whose parameters
are in the checkpoints too), three "fine-tunes" = base + seeded noise, three fixed linear heads and
seeded unlabelled inputs. ``problem`` is the ``module:function`` entry point a recipe names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from merge.methods.concrete import FusionProblem, FusionTask

N_TASKS = 3


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 12), nn.Linear(12, 12)])
        self.norm = nn.LayerNorm(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.relu(self.layers[1](F.relu(self.layers[0](x)))))


def checkpoints(
    seed: int = 0, scale: float = 0.3
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """θ_0 and N_TASKS fine-tunes θ_t = θ_0 + noise (float32 state dicts)."""
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in Toy().state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    models = [
        {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(N_TASKS)
    ]
    return base, models


def heads(seed: int = 0) -> list[nn.Linear]:
    g = torch.Generator().manual_seed(seed + 2)
    out = []
    for _ in range(N_TASKS):
        h = nn.Linear(12, 4)
        with torch.no_grad():
            h.weight.copy_(torch.randn(4, 12, generator=g))
            h.bias.zero_()
        out.append(h)
    return out


def data(seed: int = 0, n: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 3)
    return [torch.randn(n, 6, generator=g) for _ in range(N_TASKS)]


def problem(device: str = "cpu") -> FusionProblem:
    """The entry point: architecture, per-task heads and unlabelled inputs."""
    return FusionProblem(
        Toy(),
        [FusionTask(f"task{i}", x, head=h) for i, (x, h) in enumerate(zip(data(), heads(), strict=True))],
    )


def too_few_heads() -> FusionProblem:
    p = problem()
    return FusionProblem(p.model, p.tasks[:2])


def not_a_problem() -> int:
    return 3
