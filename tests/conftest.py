"""Shared fixtures: small real safetensors checkpoints built on the fly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from testkit.checkpoints import llama_like, tree_digest, write_checkpoint  # noqa: F401 (tests import them from here)


@pytest.fixture
def make_models(tmp_path: Path) -> Callable[..., list[Path]]:
    """``make_models(n, shards=1, dtype=...)`` -> [base, ft1, ..., ft(n-1)] folders."""

    def make(n: int = 3, *, shards: int = 1, dtype: torch.dtype = torch.float32, **kw) -> list[Path]:
        base = llama_like(0, dtype=dtype, **kw)
        paths = [write_checkpoint(tmp_path / "base", base, shards=shards)]
        for i in range(1, n):
            paths.append(write_checkpoint(tmp_path / f"ft{i}", llama_like(i, base=base, dtype=dtype, **kw),
                                          shards=shards))
        return paths

    return make


@pytest.fixture
def digest() -> Callable[[Path], str]:
    return tree_digest
