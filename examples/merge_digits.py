"""Task arithmetic, TIES, DARE, Breadcrumbs and a uniform soup on sklearn's digits, offline, on a CPU.

The set-up is ``digits-4`` of the research note (``/work/shared/research/merge_algorithms.md`` §3):

* data: ``sklearn.datasets.load_digits`` (1,797 8×8 images, ships with scikit-learn, no download),
  split 70/30 train/test (stratified, fixed), and 20 % of train held out for validation;
* four *tasks*, each a fixed transform of the same images, each 10-way: identity, horizontal
  flip, rotation by 90°, intensity inversion;
* a backbone MLP 64 → H → H (ReLU) read by *cosine* heads with a fixed logit scale (as CLIP's
  zero-shot heads); the base θ0 is the backbone pre-trained for 3 epochs on the identity task;
  each task model θ_t fine-tunes θ0 and a new head on its task (Adam, 20 epochs);
* the **backbone** is merged, each task is evaluated with its own head (the standard
  task-arithmetic protocol), and "the union" is the mean accuracy over the four tasks.

Everything is run in two *regimes* that differ only in the fine-tuning learning rate: ``small``
(1e-3: ‖τ‖ is a fraction of ‖θ0‖) and ``large`` (1e-2: ‖τ‖ exceeds ‖θ0‖ and the task vectors
interfere more), for several seeds. Every model is saved as a safetensors checkpoint folder
(``model.safetensors`` + ``config.json``) under ``examples/out/merge_digits/``; the heads are kept
apart (``heads.safetensors``), since they are not merged.

Merges go through weightsmith itself: the sweeps call the library (``merge.execute.run_merge``)
with mergekit-format recipes, and the selected recipe of every method is then run again with the
real CLI (``weightsmith merge RECIPE.yaml -o OUT --json``); the script checks that the CLI wrote
exactly the tensors the library did. Hyperparameters (λ, density) are chosen on the validation
split, accuracies are reported on the test split.

Claims checked (from the papers; the script reports which hold, it does not assume they do):

1. task arithmetic's multi-task accuracy is peaked in λ (Ilharco et al., 2023);
2. the merged model beats every single fine-tune on the union of tasks;
3. TIES ≥ task arithmetic when the task vectors interfere (Yadav et al., 2023);
4. DARE keeps a model's accuracy at high drop rates when the deltas are small, and breaks when
   they are large (Yu et al., 2024); rescaling by 1/(1 − p) is what makes it work.

Run: ``python examples/merge_digits.py`` (about 2–3 minutes on two busy cores); ``--quick`` runs
the reduced configuration the slow test uses. Writes ``results.json``, ``merge_digits.png`` and
the recipes/checkpoints under ``examples/out/merge_digits/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge.execute import run_merge  # noqa: E402
from merge.plan import MergeOptions  # noqa: E402

OUT = ROOT / "examples" / "out" / "merge_digits"
LOGIT_SCALE = 20.0


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("identity", "hflip", "rot90", "invert")
    hidden: int = 256
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 20
    regimes: dict[str, float] = field(default_factory=lambda: {"small": 1e-3, "large": 1e-2})
    seeds: tuple[int, ...] = (0, 1, 2)
    ta_lambdas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
    #: TIES as in the paper: disjoint *mean* of the agreeing entries (``normalize: true``), then λ.
    ties_lambdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5)
    #: TIES as in FusionBench: *sum* of the agreeing entries (``normalize: false``), λ as for TA.
    ties_sum_lambdas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)
    ties_densities: tuple[float, ...] = (0.2, 0.5)
    breadcrumbs: tuple[float, float] = (0.8, 0.02)  # density, gamma
    dare_drops: tuple[float, ...] = (0.5, 0.7, 0.9, 0.95, 0.99)
    dare_merge_drops: tuple[float, ...] = (0.5, 0.7, 0.9)
    dare_seeds: int = 2  # DARE masks drawn per (model seed, drop rate)
    cli: bool = True
    #: the (regime, seed) runs whose selected recipes are re-run with the CLI (a few seconds per call)
    cli_runs: tuple[tuple[str, int], ...] = (("small", 0),)
    cli_methods: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "ties_sum", "breadcrumbs", "dare_linear",
                                    "dare_ties")
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        """The reduced configuration of the slow test: one seed, coarser grids, shorter training."""
        return Config(
            seeds=(0,), finetune_epochs=12,
            ta_lambdas=(0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0),
            ties_lambdas=(0.2, 0.5, 0.85, 1.25),
            ties_sum_lambdas=(0.1, 0.2, 0.3, 0.5),
            ties_densities=(0.2,),
            dare_drops=(0.5, 0.9, 0.99), dare_merge_drops=(0.9,), dare_seeds=1,
            cli_methods=("task_arithmetic", "dare_ties"), out=out,
        )


# --------------------------------------------------------------------------------------------------
# data and model
# --------------------------------------------------------------------------------------------------
TRANSFORMS = {
    "identity": lambda a: a,
    "hflip": lambda a: a[:, :, ::-1],
    "vflip": lambda a: a[:, ::-1, :],
    "rot90": lambda a: np.rot90(a, 1, (1, 2)),
    "rot180": lambda a: np.rot90(a, 2, (1, 2)),
    "transpose": lambda a: a.transpose(0, 2, 1),
    "invert": lambda a: 1.0 - a,
}


@dataclass
class Split:
    x: dict[str, torch.Tensor]  # task -> inputs (n, 64)
    y: torch.Tensor


def load_data(tasks: tuple[str, ...]) -> dict[str, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    xtr, xva, ytr, yva = train_test_split(xtr, ytr, test_size=0.2, stratify=ytr, random_state=0)

    def split(a: np.ndarray, b: np.ndarray) -> Split:
        img = a.reshape(-1, 8, 8)
        xs = {t: torch.from_numpy(np.ascontiguousarray(TRANSFORMS[t](img)).reshape(len(a), 64)) for t in tasks}
        return Split(xs, torch.from_numpy(b).long())

    return {"train": split(xtr, ytr), "val": split(xva, yva), "test": split(xte, yte)}


def init_backbone(hidden: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``gen``."""
    sd = {}
    for i, (fan_in, fan_out) in enumerate([(64, hidden), (hidden, hidden)]):
        bound = 1 / math.sqrt(fan_in)
        sd[f"layers.{i}.weight"] = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
        sd[f"layers.{i}.bias"] = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
    return sd


