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

from .gguf_files import add_llama_metadata, finish, fused_expert_tensors
from .test_gguf_import import IDS, _interleaved

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

Q8_0 = gguf.GGMLQuantizationType.Q8_0
EXPERTS, LAYERS, HEADS, KV_HEADS = 4, 2, 4, 2


def _gguf_tensors(model):
    """(GGUF name, float32 array as llama.cpp stores it) of every tensor of the model."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        experts = fused_expert_tensors(key, array)
        if experts is not None:
            yield from experts
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
    add_llama_metadata(writer, config, KV_HEADS)
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
    finish(writer)
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
