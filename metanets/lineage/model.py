"""The records the lineage methods pass between them: a model opened for comparison, and its score."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge.checkpoint import StateDictSource, TensorSource
from merge.errors import InvalidArgumentError
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


# Opening models (detect_lineage, recover_model_graph)

ModelRef = str | Path | Mapping[str, torch.Tensor]


def named_refs(candidates: Sequence[ModelRef] | Mapping[str, ModelRef]) -> list[tuple[str, ModelRef]]:
    if isinstance(candidates, Mapping) and not all(isinstance(v, torch.Tensor) for v in candidates.values()):
        items = [(str(k), v) for k, v in candidates.items()]
    elif isinstance(candidates, str | Path) or isinstance(candidates, Mapping):
        raise InvalidArgumentError("detect_lineage: candidates must be a list of models (or a {name: model} mapping)")
    else:
        items = []
        for i, c in enumerate(candidates):
            items.append((str(c) if isinstance(c, str | Path) else f"candidate{i}", c))
    seen: dict[str, int] = {}
    out = []
    for n, c in items:
        if n in seen:
            seen[n] += 1
            n = f"{n}#{seen[n]}"
        else:
            seen[n] = 0
        out.append((n, c))
    return out


def open_model(name: str, ref: ModelRef, resolver: Callable[[str], Any], allow_pickle: bool) -> Model:
    if isinstance(ref, Mapping):
        bad = [k for k, v in ref.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise InvalidArgumentError(f"model '{name}': entry '{bad[0]}' of the state dict is not a tensor")
        return Model(name, name, StateDictSource(ref))
    from merge.checkpoint import open_checkpoint

    resolved = resolver(str(ref))
    ckpt = open_checkpoint(resolved.path, allow_pickle=allow_pickle)
    shown = str(ref) + (f" ({resolved.commit[:12]})" if getattr(resolved, "commit", None) else "")
    return Model(name, shown, ckpt, Path(resolved.path))


def default_resolver() -> Callable[[str], Any]:
    from merge.plan import default_resolver

    return default_resolver
