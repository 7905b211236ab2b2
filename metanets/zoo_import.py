"""A model zoo made from checkpoints one already has (the metanet then trains on it as on a built zoo).

:func:`import_zoo` writes the layout :func:`metanets.zoo.build_zoo` writes (``zoo.json``, ``specs/``,
``models/``, ``runs/``, ``index.jsonl``; every model file with its sha256), so :class:`~metanets.zoo.Zoo`,
:meth:`~metanets.zoo.Zoo.split`, :class:`~metanets.zoo.ZooDataset` and
:func:`metanets.train.train_metanet` read it unchanged. Each entry is ``(state_dict, metadata)``: the
state dict (or the path of a local checkpoint) and a JSON mapping with at least ``test_acc``. All entries
share one architecture (the same tensor names and shapes), whose PermutationSpec is given or inferred from
the names and shapes (:func:`merge.symmetry.resolve_spec` with ``from_names``, as ``metanets.train.predict``
infers one for a bare state dict). The zoo is written under a temporary name and renamed into place
(:func:`merge.atomic.atomic_output`): an error anywhere (a bad entry, a failing iterator) leaves nothing at
``out``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from merge.atomic import atomic_output
from merge.checkpoint import require_finite
from merge.errors import InvalidArgumentError, ShapeMismatchError
from merge.symmetry import PermutationSpec
from metanets.zoo import FORMAT, Zoo

__all__ = ["RESERVED_FIELDS", "import_zoo"]

#: record fields the importer writes itself; metadata may not set them
RESERVED_FIELDS = ("id", "file", "sha256", "arch_id", "n_params")


def _entry_id(i: int) -> str:
    return f"m{i:05d}"


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def _read_state(state: Any, where: str) -> dict[str, torch.Tensor]:
    """The entry's tensors on the CPU, contiguous and unshared (what safetensors writes); NaN/Inf refused."""
    if isinstance(state, str | Path):
        from merge.checkpoint import open_checkpoint

        ck = open_checkpoint(state)
        try:
            return _read_state(dict(ck.items()), f"{where} ('{state}')")
        finally:
            ck.close()
    if not isinstance(state, Mapping) or not state:
        raise InvalidArgumentError(f"{where}: the state dict must be a non-empty mapping of names to tensors")
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InvalidArgumentError(f"{where}: '{k}' is not a tensor (a state dict maps names to tensors)")
        out[k] = require_finite(v.detach().to("cpu").contiguous().clone(), where, k)
    return out


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def _check_same_architecture(shapes: Mapping[str, list[int]], ref: Mapping[str, list[int]], where: str) -> None:
    for k in ref:
        if k not in shapes:
            raise ShapeMismatchError(
                f"{where}: lacks tensor '{k}' that entry 0 has (all entries share one architecture)"
            )
    for k, s in shapes.items():
        if k not in ref:
            raise ShapeMismatchError(
                f"{where}: has tensor '{k}' that entry 0 lacks (all entries share one architecture)"
            )
        if s != ref[k]:
            raise ShapeMismatchError(
                f"{where}: tensor '{k}' has shape {s}, entry 0 has {ref[k]} (all entries share one architecture)"
            )


