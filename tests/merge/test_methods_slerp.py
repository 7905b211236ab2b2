"""SLERP: endpoints, hand-computed angles, the (anti)parallel fallback, tiny norms."""

from __future__ import annotations

import math

import pytest
import torch

from merge.errors import RecipeError
from merge.methods.slerp import SlerpStats, slerp, slerp_coefficients

T = torch.tensor


def _reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Direct float64 evaluation of the slerp formula on the flattened tensors."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    cos = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    om = math.acos(max(-1.0, min(1.0, cos)))
    out = (math.sin((1 - t) * om) * a64 + math.sin(t * om) * b64) / math.sin(om)
    return out.reshape(a.shape)


def test_endpoints_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 9, generator=g), torch.randn(7, 9, generator=g)
    assert torch.equal(slerp([b], a, t=0.0), a)
    assert torch.equal(slerp([b], a, t=1.0), b)


def test_orthogonal_vectors_by_hand() -> None:
    # Ω = π/2, t = 1/2: both coefficients sin(π/4)/sin(π/2) = √2/2, applied to the raw vectors
    out = slerp([T([0.0, 3.0])], T([2.0, 0.0]), t=0.5)
    assert torch.allclose(out, T([math.sqrt(2), 1.5 * math.sqrt(2)]), rtol=1e-6)
    # Ω = π/3 (cos 1/2), t = 1/2: coefficients sin(π/6)/sin(π/3) = 1/√3
    a, b = T([1.0, 0.0]), T([0.5, math.sqrt(3) / 2])
    out = slerp([b], a, t=0.5)
    assert torch.allclose(out, (a + b) / math.sqrt(3), rtol=1e-6)
    assert torch.allclose(out.norm(), torch.tensor(1.0), rtol=1e-6)  # stays on the unit circle


@pytest.mark.parametrize("t", [0.1, 0.5, 0.77, 1.3])
def test_random_against_float64_formula(t: float) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(33, 17, generator=g), torch.randn(33, 17, generator=g)
    assert torch.allclose(slerp([b], a, t=t), _reference(a, b, t).float(), rtol=1e-5, atol=1e-6)


def test_parallel_and_antiparallel_fall_back_to_lerp() -> None:
    a = T([1.0, -2.0, 0.5, 3.0])
    for b in (2.5 * a, -0.5 * a, a + 1e-4):
        assert torch.allclose(slerp([b], a, t=0.3), 0.7 * a + 0.3 * b, rtol=1e-6, atol=1e-7)
    # the threshold: |cos| > 0.9995 is linear, below it spherical
    c0, c1 = slerp_coefficients(0.3, SlerpStats(1.0, 1.0, 0.99951, 4))
    assert (c0, c1) == (0.7, 0.3)
    c0, c1 = slerp_coefficients(0.3, SlerpStats(1.0, 1.0, 0.9994, 4))
    om = math.acos(0.9994)
    assert c0 == pytest.approx(math.sin(0.7 * om) / math.sin(om)) and c0 != 0.7


def test_tiny_norm_counts_as_one() -> None:
    # ‖θ_0‖ <= 1e-8 is replaced by 1, so cos ≈ 0 and the spherical weights apply (mergekit's eps)
    a, b = torch.zeros(3), T([0.0, 1.0, 0.0])
    out = slerp([b], a, t=0.5)
    assert torch.allclose(out, b * math.sin(math.pi / 4), rtol=1e-6)
    # empty tensors interpolate linearly
    assert slerp([torch.zeros(0, 3)], torch.zeros(0, 3), t=0.5).shape == (0, 3)


def test_needs_base_and_one_model() -> None:
    x = torch.ones(2)
    with pytest.raises(RecipeError, match="exactly one other model"):
        slerp([x, x], x, t=0.5)
    with pytest.raises(RecipeError, match="base_model"):
        slerp([x], None, t=0.5)
