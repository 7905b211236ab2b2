"""Speed and memory: ``weightsmith merge`` vs ``mergekit-yaml`` (0.1.5) on LLaMA-shaped checkpoints.

Workload (``--size big``, the default): base + 3 fine-tunes of 747.7M parameters, 1.5 GB each in bf16,
4 shards each (``bench/make_models.py``); recipes in mergekit's format with ``dtype: bfloat16``, as users
write them:

- ``linear``: ft1..ft3, weight 1 each (normalized: the mean);
- ``task_arithmetic``: base + ft1..ft3, weight 0.5;
- ``ties``: base + ft1..ft3, weight 1, density 0.5 (normalize, mergekit's default);
- ``dare_ties``: base + ft1..ft3, weight 1, density 0.5;
- ``breadcrumbs``: base + ft1..ft3, weight 1, density 0.5, gamma 0.01;
- the methods added for issue 15 (``--methods della,...``): ``della`` / ``della_linear`` (base + 3, density
  0.5, epsilon 0.15), ``sce`` (base + 3, select_topk 0.5), ``karcher`` (ft1..ft3), ``multislerp`` (base + 3,
  weight 1), ``nuslerp`` (base + ft1, ft2), ``nearswap`` (base + ft1, t 0.001), ``arcee_fusion`` (base + ft1),
  ``ram`` / ``ramplus_tl`` (base + 3, epsilon 0.002).

Cases, run in turn (interleaved round-robin, tool order rotated every round) ``--repeats`` times:

- ``mk``      ``mergekit-yaml CFG OUT --no-copy-tokenizer`` (its defaults: ``--out-shard-size 5B``);
- ``mk500``   the same with ``--out-shard-size 500M`` (its lowest-memory setting on CPU);
- ``ws``      ``weightsmith merge CFG -o OUT --json`` (defaults: float32 compute, 2 workers);
- ``ws-bf16`` the same with ``--compute-dtype bfloat16`` (mergekit's compute dtype for these recipes);
- floors on the same input files, in the same rounds: ``cat`` (page-cache read) and
  ``floor_stream.py`` (plain safetensors read, float32 sum, write; ``sum`` mode for linear,
  ``task`` mode for the base-model methods);
- optional: ``mk-import`` / ``ws-import`` (interpreter + import start-up only).

Every run: wall (spawn to reap), CPU (user + sys of the process tree), peak anonymous RSS (``RssAnon``
of the whole process tree, sampled every 0.1 s) and max RSS (largest process, mmapped pages included).
Inputs are read once before the first run so all runs see them in the page cache; outputs are deleted
and ``sync``ed between runs (untimed). Results: a table on stdout and
``bench/out/merge_vs_mergekit-SIZE.json``
(raw runs + summary, rewritten after every run so a partial run keeps its data).

    .venv/bin/python bench/merge_vs_mergekit.py --size tiny --repeats 1          # smoke run, ~2 min
    .venv/bin/python bench/merge_vs_mergekit.py                                  # full run, ~45 min
    .venv/bin/python bench/merge_vs_mergekit.py --methods linear,ties --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH,
    OUT,
    Measurement,
    dir_bytes,
    ensure_mergekit,
    fmt,
    machine_info,
    median,
    mergekit_cmd,
    print_table,
    project_python,
    remove_output,
    run_measured,
    safetensors_files,
    tool_env,
    total_bytes,
    warm_page_cache,
    weightsmith_base_cmd,
    weightsmith_cmd,
    write_json,
    write_yaml,
)
from make_models import ensure_models  # noqa: E402

METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs"]
# the methods added for issue 15 (mergekit 0.1.5 has them too)
NEW_METHODS = ["della", "della_linear", "sce", "karcher", "multislerp", "nuslerp", "nearswap", "arcee_fusion", "ram",
               "ramplus_tl"]
ALL_METHODS = METHODS + NEW_METHODS
TOOL_CASES = ["mk", "mk500", "ws", "ws-bf16"]
FLOOR_CASES = ["cat", "floor"]
EXTRA_CASES = ["mk-import", "ws-import"]
DEFAULT_CASES = TOOL_CASES + FLOOR_CASES


def recipe_for(method: str, m: dict[str, Path], dtype: str = "bfloat16") -> dict[str, Any]:
    """The benchmark recipes (mergekit's YAML format, read unchanged by both tools)."""
    fts = [str(m[k]) for k in ("ft1", "ft2", "ft3")]
    if method == "linear":
        return {"merge_method": "linear",
                "models": [{"model": f, "parameters": {"weight": 1.0}} for f in fts],
                "parameters": {"normalize": True}, "dtype": dtype}
    if method in NEW_METHODS:
        return _new_recipe(method, m, fts, dtype)
    per_model = {"task_arithmetic": {"weight": 0.5},
                 "ties": {"weight": 1.0, "density": 0.5},
                 "dare_ties": {"weight": 1.0, "density": 0.5},
                 "breadcrumbs": {"weight": 1.0, "density": 0.5, "gamma": 0.01}}[method]
    r: dict[str, Any] = {"merge_method": method, "base_model": str(m["base"]),
                         "models": [{"model": f, "parameters": dict(per_model)} for f in fts], "dtype": dtype}
    if method == "ties":
        r["parameters"] = {"normalize": True}
    return r


def _new_recipe(method: str, m: dict[str, Path], fts: list[str], dtype: str) -> dict[str, Any]:
    base = str(m["base"])
    per = [{"model": f} for f in fts]
    r: dict[str, Any] = {"merge_method": method, "base_model": base, "models": per, "dtype": dtype}
    if method in ("della", "della_linear"):
        r["models"] = [{"model": f, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.15}} for f in fts]
    elif method == "sce":
        r["parameters"] = {"select_topk": 0.5}
    elif method == "karcher":
        del r["base_model"]
    elif method == "multislerp":
        r["models"] = [{"model": f, "parameters": {"weight": 1.0}} for f in fts]
    elif method == "nuslerp":
        r["models"] = [{"model": f, "parameters": {"weight": 1.0}} for f in fts[:2]]
    elif method == "nearswap":
        r["models"] = per[:1]
        r["parameters"] = {"t": 0.001}
    elif method == "arcee_fusion":
        r["models"] = per[:1]
    elif method in ("ram", "ramplus_tl"):
        r["parameters"] = {"epsilon": 0.002}
    return r


