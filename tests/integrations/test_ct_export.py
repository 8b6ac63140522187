"""Writing lowbit models as compressed-tensors folders (lowbit/integrations/ct_export.py). The
oracles are compressed-tensors itself: transformers loading the folder with
CompressedTensorsConfig(dequantize=True) runs its decompression, its QuantizationScheme parses
each config group, and its infer_module_format names the format it would have written; and the
import (ct_import.py, tested against compressed-tensors' own folders) must give back the layers."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.errors import CheckpointError
from lowbit.integrations import ct_import
from lowbit.integrations.ct_export import export_compressed_tensors
from lowbit.integrations.foreign_folder import integer_layer, pack_bitstream, unpack_bitstream

from ..conftest import bf16_llama_dir, make_tiny_moe
from .test_ct_import import IDS, _args, _ct_saved, _decompressed

transformers = pytest.importorskip("transformers")
ct_quantization = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return bf16_llama_dir(tmp_path_factory.mktemp("bf16"))


def _quantized(source, fmt, options, dtype=torch.bfloat16):
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return lowbit.quantize(model, fmt, skip=["lm_head"], **options)


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}


def _within_one_bf16_step(theirs, ours):
    """Whether every weight is within one bf16 step (2^-7 of its magnitude at most) of lowbit's."""
    return bool(((theirs.float() - ours.float()).abs() <= ours.float().abs() * 2**-7).all())


def _scheme(group):
    """A config group parsed by compressed-tensors (its format is the group's, not a scheme field)."""
    return ct_quantization.QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})


def _check_config_groups(folder, expected_format):
    """Every config group parses as compressed-tensors' QuantizationScheme, and is in the format
    compressed-tensors infers for that scheme (the one it would have written)."""
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == expected_format
    for group in quantization["config_groups"].values():
        scheme = _scheme(group)
        assert infer_module_format(torch.nn.Linear, scheme).value == group["format"] == expected_format
    return quantization


CASES = {  # lowbit format, options -> the compressed-tensors format compressed-tensors infers for it
    "int4-asym": ("int4", {"group_size": 64}, "pack-quantized"),
    "int4-sym": ("int4", {"group_size": 64, "symmetric": True}, "pack-quantized"),
    "int3": ("int3", {"group_size": 64}, "pack-quantized"),
    "int2-g16": ("int2", {"group_size": 16}, "pack-quantized"),  # groups of 16, as GGUF's Q2_K
    "int6-channel": ("int6", {"group_size": -1, "symmetric": True}, "pack-quantized"),
    "int8-w8a8": ("int8", {"group_size": -1, "symmetric": True, "act": "int8"}, "int-quantized"),
    "int4-w4afp8": ("int4", {"group_size": 64, "act": "fp8"}, "int-quantized"),
    "fp8": ("fp8", {}, "naive-quantized"),
    "fp8-dynamic": ("fp8", {"act": "fp8"}, "float-quantized"),
    "fp8-block": ("fp8", {"block": 128, "act": "fp8"}, "float-quantized"),
    "mxfp4": ("mxfp4", {}, "mxfp4-pack-quantized"),
    "mxfp6": ("mxfp6", {}, "mxfp6-pack-quantized"),
    "mxfp8": ("mxfp8", {}, "mxfp8-quantized"),
    "mxfp4-act": ("mxfp4", {"act": "mxfp4", "act_amax_round": 1}, "mxfp4-pack-quantized"),
}


@pytest.mark.parametrize("case,dtype", [(case, torch.bfloat16) for case in CASES]
                         + [("int4-asym", torch.float16), ("fp8-block", torch.float16)])
