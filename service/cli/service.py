"""``weightsmith serve`` and ``weightsmith remote ...``: the service's command line.

The lead's CLI group adds them with ``main.add_command(serve)`` and ``main.add_command(remote)``.
``python -m service.cli.service`` runs the same commands standalone. gRPC is imported only when
a command runs, so ``weightsmith merge`` does not pay for it.

Errors print one line ``error: CODE: message`` on stderr and exit with code 2 (like the CLI).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from service.cli.connect import _conn, _remote_errors, connection_options
from service.cli.jobs import add_job_commands


def _size(ctx: click.Context, param: click.Parameter, value: Any) -> int | None:
    if value is None:
        return None
    from merge.checkpoint import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _default_memory_budget() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return max(1 << 30, total // 2)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=50051,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0: any free port; see --port-file).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    envvar="WEIGHTSMITH_DATA_DIR",
    default=str(Path("~/.weightsmith/server").expanduser()),
    show_default=True,
    help="Job store (SQLite), uploads, default outputs, job logs.",
)
@click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(file_okay=False, exists=True),
    help="Folder the server may read models from and write outputs to (repeatable). "
    "Relative paths in requests are taken relative to a root.",
)
@click.option(
    "--token", "tokens", multiple=True, help="Accepted bearer token (repeatable; or $WEIGHTSMITH_TOKEN)."
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="File with accepted tokens, one per line.",
)
@click.option(
    "--tls-cert", type=click.Path(dir_okay=False, exists=True), default=None, help="Server certificate (PEM)."
)
@click.option(
    "--tls-key", type=click.Path(dir_okay=False, exists=True), default=None, help="Server private key (PEM)."
)
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Require client certificates signed by this CA (mTLS).",
)
@click.option(
    "--max-running",
    type=click.IntRange(1, 256),
    default=None,
    help="Jobs running at once [default: half the CPU cores, at least 1].",
)
@click.option(
    "--max-queued",
    type=click.IntRange(0, 100000),
    default=16,
    show_default=True,
    help="Queued jobs beyond which CreateMergeJob answers RESOURCE_EXHAUSTED.",
)
@click.option(
    "--memory-budget",
    default=None,
    callback=_size,
    help="Memory the running jobs may claim together, e.g. 8GB [default: half the RAM].",
)
@click.option(
    "--max-models",
    default=32,
    show_default=True,
    type=click.IntRange(1, 10000),
    help="Most models one recipe may reference.",
)
@click.option(
    "--job-workers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Merge threads per job (the default of a job's options.workers).",
)
@click.option(
    "--job-threads",
    default=None,
    type=click.IntRange(1, 256),
    help="torch threads per job [default: cores / max-running].",
)
@click.option(
    "--max-upload",
    "max_upload",
    default="256MB",
    show_default=True,
    callback=_size,
    help="Largest checkpoint upload or download.",
)
@click.option(
    "--shutdown-grace",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds running jobs get to finish on SIGTERM before they are interrupted.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Device the jobs compute on (cpu, cuda, cuda:1...); workers fork from a CUDA-free forkserver.",
)
@click.option(
    "--resume-interrupted", is_flag=True, help="Queue jobs interrupted by a crash again at start-up."
)
@click.option("--reflection/--no-reflection", default=True, show_default=True, help="gRPC server reflection.")
@click.option(
    "--hub/--no-hub",
    "hub_enabled",
    default=False,
    show_default=True,
    help="Allow Hub model references (downloads into --hub-cache-dir).",
)
@click.option("--hub-offline", is_flag=True, help="Hub references from the local cache only.")
@click.option("--hub-endpoint", default=None, help="Hub endpoint URL.")
@click.option("--hub-cache-dir", type=click.Path(file_okay=False), default=None, help="Hub cache folder.")
@click.option("--hub-token", envvar="HF_TOKEN", default=None, help="Hub token (default: $HF_TOKEN).")
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the port actually bound to this file once serving.",
)
@click.option(
    "--slow-down",
    "delay_per_tensor",
    default=0.0,
    type=float,
    hidden=True,
    help="Testing/demos: sleep this many seconds after each merged tensor.",
)
def serve(
    host: str,
    port: int,
    data_dir: str,
    roots: tuple[str, ...],
    tokens: tuple[str, ...],
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    max_running: int | None,
    max_queued: int,
    memory_budget: int | None,
    max_models: int,
    job_workers: int,
    job_threads: int | None,
    max_upload: int,
    shutdown_grace: float,
    device: str,
    resume_interrupted: bool,
    reflection: bool,
    hub_enabled: bool,
    hub_offline: bool,
    hub_endpoint: str | None,
    hub_cache_dir: str | None,
    hub_token: str | None,
    port_file: str | None,
    delay_per_tensor: float,
) -> None:
    """Run the gRPC service (merge jobs, checkpoint inspection, small uploads/downloads)."""
    from service.auth import load_tokens, token_from_env
    from service.paths import HubConfig
    from service.rpc.server import DataDirBusy, ServerConfig, run

    env_tok = token_from_env()
    try:
        toks = load_tokens([*tokens, *([env_tok] if env_tok else [])], token_file)
    except (ValueError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="--token") from None
    if bool(tls_cert) != bool(tls_key):
        raise click.BadParameter("give both --tls-cert and --tls-key", param_hint="--tls-cert")
    if tls_client_ca and not tls_cert:
        raise click.BadParameter("mTLS needs --tls-cert and --tls-key too", param_hint="--tls-client-ca")
    if device != "cpu":
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise click.BadParameter(f"{device}: no CUDA device is available", param_hint="--device")
    cores = os.cpu_count() or 1
    running = max_running or max(1, cores // 2)
    cfg = ServerConfig(
        host=host,
        port=port,
        data_dir=Path(data_dir).expanduser(),
        roots=[Path(r) for r in roots],
        tokens=toks,
        tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None,
        tls_client_ca=Path(tls_client_ca) if tls_client_ca else None,
        max_running=running,
        max_queued=max_queued,
        memory_budget=memory_budget or _default_memory_budget(),
        max_models=max_models,
        job_workers=job_workers,
        job_threads=job_threads or max(1, cores // running),
        max_upload_bytes=max_upload,
        shutdown_grace=shutdown_grace,
        resume_interrupted=resume_interrupted,
        reflection=reflection,
        port_file=Path(port_file) if port_file else None,
        hub=HubConfig(
            enabled=hub_enabled,
            offline=hub_offline,
            endpoint=hub_endpoint,
            cache_dir=hub_cache_dir,
            token=hub_token,
        ),
        delay_per_tensor=delay_per_tensor,
        device=device,
    )
    try:
        run(cfg)
    except (DataDirBusy, OSError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.stderr.flush()
        os._exit(2)
    # Everything is stopped, flushed and closed: skip the interpreter's slow teardown (torch,
    # multiprocessing atexit hooks) so that a restart is not kept waiting.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# remote
# ---------------------------------------------------------------------------------------------


def _job_json(job: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(job, preserving_proto_field_name=True)


@click.group()
def remote() -> None:
    """Talk to a running weightsmith server (see `weightsmith serve`)."""


add_job_commands(remote)


_REF_KEYS = ("base_model", "tokenizer_source")


def _upload_local_refs(client: Any, recipe: dict[str, Any]) -> dict[str, str]:
    """Upload every model reference that is a local path; rewrite the recipe in place."""
    uploaded: dict[str, str] = {}

    def swap(ref: Any) -> Any:
        if not isinstance(ref, str) or not Path(ref).expanduser().exists():
            return ref
        if ref not in uploaded:
            click.echo(f"uploading {ref} ...", err=True)
            uploaded[ref] = client.upload(Path(ref).expanduser())
        return uploaded[ref]

    for k in _REF_KEYS:
        if k in recipe:
            recipe[k] = swap(recipe[k])
    for m in recipe.get("models") or []:
        if isinstance(m, dict) and "model" in m:
            m["model"] = swap(m["model"])
    for s in recipe.get("slices") or []:
        if not isinstance(s, dict):
            continue
        if "base_model" in s:
            s["base_model"] = swap(s["base_model"])
        for src in s.get("sources") or []:
            if isinstance(src, dict) and "model" in src:
                src["model"] = swap(src["model"])
    tok = recipe.get("tokenizer")
    if isinstance(tok, dict) and "source" in tok:
        tok["source"] = swap(tok["source"])
    return uploaded


@remote.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "-o",
    "--out",
    "output_path",
    default="",
    help="Output folder on the server (under a root). Default: kept by the server as job://<id>.",
)
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option(
    "--compute-dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16"]), default=None
)
@click.option("--shard-size", default=None, callback=_size, help="Max bytes per output shard (e.g. 2GB).")
@click.option(
    "--workers", default=0, type=click.IntRange(0, 16), help="Merge threads in the job (0: server default)."
)
@click.option("--request-id", default=None, help="Idempotency key (default: random).")
@click.option(
    "--upload-local", is_flag=True, help="Upload model paths that exist on this machine first (small models)."
)
@click.option(
    "--download",
    "download_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="After success, download the output into this local folder.",
)
@click.option("--dry-run", is_flag=True, help="Validate and plan on the server; create no job.")
@click.option("--detach", is_flag=True, help="Print the job name and return without waiting.")
@click.option("--json", "as_json", is_flag=True, help="Print the final job as JSON on stdout.")
@connection_options
@_remote_errors
def remote_merge(
    recipe: str,
    output_path: str,
    overwrite: bool,
    compute_dtype: str | None,
    shard_size: int | None,
    workers: int,
    request_id: str | None,
    upload_local: bool,
    download_dir: str | None,
    dry_run: bool,
    detach: bool,
    as_json: bool,
    **kw: Any,
) -> None:
    """Run RECIPE (YAML) as a merge job on the server, with a progress bar fed by the job's events."""
    import yaml

    from service.client import state_name
    from service.messages import merge_job_pb

    text = Path(recipe).read_text()
    if download_dir and not dry_run:
        from merge.atomic import check_output

        check_output(download_dir, overwrite=False)  # before the job runs, not after
    with _conn(kw) as client:
        payload: str | dict[str, Any] = text
        if upload_local:
            data = yaml.safe_load(text)
            if isinstance(data, dict) and _upload_local_refs(client, data):
                payload = yaml.safe_dump(data, sort_keys=False)
        resp = client.create_merge_job(
            payload,
            output_path=output_path,
            overwrite=overwrite,
            request_id=request_id,
            compute_dtype=compute_dtype or "",
            shard_size=shard_size or 0,
            workers=workers,
            validate_only=dry_run,
        )
        if dry_run:
            from google.protobuf import json_format

            plan = json_format.MessageToDict(resp.plan, preserving_proto_field_name=True)
            click.echo(
                json.dumps({"dry_run": True, **plan}, indent=2)
                if as_json
                else f"plan: {resp.plan.method}: {resp.plan.tensors_total} tensors "
                f"({resp.plan.tensors_merged} merged, {resp.plan.tensors_copied} copied), "
                f"{resp.plan.bytes_out:,} bytes out; no job created (dry run)"
            )
            return
        job = resp.job
        click.echo(f"job {job.name}", err=True)
        if detach:
            click.echo(json.dumps(_job_json(job), indent=2) if as_json else job.name)
            return
        try:
            job = merge_job_pb(_follow(client, job))
        except KeyboardInterrupt:
            click.echo(f"\ndetached; the job keeps running (weightsmith remote job cancel {job.name})", err=True)
            sys.exit(130)
        if as_json:
            click.echo(json.dumps(_job_json(job), indent=2))
        state = state_name(job.state)
        if state != "SUCCEEDED":
            msg = f"{job.error.code}: {job.error.message}" if job.HasField("error") else state
            hint = f" (retry with: weightsmith remote job retry {job.name})" if state == "INTERRUPTED" else ""
            click.echo(f"error: {job.name} {state.lower()}: {msg}{hint}", err=True)
            sys.exit(2)
        r = job.result
        if download_dir:
            client.download(r.output_ref, download_dir)
        if not as_json:
            where = download_dir or r.output_path
            click.echo(
                f"merged {r.tensors_total} tensors ({r.bytes_written:,} bytes) with {r.method} into {where} "
                f"in {r.seconds:.1f} s"
            )


