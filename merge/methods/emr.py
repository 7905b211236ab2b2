"""EMR-Merging: one unified task vector, and per task a 1-bit mask and a scalar (Elect, Mask & Rescale).

Huang, Ye, Chen, He, Yue & Ouyang, "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024 (arXiv:2405.17461). From the task vectors τ_i = θ_i − θ_0, i = 1..T (§3.2–3.3):

* **Elect** (Eq. 2–4): the unified sign γ_uni = sgn(Σ_i τ_i), the unified magnitude
  ε_uni = max_i |τ_i ⊙ [τ_i ⊙ γ_uni > 0]| (the largest magnitude among the models whose sign
  agrees), and τ_uni = γ_uni ⊙ ε_uni.
* **Mask** (Eq. 5): M_i = [τ_i ⊙ τ_uni > 0], the entries where model i agrees with τ_uni.
* **Rescale** (Eq. 6): λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|, one scalar per task: the sums run over the
  whole task vector (every parameter of the model), so λ_i needs a first pass over all tensors.
* **Task model** (Eq. 7): τ̂_i = λ_i · M_i ⊙ τ_uni, θ̂_i = θ_0 + τ̂_i.

EMR does not produce one model: it produces T task models that share θ_0 and τ_uni and differ by
a mask (1 bit per parameter) and a scalar. No data and no tuning are involved.

Details fixed as the authors' code does them (``emr_merge`` in github.com/harveyhuang18/EMR_Merging):
γ_uni = +1 where Σ_i τ_i > 0 and −1 elsewhere (an exact tie Σ_i τ_i = 0 elects the negative side;
it only matters when the entries cancel exactly), and the mask is a strict agreement (τ_i = 0 is
never in M_i). The authors' code computes the rescaler from per-tensor *means*,
λ_i = Σ_k mean|τ_i[k]| / Σ_k mean|M_i[k] ⊙ τ_uni[k]|, which weights each tensor by 1/size instead of
Eq. 6's plain sums; ``rescale: reference`` gives that form, ``rescale: model`` (the default) Eq. 6.
``rescale: tensor`` (λ per task and tensor) and ``none`` (λ = 1: Elect + Mask only) are ablations.
A task whose mask is empty (Σ|M_i ⊙ τ_uni| = 0) gets λ_i = 1 (its model is θ_0 whatever λ is).

The plan (:class:`EMRPlan`) holds τ_uni (float32), the masks packed 8 to a byte (``numpy.packbits``,
little bit order: T·⌈n/8⌉ bytes for a tensor of n entries, 1 bit per parameter per task) and
λ. With the base model alone it rebuilds every task model (:meth:`EMRPlan.task_model`), without the
fine-tuned models; :meth:`EMRPlan.save` / :meth:`EMRPlan.load` write and read it as a folder
(``plan.safetensors`` + ``plan.json``). Library call: :func:`emr_plan`.

Recipe method ``emr`` (whole-model: a first pass elects τ_uni, the masks and the sums of Eq. 6,
then the engine streams the chosen output tensor by tensor). Its ``task`` parameter picks the output:

* an index (0-based, the recipe's order of the non-base models) or a model reference (the path as
  written in the recipe, the folder's name, or a Hub id ``org/name``): that task's model θ̂_i;
* ``mean`` (default): θ_0 + τ_uni ⊙ (1/T) Σ_i λ_i M_i, the average of the T task models: one
  task-agnostic model, with no tuning. It is *not* what the paper evaluates (the paper always applies
  a task's own modulators); in ``examples/merge_digits_emr.py`` it was the best of the three
  single-model read-outs (with θ_0 + τ_uni and θ_0 + mean(λ)·τ_uni; tied with the latter for large
  task vectors), and below task arithmetic with λ chosen on validation data (by 2 points for small
  task vectors, 10 for large). For a task's own model, give ``task``;
* ``unified``: θ_0 + τ_uni, the paper's elected "unified model" before any modulator. It is a poor
  model by itself (the magnitudes are maxima over the tasks) but with the plan it is all EMR needs.

With ``save_plan`` (default) the output folder gets ``emr_plan/`` (the plan above), from which every
task model is rebuilt with the base alone; this holds τ_uni and the packed masks of the whole model
in memory until the merge is written (float32 model size × (1 + T/32)). ``save_plan: false`` keeps
only the T (×K) sums: the pass over the inputs then needs memory for a few tensors, and the output
tensors are elected again from the inputs as they are streamed (the same bytes).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merge.checkpoint import dtype_of, shape_of
from merge.errors import CheckpointError, MissingTensorError, RecipeError, ShapeMismatchError
from merge.methods._fusion_plan import CARD_FILE, TENSORS_FILE, PlanMismatchError, plan_artifacts, read_plan, save_plan
from merge.methods.registry import merge_method

__all__ = [
    "EMRPlan",
    "PlanMismatchError",
    "elect",
    "emr",
    "emr_plan",
    "pack_mask",
    "unpack_mask",
]

StateDict = Mapping[str, torch.Tensor]

PAPER = "Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024"
URL = "https://arxiv.org/abs/2405.17461"
FORMAT = "weightsmith-emr-plan"
VERSION = 1
#: where the engine puts the plan inside a merge's output folder
OUTPUT_DIR = "emr_plan"
RESCALES = ("model", "reference", "tensor", "none")
READOUTS = ("mean", "unified")
#: relative tolerance of the base-model check (‖θ_0[k]‖ against the one the plan was made with)
BASE_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------
# the per-tensor kernels
# ---------------------------------------------------------------------------------------------


def elect(taus: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Elect and Mask on one tensor (Huang et al., Eq. 2–5): ``(τ_uni, [M_1, ..., M_T])``.

    γ = +1 where Σ_i τ_i > 0, else −1 (the authors' code); M_i = [τ_i γ > 0] (bool);
    ε = max_i |τ_i| over the i with M_i (0 where none); τ_uni = γ ε. ``taus`` are float tensors of
    one shape; they are not modified.
    """
    if not taus:
        raise RecipeError("emr: no task vectors to elect from")
    total = taus[0].clone()
    for t in taus[1:]:
        total.add_(t)
    flag = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    del total
    magnitude = torch.zeros_like(taus[0])
    masks = []
    for t in taus:
        m = (t * flag) > 0
        masks.append(m)
        torch.maximum(magnitude, torch.where(m, t.abs(), 0.0), out=magnitude)
    return magnitude.mul_(flag), masks


