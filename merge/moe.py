"""Mixture-of-experts assembly: dense models of one base become the experts of a sparse model.

mergekit-moe's config format and semantics (mergekit 0.1.5, ``mergekit/moe/``), after Komatsuzaki et
al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints", ICLR 2023 (experts
initialised from dense MLPs) and Jiang et al., "Mixtral of Experts", 2024 (the output architecture):

- every non-MLP tensor (embeddings, attention, norms, LM head) comes from ``base_model``; expert ``e``'s
  MLP of layer ``l`` is the MLP of layer ``l`` of ``experts[e].source_model`` (optionally plus Gaussian
  noise of std ``noise_scale``, and its down projection times ``residual_scale``);
- the router of layer ``l`` (one row per expert) is initialised by ``gate_mode``:
  ``hidden``: the base model's hidden state entering layer ``l`` at the last token of each of the
  expert's ``positive_prompts`` (averaged over prompts; ``hidden_avg``: averaged over all positions),
  minus the same for its ``negative_prompts``, L2-normalised; ``cheap_embed``: the normalised sum of
  the prompts' token embeddings, the same for every layer; ``random``: standard normal;
  ``uniform_random``: U(−1/√H, 1/√H) like ``nn.Linear``. Random draws come from ``seed``.
- output: Mixtral (``MixtralForCausalLM``, experts_per_token routed experts, no shared expert) from a
  LLaMA or Mistral base, or Qwen-MoE (``Qwen2MoeForCausalLM``, exactly one ``shared_experts`` entry,
  whose MLP is the always-on shared expert gated by its own router row) from a LLaMA, Mistral or Qwen2
  base; ``architecture: mixtral | qwen`` chooses, else Mixtral without shared experts and Qwen with one.

Deliberate differences from mergekit 0.1.5: the Mixtral experts are written in the per-expert layout
``block_sparse_moe.experts.E.w1/w2/w3`` (which transformers 4 and 5, vLLM and llama.cpp's converter
all read), where mergekit writes transformers 5's fused ``mlp.experts.gate_up_proj`` (transformers 5
only); every tensor is streamed in row chunks to an atomic output folder; the draws for ``random``
gates and expert noise are seeded (``seed``); every check (experts' shapes against the base, prompts,
architecture) runs before anything is written. DeepSeek and Qwen3-MoE outputs are not built.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
import yaml

from merge.atomic import check_output
from merge.checkpoint import Checkpoint, CheckpointWriter, OutputTensor, ResolvedModel, open_checkpoint
from merge.errors import MissingTensorError, RecipeError, ShapeMismatchError, TokenizerError
from merge.methods.runner import CHUNK_ELEMS, chunk_grid, derive_seed

LOG = logging.getLogger(__name__)

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
_MLP = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


class Expert(pydantic.BaseModel):
    """One dense model whose MLPs become an expert (mergekit's ``Expert``)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(pydantic.BaseModel):
    """mergekit-moe's YAML (``MoEMergeConfig``), plus weightsmith's ``seed``."""

    model_config = pydantic.ConfigDict(extra="forbid")
    base_model: str
    experts: list[Expert] = pydantic.Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    seed: int = 0

    @pydantic.field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {v!r} (expected float32, float16 or bfloat16)")
        return v


def load_moe_config(src: str | Path | dict[str, Any] | MoEConfig) -> MoEConfig:
    """A MoE config from a YAML file, YAML text or a dict; RecipeError naming the bad key."""
    from merge.recipe import load_config

    return src if isinstance(src, MoEConfig) else load_config(src, MoEConfig, "MoE config")


# --------------------------------------------------------------------------------------------------
# planning and checks (nothing is written before all of them pass)
# --------------------------------------------------------------------------------------------------
@dataclass
class MoEPlan:
    config: MoEConfig
    arch: Literal["mixtral", "qwen"]
    base: ResolvedModel
    base_ckpt: Checkpoint
    base_config: dict[str, Any]
    experts: list[tuple[Expert, ResolvedModel, Checkpoint]]
    shared: list[tuple[Expert, ResolvedModel, Checkpoint]]
    num_layers: int
    hidden: int
    out_dtype: torch.dtype
    outputs: list[OutputTensor] = field(default_factory=list)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    def summary(self) -> dict[str, Any]:
        return {
            "architecture": self.arch,
            "base": self.base.ref,
            "experts": [e.ref for _, e, _ in self.experts],
            "shared_experts": [e.ref for _, e, _ in self.shared],
            "layers": self.num_layers,
            "gate_mode": self.config.gate_mode,
            "experts_per_token": self.config.experts_per_token,
            "n_tensors": len(self.outputs),
            "bytes_out": self.bytes_out,
        }


def _read_config(ckpt: Checkpoint) -> dict[str, Any]:
    p = ckpt.root / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise RecipeError(
            f"{ckpt.root}: no config.json (MoE assembly needs the model's architecture)"
        ) from None
    except (OSError, ValueError) as e:
        raise RecipeError(f"{p}: cannot read: {e}") from None
    if not isinstance(cfg, dict):
        raise RecipeError(f"{p}: not a JSON object")
    return cfg


def _check_prompts(cfg: MoEConfig, allow_all_same: bool) -> None:
    if cfg.experts_per_token < 1:
        raise RecipeError(f"experts_per_token must be >= 1, got {cfg.experts_per_token}")
    if len(cfg.experts) < cfg.experts_per_token:
        raise RecipeError(
            f"experts_per_token is {cfg.experts_per_token} but there are only {len(cfg.experts)} expert(s)"
        )
    if cfg.gate_mode not in ("random", "uniform_random"):
        for i, e in enumerate(cfg.experts):
            if not e.positive_prompts:
                raise RecipeError(
                    f"experts[{i}] ({e.source_model}): gate_mode '{cfg.gate_mode}' needs "
                    "positive_prompts for every expert"
                )
        prompts = {(tuple(e.positive_prompts or []), tuple(e.negative_prompts or [])) for e in cfg.experts}
        if len(cfg.experts) > 1 and len(prompts) == 1:
            raise RecipeError(
                "every expert has the same prompts: the router could not tell them apart; give each "
                "expert prompts of what should be routed to it"
            )
    if not allow_all_same and len(cfg.experts) > 1 and len({e.source_model for e in cfg.experts}) == 1:
        raise RecipeError(
            "every expert is the same model: the MoE would compute what the dense model does, at more "
            "cost (pass --i-understand-this-is-not-useful-without-training to build it anyway)"
        )


def _select_arch(cfg: MoEConfig) -> Literal["mixtral", "qwen"]:
    n_shared = len(cfg.shared_experts or [])
    want = (cfg.architecture or "").lower()
    if want and not ("mixtral".startswith(want) or "qwen".startswith(want) or want in ("qwen2", "qwen2_moe")):
        raise RecipeError(f"architecture '{cfg.architecture}' is not built by weightsmith (mixtral, qwen)")
    if want.startswith("m") or (not want and n_shared == 0):
        if n_shared:
            raise RecipeError("Mixtral has no shared experts; drop shared_experts or use architecture: qwen")
        return "mixtral"
    if n_shared != 1:
        raise RecipeError(f"Qwen-MoE needs exactly one shared expert, got {n_shared}")
    shared = (cfg.shared_experts or [])[0]
    if cfg.gate_mode not in ("random", "uniform_random") and not shared.positive_prompts:
        raise RecipeError("Qwen-MoE: the shared expert needs positive_prompts for its gate")
    return "qwen"


def plan_moe(
    config: MoEConfig | str | Path | dict[str, Any],
    *,
    resolver: Callable[[str], ResolvedModel] | None = None,
    allow_all_same: bool = False,
) -> MoEPlan:
    """Validate a MoE config against the models' headers and configs (no tensor data is read)."""
    cfg = load_moe_config(config)
    if resolver is None:
        from merge.plan import default_resolver

        resolver = default_resolver
    _check_prompts(cfg, allow_all_same)
    arch = _select_arch(cfg)
    opened: dict[str, tuple[ResolvedModel, Checkpoint]] = {}

    def open_ref(ref: str) -> tuple[ResolvedModel, Checkpoint]:
        if ref not in opened:
            r = resolver(ref)
            opened[ref] = (r, open_checkpoint(r.path))
        return opened[ref]

    base, bck = open_ref(cfg.base_model)
    bcfg = _read_config(bck)
    mtype = bcfg.get("model_type")
    allowed = ("llama", "mistral") if arch == "mixtral" else ("llama", "mistral", "qwen2")
    if mtype not in allowed:
        raise RecipeError(
            f"{bck.root}: model_type '{mtype}': a {arch} MoE is assembled from {' or '.join(allowed)} models"
        )
    n_layers, hidden = bcfg.get("num_hidden_layers"), bcfg.get("hidden_size")
    if not isinstance(n_layers, int) or not isinstance(hidden, int):
        raise RecipeError(f"{bck.root}/config.json: needs num_hidden_layers and hidden_size")
    if arch == "mixtral":
        extra = [n for n in bck.keys() if ".self_attn." in n and n.endswith(".bias")]
        if extra or bcfg.get("mlp_bias"):
            raise RecipeError(
                f"{bck.root}: has attention or MLP biases ({extra[0] if extra else 'mlp_bias'}), "
                "which Mixtral does not have; use architecture: qwen"
            )
    for layer in range(n_layers):
        for p in _MLP:
            name = f"model.layers.{layer}.mlp.{p}.weight"
            if name not in bck:
                raise MissingTensorError(
                    f"{bck.root}: tensor '{name}' is missing (a LLaMA-style MLP is expected)"
                )
    experts = []
    for group, items in (("experts", cfg.experts), ("shared_experts", cfg.shared_experts or [])):
        for i, e in enumerate(items):
            r, c = open_ref(e.source_model)
            ecfg = _read_config(c)
            if ecfg.get("model_type") != mtype:
                raise RecipeError(
                    f"{group}[{i}] {c.root}: model_type '{ecfg.get('model_type')}' differs from the "
                    f"base's '{mtype}'; experts must share the base's architecture"
                )
            if ecfg.get("num_hidden_layers") != n_layers or ecfg.get("hidden_size") != hidden:
                raise ShapeMismatchError(
                    f"{group}[{i}] {c.root}: {ecfg.get('num_hidden_layers')} layers of width "
                    f"{ecfg.get('hidden_size')}, expected {n_layers} of width {hidden} as in the base {bck.root}"
                )
            for layer in range(n_layers):
                for p in _MLP:
                    name = f"model.layers.{layer}.mlp.{p}.weight"
                    if name not in c:
                        raise MissingTensorError(f"{group}[{i}] {c.root}: tensor '{name}' is missing")
                    if c.shape(name) != bck.shape(name):
                        raise ShapeMismatchError(
                            f"tensor '{name}': {group}[{i}] {c.root} has shape {list(c.shape(name))}, expected "
                            f"{list(bck.shape(name))} as in the base {bck.root}"
                        )
            experts.append((group, (e, r, c)))
    dtype = _DTYPES.get((cfg.dtype or "").lower())
    if dtype is None:
        dtype = _DTYPES.get(str(bcfg.get("torch_dtype") or bcfg.get("dtype") or "").lower())
    if dtype is None:
        dtype = bck.dtype(next(iter(bck.keys())))
    plan = MoEPlan(
        cfg,
        arch,
        base,
        bck,
        bcfg,
        [x for g, x in experts if g == "experts"],
        [x for g, x in experts if g == "shared_experts"],
        n_layers,
        hidden,
        dtype,
    )
    plan.outputs = [OutputTensor(n, s, dtype) for n, s in _layout(plan)]
    return plan


def _layout(plan: MoEPlan) -> list[tuple[str, tuple[int, ...]]]:
    """Output tensor names and shapes, in file order."""
    b = plan.base_ckpt
    e_count = len(plan.experts)
    out: list[tuple[str, tuple[int, ...]]] = []
    from merge.plan import _natural_key

    for n in sorted(b.keys(), key=_natural_key):
        if ".mlp." in n or not b.dtype(n).is_floating_point:
            continue
        out.append((n, b.shape(n)))
    if plan.arch == "qwen":  # Qwen2-MoE has q/k/v biases: zeros where the base has none
        for layer in range(plan.num_layers):
            for p in ("q_proj", "k_proj", "v_proj"):
                n = f"model.layers.{layer}.self_attn.{p}.bias"
                if n not in b:
                    rows = b.shape(f"model.layers.{layer}.self_attn.{p}.weight")[0]
                    out.append((n, (rows,)))
    for layer in range(plan.num_layers):
        for e in range(e_count):
            for p in _MLP:
                src = f"model.layers.{layer}.mlp.{p}.weight"
                out.append((_expert_name(plan.arch, layer, e, p), b.shape(src)))
        if plan.arch == "qwen":
            for p in _MLP:
                out.append(
                    (
                        f"model.layers.{layer}.mlp.shared_expert.{p}.weight",
                        b.shape(f"model.layers.{layer}.mlp.{p}.weight"),
                    )
                )
            out.append((f"model.layers.{layer}.mlp.shared_expert_gate.weight", (1, plan.hidden)))
        out.append((_router_name(plan.arch, layer), (e_count, plan.hidden)))
    return sorted(out, key=lambda x: _natural_key(x[0]))


def _expert_name(arch: str, layer: int, e: int, proj: str) -> str:
    if arch == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[proj]}.weight"
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


