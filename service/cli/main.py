"""The ``weightsmith`` command line.

Errors that weightsmith raises on purpose (bad recipe, shape mismatch, missing tensor, malformed
file, missing model, NaN/Inf...) print one line ``error: ...`` on stderr and exit with code 2;
no partial output is left behind.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from service.cli.common import _fail_cleanly, _human, _resolver, _size, hub_options  # noqa: E402,F401


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="weightsmith")
def main() -> None:
    """weightsmith: merge, align, inspect and read neural-network checkpoints (adapters, soups, MoE,
    metanets, lineage), locally or on a weightsmith server (serve, remote)."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_pos", metavar="[OUT]", required=False, type=click.Path())
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(),
              help="Output folder (a .gguf file with --out-format gguf); also accepted as the second argument, "
                   "as mergekit-yaml takes it.")
@click.option("--out-format", type=click.Choice(["safetensors", "gguf"]), default="safetensors", show_default=True,
              help="gguf: one GGUF file with the header of the recipe's GGUF model (its base when that is one).")
@click.option("--out-type", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]),
              default="f16", show_default=True, help="With --out-format gguf: the type of the matrices.")
@click.option("--device", default="cpu", show_default=True, help="Compute device (cpu, cuda, cuda:1...).")
@click.option("--shard-size", default="5GB", show_default=True, callback=_size, help="Max bytes per output shard.")
@click.option("--compute-dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16"]), default=None,
              help="Dtype to compute in (default float32).")
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default="CPU count, at most 8",
              type=click.IntRange(1, 64), help="Merge threads (one torch thread each).")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt pickle inputs (loaded with weights_only=True).")
@click.option("--allow-code", is_flag=True,
              help="Run the Python entry point a data-driven method names (adamerging, concrete_*: entry_point).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--direct-io/--no-direct-io", default=True, show_default=True,
              help="Write the output with O_DIRECT where the file system allows it (else buffered).")
@click.option("--dry-run", is_flag=True, help="Validate and plan only; read no tensor data, write nothing.")
@click.option("--strict", is_flag=True, help="Treat the plan's warnings (a filter that matches no tensor) as errors.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--push-to-hub", "push_repo", default=None, metavar="ORG/NAME", help="Upload the result to the Hub.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create a private repo.")
@hub_options
@_fail_cleanly
def merge(recipe: str, out_pos: str | None, out_dir: str | None, out_format: str, out_type: str, device: str,
          shard_size: int,
          compute_dtype: str | None, workers: int,
          allow_pickle: bool, allow_code: bool, overwrite: bool, direct_io: bool, dry_run: bool, strict: bool,
          as_json: bool, push_repo: str | None, private: bool, token: str | None, endpoint: str | None,
          offline: bool, cache_dir: str | None) -> None:
    """Merge the models of RECIPE (YAML, mergekit's format) into OUT (-o OUT, or OUT after RECIPE)."""
    if out_pos is not None and out_dir is not None and Path(out_pos) != Path(out_dir):
        raise click.UsageError(f"two outputs given: '{out_pos}' and -o '{out_dir}'; give one")
    out_dir = out_dir or out_pos
    if out_dir is None:
        raise click.UsageError("no output: weightsmith merge RECIPE -o OUT (or RECIPE OUT)")
    from merge.execute import run_merge, tune_allocator
    from merge.plan import MergeOptions, plan_merge

    tune_allocator()
    # One merge per process: the objects alive now (torch's modules, ~10^5) are never garbage, and
    # freezing them keeps the collector's passes during the merge short (~10% of a linear merge).
    gc.freeze()
    options = MergeOptions(device=device, compute_dtype=compute_dtype, shard_size=shard_size,
                           allow_pickle=allow_pickle, workers=workers, overwrite=overwrite, direct_io=direct_io,
                           allow_code=allow_code)
    resolver = _resolver(token, endpoint, offline, cache_dir)
    from merge.atomic import check_output

    if not overwrite:  # a plain refusal before planning; overlap with the inputs once the plan has them
        check_output(out_dir, overwrite=False)
    plan = plan_merge(Path(recipe), options, resolver=resolver)
    for w in plan.warnings:
        click.echo(f"{'error' if strict else 'warning'}: {w}", err=True)
    if strict and plan.warnings:
        sys.exit(2)
    if dry_run:
        summary = plan.summary()
        groups = plan.param_groups()
        if as_json:
            click.echo(json.dumps({"dry_run": True, **summary, "param_groups": groups}, indent=2, default=str))
        else:
            click.echo(f"plan: {summary['method']} of {len(summary['models'])} model(s): "
                       f"{summary['n_merged']} tensors merged, {summary['n_copied']} copied, "
                       f"{_human(summary['bytes_out'])} out; nothing written (dry run)")
            for g in groups:
                names = g["tensors"]
                shown = ", ".join(names[:3]) + (f" ... ({len(names)} tensors)" if len(names) > 3 else "")
                what = "copied" if g["params"].get("copied") else " ".join(
                    f"{k}={_short_value(v)}" for k, v in g["params"].items())
                click.echo(f"  {what}: {shown}")
        return
    if out_format == "gguf":
        result = _merge_to_gguf(plan, Path(out_dir), out_type, options)
    else:
        result = run_merge(plan.recipe, out_dir, options, plan=plan)  # refuses an output overlapping an input
    out = result.to_json()
    if push_repo:
        from merge import hub

        out["pushed"] = hub.push_to_hub(Path(out_dir), push_repo, private=private, token=token, endpoint=endpoint)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"merged {result.n_tensors} tensors ({_human(result.bytes_written)}) with {result.method} "
                   f"into {out_dir} in {result.seconds:.1f} s"
                   + (f"; pushed to {push_repo}" if push_repo else ""))


