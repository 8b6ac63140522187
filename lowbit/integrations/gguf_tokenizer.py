"""A transformers fast tokenizer as GGUF metadata (tokenizer.ggml.*), for gguf_export.py.

Two kinds of BPE tokenizer are written, each as the llama.cpp tokenizer that splits text the same way:

- byte-level BPE (Llama 3, Qwen, GPT-2; `tokenizer.ggml.model` "gpt2"): tokens, merges, and the
  name llama.cpp gives the split regex (`tokenizer.ggml.pre`);
- SentencePiece BPE with byte fallback (Llama 2, Mistral 7B; "llama"): tokens and per-token scores.
  llama.cpp does not read merges for these: it joins the adjacent pair whose joined text is the
  best-scored token, any pair at all, where transformers applies only the listed merges, in list
  order. tokenizer.json keeps no scores, so they are rebuilt from the merge order (a token scores
  minus the rank of the first merge that makes it), and the tokenizer is written only when the two
  rules tokenize alike: its merges are every split of a token into two tokens, each token's merges
  listed together, as transformers' conversion of a SentencePiece model lists them.

Both get token types (control, user-defined, byte, unknown, and llama.cpp's unused [PADi] rows up
to the model's vocabulary size), special token ids, whether BOS / EOS are added, and the chat template.
"""
from __future__ import annotations

import json
import re
import warnings

from ..errors import CheckpointError

#: llama.cpp's names for the split regexes transformers knows them by, most used first
_PRE_TOKENIZER_NAMES = ("llama-bpe", "qwen2", "gpt-4o", "tekken", "qwen35")
_GPT2_PRE_TOKENIZER = "gpt-2"  # ByteLevel's own regex, no Split before it
_SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_PAD_SCORE = -1000.0  # llama.cpp's converter's score for its [PADi] rows


def _fail(problem: str) -> CheckpointError:
    return CheckpointError(f"GGUF export: tokenizer: {problem}")


def _pre_tokenizer_steps(spec: dict) -> list[dict]:
    """The tokenizer's pre-tokenizers in order (a Sequence's steps, or the one), [] without any."""
    pre = spec.get("pre_tokenizer")
    return pre.get("pretokenizers", [pre]) if pre else []


def _pre_tokenizer_name(steps: list[dict]) -> str:
    """llama.cpp's name for a byte-level tokenizer's split (tokenizer.ggml.pre), from its pre-tokenizer `steps`."""
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and isinstance(s.get("pattern"), dict)]
    if not splits:
        if byte_level[0].get("use_regex", True):
            return _GPT2_PRE_TOKENIZER
        raise _fail("a byte-level pre-tokenizer without a split regex, which llama.cpp has no name for")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    known = {regex: name for name, regex in reversed(list(GGUF_PRE_TOKENIZER_SPLITS.items()))}
    known.update({GGUF_PRE_TOKENIZER_SPLITS[name]: name for name in reversed(_PRE_TOKENIZER_NAMES)})
    if splits[0] not in known:
        warnings.warn(f"GGUF export: the tokenizer's split regex {splits[0][:60]!r}... is none llama.cpp names; "
                      "written as pre-tokenizer 'default' (llama.cpp then splits text its default way)", stacklevel=3)
        return "default"
    return known[splits[0]]