def _router_name(arch: str, layer: int) -> str:
    return f"model.layers.{layer}.{'block_sparse_moe' if arch == 'mixtral' else 'mlp'}.gate.weight"


# --------------------------------------------------------------------------------------------------
# router initialisation
# --------------------------------------------------------------------------------------------------
def _tokenizer(plan: MoEPlan) -> Any:
    from merge.vocab import load_tokenizer

    tok = load_tokenizer(plan.base_ckpt.root)
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise TokenizerError(
                f"{plan.base_ckpt.root}: the tokenizer has no BOS, EOS or pad token to pad prompts"
            )
        tok.pad_token = tok.eos_token
    return tok


def _tokenize(tok: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    return tok(
        [(tok.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def gate_vectors(plan: MoEPlan, device: str = "cpu") -> torch.Tensor:
    """Router rows, shape (layers, experts + shared experts, hidden), by ``gate_mode``."""
    cfg = plan.config
    experts = [e for e, _, _ in plan.experts] + [e for e, _, _ in plan.shared]
    n_l, h = plan.num_layers, plan.hidden
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "moe.router"))
    if cfg.gate_mode == "random":
        return torch.randn((n_l, len(experts), h), generator=g)
    if cfg.gate_mode == "uniform_random":
        s = math.sqrt(1.0 / h)
        return torch.rand((n_l, len(experts), h), generator=g) * 2 * s - s
    tok = _tokenizer(plan)
    if cfg.gate_mode == "cheap_embed":
        embed = plan.base_ckpt["model.embed_tokens.weight"].float()

        def state(prompts: list[str]) -> torch.Tensor:
            enc = _tokenize(tok, prompts)
            emb = embed[enc["input_ids"]] * enc["attention_mask"].unsqueeze(-1)
            v = emb.sum(dim=1).sum(dim=0, keepdim=True)
            return (v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(n_l, 1)
    else:
        model = _load_base_model(plan, device)
        average = cfg.gate_mode == "hidden_avg"

        def state(prompts: list[str]) -> torch.Tensor:
            enc = {k: v.to(device) for k, v in _tokenize(tok, prompts).items()}
            with torch.no_grad():
                out = model(**enc, output_hidden_states=True, return_dict=True)
            hs = torch.stack(
                out.hidden_states[:-1]
            ).float()  # (layers, batch, seq, hidden): inputs of each layer
            hs = hs.mean(dim=2) if average else hs[:, :, -1, :]
            return hs.mean(dim=1).cpu()

    rows = []
    for e in experts:
        v = state(e.positive_prompts or [])
        if e.negative_prompts:
            v = v - state(e.negative_prompts)
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


def _load_base_model(plan: MoEPlan, device: str) -> Any:
    try:
        import transformers
    except ImportError:  # pragma: no cover
        raise RecipeError("gate_mode 'hidden' runs the base model: it needs 'transformers'") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(plan.base_ckpt.root),
            dtype=plan.out_dtype if plan.out_dtype != torch.float16 else torch.float32,
            local_files_only=True,
        )
    except Exception as e:  # noqa: BLE001
        raise RecipeError(
            f"{plan.base_ckpt.root}: cannot load the base model to compute hidden states: "
            f"{str(e).splitlines()[0][:200]}"
        ) from None
    return model.to(device).eval()


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above ``threshold``)."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _out_config(plan: MoEPlan) -> dict[str, Any]:
    cfg = dict(plan.base_config)
    n_exp, k = len(plan.experts), plan.config.experts_per_token
    dtype = str(plan.out_dtype).removeprefix("torch.")
    if plan.arch == "mixtral":
        cfg.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            num_local_experts=n_exp,
            num_experts_per_tok=k,
            sliding_window=None,
            router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.02),
            output_router_logits=False,
        )
        cfg.pop("mlp_bias", None)
        cfg.pop("attention_bias", None)
    else:
        inter = cfg.get("intermediate_size")
        cfg.update(
            architectures=["Qwen2MoeForCausalLM"],
            model_type="qwen2_moe",
            num_experts=n_exp,
            num_experts_per_tok=k,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            sliding_window=None,
            use_sliding_window=False,
            shared_expert_intermediate_size=inter,
            moe_intermediate_size=inter,
            qkv_bias=True,
            mlp_only_layers=[],
            output_router_logits=False,
        )
        cfg.pop("mlp_bias", None)
    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    return cfg


