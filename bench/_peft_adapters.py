"""The peer side of ``bench/adapters.py``: what a peft user runs to fold or SVD-merge LoRA adapters.

    python bench/_peft_adapters.py fold BASE ADAPTER OUT
    python bench/_peft_adapters.py svd  BASE ADAPTER1 ADAPTER2 OUT --rank 16 [--reduced]

``fold``: ``AutoModelForCausalLM.from_pretrained(BASE, dtype=bfloat16)`` → ``PeftModel.from_pretrained`` →
``merge_and_unload()`` → ``save_pretrained(OUT)`` (safetensors). ``svd``: load the model and both adapters,
``add_weighted_adapter([a, b], [1, 1], "merged", combination_type="svd", svd_rank=R)`` (peft's defaults:
``svd_full_matrices=True``; ``--reduced`` passes False), then ``save_pretrained(OUT,
selected_adapters=["merged"])``. Prints one JSON line with the in-process seconds of each phase.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fold", "svd"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reduced", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = {"t0": time.perf_counter()}
    base = args.paths[0]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, low_cpu_mem_usage=True)
    t["loaded"] = time.perf_counter()
    if args.mode == "fold":
        _, adapter, out = args.paths
        pm = PeftModel.from_pretrained(model, adapter)
        merged = pm.merge_and_unload()
        t["merged"] = time.perf_counter()
        merged.save_pretrained(out, safe_serialization=True)
    else:
        _, a, b, out = args.paths
        pm = PeftModel.from_pretrained(model, a, adapter_name="a")
        pm.load_adapter(b, adapter_name="b")
        pm.add_weighted_adapter(
            ["a", "b"],
            [1.0, 1.0],
            "merged",
            combination_type="svd",
            svd_rank=args.rank,
            svd_full_matrices=not args.reduced,
        )
        t["merged"] = time.perf_counter()
        pm.save_pretrained(out, selected_adapters=["merged"])
    t["saved"] = time.perf_counter()
    print(
        json.dumps(
            {
                "load_s": t["loaded"] - t["t0"],
                "merge_s": t["merged"] - t["loaded"],
                "save_s": t["saved"] - t["merged"],
                "tool_seconds": t["saved"] - t["t0"],
            }
        )
    )


if __name__ == "__main__":
    main()
