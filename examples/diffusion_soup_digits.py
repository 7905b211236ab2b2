"""Diffusion Soup on sklearn's digits: shard models souped, compared with a paragon, then unlearned.

Biggs, Seshadri et al., "Diffusion Soup: Model Merging for Text-to-Image Diffusion Models"
(arXiv:2406.08431). Small DDPMs (diffusers' ``UNet2DModel`` built from a config in code, a
``DDPMScheduler`` with the cosine schedule; nothing is downloaded) on the 8×8 digits, scaled to
[−1, 1]; the set-up follows the research note (``/work/shared/research/merge_algorithms.md`` §2.6, §3.6):

* θ_pre: one UNet pre-trained on all training digits;
* shards: the training digits split by class into five shards {0,1}, {2,3}, {4,5}, {6,7}, {8,9};
  θ_k fine-tunes θ_pre on shard k (Adam, same recipe for every shard);
* the **paragon**: θ_pre fine-tuned on the union of the shards with the same total number of
  steps as the five shard models together;
* the **soup**: a living soup folder (``merge.soups.folder``), members saved as diffusers folders
  (``DDPMPipeline.save_pretrained``): ``init`` with four shards, ``add`` the fifth (continual
  learning), ``build``, loaded back with ``DiffusionPipeline.from_pretrained``; then, for every
  shard k, ``remove`` k (unlearning; in a copy of the soup) and build again; and finally
  ``remove`` the fifth shard from the soup itself, which must give back the four-shard soup bit for
  bit.

Metrics, computed here (no downloads): an oracle classifier (an MLP trained on the real training
digits) gives each sample's class and confidence; **FD** is the Fréchet distance between samples
and test digits in the oracle's 128-d hidden features (an FID for digits: lower is better); the
**held-out loss** is the DDPM denoising loss on the test digits (fixed noise and timesteps); the
**class share** is the fraction of samples the oracle assigns to each class. Samples come from
DDIM with the same initial noise for every model, so the PNG grids can be compared cell by cell.

Claims checked (reported, not assumed):

1. the soup approaches or beats the paragon (held-out loss and FD);
2. removing shard k from the soup unlearns it: the share of k's classes in the samples drops,
   while the other classes keep theirs.

A 2-D version (``mixture2d``: a Gaussian mixture, one mode per shard, an MLP noise predictor)
runs in seconds and checks a prediction of the paper's analysis: averaging the weights
averages the scores, so the soup samples the *geometric* mean of the shard densities (a single
Gaussian at the centroid of the modes), not their union; removing a shard moves the samples to the
centroid of the others.

Run: ``python examples/diffusion_soup_digits.py`` (a few minutes of CPU); ``--quick`` is the
configuration of the slow test, ``--mixture`` runs only the 2-D version. Writes ``results.json``,
``diffusion_soup_samples.png``, ``diffusion_soup_unlearning.png`` and ``mixture2d.png`` under
``examples/out/diffusion_soup_digits/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge.soups.folder import Soup  # noqa: E402

OUT = ROOT / "examples" / "out" / "diffusion_soup_digits"
SHARDS: tuple[tuple[int, ...], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


@dataclass(frozen=True)
class Config:
    channels: tuple[int, ...] = (32, 64)
    timesteps: int = 100
    pretrain_epochs: int = 30
    pretrain_lr: float = 2e-3
    finetune_epochs: int = 20  # of the union: each shard model gets 1/5 of these steps
    finetune_lr: float = 5e-4
    batch: int = 64
    samples: int = 400
    sample_steps: int = 40  # DDIM
    unlearn: tuple[int, ...] = (0, 1, 2, 3, 4)  # shards removed one at a time
    seed: int = 0
    out: Path = OUT

    @staticmethod
    def quick(out: Path = OUT) -> Config:
        """The slow test's configuration: a smaller UNet, shorter training, fewer samples, one removal."""
        return Config(
            channels=(16, 32),
            pretrain_epochs=8,
            finetune_epochs=8,
            samples=200,
            sample_steps=20,
            unlearn=(0,),
            out=out,
        )


