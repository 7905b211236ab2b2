"""Karcher mean, Multi-SLERP and NuSLERP on hand-computed examples and against whole-tensor float64 forms."""

from __future__ import annotations

import math

import pytest
import torch

from merge.errors import RecipeError
from merge.methods import get_method
from merge.methods.runner import merge_tensors
from merge.methods.sphere import karcher, karcher_coefficients, multislerp, nuslerp

T = torch.tensor
S = 1 / math.sqrt(2)


def test_karcher_of_orthogonal_vectors_is_the_scaled_midpoint() -> None:
    e1, e2 = T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0])
    assert torch.allclose(karcher([e1, e2], None), T([S, S, 0.0]), atol=1e-6)
    # norms 2 and 4: same direction (the midpoint), mean norm 3
    assert torch.allclose(karcher([2 * e1, 4 * e2], None), 3 * T([S, S, 0.0]), atol=1e-5)
    # the same direction three times: that direction times the mean norm
    v = T([0.6, 0.8, 0.0])
    assert torch.allclose(karcher([v, 2 * v, 3 * v], None), 2 * v, atol=1e-6)


def test_karcher_edges() -> None:
    x = T([1.0, 2.0])
    assert karcher([x], None) is x
    assert torch.equal(karcher([torch.zeros(2), torch.zeros(2)], None), torch.zeros(2))
    # a zero input only enters the scale: direction of the others, scaled by (0 + 1 + 1) / 3
    out = karcher([torch.zeros(2), T([1.0, 0.0]), T([0.0, 1.0])], None)
    assert torch.allclose(out, (2 / 3) * T([S, S]), atol=1e-6)


def _karcher64(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The iteration written out on whole float64 tensors."""
    xs = [x.double().reshape(-1) for x in xs]
    norms = [x.norm() for x in xs]
    us = [x / n for x, n in zip(xs, norms, strict=True)]
    a = 1 / len(xs)
    mean = sum(a * u for u in us)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        t = torch.zeros_like(mean)
        for u in us:
            d = torch.clamp(mean @ u, -1, 1)
            th = torch.arccos(d)
            if th >= tol:
                t += a * th / torch.sin(th) * (u - d * mean)
        if t.norm() < tol:
            break
        mean = torch.cos(t.norm()) * mean + torch.sin(t.norm()) * t / t.norm()
        mean = mean / mean.norm()
    return sum(norms) / len(xs) * mean


def test_karcher_gram_form_equals_the_iteration_on_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(30, 20, generator=g) + 2 for _ in range(4)]
    exp = _karcher64(xs).reshape(30, 20)
    out = karcher(xs, None)
    assert torch.allclose(out.double(), exp, rtol=1e-5, atol=1e-6)
    # and it is a fixed point: the tangent (Riemannian gradient) at the result vanishes
    m = exp.reshape(-1) / exp.norm()
    grad = sum((u := x.double().reshape(-1) / x.double().norm()) - (m @ u) * m for x in xs)
    assert grad.norm() < 1e-3
    c = karcher_coefficients(torch.eye(3), max_iter=50)  # orthonormal inputs: symmetric coefficients
    assert max(c) - min(c) < 1e-12


def test_multislerp_hand_examples() -> None:
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    w = [0.5, 0.5]
    assert torch.allclose(multislerp([e1, e2], None, weight=w), T([S, S]), atol=1e-6)
    # weights normalised: 1 and 3 -> 0.25, 0.75; the result lies on the sphere of the mean norm
    out = multislerp([e1, e2], None, weight=[1.0, 3.0])
    exp = T([0.25, 0.75]) / T([0.25, 0.75]).norm()
    assert torch.allclose(out, exp, atol=1e-6)
    # with a base: the same on the task vectors, the base added back
    base = T([10.0, -3.0])
    assert torch.allclose(multislerp([base + e1, base + e2], base, weight=w), base + T([S, S]), atol=1e-5)
    # antipodal pair with equal weights: falls back to the weighted sum; three such inputs raise
    assert torch.allclose(multislerp([e1, -e1], None, weight=w), T([0.0, 0.0]))
    with pytest.raises(RecipeError, match="weighted sum of the unit task vectors is zero"):
        multislerp([e1, -e1, e2 * 0], None, weight=[1.0, 1.0, 1.0])
    x = T([3.0, 4.0])
    assert multislerp([x], None, weight=[2.0]) is x


def test_nuslerp_hand_examples() -> None:
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    # t = w1 / (w0 + w1) = 0.5 between orthogonal unit vectors: sin(π/4)/sin(π/2) each
    assert torch.allclose(nuslerp([e1, e2], None, weight=[1.0, 1.0]), T([S, S]), atol=1e-6)
    # t = 0.75: c0 = sin(π/8), c1 = sin(3π/8)
    out = nuslerp([e1, e2], None, weight=[1.0, 3.0])
    assert torch.allclose(out, T([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]), atol=1e-6)
    # colinear inputs interpolate linearly; zero weights give t = 0.5
    assert torch.allclose(nuslerp([e1, 3 * e1], None, weight=[1.0, 1.0]), 2 * e1)
    assert torch.allclose(nuslerp([e1, e2], None, weight=[0.0, 0.0]), T([S, S]), atol=1e-6)
    # with a base: slerp of the task vectors
    base = T([5.0, 5.0])
    assert torch.allclose(
        nuslerp([base + e1, base + e2], base, weight=[1.0, 1.0]), base + T([S, S]), atol=1e-5
    )


def test_nuslerp_per_row_and_per_column() -> None:
    a = T([[1.0, 0.0], [1.0, 0.0]])
    b = T([[0.0, 1.0], [2.0, 0.0]])  # row 0 orthogonal, row 1 colinear
    rows = nuslerp([a, b], None, weight=[1.0, 1.0], nuslerp_flatten=False)
    assert torch.allclose(rows, T([[S, S], [1.5, 0.0]]), atol=1e-6)
    # row-wise: vectors along dim 0 (columns): column 0 is (1,1) vs (0,2), column 1 (0,0) vs (1,0)
    cols = nuslerp([a, b], None, weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    for j in range(2):
        assert torch.allclose(cols[:, j], nuslerp([a[:, j], b[:, j]], None, weight=[1.0, 1.0]), atol=1e-6)
    with pytest.raises(RecipeError, match="exactly 2 models"):
        nuslerp([a], None, weight=[1.0])


CASES = [
    ("karcher", {}, 3, False),
    ("karcher", {"max_iter": 3, "tol": 1e-3}, 2, False),
    ("multislerp", {"weight": [0.5, 0.3, 0.2]}, 3, True),
    ("multislerp", {"weight": [1.0, 2.0, 0.5], "normalize_weights": False}, 3, False),
    ("nuslerp", {"weight": [0.3, 0.7]}, 2, True),
    ("nuslerp", {"weight": [0.3, 0.7], "nuslerp_flatten": False}, 2, True),
    ("nuslerp", {"weight": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, False),
]


@pytest.mark.parametrize("shape", [(41, 13), (120,), (6, 5, 7), ()], ids=str)
@pytest.mark.parametrize("name,params,n,with_base", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_chunked_equals_whole(
    name: str, params: dict, n: int, with_base: bool, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(len(shape) + n)
    base = torch.randn(shape, generator=g)
    ms = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    spec = get_method(name)
    b = base if with_base else None
    whole = spec.fn(ms, b, **params)
    for ce in (5, 16, 50):
        assert torch.equal(merge_tensors(spec, ms, b, params, chunk_elems=ce), whole), (shape, ce)
