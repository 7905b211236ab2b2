"""Orthogonal adaptation (Po et al., CVPR 2024) on a toy where each concept has its own input token.

Why this toy. A naive toy in which all concepts share the same inputs (digit images plus a trigger)
did not reproduce the paper (research note §3.8): orthogonal *weights* do not stop ``ΔW_j x_i`` when
concept j's adapter reads the same inputs as concept i's. In a text-to-image model a concept enters
through its own new token: the adapted cross-attention K/V projections see that token's embedding,
nearly orthogonal to every other token's. This toy has exactly that structure:

* **"text"**: a frozen embedding table (dimension 256, i.i.d. N(0, 1/256) rows: nearly orthogonal) with
  a BOS token, one token per digit class 0–9 and one new token per concept;
* **"image" model**: a conditional denoiser of sklearn's 8×8 digits: ``x_t = x_0 + σ ε`` goes through
  an MLP, its features attend (one head, dimension 64) over the prompt's token embeddings through
  ``to_q`` (image side) and ``to_k`` / ``to_v`` (text side), and a decoder predicts ``x_0``. The base
  model is trained on prompts ``[BOS, digit d]`` (and ``[BOS]`` alone, 20 % of the time);
* **concepts**: new "identities" that the base model never saw: one digit under one transform
  (rotated, flipped, transposed), 5 training images each. Each concept gets a new token and is
  fine-tuned *independently* (no access to the others) with a rank-4 LoRA on ``to_k`` and ``to_v`` only
  (the layers that read text, as in Custom Diffusion / Mix-of-Show), with prior preservation on
  digit prompts (DreamBooth). LoRAs are real ``peft`` models, saved with ``save_pretrained``.

Variants (same steps; each variant's learning rate picked from a small grid by *solo* fidelity on
held-out images of the concepts, never by the merged result):

* ``lora``: plain LoRA (peft's default init: A Kaiming-uniform, B = 0; both trained);
* ``ortho_A``: orthogonal adaptation with the input-side factor frozen (``lora_A = O[:, S_i]ᵀ``; the
  paper's fixed ``B_i``, which multiplies the input), ``lora_B`` trained from 0;
* ``ortho_B``: the output-side factor frozen (``lora_B = O[:, S_i]``), ``lora_A`` trained from 0;
* ``lora_zeroA``: a control: plain LoRA but with A initialised to 0 and B random (both trained), to
  separate "orthogonal slots" from "the trained factor starts at zero".

Merging: the concept adapters are merged by weightsmith (``merge_adapters(method="cat")``, the exact sum
of the residuals, as the paper sums them) and folded into the base by ``FoldedCheckpoint``; plain
LoRA is also merged by averaging (FedAvg, the paper's baseline). Metrics per concept (prompt
``[BOS, concept]``, its held-out images noised at σ = 1):

* **identity**: the fraction of outputs whose nearest prototype (cosine, among the 10 digit and all
  concept prototypes) is the concept's own; **cos**: mean cosine to the concept's prototype;
* **crosstalk**: ``‖Σ_{j≠i} ΔW_j e_i‖ / ‖ΔW_i e_i‖`` at ``to_v`` (and ``to_k``), e_i the concept's token;
* the digits' identity after merging (the prior), and the largest pairwise Frobenius cosine of residuals.

Run: ``python examples/orthogonal_adaptation.py`` (3 seeds, 8 concepts, ~30–45 minutes on two busy cores);
``--quick`` is the reduced run of the slow test. Writes ``results.json`` and
``orthogonal_adaptation.png`` under ``examples/out/orthogonal_adaptation/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from merge.checkpoint import open_checkpoint  # noqa: E402
from merge.lora.algebra import merge_adapters, residual_cosines  # noqa: E402
from merge.lora.bind import FoldedCheckpoint  # noqa: E402
from merge.lora.formats import read_adapter  # noqa: E402
from merge.lora.orthogonal import OrthogonalSpec, apply_orthogonal_adaptation  # noqa: E402

D_TEXT, D_ATTN, HIDDEN = 256, 64, 128
#: (digit, transform): identities the base model never sees (it is trained on upright digits only)
CONCEPTS = [(2, "rot90"), (3, "rot180"), (4, "fliplr"), (5, "rot270"), (7, "transpose"), (9, "flipud"),
            (1, "rot90"), (6, "rot90")]
VARIANTS = ["lora", "ortho_A", "ortho_B", "lora_zeroA"]


@dataclass
class Config:
    out: Path = ROOT / "examples" / "out" / "orthogonal_adaptation"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_concepts: int = 8
    rank: int = 4
    shots: int = 5
    base_steps: int = 2500
    concept_steps: int = 200
    lr_grid: dict[str, list[float]] = field(
        default_factory=lambda: {
            "lora": [1e-2, 3e-2],
            "ortho_A": [3e-2, 1e-1],
            "ortho_B": [3e-2, 1e-1],
            "lora_zeroA": [1e-2, 3e-2],
        }
    )
    sigma_eval: float = 1.0
    #: train the concept's token embedding with its LoRA (ED-LoRA / Mix-of-Show / Custom Diffusion style) or keep
    #: it a fixed random vector (the research note's design); each setting is run
    token_modes: list[str] = field(default_factory=lambda: ["fixed", "learned"])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))

    @classmethod
    def quick(cls, out: Path) -> Config:
        return cls(
            out=out,
            seeds=[0],
            n_concepts=3,
            base_steps=800,
            concept_steps=150,
            token_modes=["learned"],
            variants=["lora", "ortho_A"],
            lr_grid={"lora": [1e-2], "ortho_A": [3e-2]},
        )


# ---------------------------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------------------------
def _transform(img: np.ndarray, how: str) -> np.ndarray:
    return {
        "rot90": lambda x: np.rot90(x, 1),
        "rot180": lambda x: np.rot90(x, 2),
        "rot270": lambda x: np.rot90(x, 3),
        "fliplr": np.fliplr,
        "flipud": np.flipud,
        "transpose": np.transpose,
    }[how](img)


def load_data(cfg: Config, seed: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)  # n × 8 × 8 in [0, 1]
    y = torch.tensor(d.target)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    base_idx, concept_pool = perm[: int(0.8 * len(y))], perm[int(0.8 * len(y)) :]
    concepts = []
    for c, (digit, how) in enumerate(CONCEPTS[: cfg.n_concepts]):
        pool = [i for i in concept_pool if int(y[i]) == digit]
        imgs = torch.tensor(
            np.stack([_transform(d.images[i] / 16.0, how).copy() for i in pool]), dtype=torch.float32
        )
        concepts.append(
            {
                "name": f"{digit}-{how}",
                "token": 11 + c,
                "train": imgs[: cfg.shots].flatten(1),
                "eval": imgs[cfg.shots :].flatten(1),
                "proto": imgs.flatten(1).mean(0),
            }
        )
    xb, yb = x[base_idx].flatten(1), y[base_idx]
    protos = torch.stack([xb[yb == k].mean(0) for k in range(10)] + [c["proto"] for c in concepts])
    return {"x": xb, "y": yb, "concepts": concepts, "protos": protos}


class Denoiser(torch.nn.Module):
    """x_t (64) -> MLP features -> cross-attention over prompt token embeddings -> predicted x_0 (64)."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1000 + seed)
        self.tokens = torch.nn.Embedding(vocab, D_TEXT)
        with torch.no_grad():
            self.tokens.weight.copy_(torch.randn(vocab, D_TEXT, generator=g) / math.sqrt(D_TEXT))
        self.tokens.weight.requires_grad_(False)
        self.enc = torch.nn.Sequential(
            torch.nn.Linear(65, HIDDEN), torch.nn.SiLU(), torch.nn.Linear(HIDDEN, HIDDEN)
        )
        self.to_q = torch.nn.Linear(HIDDEN, D_ATTN, bias=False)
        self.to_k = torch.nn.Linear(D_TEXT, D_ATTN, bias=False)
        self.to_v = torch.nn.Linear(D_TEXT, D_ATTN, bias=False)
        self.dec = torch.nn.Sequential(
            torch.nn.Linear(HIDDEN + D_ATTN, HIDDEN), torch.nn.SiLU(), torch.nn.Linear(HIDDEN, 64)
        )

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        h = self.enc(torch.cat([x_t, sigma[:, None]], 1))
        e = self.tokens(prompt)  # b × L × d
        q = self.to_q(h)[:, None, :]
        k, v = self.to_k(e), self.to_v(e)
        att = torch.softmax((q * k).sum(-1) / math.sqrt(D_ATTN), dim=-1)
        a = (att[..., None] * v).sum(1)
        return self.dec(torch.cat([h, a], 1))


