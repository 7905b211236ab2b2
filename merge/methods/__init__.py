"""Merge methods: one module per algorithm family; importing this package registers them all."""

from merge.methods import linear  # noqa: F401
from merge.methods.registry import (
    MethodSpec,
    PerModel,
    all_methods,
    get_method,
    merge_method,
    whole,
)

__all__ = ["MethodSpec", "PerModel", "all_methods", "get_method", "merge_method", "whole"]
