"""Benchmark: trials per minute of the recipe search (issue 25), in memory vs via disk, local vs 2 Dask workers.

:func:`merge.evolve.run_search` on the LLaMA-shaped bench models (``bench/make_models.py``: ``--size big``
is 747.7M parameters, 1.5 GB per model in bf16; ``--size tiny`` 21.1M), one search per configuration,
side by side in one run:

- recipe ``ties`` (``--method dare_ties`` also works) of ``base`` + ``ft1``, ``ft2``, a range on
  ``weight`` [0, 1] and ``density`` [0.1, 1] per fine-tune (4 genes), ``sampler: random``, ``seed: 0``,
  ``batch: 2``, a fixed budget of ``--trials`` trials (default 4);
- the objective is ``code``: :func:`score` of this file (``/abs/path/bench/evolve.py:score``, importable by
  Dask workers), the mean of the merged final norm weight: cheap and deterministic, so the bench measures
  the merge and the trial machinery, not the scoring;
- rows: ``in_memory: true`` (``merge_in_memory``: the streaming engine writing into tensors) vs
  ``in_memory: false`` (``run_merge`` into a scratch folder, then the checkpoint read back into a state
  dict), each with ``workers=1`` (trials in the driver, torch with all cores) and ``workers=2`` (a Dask
  ``LocalCluster`` on 127.0.0.1, 2 worker processes of 1 thread each, the 2 trials of a batch in parallel).

Each configuration runs in its own driver process (``python bench/evolve.py --child ...``) measured by
``_common.run_measured`` (wall, CPU, peak anonymous RSS of the whole process tree: driver + Dask nanny and
workers). The driver reports its own peak anonymous RSS (sampled every 0.05 s) and peak RSS (``VmHWM``,
mmapped input pages included), and where its time goes: set-up (plan check, objective build), the Dask
cluster start, each batch (``executor.map``), the cluster close, the report (trials table, plots). Inside
each trial (driver or worker) the merge, the read-back (disk only) and the scoring are timed by wrapping
``merge.execute.merge_in_memory`` / ``run_merge`` in the process that loads the objective (only when
``WS_EVOLVE_BENCH_TRACE`` names a trace file, which the parent sets).

``trials/min`` is over the trial loop (first batch start to last batch end: what the budget buys once
the search runs); ``trials/min e2e`` over the whole ``run_search`` call (set-up, cluster start and report
included). Before a configuration with Dask in-memory trials runs, the RAM it needs (each worker holds one
merged model, plus the driver) is checked against ``MemAvailable``; if it does not fit the row says so
instead of running.

``--tune-allocator`` calls :func:`merge.execute.tune_allocator` (what the CLI and the service workers do
before merging) in the driver and in every Dask worker (this file is imported there, as the objective and
as multiprocessing's ``__mp_main__``): Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``), which turns off glibc's dynamic mmap threshold, so every merge
chunk is a fresh ``mmap`` and page-faults in again (~35x the minor faults, most of a trial's time in the
kernel); run_search does not call it yet, so the default rows show Dask as it is, the tuned rows what the
call would give.

    .venv/bin/python bench/evolve.py --size tiny                      # smoke test, ~1 min
    .venv/bin/python bench/evolve.py --size big                       # the issue's figure (1.5 GB models), ~17 min
    .venv/bin/python bench/evolve.py --size big --tune-allocator      # the same with tune_allocator(), ~8 min

Prints the tables and writes ``bench/out/evolve-<size>[-tuned].json``; the searches' folders, per-trial
traces and per-configuration results go to ``bench/out/evolve/<size>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
if str(BENCH.parent) not in sys.path:
    sys.path.insert(1, str(BENCH.parent))

OUT_DIR = BENCH / "out" / "evolve"  # the searches' folders, traces and per-configuration results
TRACE_ENV = "WS_EVOLVE_BENCH_TRACE"
TUNE_ENV = "WS_EVOLVE_BENCH_TUNE_ALLOCATOR"
CONFIGS = [("in-memory", 1), ("disk", 1), ("in-memory", 2), ("disk", 2)]


# --------------------------------------------------------------------------------------------------
# the objective (imported by the driver and by every Dask worker as `.../bench/evolve.py:score`)
# --------------------------------------------------------------------------------------------------
# one trace state per process, shared by every copy of this module in it (the objective loaded by path,
# and on Dask workers also ``__mp_main__``, which multiprocessing's spawn imports from the driver's main file)
_HOLDER = sys.modules.setdefault("_ws_bench_evolve_trace", types.ModuleType("_ws_bench_evolve_trace"))
_TRACE: dict[str, Any] = vars(_HOLDER).setdefault("state", {})


def score(state: dict[str, Any]) -> float:
    """The mean of the merged final norm weight: cheap (2048 numbers at big size) and deterministic."""
    t0 = time.perf_counter()
    value = float(state["model.norm.weight"].float().mean())
    t1 = time.perf_counter()
    path = os.environ.get(TRACE_ENV)
    if path and _TRACE.get("merge_end") is not None:
        rec = {"pid": os.getpid(), "mode": _TRACE["mode"], "merge_s": _TRACE["merge_s"],
               **{k: _TRACE[k] for k in ("merge_user_s", "merge_sys_s", "merge_minflt")},
               "readback_s": t0 - _TRACE["merge_end"] if _TRACE["mode"] == "disk" else 0.0,
               "score_s": t1 - t0}
        _TRACE["merge_end"] = None
        with open(path, "a") as f:  # one short line per trial: appends from 2 processes do not interleave
            f.write(json.dumps(rec) + "\n")
    return value


def _install_trace() -> None:
    """Time the merge of every trial in this process: wrap ``merge.execute.merge_in_memory`` and
    ``run_merge`` (``evaluate_trial`` imports them at call time, so the wrappers are what it calls)."""
    import merge.execute as ex

    def wrap(fn: Any, mode: str) -> Any:
        if getattr(fn, "_bench_evolve", False):
            return fn

        def timed(*a: Any, **kw: Any) -> Any:
            t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            out = fn(*a, **kw)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            _TRACE.update(mode=mode, merge_s=t1 - t0, merge_user_s=r1.ru_utime - r0.ru_utime,
                          merge_sys_s=r1.ru_stime - r0.ru_stime, merge_minflt=r1.ru_minflt - r0.ru_minflt,
                          merge_end=t1)
            return out

        timed._bench_evolve = True  # type: ignore[attr-defined]
        return timed

    ex.merge_in_memory = wrap(ex.merge_in_memory, "in-memory")
    ex.run_merge = wrap(ex.run_merge, "disk")


if os.environ.get(TRACE_ENV) and __name__ != "__main__":  # loaded as the objective: trace this process
    _install_trace()
if os.environ.get(TUNE_ENV) and __name__ != "__main__":  # --tune-allocator: in every trial process
    from merge.execute import tune_allocator

    tune_allocator()


# --------------------------------------------------------------------------------------------------
# one configuration (the child driver process)
# --------------------------------------------------------------------------------------------------
def search_config(models: dict[str, str], method: str, trials: int, batch: int, in_memory: bool) -> dict[str, Any]:
    per = {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.1, "max": 1.0}}
    return {
        "recipe": {
            "merge_method": method,
            "base_model": models["base"],
            "models": [{"model": models[n], "parameters": dict(per)} for n in ("ft1", "ft2")],
            "dtype": "bfloat16",
        },
        "objectives": [{"code": {"function": f"{Path(__file__).resolve()}:score"}}],
        "budget": {"trials": trials},
        "sampler": "random",
        "seed": 0,
        "batch": batch,
        "in_memory": in_memory,
    }


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one search in this process; return its timings, memory and trials."""
    peak_anon = [_status_kb("RssAnon:")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon:"))

    threading.Thread(target=sample, daemon=True).start()

    import merge.evolve.report as report
    import merge.evolve.study as study
    from merge.evolve import run_search

    events: list[tuple[str, float, float]] = []  # (what, start, end) relative to the run_search call
    t_call = [0.0]

    def timed(owner: Any, attr: str, what: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:  # a private name moved: the phase is just not reported
            return

        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                events.append((what, t0 - t_call[0], time.perf_counter() - t_call[0]))

        setattr(owner, attr, wrapper)

    for cls in ("_Local", "_Dask"):
        if hasattr(study, cls):
            timed(getattr(study, cls), "map", "batch")
    if hasattr(study, "_Dask"):
        timed(study._Dask, "__init__", "cluster start")
        timed(study._Dask, "close", "cluster close")
    timed(study if hasattr(study, "write_report") else report, "write_report", "report")

    out = Path(spec["out"])
    cfg = search_config(spec["models"], spec["method"], spec["trials"], spec["batch"], spec["mode"] == "in-memory")
    t_call[0] = time.perf_counter()
    res = run_search(cfg, out, workers=spec["workers"], allow_code=True)
    total = time.perf_counter() - t_call[0]
    stop.set()
    peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon:"))

    trials = json.loads((out / "trials.json").read_text())["trials"]
    batches = [(s, e) for w, s, e in events if w == "batch"]
    phase = {w: round(sum(e - s for ww, s, e in events if ww == w), 3) for w in ("cluster start", "cluster close",
                                                                                   "report")}
    first = min(s for s, _ in batches) if batches else 0.0
    setup = first - phase["cluster start"]
    return {
        "run_search_s": total,
        "result_seconds": res.seconds,
        "run_search_executor": res.executor,
        "complete": res.complete,
        "trials_total": res.trials,
        "failed": [t["error"] for t in trials if t["state"] != "COMPLETE"],
        "trial_seconds": [t["seconds"] for t in trials],
        "values": [t["values"] for t in trials],
        "batches": [{"start": round(s, 3), "end": round(e, 3)} for s, e in batches],
        "events": [{"what": w, "start": round(s, 3), "end": round(e, 3)} for w, s, e in events],
        "loop_s": (max(e for _, e in batches) - first) if batches else float("nan"),
        "phases": {"setup": round(setup, 3), **phase,
                   "batches": round(sum(e - s for s, e in batches), 3),
                   "between batches": round((max(e for _, e in batches) - first)
                                            - sum(e - s for s, e in batches), 3) if batches else 0.0},
        "driver_peak_anon_mb": peak_anon[0] / 1024,
        "driver_vmhwm_mb": _status_kb("VmHWM:") / 1024,
    }


# --------------------------------------------------------------------------------------------------
# the parent: every configuration in its own measured driver process
# --------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def ram_needed(model_bytes: int, workers: int) -> int:
    """Bytes a configuration needs at most: each trial process holds one merged model (in memory: the
    output tensors; via disk: the checkpoint read back), with a 1.5x margin for the engine's buffers and
    the allocator, plus ~0.6 GB per process (interpreter, torch, Dask)."""
    procs = workers + (1 if workers > 1 else 0)
    return int(model_bytes * 1.5 * workers) + procs * 600 * 2**20


def run_one(size: str, mode: str, workers: int, models: dict[str, str], args: argparse.Namespace,
            model_bytes: int) -> dict[str, Any]:
    from _common import remove_output, run_measured, tool_env

    name = f"{mode}-{'local' if workers == 1 else f'dask{workers}'}{'-tuned' if args.tune_allocator else ''}"
    executor = "local" if workers == 1 else f"dask {workers} workers"
    row: dict[str, Any] = {"size": size, "merge": mode, "executor": executor, "workers": workers,
                           "trials": args.trials, "batch": args.batch}
    need, avail = ram_needed(model_bytes, workers), mem_available()
    row["ram_needed_gb"], row["ram_available_gb"] = need / 2**30, avail / 2**30
    if need > avail:
        row["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
        log(f"{size} {name}: skipped ({row['skipped']})")
        return row
    out = OUT_DIR / size / name
    remove_output(out)
    trace = OUT_DIR / size / f"{name}.trace.jsonl"
    trace.unlink(missing_ok=True)
    result = OUT_DIR / size / f"{name}.result.json"
    result.unlink(missing_ok=True)
    spec = {"out": str(out), "models": models, "method": args.method, "trials": args.trials, "batch": args.batch,
            "mode": mode, "workers": workers, "result": str(result)}
    env = tool_env() | {TRACE_ENV: str(trace), "PYTHONWARNINGS": "ignore"}
    if args.tune_allocator:
        env[TUNE_ENV] = "1"
    t_wait = time.perf_counter()
    while os.getloadavg()[0] >= 1.0 and time.perf_counter() - t_wait < args.wait_quiet:
        time.sleep(5)
    log(f"{size} {name}: {args.trials} trials (load {os.getloadavg()[0]:.2f}) ...")
    m = run_measured([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], env=env,
                     timeout=args.timeout)
    row["process"] = m.to_json()
    if m.rc != 0 or not result.exists():
        row["error"] = f"rc {m.rc}: " + m.stderr[-1500:]
        log(f"{size} {name}: FAILED rc {m.rc}\n{m.stderr[-1500:]}")
        return row
    r = json.loads(result.read_text())
    row.update(r)
    row["wall_s"] = m.wall_s
    row["cpu_s"] = m.cpu_s
    row["tree_peak_anon_mb"] = m.peak_anon_mb
    row["load_before"] = m.load_before
    row["load_after"] = os.getloadavg()[0]
    n = r["trials_total"]
    row["s_per_trial"] = r["loop_s"] / n
    row["trials_per_min"] = 60 * n / r["loop_s"]
    row["trials_per_min_e2e"] = 60 * n / r["run_search_s"]
    row["trial_work_s_median"] = statistics.median(t for t in r["trial_seconds"] if t is not None)
    tr = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    row["trace"] = tr
    for k in ("merge_s", "merge_user_s", "merge_sys_s", "merge_minflt", "readback_s", "score_s"):
        row[k + "_median"] = statistics.median(x[k] for x in tr) if tr else float("nan")
    remove_output(out / "scratch")
    log(f"{size} {name}: {row['trials_per_min']:.2f} trials/min (loop), {row['trials_per_min_e2e']:.2f} e2e, "
        f"merge {row['merge_s_median']:.2f} s, read-back {row['readback_s_median']:.2f} s")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=("tiny", "big"))
    ap.add_argument("--method", default="ties", choices=("ties", "dare_ties"))
    ap.add_argument("--trials", type=int, default=None, help="trials per configuration (default 4; tiny: 2)")
    ap.add_argument("--batch", type=int, default=2, help="trials asked at once (default 2)")
    ap.add_argument("--configs", default="all",
                    help="comma-separated subset of in-memory-local,disk-local,in-memory-dask2,disk-dask2")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration before it is killed")
    ap.add_argument("--tune-allocator", action="store_true",
                    help="call merge.execute.tune_allocator() in the driver and in every Dask worker (as the "
                         "CLI does for merges): shows what it would change; the JSON gets a -tuned suffix")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write the JSON (default bench/out/evolve-<size>[-tuned].json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each configuration wait up to S seconds for the 1-min load average to fall "
                         "below 1.0 (the machine is shared)")
    a = ap.parse_args(argv)
    if a.trials is None:
        a.trials = 2 if a.size == "tiny" else 4
    if a.child:
        spec = json.loads(a.child)
        r = child(spec)
        Path(spec["result"]).write_text(json.dumps(r, indent=1, default=str))
        return 0

    from _common import OUT, fmt, machine_info, print_table, safetensors_files, total_bytes, warm_page_cache, write_json
    from make_models import ensure_models

    paths = ensure_models(a.size, dtype="bfloat16", n_ft=2)
    models = {k: str(p.resolve()) for k, p in paths.items()}
    files = [f for p in paths.values() for f in safetensors_files(p)]
    model_bytes = total_bytes(safetensors_files(paths["base"]))
    warm_page_cache(files)
    configs = CONFIGS
    if a.configs != "all":
        want = set(a.configs.split(","))
        configs = [(m, w) for m, w in CONFIGS if f"{m}-{'local' if w == 1 else f'dask{w}'}" in want]
    t0 = time.perf_counter()
    rows = [run_one(a.size, mode, w, models, a, model_bytes) for mode, w in configs]
    cmd = "python bench/evolve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = {"machine": machine_info(), "command": cmd.strip(), "size": a.size, "method": a.method,
            "tune_allocator": a.tune_allocator, "model_bytes": model_bytes, "models": models,
            "seconds": time.perf_counter() - t0,
            "search_config": search_config(models, a.method, a.trials, a.batch, True) | {"in_memory": "<row>"},
            "rows": rows}
    dest = a.json or OUT / f"evolve-{a.size}{'-tuned' if a.tune_allocator else ''}.json"
    write_json(dest, data)

    ok = [r for r in rows if "trials_per_min" in r]
    print(f"\nRecipe search throughput: {a.method}, base + 2 fine-tunes ({model_bytes / 1e9:.2f} GB each), "
          f"{a.trials} trials, batch {a.batch}, random sampler, code objective"
          + (", tune_allocator() in every trial process" if a.tune_allocator else ""))
    cols = ["size", "merge", "executor", "trials", "trials/min", "s/trial", "trials/min e2e", "trial work s",
            "merge s", "merge CPU user+sys s", "read-back s", "driver peak RSS MB", "driver peak anon MB",
            "tree peak anon MB", "load"]
    table = []
    for r in rows:
        if "trials_per_min" not in r:
            table.append([r["size"], r["merge"], r["executor"], r["trials"], r.get("skipped") or "FAILED",
                          *["—"] * (len(cols) - 5)])
            continue
        table.append([r["size"], r["merge"], r["executor"], f"{r['complete']}/{r['trials_total']}",
                      r["trials_per_min"], r["s_per_trial"], r["trials_per_min_e2e"], r["trial_work_s_median"],
                      r["merge_s_median"], f"{r['merge_user_s_median']:.1f}+{r['merge_sys_s_median']:.1f}",
                      r["readback_s_median"] if r["merge"] == "disk" else "—",
                      fmt(r["driver_vmhwm_mb"], 0), fmt(r["driver_peak_anon_mb"], 0),
                      fmt(r["tree_peak_anon_mb"], 0), f"{r['load_before']:.1f}–{r['load_after']:.1f}"])
    print_table(cols, table)

    print("\nWhere the time goes (seconds of the run_search call; CPU of the whole process tree; minor page "
          "faults of one trial's merge, median)")
    pcols = ["merge", "executor", "run_search", "set-up", "cluster start", "batches", "between batches",
             "cluster close", "report", "CPU user s", "CPU sys s", "page faults / merge"]
    print_table(pcols, [[r["merge"], r["executor"], r["run_search_s"], r["phases"]["setup"],
                         r["phases"]["cluster start"], r["phases"]["batches"], r["phases"]["between batches"],
                         r["phases"]["cluster close"], r["phases"]["report"], r["process"]["user_s"],
                         r["process"]["sys_s"], f"{r['merge_minflt_median']:,.0f}"] for r in ok])

    by = {(r["merge"], r["workers"]): r["trials_per_min"] for r in ok}
    ratios = []
    for label, num, den in (("disk / in-memory, local", ("disk", 1), ("in-memory", 1)),
                            ("disk / in-memory, dask 2", ("disk", 2), ("in-memory", 2)),
                            ("dask 2 / local, in-memory", ("in-memory", 2), ("in-memory", 1)),
                            ("dask 2 / local, disk", ("disk", 2), ("disk", 1))):
        if num in by and den in by:
            ratios.append([label, by[num] / by[den]])
    if ratios:
        print("\nRatios of trials/min (loop)")
        print_table(["ratio", "trials/min ratio"], ratios)
    data["ratios"] = {k: v for k, v in ratios}
    write_json(dest, data)
    print(f"\nwrote {dest}")
    return 0 if len(ok) == len([r for r in rows if "skipped" not in r]) else 1


if __name__ == "__main__":
    sys.exit(main())
