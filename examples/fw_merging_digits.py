"""FW-Merging on digits: does it stay good as irrelevant checkpoints join the pool, where task arithmetic falls?

The claim (Chen et al., "FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization", ICCV 2025,
arXiv:2503.12649, abstract and introduction): adding 16 irrelevant checkpoints to the pool drops data-free
merges (task arithmetic, TIES) by 18.9-64.4 %, while FW-Merging stays stable ("irrelevance
robustness"); it also beats AdaMerging over the same pool. This example measures it on a CPU.

Set-up (``SetupConfig``), built on ``examples/concrete_merging.py`` (Backbone, CosineHead, TRANSFORMS,
TASKS8, train) and ``examples/merge_digits.py`` (save_checkpoint):

* data: ``sklearn.datasets.load_digits`` split 70/30 train/test, 20 % of train held out for validation;
* a backbone MLP 64 → H → H (ReLU) read by cosine heads (logit scale 20), pre-trained 3 epochs on the
  untransformed digits (θ_0);
* **target tasks**: 4 transforms (rot90, hflip, invert, permute); each fine-tunes θ_0 with its own
  head (Adam 5e-4, 10 epochs): the 4 *relevant* checkpoints. The merged backbone is evaluated on each
  target task with that task's head; "accuracy" is the mean test accuracy over the 4 targets;
* **irrelevant checkpoints** (up to 16, in this order: transform, shuffled labels, transform,
  other base, ...): 8 fine-tunes of θ_0 on other transforms (rot180, rot270, vflip, transpose and four
  fixed pixel permutations), 4 fine-tunes of θ_0 on a target task's inputs with shuffled labels (noise
  memorised), and 4 checkpoints of another origin (a backbone pre-trained from another
  initialisation, then fine-tuned on a target task: the same architecture, a different base);
* the pool = the 4 relevant + the first k irrelevant, k = 0, 4, 8, 16, in a seeded random order;
  all of it as safetensors checkpoints on disk.

Merges of the pool, per (model seed, k):

* **task arithmetic** over the whole pool, θ_0 + λ Σ_j τ_j, λ chosen on the validation split;
* **AdaMerging** (``learn_adamerging``, layer-wise, Adam 1e-3, 300 steps, λ clamped to [0, 1]): with
  the paper's objective (entropy of the target tasks' predictions on their unlabelled test inputs,
  heads at scale 100) from the paper's λ = 0.3 for every member, and from TA's λ chosen on validation
  (a start that is not broken when the pool is large); and, as a control with FW-Merging's data,
  labelled cross-entropy on validation from TA's λ. AdaMerging's FusionProblem needs one task per
  model, so the problem is padded with zero-loss tasks for the pool's extra members;
* **FW-Merging** (``merge.methods.fw_merging.learn_fw_merging`` on the checkpoint paths: members are
  read one at a time): the objective is the summed cross-entropy of the target tasks on a labelled
  proxy set (the validation split, as the paper's labelled proxy data; batches of 128 per task),
  20 Frank-Wolfe steps γ = 2/(k+2), θ_0 among the vertices; the set's scale s chosen on validation
  from 1, 2, 3 (as TA's λ is). Variants: layer-wise LMO with the plain inner product (the method's
  default), layer-wise with the cosine oracle (the reference code's normalised alignment), task-wise
  LMO, and layer-wise with AdaMerging's entropy objective on the test inputs instead;
* references: the individual fine-tunes, and the pre-trained θ_0 with the target heads.

For the first seed and the largest k, FW-Merging also runs through the real CLI (``weightsmith merge
RECIPE --allow-code``, this file's :func:`cli_problem` as entry point); the script checks the merged
checkpoint is the library's, and a re-run from the saved plan alone writes the same bytes.

What the full run found (3 seeds; ``table.txt``): task arithmetic falls from 69.0 % (k = 0) to 22.3 %
(k = 16) and AdaMerging with the entropy objective with it (to 10-24 %), while FW-Merging with the
labelled objective stays within a few points: 70.6 → 65.7 % layer-wise with the plain inner-product
LMO (which lets a little weight onto the long task vectors of the other-base checkpoints), 70.3 →
71.0 % with the cosine oracle, 68.6 → 68.9 % task-wise. The robustness comes with the labelled
objective more than with Frank-Wolfe: AdaMerging on the same labelled data holds too (70.5 → 64.3 %,
with every task vector in memory: 5× at k = 16, where FW's resident memory is constant), and
FW-Merging with the entropy objective collapses (62.7 → 11.7 %): entropy is minimised by confident
garbage, which the other-base checkpoints supply.

Run: ``python examples/fw_merging_digits.py`` (3 seeds; about 4 minutes on two cores, 8 when busy);
``--quick`` for the slow test's configuration. Writes ``results.json``, ``fw_merging_digits.png``
and the table under ``examples/out/fw_merging_digits/``.
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
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.concrete_merging import (  # noqa: E402
    TASKS8,
    TRANSFORMS,
    Backbone,
    CosineHead,
    Split,
    load_data,
    logits,
    train,
)
from examples.merge_digits import save_checkpoint  # noqa: E402
from merge.methods import get_method  # noqa: E402
from merge.methods.concrete import (  # noqa: E402
    FusionPlan,
    FusionProblem,
    FusionTask,
    cross_entropy_loss,
    entropy_loss,
    learn_adamerging,
)
from merge.methods.fw_merging import learn_fw_merging  # noqa: E402
from merge.methods.runner import merge_tensors  # noqa: E402

OUT = ROOT / "examples" / "out" / "fw_merging_digits"
TARGETS = ("rot90", "hflip", "invert", "permute")
OTHER_TRANSFORMS = tuple(t for t in TASKS8 if t not in TARGETS) + ("perm2", "perm3", "perm4", "perm5")
_PERMS = {
    f"perm{i}": torch.randperm(64, generator=torch.Generator().manual_seed(200 + i)).numpy() for i in (2, 3, 4, 5)
}
KINDS = ("transform", "shuffled", "transform", "other_base")  # the irrelevant pool's repeating order


def _extra(name: str, flat: torch.Tensor) -> torch.Tensor:
    """A transform TRANSFORMS does not have (a fixed pixel permutation), from the untransformed images."""
    return flat[:, torch.from_numpy(_PERMS[name])].contiguous()


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SetupConfig:
    targets: tuple[str, ...] = TARGETS
    n_irrelevant: int = 16
    hidden: int = 256
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 10
    finetune_lr: float = 5e-4
    logit_scale: float = 20.0
    seed: int = 0


@dataclass(frozen=True)
class Config:
    setup: SetupConfig = field(default_factory=SetupConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    ks: tuple[int, ...] = (0, 4, 8, 16)
    ta_lambdas: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)
    fw_steps: int = 20
    fw_scales: tuple[float, ...] = (1.0, 2.0, 3.0)
    fw_batch: int = 128
    #: layer (the default: layer-wise LMO, inner product, CE on val), layer_cosine, task, layer_entropy
    fw_variants: tuple[str, ...] = ("layer", "layer_cosine", "task", "layer_entropy")
    ada_steps: int = 300
    ada_lr: float = 1e-3
    ada_batch: int = 16
    #: entropy / labelled: λ starts at TA's λ on val; entropy_paper: at the paper's 0.3
    ada_variants: tuple[str, ...] = ("entropy", "labelled", "entropy_paper")
    objective_scale: float = 100.0  # heads' logit scale for the entropy objective (CLIP's, as concrete_merging)
    cli: bool = True
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        """The slow test's configuration: one seed, k = 0 and 16, a narrow backbone, short runs."""
        return Config(
            setup=SetupConfig(hidden=128, finetune_epochs=8, finetune_lr=1e-3),
            seeds=(0,),
            ks=(0, 16),
            ta_lambdas=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
            fw_steps=10,
            fw_scales=(1.0, 2.0),
            fw_variants=("layer",),
            ada_steps=60,
            ada_variants=("entropy_paper",),
            out=out,
        )


