"""Quantized safetensors: FP8 weights dequantized as they are read; other quantizations refused.

FP8 checkpoints store a weight ``W`` as ``float8_e4m3fn`` (or ``float8_e5m2``) next to its scale:

* Hugging Face's fine-grained FP8 (``quant_method: fp8``, DeepSeek-V3 style): ``<name>_scale_inv``, one
  float per block of ``weight_block_size`` (e.g. 128 × 128) rows × columns, ``W_real = W · s``;
* compressed-tensors (``quant_method: compressed-tensors``, float8): ``<module>.weight_scale``, one
  per tensor or one per output channel (shape ``[rows, 1]``), ``W_real = W · s``.

:class:`ScaledTensors` finds those pairs in a checkpoint's header, hides the scale tensors and serves
each weight dequantized to bfloat16 (as transformers dequantizes them), whole or by row range. An FP8
tensor without a scale is read as its values. A checkpoint quantized any other way (GPTQ, AWQ,
bitsandbytes, packed integer weights...) is refused when it is opened, with a line saying how it is
quantized: its integers are never merged as if they were weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.errors import CheckpointError

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
#: what a dequantized FP8 weight is served as (transformers' choice too)
DEQUANTIZED = torch.bfloat16
_READABLE = {"fp8", "compressed-tensors"}
_PACKED_SUFFIXES = (".qweight", ".qzeros", ".weight_packed", ".g_idx", ".SCB", ".absmax", ".quant_map")


@dataclass(frozen=True)
class Scale:
    name: str  # the scale tensor
    block: tuple[int, int] | None  # rows x columns per scale; None: one scale for the whole tensor


def quantization_config(folder: Path) -> dict[str, Any] | None:
    """``quantization_config`` of the ``config.json`` in ``folder``, if any."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    q = data.get("quantization_config") if isinstance(data, dict) else None
    return q if isinstance(q, dict) else None


def check_quantization(where: Path, qcfg: dict[str, Any] | None, infos: dict[str, Any]) -> None:
    """Refuse a checkpoint quantized in a way weightsmith does not dequantize (module docstring)."""
    method = str((qcfg or {}).get("quant_method", "")).lower()
    if method and method not in _READABLE:
        raise CheckpointError(
            f"{where}: quantized with {method} (config.json quantization_config); weightsmith reads FP8 and GGUF "
            "quantizations only: merge the unquantized model"
        )
    packed = next((n for n in infos if n.endswith(_PACKED_SUFFIXES)), None)
    if packed is not None:
        raise CheckpointError(
            f"{where}: tensor '{packed}' is a packed quantized weight (GPTQ/AWQ/bitsandbytes-style); weightsmith "
            "reads FP8 and GGUF quantizations only: merge the unquantized model"
        )


def find_scales(infos: dict[str, Any], qcfg: dict[str, Any] | None) -> dict[str, Scale]:
    """FP8 weight name -> its scale (module docstring); weights without one are absent."""
    block_cfg = (qcfg or {}).get("weight_block_size")
    out: dict[str, Scale] = {}
    for name, info in infos.items():
        if info.dtype not in FP8:
            continue
        candidates = [f"{name}_scale_inv", f"{name}_scale"]
        if name.endswith(".weight"):
            candidates.append(name[: -len("weight")] + "weight_scale")
        sname = next((c for c in candidates if c in infos), None)
        if sname is None:
            continue
        s_shape = tuple(infos[sname].shape)
        w_shape = tuple(info.shape)
        if not s_shape or all(d == 1 for d in s_shape):
            out[name] = Scale(sname, None)
            continue
        if len(w_shape) != 2 or len(s_shape) != 2:
            raise CheckpointError(f"tensor '{name}': FP8 scale '{sname}' of shape {list(s_shape)} does not fit "
                                  f"a weight of shape {list(w_shape)}")
        if block_cfg and len(block_cfg) == 2 and s_shape != (1, 1) and s_shape[1] != 1:
            block = (int(block_cfg[0]), int(block_cfg[1]))
        else:
            block = (-(-w_shape[0] // s_shape[0]), -(-w_shape[1] // s_shape[1]))
        if (-(-w_shape[0] // block[0]), -(-w_shape[1] // block[1])) != s_shape:
            raise CheckpointError(f"tensor '{name}': FP8 scale '{sname}' of shape {list(s_shape)} does not tile "
                                  f"a weight of shape {list(w_shape)} in blocks of {list(block)}")
        out[name] = Scale(sname, block)
    return out


def dequantize_rows(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, r0: int) -> torch.Tensor:
    """Rows ``r0:r0 + len(w)`` of a weight, ``w`` their FP8 values and ``scale`` the scale rows covering them
    (all of it for one scale per tensor)."""
    x = w.float()
    if block is None:
        return (x * scale.float().reshape(())).to(DEQUANTIZED)
    br, bc = block
    rows = torch.arange(r0, r0 + x.shape[0]) // br - r0 // br
    s = scale.float()[rows]
    s = s.repeat_interleave(bc, dim=1)[:, : x.shape[1]]
    return (x * s).to(DEQUANTIZED)


def scale_rows(scale: Scale, r0: int, r1: int) -> tuple[int, int]:
    """The rows of the scale tensor that cover weight rows ``r0:r1``."""
    if scale.block is None:
        return 0, 1
    br = scale.block[0]
    return r0 // br, -(-r1 // br)
