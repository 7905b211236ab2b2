"""Small GGUF files for tests and benches, written with the ``gguf`` package (no download).

:func:`llama_gguf` converts a Hugging Face llama state dict the way llama.cpp's ``convert_hf_to_gguf.py``
does for this architecture: GGUF tensor names from the package's name map, the Q and K projections'
rows interleaved for the rotary kernel, the hyperparameters transformers reads back as metadata,
each tensor stored in the requested type (F32, F16, BF16 or a type the package can quantize, e.g.
Q8_0, Q4_0, Q5_1). :func:`raw_kquant_gguf` writes arbitrary blocks of a K-quant type (the package
dequantizes K-quants but cannot quantize them) to check the reader against the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from merge.gguf_write import interleave_rows


def tiny_llama(seed: int = 0, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               inter: int = 128, vocab: int = 256) -> tuple[Any, dict[str, torch.Tensor]]:
    """A random ``LlamaForCausalLM`` (transformers builds it from its config, offline) and its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def llama_gguf(path: Path, model: Any, state: dict[str, torch.Tensor], qtype: str = "F16",
               *, keep_f32: tuple[str, ...] = ("norm",)) -> Path:
    """Write ``state`` (a transformers llama model's) as a GGUF file at ``path`` (:func:`write_llama_gguf`)."""
    c = model.config
    rope = float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    hp = {"hidden": c.hidden_size, "inter": c.intermediate_size, "layers": c.num_hidden_layers,
          "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "vocab": c.vocab_size,
          "context": c.max_position_embeddings, "eps": c.rms_norm_eps, "rope_theta": rope}
    return write_llama_gguf(path, hp, state.items(), qtype, keep_f32=keep_f32)


def write_llama_gguf(path: Path, hp: dict[str, Any], tensors: Any, qtype: str = "F16",
                     *, keep_f32: tuple[str, ...] = ("norm",)) -> Path:
    """Write llama ``tensors`` (``(hf_name, tensor)`` pairs, Hugging Face names) as llama.cpp converts them
    (module docstring); ``hp``: hidden, inter, layers, heads, kv_heads, vocab, context, eps, rope_theta.
    1-D tensors and names containing one of ``keep_f32`` stay F32 (as llama.cpp keeps norms); a matrix
    whose rows do not split into the type's blocks falls back to F16 (as llama.cpp does)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["layers"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(hp["context"])
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["layers"])
    w.add_feed_forward_length(hp["inter"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_layer_norm_rms_eps(hp["eps"])
    w.add_vocab_size(hp["vocab"])
    w.add_rope_dimension_count(hp["hidden"] // hp["heads"])
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    want = Q[qtype]
    block = gguf.GGML_QUANT_SIZES[want][0]
    for hf_name, t in tensors:
        base, suffix = hf_name.rsplit(".", 1)
        name = tmap.get_name(base)
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        a = t.float().numpy()
        if name.endswith("attn_q"):
            a = interleave_rows(a, hp["heads"])
        elif name.endswith("attn_k"):
            a = interleave_rows(a, hp["kv_heads"])
        gname = f"{name}.{suffix}"
        if a.ndim == 1 or any(k in hf_name for k in keep_f32) or want == Q.F32:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        elif want == Q.F16 or a.shape[-1] % block:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), want)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=want)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def raw_kquant_gguf(path: Path, shape: tuple[int, int], qtype: str = "Q4_K", seed: int = 0) -> Path:
    """A GGUF file holding one tensor ``w`` of ``shape`` in a K-quant type, with random blocks whose two
    float16 scales are small and finite (the package dequantizes K-quants but cannot quantize them)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    qt = Q[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    rows, cols = shape
    if cols % block:
        raise ValueError(f"{qtype}: the row length must be a multiple of {block}")
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(rows, cols // block, 2)).astype(np.float16)
    raw[..., :4] = scales.view(np.uint8).reshape(rows, cols // block, 4)  # d and dmin (Q4_K, Q5_K layouts)
    raw = raw.reshape(rows, -1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", raw, raw_shape=raw.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
