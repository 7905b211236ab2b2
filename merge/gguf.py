"""GGUF checkpoints read like any other: lazily, tensor by tensor, dequantized per row range.

GGUF (llama.cpp's format) stores each tensor in a block format (F32, F16, BF16, Q8_0, Q4_0...,
the K-quants) behind one header of metadata. :class:`GGUFTensors` opens a ``.gguf`` file (or a
split set ``name-00001-of-0000N.gguf``) through the ``gguf`` package (llama.cpp's own Python
reader: the file is memory-mapped, nothing is read up front) and serves

* **names**: Hugging Face names (``model.layers.0.self_attn.q_proj.weight``) where transformers
  knows the architecture — the same mapping ``from_pretrained(..., gguf_file=...)`` uses, built
  from a model skeleton on the meta device — so a GGUF model and a safetensors model of the same
  family merge together; otherwise the GGUF names (``blk.0.attn_q.weight``), which still merge
  with another GGUF of the same architecture;
* **values**: F32, F16 and BF16 as they are stored; every quantized type the ``gguf`` package can
  dequantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...) as float32, dequantized per row range
  (a row never splits a quantization block), so a merge holds a few row chunks, never a whole
  model. A type the package cannot dequantize is refused when the file is opened, naming the
  tensor and its type. llama.cpp stores llama-family Q and K projections with their rows
  interleaved for its rotary kernel; they are put back in Hugging Face order (the reverse of
  ``convert_hf_to_gguf.py``'s permutation, as transformers does), reading those tensors whole;
* **metadata**: the header's key/value pairs (tokenizer, chat template, rope settings) as
  :attr:`GGUFTensors.metadata`.

Shapes are reported in PyTorch order (GGUF lists dimensions innermost first).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merge.errors import CheckpointError

GGUF_SUFFIX = ".gguf"
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
#: llama-family architectures whose Q/K rows llama.cpp interleaves (transformers' LlamaTensorProcessor)
_PERMUTED_QK = {"llama"}


def gguf_files(path: Path) -> list[Path]:
    """The file(s) of a GGUF checkpoint: one ``.gguf`` file, every part of its split set, or the one
    ``.gguf`` (set) in a folder; [] when ``path`` holds none."""
    if path.is_file():
        if path.suffix != GGUF_SUFFIX:
            return []
        m = _SPLIT.match(path.name)
        if not m:
            return [path]
        parts = [path.parent / f"{m['stem']}-{i:05d}-of-{m['n']}.gguf" for i in range(1, int(m["n"]) + 1)]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise CheckpointError(f"{path}: split GGUF set is missing {', '.join(missing)}")
        return parts
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if not found:
        return []
    sets = {(_SPLIT.match(f.name)["stem"] if _SPLIT.match(f.name) else f.stem) for f in found}
    if len(sets) > 1:
        raise CheckpointError(
            f"{path}: {len(sets)} GGUF models in one folder ({', '.join(sorted(sets))}); name one file"
        )
    return gguf_files(found[0])


def _field_value(field: Any) -> Any:
    from gguf import GGUFValueType

    vals = []
    for i in field.data:
        part = field.parts[i]
        if field.types and field.types[-1] == GGUFValueType.STRING:
            vals.append(bytes(part).decode("utf-8", errors="replace"))
        else:
            vals.append(part.tolist()[0] if len(part) == 1 else part.tolist())
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return vals
    return vals[0] if len(vals) == 1 else vals


class GGUFTensors:
    """The tensors of a GGUF checkpoint (module docstring): ``names()``, ``shape``, ``dtype``, ``read``, ``rows``."""

    def __init__(self, files: list[Path]) -> None:
        try:
            import gguf
        except ImportError:
            raise CheckpointError(
                f"{files[0]}: reading GGUF needs the 'gguf' package (pip install 'weightsmith[gguf]')"
            ) from None
        self.files = files
        self._lock = threading.Lock()
        try:
            self._readers = [gguf.GGUFReader(f) for f in files]
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct.error, OSError...
            raise CheckpointError(f"{files[0]}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.metadata: dict[str, Any] = {}
        for r in self._readers:
            for key, field in r.fields.items():
                if not key.startswith("GGUF.") and key not in self.metadata:
                    self.metadata[key] = _field_value(field)
        self.architecture = str(self.metadata.get("general.architecture", ""))
        self._tensors: dict[str, tuple[Any, Path]] = {}
        for f, r in zip(files, self._readers, strict=True):
            for t in r.tensors:
                if t.name in self._tensors:
                    raise CheckpointError(f"{f}: tensor '{t.name}' is stored twice in the GGUF set")
                self._check_type(f, t)
                self._tensors[t.name] = (t, f)
        self.hf_names, self._config = self._name_map()
        self._by_name = {self.hf_names.get(g, g): g for g in self._tensors}

    def __reduce__(self) -> tuple[Any, tuple[list[Path]]]:
        """Pickled as its file list (a plan handed to a service worker): the worker maps the files again."""
        return GGUFTensors, (self.files,)

    # -- header ------------------------------------------------------------------------------------
    @staticmethod
    def _check_type(file: Path, t: Any) -> None:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import _type_traits

        if t.tensor_type in (Q.F32, Q.F16, Q.BF16) or t.tensor_type in _type_traits:
            return
        raise CheckpointError(
            f"{file}: tensor '{t.name}' is stored as {t.tensor_type.name}, which the gguf package cannot "
            "dequantize; convert the file to a supported type (F16, BF16, Q8_0, Q4_K...) first"
        )

    def _name_map(self) -> tuple[dict[str, str], dict[str, Any]]:
        """GGUF name -> Hugging Face name, as transformers maps them; {} when it does not know the architecture."""
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
            from transformers.modeling_gguf_pytorch_utils import (
                TensorProcessor,
                get_gguf_hf_weights_map,
                load_gguf_checkpoint,
            )
        except ImportError:
            return {}, {}
        try:
            config = dict(load_gguf_checkpoint(str(self.files[0]), return_tensors=False)["config"])
            cfg = AutoConfig.for_model(**config)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(cfg)
            mapping = get_gguf_hf_weights_map(skeleton, TensorProcessor(config=config))
        except Exception:  # noqa: BLE001 - an architecture transformers does not read from GGUF: GGUF names
            return {}, {}
        return {g: h for g, h in mapping.items() if g in self._tensors}, config

    # -- TensorSource --------------------------------------------------------------------------------
    def names(self) -> Iterator[str]:
        return iter(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def _entry(self, name: str) -> tuple[Any, Path]:
        try:
            return self._tensors[self._by_name[name]]
        except KeyError:
            from merge.errors import MissingTensorError

            raise MissingTensorError(f"{self.files[0]}: no tensor named '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        t, _ = self._entry(name)
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    def dtype(self, name: str) -> torch.dtype:
        from gguf import GGMLQuantizationType as Q

        t, _ = self._entry(name)
        return {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(t.tensor_type, torch.float32)

    def stored_type(self, name: str) -> str:
        """The tensor's GGUF type name (``Q8_0``, ``F16``...)."""
        return self._entry(name)[0].tensor_type.name

    def _permuted(self, gguf_name: str) -> tuple[int, int] | None:
        """(heads, groups) of a llama-family Q or K projection stored with interleaved rows, else None."""
        if self.architecture not in _PERMUTED_QK or not self._config:
            return None
        heads = self._config.get("num_attention_heads")
        kv = self._config.get("num_key_value_heads") or heads
        if heads is None:
            return None
        if ".attn_q." in gguf_name:
            return heads, heads
        if ".attn_k." in gguf_name:
            return heads, kv
        return None

    def _decode(self, t: Any, data: np.ndarray) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        if t.tensor_type == Q.F32:
            return torch.from_numpy(np.array(data, dtype=np.float32))
        if t.tensor_type == Q.F16:
            return torch.from_numpy(np.array(data, dtype=np.float16))
        if t.tensor_type == Q.BF16:
            raw = np.ascontiguousarray(data).view(np.int16)
            return torch.from_numpy(raw.copy()).view(torch.bfloat16)
        if t.tensor_type == Q.Q8_0:
            return _q8_0(data)
        return torch.from_numpy(np.ascontiguousarray(dequantize(data, t.tensor_type), dtype=np.float32))

    def read(self, name: str) -> torch.Tensor:
        t, f = self._entry(name)
        shape = self.shape(name)
        try:
            out = self._decode(t, t.data).reshape(shape)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file surfaces here
            raise CheckpointError(f"{f}: cannot read tensor '{t.name}': {type(e).__name__}: {e}") from None
        qk = self._permuted(t.name)
        if qk is not None:
            out = _unpermute_rows(out, qk[1])
        return out

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        t, f = self._entry(name)
        shape = self.shape(name)
        if not shape or (r0 <= 0 and r1 >= shape[0]) or self._permuted(t.name) is not None:
            return self.read(name)[r0:r1] if shape else self.read(name)
        try:
            return self._decode(t, t.data[r0:r1]).reshape(r1 - r0, *shape[1:])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot read rows {r0}:{r1} of tensor '{t.name}': {e}") from None


def _q8_0(data: np.ndarray) -> torch.Tensor:
    """Q8_0 blocks (a float16 scale d, then 32 int8 values q) as float32 d · q, in torch (multi-threaded; the
    same products as the package's numpy dequantizer, bit for bit: both factors are exact in float32)."""
    raw = torch.from_numpy(np.array(data, dtype=np.uint8)).reshape(-1, 34)  # a copy: the map is read-only
    d = raw[:, :2].contiguous().view(torch.float16).float()
    q = raw[:, 2:].view(torch.int8).float()
    return (q * d).reshape(*data.shape[:-1], data.shape[-1] // 34 * 32)


def _unpermute_rows(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Hugging Face row order of a Q/K projection that llama.cpp stored for its rotary kernel.

    ``convert_hf_to_gguf.py`` reshapes the rows as (groups, 2, head_dim/2) and swaps the last two axes,
    interleaving each head's two rotary halves; this swaps them back (``groups`` = KV heads for K)."""
    half = w.shape[0] // groups // 2
    return w.reshape(groups, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
