"""Generate LLaMA-shaped synthetic checkpoints for the mergekit comparisons (deterministic by seed).

``--size big``: hidden 2048, intermediate 5632, 12 layers, 16 heads (no GQA), vocab 32000, untied
``lm_head``: 747.7M parameters, about 1.5 GB per model in bf16, 4 shards + ``model.safetensors.index.json``
+ a ``config.json`` with ``LlamaForCausalLM`` (so mergekit recognises the architecture).
``--size tiny``: hidden 256, intermediate 688, 6 layers, 4 heads, vocab 32000: 21.1M parameters, 2 shards.

``base`` ~ N(0, 0.02²) with RMSNorm weights = 1; ``ft1..ftN`` = base + N(0, 0.002²) with a different seed
each (a stand-in for fine-tunes: small task vectors around a shared base). Every tensor is drawn from its
own generator seeded by (seed, model, tensor name), so a model is bit-identical however it is sharded and
whichever models are generated first. A finished model folder carries ``.bench-model.json``; a folder
whose stamp matches the request is not regenerated. Models are written into ``<dir>.partial`` and
renamed into place when complete.

    python bench/make_models.py --size big            # -> bench/out/models/big-bfloat16/{base,ft1,ft2,ft3}
    python bench/make_models.py --size tiny --dtype float32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS  # noqa: E402


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    shards: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and shapes in the order HF LLaMA checkpoints list them."""
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                    (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def n_params(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def config(self, dtype: str) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads, "vocab_size": self.vocab, "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "initializer_range": 0.02, "tie_word_embeddings": False, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
            "torch_dtype": dtype,
        }


SIZES = {
    "big": LlamaShape(hidden=2048, intermediate=5632, layers=12, heads=16, vocab=32000, shards=4),
    "tiny": LlamaShape(hidden=256, intermediate=688, layers=6, heads=4, vocab=32000, shards=2),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASE_STD = 0.02
FT_STD = 0.002


def _gen(seed: int, model: int, name: str) -> torch.Generator:
    key = (seed * 1_000_003 + model * 7_919 + zlib.crc32(name.encode())) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The float32 base tensor: ones for RMSNorm weights, N(0, 0.02²) otherwise."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=_gen(seed, 0, name)) * BASE_STD


def model_tensor(name: str, shape: tuple[int, ...], seed: int, model: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Tensor ``name`` of model ``model`` (0 = base, k = fine-tune k), cast to ``dtype``."""
    t = base_tensor(name, shape, seed)
    if model:
        t += torch.randn(shape, generator=_gen(seed, model, name)) * FT_STD
    return t.to(dtype).contiguous()


def _shard_plan(shape: LlamaShape, itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the tensor list, in order, into ``shape.shards`` groups of roughly equal bytes."""
    tensors = shape.tensors()
    sizes = []
    for _, s in tensors:
        n = itemsize
        for d in s:
            n *= d
        sizes.append(n)
    target = sum(sizes) / shape.shards
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for t, nb in zip(tensors, sizes, strict=True):
        if shards[-1] and acc + nb / 2 > target * len(shards) and len(shards) < shape.shards:
            shards.append([])
        shards[-1].append(t)
        acc += nb
    return shards


def write_model(dest: Path, shape: LlamaShape, *, seed: int, model: int, dtype: str) -> None:
    """Write one model folder atomically (``dest.partial`` then rename)."""
    tdt = DTYPES[dtype]
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plan = _shard_plan(shape, torch.empty((), dtype=tdt).element_size())
    n = len(plan)
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {name: model_tensor(name, s, seed, model, tdt) for name, s in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    stamp = {"shape": asdict(shape), "seed": seed, "model": model, "dtype": dtype,
             "base_std": BASE_STD, "ft_std": FT_STD, "total_size": total}
    (tmp / ".bench-model.json").write_text(json.dumps(stamp, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def _stamp_ok(dest: Path, shape: LlamaShape, seed: int, model: int, dtype: str) -> bool:
    try:
        st = json.loads((dest / ".bench-model.json").read_text())
    except (OSError, ValueError):
        return False
    return (st.get("shape") == asdict(shape) and st.get("seed") == seed and st.get("model") == model
            and st.get("dtype") == dtype and st.get("ft_std") == FT_STD and st.get("base_std") == BASE_STD)


def model_names(n_ft: int) -> list[str]:
    return ["base"] + [f"ft{k}" for k in range(1, n_ft + 1)]


def ensure_models(size: str = "tiny", *, dtype: str = "bfloat16", seed: int = 0, n_ft: int = 3,
                  root: Path | None = None, force: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Make (or reuse) ``base`` and ``ft1..ft{n_ft}`` under ``root/<size>-<dtype>[-s<seed>]/``."""
    shape = SIZES[size]
    folder = (root or MODELS) / (f"{size}-{dtype}" + (f"-s{seed}" if seed else ""))
    out: dict[str, Path] = {}
    for model, name in enumerate(model_names(n_ft)):
        dest = folder / name
        out[name] = dest
        if not force and _stamp_ok(dest, shape, seed, model, dtype):
            continue
        t0 = time.perf_counter()
        write_model(dest, shape, seed=seed, model=model, dtype=dtype)
        if not quiet:
            print(f"[models] wrote {dest} ({shape.n_params() / 1e6:.1f}M params, {dtype}) "
                  f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-ft", type=int, default=3, help="number of fine-tunes next to the base (default 3)")
    ap.add_argument("--out", type=Path, default=None, help=f"root folder (default {MODELS})")
    ap.add_argument("--force", action="store_true", help="regenerate even if present")
    a = ap.parse_args(argv)
    paths = ensure_models(a.size, dtype=a.dtype, seed=a.seed, n_ft=a.n_ft, root=a.out, force=a.force)
    shape = SIZES[a.size]
    print(f"{a.size}: {shape.n_params():,} params per model, {shape.shards} shards, dtype {a.dtype}")
    for name, p in paths.items():
        print(f"  {name}: {p}")


if __name__ == "__main__":
    main()
