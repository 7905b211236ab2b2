"""What AdaMerging and the Concrete methods learn: coefficients and a mask, as a portable plan.

A :class:`FusionPlan` holds, for each learned tensor k, the coefficients λ_{t,k} of the T task
vectors and (Concrete methods) the mask m[k] as read out and rescaled. Applying it needs no data:

    θ[k] = θ_0[k] + m[k] ⊙ Σ_t λ_{t,k} (θ_t[k] − θ_0[k])          (Tang et al., Eq. 5)

and, for floating tensors the plan did not learn, task arithmetic with ``fallback_lambda``. The
engine streams :meth:`FusionPlan.apply` tensor by tensor (a ``whole_model`` plan), so the final
merge of a large checkpoint needs memory for a few tensors; :meth:`FusionPlan.merge` is the same
on in-memory state dicts and gives the same bytes.

On disk a plan is a folder: ``plan.safetensors`` (``lambda`` (T, K) float32, ``fingerprint``
(K, T + 1) float64, ``mask.<tensor name>`` float32) and ``plan.json`` (the card: method, tasks,
tensor names and shapes, hyperparameters, loss history, the safetensors file's SHA-256). The
fingerprint (‖θ_0[k]‖ and ‖τ_t[k]‖) lets :meth:`apply` refuse a plan learned on other weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from merge.checkpoint import shape_of
from merge.errors import CheckpointError, MissingTensorError, RecipeError, ShapeMismatchError

FORMAT = "weightsmith-fusion-plan"
VERSION = 1
TENSORS_FILE = "plan.safetensors"
CARD_FILE = "plan.json"
#: where the engine puts the plan inside a merge's output folder
OUTPUT_DIR = "fusion_plan"
#: relative tolerances of the fingerprint check (θ_0 norms, task-vector norms)
BASE_RTOL = 1e-3
TAU_RTOL = 2e-2


class PlanMismatchError(ShapeMismatchError):
    """A plan is applied to models it was not learned for."""


# ---------------------------------------------------------------------------------------------
# plan folders: one safetensors file of tensors and a JSON card, written atomically, read with checks
# (the fusion plans below, RegMean's and Fisher's statistics, EMR's masks)
# ---------------------------------------------------------------------------------------------


def plan_artifacts(fmt: str, card: dict[str, Any], tensors: dict[str, torch.Tensor],
                   out_dir: str = OUTPUT_DIR) -> dict[str, bytes]:
    """``<out_dir>/plan.safetensors`` and ``<out_dir>/plan.json`` (with the tensors' SHA-256), keyed by their
    path inside a merge's output folder."""
    data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": fmt, "version": "1"})
    card = {**card, "tensors_file": TENSORS_FILE, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    return {
        f"{out_dir}/{TENSORS_FILE}": data,
        f"{out_dir}/{CARD_FILE}": (json.dumps(card, indent=2) + "\n").encode(),
    }


def save_plan(artifacts: dict[str, bytes], folder: str | Path, overwrite: bool, what: str) -> Path:
    from merge.atomic import atomic_output

    folder = Path(folder)
    with atomic_output(folder, overwrite=overwrite, what=what) as tmp:
        for rel, data in artifacts.items():
            (tmp / Path(rel).name).write_bytes(data)
    return folder


def _a(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def read_plan(path: str | Path, fmt: str, method: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """The card and tensors of a plan folder (or its ``plan.json``); every inconsistency is a clear error."""
    p = Path(path).expanduser()
    folder = p.parent if p.is_file() else p
    card_path = folder / CARD_FILE
    where = str(folder)
    if not card_path.is_file():
        raise CheckpointError(f"{where}: not {_a(method)} plan (no {CARD_FILE})")
    try:
        card = json.loads(card_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{card_path}: not valid JSON: {e}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path}: not {_a(method)} plan")
    if card.get("format") != fmt:
        other = card.get("method")
        if other and other != method:
            raise RecipeError(f"{where}: this plan was computed by '{other}'; apply it with merge_method: {other}")
        raise CheckpointError(f"{card_path}: not a weightsmith {method} plan (format {card.get('format')!r})")
    if int(card.get("version", 0)) > 1:
        raise CheckpointError(
            f"{card_path}: plan version {card.get('version')} is newer than this weightsmith reads (1)"
        )
    tpath = folder / str(card.get("tensors_file", TENSORS_FILE))
    if not tpath.is_file():
        raise CheckpointError(f"{where}: {tpath.name} is missing")
    raw = tpath.read_bytes()
    want = card.get("tensors_sha256")
    if want and hashlib.sha256(raw).hexdigest() != want:
        raise CheckpointError(f"{tpath}: SHA-256 differs from the one in {CARD_FILE} (changed or corrupt)")
    from merge.checkpoint import Checkpoint

    ckpt = Checkpoint(tpath)  # header pre-checks (size, duplicates, spans)
    try:
        tensors = {k: ckpt[k].clone() for k in ckpt.keys()}
    finally:
        ckpt.close()
    return card, tensors, where



@dataclass
class FusionPlan:
    """Coefficients ``lambdas`` (T, K) and an optional ``mask`` for the K tensors in ``keys``."""

    method: str
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    lambdas: torch.Tensor  # (T, K) float32, effective values
    mask: dict[str, torch.Tensor] | None = None  # per key, broadcastable to the tensor, float32
    fallback_lambda: float = 0.3
    fingerprint: torch.Tensor | None = None  # (K, T + 1) float64
    task_names: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # hyperparameters, history, read-out...
    verify: bool = True
    source: str = ""  # where it was loaded from (for messages)

    def __post_init__(self) -> None:
        self.lambdas = self.lambdas.detach().to("cpu", torch.float32).contiguous()
        if self.lambdas.dim() != 2 or self.lambdas.shape[1] != len(self.keys):
            raise RecipeError(
                f"plan{self._where()}: lambda has shape {list(self.lambdas.shape)}, "
                f"expected [n_tasks, {len(self.keys)}]"
            )
        self._index = {k: i for i, k in enumerate(self.keys)}
        if self.mask is not None:
            self.mask = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.mask.items()}
            for k in self.keys:
                if k not in self.mask:
                    raise RecipeError(f"plan{self._where()}: no mask for tensor '{k}'")
                try:
                    torch.broadcast_shapes(self.mask[k].shape, self.shapes[k])
                except RuntimeError:
                    raise RecipeError(
                        f"plan{self._where()}: mask of '{k}' has shape {list(self.mask[k].shape)}, "
                        f"which does not broadcast to {list(self.shapes[k])}"
                    ) from None

    def _where(self) -> str:
        return f" {self.source}" if self.source else ""

    @property
    def n_tasks(self) -> int:
        return int(self.lambdas.shape[0])

    # -- applying -----------------------------------------------------------------------------------
    def check_models(
        self, base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        """Names, shapes and model count match (headers only); raises :class:`PlanMismatchError`."""
        if len(models) != self.n_tasks:
            raise PlanMismatchError(
                f"plan{self._where()} was learned for {self.n_tasks} task model(s) "
                f"({', '.join(self.task_names)}), the recipe gives {len(models)}"
            )
        for who, m in [("the base model", base)] + [(f"task model {i + 1}", m) for i, m in enumerate(models)]:
            for k in self.keys:
                if k not in m:
                    raise PlanMismatchError(
                        f"plan{self._where()}: tensor '{k}' is not in {who}; the plan was "
                        "learned for another model"
                    )
                shape = shape_of(m, k)
                if shape != tuple(self.shapes[k]):
                    raise PlanMismatchError(
                        f"plan{self._where()}: tensor '{k}' has shape {list(shape)} in {who}, "
                        f"the plan was learned for shape {list(self.shapes[k])}"
                    )

    def _check_fingerprint(self, name: str, i: int, base: torch.Tensor, taus: list[torch.Tensor]) -> None:
        if not self.verify or self.fingerprint is None:
            return
        want = self.fingerprint[i]
        got = [float(base.double().norm())] + [float(t.double().norm()) for t in taus]
        for j, (g, w) in enumerate(zip(got, want.tolist(), strict=True)):
            rtol = BASE_RTOL if j == 0 else TAU_RTOL
            if not math.isclose(g, w, rel_tol=rtol, abs_tol=1e-6):
                what = "‖θ_0‖" if j == 0 else f"‖τ_{j}‖ (task model {j})"
                raise PlanMismatchError(
                    f"plan{self._where()}: tensor '{name}': {what} is {g:.6g}, the plan was learned where it was "
                    f"{w:.6g}: these are not the models it was learned for (or not in the same order); "
                    "set verify: false to apply it anyway"
                )

    def apply(self, name: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """One output tensor from its T task-model tensors and the base's (engine contract)."""
        if base is None:
            raise RecipeError(f"{self.method}: tensor '{name}' needs the base model's tensor")
        if len(tensors) != self.n_tasks:
            raise PlanMismatchError(
                f"plan{self._where()}: {len(tensors)} task tensors for '{name}', "
                f"the plan has {self.n_tasks} tasks"
            )
        if not base.is_floating_point():
            return base
        base = base.float()
        taus = [t.float() - base for t in tensors]
        i = self._index.get(name)
        mixed = torch.zeros_like(base)
        if i is None:
            for d in taus:
                mixed.add_(d)
            mixed.mul_(self.fallback_lambda)
        else:
            self._check_fingerprint(name, i, base, taus)
            lam = self.lambdas[:, i].tolist()
            for d, w in zip(taus, lam, strict=True):
                mixed.add_(d, alpha=w)
            if self.mask is not None:
                mixed.mul_(self.mask[name].to(mixed.device))
        return mixed.add_(base)

    def merge(
        self, base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The merged state dict (in memory), float32 for floating tensors; the same bytes as the engine."""
        self.check_models(base, models)
        out = {}
        for k in base.keys():
            b = base[k]
            if not b.is_floating_point():
                out[k] = b.clone()
                continue
            for j, m in enumerate(models):
                if k not in m:
                    raise MissingTensorError(f"{self.method}: task model {j + 1} has no tensor '{k}'")
            out[k] = self.apply(k, [m[k] for m in models], b)
        return out

    def kept_fraction(self) -> float | None:
        """Fraction of learned entries whose mask is non-zero (None without a mask)."""
        if self.mask is None:
            return None
        n = kept = 0
        for k in self.keys:
            full = self.mask[k].expand(self.shapes[k]) if self.shapes[k] else self.mask[k]
            n += full.numel()
            kept += int((full != 0).sum())
        return kept / max(1, n)

    # -- files --------------------------------------------------------------------------------------
    def card(self, tensors_sha256: str = "") -> dict[str, Any]:
        lam = self.lambdas
        lam_json: Any = lam.tolist() if lam.numel() <= 4096 else None
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "n_tasks": self.n_tasks,
            "task_names": self.task_names,
            "fallback_lambda": self.fallback_lambda,
            "has_mask": self.mask is not None,
            "kept_fraction": self.kept_fraction(),
            "keys": {k: list(self.shapes[k]) for k in self.keys},
            "lambda": lam_json,
            "lambda_mean_per_task": lam.mean(1).tolist(),
            "info": self.info,
            "tensors_file": TENSORS_FILE,
            "tensors_sha256": tensors_sha256,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"lambda": self.lambdas}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint.to(torch.float64).contiguous()
        if self.mask is not None:
            for k in self.keys:
                out[f"mask.{k}"] = self.mask[k]
        return out

    def artifacts(self) -> dict[str, bytes]:
        """The plan's files, keyed by their path inside a merge's output folder (engine hook)."""
        data = st_save(self.tensors(), metadata={"format": FORMAT, "version": str(VERSION)})
        card = json.dumps(self.card(hashlib.sha256(data).hexdigest()), indent=2) + "\n"
        return {f"{OUTPUT_DIR}/{TENSORS_FILE}": data, f"{OUTPUT_DIR}/{CARD_FILE}": card.encode()}

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the plan folder atomically (a temp folder, fsync, one rename)."""
        from merge.atomic import atomic_output

        folder = Path(folder)
        with atomic_output(folder, overwrite=overwrite, what="fusion plan") as tmp:
            for rel, data in self.artifacts().items():
                (tmp / Path(rel).name).write_bytes(data)
        return folder

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> FusionPlan:
        """Read a plan folder (or its ``plan.json``); every inconsistency is a clear error."""
        p = Path(path).expanduser()
        folder = p.parent if p.is_file() else p
        card_path = folder / CARD_FILE
        where = str(folder)
        if not card_path.is_file():
            raise CheckpointError(f"{where}: not a fusion plan (no {CARD_FILE})")
        try:
            card = json.loads(card_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{card_path}: not valid JSON: {e}") from None
        if not isinstance(card, dict) or card.get("format") != FORMAT:
            raise CheckpointError(
                f"{card_path}: not a weightsmith fusion plan (format {card.get('format')!r})"
                if isinstance(card, dict)
                else f"{card_path}: not a fusion plan"
            )
        if int(card.get("version", 0)) > VERSION:
            raise CheckpointError(
                f"{card_path}: plan version {card.get('version')} is newer than this "
                f"weightsmith reads ({VERSION})"
            )
        tpath = folder / str(card.get("tensors_file", TENSORS_FILE))
        if not tpath.is_file():
            raise CheckpointError(f"{where}: {tpath.name} is missing")
        raw = tpath.read_bytes()
        want = card.get("tensors_sha256")
        if want and hashlib.sha256(raw).hexdigest() != want:
            raise CheckpointError(
                f"{tpath}: SHA-256 differs from the one in {CARD_FILE} (changed or corrupt)"
            )
        from merge.checkpoint import Checkpoint

        ckpt = Checkpoint(tpath)  # header pre-checks (size, duplicates, spans)
        try:
            keys = list(card["keys"])
            shapes = {k: tuple(int(s) for s in v) for k, v in card["keys"].items()}
            if "lambda" not in ckpt:
                raise CheckpointError(f"{tpath}: no 'lambda' tensor")
            lambdas = ckpt["lambda"].clone()
            fingerprint = ckpt["fingerprint"].clone() if "fingerprint" in ckpt else None
            mask = None
            if card.get("has_mask"):
                mask = {}
                for k in keys:
                    if f"mask.{k}" not in ckpt:
                        raise CheckpointError(f"{tpath}: no mask tensor for '{k}'")
                    mask[k] = ckpt[f"mask.{k}"].clone()
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{card_path}: malformed plan card: {e}") from None
        finally:
            ckpt.close()
        if fingerprint is not None and tuple(fingerprint.shape) != (len(keys), lambdas.shape[0] + 1):
            raise CheckpointError(
                f"{tpath}: fingerprint has shape {list(fingerprint.shape)}, expected "
                f"{[len(keys), int(lambdas.shape[0]) + 1]}"
            )
        return cls(
            method=str(card.get("method", "")),
            keys=keys,
            shapes=shapes,
            lambdas=lambdas,
            mask=mask,
            fallback_lambda=float(card.get("fallback_lambda", 0.3)),
            fingerprint=fingerprint,
            task_names=list(card.get("task_names", [])),
            info=dict(card.get("info", {})),
            verify=verify,
            source=where,
        )
