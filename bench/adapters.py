"""Speed and memory of LoRA folding and SVD merging: weightsmith vs peft, same inputs, same run.

Workload: the LLaMA-shaped ``big-bfloat16/base`` of ``bench/make_models.py`` (747.7M parameters, 1.5 GB bf16,
4 shards) and two rank-16 PEFT adapters on every ``q/k/v/o/gate/up/down_proj`` of its 12 layers (84 targets,
``lora_alpha`` 32, bf16 factors, seeded random; written once under ``bench/out/adapters/``).

Cases (interleaved round-robin, order rotated every round, ``--repeats`` rounds; medians):

- ``ws-fold``   ``weightsmith adapter fold BASE A1 -o OUT --json`` (streams base + s·B·A to a new checkpoint);
- ``peft-fold`` ``bench/_peft_adapters.py fold``: transformers loads the model, ``PeftModel.from_pretrained``,
  ``merge_and_unload()``, ``save_pretrained`` (what a peft user runs);
- ``ws-svd``    ``weightsmith adapter merge A1 A2 --method svd --rank 16 -o OUT --json`` (adapters only);
- ``peft-svd``  ``bench/_peft_adapters.py svd``: model + both adapters, ``add_weighted_adapter(...,
  combination_type="svd", svd_rank=16)`` (peft's default full SVD), save the merged adapter;
- ``peft-svd-reduced``: the same with ``svd_full_matrices=False`` (optional, ``--cases``).

Each run: wall, CPU (user + sys of the tree) and peak anonymous RSS of the process tree
(``_common.run_measured``). After the timed rounds the outputs of one round are compared: the folded
checkpoints tensor by tensor (bf16; peft rounds ΔW to bf16 before adding it, weightsmith adds in float32
and rounds once) and the merged adapters' residuals ``B A`` on every target (relative Frobenius error).
Prints tables and writes ``bench/out/adapters.json`` (rewritten after every run).

    .venv/bin/python bench/adapters.py                       # 3 rounds, ~15–25 min on 2 busy cores
    .venv/bin/python bench/adapters.py --repeats 1 --cases ws-fold,peft-fold
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (  # noqa: E402
    BENCH,
    MODELS,
    OUT,
    fmt,
    machine_info,
    median,
    print_table,
    project_python,
    remove_output,
    run_measured,
    safetensors_files,
    tensor_index,
    tool_env,
    total_bytes,
    warm_page_cache,
    weightsmith_base_cmd,
    write_json,
)

CASES = ["ws-fold", "peft-fold", "ws-svd", "peft-svd"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, out: Path, rank: int = 16, seed: int = 0) -> list[Path]:
    """Two PEFT LoRA folders for ``base`` (deterministic; skipped when present with the same stamp)."""
    import torch
    from safetensors.torch import save_file

    from merge.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    stamp = {"base": str(base.resolve()), "rank": rank, "seed": seed, "targets": TARGETS}
    paths = []
    for k in range(2):
        folder = out / f"lora{k + 1}"
        paths.append(folder)
        st = folder / ".bench-adapter.json"
        if st.exists() and json.loads(st.read_text()) == stamp:
            continue
        g = torch.Generator().manual_seed(seed * 100 + k)
        tensors = {}
        for name in sorted(ck.keys()):
            mod = name.removesuffix(".weight")
            if not name.endswith(".weight") or mod.rsplit(".", 1)[-1] not in TARGETS:
                continue
            out_f, in_f = ck.shape(name)
            tensors[f"base_model.model.{mod}.lora_A.weight"] = (
                torch.randn(rank, in_f, generator=g) / in_f**0.5
            ).to(torch.bfloat16)
            tensors[f"base_model.model.{mod}.lora_B.weight"] = (
                0.01 * torch.randn(out_f, rank, generator=g)
            ).to(torch.bfloat16)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": str(base),
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "target_modules": TARGETS,
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "use_rslora": False,
                    "fan_in_fan_out": False,
                    "init_lora_weights": True,
                    "inference_mode": True,
                }
            )
        )
        st.write_text(json.dumps(stamp))
    return paths


def case_cmd(case: str, base: Path, ads: list[Path], out: Path, rank: int) -> list[str]:
    peer = [project_python(), str(BENCH / "_peft_adapters.py")]
    if case == "ws-fold":
        return weightsmith_base_cmd() + ["adapter", "fold", str(base), str(ads[0]), "-o", str(out), "--json"]
    if case == "peft-fold":
        return peer + ["fold", str(base), str(ads[0]), str(out)]
    if case == "ws-svd":
        return weightsmith_base_cmd() + [
            "adapter",
            "merge",
            str(ads[0]),
            str(ads[1]),
            "--method",
            "svd",
            "--rank",
            str(rank),
            "-o",
            str(out),
            "--json",
        ]
    if case == "peft-svd":
        return peer + ["svd", str(base), str(ads[0]), str(ads[1]), str(out), "--rank", str(rank)]
    if case == "peft-svd-reduced":
        return peer + ["svd", str(base), str(ads[0]), str(ads[1]), str(out), "--rank", str(rank), "--reduced"]
    raise ValueError(case)


def compare_fold(ws_out: Path, peft_out: Path) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    ia, ib = tensor_index(ws_out), tensor_index(peft_out)
    names = sorted(set(ia) & set(ib))
    max_abs = 0.0
    n_diff = numel = 0
    max_ulps = 0.0
    for n in names:
        with safe_open(str(ia[n]), "pt") as fa, safe_open(str(ib[n]), "pt") as fb:
            a, b = fa.get_tensor(n), fb.get_tensor(n)
        d = (a.float() - b.float()).abs()
        max_abs = max(max_abs, float(d.max()))
        n_diff += int((a != b).sum())
        numel += a.numel()
        ulp = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        max_ulps = max(max_ulps, float((d / ulp).max()))
    return {
        "n_tensors": len(names),
        "only_ws": sorted(set(ia) - set(ib))[:5],
        "only_peft": sorted(set(ib) - set(ia))[:5],
        "max_abs": max_abs,
        "frac_elements_differ": n_diff / max(numel, 1),
        "max_diff_in_bf16_eps_rel": max_ulps,
    }


def compare_svd(ws_out: Path, peft_out: Path) -> dict[str, Any]:
    from merge.lora.formats import read_adapter

    peft_dir = peft_out / "merged" if (peft_out / "merged" / "adapter_config.json").exists() else peft_out
    a, b = read_adapter(ws_out), read_adapter(peft_dir)
    errs = []
    for m in a.targets:
        da, db = a.delta(m).double(), b.delta(m).double()
        errs.append(float((da - db).norm() / db.norm()))
    return {
        "n_targets": len(errs),
        "targets_match": sorted(a.targets) == sorted(b.targets),
        "max_rel_frobenius_diff": max(errs) if errs else None,
        "median_rel_frobenius_diff": median(errs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--models", type=Path, default=MODELS / "big-bfloat16")
    ap.add_argument("--json-out", type=Path, default=OUT / "adapters.json")
    ap.add_argument(
        "--append",
        action="store_true",
        help="add these rounds to the runs already in --json-out (the summary covers all of them)",
    )
    ap.add_argument("--report-only", action="store_true", help="no runs: summarize the runs in --json-out")
    args = ap.parse_args()
    cases = args.cases.split(",")
    base = args.models / "base"
    if not (base / "config.json").exists():
        print(f"{base}: missing; run bench/make_models.py --size big first", file=sys.stderr)
        return 2
    ads = make_adapters(base, OUT / "adapters", rank=args.rank)
    work = OUT / "adapters-work"
    work.mkdir(parents=True, exist_ok=True)
    in_files = safetensors_files(base)
    warm_page_cache(in_files + [a / "adapter_model.safetensors" for a in ads])
    env = tool_env()
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", str(os.cpu_count() or 2))
    result: dict[str, Any] = {
        "machine": machine_info(),
        "base": str(base),
        "base_bytes": total_bytes(in_files),
        "adapters": [str(a) for a in ads],
        "rank": args.rank,
        "cases": cases,
        "runs": [],
    }
    if (args.append or args.report_only) and args.json_out.exists():
        old_runs = json.loads(args.json_out.read_text())["runs"]
        result["runs"] = old_runs
        result["cases"] = sorted(
            {*cases, *(r["case"] for r in old_runs)}, key=lambda c: (CASES + [c]).index(c)
        )
    first = 1 + max((r["round"] for r in result["runs"]), default=-1)
    for rnd in range(first, first + (0 if args.report_only else args.repeats)):
        order = cases[rnd % len(cases) :] + cases[: rnd % len(cases)]
        for case in order:
            out = work / case
            remove_output(out)
            m = run_measured(case_cmd(case, base, ads, out, args.rank), env=env, timeout=3600)
            rec = {"case": case, "round": rnd, "ok": m.rc == 0, **m.to_json()}
            try:
                rec["tool"] = json.loads(m.stdout.strip().splitlines()[-1]) if m.rc == 0 else None
            except (ValueError, IndexError):
                rec["tool"] = None
            result["runs"].append(rec)
            print(
                f"[round {rnd + 1}] {case:<16} rc={m.rc} wall {m.wall_s:7.1f} s  cpu {m.cpu_s:7.1f} s  "
                f"peak anon {m.peak_anon_mb:8.1f} MB  (load {m.load_before:.1f})",
                flush=True,
            )
            if m.rc != 0:
                print(m.stderr[-2000:], file=sys.stderr)
            write_json(args.json_out, result)
    cases = result["cases"]
    # agreement, on the latest outputs of each case
    if (work / "ws-fold").exists() and (work / "peft-fold").exists():
        result["fold_agreement"] = compare_fold(work / "ws-fold", work / "peft-fold")
    for peer in ("peft-svd", "peft-svd-reduced"):
        if (work / "ws-svd").exists() and (work / peer).exists():
            result[f"svd_agreement_{peer}"] = compare_svd(work / "ws-svd", work / peer)
    summary = {}
    for case in cases:
        rs = [r for r in result["runs"] if r["case"] == case and r["ok"]]
        if rs:
            summary[case] = {
                "n": len(rs),
                "wall_s": median([r["wall_s"] for r in rs]),
                "wall_min": min(r["wall_s"] for r in rs),
                "wall_max": max(r["wall_s"] for r in rs),
                "cpu_s": median([r["cpu_s"] for r in rs]),
                "peak_anon_mb": median([r["peak_anon_mb"] for r in rs]),
                "max_rss_mb": median([r["max_rss_mb"] for r in rs]),
                "load_before": median([r["load_before"] for r in rs]),
            }
    result["summary"] = summary
    ratios = {}
    for op, ours in (("fold", "ws-fold"), ("svd", "ws-svd")):
        for peer in (f"peft-{op}", f"peft-{op}-reduced"):
            if ours in summary and peer in summary:
                w, p = summary[ours], summary[peer]
                ratios[f"{ours}/{peer}"] = {
                    "wall": w["wall_s"] / p["wall_s"],
                    "cpu": w["cpu_s"] / p["cpu_s"],
                    "peak_anon": w["peak_anon_mb"] / p["peak_anon_mb"],
                    "speedup": p["wall_s"] / w["wall_s"],
                }
    result["ratios"] = ratios
    result["machine"]["loadavg_end"] = os.getloadavg()
    write_json(args.json_out, result)
    print()
    print_table(
        ["case", "n", "wall s (median, min–max)", "CPU s", "peak anon MB", "max RSS MB", "load"],
        [
            [
                c,
                s["n"],
                f"{s['wall_s']:.1f} ({s['wall_min']:.1f}–{s['wall_max']:.1f})",
                s["cpu_s"],
                s["peak_anon_mb"],
                s["max_rss_mb"],
                s["load_before"],
            ]
            for c, s in summary.items()
        ],
    )
    print()
    print_table(
        ["weightsmith / peft", "wall", "CPU", "peak anon", "speed-up"],
        [
            [k, fmt(v["wall"]), fmt(v["cpu"]), fmt(v["peak_anon"], 3), f"{v['speedup']:.1f}×"]
            for k, v in ratios.items()
        ],
    )
    for k in ("fold_agreement", "svd_agreement_peft-svd", "svd_agreement_peft-svd-reduced"):
        if k in result:
            print(f"{k}: {json.dumps(result[k])}")
    print(f"\nJSON: {args.json_out}")
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"{time.perf_counter() - t0:.0f} s")
    sys.exit(rc)
