"""AdaMerging and Concrete subspace masks on "digits-8", offline, on a CPU.

The question: do the data-driven merges beat task arithmetic the way the papers say (Tang et al.,
arXiv:2312.06173, 8 CLIP ViT-B/32 tasks: TA 69.0 → Concrete TA 77.3; layer-wise AdaMerging 80.9 →
Concrete AdaMerging 84.0; Yang et al., ICLR 2024: task-wise 70.7 < layer-wise 80.9)? The research
note (``merge_algorithms.md`` §3.5) found that a 128-wide digits MLP cannot show it: its task
vectors do not tolerate random drop-and-rescale, so the Concrete sampling noise dominates. This
example first checks that its set-up is one where the mechanism applies, then runs the table.

Set-up (``SetupConfig``):

* data: ``sklearn.datasets.load_digits`` (1,797 8×8 images), split 70/30 train/test (stratified,
  fixed) and 20 % of train held out for validation;
* eight tasks, each a fixed transform of the same images (10-way): rotations by 90°, 180°, 270°,
  horizontal and vertical flips, transpose, intensity inversion and a fixed pixel permutation;
* a wide backbone MLP 64 → 1024 → 1024 (ReLU), pre-trained 3 epochs on the untransformed digits;
  each task model fine-tunes it together with its own cosine head (logit scale 20) for 10 epochs at
  a small learning rate (Adam 5e-4), so the task vectors are small (‖τ‖ ≈ 0.2 ‖θ_0‖);
* the backbone is merged, each task is evaluated with its own head; "average" is the mean test
  accuracy over the eight tasks.

Check first: task arithmetic (λ chosen on validation) loses at least 10 points of average accuracy
against the individual fine-tunes, and DARE at density 0.5 (same λ) stays within 1 point of it.

The table: individual fine-tunes, task arithmetic (λ = 0.3 as in the papers, and λ on validation),
TIES, AdaMerging task-wise and layer-wise, Concrete Task Arithmetic and Concrete (layer-wise)
AdaMerging, average and per task, over several model seeds. As in the papers, the unlabelled
inputs of the data-driven methods are the test images of each task (labels never used) and the
objective is the entropy of each task's predictions through its frozen head. The heads' logit
scale for that objective is 100, CLIP's (accuracy does not depend on it); at the heads' training
scale 20 the merged model's predictions are nearly uniform and entropy minimisation is a poor proxy
(an ablation below shows it). The hyperparameters are the papers' (λ 0.3, κ 0.5, logits from 0,
Adam 1e-3 for λ and for the mask, inner rate 1.0, batch 16 per task) with step budgets cut for a CPU
(AdaMerging 300 steps, Concrete TA 500, Concrete AdaMerging 300 + 300). Ablations on seed 0: the
labelled cross-entropy on the validation split in place of the entropy (the mechanism without the
proxy), the training logit scale, and a 10× mask learning rate (to make up for the shorter budget).

Concrete TA of the first seed runs through the real CLI (``weightsmith merge RECIPE --allow-code``
with this file's :func:`cli_problem` as the entry point); the script checks that the merged
checkpoint is the one the library gets from the saved plan, and that re-running the CLI from that
plan alone (no code, no data) writes the same bytes.

Run: ``python examples/concrete_merging.py`` (3 model seeds; about 8 minutes on a quiet 2-core
machine, 20 on a loaded one); ``--seeds 0`` for one seed; ``--quick`` for the reduced
configuration of the slow test. Writes ``results.json`` and ``concrete_merging.png`` under
``examples/out/concrete_merging/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge.methods import get_method  # noqa: E402
from merge.methods.concrete import (  # noqa: E402
    FusionPlan,
    FusionProblem,
    FusionTask,
    cross_entropy_loss,
    entropy_loss,
    learn_adamerging,
    learn_concrete_adamerging,
    learn_concrete_task_arithmetic,
)
from merge.methods.runner import merge_tensors  # noqa: E402

OUT = ROOT / "examples" / "out" / "concrete_merging"
TASKS8 = ("rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "invert", "permute")
_PERM = torch.randperm(64, generator=torch.Generator().manual_seed(123)).numpy()
TRANSFORMS = {
    "identity": lambda a: a,
    "hflip": lambda a: a[:, :, ::-1],
    "vflip": lambda a: a[:, ::-1, :],
    "rot90": lambda a: np.rot90(a, 1, (1, 2)),
    "rot180": lambda a: np.rot90(a, 2, (1, 2)),
    "rot270": lambda a: np.rot90(a, 3, (1, 2)),
    "transpose": lambda a: a.transpose(0, 2, 1),
    "invert": lambda a: 1.0 - a,
    "permute": lambda a: a.reshape(len(a), 64)[:, _PERM].reshape(-1, 8, 8),
}


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SetupConfig:
    """The models: backbone width, tasks, pre-training and fine-tuning."""

    tasks: tuple[str, ...] = TASKS8
    hidden: int = 1024
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 10
    finetune_lr: float = 5e-4
    logit_scale: float = 20.0  # the heads' training scale
    seed: int = 0

    @staticmethod
    def unit() -> SetupConfig:
        """A small set-up for unit tests (seconds): 4 tasks, 128 wide."""
        return SetupConfig(
            tasks=("rot90", "hflip", "invert", "permute"), hidden=128, finetune_epochs=8, finetune_lr=1e-3
        )


@dataclass(frozen=True)
class Config:
    setup: SetupConfig = field(default_factory=SetupConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    ta_lambdas: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
    ties_lambdas: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.7)
    ties_density: float = 0.2
    dare_seeds: int = 2
    objective_scale: float = 100.0
    batch_size: int = 16
    ada_steps: int = 300
    ada_lr: float = 1e-3
    concrete_steps: int = 500
    mask_lr: float = 1e-3  # the paper's
    fast_mask_lr: float = 1e-2  # ablation: 10x, for the shorter step budget
    cada_mask_steps: int = 300
    cada_steps: int = 300
    ablations: bool = True  # on the first seed
    cli: bool = True  # Concrete TA of the first seed through the CLI
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        """The slow test's configuration: one seed, 4 tasks, 256 wide, short runs."""
        return Config(
            setup=SetupConfig(tasks=("rot90", "hflip", "invert", "permute"), hidden=256, finetune_epochs=6),
            seeds=(0,),
            ta_lambdas=(0.2, 0.3, 0.4),
            ties_lambdas=(0.3, 0.5),
            dare_seeds=1,
            ada_steps=40,
            concrete_steps=60,
            cada_mask_steps=30,
            cada_steps=30,
            ablations=False,
            out=out,
        )