# --------------------------------------------------------------------------------------------------
# the models of one seed
# --------------------------------------------------------------------------------------------------
def with_extra_transforms(data: dict[str, Split], names: tuple[str, ...]) -> dict[str, Split]:
    for s in data.values():
        for n in names:
            if n not in s.x:
                s.x[n] = _extra(n, s.x["identity"])
    return data


def _pretrain(cfg: SetupConfig, data: dict[str, Split], init_seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(init_seed)
    sd = {k: v.detach().clone() for k, v in Backbone(cfg.hidden).state_dict().items()}
    head0 = torch.randn(10, cfg.hidden, generator=torch.Generator().manual_seed(init_seed + 7)) * 0.1
    sd, _ = train(sd, head0, data["train"].x["identity"], data["train"].y, epochs=cfg.pretrain_epochs,
                  lr=cfg.pretrain_lr, seed=init_seed, scale=cfg.logit_scale)
    return sd


def _finetune(cfg: SetupConfig, base: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    head = torch.randn(10, cfg.hidden, generator=torch.Generator().manual_seed(seed + 13)) * 0.1
    return train(base, head, x, y, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, seed=seed,
                 scale=cfg.logit_scale)


@dataclass
class Member:
    name: str
    kind: str  # relevant, transform, shuffled, other_base
    sd: dict[str, torch.Tensor]
    path: Path | None = None


class Pool:
    """θ_0, the target heads, the 4 relevant and the irrelevant checkpoints of one model seed."""

    def __init__(self, cfg: SetupConfig, data: dict[str, Split], folder: Path, objective_scale: float) -> None:
        self.cfg, self.data, self.objective_scale = cfg, data, objective_scale
        s = cfg.seed
        self.base = _pretrain(cfg, data, s)
        tr = data["train"]
        self.heads: dict[str, torch.Tensor] = {}
        self.relevant: list[Member] = []
        for i, t in enumerate(cfg.targets):
            sd, self.heads[t] = _finetune(cfg, self.base, tr.x[t], tr.y, 1000 * s + i)
            self.relevant.append(Member(f"ft_{t}", "relevant", sd))
        self.irrelevant: list[Member] = []
        n_of = {k: 0 for k in KINDS}
        for i in range(cfg.n_irrelevant):
            kind = KINDS[i % len(KINDS)]
            c = n_of[kind]
            n_of[kind] += 1
            seed = 1000 * s + 100 + i
            if kind == "transform":
                t = OTHER_TRANSFORMS[c % len(OTHER_TRANSFORMS)]
                sd, _ = _finetune(cfg, self.base, tr.x[t], tr.y, seed)
                name = f"ft_{t}"
            elif kind == "shuffled":
                t = cfg.targets[c % len(cfg.targets)]
                y = tr.y[torch.randperm(len(tr.y), generator=torch.Generator().manual_seed(seed))]
                sd, _ = _finetune(cfg, self.base, tr.x[t], y, seed)
                name = f"shuffled_{t}"
            else:
                t = cfg.targets[c % len(cfg.targets)]
                other = _pretrain(cfg, data, 10_000 + seed)
                sd, _ = _finetune(cfg, other, tr.x[t], tr.y, seed)
                name = f"otherbase_{t}"
            self.irrelevant.append(Member(f"{name}_{i}", kind, sd))
        # on disk: what FW-Merging and the CLI read
        self.folder = folder
        self.base_path = save_checkpoint(folder / "base", self.base, cfg.hidden, "θ_0")
        for m in self.relevant + self.irrelevant:
            m.path = save_checkpoint(folder / m.name, m.sd, cfg.hidden, m.kind)
        save_file({t: h.contiguous() for t, h in self.heads.items()}, folder / "heads.safetensors")
        (folder / "setup.json").write_text(json.dumps(asdict(cfg)))

    def members(self, k: int) -> list[Member]:
        """The pool with k irrelevant checkpoints, in a seeded random order."""
        pool = self.relevant + self.irrelevant[:k]
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(7919 * self.cfg.seed + k))
        return [pool[i] for i in order.tolist()]

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, sd: dict[str, torch.Tensor], split: str = "test") -> dict[str, Any]:
        s = self.data[split]
        scale = self.cfg.logit_scale
        per = {t: 100.0 * (logits(sd, self.heads[t], s.x[t], scale).argmax(1) == s.y).float().mean().item()
               for t in self.cfg.targets}
        return {"mean": float(np.mean(list(per.values()))), "per_task": per}

    def individual(self) -> dict[str, Any]:
        per = {m.name[3:]: self.evaluate(m.sd)["per_task"][m.name[3:]] for m in self.relevant}
        return {"mean": float(np.mean(list(per.values()))), "per_task": per}

    # -- objectives -------------------------------------------------------------------------------
    def problem(self, objective: str, pad_to: int = 0) -> FusionProblem:
        """The target tasks: labelled cross-entropy on validation (scale 20) or entropy on the test inputs
        (scale ``objective_scale``); ``pad_to`` adds zero-loss tasks (AdaMerging needs one per model)."""
        tasks = []
        for t in self.cfg.targets:
            if objective == "labelled":
                tasks.append(FusionTask(t, (self.data["val"].x[t], self.data["val"].y),
                                        head=CosineHead(self.heads[t], self.cfg.logit_scale), loss=cross_entropy_loss))
            else:
                tasks.append(FusionTask(t, self.data["test"].x[t], head=CosineHead(self.heads[t], self.objective_scale),
                                        loss=entropy_loss))
        for i in range(max(0, pad_to - len(tasks))):
            tasks.append(FusionTask(f"pad{i}", torch.zeros(1, 64), loss=_zero_loss))
        return FusionProblem(Backbone(self.cfg.hidden), tasks)


