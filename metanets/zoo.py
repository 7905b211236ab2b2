"""Seeded, resumable model zoos: hundreds to thousands of small trained networks with their metadata.

A zoo is a folder built from a config (YAML or JSON; :class:`ZooConfig`)::

    ZOO/zoo.json          the config, its hash and (when finished) the counts
    ZOO/specs/<arch>.json the PermutationSpec of each architecture (inferred by torch.fx, checked)
    ZOO/models/r00042-e005.safetensors   run 42 after 5 epochs (metadata in the file too)
    ZOO/runs/r00042.json  run 42's record (written last, atomically: a run is done when it exists)
    ZOO/index.jsonl       one line per checkpoint, ordered by run and epoch (written when all runs are)

Run ``i`` draws its task, architecture and hyperparameters from a generator seeded by ``(seed, i)`` and
trains with one thread, so a run's bytes do not depend on which worker ran it, in what order or on how
many machines: a killed build resumes (the finished runs are kept, the rest redone) and yields the same
zoo byte for byte, and a Dask cluster builds the same zoo as local processes (both tested). Splits are
by run (:meth:`Zoo.split`), never by checkpoint, so no run's checkpoints land on both sides. The
recipe follows Unterthiner et al. 2020 (small CNN zoo: varied hyperparameters, checkpoints along
training) on sklearn's digits (research note metanets.md §4).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from merge.atomic import replace_file
from merge.errors import CheckpointError, InvalidArgumentError
from merge.symmetry import PermutationSpec
from metanets.zoo_models import TASKS, arch_id, build_model

__all__ = ["Zoo", "ZooConfig", "ZooDataset", "build_zoo", "load_zoo_config", "plan_runs"]

FORMAT = "weightsmith.zoo"
Sampler = Any  # a scalar, a list (choice) or {"uniform"|"log_uniform"|"int": [lo, hi]}


class ArchFamily(BaseModel):
    """One architecture family; every other key is a scalar or a list to choose from."""

    model_config = ConfigDict(extra="allow")
    kind: str
    weight: float = 1.0

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in ("mlp", "cnn"):
            raise ValueError(f"unknown architecture kind '{v}' (mlp, cnn)")
        return v


class ZooConfig(BaseModel):
    """What a zoo holds (see the module docstring for the sampler syntax)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "zoo"
    seed: int = 0
    runs: int = Field(gt=0, le=1_000_000)
    data_seed: int = 0
    tasks: list[str] = ["digits"]
    checkpoints: list[int] = [1, 2, 5, 10, 20]
    architectures: list[ArchFamily] = Field(min_length=1)
    hparams: dict[str, Any] = {}

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TASKS]
        if bad or not v:
            raise ValueError(f"unknown task(s) {bad or v} (known: {', '.join(TASKS)})")
        return v

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


_DEFAULT_HPARAMS: dict[str, Any] = {
    "lr": {"log_uniform": [3e-4, 5e-2]},
    "weight_decay": {"log_uniform": [1e-6, 1e-2]},
    "init_scale": {"uniform": [0.3, 2.0]},
    "train_fraction": {"uniform": [0.05, 1.0]},
    "label_noise": {"uniform": [0.0, 0.6]},
    "epochs": {"int": [2, 20]},
    "batch_size": 32,
}


def load_zoo_config(path_or_dict: str | Path | Mapping[str, Any]) -> ZooConfig:
    """Parse and validate a zoo config (YAML/JSON file or dict); errors name the file and the field."""
    where = "zoo config"
    if isinstance(path_or_dict, Mapping):
        data: Any = dict(path_or_dict)
    else:
        p = Path(path_or_dict)
        where = str(p)
        try:
            data = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise InvalidArgumentError(f"zoo config '{p}' does not exist") from None
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgumentError(f"zoo config '{p}' is not readable YAML/JSON: {e}") from None
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(f"{where}: expected a mapping at the top level")
    try:
        cfg = ZooConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise InvalidArgumentError(f"{where}: {loc}: {err['msg']}") from None
    for k, v in cfg.hparams.items():
        _check_sampler(f"{where}: hparams.{k}", v)
    return cfg


