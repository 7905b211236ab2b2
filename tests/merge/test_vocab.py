"""Vocabulary merging: `tokenizer: {source: union}` / `tokenizer_source`, `tokens:` overrides, padding, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from merge.checkpoint import open_checkpoint  # noqa: E402
from merge.errors import RecipeError, TokenizerError  # noqa: E402
from merge.execute import run_merge
from merge.plan import plan_merge  # noqa: E402
from tests.conftest import llama_like, write_checkpoint  # noqa: E402

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
A_WORDS = ["apple", "banana", "cherry", "date", "elder", "fig"]
B_WORDS = ["grape", "cherry", "kiwi", "apple", "lemon"]  # overlaps A in a different order


def _wordlevel(words: list[str], folder: Path) -> int:
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", *words])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return len(vocab)


def _bpe(corpus: list[str], folder: Path, size: int) -> int:
    t = Tokenizer(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=size, special_tokens=["[UNK]", "[PAD]"]))
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return t.get_vocab_size()


def _model(folder: Path, vocab: int, seed: int, base: dict | None = None) -> Path:
    sd = llama_like(seed, vocab=vocab)
    if base is not None:  # a fine-tune of `base` in every non-vocabulary tensor
        sd = {
            k: (base[k] + 0.01 * torch.randn_like(base[k]) if base[k].shape == v.shape else v)
            for k, v in sd.items()
        }
    return write_checkpoint(
        folder,
        sd,
        config={"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3, "vocab_size": vocab},
    )


@pytest.fixture
def two_vocabs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    va = _wordlevel(A_WORDS, a)
    vb = _wordlevel(B_WORDS, b)
    base = llama_like(0, vocab=va)
    return _model(a, va, 0), _model(b, vb, 1, base)


def _row(folder: Path, tensor: str, token: str) -> torch.Tensor | None:
    tid = AutoTokenizer.from_pretrained(folder).get_vocab().get(token)
    return None if tid is None else open_checkpoint(folder)[tensor][tid]


@pytest.mark.parametrize("key", ["tokenizer_source", "tokenizer"])
def test_union_encodes_both_vocabularies_and_merges_shared_rows(two_vocabs, tmp_path: Path, key: str) -> None:
    a, b = two_vocabs
    rec = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0}},
            {"model": str(b), "parameters": {"weight": 3.0}},
        ],
    }
    rec |= {"tokenizer_source": "union"} if key == "tokenizer_source" else {"tokenizer": {"source": "union"}}
    out = tmp_path / "out"
    run_merge(rec, out)
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    union = set(A_WORDS) | set(B_WORDS)
    assert union | {"[UNK]", "[PAD]"} == set(vocab) and sorted(vocab.values()) == list(range(len(vocab)))
    # both vocabularies encode, without unknowns, to tokens that decode to the same words
    for words in (A_WORDS, B_WORDS):
        ids = tok(" ".join(words)).input_ids
        assert tok.unk_token_id not in ids and tok.convert_ids_to_tokens(ids) == words
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab)
    ckpt = open_checkpoint(out)
    assert ckpt.shape(EMB)[0] == ckpt.shape(HEAD)[0] == len(vocab)
    for tensor in (EMB, HEAD):
        for w in union | {"[PAD]"}:
            ra, rb = _row(a, tensor, w), _row(b, tensor, w)
            got = ckpt[tensor][vocab[w]]
            if ra is not None and rb is not None:  # shared: the merge of both rows
                exp = (1.0 * ra + 3.0 * rb) / 4.0
            else:  # in one model only: both models use that model's row, so the merge is that row
                exp = ra if ra is not None else rb
            torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)
    # every other tensor is the plain merge; the inputs are untouched
    assert torch.allclose(
        ckpt["model.norm.weight"],
        (open_checkpoint(a)["model.norm.weight"] + 3 * open_checkpoint(b)["model.norm.weight"]) / 4,
    )


def test_union_with_a_base_uses_the_base_row_for_tokens_others_lack(tmp_path: Path) -> None:
    base_words, ft_words = ["apple", "banana"], ["apple", "banana", "cherry"]
    vb = _wordlevel(base_words, tmp_path / "base")
    base = _model(tmp_path / "base", vb, 0)
    b0 = {k: open_checkpoint(base)[k] for k in open_checkpoint(base)}
    vf = _wordlevel(ft_words, tmp_path / "ft1")
    ft1 = _model(tmp_path / "ft1", vf, 1, b0)
    _wordlevel(base_words, tmp_path / "ft2")
    ft2 = _model(tmp_path / "ft2", vb, 2, b0)
    rec = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "tokenizer": {"source": "union"},
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.5}},
            {"model": str(ft2), "parameters": {"weight": 0.5}},
        ],
    }
    run_merge(rec, tmp_path / "out")
    out = open_checkpoint(tmp_path / "out")
    cid = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()["cherry"]
    # "cherry" is only in ft1: every model (base and ft2 too) takes ft1's row, so the task vectors vanish there
    torch.testing.assert_close(out[EMB][cid], _row(ft1, EMB, "cherry"))
    aid = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()["apple"]
    exp = (
        _row(base, EMB, "apple")
        + 0.5 * (_row(ft1, EMB, "apple") - _row(base, EMB, "apple"))
        + 0.5 * (_row(ft2, EMB, "apple") - _row(base, EMB, "apple"))
    )
    torch.testing.assert_close(out[EMB][aid], exp)


def test_token_overrides_and_padding(two_vocabs, tmp_path: Path) -> None:
    a, b = two_vocabs
    rec = {
        "merge_method": "linear",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "tokenizer": {
            "source": "union",
            "pad_to_multiple_of": 8,
            "tokens": {
                "cherry": {"source": str(b), "force": True},  # b's row in every model
                "apple": {"source": {"kind": "zero"}, "force": True},
                "fig": {"source": {"kind": "model_token", "model": str(b), "token": "kiwi"}},
                "newword": {"source": {"kind": "model_token", "model": str(a), "token_id": 2}},
            },
        },
    }
    out = tmp_path / "out"
    run_merge(rec, out)
    tok = AutoTokenizer.from_pretrained(out)
    v = tok.get_vocab()
    assert "newword" in v and tok("newword apple").input_ids == [v["newword"], v["apple"]]
    e = open_checkpoint(out)[EMB]
    n = len(v)
    assert e.shape[0] == 16 and n == 12 and json.loads((out / "config.json").read_text())["vocab_size"] == 16
    torch.testing.assert_close(e[v["cherry"]], _row(b, EMB, "cherry"))
    assert torch.equal(e[v["apple"]], torch.zeros(e.shape[1]))
    # fig is only in a: a keeps its own row, b gets b's "kiwi" row (the override fills models lacking it)
    torch.testing.assert_close(e[v["fig"]], (_row(a, EMB, "fig") + _row(b, EMB, "kiwi")) / 2)
    torch.testing.assert_close(e[v["newword"]], open_checkpoint(a)[EMB][2])  # in no model: filled for both
    # padding rows: each model's mean row, merged
    torch.testing.assert_close(e[n:], e[:n].mean(0).expand(16 - n, -1), rtol=1e-5, atol=1e-6)


def test_bpe_union_encodes_words_of_both_corpora(tmp_path: Path) -> None:
    ca = ["the quick brown fox jumps over the lazy dog"] * 20
    cb = ["sphinx of black quartz judge my vow"] * 20
    va = _bpe(ca, tmp_path / "a", 60)
    vb = _bpe(cb, tmp_path / "b", 60)
    a = _model(tmp_path / "a", va, 0)
    b = _model(tmp_path / "b", vb, 1)
    run_merge(
        {
            "merge_method": "linear",
            "models": [{"model": str(a)}, {"model": str(b)}],
            "tokenizer_source": "union",
        },
        tmp_path / "out",
    )
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tok.get_vocab()
    for folder, text in ((tmp_path / "a", ca[0]), (tmp_path / "b", cb[0])):
        own = AutoTokenizer.from_pretrained(folder)
        assert set(own.get_vocab()) <= set(vocab)  # every token of either vocabulary exists in the union
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids and tok.decode(ids).replace(" ", "") == text.replace(" ", "")
    # the base's own text segments exactly as before (its merges come first)
    own = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.convert_ids_to_tokens(tok(ca[0]).input_ids) == own.convert_ids_to_tokens(own(ca[0]).input_ids)


def test_source_base_reindexes_to_the_base_vocabulary(two_vocabs, tmp_path: Path) -> None:
    a, b = two_vocabs
    run_merge(
        {
            "merge_method": "linear",
            "base_model": str(a),
            "models": [{"model": str(a)}, {"model": str(b)}],
            "tokenizer": {"source": "base"},
        },
        tmp_path / "out",
    )
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(a).get_vocab()
    e = open_checkpoint(tmp_path / "out")[EMB]
    cid = tok.get_vocab()["cherry"]
    torch.testing.assert_close(e[cid], (_row(a, EMB, "cherry") + _row(b, EMB, "cherry")) / 2)


def test_vocabularies_that_cannot_be_unioned_fail_before_writing(tmp_path: Path) -> None:
    va = _wordlevel(A_WORDS, tmp_path / "a")
    vb = _bpe(["some other words here"] * 5, tmp_path / "b", 40)
    a, b = _model(tmp_path / "a", va, 0), _model(tmp_path / "b", vb, 1)
    rec = {
        "merge_method": "linear",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "tokenizer_source": "union",
    }
    with pytest.raises(TokenizerError, match="WordLevel tokenizer and .* BPE one"):
        run_merge(rec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a model without tokenizer files cannot take part in a union
    (b / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="cannot load its tokenizer"):
        plan_merge(rec)
    rec["tokenizer"] = {"source": "union"}
    with pytest.raises(RecipeError, match="not both"):
        plan_merge(rec)


def test_bad_token_overrides(two_vocabs) -> None:
    a, b = two_vocabs
    rec = {
        "merge_method": "linear",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "tokenizer": {"source": "union", "tokens": {"apple": {"source": {"kind": "magic"}}}},
    }
    with pytest.raises(RecipeError, match=r"tokenizer.tokens\['apple'\]"):
        plan_merge(rec)
    rec["tokenizer"]["tokens"] = {"apple": {"source": "/no/such/model"}}
    with pytest.raises(RecipeError, match="is not one of the merged models"):
        plan_merge(rec)
    rec["tokenizer"]["tokens"] = {
        "apple": {"source": {"kind": "model_token", "model": str(a), "token": "zzz"}}
    }
    with pytest.raises(RecipeError, match="'zzz' is not in model"):
        plan_merge(rec)
    rec["tokenizer"]["tokens"] = {"grape": {"source": str(a)}}  # a has no "grape"
    with pytest.raises(RecipeError, match="does not have this token"):
        plan_merge(rec)


def test_identical_vocabularies_need_no_reindexing(make_models, tmp_path: Path) -> None:
    paths = make_models(2)
    for p in paths:
        _wordlevel([f"w{i}" for i in range(38)], p)  # 40 tokens = the models' 40 rows
    plan = plan_merge(
        {"merge_method": "linear", "models": [{"model": str(p)} for p in paths], "tokenizer_source": "union"}
    )
    assert plan.vocab is None  # the tokenizer files are copied as they are


def test_a_union_plan_survives_pickling(two_vocabs, tmp_path: Path) -> None:
    """The service plans a merge once, at admission, and hands the plan to its worker process pickled."""
    import pickle

    from merge.plan import plan_merge

    a, b = two_vocabs
    rec = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}], "tokenizer_source": "union"}
    plan = plan_merge(rec)
    for c in plan.checkpoints:
        c.close()
    run_merge(rec, tmp_path / "fresh")
    run_merge(rec, tmp_path / "handed", plan=pickle.loads(pickle.dumps(plan)))
    for f in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "fresh" / f).read_bytes() == (tmp_path / "handed" / f).read_bytes()
