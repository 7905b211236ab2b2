"""MoE assembly (`weightsmith moe`): Mixtral and Qwen-MoE outputs that transformers loads, routing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
from click.testing import CliRunner  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from merge.errors import MissingTensorError, RecipeError, ShapeMismatchError  # noqa: E402
from merge.moe import plan_moe, run_moe  # noqa: E402

FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
TOOLS = ["hammer", "wrench", "saw", "drill", "chisel", "pliers", "file", "clamp"]
WORDS = ["<s>", "</s>", "<unk>", *FRUIT, *TOOLS, "the", "a", "and"]
VOCAB = {w: i for i, w in enumerate(WORDS)}


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    t = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _config(intermediate: int = 64) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny LLaMA base whose token embeddings carry a topic direction per word group (as a trained LM's
    representations do), two fine-tunes of its MLPs, and an expert of another width."""
    root = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config())
    with torch.no_grad():
        emb = base.model.embed_tokens.weight
        d = torch.randn(2, 32)
        d = d / d.norm(dim=1, keepdim=True) * 0.5 * emb.norm(dim=1).mean()
        for w in FRUIT:
            emb[VOCAB[w]] += d[0]
        for w in TOOLS:
            emb[VOCAB[w]] += d[1]
    tok = _tokenizer()

    def save(model: transformers.PreTrainedModel, name: str) -> str:
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return str(root / name)

    out = {"base": save(base, "base")}
    for i in range(2):
        m = transformers.LlamaForCausalLM(_config())
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".mlp." in n:
                    p.add_(0.01 * torch.randn_like(p))
        out[f"e{i}"] = save(m, f"e{i}")
    out["wide"] = save(transformers.LlamaForCausalLM(_config(intermediate=48)), "wide")
    return out


def _cfg(dense: dict[str, str], **kw) -> dict:
    cfg = {
        "base_model": dense["base"],
        "gate_mode": "hidden",
        "experts_per_token": 1,
        "dtype": "float32",
        "experts": [
            {"source_model": dense["e0"], "positive_prompts": ["apple banana cherry", "grape lemon mango"]},
            {"source_model": dense["e1"], "positive_prompts": ["hammer wrench saw", "drill chisel pliers"]},
        ],
    }
    return cfg | kw


def _route_fractions(
    model: transformers.PreTrainedModel, tok: transformers.PreTrainedTokenizerBase
) -> list[float]:
    """Per layer: the share of each group's word tokens whose top-1 expert is that group's expert (the lower one)."""
    worst = []
    per_group = []
    for words, expert in ((FRUIT, 0), (TOOLS, 1)):
        enc = tok(
            ["<s>" + " ".join(words[i:] + words[:i]) for i in range(4)],
            return_tensors="pt",
            add_special_tokens=False,
        )
        with torch.no_grad():
            logits = model(**enc, output_router_logits=True).router_logits
        per_group.append(
            [
                float((lg.argmax(-1).view(enc["input_ids"].shape)[:, 1:] == expert).float().mean())
                for lg in logits
            ]
        )
    for layer in range(len(per_group[0])):
        worst.append(min(g[layer] for g in per_group))
    return worst


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_mixtral_loads_generates_and_routes_each_group_to_its_expert(
    dense, tmp_path: Path, mode: str
) -> None:
    out = tmp_path / "moe"
    res = run_moe(_cfg(dense, gate_mode=mode), out)
    assert res.architecture == "mixtral" and not res.degenerate_layers
    model, info = transformers.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 1 and cfg["model_type"] == "mixtral"
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    gen = model.generate(
        **tok("<s>apple banana", return_tensors="pt", add_special_tokens=False),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=1,
    )
    assert gen.shape == (1, 8)
    # one expert per prompt group: each group's tokens go mostly to its expert, in every layer
    assert min(_route_fractions(model, tok)) >= 0.75
    # the experts are the fine-tunes' MLPs; attention and embeddings come from the base
    e1 = transformers.LlamaForCausalLM.from_pretrained(dense["e1"]).model.layers[1].mlp.up_proj.weight
    assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj[1][64:], e1)
    base = transformers.LlamaForCausalLM.from_pretrained(dense["base"])
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_mixtral_of_copies_of_the_base_computes_the_dense_model(dense, tmp_path: Path) -> None:
    cfg = _cfg(dense, gate_mode="random", experts_per_token=2)
    cfg["experts"] = [{"source_model": dense["base"]}, {"source_model": dense["base"]}]
    with pytest.raises(RecipeError, match="every expert is the same model"):
        plan_moe(cfg)
    run_moe(cfg, tmp_path / "moe", allow_all_same=True)
    moe = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "moe")
    base = transformers.LlamaForCausalLM.from_pretrained(dense["base"])
    ids = torch.tensor([[0, 3, 4, 12, 13, 19]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-5)


def test_qwen_moe_with_a_shared_expert_loads_and_generates(dense, tmp_path: Path) -> None:
    cfg = _cfg(
        dense,
        architecture="qwen",
        shared_experts=[{"source_model": dense["base"], "positive_prompts": ["the a and"]}],
    )
    res = run_moe(cfg, tmp_path / "qwen")
    assert res.architecture == "qwen"
    model, info = transformers.Qwen2MoeForCausalLM.from_pretrained(
        tmp_path / "qwen", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "qwen")
    gen = model.generate(
        **tok("<s>saw", return_tensors="pt", add_special_tokens=False),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=1,
    )
    assert gen.shape == (1, 5)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, torch.zeros(32))  # the base has none
    assert min(_route_fractions(model, tok)) >= 0.75


