"""Print how an environment differs from requirements/dev.lock (the drift canary's first table).

    python scripts/lock_drift.py requirements/dev.lock FROZEN.txt   # FROZEN: `pip freeze` of the other env
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def main(argv: list[str]) -> int:
    locked, other = pins(Path(argv[0])), pins(Path(argv[1]))
    rows = [
        (name, locked.get(name, "-"), other.get(name, "-"))
        for name in sorted(set(locked) | set(other))
        if locked.get(name) != other.get(name)
    ]
    print(f"{len(rows)} package(s) differ from the lock ({len(locked)} locked)")
    for name, a, b in rows:
        print(f"  {name:<32} lock {a:<16} latest {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
