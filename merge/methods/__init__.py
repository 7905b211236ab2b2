"""Merge methods: one module per algorithm family; importing this package registers them all.

Every module in this package that is not private (no leading underscore) and is not the registry
or runner is imported here, so adding a method is adding one file.
"""

import copyreg
import importlib
import pkgutil

from merge.methods.registry import MethodSpec, PerModel, all_registered, merge_method, registered, whole

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name not in {"registry", "runner"}:
        importlib.import_module(f"{__name__}.{_m.name}")


def get_method(name: str) -> MethodSpec:
    """The merge method ``name`` (every built-in is registered by importing this package)."""
    return registered(name)


def all_methods() -> list[MethodSpec]:
    """Every registered merge method, by name."""
    return all_registered()


def _pickle_by_name(spec: MethodSpec) -> tuple[object, tuple[str]]:
    return get_method, (spec.name,)


# A method is pickled by its registered name (the service hands a merge's plan to its worker process).
copyreg.pickle(MethodSpec, _pickle_by_name)

__all__ = ["MethodSpec", "PerModel", "all_methods", "get_method", "merge_method", "whole"]
