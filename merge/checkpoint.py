"""Checkpoints on disk: a lazy reader and a streaming, atomic, sharded writer.

Reading: one ``.safetensors`` file, a folder holding one, or a sharded folder with
``model.safetensors.index.json``. Every file's header is checked *before* ``safe_open`` maps it
(size cap, duplicate keys, tensor-count cap, dtypes, offsets that tile the data section exactly
and byte span == file size) and shard paths must stay inside the checkpoint folder. Nothing is
loaded until a tensor (or a row range of it) is asked for. Pickle checkpoints (``.bin``, ``.pt``,
``.ckpt``) are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``.

Writing: :class:`CheckpointWriter` is given the full list of output tensors (name, shape,
dtype) up front, so each shard's safetensors header is known before any data exists. Tensors (or
row chunks of them) are handed over as they are produced, in any order, and staged into aligned
8 MiB blocks that I/O threads write behind the merge with ``O_DIRECT`` (``merge.blockio``):
memory holds a few blocks, whatever the shard size (mergekit holds a whole output shard, 5 GB by
default, in RAM), and a byte never written is an error, not a hole. Everything goes to
``<out>.partial-<id>/`` and is renamed into place after an fsync, so an interrupted merge leaves
no half-written model folder.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open

from merge.atomic import check_output, fsync_dir, fsync_tree, partial_name, publish, write_marker
from merge.blockio import BlockSink
from merge.errors import (
    CheckpointError,
    MissingTensorError,
    ModelNotFoundError,
    NonFiniteError,
    PickleRefusedError,
)

INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

#: Header pre-check limits (a header bomb is refused before safetensors parses it).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 1_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

#: Files copied from the base (or first) model next to the merged weights.
AUX_FILE_PATTERNS = (
    r"config\.json",
    r"generation_config\.json",
    r"tokenizer.*",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"vocab\.(txt|json)",
    r"merges\.txt",
    r"spiece\.model",
    r"sentencepiece.*\.model",
    r"chat_template\.(jinja|json)",
    r"preprocessor_config\.json",
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference as written in a recipe, and where it was found."""

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    #: LoRA adapters folded into this model as it is read (``base+adapter`` references; merge.lora.formats)
    adapters: tuple[ResolvedModel, ...] = ()
    adapter_weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    #: absolute byte offset of the tensor's data in ``file`` (safetensors; -1 for pickles)
    offset: int = -1

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_safetensors_header(path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES,
                            max_tensors: int = MAX_TENSORS) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without trusting it.

    Checks: header length within the cap and the file; valid JSON without duplicate keys; at most
    ``max_tensors`` entries; known dtypes; non-negative shapes; ``data_offsets`` that match
    dtype x shape and tile the data section with no gap or overlap; data section == rest of file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > max_header_bytes or n > size - 8:
                raise CheckpointError(
                    f"{path}: safetensors header length {n} is larger than "
                    f"{'the file' if n > size - 8 else f'the {max_header_bytes}-byte cap'}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > max_tensors:
        raise CheckpointError(f"{path}: {len(header)} tensors, more than the cap of {max_tensors}")
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{where}: header entry needs dtype, shape and data_offsets")
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{where}: unsupported dtype {entry['dtype']!r}")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        offs = entry["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offs) or offs[1] < offs[0]):
            raise CheckpointError(f"{where}: bad data_offsets {offs!r}")
        info = TensorInfo(name, dtype, tuple(shape), path, 8 + n + offs[0])
        if offs[1] - offs[0] != info.nbytes:
            raise CheckpointError(
                f"{where}: data_offsets span {offs[1] - offs[0]} bytes but dtype {entry['dtype']} x "
                f"shape {tuple(shape)} needs {info.nbytes}"
            )
        infos[name] = info
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            raise CheckpointError(
                f"{path}: tensor '{name}' starts at byte {start} of the data section, expected {pos} "
                f"({'overlap' if start < pos else 'gap'})"
            )
        pos = end
    if 8 + n + pos != size:
        raise CheckpointError(
            f"{path}: tensors cover {8 + n + pos} bytes but the file has {size} (truncated or trailing data)"
        )
    return infos


