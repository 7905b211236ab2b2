"""Per-phase breakdown of a py-spy raw profile of ``weightsmith merge`` (issue 17).

    py-spy record --native -r 50 -f raw -o OUT.raw -- .venv/bin/weightsmith merge RECIPE -o DIR --workers 1
    .venv/bin/python bench/profile_phases.py OUT.raw

Each sample's Python stack is mapped to one phase (innermost rule that matches wins); idle
writer/queue threads are left out. Prints percent of busy samples per phase.
"""

from __future__ import annotations

import collections
import sys

#: (phase, substrings any of which must occur in a Python frame), checked from the innermost frame out
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("finite check", ("nonfinite",)),
    ("read (mmap slice)", ("Checkpoint.rows",)),
    ("convert bf16->f32", ("reader.<locals>.read", "merge_chunks.<locals>.load")),
    ("convert f32->bf16 + write", ("do_task.<locals>.emit", "BlockSink", "write_rows")),
    ("stats: delta |tau|", ("trim_stats.<locals>.magnitudes", "_stats_values", "stats_values")),
    ("stats: histogram", ("_Histogram", "_window", "Radix")),
    ("stats: low-bit pass", ("_sparse_low_histogram",)),
    ("stats: other", ("select_top", "trim_stats", "_ties_stats", "_breadcrumbs_stats")),
    ("merge: delta", ("_deltas", "_delta")),
    ("merge: mask (trim / drop)", ("Trim.apply", "TopK.mask", "random_drop", "_position_of", "drop_mask")),
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


def main(path: str) -> None:
    counts: collections.Counter[str] = collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        ph = phase_of(stack.split(";"))
        if ph is not None:
            counts[ph] += int(n)
    total = sum(counts.values())
    print(f"{total} busy samples")
    for name, _ in [*RULES, ("other", ())]:
        if counts[name]:
            print(f"{counts[name] / total * 100:5.1f}%  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
