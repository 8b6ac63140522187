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

from .gguf_files import add_llama_metadata, finish, fused_expert_tensors, interleaved
from .test_gguf_import import IDS

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

Q8_0, Q4_0, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
EXPERTS, LAYERS, HEADS, KV_HEADS = 4, 2, 4, 2


def _gguf_tensors(model, split_experts):
    """(GGUF name, float32 array as llama.cpp stores it) of every tensor of the model; each expert's
    weights as 2-D tensors of their own (blk.N.ffn_gate.E.weight, ...) as files written before
    April 2024 hold them when `split_experts`."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        experts = fused_expert_tensors(key, array)
        if experts is not None and split_experts:
            for name, stacked in experts:
                yield from ((name.replace("_exps.", f".{e}."), stacked[e]) for e in range(len(stacked)))
        elif experts is not None:
            yield from experts
        else:
            module, suffix = key.rsplit(".", 1)
            heads = HEADS if "q_proj" in key else KV_HEADS if "k_proj" in key else None
            yield f"{names.get_name(module)}.{suffix}", array if heads is None else interleaved(array, heads)


def _write_mixtral(path, expert_used_count=2, split_experts=False, types=None, edit=list, expert_count=EXPERTS):
    """The tiny Mixtral as GGUF (Q8_0 Linears and experts, F32 embedding, norms and routers; types:
    {GGUF name: GGML type} for other types; edit: applied to the [(GGUF name, array)] written) ->
    (path, the model holding the weights llama.cpp's decoding of the file gives)."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                        num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=128,
                                        tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    add_llama_metadata(writer, config, KV_HEADS)
    writer.add_expert_count(expert_count)
    if expert_used_count is not None:
        writer.add_expert_used_count(expert_used_count)
    for name, array in edit(list(_gguf_tensors(model, split_experts))):
        array = np.ascontiguousarray(array)
        kind = (types or {}).get(name, Q8_0)
        if array.ndim >= 2 and not name.startswith("token_embd") and ".ffn_gate_inp." not in name and kind != F32:
            blocks = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=kind)
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


def test_a_mixtral_file_with_a_tensor_per_expert_imports_as_one_with_3d_experts(tmp_path):
    """Files written before April 2024 hold blk.N.ffn_gate.E.weight per expert: the model lowbit
    builds from one equals, tensor for tensor, the model of the same weights stored 3-D."""
    split, _ = _write_mixtral(tmp_path / "split.gguf", split_experts=True)
    fused, _ = _write_mixtral(tmp_path / "fused.gguf")
    got, want = load_gguf(split, dtype=torch.float32), load_gguf(fused, dtype=torch.float32)
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    assert sum(".experts." in key for key in got_state) >= LAYERS * EXPERTS * 2
    assert all(torch.equal(got_state[key], want_state[key]) for key in want_state)


def test_split_experts_in_full_precision_are_stacked_like_transformers_reads_3d_ones(tmp_path):
    """F32 experts stored per expert go the full-precision way (np.asarray stacks the views)."""
    types = {f"blk.{b}.ffn_{p}.{e}.weight": F32 for b in range(LAYERS) for p in ("gate", "up", "down")
             for e in range(EXPERTS)}
    path, _ = _write_mixtral(tmp_path / "split.gguf", split_experts=True, types=types)
    stored = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}
    model = load_gguf(path, dtype=torch.float32)
    for index in range(LAYERS):
        got = model.model.layers[index].mlp.experts
        assert not quantized_weights(got)
        for e in range(EXPERTS):
            part = {p: stored[f"blk.{index}.ffn_{p}.{e}.weight"] for p in ("gate", "up", "down")}
            assert torch.equal(got.gate_up_proj[e], torch.cat([part["gate"], part["up"]]))
            assert torch.equal(got.down_proj[e], part["down"])


@pytest.mark.parametrize("damage, message", [
    ("missing", r"blk\.1\.ffn_up: expert tensors \[0, 1, 2\]: 4 experts expected, missing \[3\]"),
    ("type", r"blk\.0\.ffn_down\.2\.weight: Q4_0 \[512, 256\], but expert 0 is Q8_0"),
    ("both", r"blk\.0\.ffn_gate\.0\.weight: the file also holds blk\.0\.ffn_gate_exps\.weight"),
    ("count", r"blk\.0\.ffn_gate: expert tensors \[0, 1, 2, 3\]: 4294967295 experts expected, missing \[4, 5, 6, 7\]"),
])
def test_split_experts_llama_cpp_would_refuse_are_refused_naming_the_tensor(tmp_path, damage, message):
    """A part whose experts are not all there (or an expert count damaged into the billions: found
    by a damage run, it built a list of them), or not in one type (llama.cpp views them as one
    tensor), or stored both ways."""
    def edit(tensors):
        if damage == "both":
            tensors.append(("blk.0.ffn_gate_exps.weight", np.stack([a for n, a in tensors if "ffn_gate.0." in n] * 4)))
        return [(name, array) for name, array in tensors if damage != "missing" or name != "blk.1.ffn_up.3.weight"]

    path, _ = _write_mixtral(tmp_path / "split.gguf", split_experts=True, edit=edit,
                             expert_count=2**32 - 1 if damage == "count" else EXPERTS,
                             types={"blk.0.ffn_down.2.weight": Q4_0} if damage == "type" else None)
    with pytest.raises(CheckpointError, match=message):
        load_gguf(path)


def test_an_expert_count_damaged_into_the_billions_is_refused_for_3d_experts_too(tmp_path):
    """The model is built on the meta device with that many experts; the check that every expert
    has a layer names the first absent ones instead of listing billions (MemoryError after a minute)."""
    path, _ = _write_mixtral(tmp_path / "fused.gguf", expert_count=2**32 - 1)
    with pytest.raises(CheckpointError, match=r"gate_up_proj: no quantized layer for \['expert 4 part 0', 'expert 4 "
                                              r"part 1', 'expert 5 part 0'\]"):
        load_gguf(path)
