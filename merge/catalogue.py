"""The method catalogue: every registered method's description and parameter schema, as committed JSON.

``weightsmith methods`` prints it without importing torch or any method (start-up in ~0.2 s instead of
~2.5 s); it is what :meth:`merge.methods.registry.MethodSpec.describe` and ``json_schema`` give, written by
``python -m merge.catalogue`` and kept true by a test that rebuilds it from the registry and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CATALOGUE = Path(__file__).with_name("methods") / "catalogue.json"


def build_catalogue() -> list[dict[str, Any]]:
    """From the registry (imports every method)."""
    from merge.methods import all_methods

    return [{**s.describe(), "schema": s.json_schema()} for s in all_methods()]


def read_catalogue() -> list[dict[str, Any]]:
    """The committed catalogue (imports nothing heavy); the registry's when the file is missing."""
    try:
        return json.loads(CATALOGUE.read_text())
    except (OSError, ValueError):
        return build_catalogue()


def render(entries: list[dict[str, Any]]) -> str:
    """The text listing of ``weightsmith methods``."""
    lines = []
    for s in entries:
        base = {"required": "base required", "optional": "base optional", "ignored": "no base"}[s["base"]]
        lines += [f"{s['name']}  ({s['kind'].replace('_', '-')}, {base})", f"    {s['summary']}",
                  f"    paper: {s['paper']}  {s['url']}"]
        for p in s["params"]:
            default = "required" if p["required"] else f"default {p['default']!r}"
            scope = "per model" if p["per_model"] else "global"
            lo, hi = p.get("bounds", (None, None))
            within = "" if (lo, hi) == (None, None) else (
                f" in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
            lines.append(f"    - {p['name']}: {p['type']}{within}, {scope}, {default}")
    return "\n".join(lines)


def main() -> None:
    text = json.dumps(build_catalogue(), indent=1, sort_keys=False, default=str) + "\n"
    tmp = CATALOGUE.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(CATALOGUE)
    print(f"wrote {CATALOGUE} ({len(json.loads(text))} methods)", file=sys.stderr)


if __name__ == "__main__":
    main()
