"""What every metanet shares: the call shape, specs for models given only as state dicts, devices.

A metanet is an ``nn.Module`` that reads other networks' weights. All of them (GMN, UNF, StatNN, flat
MLP, DeepSets) have one call shape, so training, prediction and the service treat them alike:

- ``featurize(state, spec)`` turns one model (a state dict and its :class:`PermutationSpec`) into a
  sample on the CPU (a parameter graph, a weight-space tensor dict, a feature vector);
- ``collate(samples)`` batches samples;
- ``forward(batch)`` returns the invariant prediction ``[B, out_dim]`` and ``embed(batch)`` the
  invariant embedding ``[B, embed_dim]`` it is read out from;
- :func:`predict_states` does all three for a list of state dicts.

Every metanet runs on any torch device: move it with ``.to(device)`` and its batches with
:func:`to_device`; with ``amp=torch.bfloat16`` the forward pass runs under autocast (for GPUs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from merge.errors import InvalidArgumentError
from merge.symmetry import PermutationSpec, auto_spec  # noqa: F401 (metanets' callers import it from here)
from merge.symmetry.spec import flat_to_heads

__all__ = ["Metanet", "auto_spec", "node_permutation", "predict_states", "to_device"]

def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move a collated batch (tensor, dict/list of tensors, or a torch_geometric Batch) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


class Metanet(nn.Module):
    """Base class: the shared call shape (see the module docstring)."""

    #: what :meth:`featurize` produces: "graph", "weights", "flat" or "stats"
    input_kind: str = ""
    out_dim: int = 1
    embed_dim: int = 0
    amp: torch.dtype | None = None

    def featurize(self, state: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None) -> Any:
        raise NotImplementedError

    def collate(self, samples: Sequence[Any]) -> Any:
        raise NotImplementedError

    def embed(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor arguments (for the metanet card; ``type(self)(**config)`` rebuilds it)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _autocast(self) -> Any:
        dev = self.device.type
        return torch.autocast(device_type=dev, dtype=self.amp, enabled=self.amp is not None)


def predict_states(
    metanet: Metanet,
    states: Sequence[Mapping[str, torch.Tensor]],
    specs: PermutationSpec | Sequence[PermutationSpec | None] | None = None,
    *,
    embed: bool = False,
) -> torch.Tensor:
    """Featurize, collate, move to the metanet's device and run it (``embed`` for the embeddings)."""
    if not isinstance(specs, Sequence):
        specs = [specs] * len(states)
    samples = [metanet.featurize(s, p) for s, p in zip(states, specs, strict=True)]
    batch = to_device(metanet.collate(samples), metanet.device)
    with torch.no_grad():
        out = metanet.embed(batch) if embed else metanet(batch)
    return out.float().cpu()


def node_permutation(layout: Any, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The node relabelling a spec permutation induces on a parameter graph (gather convention).

    After ``apply_permutation(spec, state, perms)`` the new graph's node ``i`` is the old graph's node
    ``result[i]``: hidden units move by their permutation, head nodes by the head permutation σ of
    their group, fixed and parameter nodes stay.
    """
    out = torch.arange(layout.num_nodes)
    sigma: dict[str, torch.Tensor] = {}
    for p, hs in spec.heads.items():
        s, _ = flat_to_heads(torch.as_tensor(perms[p]), hs.head_dim)
        if s is None:
            raise InvalidArgumentError(f"permutation '{p}' does not move whole heads")
        sigma[f"heads:{hs.group}"] = s
    for s in layout.node_sets:
        if s.kind == "hidden" and s.perm is not None:
            out[s.start : s.start + s.size] = s.start + torch.as_tensor(perms[s.perm])
        elif s.kind == "head" and s.perm in sigma:
            out[s.start : s.start + s.size] = s.start + sigma[s.perm]
    return out