def input_set(method: str) -> str:
    if method in ("linear", "karcher"):
        return "3 models"
    return {"nuslerp": "base+2", "nearswap": "base+1", "arcee_fusion": "base+1"}.get(method, "base+3")


def inputs_for(method: str, m: dict[str, Path]) -> tuple[str, list[Path]]:
    """(input-set key, model folders): linear and karcher read ft1..3, the others the base + some fine-tunes."""
    key = input_set(method)
    if key == "3 models":
        return key, [m["ft1"], m["ft2"], m["ft3"]]
    return key, [m["base"], m["ft1"], m["ft2"], m["ft3"]][: 2 + "123".index(key[-1])]


def case_cmd(case: str, method: str, recipe: Path, out: Path, models: list[Path]) -> list[str]:
    files = [str(f) for d in models for f in safetensors_files(d)]
    if case == "cat":
        return ["sh", "-c", 'exec cat "$@" > /dev/null', "cat", *files]
    if case == "floor":
        mode = "sum" if input_set(method) == "3 models" else "task"
        return [project_python(), str(BENCH / "floor_stream.py"), "--mode", mode, "--out", str(out),
                *[str(d) for d in models]]
    if case == "mk":
        return mergekit_cmd(recipe, out)
    if case == "mk500":
        return mergekit_cmd(recipe, out, out_shard_size="500M")
    if case == "ws":
        return weightsmith_cmd(recipe, out)
    if case == "ws-bf16":
        return weightsmith_cmd(recipe, out, ["--compute-dtype", "bfloat16"])
    if case == "mk-import":
        from _common import MK_VENV

        return [str(MK_VENV / "bin" / "python"), "-c", "import mergekit.scripts.run_yaml"]
    if case == "ws-import":
        return weightsmith_base_cmd() + ["methods"]
    raise ValueError(case)


def _row_key(case: str, method: str, input_set: str) -> str:
    return f"{case}|{input_set}" if case in FLOOR_CASES else f"{case}|{method}"


