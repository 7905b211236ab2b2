"""Every arithmetic method: streamed in row chunks by the runner == called on whole tensors.

Also the registered contract (names, parameters and defaults as in mergekit 0.1.5) and passthrough.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from merge.methods import get_method
from merge.methods.passthrough import passthrough
from merge.methods.runner import chunk_grid, merge_tensors


def _inputs(shape: tuple[int, ...], n: int, seed: int, bf16: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    ms = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]
    if bf16:  # tie-heavy task vectors, as from bf16 checkpoints
        base = base.bfloat16().float()
        ms = [m.bfloat16().float() for m in ms]
    return ms, base


W = [1.0, 0.5, -0.3]
CASES: list[tuple[str, dict[str, Any]]] = [
    ("task_arithmetic", {"weight": W, "lambda_": 0.7}),
    ("ties", {"weight": W, "density": [0.3, 0.5, 0.9]}),
    ("ties", {"weight": W, "density": [0.2, 1.0, 0.0], "rescale": True, "lambda_": 0.5}),
    ("breadcrumbs", {"weight": W, "density": [0.3, 0.5, 0.9], "gamma": [0.01, 0.1, 0.05]}),
    ("breadcrumbs_ties", {"weight": W, "density": [0.6, 0.5, 0.7], "gamma": [0.3, 0.1, 0.05],
                          "normalize": True, "rescale": True}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("slerp", {"t": 0.35}),
    ("passthrough", {"scale": [0.5]}),
    ("consensus_ta", {"tall_lambda": [0.2, 0.4, 0.6], "k": 2, "lambda_": 0.8}),
    ("tall_mask", {"task": 1, "tall_lambda": 0.3}),
]
SHAPES = [(41, 13), (120,), (6, 5, 7), ()]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_chunked_equals_whole(name: str, params: dict[str, Any], shape: tuple[int, ...], bf16: bool) -> None:
    spec = get_method(name)
    n = {"slerp": 1, "passthrough": 1}.get(name, 3)
    ms, base = _inputs(shape, n, seed=len(name) + len(shape), bf16=bf16)
    b = None if spec.base == "ignored" else base
    whole = spec.fn(ms, b, **params)
    for chunk_elems in (5, 16, 50):
        if shape:
            assert len(chunk_grid(shape, chunk_elems)) > 1
        out = merge_tensors(spec, ms, b, params, chunk_elems=chunk_elems)
        assert torch.equal(out, whole), (name, shape, chunk_elems, (out - whole).abs().max())


def test_stats_methods_declare_stats_and_elementwise_ones_do_not() -> None:
    for name in ("ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock", "della", "della_linear", "sce",
                 "karcher", "multislerp", "nuslerp", "arcee_fusion", "ramplus_tl"):
        spec = get_method(name)
        assert spec.stats is not None and not spec.elementwise
    for name in ("task_arithmetic", "dare_linear", "dare_ties", "passthrough", "nearswap", "ram"):
        spec = get_method(name)
        assert spec.elementwise and spec.stats is None
    assert get_method("dare_ties").randomized and get_method("dare_linear").randomized
    assert not get_method("ties").randomized
    assert get_method("della").randomized and get_method("della_linear").randomized


# mergekit 0.1.5's parameter names and defaults for these methods (mergekit's `weight` is required;
# ours defaults to 1.0)
MERGEKIT_PARAMS = {
    "task_arithmetic": {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0,
                        "weight": 1.0, "density": 1.0},
    "ties": {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0, "weight": 1.0,
             "density": 1.0},
    "dare_linear": {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0, "weight": 1.0,
                    "density": 1.0},
    "dare_ties": {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0, "weight": 1.0,
                  "density": 1.0},
    "breadcrumbs": {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0, "weight": 1.0,
                    "density": 1.0, "gamma": 0.01},
    "breadcrumbs_ties": {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0,
                         "weight": 1.0, "density": 1.0, "gamma": 0.01},
    "model_stock": {"filter_wise": False},
    "slerp": {"t": None},
    "passthrough": {"scale": None},
    # the methods added for issue 15 (mergekit's `weight` of multislerp / nuslerp is required, as here)
    "della": {"int8_mask": False, "normalize": True, "rescale": True, "lambda": 1.0, "weight": 1.0,
              "density": 1.0, "epsilon": 0.15},
    "della_linear": {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0, "weight": 1.0,
                     "density": 1.0, "epsilon": 0.15},
    "sce": {"int8_mask": False, "select_topk": 1.0},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "multislerp": {"weight": None, "normalize_weights": True, "eps": 1e-8},
    "nuslerp": {"weight": None, "nuslerp_row_wise": False, "nuslerp_flatten": True},
    "nearswap": {"t": None},
    "arcee_fusion": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}
PER_MODEL = {"weight", "density", "gamma", "scale"}
PER_MODEL_OF = {"della": PER_MODEL | {"epsilon"}, "della_linear": PER_MODEL | {"epsilon"}}
INPUTS = {  # base policy, min models, max models (besides the base)
    "task_arithmetic": ("required", 1, None), "ties": ("required", 1, None),
    "dare_linear": ("required", 1, None), "dare_ties": ("required", 1, None),
    "breadcrumbs": ("required", 1, None), "breadcrumbs_ties": ("required", 1, None),
    "model_stock": ("required", 2, None), "slerp": ("required", 1, 1), "passthrough": ("ignored", 1, 1),
    "della": ("required", 1, None), "della_linear": ("required", 1, None), "sce": ("required", 1, None),
    "karcher": ("ignored", 1, None), "multislerp": ("optional", 1, None), "nuslerp": ("optional", 2, 2),
    "nearswap": ("required", 1, 1), "arcee_fusion": ("required", 1, 1), "ram": ("required", 1, None),
    "ramplus_tl": ("required", 1, None),
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_PARAMS))
def test_parameters_match_mergekit(name: str) -> None:
    spec = get_method(name)
    got = {p.name: (None if p.required else p.default) for p in spec.params.values()}
    assert got == MERGEKIT_PARAMS[name]
    assert {p.name for p in spec.params.values() if p.per_model} == PER_MODEL_OF.get(name, PER_MODEL) & set(got)
    assert (spec.base, spec.min_models, spec.max_models) == INPUTS[name]
    assert spec.paper and spec.url.startswith("https://")
    spec.json_schema()  # the pydantic schema builds


def test_passthrough() -> None:
    x = torch.randn(4, 3)
    assert passthrough([x], None) is x
    assert torch.equal(passthrough([x], None, scale=[None]), x)
    assert torch.equal(passthrough([x], None, scale=[2.0]), 2 * x)
    assert torch.equal(passthrough([x], None, scale=0.5), 0.5 * x)
