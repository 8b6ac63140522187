"""GGUF export (lowbit/integrations/gguf_export.py).

Oracles that share no code with the exporter: transformers' from_pretrained(..., gguf_file=...)
(its own tensor-name map, Llama q / k row order and tokenizer builder; the gguf package decodes
every block) for the logits and the tokenizer, and the gguf package's reader and dequantizer for
each tensor's bytes. lowbit's GGUF import reads the file back too."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.integrations.gguf_export import export_gguf
from lowbit.integrations.gguf_import import load_gguf

from .gguf_files import interleaved

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS  # noqa: E402

TEXT = ["the quick brown fox jumps over the lazy dog 12345", "quantized models run fast on the GPU 678"]
CHAT_TEMPLATE = "{% for m in messages %}<|begin|>{{ m['content'] }}<|end|>{% endfor %}"
IDS = torch.tensor([[0, 5, 9, 33, 2, 100, 260]])
#: every layer in a format with a GGML type transformers decodes (lm_head stays float)
MIXED = {"format": "int4", "symmetric": True, "group_size": 32, "skip": ["lm_head"],
         "overrides": {"*.mlp.down_proj": {"format": "int8", "symmetric": True, "group_size": 32},
                       "*.mlp.up_proj": {"format": "int5", "symmetric": True, "group_size": 32},
                       "*.self_attn.v_proj": "iq4_nl"}}


def _tokenizer(split: str | None):
    """A byte-level BPE tokenizer trained on TEXT, splitting text by the regex llama.cpp calls `split`
    (None: GPT-2's ByteLevel regex), BOS added, two control tokens and one user-defined token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    backend.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[split]), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXT * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin|>", "<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 0)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin|>",
                                                     eos_token="<|end|>")
    tokenizer.add_tokens(["<think>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _phi3_tokenizer():
    """_tokenizer("llama-bpe") with a pad token, written as tokenizer.ggml.padding_token_id: without
    it transformers' GGUF reader keeps Phi3Config's pad id, 32000, past this vocabulary."""
    tokenizer = _tokenizer("llama-bpe")
    tokenizer.pad_token = "<|end|>"
    return tokenizer


def _model(architecture: str, tokenizer, dtype=torch.float32, **config):
    """A tiny causal LM with 4 embedding rows past the tokenizer's ids (llama.cpp's [PADi] tokens)."""
    sizes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tokenizer) + 4, max_position_embeddings=128)
    if architecture == "qwen3":
        sizes["head_dim"] = 128  # transformers' GGUF reader leaves Qwen3's head_dim at its default, 128
    if architecture == "mistral":
        sizes["sliding_window"] = None  # Mistral-Nemo's; llama.cpp's converter writes it as a Llama
    if architecture == "phi3":  # Phi3Config's default special token ids are Phi-3's, past this vocabulary
        sizes.update(bos_token_id=0, eos_token_id=1, pad_token_id=None)
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                    "phi3": transformers.Phi3Config}[architecture]
    torch.manual_seed(0)
    # dtype at construction: .to(dtype) would also round the rotary embedding's inv_freq buffer
    return transformers.AutoModelForCausalLM.from_config(config_class(**{**sizes, **config}), dtype=dtype).eval()


def _quantized(model, settings):
    settings = dict(settings)
    return lowbit.quantize(model, settings.pop("format"), progress=False, **settings)


@torch.no_grad()
def _logits(model):
    return model(IDS).logits.float()


@pytest.mark.parametrize("architecture,split", [("llama", "llama-bpe"), ("mistral", "tekken"), ("qwen2", "qwen2"),
                                                ("qwen3", None)])
