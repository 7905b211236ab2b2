"""The permutation spec: which axes of which tensors each hidden-unit permutation acts on.

:class:`PermutationSpec` (validated on construction, serialisable to JSON) and
:class:`HeadStructure` (block-structured permutations over attention heads); see the package
docstring of :mod:`merge.symmetry` for the conventions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.errors import RecipeError, ShapeMismatchError

PermId = str
Perms = dict[str, torch.Tensor]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadStructure:
    """Block structure of a permutation over an ``n_heads·head_dim`` attention axis.

    The flat index ``h·head_dim + i`` is feature ``i`` of head ``h``. A valid permutation is
    ``perm[h·d + i] = σ[h]·d + τ_h[i]``: ``σ`` permutes whole heads and is shared by every
    permutation of the same ``group``; ``τ_h`` permutes features inside (new) head ``h`` and is
    the identity when ``within`` is false (RoPE-safe q/k: rotary pairs and frequencies must stay).
    """

    n_heads: int
    head_dim: int
    group: str
    within: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_heads": self.n_heads,
            "head_dim": self.head_dim,
            "group": self.group,
            "within": self.within,
        }


class PermutationSpec:
    """Which axes of which tensors every hidden-unit permutation acts on (validated on construction).

    ``axes_to_perm`` maps every tensor name to one entry per axis (of its view): a permutation id
    or ``None``. ``shapes`` gives every listed tensor's stored shape; ``views`` optional reshapes;
    ``heads`` the block structure of attention permutations (see the module docstring). Errors
    name the tensor and the axis: a permutation on two axes of one tensor, sizes that disagree,
    a view with the wrong number of elements, a head structure that does not tile the axis.
    """

    def __init__(
        self,
        axes_to_perm: Mapping[str, Sequence[PermId | None]],
        shapes: Mapping[str, Sequence[int]],
        *,
        views: Mapping[str, Sequence[int]] | None = None,
        heads: Mapping[PermId, HeadStructure] | None = None,
    ) -> None:
        self.axes_to_perm: dict[str, tuple[PermId | None, ...]] = {
            str(k): tuple(None if p is None else str(p) for p in v) for k, v in axes_to_perm.items()
        }
        self.shapes: dict[str, tuple[int, ...]] = {
            str(k): tuple(int(s) for s in v) for k, v in shapes.items()
        }
        self.views: dict[str, tuple[int, ...]] = {
            str(k): tuple(int(s) for s in v) for k, v in (views or {}).items()
        }
        self.heads: dict[PermId, HeadStructure] = dict(heads or {})
        self.perm_to_axes: dict[PermId, list[tuple[str, int]]] = {}
        self.sizes: dict[PermId, int] = {}
        self._validate()

    # -- construction ---------------------------------------------------------------------------
    def _validate(self) -> None:
        where: dict[PermId, tuple[str, int]] = {}
        for name, axes in self.axes_to_perm.items():
            if name not in self.shapes:
                raise RecipeError(f"permutation spec: tensor '{name}' has no shape")
            shape = self.shapes[name]
            if name in self.views:
                view = self.views[name]
                if math.prod(view) != math.prod(shape):
                    raise ShapeMismatchError(
                        f"permutation spec: tensor '{name}' of shape {list(shape)} cannot be viewed as "
                        f"{list(view)} (element counts differ)"
                    )
            vshape = self.view_shape(name)
            if len(axes) != len(vshape):
                raise RecipeError(
                    f"permutation spec: tensor '{name}' has {len(vshape)} axes (shape {list(vshape)}) but "
                    f"{len(axes)} axis entries {list(axes)}"
                )
            seen: dict[PermId, int] = {}
            for ax, p in enumerate(axes):
                if p is None:
                    continue
                if p in seen:
                    raise RecipeError(
                        f"permutation spec: permutation '{p}' appears on axes {seen[p]} and {ax} of tensor "
                        f"'{name}'; a permutation may act on one axis of a tensor only"
                    )
                seen[p] = ax
                n = vshape[ax]
                if p not in self.sizes:
                    self.sizes[p] = n
                    where[p] = (name, ax)
                    self.perm_to_axes[p] = []
                elif self.sizes[p] != n:
                    k0, a0 = where[p]
                    raise ShapeMismatchError(
                        f"permutation spec: tensor '{name}' axis {ax} has size {n}, "
                        f"but permutation '{p}' has "
                        f"size {self.sizes[p]} (from tensor '{k0}' axis {a0})"
                    )
                self.perm_to_axes[p].append((name, ax))
        for name in self.views:
            if name not in self.axes_to_perm:
                raise RecipeError(f"permutation spec: view given for unknown tensor '{name}'")
        groups: dict[str, int] = {}
        for p, hs in self.heads.items():
            if p not in self.sizes:
                raise RecipeError(f"permutation spec: head structure given for unknown permutation '{p}'")
            if hs.n_heads * hs.head_dim != self.sizes[p] or hs.n_heads < 1:
                k0, a0 = where[p]
                raise ShapeMismatchError(
                    f"permutation spec: permutation '{p}' (tensor '{k0}' axis {a0}) "
                    f"has size {self.sizes[p]}, "
                    f"not n_heads·head_dim = {hs.n_heads}·{hs.head_dim}"
                )
            if groups.setdefault(hs.group, hs.n_heads) != hs.n_heads:
                raise RecipeError(
                    f"permutation spec: head group '{hs.group}' mixes {groups[hs.group]} "
                    f"and {hs.n_heads} heads "
                    f"(permutation '{p}')"
                )
        for name, axes in self.axes_to_perm.items():
            gs = [self.heads[p].group for p in axes if p is not None and p in self.heads]
            if len(gs) != len(set(gs)):
                raise RecipeError(
                    f"permutation spec: tensor '{name}' carries two permutations of one head group; "
                    "they could not be solved jointly"
                )

    # -- views of the information ---------------------------------------------------------------
    @property
    def perms(self) -> list[PermId]:
        """Permutation ids, in order of first appearance."""
        return list(self.perm_to_axes)

    def view_shape(self, name: str) -> tuple[int, ...]:
        """The shape a tensor's axes are read in (its view, else its stored shape)."""
        return self.views.get(name, self.shapes[name])

    def tensors_of(self, perm: PermId) -> list[str]:
        return [k for k, _ in self.perm_to_axes[perm]]

    def permuted_tensors(self) -> list[str]:
        """Tensors touched by at least one permutation."""
        return [k for k, axes in self.axes_to_perm.items() if any(p is not None for p in axes)]

    def neighbours(self, perm: PermId) -> set[PermId]:
        """Permutations that share a tensor with ``perm`` (its cost matrix depends on exactly these)."""
        out: set[PermId] = set()
        for k, _ in self.perm_to_axes[perm]:
            out.update(p for p in self.axes_to_perm[k] if p is not None and p != perm)
        return out

    def units(self) -> list[tuple[PermId, ...]]:
        """What a coordinate-descent step solves at once: single permutations, or one head group."""
        out: list[tuple[PermId, ...]] = []
        done: set[str] = set()
        for p in self.perms:
            hs = self.heads.get(p)
            if hs is None:
                out.append((p,))
            elif hs.group not in done:
                done.add(hs.group)
                out.append(
                    tuple(q for q in self.perms if q in self.heads and self.heads[q].group == hs.group)
                )
        return out

    # -- permutations ---------------------------------------------------------------------------
    def identity(self) -> Perms:
        return {p: torch.arange(n) for p, n in self.sizes.items()}

    def random_perms(self, generator: torch.Generator | None = None) -> Perms:
        """A uniformly random valid permutation for every id (block-structured where heads are given)."""
        out: Perms = {}
        sigma: dict[str, torch.Tensor] = {}
        for p, n in self.sizes.items():
            hs = self.heads.get(p)
            if hs is None:
                out[p] = torch.randperm(n, generator=generator)
                continue
            if hs.group not in sigma:
                sigma[hs.group] = torch.randperm(hs.n_heads, generator=generator)
            taus = [
                torch.randperm(hs.head_dim, generator=generator) if hs.within else torch.arange(hs.head_dim)
                for _ in range(hs.n_heads)
            ]
            out[p] = heads_to_flat(sigma[hs.group], taus, hs.head_dim)
        return out

    def check_perms(self, perms: Mapping[str, torch.Tensor]) -> None:
        """Raise if ``perms`` misses an id, is not a permutation, or breaks a head structure."""
        sig: dict[str, tuple[PermId, torch.Tensor]] = {}
        for p, n in self.sizes.items():
            if p not in perms:
                raise RecipeError(f"no permutation given for '{p}'")
            v = torch.as_tensor(perms[p])
            if v.shape != (n,) or not torch.equal(torch.sort(v).values, torch.arange(n)):
                raise RecipeError(f"permutation '{p}' is not a permutation of {n} elements")
            hs = self.heads.get(p)
            if hs is None:
                continue
            s, taus = flat_to_heads(v, hs.head_dim)
            if s is None:
                raise RecipeError(f"permutation '{p}' does not move whole heads of {hs.head_dim} features")
            if not hs.within and any(not torch.equal(t, torch.arange(hs.head_dim)) for t in taus):
                raise RecipeError(f"permutation '{p}' permutes features inside heads, which its spec forbids")
            if hs.group in sig and not torch.equal(sig[hs.group][1], s):
                raise RecipeError(
                    f"permutations '{sig[hs.group][0]}' and '{p}' of head group '{hs.group}' move heads differently"
                )
            sig.setdefault(hs.group, (p, s))

    # -- checkpoints ----------------------------------------------------------------------------
    def check_shapes(
        self, shapes: Mapping[str, Sequence[int]], *, where: str = "model", complete: bool = True
    ) -> None:
        """Check a model's tensor shapes against the spec (and, if ``complete``, that it lists them all)."""
        from merge.errors import MissingTensorError

        for name, shape in self.shapes.items():
            if name not in shapes:
                raise MissingTensorError(f"{where}: tensor '{name}' of the permutation spec is missing")
            if tuple(shapes[name]) != shape:
                raise ShapeMismatchError(
                    f"{where}: tensor '{name}' has shape {list(shapes[name])}, the permutation spec expects "
                    f"{list(shape)}"
                )
        if complete:
            extra = [k for k in shapes if k not in self.shapes]
            if extra:
                raise RecipeError(
                    f"{where}: tensor '{sorted(extra)[0]}' is not in the permutation spec ({len(extra)} such "
                    "tensors); list every tensor (axes null where not permuted) so none is silently left out"
                )

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "weightsmith.permutation_spec",
            "version": 1,
            "tensors": {
                k: {
                    "shape": list(self.shapes[k]),
                    "axes": list(v),
                    **({"view": list(self.views[k])} if k in self.views else {}),
                }
                for k, v in self.axes_to_perm.items()
            },
            "heads": {p: hs.to_dict() for p, hs in self.heads.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "permutation spec") -> PermutationSpec:
        if not isinstance(d, Mapping) or d.get("format") != "weightsmith.permutation_spec":
            raise RecipeError(f"{where}: not a weightsmith permutation spec (missing format tag)")
        if d.get("version") != 1:
            raise RecipeError(f"{where}: unsupported permutation spec version {d.get('version')!r}")
        try:
            tensors = d["tensors"]
            return cls(
                {k: v["axes"] for k, v in tensors.items()},
                {k: v["shape"] for k, v in tensors.items()},
                views={k: v["view"] for k, v in tensors.items() if v.get("view") is not None},
                heads={
                    p: HeadStructure(
                        int(h["n_heads"]), int(h["head_dim"]), str(h["group"]), bool(h.get("within", True))
                    )
                    for p, h in d.get("heads", {}).items()
                },
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise RecipeError(f"{where}: malformed permutation spec ({type(e).__name__}: {e})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PermutationSpec:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise RecipeError(f"permutation spec file '{p}' does not exist") from None
        except (OSError, ValueError) as e:
            raise RecipeError(f"permutation spec file '{p}' is not readable JSON: {e}") from None
        return cls.from_dict(d, where=str(p))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PermutationSpec) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"PermutationSpec({len(self.axes_to_perm)} tensors, {len(self.sizes)} permutations, "
            f"{len({h.group for h in self.heads.values()})} head groups)"
        )


def heads_to_flat(sigma: torch.Tensor, taus: Sequence[torch.Tensor], head_dim: int) -> torch.Tensor:
    """``perm[h·d + i] = σ[h]·d + τ_h[i]`` (τ indexed by the *new* head position h)."""
    return torch.cat([sigma[h] * head_dim + taus[h] for h in range(len(taus))]).long()


def flat_to_heads(perm: torch.Tensor, head_dim: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Inverse of :func:`heads_to_flat`; ``(None, [])`` if ``perm`` does not move whole heads."""
    blocks = perm.view(-1, head_dim)
    sigma = blocks[:, 0] // head_dim
    if not bool((blocks // head_dim == sigma[:, None]).all()):
        return None, []
    return sigma, [b % head_dim for b in blocks]
