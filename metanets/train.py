"""Training and using metanets on a model zoo: predict a property of a network from its weights.

:func:`train_metanet` trains any metanet of :mod:`metanets` (``gmn``, ``unf``, ``statnn``, ``flat``,
``flat_aug``, ``deepsets``) on a :class:`~metanets.zoo.Zoo` for a target: a numeric field regressed
(``test_acc`` with a sigmoid head and binary cross-entropy, as GMN, NFN and UNF train accuracy
predictors) or a categorical one classified (``task``, ``arch.kind``, ``hparams.activation``...). Splits
are by run; early stopping on the validation loss keeps the best epoch; everything is seeded.

- **Resumable**: the state after every epoch is kept in ``<out>.partial/``; a killed run resumes there
  (same config) and the metanet appears at ``<out>`` only when training has finished (one rename).
- **Data parallel**: ``nproc=N`` runs N processes with ``torch.distributed`` (gloo on CPU on 127.0.0.1,
  nccl on CUDA) and ``DistributedDataParallel``; each global batch is split across the processes and the
  loss is scaled so the averaged gradient equals the single-process gradient of the same global batch
  (tested: same weights as one process).
- **Device-agnostic**: ``device="cuda"`` (bfloat16 autocast with ``amp="bfloat16"``).

The result is ``<out>/metanet.safetensors`` (weights and normalisation buffers) and ``<out>/card.json``
(class and constructor arguments, target, the zoo's hash, the split, metrics, history), which
:func:`load_metanet`, :func:`predict` and :func:`embed` read back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from merge.atomic import check_output, publish, replace_file, write_marker
from merge.errors import CheckpointError, InvalidArgumentError
from merge.symmetry import PermutationSpec
from metanets.base import Metanet, auto_spec, to_device
from metanets.zoo import Zoo

__all__ = [
    "METANETS",
    "TrainConfig",
    "TrainResult",
    "embed",
    "load_metanet",
    "make_metanet",
    "predict",
    "regression_metrics",
    "split_records",
    "targets_of",
    "train_metanet",
]

METANETS = ("gmn", "unf", "statnn", "flat", "flat_aug", "deepsets")
CARD_FORMAT = "weightsmith.metanet"


@dataclass
class TrainConfig:
    """How to train (every field is in the card)."""

    model: str = "gmn"
    target: str = "test_acc"
    kind: str = "auto"  # regression | classification | auto
    loss: str = "auto"  # bce | mse (regression); ce (classification)
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    train_fraction: float = 1.0  # use this fraction of the training runs (data-scarcity experiments)
    where: dict[str, Any] = field(default_factory=dict)  # keep records whose fields equal these values
    seed: int = 0
    device: str = "cpu"
    amp: str | None = None
    compile: bool = False  # torch.compile the training forward (inductor; pays off on large zoos)
    model_args: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        d = asdict(self)
        d.pop("device")
        d.pop("compile")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TrainResult:
    path: Path
    metrics: dict[str, float]
    history: list[dict[str, float]]
    card: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def regression_metrics(pred: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    """Kendall τ, Spearman ρ, R², RMSE and the spread of the predictions (their standard deviation over the
    targets'; near 0 when a metanet predicts about the same value for every model, whatever its τ)."""
    from scipy.stats import kendalltau, spearmanr

    p = torch.tensor(list(pred), dtype=torch.float64)
    t = torch.tensor(list(true), dtype=torch.float64)
    ss_res = float(((p - t) ** 2).sum())
    ss_tot = float(((t - t.mean()) ** 2).sum())
    with warnings.catch_warnings():  # a constant prediction has no rank correlation: reported as 0
        warnings.simplefilter("ignore")
        tau = kendalltau(p.numpy(), t.numpy()).statistic
        rho = spearmanr(p.numpy(), t.numpy()).statistic
    return {
        "kendall_tau": float(tau) if tau == tau else 0.0,
        "spearman": float(rho) if rho == rho else 0.0,
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0,
        "rmse": math.sqrt(ss_res / max(1, len(p))),
        "prediction_spread": float(p.std() / t.std()) if len(t) > 1 and float(t.std()) > 0 else 0.0,
    }


#: below this spread (prediction std / target std on the test split) a regression metanet is reported as collapsed
COLLAPSE_SPREAD = 0.2


def collapse_warning(metrics: Mapping[str, Any], train_records: int) -> str | None:
    """A line saying that a regression metanet's predictions collapsed (nearly constant), or None."""
    spread = metrics.get("prediction_spread")
    if spread is None or spread >= COLLAPSE_SPREAD:
        return None
    return (
        f"predictions collapse: their spread is {spread:.2f} of the targets' (R² {metrics.get('r2', 0.0):.2f}, "
        f"Kendall τ {metrics.get('kendall_tau', 0.0):.2f}); the metanet barely tells models apart. It trained on "
        f"{train_records} records: try a larger zoo (hundreds of runs), more epochs, or --model statnn"
    )


# ---------------------------------------------------------------------------------------------
# building metanets from a zoo
# ---------------------------------------------------------------------------------------------


def _fixed_nodes(state: Mapping[str, torch.Tensor], spec: PermutationSpec) -> int:
    from metanets.graph import build_graph

    g = build_graph(state, spec)
    return sum(s.size for s in g.layout.node_sets if s.kind in ("input", "output"))


def make_metanet(
    name: str,
    example: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    out_dim: int,
    *,
    archs: int = 1,
    **kw: Any,
) -> Metanet:
    """A metanet by name, sized for ``example`` (a state dict of the zoo) and its ``spec``."""
    from metanets.baselines import DeepSets, FlatMLP, StatNN
    from metanets.gmn import GMN
    from metanets.unf import UNF

    if name not in METANETS:
        raise InvalidArgumentError(f"unknown metanet '{name}' (known: {', '.join(METANETS)})")
    if name in ("unf", "flat", "flat_aug") and archs > 1:
        raise InvalidArgumentError(
            f"metanet '{name}' reads one architecture, the selected records have {archs}; "
            "use gmn, deepsets or statnn (pooled) for mixed architectures, or filter the records"
        )
    if name == "gmn":
        kw.setdefault("io_slots", min(128, _fixed_nodes(example, spec)))
        return GMN(out_dim, **kw)
    if name == "unf":
        return UNF(spec, out_dim, **kw)
    if name == "statnn":
        pooled = kw.pop("pooled", archs > 1)
        return StatNN(StatNN.num_features(example, spec, pooled=pooled), out_dim, pooled=pooled, **kw)
    if name in ("flat", "flat_aug"):
        n = sum(v.numel() for k, v in example.items() if k in spec.axes_to_perm)
        return FlatMLP(n, out_dim, augment=name == "flat_aug", spec=spec, **kw)
    return DeepSets(out_dim, **kw)


_CLASSES: dict[str, type] = {}


def _metanet_class(cls_name: str) -> type:
    from metanets.baselines import DeepSets, FlatMLP, StatNN
    from metanets.gmn import GMN
    from metanets.unf import UNF

    classes = {c.__name__: c for c in (GMN, UNF, StatNN, FlatMLP, DeepSets)}
    if cls_name not in classes:
        raise CheckpointError(f"metanet card names an unknown class '{cls_name}'")
    return classes[cls_name]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def _select(zoo: Zoo, where: Mapping[str, Any]) -> list[int]:
    if not where:
        return list(range(len(zoo)))
    cols = {k: zoo.field(k) for k in where}
    return [i for i in range(len(zoo)) if all(cols[k][i] == v for k, v in where.items())]


def split_records(zoo: Zoo, cfg: TrainConfig) -> tuple[list[int], tuple[list[int], list[int], list[int]]]:
    """The records ``cfg.where`` selects and their train/val/test split by run (``cfg.train_fraction`` of
    the training runs kept, seeded): what :func:`train_metanet` trains and tests on."""
    idx = _select(zoo, cfg.where)
    if len(idx) < 3:
        raise InvalidArgumentError(f"zoo '{zoo.path}': only {len(idx)} records match {cfg.where}; need at least 3")
    tr, va, te = zoo.split(cfg.split, seed=cfg.split_seed, subset=idx)
    if cfg.train_fraction < 1.0:
        runs = sorted({zoo.records[i]["run"] for i in tr})
        random.Random(f"weightsmith-fraction:{cfg.seed}").shuffle(runs)
        keep = set(runs[: max(1, round(cfg.train_fraction * len(runs)))])
        tr = [i for i in tr if zoo.records[i]["run"] in keep]
    if not tr or not va or not te:
        raise InvalidArgumentError(f"split {list(cfg.split)} of {len(idx)} records leaves a side empty")
    return idx, (tr, va, te)


def targets_of(zoo: Zoo, cfg: TrainConfig, idx: Sequence[int]) -> tuple[str, list[Any], list[str]]:
    """``(kind, targets, classes)`` of the records ``idx`` for ``cfg.target`` (regression or classification)."""
    return _targets(zoo, cfg, idx)


def _targets(zoo: Zoo, cfg: TrainConfig, idx: Sequence[int]) -> tuple[str, list[Any], list[str]]:
    values = zoo.field(cfg.target)
    vals = [values[i] for i in idx]
    kind = cfg.kind
    if kind == "auto":  # fractional numbers or many distinct integers: regress; anything else: classify
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals)
        fractional = numeric and any(isinstance(v, float) and not float(v).is_integer() for v in vals)
        kind = "regression" if numeric and (fractional or len(set(vals)) > 12) else "classification"
    if kind == "regression":
        return kind, [float(v) for v in vals], []
    classes = sorted({json.dumps(v, sort_keys=True) for v in vals})
    return (
        kind,
        [classes.index(json.dumps(v, sort_keys=True)) for v in vals],
        [json.loads(c) for c in classes],
    )


