"""Parity with mergekit 0.1.5: same recipes, same generated checkpoints, every output tensor compared.

Both tools read the same YAML (mergekit's format) and the same LLaMA-shaped checkpoints from
``bench/make_models.py`` (``--size tiny`` by default: 21.1M parameters, base + 3 fine-tunes). Variants:

- ``fp32``   float32 checkpoints, ``dtype: float32``: the deterministic methods must match to float
             tolerance here (``allclose`` at rtol=1e-5, atol=1e-6, every tensor). Float32 task vectors
             still have a few exactly tied magnitudes in the large tensors (a delta ``ft − base`` is rounded
             to the spacing of ``base``), and where a tie straddles the density cut the top-k choice is
             undefined: mergekit's ``argsort`` orders ties arbitrarily, weightsmith by flat index. For
             TIES/breadcrumbs every differing element is therefore checked against the task vectors: if
             each one has a magnitude tied at some model's cut (:func:`tied_cut_mask`), the verdict is
             "match except N tied-cut elements"; any other difference is a real one.
- ``bf16in`` bf16 checkpoints, ``dtype: float32`` (float32 compute and output in both tools). bf16 deltas
             have many tied magnitudes, so TIES/breadcrumbs pick differently at many cuts; the same tie
             analysis is reported. Not required.
- ``bf16``   (optional) bf16 checkpoints, ``dtype: bfloat16`` as users write it: mergekit computes the
             task-vector family in bf16, weightsmith in float32 (its default), so small differences are
             expected there. Reported, not required.

``dare_linear`` and ``dare_ties`` draw random masks (different generators in the two tools), so they are
reported only; the table still shows ``‖ws − base‖ / ‖mk − base‖`` over the whole model, which should be
close to 1 when both drop and rescale alike.

Output: a table (variant, method, tensors compared, max |diff|, fraction of elements beyond tolerance,
tensors allclose, verdict) and ``bench/out/parity_mergekit.json``. Exit status 1 when a required match
(deterministic method, ``fp32`` variant) fails or a tool fails.

    .venv/bin/python bench/parity_mergekit.py                      # fp32 + bf16in, all 8 methods (~5 min)
    .venv/bin/python bench/parity_mergekit.py --variants fp32,bf16in,bf16 --methods ties,breadcrumbs --keep
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    OUT,
    compare_checkpoints,
    ensure_mergekit,
    fmt,
    machine_info,
    mergekit_cmd,
    print_table,
    remove_output,
    run_measured,
    tensor_index,
    tool_env,
    weightsmith_cmd,
    write_json,
    write_yaml,
)
from make_models import ensure_models  # noqa: E402

DETERMINISTIC = ["linear", "slerp", "task_arithmetic", "ties", "breadcrumbs", "model_stock"]
RANDOM = ["dare_linear", "dare_ties"]
# the methods added for issue 15 (``nuslerp:rows`` is nuslerp with per-row vectors)
NEW_DETERMINISTIC = ["sce", "karcher", "multislerp", "nuslerp", "nuslerp:rows", "nearswap", "arcee_fusion", "ram",
                     "ramplus_tl"]
NEW_RANDOM = ["della", "della_linear"]
DETERMINISTIC += NEW_DETERMINISTIC
RANDOM += NEW_RANDOM
METHODS = DETERMINISTIC + RANDOM
EXTRA_METHODS = ["breadcrumbs_ties"]
#: mergekit 0.1.5's arcee_fusion takes its quantiles from a random sample of 1M entries above this size
ARCEE_SAMPLE = 1_000_000
VARIANTS = {  # name -> (checkpoint dtype, recipe dtype)
    "fp32": ("float32", "float32"),
    "bf16in": ("bfloat16", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
}


def recipe_for(method: str, m: dict[str, Path], dtype: str) -> dict[str, Any]:
    """Recipes with unequal per-model parameters, so a swapped or ignored parameter shows up as a diff."""
    b, f1, f2, f3 = (str(m[k]) for k in ("base", "ft1", "ft2", "ft3"))

    def models(params: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"model": f, "parameters": p} for f, p in zip((f1, f2, f3), params, strict=True)]

    r: dict[str, Any]
    if method == "linear":
        r = {"models": models([{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}]),
             "parameters": {"normalize": True}}
    elif method == "slerp":
        # mergekit's README example: per-layer gradients selected by name filters, plus a default
        r = {"base_model": f1, "models": [{"model": f1}, {"model": f2}],
             "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                  {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                  {"value": 0.5}]}}
    elif method == "task_arithmetic":
        r = {"base_model": b, "models": models([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.7}]),
             "parameters": {"lambda": 0.9}}
    elif method == "ties":
        r = {"base_model": b, "models": models([{"weight": 1.0, "density": 0.5},
                                                 {"weight": 0.8, "density": 0.3},
                                                 {"weight": 0.6, "density": 0.7}]),
             "parameters": {"normalize": True}}
    elif method in ("breadcrumbs", "breadcrumbs_ties"):
        r = {"base_model": b, "models": models([{"weight": 1.0, "density": 0.9, "gamma": 0.01},
                                                 {"weight": 0.7, "density": 0.8, "gamma": 0.02},
                                                 {"weight": 0.5, "density": 0.9, "gamma": 0.05}])}
    elif method == "model_stock":
        r = {"base_model": b, "models": [{"model": f} for f in (f1, f2, f3)]}
    elif method == "dare_linear":
        r = {"base_model": b, "models": models([{"weight": 0.5, "density": 0.5},
                                                 {"weight": 0.3, "density": 0.6},
                                                 {"weight": 0.7, "density": 0.4}])}
    elif method == "dare_ties":
        r = {"base_model": b, "models": models([{"weight": 1.0, "density": 0.5},
                                                 {"weight": 0.8, "density": 0.6},
                                                 {"weight": 0.6, "density": 0.4}])}
    elif method == "della":
        r = {"base_model": b, "models": models([{"weight": 1.0, "density": 0.5, "epsilon": 0.1},
                                                 {"weight": 0.8, "density": 0.4, "epsilon": 0.15},
                                                 {"weight": 0.6, "density": 0.6, "epsilon": 0.2}]),
             "parameters": {"lambda": 0.9}}
    elif method == "della_linear":
        r = {"base_model": b, "models": models([{"weight": 0.5, "density": 0.5, "epsilon": 0.1},
                                                 {"weight": 0.3, "density": 0.6, "epsilon": 0.1},
                                                 {"weight": 0.7, "density": 0.4, "epsilon": 0.15}])}
    elif method == "sce":
        r = {"base_model": b, "models": [{"model": f} for f in (f1, f2, f3)], "parameters": {"select_topk": 0.5}}
    elif method == "karcher":
        r = {"models": [{"model": f} for f in (f1, f2, f3)], "parameters": {"max_iter": 10, "tol": 1e-5}}
    elif method == "multislerp":
        r = {"base_model": b, "models": models([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}])}
    elif method in ("nuslerp", "nuslerp:rows"):
        r = {"base_model": b, "models": [{"model": f1, "parameters": {"weight": 0.3}},
                                          {"model": f2, "parameters": {"weight": 0.7}}]}
        if method == "nuslerp:rows":
            r["parameters"] = {"nuslerp_flatten": False}
        method = "nuslerp"
    elif method == "nearswap":
        r = {"base_model": b, "models": [{"model": f1}], "parameters": {"t": 0.001}}
    elif method == "arcee_fusion":
        r = {"base_model": b, "models": [{"model": f1}]}
    elif method == "ram":
        r = {"base_model": b, "models": [{"model": f} for f in (f1, f2, f3)], "parameters": {"epsilon": 0.002}}
    elif method == "ramplus_tl":
        r = {"base_model": b, "models": [{"model": f} for f in (f1, f2, f3)],
             "parameters": {"epsilon": 0.002, "r": 0.1, "alpha": 0.2}}
    else:
        raise ValueError(method)
    return {"merge_method": method, **r, "dtype": dtype}


TOPK_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")


def cut_boundaries(method: str, numel: int, density: float, gamma: float) -> list[int]:
    """Where mergekit 0.1.5 cuts the *ascending* magnitude order of one task vector (``sparsify.py``).

    ``magnitude`` (TIES) keeps the top ``k = max(1, int(density n))``: one cut at ``n − k``.
    ``magnitude_outliers`` (breadcrumbs) keeps ascending positions ``[n_bot, n_bot + target)`` with
    ``target = int(density n)``, ``n_bot = max(0, n − target − int(gamma n))``: cuts at both ends.
    """
    if density >= 1:
        return []
    if method == "ties":
        return [numel - max(1, int(density * numel))]
    target = int(density * numel)
    n_bot = max(0, numel - target - int(gamma * numel))
    return [b for b in (n_bot, n_bot + target) if 0 < b < numel]


def tied_cut_mask(delta: torch.Tensor, boundaries: list[int]) -> torch.Tensor:
    """Elements whose |delta| equals a magnitude that straddles a cut (ranks b−1 and b tie).

    Which of those tied elements a top-k keeps is not defined by the method: mergekit's ``argsort``
    orders them arbitrarily, weightsmith by flat index. Any other element is selected identically by
    both, so an output difference anywhere else is a real discrepancy.
    """
    w = delta.abs().reshape(-1).float()
    mask = torch.zeros_like(w, dtype=torch.bool)
    if not boundaries:
        return mask
    srt = torch.sort(w).values
    for b in boundaries:
        if srt[b - 1] == srt[b]:
            mask |= w == srt[b]
    return mask


def explain_topk_diffs(ws_dir: Path, mk_dir: Path, recipe: dict[str, Any], rtol: float, atol: float,
                       tensors: list[str]) -> dict[str, int]:
    """For a top-k method, count differing elements and how many sit on a tied cut of some task vector.

    The sign election and the disjoint mean act element by element, so a different pick at a tie
    changes only that element; ``unexplained`` must be 0 for the two tools to agree on the method.
    """
    base_dir = Path(recipe["base_model"])
    per_model = [(Path(m["model"]), m.get("parameters") or {}) for m in recipe["models"]
                 if Path(m["model"]) != base_dir]
    idx = {d: tensor_index(d) for d in [ws_dir, mk_dir, base_dir] + [d for d, _ in per_model]}

    def get(d: Path, name: str) -> torch.Tensor:
        with safe_open(str(idx[d][name]), framework="pt") as h:
            return h.get_tensor(name)

    out = {"n_diff": 0, "n_tied_cut": 0, "n_unexplained": 0, "n_elems": 0, "n_on_tied_cuts": 0}
    for name in tensors:
        ws, mk = get(ws_dir, name).double(), get(mk_dir, name).double()
        diff = ((ws - mk).abs() > atol + rtol * mk.abs()).reshape(-1)
        if not bool(diff.any()):
            continue
        base = get(base_dir, name).float()
        tied = torch.zeros_like(diff)
        for d, p in per_model:
            delta = get(d, name).float() - base
            cuts = cut_boundaries(recipe["merge_method"], delta.numel(), float(p.get("density", 1.0)),
                                  float(p.get("gamma", 0.01)))
            tied |= tied_cut_mask(delta, cuts)
        out["n_elems"] += diff.numel()
        out["n_on_tied_cuts"] += int(tied.sum())  # how much the tie set covers (it must not be everything)
        out["n_diff"] += int(diff.sum())
        out["n_tied_cut"] += int((diff & tied).sum())
        out["n_unexplained"] += int((diff & ~tied).sum())
    return out


REFERENCE_METHODS = ("karcher", "multislerp")


def explain_sce_diffs(ws_dir: Path, mk_dir: Path, recipe: dict[str, Any], rtol: float, atol: float,
                      tensors: list[str]) -> dict[str, int]:
    """SCE keeps the top ``select_topk`` of the task vectors' variance: count differing elements tied at that cut.

    mergekit's ``torch.topk`` picks arbitrarily among equal variances at the cut, weightsmith by flat index;
    a different pick changes those elements (and the mean-square weights very slightly).
    """
    base_dir = Path(recipe["base_model"])
    models = [Path(m["model"]) for m in recipe["models"]]
    s = float(recipe["parameters"]["select_topk"])
    idx = {d: tensor_index(d) for d in [ws_dir, mk_dir, base_dir, *models]}

    def get(d: Path, name: str) -> torch.Tensor:
        with safe_open(str(idx[d][name]), framework="pt") as h:
            return h.get_tensor(name)

    out = {"n_diff": 0, "n_tied_cut": 0, "n_unexplained": 0, "n_elems": 0, "n_on_tied_cuts": 0}
    for name in tensors:
        ws, mk = get(ws_dir, name).double(), get(mk_dir, name).double()
        diff = ((ws - mk).abs() > atol + rtol * mk.abs()).reshape(-1)
        if not bool(diff.any()):
            continue
        base = get(base_dir, name).float()
        var = torch.var(torch.stack([get(m, name).float() - base for m in models]), dim=0, unbiased=False).reshape(-1)
        k = int(torch.count_nonzero(var) * s)
        srt = torch.sort(var, descending=True).values
        tied = torch.zeros_like(diff)
        if 0 < k < var.numel() and srt[k - 1] == srt[k]:
            tied = var == srt[k]
        out["n_elems"] += diff.numel()
        out["n_on_tied_cuts"] += int(tied.sum())
        out["n_diff"] += int(diff.sum())
        out["n_tied_cut"] += int((diff & tied).sum())
        un = diff & ~tied
        out["n_unexplained"] += int(un.sum())
        if bool(un.any()):  # the knock-on of a different tie pick on the whole-tensor mean-square weights
            rel = ((ws - mk).abs() / mk.abs().clamp(min=1e-30)).reshape(-1)[un]
            out["max_rel_unexplained"] = max(out.get("max_rel_unexplained", 0.0), float(rel.max()))
    return out


def _karcher64(xs: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's Karcher iteration written out on whole float64 tensors (an independent reference)."""
    norms = [x.norm() for x in xs]
    us = [x / n for x, n in zip(xs, norms, strict=True)]
    a = 1.0 / len(xs)
    mean = sum(a * u for u in us)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        t = torch.zeros_like(mean)
        for u in us:
            d = torch.clamp((mean * u).sum(), -1, 1)
            th = torch.arccos(d)
            if th < tol:
                continue
            t += a * th / torch.sin(th) * (u - d * mean)
        tn = t.norm()
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * t / tn
        mean = mean / mean.norm()
    return sum(norms) / len(xs) * mean