def pack_mask(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """T bool masks of one shape -> uint8 (T, ⌈n/8⌉), 8 entries a byte (``numpy.packbits``, little bit order)."""
    rows = [np.packbits(m.detach().reshape(-1).cpu().numpy().astype(np.bool_), bitorder="little") for m in masks]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, 0), dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`pack_mask` for all T rows: bool (T, *shape)."""
    n = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy(), axis=1, count=n, bitorder="little")
    return torch.from_numpy(bits.astype(np.bool_)).reshape(packed.shape[0], *shape)


def _tasks_output(tau_uni: torch.Tensor, mask: torch.Tensor, lam: float, base: torch.Tensor) -> torch.Tensor:
    """θ_0 + λ_i (M_i ⊙ τ_uni) (Eq. 7), float32."""
    return (tau_uni * mask).mul_(lam).add_(base)


def _mean_output(tau_uni: torch.Tensor, masks: Sequence[torch.Tensor], lams: Sequence[float],
                 base: torch.Tensor) -> torch.Tensor:
    """θ_0 + τ_uni ⊙ (1/T) Σ_i λ_i M_i: the average of the T task models."""
    coef = torch.zeros_like(tau_uni)
    for m, lam in zip(masks, lams, strict=True):
        coef.add_(m.to(coef.dtype), alpha=lam)
    return coef.div_(len(masks)).mul_(tau_uni).add_(base)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


def _lambdas(sum_tau: torch.Tensor, sum_uni: torch.Tensor, numel: Sequence[int], rescale: str) -> torch.Tensor:
    """λ (T, K) float32 from the per-tensor sums Σ|τ_i[k]| and Σ|M_i[k] ⊙ τ_uni[k]| (float64, (T, K)).

    ``model``: Eq. 6 over the whole model; ``reference``: the authors' code (sums of per-tensor means);
    ``tensor``: per tensor; ``none``: 1. Model-wide sums use ``math.fsum`` (exactly rounded, so the
    result does not depend on the order of the tensors). A zero denominator gives 1.
    """
    t, k = sum_tau.shape
    if rescale == "none":
        return torch.ones(t, k)
    if rescale == "tensor":
        out = torch.where(sum_uni > 0, sum_tau / sum_uni.clamp_min(1e-300), 1.0)
        return out.float()
    lam = []
    for i in range(t):
        if rescale == "reference":
            num = math.fsum(float(s) / max(1, n) for s, n in zip(sum_tau[i].tolist(), numel, strict=True))
            den = math.fsum(float(s) / max(1, n) for s, n in zip(sum_uni[i].tolist(), numel, strict=True))
        else:
            num, den = math.fsum(sum_tau[i].tolist()), math.fsum(sum_uni[i].tolist())
        lam.append(num / den if den > 0 else 1.0)
    return torch.tensor(lam, dtype=torch.float64).float()[:, None].expand(t, k).contiguous()


@dataclass
class EMRPlan:
    """What EMR-Merging keeps: λ (T, K), and (unless made with ``keep=False``) τ_uni and the packed masks.

    ``keys`` are the K merged tensors (floating tensors of the base), ``shapes`` theirs. ``tau``:
    τ_uni per key (float32); ``masks``: per key uint8 (T, ⌈n/8⌉) (:func:`pack_mask`). ``task`` is the
    output :meth:`apply` streams (an index, ``mean`` or ``unified``).
    """

    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    lambdas: torch.Tensor  # (T, K) float32
    rescale: str = "model"
    tau: dict[str, torch.Tensor] | None = None
    masks: dict[str, torch.Tensor] | None = None
    base_norms: torch.Tensor | None = None  # (K,) float64, ‖θ_0[k]‖
    task_names: list[str] = field(default_factory=list)
    task: int | str = "mean"
    info: dict[str, Any] = field(default_factory=dict)
    verify: bool = True
    source: str = ""

    def __post_init__(self) -> None:
        self.lambdas = self.lambdas.detach().to("cpu", torch.float32).contiguous()
        if self.lambdas.dim() != 2 or self.lambdas.shape[1] != len(self.keys):
            raise RecipeError(f"emr plan{self._where()}: lambda has shape {list(self.lambdas.shape)}, "
                              f"expected [n_tasks, {len(self.keys)}]")
        if self.rescale not in RESCALES:
            raise RecipeError(f"emr plan{self._where()}: unknown rescale {self.rescale!r}")
        self._index = {k: i for i, k in enumerate(self.keys)}
        if (self.tau is None) != (self.masks is None):
            raise RecipeError(f"emr plan{self._where()}: τ_uni and the masks go together")
        if self.tau is not None and self.masks is not None:
            for k in self.keys:
                if k not in self.tau or k not in self.masks:
                    raise CheckpointError(f"emr plan{self._where()}: no τ_uni or mask for tensor '{k}'")
                if tuple(self.tau[k].shape) != tuple(self.shapes[k]):
                    raise CheckpointError(f"emr plan{self._where()}: τ_uni of '{k}' has shape "
                                          f"{list(self.tau[k].shape)}, expected {list(self.shapes[k])}")
                want = (self.n_tasks, -(-math.prod(self.shapes[k]) // 8))
                if tuple(self.masks[k].shape) != want or self.masks[k].dtype != torch.uint8:
                    raise CheckpointError(f"emr plan{self._where()}: mask of '{k}' is {self.masks[k].dtype} "
                                          f"{list(self.masks[k].shape)}, expected uint8 {list(want)}")
        self.task = self.resolve_task(self.task)

    def _where(self) -> str:
        return f" {self.source}" if self.source else ""

    # -- what it holds ------------------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return int(self.lambdas.shape[0])

    @property
    def has_vectors(self) -> bool:
        """Whether τ_uni and the masks are kept (the task models can be rebuilt from the base alone)."""
        return self.tau is not None

    @property
    def task_lambda(self) -> list[float]:
        """λ_i per task (Eq. 6); with ``rescale: tensor`` the mean over the tensors."""
        return self.lambdas.double().mean(1).tolist() if self.keys else [1.0] * self.n_tasks

    def resolve_task(self, task: int | str) -> int | str:
        """``task`` as an index in 0..T−1, or ``mean`` / ``unified``; a RecipeError otherwise."""
        if isinstance(task, bool):
            raise RecipeError(f"emr: parameter 'task' must be an index, a model or one of {', '.join(READOUTS)}")
        if isinstance(task, str) and task.strip().lstrip("-").isdigit():
            task = int(task.strip())
        if isinstance(task, int):
            if not 0 <= task < self.n_tasks:
                raise RecipeError(
                    f"emr: task {task} is out of range: there are {self.n_tasks} task model(s), indexed "
                    f"0..{self.n_tasks - 1} in the recipe's order" + self._listing())
            return task
        if task in READOUTS:
            return task
        return _match_task(task, self.task_names)

    def _listing(self) -> str:
        if not self.task_names:
            return ""
        return " (" + ", ".join(f"{i}: {n}" for i, n in enumerate(self.task_names)) + ")"

    def mask(self, i: int, name: str) -> torch.Tensor:
        """M_i of tensor ``name`` as a bool tensor of its shape."""
        self._need_vectors()
        i = self._task_index(i)
        packed = self.masks[self._key(name)][i : i + 1]  # type: ignore[index]
        return unpack_mask(packed, self.shapes[name])[0]

    def _masks(self, name: str) -> torch.Tensor:
        return unpack_mask(self.masks[name], self.shapes[name])  # type: ignore[index]

    def kept_fraction(self) -> list[float]:
        """Per task, the fraction of the merged entries in its mask (Σ M_i / n)."""
        n = sum(math.prod(self.shapes[k]) for k in self.keys)
        return [x / max(1, n) for x in self.info.get("mask_counts", [0] * self.n_tasks)]

    def storage(self) -> dict[str, Any]:
        """Bits and bytes: what the plan costs next to the T fine-tuned models (float32)."""
        n = sum(math.prod(self.shapes[k]) for k in self.keys)
        mask_bytes = sum(self.n_tasks * -(-math.prod(self.shapes[k]) // 8) for k in self.keys)
        return {
            "parameters": n,
            "n_tasks": self.n_tasks,
            "mask_bytes": mask_bytes,
            "mask_bits_per_parameter_per_task": 8 * mask_bytes / max(1, n * self.n_tasks),
            "mask_bits_per_parameter": 8 * mask_bytes / max(1, n),
            "tau_uni_bytes": 4 * n,
            "lambda_bytes": 4 * self.lambdas.numel(),
            # base + τ_uni + masks + λ, against base + T fine-tunes (all float32)
            "emr_bytes_with_base": 8 * n + mask_bytes + 4 * self.lambdas.numel(),
            "finetunes_bytes_with_base": 4 * n * (self.n_tasks + 1),
        }

    def _key(self, name: str) -> str:
        if name not in self._index:
            raise MissingTensorError(f"emr plan{self._where()}: tensor '{name}' is not in the plan "
                                     f"({len(self.keys)} tensors were elected)")
        return name

    def _task_index(self, i: int | str) -> int:
        t = self.resolve_task(i)
        if not isinstance(t, int):
            raise RecipeError(f"emr: a task index is needed here, got {i!r}")
        return t

    def _need_vectors(self) -> None:
        if not self.has_vectors:
            raise RecipeError(f"emr plan{self._where()}: made without τ_uni and the masks (save_plan: false / "
                              "keep=False): only the engine's streamed output can be produced from it")

    # -- outputs ------------------------------------------------------------------------------------
    def _output(self, name: str, task: int | str, base: torch.Tensor, tau_uni: torch.Tensor,
                masks: Sequence[torch.Tensor]) -> torch.Tensor:
        lam = self.lambdas[:, self._index[name]].tolist()
        if task == "unified":
            return tau_uni + base
        if task == "mean":
            return _mean_output(tau_uni, masks, lam, base)
        assert isinstance(task, int)
        return _tasks_output(tau_uni, masks[task], lam[task], base)

    def apply(self, name: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        """One output tensor of the chosen ``task`` (engine contract); float32.

        With τ_uni and the masks kept, they are used (``tensors`` are not read); otherwise the tensor is
        elected again from ``tensors`` and ``base`` (:func:`elect`: the same values as the first pass).
        """
        if base is None:
            raise RecipeError(f"emr: tensor '{name}' needs the base model's tensor")
        if not base.is_floating_point():
            return base
        self._key(name)
        b = base.float()
        if self.has_vectors:
            return self._output(name, self.task, b, self.tau[name].to(b.device), self._masks(name).to(b.device))  # type: ignore[index]
        if len(tensors) != self.n_tasks:
            raise PlanMismatchError(f"emr plan{self._where()}: {len(tensors)} task tensors for '{name}', "
                                    f"the plan has {self.n_tasks} tasks")
        tau_uni, masks = elect([t.float() - b for t in tensors])
        return self._output(name, self.task, b, tau_uni, masks)

    def _check_base(self, base: StateDict) -> None:
        for j, k in enumerate(self.keys):
            if k not in base:
                raise PlanMismatchError(f"emr plan{self._where()}: tensor '{k}' is not in the base model")
            shape = shape_of(base, k)
            if shape != tuple(self.shapes[k]):
                raise PlanMismatchError(f"emr plan{self._where()}: tensor '{k}' has shape {list(shape)} in the "
                                        f"base model, the plan was made for {list(self.shapes[k])}")
            if self.verify and self.base_norms is not None:
                got, want = float(base[k].double().norm()), float(self.base_norms[j])
                if not math.isclose(got, want, rel_tol=BASE_RTOL, abs_tol=1e-6):
                    raise PlanMismatchError(
                        f"emr plan{self._where()}: tensor '{k}': ‖θ_0‖ is {got:.6g}, the plan was made with a base "
                        f"where it was {want:.6g}: not the same base model (verify=False to apply it anyway)")

    def model(self, task: int | str, base: StateDict) -> dict[str, torch.Tensor]:
        """The output for ``task`` (index, model name, ``mean`` or ``unified``) from the base alone.

        Float32 for the merged tensors, the base's other tensors cloned: the same values the engine
        writes for that ``task`` with dtype float32.
        """
        self._need_vectors()
        t = self.resolve_task(task)
        self._check_base(base)
        out: dict[str, torch.Tensor] = {}
        for k in base.keys():
            b = base[k]
            if k not in self._index:
                out[k] = b.clone()
                continue
            out[k] = self._output(k, t, b.float(), self.tau[k], self._masks(k))  # type: ignore[index]
        return out

    def task_model(self, i: int | str, base: StateDict) -> dict[str, torch.Tensor]:
        """θ̂_i = θ_0 + λ_i M_i ⊙ τ_uni (Eq. 7), rebuilt from the base and the plan alone."""
        return self.model(self._task_index(i), base)

    def task_vector(self, i: int | str, name: str) -> torch.Tensor:
        """τ̂_i of one tensor: λ_i M_i ⊙ τ_uni."""
        self._need_vectors()
        i = self._task_index(i)
        k = self._key(name)
        lam = float(self.lambdas[i, self._index[k]])
        return (self.tau[k] * self.mask(i, k)).mul_(lam)  # type: ignore[index]

    def select(self, task: int | str) -> EMRPlan:
        """The same plan with another output ``task`` for :meth:`apply` (shares the tensors)."""
        return replace(self, task=task)

    # -- files --------------------------------------------------------------------------------------
    def card(self) -> dict[str, Any]:
        lam = self.lambdas
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": "emr",
            "paper": PAPER,
            "n_tasks": self.n_tasks,
            "task_names": self.task_names,
            "rescale": self.rescale,
            "task": self.task,
            "lambda_per_task": self.task_lambda,
            "lambda": lam.tolist() if self.rescale == "tensor" and lam.numel() <= 4096 else None,
            "has_vectors": self.has_vectors,
            "keys": {k: list(self.shapes[k]) for k in self.keys},
            "mask_encoding": "numpy.packbits, bitorder little, row i = task i, flat C order",
            "storage": self.storage(),
            "info": self.info,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"lambda": self.lambdas}
        if self.base_norms is not None:
            out["base_norms"] = self.base_norms.to(torch.float64).contiguous()
        if self.has_vectors:
            for k in self.keys:
                out[f"tau.{k}"] = self.tau[k].contiguous()  # type: ignore[index]
                out[f"mask.{k}"] = self.masks[k].contiguous()  # type: ignore[index]
        return out

    def artifacts(self) -> dict[str, bytes]:
        """The plan's files, keyed by their path inside a merge's output folder (engine hook).

        Nothing when the plan keeps no τ_uni and masks (``save_plan: false``).
        """
        if not self.has_vectors:
            return {}
        return plan_artifacts(FORMAT, self.card(), self.tensors(), OUTPUT_DIR)

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the plan folder atomically (a temp folder, fsync, one rename)."""
        self._need_vectors()
        return save_plan(self.artifacts(), folder, overwrite, "emr plan")

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> EMRPlan:
        """Read a plan folder (or its ``plan.json``); every inconsistency is a clear error."""
        card, tensors, where = read_plan(path, FORMAT, "emr")
        try:
            keys = list(card["keys"])
            shapes = {k: tuple(int(s) for s in v) for k, v in card["keys"].items()}
            if "lambda" not in tensors:
                raise CheckpointError(f"{where}: no 'lambda' tensor in {TENSORS_FILE}")
            lambdas = tensors["lambda"]
            base_norms = tensors.get("base_norms")
            tau: dict[str, torch.Tensor] | None = None
            masks: dict[str, torch.Tensor] | None = None
            if card.get("has_vectors", True):
                tau, masks = {}, {}
                for k in keys:
                    for kind, dst in (("tau", tau), ("mask", masks)):
                        if f"{kind}.{k}" not in tensors:
                            raise CheckpointError(f"{where}: no {kind} tensor for '{k}' in {TENSORS_FILE}")
                        dst[k] = tensors[f"{kind}.{k}"]
            task = card.get("task", "mean")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where}/{CARD_FILE}: malformed plan card: {e}") from None
        return cls(keys=keys, shapes=shapes, lambdas=lambdas, rescale=str(card.get("rescale", "model")),
                   tau=tau, masks=masks, base_norms=base_norms, task_names=list(card.get("task_names", [])),
                   task=task, info=dict(card.get("info", {})), verify=verify, source=where)