def _loss_name(cfg: TrainConfig, kind: str, targets: Sequence[Any]) -> str:
    if cfg.loss != "auto":
        return cfg.loss
    if kind == "classification":
        return "ce"
    return "bce" if all(0.0 <= t <= 1.0 for t in targets) else "mse"


def _loss(out: torch.Tensor, y: torch.Tensor, how: str, reduction: str = "mean") -> torch.Tensor:
    if how == "bce":
        return F.binary_cross_entropy_with_logits(out[:, 0], y, reduction=reduction)
    if how == "mse":
        return F.mse_loss(out[:, 0], y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


def _read(out: torch.Tensor, how: str) -> torch.Tensor:
    if how == "bce":
        return torch.sigmoid(out[:, 0])
    if how == "mse":
        return out[:, 0]
    return out.softmax(-1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_metanet(
    zoo: Zoo | str | Path,
    cfg: TrainConfig,
    out: str | Path,
    *,
    nproc: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    stop_after_epochs: int | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult | None:
    """Train ``cfg.model`` on ``zoo`` and write the metanet to ``out`` (see the module docstring).

    ``stop_after_epochs`` stops early leaving a resumable ``<out>.partial`` (returns ``None``): what a
    killed run leaves behind, used by the resume test.
    """
    zoo_path = Path(zoo.path if isinstance(zoo, Zoo) else zoo)
    out = check_output(out, overwrite=overwrite, inputs=[zoo_path])
    if cfg.model not in METANETS:
        raise InvalidArgumentError(f"unknown metanet '{cfg.model}' (known: {', '.join(METANETS)})")
    if nproc > 1:
        import torch.multiprocessing as mp

        port = _free_port()
        mp.spawn(
            _ddp_worker, args=(nproc, port, str(zoo_path), cfg, str(out), overwrite, stop_after_epochs), nprocs=nproc,
            join=True,
        )  # fmt: skip
        if stop_after_epochs is not None and not out.exists():
            return None
        card = json.loads((out / "card.json").read_text())
        return TrainResult(out, card["metrics"], card["history"], card)
    return _train(zoo_path, cfg, out, rank=0, world=1, progress=progress, overwrite=overwrite,
                  stop_after_epochs=stop_after_epochs, log=log)  # fmt: skip


def _ddp_worker(
    rank: int,
    world: int,
    port: int,
    zoo_path: str,
    cfg: TrainConfig,
    out: str,
    overwrite: bool,
    stop: int | None,
) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        _train(Path(zoo_path), cfg, Path(out), rank=rank, world=world, progress=False, overwrite=overwrite,
               stop_after_epochs=stop, log=None)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _train(
    zoo_path: Path,
    cfg: TrainConfig,
    out: Path,
    *,
    rank: int,
    world: int,
    progress: bool,
    overwrite: bool,
    stop_after_epochs: int | None,
    log: Callable[[dict[str, Any]], None] | None,
) -> TrainResult | None:
    zoo = Zoo(zoo_path)
    idx, (tr, va, te) = split_records(zoo, cfg)
    kind, targets, classes = _targets(zoo, cfg, idx)
    y_of = dict(zip(idx, targets, strict=True))
    how = _loss_name(cfg, kind, targets)
    out_dim = len(classes) if kind == "classification" else 1
    # distinct weight spaces (architectures that differ only in activation share one)
    archs = len(
        {
            json.dumps(zoo.spec(i).to_dict(), sort_keys=True)
            for i in {zoo.records[j]["arch_id"]: j for j in idx}.values()
        }
    )
    device = torch.device(cfg.device)

    torch.manual_seed(cfg.seed)
    example = zoo.state_dict(tr[0])
    net = make_metanet(cfg.model, example, zoo.spec(tr[0]), out_dim, archs=archs, **cfg.model_args)
    if cfg.amp:
        net.amp = getattr(torch, cfg.amp)
    t_feat = time.perf_counter()
    feats: dict[int, Any] = {}
    for i in tr + va + te:
        try:
            feats[i] = net.featurize(zoo.state_dict(i), zoo.spec(i))
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"zoo record {zoo.records[i]['id']}: {e}") from None
    t_feat = time.perf_counter() - t_feat
    norm = getattr(net, "norm", None)
    if norm is not None and hasattr(norm, "fit"):
        norm.fit(net.collate([feats[i] for i in tr]).float())
    net.to(device)

    model: torch.nn.Module = net
    if cfg.compile:
        model = torch.compile(net, dynamic=True)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    partial = out.with_name(out.name + ".partial")
    state_file = partial / "train_state.pt"
    digest = cfg.digest() + ":" + zoo.digest
    start, best_val, bad, best_state, history = 0, math.inf, 0, None, []
    if state_file.exists():
        st = torch.load(state_file, weights_only=True, map_location="cpu")
        if st.get("digest") == digest and st.get("world") == world:
            net.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            start, best_val, bad = int(st["epoch"]), float(st["best_val"]), int(st["bad"])
            best_state, history = st["best_state"], json.loads(st["history"])
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=True)

    def batches(ids: Sequence[int], bs: int) -> list[list[int]]:
        out = [list(ids[i : i + bs]) for i in range(0, len(ids), bs)]
        # a short last batch joins the previous one (so every process of a data-parallel run gets a share)
        if len(out) > 1 and len(out[-1]) < min(8, bs):
            last = out.pop()
            out[-1] += last
        return out

    def evaluate(ids: Sequence[int]) -> tuple[float, torch.Tensor]:
        net.eval()
        losses, preds = [], []
        with torch.no_grad():
            for b in batches(ids, max(cfg.batch_size, 64)):
                o = net(to_device(net.collate([feats[i] for i in b]), device))
                yt = _ytensor(b)
                losses.append(float(_loss(o, yt, how, reduction="sum")))
                preds.append(_read(o, how).float().cpu())
        net.train()
        return sum(losses) / len(ids), torch.cat(preds)

    def _ytensor(b: Sequence[int]) -> torch.Tensor:
        ys = [y_of[i] for i in b]
        return torch.tensor(ys, dtype=torch.float32 if kind == "regression" else torch.long, device=device)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=start, unit="epoch", desc=f"train {cfg.model}")
    net.train()
    epoch = start
    for epoch in range(start, cfg.epochs):
        if bad >= cfg.patience:
            break
        order = list(tr)
        random.Random(f"weightsmith-train:{cfg.seed}:{epoch}").shuffle(order)
        t0 = time.perf_counter()
        total, seen = 0.0, 0
        for gb in batches(order, cfg.batch_size):
            mine = gb[rank::world]
            if not mine:
                raise InvalidArgumentError(f"a batch of {len(gb)} cannot be shared by {world} processes; lower nproc")
            opt.zero_grad(set_to_none=True)
            o = model(to_device(net.collate([feats[i] for i in mine]), device))
            # Σ over my share / global batch size × world: DDP's mean over processes = the global mean
            loss = _loss(o, _ytensor(mine), how, reduction="sum") * (world / len(gb))
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(gb) / world
            seen += len(gb)
        dt = time.perf_counter() - t0
        val_loss, _ = evaluate(va)
        improved = val_loss < best_val - 1e-9
        if improved:
            best_val, bad = val_loss, 0
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
        row = {"epoch": epoch + 1, "train_loss": total / max(1, seen), "val_loss": val_loss, "seconds": dt,
               "graphs_per_s": len(tr) / dt if dt > 0 else 0.0}  # fmt: skip
        history.append(row)
        if log is not None and rank == 0:
            log(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(val=f"{val_loss:.4f}", best=f"{best_val:.4f}")
        if rank == 0:
            snapshot = {"digest": digest, "world": world, "model": net.state_dict(), "opt": opt.state_dict(),
                        "epoch": epoch + 1, "best_val": best_val, "bad": bad, "best_state": best_state,
                        "history": json.dumps(history)}  # fmt: skip
            replace_file(state_file, functools.partial(_torch_save, snapshot))
        if stop_after_epochs is not None and epoch + 1 - start >= stop_after_epochs:
            if bar is not None:
                bar.close()
            return None
    if bar is not None:
        bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    _, pred = evaluate(te)
    truth = [y_of[i] for i in te]
    if kind == "regression":
        metrics = regression_metrics(pred.tolist(), truth)
    else:
        metrics = {"accuracy": float((pred.argmax(1) == torch.tensor(truth)).float().mean())}
    _, vpred = evaluate(va)
    if kind == "regression":
        metrics.update(
            {f"val_{k}": v for k, v in regression_metrics(vpred.tolist(), [y_of[i] for i in va]).items()}
        )
    metrics.update({"test_records": len(te), "train_records": len(tr), "val_records": len(va),
                    "featurize_seconds": t_feat})  # fmt: skip
    collapsed = collapse_warning(metrics, len(tr)) if kind == "regression" else None
    card = {
        "format": CARD_FORMAT,
        "version": 1,
        "class": type(net).__name__,
        "model": cfg.model,
        "config": net.config(),
        "input_kind": net.input_kind,
        "target": {"name": cfg.target, "kind": kind, "loss": how, "classes": classes},
        "zoo": {"path": str(zoo.path), "sha256": zoo.digest, "records": len(idx), "architectures": archs},
        "split": {"train_runs": sorted({zoo.records[i]["run"] for i in tr}), "val": len(va), "test": len(te)},
        "train": {**asdict(cfg), "world_size": world},
        "metrics": metrics,
        "history": history,
        "test_predictions": {"ids": [zoo.records[i]["id"] for i in te], "pred": pred.tolist(), "true": truth},
        "warnings": [collapsed] if collapsed else [],
    }
    if rank == 0:
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
            str(partial / "metanet.safetensors"),
        )
        (partial / "card.json").write_text(json.dumps(card, indent=1, default=str))
        state_file.unlink(missing_ok=True)
        write_marker(partial, "metanet train")
        publish(partial, out, overwrite=overwrite)
    return TrainResult(out, metrics, history, card)