def _space_prefix(spec: dict) -> tuple[bool, bool]:
    """(whether a SentencePiece-style tokenizer puts '▁' before the text: tokenizer.ggml.add_space_prefix,
    whether it also splits the text into words at each '▁'), from Llama 2's normalizer (Prepend
    '▁', Replace ' ' -> '▁') or transformers 5's Metaspace pre-tokenizer; CheckpointError for
    anything llama.cpp's SentencePiece tokenizer does not do."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if pre is None and normalizer is not None:
        steps = normalizer.get("normalizers", [normalizer])
        kinds = [s.get("type") for s in steps]
        replaces_spaces = any(s.get("type") == "Replace" and s.get("pattern") == {"String": " "}
                              and s.get("content") == _SPACE for s in steps)
        prepends = [s for s in steps if s.get("type") == "Prepend"]
        if replaces_spaces and set(kinds) <= {"Prepend", "Replace"} and all(p.get("prepend") == _SPACE for p in prepends):
            return bool(prepends), False
    if normalizer is None and pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE:
        scheme = pre.get("prepend_scheme", "always")
        if scheme in ("always", "first", "never"):
            return scheme != "never", bool(pre.get("split", True))
    raise _fail(f"normalizer {json.dumps(normalizer)[:80]} and pre-tokenizer {json.dumps(pre)[:80]} are neither "
                "byte-level nor SentencePiece's ('▁' for spaces): GGUF export writes byte-level BPE (Llama 3, Qwen) "
                "and SentencePiece BPE (Llama 2, Mistral) tokenizers")


def _merge_scores(vocab: dict[str, int], merges: list[tuple[str, str]], splits_words: bool) -> dict[str, float]:
    """{token a merge makes: score} under which llama.cpp's SentencePiece tokenizer (join the adjacent
    pair whose joined text is the best-scored token) joins what transformers' BPE (the listed
    merges, in order) does; CheckpointError when no scores can (module docstring)."""
    implied = {(token[:i], token[i:]) for token in vocab for i in range(1, len(token))
               if token[:i] in vocab and token[i:] in vocab}
    listed = set(merges)
    if listed != implied:
        missing, extra = sorted(implied - listed)[:3], sorted(listed - implied)[:3]
        raise _fail(f"its merges are not every split of a token into two tokens ({len(implied - listed)} splits "
                    f"not listed, e.g. {missing}; {len(listed - implied)} listed merges that are no such split, e.g. "
                    f"{extra}): llama.cpp would join pairs its BPE never does")
    rank: dict[str, int] = {}
    for index, (left, right) in enumerate(merges):
        joined = left + right
        if joined in rank and merges[index - 1][0] + merges[index - 1][1] != joined:
            raise _fail(f"the merges making {joined!r} are not listed together (ranks {rank[joined]} and {index}): "
                        "llama.cpp ranks a pair by the token it makes")
        rank.setdefault(joined, index)
    if splits_words and any(_SPACE in token[1:] for token in rank):
        raise _fail("its pre-tokenizer splits words at '▁' but a merge makes a token with '▁' inside, "
                    "which llama.cpp's SentencePiece tokenizer would join across words")
    return {token: float(-index) for token, index in rank.items()}


def _token_scores(names: list[tuple[str, int]], merge_scores: dict[str, float], merge_count: int) -> list[float]:
    """The scores of a SentencePiece-style tokenizer's (token, type) rows: a merged token's from
    `merge_scores`; other normal ones (single characters) below every merged one in id order, and
    control, byte and unknown ones 0, as SentencePiece scores them; llama.cpp's -1000 for its [PADi] rows."""
    import gguf

    def score(token_id: int, token: str, kind) -> float:
        if kind == gguf.TokenType.UNUSED:
            return _PAD_SCORE
        if token in merge_scores:
            return merge_scores[token]
        return float(-merge_count - token_id) if kind == gguf.TokenType.NORMAL else 0.0

    return [score(i, token, kind) for i, (token, kind) in enumerate(names)]


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write tokenizer.ggml.* and the chat template of `tokenizer` (a transformers fast tokenizer,
    byte-level or SentencePiece BPE) for a model of `vocab_size` embedding rows to `writer` (a
    gguf.GGUFWriter); CheckpointError naming what llama.cpp's tokenizers cannot reproduce."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _fail(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise _fail(f"a {model.get('type')} model; GGUF export writes BPE tokenizers (byte-level or SentencePiece)")
    vocab = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    steps = _pre_tokenizer_steps(spec)
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    if byte_level:
        pre = _pre_tokenizer_name(steps)
    elif model.get("byte_fallback"):
        add_space_prefix, splits_words = _space_prefix(spec)
        scores = _merge_scores(vocab, merges, splits_words)
    else:
        raise _fail("a BPE model that is neither byte-level nor SentencePiece-style (byte_fallback): llama.cpp "
                    "has no tokenizer that splits text as it does")
    unknown = model.get("unk_token") or tokenizer.unk_token  # transformers 5's conversion leaves the model's unset
    tokens: dict[int, tuple[str, int]] = {}
    for token, i in vocab.items():
        kind = gguf.TokenType.NORMAL
        if not byte_level and token == unknown:
            kind = gguf.TokenType.UNKNOWN
        elif not byte_level and _BYTE_TOKEN.fullmatch(token):
            kind = gguf.TokenType.BYTE
        tokens[i] = (token, kind)
    for added in spec.get("added_tokens", []):
        if tokens.get(added["id"], (None, None))[1] in (gguf.TokenType.UNKNOWN, gguf.TokenType.BYTE):
            continue  # SentencePiece's <unk> is an added token too: it keeps its own type
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[added["id"]] = (added["content"], kind)
    if max(tokens) >= vocab_size:
        raise _fail(f"token id {max(tokens)} is past the model's {vocab_size} embedding rows")
    names = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_token_list([t for t, _ in names])
    writer.add_token_types([int(kind) for _, kind in names])
    if byte_level:
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges([" ".join(m) for m in merges])
    else:
        writer.add_add_space_prefix(add_space_prefix)
        writer.add_token_scores(_token_scores(names, scores, len(merges)))
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    for kind, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    # whether encoding adds BOS / EOS, as the tokenizer's post-processor does it
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(special["bos"] is not None and ids[:1] == [special["bos"]])
    writer.add_add_eos_token(special["eos"] is not None and ids[-1:] == [special["eos"]])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
