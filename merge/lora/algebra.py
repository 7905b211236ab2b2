"""Operations on LoRA adapter files: fold into a base, merge several into one, extract one from a fine-tune.

* :func:`fold_adapters` writes ``base + Σ_k w_k ΔW_k`` as a full checkpoint through the streaming engine
  (the same path as ``weightsmith merge`` with ``model: base+adapter``), so memory stays bounded by a
  few row chunks whatever the model size.
* :func:`merge_adapters` combines adapters target by target (``cat``, ``linear``, ``svd`` and TIES /
  DARE / magnitude pruning on the residuals followed by SVD; ``merge.lora.factors``) and writes one PEFT
  folder (or a kohya file when the inputs are kohya files). Only the adapters are read: no base model
  is needed, unlike peft's ``add_weighted_adapter``, which works on a loaded model.
* :func:`extract_adapter` is mergekit's "LoRA extract": per 2-D weight, the rank-``r`` truncated SVD of
  ``θ_ft − θ_base`` (Eckart–Young), with the kept energy ``Σ_{j<r} σ_j² / Σ_j σ_j²`` reported per tensor.
  One weight is in memory at a time.

Every output is written to a temporary sibling and renamed into place: on any error nothing is written.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from merge.atomic import check_output
from merge.checkpoint import Checkpoint, open_checkpoint, require_finite
from merge.errors import AdapterError, MissingTensorError, RecipeError, ShapeMismatchError
from merge.lora.factors import (
    Factors,
    Truncation,
    cat_factors,
    combine_residuals,
    frobenius_cosine,
    linear_factors,
    lowrank_svd,
    truncated_svd,
)
from merge.lora.formats import LoraAdapter, is_embedding_name, read_adapter
from merge.lora.write import OutTarget, write_kohya_adapter, write_peft_adapter
from merge.methods.runner import derive_seed

MergeMethod = Literal[
    "cat", "linear", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"
]
MERGE_METHODS: tuple[str, ...] = (
    "cat",
    "linear",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
_RESIDUAL_COMBINE = {
    "svd": "sum",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Progress = Callable[[int, int, str], None]  # (done, total, current target)


@dataclass
class TargetReport:
    module: str
    rank: int
    energy: float | None = None  # kept energy of a truncated SVD (None when exact)
    rel_error: float | None = None  # ‖ΔW − B A‖_F / ‖ΔW‖_F of the truncation


@dataclass
class AdapterReport:
    """What an adapter operation wrote (the CLI prints it; ``--json`` dumps it)."""

    out: str
    operation: str
    method: str
    n_targets: int
    seconds: float
    inputs: list[str]
    targets: list[TargetReport] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def min_energy(self) -> float | None:
        vals = [t.energy for t in self.targets if t.energy is not None]
        return min(vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["min_energy"] = self.min_energy
        return d


def _progress_bar(total: int, desc: str) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="target", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# fold
# ---------------------------------------------------------------------------------------------


def fold_reference(base: str, adapters: list[str], weights: list[float] | None = None) -> str:
    """The engine reference ``base+adapter[:w]+...`` for folding ``adapters`` into ``base``."""
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise RecipeError(f"{len(adapters)} adapters but {len(weights)} weights")
    parts = [a if w == 1.0 else f"{a}:{w!r}" for a, w in zip(adapters, weights, strict=True)]
    return "+".join([base, *parts])


def fold_adapters(
    base: str,
    adapters: list[str],
    out_dir: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    options: Any = None,
    progress: Any = None,
    resolver: Any = None,
) -> Any:
    """Write ``base + Σ_k w_k s_k B_k A_k`` to ``out_dir`` (streamed by the engine; a ``MergeResult``)."""
    from merge.execute import run_merge

    recipe: dict[str, Any] = {
        "merge_method": "passthrough",
        "models": [{"model": fold_reference(base, adapters, weights)}],
    }
    if dtype:
        recipe["dtype"] = dtype
    return run_merge(recipe, out_dir, options, progress=progress, resolver=resolver)


# ---------------------------------------------------------------------------------------------
# merge adapters into one
# ---------------------------------------------------------------------------------------------


def _conv_kernel(ad: LoraAdapter, module: str) -> tuple[int, ...]:
    t = ad.targets[module]
    return tuple(t.a_shape[1:]) if t.layout == "conv" else ()


def merge_adapters(
    adapters: list[str | Path | LoraAdapter],
    out: str | Path,
    *,
    method: str = "svd",
    weights: list[float] | None = None,
    rank: int | None = None,
    density: float = 1.0,
    clamp: float | None = None,
    seed: int = 0,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    exact_svd: bool = False,
) -> AdapterReport:
    """Merge LoRA adapters into one adapter (peft ``add_weighted_adapter`` semantics; see ``merge.lora.factors``).

    ``method``: ``cat`` (exact weighted sum, rank Σ r_i), ``linear`` (factor sums, equal ranks), ``svd``
    (rank-``rank`` SVD of Σ w_i ΔW_i; ``rank`` defaults to the largest input rank), ``ties_svd``,
    ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` (the residuals combined with that
    method and ``density`` first; DARE's drops are seeded by ``seed`` and the module name). Targets
    present in only some adapters are merged over those that have them. ``modules_to_save`` tensors are
    carried over; two adapters saving the same tensor is an error. Inputs in kohya format give a kohya
    file, anything else a PEFT folder. Output factors are stored in ``dtype`` (default: the first adapter's).
    """
    t0 = time.perf_counter()
    if method not in MERGE_METHODS:
        raise RecipeError(f"unknown adapter merge method '{method}' (known: {', '.join(MERGE_METHODS)})")
    ads = [a if isinstance(a, LoraAdapter) else read_adapter(a) for a in adapters]
    if not ads:
        raise RecipeError("no adapters to merge")
    weights = [1.0] * len(ads) if weights is None else [float(w) for w in weights]
    if len(weights) != len(ads):
        raise RecipeError(f"{len(ads)} adapters but {len(weights)} weights")
    if rank is not None and rank < 1:
        raise RecipeError(f"rank must be >= 1, got {rank}")
    if not 0.0 <= density <= 1.0:
        raise RecipeError(f"density must be in [0, 1], got {density}")
    formats = {a.format == "kohya" for a in ads}
    if len(formats) > 1:
        raise AdapterError(
            "cannot merge kohya files with PEFT/diffusers adapters: their module names differ "
            "(fold them into the base instead)"
        )
    kohya = formats.pop()
    check_output(out, overwrite=overwrite, inputs=[a.path for a in ads], kind="file" if kohya else "dir")
    modules = sorted({m for a in ads for m in a.targets})
    first = next(iter(ads[0].targets.values()), None)
    out_dtype = DTYPES[dtype] if dtype else (ads[0]._ckpt.dtype(first.a_key) if first else torch.float32)
    default_rank = rank or max((r for a in ads for r in a.ranks), default=1)
    report = AdapterReport(
        out=str(out),
        operation="merge",
        method=method,
        n_targets=len(modules),
        seconds=0.0,
        inputs=[str(a.path) for a in ads],
        params={"weights": weights, "rank": rank, "density": density, "seed": seed, "clamp": clamp},
    )
    bar = _progress_bar(len(modules), f"adapter merge ({method})") if progress is None else None
    outs: list[OutTarget] = []
    try:
        for i, m in enumerate(modules):
            have = [(a, w) for a, w in zip(ads, weights, strict=True) if m in a.targets]
            layouts = {
                (a.targets[m].layout, a.targets[m].transposed, a.targets[m].delta_shape) for a, _ in have
            }
            if len(layouts) > 1:
                raise ShapeMismatchError(
                    f"module '{m}': the adapters adapt it with different layouts or shapes "
                    f"({sorted(map(str, layouts))})"
                )
            layout, transposed, _ = layouts.pop()
            parts = [a.factors(m) for a, _ in have]
            ws = [w for _, w in have]
            what = f"module '{m}'"
            if method == "cat":
                f = cat_factors(parts, ws, what=what)
                report.targets.append(TargetReport(m, f.rank))
            elif method == "linear":
                f = linear_factors(parts, ws, what=what)
                report.targets.append(TargetReport(m, f.rank))
            elif method == "svd":  # the SVD of a sum of low-rank products, without the dense sum
                tr = lowrank_svd(parts, ws, default_rank, clamp=clamp, what=what)
                f = tr.factors
                report.targets.append(TargetReport(m, f.rank, tr.energy, tr.rel_error))
            else:
                deltas = [p.delta() for p in parts]
                for d in deltas[1:]:
                    if d.shape != deltas[0].shape:
                        raise ShapeMismatchError(
                            f"{what}: residual shapes {list(deltas[0].shape)} and {list(d.shape)} differ"
                        )
                g = torch.Generator().manual_seed(derive_seed(seed, m))
                delta = combine_residuals(deltas, ws, _RESIDUAL_COMBINE[method], density=density, generator=g)
                tr = truncated_svd(delta, default_rank, clamp=clamp, exact=True if exact_svd else None)
                f = tr.factors
                report.targets.append(TargetReport(m, f.rank, tr.energy, tr.rel_error))
            outs.append(OutTarget(m, f, layout, _conv_kernel(have[0][0], m), transposed))
            if progress:
                progress(i + 1, len(modules), m)
            elif bar is not None:
                bar.update(1)
        saved: dict[str, torch.Tensor] = {}
        owner: dict[str, str] = {}
        for a in ads:
            for rel, key in a.modules_to_save.items():
                if rel in saved:
                    raise AdapterError(
                        f"modules_to_save tensor '{rel}' is in two adapters ({owner[rel]} and "
                        f"{a.path}); full-tensor replacements cannot be merged"
                    )
                saved[rel], owner[rel] = a.tensor(key), str(a.path)
        report.modules_to_save = sorted(saved)
        if kohya:
            write_kohya_adapter(out, outs, dtype=out_dtype, overwrite=overwrite, inputs=[a.path for a in ads])
        else:
            cfg = ads[0].config
            write_peft_adapter(
                out,
                outs,
                base_model_name_or_path=ads[0].base_model_name_or_path,
                task_type=cfg.get("task_type"),
                modules_to_save=saved,
                dtype=out_dtype,
                overwrite=overwrite,
                extra_files={"weightsmith_adapter.json": json.dumps(_meta(report), indent=2) + "\n"},
                inputs=[a.path for a in ads],
            )
    finally:
        if bar is not None:
            bar.close()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _meta(report: AdapterReport) -> dict[str, Any]:
    d = report.to_json()
    d.pop("seconds", None)
    return d


# ---------------------------------------------------------------------------------------------
# extract an adapter from a fine-tune
# ---------------------------------------------------------------------------------------------


def extract_adapter(
    base: str | Path | Checkpoint,
    finetuned: str | Path | Checkpoint,
    out: str | Path,
    *,
    rank: int,
    targets: str | None = None,
    exclude: str | None = None,
    embeddings: bool = True,
    min_rel_change: float = 0.0,
    clamp: float | None = None,
    dtype: str | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    exact_svd: bool = False,
) -> AdapterReport:
    """mergekit's LoRA extract: per 2-D weight, the rank-``rank`` truncated SVD of ``θ_ft − θ_base``.

    Candidates are the floating ``<module>.weight`` tensors of matching 2-D shape in both checkpoints
    (``targets`` / ``exclude``: regular expressions searched in the module name). Token embeddings
    (``is_embedding_name``) become PEFT ``lora_embedding_A/B`` targets unless ``embeddings=False``.
    Weights whose relative change ``‖Δ‖_F / ‖θ_base‖_F`` is at most ``min_rel_change`` (default: exactly
    unchanged) are skipped. Tensors that changed but cannot be a LoRA target (biases, norms, conv
    kernels) are listed in ``report.skipped`` with their relative change, not silently dropped.
    """
    t0 = time.perf_counter()
    if rank < 1:
        raise RecipeError(f"rank must be >= 1, got {rank}")
    b = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    f = finetuned if isinstance(finetuned, Checkpoint) else open_checkpoint(finetuned)
    check_output(out, overwrite=overwrite, inputs=[b.path, f.path])
    inc = re.compile(targets) if targets else None
    exc = re.compile(exclude) if exclude else None
    missing = [n for n in f.keys() if n not in b]
    if missing:
        raise MissingTensorError(
            f"{f.path}: tensor '{missing[0]}' is not in the base {b.path} "
            f"({len(missing)} such tensors): not a fine-tune of this base"
        )
    report = AdapterReport(
        out=str(out),
        operation="extract",
        method="svd",
        n_targets=0,
        seconds=0.0,
        inputs=[str(b.path), str(f.path)],
        params={"rank": rank, "targets": targets, "exclude": exclude, "clamp": clamp},
    )
    names = sorted(n for n in f.keys() if f.dtype(n).is_floating_point)
    plan: list[str] = []
    for n in names:
        if b.shape(n) != f.shape(n):
            raise ShapeMismatchError(
                f"tensor '{n}': {f.path} has shape {list(f.shape(n))}, the base {b.path} {list(b.shape(n))}"
            )
        module = n[: -len(".weight")] if n.endswith(".weight") else None
        if (
            module
            and len(f.shape(n)) == 2
            and (inc is None or inc.search(module))
            and not (exc and exc.search(module))
        ):
            if embeddings or not is_embedding_name(module):
                plan.append(n)
                continue
        diff = _rel_change(require_finite(b[n], b.path, n), require_finite(f[n], f.path, n))
        if diff > min_rel_change:
            report.skipped.append({"tensor": n, "rel_change": diff, "why": "not a 2-D target weight"})
    bar = _progress_bar(len(plan), "adapter extract") if progress is None else None
    outs: list[OutTarget] = []
    out_dtype = DTYPES[dtype] if dtype else torch.float32
    try:
        for i, n in enumerate(plan):
            module = n[: -len(".weight")]
            w0 = require_finite(b[n], b.path, n).float()
            delta = require_finite(f[n], f.path, n).float() - w0
            norm0 = float(w0.norm())
            dn = float(delta.norm())
            if dn == 0.0 or (norm0 > 0 and dn / norm0 <= min_rel_change):
                if progress:
                    progress(i + 1, len(plan), module)
                continue
            emb = is_embedding_name(module)
            tr: Truncation = truncated_svd(delta.T if emb else delta, rank, clamp=clamp,
                                           exact=True if exact_svd else None)
            del delta, w0
            outs.append(OutTarget(module, tr.factors, "embedding" if emb else "linear"))
            report.targets.append(TargetReport(module, tr.factors.rank, tr.energy, tr.rel_error))
            if progress:
                progress(i + 1, len(plan), module)
            elif bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not outs:
        raise AdapterError(f"{f.path}: no 2-D weight differs from the base {b.path}; nothing to extract")
    report.n_targets = len(outs)
    write_peft_adapter(
        out,
        outs,
        base_model_name_or_path=base_model_name_or_path or str(b.path),
        dtype=out_dtype,
        overwrite=overwrite,
        extra_files={"weightsmith_adapter.json": json.dumps(_meta(report), indent=2) + "\n"},
        inputs=[b.path, f.path],
    )
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    n = float(a64.norm())
    d = float((b64 - a64).norm())
    return d / n if n > 0 else d


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------


def residual_cosines(adapters: list[str | Path | LoraAdapter]) -> dict[str, Any]:
    """Pairwise Frobenius cosine ``⟨ΔW_i, ΔW_j⟩_F / (‖ΔW_i‖ ‖ΔW_j‖)`` of adapters' residuals.

    Per shared target and over all shared targets together (the residuals concatenated); ~0 means the
    adapters' residuals are orthogonal (Po et al., CVPR 2024, §4: orthogonal adaptation).
    """
    ads = [a if isinstance(a, LoraAdapter) else read_adapter(a) for a in adapters]
    pairs = []
    for i in range(len(ads)):
        for j in range(i + 1, len(ads)):
            shared = sorted(set(ads[i].targets) & set(ads[j].targets))
            per = {}
            dot = ni = nj = 0.0
            for m in shared:
                di, dj = ads[i].delta(m).double(), ads[j].delta(m).double()
                if di.shape != dj.shape:
                    raise ShapeMismatchError(
                        f"module '{m}': residual shapes {list(di.shape)} and {list(dj.shape)}"
                    )
                per[m] = frobenius_cosine(di, dj)
                dot += float((di * dj).sum())
                ni += float((di * di).sum())
                nj += float((dj * dj).sum())
            total = dot / (ni * nj) ** 0.5 if ni > 0 and nj > 0 else 0.0
            pairs.append(
                {
                    "a": str(ads[i].path),
                    "b": str(ads[j].path),
                    "shared_targets": len(shared),
                    "cosine": total,
                    "max_abs_target_cosine": max((abs(v) for v in per.values()), default=0.0),
                    "per_target": per,
                }
            )
    return {"pairs": pairs, "max_abs_cosine": max((abs(p["cosine"]) for p in pairs), default=0.0)}


__all__ = [
    "MERGE_METHODS",
    "AdapterReport",
    "Factors",
    "extract_adapter",
    "fold_adapters",
    "fold_reference",
    "merge_adapters",
    "residual_cosines",
]
