"""`make demo`: build small example checkpoints, run real merges with the CLI, show what happened.

Creates a LLaMA-shaped base model and two "fine-tunes" (sharded safetensors, bf16) under
``examples/out/demo/``, writes two mergekit-format recipes (TIES with per-layer density
gradients, and a SLERP frankenmerge with filters), runs ``weightsmith merge`` on each, inspects
the result and checks one merged tensor against a direct computation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "out" / "demo"
HIDDEN, INTER, LAYERS, VOCAB = 128, 352, 6, 512


def model(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{n}_proj.weight": (HIDDEN, HIDDEN) for n in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,)}
    if base is None:
        return {k: (0.02 * torch.randn(s, generator=g)).bfloat16() for k, s in shapes.items()}
    return {k: (base[k].float() + 0.002 * torch.randn(s, generator=g)).bfloat16() for k, s in shapes.items()}


def save(folder: Path, sd: dict[str, torch.Tensor], shards: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_file({k: sd[k] for k in part}, folder / fname)
        weight_map |= {k: fname for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "vocab_size": VOCAB, "torch_dtype": "bfloat16"}, indent=2))


def run(*args: str) -> str:
    exe = Path(sys.executable).with_name("weightsmith")
    cmd = [str(exe), *args]
    print("$ weightsmith " + " ".join(args))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        raise SystemExit(p.returncode)
    return p.stdout


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    base = model(0)
    save(OUT / "base", base)
    save(OUT / "ft_math", model(1, base))
    save(OUT / "ft_code", model(2, base))
    print(f"made 3 checkpoints ({LAYERS} layers, bf16, 2 shards each) in {OUT}\n")

    ties = OUT / "ties.yaml"
    ties.write_text(f"""\
merge_method: ties
base_model: {OUT / 'base'}
models:
  - model: {OUT / 'ft_math'}
    parameters: {{weight: 1.0, density: [0.3, 0.7]}}   # density grows with depth
  - model: {OUT / 'ft_code'}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{normalize: true}}
dtype: bfloat16
""")
    summary = json.loads(run("merge", str(ties), "-o", str(OUT / "merged_ties"), "--json"))
    print(f"  -> {summary['n_tensors']} tensors, {summary['bytes_written'] / 1e6:.1f} MB, "
          f"shards {summary['shards']}, {summary['seconds']:.2f} s\n")

    slerp = OUT / "slerp.yaml"
    slerp.write_text(f"""\
slices:
  - sources:
      - model: {OUT / 'ft_math'}
        layer_range: [0, {LAYERS}]
      - model: {OUT / 'ft_code'}
        layer_range: [0, {LAYERS}]
merge_method: slerp
base_model: {OUT / 'ft_math'}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""")
    summary = json.loads(run("merge", str(slerp), "-o", str(OUT / "merged_slerp"), "--json"))
    print(f"  -> {summary['n_tensors']} tensors in {summary['seconds']:.2f} s\n")

    info = json.loads(run("inspect", str(OUT / "merged_ties"), "--json"))
    t = info["totals"]
    print(f"  -> {t['tensors']} tensors, {t['parameters']:,} parameters, {t['bytes'] / 1e6:.1f} MB "
          f"{t['bytes_by_dtype']}\n")

    # Check one tensor against a direct call of the method on the inputs (float32 compute, bf16 out).
    from merge.checkpoint import open_checkpoint
    from merge.methods import get_method

    name = "model.layers.0.mlp.up_proj.weight"
    ins = [open_checkpoint(OUT / m) for m in ("base", "ft_math", "ft_code")]
    expected = get_method("ties")([ins[1][name].float(), ins[2][name].float()], ins[0][name].float(),
                                  weight=[1.0, 0.5], density=[0.3, 0.5], normalize=True)
    got = open_checkpoint(OUT / "merged_ties")[name]
    same = torch.equal(got, expected.bfloat16())
    print(f"check: '{name}' (layer 0: math density 0.3) equals a direct TIES call: {same}")
    card = (OUT / "merged_ties" / "README.md").read_text().splitlines()
    print(f"model card: {OUT / 'merged_ties' / 'README.md'} ({len(card)} lines)")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
