"""LoRA adapters as files: read them as users have them, fold them into a base, write them back.

Formats read (:func:`read_adapter`):

* **PEFT** folders: ``adapter_config.json`` + ``adapter_model.safetensors``. Tensor names are
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (``lora_embedding_A`` /
  ``lora_embedding_B`` for embeddings, conv kernels for ``Conv2d``); every other tensor is a
  ``modules_to_save`` copy that replaces the base's tensor of the same name. The scale of each target is
  ``α/r`` (``α/√r`` with ``use_rslora``), with ``r`` and ``α`` taken from ``rank_pattern`` /
  ``alpha_pattern`` where a key matches the module name (peft's rule: the first key ``k`` with
  ``re.match(rf"(.*\\.)?({k})$", module)``), and ``r`` must equal the stored factors' rank.
* **kohya** single files: ``<name>.lora_down.weight`` (A), ``.lora_up.weight`` (B), optional scalar
  ``.alpha`` (scale ``alpha / r``; 1 without it); names are module paths with ``.`` written as ``_``
  behind a ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` / ``lora_transformer_`` prefix,
  resolved against the base checkpoint's tensor names.
* **diffusers** single files: ``<component>.<module>.lora.down.weight`` / ``.lora.up.weight`` (the
  attention-processor format, including ``processor.to_q_lora.down.weight``) or PEFT naming
  (``.lora_A.weight``) without a config; scale ``alpha / r`` from ``.alpha`` tensors, else 1.

Anything else that is an adapter (DoRA, LoHa, LoKr, (IA)³, AdaLoRA, OFT/BOFT, VeRA, ``lora_bias``,
PiSSA/OLoRA-initialised adapters that need a modified base, trainable tokens...) is refused with
:class:`~merge.errors.UnsupportedAdapterError` naming the feature, never folded approximately.

Folding (:class:`FoldedCheckpoint`) is a lazy view of ``base + Σ_k w_k s_k B_k A_k``: the engine reads
it row chunk by row chunk like any checkpoint (``weightsmith merge`` with ``model: base+adapter``
references, as mergekit writes them; ``base+adapter:0.5`` folds at weight 0.5), so a fold streams with
bounded memory and goes through every merge method. Each row chunk of ``ΔW`` is ``s B[r0:r1] A``,
computed in float32 (float64 for a float64 base) and added to the base rows before one rounding to the
output dtype.

Writing (:func:`write_peft_adapter`, :func:`write_kohya_adapter`) goes to ``<out>.partial-<id>`` and is
renamed into place, so an error leaves nothing. The operations built on these (merging adapters,
extracting one from a fine-tune) are in :mod:`merge.adapter_ops`; the factor algebra is in
:mod:`merge.methods.lora`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from merge.atomic import atomic_output, check_output
from merge.checkpoint import Checkpoint, ResolvedModel, TensorInfo, open_checkpoint, require_finite
from merge.errors import (
    AdapterError,
    CheckpointError,
    MissingTensorError,
    ModelNotFoundError,
    PickleRefusedError,
    ShapeMismatchError,
    UnsupportedAdapterError,
)
from merge.methods.lora import Factors, lora_scale

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20

Layout = Literal["linear", "conv", "embedding"]
Format = Literal["peft", "kohya", "diffusers"]

#: PEFT config options that change what the adapter computes beyond ``W + s B A``.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (a learned magnitude vector rescales the columns of W + ΔW)",
    "lora_bias": "lora_bias (the B factor carries a bias)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "layer_replication": "layer_replication (the adapter duplicates base layers)",
    "alora_invocation_tokens": "activated LoRA (applies only after its invocation tokens)",
    "trainable_token_indices": "trainable tokens (per-token embedding deltas)",
    "use_qalora": "QA-LoRA (group-pooled inputs)",
    "arrow_config": "Arrow routing between adapters",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
}
#: ``init_lora_weights`` values whose adapters are only valid on a base they modified at init.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_OTHER_PEFT_TYPES = {
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "(IA)³",
    "ADALORA": "AdaLoRA",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "VERA": "VeRA",
    "FOURIERFT": "FourierFT",
    "HRA": "HRA",
    "VBLORA": "VB-LoRA",
    "LN_TUNING": "LayerNorm tuning",
    "BONE": "Bone",
    "RANDLORA": "RandLoRA",
    "SHIRA": "SHiRA",
    "C3A": "C3A",
    "MISS": "MiSS",
    "PROMPT_TUNING": "prompt tuning",
    "PREFIX_TUNING": "prefix tuning",
    "P_TUNING": "p-tuning",
    "ADAPTION_PROMPT": "adaption prompt",
    "POLY": "Poly",
    "XLORA": "X-LoRA",
    "CPT": "CPT",
    "TRAINABLE_TOKENS": "trainable tokens",
}
#: Tensor-name markers of adapter types other than LoRA (LyCORIS, DoRA, ...).
_FOREIGN_MARKERS = {
    ".hada_w1_a": "LoHa (LyCORIS)",
    ".hada_t1": "LoHa (LyCORIS)",
    ".lokr_w1": "LoKr (LyCORIS)",
    ".lokr_w2": "LoKr (LyCORIS)",
    ".oft_blocks": "OFT (LyCORIS)",
    ".oft_diag": "OFT (LyCORIS)",
    ".lora_mid.": "LoCon with CP decomposition (lora_mid)",
    ".dora_scale": "DoRA",
    ".diff_b": "full diff (LyCORIS)",
    ".diff": "full diff (LyCORIS)",
    ".lora_magnitude_vector": "DoRA",
    ".lora_E": "AdaLoRA",
    ".ia3_l": "(IA)³",
    ".vera_lambda": "VeRA",
    "bundle_emb.": "bundled textual-inversion embeddings",
    ".b_norm": "GLoRA/norm",
    ".w_norm": "GLoRA/norm",
    ".a1.weight": "GLoRA",
    ".lora_B.bias": "lora_bias (the B factor carries a bias)",
    ".trainable_tokens_": "trainable tokens",
}
_KOHYA_PREFIXES = (
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_te_",
    "lora_transformer_",
    "lora_",
)
_EMBED_RE = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|embeddings?|shared)$"
)


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One adapted weight: ``ΔW = scale · B A`` in the adapter's own layout.

    ``layout``: ``linear`` (ΔW is ``out × in``; ``transposed`` for ``fan_in_fan_out`` / GPT-2 ``Conv1D``,
    stored ``in × out``), ``conv`` (``out × in × kh × kw``, A a conv kernel, B ``out × r × 1 × 1``) or
    ``embedding`` (PEFT's ``lora_embedding_A`` ``r × num``, ``lora_embedding_B`` ``dim × r``, ΔW = (B A)ᵀ,
    ``num × dim``).
    """

    module: str
    a_key: str
    b_key: str
    rank: int
    scale: float
    layout: Layout
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    transposed: bool = False

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def delta_shape(self) -> tuple[int, ...]:
        out, inn = self.b_shape[0], self.a_shape[1]
        if self.layout == "conv":
            return (out, inn, *self.a_shape[2:])
        if self.layout == "embedding":
            return (self.a_shape[1], self.b_shape[0])
        return (inn, out) if self.transposed else (out, inn)


