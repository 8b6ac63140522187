"""Importing the MoE experts of GGUF files: llama.cpp stores each fused expert weight as one 3-D
tensor (blk.N.ffn_gate_exps / ffn_up_exps / ffn_down_exps, [E, N, K] row-major blocks), and
lowbit makes each expert's slice a QuantLinear of the model's quantized experts (gate and up
rows stacked as transformers' gate_up_proj holds them). The files are tiny Qwen3-MoE (and one
Qwen2-MoE) models written with the `gguf` package's GGUFWriter; the oracle is transformers' from_pretrained(...,
gguf_file=...)."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import lowbit
from lowbit.errors import CheckpointError
from lowbit.experts import QuantizedExperts, quantized_weights
from lowbit.integrations import gguf_blocks, gguf_import
from lowbit.integrations.gguf_import import load_gguf

from ..damage import loads_and_runs_or_refuses
from .gguf_files import finish, fused_expert_tensors
from .test_gguf_import import EXACT, IDS, QUANTIZABLE, _random_blocks, _transformers_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

T = gguf.GGMLQuantizationType
EXPERTS, LAYERS = 4, 2
#: the experts' (and Qwen2-MoE's shared expert's) width: their config classes' defaults, which
#: transformers' GGUF reader leaves in place (lowbit reads the file's); Qwen2-MoE's 1408 is not a
#: multiple of the K types' 256-weight blocks: its files are Q8_0
MOE_INTERMEDIATE = {"qwen3moe": 768, "qwen2moe": 1408}


def _config(arch, widths=None):
    """widths: {moe_intermediate_size / shared_expert_intermediate_size: value} besides the defaults."""
    common = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=EXPERTS, num_experts_per_tok=2,
                  max_position_embeddings=128, tie_word_embeddings=False)
    common.update({"moe_intermediate_size": MOE_INTERMEDIATE[arch], **(widths or {})})
    if arch == "qwen2moe":
        return transformers.Qwen2MoeConfig(**common)
    return transformers.Qwen3MoeConfig(**common, head_dim=64, norm_topk_prob=True)


def _gguf_tensors(model, arch):
    """(GGUF name, float32 array) of every tensor of a Qwen2 / Qwen3-MoE model, as llama.cpp's
    converter names them: a layer's fused gate_up_proj [E, 2I, H] is ffn_gate_exps and
    ffn_up_exps [E, I, H]; Qwen2-MoE's shared expert gate [1, H] is stored 1-D."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE if arch == "qwen3moe" else gguf.MODEL_ARCH.QWEN2MOE,
                                     LAYERS)
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        experts = fused_expert_tensors(key, array)
        if experts is not None:
            yield from experts
        elif key.endswith("shared_expert_gate.weight"):
            yield f"blk.{key.split('.')[2]}.ffn_gate_inp_shexp.weight", array[0]
        else:
            module, suffix = key.rsplit(".", 1)
            yield f"{names.get_name(module)}.{suffix}", array


def _write_moe_gguf(path, types, arch="qwen3moe", seed=0, widths=None):
    """A tiny Qwen3-MoE (or Qwen2-MoE) model written as GGUF; types(gguf_name) -> the GGML type
    name of a 2-D or 3-D weight (the routers stay F32), or None to store it as F32 (the types the
    gguf package quantizes come from its quantizer, the others are random blocks); widths: as
    _config's. Returns the path."""
    torch.manual_seed(seed)
    config = _config(arch, widths)
    model = transformers.AutoModelForCausalLM.from_config(config)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if arch == "qwen3moe":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(config.num_experts_per_tok)
    for name, array in _gguf_tensors(model, arch):
        array = np.ascontiguousarray(array)
        router = name.split(".")[-2] == "ffn_gate_inp"
        kind = types(name) if array.ndim >= 2 and not name.startswith("token_embd") and not router else None
        if kind is None:
            writer.add_tensor(name, array)
            continue
        if kind in QUANTIZABLE:
            blocks = gguf.quants.quantize(array, getattr(T, kind))
        else:
            rows = array.reshape(-1, array.shape[-1])
            blocks = _random_blocks(kind, *rows.shape, rng).reshape(*array.shape[:-1], -1)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=getattr(T, kind))
    finish(writer)
    return path