# --------------------------------------------------------------------------------------------------
# data, model, training
# --------------------------------------------------------------------------------------------------
@dataclass
class Split:
    x: dict[str, torch.Tensor]
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
        xs = {
            t: torch.from_numpy(np.ascontiguousarray(TRANSFORMS[t](img)).reshape(len(a), 64))
            for t in ("identity", *tasks)
        }
        return Split(xs, torch.from_numpy(b).long())

    return {"train": split(xtr, ytr), "val": split(xva, yva), "test": split(xte, yte)}


class Backbone(nn.Module):
    """64 → H → H ReLU MLP; its parameter names are the checkpoints' tensor names."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, hidden), nn.Linear(hidden, hidden)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.layers[1](F.relu(self.layers[0](x))))


class CosineHead(nn.Module):
    """``scale · cos(z, w_c)`` per class (like CLIP's zero-shot heads); frozen (buffers)."""

    def __init__(self, weight: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(weight.float(), dim=1))
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(z, dim=1) @ self.weight.T


def features(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = F.relu(F.linear(x, sd["layers.0.weight"], sd["layers.0.bias"]))
    return F.relu(F.linear(h, sd["layers.1.weight"], sd["layers.1.bias"]))


def logits(sd: dict[str, torch.Tensor], head: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(features(sd, x), dim=1) @ F.normalize(head, dim=1).T


def train(
    sd: dict[str, torch.Tensor],
    head: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    scale: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    head = head.clone().requires_grad_(True)
    opt = torch.optim.Adam([*params.values(), head], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(logits(params, head, x[idx], scale), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in params.items()}, head.detach().clone()


def mean(xs: Any) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs))


class DigitsSetup:
    """θ_0, the fine-tunes θ_t, their heads and the data of one model seed."""

    def __init__(
        self,
        cfg: SetupConfig,
        data: dict[str, Split],
        base: dict[str, torch.Tensor],
        models: list[dict[str, torch.Tensor]],
        heads: dict[str, torch.Tensor],
    ) -> None:
        self.cfg, self.data, self.base, self.models, self.heads = cfg, data, base, models, heads

    @classmethod
    def build(cls, cfg: SetupConfig, data: dict[str, Split] | None = None) -> DigitsSetup:
        data = data or load_data(cfg.tasks)
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        base = {k: v.detach().clone() for k, v in Backbone(cfg.hidden).state_dict().items()}
        head0 = torch.randn(10, cfg.hidden, generator=gen) * 0.1
        base, _ = train(
            base,
            head0,
            data["train"].x["identity"],
            data["train"].y,
            epochs=cfg.pretrain_epochs,
            lr=cfg.pretrain_lr,
            seed=cfg.seed,
            scale=cfg.logit_scale,
        )
        models, heads = [], {}
        for i, t in enumerate(cfg.tasks):
            g = torch.Generator().manual_seed(1000 * cfg.seed + 100 + i)
            sd, heads[t] = train(
                base,
                torch.randn(10, cfg.hidden, generator=g) * 0.1,
                data["train"].x[t],
                data["train"].y,
                epochs=cfg.finetune_epochs,
                lr=cfg.finetune_lr,
                seed=1000 * cfg.seed + i,
                scale=cfg.logit_scale,
            )
            models.append(sd)
        return cls(cfg, data, base, models, heads)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, sd: dict[str, torch.Tensor], split: str = "test") -> dict[str, Any]:
        s = self.data[split]
        per = {
            t: 100.0
            * (logits(sd, self.heads[t], s.x[t], self.cfg.logit_scale).argmax(1) == s.y).float().mean().item()
            for t in self.cfg.tasks
        }
        return {"mean": mean(per.values()), "per_task": per}

    def individual(self) -> dict[str, Any]:
        per = {t: self.evaluate(sd)["per_task"][t] for t, sd in zip(self.cfg.tasks, self.models, strict=True)}
        return {"mean": mean(per.values()), "per_task": per}

    @torch.no_grad()
    def mean_entropy(self, sd: dict[str, torch.Tensor], scale: float) -> float:
        s = self.data["test"]
        return mean(float(entropy_loss(logits(sd, self.heads[t], s.x[t], scale))) for t in self.cfg.tasks)

    # -- the data-free merges, through the method registry (what the engine runs) -----------------
    def _merge(self, method: str, params: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
        spec = get_method(method)
        return {
            k: merge_tensors(spec, [m[k] for m in self.models], self.base[k], params, name=k, seed=seed)
            for k in self.base
        }

    def task_arithmetic(self, lam: float) -> dict[str, torch.Tensor]:
        return self._merge("task_arithmetic", {"lambda_": lam})

    def ties(self, lam: float, density: float) -> dict[str, torch.Tensor]:
        # FusionBench's TIES: the sum of the agreeing trimmed entries (normalize: false), then λ
        return self._merge(
            "ties", {"lambda_": lam, "density": [density] * len(self.models), "normalize": False}
        )

    def dare(self, lam: float, density: float, seed: int) -> dict[str, torch.Tensor]:
        return self._merge(
            "dare_linear", {"lambda_": lam, "density": [density] * len(self.models)}, seed=seed
        )

    # -- the data-driven merges ------------------------------------------------------------------
    def problem(self, *, objective: str = "entropy", scale: float = 100.0) -> FusionProblem:
        """Entropy on each task's unlabelled test inputs, or (``labelled``) cross-entropy on its validation split."""
        tasks = []
        for t in self.cfg.tasks:
            head = CosineHead(self.heads[t], scale)
            if objective == "entropy":
                tasks.append(FusionTask(t, self.data["test"].x[t], head=head, loss=entropy_loss))
            else:
                tasks.append(
                    FusionTask(
                        t, (self.data["val"].x[t], self.data["val"].y), head=head, loss=cross_entropy_loss
                    )
                )
        return FusionProblem(Backbone(self.cfg.hidden), tasks)

    # -- files (for the CLI) -----------------------------------------------------------------------
    def save(self, folder: Path) -> tuple[Path, list[Path]]:
        def ckpt(sub: str, sd: dict[str, torch.Tensor]) -> Path:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, folder / sub / "model.safetensors")
            (folder / sub / "config.json").write_text(
                json.dumps(
                    {
                        "architectures": ["DigitsMLPBackbone"],
                        "hidden_size": self.cfg.hidden,
                        "in_features": 64,
                    }
                )
            )
            return folder / sub

        base = ckpt("base", self.base)
        models = [ckpt(f"ft_{t}", sd) for t, sd in zip(self.cfg.tasks, self.models, strict=True)]
        save_file({t: h.contiguous() for t, h in self.heads.items()}, folder / "heads.safetensors")
        (folder / "setup.json").write_text(json.dumps(asdict(self.cfg)))
        return base, models


def cli_problem(device: str = "cpu") -> FusionProblem:
    """The recipe's entry point: the set-up saved in ``$CONCRETE_MERGING_SETUP`` (heads, config; data from sklearn)."""
    folder = Path(os.environ.get("CONCRETE_MERGING_SETUP", OUT / "seed0" / "setup"))
    cfg_raw = json.loads((folder / "setup.json").read_text())
    cfg = SetupConfig(**{**cfg_raw, "tasks": tuple(cfg_raw["tasks"])})
    heads = load_file(folder / "heads.safetensors")
    scale = float(os.environ.get("CONCRETE_MERGING_SCALE", "100"))
    setup = DigitsSetup(cfg, load_data(cfg.tasks), {}, [], heads)
    return setup.problem(objective="entropy", scale=scale)


# --------------------------------------------------------------------------------------------------
# one model seed
# --------------------------------------------------------------------------------------------------
def _plan_result(setup: DigitsSetup, plan: FusionPlan, seconds: float, cfg: Config) -> dict[str, Any]:
    merged = plan.merge(setup.base, setup.models)
    res = setup.evaluate(merged)
    hist = plan.info.get("history", {}).get("loss", {})
    res.update(
        {
            "seconds": round(seconds, 2),
            "lambda_mean_per_task": [round(x, 4) for x in plan.lambdas.mean(1).tolist()],
            "kept_fraction": plan.kept_fraction(),
            "keep_probability": plan.info.get("keep_probability"),
            "loss_first_last": {ph: [h["first"], h["last"]] for ph, h in hist.items()},
            "loss_curve": {ph: {"stride": h["stride"], "values": h["values"]} for ph, h in hist.items()},
            "mean_entropy_test": setup.mean_entropy(merged, cfg.objective_scale),
            "inner_lambda_shift": plan.info.get("inner_lambda_shift"),
        }
    )
    return res


def run_cli_concrete(setup: DigitsSetup, cfg: Config, folder: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Concrete TA through ``weightsmith merge --allow-code``, checked against the library; then from the plan."""
    base, models = setup.save(folder / "setup")
    exe = Path(sys.executable).with_name("weightsmith")
    env = {
        **os.environ,
        "CONCRETE_MERGING_SETUP": str(folder / "setup"),
        "CONCRETE_MERGING_SCALE": str(cfg.objective_scale),
        # one torch thread, as the in-process runs (comparable numbers; on a busy 2-core machine two
        # spinning OpenMP threads made this run 10x slower)
        "OMP_NUM_THREADS": "1",
    }
    recipe = {
        "merge_method": "concrete_task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": {"entry_point": f"{Path(__file__).resolve()}:cli_problem", **params},
        "dtype": "float32",
        "seed": setup.cfg.seed,
    }
    rpath = folder / "recipes" / "concrete_task_arithmetic.yaml"
    rpath.parent.mkdir(parents=True, exist_ok=True)
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))

    def cli(r: Path, out: Path, *flags: str) -> dict[str, Any]:
        cmd = [str(exe), "merge", str(r), "-o", str(out), "--json", "--overwrite", *flags]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
        return json.loads(p.stdout)

    t0 = time.perf_counter()
    cli(rpath, folder / "merged" / "concrete_task_arithmetic", "--allow-code")
    seconds = time.perf_counter() - t0
    out = folder / "merged" / "concrete_task_arithmetic"
    plan = FusionPlan.load(out / "fusion_plan")
    written = load_file(out / "model.safetensors")
    lib = plan.merge(setup.base, setup.models)
    identical = set(lib) == set(written) and all(torch.equal(lib[k], written[k]) for k in lib)
    # again from the saved plan alone: no entry point, no --allow-code, no data
    replay = {**recipe, "parameters": {"plan": str(out / "fusion_plan")}}
    rpath2 = folder / "recipes" / "from_plan.yaml"
    rpath2.write_text(yaml.safe_dump(replay, sort_keys=False))
    cli(rpath2, folder / "merged" / "from_plan")
    same = (folder / "merged" / "from_plan" / "model.safetensors").read_bytes() == (
        out / "model.safetensors"
    ).read_bytes()
    return {"plan": plan, "seconds": seconds, "library_identical": identical, "replay_identical": same}


def run_seed(cfg: Config, data: dict[str, Split], seed: int, log: Any) -> dict[str, Any]:
    scfg = replace(cfg.setup, seed=seed)
    folder = cfg.out / f"seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    setup = DigitsSetup.build(scfg, data)
    res: dict[str, Any] = {"seed": seed, "train_seconds": round(time.perf_counter() - t0, 1)}
    res["individual"] = setup.individual()
    res["pretrained"] = setup.evaluate(setup.base)
    taus = [torch.cat([(m[k] - setup.base[k]).flatten() for k in setup.base]) for m in setup.models]
    theta0 = torch.cat([v.flatten() for v in setup.base.values()])
    res["tau_over_theta0"] = mean(float(t.norm() / theta0.norm()) for t in taus)

    # -- data-free baselines; λ (and TIES's λ) chosen on validation --------------------------------
    ta = {
        lam: {"val": setup.evaluate(sd := setup.task_arithmetic(lam), "val")["mean"], **setup.evaluate(sd)}
        for lam in cfg.ta_lambdas
    }
    lam_star = max(cfg.ta_lambdas, key=lambda lam: ta[lam]["val"])
    res["ta_sweep"] = {str(k): v for k, v in ta.items()}
    res["ta_paper"] = dict(ta[0.3]) if 0.3 in ta else setup.evaluate(setup.task_arithmetic(0.3))
    res["ta_paper"]["mean_entropy_test"] = setup.mean_entropy(setup.task_arithmetic(0.3), cfg.objective_scale)
    res["ta_selected"] = {"lambda": lam_star, **ta[lam_star]}
    dare = [setup.evaluate(setup.dare(lam_star, 0.5, 1000 * seed + k)) for k in range(cfg.dare_seeds)]
    res["dare_0.5"] = {
        "lambda": lam_star,
        "mean": mean(d["mean"] for d in dare),
        "runs": [d["mean"] for d in dare],
    }
    ties = {
        lam: {
            "val": setup.evaluate(sd := setup.ties(lam, cfg.ties_density), "val")["mean"],
            **setup.evaluate(sd),
        }
        for lam in cfg.ties_lambdas
    }
    lam_ties = max(cfg.ties_lambdas, key=lambda lam: ties[lam]["val"])
    res["ties_selected"] = {"lambda": lam_ties, "density": cfg.ties_density, **ties[lam_ties]}
    log(
        f"  seed {seed}: individual {res['individual']['mean']:.1f}, TA(0.3) {res['ta_paper']['mean']:.1f}, "
        f"TA(λ={lam_star}) {ta[lam_star]['mean']:.1f}, DARE 0.5 {res['dare_0.5']['mean']:.1f}, "
        f"TIES {res['ties_selected']['mean']:.1f}"
    )

    # -- data-driven merges: entropy on each task's unlabelled test inputs ---------------------------
    common = {"batch_size": cfg.batch_size, "seed": seed}

    def timed(name: str, fn: Any, *args: Any, **kw: Any) -> None:
        t = time.perf_counter()
        plan = fn(setup.base, setup.models, *args, **kw)
        res[name] = _plan_result(setup, plan, time.perf_counter() - t, cfg)
        log(f"  seed {seed}: {name} {res[name]['mean']:.1f} ({res[name]['seconds']:.0f} s)")

    problem = setup.problem(scale=cfg.objective_scale)
    timed(
        "adamerging_task",
        learn_adamerging,
        problem,
        coefficients="task",
        steps=cfg.ada_steps,
        lr=cfg.ada_lr,
        **common,
    )
    timed(
        "adamerging_layer",
        learn_adamerging,
        problem,
        coefficients="layer",
        steps=cfg.ada_steps,
        lr=cfg.ada_lr,
        **common,
    )
    cta_params = {"lambda": 0.3, "steps": cfg.concrete_steps, "lr": cfg.mask_lr, "batch_size": cfg.batch_size}
    if cfg.cli and seed == cfg.seeds[0]:
        c = run_cli_concrete(setup, cfg, folder, cta_params)
        res["concrete_ta"] = _plan_result(setup, c["plan"], c["seconds"], cfg)
        res["cli"] = {"library_identical": c["library_identical"], "replay_identical": c["replay_identical"]}
        log(
            f"  seed {seed}: concrete_ta (CLI) {res['concrete_ta']['mean']:.1f} ({c['seconds']:.0f} s); "
            f"library identical {c['library_identical']}, replay identical {c['replay_identical']}"
        )
    else:
        timed(
            "concrete_ta",
            learn_concrete_task_arithmetic,
            problem,
            lambda_=0.3,
            steps=cfg.concrete_steps,
            lr=cfg.mask_lr,
            **common,
        )
    timed(
        "concrete_adamerging",
        learn_concrete_adamerging,
        problem,
        coefficients="layer",
        mask_steps=cfg.cada_mask_steps,
        steps=cfg.cada_steps,
        lr=cfg.mask_lr,
        coefficient_lr=cfg.ada_lr,
        **common,
    )

    # -- ablations (first seed) ----------------------------------------------------------------------
    if cfg.ablations and seed == cfg.seeds[0]:
        timed(
            "oracle_concrete_ta",
            learn_concrete_task_arithmetic,
            setup.problem(objective="labelled", scale=20.0),
            lambda_=0.3,
            steps=cfg.concrete_steps,
            lr=cfg.mask_lr,
            **common,
        )
        timed(
            "adamerging_task_scale20",
            learn_adamerging,
            setup.problem(scale=cfg.setup.logit_scale),
            coefficients="task",
            steps=cfg.ada_steps,
            lr=cfg.ada_lr,
            **common,
        )
        timed(
            "concrete_ta_fast_lr",
            learn_concrete_task_arithmetic,
            problem,
            lambda_=0.3,
            steps=cfg.concrete_steps,
            lr=cfg.fast_mask_lr,
            **common,
        )
        timed(
            "concrete_adamerging_fast_lr",
            learn_concrete_adamerging,
            problem,
            coefficients="layer",
            mask_steps=cfg.cada_mask_steps,
            steps=cfg.cada_steps,
            lr=cfg.fast_mask_lr,
            coefficient_lr=cfg.ada_lr,
            **common,
        )
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# --------------------------------------------------------------------------------------------------
# summary, claims, table, figure
# --------------------------------------------------------------------------------------------------
MAIN_ROWS = [
    ("individual", "individual fine-tunes"),
    ("pretrained", "pre-trained θ0 (task heads)"),
    ("ta_paper", "task arithmetic (λ = 0.3)"),
    ("ta_selected", "task arithmetic (λ on val)"),
    ("dare_0.5", "DARE 0.5 + TA (λ on val)"),
    ("ties_selected", "TIES (k 0.2, λ on val)"),
    ("adamerging_task", "AdaMerging, task-wise"),
    ("adamerging_layer", "AdaMerging, layer-wise"),
    ("concrete_ta", "Concrete TA"),
    ("concrete_adamerging", "Concrete AdaMerging (layer-wise)"),
]
ABLATION_ROWS = [
    ("oracle_concrete_ta", "Concrete TA, labelled CE on val (oracle)"),
    ("adamerging_task_scale20", "AdaMerging task-wise, entropy at scale 20"),
    ("concrete_ta_fast_lr", "Concrete TA, mask lr 1e-2"),
    ("concrete_adamerging_fast_lr", "Concrete AdaMerging, mask lr 1e-2"),
]
PAPER = {
    "individual": 90.5,
    "pretrained": 48.1,
    "ta_paper": 69.0,
    "ties_selected": 72.8,
    "adamerging_task": 70.7,
    "adamerging_layer": 80.9,
    "concrete_ta": 77.3,
    "concrete_adamerging": 84.0,
}


def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "n": len(xs)}


def summarise(runs: list[dict[str, Any]], tasks: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, _ in MAIN_ROWS + ABLATION_ROWS:
        have = [r[key] for r in runs if key in r]
        if not have:
            continue
        entry = _ms([h["mean"] for h in have])
        if all("per_task" in h for h in have):
            entry["per_task"] = {t: float(np.mean([h["per_task"][t] for h in have])) for t in tasks}
        out[key] = entry
    out["tau_over_theta0"] = _ms([r["tau_over_theta0"] for r in runs])
    return out


def claims(runs: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    def m(key: str) -> float:
        return summary[key]["mean"]

    def per_seed(a: str, b: str, margin: float = 0.0) -> str:
        return f"{sum(r[a]['mean'] > r[b]['mean'] + margin for r in runs)}/{len(runs)}"

    def gain(a: str, b: str) -> dict[str, float]:
        d = [r[a]["mean"] - r[b]["mean"] for r in runs]
        return {"gain": float(np.mean(d)), "gain_std": float(np.std(d))}

    c: dict[str, Any] = {
        "interference_ta_10_points": {
            "holds": m("individual") - m("ta_selected") >= 10,
            "individual": m("individual"),
            "ta_selected": m("ta_selected"),
        },
        "dare_0.5_within_1_point_of_ta": {
            "holds": abs(m("dare_0.5") - m("ta_selected")) <= 1,
            "dare": m("dare_0.5"),
            "ta_selected": m("ta_selected"),
        },
        "concrete_ta_beats_ta": {
            "holds": m("concrete_ta") > m("ta_paper"),
            "concrete_ta": m("concrete_ta"),
            "ta_0.3": m("ta_paper"),
            "seeds": per_seed("concrete_ta", "ta_paper"),
            **gain("concrete_ta", "ta_paper"),
            "paper": "69.0 -> 77.3",
        },
        "adamerging_layer_beats_task": {
            "holds": m("adamerging_layer") > m("adamerging_task"),
            "layer": m("adamerging_layer"),
            "task": m("adamerging_task"),
            "seeds": per_seed("adamerging_layer", "adamerging_task"),
            **gain("adamerging_layer", "adamerging_task"),
            "paper": "70.7 -> 80.9",
        },
        "adamerging_beats_ta": {
            "holds": m("adamerging_layer") > m("ta_paper"),
            "layer": m("adamerging_layer"),
            "ta_0.3": m("ta_paper"),
            "seeds": per_seed("adamerging_layer", "ta_paper"),
            **gain("adamerging_layer", "ta_paper"),
        },
        "concrete_adamerging_beats_adamerging": {
            "holds": m("concrete_adamerging") > m("adamerging_layer"),
            "concrete": m("concrete_adamerging"),
            "adamerging": m("adamerging_layer"),
            "seeds": per_seed("concrete_adamerging", "adamerging_layer"),
            **gain("concrete_adamerging", "adamerging_layer"),
            "paper": "80.9 -> 84.0",
        },
    }
    c["paper_ordering"] = {
        "holds": c["concrete_ta_beats_ta"]["holds"]
        and c["concrete_adamerging_beats_adamerging"]["holds"]
        and c["adamerging_beats_ta"]["holds"]
    }
    if "oracle_concrete_ta" in summary:
        c["oracle_mask_beats_ta_by_5"] = {
            "holds": m("oracle_concrete_ta") >= m("ta_paper") + 5,
            "oracle": m("oracle_concrete_ta"),
            "ta_0.3": m("ta_paper"),
        }
    return c


def table(summary: dict[str, Any], tasks: tuple[str, ...]) -> str:
    short = [t[:6] for t in tasks]
    head = f"{'test accuracy (%)':<44}{'average':>14}{'paper':>7}  " + " ".join(f"{s:>6}" for s in short)
    lines = [head, "-" * len(head)]
    for rows in (MAIN_ROWS, ABLATION_ROWS):
        for key, label in rows:
            if key not in summary:
                continue
            s = summary[key]
            avg = f"{s['mean']:.1f} ± {s['std']:.1f}" if s["n"] > 1 else f"{s['mean']:.1f}"
            paper = f"{PAPER[key]:.1f}" if key in PAPER else ""
            per = " ".join(f"{s['per_task'][t]:6.1f}" for t in tasks) if "per_task" in s else ""
            lines.append(f"{label:<44}{avg:>14}{paper:>7}  {per}")
        if rows is MAIN_ROWS and any(k in summary for k, _ in ABLATION_ROWS):
            lines.append("ablations (first seed)")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1.3, 1]})
    ax = axs[0]
    keys = [(k, lbl) for k, lbl in MAIN_ROWS + ABLATION_ROWS if k in summary]
    xs = np.arange(len(keys))
    colors = [
        "#888888" if k in ("individual", "pretrained") else "#4c72b0" if "concrete" not in k else "#dd8452"
        for k, _ in keys
    ]
    ablation = {k for k, _ in ABLATION_ROWS}
    bars = ax.bar(
        xs,
        [summary[k]["mean"] for k, _ in keys],
        yerr=[summary[k]["std"] for k, _ in keys],
        color=colors,
        alpha=0.85,
        capsize=3,
    )
    for bar, (k, _) in zip(bars, keys, strict=True):
        if k in ablation:
            bar.set_hatch("//")
            bar.set_alpha(0.45)
    n_main = sum(k not in ablation for k, _ in keys)
    if n_main < len(keys):
        ax.axvline(n_main - 0.5, color="black", lw=0.8, ls=":")
        ax.text(n_main - 0.4, 95, "ablations (first seed)", fontsize=8)
    for i, (k, _) in enumerate(keys):
        pts = [r[k]["mean"] for r in runs if k in r]
        ax.scatter([i] * len(pts), pts, color="black", s=10, zorder=3)
        if k in PAPER:
            ax.scatter([i], [PAPER[k]], marker="_", color="red", s=300, zorder=4)
    ax.set_xticks(xs, [lbl for _, lbl in keys], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("average test accuracy over tasks (%)")
    ax.set_title("digits-8: merges of the backbone (dots: seeds; red: paper, CLIP ViT-B/32)")
    ax.set_ylim(0, 100)
    ax = axs[1]
    r0 = runs[0]
    for key, style in (
        ("adamerging_task", "-"),
        ("adamerging_layer", "-"),
        ("concrete_ta", "--"),
        ("concrete_adamerging", "--"),
    ):
        if key not in r0:
            continue
        for phase, curve in r0[key]["loss_curve"].items():
            if phase == "mask_inner":
                continue
            ys = np.asarray(curve["values"]) / len(summary["individual"]["per_task"])
            w = min(15, len(ys))  # moving average: one batch per task per step is noisy
            smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
            label = {
                "mask": "mask, outer step" if key == "concrete_adamerging" else "mask",
                "coefficients": "λ",
            }.get(phase, phase)
            ax.plot(
                (np.arange(len(smooth)) + w - 1) * curve["stride"] + 1,
                smooth,
                style,
                label=f"{key} ({label})",
            )
    ax.set_xlabel(f"step (moving average over {15} steps)")
    ax.set_ylabel("mean entropy per task (objective, nats)")
    ax.set_title(
        "the objective during learning (first seed). Concrete AdaMerging's outer step sees λ after its inner\n"
        "step (Adam at the reference's rate 1.0: |Δλ| = 1 at the first step, about 0.5 later)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # results depend on the thread count (float reduction order): keep it fixed

    def log(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    cfg.out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.setup.tasks)
    runs = []
    try:
        for seed in cfg.seeds:
            runs.append(run_seed(cfg, data, seed, log))
            log(f"[seed {seed}] done in {runs[-1]['seconds']:.0f} s")
    finally:
        torch.set_num_threads(threads)
    summary = summarise(runs, cfg.setup.tasks)
    result = _jsonable(
        {
            "config": asdict(cfg),
            "summary": summary,
            "claims": claims(runs, summary),
            "runs": runs,
            "seconds": time.perf_counter() - t0,
        }
    )
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(runs, summary, cfg.out / "concrete_merging.png")
    result["table"] = table(summary, cfg.setup.tasks)
    if verbose:
        print()
        print(result["table"])
        print()
        for name, cl in result["claims"].items():
            print(
                f"{'HOLDS ' if cl['holds'] else 'FAILS '} {name}: "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in cl.items() if k != "holds")
            )
        print(
            f"\ntotal {result['seconds']:.0f} s; wrote {cfg.out / 'results.json'} and "
            f"{cfg.out / 'concrete_merging.png'}"
        )
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration of the slow test")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="model seeds (default 0 1 2)")
    ap.add_argument("--no-cli", action="store_true", help="run Concrete TA of the first seed in-process")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    c = Config.quick(a.out) if a.quick else Config(out=a.out)
    if a.seeds is not None:
        c = replace(c, seeds=tuple(a.seeds))
    if a.no_cli:
        c = replace(c, cli=False)
    if a.no_ablations:
        c = replace(c, ablations=False)
    main(c)
