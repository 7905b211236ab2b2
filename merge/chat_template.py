"""The merge's chat template, and a check that its tokenizer fits its embeddings, before the output appears.

A recipe's ``chat_template`` (mergekit's key) chooses the output's template:

* ``auto`` — the template most of the input models carry (ties: the base's, else the first model's);
  nothing changes when none carries one;
* ``base`` — the base model's; a model reference of the recipe — that model's;
* a built-in name (``chatml``, ``llama3``, ``alpaca``, ``mistral``) or a Jinja template (any text with
  ``{{`` or ``{%``).

A model's template is read from ``chat_template.jinja``, ``chat_template.json`` or
``tokenizer_config.json`` (transformers' places), or from a GGUF file's ``tokenizer.chat_template``.
The chosen template must render a short conversation in a sandboxed Jinja environment (as transformers
renders it) when the recipe is planned, and is written as ``chat_template.jinja`` (the copy in
``tokenizer_config.json`` removed, so the two cannot disagree).

:func:`check_tokenizer` runs on the staged output, before it is renamed into place: a tokenizer with more
tokens than the embedding has rows, or a special token past the last row, is refused (such an output
indexes past its embeddings, and its conversion to GGUF fails).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from merge.errors import CheckpointError, RecipeError

BUILTIN = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}
_SAMPLE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Merge two models."},
]


def model_template(ckpt: Any) -> str | None:
    """The chat template a model carries (module docstring), or None."""
    g = getattr(ckpt, "gguf", None)
    if g is not None:
        t = g.metadata.get("tokenizer.chat_template")
        return str(t) if t else None
    root = Path(getattr(ckpt, "root", ""))
    if not root.is_dir():
        return None
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        f = root / name
        if not f.is_file():
            continue
        try:
            t = json.loads(f.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(t, list):  # named templates: the default one
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        if isinstance(t, str) and t:
            return t
    return None


def check_renders(template: str, where: str) -> None:
    """Render a short conversation (sandboxed, as transformers does); RecipeError naming ``where`` if it fails."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(
            messages=_SAMPLE, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )
    except TemplateError as e:
        raise RecipeError(f"chat_template ({where}): does not render a conversation: {e}") from None
    if "Merge two models." not in text:
        raise RecipeError(f"chat_template ({where}): the rendered conversation leaves out the messages")


def resolve(value: str | None, refs: list[str], ckpts: list[Any], base_ref: str | None) -> str | None:
    """The output's chat template for the recipe value ``value`` (module docstring); None: leave the
    tokenizer files as they are copied."""
    if value is None:
        return None
    templates = {ref: model_template(c) for ref, c in zip(refs, ckpts, strict=True)}
    if value == "auto":
        found = [t for t in templates.values() if t]
        if not found:
            return None
        counts = Counter(found)
        best = max(counts.values())
        tied = {t for t, n in counts.items() if n == best}
        order = ([base_ref] if base_ref else []) + refs
        chosen = next(templates[r] for r in order if templates.get(r) in tied)
        check_renders(chosen, "auto")
        return chosen
    if value == "base" or value in templates:
        ref = base_ref if value == "base" else value
        if ref is None:
            raise RecipeError("chat_template: 'base' needs a base_model")
        t = templates.get(ref)
        if not t:
            raise RecipeError(f"chat_template: model '{ref}' carries no chat template")
        check_renders(t, ref)
        return t
    if value in BUILTIN:
        return BUILTIN[value]
    if "{{" in value or "{%" in value:
        check_renders(value, "inline template")
        return value
    raise RecipeError(
        f"chat_template: {value!r} is not auto, base, a model of the recipe, a built-in "
        f"({', '.join(sorted(BUILTIN))}) or a Jinja template"
    )


def tokenizer_config_without_template(text: str) -> str:
    """``tokenizer_config.json`` without its ``chat_template`` (the output's is ``chat_template.jinja``)."""
    try:
        cfg = json.loads(text)
    except ValueError:
        return text
    if isinstance(cfg, dict):
        cfg.pop("chat_template", None)
    return json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"


_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")


def check_tokenizer(folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """The staged output's tokenizer fits its input embeddings (module docstring); CheckpointError otherwise.
    Silent when the output has no ``tokenizer.json`` the tokenizers library reads (it is then the input's, copied
    as it was) or no recognisable embedding tensor."""
    tok = folder / "tokenizer.json"
    emb = next((n for n in shapes if n.endswith(_EMBEDDINGS) and len(shapes[n]) == 2), None)
    if not tok.is_file() or emb is None:
        return
    rows = shapes[emb][0]
    try:
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(tok))
    except Exception:  # noqa: BLE001 - not a tokenizer the library reads (copied as the input had it): no check
        return
    ids = list(t.get_vocab(with_added_tokens=True).values())
    top = max(ids) if ids else -1
    if top >= rows:
        raise CheckpointError(
            f"output tokenizer: token id {top} but '{emb}' has {rows} rows: the model would index past its "
            "embeddings (and a conversion to GGUF fails); use tokenizer_source / tokenizer: {source: ...} so "
            "that the vocabulary and the embeddings agree"
        )
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            decoder = json.loads(cfg.read_text()).get("added_tokens_decoder") or {}
        except (OSError, ValueError, AttributeError):
            decoder = {}
        bad = [int(k) for k in decoder if str(k).isdigit() and int(k) >= rows]
        if bad:
            raise CheckpointError(f"output tokenizer: special token id {min(bad)} but '{emb}' has {rows} rows")