def _zero_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return out.sum() * 0.0


def cli_problem(device: str = "cpu") -> FusionProblem:
    """The recipe's entry point: the target tasks of the pool saved in ``$FW_MERGING_SETUP`` (labelled CE on val)."""
    return problem_from(Path(os.environ["FW_MERGING_SETUP"]))


def problem_from(folder: Path) -> FusionProblem:
    """The FW objective of a saved pool (its heads and set-up; the data from sklearn): CE on validation."""
    raw = json.loads((folder / "setup.json").read_text())
    cfg = SetupConfig(**{**raw, "targets": tuple(raw["targets"])})
    heads = load_file(folder / "heads.safetensors")
    data = load_data(cfg.targets)
    tasks = [FusionTask(t, (data["val"].x[t], data["val"].y), head=CosineHead(heads[t], cfg.logit_scale),
                        loss=cross_entropy_loss) for t in cfg.targets]
    return FusionProblem(Backbone(cfg.hidden), tasks)


# --------------------------------------------------------------------------------------------------
# the merges of one (seed, k)
# --------------------------------------------------------------------------------------------------
def task_arithmetic(pool: Pool, members: list[Member], lam: float) -> dict[str, torch.Tensor]:
    spec = get_method("task_arithmetic")
    return {k: merge_tensors(spec, [m.sd[k] for m in members], pool.base[k], {"lambda_": lam}, name=k)
            for k in pool.base}


