"""The "zoo" and "train" job kinds: ``metanets.zoo.build_zoo`` and ``metanets.train.train_metanet``.

Both are long and resumable in the library, and stay so as jobs: a zoo keeps every finished run
(``runs/r*.json``) and a build of the same config into the same folder resumes; a training keeps its
state after every epoch in ``<out>.partial/`` and a run of the same config resumes there, the metanet
appearing at ``<out>`` only when training has finished (one rename). So an *interrupted* attempt (the
server died or shut down) keeps what it did and ``RetryJob`` (or ``--resume-interrupted``) resumes it;
a *cancelled* or *failed* training removes its ``.partial`` (nothing is left), a cancelled zoo build
keeps its finished runs (creating the job again resumes them). Progress is one event per zoo run /
training epoch (with the epoch's losses as metrics); cancellation lands at the next run / epoch.

A trained metanet is named ``metanets/<id>``, the id of the job that trained it; by default it is
stored in ``data-dir/metanets/<id>``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge.errors import CheckpointError, InvalidArgumentError
from service.jobs.kind import CANCELLED, FAILED, JobKind, WorkerContext, register

if TYPE_CHECKING:
    from service.jobs.manager import JobManager, Submission
    from service.jobs.store import JobRecord

TRAIN_FIELDS = (
    "model", "target", "epochs", "batch_size", "lr", "weight_decay", "patience", "split", "split_seed",
    "train_fraction", "where", "seed", "model_args",
)  # fmt: skip


# -- zoo ----------------------------------------------------------------------------------------------
async def admit_zoo(manager: JobManager, req: dict[str, Any], job_id: str) -> Submission:
    """Check a zoo request: the config (metanets.zoo.load_zoo_config), the folder (new, empty, or a
    zoo of the same config to resume)."""
    from metanets.zoo import load_zoo_config, plan_runs
    from service.jobs.manager import Submission
    from service.jobs.store import ServiceError

    cfg = load_zoo_config(req["config"])
    out = manager.output_folder(req["output_path"], True, job_id, [], resumes=True)
    head = out / "zoo.json"
    if head.exists():
        try:
            old = json.loads(head.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("config_sha256") != cfg.digest():
            raise ServiceError(
                "ALREADY_EXISTS",
                f"output_path: {out} holds a zoo of another config; use a new folder",
                "output_path",
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ServiceError("ALREADY_EXISTS", f"output_path: {out} exists and is not a zoo", "output_path")
    workers = int(req.get("workers") or 1)
    if not 1 <= workers <= 16:
        raise ServiceError("INVALID_ARGUMENT", f"workers: {workers} (must be 0..16)", "workers")
    runs = len(plan_runs(cfg))
    return Submission(
        kind="zoo",
        spec={"config": cfg.model_dump(mode="json"), "output_path": req["output_path"], "workers": workers},
        summary=f"zoo {cfg.name}: {runs} runs",
        output_path=out,
        overwrite=True,
        est_bytes=workers * (256 << 20),
        progress={"steps_total": runs, "unit": "run"},
    )


def run_zoo(ctx: WorkerContext) -> dict[str, Any]:
    from metanets.zoo import Zoo, build_zoo, load_zoo_config, plan_runs

    cfg = load_zoo_config(ctx.spec["config"])
    total = len(plan_runs(cfg))
    out = Path(str(ctx.output_path))
    runs = out / "runs"
    ctx.progress(phase="building", steps_done=len(list(runs.glob("r*.json"))) if runs.exists() else 0,
                 steps_total=total, unit="run")  # fmt: skip

    def on_run(run: int) -> None:
        done = len(list(runs.glob("r*.json")))
        ctx.progress(force=True, phase="building", steps_done=done, current=f"run {run}")
        ctx.step()  # --slow-down, then stop here if cancelled (finished runs are kept)

    s = build_zoo(cfg, out, workers=ctx.spec["workers"], progress=False, on_run=on_run)
    if not s.complete:
        raise CheckpointError(f"zoo {out}: built {s.built_runs} runs but the zoo is incomplete")
    return {
        "out_dir": str(out),
        "runs": s.runs,
        "models": s.models,
        "built_runs": s.built_runs,
        "seconds": s.seconds,
        "complete": s.complete,
        "summary": Zoo(out).summary(),
    }


def cleanup_zoo(rec: JobRecord, why: str) -> None:
    """A zoo keeps its finished runs in every case (a build of the same config resumes them)."""
    for stray in Path(rec.output_path).rglob(".*.partial-*") if Path(rec.output_path).is_dir() else []:
        stray.unlink(missing_ok=True)


# -- train --------------------------------------------------------------------------------------------
def resolve_zoo(manager: JobManager, ref: str, field: str = "zoo") -> Path:
    """A finished zoo: a folder under a root or ``job://<id>`` of a zoo job."""
    from metanets.zoo import Zoo

    path = Path(manager.resolver()(ref, field).path)
    Zoo(path, verify=False)  # CheckpointError (INVALID_ARGUMENT) when it is not a complete zoo
    return path