def _confined(folder: Path, rel: str, where: str) -> Path:
    """``folder / rel``, refusing paths that leave the folder (lexically or through a symlink).

    The one symlink target allowed outside the folder is the Hugging Face cache layout, where
    ``snapshots/<commit>/<file>`` links to ``../../blobs/<etag>`` of the same repo.
    """
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{where}: shard path {rel!r} escapes the checkpoint folder")
    full = folder / p
    target = full.resolve()
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target.is_relative_to(a) for a in allowed):
        raise CheckpointError(f"{where}: shard path {rel!r} escapes the checkpoint folder")
    return full


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors whose dtype and shape are known without reading them: what every reader takes.

    Implemented by :class:`Checkpoint` (a safetensors file or sharded folder, lazy),
    :class:`merge.lora.bind.FoldedCheckpoint` (a base with adapters folded in), :class:`StateDictSource`
    (a state dict in memory) and lineage's permuted view; ``source[name]`` reads one tensor.
    """

    def keys(self) -> Any: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def __getitem__(self, name: str) -> torch.Tensor: ...


class StateDictSource(Mapping[str, torch.Tensor]):
    """A state dict already in memory as a :class:`TensorSource`."""

    def __init__(self, state: Mapping[str, torch.Tensor], *, path: str = "state dict") -> None:
        self.state = state
        #: how messages name it (a checkpoint names its file)
        self.path = path

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype


def shape_of(source: TensorSource | Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """One tensor's shape: from the header where the source tells it (a :class:`TensorSource`: nothing
    read), else the tensor's. The one place that asks a mapping whether it knows shapes."""
    known = getattr(source, "shape", None)
    return tuple(known(name)) if callable(known) else tuple(source[name].shape)


