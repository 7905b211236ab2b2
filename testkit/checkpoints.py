"""Small real safetensors checkpoints built on the fly (LLaMA-named), and a digest of a folder's bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_like(seed: int, *, layers: int = 3, hidden: int = 16, inter: int = 24, vocab: int = 40,
               dtype: torch.dtype = torch.float32, base: dict[str, torch.Tensor] | None = None,
               noise: float = 0.01) -> dict[str, torch.Tensor]:
    """A tiny LLaMA-named state dict; with ``base``, base + noise (a "fine-tune")."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter),
                   p + "input_layernorm.weight": (hidden,)}
    out = {}
    for k, s in shapes.items():
        if base is not None:
            out[k] = (base[k].float() + noise * torch.randn(s, generator=g)).to(dtype)
        else:
            out[k] = (0.02 * torch.randn(s, generator=g)).to(dtype)
    return out


def write_checkpoint(folder: Path, sd: dict[str, torch.Tensor], *, shards: int = 1,
                     config: dict | None = None) -> Path:
    """Write ``sd`` as one model.safetensors or as ``shards`` shards with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    if shards == 1:
        save_file(sd, folder / "model.safetensors")
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k] for k in part}, folder / fname)
            weight_map |= {k: fname for k in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = config if config is not None else {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def tree_digest(folder: Path) -> str:
    """A digest of every file (name + bytes) below ``folder``: proves inputs were not modified."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