def _multislerp64(xs: list[torch.Tensor], weights: list[float], base: torch.Tensor) -> torch.Tensor:
    xs = [x - base for x in xs]
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    norms = torch.stack([x.norm() for x in xs])
    us = [x / (n + 1e-8) for x, n in zip(xs, norms, strict=True)]
    m = sum(wi * u for wi, u in zip(w, us, strict=True))
    m = m / m.norm()
    tang = sum(wi * (u - (u * m).sum() * m) for wi, u in zip(w, us, strict=True))
    tn = tang.norm() + 1e-8
    return (m * torch.cos(tn) + tang * torch.sin(tn) / tn) * (norms * w).sum() + base


def explain_by_reference(ws_dir: Path, mk_dir: Path, recipe: dict[str, Any], rtol: float, atol: float,
                         tensors: list[str]) -> dict[str, Any]:
    """For tensors where the tools differ, which one is within tolerance of a float64 computation?"""
    models = [Path(m["model"]) for m in recipe["models"]]
    base = Path(recipe["base_model"]) if recipe.get("base_model") else None
    dirs = [ws_dir, mk_dir, *models] + ([base] if base else [])
    idx = {d: tensor_index(d) for d in dirs}

    def get(d: Path, name: str) -> torch.Tensor:
        with safe_open(str(idx[d][name]), framework="pt") as h:
            return h.get_tensor(name).double()

    out: dict[str, Any] = {"tensors": [], "ws_matches_ref": True}
    for name in tensors:
        xs = [get(m, name) for m in models]
        if recipe["merge_method"] == "karcher":
            ref = _karcher64(xs, int(recipe["parameters"]["max_iter"]), float(recipe["parameters"]["tol"]))
        else:
            ref = _multislerp64(xs, [float(m["parameters"]["weight"]) for m in recipe["models"]], get(base, name))
        rel = {}
        for tool, d in (("ws", ws_dir), ("mk", mk_dir)):
            o = get(d, name)
            rel[tool] = float((o - ref).norm() / ref.norm())
            rel[tool + "_close"] = bool(torch.allclose(o, ref, rtol=rtol, atol=atol))
        out["tensors"].append({"name": name, **rel})
        out["ws_matches_ref"] &= rel["ws_close"]
    return out


