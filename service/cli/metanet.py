"""``weightsmith zoo build|show`` and ``weightsmith metanet train|predict|embed``.

Model zoos (:mod:`metanets.zoo`) and metanets trained on them (:mod:`metanets.train`). Errors print one
line and exit 2 (like every weightsmith command); ``--json`` prints a machine-readable result; long work
shows a progress bar on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from service.cli.common import LogEvery, _fail_cleanly, _resolver, hub_options


@click.group()
def zoo() -> None:
    """Build and inspect model zoos (small networks trained with varied hyperparameters)."""


@zoo.command("build")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Zoo folder.")
@click.option(
    "--workers", type=int, default=None, help="Local worker processes (default: CPU count, at most 8)."
)
@click.option(
    "--scheduler", default=None, metavar="tcp://HOST:PORT", help="Run on this Dask distributed cluster."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@_fail_cleanly
def zoo_build(config: str, out_dir: str, workers: int | None, scheduler: str | None, as_json: bool) -> None:
    """Build (or resume) the zoo of CONFIG in OUT: identical bytes however it is run or interrupted."""
    from metanets.zoo import build_zoo

    s = build_zoo(
        config, out_dir, workers=workers, scheduler=scheduler, progress=sys.stderr.isatty() or not as_json
    )
    if as_json:
        click.echo(json.dumps(s.to_dict(), indent=2))
    else:
        state = "complete" if s.complete else "incomplete"
        click.echo(f"zoo {out_dir}: {s.runs} runs, {s.models} models ({state}); built {s.built_runs} runs in "
                   f"{s.seconds:.1f} s ({s.models_per_s:.2f} models/s, {s.executor})")  # fmt: skip


@zoo.command("show")
@click.argument("zoo_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def zoo_show(zoo_dir: str, as_json: bool) -> None:
    """Summarise a zoo: runs, models, architectures, tasks, the test-accuracy histogram."""
    from metanets.zoo import Zoo

    s = Zoo(zoo_dir, verify=False).summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    acc = s["test_acc"]
    kinds, tasks = ", ".join(s["kinds"]), ", ".join(s["tasks"])
    click.echo(f"zoo {s['name']} at {s['path']}: {s['runs']} runs, {s['models']} models, "
               f"{s['architectures']} architectures ({kinds}), tasks {tasks}")  # fmt: skip
    click.echo(f"test accuracy: mean {acc['mean']:.3f}, min {acc['min']:.3f}, max {acc['max']:.3f}")
    top = max(acc["histogram_0.1"]) or 1
    for i, n in enumerate(acc["histogram_0.1"]):
        click.echo(f"  {i / 10:.1f}-{(i + 1) / 10:.1f} {'#' * round(40 * n / top):<40} {n}")
    click.echo(f"sha256 {s['sha256']}")


@click.group()
def metanet() -> None:
    """Train metanets on a zoo and run them on checkpoints."""


def _model_args(value: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in value:
        k, sep, v = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


@metanet.command("train")
@click.argument("zoo_dir", type=click.Path(file_okay=False))
@click.option("--model", type=click.Choice(["gmn", "unf", "statnn", "flat", "flat_aug", "deepsets"]), default="gmn",
              show_default=True)  # fmt: skip
@click.option(
    "--target", default="test_acc", show_default=True, help="Record field (test_acc, task, arch.kind...)."
)
@click.option(
    "-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Metanet folder."
)
@click.option("--epochs", type=int, default=40, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--patience", type=int, default=10, show_default=True, help="Early-stopping patience (epochs).")
@click.option(
    "--train-fraction", type=float, default=1.0, show_default=True, help="Use this share of training runs."
)
@click.option(
    "--where", multiple=True, metavar="FIELD=VALUE", help="Keep only records with this field value."
)
@click.option(
    "--arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Metanet argument (hidden=64...)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1...")
@click.option("--nproc", type=int, default=1, show_default=True, help="Data-parallel processes (torch DDP).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the forward pass (slow start, faster epochs).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the card's metrics as JSON.")
@_fail_cleanly
def metanet_train(zoo_dir: str, model: str, target: str, out_dir: str, epochs: int, batch_size: int, lr: float,
                  patience: int, train_fraction: float, where: tuple[str, ...], model_args: tuple[str, ...], seed: int,
                  device: str, nproc: int, compile_: bool, overwrite: bool, as_json: bool) -> None:  # fmt: skip
    """Train a metanet on ZOO to predict TARGET; resumable, early-stopped, written to OUT atomically."""
    from metanets.train import TrainConfig, train_metanet

    cfg = TrainConfig(
        model=model, target=target, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
        train_fraction=train_fraction, where=_model_args(where), seed=seed, device=device,
        model_args=_model_args(model_args), compile=compile_,
    )  # fmt: skip
    tty = sys.stderr.isatty()
    logger = None if tty else LogEvery(10.0)

    def log(row: dict) -> None:  # not a terminal: an epoch line every 10 s at most, and the last one
        assert logger is not None
        logger.line(f"train {model}: epoch {row['epoch']}/{epochs} train_loss {row['train_loss']:.4g} "
                    f"val_loss {row['val_loss']:.4g}", force=row["epoch"] == epochs)

    r = train_metanet(zoo_dir, cfg, out_dir, nproc=nproc, overwrite=overwrite, progress=tty,
                      log=None if tty else log)
    assert r is not None
    warned = r.card.get("warnings", [])
    for w in warned:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"path": str(r.path), "metrics": r.metrics, "warnings": warned}, indent=2))
    else:
        shown = {k: v for k, v in r.metrics.items() if isinstance(v, float) and not k.endswith("seconds")}
        m = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        click.echo(f"metanet {model} -> {out_dir}: {m}")


@metanet.command("predict")
@click.argument("metanet_dir", type=click.Path(file_okay=False))
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False), default=None,
              help="Permutation spec JSON (default: from names and shapes).")  # fmt: skip
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@hub_options
@_fail_cleanly
def metanet_predict(metanet_dir: str, checkpoints: tuple[str, ...], spec_file: str | None, device: str, as_json: bool,
                    token: str | None, endpoint: str | None, offline: bool, cache_dir: str | None) -> None:  # fmt: skip
    """Predict the metanet's target for each CHECKPOINT (paths or Hub ids)."""
    from merge.symmetry import PermutationSpec
    from metanets.train import predict

    spec = PermutationSpec.load(spec_file) if spec_file else None
    res = predict(metanet_dir, list(checkpoints), spec=spec, device=device,
                  resolver=_resolver(token, endpoint, offline, cache_dir))  # fmt: skip
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for r in res:
        p = r["prediction"]
        shown = f"{p:.4f}" if isinstance(p, float) else str(p)
        click.echo(f"{r['checkpoint']}\t{r['target']} = {shown}")


@metanet.command("embed")
@click.argument("metanet_dir", type=click.Path(file_okay=False))
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False), default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (default: one line of numbers per checkpoint)."
)
@hub_options
@_fail_cleanly
def metanet_embed(metanet_dir: str, checkpoints: tuple[str, ...], spec_file: str | None, device: str, as_json: bool,
                  token: str | None, endpoint: str | None, offline: bool, cache_dir: str | None) -> None:  # fmt: skip
    """Invariant embeddings of each CHECKPOINT (for search and clustering)."""
    from merge.symmetry import PermutationSpec
    from metanets.train import embed

    spec = PermutationSpec.load(spec_file) if spec_file else None
    res = embed(metanet_dir, list(checkpoints), spec=spec, device=device,
                resolver=_resolver(token, endpoint, offline, cache_dir))  # fmt: skip
    if as_json:
        click.echo(json.dumps(res))
        return
    for r in res:
        click.echo(f"{r['checkpoint']}\t" + " ".join(f"{x:.5g}" for x in r["embedding"]))
