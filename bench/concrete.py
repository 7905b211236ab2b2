"""Benchmark: one optimisation step of Concrete TA / AdaMerging, ours vs. rebuilding a module every step.

Three implementations of the same step (same relaxed-Bernoulli mask, same rescale, same entropy
objective over T tasks with a batch of 16 each, same Adam update):

- ``ours``: :func:`merge.methods.concrete.learn_concrete_task_arithmetic` /
  :func:`~merge.methods.concrete.learn_adamerging` (``torch.func.functional_call`` on the merged
  tensors, the tasks' inputs concatenated into one forward, which stops at the merged tensors, then
  one backward through the merge; for Concrete TA the fixed Σ_t λ τ_t is computed once);
- ``rebuild_task``: the way the research code does it (AdaMerging's reference ``forward``, which merges and
  ``load_weights`` into the module for every task's forward): for each task, sum θ_0 + Σ_t τ_t · (λ_t · m)
  tensor by tensor, deep-copy the architecture, install the merged tensors as its weights and run the
  task; backpropagate the summed loss once (so each task's merged weights stay alive for backward);
- ``rebuild_step``: the same, with the merge and the module built once per step for all tasks (the
  straightforward implementation with the per-task redundancy removed).

Models: the example's backbone (``examples/concrete_merging.py``: MLP 64 → 1024 → 1024, 1.1 M
parameters, 8 tasks) and one about 10× larger (64 → 3264 → 3264, 10.9 M). Weights are synthetic
(θ_0 random, θ_t = θ_0 + noise): time and memory do not depend on their values.

Each measurement runs in its own process: seconds per step (median of the steps after the first)
and the peak resident memory of the learning call above what the caller already holds (θ_0 and
the T fine-tuned state dicts), from ``VmHWM`` (reset with ``/proc/self/clear_refs`` before the
call; in a separate run with glibc's mmap threshold fixed, so that freed blocks leave the resident
set; the timing runs use the default allocator); on CUDA,
``torch.cuda.max_memory_allocated``. All three hold the T task vectors (T × model); what
matters is the rest, reported in units of the model's float32 size. Implementations rotate in
interleaved rounds; the table reports medians and same-round ratios.

Run: ``.venv/bin/python bench/concrete.py [--rounds 3] [--steps 8] [--device cpu]`` → prints a
table, writes ``bench/out/concrete.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, str(THREADS))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"

SIZES = {"example": 1024, "10x": 3264}


# ---------------------------------------------------------------------------------------------
# the child: one implementation, one size
# ---------------------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _problem(hidden: int, n_tasks: int, device: str) -> tuple[Any, dict, list[dict]]:
    from examples.concrete_merging import Backbone, CosineHead
    from merge.methods.concrete import FusionProblem, FusionTask

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Backbone(hidden).state_dict().items()}
    models = [
        {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_tasks)
    ]
    tasks = [
        FusionTask(
            f"t{i}",
            torch.rand(256, 64, generator=g),
            head=CosineHead(torch.randn(10, hidden, generator=g), 100.0),
        )
        for i in range(n_tasks)
    ]
    return FusionProblem(Backbone(hidden), tasks), base, models


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    delattr(module, leaf)
    setattr(module, leaf, value)


def rebuild_learn(
    base: dict,
    models: list[dict],
    problem: Any,
    *,
    mode: str,
    steps: int,
    device: str,
    progress: Any,
    lam0: float = 0.3,
    lr: float = 1e-2,
    temperature: float = 0.5,
    seed: int = 0,
    per_task: bool = True,
) -> None:
    """The straightforward implementation: merge, deep-copy and load a module for every task's forward."""
    from merge.methods._fusion import entropy_loss, task_batches

    dev = torch.device(device)
    keys = list(base)
    b = {k: base[k].to(dev) for k in keys}
    tau = {k: [m[k].to(dev) - b[k] for m in models] for k in keys}  # per model, as research code keeps them
    T = len(models)
    template = problem.model.to(dev) if dev.type == "cpu" else copy.deepcopy(problem.model).to(dev)
    heads = [copy.deepcopy(t.head).to(dev) for t in problem.tasks]
    if mode == "concrete_ta":
        logits = {k: torch.zeros_like(b[k], requires_grad=True) for k in keys}
        params = list(logits.values())
        gen = torch.Generator(device=dev).manual_seed(seed)
    else:
        lam = torch.full((T, len(keys)), lam0, device=dev, requires_grad=True)
        params = [lam]
    opt = torch.optim.Adam(params, lr=lr)
    batches = task_batches(problem, 16, seed, dev)

    def merge_weights() -> dict[str, torch.Tensor]:
        merged = {}
        for i, k in enumerate(keys):
            acc = b[k]
            for t in range(T):
                w = lam0 * mask[k] if mode == "concrete_ta" else lam[t, i].clamp(0, 1)
                acc = acc + tau[k][t] * w
            merged[k] = acc
        return merged

    for step in range(steps):
        mask = {}
        if mode == "concrete_ta":
            for k in keys:
                u = torch.rand(b[k].shape, generator=gen, device=dev).clamp(1e-6, 1 - 1e-6)
                m = torch.sigmoid((logits[k] + u.log() - torch.log1p(-u)) / temperature)
                mask[k] = m / m.mean()
        # per task: as AdaMerging's reference forward, merge and load a module for every task's forward;
        # per step: merge and load once, then run every task through it
        loss = 0.0
        model = None
        for t in range(T):
            if per_task or model is None:
                model = copy.deepcopy(template)
                for k, v in merge_weights().items():
                    _set_tensor(model, k, v)
            loss = loss + entropy_loss(heads[t](model(next(batches[t]))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress("step", step + 1, steps, float(loss.detach()))


def child_learn(
    impl: str, mode: str, base: dict, models: list[dict], problem: Any, steps: int, device: str, progress: Any
) -> None:
    from merge.methods.concrete import learn_adamerging, learn_concrete_task_arithmetic

    if impl == "ours":
        if mode == "concrete_ta":
            learn_concrete_task_arithmetic(
                base, models, problem, steps=steps, lr=1e-2, device=device, progress=progress
            )
        else:
            learn_adamerging(
                base, models, problem, coefficients="layer", steps=steps, device=device, progress=progress
            )
    else:
        rebuild_learn(
            base,
            models,
            problem,
            mode=mode,
            steps=steps,
            device=device,
            progress=progress,
            per_task=impl == "rebuild_task",
        )


def child_run(
    impl: str, mode: str, hidden: int, n_tasks: int, steps: int, device: str, progress: Any
) -> None:
    problem, base, models = _problem(hidden, n_tasks, device)
    child_learn(impl, mode, base, models, problem, steps, device, progress)


def child(impl: str, mode: str, hidden: int, n_tasks: int, steps: int, device: str) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    # warm up torch's lazily initialised state (autograd engine, optimiser, kernels) on a tiny problem,
    # so the peak below is the learning call's own memory
    child_run(impl, mode, 16, n_tasks, 2, device, lambda *_: None)
    problem, base, models = _problem(hidden, n_tasks, device)
    n_params = sum(v.numel() for v in base.values())
    stamps: list[float] = []

    def progress(_phase: str, _step: int, _steps: int, _loss: float) -> None:
        stamps.append(time.perf_counter())

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    rss0 = _rss_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    child_learn(impl, mode, base, models, problem, steps, device, progress)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - alloc0
    else:
        peak = (_rss_kb("VmHWM") - rss0) * 1024
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "impl": impl,
        "mode": mode,
        "hidden": hidden,
        "tasks": n_tasks,
        "params": n_params,
        "model_bytes": 4 * n_params,
        "task_vector_bytes": 4 * n_params * n_tasks,
        "seconds_per_step": statistics.median(per_step) if per_step else float("nan"),
        "first_step_seconds": stamps[0] - t0 if stamps else float("nan"),
        "peak_bytes": peak,
        "device": device,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------


def run_child(
    impl: str, mode: str, hidden: int, n_tasks: int, steps: int, device: str, memory: bool = False
) -> dict[str, Any]:
    # memory runs fix glibc's mmap threshold: otherwise freed multi-MiB blocks are kept in its heap and
    # stay resident, so the peak RSS would count allocator retention instead of live tensors. That
    # makes every large allocation page-fault, so timing runs use the default allocator.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if memory else dict(os.environ)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        impl,
        mode,
        str(hidden),
        str(n_tasks),
        str(steps),
        device,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument(
        "--scaling-tasks", type=int, nargs="*", default=[4, 16], help="extra task counts (example size)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument(
        "--modes", nargs="+", default=["concrete_ta", "adamerging"], choices=["concrete_ta", "adamerging"]
    )
    ap.add_argument("--child", nargs=6, metavar=("IMPL", "MODE", "HIDDEN", "TASKS", "STEPS", "DEVICE"))
    ap.add_argument("--json-out", type=Path, default=OUT / "concrete.json")
    a = ap.parse_args()
    if a.child:
        impl, mode, hidden, tasks, steps, device = a.child
        print(json.dumps(child(impl, mode, int(hidden), int(tasks), int(steps), device)))
        return
    from bench._common import machine_info, print_table

    info = machine_info()
    impls = ("ours", "rebuild_step", "rebuild_task")
    rows: list[dict[str, Any]] = []
    # (size, tasks, rounds): the main comparison, then how the memory scales with the number of tasks
    configs = [(size, a.tasks, a.rounds) for size in a.sizes]
    configs += [("example", t, 1) for t in a.scaling_tasks if t != a.tasks and "example" in a.sizes]
    for size, n_tasks, rounds in configs:
        for mode in a.modes:
            for r in range(rounds):
                order = impls[r % 3 :] + impls[: r % 3]  # rotate who runs first
                got = {impl: run_child(impl, mode, SIZES[size], n_tasks, a.steps, a.device) for impl in order}
                for impl, res in got.items():
                    if r == 0:  # one memory run per configuration (the peak barely varies)
                        res["peak_bytes"] = run_child(impl, mode, SIZES[size], n_tasks, 3, a.device, True)[
                            "peak_bytes"
                        ]
                    rows.append({**res, "size": size, "round": r, "loadavg": os.getloadavg()[0]})
                print(
                    f"{size} T={n_tasks} {mode} round {r}: "
                    + ", ".join(f"{i} {got[i]['seconds_per_step']:.3f} s/step" for i in impls),
                    flush=True,
                )
    table_rows, summary = [], []
    for size, n_tasks, _ in configs:
        for mode in a.modes:
            sel = {
                impl: sorted(
                    (
                        x
                        for x in rows
                        if x["size"] == size
                        and x["mode"] == mode
                        and x["impl"] == impl
                        and x["tasks"] == n_tasks
                    ),
                    key=lambda x: x["round"],
                )
                for impl in impls
            }
            ours = sel["ours"]
            mb, tv = ours[0]["model_bytes"], ours[0]["task_vector_bytes"]
            s: dict[str, Any] = {"size": size, "mode": mode, "params": ours[0]["params"], "tasks": n_tasks}
            for impl in impls:
                s[f"{impl}_seconds_per_step"] = statistics.median(x["seconds_per_step"] for x in sel[impl])
                s[f"{impl}_peak_bytes"] = sel[impl][0]["peak_bytes"]  # round 0: the memory run
                s[f"{impl}_extra_models"] = (s[f"{impl}_peak_bytes"] - tv) / mb
                if impl != "ours":  # same-round ratios, then their median
                    s[f"{impl}_speedup"] = statistics.median(
                        b["seconds_per_step"] / o["seconds_per_step"]
                        for o, b in zip(ours, sel[impl], strict=True)
                    )
            summary.append(s)
            table_rows.append(
                [size, mode, f"{s['params'] / 1e6:.1f} M", n_tasks]
                + [f"{s[f'{i}_seconds_per_step']:.3f}" for i in impls]
                + [
                    f"{s['rebuild_step_speedup']:.2f}x",
                    f"{s['rebuild_task_speedup']:.2f}x",
                    f"{tv / 2**20:.0f}",
                ]
                + [f"{s[f'{i}_extra_models']:.1f}" for i in impls]
            )
    print()
    text = print_table(
        [
            "size",
            "step",
            "params",
            "T",
            "ours s/step",
            "rebuild/step s/step",
            "rebuild/task s/step",
            "speed-up vs rebuild/step",
            "vs rebuild/task",
            "task vectors MiB",
            "ours extra (models)",
            "rebuild/step extra",
            "rebuild/task extra",
        ],
        table_rows,
    )
    a.json_out.parent.mkdir(parents=True, exist_ok=True)
    a.json_out.write_text(
        json.dumps(
            {
                "machine": info,
                "config": {k: str(v) for k, v in vars(a).items()},
                "summary": summary,
                "runs": rows,
                "table": text,
            },
            indent=2,
        )
    )
    print(f"\nwrote {a.json_out} (load average at start {info['loadavg'][0]:.1f})")


if __name__ == "__main__":
    main()