def _check_sampler(where: str, v: Sampler) -> None:
    if isinstance(v, Mapping):
        if len(v) != 1 or next(iter(v)) not in ("uniform", "log_uniform", "int"):
            raise InvalidArgumentError(f"{where}: a sampler is {{uniform|log_uniform|int: [lo, hi]}}, got {dict(v)}")
        lo_hi = next(iter(v.values()))
        if not (isinstance(lo_hi, list | tuple) and len(lo_hi) == 2 and float(lo_hi[0]) <= float(lo_hi[1])):
            raise InvalidArgumentError(f"{where}: bounds must be [lo, hi] with lo <= hi, got {lo_hi}")
        if "log_uniform" in v and float(lo_hi[0]) <= 0:
            raise InvalidArgumentError(f"{where}: log_uniform bounds must be positive")


def _sample(rng: random.Random, v: Sampler) -> Any:
    if isinstance(v, Mapping):
        ((how, (lo, hi)),) = v.items()
        if how == "uniform":
            return rng.uniform(float(lo), float(hi))
        if how == "log_uniform":
            import math

            return math.exp(rng.uniform(math.log(float(lo)), math.log(float(hi))))
        return rng.randint(int(lo), int(hi))
    if isinstance(v, list):
        return v[rng.randrange(len(v))]
    return v


def plan_runs(cfg: ZooConfig) -> list[dict[str, Any]]:
    """Every run's task, architecture, hyperparameters and training seed (deterministic)."""
    hp = {**_DEFAULT_HPARAMS, **cfg.hparams}
    fams = cfg.architectures
    weights = [f.weight for f in fams]
    plans = []
    for i in range(cfg.runs):
        rng = random.Random(f"weightsmith-zoo:{cfg.seed}:{i}")
        task = cfg.tasks[rng.randrange(len(cfg.tasks))]
        fam = rng.choices(fams, weights=weights)[0]
        extra = {k: v for k, v in fam.model_dump().items() if k not in ("kind", "weight")}
        arch: dict[str, Any] = {"kind": fam.kind}
        for k in sorted(extra):
            arch[k] = _sample(rng, extra[k])
        if arch["kind"] == "cnn" and "channels" not in arch:  # `layers` convs of `width` channels
            arch["channels"] = [int(arch.pop("width", 8))] * int(arch.pop("layers", 2))
        hparams = {k: _sample(rng, hp[k]) for k in sorted(hp)}
        plans.append(
            {
                "run": i,
                "task": task,
                "arch": arch,
                "arch_id": arch_id(arch),
                "hparams": hparams,
                "seed": rng.randrange(2**31),
                "checkpoints": list(cfg.checkpoints),
                "data_seed": cfg.data_seed,
            }
        )
    return plans


def _expected_checkpoints(plan: Mapping[str, Any]) -> int:
    e = int(plan["hparams"]["epochs"])
    return len({c for c in plan["checkpoints"] if c <= e} | {e})


def _model_name(run: int, epoch: int) -> str:
    return f"r{run:05d}-e{epoch:03d}"