def mass_by_kind(plan: FusionPlan, members: list[Member]) -> dict[str, float]:
    """The share of a plan's coefficient mass on each kind of member: Σ_k numel_k λ_{j,k}, normalised."""
    numel = torch.tensor([float(np.prod(plan.shapes[k])) for k in plan.keys], dtype=torch.float64)
    lam = plan.lambdas.double().clamp_min(0) * numel
    total = float(lam.sum())
    out = {kind: 0.0 for kind in ("relevant", *dict.fromkeys(KINDS))}
    for j, m in enumerate(members):
        out[m.kind] += float(lam[j].sum()) / total if total > 0 else float("nan")
    return out


def run_k(cfg: Config, pool: Pool, k: int, log: Any) -> dict[str, Any]:
    members = pool.members(k)
    res: dict[str, Any] = {"k": k, "n_pool": len(members), "order": [m.name for m in members]}
    # -- task arithmetic over the pool, λ on validation
    sweep = {}
    for lam in cfg.ta_lambdas:
        sd = task_arithmetic(pool, members, lam)
        sweep[lam] = {"val": pool.evaluate(sd, "val")["mean"], **pool.evaluate(sd)}
    lam_star = max(cfg.ta_lambdas, key=lambda x: (sweep[x]["val"], -x))
    res["ta"] = {"lambda": lam_star, **sweep[lam_star]}
    res["ta_sweep"] = {str(x): {"val": v["val"], "test": v["mean"]} for x, v in sweep.items()}
    base_sd = pool.base
    sds = [m.sd for m in members]
    paths = [m.path for m in members]
    names = [m.name for m in members]
    # -- FW-Merging, the set's scale chosen on validation
    for variant in cfg.fw_variants:
        lmo = "task" if variant == "task" else "layer"
        oracle = "cosine" if variant.endswith("cosine") else "inner"
        objective = "entropy" if variant.endswith("entropy") else "labelled"
        problem = pool.problem(objective)
        cands = {}
        for s in cfg.fw_scales:
            t0 = time.perf_counter()
            plan = learn_fw_merging(pool.base_path, paths, problem, steps=cfg.fw_steps, lmo=lmo, oracle=oracle,
                                    scale=s, batch_size=cfg.fw_batch, seed=pool.cfg.seed, member_names=names)
            seconds = time.perf_counter() - t0
            merged = plan.merge(base_sd, sds)
            cands[s] = (plan, merged, seconds, pool.evaluate(merged, "val")["mean"])
        s_star = max(cfg.fw_scales, key=lambda x: (cands[x][3], -x))
        plan, merged, seconds, val = cands[s_star]
        hist = plan.info["history"]["loss"]
        res[f"fw_{variant}"] = {
            "scale": s_star, "val": val, **pool.evaluate(merged), "seconds": round(seconds, 2),
            "mass": mass_by_kind(plan, members),
            "members_used": plan.info["members_used"],
            "used_kinds": sorted({m.kind for j, m in enumerate(members) if float(plan.lambdas[j].abs().sum()) > 0}),
            "objective_first_last": [hist["objective"]["first"], hist["objective"]["last"]],
            "resident_bytes": plan.info["resident_bytes"],
            "scales": {str(x): {"val": c[3], "test": pool.evaluate(c[1])["mean"]} for x, c in cands.items()},
        }
    # -- AdaMerging over the pool (one λ per member and tensor)
    for variant in cfg.ada_variants:
        problem = pool.problem(variant.removesuffix("_paper"), pad_to=len(members))
        init = 0.3 if variant.endswith("_paper") else lam_star
        t0 = time.perf_counter()
        plan = learn_adamerging(base_sd, sds, problem, coefficients="layer", lambda_=init, steps=cfg.ada_steps,
                                lr=cfg.ada_lr, batch_size=cfg.ada_batch, seed=pool.cfg.seed)
        merged = plan.merge(base_sd, sds)
        res[f"ada_{variant}"] = {
            **pool.evaluate(merged), "seconds": round(time.perf_counter() - t0, 2), "init": init,
            "mass": mass_by_kind(plan, members),
            "task_vector_bytes": plan.info["task_vector_bytes"],
        }
    line = ", ".join(f"{key} {v['mean']:.1f}" for key, v in res.items() if isinstance(v, dict) and "mean" in v)
    log(f"  seed {pool.cfg.seed} k={k:2d}: {line}")
    return res


