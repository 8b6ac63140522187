"""Importing GPTQ and AWQ (GEMM) folders (lowbit/integrations/gptq_awq_import.py).

No GPTQ or AWQ writer installs here (GPTQModel needs a newer torch, AutoAWQ is deprecated and
imports its whole model zoo), so the folders are written by this file's packers, which follow
those libraries' loops: GPTQModel's `pack_original` (K-packed words, the 3-bit 10 + 1 + 10 + 1 +
10 scheme, zero points packed along N) and its v2 -> v1 conversion (a constant subtracted from each
packed word), AutoAWQ's `WQLinear_GEMM.from_linear` (the [0, 2, 4, 6, 1, 3, 5, 7] nibble order).
The packers are written independently of the importer (loops over fields, not its bit streams);
literal words pin the layouts; and the AWQ folders are also read by an independent reader:
compressed-tensors' own AutoAWQ converter, whose output lowbit imports through its
compressed-tensors path (tested there against compressed-tensors' decompression)."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import CheckpointError
from lowbit.integrations import foreign_folder, gptq_awq_import

from ..conftest import kernel_devices, make_tiny_moe, requires_gpu
from ..damage import damaged_copy, loads_and_runs_or_refuses

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(dtype=torch.float16):
    """A tiny Llama with biased attention projections (GPTQ folders store a Linear's bias beside
    its codes); every Linear's K is 128 or 192."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attention_bias=True, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _linears(model):
    return {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in LINEARS}


