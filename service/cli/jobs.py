"""``weightsmith remote job list|show|watch|cancel|retry``: jobs of every kind (JobService), one set of
commands; the previous release's merge-only ``remote jobs|show|cancel|retry`` are hidden aliases."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from service.cli.connect import _conn, _remote_errors, connection_options


def _json(msg: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


JOB_HEADER = f"{'JOB':<32}  {'KIND':<6} {'STATE':<11} {'SUMMARY':<24} {'CREATED':<19} {'TOOK':>7}  PROGRESS"


def _took(job: Any) -> str:
    if not job.HasField("start_time"):
        return "-"
    end = job.end_time.ToNanoseconds() if job.HasField("end_time") else None
    if end is None:
        import time

        end = time.time_ns()
    return f"{(end - job.start_time.ToNanoseconds()) / 1e9:.1f}s"


def _job_line(job: Any) -> str:
    """One job as a row under :data:`JOB_HEADER`: a running job's progress; an ended job's output or error."""
    import datetime

    from service.client import state_name

    state = state_name(job.state)
    p = job.progress
    if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
        prog = f"-> {job.output_path}" if state == "SUCCEEDED" else ""
    elif p.steps_total:
        prog = f"{p.phase or '-'} {p.steps_done}/{p.steps_total} {p.unit}"
    elif p.tensors_total:
        prog = f"{p.phase or '-'} {p.tensors_done}/{p.tensors_total} tensors"
    else:
        prog = p.phase or "-"
    if job.HasField("error"):
        prog = f"{prog}  {job.error.code}: {job.error.message}".strip()
    created = datetime.datetime.fromtimestamp(job.create_time.ToSeconds()).strftime("%Y-%m-%d %H:%M:%S")
    name = job.name.removeprefix("jobs/")
    return f"{name:<32}  {job.kind:<6} {state:<11} {job.summary:<24} {created:<19} {_took(job):>7}  {prog}"


def _follow(client: Any, job: Any, detach: bool, as_json: bool) -> None:
    """Print the job (detach) or follow it, one stderr line per phase or step, then its result."""
    from service._proto.weightsmith.v1 import job_pb2
    from service.client import TERMINAL_STATES as TERMINAL

    if detach:
        click.echo(job.name)
        return
    last = None
    for ev in client.watch(job.name):
        p = ev.job.progress
        key = (p.phase, p.steps_done, ev.job.state)
        if ev.job.state in TERMINAL:  # the closing row below says how it ended (not "done" twice)
            continue
        if key != last:
            last = key
            metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(p.metrics.items()))
            steps = f" {p.steps_done}/{p.steps_total} {p.unit}" if p.steps_total else ""
            click.echo(f"{job.name}: {p.phase or '-'}{steps} {metrics}".rstrip(), err=True)
        if client.still_interrupted(ev.job):  # not a replayed event of an earlier attempt
            break
    final = client.get_job(job.name)
    res = client.job_result(final)
    if as_json:
        click.echo(
            json.dumps({"job": _json(final), "result": _json(res) if res is not None else None}, indent=2)
        )
    else:
        click.echo(JOB_HEADER)
        click.echo(_job_line(final))
    if final.state != job_pb2.JOB_STATE_SUCCEEDED:
        sys.exit(2)


# -- jobs of every kind -----------------------------------------------------------------------------
_STATES = ["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]


@click.group("job")
def remote_job() -> None:
    """Jobs of every kind (merge, align, soup, zoo, train): list, show, cancel, retry, watch."""


def _job_and_result(client: Any, job: Any) -> dict[str, Any]:
    res = client.job_result(job)
    return {"job": _json(job), "result": _json(res) if res is not None else None}


@remote_job.command("list")
@click.option("--kind", "kinds", multiple=True, help="Only jobs of this kind (repeatable).")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(_STATES), help="Only jobs in this state (repeatable)."
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_job_list(kinds: tuple[str, ...], states: tuple[str, ...], limit: int, as_json: bool, **kw: Any) -> None:
    """List jobs, newest first."""
    with _conn(kw) as client:
        jobs = []
        for j in client.iter_jobs(list(states), page_size=min(limit, 1000), kinds=list(kinds)):
            jobs.append(j)
            if len(jobs) >= limit:
                break
    if as_json:
        click.echo(json.dumps([_json(j) for j in jobs], indent=2))
        return
    click.echo(JOB_HEADER)
    for j in jobs:
        click.echo(_job_line(j))


@remote_job.command("show")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_job_show(job: str, as_json: bool, **kw: Any) -> None:
    """Show one job (with --json, its request and result too)."""
    with _conn(kw) as client:
        j = client.get_job(job)
        click.echo(json.dumps(_job_and_result(client, j), indent=2) if as_json else f"{JOB_HEADER}\n{_job_line(j)}")


@remote_job.command("cancel")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_job_cancel(job: str, as_json: bool, **kw: Any) -> None:
    """Cancel a queued, running or interrupted job (a running one stops at its next step)."""
    with _conn(kw) as client:
        j = client.cancel_job(job)
        click.echo(json.dumps(_job_and_result(client, j), indent=2) if as_json else f"{JOB_HEADER}\n{_job_line(j)}")


@remote_job.command("retry")
@click.argument("job")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_job_retry(job: str, detach: bool, as_json: bool, **kw: Any) -> None:
    """Queue an interrupted or failed job again, and follow it (unless --detach)."""
    with _conn(kw) as client:
        _follow(client, client.retry_job(job), detach, as_json)


@remote_job.command("watch")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_job_watch(job: str, as_json: bool, **kw: Any) -> None:
    """Follow a job until it ends, one line per phase or step."""
    with _conn(kw) as client:
        _follow(client, client.get_job(job), False, as_json)


def _alias(old: str, new: click.Command, **fixed: Any) -> click.Command:
    """``weightsmith remote <old>``: the previous release's name of ``remote job <new>``, kept for one
    release (hidden; says so on stderr). ``fixed``: what the old command always did (``retry``
    returned at once)."""

    @click.pass_context
    def run(ctx: click.Context, **kw: Any) -> Any:
        click.echo(
            f"note: 'weightsmith remote {old}' is now 'weightsmith remote job {new.name}'; "
            "the old name goes in the next release",
            err=True,
        )
        return ctx.invoke(new, **{**kw, **fixed})

    params = [p for p in new.params if p.name not in fixed]
    cmd = click.Command(old, callback=run, params=params, hidden=True, help=f"Old name of `remote job {new.name}`.")
    return cmd


def add_job_commands(remote: click.Group) -> None:
    """``remote job ...`` and, for one release, the previous names ``remote jobs|show|cancel|retry``."""
    remote.add_command(remote_job)
    remote.add_command(_alias("jobs", remote_job_list))
    remote.add_command(_alias("show", remote_job_show))
    remote.add_command(_alias("cancel", remote_job_cancel))
    remote.add_command(_alias("retry", remote_job_retry, detach=True))
