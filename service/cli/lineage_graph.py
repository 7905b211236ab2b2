"""``weightsmith lineage graph MODEL... | FOLDER``: the directed model graph of a whole pool.

Families (clusters of related models), who was fine-tuned from whom (with a confidence per edge),
and which models are merges of which (with their shares): :func:`metanets.lineage.recover_model_graph`.
``--tree graph.svg`` draws it (merges as joins), ``--json`` prints the graph as JSON.
``weightsmith lineage CHILD -c A B`` (one child's parent) stays the group's default command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from service.cli.common import _fail_cleanly, _resolver, hub_options
from service.cli.lineage import _Progress, lineage


class LineageGroup(click.Group):
    """``lineage`` runs its default command ``find`` unless the first word names a sub-command."""

    default = "find"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@click.group(
    cls=LineageGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def lineage_group() -> None:
    """Lineage: one model's parent among candidates (CHILD -c A B, the default), or a pool's whole graph.

    \b
    weightsmith lineage CHILD -c A B C      which candidate is CHILD's parent (or none)
    weightsmith lineage graph A B C D ...   families, fine-tune edges and merges of the pool
    weightsmith lineage graph FOLDER        every model in FOLDER (sub-folders or .safetensors files)
    """


lineage.name = "find"
lineage_group.add_command(lineage)


@lineage_group.command("graph", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", nargs=-1, required=True, metavar="MODEL... | FOLDER")
@click.option("--tree", "tree_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the graph here (.png, .svg or .pdf).")
@click.option("--overwrite", is_flag=True, help="Replace the --tree file if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the graph as JSON on stdout.")
@click.option("--direction", type=click.Choice(["auto", "norm", "kurtosis", "none"]), default="auto",
              show_default=True, help="Edge direction statistic (auto: calibrated per family).")
@click.option("--family-threshold", type=float, default=0.8, show_default=True,
              help="Most RMS relative distance between relatives (independent models: about 1.4).")
@click.option("--merge-threshold", type=float, default=0.6, show_default=True,
              help="Most relative residual of a merge fit.")
@click.option("--no-merges", is_flag=True, help="Do not look for merges.")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Leave out tensors matching REGEX (repeatable).")
@click.option("--keep-heads", is_flag=True, help="Compare classifier heads too.")
@click.option("--revision", default=None, help="Default Hub revision for ids without @rev.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt pickle checkpoints (weights_only).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Reader threads.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@hub_options
@_fail_cleanly
def graph(
    models: tuple[str, ...],
    tree_path: str | None,
    overwrite: bool,
    as_json: bool,
    direction: str,
    family_threshold: float,
    merge_threshold: float,
    no_merges: bool,
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
    """The directed model graph of MODEL... (or of every model in FOLDER)."""
    from metanets.lineage.graph import recover_model_graph

    pool: str | list[str] = models[0] if len(models) == 1 else list(models)
    if tree_path:
        from merge.atomic import check_output

        check_output(tree_path, overwrite=overwrite, inputs=list(models), kind="file")  # before any work
    progress = _Progress(not quiet and sys.stderr.isatty())
    try:
        g = recover_model_graph(
            pool,
            family_threshold=family_threshold,
            merge_threshold=merge_threshold,
            merges=not no_merges,
            direction=direction,
            heads=None if keep_heads else "auto",
            exclude=list(exclude),
            resolver=_resolver(token, endpoint, offline, cache_dir, revision),
            allow_pickle=allow_pickle,
            workers=workers,
            progress=progress,
        )
    finally:
        progress.close()
    if tree_path:
        g.render(Path(tree_path), overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(g.to_json(), indent=2))
        return
    for line in g.summary():
        click.echo(line)
    click.echo(f"{len(g.models)} models, {len(g.clusters)} families, {len(g.merges)} merges "
               f"in {g.seconds:.1f} s ({g.bytes_read / 1e6:.1f} MB read)")
    if tree_path:
        click.echo(f"picture: {tree_path}")
