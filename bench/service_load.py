"""Load test of the gRPC service over loopback: many small merge jobs from several client processes.

Three phases, all on the same small checkpoints (``--layers`` x ``--hidden`` LLaMA-named tensors,
``--models`` inputs per merge, ``--sets`` distinct model sets so merges differ):

1. **sequential latency**: one client submits ``--seq`` jobs one after the other (no queueing);
   the same merges are run by the CLI (``weightsmith merge``, one process per merge, as a user
   would) and by ``merge.execute.run_merge`` in this process (the floor: no process, no RPC);
2. **load**: ``--clients`` client processes each submit ``--jobs`` jobs back to back and watch
   each to the end (``WatchMergeJob``); the server runs ``--max-running`` at once;
3. **CLI at the same concurrency**: the load phase's merges as CLI processes, ``--max-running``
   at a time.

Reported: throughput, p50/p99 latency of ``CreateMergeJob`` and of whole merges (create -> final
event), the server's peak RSS (VmHWM of the server process) and the peak anonymous RSS of its
whole process tree (server + forkserver + workers; an over-count, forked workers share pages),
failed and lost jobs (every job is looked up at the end; every output is compared byte for byte
with the CLI's output of the same recipe), and the overhead versus the CLI. Everything stays on
127.0.0.1; the run is bounded by ``--timeout`` and by at most 400 jobs.

    .venv/bin/python bench/service_load.py                  # defaults: 4 clients x 6 jobs
    .venv/bin/python bench/service_load.py --clients 8 --jobs 10 --max-running 2

Writes ``bench/out/service_load.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    OUT,
    REPO,
    machine_info,
    print_table,
    project_python,
    tool_env,
    tree_rss_anon_kb,
    weightsmith_base_cmd,
    write_json,
)

TOKEN = "bench-token-0123456789"
MAX_JOBS = 400


# -- inputs -------------------------------------------------------------------------------------------
def make_sets(root: Path, sets: int, models: int, layers: int, hidden: int) -> list[list[Path]]:
    import torch
    from safetensors.torch import save_file

    out = []
    for s in range(sets):
        g = torch.Generator().manual_seed(s)
        shapes = {"model.embed_tokens.weight": (4 * hidden, hidden), "model.norm.weight": (hidden,)}
        for i in range(layers):
            shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (2 * hidden, hidden)
            shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (hidden, 2 * hidden)
        base = {k: 0.02 * torch.randn(v, generator=g) for k, v in shapes.items()}
        paths = []
        for m in range(models):
            d = root / f"set{s}" / f"m{m}"
            d.mkdir(parents=True, exist_ok=True)
            sd = (
                base if m == 0 else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
            )
            save_file(sd, str(d / "model.safetensors"))
            (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
            paths.append(d)
        out.append(paths)
    return out


def recipe_text(models: list[Path]) -> str:
    lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
    lines += [f"  - model: {m}\n    parameters:\n      weight: {1.0 + i}" for i, m in enumerate(models)]
    return "\n".join(lines) + "\n"


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(len(xs) - 1, int(k) + 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# -- the server ------------------------------------------------------------------------------------------
class Server:
    def __init__(self, work: Path, root: Path, max_running: int, max_queued: int) -> None:
        self.port_file = work / "port"
        self.log = work / "server.log"
        cmd = [
            project_python(),
            "-m",
            "service.cli.service",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(self.port_file),
            "--data-dir",
            str(work / "data"),
            "--root",
            str(root),
            "--token",
            TOKEN,
            "--max-running",
            str(max_running),
            "--max-queued",
            str(max_queued),
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=tool_env(), stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + self.log.read_text())
            time.sleep(0.05)
        self.target = f"127.0.0.1:{int(self.port_file.read_text())}"
        self.peak_tree_anon_kb = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_tree_anon_kb = max(self.peak_tree_anon_kb, tree_rss_anon_kb(self.proc.pid))
            time.sleep(0.05)

    def vm_hwm_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# -- clients -------------------------------------------------------------------------------------------------
def client_worker(
    target: str, jobs: list[tuple[str, str]], start: Any, results: Any, deadline: float
) -> None:
    """One client process: submit each job, watch it to the end, report timings."""
    from service.client import Client, RemoteError, state_name

    out = []
    with Client(target, token=TOKEN, timeout=60) as c:
        start.wait()
        for recipe, output in jobs:
            t0 = time.perf_counter()
            try:
                job = c.create_merge_job(recipe, output_path=output).job
                t1 = time.perf_counter()
                final = c.wait(job.name, timeout=max(1.0, deadline - time.time()))
                t2 = time.perf_counter()
                out.append(
                    {
                        "name": job.name,
                        "output": output,
                        "create_s": t1 - t0,
                        "e2e_s": t2 - t0,
                        "state": state_name(final.state),
                        "error": final.error.message,
                    }
                )
            except (RemoteError, TimeoutError) as e:
                out.append(
                    {
                        "name": None,
                        "output": output,
                        "create_s": None,
                        "e2e_s": None,
                        "state": "ERROR",
                        "error": str(e),
                    }
                )
    results.put(out)


def run_clients(
    target: str, per_client: list[list[tuple[str, str]]], deadline: float
) -> tuple[list[dict], float]:
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=client_worker, args=(target, jobs, start, results, deadline))
        for jobs in per_client
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every client import and connect before the clock starts
    t0 = time.perf_counter()
    start.set()
    rows: list[dict] = []
    for _ in procs:
        rows += results.get(timeout=max(1.0, deadline - time.time()))
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(30)
    return rows, wall


# -- baselines ---------------------------------------------------------------------------------------------
def cli_merge(recipe: Path, out: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [*weightsmith_base_cmd(), "merge", str(recipe), "-o", str(out), "--json"],
        cwd=str(REPO),
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(f"CLI merge failed: {r.stderr}")
    return time.perf_counter() - t0


def cli_batch(items: list[tuple[Path, Path]], concurrency: int) -> tuple[list[float], float]:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        times = list(pool.map(lambda it: cli_merge(*it), items))
    return times, time.perf_counter() - t0


def engine_merge(recipe: str, out: Path) -> float:
    import yaml

    from merge.execute import run_merge
    from merge.plan import MergeOptions

    t0 = time.perf_counter()
    run_merge(yaml.safe_load(recipe), out, MergeOptions(), progress=lambda p: None)
    return time.perf_counter() - t0


# -- main ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=6, help="jobs per client in the load phase")
    ap.add_argument("--seq", type=int, default=8, help="jobs in the sequential-latency phase")
    ap.add_argument("--max-running", type=int, default=2)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run (s)")
    ap.add_argument("--out", type=Path, default=OUT / "service_load.json")
    ap.add_argument("--mixed-clients", type=int, default=3, help="clients in the mixed phase (0: skip it)")
    ap.add_argument(
        "--mixed-rounds", type=int, default=3, help="rounds of (merge, predict, lineage) per client"
    )
    ap.add_argument(
        "--only-mixed", action="store_true", help="run only the mixed phase (writes service_mixed.json)"
    )
    args = ap.parse_args()
    n_load = args.clients * args.jobs
    if n_load + args.seq > MAX_JOBS:
        ap.error(f"at most {MAX_JOBS} jobs per run")
    deadline = time.time() + args.timeout
    work = OUT / "service_load"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    sets = make_sets(root / "models", args.sets, args.models, args.layers, args.hidden)
    recipes = [recipe_text(s) for s in sets]
    for i, text in enumerate(recipes):
        (root / f"recipe{i}.yaml").write_text(text)
    # references: the CLI's output for each set
    ref = {}
    for i in range(len(sets)):
        cli_merge(root / f"recipe{i}.yaml", root / "out" / "ref" / f"s{i}")
        ref[i] = digest(root / "out" / "ref" / f"s{i}")
    print(
        f"{len(sets)} model sets x {args.models} models, "
        f"{sum(f.stat().st_size for f in (root / 'models').rglob('*.safetensors')) / len(sets) / 1e6:.2f} MB "
        "of inputs per merge",
        flush=True,
    )

    srv = Server(work, root, args.max_running, max_queued=n_load + args.seq + 8)
    if args.only_mixed:
        try:
            mixed = mixed_phase(srv, root, recipes, ref, args, deadline)
        finally:
            srv.stop()
        return report_mixed(
            mixed, args, OUT / "service_mixed.json" if args.out == OUT / "service_load.json" else args.out
        )
    submitted: list[dict] = []
    mixed = None
    try:
        from service.client import Client

        with Client(srv.target, token=TOKEN) as c:
            c.wait_ready()
            warm = c.create_merge_job(recipes[0], output_path=str(root / "out" / "warm")).job
            c.wait(warm.name, timeout=120)
        # 1. sequential latency: service, CLI, engine in-process
        seq_jobs = [[(recipes[k % len(sets)], str(root / "out" / "seq" / f"j{k}")) for k in range(args.seq)]]
        seq_rows, seq_wall = run_clients(srv.target, seq_jobs, deadline)
        submitted += seq_rows
        cli_seq, cli_seq_wall = cli_batch(
            [
                (root / f"recipe{k % len(sets)}.yaml", root / "out" / "cli_seq" / f"j{k}")
                for k in range(args.seq)
            ],
            1,
        )
        eng_seq = [
            engine_merge(recipes[k % len(sets)], root / "out" / "eng_seq" / f"j{k}") for k in range(args.seq)
        ]
        # 2. load
        per_client = [
            [
                (recipes[(c * args.jobs + k) % len(sets)], str(root / "out" / "load" / f"c{c}_j{k}"))
                for k in range(args.jobs)
            ]
            for c in range(args.clients)
        ]
        load_rows, load_wall = run_clients(srv.target, per_client, deadline)
        submitted += load_rows
        hwm_mb = srv.vm_hwm_kb() / 1024
        tree_mb = srv.peak_tree_anon_kb / 1024
        if args.mixed_clients > 0:
            mixed = mixed_phase(srv, root, recipes, ref, args, deadline)
        # every job accounted for, every output right
        with Client(srv.target, token=TOKEN) as c:
            on_server = {j.name: j for j in c.iter_jobs()}
    finally:
        srv.stop()
    # 3. the load phase's merges through the CLI at the server's concurrency
    cli_items = [
        (root / f"recipe{(c * args.jobs + k) % len(sets)}.yaml", root / "out" / "cli_load" / f"c{c}_j{k}")
        for c in range(args.clients)
        for k in range(args.jobs)
    ]
    cli_load, cli_load_wall = cli_batch(cli_items, args.max_running)

    from service.client import state_name

    failed = [r for r in submitted if r["state"] != "SUCCEEDED"]
    lost = [r for r in submitted if r["name"] and r["name"] not in on_server]
    wrong = [r for r in submitted if r["state"] == "SUCCEEDED" and not _matches(r, ref)]
    server_states = {state_name(j.state) for j in on_server.values()}

    def ms(x: float) -> float:
        return 1000 * x

    seq_e2e = [r["e2e_s"] for r in seq_rows if r["e2e_s"] is not None]
    seq_create = [r["create_s"] for r in seq_rows if r["create_s"] is not None]
    load_e2e = [r["e2e_s"] for r in load_rows if r["e2e_s"] is not None]
    load_create = [r["create_s"] for r in load_rows if r["create_s"] is not None]
    rows = [
        [
            "sequential: service (create -> done)",
            len(seq_e2e),
            ms(pct(seq_create, 0.5)),
            ms(pct(seq_create, 0.99)),
            ms(pct(seq_e2e, 0.5)),
            ms(pct(seq_e2e, 0.99)),
            len(seq_e2e) / seq_wall,
        ],
        [
            "sequential: CLI process per merge",
            len(cli_seq),
            None,
            None,
            ms(pct(cli_seq, 0.5)),
            ms(pct(cli_seq, 0.99)),
            len(cli_seq) / cli_seq_wall,
        ],
        [
            "sequential: engine in-process",
            len(eng_seq),
            None,
            None,
            ms(pct(eng_seq, 0.5)),
            ms(pct(eng_seq, 0.99)),
            len(eng_seq) / sum(eng_seq),
        ],
        [
            f"load: service, {args.clients} clients",
            len(load_e2e),
            ms(pct(load_create, 0.5)),
            ms(pct(load_create, 0.99)),
            ms(pct(load_e2e, 0.5)),
            ms(pct(load_e2e, 0.99)),
            len(load_e2e) / load_wall,
        ],
        [
            f"load: CLI, {args.max_running} at a time",
            len(cli_load),
            None,
            None,
            ms(pct(cli_load, 0.5)),
            ms(pct(cli_load, 0.99)),
            len(cli_load) / cli_load_wall,
        ],
    ]
    print()
    table = print_table(
        ["run", "merges", "create p50 ms", "create p99 ms", "merge p50 ms", "merge p99 ms", "merges/s"], rows
    )
    per_merge_svc = load_wall / max(1, len(load_e2e))
    per_merge_cli = cli_load_wall / max(1, len(cli_load))
    summary = {
        "overhead_vs_cli_sequential_p50": pct(seq_e2e, 0.5) / pct(cli_seq, 0.5) - 1,
        "overhead_vs_cli_load_wall_per_merge": per_merge_svc / per_merge_cli - 1,
        "service_minus_engine_p50_ms": ms(pct(seq_e2e, 0.5) - pct(eng_seq, 0.5)),
        "server_peak_rss_mb": hwm_mb,
        "server_tree_peak_anon_mb": tree_mb,
        "failed_jobs": len(failed),
        "lost_jobs": len(lost),
        "wrong_outputs": len(wrong),
        "jobs_on_server": len(on_server),
        "server_states": sorted(server_states),
    }
    print()
    print_table(
        ["figure", "value"],
        [
            ["overhead vs CLI, sequential p50", f"{100 * summary['overhead_vs_cli_sequential_p50']:+.1f} %"],
            [
                "overhead vs CLI, load (wall per merge)",
                f"{100 * summary['overhead_vs_cli_load_wall_per_merge']:+.1f} %",
            ],
            ["service p50 minus engine p50", f"{summary['service_minus_engine_p50_ms']:.0f} ms"],
            ["server peak RSS (VmHWM)", f"{hwm_mb:.0f} MB"],
            ["server tree peak RssAnon (sum)", f"{tree_mb:.0f} MB"],
            ["failed / lost / wrong output", f"{len(failed)} / {len(lost)} / {len(wrong)}"],
        ],
    )
    for r in failed[:5]:
        print("failed:", r, file=sys.stderr)
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "args": vars(args) | {"out": str(args.out)},
            "table": table,
            "summary": summary,
            "sequential": seq_rows,
            "load": load_rows,
            "cli_sequential_s": cli_seq,
            "cli_load_s": cli_load,
            "engine_sequential_s": eng_seq,
        },
    )
    print(f"\nwrote {args.out}")
    rc = 0 if not (failed or lost or wrong) else 1
    if mixed is not None:
        rc |= report_mixed(mixed, args, OUT / "service_mixed.json")
    return rc


def mixed_phase(
    srv: Server, root: Path, recipes: list[str], ref: dict[int, str], args: Any, deadline: float
) -> dict:
    """Phase 4: merges, Predict and DetectLineage from several clients at once (bench/_service_mixed.py)."""
    import _service_mixed as mx

    from service.client import Client

    with Client(srv.target, token=TOKEN, timeout=120) as c:
        c.wait_ready()
        ctx = mx.prepare(root, c, recipes, ref)
    rows, wall = mx.run_mixed(
        srv.target, TOKEN, ctx, args.mixed_clients, args.mixed_rounds, root / "out" / "mixed", deadline
    )
    return {"rows": rows, "wall": wall, "n_predict": len(ctx["files"]), "hwm_mb": srv.vm_hwm_kb() / 1024}


def report_mixed(mixed: dict, args: Any, out: Path) -> int:
    rows = mixed["rows"]
    table_rows = []
    for rpc in ("merge", "predict", "lineage"):
        xs = [r for r in rows if r["rpc"] == rpc]
        ok = [r["s"] for r in xs if r["ok"]]
        table_rows.append(
            [
                rpc,
                len(xs),
                len(xs) - len(ok),
                1000 * pct(ok, 0.5),
                1000 * pct(ok, 0.99),
                len(xs) / mixed["wall"],
            ]
        )
    expected = args.mixed_clients * args.mixed_rounds * 3
    lost = expected - len(rows)
    print(f"\nmixed load: {args.mixed_clients} clients x {args.mixed_rounds} rounds of (merge, predict of "
          f"{mixed['n_predict']} checkpoints, lineage of 5 candidates), wall {mixed['wall']:.1f} s")  # fmt: skip
    table = print_table(["rpc", "calls", "failed or wrong", "p50 ms", "p99 ms", "calls/s"], table_rows)
    for r in [r for r in rows if not r["ok"]][:5]:
        print("failed:", r, file=sys.stderr)
    write_json(
        out,
        {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "table": table, "rows": rows,
         "wall_s": mixed["wall"], "lost": lost, "server_peak_rss_mb": mixed["hwm_mb"]},
    )  # fmt: skip
    print(f"wrote {out}")
    return 0 if lost == 0 and all(r["ok"] for r in rows) else 1


def _matches(row: dict, ref: dict[int, str]) -> bool:
    """Does a job's output equal the CLI's output for the same recipe (set read from the recipe copy)?"""
    import re

    out = Path(row["output"])
    m = re.search(r"/set(\d+)/m0", (out / "weightsmith_recipe.yml").read_text())
    return m is not None and digest(out) == ref[int(m.group(1))]


if __name__ == "__main__":
    sys.exit(main())