def execute_run(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Train one run (one thread) and return its records and the bytes of its checkpoint files.

    Runs in a worker process or on a Dask worker; writes nothing (the builder writes, atomically), so it
    needs no shared file system.
    """
    from safetensors.torch import save

    from metanets.zoo_models import train_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        ckpts = train_run(
            plan["arch"], plan["hparams"], plan["task"], seed=int(plan["seed"]), checkpoints=list(plan["checkpoints"]),
            data_seed=int(plan["data_seed"]),
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    records, files = [], {}
    prev = None
    for c in ckpts:
        mid = _model_name(plan["run"], c["epoch"])
        meta = {
            "id": mid,
            "run": plan["run"],
            "epoch": c["epoch"],
            "task": plan["task"],
            "arch": plan["arch"],
            "arch_id": plan["arch_id"],
            "hparams": plan["hparams"],
            "seed": plan["seed"],
            "train_acc": round(c["train_acc"], 6),
            "test_acc": round(c["test_acc"], 6),
            "test_loss": round(c["test_loss"], 6),
            "n_params": sum(v.numel() for v in c["state"].values() if v.is_floating_point()),
            "diverged": bool(c.get("diverged", False)),
            "lineage": {"run": plan["run"], "epoch": c["epoch"], "previous": prev},
        }
        blob = save(c["state"], metadata={FORMAT: json.dumps(meta, sort_keys=True)})
        meta["file"] = f"models/{mid}.safetensors"
        meta["sha256"] = hashlib.sha256(blob).hexdigest()
        files[meta["file"]] = blob
        records.append(meta)
        prev = mid
    return {"run": plan["run"], "records": records, "files": files, "seconds": seconds}


def _atomic_write(path: Path, data: bytes) -> None:
    replace_file(path, lambda tmp: tmp.write_bytes(data))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


@dataclass
class BuildSummary:
    path: Path
    runs: int
    models: int
    built_runs: int
    seconds: float
    models_per_s: float
    complete: bool
    executor: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}


def _store_run(out: Path, result: Mapping[str, Any]) -> None:
    for rel, blob in result["files"].items():
        _atomic_write(out / rel, blob)
    _atomic_write(out / "runs" / f"r{result['run']:05d}.json", _json_bytes(result["records"]))


def build_zoo(
    config: ZooConfig | str | Path | Mapping[str, Any],
    out: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_run: Callable[[int], None] | None = None,
) -> BuildSummary:
    """Build (or resume) the zoo of ``config`` in ``out``.

    ``workers`` local processes (default: the CPU count, at most 8; ``1`` trains in this process), or
    with ``scheduler="tcp://HOST:PORT"`` the runs go to that Dask distributed cluster
    (``pip install weightsmith[dask]``). A folder that already holds a zoo of the same config is resumed;
    one of another config is refused. ``stop_after`` builds at most that many runs this call (the zoo stays
    resumable).
    """
    cfg = config if isinstance(config, ZooConfig) else load_zoo_config(config)
    out = Path(out)
    head = out / "zoo.json"
    digest = cfg.digest()
    if head.exists():
        try:
            old = json.loads(head.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"zoo '{out}': zoo.json is unreadable ({e})") from None
        if old.get("config_sha256") != digest:
            raise InvalidArgumentError(
                f"'{out}' holds a zoo of another config (config hash differs); use a new folder"
            )
    elif out.exists() and any(out.iterdir()):
        raise InvalidArgumentError(f"'{out}' exists and is not a zoo; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        head,
        _json_bytes({"format": FORMAT, "version": 1, "config": cfg.model_dump(), "config_sha256": digest}),
    )
    for stray in list(out.rglob(".*.partial-*")):
        stray.unlink(missing_ok=True)

    plans = plan_runs(cfg)
    _write_specs(out, plans)
    done = {int(p.stem[1:]) for p in (out / "runs").glob("r*.json")} if (out / "runs").exists() else set()
    pending = [p for p in plans if p["run"] not in done]
    if stop_after is not None:
        pending = pending[: max(0, stop_after)]
    total_models = sum(_expected_checkpoints(p) for p in plans)
    done_models = sum(_expected_checkpoints(p) for p in plans if p["run"] in done)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_models, initial=done_models, unit="model", desc=f"zoo {cfg.name}", smoothing=0.1
        )
    t0 = time.perf_counter()
    built = 0

    def finished(res: Mapping[str, Any]) -> None:
        nonlocal built
        _store_run(out, res)
        built += 1
        if bar is not None:
            bar.update(len(res["records"]))
        if on_run is not None:
            on_run(res["run"])

    executor = "inline"
    if scheduler:
        executor = f"dask {scheduler}"
        _run_dask(scheduler, pending, finished)
    else:
        n = workers if workers is not None else min(8, os.cpu_count() or 1)
        if n <= 1 or len(pending) <= 1:
            for p in pending:
                finished(execute_run(p))
        else:
            executor = f"{n} processes"
            _run_local(n, pending, finished)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    done = {int(p.stem[1:]) for p in (out / "runs").glob("r*.json")} if (out / "runs").exists() else set()
    complete = len(done) == len(plans)
    n_models = 0
    if complete:
        lines = []
        for i in range(len(plans)):
            recs = json.loads((out / "runs" / f"r{i:05d}.json").read_text())
            lines += [json.dumps(r, sort_keys=True) for r in recs]
        n_models = len(lines)
        _atomic_write(out / "index.jsonl", ("\n".join(lines) + "\n").encode())
        _atomic_write(
            head,
            _json_bytes(
                {
                    "format": FORMAT,
                    "version": 1,
                    "config": cfg.model_dump(),
                    "config_sha256": digest,
                    "complete": True,
                    "runs": len(plans),
                    "models": n_models,
                    "architectures": len({p["arch_id"] for p in plans}),
                }
            ),
        )
    return BuildSummary(
        out, len(plans), n_models, built, seconds,
        sum(_expected_checkpoints(p) for p in pending) / seconds if seconds > 0 and built else 0.0, complete, executor,
    )  # fmt: skip


def _write_specs(out: Path, plans: Sequence[Mapping[str, Any]]) -> None:
    from merge.symmetry import infer_spec

    seen: dict[str, Mapping[str, Any]] = {}
    for p in plans:
        seen.setdefault(p["arch_id"], p["arch"])
    for aid, arch in seen.items():
        path = out / "specs" / f"{aid}.json"
        if path.exists():
            continue
        torch.manual_seed(0)
        model = build_model(arch).eval()
        spec = infer_spec(model, torch.rand(3, 64))
        _atomic_write(path, _json_bytes({"arch": dict(arch), "spec": spec.to_dict()}))


def _run_local(
    n: int, pending: Sequence[Mapping[str, Any]], finished: Callable[[Mapping[str, Any]], None]
) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as ex:
        it = iter(pending)
        running = set()
        try:
            for p in it:  # keep at most 2n runs in flight so a kill loses little
                running.add(ex.submit(execute_run, p))
                if len(running) >= 2 * n:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        finished(f.result())
            for f in list(running):
                finished(f.result())
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise


def _run_dask(
    address: str, pending: Sequence[Mapping[str, Any]], finished: Callable[[Mapping[str, Any]], None]
) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise InvalidArgumentError("--scheduler needs Dask distributed: pip install 'weightsmith[dask]'") from None
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError) as e:
        raise InvalidArgumentError(f"cannot reach the Dask scheduler at {address}: {e}") from None
    try:
        futures = client.map(execute_run, list(pending), pure=False)
        for fut in as_completed(futures):
            finished(fut.result())
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# Reading a zoo
# ---------------------------------------------------------------------------------------------


class Zoo:
    """A finished zoo, read lazily: records from ``index.jsonl``, tensors on demand (hash-checked)."""

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        head = self.path / "zoo.json"
        if not head.exists():
            raise CheckpointError(f"'{self.path}' is not a zoo (no zoo.json)")
        try:
            self.meta = json.loads(head.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"zoo '{self.path}': zoo.json is unreadable ({e})") from None
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"zoo '{self.path}': zoo.json is not a weightsmith zoo")
        index = self.path / "index.jsonl"
        if not self.meta.get("complete") or not index.exists():
            n = len(list((self.path / "runs").glob("r*.json"))) if (self.path / "runs").exists() else 0
            raise CheckpointError(
                f"zoo '{self.path}' is incomplete ({n} of {self.meta.get('config', {}).get('runs', '?')} runs); "
                "resume it with `weightsmith zoo build CONFIG -o ZOO`"
            )
        self.records: list[dict[str, Any]] = []
        for i, line in enumerate(index.read_text().splitlines()):
            try:
                self.records.append(json.loads(line))
            except ValueError:
                raise CheckpointError(f"zoo '{self.path}': index.jsonl line {i + 1} is not JSON") from None
        self._specs: dict[str, PermutationSpec] = {}

    def __len__(self) -> int:
        return len(self.records)

    @cached_property
    def digest(self) -> str:
        """sha256 of ``index.jsonl`` (which holds every file's sha256): the zoo's identity."""
        return hashlib.sha256((self.path / "index.jsonl").read_bytes()).hexdigest()

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """The tensors of record ``i``; a missing or changed file is an error naming it."""
        from safetensors.torch import load

        rec = self.records[i]
        f = self.path / rec["file"]
        try:
            blob = f.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"zoo '{self.path}': model file '{rec['file']}' (record {rec['id']}) is missing"
            ) from None
        if self.verify and hashlib.sha256(blob).hexdigest() != rec["sha256"]:
            raise CheckpointError(
                f"zoo '{self.path}': model file '{rec['file']}' (record {rec['id']}) does not match its sha256 "
                "in index.jsonl (changed or corrupt)"
            )
        try:
            return load(blob)
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
            raise CheckpointError(
                f"zoo '{self.path}': model file '{rec['file']}' is not readable ({e})"
            ) from None

    def spec(self, i: int) -> PermutationSpec:
        aid = self.records[i]["arch_id"]
        if aid not in self._specs:
            p = self.path / "specs" / f"{aid}.json"
            try:
                d = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    f"zoo '{self.path}': spec file 'specs/{aid}.json' is unreadable ({e})"
                ) from None
            self._specs[aid] = PermutationSpec.from_dict(d["spec"], where=str(p))
        return self._specs[aid]

    def field(self, name: str) -> list[Any]:
        """A metadata field of every record (``test_acc``, ``task``, ``arch.kind``, ``hparams.lr``...)."""
        out = []
        for r in self.records:
            v: Any = r
            for part in name.split("."):
                if not isinstance(v, Mapping) or part not in v:
                    raise InvalidArgumentError(f"zoo '{self.path}': records have no field '{name}'")
                v = v[part]
            out.append(v)
        return out

    def split(
        self,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        *,
        seed: int = 0,
        subset: Iterable[int] | None = None,
    ) -> list[list[int]]:
        """Record indices split by **run** (all checkpoints of a run on one side), seeded."""
        fractions = list(fractions)
        if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
            raise InvalidArgumentError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
        idx = list(range(len(self.records))) if subset is None else list(subset)
        runs = sorted({self.records[i]["run"] for i in idx})
        rng = random.Random(f"weightsmith-split:{seed}")
        rng.shuffle(runs)
        # runs per side by rounding, every side with a positive fraction getting at least one run
        n = len(runs)
        counts = [round(f * n) for f in fractions]
        if n >= sum(1 for f in fractions if f > 0):
            counts = [max(1, c) if f > 0 else 0 for c, f in zip(counts, fractions, strict=True)]
        while sum(counts) > n:
            counts[counts.index(max(counts))] -= 1
        while sum(counts) < n:
            counts[fractions.index(max(fractions))] += 1
        bounds, acc = [], 0
        for c in counts:
            acc += c
            bounds.append(acc)
        side: dict[int, int] = {}
        lo = 0
        for k, hi in enumerate(bounds):
            for r in runs[lo:hi]:
                side[r] = k
            lo = hi
        out: list[list[int]] = [[] for _ in fractions]
        for i in idx:
            out[side[self.records[i]["run"]]].append(i)
        return out

    def summary(self) -> dict[str, Any]:
        accs = [r["test_acc"] for r in self.records]
        tasks = sorted({r["task"] for r in self.records})
        hist = [0] * 10
        for a in accs:
            hist[min(9, int(a * 10))] += 1
        return {
            "path": str(self.path),
            "name": self.meta["config"]["name"],
            "runs": self.meta["runs"],
            "models": len(self.records),
            "architectures": self.meta["architectures"],
            "tasks": tasks,
            "kinds": sorted({r["arch"]["kind"] for r in self.records}),
            "test_acc": {
                "mean": sum(accs) / len(accs),
                "min": min(accs),
                "max": max(accs),
                "histogram_0.1": hist,
            },
            "sha256": self.digest,
        }


class ZooDataset(torch.utils.data.Dataset):
    """A ``torch`` Dataset over (a subset of) a zoo's records, read lazily.

    Item ``k`` is ``(state_dict, spec, record)`` for record ``indices[k]``, or ``transform(state, spec,
    record)`` (for example ``metanet.featurize``-based) when a transform is given. Tensors are loaded and
    hash-checked on access, so a zoo larger than memory can be iterated.
    """

    def __init__(
        self,
        zoo: Zoo | str | Path,
        indices: Sequence[int] | None = None,
        transform: Callable[[dict[str, torch.Tensor], PermutationSpec, dict[str, Any]], Any] | None = None,
    ) -> None:
        self.zoo = zoo if isinstance(zoo, Zoo) else Zoo(zoo)
        self.indices = list(range(len(self.zoo))) if indices is None else list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Any:
        i = self.indices[k]
        state, spec, rec = self.zoo.state_dict(i), self.zoo.spec(i), self.zoo.records[i]
        return self.transform(state, spec, rec) if self.transform is not None else (state, spec, rec)
