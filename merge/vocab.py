"""Merging models with different vocabularies: the output tokenizer and re-indexed embedding rows.

A recipe's ``tokenizer: {source: union | base | MODEL, tokens: {...}, pad_to_multiple_of: N}`` (or
``tokenizer_source:``) asks for one output vocabulary; every vocabulary-indexed tensor (input
embeddings, LM heads, their biases) of every input is then re-indexed to it before the merge method
sees it, so token ``j`` of the output means the same string in every input. This follows mergekit
0.1.5 (``tokenizer/build.py``, ``tokenizer/embed.py``):

- **Output vocabulary.** ``base``: the base model's tokenizer (the first model's without a base);
  ``MODEL``: that model's; ``union``: the base's tokenizer plus, in model order, every token of the
  other models it lacks. Where mergekit appends those as *added tokens* (matched as literal strings
  before the tokenizer's model runs, so a byte-level BPE's ``Ġword`` is never produced from text),
  weightsmith unions the tokenizer *models* (``tokenizers`` JSON: WordLevel / WordPiece / BPE vocab
  entries, BPE merges appended after the base's, Unigram pieces with their scores; the other models'
  added tokens stay added tokens), so text of either vocabulary encodes into real tokens of the union
  (the base's text exactly as before; another model's words with its own tokens for WordLevel, while
  BPE merges of different models interact, so such a word may split differently than in its model,
  though never into unknown pieces). Tokenizers of different model types cannot be unioned:
  that is an error. Keys of ``tokens:`` missing from the vocabulary are added as tokens. Tokens whose
  id is at or above a model's ``vocab_size`` (config.json) are ignored, as in mergekit.
- **Rows for tokens a model lacks** (mergekit's ``assign_embedding_sources``): a token present in
  only one model takes that model's row in every model; one no model has is zero; one the base model
  has takes the base's row; otherwise the mean of the rows of the models that have it. So a missing
  token is *filled in*, not excluded: the merge method then sees the same row for every model that
  lacked it. ``tokens: {TOKEN: {source: MODEL | {kind: model_token, model, token | token_id} |
  {kind: zero}, force: bool}}`` overrides the rule per token (``force`` applies it to every model,
  not only those lacking the token). With ``pad_to_multiple_of`` the vocabulary is padded and the
  padding rows take each model's mean row.
- **Which tensors.** A floating tensor is vocabulary-indexed when its first dimension equals every
  input's vocabulary size (``vocab_size`` in config.json, else the tokenizer's length) and either those
  sizes differ between inputs or its name looks like an embedding or output head. The other
  dimensions must match.

Rows are read in contiguous runs per chunk (``Checkpoint.rows``), so a re-indexed tensor streams like
any other; memory stays one chunk per model.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch

from merge.checkpoint import Checkpoint
from merge.errors import RecipeError, TokenizerError

LOG = logging.getLogger(__name__)

_HEAD_RE = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_out|wte|word_embeddings|tok_embeddings|lm_head|output|"
    r"shared|decoder|predictions|embeddings)(\.|$)"
)
#: tokenizer files of the inputs that a re-indexed vocabulary replaces in the output
TOKENIZER_FILES = re.compile(
    r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|merges\.txt|spiece\.model|"
    r"sentencepiece\.bpe\.model|chat_template\.(jinja|json)"
)

# rules for a token's default row
NONE, MODEL, AVERAGE, ZERO, ROW = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------------------
# the `tokens:` configuration (mergekit's TokenEmbeddingConfig)
# --------------------------------------------------------------------------------------------------
class ModelTokenEmbedding(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @pydantic.model_validator(mode="after")
    def _one(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroEmbedding(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenEmbeddingConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False


def parse_tokens(tokens: dict[str, Any] | None) -> dict[str, TokenEmbeddingConfig]:
    """Validate ``tokenizer.tokens``; a RecipeError names the token."""
    out: dict[str, TokenEmbeddingConfig] = {}
    for tok, cfg in (tokens or {}).items():
        try:
            out[tok] = TokenEmbeddingConfig.model_validate(cfg if cfg is not None else {})
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise RecipeError(
                f"tokenizer.tokens[{tok!r}]{'.' + loc if loc else ''}: {err['msg'].removeprefix('Value error, ')}"
            ) from None
    return out


# --------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------
_HF_LOCK = threading.Lock()


def load_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer`` (fast) from a local checkpoint folder, or TokenizerError naming it."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is in the dev/hf extras
        raise TokenizerError("merging vocabularies needs 'transformers' (pip install transformers)") from None
    with _HF_LOCK:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(
                str(folder), use_fast=True, local_files_only=True
            )
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            raise TokenizerError(
                f"{folder}: cannot load its tokenizer: {str(e).splitlines()[0][:200]}"
            ) from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(
            f"{folder}: its tokenizer has no fast (tokenizer.json) form; it cannot be merged"
        )
    return tok


def config_vocab_size(ckpt: Checkpoint) -> int | None:
    cfg_path = ckpt.root / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def _backend_json(tok: Any) -> dict[str, Any]:
    return json.loads(tok.backend_tokenizer.to_str())


def _copy_tokenizer(tok: Any) -> Any:
    """An independent copy (save + reload, as mergekit does, so the input is never mutated)."""
    import transformers

    with tempfile.TemporaryDirectory() as d, _HF_LOCK:
        tok.save_pretrained(d)
        return transformers.AutoTokenizer.from_pretrained(d, use_fast=True, local_files_only=True)


def _merge_key(m: Any) -> tuple[str, ...]:
    return tuple(m.split(" ")) if isinstance(m, str) else tuple(m)


def union_tokenizer(items: list[tuple[str, Any, int]]) -> Any:
    """The union of several fast tokenizers ``(label, tokenizer, vocab_size)``; the first is the base.

    The base's tokenizer (normaliser, pre-tokeniser, post-processor, special tokens, chat template) is
    kept; every token of the other models it lacks is appended (ids after the base's) to the
    tokenizer model's vocabulary, or to the added tokens where it is an added token there. BPE merges
    of the other models are appended after the base's (those whose parts are in the vocabulary).
    """
    (label0, tok0, size0), rest = items[0], items[1:]
    js = _backend_json(tok0)
    kind = js["model"]["type"]
    for label, tok, _ in rest:
        other = _backend_json(tok)["model"]["type"]
        if other != kind:
            raise TokenizerError(
                f"tokenizer union: {label0} has a {kind} tokenizer and {label} a {other} one; vocabularies of "
                "different tokenizer types cannot be merged (use tokenizer source 'base' or a model instead)"
            )
    model = js["model"]
    vocab_full = {t: i for t, i in tok0.get_vocab().items() if i < size0}
    if len(vocab_full) < len(tok0.get_vocab()):  # strip tokens beyond the base's embedding rows
        drop = {t for t, i in tok0.get_vocab().items() if i >= size0}
        js["added_tokens"] = [a for a in js["added_tokens"] if a["content"] not in drop]
        if kind == "Unigram":
            model["vocab"] = [p for p in model["vocab"] if p[0] not in drop]
        else:
            model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in drop}
            if kind == "BPE":
                model["merges"] = [m for m in model["merges"] if not (set(_merge_key(m)) & drop)]
    next_id = max(vocab_full.values(), default=-1) + 1
    if kind == "Unigram" and len(model["vocab"]) != next_id:
        raise TokenizerError(
            f"tokenizer union: {label0}: its Unigram pieces ({len(model['vocab'])}) do not cover its "
            f"vocabulary ({next_id} ids); cannot append pieces"
        )
    merges = [_merge_key(m) for m in model.get("merges", [])] if kind == "BPE" else []
    have_merges = set(merges)
    str_merges = bool(model.get("merges")) and isinstance(model["merges"][0], str)
    for _label, tok, size in rest:
        ojs = _backend_json(tok)
        added = {a["content"]: a for a in ojs["added_tokens"]}
        scores = {p[0]: p[1] for p in ojs["model"]["vocab"]} if kind == "Unigram" else {}
        for _, t in sorted((i, t) for t, i in tok.get_vocab().items() if i < size):
            if t in vocab_full:
                continue
            vocab_full[t] = next_id
            if t in added:
                entry = dict(added[t])
                entry["id"] = next_id
                js["added_tokens"].append(entry)
            elif kind == "Unigram":
                model["vocab"].append([t, scores.get(t, 0.0)])
            else:
                model["vocab"][t] = next_id
            next_id += 1
        if kind == "BPE":
            for m in ojs["model"].get("merges", []):
                key = _merge_key(m)
                if (
                    key not in have_merges
                    and all(p in model["vocab"] for p in key)
                    and "".join(key) in model["vocab"]
                ):
                    have_merges.add(key)
                    merges.append(key)
    if kind == "BPE":
        model["merges"] = [" ".join(m) for m in merges] if str_merges else [list(m) for m in merges]
    from tokenizers import Tokenizer

    out = _copy_tokenizer(tok0)
    out._tokenizer = Tokenizer.from_str(json.dumps(js))  # mergekit replaces the backend the same way
    return out


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------
@dataclass
class VocabularyPlan:
    """The output vocabulary and, per input model (engine model index), its row of each output token."""

    source: str
    tokenizer: Any
    n_tokens: int  # tokens in the output tokenizer
    size: int  # output rows (n_tokens padded to pad_to_multiple_of)
    perms: dict[int, np.ndarray]  # model -> int64 [n_tokens]: original row, or -1 when absent
    sizes: dict[int, int]  # model -> its vocabulary size (rows of its embeddings)
    tokens: dict[str, TokenEmbeddingConfig]
    token_model: dict[str, int]  # reference of a model named in `tokens:` -> model index
    vocabs: dict[int, dict[str, int]]  # model -> its own token -> id
    out_vocab: dict[str, int]
    tensors: set[str] = field(default_factory=set)

    def is_vocab_tensor(self, name: str) -> bool:
        return name in self.tensors

    def rows_for(
        self, models: list[tuple[int, Checkpoint, str]], base: int | None, dtype: torch.dtype
    ) -> VocabRows:
        """The row source of one output tensor over these (model, checkpoint, tensor name) inputs."""
        return VocabRows(self, models, base, dtype)

    def save_tokenizer(self, folder: Path) -> list[Path]:
        """Write the output tokenizer into ``folder``; return the files written."""
        with _HF_LOCK:
            self.tokenizer.save_pretrained(str(folder))
        return sorted(p for p in folder.iterdir() if p.is_file())

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "tokens": self.n_tokens,
            "rows": self.size,
            "tensors": sorted(self.tensors),
        }


def plan_vocabulary(
    *,
    source: str,
    tokens: dict[str, Any] | None,
    pad_to_multiple_of: int | None,
    models: list[tuple[int, str, Checkpoint]],
    base: int | None,
    source_model: int | None,
    tensor_models: list[int],
    names: list[str],
) -> VocabularyPlan | None:
    """Build the output vocabulary for ``models`` ``(index, reference, checkpoint)`` (base first if any).

    ``tensor_models`` are the models whose tensors are merged; ``names`` the tensor names of the
    reference model. Returns None when every input already has the output vocabulary, in the same
    order (nothing to re-index: the source's tokenizer files are copied as before).
    """
    token_cfg = parse_tokens(tokens)
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise RecipeError(f"tokenizer.pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    by_idx = {i: (ref, c) for i, ref, c in models}
    order = list(dict.fromkeys(([base] if base is not None else []) + [i for i, _, _ in models]))
    first = base if base is not None else order[0]
    src = first if source in ("union", "base") else source_model
    assert src is not None
    toks: dict[int, Any] = {}
    for i in order:
        ref, ckpt = by_idx[i]
        try:
            toks[i] = load_tokenizer(ckpt.root)
        except TokenizerError:
            if source == "union" or i == src:
                if source != "union" and not token_cfg and not pad_to_multiple_of:
                    return None  # tokenizer files are copied as they are (no re-indexing possible)
                raise
            if i not in tensor_models:
                continue
            LOG.warning("%s: no loadable tokenizer; assuming the vocabulary of %s", ref, by_idx[src][0])
    sizes = {i: config_vocab_size(by_idx[i][1]) or len(toks.get(i, toks[src])) for i in order}
    vocabs = {i: {t: j for t, j in toks.get(i, toks[src]).get_vocab().items() if j < sizes[i]} for i in order}
    if source == "union":
        out = union_tokenizer([(by_idx[i][0], toks[i], sizes[i]) for i in order if i in toks])
    else:
        out = _copy_tokenizer(toks[src])
    missing = [t for t in token_cfg if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    out_vocab = out.get_vocab()
    n_tokens = len(out_vocab)
    if sorted(out_vocab.values()) != list(range(n_tokens)):
        raise TokenizerError(
            f"output tokenizer ({source}): token ids are not 0..{n_tokens - 1}; cannot index rows"
        )
    size = n_tokens
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    perms = {}
    for i in order:
        p = np.full(n_tokens, -1, dtype=np.int64)
        v = vocabs[i]
        for t, j in out_vocab.items():
            k = v.get(t)
            if k is not None:
                p[j] = k
        perms[i] = p
    token_model: dict[str, int] = {}
    refs = {ref: i for i, ref, _ in models}
    for tok, cfg in token_cfg.items():
        s = cfg.source
        ref = s.model if isinstance(s, ModelTokenEmbedding) else s if isinstance(s, str) else None
        if ref is not None:
            if ref not in refs or refs[ref] not in tensor_models:
                raise RecipeError(
                    f"tokenizer.tokens[{tok!r}]: source model '{ref}' is not one of the merged models"
                )
            token_model[ref] = refs[ref]
    identity = (
        not token_cfg
        and size == n_tokens
        and all(sizes[i] == n_tokens and np.array_equal(perms[i], np.arange(n_tokens)) for i in tensor_models)
    )
    if identity:
        return None
    plan = VocabularyPlan(
        source, out, n_tokens, size, perms, sizes, token_cfg, token_model, vocabs, out_vocab
    )
    plan.tensors = _vocab_tensors(names, {i: by_idx[i][1] for i in tensor_models}, sizes)
    if not plan.tensors:
        raise TokenizerError(
            f"the inputs' vocabularies differ (sizes {sorted(set(sizes[i] for i in tensor_models))}) but no tensor "
            "has the vocabulary as its first dimension in every model"
        )
    for tok, cfg in token_cfg.items():  # model_token sources must exist
        s = cfg.source
        if isinstance(s, ModelTokenEmbedding):
            i = token_model[s.model]
            row = s.token_id if s.token_id is not None else vocabs[i].get(s.token or "")
            if row is None or not 0 <= row < sizes[i]:
                raise RecipeError(
                    f"tokenizer.tokens[{tok!r}]: token {s.token or s.token_id!r} is not in model "
                    f"'{s.model}' (vocabulary of {sizes[i]})"
                )
        elif isinstance(s, str) and perms[token_model[s]][out_vocab[tok]] < 0:
            raise RecipeError(f"tokenizer.tokens[{tok!r}]: model '{s}' does not have this token")
    return plan


def _vocab_tensors(names: list[str], ckpts: dict[int, Checkpoint], sizes: dict[int, int]) -> set[str]:
    differ = len({sizes[i] for i in ckpts}) > 1
    out = set()
    for n in names:
        shapes = {}
        for i, c in ckpts.items():
            if n not in c or not c.dtype(n).is_floating_point:
                break
            shapes[i] = c.shape(n)
        else:
            if all(len(s) >= 1 and s[0] == sizes[i] for i, s in shapes.items()) and (
                differ or _HEAD_RE.search(n)
            ):
                out.add(n)
    return out


# --------------------------------------------------------------------------------------------------
# re-indexed rows
# --------------------------------------------------------------------------------------------------
def _read_rows(ckpt: Checkpoint, name: str, rows: np.ndarray) -> torch.Tensor:
    """Rows ``rows`` (any order, no repeats) of a tensor, read in contiguous runs."""
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    breaks = np.nonzero(np.diff(srt) != 1)[0] + 1
    parts = [ckpt.rows(name, int(run[0]), int(run[-1]) + 1) for run in np.split(srt, breaks) if run.size]
    got = torch.cat(parts) if len(parts) > 1 else parts[0]
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    return got[torch.from_numpy(inv)]


class VocabRows:
    """Rows of one output tensor re-indexed to the output vocabulary, per input model, chunk by chunk.

    ``rows(model, r0, r1)`` returns output rows r0:r1 as that model sees them (its own rows where it
    has the token, the token's default row otherwise). The last chunk is cached for all models, since
    the engine asks for it once per model.
    """

    def __init__(
        self,
        plan: VocabularyPlan,
        models: list[tuple[int, Checkpoint, str]],
        base: int | None,
        dtype: torch.dtype,
    ) -> None:
        self.plan = plan
        self.models = models
        self.dtype = dtype
        self.idx = [m for m, _, _ in models]
        self._lock = threading.Lock()
        self._cache: tuple[int, int, dict[int, torch.Tensor]] | None = None
        self._pad: dict[int, torch.Tensor] | None = None
        n = plan.n_tokens
        p = np.stack([plan.perms[m] for m in self.idx])
        present = p >= 0
        count = present.sum(0)
        kind = np.full(n, NONE, dtype=np.int8)
        src = np.full(n, -1, dtype=np.int64)  # position in self.idx (MODEL) or original row (ROW)
        forced = np.zeros(n, dtype=bool)
        src_model = np.full(n, -1, dtype=np.int64)
        pos = {m: k for k, m in enumerate(self.idx)}
        auto_missing = count < len(self.idx)
        kind[auto_missing & (count == 0)] = ZERO
        one = auto_missing & (count == 1)
        kind[one] = MODEL
        src[one] = present[:, one].argmax(0)
        rest = auto_missing & (count > 1)
        if base is not None and base in pos:
            b = rest & present[pos[base]]
            kind[b] = MODEL
            src[b] = pos[base]
            rest &= ~b
        kind[rest] = AVERAGE
        for tok, cfg in plan.tokens.items():
            j = plan.out_vocab[tok]
            forced[j] = cfg.force
            s = cfg.source
            if isinstance(s, ZeroEmbedding):
                kind[j] = ZERO
            elif isinstance(s, ModelTokenEmbedding):
                m = plan.token_model[s.model]
                kind[j] = ROW
                src_model[j] = pos[m]
                src[j] = s.token_id if s.token_id is not None else plan.vocabs[m][s.token or ""]
            elif isinstance(s, str):
                kind[j] = MODEL
                src[j] = pos[plan.token_model[s]]
            elif cfg.force and kind[j] == NONE:  # forced, automatic rule: the base's row, else the mean
                if base is not None and base in pos:
                    kind[j], src[j] = MODEL, pos[base]
                else:
                    kind[j] = AVERAGE
        self.present, self.count = present, count
        self.kind, self.src, self.src_model, self.forced = kind, src, src_model, forced


    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a plan handed to a service worker): the lock and the chunk cache stay behind."""
        return {**self.__dict__, "_lock": None, "_cache": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())
    def rows(self, model: int, r0: int, r1: int) -> torch.Tensor:
        with self._lock:
            if self._cache is None or self._cache[:2] != (r0, r1):
                self._cache = (r0, r1, self._chunk(r0, r1))
            return self._cache[2][model]

    def _chunk(self, r0: int, r1: int) -> dict[int, torch.Tensor]:
        n = self.plan.n_tokens
        t1 = min(r1, n)
        out: dict[int, torch.Tensor] = {}
        for m, ckpt, name in self.models:
            rest = ckpt.shape(name)[1:]
            x = torch.zeros((r1 - r0, *rest), dtype=self.dtype)
            if t1 > r0:
                p = self.plan.perms[m][r0:t1]
                have = np.nonzero(p >= 0)[0]
                if have.size:
                    x[torch.from_numpy(have)] = _read_rows(ckpt, name, p[have]).to(self.dtype)
            out[m] = x
        if t1 > r0:
            self._defaults(out, r0, t1)
        if r1 > n:
            pad = self._pad_rows()
            for m in self.idx:
                out[m][max(n, r0) - r0 :] = pad[m]
        return out

    def _defaults(self, out: dict[int, torch.Tensor], r0: int, t1: int) -> None:
        kind = self.kind[r0:t1]
        need = kind != NONE
        if not need.any():
            return
        rows = [out[m] for m in self.idx]
        default = torch.zeros_like(rows[0][: t1 - r0])
        src = self.src[r0:t1]
        present = self.present[:, r0:t1]
        for k in range(len(self.idx)):
            sel = np.nonzero((kind == MODEL) & (src == k))[0]
            if sel.size:
                default[torch.from_numpy(sel)] = rows[k][torch.from_numpy(sel)]
        avg = np.nonzero(kind == AVERAGE)[0]
        if avg.size:
            a = torch.from_numpy(avg)
            acc = torch.zeros_like(default[a])
            for k in range(len(self.idx)):  # sequentially, as mergekit sums them
                has = torch.from_numpy(present[k, avg])
                acc[has] = acc[has] + rows[k][a][has]
            default[a] = acc / torch.from_numpy(self.count[r0:t1][avg]).to(acc.dtype).view(
                -1, *[1] * (acc.dim() - 1)
            )
        for j in np.nonzero(kind == ROW)[0]:
            k = int(self.src_model[r0 + j])
            _, ckpt, name = self.models[k]
            row = int(self.src[r0 + j])
            default[int(j)] = ckpt.rows(name, row, row + 1)[0].to(self.dtype)
        forced = self.forced[r0:t1]
        for k, m in enumerate(self.idx):
            target = np.nonzero(need & (~present[k] | forced))[0]
            if target.size:
                ti = torch.from_numpy(target)
                out[m][ti] = default[ti]

    def _pad_rows(self) -> dict[int, torch.Tensor]:
        """Each model's mean over the real vocabulary rows (mergekit's padding rule), one extra pass."""
        if self._pad is None:
            n = self.plan.n_tokens
            sums: dict[int, torch.Tensor] = {}
            step = max(1, (1 << 19) // max(1, int(np.prod(self.models[0][1].shape(self.models[0][2])[1:]))))
            for r0 in range(0, n, step):
                chunk = self._chunk(r0, min(n, r0 + step))
                for m, x in chunk.items():
                    s = x.sum(0, dtype=torch.float64)
                    sums[m] = s if m not in sums else sums[m] + s
            self._pad = {m: (s / n).to(self.dtype) for m, s in sums.items()}
        return self._pad
