"""Import a user's ``package.module:function`` or ``path/to/file.py:function`` (recipes, CLI hooks).

One loader for every place that names user code: the data-driven merge methods' ``entry_point``
(:func:`merge.methods._fusion.load_entry_point`) and ``weightsmith soup greedy --scorer``. This runs the
user's code; callers gate it (``--allow-code`` for recipes).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merge.errors import RecipeError


def import_callable(ref: str, *, where: str, what: str = "function") -> Callable[..., Any]:
    """The callable ``ref`` names; a :class:`RecipeError` starting with ``where`` otherwise.

    A module given as a file is loaded under a private name registered in ``sys.modules`` (so
    dataclasses and pickling inside it work); any exception while importing it is reported, not raised.
    ``what`` names the kind of object in the "has no ..." message.
    """
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise RecipeError(
            f"{where} {ref!r}: expected module:function ('package.module:function' or 'path/to/file.py:function')"
        )
    mod_name, fn_name = ref.split(":")
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name).expanduser()
            if not path.is_file():
                raise RecipeError(f"{where} {ref!r}: no such file {path}")
            spec = importlib.util.spec_from_file_location(
                f"_weightsmith_entry_{abs(hash(str(path.resolve())))}", path
            )
            if spec is None or spec.loader is None:
                raise RecipeError(f"{where} {ref!r}: cannot load {path} as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except RecipeError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
        raise RecipeError(f"{where} {ref!r}: cannot import '{mod_name}': {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RecipeError(f"{where} {ref!r}: module '{mod_name}' has no {what} '{fn_name}'")
    return fn