def _pack_fields(values, bits):
    """GPTQModel's packing loop: int [R, C] values in [0, 2^bits) -> int32 [ceil(R*bits/32), C],
    packed down each column (2 / 4 / 8 bits: value 32/b*row + j at bits b*j of word `row`; 3 bits:
    32 values per three words, values 10 and 21 split across two)."""
    values = values.numpy().astype(np.int64)
    words = np.zeros((-(-values.shape[0] * bits // 32), values.shape[1]), dtype=np.int64)
    if bits != 3:
        per_word = 32 // bits
        for row in range(words.shape[0]):
            for j in range(min(per_word, values.shape[0] - row * per_word)):
                words[row] |= values[row * per_word + j] << (bits * j)
    else:
        i = row = 0
        while row < words.shape[0]:
            for j in range(10):
                words[row] |= values[i + j] << (3 * j)
            words[row] |= (values[i + 10] << 30) & 0xFFFFFFFF
            words[row + 1] |= (values[i + 10] >> 2) & 1
            for j in range(10):
                words[row + 1] |= values[i + 11 + j] << (3 * j + 1)
            words[row + 1] |= (values[i + 21] << 31) & 0xFFFFFFFF
            words[row + 2] |= (values[i + 21] >> 1) & 3
            for j in range(10):
                words[row + 2] |= values[i + 22 + j] << (3 * j + 2)
            i, row = i + 32, row + 3
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def _v1_zeros(packed_zeros, zeros, bits):
    """GPTQModel's v2 -> v1 conversion of packed zero points: each word minus one per field (its
    borrows included) for 2 / 4 / 8 bits; each field minus one, modulo 8, for 3 bits."""
    if bits == 3:
        return _pack_fields((zeros - 1) % 8, 3).t()
    one_per_field = sum(1 << (bits * i) for i in range(32 // bits))
    words = (packed_zeros.numpy().view(np.uint32).astype(np.int64) - one_per_field) & 0xFFFFFFFF
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def _random_layer(n, k, bits, groups, generator, symmetric):
    """Random codes [N, K], zero points [N, G] (any value, 0 and 2^b - 1 included, unless
    symmetric: 2^(b-1)) and float16 scales [N, G]."""
    codes = torch.randint(0, 2**bits, (n, k), generator=generator)
    zeros = (torch.full((n, groups), 2 ** (bits - 1)) if symmetric else
             torch.randint(0, 2**bits, (n, groups), generator=generator))
    # weights of about the same size at every width (a Llama's): |u - z| < 2^b
    scales = ((torch.rand(n, groups, generator=generator) * 0.02 + 0.002) * 16 / 2**bits).half()
    return codes, zeros, scales


def _in_order(k, group_size):
    """Each column's group when groups are consecutive: k // group_size."""
    return torch.arange(k) // (group_size if group_size > 0 else k)


def _activation_order(k, group_size, generator):
    """GPTQ's desc_act g_idx: columns visited in a (here random) order, g_idx[order[i]] = i // group_size."""
    order = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[order] = _in_order(k, group_size)
    return g_idx


def _dequantized(codes, zeros, scales, g_idx, dtype):
    """(u - z) * scale, [N, K] in `dtype`, each column k with group g_idx[k]'s zero point and scale."""
    return ((codes - zeros[:, g_idx]).float() * scales[:, g_idx].float()).to(dtype)


def _hf_folder(model, out, quantization, layer_tensors, reference):
    """Save `model` with the quantized layers' tensors in place of their weights; set each
    layer's weight in `model` to `reference[name]` (the dequantized weight: the oracle model)."""
    model.save_pretrained(out)  # config.json as transformers writes it
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k.endswith(".weight") and k.removesuffix(".weight") in layer_tensors)}
    for name, fields in layer_tensors.items():
        state.update({f"{name}.{field}": tensor.contiguous() for field, tensor in fields.items()})
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        for name, weight in reference.items():
            model.get_submodule(name).weight.copy_(weight)
    return out


def _gptq_fields(codes, zeros, scales, g_idx, bits, checkpoint_format="gptq"):
    """A layer's GPTQ tensors {qweight, qzeros, scales[, g_idx]} from codes [N, K], zero points and
    scales [N, G] and each column's group g_idx [K] (None: not stored), v1 zero points as GPTQModel
    converts them."""
    qzeros = _pack_fields(zeros, bits).t()  # [G, ceil(N*b/32)]: packed along N
    if checkpoint_format == "gptq":
        qzeros = _v1_zeros(qzeros, zeros, bits)
    fields = {"qweight": _pack_fields(codes.t(), bits), "qzeros": qzeros.contiguous(),
              "scales": scales.t().contiguous()}
    if g_idx is not None:
        fields["g_idx"] = g_idx.to(torch.int32)
    return fields


def _gptq_folder(out, bits, group_size, checkpoint_format="gptq", symmetric=False, g_idx=True, seed=0,
                 desc_act=False):
    """A GPTQ folder of `_model()`'s Linear layers (lm_head stays float16) written as GPTQModel
    writes them (desc_act: groups in a random activation order); (folder, oracle model with the
    dequantized weights)."""
    model, generator = _model(), torch.Generator().manual_seed(seed)
    layer_tensors, reference = {}, {}
    for name, linear in _linears(model).items():
        n, k = linear.weight.shape
        groups = 1 if group_size == -1 else -(-k // group_size)
        codes, zeros, scales = _random_layer(n, k, bits, groups, generator, symmetric)
        groups_of = _activation_order(k, group_size, generator) if desc_act else _in_order(k, group_size)
        layer_tensors[name] = _gptq_fields(codes, zeros, scales, groups_of if g_idx else None, bits, checkpoint_format)
        reference[name] = _dequantized(codes, zeros, scales, groups_of, torch.float16)
    quantization = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
                    "sym": symmetric, "checkpoint_format": checkpoint_format, "damp_percent": 0.01}
    return _hf_folder(model, out, quantization, layer_tensors, reference), model


def _awq_pack(values):
    """AutoAWQ's WQLinear_GEMM packing: int [R, C] 4-bit values -> int32 [R, C/8], word c's nibble
    i holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    values = values.numpy().astype(np.int64)
    words = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.int64)
    for col in range(words.shape[1]):
        for i, column in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
            words[:, col] |= values[:, col * 8 + column] << (4 * i)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def _awq_folder(out, group_size=64, seed=1):
    """An AWQ GEMM folder of `_model()`'s Linear layers; (folder, oracle model)."""
    model, generator = _model(), torch.Generator().manual_seed(seed)
    layer_tensors, reference = {}, {}
    for name, linear in _linears(model).items():
        n, k = linear.weight.shape
        codes, zeros, scales = _random_layer(n, k, 4, k // group_size, generator, symmetric=False)
        layer_tensors[name] = {"qweight": _awq_pack(codes.t()), "qzeros": _awq_pack(zeros.t()), "scales": scales.t()}
        reference[name] = _dequantized(codes, zeros, scales, _in_order(k, group_size), torch.float16)
    quantization = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": None}
    return _hf_folder(model, out, quantization, layer_tensors, reference), model


def _check_import(folder, oracle, bits, symmetric):
    model = lowbit.load(folder)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}
    assert sorted(layers) == sorted(_linears(oracle))  # lm_head was not quantized
    for name, layer in layers.items():
        assert layer.format == f"int{bits}" and layer.packed.attrs["symmetric"] is symmetric, name
        got = lowbit.get_format(layer.format).dequantize(layer.packed)
        want = oracle.get_submodule(name).weight
        assert got.dtype == want.dtype == torch.float16
        assert torch.equal(got, want), name
        bias = oracle.get_submodule(name).bias
        assert (layer.bias is None) == (bias is None) and (bias is None or torch.equal(layer.bias, bias))
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
    # the same weights; float16 matmuls round differently (lowbit's accumulate in fp32)
    assert float((got - want).float().norm() / want.float().norm()) < 2e-3
    return model


@pytest.mark.parametrize("bits,group_size,checkpoint_format,symmetric", [
    (4, 64, "gptq", False), (4, 128, "gptq", True), (4, -1, "gptq_v2", False), (3, 32, "gptq", False),
    (3, 64, "gptq_v2", True), (2, 64, "gptq", False), (8, 128, "gptq", False), (8, -1, "gptq", True)])
def test_gptq_folder_imports_with_the_same_weights(tmp_path, bits, group_size, checkpoint_format, symmetric):
    """Every zero point from 0 to 2^b - 1 (v1: z = 0 is stored as -1, borrowing from the next
    field); group 128 on K = 192 is a partial last group; sym=True becomes a symmetric layer."""
    folder, oracle = _gptq_folder(tmp_path / "gptq", bits, group_size, checkpoint_format, symmetric)
    _check_import(folder, oracle, bits, symmetric)


def test_gptq_without_g_idx_imports(tmp_path):
    folder, oracle = _gptq_folder(tmp_path / "gptq", 4, 64, g_idx=False)
    _check_import(folder, oracle, 4, False)


@pytest.mark.parametrize("bits,group_size,checkpoint_format,symmetric", [
    (4, 128, "gptq", False), (3, 32, "gptq", True), (8, 64, "gptq_v2", False)])
def test_desc_act_folder_imports_with_an_input_permutation(tmp_path, bits, group_size, checkpoint_format, symmetric):
    """desc_act without static groups: each group gathers columns from all over K. The layer
    stores its codes in the order that makes every group consecutive and gathers x by it; its
    dequantized weight (input order) equals the oracle's; lowbit.save and save_pretrained
    folders keep the order."""
    folder, oracle = _gptq_folder(tmp_path / "gptq", bits, group_size, checkpoint_format, symmetric, desc_act=True)
    model = _check_import(folder, oracle, bits, symmetric)
    for name, layer in _linears(model).items():
        k = layer.packed.shape[1]
        if k <= group_size:  # one group: any column order is group order
            assert "permuted" not in layer.packed.attrs, name
            continue
        perm = layer.packed.perm
        assert layer.packed.attrs["permuted"] is True and not torch.equal(perm.long(), torch.arange(k)), name
    with torch.no_grad():
        logits = model(IDS).logits
    lowbit.save(model, tmp_path / "lowbit")
    model.save_pretrained(tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for again in (lowbit.load(tmp_path / "lowbit"), reloaded):
        assert torch.equal(again.get_submodule(LAYER).packed.perm, model.get_submodule(LAYER).packed.perm)
        with torch.no_grad():
            assert torch.equal(again(IDS).logits, logits)


#: GPTQModel `dynamic` overrides (ModelCloud's TinyLlama "-dynamic-cfg" folder's kind, for a 2-layer
#: model), in order; the first whose regex matches a module's name decides
DYNAMIC = {
    r"-:model\.layers\.1\.mlp\..*": {},                                   # layer 1's MLP stays float16
    r".*\.1\..*": {"bits": 8, "group_size": 32, "desc_act": False, "sym": False},  # layer 1's attention
    r"+:.*down_proj": {"bits": 2, "group_size": 64, "desc_act": False, "sym": False},  # layer 0's only
    r"+:.*\.k_proj": {"bits": 3},                                             # layer 0's only
}
#: what DYNAMIC makes of each Linear: (bits, group_size, desc_act, symmetric), None: not quantized;
#: written out by hand (the folder's writer does not match regexes)
DYNAMIC_LAYERS = {
    **{f"model.layers.0.{name}": (4, 64, True, True) for name in (
        "self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")},
    "model.layers.0.self_attn.k_proj": (3, 64, True, True),
    "model.layers.0.mlp.down_proj": (2, 64, False, False),
    **{f"model.layers.1.self_attn.{name}": (8, 32, False, False) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"model.layers.1.mlp.{name}": None for name in ("gate_proj", "up_proj", "down_proj")},
}


def _dynamic_gptq_folder(out, seed=2):
    """A GPTQModel folder with DYNAMIC overrides (base: 4 bits, group 64, desc_act, sym), each
    Linear written as DYNAMIC_LAYERS says (every K is 128 or 192: desc_act layers are permuted);
    (folder, oracle model)."""
    model, generator = _model(), torch.Generator().manual_seed(seed)
    layer_tensors, reference = {}, {}
    for name, linear in _linears(model).items():
        if DYNAMIC_LAYERS[name] is None:
            continue  # stored as its float16 weight
        bits, group_size, desc_act, symmetric = DYNAMIC_LAYERS[name]
        n, k = linear.weight.shape
        codes, zeros, scales = _random_layer(n, k, bits, -(-k // group_size), generator, symmetric)
        groups_of = _activation_order(k, group_size, generator) if desc_act else _in_order(k, group_size)
        layer_tensors[name] = _gptq_fields(codes, zeros, scales, groups_of, bits)
        reference[name] = _dequantized(codes, zeros, scales, groups_of, torch.float16)
    quantization = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": True,
                    "checkpoint_format": "gptq", "dynamic": DYNAMIC, "lm_head": False,
                    "meta": {"quantizer": ["gptqmodel:1.5.1-dev"], "damp_percent": 0.01, "mse": 0.0}}
    return _hf_folder(model, out, quantization, layer_tensors, reference), model


def test_dynamic_overrides_give_each_layer_its_own_bits_and_groups(tmp_path):
    """GPTQModel's per-module `dynamic`: "-:" leaves layer 1's MLP in float16 (before the rule for
    every layer-1 module), the others give their modules their bits and group size; every layer
    dequantizes to the oracle's weight, and lowbit.save keeps the mixture."""
    folder, oracle = _dynamic_gptq_folder(tmp_path / "gptq")
    model = lowbit.load(folder)
    for name, expected in DYNAMIC_LAYERS.items():
        layer, want = model.get_submodule(name), oracle.get_submodule(name).weight
        if expected is None:
            assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, want), name
            continue
        bits, group_size, desc_act, symmetric = expected
        attrs = layer.packed.attrs
        assert (layer.format, attrs["group_size"], attrs["symmetric"]) == (f"int{bits}", group_size, symmetric), name
        assert attrs.get("permuted", False) is desc_act, name
        assert torch.equal(lowbit.get_format(layer.format).dequantize(layer.packed), want), name
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
        assert float((got - want).float().norm() / want.float().norm()) < 2e-3
        lowbit.save(model, tmp_path / "lowbit")
        assert torch.equal(lowbit.load(tmp_path / "lowbit")(IDS).logits, got)
    assert gptq_awq_import.target_format(folder) == "int2/int3/int4/int8"  # what `lowbit convert` reports


def test_permuted_layer_gradient_and_kernel_follow_the_input_order(tmp_path):
    """x's gradient through a permuted layer is F.linear's with the oracle weight (torch backend;
    the Triton backend too where it runs), and the Triton GEMM gathers x by perm."""
    folder, oracle = _gptq_folder(tmp_path / "gptq", 4, 64, desc_act=True)
    packed = lowbit.load(folder).get_submodule(LAYER).packed
    weight = oracle.get_submodule(LAYER).weight.float()
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(3))
    grad_y = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    want_y = x @ weight.t()
    for backend in ["torch"] + (["triton"] if kernel_devices() else []):
        xg = x.clone().requires_grad_()
        y = lowbit.linear(xg, packed, None, backend=backend)
        y.backward(grad_y)
        # the kernel multiplies in the layer's float16 (a wrong column order is off by O(1))
        tolerance = 1e-5 if backend == "torch" else 2e-3
        assert (y.detach() - want_y).abs().max() <= tolerance * want_y.abs().max(), backend
        torch.testing.assert_close(xg.grad, grad_y @ weight, rtol=1e-5, atol=1e-5)


def test_a_perm_that_is_not_a_permutation_is_refused(tmp_path):
    """perm is used as addresses into x: lowbit.load checks it holds every input index once."""
    folder, _ = _gptq_folder(tmp_path / "gptq", 4, 64, desc_act=True)
    lowbit.save(lowbit.load(folder), tmp_path / "lowbit")
    files = list((tmp_path / "lowbit").glob("*.safetensors"))
    for f in files:
        tensors = load_file(f)
        key = f"{LAYER}.perm"
        if key in tensors:
            tensors[key][0] = 191 if int(tensors[key][0]) != 191 else 190  # one index twice
            save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"perm is not a permutation of the 192 input features"):
        lowbit.load(tmp_path / "lowbit")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_older_folders_with_a_side_config_import(tmp_path, method):
    """AutoGPTQ-era folders keep their settings in quantize_config.json (and name the weights file
    their own way), AutoAWQ's in quant_config.json (w_bit / q_group_size, version "GEMM"), with no
    quantization_config in config.json."""
    if method == "gptq":
        folder, oracle = _gptq_folder(tmp_path / "f", 4, 128, desc_act=True)
        side = ("quantize_config.json", {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True,
                                         "static_groups": False, "sym": False, "true_sequential": True,
                                         "model_file_base_name": "gptq_model-4bit-128g"})
        (folder / "model.safetensors").rename(folder / "gptq_model-4bit-128g.safetensors")
    else:
        folder, oracle = _awq_folder(tmp_path / "f", 64)
        side = ("quant_config.json", {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / side[0]).write_text(json.dumps(side[1]))
    assert gptq_awq_import.is_gptq_awq_folder(folder)
    model = _check_import(folder, oracle, 4, False)
    from lowbit.cli import main as cli_main

    assert cli_main(["convert", str(folder), str(tmp_path / "lowbit")]) == 0
    assert not (tmp_path / "lowbit" / side[0]).exists()  # it describes the source's layout, not lowbit's
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "lowbit")(IDS).logits, model(IDS).logits)
    side[1].update(w_bit=8) if method == "awq" else side[1].update(bits=5)
    (folder / side[0]).write_text(json.dumps(side[1]))
    field = "w_bit: 8" if method == "awq" else "bits: 5"
    with pytest.raises(CheckpointError, match=rf"{side[0]}: {field}: lowbit imports"):
        lowbit.load(folder)


def test_literal_words_pin_the_layouts():
    """Hand-written words: GPTQ's code k of a column at bits 4k of the column's word; a v1 zero-point
    word 0xEEEEEEEF (GPTQModel's 0x00000000 - 0x11111111) holds eight zero points 0; AWQ's word
    0x75316420 holds the columns 0..7 of its row in the nibble order [0, 2, 4, 6, 1, 3, 5, 7]."""
    scheme = gptq_awq_import.Scheme("gptq", 4, 32, True)
    n, k = 8, 32
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    qweight[0, 0] = 0x76543210
    tensors = {"m.qweight": qweight, "m.qzeros": torch.full((1, 1), -0x11111111, dtype=torch.int32),
               "m.scales": torch.ones(1, n, dtype=torch.float16)}
    packed, _ = gptq_awq_import.gptq_layer(tensors, "m", scheme, torch.float32)
    weight = lowbit.get_format("int4").dequantize(packed)
    assert weight[0, :8].tolist() == list(range(8)) and not weight[0, 8:].any() and not weight[1:].any()

    awq = gptq_awq_import.Scheme("awq", 4, 32, False)
    qweight = torch.zeros(k, 1, dtype=torch.int32)
    qweight[0, 0] = 0x75316420
    tensors = {"m.qweight": qweight, "m.qzeros": torch.zeros(1, 1, dtype=torch.int32),
               "m.scales": torch.ones(1, n, dtype=torch.float16)}
    packed, _ = gptq_awq_import.awq_layer(tensors, "m", awq, torch.float32)
    weight = lowbit.get_format("int4").dequantize(packed)
    assert weight[:, 0].tolist() == list(range(8)) and not weight[:, 1:].any()


def test_awq_folder_imports_with_the_same_weights(tmp_path):
    folder, oracle = _awq_folder(tmp_path / "awq")
    _check_import(folder, oracle, 4, False)


def test_awq_folder_matches_compressed_tensors_own_converter(tmp_path):
    """compressed-tensors' AutoAWQConverter reads the AWQ folder independently (its unpacking and
    reordering); lowbit's import of its output equals lowbit's import of the AWQ folder, field
    for field."""
    convert = pytest.importorskip("compressed_tensors.entrypoints.convert")
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter

    folder, _ = _awq_folder(tmp_path / "awq")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    convert.convert_checkpoint(folder, tmp_path / "ct", AutoAWQConverter.from_autoawq_config(config), max_workers=1)
    via_ct, direct = lowbit.load(tmp_path / "ct"), lowbit.load(folder)
    layers = {name: m for name, m in direct.named_modules() if isinstance(m, lowbit.QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        other = via_ct.get_submodule(name).packed
        assert other.attrs == layer.packed.attrs and other.shape == layer.packed.shape, name
        for field, tensor in layer.packed.tensors.items():
            assert torch.equal(other.tensors[field], tensor), f"{name}.{field}"
    with torch.no_grad():
        assert torch.equal(via_ct(IDS).logits, direct(IDS).logits)


@pytest.mark.skipif(not kernel_devices(), reason="Triton cannot run here")
def test_triton_kernel_runs_an_imported_gptq_layer(tmp_path):
    """An imported asymmetric 3-bit layer (zero points 0 included) through the Triton GEMM matches
    the float16 weight's matmul."""
    folder, oracle = _gptq_folder(tmp_path / "gptq", 3, 32)
    device = kernel_devices()[0]
    packed = lowbit.load(folder).model.layers[0].mlp.down_proj.packed.to(device)
    assert not packed.attrs["symmetric"]
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(2)).half().to(device)
    want = x.float() @ oracle.model.layers[0].mlp.down_proj.weight.float().t().to(device)
    got = lowbit.linear(x, packed, None, backend="triton").float()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory):
    return _gptq_folder(tmp_path_factory.mktemp("gptq") / "gptq", 4, 64)[0]


@pytest.fixture(scope="module")
def awq_folder(tmp_path_factory):
    return _awq_folder(tmp_path_factory.mktemp("awq") / "awq")[0]


def _copy(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "copy")
    return tmp_path / "copy"


QC = r"quantization_config"


@pytest.mark.parametrize("source,edit,message", [("gptq_folder", *case) for case in [
    ({"bits": 5}, rf"{QC}\.bits: 5: lowbit imports GPTQ weights of 2 / 3 / 4 / 8 bits"),
    ({"group_size": 48}, rf"{QC}\.group_size: 48: lowbit's groups are a positive multiple of 32"),
    ({"group_size": 0}, rf"{QC}\.group_size: 0: expected -1 \(per channel\) or a positive int"),
    ({"checkpoint_format": "marlin"}, rf"{QC}\.checkpoint_format: 'marlin': lowbit imports GPTQ's 'gptq' and "
     "'gptq_v2' layouts"),
    ({"checkpoint_format": None, "format": "gptq_p"}, rf"{QC}\.format: 'gptq_p': lowbit imports GPTQ's"),
    ({"checkpoint_format": {}}, rf"{QC}\.checkpoint_format: {{}}: lowbit imports GPTQ's"),  # was a TypeError
    ({"pack_dtype": "int16"}, rf"{QC}\.pack_dtype: 'int16': lowbit imports codes packed in int32 words"),
    ({"bits": 4.0}, rf"{QC}\.bits: 4\.0: lowbit imports GPTQ weights of 2 / 3 / 4 / 8 bits"),  # was a TypeError
    ({"dynamic": {"-:.*down_proj": {}}}, r"model\.layers\.0\.mlp\.down_proj\.qweight: .*config\.json: "
     rf"{QC}\.dynamic\['-:\.\*down_proj'\] leaves this module unquantized, yet the folder holds its codes"),
    ({"dynamic": ["-:.*"]}, rf"{QC}\.dynamic: \['-:\.\*'\]: expected an object of module-name regexes"),
    ({"dynamic": {"+:(": {}}}, rf"{QC}\.dynamic\['\+:\('\]: '\(' is not a regular expression"),
    ({"dynamic": {"a{4294967296}": {}}}, r"is not a regular expression \(error: repeat count too big"),
    ({"dynamic": {"(" * 1000 + ")" * 1000: {}}}, r"is not a regular expression \(RecursionError"),
    ({"dynamic": {".*": 8}}, rf"{QC}\.dynamic\['\.\*'\]: 8: expected an object of overrides"),
    ({"dynamic": {".*": {"bits": 5}}}, rf"{QC}\.dynamic\['\.\*'\]\.bits: 5: lowbit imports GPTQ weights of"),
    ({"dynamic": {".*": {"group_size": 48}}}, rf"{QC}\.dynamic\['\.\*'\]\.group_size: 48: lowbit's groups"),
    ({"dynamic": {".*": {"adapter": {"rank": 8}}}}, rf"{QC}\.dynamic\['\.\*'\]\.adapter: lowbit imports "
     "per-module bits and group_size overrides"),
    # an override that disagrees with the stored codes: their shape says so
    ({"dynamic": {r".*\.q_proj": {"bits": 8}}}, r"model\.layers\.0\.self_attn\.q_proj\.qweight: .*expected"),
]] + [("awq_folder", *case) for case in [
    ({"version": "gemv"}, rf"{QC}\.version: 'gemv': lowbit imports AWQ's GEMM layout"),
    ({"bits": 3}, rf"{QC}\.bits: 3: lowbit imports AWQ weights of 4 bits"),
    ({"zero_point": False}, rf"{QC}\.zero_point: False: lowbit imports AWQ GEMM layers with zero points"),
    ({"dynamic": {".*": {"bits": 8}}}, rf"{QC}\.dynamic\['\.\*'\]\.bits: 8: lowbit imports AWQ weights of 4 bits"),
]])
def test_schemes_lowbit_does_not_hold_are_refused_naming_the_field(request, tmp_path, source, edit, message):
    folder = _copy(request.getfixturevalue(source), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(folder)


def test_a_dynamic_pattern_that_backtracks_without_end_is_refused(gptq_folder, tmp_path, monkeypatch):
    """Python's re had not finished `(.*.*)*x` on a module name after 10 minutes; lowbit's matches
    run under a time limit (shortened here), so such a folder is refused instead of hanging the load."""
    folder = _copy(gptq_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    key = r"+:(.*?)*(?=x)\1"
    config["quantization_config"]["dynamic"] = {key: {"bits": 8}}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(foreign_folder, "MATCH_TIMEOUT_S", 0.2)
    message = (f"dynamic[{key!r}]: {key[2:]!r} took over 0.2 s to match 'model.layers.0.mlp.down_proj' (a pattern "
               "that backtracks")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        lowbit.load(folder)


def test_a_model_type_that_is_not_a_string_is_refused(gptq_folder, tmp_path):
    """transformers keeps config.json's model_type as given and looks it up in dicts (was a TypeError)."""
    folder = _copy(gptq_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = []
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: <model config>: model_type \[\] is not a string"):
        lowbit.load(folder)


LAYER = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("source,damage,message", [
    ("gptq_folder", "int8 norm", r"model\.norm\.weight: stored as torch\.int8, where the model holds a floating-point "
                                r"tensor"),  # transformers cast it to float16
    ("gptq_folder", "uneven groups", rf"{LAYER}\.g_idx: groups do not each hold 64 columns \(the last one the rest\)"),
    ("gptq_folder", "qweight", rf"{LAYER}\.qweight: expected torch\.int32 \[24, 128\], got torch\.int32 \[23, 128\]"),
    ("gptq_folder", "qzeros", rf"{LAYER}\.qzeros: missing"),
    ("gptq_folder", "g_idx dtype", rf"{LAYER}\.g_idx: expected an int32 \[in_features\] tensor, got torch\.float32"),
    ("gptq_folder", "scale", rf"{LAYER}\.scales: values up to 1e\+06: not finite in float16"),
    ("awq_folder", "qzeros", rf"{LAYER}\.qzeros: expected torch\.int32 \[3, 16\], got torch\.int32 \[2, 16\]"),
    ("awq_folder", "qweight dtype", rf"{LAYER}\.qweight: expected torch\.int32, got torch\.float32"),
    ("gptq_folder", "empty", rf"{LAYER}\.qweight: an empty layer \(128 out, 0 in features\)"),
    ("awq_folder", "empty", rf"{LAYER}\.qweight: an empty layer \(0 out, 192 in features\)"),
])
def test_damaged_layers_are_refused_naming_the_tensor(request, tmp_path, source, damage, message):
    folder = _copy(request.getfixturevalue(source), tmp_path)
    tensors = load_file(folder / "model.safetensors")
    if damage == "int8 norm":
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    elif damage == "uneven groups":  # group 1 takes a column of group 0
        tensors[f"{LAYER}.g_idx"][0] = 1
    elif damage == "empty" and source == "gptq_folder":
        tensors[f"{LAYER}.g_idx"] = torch.zeros(0, dtype=torch.int32)
    elif damage == "empty":
        tensors[f"{LAYER}.qweight"] = torch.zeros(192, 0, dtype=torch.int32)
    elif damage == "qweight":
        tensors[f"{LAYER}.qweight"] = tensors[f"{LAYER}.qweight"][:-1].contiguous()
    elif damage in ("qzeros", "qweight dtype", "g_idx dtype"):
        key = f"{LAYER}.{damage.split()[0]}"
        if damage == "qzeros" and source == "gptq_folder":
            del tensors[key]
        elif damage == "qzeros":
            tensors[key] = tensors[key][:-1].contiguous()
        else:
            tensors[key] = tensors[key].float()
    else:
        tensors[f"{LAYER}.scales"] = tensors[f"{LAYER}.scales"].float()
        tensors[f"{LAYER}.scales"][0, 3] = 1e6
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(folder)


@pytest.fixture(scope="module")
def desc_act_folder(tmp_path_factory):
    return _gptq_folder(tmp_path_factory.mktemp("desc_act") / "gptq", 3, 64, checkpoint_format="gptq_v2",
                        desc_act=True)[0]


@pytest.fixture(scope="module")
def dynamic_folder(tmp_path_factory):
    return _dynamic_gptq_folder(tmp_path_factory.mktemp("dynamic") / "gptq")[0]


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    return _moe_gptq_folder(tmp_path_factory.mktemp("moe") / "gptq", "qwen3_moe", desc_act=True)[0]


@pytest.mark.parametrize("source", ["gptq_folder", "desc_act_folder", "awq_folder", "moe_folder", "dynamic_folder"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_import_against_random_damage(request, tmp_path_factory, source, data):
    """Any config.json value replaced by a JSON value of any type, or any tensor cut, cast,
    reshaped, overwritten in places or removed: CheckpointError or a model that runs (this found
    an object as checkpoint_format and a list as model_type -> TypeError; and, with a smaller
    num_hidden_layers, a MoE folder's experts the model lacks -> AttributeError)."""
    folder = tmp_path_factory.mktemp("damaged") / "folder"
    damaged_copy(data, request.getfixturevalue(source), folder)
    loads_and_runs_or_refuses(folder, IDS)


def test_inspect_marks_permuted_layers(tmp_path, capsys):
    from lowbit.cli import main as cli_main

    folder, _ = _gptq_folder(tmp_path / "gptq", 4, 64, desc_act=True)
    lowbit.save(lowbit.load(folder), tmp_path / "lowbit")
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "lowbit")]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("model.")}
    assert len(rows) == 14 and all("int4 permuted" in line for line in rows.values())  # K > 64: all permuted


def test_convert_command_writes_a_lowbit_folder(gptq_folder, tmp_path, capsys):
    from lowbit.cli import main as cli_main

    out = tmp_path / "lowbit"
    assert cli_main(["convert", str(gptq_folder), str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "(GPTQ / AWQ)" in stdout and f"{'int4 layers:':<18}14" in stdout
    with torch.no_grad():
        assert torch.equal(lowbit.load(out)(IDS).logits, lowbit.load(gptq_folder)(IDS).logits)
    bad = _copy(gptq_folder, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["bits"] = 6
    (bad / "config.json").write_text(json.dumps(config))
    assert cli_main(["convert", str(bad), str(tmp_path / "refused")]) == 2
    assert "quantization_config.bits: 6" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_scales_float16_cannot_hold_are_rounded_with_a_warning(gptq_folder, tmp_path):
    folder = _copy(gptq_folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    scales = tensors[f"{LAYER}.scales"].float()
    scales[1, 5] = 1 / 3  # not a float16 value
    tensors[f"{LAYER}.scales"] = scales
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 of \d+ scales are not float16 values"):
        model = lowbit.load(folder)
    assert float(model.get_submodule(LAYER).packed.scales[1, 5]) == float(torch.tensor(1 / 3).half())


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method,bits,group_size", [("gptq", 4, 128), ("gptq", 3, 32), ("gptq", 8, -1),
                                                    ("gptq-desc_act", 4, 64), ("awq", 4, 64)])
def test_gpu_imported_layers_match_the_cpu_import(tmp_path, method, bits, group_size):
    """On CUDA the imported layers run lowbit's kernels (permuted ones after gathering x): close
    to the CPU import, whose weights equal the oracle's (tested above)."""
    folder = (_awq_folder(tmp_path / "f", group_size)[0] if method == "awq" else
              _gptq_folder(tmp_path / "f", bits, group_size, desc_act=method.endswith("desc_act"))[0])
    on_cpu, on_gpu = lowbit.load(folder), lowbit.load(folder, device="cuda")
    with torch.no_grad():
        expected = on_cpu(IDS).logits.float()
        got = on_gpu(IDS.cuda()).logits.float().cpu()
    assert (got - expected).norm() / expected.norm() < 1e-2


# -- mixture-of-experts folders: per-expert Linear layers, merged by transformers into fused weights --
PROJECTIONS = LINEARS + ("w1", "w2", "w3")


def _moe_gptq_folder(out, arch, desc_act=False, gate_up_orders="same", dynamic=None, bits_of=lambda name: 4):
    """A GPTQ folder of a tiny MoE model as GPTQ writers save them: every projection (attention,
    each expert's gate / up / down) packed under its checkpoint name; (folder, oracle model
    transformers builds from the dequantized weights under the same names). desc_act: activation
    order, shared by an expert's gate and up (they see the same inputs, so GPTQ orders their
    columns alike) unless gate_up_orders="differ". dynamic: GPTQModel's overrides, stored as
    given; bits_of(name): each projection's bits, as they say."""
    model, generator = make_tiny_moe(arch), torch.Generator().manual_seed(1)
    model.save_pretrained(out)  # transformers writes the per-expert checkpoint names
    stored = load_file(out / "model.safetensors")
    rest, dequantized, fields, orders = {}, {}, {}, {}
    for key, tensor in stored.items():
        name = key.removesuffix(".weight")
        if not (key.endswith(".weight") and tensor.dim() == 2 and name.rsplit(".", 1)[-1] in PROJECTIONS):
            rest[key] = tensor
            continue
        n, k = tensor.shape
        group_size, symmetric = 32, "w3" in name or "up_proj" in name  # gate / up stacked across the two kinds
        bits = bits_of(name)
        codes, zeros, scales = _random_layer(n, k, bits, k // group_size, generator, symmetric)
        g_idx = _in_order(k, group_size)
        if desc_act:  # one order per expert input: gate and up share it
            shared = name.replace("w3", "w1").replace("up_proj", "gate_proj")
            if gate_up_orders == "differ" or shared not in orders:
                orders[shared] = _activation_order(k, group_size, generator)
            g_idx = orders[shared]
        layer_fields = _gptq_fields(codes, zeros, scales, g_idx, bits)
        fields.update({f"{name}.{field}": tensor for field, tensor in layer_fields.items()})
        dequantized[key] = _dequantized(codes, zeros, scales, g_idx, torch.float16)
    save_file({**rest, **fields}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": desc_act,
                                     "sym": False, "checkpoint_format": "gptq", "dynamic": dynamic}
    (out / "config.json").write_text(json.dumps(config))
    oracle = type(model).from_pretrained(None, config=model.config, state_dict={**rest, **dequantized},
                                         dtype=torch.float16).eval()
    return out, oracle


@pytest.mark.parametrize("arch,desc_act", [("mixtral", False), ("qwen3_moe", True)])
def test_moe_folder_experts_become_lowbit_quantized_experts(tmp_path, arch, desc_act):
    """Each expert's gate and up Linears (Mixtral: w1, w3; Qwen3-MoE: gate_proj, up_proj) stack
    into its gate_up_proj layer (symmetric up with asymmetric gate: asymmetric), down into
    down_proj, in lowbit's quantized experts; every expert's weight equals the oracle's slice of
    transformers' fused weight, the logits follow, and the model saves and reloads."""
    from lowbit.experts import expert_weight, quantized_weights

    folder, oracle = _moe_gptq_folder(tmp_path / "gptq", arch, desc_act)
    model = lowbit.load(folder)
    for layer in range(2):
        ours, theirs = model.model.layers[layer].mlp.experts, oracle.model.layers[layer].mlp.experts
        weights = quantized_weights(ours)
        assert sorted(weights) == ["down_proj", "gate_up_proj"]
        for weight_name, experts in weights.items():
            assert len(experts) == 4
            for index, expert in enumerate(experts):
                got = lowbit.get_format("int4").dequantize(expert.packed)
                assert torch.equal(got, expert_weight(theirs, weight_name, index)), (layer, weight_name, index)
                assert expert.packed.attrs.get("permuted", False) is desc_act
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
        assert float((got - want).float().norm() / want.float().norm()) < 2e-3
        lowbit.save(model, tmp_path / "lowbit")
        assert torch.equal(lowbit.load(tmp_path / "lowbit")(IDS).logits, got)


def test_moe_gate_and_up_in_different_column_orders_are_refused(tmp_path):
    folder, _ = _moe_gptq_folder(tmp_path / "gptq", "qwen3_moe", desc_act=True, gate_up_orders="differ")
    with pytest.raises(CheckpointError, match=r"mlp\.experts\.gate_up_proj \(expert 0\): its gate and up layers "
                                              r"differ in .* column order"):
        lowbit.load(folder)


def test_moe_dynamic_overrides_give_experts_their_own_widths(tmp_path):
    """`dynamic` reaches the per-expert Linears by their checkpoint names: expert 0's down_proj in
    8 bits beside 4-bit experts, 2-bit attention; each expert keeps its width in lowbit's experts,
    whose weights equal the oracle's."""
    dynamic = {r"+:.*experts\.0\.down_proj": {"bits": 8}, r"+:.*self_attn": {"bits": 2}}
    bits_of = lambda name: 8 if name.endswith("experts.0.down_proj") else 2 if "self_attn" in name else 4  # noqa: E731
    folder, oracle = _moe_gptq_folder(tmp_path / "gptq", "qwen3_moe", dynamic=dynamic, bits_of=bits_of)
    model = lowbit.load(folder)
    for layer in range(2):
        experts, want = model.model.layers[layer].mlp.experts, oracle.model.layers[layer].mlp.experts
        assert [e.format for e in experts.quantized["down_proj"]] == ["int8", "int4", "int4", "int4"]
        assert {e.format for e in experts.quantized["gate_up_proj"]} == {"int4"}
        assert model.model.layers[layer].self_attn.q_proj.format == "int2"
        for expert, quantized in enumerate(experts.quantized["down_proj"]):
            got = lowbit.get_format(quantized.format).dequantize(quantized.packed)
            assert torch.equal(got, want.down_proj[expert]), (layer, expert)
    with torch.no_grad():
        got, want = model(IDS).logits, oracle(IDS).logits
    assert float((got - want).float().norm() / want.float().norm()) < 2e-3
    # gate and up of one expert in different widths cannot stack into one gate_up_proj layer
    folder, _ = _moe_gptq_folder(tmp_path / "differ", "qwen3_moe", dynamic={r"+:.*experts\.1\.up_proj": {"bits": 8}},
                                 bits_of=lambda name: 8 if name.endswith("experts.1.up_proj") else 4)
    with pytest.raises(CheckpointError, match=r"gate_up_proj \(expert 1\): its gate and up layers differ in format"):
        lowbit.load(folder)


def test_moe_folder_missing_an_expert_is_refused(tmp_path):
    folder, _ = _moe_gptq_folder(tmp_path / "gptq", "mixtral")
    tensors = load_file(folder / "model.safetensors")
    prefix = "model.layers.1.block_sparse_moe.experts.2.w2"
    for field in ("qweight", "qzeros", "scales", "g_idx"):
        del tensors[f"{prefix}.{field}"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.down_proj: no quantized layer for "
                                              r"\['expert 2 part 0'\]"):
        lowbit.load(folder)


def test_moe_experts_the_model_lacks_are_refused(tmp_path):
    """config.json with fewer layers than the folder holds (was an AttributeError)."""
    folder, _ = _moe_gptq_folder(tmp_path / "gptq", "mixtral")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.\w+: the model has no such experts "
                                              r"module"):
        lowbit.load(folder)


@requires_gpu
@pytest.mark.gpu
def test_gpu_imported_moe_matches_the_cpu_import(tmp_path):
    """The imported Qwen3-MoE (desc_act experts) on CUDA: lowbit's grouped expert path and kernels,
    close to the CPU import."""
    folder, _ = _moe_gptq_folder(tmp_path / "gptq", "qwen3_moe", desc_act=True)
    on_cpu, on_gpu = lowbit.load(folder), lowbit.load(folder, device="cuda")
    with torch.no_grad():
        expected = on_cpu(IDS).logits.float()
        got = on_gpu(IDS.cuda()).logits.float().cpu()
    assert (got - expected).norm() / expected.norm() < 1e-2


@pytest.mark.parametrize("arch", [None, "qwen3_moe"])
def test_quantized_layers_float_weights_are_never_allocated(tmp_path, monkeypatch, arch):
    """The model is built around one-element placeholders of the quantized weights (transformers
    keeps a loaded tensor as the parameter), so importing needs no float copy of them: every
    Linear and fused expert weight a quantized layer replaces holds one element of storage."""
    import lowbit.api
    import lowbit.experts

    replaced = []
    replace_layer, install = lowbit.api.replace_layer, lowbit.experts.install
    monkeypatch.setattr(lowbit.api, "replace_layer", lambda model, name, layer: (
        replaced.append(model.get_submodule(name).weight.untyped_storage().nbytes()), replace_layer(model, name, layer)))
    monkeypatch.setattr(lowbit.experts, "install", lambda module, weight_name, layers: (
        replaced.append(getattr(module, weight_name).untyped_storage().nbytes()), install(module, weight_name, layers)))
    folder = (_gptq_folder(tmp_path / "f", 4, 64)[0] if arch is None else
              _moe_gptq_folder(tmp_path / "f", arch)[0])
    lowbit.load(folder)
    assert len(replaced) == (14 if arch is None else 8 + 4) and set(replaced) == {2}  # one float16 element each