def dtype_of(source: TensorSource | Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    """One tensor's dtype: from the header where the source tells it (nothing read), else the tensor's."""
    known = getattr(source, "dtype", None)
    return known(name) if callable(known) else source[name].dtype


def shapes_of(source: TensorSource | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape (:func:`shape_of`)."""
    return {k: shape_of(source, k) for k in source.keys()}


def file_stamp(path: Path) -> list[int]:
    """A cheap fingerprint of a file that an edit cannot leave unchanged: inode, size, mtime and ctime
    (nanoseconds). Writing to a file or replacing it moves its ctime, which no user call can set back;
    a copy or restore elsewhere changes it too, and then the file is hashed again (never trusted)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def files_stamp(paths: list[str | Path]) -> list[tuple[str, list[int]]]:
    """:func:`file_stamp` of every file at ``paths`` (a folder: every file under it), in path order: equal
    stamps mean no input was replaced or written to since (a plan made from their headers still holds)."""
    out: list[tuple[str, list[int]]] = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out += [(str(f), file_stamp(f)) for f in files]
    return out


class Checkpoint(Mapping[str, torch.Tensor]):
    """A lazy, read-only view of a checkpoint: ``ckpt[name]`` reads one tensor.

    ``rows(name, r0, r1)`` reads rows ``r0:r1`` of dim 0 only (what the streaming engine uses).
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False,
                 max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int = MAX_TENSORS) -> None:
        self.path = Path(path)
        self.root = self.path if self.path.is_dir() else self.path.parent
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        self._mmaps: dict[Path, mmap.mmap] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._gguf: Any = None  # merge.gguf.GGUFTensors for a GGUF checkpoint
        self._scales: dict[str, Any] = {}  # FP8 weight -> merge.quantized.Scale
        self._lock = threading.Lock()
        files = self._discover(allow_pickle)
        if self._pickled is not None or self._gguf is not None:
            return
        for f in files:
            for name, info in read_safetensors_header(
                f, max_header_bytes=max_header_bytes, max_tensors=max_tensors
            ).items():
                if name in self._infos:
                    raise CheckpointError(f"{self.path}: tensor '{name}' is stored in two shards "
                                          f"({self._infos[name].file.name}, {f.name})")
                self._infos[name] = info
        self._scaled_fp8()

    def _scaled_fp8(self) -> None:
        """FP8 weights with their scales (merge.quantized): served dequantized, the scales hidden; any other
        quantization refused."""
        from merge.quantized import DEQUANTIZED, check_quantization, find_scales, quantization_config

        qcfg = quantization_config(self.root) if self.path.is_dir() else None
        check_quantization(self.path, qcfg, self._infos)
        try:
            self._scales = find_scales(self._infos, qcfg)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        self._raw: dict[str, TensorInfo] = {}
        for wname, sc in self._scales.items():
            self._raw[wname] = self._infos[wname]
            self._raw[sc.name] = self._infos.pop(sc.name)
            w = self._raw[wname]
            self._infos[wname] = TensorInfo(wname, DEQUANTIZED, w.shape, w.file)

    def _fp8_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        from merge.quantized import dequantize_rows, scale_rows

        sc = self._scales[name]
        w, s = self._raw[name], self._raw[sc.name]
        a, b = scale_rows(sc, r0, r1)
        try:
            raw = self._handle(w.file).get_slice(name)[r0:r1]
            scale = self._handle(s.file).get_tensor(sc.name) if sc.block is None else \
                self._handle(s.file).get_slice(sc.name)[a:b]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{w.file}: cannot read rows {r0}:{r1} of FP8 tensor '{name}': {e}") from None
        return dequantize_rows(raw, scale, sc.block, r0)

    # -- discovery ------------------------------------------------------------------------------
    def _discover(self, allow_pickle: bool) -> list[Path]:
        p = self.path
        if not p.exists():
            raise ModelNotFoundError(f"{p}: no such file or folder")
        if p.is_file():
            if p.suffix == ".safetensors":
                return [p]
            if p.suffix in PICKLE_SUFFIXES:
                self._load_pickles([p], allow_pickle)
                return []
            if p.suffix == ".gguf":
                self._load_gguf(p)
                return []
            raise CheckpointError(f"{p}: not a checkpoint (expected .safetensors or .gguf)")
        index = p / INDEX_NAME
        if not index.exists():
            # diffusers names its weights diffusion_pytorch_model*.safetensors: any one <name>.safetensors.index.json
            others = sorted(p.glob("*.safetensors.index.json"))
            if len(others) == 1:
                index = others[0]
        if index.exists():
            try:
                data = json.loads(index.read_text(), object_pairs_hook=_no_duplicates)
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: malformed index: {e}") from None
            files = sorted({_confined(p, rel, str(index)) for rel in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index}: shard {f.name} is missing")
            self._index_map = {k: _confined(p, v, str(index)) for k, v in weight_map.items()}
            return files
        single = sorted(p.glob("*.safetensors"))
        if len(single) == 1:
            return single
        if len(single) > 1:
            raise CheckpointError(f"{p}: {len(single)} .safetensors files but no {INDEX_NAME}")
        pickles = [f for f in sorted(p.iterdir()) if f.suffix in PICKLE_SUFFIXES]
        if (p / PICKLE_INDEX_NAME).exists() or pickles:
            self._load_pickles(pickles, allow_pickle)
            return []
        if any(p.glob("*.gguf")):
            self._load_gguf(p)
            return []
        raise ModelNotFoundError(f"{p}: no checkpoint found (no .safetensors file, {INDEX_NAME} or .gguf file)")

    def _load_gguf(self, path: Path) -> None:
        """A GGUF file or split set (merge.gguf): tensors dequantized per row range as they are read."""
        from merge.gguf import GGUFTensors, gguf_files

        g = GGUFTensors(gguf_files(path))
        for name in g.names():
            self._infos[name] = TensorInfo(name, g.dtype(name), g.shape(name), g._entry(name)[1])
        self._gguf = g

    @property
    def gguf(self) -> Any:
        """The :class:`merge.gguf.GGUFTensors` of a GGUF checkpoint (its metadata...), else None."""
        return self._gguf

    def _load_pickles(self, files: list[Path], allow_pickle: bool) -> None:
        if not allow_pickle:
            raise PickleRefusedError(
                f"{files[0] if files else self.path}: pickle checkpoint refused (it can run code when "
                "loaded); convert it to safetensors or pass --allow-pickle"
            )
        state: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types here
                raise CheckpointError(f"{f}: cannot load pickle checkpoint safely: {e}") from None
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise CheckpointError(f"{f}: pickle does not hold a state dict")
            for k, v in obj.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v
                    self._infos[k] = TensorInfo(k, v.dtype, tuple(v.shape), f)
        self._pickled = state

    # -- Mapping ----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.info(name)
        if self._pickled is not None:
            return self._pickled[name]
        if self._gguf is not None:
            return self._gguf.read(name)
        if name in self._scales:
            return self._fp8_rows(name, 0, info.shape[0])
        try:
            return self._handle(info.file).get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}': {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    # -- metadata ---------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise MissingTensorError(f"{self.path}: no tensor named '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    # -- reading ----------------------------------------------------------------------------------
    def _handle(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            with self._lock:
                h = self._handles.get(file)
                if h is None:
                    try:
                        h = safe_open(str(file), framework="pt", device="cpu")
                    except Exception as e:  # noqa: BLE001
                        raise CheckpointError(f"{file}: cannot open: {e}") from None
                    self._handles[file] = h
        return h

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of dim 0 (the whole tensor for a 0-d tensor)."""
        info = self.info(name)
        if not info.shape or (r0 == 0 and r1 >= info.shape[0]):
            return self[name]
        if self._pickled is not None:
            return self._pickled[name][r0:r1]
        if self._gguf is not None:
            return self._gguf.rows(name, r0, r1)
        if name in self._scales:
            return self._fp8_rows(name, r0, r1)
        try:
            return self._handle(info.file).get_slice(name)[r0:r1]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{info.file}: cannot read rows {r0}:{r1} of tensor '{name}': {e}") from None

    def rows_view(self, name: str, r0: int, r1: int) -> torch.Tensor | None:
        """Rows ``r0:r1`` as a zero-copy view of the file's pages (a private copy-on-write mapping).

        For a reader that converts right away (e.g. bf16 -> float32): the conversion then reads the
        page cache directly instead of a copy of it. Writes to the view never reach the file, but
        they would be seen by later views of the same rows: use it only where the result is copied.
        None where there is no mapping to view (pickles, 0-d or empty tensors, big-endian hosts).
        """
        info = self.info(name)
        if self._pickled is not None or self._gguf is not None or info.offset < 0 or not info.shape or \
                sys.byteorder != "little":
            return None
        rows = info.shape[0]
        r0, r1 = max(0, min(r0, rows)), max(0, min(r1, rows))
        row_elems = info.numel // rows if rows else 0
        if r1 <= r0 or row_elems == 0:
            return None
        mm = self._mmaps.get(info.file)
        if mm is None:
            with self._lock:
                mm = self._mmaps.get(info.file)
                if mm is None:
                    with open(info.file, "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    self._mmaps[info.file] = mm
        esize = torch.empty((), dtype=info.dtype).element_size()
        flat = torch.frombuffer(mm, dtype=info.dtype, count=(r1 - r0) * row_elems,
                                offset=info.offset + r0 * row_elems * esize)
        return flat.view(r1 - r0, *info.shape[1:])

    def aux_files(self) -> list[Path]:
        """Config and tokenizer files next to the weights (copied into a merge's output)."""
        if not self.path.is_dir():
            return []
        pat = re.compile("|".join(f"(?:{p})" for p in AUX_FILE_PATTERNS))
        return [f for f in sorted(self.root.iterdir()) if f.is_file() and pat.fullmatch(f.name)]

    def __getstate__(self) -> dict[str, Any]:
        """Headers only (a plan handed to a service worker): open files and their lock stay behind."""
        return {**self.__dict__, "_handles": {}, "_mmaps": {}, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def close(self) -> None:
        self._handles.clear()
        self._mmaps.clear()  # (views handed out keep their mapping alive)


def require_finite(t: torch.Tensor, where: str | Path, name: str) -> torch.Tensor:
    """The one NaN/Inf policy for weights read anywhere (merge, lineage, metanets, soups, adapters):
    refuse, naming the model or file and the tensor. One float64 sum first (no mask); the exact count
    only when the sum is not finite (an overflowing sum of finite values passes)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64))):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise NonFiniteError(f"{where}: tensor '{name}' has {bad} NaN/Inf value(s) of {t.numel()}")
    return t


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint lazily (see :class:`Checkpoint`)."""
    return Checkpoint(path, allow_pickle=allow_pickle)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500M"``, ``"2GiB"``, ``1000`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r} (expected e.g. 5GB, 500MB, 2GiB or a byte count)")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    mult = (1024 if binary else 1000) ** "_KMGT".index(unit or "_") if unit else 1
    return int(num * mult)


class CheckpointWriter:
    """Writes a sharded safetensors checkpoint tensor by tensor (or row chunk by row chunk).

    Usage::

        with CheckpointWriter(out_dir, tensors, shard_size=5 * 10**9) as w:
            w.write_rows(name, r0, r1, chunk)   # any order, any chunking
            w.add_file(path)                    # config/tokenizer files
        # on success the folder appears at out_dir; on error nothing does
    """

    def __init__(self, out_dir: str | Path, tensors: Iterable[OutputTensor], *,
                 shard_size: int = 5 * 10**9, overwrite: bool = False,
                 metadata: dict[str, str] | None = None, direct_io: bool = True,
                 weights_name: str = "model.safetensors", inputs: Iterable[str | Path] = (),
                 what: str | None = "checkpoint") -> None:
        self.out_dir = check_output(out_dir, overwrite=overwrite, inputs=inputs)
        self.what = what
        if not weights_name.endswith(".safetensors") or "/" in weights_name:
            raise ValueError(f"weights_name {weights_name!r} must be a file name ending in .safetensors")
        #: ``model.safetensors`` (transformers), ``diffusion_pytorch_model.safetensors`` (diffusers): the one
        #: file's name, the shards' stem (``<stem>-00001-of-00003.safetensors``) and ``<name>.index.json``
        self.weights_name = weights_name
        self.tensors = list(tensors)
        self.shard_size = shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self.overwrite = overwrite
        self.tmp = partial_name(self.out_dir)
        self._layout: dict[str, tuple[int, int, int]] = {}  # name -> (shard idx, abs offset, nbytes)
        self._shard_names: list[str] = []
        self._sink: BlockSink | None = None
        self._dtypes = {t.name: t.dtype for t in self.tensors}
        self.direct_io = direct_io
        self._plan_shards()

    def _plan_shards(self) -> None:
        shards: list[list[OutputTensor]] = [[]]
        size = 0
        for t in self.tensors:
            if shards[-1] and size + t.nbytes > self.shard_size:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self._shards = shards
        stem = self.weights_name.removesuffix(".safetensors")
        self._shard_names = (
            [self.weights_name] if n == 1
            else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._headers: list[bytes] = []
        self._sizes: list[int] = []
        for si, shard in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": self.metadata}
            pos = 0
            for t in shard:
                header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [pos, pos + t.nbytes]}
                pos += t.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            hdr = struct.pack("<Q", len(raw)) + raw
            base = len(hdr)
            for t in shard:
                off = header[t.name]["data_offsets"][0]
                self._layout[t.name] = (si, base + off, t.nbytes)
            self._headers.append(hdr)
            self._sizes.append(base + pos)

    @property
    def shard_names(self) -> list[str]:
        return list(self._shard_names)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def __enter__(self) -> CheckpointWriter:
        self.tmp.mkdir(parents=True)
        try:
            self._sink = BlockSink([self.tmp / n for n in self._shard_names], self._sizes, direct=self.direct_io)
            for si, hdr in enumerate(self._headers):
                self._sink.write(si, 0, hdr)
        except BaseException:
            self.abort()
            raise
        return self

    def write_rows(self, name: str, r0: int, r1: int, data: torch.Tensor) -> None:
        """Write rows ``r0:r1`` of output tensor ``name`` (already in its output dtype); thread-safe."""
        si, off, nbytes = self._layout[name]
        if data.dtype != self._dtypes[name]:
            raise RuntimeError(f"write of tensor '{name}': dtype {data.dtype}, expected {self._dtypes[name]}")
        n = data.numel() * data.element_size()
        row_bytes = n // max(1, r1 - r0) if data.dim() else n
        start = off + r0 * row_bytes
        if start + n > off + nbytes:
            raise RuntimeError(f"write of tensor '{name}' rows {r0}:{r1} overruns its {nbytes} bytes")
        assert self._sink is not None, "CheckpointWriter is used outside its with-block"
        self._sink.write(si, start, data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_rows(name, 0, tensor.shape[0] if tensor.dim() else 0, tensor)

    def add_file(self, src: Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (name or src.name))

    def add_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def add_bytes(self, rel: str, data: bytes) -> None:
        """A file at ``rel`` (may be in a sub-folder, e.g. ``fusion_plan/plan.safetensors``), fsynced."""
        path = (self.tmp / rel).resolve()
        if not path.is_relative_to(self.tmp.resolve()):
            raise ValueError(f"output file {rel!r} is outside the output folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if path.parent != self.tmp.resolve():
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _finish(self) -> None:
        assert self._sink is not None
        self._sink.finish()  # every byte written exactly once, truncated, fsynced, closed
        self._sink = None
        if len(self._shard_names) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t.name: self._shard_names[self._layout[t.name][0]] for t in self.tensors},
            }
            (self.tmp / f"{self.weights_name}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if self.what is not None:  # None: a part of a larger output, which carries the marker itself
            write_marker(self.tmp, self.what)
        for f in self.tmp.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                fsync_tree(f)
        fsync_dir(self.tmp)
        publish(self.tmp, self.out_dir, overwrite=self.overwrite, synced=True)

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