def train_config(req: dict[str, Any], device: str) -> Any:
    from metanets.train import METANETS, TrainConfig
    from service.jobs.store import ServiceError

    kw: dict[str, Any] = {k: req[k] for k in TRAIN_FIELDS if req.get(k) not in (None, "", [], {}, 0, 0.0)}
    for k in ("where", "model_args"):  # protobuf Structs carry every number as a double
        if k in kw:
            kw[k] = {n: int(v) if isinstance(v, float) and v.is_integer() else v for n, v in kw[k].items()}
    if req.get("target_kind"):
        kw["kind"] = req["target_kind"]
    if "split" in kw:
        if len(kw["split"]) != 3:
            raise ServiceError("INVALID_ARGUMENT", "split: give three fractions (train, val, test)", "split")
        kw["split"] = tuple(float(x) for x in kw["split"])
    for k in ("epochs", "batch_size", "patience", "split_seed", "seed"):
        if k in kw:
            kw[k] = int(kw[k])
    model = kw.get("model", "gmn")
    if model not in METANETS:
        raise ServiceError(
            "INVALID_ARGUMENT", f"model: unknown metanet {model!r} (known: {', '.join(METANETS)})", "model"
        )
    if kw.get("kind", "auto") not in ("auto", "regression", "classification"):
        raise ServiceError(
            "INVALID_ARGUMENT", "target_kind: regression, classification or empty", "target_kind"
        )
    if not 1 <= kw.get("epochs", 1) <= 100_000 or not 1 <= kw.get("batch_size", 1) <= 1 << 16:
        raise ServiceError("INVALID_ARGUMENT", "epochs and batch_size must be positive", "epochs")
    try:
        return TrainConfig(**kw, device=device)
    except TypeError as e:
        raise ServiceError("INVALID_ARGUMENT", f"training config: {e}") from None


async def admit_train(manager: JobManager, req: dict[str, Any], job_id: str) -> Submission:
    """Check a training request: the zoo (complete, inside the roots), the config, the output."""
    from metanets.train import split_records
    from metanets.zoo import Zoo
    from service.jobs.manager import JOB_SCHEME, Submission
    from service.jobs.store import ServiceError

    if not req.get("zoo"):
        raise ServiceError("INVALID_ARGUMENT", "zoo: a zoo reference is required", "zoo")
    zoo = await asyncio.to_thread(resolve_zoo, manager, req["zoo"])
    cfg = train_config(req, manager.config.device)
    try:
        split_records(Zoo(zoo, verify=False), cfg)  # an empty selection or split fails here, not in the job
    except (InvalidArgumentError, ValueError) as e:
        raise ServiceError("INVALID_ARGUMENT", f"training config: {e}") from None
    out_text = req.get("output_path") or ""
    if out_text:
        out = manager.output_folder(out_text, False, job_id, [zoo])
    else:
        out = manager.config.data_dir / "metanets" / job_id
    refs = {req["zoo"][len(JOB_SCHEME) :]: str(zoo)} if req["zoo"].startswith(JOB_SCHEME) else {}
    from dataclasses import asdict

    return Submission(
        kind="train",
        spec={
            "zoo": req["zoo"],
            "zoo_path": str(zoo),
            "config": {k: v for k, v in asdict(cfg).items() if k != "device"},
            "display_name": req.get("display_name") or "",
        },
        summary=f"{cfg.model} -> {cfg.target}",
        output_path=out,
        est_bytes=512 << 20,
        progress={"steps_total": cfg.epochs, "unit": "epoch"},
        job_refs=refs,
    )


def run_train(ctx: WorkerContext) -> dict[str, Any]:
    from metanets.train import TrainConfig, train_metanet

    conf = dict(ctx.spec["config"])
    conf["split"] = tuple(conf["split"])
    cfg = TrainConfig(**conf, device=ctx.device)
    zoo = ctx.resolver(ctx.spec["zoo"], "zoo").path
    out = Path(str(ctx.output_path))
    ctx.progress(phase="featurizing", steps_done=0, steps_total=cfg.epochs, unit="epoch")

    def log(row: dict[str, Any]) -> None:
        ctx.progress(
            force=True,
            phase="training",
            steps_done=int(row["epoch"]),
            metrics={k: float(row[k]) for k in ("train_loss", "val_loss") if k in row},
            current=f"epoch {row['epoch']}",
        )
        ctx.step()  # --slow-down, then stop here if cancelled (the epoch's state is already saved)

    res = train_metanet(zoo, cfg, out, progress=False, log=log)
    assert res is not None
    card = dict(res.card)
    if ctx.spec.get("display_name"):
        card["display_name"] = ctx.spec["display_name"]
        (out / "display_name").write_text(ctx.spec["display_name"])
    return {"out_dir": str(out), "card": _card_without_predictions(card)}


def _card_without_predictions(card: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in card.items() if k != "test_predictions"}


def cleanup_train(rec: JobRecord, why: str) -> None:
    """Interrupted: keep ``<out>.partial`` (a retry resumes there). Cancelled or failed: remove it."""
    if why in (CANCELLED, FAILED):
        shutil.rmtree(Path(f"{rec.output_path}.partial"), ignore_errors=True)


def recover_train(rec: JobRecord) -> dict[str, Any] | None:
    """After a crash: a metanet renamed into place whose result.json was never written."""
    card_path = Path(rec.output_path) / "card.json"
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None
    return {"out_dir": rec.output_path, "card": _card_without_predictions(card), "reconstructed": True}


ZOO = register(
    JobKind(
        name="zoo",
        summary="build (or resume) a seeded model zoo (metanets.zoo.build_zoo)",
        create_rpcs=("weightsmith.v1.MetanetService/CreateZooJob",),
        result_type="weightsmith.v1.ZooResult",
        run=run_zoo,
        cleanup=cleanup_zoo,
        resumable=True,
    )
)
TRAIN = register(
    JobKind(
        name="train",
        summary="train a metanet on a zoo (metanets.train.train_metanet); stored as metanets/<id>",
        create_rpcs=("weightsmith.v1.MetanetService/CreateTrainJob",),
        result_type="weightsmith.v1.TrainResult",
        run=run_train,
        cleanup=cleanup_train,
        recover=recover_train,
        resumable=True,
    )
)

__all__ = ["TRAIN", "ZOO", "admit_train", "admit_zoo", "resolve_zoo", "run_train", "run_zoo"]
