"""Model Stock against hand computations of t = k cos / ((k − 1) cos + 1)."""

from __future__ import annotations

import math

import pytest
import torch

from merge.errors import RecipeError
from merge.methods.model_stock import model_stock

T = torch.tensor


def test_two_models_at_45_degrees() -> None:
    base = T([1.0, 1.0])
    ms = [base + T([1.0, 0.0]), base + T([1.0, 1.0])]
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)  # ≈ 0.8284
    avg = (ms[0] + ms[1]) / 2
    expected = t * avg + (1 - t) * base
    assert torch.allclose(model_stock(ms, base), expected, rtol=1e-6)


def test_three_models_mean_pairwise_cosine() -> None:
    base = torch.zeros(3)
    taus = [T([1.0, 0.0, 0.0]), T([1.0, 1.0, 0.0]), T([0.0, 0.0, 2.0])]
    # pairwise cosines: 1/√2, 0, 0 → mean 1/(3√2); t = 3c / (2c + 1)
    c = 1 / (3 * math.sqrt(2))
    t = 3 * c / (2 * c + 1)
    expected = t * sum(taus) / 3
    assert torch.allclose(model_stock([base + x for x in taus], base), expected, rtol=1e-6)


def test_limits() -> None:
    base = T([0.5, -1.0, 2.0])
    # orthogonal task vectors: cos = 0 → t = 0 → the base
    ms = [base + T([1.0, 0.0, 0.0]), base + T([0.0, 2.0, 0.0]), base + T([0.0, 0.0, 3.0])]
    assert torch.allclose(model_stock(ms, base), base)
    # identical task vectors: cos = 1 → t = 1 → their average
    ms = [base + T([1.0, 2.0, 3.0])] * 3
    assert torch.allclose(model_stock(ms, base), ms[0], rtol=1e-6)
    # opposite task vectors, k = 2: 1 + (k−1) cos = 0 → singular → the base is kept
    ms = [base + T([1.0, 0.0, 0.0]), base - T([1.0, 0.0, 0.0])]
    assert torch.equal(model_stock(ms, base), base)


def test_filter_wise_one_ratio_per_row() -> None:
    base = torch.zeros(2, 2)
    # row 0: identical offsets (cos 1 → average); row 1: orthogonal offsets (cos 0 → base)
    ms = [T([[1.0, 2.0], [1.0, 0.0]]), T([[1.0, 2.0], [0.0, 1.0]])]
    out = model_stock(ms, base, filter_wise=True)
    assert torch.allclose(out, T([[1.0, 2.0], [0.0, 0.0]]), atol=1e-6)
    # per tensor, the mean cosine mixes the rows: cos = 5/6 over the flattened offsets
    cos = 5 / 6
    t = 2 * cos / (1 + cos)
    assert torch.allclose(model_stock(ms, base), t * (ms[0] + ms[1]) / 2, rtol=1e-6)
    # a 1-D tensor is a single filter: filter-wise equals per tensor
    v = [T([1.0, 0.0, 1.0]), T([1.0, 1.0, 0.0])]
    assert torch.allclose(model_stock(v, torch.zeros(3), filter_wise=True), model_stock(v, torch.zeros(3)))


def test_needs_two_models_and_a_base() -> None:
    x = torch.ones(2)
    with pytest.raises(RecipeError, match="at least 2 models"):
        model_stock([x], x)
    with pytest.raises(RecipeError, match="base_model"):
        model_stock([x, x], None)
