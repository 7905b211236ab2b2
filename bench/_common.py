"""Shared helpers for the mergekit comparison benchmarks in ``bench/``.

- the peer install: ``bench/.venv-mergekit`` with ``torch==2.13.0 mergekit==0.1.5`` (one pip command, so
  torch stays pinned), created on first use;
- how to call each tool (``mergekit-yaml ... --no-copy-tokenizer`` with ``HF_HUB_OFFLINE=1``;
  ``weightsmith merge RECIPE -o OUT --json``);
- :func:`run_measured`: run one command and measure wall time, CPU seconds (``wait4`` rusage, children
  included), peak *anonymous* RSS (``RssAnon`` of the process and all its descendants, read from
  ``/proc/PID/status`` every 0.1 s) and max RSS;
- checkpoint helpers (list the safetensors files of a model folder, compare two output folders tensor by
  tensor);
- table printing and JSON output under ``bench/out/`` (git-ignored).

Only the standard library, torch, safetensors and PyYAML are used, so the scripts run with the
project's ``.venv``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
MODELS = OUT / "models"
MK_VENV = BENCH / ".venv-mergekit"
TORCH_PIN = "torch==2.13.0"
MERGEKIT_PIN = "mergekit==0.1.5"

# No run may stall on (or depend on) a network request.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------------
def ensure_mergekit(quiet: bool = False) -> Path:
    """Create ``bench/.venv-mergekit`` with mergekit 0.1.5 (torch pinned) if needed; return ``mergekit-yaml``.

    Idempotent: a stamp file records the pins of a finished install; nothing is run when it matches.
    """
    exe = MK_VENV / "bin" / "mergekit-yaml"
    stamp = MK_VENV / ".installed"
    want = f"{TORCH_PIN} {MERGEKIT_PIN}\n"
    if exe.exists() and stamp.exists() and stamp.read_text() == want:
        return exe
    py = MK_VENV / "bin" / "python"
    if not py.exists():
        if not quiet:
            print(f"[setup] creating {MK_VENV}", file=sys.stderr)
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(MK_VENV)], check=True)
    if not quiet:
        print(f"[setup] pip install {TORCH_PIN} {MERGEKIT_PIN} into {MK_VENV}", file=sys.stderr)
    # torch is pinned on the same command line so pip can never pick another torch for mergekit.
    subprocess.run([str(py), "-m", "pip", "install", "-q", TORCH_PIN, MERGEKIT_PIN], check=True)
    if not exe.exists():
        raise RuntimeError(f"{exe} missing after installing {MERGEKIT_PIN}")
    stamp.write_text(want)
    return exe


def mergekit_cmd(config: Path, out: Path, *, out_shard_size: str | None = None,
                 extra: Sequence[str] = ()) -> list[str]:
    """``mergekit-yaml CONFIG OUT --no-copy-tokenizer [--out-shard-size S]`` (our models lack a tokenizer)."""
    cmd = [str(MK_VENV / "bin" / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer"]
    if out_shard_size:
        cmd += ["--out-shard-size", out_shard_size]
    return cmd + list(extra)


def weightsmith_base_cmd() -> list[str]:
    """The installed console script if the lead's editable install exists, else ``python -m service.cli.main``."""
    exe = REPO / ".venv" / "bin" / "weightsmith"
    if exe.exists():
        return [str(exe)]
    py = REPO / ".venv" / "bin" / "python"
    return [str(py if py.exists() else sys.executable), "-m", "service.cli.main"]


def weightsmith_cmd(recipe: Path, out: Path, extra: Sequence[str] = ()) -> list[str]:
    return weightsmith_base_cmd() + ["merge", str(recipe), "-o", str(out), "--json", *extra]


def project_python() -> str:
    py = REPO / ".venv" / "bin" / "python"
    return str(py if py.exists() else sys.executable)


