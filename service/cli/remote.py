"""``weightsmith remote align | lineage | predict | embed | zoo | train | metanets | evolve | soup | job ...``:
the library's other services over gRPC (AlignmentService, LineageService, MetanetService, EvolveService,
SoupService, JobService).

Same conventions as ``remote merge`` (``service/cli/service.py``): connection options on every command,
errors print ``error: CODE: message`` and exit 2, a job that does not succeed exits 2, ``--detach``
prints the job name and returns, ``--json`` prints the messages as JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from service.cli.common import LogEvery
from service.cli.connect import _conn, _remote_errors, connection_options
from service.cli.jobs import _follow, _json
from service.cli.service import remote


# -- alignment --------------------------------------------------------------------------------------
@remote.command("align")
@click.argument("model_a")
@click.argument("model_b")
@click.option("--architecture", default=None, help="Ready spec: mlp, cnn, vgg, resnet, transformer.")
@click.option("--spec", "spec_ref", default=None, help="A permutation spec JSON on the server.")
@click.option("--n-heads", default=0, type=int, help="Attention heads (architecture transformer).")
@click.option("--rope", is_flag=True, help="Rotary embeddings: move whole heads only.")
@click.option("--max-iter", default=0, type=int, help="Coordinate-descent sweeps at most (0: 100).")
@click.option("--restarts", default=0, type=int, help="Restarts (0: 1).")
@click.option("--seed", default=0, type=int)
@click.option(
    "-o", "--output", "output_path", default="", help="Output folder under a root (default: job://)."
)
@click.option("--overwrite", is_flag=True)
@click.option("--detach", is_flag=True, help="Print the job name and return.")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_align(model_a: str, model_b: str, architecture: str | None, spec_ref: str | None, n_heads: int,
                 rope: bool, max_iter: int, restarts: int, seed: int, output_path: str, overwrite: bool,
                 detach: bool, as_json: bool, **kw: Any) -> None:  # fmt: skip
    """Align MODEL_B to MODEL_A (Git Re-Basin weight matching) on the server and write pi(B)."""
    fields: dict[str, Any] = {"n_heads": n_heads, "rope": rope, "max_iter": max_iter, "n_restarts": restarts,
                              "seed": seed, "output_path": output_path, "overwrite": overwrite}  # fmt: skip
    if architecture:
        fields["architecture"] = architecture
    if spec_ref:
        fields["spec_ref"] = spec_ref
    with _conn(kw) as client:
        _follow(client, client.create_align_job(model_a, model_b, **fields), detach, as_json)


# -- lineage ----------------------------------------------------------------------------------------
@remote.command("lineage")
@click.argument("child")
@click.argument("candidates", nargs=-1, required=True)
@click.option(
    "--method",
    default="weights",
    show_default=True,
    help="A lineage method the server serves (its ListLineageMethods: weights, aligned, learned here).",
)
@click.option("--architecture", default="", help="aligned: ready spec (mlp, cnn, resnet, transformer).")
@click.option("--n-heads", default=0, type=int)
@click.option("--spec", "spec_ref", default="", help="aligned: a spec JSON on the server.")
@click.option("--detector", "detector_ref", default="", help="learned: a detector file on the server.")
@click.option("--family-threshold", default=None, type=float)
@click.option("--path-threshold", default=None, type=float)
@click.option("--keep-heads", is_flag=True, help="Compare classifier heads too.")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_lineage(child: str, candidates: tuple[str, ...], method: str, architecture: str, n_heads: int,
                   spec_ref: str, detector_ref: str, family_threshold: float | None, path_threshold: float | None,
                   keep_heads: bool, as_json: bool, **kw: Any) -> None:  # fmt: skip
    """Which CANDIDATE was CHILD fine-tuned from, or none of them (DetectLineage on the server)."""
    fields: dict[str, Any] = {"method": method, "architecture": architecture, "n_heads": n_heads,
                              "spec_ref": spec_ref, "detector_ref": detector_ref, "keep_heads": keep_heads}  # fmt: skip
    if family_threshold is not None:
        fields["family_threshold"] = family_threshold
    if path_threshold is not None:
        fields["path_threshold"] = path_threshold
    ranked, answer = [], None
    # one line per stage and then at most one every 2 s (a terminal) or 10 s (a log), not one per step
    logger, stage = LogEvery(2.0 if sys.stderr.isatty() else 10.0), None
    with _conn(kw) as client:
        for ev in client.detect_lineage(child, list(candidates), **fields):
            which = ev.WhichOneof("event")
            if which == "progress":
                if not as_json:
                    p = ev.progress
                    logger.line(f"{p.stage}: {p.done}/{p.total}", force=p.stage != stage or p.done == p.total)
                    stage = p.stage
            elif which == "candidate":
                ranked.append(ev.candidate)
            else:
                answer = ev.answer
    assert answer is not None
    if as_json:
        click.echo(json.dumps({"candidates": [_json(c) for c in ranked], "answer": _json(answer)}, indent=2))
        return
    for c in ranked:
        rel = "related" if c.related else "unrelated"
        click.echo(f"{c.rank:>3}  {c.score:8.4f}  {rel:<9}  {c.name}")
    for s in answer.skipped:
        click.echo(f"  -  skipped   {s.name}: {s.reason}")
    if answer.parent:
        click.echo(f"parent: {answer.parent}   (chain: {' -> '.join([answer.child, *answer.chain])})")
    else:
        click.echo(f"parent: none   ({answer.reason})")


@remote.command("lineage-graph")
@click.argument("models", nargs=-1, required=True)
@click.option("--direction", default="auto", show_default=True, help="auto, norm, kurtosis or none.")
@click.option("--family-threshold", default=None, type=float)
@click.option("--merge-threshold", default=None, type=float)
@click.option("--no-merges", is_flag=True, help="Do not look for merges.")
@click.option("--keep-heads", is_flag=True, help="Compare classifier heads too.")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_lineage_graph(models: tuple[str, ...], direction: str, family_threshold: float | None,
                         merge_threshold: float | None, no_merges: bool, keep_heads: bool, as_json: bool,
                         **kw: Any) -> None:  # fmt: skip
    """The directed model graph of MODELS on the server: families, fine-tune edges, merges (RecoverModelGraph)."""
    fields: dict[str, Any] = {"direction": direction, "no_merges": no_merges, "keep_heads": keep_heads}
    if family_threshold is not None:
        fields["family_threshold"] = family_threshold
    if merge_threshold is not None:
        fields["merge_threshold"] = merge_threshold
    logger, stage = LogEvery(2.0 if sys.stderr.isatty() else 10.0), None

    def progress(p: Any) -> None:
        nonlocal stage
        if not as_json:
            logger.line(f"{p.stage}: {p.done}/{p.total}", force=p.stage != stage or p.done == p.total)
            stage = p.stage

    with _conn(kw) as client:
        g = client.recover_model_graph(list(models), progress=progress, **fields)
    if as_json:
        click.echo(json.dumps(_json(g.graph), indent=2))
        return
    for i, fam in enumerate(g.families, 1):
        click.echo(f"family {i}: {', '.join(fam.models)}")
    for e in g.edges:
        if e.kind == "fine-tune":
            click.echo(f"  {e.parent} -> {e.child}   (d {e.distance:.3g}, confidence {e.confidence:.2f})")
    for m in g.merges:
        parts = " + ".join(f"{w:.2f}*{c}" for c, w in sorted(m.components.items(), key=lambda kv: -kv[1]))
        click.echo(f"  merge {m.name} = {parts}" + (f" on base {m.base}" if m.base else ""))
    for s in g.skipped:
        click.echo(f"  skipped {s.name}: {s.reason}")


# -- metanets ---------------------------------------------------------------------------------------
@remote.command("predict")
@click.argument("metanet")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option(
    "--spec", "spec_ref", default="", help="A permutation spec JSON on the server for every checkpoint."
)
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_predict(
    metanet: str, checkpoints: tuple[str, ...], spec_ref: str, as_json: bool, **kw: Any
) -> None:
    """Run a stored metanet (metanets/<id>) on CHECKPOINTS: one prediction each."""
    with _conn(kw) as client:
        resp = client.predict(metanet, list(checkpoints), spec_ref)
    if as_json:
        click.echo(json.dumps(_json(resp), indent=2))
        return
    for p in resp.predictions:
        value = f"{p.number:.6g}" if p.WhichOneof("value") == "number" else p.label
        click.echo(f"{resp.target}={value}  {p.checkpoint}")


@remote.command("embed")
@click.argument("metanet")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--spec", "spec_ref", default="")
@connection_options
@_remote_errors
def remote_embed(metanet: str, checkpoints: tuple[str, ...], spec_ref: str, **kw: Any) -> None:
    """Invariant embeddings of CHECKPOINTS by a stored metanet, as JSON lines."""
    with _conn(kw) as client:
        resp = client.embed(metanet, list(checkpoints), spec_ref)
    for e in resp.embeddings:
        click.echo(json.dumps({"checkpoint": e.checkpoint, "embedding": list(e.values)}))


@remote.command("zoo")
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", "output_path", default="", help="Zoo folder under a root (default: job://).")
@click.option("--workers", default=0, type=int, help="Training processes on the server (0: 1).")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_zoo(config: str, output_path: str, workers: int, detach: bool, as_json: bool, **kw: Any) -> None:
    """Build (or resume) the model zoo of CONFIG (YAML/JSON, local file) on the server."""
    with open(config) as fh:
        text = fh.read()
    with _conn(kw) as client:
        _follow(client, client.create_zoo_job(text, output_path, workers=workers), detach, as_json)


@remote.command("train")
@click.argument("zoo")
@click.option("--model", default="gmn", show_default=True, help="gmn, unf, statnn, flat, flat_aug, deepsets.")
@click.option("--target", default="", help="Record field to predict (default test_acc).")
@click.option("--epochs", default=0, type=int)
@click.option("--batch-size", default=0, type=int)
@click.option("--lr", default=0.0, type=float)
@click.option("--seed", default=0, type=int)
@click.option("--model-args", default="{}", help='Constructor arguments as JSON ({"hidden": 64}).')
@click.option("--name", "display_name", default="", help="A display name for the metanet.")
@click.option(
    "-o", "--output", "output_path", default="", help="Folder under a root (default: the server's store)."
)
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_train(zoo: str, model: str, target: str, epochs: int, batch_size: int, lr: float, seed: int,
                 model_args: str, display_name: str, output_path: str, detach: bool, as_json: bool,
                 **kw: Any) -> None:  # fmt: skip
    """Train a metanet on ZOO (a server path or job://<zoo job>); it is stored as metanets/<id>."""
    try:
        args = json.loads(model_args)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="--model-args") from None
    with _conn(kw) as client:
        job = client.create_train_job(zoo, model=model, target=target, epochs=epochs, batch_size=batch_size, lr=lr,
                                      seed=seed, model_args=args, display_name=display_name,
                                      output_path=output_path)  # fmt: skip
        _follow(client, job, detach, as_json)


