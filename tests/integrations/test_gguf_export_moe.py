"""GGUF export of MoE models (lowbit/integrations/gguf_export.py): Mixtral (llama.cpp's "llama"
with experts), Qwen2-MoE and Qwen3-MoE, their experts as llama.cpp stores them (one 3-D
ffn_gate_exps / ffn_up_exps / ffn_down_exps tensor per block).

Oracles that share no code with the exporter: transformers' from_pretrained(..., gguf_file=...)
for the Qwen-MoE files (it cannot read Mixtral files), and the gguf package's reader and
dequantizer for each expert tensor's bytes. lowbit's GGUF import, tested on llama.cpp-layout files
of the tests' own making (test_gguf_mixtral.py, test_gguf_experts.py), reads every file back."""
import dataclasses

import pytest
import torch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.experts import quantized_weights
from lowbit.integrations.gguf_export import export_gguf
from lowbit.integrations.gguf_import import load_gguf

from .gguf_files import interleaved
from .test_gguf_export import _file_weights, _logits, _quantized, _tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

EXPERTS, LAYERS, HEADS, KV_HEADS = 4, 2, 4, 2
#: the experts' and the attention's formats: gate_up Q4_0, down Q8_0, attention Q4_0, Qwen2-MoE's
#: shared expert Q5_0 and its gate [1, H] (quantized too) written as llama.cpp's 1-D F32 tensor
QUANTIZED = {"format": "int4", "symmetric": True, "group_size": 32, "skip": ["lm_head"],
             "overrides": {"*.experts.down_proj": {"format": "int8", "symmetric": True, "group_size": 32},
                           "*.shared_expert.*": {"format": "int5", "symmetric": True, "group_size": 32}}}


