"""Importing bitsandbytes 4-bit NF4 / FP4 and 8-bit folders (lowbit/integrations/bnb_import.py): the folders are
written by real bitsandbytes (its CPU backend) through transformers' BitsAndBytesConfig and
save_pretrained."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import CheckpointError
from lowbit.formats import bitpack

from ..conftest import bf16_llama_dir, requires_gpu
from ..damage import damaged_copy, loads_and_runs_or_refuses

bnb_functional = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


def _bnb_saved(source, out, **options):
    """transformers + bitsandbytes: load `source` quantized to 4 bits, save it to `out`; (model, out)."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **options)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
    return model, out


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return bf16_llama_dir(tmp_path_factory.mktemp("bf16"))


def _four_bit_layers(model):
    return {name: module for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"}


FOUR_BIT = {"nf4": "nf4", "fp4": "bnb_fp4"}


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_4bit_folder_imports_with_bitsandbytes_weights_bit_for_bit(bf16_dir, tmp_path, quant_type, double_quant):
    bnb_model, folder = _bnb_saved(bf16_dir, tmp_path / "bnb", bnb_4bit_quant_type=quant_type,
                                   bnb_4bit_use_double_quant=double_quant)
    model = lowbit.load(folder)
    layers = _four_bit_layers(bnb_model)
    assert len(layers) == 14  # 7 Linear per layer; lm_head (tied) stays bf16
    fmt = lowbit.get_format(FOUR_BIT[quant_type])
    for name, module in layers.items():
        ours = model.get_submodule(name)
        assert isinstance(ours, lowbit.QuantLinear) and ours.format == fmt.name
        want = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        got = fmt.dequantize(ours.packed)
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # lowbit's codebook layer is F.linear on that weight: the logits of a bf16 model holding the
    # dequantized weights, bit for bit; bitsandbytes' own CPU matmul rounds differently
    reference = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, module in layers.items():
            reference.get_submodule(name).weight.copy_(bnb_functional.dequantize_4bit(module.weight.data,
                                                                                       module.weight.quant_state))
        logits, want = model(IDS).logits, reference(IDS).logits
        bnb_logits = bnb_model(IDS).logits
    assert torch.equal(logits, want)
    assert (logits.float() - bnb_logits.float()).abs().max() <= 0.02 * bnb_logits.float().abs().max()


def test_convert_command_writes_a_lowbit_folder(bf16_dir, tmp_path):
    _, folder = _bnb_saved(bf16_dir, tmp_path / "bnb", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    out = tmp_path / "lowbit"
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "convert", str(folder), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(bitsandbytes 4-bit)" in proc.stdout and "nf4 layers:       14" in proc.stdout
    direct, converted = lowbit.load(folder), lowbit.load(out)
    layers = json.loads((out / "lowbit.json").read_text())["layers"]
    assert len(layers) == 14 and {entry["format"] for entry in layers.values()} == {"nf4"}
    with torch.no_grad():
        assert torch.equal(converted(IDS).logits, direct(IDS).logits)
    # the converted folder is an ordinary lowbit one: it saves the transformers way too
    converted.save_pretrained(tmp_path / "pretrained")
    config = json.loads((tmp_path / "pretrained" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowbit"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantizer_writes_bitsandbytes_codes(minilm_weights, quant_type):
    """lowbit's nf4 / bnb_fp4 quantizers follow bitsandbytes' rounding: on MiniLM's weights they
    write its codes (FP4's second zero, code 8, included) and its block absmax, bit for bit."""
    fmt = lowbit.get_format(FOUR_BIT[quant_type])
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.weight"):
        w = minilm_weights[name]
        n, k = w.shape
        codes_u8, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        flat = codes_u8.flatten()
        theirs = torch.stack([flat >> 4, flat & 15], dim=1).reshape(n, k).int()
        packed = fmt.quantize(w)
        assert torch.equal(bitpack.unpack(packed.qweight, 4, k), theirs), name
        assert torch.equal(packed.absmax.t().flatten(), state.absmax), name
    if quant_type == "fp4":
        assert bool((theirs == 8).any())  # the rule for values in (0, 1/384] was exercised


@pytest.mark.parametrize("quant_type", ["int4", ["nf4"]])  # a list was a TypeError
def test_bad_4bit_quant_type_is_refused_naming_the_field(bf16_dir, tmp_path, quant_type):
    _, folder = _bnb_saved(bf16_dir, tmp_path / "bnb", bnb_4bit_quant_type="fp4")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = quant_type
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"bnb_4bit_quant_type: {re.escape(repr(quant_type))}: expected one "
                                              r"of \['fp4', 'nf4'\]"):
        lowbit.load(folder)


@pytest.fixture(scope="module")
def int8_saved(bf16_dir, tmp_path_factory):
    """(bitsandbytes' 8-bit model, its save_pretrained folder)."""
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=config, device_map="cpu")
    folder = tmp_path_factory.mktemp("bnb8")
    model.save_pretrained(folder)
    return model, folder


def _eight_bit_layers(model):
    return {name: module for name, module in model.named_modules() if type(module).__name__ == "Linear8bitLt"}


def test_8bit_folder_imports_as_int8_rows_with_the_same_codes(bf16_dir, int8_saved):
    bnb_model, folder = int8_saved
    model = lowbit.load(folder)
    layers = _eight_bit_layers(bnb_model)
    assert len(layers) == 14
    for name, module in layers.items():
        ours = model.get_submodule(name)
        assert isinstance(ours, lowbit.QuantLinear) and ours.format == "int8"
        packed, k = ours.packed, module.in_features
        assert packed.attrs == {"group_size": 192 if k == 192 else 128, "symmetric": True}
        codes = bitpack.unpack(packed.qweight, 8, packed.attrs["group_size"])[:, :k]
        assert torch.equal(codes - 128, module.weight.data.int()), name
        assert torch.equal(packed.scales[0], (module.weight.SCB / 127).half()), name
        # bitsandbytes' weight is q * SCB / 127 in fp32; lowbit's rounds the row scale to float16
        # (relative 2^-11 at most) and the product to the model's bf16 (2^-8)
        want = bnb_functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
        got = lowbit.get_format("int8").dequantize(packed)
        assert got.dtype == torch.bfloat16
        assert bool(((got.float() - want).abs() <= (2**-11 + 2**-8 + 2**-18) * want.abs()).all()), name
    reference = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for name in layers:
            weight = lowbit.get_format("int8").dequantize(model.get_submodule(name).packed)
            reference.get_submodule(name).weight.copy_(weight)
        logits, want = model(IDS).logits, reference(IDS).logits
        bnb_logits = bnb_model(IDS).logits  # int8 activations, outlier columns in float16
    assert torch.equal(logits, want)
    assert (logits.float() - bnb_logits.float()).abs().max() <= 0.02 * bnb_logits.float().abs().max()


def test_convert_command_writes_an_int8_folder_from_an_8bit_one(int8_saved, tmp_path, capsys):
    from lowbit.cli import main as cli_main

    _, folder = int8_saved
    out = tmp_path / "lowbit"
    assert cli_main(["convert", str(folder), str(out)]) == 0  # in process: the NF4 test runs the entry point
    stdout = capsys.readouterr().out
    assert "(bitsandbytes 8-bit)" in stdout
    assert "int8 layers:      14" in stdout and "row scales rounded to float16" in stdout
    with torch.no_grad():
        assert torch.equal(lowbit.load(out)(IDS).logits, lowbit.load(folder)(IDS).logits)


@pytest.mark.parametrize("damage,message", [
    ("layout", r"down_proj\.weight_format: \[1\]: only the row-major layout \(0\) is imported"),
    ("minus_128", r"down_proj\.weight: holds -128"),
    ("scb_length", r"down_proj\.SCB: expected torch\.float32 with 128 values, got torch\.float32 \[127\]"),
    ("scb_inf", r"down_proj\.SCB: row absmax values must be finite and >= 0"),
    ("scb_huge", r"down_proj\.SCB: row absmax up to 1e\+07: too large for float16 row scales"),
    ("codes_dtype", r"down_proj\.weight: expected an int8 \[out_features, in_features\] matrix, got torch\.uint8"),
    ("empty", r"down_proj\.weight: an empty layer \(128 out, 0 in features\)"),  # was a ZeroDivisionError
])
def test_damaged_8bit_layers_are_refused_naming_the_tensor(int8_saved, tmp_path, damage, message):
    folder = tmp_path / "bnb8"
    shutil.copytree(int8_saved[1], folder)
    prefix = "model.layers.1.mlp.down_proj"

    def edit(tensors):
        if damage == "layout":
            tensors[f"{prefix}.weight_format"] = torch.tensor(1, dtype=torch.uint8)
        elif damage == "minus_128":
            tensors[f"{prefix}.weight"][3, 5] = -128
        elif damage == "scb_length":
            tensors[f"{prefix}.SCB"] = tensors[f"{prefix}.SCB"][:-1]
        elif damage in ("scb_inf", "scb_huge"):
            tensors[f"{prefix}.SCB"][7] = float("inf") if damage == "scb_inf" else 1e7
        elif damage == "empty":
            tensors[f"{prefix}.weight"] = tensors[f"{prefix}.weight"][:, :0].contiguous()
        else:
            tensors[f"{prefix}.weight"] = tensors[f"{prefix}.weight"].view(torch.uint8)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(folder)


def test_8bit_folder_without_a_dtype_is_refused_naming_the_field(int8_saved, tmp_path):
    folder = tmp_path / "bnb8"
    shutil.copytree(int8_saved[1], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: dtype: expected one of .* got None"):
        lowbit.load(folder)


def test_rows_not_a_multiple_of_64_are_refused_naming_the_tensor(tmp_path):
    """hidden 96: gate_proj's (and the attention's) 96-wide rows split bitsandbytes' 64-weight
    blocks across rows. The first such layer in name order is named."""
    source = bf16_llama_dir(tmp_path / "bf16", hidden=96)
    _, folder = _bnb_saved(source, tmp_path / "bnb", bnb_4bit_quant_type="nf4")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight\.quant_state\.bitsandbytes__nf4"
                                              r": shape: in_features 96 is not a multiple of 64"):
        lowbit.load(folder)


def _rewrite(folder, edit):
    """Apply edit(tensors) to the folder's model.safetensors (bitsandbytes' metadata kept)."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _state_json(tensors, key):
    return json.loads(bytes(tensors[key].tolist()))


def _set_state(tensors, key, state):
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("damage,message", [
    ("blocksize", r"down_proj\.weight\.quant_state\.bitsandbytes__nf4: blocksize: 128: lowbit's codebook formats take "
                  r"blocks of 64"),
    ("quant_map", r"down_proj\.weight\.quant_map: is not bitsandbytes' NF4 code table"),
    ("quant_type", r"down_proj\.weight\.quant_state\.bitsandbytes__nf4: quant_type: 'fp4', expected 'nf4'"),
    ("other_layer", r"up_proj\.weight\.quant_state\.bitsandbytes__fp4: a layer of another quant type"),
    ("codes", r"down_proj\.weight: 12287 bytes of codes for a \[128, 192\] weight"),
    ("json", r"down_proj\.weight\.quant_state\.bitsandbytes__nf4: not a JSON quant state"),
    ("nested_absmax", r"down_proj\.weight\.nested_absmax: missing"),
    # a nested block past the layer's blocks was an overflow in repeat_interleave
    ("nested_blocksize", r"down_proj\.weight\.nested_absmax: expected torch\.float32 with 1 values, got "),
    ("nested_offset", r"down_proj\.weight\.quant_state\.bitsandbytes__nf4: double quantization without an int "
                      r"nested_blocksize and a number nested_offset \(finite in float32\)"),
])
def test_damaged_layers_are_refused_naming_the_tensor(bf16_dir, tmp_path, damage, message):
    _, folder = _bnb_saved(bf16_dir, tmp_path / "bnb", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    prefix = "model.layers.1.mlp.down_proj.weight"
    state_key = f"{prefix}.quant_state.bitsandbytes__nf4"

    def edit(tensors):
        if damage == "blocksize":
            _set_state(tensors, state_key, {**_state_json(tensors, state_key), "blocksize": 128})
        elif damage == "quant_map":
            tensors[f"{prefix}.quant_map"] = tensors[f"{prefix}.quant_map"].flip(0)
        elif damage == "quant_type":
            _set_state(tensors, state_key, {**_state_json(tensors, state_key), "quant_type": "fp4"})
        elif damage == "other_layer":
            up = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__"
            tensors[f"{up}fp4"] = tensors.pop(f"{up}nf4")
        elif damage == "codes":
            tensors[prefix] = tensors[prefix][:-1]
        elif damage == "json":
            tensors[state_key] = tensors[state_key][:-2]
        elif damage == "nested_blocksize":
            _set_state(tensors, state_key, {**_state_json(tensors, state_key), "nested_blocksize": 2**70})
        elif damage == "nested_offset":
            _set_state(tensors, state_key, {**_state_json(tensors, state_key), "nested_offset": 1e39})
        else:
            del tensors[f"{prefix}.nested_absmax"]

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(folder)


@pytest.fixture(scope="module")
def nf4_double_quant_folder(bf16_dir, tmp_path_factory):
    return _bnb_saved(bf16_dir, tmp_path_factory.mktemp("nf4"), bnb_4bit_quant_type="nf4",
                      bnb_4bit_use_double_quant=True)[1]


@pytest.mark.parametrize("source", ["nf4_double_quant_folder", "int8_saved"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_import_against_random_damage(request, tmp_path_factory, source, data):
    """Any config.json or quant-state value replaced by a JSON value of any type, or any tensor
    cut, cast, reshaped, overwritten in places or removed: CheckpointError or a model that runs
    (this found a list as quant_type -> TypeError, a huge nested_blocksize -> an overflow, an
    8-bit weight of 0 columns -> ZeroDivisionError)."""
    folder = tmp_path_factory.mktemp("damaged") / "folder"
    saved = request.getfixturevalue(source)
    damaged_copy(data, saved[1] if source == "int8_saved" else saved, folder, json_tensor_suffix=".quant_state.")
    loads_and_runs_or_refuses(folder, IDS)


def test_convert_refuses_dfloat11_options_and_other_folders(bf16_dir, tmp_path, capsys):
    from lowbit.cli import main as cli_main

    _, folder = _bnb_saved(bf16_dir, tmp_path / "bnb", bnb_4bit_quant_type="nf4")
    assert cli_main(["convert", str(folder), str(tmp_path / "a"), "--segment", "64"]) == 2
    assert "--segment is a dfloat11 option" in capsys.readouterr().err
    assert cli_main(["convert", str(bf16_dir), str(tmp_path / "b")]) == 2
    assert "not a GGUF file, a dfloat11 package folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nf4", "fp4", "8bit"])
def test_gpu_imported_layers_match_the_cpu_import_and_bitsandbytes_cuda(bf16_dir, tmp_path, kind):
    """A folder bitsandbytes quantized and saved on the GPU: lowbit's import runs its Triton kernels
    there, close to the CPU import (torch reference) and to bitsandbytes' own CUDA layers."""
    config = (transformers.BitsAndBytesConfig(load_in_8bit=True) if kind == "8bit" else
              transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                              bnb_4bit_compute_dtype=torch.bfloat16))
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=config,
                                                                  device_map="cuda")
    bnb_model.save_pretrained(tmp_path / "bnb")
    on_cpu, on_gpu = lowbit.load(tmp_path / "bnb"), lowbit.load(tmp_path / "bnb", device="cuda")
    assert {m.format for m in on_gpu.modules() if isinstance(m, lowbit.QuantLinear)} == {FOUR_BIT.get(kind, "int8")}
    with torch.no_grad():
        expected = on_cpu(IDS).logits.float()
        got = on_gpu(IDS.cuda()).logits.float().cpu()
        theirs = bnb_model(IDS.cuda()).logits.float().cpu()
    assert (got - expected).norm() / expected.norm() < 1e-2
    assert (got - theirs).abs().max() <= 0.02 * theirs.abs().max()