# --------------------------------------------------------------------------------------------------
# data, oracle, model
# --------------------------------------------------------------------------------------------------
@dataclass
class Data:
    xtr: torch.Tensor  # (n, 1, 8, 8) in [-1, 1]
    ytr: torch.Tensor
    xte: torch.Tensor
    yte: torch.Tensor


def load_data() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 * 2 - 1).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    t = torch.from_numpy
    return Data(t(xtr).view(-1, 1, 8, 8), t(ytr).long(), t(xte).view(-1, 1, 8, 8), t(yte).long())


class Oracle(torch.nn.Module):
    """A digits classifier trained on the real training images: judges the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU())
        self.out = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


def train_oracle(data: Data, seed: int) -> tuple[Oracle, float]:
    torch.manual_seed(seed)
    clf = Oracle()
    opt = torch.optim.Adam(clf.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        perm = torch.randperm(len(data.xtr), generator=g)
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            loss = F.cross_entropy(clf(data.xtr[b]), data.ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(data.xte).argmax(1) == data.yte).float().mean())
    return clf, acc


def make_unet(cfg: Config) -> Any:
    from diffusers import UNet2DModel

    torch.manual_seed(cfg.seed)
    n = len(cfg.channels)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=cfg.channels,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        norm_num_groups=8,
    )


def schedulers(cfg: Config) -> tuple[Any, Any]:
    from diffusers import DDIMScheduler, DDPMScheduler

    train = DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_schedule="squaredcos_cap_v2")
    sample = DDIMScheduler(num_train_timesteps=cfg.timesteps, beta_schedule="squaredcos_cap_v2")
    return train, sample


def fit(unet: Any, sched: Any, x: torch.Tensor, *, steps: int, lr: float, batch: int, seed: int) -> Any:
    """The DDPM objective: predict the noise added at a uniformly drawn timestep."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(unet.parameters(), lr)
    unet.train()
    n, i = len(x), len(x)
    perm = torch.arange(n)
    T = sched.config.num_train_timesteps
    for _ in range(steps):
        if i + batch > n:
            perm, i = torch.randperm(n, generator=g), 0
        b = x[perm[i : i + batch]]
        i += batch
        t = torch.randint(0, T, (len(b),), generator=g)
        noise = torch.randn(b.shape, generator=g)
        loss = F.mse_loss(unet(sched.add_noise(b, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    return unet


@torch.no_grad()
def heldout_loss(unet: Any, sched: Any, x: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(123)
    T = sched.config.num_train_timesteps
    total = 0.0
    for _ in range(2):
        t = torch.randint(0, T, (len(x),), generator=g)
        noise = torch.randn(x.shape, generator=g)
        total += float(F.mse_loss(unet(sched.add_noise(x, noise, t), t).sample, noise))
    return total / 2


@torch.no_grad()
def sample(unet: Any, sampler: Any, n: int, steps: int) -> torch.Tensor:
    """DDIM (η = 0) from one fixed initial noise, the same for every model."""
    sampler.set_timesteps(steps)
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    for t in sampler.timesteps:
        z = sampler.step(unet(z, t).sample, t, z).prev_sample
    return z.clamp(-1, 1)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    import scipy.linalg

    a, b = a.double(), b.double()
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    with warnings.catch_warnings():  # rank-deficient covariances (dead ReLU features): the root is still fine
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm((ca @ cb).numpy())
    return float(((ma - mb) ** 2).sum() + torch.trace(ca + cb) - 2 * np.trace(np.real(root)))


@torch.no_grad()
def judge(
    name: str, unet: Any, cfg: Config, data: Data, oracle: Oracle, scheds: tuple[Any, Any]
) -> dict[str, Any]:
    s = sample(unet, scheds[1], cfg.samples, cfg.sample_steps)
    p = F.softmax(oracle(s), 1)
    cls = p.argmax(1)
    share = torch.bincount(cls, minlength=10).float() / len(s)
    nn = torch.cdist(s.flatten(1), data.xtr.flatten(1)).min(1).values
    return {
        "name": name,
        "heldout_loss": heldout_loss(unet, scheds[0], data.xte),
        "fd": frechet(oracle.hidden(s), oracle.hidden(data.xte)),
        "confidence": float(p.max(1).values.mean()),
        "class_share": share.tolist(),
        "nn_distance": float(nn.mean()),
        "samples": s,
    }


# --------------------------------------------------------------------------------------------------
# the digits experiment
# --------------------------------------------------------------------------------------------------
def save_pipeline(unet: Any, sched: Any, folder: Path) -> Path:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


def load_unet(folder: Path) -> Any:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder).unet.eval()


def run_digits(cfg: Config, verbose: bool = True) -> dict[str, Any]:
    data = load_data()
    oracle, oracle_acc = train_oracle(data, cfg.seed)
    scheds = schedulers(cfg)
    train_sched = scheds[0]
    say = print if verbose else (lambda *_a, **_k: None)
    t0 = time.perf_counter()
    models_dir = cfg.out / "models"
    shutil.rmtree(models_dir, ignore_errors=True)
    spe = -(-len(data.xtr) // cfg.batch)
    pre = fit(
        make_unet(cfg),
        train_sched,
        data.xtr,
        steps=cfg.pretrain_epochs * spe,
        lr=cfg.pretrain_lr,
        batch=cfg.batch,
        seed=cfg.seed,
    )
    save_pipeline(pre, train_sched, models_dir / "pretrained")
    say(f"pretrained {cfg.pretrain_epochs} epochs ({time.perf_counter() - t0:.0f} s)", flush=True)
    ft_steps = cfg.finetune_epochs * spe
    shard_dirs = []
    for k, classes in enumerate(SHARDS):
        xs = data.xtr[torch.isin(data.ytr, torch.tensor(classes))]
        u = fit(
            copy.deepcopy(pre),
            train_sched,
            xs,
            steps=ft_steps // len(SHARDS),
            lr=cfg.finetune_lr,
            batch=cfg.batch,
            seed=cfg.seed + 1 + k,
        )
        shard_dirs.append(save_pipeline(u, train_sched, models_dir / f"shard{k}"))
    paragon = fit(
        copy.deepcopy(pre),
        train_sched,
        data.xtr,
        steps=ft_steps,
        lr=cfg.finetune_lr,
        batch=cfg.batch,
        seed=cfg.seed + 99,
    )
    save_pipeline(paragon, train_sched, models_dir / "paragon")
    train_seconds = time.perf_counter() - t0
    say(f"fine-tuned 5 shard models and the paragon ({train_seconds:.0f} s)", flush=True)

    # the soup's life: init with four shards, add the fifth, build; unlearn each shard; remove the fifth again
    soup_dir = cfg.out / "soup"
    shutil.rmtree(soup_dir, ignore_errors=True)
    soup = Soup.init(soup_dir, shard_dirs[:4], base=models_dir / "pretrained")
    soup.build(cfg.out / "built" / "soup4", overwrite=True)
    soup.add(shard_dirs[4])
    built = soup.build(cfg.out / "built" / "soup", overwrite=True)
    results = {
        "pretrained": judge("pretrained", pre, cfg, data, oracle, scheds),
        "paragon": judge("paragon", paragon, cfg, data, oracle, scheds),
        "soup": judge("soup", load_unet(cfg.out / "built" / "soup"), cfg, data, oracle, scheds),
    }
    for k in range(len(SHARDS)):
        results[f"shard{k}"] = judge(f"shard{k}", load_unet(shard_dirs[k]), cfg, data, oracle, scheds)
    for k in cfg.unlearn:
        copy_dir = cfg.out / f"soup_minus{k}"
        shutil.rmtree(copy_dir, ignore_errors=True)
        shutil.copytree(soup_dir, copy_dir)
        Soup(copy_dir).remove(f"shard{k}")
        Soup(copy_dir).build(cfg.out / "built" / f"soup_minus{k}", overwrite=True)
        results[f"soup_minus{k}"] = judge(
            f"soup − shard{k}", load_unet(cfg.out / "built" / f"soup_minus{k}"), cfg, data, oracle, scheds
        )
        shutil.rmtree(copy_dir)
    soup.remove("shard4")
    soup.build(cfg.out / "built" / "soup4_again", overwrite=True)
    restored = all(
        (cfg.out / "built" / "soup4" / rel).read_bytes()
        == (cfg.out / "built" / "soup4_again" / rel).read_bytes()
        for rel in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json", "model_index.json")
    )
    say(f"souped, unlearned, sampled ({time.perf_counter() - t0:.0f} s)", flush=True)

    grids = {k: v.pop("samples") for k, v in results.items()}
    unlearning = []
    for k in cfg.unlearn:
        cls = list(SHARDS[k])
        full, minus, pre_ = results["soup"], results[f"soup_minus{k}"], results["pretrained"]
        others = [c for c in range(10) if c not in cls]
        unlearning.append(
            {
                "shard": k,
                "classes": cls,
                "share_soup": sum(full["class_share"][c] for c in cls),
                "share_soup_minus": sum(minus["class_share"][c] for c in cls),
                "share_pretrained": sum(pre_["class_share"][c] for c in cls),
                "share_shard_model": sum(results[f"shard{k}"]["class_share"][c] for c in cls),
                "others_soup": float(np.mean([full["class_share"][c] for c in others])),
                "others_soup_minus": float(np.mean([minus["class_share"][c] for c in others])),
            }
        )
    shard_keys = [f"shard{k}" for k in range(len(SHARDS))]
    summary = {
        "oracle_test_accuracy": oracle_acc,
        "soup_minus_paragon_heldout": results["soup"]["heldout_loss"] - results["paragon"]["heldout_loss"],
        "soup_minus_paragon_fd": results["soup"]["fd"] - results["paragon"]["fd"],
        "mean_shard_heldout": float(np.mean([results[k]["heldout_loss"] for k in shard_keys])),
        "mean_shard_fd": float(np.mean([results[k]["fd"] for k in shard_keys])),
        "unlearning": unlearning,
        "add_then_remove_restores_bits": restored,
        "souped_components": built["summed"],
        "copied_components": built["copied"],
    }
    plot_samples(grids, cfg.out / "diffusion_soup_samples.png", cfg)
    plot_unlearning(results, unlearning, cfg.out / "diffusion_soup_unlearning.png")
    return {"results": results, "summary": summary, "train_seconds": train_seconds}


def digits_claims(summary: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    rel = [1 - u["share_soup_minus"] / u["share_soup"] for u in summary["unlearning"]]
    return {
        "soup_approaches_paragon_heldout": {
            "holds": summary["soup_minus_paragon_heldout"] <= 0.05 * results["paragon"]["heldout_loss"],
            "soup": results["soup"]["heldout_loss"],
            "paragon": results["paragon"]["heldout_loss"],
            "pretrained": results["pretrained"]["heldout_loss"],
            "mean_shard": summary["mean_shard_heldout"],
        },
        "soup_fd_le_paragon": {
            "holds": results["soup"]["fd"] <= results["paragon"]["fd"],
            "soup": results["soup"]["fd"],
            "paragon": results["paragon"]["fd"],
            "pretrained": results["pretrained"]["fd"],
            "mean_shard": summary["mean_shard_fd"],
        },
        "removal_unlearns": {
            "holds": all(r >= 0.3 for r in rel),
            "relative_drop_per_shard": rel,
            "share_after_vs_pretrained": [
                (u["share_soup_minus"], u["share_pretrained"]) for u in summary["unlearning"]
            ],
        },
        "add_then_remove_restores_bits": {"holds": summary["add_then_remove_restores_bits"]},
    }


def plot_samples(grids: dict[str, torch.Tensor], path: Path, cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        "pretrained",
        "paragon",
        "soup",
        *[k for k in grids if k.startswith("soup_minus")],
        *[k for k in grids if k.startswith("shard")],
    ]
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, name in zip(np.ravel(axes), names, strict=False):
        s = grids[name][:64].view(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
        ax.imshow((s.numpy() + 1) / 2, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        title = name.replace("soup_minus", "soup − shard")
        if name.startswith("shard"):
            title += f" {SHARDS[int(name[5:])]}"
        elif name.startswith("soup_minus"):
            title += f" {SHARDS[int(name[10:])]}"
        ax.set_title(title, fontsize=9)
    fig.suptitle(
        "DDIM samples, same initial noise in every panel (8×8 digits, UNet2DModel "
        f"{'-'.join(map(str, cfg.channels))})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_unlearning(results: dict[str, Any], unlearning: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    x = np.arange(10)
    w = 0.27
    ax[0].bar(x - w, results["pretrained"]["class_share"], w, label="pretrained", color="C7")
    ax[0].bar(x, results["soup"]["class_share"], w, label="soup", color="C0")
    if unlearning:
        k = unlearning[0]["shard"]
        ax[0].bar(
            x + w, results[f"soup_minus{k}"]["class_share"], w, label=f"soup − shard {SHARDS[k]}", color="C3"
        )
    ax[0].set(
        xticks=x, xlabel="class (oracle)", ylabel="share of samples", title="class shares of the samples"
    )
    ax[0].legend(fontsize=8)
    labels = [str(tuple(u["classes"])) for u in unlearning]
    xi = np.arange(len(unlearning))
    ax[1].bar(xi - w, [u["share_pretrained"] for u in unlearning], w, label="pretrained", color="C7")
    ax[1].bar(xi, [u["share_soup"] for u in unlearning], w, label="soup", color="C0")
    ax[1].bar(xi + w, [u["share_soup_minus"] for u in unlearning], w, label="soup − that shard", color="C3")
    ax[1].set(
        xticks=xi,
        xticklabels=labels,
        xlabel="removed shard (its classes)",
        ylabel="share of its classes in the samples",
        title="unlearning: remove one shard from the soup",
    )
    ax[1].legend(fontsize=8)
    for a in ax:
        a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# the 2-D mixture version
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixtureConfig:
    radius: float = 2.0
    sigma: float = 0.4
    shards: int = 3
    timesteps: int = 100
    pretrain_steps: int = 1500
    finetune_steps: int = 400
    samples: int = 1000
    seed: int = 0
    out: Path = OUT
    extra: dict[str, Any] = field(default_factory=dict)


class ScoreMLP(torch.nn.Module):
    """ε_θ(x_t, t) for 2-D points: sinusoidal time embedding, two hidden layers."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(2 + 16, hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)
        a = t.float()[:, None] * f[None]
        h = F.silu(self.inp(torch.cat([x, a.sin(), a.cos()], 1)))
        return self.out(F.silu(self.mid(h)))


def mixture2d(cfg: MixtureConfig | None = None, *, plot: bool = True) -> dict[str, Any]:
    """Shard k = N(μ_k, σ²I), μ_k on a circle; θ_pre learns a broad N(0, 4I); the shard models, the
    paragon (the union) and the soup (through a soup folder) are sampled with DDPM."""
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file, save_file

    cfg = cfg or MixtureConfig()
    sched = DDPMScheduler(
        num_train_timesteps=cfg.timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=False
    )
    T = cfg.timesteps
    angles = [2 * math.pi * k / cfg.shards for k in range(cfg.shards)]
    mus = torch.tensor([[cfg.radius * math.cos(a), cfg.radius * math.sin(a)] for a in angles])

    def shard(k: int):
        return lambda n, g: mus[k] + cfg.sigma * torch.randn(n, 2, generator=g)

    def union(n: int, g: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, cfg.shards, (n,), generator=g)
        return mus[k] + cfg.sigma * torch.randn(n, 2, generator=g)

    def broad(n: int, g: torch.Generator) -> torch.Tensor:
        return 2.0 * torch.randn(n, 2, generator=g)

    def train(m: ScoreMLP, draw: Any, steps: int, lr: float, seed: int) -> ScoreMLP:
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(m.parameters(), lr)
        for _ in range(steps):
            x = draw(256, g)
            t = torch.randint(0, T, (256,), generator=g)
            noise = torch.randn(x.shape, generator=g)
            loss = F.mse_loss(m(sched.add_noise(x, noise, t), t), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m

    @torch.no_grad()
    def draw_samples(m: ScoreMLP) -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(cfg.samples, 2, generator=g)
        sched.set_timesteps(T)
        for t in sched.timesteps:
            x = sched.step(m(x, torch.full((cfg.samples,), int(t))), t, x, generator=g).prev_sample
        return x

    def stats(x: torch.Tensor, centre: torch.Tensor) -> dict[str, Any]:
        med = x.median(0).values
        return {
            "median": med.tolist(),
            "mad": (x - med).abs().median(0).values.tolist(),
            "near_mode": float((torch.cdist(x, mus).min(1).values < 1).float().mean()),
            "near_centroid": float((torch.linalg.norm(x - centre, dim=1) < 1).float().mean()),
        }

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    pre = train(ScoreMLP(), broad, cfg.pretrain_steps, 2e-3, cfg.seed)
    shard_models = [
        train(copy.deepcopy(pre), shard(k), cfg.finetune_steps, 5e-4, cfg.seed + 1 + k)
        for k in range(cfg.shards)
    ]
    paragon = train(copy.deepcopy(pre), union, cfg.finetune_steps * cfg.shards, 5e-4, cfg.seed + 99)
    folder = cfg.out / "mixture2d"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files = []
    for k, m in enumerate(shard_models):
        files.append(folder / f"shard{k}.safetensors")
        save_file(m.state_dict(), files[-1])
    soup = Soup.init(folder / "soup", files)
    soup.build(folder / "soup_all")
    soup.remove("shard0")
    soup.build(folder / "soup_minus0")

    def loaded(path: Path) -> ScoreMLP:
        m = ScoreMLP()
        m.load_state_dict(load_file(path / "model.safetensors"))
        return m

    centroid, centroid_rest = mus.mean(0), mus[1:].mean(0)
    samples = {
        "pretrained": draw_samples(pre),
        "paragon": draw_samples(paragon),
        **{f"shard{k}": draw_samples(m) for k, m in enumerate(shard_models)},
        "soup": draw_samples(loaded(folder / "soup_all")),
        "soup_minus0": draw_samples(loaded(folder / "soup_minus0")),
    }
    res = {k: stats(v, centroid_rest if k == "soup_minus0" else centroid) for k, v in samples.items()}
    pred = {
        "soup_centre": centroid.tolist(),
        "soup_minus0_centre": centroid_rest.tolist(),
        "sigma": cfg.sigma,
    }
    claims = {
        "paragon_samples_the_union": {
            "holds": res["paragon"]["near_mode"] >= 0.7,
            "near_mode": res["paragon"]["near_mode"],
        },
        "soup_samples_the_geometric_mean": {
            "holds": res["soup"]["near_centroid"] >= 0.5 and res["soup"]["near_mode"] <= 0.25,
            "near_centroid": res["soup"]["near_centroid"],
            "near_mode": res["soup"]["near_mode"],
            "median": res["soup"]["median"],
            "predicted": pred["soup_centre"],
        },
        "removal_moves_to_the_others_centroid": {
            "holds": float(torch.linalg.norm(torch.tensor(res["soup_minus0"]["median"]) - centroid_rest))
            < 0.5
            and res["soup_minus0"]["near_centroid"] >= 0.5,
            "median": res["soup_minus0"]["median"],
            "predicted": pred["soup_minus0_centre"],
            "near_centroid": res["soup_minus0"]["near_centroid"],
        },
    }
    if plot:
        plot_mixture(samples, mus, centroid, centroid_rest, cfg.out / "mixture2d.png")
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "stats": res,
        "prediction": pred,
        "claims": claims,
        "seconds": time.perf_counter() - t0,
    }


def plot_mixture(
    samples: dict[str, torch.Tensor], mus: torch.Tensor, c: torch.Tensor, c_rest: torch.Tensor, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["paragon", *[k for k in samples if k.startswith("shard")], "soup", "soup_minus0"]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), sharex=True, sharey=True)
    for ax, name in zip(axes, names, strict=True):
        x = samples[name].clamp(-4, 4)
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
        ax.scatter(mus[:, 0], mus[:, 1], marker="x", color="k", s=30)
        centre = c_rest if name == "soup_minus0" else c
        if name.startswith("soup"):
            ax.scatter([centre[0]], [centre[1]], marker="+", color="C3", s=120, label="geometric-mean centre")
            ax.legend(fontsize=6, loc="lower left")
        ax.set_title(name.replace("soup_minus0", "soup − shard0"), fontsize=9)
        ax.set(xlim=(-4, 4), ylim=(-4, 4), aspect="equal")
    fig.suptitle(
        "2-D Diffusion Soup: the soup samples the geometric mean of the shards, not their union", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
def main(cfg: Config | None = None, *, verbose: bool = True, digits: bool = True) -> dict[str, Any]:
    cfg = cfg or Config()
    t0, cpu0 = time.perf_counter(), time.process_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no "accelerate is not installed" notes, no progress bars
    diffusers_logging.disable_progress_bar()
    cfg.out.mkdir(parents=True, exist_ok=True)
    try:
        mix = mixture2d(MixtureConfig(out=cfg.out))
        out: dict[str, Any] = {"mixture2d": mix}
        if digits:
            dig = run_digits(cfg, verbose)
            out["digits"] = {
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                **dig,
                "claims": digits_claims(dig["summary"], dig["results"]),
            }
    finally:
        torch.set_num_threads(threads)
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - cpu0
    (cfg.out / "results.json").write_text(json.dumps(out, indent=1))
    out["table"] = table(out)
    if verbose:
        print()
        print(out["table"])
        print(
            f"\ntotal {out['seconds']:.0f} s wall, {out['cpu_seconds'] / 60:.1f} CPU minutes; wrote {cfg.out}"
        )
    return out


def table(out: dict[str, Any]) -> str:
    lines = []
    mix = out["mixture2d"]
    lines.append("2-D mixture (one Gaussian per shard; the geometric mean is one Gaussian at the centroid):")
    lines.append("| model | median | near a mode | near the predicted centre |")
    lines.append("|---|---|---|---|")
    for k, v in mix["stats"].items():
        lines.append(
            f"| {k} | ({v['median'][0]:+.2f}, {v['median'][1]:+.2f}) | {v['near_mode']:.2f} | "
            f"{v['near_centroid']:.2f} |"
        )
    for name, c in mix["claims"].items():
        lines.append(f"{'HOLDS' if c['holds'] else 'FAILS'} {name}")
    if "digits" in out:
        d = out["digits"]
        lines.append(f"\ndigits (oracle test accuracy {100 * d['summary']['oracle_test_accuracy']:.1f} %):")
        lines.append("| model | held-out loss | FD | confidence | NN distance | class shares (0..9, %) |")
        lines.append("|---|---|---|---|---|---|")
        for v in d["results"].values():
            shares = " ".join(f"{100 * s:.0f}" for s in v["class_share"])
            lines.append(
                f"| {v['name']} | {v['heldout_loss']:.4f} | {v['fd']:.2f} | {v['confidence']:.3f} | "
                f"{v['nn_distance']:.3f} | {shares} |"
            )
        lines.append(
            "\n| removed shard | its classes' share: soup | soup − shard | pretrained | shard model | "
            "other classes (mean): soup → soup − shard |"
        )
        lines.append("|---|---|---|---|---|---|")
        for u in d["summary"]["unlearning"]:
            lines.append(
                f"| {tuple(u['classes'])} | {100 * u['share_soup']:.1f} % | {100 * u['share_soup_minus']:.1f} % | "
                f"{100 * u['share_pretrained']:.1f} % | {100 * u['share_shard_model']:.1f} % | "
                f"{100 * u['others_soup']:.1f} → {100 * u['others_soup_minus']:.1f} % |"
            )
        for name, c in d["claims"].items():
            lines.append(
                f"{'HOLDS' if c['holds'] else 'FAILS'} {name}: "
                + ", ".join(f"{k}={v}" for k, v in c.items() if k != "holds")
            )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced configuration of the slow test")
    ap.add_argument("--mixture", action="store_true", help="only the 2-D mixture version (seconds)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    c = Config.quick(a.out) if a.quick else Config(out=a.out)
    main(c, digits=not a.mixture)
    _ = replace  # (dataclasses.replace is handy when experimenting with Config)