def _noisy(
    x0: torch.Tensor, g: torch.Generator, sigma: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    s = (
        torch.full((len(x0),), sigma)
        if sigma is not None
        else torch.tensor([0.3, 0.6, 1.0, 1.5])[torch.randint(0, 4, (len(x0),), generator=g)]
    )
    return x0 + s[:, None] * torch.randn(x0.shape, generator=g), s


def _prompts(tokens: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(tokens), tokens], 1)  # [BOS, token]


def train_base(data: dict[str, Any], cfg: Config, seed: int) -> Denoiser:
    torch.manual_seed(seed)
    model = Denoiser(11 + cfg.n_concepts, seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    x, y = data["x"], data["y"]
    for _ in range(cfg.base_steps):
        i = torch.randint(0, len(x), (256,), generator=g)
        xt, s = _noisy(x[i], g)
        tok = torch.where(torch.rand(256, generator=g) < 0.2, torch.zeros_like(y[i]), y[i] + 1)
        loss = F.mse_loss(model(xt, s, _prompts(tok)), x[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# concepts
# ---------------------------------------------------------------------------------------------
def fine_tune(
    base: Denoiser,
    data: dict[str, Any],
    c: int,
    variant: str,
    lr: float,
    cfg: Config,
    seed: int,
    out: Path,
    learn_token: bool,
) -> Path:
    from peft import LoraConfig, get_peft_model

    model = Denoiser(11 + cfg.n_concepts, seed)
    model.load_state_dict(base.state_dict())
    torch.manual_seed(10_000 * seed + 100 * c + VARIANTS.index(variant))
    pm = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=["to_k", "to_v"]))
    if variant in ("ortho_A", "ortho_B"):
        apply_orthogonal_adaptation(
            pm, OrthogonalSpec(seed=seed, concept=c, rank=cfg.rank, frozen=variant[-1])
        )
    elif variant == "lora_zeroA":
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.empty_like(p).uniform_(-1, 1) / math.sqrt(p.shape[1]))
                if "lora_A" in n:
                    p.zero_()
    concept = data["concepts"][c]
    table = pm.base_model.model.tokens.weight
    if learn_token:  # only the concept's own row learns (Adam leaves rows with zero gradient unchanged)
        table.requires_grad_(True)
        row = torch.zeros(table.shape[0], 1)
        row[concept["token"]] = 1.0
        table.register_hook(lambda grad: grad * row)
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed * 7919 + c)
    x, y = data["x"], data["y"]
    for _ in range(cfg.concept_steps):
        ic = torch.randint(0, len(concept["train"]), (32,), generator=g)
        xc = concept["train"][ic]
        ib = torch.randint(0, len(x), (32,), generator=g)  # prior preservation on digit prompts
        x0 = torch.cat([xc, x[ib]])
        tok = torch.cat([torch.full((32,), concept["token"]), y[ib] + 1])
        xt, s = _noisy(x0, g)
        loss = F.mse_loss(pm(xt, s, _prompts(tok)), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = out / f"{variant}" / f"concept{c}"
    if folder.exists():
        shutil.rmtree(folder)
    table.requires_grad_(False)
    pm.save_pretrained(folder)
    from safetensors.torch import save_file

    # the concept's token embedding travels with its adapter (like a textual-inversion embedding)
    save_file({"token": table[concept["token"]].detach().clone()}, str(folder / "token.safetensors"))
    return folder


@torch.no_grad()
def evaluate(model: Denoiser, data: dict[str, Any], cfg: Config, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(555 + seed)
    protos = F.normalize(data["protos"], dim=1)
    per = []
    for c, concept in enumerate(data["concepts"]):
        x0 = concept["eval"].repeat(3, 1)
        xt, s = _noisy(x0, g, cfg.sigma_eval)
        out = F.normalize(model(xt, s, _prompts(torch.full((len(x0),), concept["token"]))), dim=1)
        sims = out @ protos.T
        per.append(
            {
                "identity": float((sims.argmax(1) == 10 + c).float().mean()),
                "cos": float(sims[:, 10 + c].mean()),
            }
        )
    i = torch.arange(0, len(data["x"]), 3)
    x0, y = data["x"][i], data["y"][i]
    xt, s = _noisy(x0, g, cfg.sigma_eval)
    out = F.normalize(model(xt, s, _prompts(y + 1)), dim=1)
    digits = float(((out @ protos.T).argmax(1) == y).float().mean())
    return {
        "per_concept": per,
        "identity": float(np.mean([p["identity"] for p in per])),
        "cos": float(np.mean([p["cos"] for p in per])),
        "digits": digits,
    }


def _token_rows(folders: list[Path], data: dict[str, Any]) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        data["concepts"][c]["token"]: load_file(str(f / "token.safetensors"))["token"]
        for c, f in enumerate(folders)
    }


def _load(
    base_dir: Path,
    adapters: list[Path],
    weights: list[float],
    cfg: Config,
    seed: int,
    rows: dict[int, torch.Tensor],
) -> Denoiser:
    folded = FoldedCheckpoint(open_checkpoint(base_dir), [read_adapter(a) for a in adapters], weights)
    model = Denoiser(11 + cfg.n_concepts, seed)
    state = {k: folded[k].float() for k in folded}
    for t, v in rows.items():  # every concept's own token embedding (disjoint rows: no conflict)
        state["tokens.weight"][t] = v
    model.load_state_dict(state)
    return model.eval()


def crosstalk(
    adapters: list[Path], rows: dict[int, torch.Tensor], concept_tokens: list[int]
) -> dict[str, float]:
    """Mean over concepts of ‖Σ_{j≠i} ΔW_j e_i‖ / ‖ΔW_i e_i‖ at to_k and to_v (e_i: concept i's token)."""
    ads = [read_adapter(a) for a in adapters]
    out = {}
    for mod in ("to_k", "to_v"):
        deltas = [a.delta(mod) for a in ads]
        ratios = []
        for i, t in enumerate(concept_tokens):
            e = rows[t]
            own = float((deltas[i] @ e).norm())
            other = float((sum(deltas[j] for j in range(len(ads)) if j != i) @ e).norm())
            ratios.append(other / own if own > 0 else float("inf"))
        out[mod] = float(np.mean(ratios))
    return out


def run_seed(cfg: Config, seed: int, verbose: bool) -> dict[str, Any]:
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    data = load_data(cfg, seed)
    base = train_base(data, cfg, seed)
    work = cfg.out / f"seed{seed}"
    base_dir = work / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_dir / "model.safetensors"))
    res: dict[str, Any] = {"seed": seed, "base": evaluate(base, data, cfg, seed)}
    if verbose:
        print(
            f"[seed {seed}] base model: digits identity {res['base']['digits']:.3f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    concept_tokens = [c["token"] for c in data["concepts"]]
    for mode in cfg.token_modes:
        res[mode] = {}
        for variant in cfg.variants:
            best = None
            for lr in cfg.lr_grid[variant]:
                folders = [
                    fine_tune(
                        base,
                        data,
                        c,
                        variant,
                        lr,
                        cfg,
                        seed,
                        work / mode / f"lr{lr:g}",
                        learn_token=mode == "learned",
                    )
                    for c in range(cfg.n_concepts)
                ]
                rows = _token_rows(folders, data)
                solo = [
                    evaluate(_load(base_dir, [f], [1.0], cfg, seed, {t: rows[t]}), data, cfg, seed)[
                        "per_concept"
                    ][c]
                    for c, (f, t) in enumerate(zip(folders, rows, strict=True))
                ]
                score = float(np.mean([s["cos"] for s in solo]))
                if best is None or score > best[0]:
                    best = (score, lr, folders, solo)
            assert best is not None
            _, lr, folders, solo = best
            rows = _token_rows(folders, data)
            merged_dir = work / mode / variant / "merged_sum"
            merge_adapters(
                folders, merged_dir, method="cat", overwrite=True
            )  # the exact sum of the residuals
            merged = evaluate(_load(base_dir, [merged_dir], [1.0], cfg, seed, rows), data, cfg, seed)
            entry: dict[str, Any] = {
                "lr": lr,
                "solo_identity": float(np.mean([s["identity"] for s in solo])),
                "solo_cos": float(np.mean([s["cos"] for s in solo])),
                "solo_per_concept": solo,
                "merged": merged,
                "crosstalk": crosstalk(folders, rows, concept_tokens),
                "max_residual_cosine": residual_cosines(folders)["max_abs_cosine"],
            }
            if variant == "lora":
                n = len(folders)
                entry["fedavg"] = evaluate(
                    _load(base_dir, folders, [1.0 / n] * n, cfg, seed, rows), data, cfg, seed
                )
            res[mode][variant] = entry
            if verbose:
                print(
                    f"[seed {seed}] {mode:<7} {variant:<10} lr {lr:g}: identity solo {entry['solo_identity']:.3f} "
                    f"-> merged {merged['identity']:.3f} (cos {entry['solo_cos']:.3f} -> {merged['cos']:.3f}), "
                    f"digits {merged['digits']:.3f}, crosstalk v {entry['crosstalk']['to_v']:.3f} "
                    f"k {entry['crosstalk']['to_k']:.3f}, max |cos| {entry['max_residual_cosine']:.1e}  "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        for lr_dir in (work / mode).glob("lr*"):
            shutil.rmtree(lr_dir, ignore_errors=True)
    return res


def _ms(vals: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "min": float(np.min(vals))}


def summarize(runs: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"base_digits": _ms([r["base"]["digits"] for r in runs])}
    for mode in cfg.token_modes:
        out[mode] = {}
        for v in cfg.variants:
            e = [r[mode][v] for r in runs]
            out[mode][v] = {
                "solo_identity": _ms([x["solo_identity"] for x in e]),
                "merged_identity": _ms([x["merged"]["identity"] for x in e]),
                "solo_cos": _ms([x["solo_cos"] for x in e]),
                "merged_cos": _ms([x["merged"]["cos"] for x in e]),
                "merged_digits": _ms([x["merged"]["digits"] for x in e]),
                "crosstalk_v": _ms([x["crosstalk"]["to_v"] for x in e]),
                "crosstalk_k": _ms([x["crosstalk"]["to_k"] for x in e]),
                "max_residual_cosine": _ms([x["max_residual_cosine"] for x in e]),
                "retained": _ms([x["merged"]["identity"] / max(x["solo_identity"], 1e-9) for x in e]),
                "lr": [x["lr"] for x in e],
            }
            if v == "lora":
                out[mode]["lora_fedavg_identity"] = _ms([x["fedavg"]["identity"] for x in e])
                out[mode]["lora_fedavg_digits"] = _ms([x["fedavg"]["digits"] for x in e])
    return out


def table(summary: dict[str, Any], cfg: Config) -> str:
    def f(d: dict[str, float], pct: bool = True) -> str:
        return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}" if pct else f"{d['mean']:.3f} ± {d['std']:.3f}"

    rows = [
        "| token | variant | lr | identity solo % | identity merged (sum) % | cos solo | cos merged | digits after "
        "merge % | crosstalk to_v | crosstalk to_k | max residual cos |",
        "|" + "---|" * 11,
    ]
    for mode in cfg.token_modes:
        sm = summary[mode]
        for v in cfg.variants:
            s = sm[v]
            rows.append(
                f"| {mode} | {v} | {', '.join(f'{x:g}' for x in s['lr'])} | {f(s['solo_identity'])} | "
                f"{f(s['merged_identity'])} | {f(s['solo_cos'], False)} | {f(s['merged_cos'], False)} | "
                f"{f(s['merged_digits'])} | {f(s['crosstalk_v'], False)} | {f(s['crosstalk_k'], False)} | "
                f"{s['max_residual_cosine']['mean']:.1e} |"
            )
        if "lora_fedavg_identity" in sm:
            rows.append(
                f"| {mode} | lora, FedAvg (mean) | | | {f(sm['lora_fedavg_identity'])} | | | "
                f"{f(sm['lora_fedavg_digits'])} | | | |"
            )
    return "\n".join(rows)


def per_concept_table(runs: list[dict[str, Any]], cfg: Config) -> str:
    """Identity per concept, solo -> merged (mean over seeds)."""
    n = cfg.n_concepts
    names = [f"{d} {how}" for d, how in CONCEPTS[:n]]
    rows = ["| token | variant | " + " | ".join(names) + " |", "|" + "---|" * (n + 2)]
    for mode in cfg.token_modes:
        for v in cfg.variants:
            solo = np.mean([[p["identity"] for p in r[mode][v]["solo_per_concept"]] for r in runs], 0)
            merged = np.mean([[p["identity"] for p in r[mode][v]["merged"]["per_concept"]] for r in runs], 0)
            rows.append(
                f"| {mode} | {v} | "
                + " | ".join(f"{100 * a:.0f} → {100 * b:.0f}" for a, b in zip(solo, merged, strict=True))
                + " |"
            )
    return "\n".join(rows)


def plot(runs: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = cfg.n_concepts
    fig, axes = plt.subplots(
        1, len(cfg.token_modes), figsize=(6.5 * len(cfg.token_modes), 3.8), squeeze=False
    )
    w = 0.8 / len(cfg.variants)
    for ax, mode in zip(axes[0], cfg.token_modes, strict=True):
        for k, v in enumerate(cfg.variants):
            solo = np.mean([[p["identity"] for p in r[mode][v]["solo_per_concept"]] for r in runs], 0)
            merged = np.mean([[p["identity"] for p in r[mode][v]["merged"]["per_concept"]] for r in runs], 0)
            xs = np.arange(n) + (k - (len(cfg.variants) - 1) / 2) * w
            ax.bar(xs, merged, w, label=v, color=f"C{k}")
            ax.scatter(xs, solo, color="k", marker="_", s=100, zorder=3)
        ax.set_xticks(np.arange(n), [f"{d}\n{how}" for d, how in CONCEPTS[:n]], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{mode} concept token: identity after summing (bars), solo (ticks)", fontsize=9)
    axes[0][0].set_ylabel("identity")
    axes[0][0].legend(ncol=2, fontsize=8, loc="lower left")
    fig.suptitle(
        f"orthogonal adaptation toy: {n} concepts fine-tuned independently, {len(runs)} seed(s)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: Config, verbose: bool = True) -> dict[str, Any]:
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and does not spin on a busy machine
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = [run_seed(cfg, s, verbose) for s in cfg.seeds]
    summary = summarize(runs, cfg)
    result = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "runs": runs,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2))
    plot(runs, cfg, cfg.out / "orthogonal_adaptation.png")
    if verbose:
        print(table(summary, cfg))
        print()
        print(per_concept_table(runs, cfg))
        print(f"\n{time.perf_counter() - t0:.0f} s; results in {cfg.out}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the reduced run of the slow test")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    ap.add_argument("--tokens", nargs="+", default=None, choices=["fixed", "learned"])
    ap.add_argument("--concepts", type=int, default=None)
    args = ap.parse_args()
    c = Config.quick(args.out or Config.out) if args.quick else Config()
    if args.out:
        c.out = args.out
    if args.seeds:
        c.seeds = args.seeds
    if args.variants:
        c.variants = args.variants
        c.lr_grid = {v: c.lr_grid.get(v, [1e-2]) for v in args.variants}
    if args.tokens:
        c.token_modes = args.tokens
    if args.concepts:
        c.n_concepts = args.concepts
    main(c)