def test_transformers_reads_the_exported_file_as_the_quantized_model(tmp_path, architecture, split):
    """Q4_0 / Q5_0 / Q8_0 / IQ4_NL layers, an F32 lm_head: transformers' GGUF load of the file gives
    the lowbit model's logits, and its tokenizer the same ids (split regex, BOS, control and
    user-defined tokens), special tokens and chat template."""
    tokenizer = _tokenizer(split)
    model = _quantized(_model(architecture, tokenizer), MIXED)
    written = export_gguf(model, tmp_path / "model.gguf", tokenizer)
    assert written == {"Q4_0": 8, "Q8_0": 2, "Q5_0": 2, "IQ4_NL": 2, "F32": 7 + 6 * (architecture == "qwen2")
                       + 4 * (architecture == "qwen3")}  # + q/k/v biases (Qwen2), q/k norms (Qwen3)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    want = _logits(model)
    assert float((_logits(oracle) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    read = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in [*TEXT, "<think>the  fox\n\n 9876 <|end|>"]:
        assert read(text).input_ids == tokenizer(text).input_ids
    assert (read.bos_token, read.eos_token, read.chat_template) == ("<|begin|>", "<|end|>", CHAT_TEMPLATE)
    fields = gguf.GGUFReader(str(tmp_path / "model.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == (split or "gpt-2")
    types = fields["tokenizer.ggml.token_type"].contents()
    # <|begin|>, <|end|> control, BPE tokens normal, <think> user-defined, then 4 unused [PADi] rows
    assert types == [3, 3] + [1] * 298 + [4] + [5] * 4  # <|end|> control ... <think> user-defined, then [PADi] unused


def test_a_qwen3_whose_heads_are_not_128_wide_reads_back(tmp_path):
    """Qwen3's head_dim is written as attention.key_length, which transformers' GGUF reader does not
    read for Qwen3 (it keeps the class's 128 and cannot load the file); lowbit's import reads it."""
    tokenizer = _tokenizer("qwen2")
    model = _quantized(_model("qwen3", tokenizer, head_dim=64), MIXED)
    path = tmp_path / "model.gguf"
    export_gguf(model, path, tokenizer)
    assert gguf.GGUFReader(str(path)).fields["qwen3.attention.key_length"].contents() == 64
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    back = load_gguf(path, dtype=torch.float32)
    assert back.config.head_dim == 64
    want = _logits(model)
    assert float((_logits(back) - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_phi3_is_written_with_its_fused_projections(tmp_path):
    """Phi-3 / Phi-4's fused qkv_proj (IQ4_NL here) and gate_up_proj (Q5_0) are written whole, as
    llama.cpp's attn_qkv and ffn_up (q / k rows not interleaved: Phi-3 rotates head halves, as
    llama.cpp's NEOX rope): transformers' GGUF load gives the lowbit model's logits, and so does
    lowbit's import. The sliding window is written as llama.cpp's converter writes it (0: none, as
    Phi-4), and one shorter than the context warns that llama.cpp ignores it."""
    tokenizer = _phi3_tokenizer()
    settings = {**MIXED, "overrides": {"*.mlp.down_proj": MIXED["overrides"]["*.mlp.down_proj"],
                                       "*.mlp.gate_up_proj": MIXED["overrides"]["*.mlp.up_proj"],
                                       "*.self_attn.qkv_proj": "iq4_nl"}}
    model = _quantized(_model("phi3", tokenizer), settings)
    path = tmp_path / "model.gguf"
    assert export_gguf(model, path, tokenizer) == {"IQ4_NL": 2, "Q4_0": 2, "Q5_0": 2, "Q8_0": 2, "F32": 7}
    fields = gguf.GGUFReader(str(path)).fields
    assert (fields["phi3.attention.sliding_window"].contents(), fields["phi3.rope.dimension_count"].contents()) == (
        0, 32)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    want = _logits(model)
    assert float((_logits(oracle) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((_logits(load_gguf(path, dtype=torch.float32)) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    windowed = _quantized(_model("phi3", tokenizer, sliding_window=64), settings)
    with pytest.warns(UserWarning, match=r"sliding_window 64: llama\.cpp runs Phi-3 with full attention"):
        export_gguf(windowed, tmp_path / "windowed.gguf", tokenizer)
    assert gguf.GGUFReader(str(tmp_path / "windowed.gguf")).fields["phi3.attention.sliding_window"].contents() == 64


def test_a_split_llama_cpp_has_no_name_for_is_written_as_default_with_a_warning(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    tokenizer = _tokenizer("llama-bpe")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\w+|\s+"), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    model = _quantized(_model("llama", tokenizer), MIXED)
    with pytest.warns(UserWarning, match=r"split regex .* is none llama\.cpp names; written as pre-tokenizer 'default'"):
        export_gguf(model, tmp_path / "model.gguf", tokenizer)
    assert gguf.GGUFReader(str(tmp_path / "model.gguf")).fields["tokenizer.ggml.pre"].contents() == "default"


def _file_weights(path):
    """{GGUF name: (type name, float32 weights [N, K])} as the gguf package decodes the file."""
    out = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        data = np.asarray(tensor.data)
        if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
            values = torch.from_numpy(data.copy()).view(torch.bfloat16).float()
        else:
            values = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, tensor.tensor_type), np.float32).copy())
        out[tensor.name] = (tensor.tensor_type.name, values.reshape(*reversed([int(d) for d in tensor.shape])))
    return out


def test_every_tensor_decodes_to_the_lowbit_weights_bit_for_bit(tmp_path):
    """A bfloat16 Llama with TQ2_0 (int2 symmetric, group 256), dfloat11 (BF16) and Q8_0 layers:
    the gguf package's float32 decoding of each tensor equals lowbit's float32 dequantization
    exactly (q / k rows interleaved per head); lowbit's GGUF import reads the file back with the
    same logits."""
    tokenizer = _tokenizer("llama-bpe")
    model = _model("llama", tokenizer, dtype=torch.bfloat16)
    _quantized(model, {"format": "int8", "symmetric": True, "group_size": 32, "skip": ["lm_head"],
                       "overrides": {"*.mlp.down_proj": {"format": "int2", "symmetric": True, "group_size": 256},
                                     "model.layers.1.self_attn.*": "dfloat11"}})
    path = tmp_path / "model.gguf"
    assert export_gguf(model, path, tokenizer) == {"Q8_0": 8, "TQ2_0": 2, "BF16": 6, "F32": 5}
    stored = _file_weights(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, module in model.named_modules():
        if not isinstance(module, (lowbit.QuantLinear, torch.nn.Linear, torch.nn.Embedding)):
            continue
        if isinstance(module, lowbit.QuantLinear):  # decoded in float32: d * code as llama.cpp computes it
            weight = lowbit.get_format(module.format).dequantize(dataclasses.replace(module.packed, dtype=torch.float32))
        else:
            weight = module.weight.detach().float()
        if name.endswith(("q_proj", "k_proj")):
            weight = interleaved(weight, 4 if name.endswith("q_proj") else 2)
        kind, values = stored[names.get_name(name) + ".weight"]
        assert kind == {"int8": "Q8_0", "int2": "TQ2_0", "dfloat11": "BF16"}.get(getattr(module, "format", None), "BF16")
        assert torch.equal(values, weight), name
    back = lowbit.load(path)  # bfloat16
    assert torch.equal(_logits(back), _logits(model))


def test_microscaled_layers_are_written_as_mxfp4_and_nvfp4_blocks(tmp_path):
    """mxfp4 layers as MXFP4 (E8M0 byte, nibbles), and nvfp4 ones whose tensor scale is 1 (as a GGUF
    NVFP4 import's) as NVFP4 (4 E4M3 bytes per 64 weights): the gguf package's float32 decoding
    of each equals lowbit's weights exactly (q / k rows interleaved per head), transformers' GGUF
    load of the file gives the lowbit model's logits, and lowbit's import reads the layers back in
    their formats with equal logits."""
    tokenizer = _tokenizer("llama-bpe")
    model = _quantized(_model("llama", tokenizer), {"format": "mxfp4", "skip": ["lm_head"],
                                                    "overrides": {"model.layers.1.mlp.*": "nvfp4"}})
    for name in [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]:
        packed = model.get_submodule(name).packed
        packed = dataclasses.replace(packed, tensors={**packed.tensors, "tensor_scale": torch.ones(1)})
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, lowbit.QuantLinear.from_packed(packed))
    path = tmp_path / "model.gguf"
    assert export_gguf(model, path, tokenizer) == {"MXFP4": 11, "NVFP4": 3, "F32": 7}
    stored = _file_weights(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}
    for name, module in layers.items():
        weight = lowbit.get_format(module.format).dequantize(dataclasses.replace(module.packed, dtype=torch.float32))
        if name.endswith(("q_proj", "k_proj")):
            weight = interleaved(weight, 4 if name.endswith("q_proj") else 2)
        kind, values = stored[names.get_name(name) + ".weight"]
        assert kind == module.format.upper() and torch.equal(values, weight), name
    want = _logits(model)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    assert float((_logits(oracle) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    back = load_gguf(path, dtype=torch.float32)
    assert {name: m.format for name, m in back.named_modules() if isinstance(m, lowbit.QuantLinear)} == {
        name: m.format for name, m in layers.items()}
    assert float((_logits(back) - want).abs().max()) <= 1e-5 * float(want.abs().max())


#: every GGML type lowbit imports bit for bit, and TQ1_0 (imported as int2 with zero points 1, exported as TQ2_0)
ROUND_TRIP_TYPES = ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "MXFP4", "NVFP4", "TQ2_0", "TQ1_0")


def test_a_llama_cpp_file_of_exact_types_converts_and_exports_back_byte_for_byte(tmp_path):
    """A llama.cpp-layout Llama file whose Linears hold random blocks of each exact type (random
    bytes: every code and bit pattern, llama.cpp's q / k row order, a SentencePiece vocabulary),
    through `lowbit convert` and `lowbit export`: every quantized tensor comes back in its type with
    the same bytes, except TQ1_0 (written as TQ2_0) and a TQ2_0 block whose d is 0 (imported as a
    constant group), which decode to the same weights; the tokens and their types unchanged; the embedding
    is BF16, `convert`'s dtype."""
    from lowbit.cli import main

    from .test_gguf_import import _write_gguf

    kinds = {}

    def types(name):
        if name.startswith("token_embd"):
            return None
        return kinds.setdefault(name, ROUND_TRIP_TYPES[len(kinds) % len(ROUND_TRIP_TYPES)])

    source = _write_gguf(tmp_path / "source.gguf", types, random_blocks=True, tokenizer=True)
    assert set(kinds.values()) == set(ROUND_TRIP_TYPES)
    zeroed = next(t for t in gguf.GGUFReader(str(source), "r+").tensors if kinds.get(t.name) == "TQ2_0")
    zeroed.data[0, 64:66] = 0  # the first block's float16 d (TQ2_0: 64 bytes of fields, then d)
    zeroed.data.flush()
    assert main(["convert", str(source), str(tmp_path / "lowbit")]) == 0
    assert main(["export", str(tmp_path / "lowbit"), str(tmp_path / "back.gguf")]) == 0
    before, after = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(tmp_path / "back.gguf"))
    back = {t.name: t for t in after.tensors}
    assert set(back) == {t.name for t in before.tensors}
    decoded, original = _file_weights(tmp_path / "back.gguf"), _file_weights(source)
    for tensor in before.tensors:
        if tensor.name not in kinds:
            continue
        got = back[tensor.name]
        assert got.tensor_type.name == ("TQ2_0" if kinds[tensor.name] == "TQ1_0" else kinds[tensor.name])
        if kinds[tensor.name] == "TQ1_0" or tensor.name == zeroed.name:
            assert torch.equal(decoded[tensor.name][1], original[tensor.name][1]), tensor.name
            continue
        assert np.array_equal(np.asarray(got.data), np.asarray(tensor.data)), tensor.name
    assert back["token_embd.weight"].tensor_type.name == "BF16"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.model"):
        assert after.fields[key].contents() == before.fields[key].contents(), key


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _converter_rope_freqs(theta, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py computes it for Llama 3.1 (its formula, written
    out independently of transformers): 1 for short wavelengths, `factor` for long ones, between
    them the inverse of the smoothed interpolation."""
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old_context_len / high_freq_factor:
            factors.append(1.0)
        elif wavelen > old_context_len / low_freq_factor:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors)


def test_llama3_rope_scaling_is_written_as_rope_freqs_and_read_back(tmp_path, monkeypatch):
    """Llama 3.1's RoPE scaling: the file's rope_freqs.weight is llama.cpp's converter's (an
    original context of 64 puts the 16 frequencies of a 32-wide head on all three branches), and
    lowbit's import turns it back into the llama3 config: the same logits (transformers' own GGUF
    reader ignores the tensor and runs default RoPE)."""
    from lowbit.integrations import gguf_rope

    monkeypatch.setitem(gguf_rope.LLAMA3_SHARED, "original_max_position_embeddings", 64)
    tokenizer = _tokenizer("llama-bpe")
    model = _quantized(_model("llama", tokenizer, rope_parameters=dict(LLAMA3_ROPE)), MIXED)
    path = tmp_path / "model.gguf"
    assert export_gguf(model, path, tokenizer)["F32"] == 8  # + rope_freqs
    stored = torch.from_numpy(np.array(_file_tensor(path, "rope_freqs.weight").data))
    want = _converter_rope_freqs(10000.0, 32, 8.0, 1.0, 4.0, 64)
    assert len({float(f) for f in want}) > 3 and float(want.min()) == 1.0 and float(want.max()) == 8.0
    torch.testing.assert_close(stored, want, rtol=1e-6, atol=0)
    back = load_gguf(path, dtype=torch.float32)
    assert back.config.rope_parameters["rope_type"] == "llama3"
    expected = _logits(model)
    assert float((_logits(back) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    default_rope = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                                     dtype=torch.float32)
    assert float((_logits(default_rope) - expected).abs().max()) > 1e-3 * float(expected.abs().max())


def test_rope_freqs_other_than_llama3_s_are_refused_on_import(tmp_path, monkeypatch):
    """A file whose rope_freqs lowbit cannot express as the llama3 config (here: high_freq_factor 2)
    is refused naming the tensor, rather than run with another RoPE."""
    from lowbit.integrations import gguf_rope

    monkeypatch.setitem(gguf_rope.LLAMA3_SHARED, "original_max_position_embeddings", 64)
    tokenizer = _tokenizer("llama-bpe")
    rope = {**LLAMA3_ROPE, "high_freq_factor": 2.0}
    model = _quantized(_model("llama", tokenizer, rope_parameters=rope), MIXED)
    export_gguf(model, tmp_path / "model.gguf", tokenizer)
    with pytest.raises(CheckpointError, match=r"model\.gguf: rope_freqs\.weight: rope_freqs\.weight \(16 divisors\) "
                                              r"is not Llama 3's RoPE scaling"):
        load_gguf(tmp_path / "model.gguf")


def _longrope_phi3(tokenizer, partial_rotary_factor=1.0):
    """A tiny Phi-3 with 128k-style LongRoPE: an original context of 4 (IDS' 7 tokens run on the long
    factors, 3 tokens on the short ones), distinct factors of each kind, one per rotated pair of its
    32-wide heads (16; 8 when it rotates half of each head)."""
    generator, pairs = torch.Generator().manual_seed(1), int(32 * partial_rotary_factor) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4,
            "partial_rotary_factor": partial_rotary_factor,
            "long_factor": (1 + 40 * torch.rand(pairs, generator=generator)).tolist(),
            "short_factor": (1 + 3 * torch.rand(pairs, generator=generator)).tolist()}
    return _quantized(_model("phi3", tokenizer, rope_parameters=rope, original_max_position_embeddings=4), MIXED)


@pytest.mark.parametrize("rope_type", ["default", "longrope"])
def test_a_phi3_rotating_half_of_each_head_reads_back(tmp_path, rope_type):
    """A Phi-3 whose partial_rotary_factor is 0.5 (Phi-4-mini's is 0.75): rope.dimension_count is
    the rotated 16 of its 32-wide heads, as llama.cpp's converter writes it, and lowbit's import
    reads it back (with LongRoPE's 8 factor pairs too): the model's logits, where transformers'
    reader, which ignores the key, rotates whole heads."""
    tokenizer = _phi3_tokenizer()
    if rope_type == "longrope":
        model = _longrope_phi3(tokenizer, partial_rotary_factor=0.5)
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        model = _quantized(_model("phi3", tokenizer, rope_parameters=rope), MIXED)
    path = tmp_path / "model.gguf"
    export_gguf(model, path, tokenizer)
    assert gguf.GGUFReader(str(path)).fields["phi3.rope.dimension_count"].contents() == 16
    back = load_gguf(path, dtype=torch.float32)
    assert back.config.rope_parameters["partial_rotary_factor"] == 0.5
    whole_heads = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                                    dtype=torch.float32)
    want = _logits(model)
    assert float((_logits(back) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((_logits(whole_heads) - want).abs().max()) > 1e-3 * float(want.abs().max())


def test_phi3_longrope_is_written_as_factor_tensors_and_read_back(tmp_path):
    """Phi-3's LongRoPE (the 128k models): the file holds the config's long and short factors as
    rope_factors_long / short.weight (F32), the original context and the attention factor
    sqrt(1 + ln(128 / 4) / ln(4)) (llama.cpp's converter's formula, written out here), and lowbit's
    import turns them back into the longrope config: the same logits on the long factors (7 tokens)
    and the short ones (3), where transformers' own GGUF reader ignores the tensors."""
    tokenizer = _phi3_tokenizer()
    model = _longrope_phi3(tokenizer)
    path = tmp_path / "model.gguf"
    assert export_gguf(model, path, tokenizer)["F32"] == 9  # + the two factor tensors
    parameters = model.config.rope_parameters
    for name, key in [("rope_factors_long.weight", "long_factor"), ("rope_factors_short.weight", "short_factor")]:
        stored = torch.from_numpy(np.array(_file_tensor(path, name).data))
        assert torch.equal(stored, torch.tensor(parameters[key], dtype=torch.float32)), name
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["phi3.rope.scaling.original_context_length"].contents() == 4
    assert math.isclose(fields["phi3.rope.scaling.attn_factor"].contents(), math.sqrt(1 + math.log(32) / math.log(4)),
                        rel_tol=1e-6)
    back = load_gguf(path, dtype=torch.float32)
    assert back.config.rope_parameters["rope_type"] == "longrope"
    default_rope = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf",
                                                                     dtype=torch.float32)
    for ids in (IDS, IDS[:, :3]):
        with torch.no_grad():
            expected, got, ignored = (m(ids).logits for m in (model, back, default_rope))
        assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
        assert float((ignored - expected).abs().max()) > 1e-3 * float(expected.abs().max())


def test_a_longrope_file_without_its_original_context_is_refused_on_import(tmp_path):
    """The original context decides when the long factors apply: a file without it (the key's name
    damaged) is refused naming it, rather than run with another RoPE."""
    tokenizer = _phi3_tokenizer()
    path = tmp_path / "model.gguf"
    export_gguf(_longrope_phi3(tokenizer), path, tokenizer)
    data = path.read_bytes()
    key = b"phi3.rope.scaling.original_context_length"
    assert data.count(key) == 1
    path.write_bytes(data.replace(key, key[:-1] + b"X"))
    with pytest.raises(CheckpointError, match=r"model\.gguf: rope\.scaling\.original_context_length is None, not a "
                                              r"positive count"):
        load_gguf(path)


def _file_tensor(path, name):
    return next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)


@pytest.mark.parametrize("change,message", [
    ({"quantize": {"format": "int4", "group_size": 32}}, r"model\.layers\.0\.self_attn\.q_proj: int4 .*'symmetric': "
                                                         r"False.* no GGML type that holds it bit for bit"),
    ({"quantize": {"format": "int4", "symmetric": True}}, r"q_proj: int4 .*'group_size': 128"),
    ({"quantize": {"format": "nvfp4"}}, r"q_proj: nvfp4's tensor scale .*: NVFP4 blocks have none"),
    ({"quantize": {"format": "mxfp4", "rotate": "hadamard"}}, r"q_proj: mxfp4 with act=None, rotate='hadamard': "
                                                              r"llama\.cpp multiplies plain"),
    ({"quantize": {"format": "nf4"}}, r"q_proj: nf4 .* writes int4 / int5 / int8 with symmetric=True"),
    ({"config": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     r"config\.rope_parameters\.rope_type: 'linear': GGUF export writes default RoPE, Llama's llama3"),
    ({"config": {"attention_bias": True}}, r"config\.attention_bias: True"),
    ({"config": {"use_sliding_window": True}, "architecture": "qwen2"}, r"config\.use_sliding_window: True"),
    ({"tokenizer": "wordpiece"}, r"tokenizer: a WordPiece model; GGUF export writes BPE tokenizers"),
    ({"architecture": "mistral", "config": {"sliding_window": 4096}}, r"config\.sliding_window: 4096: GGUF export "
                                                                     r"writes Mistral models with full attention"),
    ({"architecture": "gemma"}, r"model: GemmaForCausalLM \(model_type 'gemma'\): GGUF export writes \['llama', "
                                r"'mistral', 'mixtral', 'phi3', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe'\]"),
])
def test_what_gguf_cannot_hold_is_refused_by_name_and_nothing_is_written(tmp_path, change, message):
    tokenizer = _tokenizer("llama-bpe")
    if change.get("tokenizer") == "wordpiece":
        from tokenizers import Tokenizer, models, pre_tokenizers

        backend = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    if change.get("architecture") == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=32, vocab_size=len(tokenizer)))
    else:
        model = _model(change.get("architecture", "llama"), tokenizer, **change.get("config", {}))
    _quantized(model, change.get("quantize", {"format": "int8", "symmetric": True, "group_size": 32}))
    with pytest.raises(CheckpointError, match=message):
        export_gguf(model, tmp_path / "model.gguf", tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_saved_folder_that_converts_back(tmp_path, capsys):
    """`lowbit export FOLDER OUT.gguf` takes the tokenizer saved beside the model; `lowbit convert`
    of the file gives the same logits (a bfloat16 model: the import's default dtype). Without a
    tokenizer the export is refused: llama.cpp needs one in the file."""
    from lowbit.cli import main

    tokenizer = _tokenizer("llama-bpe")
    model = _quantized(_model("llama", tokenizer, dtype=torch.bfloat16), MIXED)
    lowbit.save(model, tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "out" / "model.gguf")]) == 2
    assert "no tokenizer.json beside the model" in capsys.readouterr().err
    tokenizer.save_pretrained(tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "out" / "model.gguf")]) == 0
    out = capsys.readouterr().out
    assert "(lowbit) -> " in out and "(GGUF)" in out
    assert "tensors:          2 BF16, 5 F32, 2 IQ4_NL, 8 Q4_0, 2 Q5_0, 2 Q8_0" in out
    assert main(["convert", str(tmp_path / "out" / "model.gguf"), str(tmp_path / "back")]) == 0
    assert torch.equal(_logits(lowbit.load(tmp_path / "back")), _logits(model))  # bfloat16 throughout