def _card(plan: MoEPlan, config_yaml: str) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe, merge, weightsmith]",
        "---",
        "",
        f"# {plan.arch} mixture of experts",
        "",
        f"Assembled by weightsmith from the base `{plan.base.ref}` with {len(plan.experts)} expert(s), "
        f"{plan.config.experts_per_token} routed per token, router initialised by `{plan.config.gate_mode}`.",
        "",
        "| expert | model |",
        "|---|---|",
    ]
    lines += [f"| {i} | `{r.ref}` |" for i, (_, r, _) in enumerate(plan.experts)]
    lines += [f"| shared | `{r.ref}` |" for _, r, _ in plan.shared]
    lines += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


@dataclass
class MoEResult:
    out_dir: str
    architecture: str
    n_tensors: int
    bytes_written: int
    seconds: float
    degenerate_layers: list[int]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_moe(
    config: MoEConfig | str | Path | dict[str, Any],
    out_dir: str | Path,
    *,
    resolver: Callable[[str], ResolvedModel] | None = None,
    allow_all_same: bool = False,
    overwrite: bool = False,
    shard_size: int = 5 * 10**9,
    device: str = "cpu",
    chunk_elems: int = CHUNK_ELEMS,
    progress: Callable[[int, int], None] | None = None,
    plan: MoEPlan | None = None,
) -> MoEResult:
    """Assemble the MoE of ``config`` into ``out_dir`` (a complete folder, or nothing on error)."""
    t0 = time.perf_counter()
    plan = plan or plan_moe(config, resolver=resolver, allow_all_same=allow_all_same)
    inputs = [plan.base.path, *(r.path for _, r, _ in plan.experts + plan.shared)]
    check_output(out_dir, overwrite=overwrite, inputs=inputs)  # before the gates' forward passes
    gates = gate_vectors(plan, device)
    degenerate = degenerate_layers(gates)
    if degenerate:
        LOG.warning(
            "layers %s have degenerate routing parameters (similar prompts): experts may be underused",
            degenerate,
        )
    n_exp = len(plan.experts)
    sources: dict[str, Callable[[int, int], torch.Tensor]] = {}
    b = plan.base_ckpt

    def rows_of(
        ckpt: Checkpoint, name: str, expert: Expert | None = None
    ) -> Callable[[int, int], torch.Tensor]:
        def read(r0: int, r1: int) -> torch.Tensor:
            x = ckpt.rows(name, r0, r1).float()
            if expert is not None and expert.noise_scale:
                gen = torch.Generator().manual_seed(
                    derive_seed(plan.config.seed, f"moe.noise.{expert.source_model}.{name}", r0)
                )
                x = x + torch.randn(x.shape, generator=gen) * expert.noise_scale
            if expert is not None and expert.residual_scale is not None and name.endswith("down_proj.weight"):
                x = x * expert.residual_scale
            return x

        return read

    for t in plan.outputs:
        if t.name in b and ".mlp." not in t.name:
            sources[t.name] = rows_of(b, t.name)
    for layer in range(plan.num_layers):
        for e, (ex, _, c) in enumerate(plan.experts):
            for p in _MLP:
                sources[_expert_name(plan.arch, layer, e, p)] = rows_of(
                    c, f"model.layers.{layer}.mlp.{p}.weight", ex
                )
        router = gates[layer, :n_exp]
        sources[_router_name(plan.arch, layer)] = lambda r0, r1, _g=router: _g[r0:r1]
        if plan.arch == "qwen":
            ex, _, c = plan.shared[0]
            for p in _MLP:
                sources[f"model.layers.{layer}.mlp.shared_expert.{p}.weight"] = rows_of(
                    c, f"model.layers.{layer}.mlp.{p}.weight", ex
                )
            shared_gate = gates[layer, n_exp : n_exp + 1]
            sources[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = lambda r0, r1, _g=shared_gate: (
                _g[r0:r1]
            )
    for t in plan.outputs:
        if t.name not in sources:  # Qwen2-MoE's zero attention biases
            sources[t.name] = lambda r0, r1, _s=t.shape: torch.zeros((r1 - r0, *_s[1:]))
    config_yaml = yaml.safe_dump(plan.config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    writer = CheckpointWriter(
        out_dir,
        plan.outputs,
        shard_size=shard_size,
        overwrite=overwrite,
        metadata={"weightsmith_moe": plan.arch},
        inputs=inputs,
        what="moe",
    )
    done = 0
    with writer:
        for t in plan.outputs:
            read = sources[t.name]
            for r0, r1 in chunk_grid(t.shape, chunk_elems):
                writer.write_rows(t.name, r0, r1, read(r0, r1).to(t.dtype).contiguous())
            done += 1
            if progress is not None:
                progress(done, len(plan.outputs))
        writer.add_text("config.json", json.dumps(_out_config(plan), indent=2) + "\n")
        for f in b.aux_files():
            if f.name != "config.json":
                writer.add_file(f)
        writer.add_text("weightsmith_moe.yml", config_yaml)
        writer.add_text("README.md", _card(plan, config_yaml))
    return MoEResult(
        str(out_dir),
        plan.arch,
        len(plan.outputs),
        plan.bytes_out,
        round(time.perf_counter() - t0, 3),
        degenerate,
    )


def progress_printer() -> Callable[[int, int], None] | None:
    """A tqdm bar on a terminal (None elsewhere)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "t" not in bar:
            bar["t"] = tqdm(total=total, desc="moe", unit="tensor", file=sys.stderr)
        bar["t"].update(done - bar["t"].n)
        if done == total:
            bar["t"].close()

    return update