def _dequantized(layer):
    return lowbit.get_format(layer.packed.format).dequantize(layer.packed)


def _close(got, want, exact):
    """Equal for the exact types; within float16 rounding of group scales (2^-9 of the largest
    weight, as test_gguf_import's bound) for the others."""
    if exact:
        return torch.equal(got, want)
    return float((got - want).abs().max()) <= 2.0 ** -9 * float(want.abs().max())


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "IQ4_NL", "MXFP4", "NVFP4", "Q4_K", "Q6_K", "IQ4_XS"])
def test_gguf_experts_import_as_transformers_reads_them(tmp_path, kind):
    """Every expert of every fused weight becomes a QuantLinear of the model's quantized experts
    (gate_up: [2 * 768, 256], gate rows first; down: [256, 768]) whose weights equal transformers'
    GGUF load (exact types) or lie within float16 rounding of the group scales; the router and the
    other tensors are equal, and the logits agree."""
    path = _write_moe_gguf(tmp_path / "moe.gguf", lambda name: kind)
    model, oracle = load_gguf(path, dtype=torch.float32), _transformers_gguf(path)
    exact, info = kind in EXACT, gguf_blocks.BLOCK_TYPES[kind]
    assert gguf_import.target_format(path) == info.lowbit_format
    for index in range(LAYERS):
        experts, want = model.model.layers[index].mlp.experts, oracle.model.layers[index].mlp.experts
        assert isinstance(experts, QuantizedExperts)
        layers = quantized_weights(experts)
        assert sorted(layers) == ["down_proj", "gate_up_proj"]
        for weight_name, (n, k) in {"gate_up_proj": (2 * MOE_INTERMEDIATE["qwen3moe"], 256),
                                    "down_proj": (256, MOE_INTERMEDIATE["qwen3moe"])}.items():
            assert len(layers[weight_name]) == EXPERTS
            for expert, layer in enumerate(layers[weight_name]):
                assert (layer.out_features, layer.in_features, layer.format) == (n, k, info.lowbit_format)
                assert _close(_dequantized(layer), getattr(want, weight_name)[expert].detach(), exact), (
                    index, weight_name, expert)
    quantized_names = [n for n, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)]
    assert len(quantized_names) == LAYERS * (4 + 2 * EXPERTS) + 1  # attention, experts, lm_head
    oracle_state = oracle.state_dict()
    dense = {k: v for k, v in model.state_dict().items() if k in oracle_state and ".quantized." not in k
             and not any(k.startswith(f"{n}.") for n in quantized_names)}
    assert "model.layers.0.mlp.gate.weight" in dense  # the router stays as the file stores it
    assert all(torch.equal(v, oracle_state[k]) for k, v in dense.items())
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
    # exact types: float32 summation order only (lowbit runs each expert's tokens as one batch,
    # transformers otherwise: 3e-7 relative seen); random K-type blocks make weights of ~1e2, whose
    # scale rounding shows in the logits
    assert float((got - want).abs().max()) <= (1e-5 if exact else 1e-3) * float(want.abs().max())


def _q4_k_m(name):
    """llama.cpp's Q4_K_M mix, in short: Q6_K for v and down projections (experts' too), Q4_K else."""
    return "Q6_K" if name.endswith(("attn_v.weight", "ffn_down_exps.weight")) else "Q4_K"