# ---------------------------------------------------------------------------------------------
# the library call
# ---------------------------------------------------------------------------------------------


def _name_of(source: Any, i: int) -> str:
    path = getattr(source, "path", None)
    return str(path) if path is not None and str(path) != "state dict" else f"model {i}"


def emr_plan(
    base: StateDict | None,
    models: Sequence[StateDict],
    *,
    rescale: str = "model",
    task: int | str = "mean",
    keep: bool = True,
    names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EMRPlan:
    """EMR-Merging (Huang et al., NeurIPS 2024, Eq. 2–7): elect τ_uni, mask and rescale, in one pass.

    ``base`` and ``models`` are state dicts or lazy tensor sources (read one tensor at a time, in
    float32); the merged tensors are the base's floating ones. ``rescale``: ``model`` (Eq. 6, one λ
    per task over the whole model), ``reference`` (the authors' code: sums of per-tensor means),
    ``tensor`` (λ per task and tensor) or ``none`` (λ = 1). ``keep=False`` keeps only λ (the plan can
    then only be applied by :meth:`EMRPlan.apply` to the inputs). ``task`` is the output
    :meth:`EMRPlan.apply` gives (see the module docstring); ``names`` name the models (messages, and
    ``task`` by name).
    """
    if base is None:
        raise RecipeError("method 'emr' requires a base_model (task vectors are θ_i − θ_0)")
    if not models:
        raise RecipeError("method 'emr' needs at least one model besides the base")
    if rescale not in RESCALES:
        raise RecipeError(f"emr: parameter 'rescale' must be one of {', '.join(RESCALES)}; got {rescale!r}")
    names = list(names) if names is not None else [_name_of(m, i) for i, m in enumerate(models)]
    if len(names) != len(models):
        raise RecipeError(f"emr: {len(names)} names for {len(models)} models")
    t0 = time.perf_counter()
    keys = [k for k in base.keys() if dtype_of(base, k).is_floating_point]
    shapes = {k: shape_of(base, k) for k in keys}
    for k in keys:
        for i, m in enumerate(models):
            if k not in m:
                raise MissingTensorError(f"emr: {names[i]} has no tensor '{k}' (present in the base model)")
            if shape_of(m, k) != shapes[k]:
                raise ShapeMismatchError(f"emr: tensor '{k}' has shape {list(shape_of(m, k))} in {names[i]}, "
                                         f"{list(shapes[k])} in the base model")
    n_tasks = len(models)
    sum_tau = torch.zeros(n_tasks, len(keys), dtype=torch.float64)
    sum_uni = torch.zeros(n_tasks, len(keys), dtype=torch.float64)
    counts = [0] * n_tasks
    tau: dict[str, torch.Tensor] | None = {} if keep else None
    packed: dict[str, torch.Tensor] | None = {} if keep else None
    base_norms = torch.zeros(len(keys), dtype=torch.float64)
    for j, k in enumerate(keys):
        b = base[k].float()
        base_norms[j] = b.double().norm()
        taus = [m[k].float() - b for m in models]
        tau_uni, masks = elect(taus)
        for i, (t, m) in enumerate(zip(taus, masks, strict=True)):
            sum_tau[i, j] = t.abs().sum(dtype=torch.float64)
            sum_uni[i, j] = (tau_uni * m).abs_().sum(dtype=torch.float64)
            counts[i] += int(m.sum())
        if tau is not None and packed is not None:
            tau[k] = tau_uni.cpu()
            packed[k] = pack_mask(masks)
        del taus, masks, tau_uni
        if progress is not None:
            progress(f"emr elect {j + 1}/{len(keys)} {k}")
    numel = [math.prod(shapes[k]) for k in keys]
    lambdas = _lambdas(sum_tau, sum_uni, numel, rescale)
    total = sum(numel)
    info = {
        "rescale": rescale,
        "mask_counts": counts,
        "mask_kept_fraction": [c / max(1, total) for c in counts],
        "l1_tau": [math.fsum(r) for r in sum_tau.tolist()],
        "l1_masked_tau_uni": [math.fsum(r) for r in sum_uni.tolist()],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return EMRPlan(keys=keys, shapes=shapes, lambdas=lambdas, rescale=rescale, tau=tau, masks=packed,
                   base_norms=base_norms, task_names=names, task=task, info=info)


# ---------------------------------------------------------------------------------------------
# choosing the task by reference
# ---------------------------------------------------------------------------------------------


def _hub_dir(ref: str) -> str | None:
    """``org/name[@rev]`` or ``hf://org/name...`` -> the Hub cache folder name ``models--org--name``."""
    r = ref[len("hf://"):] if ref.startswith("hf://") else ref
    r = r.split("@", 1)[0].strip("/")
    parts = r.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"[\w.\-]+", p) for p in parts):
        return None
    return f"models--{parts[0]}--{parts[1]}"