def note_for(variant: str, method: str) -> str:
    if method in RANDOM:
        return "random masks: report only"
    if method == "arcee_fusion":
        return f"required on tensors <= {ARCEE_SAMPLE:,} elem.; above, mergekit samples its quantiles"
    if variant == "bf16in" and method in ("ties", "breadcrumbs", "breadcrumbs_ties", "sce"):
        return "bf16 deltas: tied magnitudes at the cut"
    if variant == "bf16" and method not in ("linear", "slerp"):
        return "mergekit computes in bf16, ws in fp32"
    if variant == "bf16":
        return "bf16 output rounding"
    if method == "slerp":
        return "mk sums the dot product in fp32, ws in fp64"
    return ""


def required(variant: str, method: str) -> bool:
    return variant == "fp32" and method in DETERMINISTIC


def _last_line(s: str) -> str:
    lines = [x for x in s.strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "big"], default="tiny")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list from {','.join(METHODS + EXTRA_METHODS)}")
    ap.add_argument("--variants", default="fp32,bf16in", help=f"comma list from {','.join(VARIANTS)}")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--keep", action="store_true", help="keep both outputs under bench/out/parity/")
    ap.add_argument("--json-out", type=Path, default=OUT / "parity_mergekit.json")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    variants = [v for v in a.variants.split(",") if v]
    for m in methods:
        if m not in METHODS + EXTRA_METHODS:
            ap.error(f"unknown method {m!r}")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")

    ensure_mergekit()
    results: list[dict[str, Any]] = []
    data: dict[str, Any] = {"machine": machine_info(), "size": a.size, "rtol": a.rtol, "atol": a.atol,
                            "results": results}
    t0 = time.perf_counter()
    for v in variants:
        ckpt_dtype, recipe_dtype = VARIANTS[v]
        models = ensure_models(a.size, dtype=ckpt_dtype)
        for m in methods:
            work = OUT / "parity" / v / m.replace(":", "-")
            recipe = write_yaml(work / "recipe.yml", recipe_for(m, models, recipe_dtype))
            mk_out, ws_out = work / "mergekit", work / "weightsmith"
            remove_output(mk_out)
            remove_output(ws_out)
            rec: dict[str, Any] = {"variant": v, "method": m, "recipe": str(recipe),
                                   "required": required(v, m), "note": note_for(v, m)}
            mk = run_measured(mergekit_cmd(recipe, mk_out), env=tool_env())
            ws = run_measured(weightsmith_cmd(recipe, ws_out), env=tool_env(offline=False))
            rec["mk_wall_s"], rec["ws_wall_s"] = mk.wall_s, ws.wall_s
            if mk.rc != 0 or not mk_out.exists():
                rec.update(verdict="mergekit failed", error=_last_line(mk.stderr))
            elif ws.rc != 0 or not ws_out.exists():
                rec.update(verdict="weightsmith failed", error=_last_line(ws.stderr))
            else:
                c = compare_checkpoints(ws_out, mk_out, rtol=a.rtol, atol=a.atol, ref_dir=models["base"])
                if c.only_a or c.only_b:
                    verdict = "DIFFERS (tensor names)"
                elif m in RANDOM:
                    verdict = "random: " + ("close" if c.all_close else "differs (expected)")
                elif m == "arcee_fusion" and not c.all_close:
                    big = [t for t in c.tensors if t.numel > ARCEE_SAMPLE]
                    bad_small = [t.name for t in c.tensors if not t.allclose and t.numel <= ARCEE_SAMPLE]
                    frac_big = sum(t.n_beyond for t in big) / max(1, sum(t.numel for t in big))
                    rec["sampled_tensors"] = {"n": len(big), "frac_beyond": frac_big}
                    verdict = (f"match on {c.n_compared - len(big)} tensors <= 1M" if not bad_small
                               else "DIFFERS" if rec["required"] else "differs")
                elif c.all_close:
                    verdict = "match (bit-exact)" if c.max_abs == 0 else "match"
                else:
                    verdict = "DIFFERS" if rec["required"] else "differs"
                    if (m in TOPK_METHODS or m == "sce") and recipe_dtype == "float32":
                        rdict = recipe_for(m, models, recipe_dtype)
                        explain = explain_sce_diffs if m == "sce" else explain_topk_diffs
                        ex = explain(ws_out, mk_out, rdict, a.rtol, a.atol,
                                     [t.name for t in c.tensors if not t.allclose])
                        rec["tie_analysis"] = ex
                        if ex["n_unexplained"] == 0:
                            verdict = f"match except {ex['n_diff']} tied-cut elem."
                    if m in REFERENCE_METHODS and recipe_dtype == "float32":
                        ex = explain_by_reference(ws_out, mk_out, recipe_for(m, models, recipe_dtype), a.rtol, a.atol,
                                                  [t.name for t in c.tensors if not t.allclose])
                        rec["reference_analysis"] = ex
                        if ex["ws_matches_ref"]:
                            worst_mk = max(t["mk"] for t in ex["tensors"])
                            verdict = f"match; mk off fp64 on {len(ex['tensors'])} tensors"
                            rec["note"] = (f"ws within tol of a float64 reference on every differing tensor; "
                                           f"mk's float32 sums are off by up to {worst_mk:.1e} (rel. L2)")
                rec.update(
                    verdict=verdict, n_compared=c.n_compared, max_abs=c.max_abs, frac_beyond=c.frac_beyond,
                    n_allclose=c.n_allclose, only_ws=c.only_a, only_mk=c.only_b, dtypes_match=c.dtypes_match,
                    delta_norm_ratio=c.delta_norm_ratio, unchanged=c.unchanged_fractions,
                    worst=[{"name": t.name, "max_abs": t.max_abs, "frac_beyond": t.n_beyond / t.numel}
                           for t in c.worst(3)])
            rec["ok"] = not rec["required"] or rec["verdict"].startswith("match")
            if rec.get("tie_analysis"):
                ta = rec["tie_analysis"]
                cover = 100 * ta["n_on_tied_cuts"] / ta["n_elems"]
                what = "a variance" if m == "sce" else "a magnitude"
                rec["note"] = (f"{ta['n_tied_cut']} of {ta['n_diff']} differing elem. have {what} "
                               f"tied at a cut ({cover:.2g}% of those tensors' elem. do)")
            if "failed" in rec["verdict"]:
                rec["ok"] = False
            results.append(rec)
            if not a.keep:
                remove_output(mk_out)
                remove_output(ws_out)
            print(f"[{v}] {m:<16} {rec['verdict']:<26} max|diff| {fmt(rec.get('max_abs'), 3)}  "
                  f"(mk {mk.wall_s:.1f} s, ws {ws.wall_s:.1f} s) {rec.get('error', '')}",
                  file=sys.stderr, flush=True)
            data["elapsed_s"] = time.perf_counter() - t0
            write_json(a.json_out, data)

    rows = []
    for r in results:
        unchanged = r.get("unchanged")
        rows.append([r["variant"], r["method"], str(r.get("n_compared", "—")), fmt(r.get("max_abs"), 3),
                     fmt(r.get("frac_beyond"), 4),
                     f"{r['n_allclose']}/{r['n_compared']}" if "n_allclose" in r else "—",
                     fmt(r.get("delta_norm_ratio"), 4),
                     f"{unchanged[0]:.4f} / {unchanged[1]:.4f}" if unchanged else "—",
                     r["verdict"] + (" *" if r["required"] else ""), r.get("error") or r["note"]])
    print()
    data["report"] = print_table(["variant", "method", "tensors compared", "max abs diff", "frac beyond tol",
                                  "allclose", "‖ws−base‖/‖mk−base‖", "= base (ws / mk)", "verdict", "note"], rows)
    print(f"\n* required to match (deterministic method, float32 checkpoints). tolerance: rtol={a.rtol} "
          f"atol={a.atol}; 'frac beyond tol' = elements with |ws-mk| > atol + rtol*|mk|.")
    failed = [r for r in results if not r["ok"]]
    print(f"wrote {a.json_out}; {len(failed)} required comparison(s) failed"
          + (": " + ", ".join(f"{r['variant']}/{r['method']}" for r in failed) if failed else ""))
    write_json(a.json_out, data)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