def _short_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short_value(x) for x in v) + "]"
    return str(v)


def _merge_to_gguf(plan: Any, out: Path, out_type: str, options: Any) -> Any:
    """The merge into a temporary safetensors folder beside ``out``, then one GGUF file (merge.gguf_write)."""
    import dataclasses
    import tempfile

    from merge.atomic import check_output
    from merge.checkpoint import open_checkpoint
    from merge.execute import run_merge
    from merge.gguf_write import gguf_template, write_gguf

    template = gguf_template(plan)
    check_output(out, overwrite=options.overwrite, inputs=plan.input_paths, kind="file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.merging-") as d:
        staged = Path(d) / "merged"
        result = run_merge(plan.recipe, staged, dataclasses.replace(options, overwrite=False), plan=plan)
        ck = open_checkpoint(staged)
        try:
            write_gguf(ck, list(ck), out, template, out_type, overwrite=options.overwrite, inputs=plan.input_paths)
        finally:
            ck.close()
    return dataclasses.replace(result, out_dir=str(out), bytes_written=out.stat().st_size, shards=[out.name])


@main.command()
@click.argument("path")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub reference.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt pickle checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@hub_options
@_fail_cleanly
def inspect(path: str, revision: str | None, allow_pickle: bool, as_json: bool, token: str | None,
            endpoint: str | None, offline: bool, cache_dir: str | None) -> None:
    """List the tensors of a checkpoint (file, folder or Hub reference): dtypes, shapes, sizes, totals."""
    from merge.checkpoint import open_checkpoint

    resolved = _resolver(token, endpoint, offline, cache_dir, revision)(path)
    ckpt = open_checkpoint(resolved.path, allow_pickle=allow_pickle)
    from merge.plan import _natural_key

    names = sorted(ckpt.keys(), key=_natural_key)
    rows = [{"name": n, "dtype": str(ckpt.dtype(n)).removeprefix("torch."), "shape": list(ckpt.shape(n)),
             "bytes": ckpt.nbytes(n)} for n in names]
    by_dtype: Counter[str] = Counter()
    params = 0
    for r in rows:
        numel = 1
        for s in r["shape"]:
            numel *= s
        params += numel
        by_dtype[r["dtype"]] += r["bytes"]
    totals = {"tensors": len(rows), "parameters": params, "bytes": sum(r["bytes"] for r in rows),
              "bytes_by_dtype": dict(by_dtype), "files": [str(f) for f in ckpt.files]}
    if resolved.commit:
        totals["commit"] = resolved.commit
    if as_json:
        click.echo(json.dumps({"path": str(resolved.path), "tensors": rows, "totals": totals}, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=4)
    click.echo(f"{'tensor':<{width}}  {'dtype':<9} {'shape':<20} {'size':>10}")
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['dtype']:<9} {str(r['shape']):<20} {_human(r['bytes']):>10}")
    click.echo(f"\n{totals['tensors']} tensors, {params:,} parameters, {_human(totals['bytes'])} "
               f"({', '.join(f'{k}: {_human(v)}' for k, v in by_dtype.items())}) in {len(ckpt.files)} file(s)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with parameter schemas).")
def methods(as_json: bool) -> None:
    """List the merge methods, their parameters and papers."""
    from merge.catalogue import read_catalogue, render

    entries = read_catalogue()  # committed JSON: no torch import (merge/catalogue.py)
    click.echo(json.dumps(entries, indent=2) if as_json else render(entries))


# The service's commands (gRPC is imported only when one of them runs).
from service.cli.service import remote, serve  # noqa: E402

main.add_command(serve)
main.add_command(remote)
import service.cli.remote  # noqa: E402,F401  (the remote group's align, lineage ... soup commands)
from service.cli.metanet import metanet, zoo  # noqa: E402

main.add_command(zoo)
main.add_command(metanet)

from service.cli.adapter import adapter  # noqa: E402  (LoRA adapters: issue 14)

main.add_command(adapter)

from service.cli.soup import soup  # noqa: E402

main.add_command(soup)

# weightsmith lineage (issue 11)
from service.cli.lineage_graph import lineage_group  # noqa: E402  (lineage CHILD -c ..., lineage graph: issue 24)

main.add_command(lineage_group, name="lineage")

from service.cli.evolve import evolve  # noqa: E402  (recipe search: issue 25)
from service.cli.moe import moe  # noqa: E402

main.add_command(moe)
main.add_command(evolve)

if __name__ == "__main__":  # pragma: no cover
    main()
