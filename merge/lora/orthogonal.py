"""Orthogonal adaptation: LoRA residuals that sum without crosstalk (Po, Yang, Aberman, Wetzstein, CVPR 2024).

Po et al. ("Orthogonal Adaptation for Modular Customization of Diffusion Models", §4) write concept i's
residual of a weight as ``ΔW_i = A_i B_iᵀ`` with one factor *fixed* before training and only the other
trained, the fixed factors of different concepts (nearly) orthogonal: ``B_iᵀ B_j ≈ 0`` for i ≠ j. Then
``⟨ΔW_i, ΔW_j⟩_F = tr(A_iᵀ A_j B_jᵀ B_i) = 0``, concepts fine-tuned without access to each other merge by
a plain sum ``W + Σ_i ΔW_i``, and each ``ΔW_i`` can be read back from the sum by projection.

In PEFT's terms (``ΔW = s · lora_B @ lora_A``) the fixed factor is selectable:

* ``frozen="A"`` (the paper's choice: its fixed ``B_i`` multiplies the layer input, ``ΔW_i x = A_i (B_iᵀ x)``):
  ``lora_A = O[:, S_i]ᵀ`` (``r × in``) is frozen and ``lora_B`` (zero-initialised) is trained. Concept i's
  residual reads only the r-dimensional input subspace ``span(O[:, S_i])``; ``ΔW_i = ΔW_merged P_i P_iᵀ``.
* ``frozen="B"``: ``lora_B = O[:, S_i]`` (``out × r``) is frozen and ``lora_A`` (zero-initialised) is trained
  (what several public re-implementations do). Concept i's residual *writes* only into
  ``span(O[:, S_i])``: outputs of different concepts never cancel, and ``ΔW_i = P_i P_iᵀ ΔW_merged``.

The bases (§4.2, "randomized orthogonal basis"): one random orthogonal ``d × d`` matrix ``O`` per layer
and side, the Q factor of the QR decomposition of a Gaussian matrix, with the signs fixed so that
``diag(R) > 0`` (then ``O`` is Haar-distributed and unique; Mezzadri, "How to generate random matrices
from the classical compact groups", 2007). The Gaussian is drawn in float64 on the CPU from a generator
seeded by ``(seed, layer name, d)``, so every user who shares the seed derives the same ``O`` without
communicating. Each concept takes r of its columns, its *slot*:

* ``coordinated``: concept k takes columns ``k·r … (k+1)·r − 1``; disjoint slots, exactly orthogonal
  residuals (up to float rounding), at most ``d // r`` concepts per layer;
* ``uncoordinated``: r columns drawn from the concept's own key (no coordination; two r-subsets of d
  columns share r²/d columns on average);
* ``gaussian`` (§4.2, "randomized Gaussian"): the fixed factor is an i.i.d. ``N(0, 1/d)`` matrix drawn
  from the concept's key, nearly orthogonal to other concepts' in high dimension.

The merge itself is a sum of the residuals: fold the adapters with weight 1
(``weightsmith adapter fold base a b c``) or concatenate them (``weightsmith adapter merge --method cat``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from merge.lora.factors import frobenius_cosine
from merge.methods.runner import derive_seed

Side = Literal["A", "B"]
SlotMode = Literal["coordinated", "uncoordinated", "gaussian"]
PEFT_PREFIX = "base_model.model."


def orthogonal_basis(seed: int, name: str, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The shared random orthogonal ``dim × dim`` basis of one layer side (Haar, sign-fixed QR of a Gaussian).

    Deterministic in ``(seed, name, dim)``: the Gaussian comes from torch's CPU generator (Mersenne
    twister) seeded by a BLAKE2 hash of the three, in float64; the QR runs in float64 too.
    """
    if dim < 1:
        raise ValueError(f"basis dimension must be >= 1, got {dim}")
    g = torch.Generator(device="cpu").manual_seed(derive_seed(seed, f"orthogonal-adaptation:{name}:{dim}"))
    x = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(x)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d).to(dtype)


def _concept_key(concept: int | str) -> str:
    return f"{type(concept).__name__}:{concept}"


