"""GPT-OSS GGUF files (lowbit/integrations/gguf_gpt_oss.py), which transformers cannot load. The
file is a tiny GptOssForCausalLM written as llama.cpp's converter writes one: gate_up_proj [E, H, 2I]
transposed and split into its even (gate) and odd (up) rows as ffn_gate_exps / ffn_up_exps (or kept
together as ffn_gate_up_exps, gate rows first), biases split the same way, down_proj transposed,
sinks as attn_sinks.weight, YaRN rope keys. The oracle is that model holding the gguf package's
decoding of each stored tensor."""
import warnings

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.experts import quantized_weights
from lowbit.integrations.gguf_import import load_gguf

from .gguf_files import add_llama_metadata, finish

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

T = gguf.GGMLQuantizationType
EXPERTS, LAYERS = 4, 2
IDS = torch.tensor([[1, 5, 9, 33, 2, 3, 4, 5, 6, 7], [7, 7, 0, 63, 12, 1, 1, 2, 3, 4]])  # longer than the window


def _model(seed=0):
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=256, intermediate_size=128, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=131072,
                                       sliding_window=4, tie_word_embeddings=False)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # biases, sinks and norms away from their zero / one initialization
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 or name.endswith("_bias"):
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def _stored_tensors(model, fused_gate_up):
    """(GGUF name, float32 array) of every tensor as llama.cpp's converter writes it."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, LAYERS)
    for key, value in model.state_dict().items():
        array, block = value.float().numpy(), key.split(".")[2] if key.startswith("model.layers.") else None
        if key.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")):
            kind = "bias" if key.endswith("_bias") else "weight"
            rows = array.transpose(0, 2, 1) if kind == "weight" else array  # [E, 2I, H] / [E, 2I]
            gate, up = rows[:, ::2], rows[:, 1::2]
            if fused_gate_up:
                yield f"blk.{block}.ffn_gate_up_exps.{kind}", np.concatenate([gate, up], axis=1)
            else:
                yield from ((f"blk.{block}.ffn_gate_exps.{kind}", gate), (f"blk.{block}.ffn_up_exps.{kind}", up))
        elif key.endswith("experts.down_proj"):
            yield f"blk.{block}.ffn_down_exps.weight", array.transpose(0, 2, 1)
        elif key.endswith("experts.down_proj_bias"):
            yield f"blk.{block}.ffn_down_exps.bias", array
        elif key.endswith("self_attn.sinks"):
            yield f"blk.{block}.attn_sinks.weight", array
        else:
            module, suffix = key.rsplit(".", 1)
            yield f"{names.get_name(module)}.{suffix}", array


#: merges of a byte-level BPE vocabulary as llama.cpp writes GPT-OSS's (o200k, pre-tokenizer "gpt-4o")
MERGES = ["Ġ t", "h e", "Ġt he", "3 4"]
CHAT_TEMPLATE = "{% for m in messages %}<|start|>{{ m['content'] }}<|end|>{% endfor %}"


def _add_tokenizer(writer):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelled = bytes_to_unicode()  # byte -> the character byte-level BPE spells it with
    tokens = [spelled[byte] for byte in range(256)] + ["Ġt", "he", "Ġthe", "34", "<|start|>", "<|end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 260 + [3, 3])  # normal, then control
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(260)
    writer.add_eos_token_id(261)
    writer.add_chat_template(CHAT_TEMPLATE)


def _write(path, experts=T.MXFP4, linears=T.Q8_0, fused_gate_up=False, types=None, drop=(), rope_type="yarn",
           tokenizer=False):
    """The tiny GPT-OSS as GGUF (experts in `experts`, attention and output Linears in `linears`,
    `types`: {GGUF name: type} besides; embedding, router, biases, sinks and norms F32; tensors
    named in `drop` left out; tokenizer: _add_tokenizer's metadata) -> (path, the model holding the
    weights the file decodes to)."""
    model = _model()
    config = model.config
    writer = gguf.GGUFWriter(str(path), "gpt-oss")
    add_llama_metadata(writer, config, config.num_key_value_heads, vocab_size=False)  # read from token_embd
    if tokenizer:
        _add_tokenizer(writer)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_string("gpt-oss.rope.scaling.type", rope_type)
    writer.add_rope_scaling_factor(config.rope_parameters["factor"])
    writer.add_rope_scaling_orig_ctx_len(config.rope_parameters["original_max_position_embeddings"])
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_sliding_window(config.sliding_window)
    decoded = {}
    for name, array in _stored_tensors(model, fused_gate_up):
        if name in drop:
            continue
        array = np.ascontiguousarray(array, dtype=np.float32)
        kind = (types or {}).get(name, experts if "_exps.weight" in name else linears if (
            array.ndim == 2 and name.endswith(".weight") and not name.startswith("token_embd")
            and ".ffn_gate_inp." not in name) else T.F32)
        if kind == T.F32:
            writer.add_tensor(name, array)
            decoded[name] = array
        else:
            blocks = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=kind)
            decoded[name] = gguf.quants.dequantize(blocks, kind)
    finish(writer)
    with torch.no_grad():  # the model holding the decoded weights
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, LAYERS)
        for key, value in model.state_dict().items():
            if ".experts." not in key:
                module, suffix = key.rsplit(".", 1)
                name = (f"blk.{key.split('.')[2]}.attn_sinks.weight" if suffix == "sinks"
                        else f"{names.get_name(module)}.{suffix}")
                value.copy_(torch.from_numpy(decoded[name].reshape(value.shape)))
        for index, layer in enumerate(model.model.layers):
            if not drop:  # (a damaged file has no model)
                _set_experts(layer.mlp.experts, decoded, index, fused_gate_up)
    return path, model


def _set_experts(experts, decoded, block, fused_gate_up):
    parts = {}
    for kind in ("weight", "bias"):
        if fused_gate_up:
            both = torch.from_numpy(decoded[f"blk.{block}.ffn_gate_up_exps.{kind}"])
            parts[kind] = both.chunk(2, dim=1)
        else:
            parts[kind] = [torch.from_numpy(decoded[f"blk.{block}.ffn_{p}_exps.{kind}"]) for p in ("gate", "up")]
    gate, up = parts["weight"]
    rows = torch.stack([gate, up], dim=2).flatten(1, 2)  # gate row i at 2i, up row i at 2i + 1
    experts.gate_up_proj.copy_(rows.transpose(1, 2))
    experts.gate_up_proj_bias.copy_(torch.stack(parts["bias"], dim=2).flatten(1, 2))
    experts.down_proj.copy_(torch.from_numpy(decoded[f"blk.{block}.ffn_down_exps.weight"]).transpose(1, 2))
    experts.down_proj_bias.copy_(torch.from_numpy(decoded[f"blk.{block}.ffn_down_exps.bias"]))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("experts,fmt", [(T.MXFP4, "mxfp4"), (T.Q8_0, "int8"), (T.Q4_0, "int4")])
def test_gpt_oss_files_import_with_quantized_experts_and_the_model_s_logits(tmp_path, experts, fmt):
    """(transformers 5.23 cannot load the file: its metadata reader fails on the YaRN keys.) lowbit builds
    GptOssForCausalLM with the file's config, every expert a `fmt` layer whose rows are gate and
    up interleaved as GptOssExperts holds them, equal to the file's weights, and the logits of the
    model holding those weights."""
    path, oracle = _write(tmp_path / "gpt-oss.gguf", experts=experts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor placed, every Linear quantized
        model = load_gguf(path, dtype=torch.float32)
    assert type(model).__name__ == "GptOssForCausalLM"
    config = model.config
    assert (config.head_dim, config.sliding_window, config.num_local_experts, config.num_experts_per_tok,
            config.vocab_size) == (64, 4, 4, 2, 64)
    assert config.rope_parameters == oracle.config.rope_parameters  # YaRN, and GPT-OSS's truncate=False
    for index in range(LAYERS):
        got, want = model.model.layers[index].mlp.experts, oracle.model.layers[index].mlp.experts
        layers = quantized_weights(got)
        for weight_name in ("gate_up_proj", "down_proj"):
            assert [layer.format for layer in layers[weight_name]] == [fmt] * EXPERTS
            for e, layer in enumerate(layers[weight_name]):
                assert torch.equal(lowbit.get_format(fmt).dequantize(layer.packed), getattr(want, weight_name)[e].t())
        assert torch.equal(got.gate_up_proj_bias, want.gate_up_proj_bias)
        assert torch.equal(got.down_proj_bias, want.down_proj_bias)
        assert torch.equal(model.model.layers[index].self_attn.sinks, oracle.model.layers[index].self_attn.sinks)
    got, want = _logits(model), _logits(oracle)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_gate_and_up_stored_together_import_as_stored_apart(tmp_path):
    """Newer llama.cpp may write ffn_gate_up_exps [E, 2I, H] (gate rows first) instead."""
    apart, _ = _write(tmp_path / "apart.gguf")
    together, _ = _write(tmp_path / "together.gguf", fused_gate_up=True)
    got, want = load_gguf(together, dtype=torch.float32).state_dict(), load_gguf(apart, dtype=torch.float32).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)


def test_gate_and_up_in_types_that_do_not_stack_are_decoded_with_a_warning(tmp_path):
    """A Q4_0 gate beside a Q8_0 up: one expert's interleaved rows cannot be one lowbit layer."""
    path, oracle = _write(tmp_path / "mixed.gguf", experts=T.Q8_0, types={"blk.0.ffn_gate_exps.weight": T.Q4_0})
    with pytest.warns(UserWarning, match=r"2 quantized Linear weights kept as torch\.float32 \(\{'Q4_0 experts stored "
                                         r"with parts lowbit cannot stack': 1, 'Q8_0 experts stored with parts"):
        model = load_gguf(path, dtype=torch.float32)
    experts, want = model.model.layers[0].mlp.experts, oracle.model.layers[0].mlp.experts
    assert list(quantized_weights(experts)) == ["down_proj"]
    assert torch.equal(experts.gate_up_proj, want.gate_up_proj)
    got, want = _logits(model), _logits(oracle)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_a_gpt_oss_file_converts_with_its_tokenizer(tmp_path, capsys):
    """transformers' AutoTokenizer fails on the file in 5.24 (it reads the model config first, a
    TypeError; 5.23 builds it); `lowbit convert` writes the tokenizer the file holds: ids as the
    file's merges give them after GPT-4o's split, which cuts digits in threes (so "3 4" does not
    merge across "123|456"), control tokens whole, the chat template kept."""
    from lowbit.cli import main

    path, _ = _write(tmp_path / "gpt-oss.gguf", tokenizer=True)
    assert main(["convert", str(path), str(tmp_path / "lowbit")]) == 0
    assert "copied along:     chat_template.jinja, tokenizer.json, tokenizer_config.json" in capsys.readouterr().out
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "lowbit")
    t, he, space_the, start, end = 116, 257, 258, 260, 261
    digits = [ord(d) for d in "123456"]  # the ids of the digits' bytes
    assert tokenizer("<|start|>the the123456<|end|>").input_ids == [start, t, he, space_the, *digits, end]
    assert tokenizer("the 34").input_ids == [t, he, ord(" "), 259]  # "3 4" merges within a group
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|start|>", "<|end|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_an_imported_gpt_oss_model_round_trips_through_lowbit_save(tmp_path):
    path, _ = _write(tmp_path / "gpt-oss.gguf")
    model = load_gguf(path, dtype=torch.float32)
    lowbit.save(model, tmp_path / "saved")
    assert torch.equal(_logits(lowbit.load(tmp_path / "saved")), _logits(model))


@pytest.mark.parametrize("damage,message", [
    ({"drop": ("blk.1.ffn_up_exps.weight",)}, r"gguf: model\.layers\.1\.mlp\.experts\.gate_up_proj: its expert tensors "
                                              r"\['blk\.1\.ffn_gate_exps\.weight'\] give 128 rows for its 256"),
    ({"rope_type": "longrope"}, r"gpt-oss\.rope\.scaling\.type 'longrope': lowbit maps only 'yarn'"),
])
def test_gpt_oss_files_lowbit_cannot_map_are_refused_naming_the_tensor_or_key(tmp_path, damage, message):
    path, _ = _write(tmp_path / "gpt-oss.gguf", **damage)
    with pytest.raises(CheckpointError, match=message):
        load_gguf(path)