@remote.command("metanets")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_metanets(as_json: bool, **kw: Any) -> None:
    """List the metanets the server trained, newest first."""
    with _conn(kw) as client:
        resp = client.list_metanets(page_size=1000)
    if as_json:
        click.echo(json.dumps([_json(m) for m in resp.metanets], indent=2))
        return
    for m in resp.metanets:
        metrics = " ".join(f"{k}={v:.3g}" for k, v in sorted(m.metrics.items()) if not k.endswith("_records"))
        click.echo(f"{m.name}  {m.model:<8} {m.target:<10} {m.display_name}  {metrics}")


# -- recipe search ----------------------------------------------------------------------------------
@remote.command("evolve")
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", "output_path", default="",
              help="Search folder under a root (default: job://). A search of the same config there is resumed.")
@click.option("--trials", default=0, type=click.IntRange(min=0),
              help="Stop at this many finished trials in the study (overrides budget.trials; 0: the config's).")
@click.option("--save-model", is_flag=True, help="Also write the best merge to OUTPUT/model.")
@click.option("--detach", is_flag=True, help="Print the job name and return.")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_evolve(config: str, output_path: str, trials: int, save_model: bool, detach: bool, as_json: bool,
                  **kw: Any) -> None:  # fmt: skip
    """Search the ranges of the recipe in CONFIG (YAML/JSON, local file) on the server (evolutionary model
    merging; a job of kind "evolve"). Models, data and metanets it names are paths on the server. The
    server never runs code: the 'code' objective is refused."""
    with open(config) as fh:
        text = fh.read()
    with _conn(kw) as client:
        job = client.create_evolve_job(text, output_path, trials=trials, save_model=save_model)
        _follow(client, job, detach, as_json)
        if not detach and not as_json:
            res = client.job_result(client.get_job(job.name))
            if res is not None and res.best:
                b = res.best[0]
                vals = ", ".join(f"{n} {v:.6g}" for n, v in zip(res.objectives, b.values, strict=False))
                click.echo(f"best of {res.complete} trial(s): #{b.number} {b.method}: {vals}")
                click.echo(f"recipe: {res.best_recipe}")