@dataclass(frozen=True)
class OrthogonalSpec:
    """How one concept's frozen factors are made: shared ``seed``, its ``concept`` slot, ``rank``, side, mode.

    ``concept`` is the slot index (an int) for ``coordinated`` slots; for ``uncoordinated`` and
    ``gaussian`` it is the concept's own key (any int or string), from which its columns or matrix are drawn.
    """

    seed: int
    concept: int | str
    rank: int
    frozen: Side = "A"
    slots: SlotMode = "coordinated"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.frozen not in ("A", "B"):
            raise ValueError(f"frozen must be 'A' (input side) or 'B' (output side), got {self.frozen!r}")
        if self.slots not in ("coordinated", "uncoordinated", "gaussian"):
            raise ValueError(f"slots must be coordinated, uncoordinated or gaussian, got {self.slots!r}")
        if self.slots == "coordinated" and (
            isinstance(self.concept, bool) or not isinstance(self.concept, int) or self.concept < 0
        ):
            raise ValueError(f"coordinated slots need a non-negative int concept index, got {self.concept!r}")

    def columns(self, name: str, dim: int) -> torch.Tensor:
        """Indices of the basis columns this concept uses at layer ``name`` (side dimension ``dim``)."""
        if self.rank > dim:
            raise ValueError(f"layer '{name}': rank {self.rank} is larger than the side dimension {dim}")
        if self.slots == "coordinated":
            assert isinstance(self.concept, int)
            lo = self.concept * self.rank
            if lo + self.rank > dim:
                raise ValueError(
                    f"layer '{name}': concept slot {self.concept} at rank {self.rank} needs columns up to "
                    f"{lo + self.rank - 1}, but the side has {dim} (at most {dim // self.rank} concepts)"
                )
            return torch.arange(lo, lo + self.rank)
        g = torch.Generator().manual_seed(_private_seed(self, name, dim))
        return torch.randperm(dim, generator=g)[: self.rank].sort().values

    def frozen_factor(
        self, name: str, out_features: int, in_features: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The frozen PEFT factor of layer ``name``: ``lora_A`` (``r × in``) or ``lora_B`` (``out × r``)."""
        dim = in_features if self.frozen == "A" else out_features
        if self.slots == "gaussian":
            g = torch.Generator().manual_seed(_private_seed(self, name, dim))
            cols = torch.randn(dim, self.rank, generator=g, dtype=torch.float64) / dim**0.5
        else:
            cols = orthogonal_basis(self.seed, name, dim, torch.float64)[:, self.columns(name, dim)]
        return (cols.T if self.frozen == "A" else cols).to(dtype).contiguous()


def _private_seed(spec: OrthogonalSpec, name: str, dim: int) -> int:
    h = hashlib.blake2b(f"{_concept_key(spec.concept)}\x00{spec.slots}".encode(), digest_size=8).hexdigest()
    return derive_seed(spec.seed, f"orthogonal-adaptation-private:{h}:{name}:{dim}")


# ---------------------------------------------------------------------------------------------
# PEFT models
# ---------------------------------------------------------------------------------------------


def _lora_modules(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and isinstance(mod.lora_A, torch.nn.ModuleDict):
            yield name.removeprefix(PEFT_PREFIX), mod


def apply_orthogonal_adaptation(
    model: torch.nn.Module, spec: OrthogonalSpec, adapter: str = "default"
) -> dict[str, Any]:
    """Make a PEFT LoRA model's adapter ``adapter`` an orthogonal-adaptation one, in place, before training.

    For every LoRA ``Linear`` layer: the frozen factor (``spec.frozen``) is set to this concept's slot of
    the layer's shared basis and gets ``requires_grad = False``; the trained factor is set to zero (so
    the model starts as the base). The basis is named by the module path without PEFT's
    ``base_model.model.`` prefix, so every user of the same architecture and seed derives the same one.
    Returns ``{module: {"frozen": "A"|"B", "columns": [...]}}``. Embedding and conv LoRA layers are
    refused (the construction here is for ``Linear`` weights).
    """
    report: dict[str, Any] = {}
    found = False
    for name, mod in _lora_modules(model):
        if adapter not in mod.lora_A:
            continue
        found = True
        a, b = mod.lora_A[adapter], mod.lora_B[adapter]
        if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear):
            raise TypeError(
                f"layer '{name}': orthogonal adaptation supports Linear LoRA layers, got "
                f"{type(a).__name__}/{type(b).__name__}"
            )
        out_f, in_f = b.out_features, a.in_features
        if a.out_features != spec.rank:
            raise ValueError(f"layer '{name}': the LoRA rank is {a.out_features}, the spec's {spec.rank}")
        frozen = spec.frozen_factor(name, out_f, in_f, a.weight.dtype).to(a.weight.device)
        with torch.no_grad():
            if spec.frozen == "A":
                a.weight.copy_(frozen)
                b.weight.zero_()
            else:
                b.weight.copy_(frozen)
                a.weight.zero_()
        (a if spec.frozen == "A" else b).weight.requires_grad_(False)
        (b if spec.frozen == "A" else a).weight.requires_grad_(True)
        dim = in_f if spec.frozen == "A" else out_f
        report[name] = {
            "frozen": spec.frozen,
            "columns": [] if spec.slots == "gaussian" else spec.columns(name, dim).tolist(),
        }
    if not found:
        raise ValueError(f"the model has no LoRA layers for adapter '{adapter}' (wrap it with peft first)")
    return report


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------


def slot_overlap(a: OrthogonalSpec, b: OrthogonalSpec, name: str, dim: int) -> float:
    """Fraction of shared basis columns, ``|S_a ∩ S_b| / r`` (1.0 when the fixed factors are not both slots)."""
    if a.slots == "gaussian" or b.slots == "gaussian" or a.seed != b.seed or a.frozen != b.frozen:
        return float("nan")
    sa, sb = set(a.columns(name, dim).tolist()), set(b.columns(name, dim).tolist())
    return len(sa & sb) / max(a.rank, b.rank)


def certified_orthogonal(specs: list[OrthogonalSpec]) -> bool:
    """True when the residuals are orthogonal by construction: one seed and side, coordinated, distinct slots."""
    if not specs:
        return True
    s0 = specs[0]
    same = all(s.seed == s0.seed and s.frozen == s0.frozen and s.slots == "coordinated" for s in specs)
    if not same:
        return False
    spans = sorted((int(s.concept) * s.rank, (int(s.concept) + 1) * s.rank) for s in specs)
    return all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


def residual_cosine_matrix(residuals: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``C[i, j]`` = Frobenius cosine of concept i's and j's residuals over all their shared layers."""
    n = len(residuals)
    c = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            keys = sorted(set(residuals[i]) & set(residuals[j]))
            if not keys:
                c[i, j] = c[j, i] = 0.0
                continue
            a = torch.cat([residuals[i][k].double().flatten() for k in keys])
            b = torch.cat([residuals[j][k].double().flatten() for k in keys])
            c[i, j] = c[j, i] = frobenius_cosine(a, b)
    return c