def test_a_q4_k_m_moe_file_imports_every_expert_and_round_trips_through_save(tmp_path):
    """A Q4_K_M-style MoE file loads with no warning: experts' gate_up int4 in groups of 32, down
    int6 in groups of 16; the model saves with lowbit.save and loads back with equal logits."""
    path = _write_moe_gguf(tmp_path / "mix.gguf", _q4_k_m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_gguf(path, dtype=torch.float32)
    assert gguf_import.target_format(path) == "int4/int6"
    layers = quantized_weights(model.model.layers[1].mlp.experts)
    assert {(m.format, m.packed.attrs["group_size"]) for m in layers["gate_up_proj"]} == {("int4", 32)}
    assert {(m.format, m.packed.attrs["group_size"]) for m in layers["down_proj"]} == {("int6", 16)}
    lowbit.save(model, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "saved")(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("gate,up", [("Q4_K", "Q6_K"), ("Q8_0", "IQ2_XXS")])
def test_experts_whose_gate_and_up_lowbit_cannot_stack_are_decoded_with_a_warning(tmp_path, gate, up):
    """A fused gate_up weight whose gate and up are stored in different layouts (int4 and int6) or
    partly in a type lowbit has no layout for is decoded to the model dtype as transformers
    decodes it, with a warning; the experts' down weights are still quantized."""
    def types(name):
        return gate if "ffn_gate_exps" in name else up if "ffn_up_exps" in name else "Q8_0"

    path = _write_moe_gguf(tmp_path / "mixed.gguf", types)
    with pytest.warns(UserWarning, match=rf"4 quantized Linear weights kept as torch\.float32 .*'{up}"):
        model = load_gguf(path, dtype=torch.float32)
    oracle = _transformers_gguf(path)
    for index in range(LAYERS):
        experts, want = model.model.layers[index].mlp.experts, oracle.model.layers[index].mlp.experts
        assert sorted(quantized_weights(experts)) == ["down_proj"]
        assert torch.equal(experts.gate_up_proj, want.gate_up_proj)
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
    assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())


def test_qwen2_moe_experts_and_shared_expert(tmp_path):
    """A Qwen2-MoE file (experts of 1408 rows, a shared expert and its 1-D gate) in Q8_0: the
    experts and the shared expert's Linears are quantized with transformers' weights, the logits agree."""
    path = _write_moe_gguf(tmp_path / "qwen2.gguf", lambda name: "Q8_0", arch="qwen2moe")
    model, oracle = load_gguf(path, dtype=torch.float32), _transformers_gguf(path)
    for index in range(LAYERS):
        mlp, want = model.model.layers[index].mlp, oracle.model.layers[index].mlp
        layers = quantized_weights(mlp.experts)
        for weight_name in ("gate_up_proj", "down_proj"):
            assert [torch.equal(_dequantized(layer), getattr(want.experts, weight_name)[expert])
                    for expert, layer in enumerate(layers[weight_name])] == [True] * EXPERTS
        assert torch.equal(_dequantized(mlp.shared_expert.down_proj), want.shared_expert.down_proj.weight)
        assert torch.equal(mlp.shared_expert_gate.weight, want.shared_expert_gate.weight)
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_q8_0_experts_export_to_compressed_tensors_per_expert(tmp_path):
    """A Q8_0 MoE import exports as compressed-tensors with each expert's gate / up / down a Linear of
    its own (as llm-compressor writes them; GGUF's fused tensors would otherwise be written fused),
    and loads back with equal logits. (K-type imports have zero points that are not integers,
    which compressed-tensors does not store: refused, naming the layer.)"""
    model = load_gguf(_write_moe_gguf(tmp_path / "q8.gguf", lambda name: "Q8_0"), dtype=torch.float32)
    folder = lowbit.export_compressed_tensors(model, tmp_path / "ct")
    names = set(load_file(folder / "model.safetensors"))
    assert {f"model.layers.1.mlp.experts.{EXPERTS - 1}.{p}.weight_packed" for p in ("gate_proj", "up_proj", "down_proj")
            } <= names
    assert not any("gate_up_proj" in name for name in names)
    with torch.no_grad():
        assert torch.equal(lowbit.load(folder)(IDS).logits, model(IDS).logits)


def test_full_precision_experts_save_pretrained_as_per_expert_linears(tmp_path):
    """Experts stored in F32 import as the model's fused full-precision weights; save_pretrained of
    the import writes them as the class's checkpoint layout (experts.E.gate_proj / up_proj /
    down_proj, as a model built anew writes them; not fused, which the state handed to
    from_pretrained held) and the folder loads back with equal logits."""
    model = load_gguf(_write_moe_gguf(tmp_path / "f32.gguf", lambda name: None if "_exps" in name else "Q8_0"),
                      dtype=torch.float32)
    assert not isinstance(model.model.layers[0].mlp.experts, QuantizedExperts)
    model.save_pretrained(tmp_path / "saved")
    names = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert {f"model.layers.1.mlp.experts.{EXPERTS - 1}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
            } <= names
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in names)
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "saved")(IDS).logits, model(IDS).logits)


