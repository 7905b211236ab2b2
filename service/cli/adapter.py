"""``weightsmith adapter ...``: LoRA adapters on the command line.

* ``inspect ADAPTER``: format, targets, ranks, scales, modules_to_save;
* ``fold BASE ADAPTER... -o OUT``: ``base + Σ w_k ΔW_k`` as a full checkpoint (streamed by the engine;
  the same as a recipe with ``model: BASE+ADAPTER``);
* ``merge ADAPTER... -o OUT --method cat|linear|svd|ties_svd|...``: one adapter from several;
* ``extract BASE FINETUNED -o OUT --rank R``: a LoRA from a fine-tune (truncated SVD, kept energy reported);
* ``check ADAPTER...``: pairwise Frobenius cosines of the residuals (orthogonal adaptation's diagnostic).

Errors print one line ``error: ...`` on stderr and exit with code 2, and nothing is written.
"""

from __future__ import annotations

import json
import os

import click

from service.cli.common import _fail_cleanly


def _fmt_energy(x: float | None) -> str:
    return "exact" if x is None else f"{100 * x:.2f}%"


@click.group("adapter", context_settings={"help_option_names": ["-h", "--help"]})
def adapter() -> None:
    """LoRA adapters: inspect, fold into a base, merge, extract from a fine-tune, check orthogonality."""


