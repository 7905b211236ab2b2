"""The "streaming floor": the least work a merge tool has to do, written as plainly as possible.

For each shard of the first input model: open every input with ``safetensors.safe_open`` (mmap), and per
tensor compute in float32

- ``--mode sum``:  ``out = Σ_i w_i · x_i`` with ``w_i = 1/n`` (a uniform linear merge of n inputs),
- ``--mode task``: ``out = base + 0.5 · Σ_i (x_i − base)`` (task arithmetic; the first input is the base),

cast to the input dtype, collect the shard's outputs and ``save_file`` them (to a temporary name, then
rename), then write ``model.safetensors.index.json``. One output shard is held at a time. No
validation, no threads beyond torch's own, no progress bar: a lower bound on wall time and CPU for
the same byte work, measured in the same run as the tools it is compared with.

    python bench/floor_stream.py --mode task --out OUT BASE FT1 FT2 FT3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import safetensors_files  # noqa: E402


def stream(mode: str, inputs: list[Path], out: Path) -> int:
    """Run the floor loop; return bytes of tensor data written."""
    out.mkdir(parents=True, exist_ok=False)
    # tensor name -> handle per input model (each model may shard differently)
    handles: list[dict[str, object]] = []
    opened = []
    for m in inputs:
        names: dict[str, object] = {}
        for f in safetensors_files(m):
            h = safe_open(str(f), framework="pt")
            opened.append(h)
            for k in h.keys():
                names[k] = h
        handles.append(names)
    shards = safetensors_files(inputs[0])
    n = len(shards)
    weight_map: dict[str, str] = {}
    written = 0
    for k, f in enumerate(shards, start=1):
        with safe_open(str(f), framework="pt") as h0:
            names = list(h0.keys())
        result: dict[str, torch.Tensor] = {}
        for name in names:
            xs = [hs[name].get_tensor(name) for hs in handles]  # type: ignore[attr-defined]
            dtype = xs[0].dtype
            if mode == "sum":
                acc = xs[0].float()
                for x in xs[1:]:
                    acc += x.float()
                acc *= 1.0 / len(xs)
            else:
                base = xs[0].float()
                delta = torch.zeros_like(base)
                for x in xs[1:]:
                    delta += x.float() - base
                acc = base.add_(delta, alpha=0.5)
            result[name] = acc.to(dtype)
            del xs, acc
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tmp = out / (fname + ".tmp")
        save_file(result, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
        written += sum(t.numel() * t.element_size() for t in result.values())
        weight_map.update({name: fname for name in result})
        del result
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map}))
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["sum", "task"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("inputs", type=Path, nargs="+")
    a = ap.parse_args(argv)
    if a.mode == "task" and len(a.inputs) < 2:
        ap.error("--mode task needs a base and at least one more input")
    written = stream(a.mode, a.inputs, a.out)
    print(json.dumps({"mode": a.mode, "inputs": len(a.inputs), "bytes_written": written}))


if __name__ == "__main__":
    main()
