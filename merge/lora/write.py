"""Writing LoRA adapters that peft and kohya tools load.

Writing (:func:`write_peft_adapter`, :func:`write_kohya_adapter`) goes to ``<out>.partial-<id>`` and is
renamed into place, so an error leaves nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from merge.atomic import atomic_output, check_output
from merge.errors import (
    AdapterError,
)
from merge.lora.factors import Factors
from merge.lora.formats import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, Layout

# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutTarget:
    """One target of an adapter to write: ``ΔW = B A`` (scale 1) in ``layout``."""

    module: str
    factors: Factors
    layout: Layout = "linear"
    kernel: tuple[int, ...] = ()  # conv: (in, kh, kw) of A
    transposed: bool = False


def _peft_tensors(t: OutTarget, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    A, B = t.factors.A * t.factors.scale, t.factors.B
    pre = f"{PEFT_PREFIX}{t.module}"
    if t.layout == "embedding":
        return {
            f"{pre}.lora_embedding_A": A.to(dtype).contiguous(),
            f"{pre}.lora_embedding_B": B.to(dtype).contiguous(),
        }
    if t.layout == "conv":
        A = A.reshape(A.shape[0], *t.kernel)
        B = B.reshape(*B.shape, 1, 1)
    return {
        f"{pre}.lora_A.weight": A.to(dtype).contiguous(),
        f"{pre}.lora_B.weight": B.to(dtype).contiguous(),
    }


def _escape(module: str) -> str:
    return re.escape(module)


def write_peft_adapter(
    out_dir: str | Path,
    targets: list[OutTarget],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    modules_to_save: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads: scale 1 on every target.

    ``lora_alpha = r`` globally; a target whose rank differs gets ``rank_pattern`` and ``alpha_pattern``
    entries (its escaped full module name), so each target's scale is exactly 1. ``target_modules`` lists
    the full module names, so peft adapts exactly these modules. ``modules_to_save`` maps full tensor names
    (``classifier.weight``) to replacement tensors.
    """
    from safetensors.torch import save_file

    out = check_output(out_dir, overwrite=overwrite, inputs=inputs)
    if not targets and not modules_to_save:
        raise AdapterError(f"{out}: nothing to write (no targets)")
    ranks = [t.factors.A.shape[0] for t in targets]
    r = max(set(ranks), key=ranks.count) if ranks else 1
    rank_pattern = {_escape(t.module): t.factors.A.shape[0] for t in targets if t.factors.A.shape[0] != r}
    transposed = {t.transposed for t in targets if t.layout == "linear"}
    if len(transposed) > 1:
        raise AdapterError(f"{out}: targets mix fan_in_fan_out layouts, which one PEFT config cannot express")
    tensors: dict[str, torch.Tensor] = {}
    for t in targets:
        tensors.update(_peft_tensors(t, dtype))
    save_mods = sorted({k.rsplit(".", 1)[0] for k in (modules_to_save or {})})
    for k, v in (modules_to_save or {}).items():
        tensors[f"{PEFT_PREFIX}{k}"] = v.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": int(r),
        "target_modules": sorted(t.module for t in targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": bool(transposed and transposed.pop()),
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": save_mods or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    with atomic_output(out, overwrite=overwrite, inputs=inputs, what="adapter") as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt", "written_by": "weightsmith"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def write_kohya_adapter(
    out_file: str | Path,
    targets: list[OutTarget],
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write a kohya LoRA file (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` = rank: scale 1)."""
    from safetensors.torch import save_file

    out = check_output(out_file, overwrite=overwrite, inputs=inputs, kind="file")
    tensors: dict[str, torch.Tensor] = {}
    for t in targets:
        A, B = t.factors.A * t.factors.scale, t.factors.B
        if t.layout == "conv":
            A, B = A.reshape(A.shape[0], *t.kernel), B.reshape(*B.shape, 1, 1)
        tensors[f"{t.module}.lora_down.weight"] = A.to(dtype).contiguous()
        tensors[f"{t.module}.lora_up.weight"] = B.to(dtype).contiguous()
        tensors[f"{t.module}.alpha"] = torch.tensor(float(A.shape[0]), dtype=dtype)
    with atomic_output(out, overwrite=overwrite, inputs=inputs, kind="file") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "written_by": "weightsmith"})
    return out
