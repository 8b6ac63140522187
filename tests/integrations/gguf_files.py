"""Shared steps of the GGUF test files' writers (the `gguf` package's GGUFWriter)."""
import numpy as np


def add_llama_metadata(writer, config, kv_heads, vocab_size=True):
    """The sizes llama.cpp writes for a Llama-shaped `config` (kv_heads: the head_count_kv written;
    vocab_size: whether to write it, or leave the reader to count the embedding's rows)."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if vocab_size:
        writer.add_vocab_size(config.vocab_size)


def interleaved(rows, heads):
    """llama.cpp's converter's permute of Llama's q / k rows (convert_hf_to_gguf.py; transformers'
    GGUF loading reverts it)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def fused_expert_tensors(key: str, array: np.ndarray):
    """[(GGUF name, array)] of a model's fused expert weight `key` as llama.cpp stores it
    (gate_up_proj [E, 2I, H] -> ffn_gate_exps and ffn_up_exps [E, I, H]; down_proj ->
    ffn_down_exps), None for any other key."""
    if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return None
    block = key.split(".")[2]  # model.layers.N.
    if key.endswith("experts.gate_up_proj"):
        half = array.shape[1] // 2
        return [(f"blk.{block}.ffn_gate_exps.weight", array[:, :half]),
                (f"blk.{block}.ffn_up_exps.weight", array[:, half:])]
    return [(f"blk.{block}.ffn_down_exps.weight", array)]


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