def test_random_gates_are_seeded(dense, tmp_path: Path) -> None:
    from merge.moe import gate_vectors

    a = gate_vectors(plan_moe(_cfg(dense, gate_mode="random", seed=3)))
    b = gate_vectors(plan_moe(_cfg(dense, gate_mode="random", seed=3)))
    c = gate_vectors(plan_moe(_cfg(dense, gate_mode="uniform_random", seed=3)))
    assert torch.equal(a, b) and a.shape == (2, 2, 32)
    assert c.abs().max() <= 1 / 32**0.5


def test_bad_configs_fail_before_writing(dense, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wide = _cfg(dense)
    wide["experts"][1]["source_model"] = dense["wide"]
    with pytest.raises(
        ShapeMismatchError, match=r"mlp\.gate_proj\.weight.*shape \[48, 32\], expected \[64, 32\]"
    ):
        run_moe(wide, out)
    no_prompts = _cfg(dense)
    del no_prompts["experts"][0]["positive_prompts"]
    with pytest.raises(RecipeError, match="needs positive_prompts"):
        run_moe(no_prompts, out)
    same = _cfg(dense)
    same["experts"][1]["positive_prompts"] = same["experts"][0]["positive_prompts"]
    with pytest.raises(RecipeError, match="same prompts"):
        run_moe(same, out)
    with pytest.raises(RecipeError, match="experts_per_token is 3"):
        run_moe(_cfg(dense, experts_per_token=3), out)
    with pytest.raises(RecipeError, match="Mixtral has no shared experts"):
        run_moe(_cfg(dense, architecture="mixtral", shared_experts=[{"source_model": dense["base"]}]), out)
    with pytest.raises(RecipeError, match="exactly one shared expert"):
        run_moe(_cfg(dense, architecture="qwen"), out)
    with pytest.raises(RecipeError, match="unknown key"):
        run_moe(_cfg(dense, router="x"), out)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(dense["e0"]).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    sd = load_file(broken / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    missing = _cfg(dense)
    missing["experts"][0]["source_model"] = str(broken)
    with pytest.raises(MissingTensorError, match=r"layers\.1\.mlp\.down_proj\.weight' is missing"):
        run_moe(missing, out)
    assert not out.exists()


def test_cli(dense, tmp_path: Path) -> None:
    from service.cli.main import main

    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(_cfg(dense, gate_mode="cheap_embed")))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["moe", str(cfg), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["architecture"] == "mixtral" and (out / "model.safetensors").exists()
    assert {"config.json", "tokenizer.json", "README.md", "weightsmith_moe.yml"} <= {
        p.name for p in out.iterdir()
    }
    r = CliRunner().invoke(main, ["moe", str(cfg), "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(main, ["moe", str(cfg), "-o", str(tmp_path / "dry"), "--dry-run"])
    assert r.exit_code == 0 and "nothing written" in r.output and not (tmp_path / "dry").exists()
    cfg.write_text(yaml.safe_dump(_cfg(dense, experts_per_token=0)))
    r = CliRunner().invoke(main, ["moe", str(cfg), "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "experts_per_token must be >= 1" in r.output


def test_moe_never_writes_over_its_inputs_or_a_user_folder(dense, tmp_path: Path) -> None:
    """issue 22: refused before any work (the gates' forward passes), inputs and the user's file intact."""
    from merge.errors import OutputExistsError, OutputOverlapError
    from tests.conftest import tree_digest

    before = {k: tree_digest(Path(v)) for k, v in dense.items()}
    for out in (Path(dense["e0"]), Path(dense["base"]) / "moe"):
        with pytest.raises(OutputOverlapError, match="the input"):
            run_moe(_cfg(dense), out, overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a previous weightsmith output"):
        run_moe(_cfg(dense), mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    assert {k: tree_digest(Path(v)) for k, v in dense.items()} == before