# -- soups ------------------------------------------------------------------------------------------
@remote.group("soup")
def remote_soup() -> None:
    """Living soups on the server (Diffusion Soup; merge.soups.folder): create, add, remove, build, show."""


def _member_arg(text: str) -> dict[str, Any]:
    """``MODEL``, ``MODEL:WEIGHT`` or ``ID=MODEL[:WEIGHT]``."""
    mid, _, rest = text.partition("=") if "=" in text else ("", "", text)
    model, weight = rest, 0.0
    head, _, tail = rest.rpartition(":")
    if head:
        try:
            model, weight = head, float(tail)
        except ValueError:
            pass
    return {"model": model, "id": mid, "weight": weight}


@remote_soup.command("create")
@click.argument("members", nargs=-1)
@click.option(
    "-o", "--soup", "soup", default="", help="Soup folder under a root (default: kept as job://<id>)."
)
@click.option("--base", default="", help="A base model the members must match.")
@click.option("--dtype", default="", help="Dtype of built soups (default: the members').")
@click.option("--name", "display_name", default="")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_soup_create(members: tuple[str, ...], soup: str, base: str, dtype: str, display_name: str,
                       detach: bool, as_json: bool, **kw: Any) -> None:  # fmt: skip
    """Create a soup with MEMBERS (MODEL, MODEL:WEIGHT or ID=MODEL[:WEIGHT])."""
    with _conn(kw) as client:
        job = client.create_soup(soup, [_member_arg(m) for m in members], base=base, dtype=dtype,
                                 display_name=display_name)  # fmt: skip
        _follow(client, job, detach, as_json)


