"""NearSwap, Arcee Fusion, RAM and RAM+ on hand-computed examples, invariants and streaming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from merge.errors import RecipeError
from merge.methods import get_method
from merge.methods.arcee_fusion import arcee_fusion, quantile_positions
from merge.methods.nearswap import nearswap
from merge.methods.ram import RamPlusStats, ram, ramplus_lambdas, ramplus_tl
from merge.methods.runner import merge_tensors

T = torch.tensor


def test_nearswap_hand_example() -> None:
    a = T([0.0, 0.0, 0.0, 1.0])
    b = T([0.5, 2.0, -0.1, 1.0])
    # |a - b| = [0.5, 2, 0.1, 0 (-> 1e-6)]; w = clamp(1 / |a - b|, 0, 1) = [1, 0.5, 1, 1]
    assert torch.allclose(nearswap([b], a, t=1.0), T([0.5, 1.0, -0.1, 1.0]))
    assert torch.equal(nearswap([b], a, t=0.0), a)  # t = 0 keeps the base
    with pytest.raises(RecipeError, match="exactly one other model"):
        nearswap([a, b], a, t=1.0)


def _fusion_reference(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The method's definition on a whole tensor, with sorted quantiles (no streaming)."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    imp = (other - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    srt = imp.reshape(-1).sort().values
    q1, med, q3 = (srt[i] for i in quantile_positions(imp.numel()))
    return base + (other - base) * (imp >= med + 1.5 * (q3 - q1)).float()


def test_arcee_fusion_keeps_only_outlying_importance() -> None:
    base = torch.zeros(2, 4)
    other = T([[0.0, 0.0, 0.0, 4.0], [0.1, 0.0, 0.0, 0.0]])
    # importance = |Δ| · KL(row): six of eight entries are 0, so Q1 = median = Q3 = 0 (positions 1, 3, 5 of
    # the sorted 8) and the cut is 0: every entry passes (importance >= 0), as in mergekit
    assert torch.equal(arcee_fusion([other], base), other)
    # a row that changes a lot against rows that barely change: its entries are the outliers
    other = torch.full((4, 4), 0.01) * torch.arange(1, 17, dtype=torch.float32).reshape(4, 4) / 16
    other[0] = T([0.01, 0.02, 0.03, 4.0])
    out = arcee_fusion([other], torch.zeros(4, 4))
    assert torch.equal(out[0], other[0]) and torch.equal(out[1:], torch.zeros(3, 4))
    g = torch.Generator().manual_seed(0)
    b = torch.randn(50, 30, generator=g)
    o = b + torch.randn(50, 30, generator=g) * torch.rand(50, 1, generator=g)
    out = arcee_fusion([o], b)
    assert torch.equal(out, _fusion_reference(o, b))
    kept = (out != b).float().mean().item()
    assert 0 < kept < 0.25  # an outlier cut keeps a minority of the entries


def test_arcee_fusion_quantiles_and_negative_importance() -> None:
    assert quantile_positions(5) == [1, 2, 3] and quantile_positions(4) == [0, 1, 2]
    # 1-D tensors are one row; a tensor equal to the base has zero importance everywhere
    x = torch.randn(64)
    assert torch.equal(arcee_fusion([x], x), x)
    y = torch.randn(64)
    assert torch.equal(arcee_fusion([y], x), _fusion_reference(y, x))


@pytest.mark.parametrize("shape", [(41, 13), (120,), (6, 5, 7), ()], ids=str)
def test_arcee_fusion_chunked_equals_whole(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    b = torch.randn(shape, generator=g)
    o = b + torch.randn(shape, generator=g) * 0.3
    spec = get_method("arcee_fusion")
    whole = arcee_fusion([o], b)
    for ce in (5, 16, 50):
        assert torch.equal(merge_tensors(spec, [o], b, {}, chunk_elems=ce), whole)


def test_ram_hand_example() -> None:
    base = T([1.0, 1.0, 1.0, 1.0])
    t1 = base + T([1e-6, 0.5, 0.3, 0.0])
    t2 = base + T([0.2, 0.5, -0.1, 0.0])
    # entry 0: only model 2 changed it (|1e-6| <= ε): 0.2; entries 1, 2: both: the mean; entry 3: nobody
    out = ram([t1, t2], base, epsilon=1e-5)
    assert torch.allclose(out, base + T([0.2, 0.5, 0.1, 0.0]))
    assert torch.equal(ram([], base), base)


def test_ramplus_lambdas_and_hand_example() -> None:
    base = torch.zeros(4)
    t1 = T([1e-6, 0.5, 0.3, 0.0])
    t2 = T([0.2, 0.5, -0.1, 0.0])
    # model 1: 2 shared, 0 unique -> ρ = 2/ε, clamped to α; model 2: 2 shared, 1 unique -> ρ = 2 -> α
    lam = ramplus_lambdas(RamPlusStats((2, 2), (0, 1)), r=0.1, alpha=0.2, epsilon=1e-5)
    assert torch.allclose(torch.stack(lam), T([1.02, 1.02]))
    lam = ramplus_lambdas(RamPlusStats((1, 0), (4, 3)), r=0.5, alpha=1.0, epsilon=1e-5)
    assert torch.allclose(torch.stack(lam), T([1 + 0.5 * 0.25, 1.0]))
    out = ramplus_tl([t1, t2], base, r=0.1, alpha=0.2, epsilon=1e-5)
    assert torch.allclose(out, T([0.2 * 1.02, 0.5, 0.1, 0.0]))
    # r = 0 is plain RAM
    assert torch.equal(ramplus_tl([t1, t2], base, r=0.0), ram([t1, t2], base))


CASES = [
    ("ram", {"epsilon": 0.02}, 3),
    ("ramplus_tl", {"epsilon": 0.02, "r": 0.3, "alpha": 0.5}, 3),
    ("nearswap", {"t": 0.01}, 1),
]


@pytest.mark.parametrize("shape", [(41, 13), (120,), (6, 5, 7), ()], ids=str)
@pytest.mark.parametrize("name,params,n", CASES, ids=[c[0] for c in CASES])
def test_chunked_equals_whole(name: str, params: dict, n: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(n + len(shape))
    base = torch.randn(shape, generator=g)
    ms = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]
    spec = get_method(name)
    whole = spec.fn(ms, base, **params)
    for ce in (5, 16, 50):
        assert torch.equal(merge_tensors(spec, ms, base, params, chunk_elems=ce), whole)
