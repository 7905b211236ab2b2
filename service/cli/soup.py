"""``weightsmith soup ...``: living soup folders (Diffusion Soup, continual OPCM) and greedy soups, from the shell.

``init | add | remove | build | show`` work on a soup folder (``merge.soups.folder``); each is atomic: a
failed or interrupted ``add`` or ``remove`` leaves the soup exactly as it was. ``init --method opcm``
makes a continual-merging soup (Tang et al., OPCM, arXiv:2501.09522): each ``add`` is one OPCM step. ``greedy`` runs
the greedy soup search (``merge.methods.soups.greedy_soup``) with a scorer the user names as
``module:function`` (or ``path/to/file.py:function``) and writes the soup through the merge
engine. Errors print one line ``error: ...`` on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from merge.errors import RecipeError
from service.cli.common import _fail_cleanly, _size


class _Bar:
    """A progress callback for merge.soups.folder: a tqdm bar per phase on a terminal, nothing otherwise."""

    LABELS = {
        "hash": "hashing member files",
        "sum": "summing tensors",
        "write": "writing",
        "commit": "committing",
    }

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.bar: Any = None
        self.event = ""

    def __call__(self, event: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event != self.event or self.bar is None:
            self.close()
            self.event = event
            self.bar = tqdm(total=total, desc=self.LABELS.get(event, event), file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _resolve(ref: str) -> Path:
    from merge.plan import default_resolver

    return default_resolver(ref).path


def _short(h: str) -> str:
    return h[:12]


def _print_show(info: dict[str, Any]) -> None:
    opcm = info.get("opcm") if info.get("method") == "opcm" else None
    method = f"OPCM (alpha {opcm['alpha']:g}), " if opcm else ""
    click.echo(
        f"soup {info['name']} at {info['path']}: {len(info['members'])} member(s), {method}"
        f"{info['kind'] or 'empty'}, soup id {info['soup_id']}"
    )
    if info["base"]:
        status = f"  [{info['base']['status']}]" if "status" in info["base"] else ""
        click.echo(f"  base: {info['base']['path']} (sha256 {_short(info['base']['hash'])}){status}")
    if opcm:
        _print_opcm_steps(info, opcm)
    elif info["members"]:
        width = max(len(m["id"]) for m in info["members"])
        for m in info["members"]:
            status = f"  [{m['status']}]" if "status" in m else ""
            click.echo(
                f"  {m['id']:<{width}}  weight {m['weight']:<8g} {_short(m['hash'])}  {m['path']}{status}"
            )
    if info["kind"] == "diffusers":
        click.echo(
            f"  souped components: {', '.join(info['summed']) or 'none'}; "
            f"copied: {', '.join(info['copied']) or 'none'}"
        )
    click.echo(f"  history: {len(info['history'])} operation(s)")
    for e in info["history"][-5:]:
        click.echo(
            f"    {e['time']}  {e['op']:<6} {e.get('member', '')}  -> {len(e['members'])} member(s), "
            f"soup id {e['soup_id']}"
        )
    if info["leftovers"]:
        click.echo(
            f"  {len(info['leftovers'])} leftover(s) of an interrupted operation (removed by the next add/remove)"
        )


def _print_opcm_steps(info: dict[str, Any], opcm: dict[str, Any]) -> None:
    """One line per OPCM step, in arrival order: ‖τ_t‖, the share of it the projection kept, ‖S_t‖, λ_t."""
    steps = opcm.get("steps") or []
    paths = {m["id"]: m for m in info["members"]}
    if not steps:
        return
    width = max(4, *(len(s["name"]) for s in steps))
    click.echo(f"  {'step':>4}  {'member':<{width}}  {'|tau|':>10}  {'kept':>6}  {'|sum|':>10}  {'lambda':>7}")
    for s in steps:
        m = paths.get(s["name"], {})
        status = f"  [{m['status']}]" if "status" in m else ""
        click.echo(
            f"  {s['step']:>4}  {s['name']:<{width}}  {s['task_norm']:>10.4g}  {100 * s['kept']:>5.1f}%  "
            f"{s['sum_norm']:>10.4g}  {s['lambda']:>7.4f}  {_short(m.get('hash', ''))}  {m.get('path', '')}{status}"
        )


@click.group()
def soup() -> None:
    """Living model soups (Diffusion Soup, continual OPCM): add and remove members, build; greedy soups."""


@soup.command("init")
@click.argument("soup_dir", type=click.Path(file_okay=False))
@click.argument("members", nargs=-1)
@click.option(
    "--id", "ids", multiple=True, help="Member id, one per MEMBER in order (default: folder/file name)."
)
@click.option(
    "--weight", "weights", multiple=True, type=float, help="Member weight, one per MEMBER (default 1)."
)
@click.option(
    "--base",
    default=None,
    help="The common pretrained checkpoint (recorded, and members must match it; required by --method opcm).",
)
@click.option(
    "--method",
    type=click.Choice(["average", "opcm"]),
    default="average",
    show_default=True,
    help="average: Diffusion Soup's weighted mean; opcm: continual merging, one OPCM step per member in order "
    "(Tang et al. 2025).",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="OPCM: the fraction in [0, 1] of the merged update's singular-value sum whose directions a new task "
    "vector is projected away from (default 0.5).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16", "float64"]),
    default=None,
    help="Dtype of the built soup (default: each tensor's dtype in the first member).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the soup as JSON.")
@_fail_cleanly
def init_cmd(
    soup_dir: str,
    members: tuple[str, ...],
    ids: tuple[str, ...],
    weights: tuple[float, ...],
    base: str | None,
    method: str,
    alpha: float | None,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Create the soup folder SOUP_DIR with MEMBERS (checkpoints or diffusers folders; for OPCM, in arrival order)."""
    from merge.soups.folder import Soup

    if ids and len(ids) != len(members):
        raise click.UsageError(f"{len(ids)} --id for {len(members)} member(s)")
    if weights and len(weights) != len(members):
        raise click.UsageError(f"{len(weights)} --weight for {len(members)} member(s)")
    bar = _Bar()
    try:
        s = Soup.init(
            soup_dir,
            [_resolve(m) for m in members],
            ids=list(ids) or None,
            weights=list(weights) or None,
            base=_resolve(base) if base else None,
            dtype=dtype,
            method=method,
            alpha=alpha,
            progress=bar,
        )
    finally:
        bar.close()
    info = s.show()
    click.echo(json.dumps(info, indent=2)) if as_json else _print_show(info)


