"""Mixtral GGUF files (lowbit/integrations/gguf_mixtral.py): architecture "llama" with experts,
which transformers' GGUF reader cannot load. The file is a tiny MixtralForCausalLM written as
llama.cpp writes Mixtral (q / k rows interleaved, 3-D ffn_*_exps experts, llama.expert_count);
the oracle is that model with each Q8_0 weight replaced by the gguf package's decoding of it."""
import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.experts import quantized_weights
from lowbit.integrations.gguf_import import load_gguf

from .test_gguf_import import IDS, _interleaved

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

Q8_0 = gguf.GGMLQuantizationType.Q8_0
EXPERTS, LAYERS, HEADS, KV_HEADS = 4, 2, 4, 2


def _gguf_tensors(model):
    """(GGUF name, float32 array as llama.cpp stores it, the model key or None for split experts)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        block = key.split(".")[2] if key.startswith("model.layers.") else None
        if key.endswith("experts.gate_up_proj"):
            half = array.shape[1] // 2
            yield f"blk.{block}.ffn_gate_exps.weight", array[:, :half]
            yield f"blk.{block}.ffn_up_exps.weight", array[:, half:]
        elif key.endswith("experts.down_proj"):
            yield f"blk.{block}.ffn_down_exps.weight", array
        else:
            module, suffix = key.rsplit(".", 1)
            heads = HEADS if "q_proj" in key else KV_HEADS if "k_proj" in key else None
            yield f"{names.get_name(module)}.{suffix}", array if heads is None else _interleaved(array, heads)


def _write_mixtral(path, expert_used_count=2):
    """The tiny Mixtral as GGUF (Q8_0 Linears and experts, F32 embedding, norms and routers) ->
    (path, the model holding the weights llama.cpp's decoding of the file gives)."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                        num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=128,
                                        tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(EXPERTS)
    if expert_used_count is not None:
        writer.add_expert_used_count(expert_used_count)
    for name, array in _gguf_tensors(model):
        array = np.ascontiguousarray(array)
        if array.ndim >= 2 and not name.startswith("token_embd") and ".ffn_gate_inp." not in name:
            blocks = gguf.quants.quantize(array, Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with torch.no_grad():  # Q8_0 rounds each row on its own: decode the unpermuted rows
        for name, tensor in model.state_dict().items():
            if tensor.dim() >= 2 and not name.endswith(("embed_tokens.weight", "mlp.gate.weight")):
                array = tensor.float().numpy()
                tensor.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, Q8_0), Q8_0)))
    return path, model


def test_a_mixtral_file_imports_as_mixtral_with_quantized_experts(tmp_path):
    """transformers' own GGUF load builds a dense Llama (whose MLP weights the file lacks: it
    initializes them at random, with a warning); lowbit builds MixtralForCausalLM with every
    expert an int8 layer (gate rows first in gate_up) of the file's weights, and the logits equal
    the model's given those weights."""
    path, oracle = _write_mixtral(tmp_path / "mixtral.gguf")
    dense = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    assert type(dense).__name__ == "LlamaForCausalLM" and hasattr(dense.model.layers[0].mlp, "gate_proj")
    model = load_gguf(path, dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (EXPERTS, 2)
    for index in range(LAYERS):
        layers, want = quantized_weights(model.model.layers[index].mlp.experts), oracle.model.layers[index].mlp.experts
        for weight_name in ("gate_up_proj", "down_proj"):
            assert [layer.format for layer in layers[weight_name]] == ["int8"] * EXPERTS
            assert all(torch.equal(lowbit.get_format("int8").dequantize(layer.packed), getattr(want, weight_name)[e])
                       for e, layer in enumerate(layers[weight_name]))
        assert torch.equal(model.model.layers[index].mlp.gate.weight, oracle.model.layers[index].mlp.gate.weight)
        q_proj = model.model.layers[index].self_attn.q_proj  # llama.cpp's interleaving undone
        assert torch.equal(lowbit.get_format("int8").dequantize(q_proj.packed),
                           oracle.model.layers[index].self_attn.q_proj.weight)
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_a_mixtral_file_without_a_readable_expert_used_count_is_refused(tmp_path):
    path, _ = _write_mixtral(tmp_path / "mixtral.gguf", expert_used_count=None)
    with pytest.raises(CheckpointError, match=r"mixtral\.gguf: llama\.expert_used_count is None, not a positive count"):
        lowbit.load(path)
