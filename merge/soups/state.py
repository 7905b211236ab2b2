"""A soup's running state on disk: ``state-<gen>/`` (float64, hashed in the manifest).

An averaging soup keeps Σ_i w_i θ_i of the components that differ between members (updated in place by an
``add``: S + w·θ_new); an OPCM soup keeps S_T, the sum of the projected task vectors
(:mod:`merge.soups.opcm`). :mod:`merge.soups.folder` writes these at each operation and builds from them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merge.checkpoint import Checkpoint, CheckpointWriter, OutputTensor, open_checkpoint, require_finite
from merge.errors import IntegrityError, NonFiniteError
from merge.methods.runner import CHUNK_ELEMS, chunk_grid
from merge.soups import opcm as _opcm
from merge.soups.members import Member, Progress, Verifier, sha256_file


def _differing(members: list[Member]) -> list[str]:
    """Components whose weights differ between members (these are summed; the rest is copied)."""
    if not members:
        return []
    comps = members[0].components
    return sorted(c for c in comps if len({m.components.get(c) for m in members}) > 1)


def _state_name(comp: str, tensor: str) -> str:
    return f"{comp}/{tensor}" if comp else tensor


def _open_state(folder: Path, state: dict[str, Any]) -> Checkpoint:
    d = folder / state["dir"]
    for rel, digest in state["files"].items():
        f = d / rel
        if not f.is_file():
            raise IntegrityError(f"{f}: the soup's running sum is missing (the soup folder was modified)")
        got = sha256_file(f)
        if got != digest:
            raise IntegrityError(
                f"{f}: the soup's running sum has changed (sha256 {got[:12]}..., recorded {digest[:12]}...)"
            )
    return open_checkpoint(d)


def _float_tensors(layout: Any, comps: list[str]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(component, tensor, shape)`` of every floating tensor of ``comps`` in a member's layout."""
    out: list[tuple[str, str, tuple[int, ...]]] = []
    for comp in comps:
        ck = layout.open(comp)
        try:
            out += [(comp, t, ck.shape(t)) for t in ck if ck.dtype(t).is_floating_point]
        finally:
            ck.close()
    return out


class _Opened:
    """Members' components opened on first use (verified), all closed at the end."""

    def __init__(self, ver: Verifier) -> None:
        self.ver = ver
        self.opened: dict[tuple[str, str], Checkpoint] = {}

    def __call__(self, m: Member, comp: str) -> Checkpoint:
        key = (m.id, comp)
        if key not in self.opened:
            self.opened[key] = self.ver.weights(m, comp).open(comp)
        return self.opened[key]

    def close(self) -> None:
        for c in self.opened.values():
            c.close()


def _state_record(folder: Path, dirname: str, summed: list[str]) -> dict[str, Any]:
    """The manifest's record of a written ``state-<gen>/``: its folder, components and file hashes."""
    d = folder / dirname
    return {"dir": dirname, "summed": summed, "files": {f.name: sha256_file(f) for f in sorted(d.iterdir())
                                                        if f.is_file()}}


def _write_state(
    folder: Path,
    gen: int,
    members: list[Member],
    incremental: tuple[list[Member], Member] | None,
    old_state: dict[str, Any] | None,
    ver: Verifier,
    progress: Progress | None,
) -> dict[str, Any] | None:
    """Write ``state-<gen>/`` with Σ_i w_i θ_i (float64) for every component that differs between
    ``members``. With ``incremental = (previous members, new member)``, components already summed
    in ``old_state`` are updated as S + w·θ_new; everything else is summed from scratch, in member order."""
    summed = _differing(members)
    if not summed:
        return None
    old_summed = set(old_state["summed"]) if old_state else set()
    plans = _float_tensors(ver.layout(members[0]), summed)
    outputs = [OutputTensor(_state_name(c, t), s, torch.float64) for c, t, s in plans]
    sums = _open_state(folder, old_state) if incremental is not None and old_state and old_summed else None
    ckpt = _Opened(ver)

    new_member = incremental[1] if incremental else None
    dirname = f"state-{gen:06d}"
    done = 0
    try:
        with CheckpointWriter(
            folder / dirname, outputs, metadata={"weightsmith": "soup running sum"}, what=None
        ) as w:
            for comp, t, shape in plans:
                from_sum = sums is not None and comp in old_summed
                contributors = [new_member] if from_sum else members
                for r0, r1 in chunk_grid(shape, CHUNK_ELEMS):
                    acc = sums.rows(_state_name(comp, t), r0, r1).clone() if from_sum else None
                    for m in contributors:
                        assert m is not None
                        c = ckpt(m, comp)
                        x = c.rows(t, r0, r1).to(torch.float64)
                        if not bool(torch.isfinite(x).all()):
                            raise NonFiniteError(
                                f"{c.path}: tensor '{t}' contains NaN or Inf values (soup member '{m.id}')"
                            )
                        acc = _accumulate(acc, x, m.weight)
                    assert acc is not None
                    w.write_rows(_state_name(comp, t), r0, r1, acc)
                done += 1
                if progress:
                    progress("sum", done, len(plans))
    finally:
        ckpt.close()
        if sums is not None:
            sums.close()
    return _state_record(folder, dirname, summed)