def tool_env(offline: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if offline:
        env.update(OFFLINE_ENV)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --------------------------------------------------------------------------------------------------
# measuring one process tree
# --------------------------------------------------------------------------------------------------
def _status_kb(pid: int, *fields: str) -> list[int]:
    """The given ``/proc/PID/status`` fields in kB (0 when absent, e.g. for a zombie)."""
    vals = [0] * len(fields)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                for i, name in enumerate(fields):
                    if line.startswith(name):
                        vals[i] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        pass
    return vals


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (from ``/proc/PID/task/TID/children``)."""
    seen: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.append(p)
        stack += _children(p)
    return seen


def tree_rss_anon_kb(pid: int) -> int:
    """Sum of ``RssAnon`` (kB) over ``pid`` and its descendants: heap/anonymous memory, not mmapped files."""
    return sum(_status_kb(p, "RssAnon:")[0] for p in process_tree(pid))


def tree_memory_kb(pid: int) -> tuple[int, int]:
    """(Σ RssAnon over the tree, max VmHWM of any process in it), both kB."""
    anon = hwm = 0
    for p in process_tree(pid):
        a, h = _status_kb(p, "RssAnon:", "VmHWM:")
        anon += a
        hwm = max(hwm, h)
    return anon, hwm


@dataclass
class Measurement:
    cmd: list[str]
    rc: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_anon_mb: float
    max_rss_mb: float
    samples: int
    ru_maxrss_mb: float = 0.0
    stdout: str = ""
    stderr: str = ""
    load_before: float = 0.0

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def to_json(self, keep_output: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_s"] = self.cpu_s
        if not keep_output:
            d["stdout"] = _tail(self.stdout, 2000)
            d["stderr"] = _tail(self.stderr, 2000)
        return d


def _tail(s: str, n: int) -> str:
    return s if len(s) <= n else "..." + s[-n:]


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 interval: float = 0.1, timeout: float | None = None) -> Measurement:
    """Run ``cmd`` and measure it.

    - wall: ``perf_counter`` from spawn to reap;
    - user/sys CPU: the rusage ``wait4`` returns, which on Linux includes the reaped descendants;
    - peak anonymous RSS: max over samples (every ``interval`` s, plus one right after spawn) of the
      summed ``RssAnon`` of the process tree;
    - max RSS: the largest ``VmHWM`` (resident high-water mark, file-backed mmapped input pages
      included, so it overstates what a merge allocates) seen for any process of the tree. Not
      ``ru_maxrss``: Linux carries the *parent's* high-water mark across fork + exec, so a small child
      of this (torch-importing) harness would report the harness's RSS; that value is kept as
      ``ru_maxrss_mb`` in the JSON only.
    stdout/stderr go to temporary files (no pipe can fill and block the child).
    """
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        peak = [0, 0]
        n = [0]
        stop = threading.Event()

        def sample() -> None:
            while True:
                anon, hwm = tree_memory_kb(proc.pid)
                n[0] += 1
                peak[0] = max(peak[0], anon)
                peak[1] = max(peak[1], hwm)
                if stop.wait(interval):
                    return

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        timer = None
        if timeout:
            timer = threading.Timer(timeout, _kill_tree, args=(proc.pid,))
            timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            wall = time.perf_counter() - t0
            stop.set()
            if timer:
                timer.cancel()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    return Measurement(cmd=list(cmd), rc=proc.returncode, wall_s=wall, user_s=ru.ru_utime, sys_s=ru.ru_stime,
                       peak_anon_mb=peak[0] / 1024, max_rss_mb=peak[1] / 1024, samples=n[0],
                       stdout=out, stderr=err, load_before=load_before, ru_maxrss_mb=ru.ru_maxrss / 1024)


def _kill_tree(pid: int) -> None:
    for p in reversed(process_tree(pid)):
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a model folder: the shards named by its index, else every ``*.safetensors``."""
    d = Path(model_dir)
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return [d / f for f in dict.fromkeys(wm.values())]
    if d.is_file():
        return [d]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no .safetensors files")
    return files


def total_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Read files once so the timed runs see them in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def remove_output(path: str | Path) -> None:
    """Delete an output folder (and any ``.partial-*`` sibling a failed run left), then ``sync`` (untimed)."""
    p = Path(path)
    if p.exists():
        shutil.rmtree(p, ignore_errors=True)
    for q in p.parent.glob(p.name + ".partial*"):
        shutil.rmtree(q, ignore_errors=True)
    os.sync()


def dir_bytes(path: str | Path) -> int:
    p = Path(path)
    if not p.exists():
        return 0
    return sum(f.stat().st_size for f in p.rglob("*.safetensors"))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# comparing two output checkpoints
# --------------------------------------------------------------------------------------------------
@dataclass
class TensorDiff:
    name: str
    shape: list[int]
    dtype_a: str
    dtype_b: str
    max_abs: float
    n_beyond: int  # elements with |a - b| > atol + rtol * |b|
    numel: int
    allclose: bool


@dataclass
class CompareResult:
    tensors: list[TensorDiff] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    ss_delta_a: float = 0.0  # Σ (a - ref)² over all compared tensors, when a reference model is given
    ss_delta_b: float = 0.0
    same_a: int = 0  # elements where a == ref exactly (a dropped or unchanged entry), when a reference is given
    same_b: int = 0
    n_ref: int = 0  # elements compared against the reference

    @property
    def n_compared(self) -> int:
        return len(self.tensors)

    @property
    def max_abs(self) -> float:
        return max((t.max_abs for t in self.tensors), default=0.0)

    @property
    def frac_beyond(self) -> float:
        numel = sum(t.numel for t in self.tensors)
        return sum(t.n_beyond for t in self.tensors) / numel if numel else 0.0

    @property
    def n_allclose(self) -> int:
        return sum(t.allclose for t in self.tensors)

    @property
    def all_close(self) -> bool:
        names_equal = not self.only_a and not self.only_b
        return names_equal and self.n_allclose == self.n_compared and self.n_compared > 0

    @property
    def dtypes_match(self) -> bool:
        return all(t.dtype_a == t.dtype_b for t in self.tensors)

    @property
    def delta_norm_ratio(self) -> float | None:
        """‖a − ref‖ / ‖b − ref‖ over the whole model (≈ 1 when both moved as far from the reference)."""
        return (self.ss_delta_a / self.ss_delta_b) ** 0.5 if self.ss_delta_b else None

    @property
    def unchanged_fractions(self) -> tuple[float, float] | None:
        """Fractions of elements equal to the reference in a and in b (kept-fraction check of random drops)."""
        return (self.same_a / self.n_ref, self.same_b / self.n_ref) if self.n_ref else None

    def worst(self, k: int = 3) -> list[TensorDiff]:
        return sorted(self.tensors, key=lambda t: -t.max_abs)[:k]


def tensor_index(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def compare_checkpoints(a_dir: str | Path, b_dir: str | Path, *, rtol: float = 1e-5, atol: float = 1e-6,
                        ref_dir: str | Path | None = None) -> CompareResult:
    """Compare every tensor present in both outputs (in float64); names in only one side are listed.

    An element "differs beyond tolerance" when ``|a - b| > atol + rtol * |b|`` (``torch.allclose``'s rule
    with ``b`` the reference); ``allclose`` per tensor also requires equal shapes. With ``ref_dir`` (e.g.
    the base model) the squared distances of ``a`` and ``b`` from it are summed too, so randomised methods
    can at least be checked for moving the same distance from the base.
    """
    import torch
    from safetensors import safe_open

    ia, ib = tensor_index(Path(a_dir)), tensor_index(Path(b_dir))
    iref = tensor_index(Path(ref_dir)) if ref_dir else {}
    res = CompareResult(only_a=sorted(set(ia) - set(ib)), only_b=sorted(set(ib) - set(ia)))
    for name in sorted(set(ia) & set(ib), key=_natural_key):
        with safe_open(str(ia[name]), framework="pt") as ha, safe_open(str(ib[name]), framework="pt") as hb:
            a, b = ha.get_tensor(name), hb.get_tensor(name)
        if name in iref and a.shape == b.shape:
            with safe_open(str(iref[name]), framework="pt") as hr:
                r = hr.get_tensor(name).double()
            if r.shape == a.shape:
                res.ss_delta_a += float(((a.double() - r) ** 2).sum())
                res.ss_delta_b += float(((b.double() - r) ** 2).sum())
                res.same_a += int((a.double() == r).sum())
                res.same_b += int((b.double() == r).sum())
                res.n_ref += r.numel()
        if a.shape != b.shape:
            res.tensors.append(TensorDiff(name, list(a.shape), str(a.dtype), str(b.dtype), float("inf"),
                                          a.numel(), a.numel(), False))
            continue
        ad, bd = a.double(), b.double()
        diff = (ad - bd).abs()
        beyond = int((diff > atol + rtol * bd.abs()).sum())
        nonfinite = bool((~torch.isfinite(ad)).any() or (~torch.isfinite(bd)).any())
        res.tensors.append(TensorDiff(
            name=name, shape=list(a.shape), dtype_a=str(a.dtype).removeprefix("torch."),
            dtype_b=str(b.dtype).removeprefix("torch."), max_abs=float(diff.max()) if diff.numel() else 0.0,
            n_beyond=beyond, numel=a.numel(), allclose=beyond == 0 and not nonfinite))
    return res


def _natural_key(name: str) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------------
# stats and tables
# --------------------------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if x != x:  # nan
            return "—"
        if x == float("inf"):
            return "inf"
        if x != 0 and ((nd > 0 and abs(x) < 10 ** -nd) or abs(x) >= 1e7):
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], file: Any = None) -> str:
    """Print a GitHub-markdown table (also returned as text)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells[1:]]
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")
        info["mem_total_gb"] = round(int(mem[0].split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        info["weightsmith_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                    capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    mk_meta = list((MK_VENV / "lib").glob("python*/site-packages/mergekit-*.dist-info"))
    if mk_meta:
        info["mergekit"] = mk_meta[0].name.removeprefix("mergekit-").removesuffix(".dist-info")
    return info