def recover(merged: torch.Tensor, spec: OrthogonalSpec, name: str) -> torch.Tensor:
    """Concept ``spec``'s part of a merged residual ``Σ_j ΔW_j`` of layer ``name``, by projection.

    Frozen A (rows ``O[:, S]ᵀ``, orthonormal): ``ΔW_merged Aᵀ A``; frozen B: ``B Bᵀ ΔW_merged``. Exact (to
    float rounding) when the other concepts hold disjoint slots of the same basis.
    """
    out_f, in_f = merged.shape
    f = spec.frozen_factor(name, out_f, in_f, torch.float64)
    m = merged.double()
    if spec.slots == "gaussian":  # not orthonormal: project with the pseudo-inverse
        if spec.frozen == "A":
            return (m @ torch.linalg.pinv(f) @ f).to(merged.dtype)
        return (f @ torch.linalg.pinv(f) @ m).to(merged.dtype)
    return (m @ f.T @ f if spec.frozen == "A" else f @ f.T @ m).to(merged.dtype)


def lora_residuals(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """``{module: s · B A}`` of a PEFT model's adapter (detached float32)."""
    out = {}
    for name, mod in _lora_modules(model):
        if adapter in mod.lora_A:
            a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            out[name] = (b.detach().float() @ a.detach().float()) * float(mod.scaling[adapter])
    return out


__all__ = [
    "OrthogonalSpec",
    "apply_orthogonal_adaptation",
    "certified_orthogonal",
    "lora_residuals",
    "orthogonal_basis",
    "recover",
    "residual_cosine_matrix",
    "slot_overlap",
]