# ---------------------------------------------------------------------------------------------
# using a trained metanet
# ---------------------------------------------------------------------------------------------


def load_metanet(path: str | Path, *, device: str = "cpu") -> tuple[Metanet, dict[str, Any]]:
    """A trained metanet and its card; errors name the folder and what is wrong."""
    from safetensors.torch import load_file

    p = Path(path)
    try:
        card = json.loads((p / "card.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"'{p}' is not a metanet folder (no card.json)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"metanet '{p}': card.json is unreadable ({e})") from None
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"metanet '{p}': card.json is not a weightsmith metanet card")
    cls = _metanet_class(card["class"])
    net = cls(**card["config"])
    try:
        state = load_file(str(p / "metanet.safetensors"))
    except FileNotFoundError:
        raise CheckpointError(f"metanet '{p}': metanet.safetensors is missing") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"metanet '{p}': metanet.safetensors is unreadable ({e})") from None
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"metanet '{p}': weights do not fit its card ({str(e).splitlines()[1].strip()})"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"metanet '{p}': weights do not fit its card (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    net.eval().to(device)
    return net, card


def _read_checkpoint(
    ref: str | Path | Mapping[str, torch.Tensor], resolver: Any = None
) -> tuple[str, dict[str, torch.Tensor]]:
    from merge.checkpoint import open_checkpoint, require_finite

    if isinstance(ref, Mapping):
        return "<state dict>", {k: require_finite(v, "state dict", k) for k, v in ref.items()}
    from merge.hub import HubResolver

    resolved = (resolver or HubResolver(progress=False))(str(ref))
    ck = open_checkpoint(resolved.path)
    try:
        return str(ref), {k: require_finite(ck[k], str(ref), k) for k in ck}
    finally:
        ck.close()