def _follow(client: Any, job: Any) -> Any:
    """Watch a job with a tqdm bar on stderr (when it is a terminal) until it ends."""
    from tqdm import tqdm

    from service._proto.weightsmith.v1 import job_pb2

    bar = None
    last = job
    try:
        for ev in client.watch(job.name):
            last = ev.job
            p = ev.job.progress
            if bar is None and p.bytes_total and sys.stderr.isatty():
                bar = tqdm(
                    total=p.bytes_total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="merge",
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            if bar is not None:
                bar.set_postfix_str(f"{p.tensors_done}/{p.tensors_total} tensors", refresh=False)
                bar.update(max(0, p.bytes_done - bar.n))
            if client.still_interrupted(ev.job):  # not a replayed event of an earlier attempt
                break
    finally:
        if bar is not None:
            bar.close()
    final = client.get_job(job.name)
    return final if final.state != job_pb2.JOB_STATE_UNSPECIFIED else last


@remote.command("methods")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_methods(as_json: bool, **kw: Any) -> None:
    """List the server's merge methods."""
    from google.protobuf import json_format

    with _conn(kw) as client:
        methods = client.list_methods()
    if as_json:
        click.echo(
            json.dumps(
                [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in methods], indent=2
            )
        )
        return
    for m in methods:
        click.echo(f"{m.name}  ({m.kind}, base {m.base_model})  {m.paper}")
        for p in m.parameters:
            click.echo(
                f"    - {p.name}: {p.type}, {'per model' if p.per_model else 'global'}"
                f"{', required' if p.required else ''}"
            )


@remote.command("inspect")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@connection_options
@_remote_errors
def remote_inspect(ref: str, as_json: bool, **kw: Any) -> None:
    """List a server-side checkpoint's tensors (path under a root, upload://, job://)."""
    with _conn(kw) as client:
        info = client.inspect(ref)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for t in info["tensors"]:
        click.echo(f"{t['name']}  {t['dtype']}  {t.get('shape', [])}")
    click.echo(
        f"{info['tensors_total']} tensors, {info['parameters_total']:,} parameters, "
        f"{info['bytes_total']:,} bytes"
    )


@remote.command("upload")
@click.argument("path", type=click.Path(exists=True))
@connection_options
@_remote_errors
def remote_upload(path: str, **kw: Any) -> None:
    """Upload a small checkpoint (file or folder); prints its upload:// reference."""
    with _conn(kw) as client:
        click.echo(client.upload(path))


@remote.command("download")
@click.argument("ref")
@click.option("-o", "--out", "dest", required=True, type=click.Path(file_okay=False), help="Local folder.")
@connection_options
@_remote_errors
def remote_download(ref: str, dest: str, **kw: Any) -> None:
    """Download a small checkpoint (e.g. job://<id>) into a local folder."""
    with _conn(kw) as client:
        files = client.download(ref, dest)
    click.echo(f"{len(files)} files into {dest}")


@remote.command("health")
@connection_options
@_remote_errors
def remote_health(**kw: Any) -> None:
    """Print the server's health status (exit code 2 unless SERVING)."""
    with _conn(kw) as client:
        status = client.health()
    click.echo(status)
    if status != "SERVING":
        sys.exit(2)


@click.group()
def _standalone() -> None:
    """weightsmith service commands (standalone entry point)."""


_standalone.add_command(serve)
_standalone.add_command(remote)

if __name__ == "__main__":  # pragma: no cover
    _standalone()
