"""``weightsmith moe CONFIG -o OUT``: assemble a mixture-of-experts model (mergekit-moe's config format)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from service.cli.common import _fail_cleanly, _human, _resolver, _size, hub_options


@click.command("moe")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Device for the base model's forward passes (gate_mode hidden).",
)
@click.option(
    "--shard-size", default="5GB", show_default=True, callback=_size, help="Max bytes per output shard."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--dry-run", is_flag=True, help="Check the config against the models' headers; write nothing.")
@click.option(
    "--i-understand-this-is-not-useful-without-training",
    "allow_all_same",
    is_flag=True,
    help="Allow every expert to be the same model.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@hub_options
@_fail_cleanly
def moe(
    config: str,
    out_dir: str,
    device: str,
    shard_size: int,
    overwrite: bool,
    dry_run: bool,
    allow_all_same: bool,
    as_json: bool,
    token: str | None,
    endpoint: str | None,
    offline: bool,
    cache_dir: str | None,
) -> None:
    """Build a Mixtral- or Qwen-MoE-style model from dense experts of one base (mergekit-moe's YAML)."""
    from merge.atomic import check_output
    from merge.moe import plan_moe, progress_printer, run_moe

    if not dry_run:
        check_output(out_dir, overwrite=overwrite)  # the inputs too, once run_moe has resolved them
    plan = plan_moe(
        Path(config), resolver=_resolver(token, endpoint, offline, cache_dir), allow_all_same=allow_all_same
    )
    if dry_run:
        summary = plan.summary()
        if as_json:
            click.echo(json.dumps({"dry_run": True, **summary}, indent=2))
        else:
            click.echo(
                f"plan: {summary['architecture']} MoE of {len(summary['experts'])} experts over "
                f"{summary['layers']} layers, {summary['n_tensors']} tensors, "
                f"{_human(summary['bytes_out'])} out; nothing written (dry run)"
            )
        return
    result = run_moe(
        plan.config,
        out_dir,
        plan=plan,
        overwrite=overwrite,
        shard_size=shard_size,
        device=device,
        progress=progress_printer(),
    )
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(
            f"assembled a {result.architecture} MoE ({result.n_tensors} tensors, "
            f"{_human(result.bytes_written)}) into {out_dir} in {result.seconds:.1f} s"
        )
        if result.degenerate_layers:
            click.echo(
                f"warning: layers {result.degenerate_layers} have nearly dependent router rows "
                "(similar prompts); some experts may be underused",
                err=True,
            )