def _record(i: int, meta: Any, where: str) -> dict[str, Any]:
    """The entry's record (without file, sha256, arch_id and n_params); metadata checked."""
    if not isinstance(meta, Mapping):
        raise InvalidArgumentError(f"{where}: metadata must be a mapping with at least 'test_acc'")
    meta = dict(meta)
    bad = sorted(set(meta) & set(RESERVED_FIELDS))
    if bad:
        raise InvalidArgumentError(f"{where}: metadata may not set {bad} (the importer writes {list(RESERVED_FIELDS)})")
    acc = meta.get("test_acc")
    if isinstance(acc, bool) or not isinstance(acc, int | float) or not math.isfinite(acc) or not 0.0 <= acc <= 1.0:
        raise InvalidArgumentError(f"{where}: metadata needs 'test_acc', a number in [0, 1]; got {acc!r}")
    for key in ("run", "epoch"):
        v = meta.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidArgumentError(f"{where}: '{key}' must be a non-negative integer, got {v!r}")
    if not isinstance(meta.get("task", ""), str):
        raise InvalidArgumentError(f"{where}: 'task' must be a string, got {meta['task']!r}")
    for key in ("arch", "hparams"):
        if not isinstance(meta.get(key, {}), Mapping):
            raise InvalidArgumentError(f"{where}: '{key}' must be a mapping, got {meta[key]!r}")
    run = meta.pop("run", i)
    epoch = meta.pop("epoch", 0)
    rec: dict[str, Any] = {
        "id": _entry_id(i),
        "run": run,
        "epoch": epoch,
        "task": meta.pop("task", "imported"),
        "arch": {"kind": "imported", **dict(meta.pop("arch", {}))},
        "hparams": dict(meta.pop("hparams", {})),
        "seed": meta.pop("seed", None),
        "test_acc": float(meta.pop("test_acc")),
        "diverged": bool(meta.pop("diverged", False)),
        "lineage": meta.pop("lineage", {"run": run, "epoch": epoch, "previous": None}),
        **meta,  # the rest as given (train_acc, test_loss, a trial number...)
    }
    try:
        json.dumps(rec, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{where}: metadata is not plain JSON ({e})") from None
    return rec


def import_zoo(
    out: str | Path,
    entries: Iterable[tuple[Any, Mapping[str, Any]]],
    *,
    name: str,
    spec: PermutationSpec | str | Path | None = None,
    overwrite: bool = False,
) -> Zoo:
    """Write the zoo of ``entries`` to ``out`` and return it (read back, hash-checked).

    ``entries`` yields ``(state_dict, metadata)`` and is read once, one entry at a time (only one state dict
    is held). The state dict may be the path of a local checkpoint instead. ``metadata`` needs ``test_acc``
    (a number in [0, 1]); optional: ``task`` (default ``"imported"``), ``run`` (the group that splits keep
    together; default the entry's index), ``epoch`` (default 0), ``hparams`` and ``arch`` (mappings; ``arch``
    defaults to ``{"kind": "imported"}``), ``seed``, ``lineage``, and any other JSON fields, which the
    records keep as they are (``TrainConfig(target=..., where=...)`` can use them). ``id``, ``file``,
    ``sha256``, ``arch_id`` and ``n_params`` are the importer's.

    Every entry must have entry 0's tensor names and shapes (else :class:`ShapeMismatchError` naming the
    entry and the tensor); NaN/Inf weights are refused (:class:`NonFiniteError` naming the entry and the
    tensor). ``spec``: the PermutationSpec (or the path of one saved as JSON), checked against the shapes;
    by default inferred from the names and shapes (:func:`merge.symmetry.auto_spec`: a Linear/Conv chain
    with norms, or a ResNet). An existing ``out`` is refused unless ``overwrite`` (which replaces only a
    previous weightsmith output). Nothing appears at ``out`` unless every entry was written.
    """
    from safetensors.torch import save

    from merge.symmetry import resolve_spec

    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError("import_zoo: name must be a non-empty string")
    with atomic_output(out, overwrite=overwrite, what="zoo import") as tmp:
        (tmp / "models").mkdir()
        (tmp / "runs").mkdir()
        (tmp / "specs").mkdir()
        records: list[dict[str, Any]] = []
        ref: dict[str, list[int]] | None = None
        aid = ""
        for i, entry in enumerate(entries):
            where = f"zoo import entry {i}"
            if not isinstance(entry, tuple | list) or len(entry) != 2:
                raise InvalidArgumentError(f"{where}: an entry is a pair (state_dict, metadata)")
            rec = _record(i, entry[1], where)
            state = _read_state(entry[0], where)
            shapes = _shapes(state)
            if ref is None:
                ref = shapes
                the_spec = resolve_spec(state, spec=spec, from_names=True, where=where, what="import_zoo")
                geometry = json.dumps({k: shapes[k] for k in sorted(shapes)}).encode()
                aid = "imported-" + hashlib.sha256(geometry).hexdigest()[:12]
                (tmp / "specs" / f"{aid}.json").write_bytes(
                    _json_bytes({"arch": {"kind": "imported", "tensors": shapes}, "spec": the_spec.to_dict()})
                )
            else:
                _check_same_architecture(shapes, ref, where)
            rec["arch_id"] = aid
            rec["n_params"] = sum(v.numel() for v in state.values() if v.is_floating_point())
            blob = save(state, metadata={FORMAT: json.dumps(rec, sort_keys=True)})
            rec["file"] = f"models/{rec['id']}.safetensors"
            rec["sha256"] = hashlib.sha256(blob).hexdigest()
            (tmp / rec["file"]).write_bytes(blob)
            records.append(rec)
            del state
        if not records:
            raise InvalidArgumentError("import_zoo: no entries (a zoo needs at least one model)")
        by_run: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            by_run.setdefault(r["run"], []).append(r)
        for run, recs in by_run.items():
            (tmp / "runs" / f"r{run:05d}.json").write_bytes(_json_bytes(recs))
        lines = [json.dumps(r, sort_keys=True) for r in records]
        (tmp / "index.jsonl").write_bytes(("\n".join(lines) + "\n").encode())
        (tmp / "zoo.json").write_bytes(
            _json_bytes(
                {
                    "format": FORMAT,
                    "version": 1,
                    "config": {"name": name, "source": "import", "runs": len(by_run)},
                    "imported": True,
                    "complete": True,
                    "runs": len(by_run),
                    "models": len(records),
                    "architectures": 1,
                }
            )
        )
    return Zoo(out)
