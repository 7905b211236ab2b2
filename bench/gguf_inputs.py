"""GGUF inputs against safetensors inputs: the same merge, time and peak memory, in one run.

The bench models (``bench/make_models.py``, LLaMA-shaped) are converted to GGUF as llama.cpp converts
them (``testkit.gguf.write_llama_gguf``: GGUF names, Q/K rows interleaved, Q8_0 where the rows split into
blocks, F16 elsewhere, F32 norms); the dequantized GGUF tensors are also written back as safetensors, so
the two merges have the same values. Then ``weightsmith merge`` runs a linear merge of base + ft1 from
each form (CLI subprocesses, peak anonymous RSS of the process tree sampled every 0.1 s), and the outputs
are compared tensor by tensor (they must be identical).

    python bench/gguf_inputs.py                 # tiny models (21M parameters)
    python bench/gguf_inputs.py --size big      # 1.5 GB-class models (748M parameters)

Prints a table and writes ``bench/out/gguf-<size>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))

from _common import OUT, remove_output, run_measured, weightsmith_base_cmd, write_json  # noqa: E402
from make_models import SIZES, ensure_models  # noqa: E402

from merge.checkpoint import open_checkpoint  # noqa: E402
from testkit.gguf import write_llama_gguf  # noqa: E402


def convert(model_dir: Path, size: str, dest: Path, qtype: str) -> Path:
    shape = SIZES[size]
    hp = {"hidden": shape.hidden, "inter": shape.intermediate, "layers": shape.layers, "heads": shape.heads,
          "kv_heads": shape.heads, "vocab": shape.vocab, "context": 2048, "eps": 1e-5, "rope_theta": 10000.0}
    ck = open_checkpoint(model_dir)
    try:
        return write_llama_gguf(dest, hp, ((k, ck[k]) for k in ck), qtype)
    finally:
        ck.close()


def dequantized_copy(gguf_file: Path, model_dir: Path, dest: Path) -> Path:
    """The GGUF's tensors as read (names, values, dtypes) in a safetensors folder with the model's config."""
    dest.mkdir(parents=True, exist_ok=True)
    ck = open_checkpoint(gguf_file)
    save_file({k: ck[k].contiguous() for k in ck}, dest / "model.safetensors")
    (dest / "config.json").write_text((model_dir / "config.json").read_text())
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--qtype", default="Q8_0")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    models = ensure_models(args.size, dtype="bfloat16", n_ft=1)  # {name: folder}
    work = OUT / f"gguf-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ggufs, plain = {}, {}
    for name in ("base", "ft1"):
        g = work / f"{name}-{args.qtype}.gguf"
        if not g.exists():
            convert(models[name], args.size, g, args.qtype)
        ggufs[name] = g
        plain[name] = work / f"{name}-dequantized"
        if not (plain[name] / "model.safetensors").exists():
            dequantized_copy(g, models[name], plain[name])
    prep = time.perf_counter() - t0
    rows = []
    outs = {}
    for form, refs in (("safetensors", plain), ("gguf", ggufs)):
        recipe = {"merge_method": "linear", "dtype": "bfloat16",
                  "models": [{"model": str(refs[n]), "parameters": {"weight": 0.5}} for n in ("base", "ft1")]}
        rfile = work / f"recipe-{form}.yaml"
        rfile.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = work / f"merged-{form}"
        remove_output(out)
        m = run_measured([*weightsmith_base_cmd(), "merge", str(rfile), "-o", str(out), "--json"])
        if m.rc != 0:
            print(m.stderr, file=sys.stderr)
            return 1
        outs[form] = out
        files = [p for r in refs.values() for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]
        inputs = sum(p.stat().st_size for p in files)
        rows.append({"inputs": form, "input_bytes": inputs, "wall_s": m.wall_s, "peak_anon_mb": m.peak_anon_mb,
                     "cpu_s": m.user_s + m.sys_s})
    a, b = open_checkpoint(outs["safetensors"]), open_checkpoint(outs["gguf"])
    identical = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    base = rows[0]
    print(f"\nlinear merge of base + ft1, {args.size} models ({SIZES[args.size].n_params() / 1e6:.1f}M parameters), "
          f"GGUF {args.qtype}; outputs identical: {identical}")
    print("| inputs | input bytes | wall s | peak anon MB | CPU s | wall / safetensors | peak / safetensors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio_wall, ratio_peak = r["wall_s"] / base["wall_s"], r["peak_anon_mb"] / base["peak_anon_mb"]
        print(f"| {r['inputs']} | {r['input_bytes']:,} | {r['wall_s']:.2f} | {r['peak_anon_mb']:.0f} | "
              f"{r['cpu_s']:.2f} | {ratio_wall:.2f} | {ratio_peak:.2f} |")
    write_json(OUT / f"gguf-{args.size}.json", {"size": args.size, "qtype": args.qtype, "rows": rows,
                                                "identical": identical, "prepare_s": prep})
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