def test_a_file_whose_expert_used_count_is_unreadable_is_refused(tmp_path):
    """A damaged key name (found by a damage run) leaves transformers' default of 8 experts per
    token for a model of 4: refused at load, not at the first forward's torch.topk."""
    path = _write_moe_gguf(tmp_path / "moe.gguf", lambda name: "Q8_0")
    data = path.read_bytes()
    assert data.count(b"qwen3moe.expert_used_count") == 1
    path.write_bytes(data.replace(b"qwen3moe.expert_used_count", b"qwee3moe.expert_used_count"))
    with pytest.raises(CheckpointError, match=r"moe\.gguf: <GGUF metadata>: num_experts_per_tok 8 is not in 1 \.\.\. 4"):
        lowbit.load(path)


@pytest.fixture(scope="module")
def moe_mix_file(tmp_path_factory):
    """Q4_K gate / up experts, IQ4_XS down experts, Q8_0 elsewhere."""
    kinds = {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K", "ffn_down_exps": "IQ4_XS"}
    return _write_moe_gguf(tmp_path_factory.mktemp("gguf") / "moe.gguf",
                           lambda name: kinds.get(name.split(".")[2], "Q8_0") if name.startswith("blk.") else "Q8_0")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_moe_files_load_and_run_or_are_refused(moe_mix_file, tmp_path, data):
    """Bytes of a MoE file's metadata, tensor table or data overwritten: LowbitError or a model
    that runs. (A run of 650 outside the suite found the expert_used_count case above.)"""
    raw = bytearray(moe_mix_file.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, 4096 if data.draw(st.booleans()) else len(raw) - 1))
        raw[where] = data.draw(st.integers(0, 255))
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(bytes(raw))
    loads_and_runs_or_refuses(damaged, IDS)


@pytest.mark.parametrize("arch,widths", [("qwen3moe", {"moe_intermediate_size": 512}),
                                         ("qwen2moe", {"moe_intermediate_size": 256,
                                                       "shared_expert_intermediate_size": 1024})])
def test_expert_widths_transformers_does_not_read_come_from_the_file(tmp_path, arch, widths):
    """Experts (and a shared expert) of other widths than the config class's defaults: transformers'
    GGUF reader keeps the defaults and cannot load the file; lowbit reads the widths from the
    metadata (expert_feed_forward_length, expert_shared_feed_forward_length), and its import equals
    transformers' load given the right config."""
    path = _write_moe_gguf(tmp_path / "wide.gguf", lambda name: "Q8_0", arch=arch, widths=widths)
    with pytest.raises(RuntimeError, match="mismatch"):
        _transformers_gguf(path)
    model = load_gguf(path, dtype=torch.float32)
    assert {key: getattr(model.config, key) for key in widths} == widths
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                               config=_config(arch, widths)).eval()
    for index in range(LAYERS):
        layers, want = quantized_weights(model.model.layers[index].mlp.experts), oracle.model.layers[index].mlp.experts
        for weight_name in ("gate_up_proj", "down_proj"):
            assert all(torch.equal(_dequantized(layer), getattr(want, weight_name)[expert])
                       for expert, layer in enumerate(layers[weight_name]))
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