def run_cli(cfg: Config, pool: Pool, k: int, scale: float, folder: Path) -> dict[str, Any]:
    """FW-Merging through ``weightsmith merge --allow-code``; the library's result; a replay from the plan."""
    members = pool.members(k)
    exe = Path(sys.executable).with_name("weightsmith")
    env = {**os.environ, "FW_MERGING_SETUP": str(pool.folder), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    params = {"steps": cfg.fw_steps, "scale": scale, "batch_size": cfg.fw_batch}
    recipe = {
        "merge_method": "fw_merging",
        "base_model": str(pool.base_path),
        "models": [{"model": str(m.path)} for m in members],
        "parameters": {"entry_point": f"{Path(__file__).resolve()}:cli_problem", **params},
        "dtype": "float32",
        "seed": pool.cfg.seed,
    }
    folder.mkdir(parents=True, exist_ok=True)
    rpath = folder / "fw_merging.yaml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))

    def cli(r: Path, out: Path, *flags: str) -> None:
        cmd = [str(exe), "merge", str(r), "-o", str(out), "--json", "--overwrite", *flags]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")

    t0 = time.perf_counter()
    out = folder / "merged"
    cli(rpath, out, "--allow-code")
    seconds = time.perf_counter() - t0
    written = load_file(out / "model.safetensors")
    plan = FusionPlan.load(out / "fusion_plan")
    lib_plan = learn_fw_merging(pool.base_path, [m.path for m in members], problem_from(pool.folder),
                                seed=pool.cfg.seed, **params)
    lib = lib_plan.merge(pool.base, [m.sd for m in members])
    identical = set(lib) == set(written) and all(torch.equal(lib[k2], written[k2]) for k2 in lib)
    replay = {**recipe, "parameters": {"plan": str(out / "fusion_plan")}}
    rpath2 = folder / "from_plan.yaml"
    rpath2.write_text(yaml.safe_dump(replay, sort_keys=False))
    cli(rpath2, folder / "from_plan")
    same = (folder / "from_plan" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    return {"k": k, "seconds": round(seconds, 1), "library_identical": identical, "replay_identical": same,
            "mean": pool.evaluate(written)["mean"], "members_used": plan.info["members_used"]}


def run_seed(cfg: Config, data: dict[str, Split], seed: int, log: Any) -> dict[str, Any]:
    scfg = replace(cfg.setup, seed=seed, n_irrelevant=max(cfg.ks))
    folder = cfg.out / f"seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    pool = Pool(scfg, data, folder / "checkpoints", cfg.objective_scale)
    res: dict[str, Any] = {"seed": seed, "train_seconds": round(time.perf_counter() - t0, 1)}
    res["individual"] = pool.individual()
    res["pretrained"] = pool.evaluate(pool.base)
    theta0 = torch.cat([v.flatten() for v in pool.base.values()]).norm()
    res["tau_norm_over_theta0"] = {
        m.name: float(torch.cat([(m.sd[k] - pool.base[k]).flatten() for k in pool.base]).norm() / theta0)
        for m in pool.relevant + pool.irrelevant
    }
    n_ckpt = len(pool.relevant) + len(pool.irrelevant)
    log(f"  seed {seed}: trained {n_ckpt} checkpoints in {res['train_seconds']:.0f} s; "
        f"individual {res['individual']['mean']:.1f}, θ_0 {res['pretrained']['mean']:.1f}")
    res["by_k"] = [run_k(cfg, pool, k, log) for k in cfg.ks]
    if cfg.cli and seed == cfg.seeds[0]:
        res["cli"] = run_cli(cfg, pool, max(cfg.ks), res["by_k"][-1]["fw_layer"]["scale"], folder / "cli")
        log(f"  seed {seed}: CLI k={res['cli']['k']}: library identical {res['cli']['library_identical']}, "
            f"replay identical {res['cli']['replay_identical']} ({res['cli']['seconds']:.0f} s)")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# --------------------------------------------------------------------------------------------------
# summary, claims, table, figure
# --------------------------------------------------------------------------------------------------
ROWS = [
    ("ta", "task arithmetic (λ on val)"),
    ("ada_entropy_paper", "AdaMerging, entropy, λ from 0.3 (paper)"),
    ("ada_entropy", "AdaMerging, entropy, λ from TA's"),
    ("ada_labelled", "AdaMerging, CE on val, λ from TA's"),
    ("fw_layer", "FW-Merging, layer-wise LMO (CE on val)"),
    ("fw_layer_cosine", "FW-Merging, layer-wise, cosine oracle"),
    ("fw_task", "FW-Merging, task-wise LMO (CE on val)"),
    ("fw_layer_entropy", "FW-Merging, layer-wise, entropy"),
]


def summarise(runs: list[dict[str, Any]], ks: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"individual": _ms([r["individual"]["mean"] for r in runs]),
                           "pretrained": _ms([r["pretrained"]["mean"] for r in runs])}
    for key, _ in ROWS:
        per_k = {}
        for i, k in enumerate(ks):
            have = [r["by_k"][i][key] for r in runs if key in r["by_k"][i]]
            if not have:
                continue
            entry = _ms([h["mean"] for h in have])
            if "mass" in have[0]:
                entry["mass"] = {kind: float(np.nanmean([h["mass"][kind] for h in have])) for kind in have[0]["mass"]}
            for extra in ("lambda", "scale", "members_used", "resident_bytes", "task_vector_bytes", "seconds"):
                if extra in have[0]:
                    entry[extra] = [h[extra] for h in have]
            per_k[str(k)] = entry
        if per_k:
            out[key] = per_k
    return out


def _ms(xs: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "n": len(xs), "runs": [float(x) for x in xs]}


def claims(summary: dict[str, Any], ks: tuple[int, ...]) -> dict[str, Any]:
    k0, kmax = str(min(ks)), str(max(ks))

    def m(key: str, k: str) -> float:
        return summary[key][k]["mean"]

    out: dict[str, Any] = {}
    for key in ("fw_layer", "fw_layer_cosine", "fw_task"):
        if key in summary:
            out[f"{key}_stable_with_irrelevant"] = {
                "holds": m(key, kmax) >= m(key, k0) - 2.0,
                f"k{k0}": m(key, k0), f"k{kmax}": m(key, kmax),
                "criterion": f"{key} at k={kmax} within 2 points of k={k0}",
            }
    out |= {
        "ta_falls_with_irrelevant": {
            "holds": m("ta", kmax) <= m("ta", k0) - 5.0,
            f"ta_k{k0}": m("ta", k0), f"ta_k{kmax}": m("ta", kmax),
            "criterion": f"task arithmetic at k={kmax} at least 5 points below k={k0}",
            "paper": "-18.9 % to -64.4 % with 16 irrelevant models",
        },
        "fw_beats_ta_at_max_k": {"holds": m("fw_layer", kmax) > m("ta", kmax),
                                 "fw": m("fw_layer", kmax), "ta": m("ta", kmax)},
    }
    for key in ("ada_entropy_paper", "ada_entropy"):
        if key in summary:
            out[f"fw_beats_{key}_at_max_k"] = {
                "holds": m("fw_layer", kmax) > m(key, kmax),
                "fw": m("fw_layer", kmax), "adamerging": m(key, kmax),
                "paper": "FW-Merging +8.39 % over AdaMerging (20 ViT models)",
            }
    if "ada_labelled" in summary:  # the same labelled data, all task vectors held: is it the data or the method?
        out["fw_within_2_of_adamerging_on_the_same_data_at_max_k"] = {
            "holds": m("fw_layer", kmax) >= m("ada_labelled", kmax) - 2.0,
            "fw": m("fw_layer", kmax), "adamerging_labelled": m("ada_labelled", kmax),
        }
    return out


def table(summary: dict[str, Any], ks: tuple[int, ...]) -> str:
    head = f"{'mean test accuracy over the 4 target tasks (%)':<46}" + "".join(f"{'k=' + str(k):>14}" for k in ks)
    lines = [head, "-" * len(head)]
    ind, pre = summary["individual"], summary["pretrained"]
    lines.append(f"{'individual fine-tunes (reference)':<46}" + f"{ind['mean']:>14.1f}" * len(ks))
    lines.append(f"{'pre-trained θ_0 (target heads)':<46}" + f"{pre['mean']:>14.1f}" * len(ks))
    for key, label in ROWS:
        if key not in summary:
            continue
        cells = []
        for k in ks:
            e = summary[key].get(str(k))
            cells.append("" if e is None else f"{e['mean']:.1f} ± {e['std']:.1f}" if e["n"] > 1 else f"{e['mean']:.1f}")
        lines.append(f"{label:<46}" + "".join(f"{c:>14}" for c in cells))
    lines.append("")
    lines.append(f"{'coefficient mass: relevant / other-base share':<46}" + "".join(f"{'k=' + str(k):>14}" for k in ks))
    lines.append(f"{'task arithmetic (uniform)':<46}" + "".join(
        f"{f'{4 / (4 + k):.2f} / {min(k // 4, 4) / (4 + k):.2f}':>14}" for k in ks))
    for key, label in ROWS:
        if key in summary and key != "ta":
            cells = [summary[key][str(k)]["mass"] for k in ks]
            shares = [f"{c['relevant']:.2f} / {c['other_base']:.2f}" for c in cells]
            lines.append(f"{label:<46}" + "".join(f"{x:>14}" for x in shares))
    lines.append(f"{'task arithmetic: λ chosen on val':<46}" + "".join(
        f"{'/'.join(f'{x:g}' for x in summary['ta'][str(k)]['lambda']):>14}" for k in ks))
    if "fw_layer" in summary:
        lines.append(f"{'FW-Merging layer-wise: scale chosen on val':<46}" + "".join(
            f"{'/'.join(f'{x:g}' for x in summary['fw_layer'][str(k)]['scale']):>14}" for k in ks))
        lines.append(f"{'FW-Merging resident bytes (θ_0, θ, g / vertex)':<46}" + "".join(
            f"{summary['fw_layer'][str(k)]['resident_bytes'][0]:>14,}" for k in ks))
    ada = next((key for key, _ in ROWS if key.startswith("ada_") and key in summary), None)
    if ada is not None:
        lines.append(f"{'AdaMerging task-vector bytes (all τ held)':<46}" + "".join(
            f"{summary[ada][str(k)]['task_vector_bytes'][0]:>14,}" for k in ks))
    return "\n".join(lines)


def plot(summary: dict[str, Any], ks: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(14, 6.6))
    ax = axs[0]
    xs = np.asarray(ks)
    styles = {"ta": ("#c44e52", "o-"), "ada_entropy_paper": ("#8172b2", "s:"), "ada_entropy": ("#dd8452", "s-"),
              "ada_labelled": ("#937860", "s--"), "fw_layer": ("#4c72b0", "D-"), "fw_layer_cosine": ("#17becf", "^-."),
              "fw_task": ("#1a2f6b", "v--"), "fw_layer_entropy": ("#55a868", "D:")}
    for key, label in ROWS:
        if key not in summary:
            continue
        ys = np.array([summary[key][str(k)]["mean"] for k in ks])
        sd = np.array([summary[key][str(k)]["std"] for k in ks])
        color, st = styles[key]
        ax.errorbar(xs, ys, yerr=sd, fmt=st, color=color, label=label, capsize=3)
    ax.axhline(summary["individual"]["mean"], color="gray", ls=":", label="individual fine-tunes")
    ax.axhline(summary["pretrained"]["mean"], color="black", ls=":", lw=0.8, label="pre-trained θ_0")
    ax.set_xticks(xs)
    ax.set_xlabel("irrelevant checkpoints in the pool (k); the 4 relevant ones are always there")
    ax.set_ylabel("mean test accuracy over the 4 target tasks (%)")
    n = summary["individual"]["n"]
    ax.set_title(f"digits: merging a pool of 4 + k checkpoints ({n} seed{'s' if n > 1 else ''}, mean ± std)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax = axs[1]
    for key, label in ROWS:
        if key not in summary or key == "ta":
            continue
        ys = [summary[key][str(k)]["mass"]["relevant"] for k in ks]
        color, st = styles[key]
        ax.plot(xs, ys, st, color=color, label=label)
    ax.plot(xs, [4 / (4 + k) for k in ks], "o-", color="#c44e52", label="task arithmetic (uniform: 4/(4+k))")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("irrelevant checkpoints in the pool (k)")
    ax.set_ylabel("share of the coefficient mass on the 4 relevant members")
    ax.set_title("where the merge puts its weight (numel-weighted coefficients)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
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
    data = with_extra_transforms(load_data(tuple(dict.fromkeys(cfg.setup.targets + tuple(
        t for t in OTHER_TRANSFORMS if t in TRANSFORMS)))), tuple(t for t in OTHER_TRANSFORMS if t not in TRANSFORMS))
    runs = []
    try:
        for seed in cfg.seeds:
            runs.append(run_seed(cfg, data, seed, log))
            log(f"[seed {seed}] done in {runs[-1]['seconds']:.0f} s")
    finally:
        torch.set_num_threads(threads)
    summary = summarise(runs, cfg.ks)
    result = _jsonable({"config": asdict(cfg), "summary": summary, "claims": claims(summary, cfg.ks), "runs": runs,
                        "seconds": time.perf_counter() - t0})
    result["table"] = table(summary, cfg.ks)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1))
    (cfg.out / "table.txt").write_text(result["table"] + "\n")
    plot(summary, cfg.ks, cfg.out / "fw_merging_digits.png")
    if verbose:
        print()
        print(result["table"])
        print()
        for name, cl in result["claims"].items():
            items = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in cl.items() if k != "holds"]
            print(f"{'HOLDS ' if cl['holds'] else 'FAILS '} {name}: " + ", ".join(items))
        print(f"\ntotal {result['seconds']:.0f} s; wrote {cfg.out}/results.json, table.txt, fw_merging_digits.png")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration of the slow test")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="model seeds (default 0 1 2)")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI run")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    c = Config.quick(a.out) if a.quick else Config(out=a.out)
    if a.seeds is not None:
        c = replace(c, seeds=tuple(a.seeds))
    if a.no_cli:
        c = replace(c, cli=False)
    main(c)
