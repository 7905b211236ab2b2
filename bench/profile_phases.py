"""Per-phase breakdown of a py-spy raw profile of ``weightsmith merge`` (issue 17).

    py-spy record --native -r 50 -f raw -o OUT.raw -- .venv/bin/weightsmith merge RECIPE -o DIR --workers 1
    .venv/bin/python bench/profile_phases.py OUT.raw [MORE.raw ...]

Each sample's Python stack is mapped to one phase (innermost rule that matches wins); idle
writer/queue threads are left out. Prints a markdown table: percent of busy samples per phase,
one column per profile.
"""

from __future__ import annotations

import collections
import sys

#: (phase, substrings any of which must occur in a Python frame), checked from the innermost frame out
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("finite check", ("nonfinite",)),
    ("slice rows (safetensors / view)", ("Checkpoint.rows",)),
    ("read page cache + convert bf16->f32", ("reader.<locals>.read", "merge_chunks.<locals>.load")),
    ("convert f32->bf16 + write", ("do_task.<locals>.emit", "BlockSink", "write_rows")),
    ("stats: delta, abs", ("trim_stats.<locals>.magnitudes", "_stats_values", "stats_values")),
    ("stats: histogram / window counts", ("_Histogram", "_Window", "_window_start")),
    ("stats: low-bit pass", ("_sparse_low_histogram",)),
    (
        "stats: other (selection, tie counts)",
        ("select_top", "_one_pass", "trim_stats", "_ties_stats", "_breadcrumbs_stats"),
    ),
    ("merge: delta", ("_deltas", "_delta")),
    (
        "merge: mask (trim / drop, RNG)",
        (
            "Trim.apply",
            "TopK.mask",
            "TieCursor",
            "_count_equal",
            "random_drop",
            "_position_of",
            "ElementStream",
        ),
    ),
    ("merge: combine", ("combine", "_finish", "_weight_sum", "task_arithmetic (", "linear (")),
    ("start-up (imports, planning)", ("<module>", "plan_merge", "_Planner", "importlib", "click")),
]
IDLE = ("Condition.wait", "queue.py", "Event.wait", "Thread._bootstrap_inner")


def phase_of(frames: list[str]) -> str | None:
    py = [f for f in frames if ".py:" in f]
    if py and any(s in py[-1] for s in IDLE):
        return None
    for f in reversed(py):
        for name, subs in RULES:
            if any(s in f for s in subs):
                return name
    return "other"


def breakdown(path: str) -> tuple[int, collections.Counter[str]]:
    """(busy samples, samples per phase) of one py-spy raw file."""
    counts: collections.Counter[str] = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            ph = phase_of(stack.split(";"))
            if ph is not None:
                counts[ph] += int(n)
    return sum(counts.values()), counts


STARTUP = "start-up (imports, planning)"


def main(paths: list[str], rate: float = 50.0) -> None:
    """One column per profile: percent of the busy samples after start-up per phase.

    Start-up is left out of the percentages: py-spy's ``--native`` symbol loading slows imports
    several-fold, so its share of a profile is not its share of a normal run (~1.3 s here).
    """
    cols = [breakdown(p) for p in paths]
    names = [p.rsplit("/", 1)[-1].removesuffix(".raw") for p in paths]
    print("| phase | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    work = [t - c[STARTUP] for t, c in cols]
    for name, _ in [*RULES, ("other", ())]:
        if name != STARTUP and any(c[name] for _, c in cols):
            cells = [f"{c[name] / w * 100:.1f}%" if w else "—" for w, (_, c) in zip(work, cols, strict=True)]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        f"| busy samples after start-up (s at {rate:g} Hz) | "
        + " | ".join(f"{w} ({w / rate:.0f} s)" for w in work)
        + " |"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
