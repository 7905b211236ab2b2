"""``weightsmith lineage CHILD --candidates A B C ...``: which candidate a checkpoint was fine-tuned from.

Registered in ``service/cli/main.py`` with ``main.add_command(lineage)``. Models are local paths or Hub
ids (``org/name@rev``); the answer is printed as a ranked table (or ``--json``), ``--tree`` draws
the family tree (PNG, SVG or PDF by suffix). A "no parent among the candidates" answer exits 0 like
any answer; errors about the child exit 2 with one line, unreadable candidates are listed as
skipped and the others still ranked.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from service.cli.common import RegistryChoice, _fail_cleanly, _resolver, hub_options


class _Progress:
    """One tqdm bar per stage on stderr (silent when ``enabled`` is false)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            unit_bytes = stage == "reading tensors"
            self.bar = tqdm(
                total=total,
                desc=stage,
                file=sys.stderr,
                leave=False,
                unit="B" if unit_bytes else " model",
                unit_scale=unit_bytes,
            )
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _load_probe(path: str) -> Any:
    from safetensors.torch import load_file

    from merge.errors import InvalidArgumentError

    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own errors
        raise InvalidArgumentError(f"probe file '{path}': not a readable safetensors file ({e})") from None
    if "x" in tensors:
        return tensors["x"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise InvalidArgumentError(f"probe file '{path}': holds {len(tensors)} tensors; name the probe batch 'x'")


def _load_model_fn(spec: str) -> Any:
    from merge.errors import InvalidArgumentError

    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise InvalidArgumentError(f"--model-fn '{spec}': expected module:function")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise InvalidArgumentError(f"--model-fn '{spec}': {e}") from None


def _method_names() -> list[str]:
    from metanets.lineage.methods import lineage_methods

    return [m.name for m in lineage_methods()]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("child")
@click.argument("more", nargs=-1, metavar="[CANDIDATE...]")
@click.option(
    "-c",
    "--candidates",
    "candidates",
    multiple=True,
    metavar="MODEL",
    help="Candidate parents: --candidates A B C (paths or Hub ids).",
)
@click.option(
    "-m",
    "--method",
    type=RegistryChoice(_method_names),
    default="weights",
    show_default=True,
    help="How to compare (see docs/lineage.md).",
)
@click.option(
    "--tree",
    "tree_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw the family tree here (.png, .svg or .pdf).",
)
@click.option("--overwrite", is_flag=True, help="Replace the --tree file if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option(
    "--detector",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="method learned: a detector file (metanets.lineage.learned).",
)
@click.option(
    "--architecture",
    type=click.Choice(["mlp", "cnn", "resnet", "transformer"]),
    default=None,
    help="method aligned: the permutation spec to build (default: from config.json or the names).",
)
@click.option("--n-heads", type=click.IntRange(0, 4096), default=0, help="method aligned: attention heads.")
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="method aligned: a permutation spec JSON.",
)
@click.option(
    "--probe",
    "probe_path",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="method probe: a safetensors file with the probe batch (tensor 'x').",
)
@click.option(
    "--model-fn",
    default=None,
    metavar="MODULE:FUNCTION",
    help="method probe: builds the feature module from a state dict.",
)
@click.option(
    "--probe-metric",
    type=click.Choice(["linearized", "first_order", "l2", "cka"]),
    default="linearized",
    show_default=True,
    help="method probe: the metric that ranks.",
)
@click.option(
    "--spectral",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Nuclear norms for matrices (auto: smaller side <= --spectral-max-dim).",
)
@click.option(
    "--spectral-max-dim",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Nuclear norms on a block of at most this many rows and columns.",
)
@click.option(
    "--family-threshold",
    type=float,
    default=0.8,
    show_default=True,
    help="Most a parent may score (unrelated models score about 1 or more).",
)
@click.option(
    "--path-threshold",
    type=float,
    default=0.15,
    show_default=True,
    help="Least path statistic of a parent (a relative that is not an ancestor scores about 0).",
)
@click.option(
    "--exclude", multiple=True, metavar="REGEX", help="Leave out tensors matching REGEX (repeatable)."
)
@click.option("--keep-heads", is_flag=True, help="Compare classifier heads too.")
@click.option("--revision", default=None, help="Default Hub revision for ids without @rev.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt pickle checkpoints (weights_only).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Reader threads.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@hub_options
@_fail_cleanly
def lineage(
    child: str,
    more: tuple[str, ...],
    candidates: tuple[str, ...],
    method: str,
    tree_path: str | None,
    overwrite: bool,
    as_json: bool,
    detector: str | None,
    architecture: str | None,
    n_heads: int,
    spec_path: str | None,
    probe_path: str | None,
    model_fn: str | None,
    probe_metric: str,
    spectral: str,
    spectral_max_dim: int,
    family_threshold: float,
    path_threshold: float,
    exclude: tuple[str, ...],
    keep_heads: bool,
    revision: str | None,
    allow_pickle: bool,
    workers: int,
    quiet: bool,
    token: str | None,
    endpoint: str | None,
    offline: bool,
    cache_dir: str | None,
) -> None:
    """Which of the candidates is CHILD's parent (grandparent, ...), or none of them?"""
    from merge.errors import InvalidArgumentError
    from metanets.lineage import detect_lineage

    if more and not candidates:
        raise InvalidArgumentError(
            "give the candidate parents after --candidates: weightsmith lineage CHILD --candidates A B"
        )
    models = [*candidates, *more]
    if not models:
        raise InvalidArgumentError("no candidates: weightsmith lineage CHILD --candidates A B C")
    if tree_path:
        from merge.atomic import check_output

        check_output(tree_path, overwrite=overwrite, inputs=[child, *models], kind="file")  # before any work
    progress = _Progress(not quiet and sys.stderr.isatty())
    try:
        result = detect_lineage(
            child,
            models,
            method=method,
            probe=_load_probe(probe_path) if probe_path else None,
            model_fn=_load_model_fn(model_fn) if model_fn else None,
            detector=detector,
            heads=None if keep_heads else "auto",
            exclude=list(exclude),
            spectral={"auto": "auto", "on": True, "off": False}[spectral],
            spectral_max_dim=spectral_max_dim,
            family_threshold=family_threshold,
            path_threshold=path_threshold,
            spec=spec_path,
            architecture=architecture,
            n_heads=n_heads,
            probe_metric=probe_metric,
            resolver=_resolver(token, endpoint, offline, cache_dir, revision),
            allow_pickle=allow_pickle,
            workers=workers,
            progress=progress,
        )
    finally:
        progress.close()
    if tree_path:
        result.render_tree(Path(tree_path), overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    for line in result.summary():
        click.echo(line)
    if tree_path:
        click.echo(f"tree: {tree_path}")
