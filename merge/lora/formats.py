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

Binding to a base and the lazily folded view are in :mod:`merge.lora.bind`, writing in
:mod:`merge.lora.write`, the operations (merge, extract) in :mod:`merge.lora.algebra` and the factor
algebra in :mod:`merge.lora.factors`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from merge.checkpoint import Checkpoint, open_checkpoint, require_finite
from merge.errors import (
    AdapterError,
    CheckpointError,
    ModelNotFoundError,
    PickleRefusedError,
    ShapeMismatchError,
    UnsupportedAdapterError,
)
from merge.lora.factors import Factors, lora_scale

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


def is_embedding_name(module: str) -> bool:
    """Module names that are token embeddings (extracted as ``lora_embedding_A/B``)."""
    return bool(_EMBED_RE.search(module))