def summarize(runs: list[dict[str, Any]], in_bytes: dict[str, int]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["ok"]:
            groups.setdefault(r["key"], []).append(r)
    out = []
    for key, rs in groups.items():
        case, what = key.split("|", 1)
        walls = [r["wall_s"] for r in rs]
        s = {
            "key": key, "case": case, "what": what, "input_set": rs[0]["input_set"], "n": len(rs),
            "wall_s": median(walls), "wall_min": min(walls), "wall_max": max(walls),
            "cpu_s": median([r["cpu_s"] for r in rs]),
            "peak_anon_mb": median([r["peak_anon_mb"] for r in rs]),
            "max_rss_mb": median([r["max_rss_mb"] for r in rs]),
            "input_mb_s": in_bytes[rs[0]["input_set"]] / 1e6 / median(walls),
        }
        internal = [r["tool_seconds"] for r in rs if r.get("tool_seconds") is not None]
        if internal:
            s["tool_seconds"] = median(internal)
        out.append(s)
    return out


def _by_key(summary: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["key"]: s for s in summary}


def ratios(summary: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """weightsmith / mergekit for time and peak anonymous memory, per method and variant."""
    sk = _by_key(summary)
    rows = []
    for m in methods:
        for ws in ("ws", "ws-bf16"):
            w = sk.get(f"{ws}|{m}")
            if not w:
                continue
            row: dict[str, Any] = {"method": m, "weightsmith": ws}
            mks = {c: sk.get(f"{c}|{m}") for c in ("mk", "mk500")}
            for c, s in mks.items():
                if s:
                    row[f"wall_vs_{c}"] = w["wall_s"] / s["wall_s"]
                    row[f"cpu_vs_{c}"] = w["cpu_s"] / s["cpu_s"]
                    row[f"anon_vs_{c}"] = w["peak_anon_mb"] / s["peak_anon_mb"] if s["peak_anon_mb"] else None
            present = [s for s in mks.values() if s]
            if present:
                best_wall = min(s["wall_s"] for s in present)
                best_anon = min(s["peak_anon_mb"] for s in present)
                row["speedup_vs_best_mk"] = best_wall / w["wall_s"]
                row["anon_fraction_of_best_mk"] = w["peak_anon_mb"] / best_anon if best_anon else None
                row["target_3x_faster"] = row["speedup_vs_best_mk"] >= 3
                row["target_quarter_memory"] = (row["anon_fraction_of_best_mk"] is not None
                                                and row["anon_fraction_of_best_mk"] <= 0.25)
            fl = sk.get(f"floor|{w['input_set']}")
            ct = sk.get(f"cat|{w['input_set']}")
            if fl:
                row["wall_vs_floor"] = w["wall_s"] / fl["wall_s"]
            if ct:
                row["wall_vs_cat"] = w["wall_s"] / ct["wall_s"]
            ta = sk.get(f"{ws}|task_arithmetic")
            if ta and m != "task_arithmetic":
                row["wall_vs_task_arithmetic"] = w["wall_s"] / ta["wall_s"]
            _issue17_targets(row, m, sk.get(f"mk500|{m}"), present)
            rows.append(row)
    return rows


def _issue17_targets(row: dict[str, Any], method: str, mk500: dict[str, Any] | None,
                     present: list[dict[str, Any]]) -> None:
    """Issue 17's targets: TIES-like >= 10x faster than mergekit and within 2.5x of our task arithmetic;
    linear / task arithmetic >= 5x faster than mergekit at 500M shards and within 3x of ``cat``."""
    if method in ("ties", "dare_ties", "breadcrumbs") and present and "speedup_vs_best_mk" in row:
        row["target17_10x_mergekit"] = row["speedup_vs_best_mk"] >= 10
        if "wall_vs_task_arithmetic" in row:
            row["target17_within_2.5x_ta"] = row["wall_vs_task_arithmetic"] <= 2.5
    if method in ("linear", "task_arithmetic"):
        if mk500:
            row["target17_5x_mk500"] = row["wall_vs_mk500"] <= 0.2
        if "wall_vs_cat" in row:
            row["target17_within_3x_cat"] = row["wall_vs_cat"] <= 3


def print_report(summary: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], methods: list[str],
                 in_bytes: dict[str, int]) -> str:
    sk = _by_key(summary)
    order = []
    for m in methods:
        order += [f"{c}|{m}" for c in TOOL_CASES]
    for iset in dict.fromkeys(input_set(m) for m in methods):
        order += [f"floor|{iset}", f"cat|{iset}"]
    order += [f"{c}|{c}" for c in EXTRA_CASES]
    rows = []
    for key in order:
        s = sk.get(key)
        if not s:
            continue
        fl = sk.get(f"floor|{s['input_set']}")
        ct = sk.get(f"cat|{s['input_set']}")
        name = s["case"] if s["case"] in FLOOR_CASES + EXTRA_CASES else f"{s['case']} {s['what']}"
        if s["case"] == "floor":
            name = f"floor stream ({'sum' if s['input_set'] == '3 models' else 'task'})"
        rows.append([
            name, s["input_set"], f"{fmt(s['wall_s'])} ({fmt(s['wall_min'])}–{fmt(s['wall_max'])})",
            fmt(s["cpu_s"]), fmt(s["peak_anon_mb"], 0), fmt(s["max_rss_mb"], 0),
            fmt(s["input_mb_s"], 0) if s["case"] not in EXTRA_CASES else "—",
            fmt(s["wall_s"] / fl["wall_s"]) if fl and s["case"] not in FLOOR_CASES + EXTRA_CASES else "—",
            fmt(s["wall_s"] / ct["wall_s"], 1) if ct and s["case"] not in ["cat", *EXTRA_CASES] else "—",
            str(s["n"]),
        ])
    text = "\n" + "inputs: " + ", ".join(f"{k} = {v / 1e9:.2f} GB" for k, v in in_bytes.items()) + "\n\n"
    print(text, end="")
    text += print_table(["case", "inputs", "wall s median (min–max)", "CPU s", "peak anon MB", "max RSS MB",
                         "input MB/s", "× floor", "× cat", "n"], rows)
    if ratio_rows:
        print()
        rr = []
        for r in ratio_rows:
            rr.append([r["method"], r["weightsmith"], fmt(r.get("wall_vs_mk")), fmt(r.get("wall_vs_mk500")),
                       fmt(r.get("cpu_vs_mk")), fmt(r.get("anon_vs_mk")), fmt(r.get("anon_vs_mk500")),
                       fmt(r.get("speedup_vs_best_mk"), 1), fmt(r.get("anon_fraction_of_best_mk")),
                       _yn(r.get("target_3x_faster")), _yn(r.get("target_quarter_memory"))])
        text += "\n\n" + print_table(
            ["method", "weightsmith", "wall ws/mk", "wall ws/mk500", "CPU ws/mk", "anon ws/mk",
             "anon ws/mk500",
             "speed-up vs best mk", "anon / best mk", "≥3× faster", "≤¼ memory"], rr)
        # issue 17's targets
        t17 = []
        for r in ratio_rows:
            t17.append([r["method"], r["weightsmith"], fmt(r.get("speedup_vs_best_mk"), 1),
                        fmt(1 / r["wall_vs_mk500"] if r.get("wall_vs_mk500") else None, 1),
                        fmt(r.get("wall_vs_task_arithmetic")), fmt(r.get("wall_vs_cat")),
                        fmt(r.get("anon_fraction_of_best_mk")),
                        _yn(r.get("target17_10x_mergekit")), _yn(r.get("target17_within_2.5x_ta")),
                        _yn(r.get("target17_5x_mk500")), _yn(r.get("target17_within_3x_cat")),
                        _yn(r.get("target_quarter_memory"))])
        text += "\n\n" + print_table(
            ["method", "weightsmith", "× faster than best mk", "× faster than mk500", "wall ÷ our TA", "wall ÷ cat",
             "anon / best mk", "≥10× mk (TIES-like)", "≤2.5× TA", "≥5× mk500 (lin/TA)", "≤3× cat", "≤¼ memory"], t17)
    return text


def _yn(x: Any) -> str:
    return "—" if x is None else ("yes" if x else "NO")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["big", "tiny"], default="big")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(ALL_METHODS)}")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"comma list from {','.join(DEFAULT_CASES + EXTRA_CASES)} "
                         "(default: all but *-import)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=OUT / "work",
                    help="where outputs go (deleted after each run)")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    cases = [c for c in a.cases.split(",") if c]
    for m in methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}")
    for c in cases:
        if c not in DEFAULT_CASES + EXTRA_CASES:
            ap.error(f"unknown case {c!r}")
    json_out = a.json_out or OUT / f"merge_vs_mergekit-{a.size}.json"

    if any(c.startswith("mk") for c in cases):
        ensure_mergekit()
    models = ensure_models(a.size, dtype="bfloat16")
    recipes = {m: write_yaml(OUT / "recipes" / a.size / f"{m}.yml", recipe_for(m, models)) for m in methods}
    in_sets = {inputs_for(m, models)[0]: inputs_for(m, models)[1] for m in methods}
    in_bytes = {k: total_bytes(f for d in v for f in safetensors_files(d)) for k, v in in_sets.items()}
    warm_page_cache(f for d in models.values() for f in safetensors_files(d))

    tool_cases = [c for c in cases if c in TOOL_CASES]
    floor_cases = [c for c in cases if c in FLOOR_CASES]
    extra_cases = [c for c in cases if c in EXTRA_CASES]
    info = machine_info()
    runs: list[dict[str, Any]] = []
    out = a.work / "merged"
    a.work.mkdir(parents=True, exist_ok=True)
    remove_output(out)
    data: dict[str, Any] = {"machine": info, "size": a.size, "methods": methods, "cases": cases,
                            "repeats": a.repeats, "recipes": {m: str(p) for m, p in recipes.items()},
                            "input_bytes": in_bytes, "runs": runs}
    t_start = time.perf_counter()
    failures = 0
    for rnd in range(a.repeats):
        done_floor: set[tuple[str, str]] = set()
        rot = rnd % max(1, len(tool_cases))
        order = tool_cases[rot:] + tool_cases[:rot]
        plan: list[tuple[str, str]] = []
        for m in methods:
            iset = inputs_for(m, models)[0]
            for c in floor_cases:
                if (c, iset) not in done_floor:
                    done_floor.add((c, iset))
                    plan.append((c, m))
            plan += [(c, m) for c in order]
        plan += [(c, c) for c in extra_cases]
        for case, m in plan:
            if case in EXTRA_CASES:
                iset, mdirs = case, []
                in_bytes.setdefault(case, 0)
            else:
                iset, mdirs = inputs_for(m, models)
            cmd = case_cmd(case, m, recipes.get(m, Path()), out, mdirs)
            meas: Measurement = run_measured(cmd, env=tool_env(offline=case.startswith("mk")),
                                             timeout=a.timeout)
            out_bytes = dir_bytes(out)
            ok = meas.rc == 0 and (case in ("cat",) + tuple(EXTRA_CASES) or out_bytes > 0)
            rec: dict[str, Any] = {"round": rnd, "case": case, "method": m, "input_set": iset,
                                   "key": _row_key(case, m, iset), "ok": ok, "out_bytes": out_bytes,
                                   **meas.to_json()}
            if case.startswith("ws") and meas.rc == 0 and case != "ws-import":
                try:
                    rec["tool_seconds"] = json.loads(meas.stdout)["seconds"]
                except (ValueError, KeyError, TypeError):
                    pass
            runs.append(rec)
            remove_output(out)
            status = "ok" if ok else f"FAILED rc={meas.rc}: {meas.stderr.strip().splitlines()[-1:] or ''}"
            print(f"[round {rnd + 1}/{a.repeats}] {case:<9} {m:<16} wall {meas.wall_s:7.2f} s  "
                  f"cpu {meas.cpu_s:7.2f} s  anon {meas.peak_anon_mb:7.0f} MB  load {meas.load_before:.1f}  "
                  f"{status}", file=sys.stderr, flush=True)
            failures += not ok
            summary = summarize(runs, in_bytes)
            data.update(summary=summary, ratios=ratios(summary, methods),
                        elapsed_s=time.perf_counter() - t_start)
            write_json(json_out, data)
    summary = summarize(runs, in_bytes)
    data["report"] = print_report(summary, ratios(summary, methods), methods, in_bytes)
    data["machine_after"] = {"loadavg": machine_info()["loadavg"]}
    write_json(json_out, data)
    print(f"\nwrote {json_out} ({len(runs)} runs, {failures} failed, "
          f"{(time.perf_counter() - t_start) / 60:.1f} min)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