def test_exported_folder_decompresses_to_lowbit_weights(bf16_dir, tmp_path, case, dtype):
    fmt, options, ct_format = CASES[case]
    model = _quantized(bf16_dir, fmt, options, dtype)
    folder = export_compressed_tensors(model, tmp_path / "ct")
    quantization = _check_config_groups(folder, ct_format)
    assert quantization["ignore"] == ["lm_head"]
    assert [group["targets"] for group in quantization["config_groups"].values()] == [["Linear"]]
    oracle = _decompressed(folder, dtype)
    for name, layer in _layers(model).items():  # compressed-tensors' decompression: lowbit's weights, bit for bit
        assert torch.equal(oracle.get_submodule(name).weight, lowbit.get_format(fmt).dequantize(layer.packed)), name
    imported = ct_import.load_compressed_tensors(folder)
    assert {n: m.metadata() for n, m in _layers(imported).items()} == {n: m.metadata() for n, m in _layers(model).items()}
    state, back = model.state_dict(), imported.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    assert torch.equal(oracle.lm_head.weight, oracle.model.embed_tokens.weight)  # still tied
    with torch.no_grad():
        assert torch.equal(imported(IDS).logits, model(IDS).logits)


def test_mixed_formats_get_a_config_group_each_targeting_their_layers(bf16_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
    config = lowbit.QuantConfig("int4", {"group_size": 64}, skip=("lm_head",),
                                overrides={"*.mlp.*": {"format": "fp8", "act": "fp8"}, "*.v_proj": "mxfp4"})
    folder = export_compressed_tensors(lowbit.quantize(model, config), tmp_path / "ct")
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "mixed-precision"
    targets = {group["format"]: group["targets"] for group in quantization["config_groups"].values()}
    assert targets == {
        "pack-quantized": [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qko"],
        "mxfp4-pack-quantized": [f"model.layers.{i}.self_attn.v_proj" for i in range(2)],
        "float-quantized": [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]}
    # the oracle: compressed-tensors' decompression of each layer with its group's scheme (transformers
    # 5.23's CompressedTensorsConfig(dequantize=True) decompresses every dense layer with the first
    # group's scheme, so it cannot load mixed folders, llm-compressor's included)
    tensors = load_file(folder / "model.safetensors")
    for group in quantization["config_groups"].values():
        scheme = _scheme(group)
        compressor = BaseCompressor.get_value_from_registry(group["format"])
        for name in group["targets"]:
            state = {key.removeprefix(f"{name}."): t for key, t in tensors.items() if key.startswith(f"{name}.")}
            layer = _layers(model)[name]
            want = lowbit.get_format(layer.format).dequantize(layer.packed)
            assert torch.equal(compressor.decompress(state, scheme)["weight"].to(want.dtype), want), name
    with torch.no_grad():
        assert torch.equal(ct_import.load_compressed_tensors(folder)(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("arch,fmt,options", [("qwen3_moe", "int4", {"group_size": 32}), ("mixtral", "mxfp4", {}),
                                              ("qwen3_moe", "nvfp4", {})])
def test_moe_experts_are_written_as_the_per_expert_linears_save_pretrained_writes(tmp_path, arch, fmt, options):
    """Each expert's gate / up / down (Mixtral's w1 / w3 / w2) is a Linear of its own, as
    llm-compressor saves MoE models; gate and up are the rows of lowbit's stacked gate_up layer."""
    model = lowbit.quantize(make_tiny_moe(arch, torch.bfloat16), fmt, skip=["lm_head"], **options)
    folder = export_compressed_tensors(model, tmp_path / "ct")
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = quantization["config_groups"].values()
    scheme = _scheme(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    tensors = load_file(folder / "model.safetensors")
    names = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"), "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
    block, gate, up, down = names[arch]
    for layer in range(2):
        experts = model.get_submodule(f"model.layers.{layer}.mlp.experts")
        for expert in range(4):
            stacked = experts.quantized["gate_up_proj"][expert]
            rows = stacked.out_features // 2
            want = {gate: lowbit.get_format(fmt).dequantize(stacked.packed)[:rows],
                    up: lowbit.get_format(fmt).dequantize(stacked.packed)[rows:],
                    down: lowbit.get_format(fmt).dequantize(experts.quantized["down_proj"][expert].packed)}
            for projection, weight in want.items():
                prefix = f"model.layers.{layer}.{block}.experts.{expert}.{projection}."
                state = {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}
                theirs = compressor.decompress(state, scheme)["weight"].to(weight.dtype)
                if fmt == "nvfp4":  # g = 1/t: one bf16 step at rounding ties (see the dense test)
                    assert _within_one_bf16_step(theirs, weight), prefix
                else:
                    assert torch.equal(theirs, weight), prefix
    state, back = model.state_dict(), ct_import.load_compressed_tensors(folder).state_dict()
    assert state.keys() == back.keys()
    for key in state:  # nvfp4's tensor scale t comes back as 1 / (1 / t): within one fp32 step
        assert (back[key].item() == pytest.approx(state[key].item(), rel=2**-23) if key.endswith(".tensor_scale")
                else torch.equal(back[key], state[key])), key


@pytest.mark.parametrize("loaded_from", ["compressed-tensors", "save_pretrained"])
def test_a_loaded_moe_model_exports_its_experts_per_expert_too(tmp_path, loaded_from):
    """A MoE model read back from a compressed-tensors export, or from a save_pretrained folder
    (whose loading records no weight conversion: its checkpoint holds lowbit's experts), exports
    its experts as the same per-expert Linears (they were written fused, which compressed-tensors
    readers refuse), and the export loads with equal logits."""
    model = lowbit.quantize(make_tiny_moe("qwen3_moe", torch.bfloat16), "int4", group_size=32, skip=["lm_head"])
    if loaded_from == "compressed-tensors":
        export_compressed_tensors(model, tmp_path / "first")
    else:
        model.save_pretrained(tmp_path / "first")
    loaded = lowbit.load(tmp_path / "first")
    folder = export_compressed_tensors(loaded, tmp_path / "again")
    names = set(load_file(folder / "model.safetensors"))
    assert {"model.layers.1.mlp.experts.3.up_proj.weight_packed",
            "model.layers.1.mlp.experts.3.down_proj.weight_scale"} <= names
    assert not any("gate_up_proj" in name or name.endswith("experts.down_proj") for name in names)
    again, state = lowbit.load(folder), model.state_dict()
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(again.state_dict()[key], state[key]) for key in state)
    with torch.no_grad():  # (the logits of `model`, built in fp32 and cast, differ: its rotary table is bf16)
        assert torch.equal(again(IDS).logits, loaded(IDS).logits)


def test_scales_the_model_dtype_cannot_hold_are_stored_in_float32(bf16_dir, tmp_path):
    """lowbit's integer scales are float16; a bf16 model stores them in float32 unless each is a
    bf16 value, and a float16 model in float16, so the decompression stays exact."""
    for dtype, stored in [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)]:
        folder = export_compressed_tensors(_quantized(bf16_dir, "int4", {"group_size": 64}, dtype), tmp_path / str(dtype))
        assert load_file(folder / "model.safetensors")["model.layers.0.mlp.up_proj.weight_scale"].dtype == stored


def test_compressed_tensors_folder_exports_to_its_own_tensors(bf16_dir, tmp_path):
    """A folder compressed-tensors wrote, imported and exported again, holds the same tensors."""
    source = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (["Linear"], _args(4, False, "group", 64))})
    out = export_compressed_tensors(ct_import.load_compressed_tensors(source), tmp_path / "again")
    original, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == written.keys()
    for key in original:
        assert original[key].dtype == written[key].dtype and torch.equal(original[key], written[key]), key


def test_export_command_reads_other_libraries_folders(bf16_dir, tmp_path, capsys):
    """`lowbit export` of a folder `lowbit convert` reads: a compressed-tensors one comes back as itself."""
    from lowbit.cli import main

    source = _ct_saved(bf16_dir, tmp_path / "source", {"group_0": (["Linear"], _args(8, True, "channel"))})
    assert main(["export", str(source), str(tmp_path / "out")]) == 0
    assert "(compressed-tensors) -> " in capsys.readouterr().out
    original, written = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)