def _write_opcm_state(
    folder: Path,
    gen: int,
    members: list[Member],
    incremental: tuple[list[Member], Member] | None,
    old_state: dict[str, Any] | None,
    ver: Verifier,
    progress: Progress | None,
    base: Member,
    old: dict[str, Any],
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Write ``state-<gen>/`` with OPCM's S_T (float64, every floating tensor of every component) and
    return it with the manifest's ``opcm`` record (alpha, λ_T, ‖S_T‖, one entry per step).

    With ``incremental = (previous members, new member)`` and a previous state, one step from the
    stored S; otherwise OPCM is replayed over ``members`` in order from the base. The replay goes
    tensor by tensor (each tensor's S depends only on its own history; λ only on the per-step
    norms, summed over tensors in the same sorted order as :class:`merge.soups.opcm.ContinualOPCM`),
    so it holds one tensor per member at a time and gives the same bits as the steps one by one."""
    alpha = float(old["alpha"])
    if not members:
        return None, {"alpha": alpha, "lambda": 1.0, "sum_norm": 0.0, "steps": []}
    blayout = ver.layout(base)
    comps = sorted(blayout.components)
    plans = _float_tensors(blayout, comps)
    plans.sort(key=lambda p: _state_name(p[0], p[1]))
    step_from = incremental is not None and old_state is not None
    contributors = [incremental[1]] if step_from and incremental else members
    sums = _open_state(folder, old_state) if step_from and old_state else None
    prev_steps = list(old.get("steps", [])) if step_from else []
    n = len(contributors)
    tau_sq, kept_sq, sum_sq = [0.0] * n, [0.0] * n, [0.0] * n
    ckpt = _Opened(ver)

    outputs = [OutputTensor(_state_name(c, t), s, torch.float64) for c, t, s in plans]
    dirname = f"state-{gen:06d}"
    try:
        with CheckpointWriter(
            folder / dirname, outputs, metadata={"weightsmith": "OPCM soup state (sum of projected task vectors)"},
            what=None,
        ) as w:
            for done, (comp, t, _shape) in enumerate(plans, 1):
                b = require_finite(ckpt(base, comp)[t], f"{ckpt(base, comp).path} (the soup's base)", t)
                prev = sums[_state_name(comp, t)] if sums is not None else None
                for j, m in enumerate(contributors):
                    c = ckpt(m, comp)
                    x = require_finite(c[t], f"{c.path} (soup member '{m.id}')", t)
                    prev, t2, p2, s2 = _opcm.step_tensor(prev, b, x, alpha)
                    tau_sq[j] += t2
                    kept_sq[j] += p2
                    sum_sq[j] += s2
                assert prev is not None
                w.write(_state_name(comp, t), prev)
                if progress:
                    progress("sum", done, len(plans))
    finally:
        ckpt.close()
        if sums is not None:
            sums.close()
    norms = [float(s["task_norm"]) for s in prev_steps]
    steps = list(prev_steps)
    for j, m in enumerate(contributors):
        steps.append(_opcm.step_stats(norms, tau_sq[j], kept_sq[j], sum_sq[j], m.id).to_json())
    state = _state_record(folder, dirname, comps)
    last = steps[-1]
    return state, {"alpha": alpha, "lambda": last["lambda"], "sum_norm": last["sum_norm"], "steps": steps}


def _accumulate(acc: torch.Tensor | None, x: torch.Tensor, weight: float) -> torch.Tensor:
    """acc + w·x in float64, as two separately rounded operations (never a fused multiply-add), so
    that an incremental sum and a from-scratch sum perform the same operations bit for bit."""
    t = x * weight
    return t if acc is None else acc.add_(t)


#: the value of rows r0:r1 of a floating tensor of the built soup, in the given dtype
RowsFn = Callable[[str, int, int, torch.dtype], torch.Tensor]


def _mean_of(sums: Checkpoint | None, comp: str, total: float) -> RowsFn:
    assert sums is not None

    def rows(t: str, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return sums.rows(_state_name(comp, t), r0, r1).div(total).to(dtype)

    return rows


def _opcm_of(sums: Checkpoint, base: Checkpoint, comp: str, lam: float) -> RowsFn:
    def rows(t: str, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return _opcm.merged_tensor(base.rows(t, r0, r1), sums.rows(_state_name(comp, t), r0, r1), lam, dtype)

    return rows
