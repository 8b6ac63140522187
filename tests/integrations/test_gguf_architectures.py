"""GGUF imports of architectures other than Llama (whose file layout test_gguf_import.py covers in
depth): tiny Qwen2, Qwen3, Gemma 2, Gemma 3 and StableLM models written with the `gguf`
package's writer under llama.cpp's tensor names, Q8_0 Linears, against transformers'
from_pretrained(..., gguf_file=...)."""
import numpy as np
import pytest
import torch

import lowbit
from lowbit.integrations.gguf_import import load_gguf

from .gguf_files import finish
from .test_gguf_import import IDS

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
#: transformers' GGUF reader leaves head_dim at the config's default for these (Qwen3's is 128)
ARCHITECTURES = {
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=128),
    # llama.cpp's Gemma 2 has no output tensor: its lm_head is the embedding
    "gemma2": lambda: transformers.Gemma2Config(**{**COMMON, "tie_word_embeddings": True}, head_dim=64),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=64),
    "stablelm": lambda: transformers.StableLmConfig(**COMMON),
}


def _write(path, architecture):
    """A tiny model of `architecture` (a GGUF architecture name) as GGUF: 2-D weights whose K is
    a multiple of 32 in Q8_0 (the embedding and norms in F32). -> (path, the number of Q8_0 Linears)."""
    torch.manual_seed(0)
    config = ARCHITECTURES[architecture]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim if hasattr(config, "head_dim") else 64)
    writer.add_value_length(config.head_dim if hasattr(config, "head_dim") else 64)
    writer.add_rope_dimension_count(64)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_layer_norm_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    names, quantized = gguf.get_tensor_name_map(arch, config.num_hidden_layers), 0
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        array = np.ascontiguousarray(value.float().numpy())
        if array.ndim == 2 and not name.startswith("token_embd"):
            blocks = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(name, array)
    finish(writer)
    return path, quantized


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_each_architecture_imports_as_transformers_reads_it(tmp_path, architecture):
    """Every Q8_0 Linear becomes an int8 layer of transformers' weights (Gemma's norms, stored
    as llama.cpp stores them, go through transformers' processor as every dense tensor does),
    and the logits are equal."""
    path, quantized = _write(tmp_path / f"{architecture}.gguf", architecture)
    model = load_gguf(path, dtype=torch.float32)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}
    assert len(layers) == quantized and {m.format for m in layers.values()} == {"int8"}
    for name, layer in layers.items():
        want = oracle.get_submodule(name).weight.detach()
        assert torch.equal(lowbit.get_format(layer.packed.format).dequantize(layer.packed), want), name
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, oracle(IDS).logits)