def test_nvfp4_keeps_codes_and_block_scales_and_inverts_the_tensor_scale(bf16_dir, tmp_path):
    """compressed-tensors divides by its global scale g, lowbit multiplies by t: g = 1/t, and the
    two products round alike except where lowbit's lands on a bf16 rounding tie (measured below)."""
    model = _quantized(bf16_dir, "nvfp4", {"act": "nvfp4", "act_tensor_scale": 0.0123})
    folder = export_compressed_tensors(model, tmp_path / "ct")
    _check_config_groups(folder, "nvfp4-pack-quantized")
    tensors, imported = load_file(folder / "model.safetensors"), ct_import.load_compressed_tensors(folder)
    oracle, differing, total = _decompressed(folder), 0, 0
    for name, layer in _layers(model).items():
        assert tensors[f"{name}.weight_global_scale"].item() == pytest.approx(1 / layer.tensor_scale.item(), rel=1e-7)
        assert tensors[f"{name}.input_global_scale"].item() == pytest.approx(1 / 0.0123, rel=1e-7)
        back = _layers(imported)[name]
        assert torch.equal(back.qweight, layer.qweight) and torch.equal(back.scales, layer.scales)
        assert back.tensor_scale.item() == pytest.approx(layer.tensor_scale.item(), rel=2**-23)
        assert back.attrs["act_tensor_scale"] == pytest.approx(0.0123, rel=2**-23)
        ours, theirs = lowbit.get_format("nvfp4").dequantize(layer.packed).float(), oracle.get_submodule(name).weight.float()
        assert _within_one_bf16_step(theirs, ours)
        differing, total = differing + int((ours != theirs).sum()), total + ours.numel()
    assert differing <= total * 0.01


