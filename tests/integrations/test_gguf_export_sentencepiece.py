"""GGUF export of SentencePiece BPE tokenizers (Llama 2 / Mistral 7B style; gguf_tokenizer.py).

The tokenizer is a real SentencePiece BPE model (byte fallback, identity normalization, as
Llama 2's), turned into a transformers tokenizer by transformers' own conversion. Oracles:
sentencepiece's encoding; llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), re-implemented
here from its rule, run on the tokens and scores in the file; transformers' tokenizer built from
the file (gguf_file=)."""
import io
import json

import pytest
import torch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.integrations.gguf_export import export_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece", reason="sentencepiece: a test dependency (pyproject [test])")

CORPUS = ["the quick brown fox jumps over the lazy dog 12345", "quantized models run fast on the GPU 678",
          "Ünïcödé text, émojis 🙂 and tabs\tstay whole", "  two spaces,\nnew lines"]
#: texts that do not start with a space (transformers' Metaspace "first" then adds no second '▁',
#: where SentencePiece and llama.cpp do), with characters the model lacks (byte fallback: Ω, 🚀)
TEXTS = ["the quick brown fox jumps over the lazy dog 12345", "Zebra Ω runs\t\tfast 🚀, quantized!", "x  y\n\nz"]
LEADING_SPACE = ["  two spaces,\nnew lines", " leading space"]
SPACE = "\u2581"


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """(sentencepiece processor, the folder holding its tokenizer.model)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 30), model_writer=model, model_type="bpe", vocab_size=420, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2)
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue()), folder


def _tokenizer(folder, spelling):
    """transformers' tokenizer of the SentencePiece model, BOS added; `spelling` "metaspace" as
    transformers 5 converts it, "legacy" as Llama 2's tokenizer.json spells it (a normalizer that
    prepends '▁' and replaces spaces, no pre-tokenizer)."""
    from tokenizers import normalizers

    tokenizer = transformers.LlamaTokenizer.from_pretrained(folder)
    if spelling == "legacy":
        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        backend.pre_tokenizer = None
    tokenizer.add_bos_token = True
    tokenizer.update_post_processor()
    return tokenizer


def _model(tokenizer):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tokenizer) + 3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return lowbit.quantize(model, "int8", symmetric=True, group_size=32, skip=["lm_head"], progress=False)


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float], add_space_prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece tokenization of plain text: spaces as '▁' (one before the text with
    add_space_prefix), the text cut into characters, then again and again the adjacent pair whose
    joined text is a token joined, the best-scored first (the leftmost on a tie); a character no
    token spells becomes its UTF-8 byte tokens <0xXX>."""
    ids = {token: i for i, token in enumerate(tokens)}
    symbols = list((SPACE if add_space_prefix else "") + text.replace(" ", SPACE))
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [i for s in symbols for i in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


@pytest.mark.parametrize("spelling", ["metaspace", "legacy"])
def test_llama_cpp_and_transformers_tokenize_the_exported_file_as_sentencepiece_does(tmp_path, sentencepiece_model,
                                                                                      spelling):
    processor, folder = sentencepiece_model
    tokenizer = _tokenizer(folder, spelling)
    bos = tokenizer.bos_token_id
    for text in TEXTS:  # the fixture is faithful: transformers' conversion tokenizes as sentencepiece
        assert tokenizer(text).input_ids == [bos, *processor.encode(text)]
    model = _model(tokenizer)
    export_gguf(model, tmp_path / "model.gguf", tokenizer)

    fields = gguf.GGUFReader(str(tmp_path / "model.gguf")).fields
    tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert "tokenizer.ggml.merges" not in fields  # llama.cpp's converter writes none for SentencePiece
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = fields["tokenizer.ggml.token_type"].contents()
    # <unk> unknown, <s> </s> control, 256 byte tokens, SentencePiece's pieces normal, 3 unused [PADi] rows
    assert types == [2, 3, 3] + [6] * 256 + [1] * (len(tokenizer) - 259) + [5] * 3
    for text in TEXTS + LEADING_SPACE:
        assert llama_cpp_spm(text, tokens, scores, add_space_prefix=True) == processor.encode(text), text

    read = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in TEXTS:  # (transformers' spaces before a text are its own, with or without GGUF)
        assert read(text).input_ids == [bos, *processor.encode(text)], text
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([tokenizer(TEXTS[1]).input_ids])
    with torch.no_grad():
        want = model(ids).logits
        assert float((oracle(ids).logits - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("damage,message", [
    ("drop a merge", r"its merges are not every split of a token into two tokens \(1 splits not listed"),
    ("move a merge", r"the merges making .* are not listed together"),
    ("no byte fallback", r"a BPE model that is neither byte-level nor SentencePiece-style"),
])
def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path, sentencepiece_model, damage, message):
    """transformers applies the listed merges in order; llama.cpp joins any pair that makes a token,
    by the token's score: the export refuses merges that scores cannot reproduce."""
    from tokenizers import Tokenizer

    tokenizer = _tokenizer(sentencepiece_model[1], "metaspace")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    made = [m[0] + m[1] for m in merges]
    if damage == "drop a merge":
        del merges[-1]
    elif damage == "move a merge":  # two merges make one token: listed apart
        twice = next(i for i in range(1, len(made)) if made[i] == made[i - 1])
        merges.insert(0, merges.pop(twice))
    else:
        spec["model"]["byte_fallback"] = False
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(CheckpointError, match=message):
        export_gguf(_model(tokenizer), tmp_path / "model.gguf", tokenizer)
    assert list(tmp_path.iterdir()) == []
