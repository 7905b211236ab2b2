"""``weightsmith evolve CONFIG -o OUT``: search a merge recipe (:mod:`merge.evolve`).

A progress bar on a terminal (trials, best so far, ETA), a line every 10 s in a log; ``--json`` prints the
result. Errors print one line and exit 2. The metanet objective (``metanet``) is registered by importing
:mod:`metanets.objective` here: the library (``merge``) never imports ``metanets``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from service.cli.common import LogEvery, _fail_cleanly, _resolver, hub_options

PLUGINS = ("metanets.objective",)


@click.command("evolve")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Search folder: the study, best_recipe.yml, trials.csv/.json, plots/.")
@click.option("--resume", is_flag=True, help="Continue the search in OUT (killed, or finished and extended).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Stop at this many finished trials in the study (overrides budget.trials; extends a search).")
@click.option("--workers", type=click.IntRange(min=1), default=1,
              help="Trials in parallel on a local Dask cluster (127.0.0.1) of this many processes.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT", help="Run trials on this Dask cluster.")
@click.option("--allow-code", is_flag=True, help="Allow the 'code' objective (imports and runs MODULE:FUNCTION).")
@click.option("--save-model", is_flag=True, help="Also write the best merge to OUT/model.")
@click.option("--device", default="cpu", show_default=True, help="Merge and score on this device.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@hub_options
@_fail_cleanly
def evolve(config: str, out_dir: str, resume: bool, trials: int | None, workers: int, scheduler: str | None,
           allow_code: bool, save_model: bool, device: str, as_json: bool, token: str | None,
           endpoint: str | None, offline: bool, cache_dir: str | None) -> None:
    """Search the ranges of the recipe in CONFIG for the best merge (evolutionary model merging).

    CONFIG is a mergekit recipe whose parameters may be ranges ({min, max}) or choices, with objectives,
    a budget and a seed (docs/evolve.md). OUT/best_recipe.yml is plain mergekit YAML."""
    from merge.evolve import run_search

    show = _Progress(as_json)
    try:
        r = run_search(config, out_dir, resume=resume, trials=trials, scheduler=scheduler, workers=workers,
                       allow_code=allow_code, save_model=save_model, device=device, plugins=PLUGINS,
                       resolver=_resolver(token, endpoint, offline, cache_dir), progress=show)
    finally:
        show.close()
    if as_json:
        click.echo(json.dumps(r.to_json(), indent=2))
        return
    if not r.best:
        click.echo(f"no trial finished successfully ({r.trials} trials); see {out_dir}/trials.csv")
        sys.exit(1)
    b = r.best[0]
    vals = ", ".join(f"{n} {v:.6g}" for n, v in zip(r.objectives, b.values or [], strict=True))
    front = f" ({len(r.best)} on the Pareto front)" if len(r.objectives) > 1 else ""
    click.echo(f"best of {r.complete} trial(s): #{b.number} {b.method}: {vals}{front}; stopped by {r.stopped} "
               f"after {r.seconds:.1f} s ({r.executor})")
    click.echo(f"recipe: {r.best_recipe}   trials: {out_dir}/trials.csv   plots: {out_dir}/plots/")


class _Progress:
    """A tqdm bar over trials on a terminal; a line every 10 s otherwise (nothing with --json)."""

    def __init__(self, quiet: bool) -> None:
        self.bar: Any = None
        self.log = None if quiet else LogEvery(10.0)
        self.tty = sys.stderr.isatty()

    def __call__(self, p: Any) -> None:
        best = ", ".join(f"{v:.4g}" for v in p.best) if p.best else "-"
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=p.trials_total, initial=0, unit="trial", desc="evolve", file=sys.stderr)
            self.bar.n = p.trials_done
            self.bar.set_postfix_str(f"best {best}", refresh=True)
        elif self.log is not None:
            total = p.trials_total if p.trials_total is not None else "?"
            eta = f", ETA {p.eta_seconds:.0f} s" if p.eta_seconds is not None else ""
            self.log.line(f"evolve: {p.trials_done}/{total} trials, best {best}{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