def test_activation_ordered_layers_are_refused(bf16_dir, tmp_path):
    """A GPTQ desc_act import's groups gather columns from all over K: compressed-tensors 0.20
    refuses the actorder "group" that described them, so lowbit does not write them."""
    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        ct_quantization.QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64, actorder="group")
    model = _quantized(bf16_dir, "int4", {"group_size": 64})
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(0)).int()
    codes = torch.randint(0, 16, (128, 192), generator=torch.Generator().manual_seed(1))
    permuted = integer_layer(codes, 4, 64, torch.full((128, 3), 0.01).half(), None, torch.bfloat16, perm=perm)
    lowbit.api.replace_layer(model, "model.layers.0.mlp.down_proj", lowbit.QuantLinear.from_packed(permuted))
    with pytest.raises(CheckpointError, match=r"layer 'model.layers.0.mlp.down_proj': .*actorder 'group' was removed"):
        export_compressed_tensors(model, tmp_path / "ct")


def test_bit_streams_pack_as_they_unpack():
    for bits in range(1, 9):
        for word_dtype in (torch.int32, torch.uint8):
            codes = torch.randint(0, 2**bits, (3, 77), generator=torch.Generator().manual_seed(bits))
            words = pack_bitstream(codes, bits, word_dtype)
            assert words.dtype == word_dtype and words.shape == (3, -(-77 * bits // torch.iinfo(word_dtype).bits))
            assert torch.equal(unpack_bitstream(words, bits, 77), codes.int())
    # a literal stream: the 11th 3-bit code (6 = 0b110) straddles the first word's end, its low
    # bits 0b10 at bits 30 and 31 (the word's sign bit), its top bit at bit 0 of the second word
    codes = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 6]
    low = sum(code << (3 * i) for i, code in enumerate(codes[:10])) + (0b10 << 30)
    assert pack_bitstream(torch.tensor([codes]), 3, torch.int32).tolist() == [[low - 2**32, 1]]


def test_sharded_export_loads_everywhere(bf16_dir, tmp_path):
    model = _quantized(bf16_dir, "int4", {"group_size": 64})
    folder = export_compressed_tensors(model, tmp_path / "ct", max_shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with torch.no_grad():
        expected = model(IDS).logits
        assert torch.equal(lowbit.load(folder)(IDS).logits, expected)
        assert torch.allclose(_decompressed(folder)(IDS).logits.float(), expected.float(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt,options,message", [
    ("nf4", {}, "format 'nf4' has no compressed-tensors layout"),
    ("lut2", {}, "format 'lut2' has no compressed-tensors layout"),
    ("mxint8", {}, "format 'mxint8' has no compressed-tensors layout"),
    ("fp8_e5m2", {}, "format 'fp8_e5m2' has no compressed-tensors layout"),
    ("mxfp4", {"rotate": "hadamard"}, "rotate='hadamard'"),
    ("mxfp4", {"act": "mxfp4"}, "act='mxfp4' with act_amax_round=None"),
    ("mxfp4", {"act": "nvfp4"}, "act='nvfp4' with act_amax_round=None"),
    ("nvfp4", {"act": "nvfp4"}, "act='nvfp4' without a static act_tensor_scale"),
    ("int4", {}, "in_features 192 is not a multiple of group_size 128"),
])
def test_layers_compressed_tensors_cannot_hold_are_refused_naming_them(bf16_dir, tmp_path, fmt, options, message):
    model = _quantized(bf16_dir, fmt, options)
    with pytest.raises(CheckpointError, match=r"layer 'model\.layers\.\d\.[a-z_.]+': .*" + message.replace("(", r"\(")):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_models_it_cannot_write_are_refused(bf16_dir, tmp_path):
    moe = lowbit.quantize(make_tiny_moe(), "fp8", block=128, skip=["lm_head"])  # gate: 64 of a 128-row block
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.experts.gate_up_proj: rows \[0, 64\) cut its 128-row"):
        export_compressed_tensors(moe, tmp_path / "moe")
    with pytest.raises(CheckpointError, match="a transformers PreTrainedModel is needed"):
        export_compressed_tensors(lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "int4"), tmp_path / "x")
    plain = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir)
    with pytest.raises(CheckpointError, match="no quantized layers"):
        export_compressed_tensors(plain, tmp_path / "plain")
    fractional = _quantized(bf16_dir, "int4", {"group_size": 64})
    fractional.model.layers[1].mlp.up_proj.zeros[1, 2] = 3.5  # lowbit's float16 zero points may be any value
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj': zero point \[2, 1\] = 3.5 is not an int"):
        export_compressed_tensors(fractional, tmp_path / "fractional")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a compressed-tensors folder"):
        export_compressed_tensors(_quantized(bf16_dir, "int8", {}), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep"


def test_export_command_writes_a_folder_that_imports_to_the_same_model(bf16_dir, tmp_path, capsys):
    from lowbit.cli import main

    assert main(["quantize", str(bf16_dir), str(tmp_path / "lowbit"), "--format", "int4", "--group-size", "64",
                 "--skip", "lm_head"]) == 0
    assert main(["export", str(tmp_path / "lowbit"), str(tmp_path / "ct")]) == 0
    out = capsys.readouterr().out
    assert "(lowbit) -> " in out and re.search(r"int4 layers: +14, ", out)
    _check_config_groups(tmp_path / "ct", "pack-quantized")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "ct")(IDS).logits, lowbit.load(tmp_path / "lowbit")(IDS).logits)
    assert main(["export", str(tmp_path / "lowbit"), str(tmp_path / "ct")]) == 0  # an earlier export is replaced
    assert main(["export", str(tmp_path / "lowbit"), str(tmp_path / "lowbit")]) == 2
    assert "not a compressed-tensors folder" in capsys.readouterr().err
