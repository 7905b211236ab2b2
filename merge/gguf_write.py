"""A merged checkpoint written as one GGUF file, with the metadata of a GGUF input (``--out-format gguf``).

The header — architecture, hyperparameters, tokenizer, chat template, everything but the tensors — is
copied from a *template*: a GGUF model of the merge (its base when that is one). Tensor names go back
from Hugging Face to GGUF through the template's own map (merge.gguf), the llama family's Q and K rows
are interleaved again for llama.cpp's rotary kernel, and each tensor is stored as the template stored
it where that was F32 (norms, biases), else in ``out_type`` — one the ``gguf`` package can write (F32,
F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; it cannot quantize the K-quants) — falling back to F16 for a
matrix whose rows do not split into the type's blocks, as llama.cpp does. Tensors are quantized and
written one at a time (the header first, then each tensor's data), into a temporary file renamed into
place (merge.atomic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from merge.errors import CheckpointError, RecipeError

OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _qtype(out_type: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    if out_type.lower() not in OUT_TYPES:
        raise RecipeError(f"GGUF out type {out_type!r}: one of {', '.join(OUT_TYPES)} (the gguf package cannot "
                          "quantize the K-quants)")
    return Q[out_type.upper()]


def interleave_rows(a: np.ndarray, groups: int) -> np.ndarray:
    """llama.cpp's Q/K row order from Hugging Face's (the inverse of merge.gguf._unpermute_rows)."""
    return a.reshape(groups, 2, a.shape[0] // groups // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def gguf_template(plan: Any) -> Any:
    """The GGUF model of a merge plan whose header a GGUF output copies: its base when that is one, else the
    first GGUF model; RecipeError when the recipe has none."""
    refs = [m.ref for m in plan.models]
    order = ([refs.index(plan.recipe.base_model)] if plan.recipe.base_model in refs else []) + list(range(len(refs)))
    template = next((plan.checkpoints[i].gguf for i in order if plan.checkpoints[i].gguf is not None), None)
    if template is None:
        raise RecipeError("--out-format gguf copies its header (hyperparameters, tokenizer, chat template) from a "
                          "GGUF model of the recipe, and none of its models is one")
    return template


def _copy_header(writer: Any, template: Any) -> None:
    from gguf import GGUFValueType as T

    for reader in template._readers[:1]:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "split.no", "split.count",
                                                  "split.tensors.count"):
                continue
            vtype = T(field.types[0])
            sub = T(field.types[-1]) if vtype == T.ARRAY else None
            value = template.metadata[key]
            if vtype == T.ARRAY and not isinstance(value, list):
                value = [value]
            writer.add_key_value(key, value, vtype, sub_type=sub)


def write_gguf(
    source: Any,
    names: Iterable[str],
    out: str | Path,
    template: Any,
    out_type: str = "f16",
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``source``'s tensors ``names`` (Hugging Face names, e.g. a merged Checkpoint) as a GGUF file at
    ``out`` with ``template``'s header (a :class:`merge.gguf.GGUFTensors`; module docstring)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from merge.atomic import atomic_output

    want = _qtype(out_type)
    to_gguf = {hf: g for g, hf in template.hf_names.items()} if template.hf_names else {}
    names = list(names)
    plan: list[tuple[str, str, Any, tuple[int, ...]]] = []
    for name in names:
        gname = to_gguf.get(name, name if not to_gguf else None)
        if gname is None or gname not in template._tensors:
            raise CheckpointError(f"tensor '{name}': no GGUF name in the template's architecture "
                                  f"({template.architecture or 'unknown'}); GGUF out needs the template's tensors")
        stored = template._tensors[gname][0].tensor_type
        shape = tuple(int(d) for d in source.shape(name))
        block = gguf.GGML_QUANT_SIZES[want][0]
        if stored == Q.F32 or len(shape) < 2 or want == Q.F32:
            qt = Q.F32
        elif want in (Q.F16, Q.BF16) or shape[-1] % block:
            qt = want if want in (Q.F16, Q.BF16) else Q.F16
        else:
            qt = want
        plan.append((name, gname, qt, shape))
    with atomic_output(out, overwrite=overwrite, inputs=inputs, kind="file", what="gguf") as tmp:
        w = gguf.GGUFWriter(str(tmp), template.architecture)
        _copy_header(w, template)
        for _name, gname, qt, shape in plan:
            block, size = gguf.GGML_QUANT_SIZES[qt]
            n = int(np.prod(shape)) if shape else 1
            nbytes = n // block * size
            dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(qt, np.uint8)
            raw_shape = shape if qt in (Q.F32, Q.F16) else (*shape[:-1], shape[-1] // block * size)
            w.add_tensor_info(gname, raw_shape, np.dtype(dtype), nbytes, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, gname, qt, _shape) in enumerate(plan):
            a = source[name].float().numpy()
            qk = template._permuted(gname)
            if qk is not None:
                a = interleave_rows(a, qk[1])
            if qt == Q.F32:
                data = np.ascontiguousarray(a, dtype=np.float32)
            elif qt == Q.F16:
                data = a.astype(np.float16)
            else:
                data = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qt)
            w.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, len(plan))
        w.close()
    return Path(out)