def _samples(
    net: Metanet, refs: Sequence[Any], spec: PermutationSpec | None, resolver: Any
) -> Iterator[tuple[str, Any]]:
    """``(name, featurized sample)`` per checkpoint, reading one checkpoint at a time (its state dict
    is dropped once featurized)."""
    for ref in refs:
        name, state = _read_checkpoint(ref, resolver)
        try:
            s = spec or auto_spec(state, name=name)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{name}: {e}") from None
        try:
            sample = net.featurize(state, s)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{name}: the metanet cannot read this checkpoint: {e}") from None
        del state
        yield name, sample


def _batched(
    net: Metanet, refs: Sequence[Any], spec: PermutationSpec | None, resolver: Any, batch_size: int, embed: bool
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """The metanet (or its embedding) on ``batch_size`` checkpoints at a time: names and outputs (CPU)."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    names: list[str] = []
    samples: list[Any] = []

    def run() -> tuple[list[str], torch.Tensor]:
        batch = to_device(net.collate(samples), net.device)
        with torch.no_grad():
            out = net.embed(batch) if embed else net(batch)
        return list(names), out

    for name, sample in _samples(net, refs, spec, resolver):
        names.append(name)
        samples.append(sample)
        if len(samples) == batch_size:
            yield run()
            names.clear()
            samples.clear()
    if samples:
        yield run()


def predict(
    metanet: str | Path | tuple[Metanet, dict[str, Any]],
    checkpoints: Sequence[Any],
    *,
    spec: PermutationSpec | None = None,
    resolver: Any = None,
    device: str = "cpu",
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Run a trained metanet on checkpoints (paths, Hub ids or state dicts): one result per checkpoint.

    Checkpoints are read one at a time and run ``batch_size`` at a time (one collated batch)."""
    net, card = load_metanet(metanet, device=device) if not isinstance(metanet, tuple) else metanet
    how, classes = card["target"]["loss"], card["target"]["classes"]
    results = []
    for names, out in _batched(net, checkpoints, spec, resolver, batch_size, embed=False):
        for name, r in zip(names, _read(out, how).float().cpu(), strict=True):
            res: dict[str, Any] = {"checkpoint": name, "target": card["target"]["name"]}
            if card["target"]["kind"] == "regression":
                res["prediction"] = float(r)
            else:
                res["prediction"] = classes[int(r.argmax())]
                res["probabilities"] = {
                    json.dumps(c) if not isinstance(c, str) else c: float(p)
                    for c, p in zip(classes, r, strict=True)
                }
            results.append(res)
    return results


def embed(
    metanet: str | Path | tuple[Metanet, dict[str, Any]],
    checkpoints: Sequence[Any],
    *,
    spec: PermutationSpec | None = None,
    resolver: Any = None,
    device: str = "cpu",
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Invariant embeddings of checkpoints (for search and clustering): ``{"checkpoint", "embedding"}``;
    read one at a time, run ``batch_size`` at a time."""
    net, _card = load_metanet(metanet, device=device) if not isinstance(metanet, tuple) else metanet
    out = []
    for names, z in _batched(net, checkpoints, spec, resolver, batch_size, embed=True):
        out += [{"checkpoint": n, "embedding": row.float().cpu().tolist()} for n, row in zip(names, z, strict=True)]
    return out



def _torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, path)
