"""The records the lineage methods pass between them: a model opened for comparison, and its score."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.checkpoint import TensorSource
from metanets.lineage.result import LayerEvidence
from metanets.lineage.stats import Pairing


@dataclass
class Model:
    """A child or candidate: its display name, the reference it came from and its lazy tensors."""

    name: str
    ref: str
    source: TensorSource
    path: Path | None = None
    index: int = -1


@dataclass
class Scored:
    """One candidate's score against the child, with the per-layer evidence behind it."""

    model: Model
    score: float
    q: dict[str, float]
    layers: list[LayerEvidence]
    pairing: Pairing
    coverage: float
    votes: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
