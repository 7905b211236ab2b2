"""The ``learned`` lineage method: a Graph Metanetwork that reads the parameter graph of a pair's difference.

Neural Lineage's learned detector (Yu & Wang, CVPR 2024, §4) encodes the pair [θ_parent, θ_child]
and scores every candidate with a transformer over candidates, softmax over candidates (plus an
optional "no parent" token), trained by cross-entropy on a generated zoo. Ours keeps that training
set-up and swaps the encoder for one that respects weight-space symmetry:

1. every candidate is aligned to the child by Git Re-Basin weight matching
   (:mod:`metanets.lineage.align`), so a permutation attack changes nothing;
2. the pair becomes the parameter graph (:func:`metanets.graph.build_graph`, Lim et al., "Graph
   Metanetworks", ICLR 2024) of the per-tensor normalised difference ``(θ_p − θ_c) / rms(θ_c)`` on
   the tensors both share (heads excluded): the graph of the fine-tuning step that would lead from
   the candidate to the child, in units of the child's weights;
3. a :class:`metanets.gmn.GMN` embeds that graph (invariant read-out) and a small head gives one
   logit per candidate; a learned "no parent" logit joins the softmax.

:func:`train_detector` trains it on a :class:`~metanets.lineage.zoo.LineageZoo` (children against all
parents, a share of episodes with the true parent withheld and "no parent" as the target) and writes
a detector file (safetensors weights, configuration in the header metadata: no pickle);
``detect_lineage(..., method="learned", detector=PATH)`` loads it. A detector is trained for one
architecture family; on others it runs but is out of distribution.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from merge.atomic import replace_file
from merge.checkpoint import TensorSource
from merge.errors import CheckpointError, InvalidArgumentError, WeightsmithError
from merge.symmetry import PermutationSpec
from metanets.lineage.align import align_candidates, restrict
from metanets.lineage.result import Skipped
from metanets.lineage.stats import Pairing, read, single_torch_thread

if TYPE_CHECKING:
    from torch_geometric.data import Data

    from metanets.lineage.model import Model, Scored
    from metanets.lineage.zoo import LineageZoo

FORMAT = "weightsmith.lineage_detector"


class PairDetector(nn.Module):
    """GMN embedding of a difference graph -> one logit; plus the learned "no parent" logit."""

    def __init__(self, gmn: dict[str, Any] | None = None, head_hidden: int = 32) -> None:
        super().__init__()
        from metanets.gmn import GMN

        self.gmn_config = {"hidden": 32, "layers": 3, "embed_dim": 32, **(gmn or {})}
        self.head_hidden = head_hidden
        self.gmn = GMN(**self.gmn_config)
        self.head = nn.Sequential(
            nn.Linear(self.gmn.embed_dim, head_hidden), nn.SiLU(), nn.Linear(head_hidden, 1)
        )
        self.none_logit = nn.Parameter(torch.zeros(()))

    def config(self) -> dict[str, Any]:
        return {"gmn": self.gmn.config(), "head_hidden": self.head_hidden}

    def forward(self, graphs: Sequence[Data]) -> torch.Tensor:
        """Logits ``[K + 1]``: one per candidate graph, then "no parent"."""
        batch = self.gmn.collate(list(graphs))
        logits = self.head(self.gmn.embed(batch)).squeeze(-1)
        return torch.cat([logits, self.none_logit.reshape(1)])


def pair_graph(
    child: TensorSource, candidate: TensorSource, spec: PermutationSpec, names: Sequence[str]
) -> Data:
    """The parameter graph of ``(θ_p − θ_c) / rms(θ_c)`` on ``names`` under ``spec`` restricted to them."""
    from metanets.graph import build_graph

    keep = [n for n in names if n in spec.axes_to_perm]
    sub = restrict(spec, set(keep))
    diff = {}
    for n in keep:
        c = read(child, n).float()
        rms = float(c.pow(2).mean().sqrt()) or 1.0
        diff[n] = (read(candidate, n).float() - c) / rms
    return build_graph(diff, sub)


def save_detector(model: PairDetector, path: str | Path, meta: Mapping[str, Any]) -> Path:
    from safetensors.torch import save_file

    out = Path(path)
    header = {
        "format": FORMAT,
        "version": "1",
        "config": json.dumps(model.config()),
        "meta": json.dumps(dict(meta)),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    replace_file(out, lambda tmp: save_file(state, tmp, metadata=header))
    return out


def load_detector(path: str | Path) -> tuple[PairDetector, dict[str, Any]]:
    """A detector written by :func:`train_detector` (or :func:`save_detector`) and its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(p)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own errors
        raise CheckpointError(f"detector '{p}': not a readable safetensors file ({e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"detector '{p}': not a weightsmith lineage detector (format {header.get('format')!r})"
        )
    cfg = json.loads(header["config"])
    model = PairDetector(cfg["gmn"], cfg["head_hidden"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"detector '{p}': weights do not fit its configuration ({e})") from None
    return model.eval(), json.loads(header.get("meta", "{}"))


def _one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with single_torch_thread():
            return fn(*args, **kwargs)

    return wrapper


def score_learned(
    child: Model,
    models: list[Model],
    pairings: dict[int, Pairing],
    detector: str | Path,
    skipped: list[Skipped],
    progress: Callable[[str, int, int], None] | None,
) -> list[Scored]:
    """Score candidates with a trained detector; ``score = 1 − p(candidate)`` (softmax with "no parent")."""
    from metanets.lineage.model import Scored

    model, _ = load_detector(detector)
    sources, _, bad, spec = align_candidates(child, models, pairings, progress=progress)
    for idx, why in bad.items():
        m = next(x for x in models if x.index == idx)
        skipped.append(Skipped(m.name, m.ref, why))
    ok = [m for m in models if m.index not in bad]
    graphs, kept = [], []
    for m in ok:
        try:
            graphs.append(pair_graph(child.source, sources[m.index], spec, pairings[m.index].shared))
            kept.append(m)
        except WeightsmithError as e:
            skipped.append(Skipped(m.name, m.ref, f"no parameter graph for the pair: {e}"))
    if not kept:
        return []
    with torch.no_grad():
        p = F.softmax(model(graphs), dim=0)
    p_none = float(p[-1])
    return [
        Scored(
            m,
            1.0 - float(p[i]),
            {},
            [],
            pairings[m.index],
            1.0,
            0.0,
            {"metrics": {"p_parent": float(p[i]), "p_none": p_none}, "p_none": p_none},
        )
        for i, m in enumerate(kept)
    ]


# ---------------------------------------------------------------------------------------------
# Training on a lineage zoo
# ---------------------------------------------------------------------------------------------


def _zoo_graphs(zoo: LineageZoo, queries: Sequence[str], candidates: Sequence[str]) -> dict[str, list[Data]]:
    from merge.checkpoint import StateDictSource
    from metanets.lineage.model import Model
    from metanets.lineage.stats import head_tensors, pair_tensors

    states = {n: zoo.state(n) for n in {*queries, *candidates}}
    out: dict[str, list[Data]] = {}
    for q in queries:
        src = StateDictSource(states[q])
        shapes = {k: tuple(v.shape) for k, v in states[q].items()}
        heads = head_tensors(list(shapes), shapes)
        child = Model(q, q, src)
        models, pairings = [], {}
        for i, c in enumerate(candidates):
            m = Model(c, c, StateDictSource(states[c]), index=i)
            models.append(m)
            pairings[i] = pair_tensors(src, m.source, heads=heads)
        sources, _, bad, spec = align_candidates(child, models, pairings)
        if bad:
            raise InvalidArgumentError(f"lineage zoo: candidate {sorted(bad)[0]} does not fit the spec of {q}")
        out[q] = [pair_graph(src, sources[i], spec, pairings[i].shared) for i in range(len(candidates))]
    return out


@_one_thread
def train_detector(
    zoo: LineageZoo,
    out: str | Path,
    *,
    epochs: int = 15,
    lr: float = 3e-3,
    withhold: float = 0.25,
    hidden: int = 16,
    layers: int = 2,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a :class:`PairDetector` on ``zoo``: every G3 child against all G2 parents (12 with the
    default zoo), one episode per child and epoch; with probability ``withhold`` the true parent is
    removed and the target is "no parent". Adam, cosine learning-rate decay. Writes ``out`` and returns
    the training log (loss per epoch, seconds)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    parents = zoo.names(2)
    children = zoo.names(3)
    t0 = time.perf_counter()
    graphs = _zoo_graphs(zoo, children, parents)
    t_graphs = time.perf_counter() - t0
    model = PairDetector({"hidden": hidden, "layers": layers, "embed_dim": hidden})
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    losses = []
    for ep in range(epochs):
        model.train()
        order = list(children)
        rng.shuffle(order)
        total = 0.0
        for q in order:
            target = parents.index(zoo.parent(q))
            idx = list(range(len(parents)))
            if rng.random() < withhold:
                idx.remove(target)
                y = len(idx)
            else:
                y = target
            logits = model([graphs[q][i] for i in idx])
            loss = F.cross_entropy(logits.unsqueeze(0), torch.tensor([y]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        sched.step()
        losses.append(total / len(order))
        if progress is not None:
            progress(ep + 1, epochs, losses[-1])
    if not all(math.isfinite(x) for x in losses):
        raise InvalidArgumentError("lineage detector training diverged (non-finite loss)")
    log = {
        "epochs": epochs,
        "loss": losses,
        "graph_seconds": t_graphs,
        "seconds": time.perf_counter() - t0,
        "zoo": str(zoo.path),
        "arch": zoo.config.arch,
        "children": len(children),
        "candidates": len(parents),
        "withhold": withhold,
        "seed": seed,
    }
    save_detector(model.eval(), out, log)
    return log