@adapter.command("inspect")
@click.argument("path", type=click.Path(exists=True))
@click.option("--allow-pickle", is_flag=True, help="Allow adapter_model.bin (loaded with weights_only=True).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def inspect_cmd(path: str, allow_pickle: bool, as_json: bool) -> None:
    """Describe the LoRA adapter at PATH (PEFT folder, kohya or diffusers file)."""
    from merge.lora.formats import read_adapter

    ad = read_adapter(path, allow_pickle=allow_pickle)
    rows = [
        {
            "module": m,
            "layout": t.layout,
            "rank": t.rank,
            "scale": t.scale,
            "delta_shape": list(t.delta_shape),
        }
        for m, t in sorted(ad.targets.items())
    ]
    info = {
        "path": str(ad.path),
        "format": ad.format,
        "targets": rows,
        "modules_to_save": sorted(ad.modules_to_save),
        "ranks": sorted(ad.ranks),
        "base_model_name_or_path": ad.base_model_name_or_path,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max((len(r["module"]) for r in rows), default=6)
    click.echo(
        f"{ad.format} LoRA: {len(rows)} targets, ranks {sorted(ad.ranks)}"
        + (f", base {ad.base_model_name_or_path}" if ad.base_model_name_or_path else "")
    )
    for r in rows:
        click.echo(
            f"  {r['module']:<{width}}  {r['layout']:<9} r={r['rank']:<4} scale={r['scale']:.4g}  "
            f"ΔW {r['delta_shape']}"
        )
    if ad.modules_to_save:
        click.echo(f"  modules_to_save: {', '.join(sorted(ad.modules_to_save))}")


@adapter.command("fold")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option(
    "-w",
    "--weight",
    "weights",
    type=float,
    multiple=True,
    help="Weight of each adapter, in order (default 1 each; repeat the option).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Output dtype (default: the base's).",
)
@click.option(
    "--workers",
    default=min(8, os.cpu_count() or 1),
    show_default="CPU count, at most 8",
    type=click.IntRange(1, 64),
    help="Merge threads.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@_fail_cleanly
def fold_cmd(
    base: str,
    adapters: tuple[str, ...],
    out_dir: str,
    weights: tuple[float, ...],
    dtype: str | None,
    workers: int,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Fold ADAPTERS into BASE: W + Σ_k w_k s_k B_k A_k for every target, streamed to OUT."""
    from merge.atomic import check_output
    from merge.errors import RecipeError
    from merge.execute import tune_allocator
    from merge.lora.algebra import fold_adapters
    from merge.plan import MergeOptions

    if weights and len(weights) != len(adapters):
        raise RecipeError(f"{len(adapters)} adapters but {len(weights)} --weight values")
    check_output(out_dir, overwrite=overwrite, inputs=[base, *adapters])
    tune_allocator()
    res = fold_adapters(
        base,
        list(adapters),
        out_dir,
        weights=list(weights) or None,
        dtype=dtype,
        options=MergeOptions(workers=workers, overwrite=overwrite),
    )
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
    else:
        click.echo(
            f"folded {len(adapters)} adapter(s) into {base}: {res.n_tensors} tensors written to {out_dir} "
            f"in {res.seconds:.1f} s"
        )


@adapter.command("merge")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "-o", "--out", "out", required=True, type=click.Path(), help="Output PEFT folder (kohya: a file)."
)
@click.option(
    "--method",
    type=click.Choice(
        ["cat", "linear", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
    ),
    default="svd",
    show_default=True,
    help="cat: exact sum at rank Σr; linear: peft's factor sum; svd: truncated SVD of the summed residual; "
    "*_svd: TIES/DARE/magnitude on the residuals, then SVD.",
)
@click.option(
    "-w", "--weight", "weights", type=float, multiple=True, help="Weight of each adapter, in order."
)
@click.option(
    "--rank", type=click.IntRange(1), default=None, help="Rank of the SVD methods (default: largest input)."
)
@click.option(
    "--density",
    type=click.FloatRange(0, 1),
    default=1.0,
    show_default=True,
    help="Fraction kept by ties/dare/magnitude_prune.",
)
@click.option(
    "--clamp",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Clip the SVD factors to this quantile of their entries (peft's svd_clamp).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's drops.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Dtype of the written factors (default: the first adapter's).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--exact-svd", is_flag=True,
              help="Full SVDs (default: a randomized SVD where the rank is at most 1/8 of the matrix's).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_fail_cleanly
def merge_cmd(
    adapters: tuple[str, ...],
    out: str,
    method: str,
    weights: tuple[float, ...],
    rank: int | None,
    density: float,
    clamp: float | None,
    seed: int,
    dtype: str | None,
    overwrite: bool,
    exact_svd: bool,
    as_json: bool,
) -> None:
    """Merge LoRA ADAPTERS into one adapter (no base model needed)."""
    from merge.lora.algebra import merge_adapters

    rep = merge_adapters(
        list(adapters),
        out,
        method=method,
        weights=list(weights) or None,
        rank=rank,
        density=density,
        clamp=clamp,
        seed=seed,
        dtype=dtype,
        overwrite=overwrite,
        exact_svd=exact_svd,
    )
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
        return
    ranks = sorted({t.rank for t in rep.targets})
    msg = f"merged {len(adapters)} adapters ({method}) into {out}: {rep.n_targets} targets, rank(s) {ranks}"
    if rep.min_energy is not None:
        msg += f", lowest kept energy {_fmt_energy(rep.min_energy)}"
    click.echo(msg + f", {rep.seconds:.1f} s")


@adapter.command("extract")
@click.argument("base", type=click.Path(exists=True))
@click.argument("finetuned", type=click.Path(exists=True))
@click.option(
    "-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Output PEFT folder."
)
@click.option("--rank", type=click.IntRange(1), required=True, help="LoRA rank.")
@click.option("--targets", default=None, help="Regular expression: only modules whose name matches.")
@click.option("--exclude", default=None, help="Regular expression: skip modules whose name matches.")
@click.option("--no-embeddings", is_flag=True, help="Do not extract token embeddings (lora_embedding_A/B).")
@click.option(
    "--min-rel-change",
    type=float,
    default=0.0,
    show_default=True,
    help="Skip weights whose relative change ‖Δ‖/‖W‖ is at most this.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Dtype of the factors (default float32).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--exact-svd", is_flag=True,
              help="Full SVDs (default: a randomized SVD where the rank is at most 1/8 of the matrix's).")
@click.option("--json", "as_json", is_flag=True, help="Print the report (kept energy per tensor) as JSON.")
@_fail_cleanly
def extract_cmd(
    base: str,
    finetuned: str,
    out: str,
    rank: int,
    targets: str | None,
    exclude: str | None,
    no_embeddings: bool,
    min_rel_change: float,
    dtype: str | None,
    overwrite: bool,
    exact_svd: bool,
    as_json: bool,
) -> None:
    """Extract a rank-R LoRA from FINETUNED − BASE (mergekit's LoRA extract), kept energy per tensor."""
    from merge.lora.algebra import extract_adapter

    rep = extract_adapter(
        base,
        finetuned,
        out,
        rank=rank,
        targets=targets,
        exclude=exclude,
        embeddings=not no_embeddings,
        min_rel_change=min_rel_change,
        dtype=dtype,
        overwrite=overwrite,
        exact_svd=exact_svd,
    )
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
        return
    worst = sorted(rep.targets, key=lambda t: t.energy if t.energy is not None else 1.0)[:5]
    click.echo(
        f"extracted a rank-{rank} LoRA of {rep.n_targets} targets into {out} in {rep.seconds:.1f} s; "
        f"lowest kept energy {_fmt_energy(rep.min_energy)}"
    )
    for t in worst:
        click.echo(f"  {t.module}: kept energy {_fmt_energy(t.energy)}, relative error {t.rel_error:.3g}")
    if rep.skipped:
        click.echo(
            f"  not captured (not 2-D weights): {len(rep.skipped)} changed tensors, e.g. "
            + ", ".join(f"{s['tensor']} (rel. change {s['rel_change']:.2g})" for s in rep.skipped[:3])
        )


@adapter.command("check")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with per-target cosines).")
@_fail_cleanly
def check_cmd(adapters: tuple[str, ...], as_json: bool) -> None:
    """Pairwise Frobenius cosines of the ADAPTERS' residuals (~0: they merge by summing without crosstalk)."""
    from merge.lora.algebra import residual_cosines

    if len(adapters) < 2:
        from merge.errors import RecipeError

        raise RecipeError("check needs at least two adapters")
    res = residual_cosines(list(adapters))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for p in res["pairs"]:
        click.echo(
            f"{p['a']} · {p['b']}: cosine {p['cosine']:+.2e} over {p['shared_targets']} shared targets "
            f"(largest per target {p['max_abs_target_cosine']:.2e})"
        )
