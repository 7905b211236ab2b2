"""The recipe's chat_template (auto, base, a model, a built-in, inline Jinja) and the output tokenizer check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

from merge.chat_template import BUILTIN  # noqa: E402
from merge.errors import CheckpointError, RecipeError  # noqa: E402
from merge.execute import run_merge  # noqa: E402
from tests.merge.test_vocab import _model, _wordlevel  # noqa: E402

WORDS = ["apple", "banana", "cherry", "date"]
ZEPHYR = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"


def _with_template(folder: Path, template: str | None, seed: int) -> Path:
    n = _wordlevel(WORDS, folder)
    _model(folder, n, seed)
    if template is not None:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    return [
        _with_template(tmp_path / "a", ZEPHYR, 0),
        _with_template(tmp_path / "b", BUILTIN["chatml"], 1),
        _with_template(tmp_path / "c", ZEPHYR, 2),
    ]


def _merge(models: list[Path], out: Path, chat_template: str | None, base: Path | None = None) -> Path:
    rec = {"merge_method": "linear", "models": [{"model": str(m)} for m in models], "chat_template": chat_template}
    if base is not None:
        rec["base_model"] = str(base)
    run_merge(rec, out)
    return out


def _template(out: Path) -> str:
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    return (out / "chat_template.jinja").read_text()


def test_builtin_template_is_written_once_and_transformers_applies_it(three: list[Path], tmp_path: Path) -> None:
    out = _merge(three, tmp_path / "out", "chatml")
    assert _template(out) == BUILTIN["chatml"]
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_auto_takes_the_most_common_and_base_and_model_take_theirs(three: list[Path], tmp_path: Path) -> None:
    assert _template(_merge(three, tmp_path / "auto", "auto")) == ZEPHYR  # 2 of 3
    assert _template(_merge(three, tmp_path / "base", "base", base=three[1])) == BUILTIN["chatml"]
    assert _template(_merge(three, tmp_path / "model", str(three[1]))) == BUILTIN["chatml"]
    inline = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert _template(_merge(three, tmp_path / "inline", inline)) == inline
    # no chat_template: the tokenizer files are copied as they are
    plain = _merge(three, tmp_path / "plain", None)
    assert json.loads((plain / "tokenizer_config.json").read_text())["chat_template"] == ZEPHYR


def test_bad_templates_are_refused_before_any_work(three: list[Path], tmp_path: Path) -> None:
    for value, match in (
        ("{% for m in messages %}{{ m['content'] }", "does not render"),
        ("{{ 'no messages here' }}", "leaves out the messages"),
        ("vicuna-v9", "not auto, base, a model of the recipe"),
        ("base", "needs a base_model"),
    ):
        with pytest.raises(RecipeError, match=match):
            _merge(three, tmp_path / "never", value)
        assert not (tmp_path / "never").exists() and not list(tmp_path.glob("never*"))
    bare = _with_template(tmp_path / "bare", None, 3)
    with pytest.raises(RecipeError, match="carries no chat template"):
        _merge([bare, three[0]], tmp_path / "never", str(bare))


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path: Path) -> None:
    small = tmp_path / "small"
    _model(small, 4, 0)  # 4 embedding rows
    _wordlevel(WORDS, small)  # 6 tokens
    with pytest.raises(CheckpointError, match="token id 5 but 'model.embed_tokens.weight' has 4 rows"):
        _merge([small], tmp_path / "never", None)
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob("never*"))