def _match_task(task: str, names: Sequence[str]) -> int:
    """The index of the model ``task`` names: the same path, the folder's (or file's) name, or a Hub id."""
    want = task.strip()
    if not want:
        raise RecipeError(f"emr: parameter 'task' is empty: give an index, a model or one of {', '.join(READOUTS)}")

    def real(p: str) -> str:
        return os.path.realpath(os.path.expanduser(p))

    checks: list[Callable[[str], bool]] = [
        lambda n: n == want or real(n) == real(want),
        lambda n: real(str(Path(n).parent)) == real(want) if Path(n).suffix == ".safetensors" else False,
        lambda n: Path(n).name == want or (Path(n).suffix == ".safetensors" and Path(n).parent.name == want),
    ]
    hub = _hub_dir(want)
    if hub is not None:
        checks.append(lambda n: hub in Path(n).parts)
    for check in checks:
        hits = [i for i, n in enumerate(names) if check(n)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise RecipeError(f"emr: task {task!r} matches several models ({', '.join(map(str, hits))}); "
                              "give its index")
    listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    raise RecipeError(f"emr: task {task!r} is not one of the models ({listing}), an index, or one of "
                      f"{', '.join(READOUTS)}")


# ---------------------------------------------------------------------------------------------
# the recipe method
# ---------------------------------------------------------------------------------------------


@merge_method("emr", paper=PAPER, url=URL, kind="whole_model", base="required", min_models=1)
def emr(
    models: list[StateDict],
    base: StateDict | None,
    *,
    task: int | str = "mean",
    rescale: str = "model",
    save_plan: bool = True,
    progress: Callable[[str], None] | None = None,
) -> EMRPlan:
    """EMR-Merging: a unified task vector, with a 1-bit mask and a scalar per task; outputs one task's model.

    Elect τ_uni = sgn(Σ_i τ_i) ⊙ max over the agreeing models of |τ_i|, mask M_i = [τ_i ⊙ τ_uni > 0],
    rescale λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| over the whole model (Huang et al., NeurIPS 2024, Eq. 2–7).
    ``task``: the output, an index (0-based, recipe order) or model reference gives that task's model
    θ_0 + λ_i M_i ⊙ τ_uni; ``mean`` (default) the average of the task models; ``unified`` θ_0 + τ_uni.
    ``rescale``: ``model`` (Eq. 6), ``reference`` (the authors' code: per-tensor means), ``tensor``,
    ``none``. With ``save_plan`` the output has ``emr_plan/`` (τ_uni, packed masks, λ), from which
    every task model is rebuilt with the base alone (``EMRPlan.load(...).task_model(i, base)``).
    """
    if base is None:
        raise RecipeError("method 'emr' requires a base_model (task vectors are θ_i − θ_0)")
    names = [_name_of(m, i) for i, m in enumerate(models)]
    # check the choice before the pass over the weights (a typo should not cost a read of the models)
    EMRPlan(keys=[], shapes={}, lambdas=torch.zeros(len(models), 0), task_names=names, task=task)
    return emr_plan(base, models, rescale=rescale, task=task, keep=save_plan, names=names, progress=progress)