@remote_soup.command("add")
@click.argument("soup")
@click.argument("member")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_soup_add(soup: str, member: str, detach: bool, as_json: bool, **kw: Any) -> None:
    """Add MEMBER (MODEL, MODEL:WEIGHT or ID=MODEL[:WEIGHT]) to SOUP (a path or job://<id>)."""
    with _conn(kw) as client:
        _follow(client, client.add_soup_member(soup, _member_arg(member)), detach, as_json)


@remote_soup.command("remove")
@click.argument("soup")
@click.argument("member_id")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_soup_remove(soup: str, member_id: str, detach: bool, as_json: bool, **kw: Any) -> None:
    """Remove MEMBER_ID from SOUP, exactly (the soup that never had it)."""
    with _conn(kw) as client:
        _follow(client, client.remove_soup_member(soup, member_id), detach, as_json)


@remote_soup.command("build")
@click.argument("soup")
@click.option(
    "-o", "--output", "output_path", default="", help="Output folder under a root (default: job://)."
)
@click.option("--overwrite", is_flag=True)
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_soup_build(
    soup: str, output_path: str, overwrite: bool, detach: bool, as_json: bool, **kw: Any
) -> None:
    """Write SOUP's weighted mean as a checkpoint folder on the server."""
    with _conn(kw) as client:
        _follow(client, client.build_soup(soup, output_path, overwrite=overwrite), detach, as_json)


@remote_soup.command("show")
@click.argument("soup")
@click.option("--verify", is_flag=True, help="Hash every member file.")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_soup_show(soup: str, verify: bool, as_json: bool, **kw: Any) -> None:
    """Show SOUP's manifest: members, weights, history."""
    with _conn(kw) as client:
        s = client.get_soup(soup, verify=verify)
    if as_json:
        click.echo(json.dumps(_json(s), indent=2))
        return
    click.echo(f"{s.path}  ({s.kind or 'empty'}, soup id {s.soup_id[:12]}, total weight {s.total_weight:g})")
    for m in s.members:
        click.echo(f"  {m.id:<16} w={m.weight:<6g} {m.path}  {m.status}".rstrip())
    for e in s.history:
        click.echo(f"  {e.time}  {e.op:<6} {e.member}")