@soup.command("add")
@click.argument("soup_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("member")
@click.option("--id", "mid", default=None, help="Member id (default: the folder or file name).")
@click.option("--weight", default=1.0, show_default=True, type=float, help="Member weight.")
@click.option("--json", "as_json", is_flag=True, help="Print the soup as JSON.")
@_fail_cleanly
def add_cmd(soup_dir: str, member: str, mid: str | None, weight: float, as_json: bool) -> None:
    """Add MEMBER to the soup (atomic; the member's files are hashed and recorded; OPCM: one step)."""
    from merge.soups.folder import Soup

    bar = _Bar()
    try:
        s = Soup(soup_dir).add(_resolve(member), id=mid, weight=weight, progress=bar)
    finally:
        bar.close()
    info = s.show()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif info.get("method") == "opcm":
        last = info["opcm"]["steps"][-1]
        click.echo(
            f"added '{info['history'][-1]['member']}' (OPCM step {last['step']}: kept {100 * last['kept']:.1f}% "
            f"of its task vector, lambda {last['lambda']:.4f}), soup id {info['soup_id']}"
        )
    else:
        click.echo(
            f"added '{info['history'][-1]['member']}': {len(info['members'])} member(s), "
            f"soup id {info['soup_id']}"
        )


@soup.command("remove")
@click.argument("soup_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("member_id")
@click.option("--json", "as_json", is_flag=True, help="Print the soup as JSON.")
@_fail_cleanly
def remove_cmd(soup_dir: str, member_id: str, as_json: bool) -> None:
    """Remove MEMBER_ID (unlearning): the rest is re-summed from the remaining members, exactly (OPCM: replayed
    over the remaining members in order, reading each of them again)."""
    from merge.soups.folder import Soup

    bar = _Bar()
    try:
        s = Soup(soup_dir).remove(member_id, progress=bar)
    finally:
        bar.close()
    info = s.show()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"removed '{member_id}': {len(info['members'])} member(s) left, soup id {info['soup_id']}")


@soup.command("build")
@click.argument("soup_dir", type=click.Path(file_okay=False, exists=True))
@click.option(
    "-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option(
    "--shard-size", default="5GB", show_default=True, callback=_size, help="Max bytes per output shard."
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@_fail_cleanly
def build_cmd(soup_dir: str, out_dir: str, overwrite: bool, shard_size: int, as_json: bool) -> None:
    """Write the soup (the weighted average of its members; OPCM: base + S/lambda) to OUT, in the members' layout."""
    from merge.soups.folder import Soup

    bar = _Bar()
    try:
        info = Soup(soup_dir).build(out_dir, overwrite=overwrite, shard_size=shard_size, progress=bar)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif info.get("method") == "opcm":
        click.echo(
            f"built OPCM soup {info['soup_id']} of {len(info['members'])} member(s) into {out_dir} "
            f"(alpha {info['alpha']:g}, lambda {info['lambda']:.4f})"
        )
    else:
        click.echo(
            f"built soup {info['soup_id']} of {len(info['members'])} member(s) into {out_dir}"
            + (
                f" (souped: {', '.join(info['summed']) or 'none'}; copied: {', '.join(info['copied']) or 'none'})"
                if info["kind"] == "diffusers"
                else ""
            )
        )


@soup.command("show")
@click.argument("soup_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--verify", is_flag=True, help="Hash every member file and report changed or missing ones.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def show_cmd(soup_dir: str, verify: bool, as_json: bool) -> None:
    """Show the soup's members, weights, hashes and history."""
    from merge.soups.folder import Soup

    info = Soup(soup_dir).show(verify=verify)
    click.echo(json.dumps(info, indent=2)) if as_json else _print_show(info)
    if verify and any(m.get("status", "ok") != "ok" for m in [*info["members"], info["base"] or {}]):
        sys.exit(2)


def load_scorer(spec: str) -> Callable[[dict[str, Any]], float]:
    """``package.module:function`` or ``path/to/file.py:function`` -> the callable."""
    from merge.entry_point import import_callable

    if "" not in sys.path:  # a scorer module in the working directory, as `python -m` would find it
        sys.path.insert(0, "")
    fn = import_callable(spec, where="--scorer", what="callable")
    return fn


@soup.command("greedy")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--scorer",
    required=True,
    metavar="MODULE:FUNCTION",
    help="score(state_dict) -> float on held-out data, higher is better.",
)
@click.option(
    "-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option(
    "--strict", is_flag=True, help="Keep an ingredient only if the score improves (default: does not drop)."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the search log as JSON.")
@_fail_cleanly
def greedy_cmd(
    models: tuple[str, ...], scorer: str, out_dir: str, strict: bool, overwrite: bool, as_json: bool
) -> None:
    """Greedy soup of MODELS (Wortsman et al. 2022): best first, each kept if the held-out score does not drop.

    OUT gets the soup (a linear merge of the kept models, written by the merge engine), its recipe,
    and greedy_soup.json with every candidate's score and decision."""
    from merge.atomic import check_output
    from merge.execute import run_merge
    from merge.methods.soups import GreedyStep, greedy_soup
    from merge.plan import MergeOptions

    out = Path(out_dir)
    fn = load_scorer(scorer)
    paths = [_resolve(m) for m in models]
    check_output(out, overwrite=overwrite, inputs=paths)  # before any model is scored
    names = [str(p) for p in paths]
    if len(set(names)) != len(names):
        raise RecipeError("greedy soup: the same model is given twice")

    def log(step: GreedyStep) -> None:
        verdict = "kept" if step.kept else "rejected"
        click.echo(
            f"{Path(step.name).name}: alone {step.individual:.6g}, soup {step.soup_score:.6g} -> {verdict} "
            f"(soup of {step.soup_size})",
            err=True,
        )

    result = greedy_soup(paths, fn, names=names, strict=strict, progress=log)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": k, "parameters": {"weight": 1.0}} for k in result.kept],
        "parameters": {"normalize": True},
    }
    run_merge(recipe, out, MergeOptions(overwrite=overwrite))
    report = {"out": str(out), **result.to_json()}
    tmp = out / "greedy_soup.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "greedy_soup.json")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"greedy soup of {len(result.kept)}/{len(paths)} model(s), held-out score {result.score:.6g} "
            f"(best single {result.best_individual:.6g}) into {out}"
        )