def _moe_model(model_type: str, tokenizer, dtype=torch.float32, **config):
    """A tiny MoE causal LM of 4 experts, 2 per token; the Qwen-MoE experts keep their config
    class's widths (768; Qwen2-MoE's 1408 and shared 5632), which transformers' GGUF reader
    assumes (it reads no expert width from the file)."""
    sizes = dict(vocab_size=len(tokenizer) + 4, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_experts_per_tok=2,
                 max_position_embeddings=128)
    if model_type == "mixtral":
        config_class, sizes["num_local_experts"] = transformers.MixtralConfig, EXPERTS
    else:
        config_class, sizes["num_experts"] = {"qwen2_moe": transformers.Qwen2MoeConfig,
                                              "qwen3_moe": transformers.Qwen3MoeConfig}[model_type], EXPERTS
        sizes["norm_topk_prob"] = model_type == "qwen3_moe"  # as llama.cpp's graphs compute
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config_class(**{**sizes, **config}), dtype=dtype).eval()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
def test_transformers_reads_the_exported_qwen_moe_file_as_the_quantized_model(tmp_path, model_type):
    """Q4_0 / Q8_0 experts stored as 3-D tensors [E, I, H] with the file's expert count, experts per
    token and widths: transformers' GGUF load of the file gives the lowbit model's logits, and so
    does lowbit's import."""
    tokenizer = _tokenizer("qwen2")
    model = _quantized(_moe_model(model_type, tokenizer), QUANTIZED)
    path = tmp_path / "model.gguf"
    written = export_gguf(model, path, tokenizer)
    # per block: q / k / v / o + gate and up experts Q4_0, down experts Q8_0; F32 embedding, lm_head,
    # final norm, and per block two norms and the router, + q / k norms (Qwen3) or q / k / v biases,
    # the shared expert's gate (Qwen2)
    qwen2 = model_type == "qwen2_moe"
    assert written == {"Q4_0": 6 * LAYERS, "Q8_0": LAYERS, "F32": 3 + LAYERS * (5 + 2 * qwen2), **(
        {"Q5_0": 3 * LAYERS} if qwen2 else {})}
    reader = gguf.GGUFReader(str(path))
    architecture = model_type.replace("_", "")
    fields = {key: reader.fields[f"{architecture}.{key}"].contents() for key in
              ("expert_count", "expert_used_count", "expert_feed_forward_length")}
    assert fields == {"expert_count": EXPERTS, "expert_used_count": 2,
                      "expert_feed_forward_length": model.config.moe_intermediate_size}
    shapes = {t.name: [int(d) for d in reversed(t.shape)] for t in reader.tensors}
    width, hidden = model.config.moe_intermediate_size, model.config.hidden_size
    assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == [EXPERTS, width, hidden]
    assert shapes["blk.1.ffn_down_exps.weight"] == [EXPERTS, hidden, width]
    if qwen2:
        assert reader.fields["qwen2moe.expert_shared_feed_forward_length"].contents() == \
            model.config.shared_expert_intermediate_size
        assert shapes["blk.1.ffn_gate_inp_shexp.weight"] == [hidden]
    want = _logits(model)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    assert float((_logits(oracle) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((_logits(load_gguf(path, dtype=torch.float32)) - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_mixtral_experts_decode_to_the_lowbit_weights_bit_for_bit(tmp_path):
    """A bfloat16 Mixtral (llama.cpp's "llama" with llama.expert_count): block 0's experts Q8_0
    (gate_up) and dfloat11 (down, written BF16), block 1's left in full precision (BF16), the
    attention Q4_0. The gguf package's float32 decoding of each expert tensor equals lowbit's
    float32 weights of every expert (gate rows, then up rows of gate_up_proj), the routers are
    F32 (the embedding and lm_head BF16), and lowbit's import reads the file back as Mixtral with the same logits."""
    tokenizer = _tokenizer("llama-bpe")
    model = _quantized(_moe_model("mixtral", tokenizer, dtype=torch.bfloat16), {
        "format": "int4", "symmetric": True, "group_size": 32, "skip": ["lm_head", "model.layers.1.mlp.experts.*"],
        "overrides": {"*.experts.gate_up_proj": {"format": "int8", "symmetric": True, "group_size": 32},
                      "*.experts.down_proj": "dfloat11"}})
    path = tmp_path / "model.gguf"
    assert export_gguf(model, path, tokenizer) == {"Q4_0": 4 * LAYERS, "Q8_0": 2, "BF16": 6, "F32": 1 + 3 * LAYERS}
    assert gguf.GGUFReader(str(path)).fields["llama.expert_count"].contents() == EXPERTS
    stored = _file_weights(path)
    for block in range(LAYERS):
        experts = model.model.layers[block].mlp.experts
        layers = quantized_weights(experts)
        for weight_name in ("gate_up_proj", "down_proj"):
            if weight_name in layers:  # float32 decoding: d * code as llama.cpp computes it
                weight = torch.stack([lowbit.get_format(m.format).dequantize(
                    dataclasses.replace(m.packed, dtype=torch.float32)) for m in layers[weight_name]])
            else:
                weight = getattr(experts, weight_name).detach().float()
            parts = ("gate", "up") if weight_name == "gate_up_proj" else ("down",)
            for part, rows in zip(parts, weight.chunk(len(parts), dim=1)):
                kind, values = stored[f"blk.{block}.ffn_{part}_exps.weight"]
                assert kind == ("BF16" if block == 1 or part == "down" else "Q8_0")
                assert torch.equal(values, rows), (block, part)
        kind, router = stored[f"blk.{block}.ffn_gate_inp.weight"]
        assert kind == "F32" and torch.equal(router, model.model.layers[block].mlp.gate.weight.float())
        kind, q = stored[f"blk.{block}.attn_q.weight"]
        q_proj = model.model.layers[block].self_attn.q_proj
        want = lowbit.get_format(q_proj.format).dequantize(dataclasses.replace(q_proj.packed, dtype=torch.float32))
        assert kind == "Q4_0" and torch.equal(q, interleaved(want, HEADS))
    back = lowbit.load(path)  # bfloat16
    assert isinstance(back, transformers.MixtralForCausalLM)
    assert torch.equal(_logits(back), _logits(model))


def _experts_in_two_formats(model):
    """Block 0's down experts: expert 1 re-quantized as int5 (Q5_0) beside the others' Q8_0."""
    layers = quantized_weights(model.model.layers[0].mlp.experts)["down_proj"]
    weight = lowbit.get_format(layers[1].format).dequantize(layers[1].packed)
    layers[1] = lowbit.QuantLinear.from_packed(lowbit.get_format("int5").quantize(weight, symmetric=True,
                                                                                   group_size=32))


@pytest.mark.parametrize("model_type,config,damage,message", [
    ("qwen3_moe", {"norm_topk_prob": False}, None,
     r"config\.norm_topk_prob: False: llama\.cpp's qwen3_moe renormalizes the chosen experts' routing weights"),
    ("qwen2_moe", {"norm_topk_prob": True}, None, r"config\.norm_topk_prob: True: .* does not renormalize"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, None, r"config\.mlp_only_layers: \[1\] .* has experts in every layer"),
    ("mixtral", {"sliding_window": 64}, None, r"config\.sliding_window: 64: GGUF export writes Mixtral models"),
    ("mixtral", {}, _experts_in_two_formats, r"model\.layers\.0\.mlp\.experts\.down_proj: its experts would be "
                                             r"written as \['Q5_0', 'Q8_0'\]; llama\.cpp's expert tensor holds"),
])
def test_moe_models_llama_cpp_would_run_otherwise_are_refused_and_nothing_is_written(tmp_path, model_type, config,
                                                                                      damage, message):
    tokenizer = _tokenizer("llama-bpe")
    model = _quantized(_moe_model(model_type, tokenizer, **config), QUANTIZED)
    if damage is not None:
        damage(model)
    with pytest.raises(CheckpointError, match=message):
        export_gguf(model, tmp_path / "model.gguf", tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_saved_moe_folder_that_converts_back(tmp_path, capsys):
    """`lowbit export` of a saved bfloat16 Qwen3-MoE (the experts reloaded from lowbit.save's folder)
    then `lowbit convert` of the file: the same logits (embedding and lm_head BF16; norms, q / k norms and
    routers F32)."""
    from lowbit.cli import main

    tokenizer = _tokenizer("qwen2")
    model = _quantized(_moe_model("qwen3_moe", tokenizer, dtype=torch.bfloat16), QUANTIZED)
    lowbit.save(model, tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "model.gguf")]) == 0
    out = capsys.readouterr().out
    assert f"tensors:          2 BF16, {1 + 5 * LAYERS} F32, {6 * LAYERS} Q4_0, {LAYERS} Q8_0" in out
    assert main(["convert", str(tmp_path / "model.gguf"), str(tmp_path / "back")]) == 0
    assert torch.equal(_logits(lowbit.load(tmp_path / "back")), _logits(model))  # bfloat16 throughout