class LoraAdapter:
    """A LoRA adapter on disk, read lazily: ``factors(module)``, ``delta(module)``, ``delta_rows(...)``.

    ``targets`` maps module names (as the adapter writes them) to :class:`Target`; ``modules_to_save``
    maps full tensor names (``<module>.<param>``) to tensor names in the file: tensors that replace the
    base's.
    """

    def __init__(
        self,
        path: Path,
        file: Path,
        fmt: Format,
        config: dict[str, Any],
        ckpt: Checkpoint,
        targets: dict[str, Target],
        modules_to_save: dict[str, str],
    ) -> None:
        self.path = path
        self.file = file
        self.format: Format = fmt
        self.config = config
        self._ckpt = ckpt
        self.targets = targets
        self.modules_to_save = modules_to_save

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, format={self.format}, targets={len(self.targets)})"

    @property
    def ranks(self) -> set[int]:
        return {t.rank for t in self.targets.values()}

    @property
    def base_model_name_or_path(self) -> str | None:
        v = self.config.get("base_model_name_or_path")
        return v if isinstance(v, str) else None

    def tensor(self, key: str) -> torch.Tensor:
        return require_finite(self._ckpt[key], self.path, key)

    def factors(self, module: str) -> Factors:
        """``(A, B, scale)`` of a target as 2-D float32 matrices (``A`` ``r × in·k·k``, ``B`` ``out × r``)."""
        t = self.targets[module]
        A = self.tensor(t.a_key).float()
        B = self.tensor(t.b_key).float()
        return Factors(A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), t.scale)

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW of one target in the shape of the weight it adapts (``Target.delta_shape``)."""
        t = self.targets[module]
        d = self.factors(module).delta(dtype)
        if t.layout == "embedding" or t.transposed:
            d = d.T.contiguous()
        return d.reshape(t.delta_shape)

    def delta_rows(self, module: str, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``r0:r1`` (dim 0) of ΔW without building the whole matrix."""
        t = self.targets[module]
        f = self.factors(module)
        A, B = f.A.to(dtype), f.B.to(dtype)
        if t.layout == "embedding" or t.transposed:
            rows = A[:, r0:r1].T @ B.T  # ΔW = (B A)ᵀ = Aᵀ Bᵀ
        else:
            rows = B[r0:r1] @ A
        rows.mul_(t.scale)
        return rows.reshape((r1 - r0, *t.delta_shape[1:]))

    def close(self) -> None:
        self._ckpt.close()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterError(
                f"{path}: {size} bytes, larger than the {MAX_CONFIG_BYTES}-byte cap for a config"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: an adapter config must be a JSON object")
    return data


def _pattern_value(patterns: Any, module: str, default: Any, where: str, field_name: str) -> Any:
    """peft's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    if not patterns:
        return default
    if not isinstance(patterns, dict):
        raise AdapterError(f"{where}: '{field_name}' must be an object mapping module patterns to values")
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise AdapterError(
                f"{where}: '{field_name}' key {key!r} is not a valid regular expression: {e}"
            ) from None
    return default


def _number(cfg: dict[str, Any], key: str, where: str, *, positive: bool = True) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or (positive and v <= 0):
        raise AdapterError(f"{where}: '{key}' must be a positive number, got {v!r}")
    return float(v)


def _check_peft_config(cfg: dict[str, Any], where: str) -> None:
    ptype = cfg.get("peft_type")
    if ptype is None:
        raise AdapterError(f"{where}: no 'peft_type' (expected \"LORA\")")
    if str(ptype).upper() != "LORA":
        name = _OTHER_PEFT_TYPES.get(str(ptype).upper(), str(ptype))
        raise UnsupportedAdapterError(
            f"{where}: peft_type {ptype!r} ({name}) is not a LoRA adapter; only LoRA "
            "adapters can be folded or merged"
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(key):
            raise UnsupportedAdapterError(f"{where}: {what} is not supported ('{key}': {cfg[key]!r})")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} changes the base weights at initialisation, so this adapter "
            "only fits that modified base; convert it to a plain LoRA first (peft's "
            "path_initial_model_for_weight_conversion)"
        )
    _number(cfg, "r", where)
    _number(cfg, "lora_alpha", where, positive=False)


def _foreign(names: list[str], where: str) -> None:
    for n in names:
        for marker, what in _FOREIGN_MARKERS.items():
            if marker in n:
                raise UnsupportedAdapterError(
                    f"{where}: tensor '{n}' belongs to a {what} adapter, which is not "
                    "supported (only plain LoRA: A/B or lora_down/lora_up factors)"
                )


def _make_target(
    module: str,
    a_key: str,
    b_key: str,
    ckpt: Checkpoint,
    rank_cfg: int | None,
    scale_of: Any,
    where: str,
    *,
    embedding: bool,
    transposed: bool,
) -> Target:
    a_shape, b_shape = ckpt.shape(a_key), ckpt.shape(b_key)
    if embedding:
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ShapeMismatchError(
                f"{where}: module '{module}': lora_embedding_A {list(a_shape)} and "
                f"lora_embedding_B {list(b_shape)} do not share a rank (A r × num, B dim × r)"
            )
        layout: Layout = "embedding"
    elif len(a_shape) == 2 and len(b_shape) == 2:
        layout = "linear"
    elif len(a_shape) == 4 and len(b_shape) == 4 and tuple(b_shape[2:]) == (1, 1):
        layout = "conv"
    else:
        raise ShapeMismatchError(
            f"{where}: module '{module}': factor shapes A {list(a_shape)}, B {list(b_shape)} "
            "are neither linear (2-D) nor conv (4-D with a 1×1 B)"
        )
    rank = a_shape[0]
    if b_shape[1] != rank:
        raise ShapeMismatchError(
            f"{where}: module '{module}': A has rank {rank} ({list(a_shape)}) but B has "
            f"{b_shape[1]} ({list(b_shape)})"
        )
    if rank_cfg is not None and rank_cfg != rank:
        raise ShapeMismatchError(
            f"{where}: module '{module}': the config gives rank {rank_cfg} but the stored "
            f"factors have rank {rank}"
        )
    for key in (a_key, b_key):
        if not ckpt.dtype(key).is_floating_point:
            raise AdapterError(f"{where}: tensor '{key}' has dtype {ckpt.dtype(key)}, expected a float type")
    return Target(
        module,
        a_key,
        b_key,
        rank,
        float(scale_of(module, rank)),
        layout,
        tuple(a_shape),
        tuple(b_shape),
        transposed and layout == "linear",
    )


def _weights_file(folder: Path, allow_pickle: bool) -> Path:
    st = folder / PEFT_WEIGHTS
    if st.is_file():
        return st
    if (folder / PEFT_PICKLE).is_file():
        if not allow_pickle:
            raise PickleRefusedError(
                f"{folder / PEFT_PICKLE}: pickle adapter refused (it can run code when "
                "loaded); convert it to safetensors or pass --allow-pickle"
            )
        return folder / PEFT_PICKLE
    raise ModelNotFoundError(f"{folder}: {PEFT_CONFIG} but no {PEFT_WEIGHTS}")


def _read_peft(folder: Path, allow_pickle: bool) -> LoraAdapter:
    cfg_path = folder / PEFT_CONFIG
    cfg = _read_config(cfg_path)
    where = str(cfg_path)
    _check_peft_config(cfg, where)
    file = _weights_file(folder, allow_pickle)
    ckpt = open_checkpoint(file, allow_pickle=allow_pickle)
    names = list(ckpt.keys())
    _foreign(names, str(file))
    r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora"))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))

    def cfg_rank(module: str) -> int:
        v = _pattern_value(cfg.get("rank_pattern"), module, r_default, where, "rank_pattern")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise AdapterError(f"{where}: rank for module '{module}' must be a positive integer, got {v!r}")
        return v

    def scale_of(module: str, rank: int) -> float:
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha_default, where, "alpha_pattern")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise AdapterError(f"{where}: lora_alpha for module '{module}' must be a number, got {alpha!r}")
        return lora_scale(float(alpha), rank, rslora)

    targets: dict[str, Target] = {}
    saved: dict[str, str] = {}
    pairs = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B"}
    b_suffixes = set(pairs.values())
    for n in names:
        rel = n.removeprefix(PEFT_PREFIX)
        a_suffix = next((s for s in pairs if rel.endswith(s)), None)
        if a_suffix is not None:
            module = rel[: -len(a_suffix)]
            b_key = n[: -len(a_suffix)] + pairs[a_suffix]
            if b_key not in ckpt:
                raise AdapterError(f"{file}: tensor '{n}' has no partner '{b_key}'")
            targets[module] = _make_target(
                module,
                n,
                b_key,
                ckpt,
                cfg_rank(module),
                scale_of,
                str(file),
                embedding=a_suffix == ".lora_embedding_A",
                transposed=fan_in_fan_out,
            )
        elif any(rel.endswith(s) for s in b_suffixes):
            a_key = (
                n[: -len(".lora_B.weight")] + ".lora_A.weight"
                if rel.endswith(".lora_B.weight")
                else n[: -len(".lora_embedding_B")] + ".lora_embedding_A"
            )
            if a_key not in ckpt:
                raise AdapterError(f"{file}: tensor '{n}' has no partner '{a_key}'")
        elif ".lora_" in rel or rel.startswith("lora_"):
            raise UnsupportedAdapterError(
                f"{file}: tensor '{n}' is not a LoRA factor weightsmith knows "
                "(lora_A/lora_B, lora_embedding_A/B)"
            )
        else:
            saved[rel] = n  # modules_to_save: a full replacement of the base tensor
    if not targets and not saved:
        raise AdapterError(f"{file}: no LoRA tensors (expected '{PEFT_PREFIX}<module>.lora_A.weight' ...)")
    return LoraAdapter(folder, file, "peft", cfg, ckpt, targets, saved)


def _kohya_or_diffusers(file: Path, ckpt: Checkpoint) -> LoraAdapter:
    names = list(ckpt.keys())
    where = str(file)
    _foreign(names, where)
    kohya = any(".lora_down." in n for n in names)
    targets: dict[str, Target] = {}
    if kohya:
        fmt: Format = "kohya"
        down, up = ".lora_down.weight", ".lora_up.weight"
    elif any(".lora.down.weight" in n or "_lora.down.weight" in n for n in names):
        fmt, down, up = "diffusers", ".down.weight", ".up.weight"
    elif any(n.endswith(".lora_A.weight") for n in names):
        fmt, down, up = "diffusers", ".lora_A.weight", ".lora_B.weight"
    else:
        raise AdapterError(
            f"{where}: not a LoRA file: no 'lora_down' / 'lora.down' / 'lora_A' tensors "
            f"(first tensors: {', '.join(sorted(names)[:3]) or 'none'})"
        )
    seen: set[str] = set()
    for n in names:
        if n.endswith(down) and (
            fmt != "diffusers" or down != ".down.weight" or n.endswith("lora.down.weight")
        ):
            stem = n[: -len(down)]
            b_key = stem + up
            if b_key not in ckpt:
                raise AdapterError(f"{where}: tensor '{n}' has no partner '{b_key}'")
            module = _diffusers_module(stem) if fmt == "diffusers" else stem
            alpha_key = stem + ".alpha" if fmt == "kohya" else _diffusers_alpha_key(stem)
            alpha = _scalar(ckpt, alpha_key, where) if alpha_key in ckpt else None

            def scale_of(_m: str, rank: int, _alpha: float | None = alpha) -> float:
                return 1.0 if _alpha is None else _alpha / rank

            targets[module] = _make_target(
                module, n, b_key, ckpt, None, scale_of, where, embedding=False, transposed=False
            )
            seen |= {n, b_key, alpha_key}
        elif n.endswith(up) or n.endswith(".alpha"):
            continue
    extra = [n for n in names if n not in seen and not n.endswith(".alpha")]
    if extra:
        raise UnsupportedAdapterError(
            f"{where}: tensor '{extra[0]}' is not a LoRA factor ({len(extra)} such "
            f"tensors); a {fmt} LoRA holds only down/up factors and alphas"
        )
    return LoraAdapter(file, file, fmt, {}, ckpt, targets, {})


def _diffusers_module(stem: str) -> str:
    """``a.attn1.processor.to_q_lora`` -> ``a.attn1.to_q``; ``a.to_q.lora`` -> ``a.to_q``; ``a.to_q`` as is."""
    if stem.endswith(".lora"):
        return stem[: -len(".lora")]
    m = re.fullmatch(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora", stem)
    if m:
        return f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
    return stem


def _diffusers_alpha_key(stem: str) -> str:
    return (stem[: -len(".lora")] if stem.endswith(".lora") else stem) + ".alpha"


def _scalar(ckpt: Checkpoint, key: str, where: str) -> float:
    t = ckpt[key]
    if t.numel() != 1:
        raise AdapterError(f"{where}: tensor '{key}' should be a scalar alpha, got shape {list(t.shape)}")
    v = float(t.float().reshape(()))
    if not v == v or v == float("inf"):
        raise AdapterError(f"{where}: tensor '{key}' (alpha) is not finite")
    return v


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read a LoRA adapter: a PEFT folder, or a kohya / diffusers ``.safetensors`` file (see the module doc)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such adapter file or folder")
    if p.is_dir():
        if (p / PEFT_CONFIG).exists():
            return _read_peft(p, allow_pickle)
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return _kohya_or_diffusers(files[0], open_checkpoint(files[0]))
        raise ModelNotFoundError(
            f"{p}: not an adapter folder (no {PEFT_CONFIG}"
            + (f", and {len(files)} .safetensors files" if files else ", no .safetensors file")
            + ")"
        )
    if p.name == PEFT_CONFIG:
        return _read_peft(p.parent, allow_pickle)
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: not an adapter (expected a PEFT folder or a .safetensors LoRA file)")
    if (p.parent / PEFT_CONFIG).exists() and p.name == PEFT_WEIGHTS:
        return _read_peft(p.parent, allow_pickle)
    return _kohya_or_diffusers(p, open_checkpoint(p))


def looks_like_adapter(path: str | Path) -> bool:
    """True for a folder with ``adapter_config.json`` or a ``.safetensors`` file holding LoRA factor names."""
    p = Path(path)
    if p.is_dir():
        return (p / PEFT_CONFIG).exists()
    if p.is_file() and p.suffix == ".safetensors":
        try:
            from merge.checkpoint import read_safetensors_header

            names = read_safetensors_header(p)
        except CheckpointError:
            return False
        return any(".lora_down." in n or ".lora_A." in n or "lora.down" in n for n in names)
    return False


# ---------------------------------------------------------------------------------------------
# Binding an adapter to a base checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass
class Binding:
    """Where an adapter's targets land in one base checkpoint."""

    adapter: LoraAdapter
    deltas: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter module
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor key


def _kohya_index(names: list[str]) -> dict[str, list[str]]:
    """Every dot-boundary suffix of each base module path, written with ``_``, -> module paths."""
    index: dict[str, list[str]] = {}
    for n in names:
        if not n.endswith(".weight"):
            continue
        parts = n[: -len(".weight")].split(".")
        for i in range(len(parts)):
            index.setdefault("_".join(parts[i:]), []).append(".".join(parts))
    return index


def _prefix_map(keys: list[str], base_names: set[str], where: str) -> Callable[[str], str]:
    """One rename rule for every tensor an adapter touches: drop ``k`` leading name components, or add a prefix.

    ``keys`` are full tensor names as the adapter writes them (``<module>.weight``); the rule is found on
    the first one (sorted) and must then hold for all of them (checked by the caller).
    """
    if all(k in base_names for k in keys):
        return lambda k: k
    probe = sorted(keys)[0]
    parts = probe.split(".")
    for n in range(1, len(parts) - 1):
        if ".".join(parts[n:]) in base_names:
            return lambda k, _n=n: ".".join(k.split(".")[_n:])
    hits = [b for b in base_names if b.endswith(f".{probe}")]
    if len(hits) == 1:
        prefix = hits[0][: -len(probe)]
        return lambda k, _p=prefix: _p + k
    raise MissingTensorError(
        f"{where}: targets '{probe.rsplit('.', 1)[0]}', but the base has no tensor '{probe}'"
        + (f" (several candidates: {', '.join(sorted(hits)[:3])})" if hits else "")
        + "; was the adapter trained on another model?"
    )


def bind(adapter: LoraAdapter, base: Checkpoint | Mapping[str, Any]) -> Binding:
    """Map the adapter's targets onto the base's tensor names and check every shape (no data read)."""
    names = list(base.keys())
    where = str(adapter.path)
    b = Binding(adapter)
    modules = list(adapter.targets)
    if adapter.format == "kohya":
        index = _kohya_index(names)
        for m in modules:
            key = next((m[len(p) :] for p in _KOHYA_PREFIXES if m.startswith(p)), m)
            hits = sorted(set(index.get(key, [])))
            if len(hits) != 1:
                raise MissingTensorError(
                    f"{where}: kohya module '{m}' "
                    + (
                        f"matches {len(hits)} base modules ({', '.join(hits[:3])})"
                        if hits
                        else "matches no weight of the base (names compared with '.' written as '_')"
                    )
                )
            b.deltas[f"{hits[0]}.weight"] = m
    else:
        keys = [f"{m}.weight" for m in modules] + list(adapter.modules_to_save)
        rename = _prefix_map(keys, set(names), where) if keys else (lambda k: k)
        for m in modules:
            name = rename(f"{m}.weight")
            if name not in base:
                raise MissingTensorError(
                    f"{where}: targets module '{m}', but the base has no tensor '{name}'"
                )
            b.deltas[name] = m
        for rel, key in adapter.modules_to_save.items():
            name = rename(rel)
            if name not in base:
                raise MissingTensorError(
                    f"{where}: modules_to_save tensor '{key}' has no counterpart '{name}' in the base"
                )
            b.replaced[name] = key
    for name, m in b.deltas.items():
        t = adapter.targets[m]
        shape = tuple(base.shape(name)) if hasattr(base, "shape") else tuple(base[name].shape)
        want = t.delta_shape
        if shape != want:
            if t.layout == "linear" and len(shape) == 4 and shape[2:] == (1, 1) and shape[:2] == want:
                continue  # a linear LoRA on a 1x1 conv (kohya does this)
            raise ShapeMismatchError(
                f"{where}: module '{m}' (A {list(t.a_shape)}, B {list(t.b_shape)}) makes a ΔW of shape {list(want)}, "
                f"but the base tensor '{name}' has shape {list(shape)}"
            )
    for name, key in b.replaced.items():
        shape = tuple(base.shape(name)) if hasattr(base, "shape") else tuple(base[name].shape)
        have = tuple(adapter._ckpt.shape(key))
        if have != shape:
            raise ShapeMismatchError(
                f"{where}: modules_to_save tensor '{key}' has shape {list(have)}, the base "
                f"tensor '{name}' {list(shape)}"
            )
    return b


# ---------------------------------------------------------------------------------------------
# A base with adapters folded in, read lazily
# ---------------------------------------------------------------------------------------------


class FoldedCheckpoint(Mapping[str, torch.Tensor]):
    """``base + Σ_k w_k ΔW_k`` as a lazy checkpoint (the ``Checkpoint`` interface the engine reads).

    Tensors no adapter touches are the base's, bit for bit. An adapted tensor's rows are computed as
    ``base[r0:r1] + Σ_k w_k s_k B_k[r0:r1] A_k`` in float32 (float64 for a float64 base) and returned in
    that dtype; ``dtype(name)`` still reports the base's, which the engine writes unless told otherwise.
    ``modules_to_save`` tensors replace the base's (two adapters replacing one tensor is an error).
    """

    def __init__(
        self,
        base: Checkpoint,
        adapters: list[LoraAdapter],
        weights: list[float] | None = None,
        ref: str | None = None,
    ) -> None:
        self.base = base
        self.path = base.path
        self.root = base.root
        self.ref = ref
        self.adapters = adapters
        self.weights = [float(w) for w in (weights if weights is not None else [1.0] * len(adapters))]
        if len(self.weights) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters but {len(self.weights)} weights")
        self._deltas: dict[str, list[tuple[LoraAdapter, str, float]]] = {}
        self._replaced: dict[str, tuple[LoraAdapter, str]] = {}
        for ad, w in zip(adapters, self.weights, strict=True):
            b = bind(ad, base)
            for name, m in b.deltas.items():
                self._deltas.setdefault(name, []).append((ad, m, w))
            for name, key in b.replaced.items():
                if name in self._replaced:
                    raise AdapterError(
                        f"tensor '{name}' is replaced (modules_to_save) by two adapters: "
                        f"{self._replaced[name][0].path} and {ad.path}"
                    )
                self._replaced[name] = (ad, key)
        for name in self._replaced:
            if name in self._deltas:
                raise AdapterError(f"tensor '{name}' is both replaced (modules_to_save) and LoRA-adapted")

    @property
    def adapted(self) -> list[str]:
        """Base tensor names that adapters change (LoRA targets and modules_to_save)."""
        return sorted({*self._deltas, *self._replaced})

    # Mapping ----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.rows(name, 0, info.shape[0] if info.shape else 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    # Checkpoint interface ---------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    @property
    def files(self) -> list[Path]:
        return self.base.files + [a.file for a in self.adapters]

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    def aux_files(self) -> list[Path]:
        return self.base.aux_files()

    def close(self) -> None:
        self.base.close()
        for a in self.adapters:
            a.close()

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        if name in self._replaced:
            ad, key = self._replaced[name]
            return ad._ckpt.rows(key, r0, r1)
        x = self.base.rows(name, r0, r1)
        parts = self._deltas.get(name)
        if not parts:
            return x
        r1 = min(r1, self.base.shape(name)[0])
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.to(dtype, copy=True)
        for ad, m, w in parts:
            d = ad.delta_rows(m, r0, r1, dtype)
            y.add_(d.reshape(y.shape), alpha=w)
        return y


_WEIGHT_RE = re.compile(r"^(?P<ref>.+):(?P<w>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


def split_reference(ref: str) -> tuple[str, list[tuple[str, float]]] | None:
    """``base+adapter[:w]+...`` -> ``(base, [(adapter, w), ...])``; None for a plain reference.

    A reference that exists as a local path is plain whatever it contains; ``hf://`` parts and Hub ids
    are allowed on either side of ``+``.
    """
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    base, *rest = ref.split("+")
    if not base.strip() or not rest or any(not r.strip() for r in rest):
        raise AdapterError(f"model reference {ref!r}: expected 'base+adapter' (each side non-empty)")
    out = []
    for r in rest:
        m = _WEIGHT_RE.match(r)
        if m and not Path(r).expanduser().exists():
            out.append((m.group("ref"), float(m.group("w"))))
        else:
            out.append((r, 1.0))
    return base, out


def resolve_reference(ref: str, resolver: Callable[[str], ResolvedModel]) -> ResolvedModel:
    """Resolve a model reference; ``base+adapter`` references resolve both parts (adapters recorded)."""
    split = split_reference(ref)
    if split is None:
        return resolver(ref)
    base_ref, parts = split
    base = resolver(base_ref)
    adapters = tuple(resolver(a) for a, _ in parts)
    return ResolvedModel(
        ref=ref,
        path=base.path,
        repo_id=base.repo_id,
        revision=base.revision,
        commit=base.commit,
        adapters=adapters,
        adapter_weights=tuple(w for _, w in parts),
    )


def open_model(resolved: ResolvedModel, *, allow_pickle: bool = False) -> Checkpoint | FoldedCheckpoint:
    """The checkpoint a resolved reference names: the base itself, or the base with its adapters folded in."""
    base = open_checkpoint(resolved.path, allow_pickle=allow_pickle)
    if not resolved.adapters:
        return base
    adapters = [read_adapter(a.path, allow_pickle=allow_pickle) for a in resolved.adapters]
    return FoldedCheckpoint(base, adapters, list(resolved.adapter_weights) or None, ref=resolved.ref)


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


def is_embedding_name(module: str) -> bool:
    """Module names that are token embeddings (extracted as ``lora_embedding_A/B``)."""
    return bool(_EMBED_RE.search(module))