def features(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = F.relu(F.linear(x, sd["layers.0.weight"], sd["layers.0.bias"]))
    return F.relu(F.linear(h, sd["layers.1.weight"], sd["layers.1.bias"]))


def logits(sd: dict[str, torch.Tensor], head: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return LOGIT_SCALE * F.normalize(features(sd, x), dim=1) @ F.normalize(head, dim=1).T


def train(sd: dict[str, torch.Tensor], head: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
          epochs: int, lr: float, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    head = head.clone().requires_grad_(True)
    opt = torch.optim.Adam([*params.values(), head], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(logits(params, head, x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in params.items()}, head.detach().clone()


@torch.no_grad()
def accuracies(sd: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], split: Split) -> dict[str, float]:
    return {t: 100.0 * (logits(sd, heads[t], split.x[t]).argmax(1) == split.y).float().mean().item()
            for t in heads}


def mean(xs: Any) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs))


# --------------------------------------------------------------------------------------------------
# checkpoints and merges
# --------------------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, sd: dict[str, torch.Tensor], hidden: int, note: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["DigitsMLPBackbone"], "model_type": "digits_mlp", "in_features": 64,
         "hidden_size": hidden, "num_layers": 2, "torch_dtype": "float32", "note": note}, indent=2))
    return folder


def recipe(method: str, models: list[Path], base: Path | None, *, seed: int = 0,
           per_model: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    """A mergekit-format recipe (``lambda_`` may be passed as ``lam``)."""
    if "lam" in params:
        params["lambda"] = params.pop("lam")
    r: dict[str, Any] = {"merge_method": method}
    if base is not None:
        r["base_model"] = str(base)
    r["models"] = [{"model": str(m), **({"parameters": dict(per_model)} if per_model else {})} for m in models]
    if params:
        r["parameters"] = params
    r["dtype"] = "float32"
    r["seed"] = seed
    return r


class Merger:
    """Runs recipes through ``merge.execute.run_merge`` into a scratch folder and reads them back."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="merge_digits_"))
        self.n = 0
        self.seconds = 0.0

    def __call__(self, r: dict[str, Any]) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = self.tmp / f"m{self.n}"
        self.n += 1
        run_merge(r, out, MergeOptions(workers=1), progress=lambda _p: None)
        sd = load_file(out / "model.safetensors")
        shutil.rmtree(out)
        self.seconds += time.perf_counter() - t0
        return sd

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_cli(recipe_path: Path, out_dir: Path) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("weightsmith")
    cmd = [str(exe), "merge", str(recipe_path), "-o", str(out_dir), "--json", "--overwrite"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout)


# --------------------------------------------------------------------------------------------------
# one (regime, seed) run
# --------------------------------------------------------------------------------------------------
def interference(base: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]], density: float) -> dict[str, float]:
    """How much the task vectors interfere: ‖τ‖/‖θ0‖, mean pairwise cosine of the τ_t, and the fraction
    of entries where the top-``density`` trimmed τ̂_t (per tensor, as TIES) carry both signs."""
    taus = [torch.cat([(ft[k] - base[k]).flatten() for k in base]) for ft in fts]
    theta0 = torch.cat([base[k].flatten() for k in base])
    cos = [F.cosine_similarity(a, b, dim=0).item() for i, a in enumerate(taus) for b in taus[i + 1:]]
    conflict = 0
    total = 0
    for k in base:
        trimmed = []
        for ft in fts:
            d = (ft[k] - base[k]).flatten()
            n_keep = max(1, int(density * d.numel()))
            thr = d.abs().kthvalue(d.numel() - n_keep + 1).values
            trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
        s = torch.stack(trimmed)
        conflict += int(((s > 0).any(0) & (s < 0).any(0)).sum())
        total += s.shape[1]
    return {"tau_over_theta0": mean(t.norm().item() / theta0.norm().item() for t in taus),
            "mean_pairwise_cosine": mean(cos),
            "sign_conflict_fraction": conflict / total}


def run_one(cfg: Config, data: dict[str, Split], regime: str, lr: float, seed: int, merger: Merger) -> dict[str, Any]:
    folder = cfg.out / regime / f"seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    tasks = cfg.tasks
    gen = torch.Generator().manual_seed(seed)
    # --- pre-train θ0 (same for both regimes with the same seed) -------------------------------
    base_sd = init_backbone(cfg.hidden, gen)
    head0 = torch.randn(10, cfg.hidden, generator=gen) * 0.1
    base_sd, _ = train(base_sd, head0, data["train"].x["identity"], data["train"].y,
                       epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, seed=seed)
    base = save_checkpoint(folder / "base", base_sd, cfg.hidden, "pre-trained on identity digits")
    # --- fine-tune one model per task ----------------------------------------------------------
    fts: list[dict[str, torch.Tensor]] = []
    heads: dict[str, torch.Tensor] = {}
    paths: list[Path] = []
    for i, t in enumerate(tasks):
        g = torch.Generator().manual_seed(1000 * seed + 100 + i)
        head = torch.randn(10, cfg.hidden, generator=g) * 0.1
        sd, heads[t] = train(base_sd, head, data["train"].x[t], data["train"].y,
                             epochs=cfg.finetune_epochs, lr=lr, seed=1000 * seed + i)
        fts.append(sd)
        paths.append(save_checkpoint(folder / f"ft_{t}", sd, cfg.hidden, f"fine-tuned on {t} (lr {lr})"))
    save_file(heads, folder / "heads.safetensors")

    def evaluate(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
        va = accuracies(sd, heads, data["val"])
        te = accuracies(sd, heads, data["test"])
        return {"val": mean(va.values()), "test": mean(te.values()), "test_per_task": te}

    res: dict[str, Any] = {"regime": regime, "lr": lr, "seed": seed}
    res["interference"] = interference(base_sd, fts, 0.2)
    res["pretrained"] = evaluate(base_sd)
    res["single"] = {t: evaluate(sd) for t, sd in zip(tasks, fts, strict=True)}
    res["single_own_task"] = {t: res["single"][t]["test_per_task"][t] for t in tasks}
    recipes: dict[str, dict[str, Any]] = {}

    # --- uniform soup (linear, no base) and task arithmetic -----------------------------------
    recipes["linear"] = recipe("linear", paths, None, seed=seed)
    soup_sd = merger(recipes["linear"])
    res["linear"] = evaluate(soup_sd)
    res["ta"] = {}
    ta_sds = {}
    for lam in cfg.ta_lambdas:
        ta_sds[lam] = merger(recipe("task_arithmetic", paths, base, seed=seed, lam=lam))
        res["ta"][lam] = evaluate(ta_sds[lam])
    # identities the engine must satisfy: λ = 0 is θ0; λ = 1/T is the uniform soup
    res["ta_lambda0_is_base"] = all(torch.allclose(ta_sds[0.0][k], base_sd[k], atol=1e-6) for k in base_sd) \
        if 0.0 in ta_sds else None
    quarter = merger(recipe("task_arithmetic", paths, base, seed=seed, lam=1 / len(tasks)))
    res["soup_equals_ta_1_over_T"] = all(torch.allclose(quarter[k], soup_sd[k], atol=1e-5) for k in soup_sd)
    lam_ta = max(cfg.ta_lambdas, key=lambda lam: res["ta"][lam]["val"])
    # interference, functionally: task t's test accuracy with θ0 + λ τ_t alone vs with all task vectors
    alone = {}
    for t, path in zip(tasks, paths, strict=True):
        alone[t] = accuracies(merger(recipe("task_arithmetic", [path], base, seed=seed, lam=lam_ta)),
                              {t: heads[t]}, data["test"])[t]
    res["interference"]["ta_alone_minus_merged"] = mean(alone[t] - res["ta"][lam_ta]["test_per_task"][t]
                                                        for t in tasks)
    res["interference"]["ta_normalized_accuracy"] = mean(res["ta"][lam_ta]["test_per_task"][t]
                                                         / res["single_own_task"][t] for t in tasks)
    recipes["task_arithmetic"] = recipe("task_arithmetic", paths, base, seed=seed, lam=lam_ta)
    res["ta_selected"] = {"lambda": lam_ta, **res["ta"][lam_ta]}

    # --- TIES: paper (disjoint mean) and FusionBench (sum) ------------------------------------
    for variant, normalize, grid in (("ties", True, cfg.ties_lambdas), ("ties_sum", False, cfg.ties_sum_lambdas)):
        sweep: dict[str, dict[float, Any]] = {}
        for d in cfg.ties_densities:
            sweep[str(d)] = {lam: evaluate(merger(recipe("ties", paths, base, seed=seed, per_model={"density": d},
                                                         lam=lam, normalize=normalize)))
                             for lam in grid}
        res[variant] = sweep
        d_best, lam_best = max(((d, lam) for d in sweep for lam in grid), key=lambda dl: sweep[dl[0]][dl[1]]["val"])
        recipes[variant] = recipe("ties", paths, base, seed=seed, per_model={"density": float(d_best)},
                                  lam=lam_best, normalize=normalize)
        res[f"{variant}_selected"] = {"density": float(d_best), "lambda": lam_best, **sweep[d_best][lam_best]}

    # ablation: TIES-sum without the sign election = magnitude trim + sum = Breadcrumbs with γ = 0
    trim: dict[str, dict[float, Any]] = {}
    for d in cfg.ties_densities:
        trim[str(d)] = {lam: evaluate(merger(recipe("breadcrumbs", paths, base, seed=seed, lam=lam,
                                                    per_model={"density": d, "gamma": 0.0})))
                        for lam in cfg.ties_sum_lambdas}
    res["trim_only"] = trim
    d_best, lam_best = max(((d, lam) for d in trim for lam in cfg.ties_sum_lambdas),
                           key=lambda dl: trim[dl[0]][dl[1]]["val"])
    res["trim_only_selected"] = {"density": float(d_best), "lambda": lam_best, **trim[d_best][lam_best]}
    res["ties_any_selected"] = max((dict(res[v], variant=v) for v in ("ties_selected", "ties_sum_selected")),
                                   key=lambda x: x["val"])

    # --- Breadcrumbs (if the engine has it), λ on the TA grid ---------------------------------
    bc_density, bc_gamma = cfg.breadcrumbs
    grid = [lam for lam in cfg.ta_lambdas if lam > 0]
    res["breadcrumbs"] = {lam: evaluate(merger(recipe("breadcrumbs", paths, base, seed=seed, lam=lam, per_model={
        "density": bc_density, "gamma": bc_gamma}))) for lam in grid}
    lam_bc = max(grid, key=lambda lam: res["breadcrumbs"][lam]["val"])
    recipes["breadcrumbs"] = recipe("breadcrumbs", paths, base, seed=seed, lam=lam_bc,
                                    per_model={"density": bc_density, "gamma": bc_gamma})
    res["breadcrumbs_selected"] = {"density": bc_density, "gamma": bc_gamma, "lambda": lam_bc,
                                   **res["breadcrumbs"][lam_bc]}

    # --- DARE on one model at a time: θ0 + DARE_p(τ_t), with and without rescale -------------
    dare_single: dict[str, Any] = {}
    for p in cfg.dare_drops:
        for rescale in (True, False) if p == 0.9 else (True,):
            own = []
            for k in range(cfg.dare_seeds):
                for t, path in zip(tasks, paths, strict=True):
                    sd = merger(recipe("dare_linear", [path], base, seed=1000 * seed + k,
                                       per_model={"density": round(1 - p, 6)}, rescale=rescale))
                    own.append(accuracies(sd, {t: heads[t]}, data["test"])[t])
            dare_single[f"p={p},rescale={rescale}"] = {"p": p, "rescale": rescale, "own_task_test": mean(own),
                                                       "runs": own}
    res["dare_single"] = dare_single

    # --- DARE inside the multi-task merge: dare_linear at TA's λ, dare_ties at TIES-sum's -----
    res["dare_linear"] = {}
    for p in cfg.dare_merge_drops:
        runs = [evaluate(merger(recipe("dare_linear", paths, base, seed=1000 * seed + k,
                                       per_model={"density": round(1 - p, 6)}, lam=lam_ta)))
                for k in range(cfg.dare_seeds)]
        res["dare_linear"][p] = {"lambda": lam_ta, "test": mean(r["test"] for r in runs),
                                 "val": mean(r["val"] for r in runs)}
    p_top = max(cfg.dare_merge_drops)
    recipes["dare_linear"] = recipe("dare_linear", paths, base, seed=1000 * seed,
                                    per_model={"density": round(1 - p_top, 6)}, lam=lam_ta)
    lam_ts = res["ties_sum_selected"]["lambda"]
    recipes["dare_ties"] = recipe("dare_ties", paths, base, seed=1000 * seed,
                                  per_model={"density": round(1 - p_top, 6)}, lam=lam_ts)
    res["dare_ties"] = {"p": p_top, "lambda": lam_ts, **evaluate(merger(recipes["dare_ties"]))}

    # --- the selected recipe of every method, through the real CLI -----------------------------
    res["cli"] = {}
    (folder / "recipes").mkdir(parents=True, exist_ok=True)
    for name, r in recipes.items():
        path = folder / "recipes" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(r, sort_keys=False))
        if not cfg.cli or (regime, seed) not in cfg.cli_runs or name not in cfg.cli_methods:
            continue
        out_dir = folder / "merged" / name
        summary = run_cli(path, out_dir)
        cli_sd = load_file(out_dir / "model.safetensors")
        lib_sd = merger(r)
        res["cli"][name] = {"n_tensors": summary["n_tensors"], "seconds": summary["seconds"],
                            "identical_to_library": all(torch.equal(cli_sd[k], lib_sd[k]) for k in lib_sd),
                            **evaluate(cli_sd)}
    return res


# --------------------------------------------------------------------------------------------------
# summary, claims, table, plot
# --------------------------------------------------------------------------------------------------
def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "n": len(xs)}


def summarise(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for regime in cfg.regimes:
        rs = [r for r in runs if r["regime"] == regime]
        s: dict[str, Any] = {
            "interference": {k: _ms([r["interference"][k] for r in rs]) for k in rs[0]["interference"]},
            "single_own_task": _ms([mean(r["single_own_task"].values()) for r in rs]),
            "best_single_union": _ms([max(v["test"] for v in r["single"].values()) for r in rs]),
            "pretrained": _ms([r["pretrained"]["test"] for r in rs]),
            "linear": _ms([r["linear"]["test"] for r in rs]),
            "ta_curve": {str(lam): _ms([r["ta"][lam]["test"] for r in rs]) for lam in cfg.ta_lambdas},
            "ta_curve_val": {str(lam): _ms([r["ta"][lam]["val"] for r in rs]) for lam in cfg.ta_lambdas},
        }
        for m in ("ta", "ties", "ties_sum", "ties_any", "trim_only", "breadcrumbs"):
            s[m] = _ms([r[f"{m}_selected"]["test"] for r in rs])
            s[m]["chosen"] = [{k: v for k, v in r[f"{m}_selected"].items() if k in ("lambda", "density", "variant")}
                              for r in rs]
        for d in cfg.ties_densities:
            s[f"ties_curve_d{d}"] = {str(lam): _ms([r["ties"][str(d)][lam]["test"] for r in rs])
                                     for lam in cfg.ties_lambdas}
            s[f"ties_sum_curve_d{d}"] = {str(lam): _ms([r["ties_sum"][str(d)][lam]["test"] for r in rs])
                                         for lam in cfg.ties_sum_lambdas}
            s[f"trim_only_curve_d{d}"] = {str(lam): _ms([r["trim_only"][str(d)][lam]["test"] for r in rs])
                                          for lam in cfg.ties_sum_lambdas}
        s["dare_single"] = {k: _ms([r["dare_single"][k]["own_task_test"] for r in rs]) | {
            "p": rs[0]["dare_single"][k]["p"], "rescale": rs[0]["dare_single"][k]["rescale"]}
            for k in rs[0]["dare_single"]}
        s["dare_linear"] = {str(p): _ms([r["dare_linear"][p]["test"] for r in rs]) for p in cfg.dare_merge_drops}
        s["dare_ties"] = _ms([r["dare_ties"]["test"] for r in rs])
        s["cli_identical_to_library"] = all(c["identical_to_library"] for r in rs for c in r["cli"].values())
        s["soup_equals_ta_1_over_T"] = all(r["soup_equals_ta_1_over_T"] for r in rs)
        out[regime] = s
    return out


def claims(cfg: Config, runs: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Each claim with the evidence it rests on and whether it holds in every seed / on average."""
    c: dict[str, Any] = {}
    small, large = "small", "large"
    # 1. TA peaked in λ (per regime, on the mean test curve and in every seed's validation curve)
    for regime in cfg.regimes:
        curve = summary[regime]["ta_curve"]
        lams = list(cfg.ta_lambdas)
        accs = [curve[str(lam)]["mean"] for lam in lams]
        i = int(np.argmax(accs))
        interior = 0 < i < len(lams) - 1
        per_seed = []
        for r in runs:
            if r["regime"] == regime:
                v = [r["ta"][lam]["val"] for lam in lams]
                j = int(np.argmax(v))
                per_seed.append(0 < j < len(lams) - 1)
        c[f"ta_peaked_{regime}"] = {
            "holds": bool(interior and accs[i] - accs[0] >= 10 and accs[i] - accs[-1] >= 10),
            "argmax_lambda": lams[i], "peak": accs[i], "at_lambda_min": accs[0], "at_lambda_max": accs[-1],
            "interior_peak_every_seed_val": all(per_seed)}
    # 2. the merged model beats every single fine-tune on the union (every seed)
    for regime in cfg.regimes:
        rows = [r for r in runs if r["regime"] == regime]
        margins = [r["ta_selected"]["test"] - max(v["test"] for v in r["single"].values()) for r in rows]
        c[f"merge_beats_singles_{regime}"] = {"holds": all(m > 0 for m in margins), "ta_minus_best_single": margins}
    # 3. TIES >= TA when the task vectors interfere (mean over seeds; per seed shown)
    for regime in cfg.regimes:
        rows = [r for r in runs if r["regime"] == regime]
        best_ties = [r["ties_any_selected"]["test"] for r in rows]
        diff_paper = [r["ties_selected"]["test"] - r["ta_selected"]["test"] for r in rows]
        diff_sum = [r["ties_sum_selected"]["test"] - r["ta_selected"]["test"] for r in rows]
        c[f"ties_ge_ta_{regime}"] = {
            "holds": bool(np.mean(best_ties) >= np.mean([r["ta_selected"]["test"] for r in rows])),
            "ties_minus_ta_per_seed": [b - r["ta_selected"]["test"] for b, r in zip(best_ties, rows, strict=True)],
            "ties_mean_minus_ta_per_seed": diff_paper, "ties_sum_minus_ta_per_seed": diff_sum,
            "trim_only_minus_ta_per_seed": [r["trim_only_selected"]["test"] - r["ta_selected"]["test"] for r in rows],
            "ta_accuracy_lost_to_interference": summary[regime]["interference"]["ta_alone_minus_merged"]["mean"],
            "sign_conflict_fraction": summary[regime]["interference"]["sign_conflict_fraction"]["mean"]}
    # 4. DARE at p = 0.9: small deltas survive, large deltas break; rescale matters
    if "p=0.9,rescale=True" in summary[small]["dare_single"]:
        def kept(regime: str, key: str) -> float:
            return summary[regime]["dare_single"][key]["mean"] / summary[regime]["single_own_task"]["mean"]

        ks, kl = kept(small, "p=0.9,rescale=True"), kept(large, "p=0.9,rescale=True")
        c["dare_small_deltas_survive_p0.9"] = {"holds": ks >= 0.8, "fraction_of_finetuned_accuracy_kept": ks}
        c["dare_large_deltas_break_p0.9"] = {"holds": kl <= 0.6, "fraction_of_finetuned_accuracy_kept": kl}
        c["dare_rescale_matters_p0.9"] = {
            "holds": kept(small, "p=0.9,rescale=True") - kept(small, "p=0.9,rescale=False") >= 0.2,
            "kept_with_rescale": ks, "kept_without": kept(small, "p=0.9,rescale=False")}
    return c


def table(cfg: Config, summary: dict[str, Any]) -> str:
    def f(ms: dict[str, float]) -> str:
        return f"{ms['mean']:5.1f} ± {ms['std']:3.1f}"

    lines = []
    regimes = list(cfg.regimes)
    head = f"{'test accuracy, mean over tasks (%)':44s}" + "".join(
        f"{r + ' Δ (lr ' + format(cfg.regimes[r], 'g') + ')':>22s}" for r in regimes)
    lines += [head, "-" * len(head)]

    def row(label: str, key: Any) -> None:
        lines.append(f"{label:44s}" + "".join(f"{key(summary[r]):>22s}" for r in regimes))

    row("each fine-tune on its own task", lambda s: f(s["single_own_task"]))
    row("best single fine-tune on the union", lambda s: f(s["best_single_union"]))
    row("pre-trained θ0 (task heads)", lambda s: f(s["pretrained"]))
    row("linear (uniform soup)", lambda s: f(s["linear"]))
    row("task_arithmetic (λ on val)", lambda s: f(s["ta"]))
    row("ties, disjoint mean (k, λ on val)", lambda s: f(s["ties"]))
    row("ties, sum (normalize: false; k, λ on val)", lambda s: f(s["ties_sum"]))
    row("ties, variant, k and λ on val", lambda s: f(s["ties_any"]))
    row("  ablation: trim + sum, no sign election", lambda s: f(s["trim_only"]))
    row(f"breadcrumbs (k {cfg.breadcrumbs[0]}, γ {cfg.breadcrumbs[1]}; λ on val)", lambda s: f(s["breadcrumbs"]))
    for p in cfg.dare_merge_drops:
        row(f"dare_linear p={p} (TA's λ)", lambda s, p=p: f(s["dare_linear"][str(p)]))
    row(f"dare_ties p={max(cfg.dare_merge_drops)} (TIES-sum's λ)", lambda s: f(s["dare_ties"]))
    lines.append("")
    lines.append(f"{'task-arithmetic λ sweep':44s}")
    for lam in cfg.ta_lambdas:
        row(f"  λ = {lam}", lambda s, lam=lam: f(s["ta_curve"][str(lam)]))
    lines.append("")
    lines.append(f"{'DARE on one model: θ0 + DARE_p(τ_t), own task':44s}")
    for k in summary[regimes[0]]["dare_single"]:
        row(f"  {k}", lambda s, k=k: f(s["dare_single"][k]))
    lines.append("")
    lines.append(f"{'task-vector interference':44s}")
    row("  ‖τ‖ / ‖θ0‖", lambda s: f"{s['interference']['tau_over_theta0']['mean']:10.2f}")
    row("  mean pairwise cos(τ_s, τ_t)", lambda s: f"{s['interference']['mean_pairwise_cosine']['mean']:10.3f}")
    row("  sign conflicts after top-20% trim", lambda s: f"{s['interference']['sign_conflict_fraction']['mean']:10.3f}")
    row("  TA: acc(θ0+λτ_t) − acc(merge), points", lambda s: f(s["interference"]["ta_alone_minus_merged"]))
    row("  TA normalized accuracy (merge / fine-tune)",
        lambda s: f"{s['interference']['ta_normalized_accuracy']['mean']:10.3f}")
    return "\n".join(lines)


def plot(cfg: Config, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"small": "tab:blue", "large": "tab:red"}
    fig, axs = plt.subplots(2, 2, figsize=(14, 10))
    ax = axs.ravel()

    def band(a: Any, xs: list[float], curve: dict[str, Any], **kw: Any) -> None:
        m = np.array([curve[str(x)]["mean"] for x in xs])
        sd = np.array([curve[str(x)]["std"] for x in xs])
        a.plot(xs, m, marker="o", ms=3, **kw)
        a.fill_between(xs, m - sd, m + sd, alpha=0.15, color=kw.get("color"))

    for regime, s in summary.items():
        col = colors.get(regime)
        band(ax[0], list(cfg.ta_lambdas), s["ta_curve"], color=col, label=f"TA, {regime} Δ")
        ax[0].axhline(s["best_single_union"]["mean"], color=col, ls=":", lw=1)
        for d in cfg.ties_densities:
            band(ax[1], list(cfg.ties_sum_lambdas), s[f"ties_sum_curve_d{d}"], color=col,
                 ls="--" if d == cfg.ties_densities[0] else "-.", label=f"TIES-sum k={d}, {regime} Δ")
        band(ax[1], list(cfg.ta_lambdas), s["ta_curve"], color=col, label=f"TA, {regime} Δ")
        d0 = cfg.ties_densities[0]
        band(ax[1], list(cfg.ties_sum_lambdas), s[f"trim_only_curve_d{d0}"], color=col, ls=":",
             label=f"trim k={d0} + sum, no election, {regime} Δ")
        for d in cfg.ties_densities:
            band(ax[2], list(cfg.ties_lambdas), s[f"ties_curve_d{d}"], color=col,
                 ls="--" if d == cfg.ties_densities[0] else "-.", label=f"TIES-mean k={d}, {regime} Δ")
        ps = [v["p"] for v in s["dare_single"].values() if v["rescale"]]
        ms_ = [v["mean"] for v in s["dare_single"].values() if v["rescale"]]
        base_acc = s["single_own_task"]["mean"]
        ax[3].plot([0.0, *ps], [base_acc, *ms_], marker="o", color=col, label=f"DARE (rescale), {regime} Δ")
        no = [v for v in s["dare_single"].values() if not v["rescale"]]
        if no:
            ax[3].scatter([v["p"] for v in no], [v["mean"] for v in no], marker="x", s=60, color=col,
                          label=f"no rescale, {regime} Δ")
    ax[0].set(title="task arithmetic: mean test accuracy vs λ\n(dotted: best single fine-tune on the union)",
              xlabel="λ", ylabel="accuracy (%)")
    ax[1].set(title="TIES (sum of agreeing entries) vs TA", xlabel="λ")
    ax[2].set(title="TIES (disjoint mean, the paper's)", xlabel="λ")
    ax[3].set(title="DARE on one model: own-task accuracy", xlabel="drop rate p")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    return o


def main(cfg: Config | None = None, *, verbose: bool = True) -> dict[str, Any]:
    cfg = cfg or Config()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.tasks)
    merger = Merger()
    runs = []
    try:
        for regime, lr in cfg.regimes.items():
            for seed in cfg.seeds:
                t1 = time.perf_counter()
                runs.append(run_one(cfg, data, regime, lr, seed, merger))
                if verbose:
                    print(f"[{regime} Δ, seed {seed}] done in {time.perf_counter() - t1:.1f} s", flush=True)
    finally:
        merger.close()
        torch.set_num_threads(threads)
    summary = summarise(cfg, runs)
    result = {"config": asdict(cfg), "summary": summary, "claims": claims(cfg, runs, summary), "runs": runs,
              "merges": merger.n, "merge_seconds": merger.seconds, "seconds": time.perf_counter() - t0}
    result = _jsonable(result)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(cfg, summary, cfg.out / "merge_digits.png")
    result["table"] = table(cfg, summary)
    if verbose:
        print()
        print(result["table"])
        print()
        for name, cl in result["claims"].items():
            print(f"{'HOLDS ' if cl['holds'] else 'FAILS '} {name}: "
                  + ", ".join(f"{k}={_fmt(v)}" for k, v in cl.items() if k != "holds"))
        print(f"\n{merger.n} merges ({merger.seconds:.1f} s in the engine), total {result['seconds']:.1f} s; "
              f"CLI output identical to the library's: "
              f"{all(s['cli_identical_to_library'] for s in summary.values())}")
        print(f"wrote {cfg.out / 'results.json'} and {cfg.out / 'merge_digits.png'}")
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration of the slow test")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI re-runs of the selected recipes")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    c = Config.quick(a.out) if a.quick else Config(out=a.out)
    if a.no_cli:
        c = replace(c, cli=False)
    main(c)
