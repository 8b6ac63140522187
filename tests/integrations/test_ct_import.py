"""Importing compressed-tensors pack-quantized folders (lowbit/integrations/ct_import.py): the
folders are written by compressed-tensors itself (its quantization lifecycle sets each layer up,
min-max scales come from its calculate_qparams as llm-compressor's default observer computes them,
its ModelCompressor packs them), and the oracle is transformers loading them with
CompressedTensorsConfig(dequantize=True), i.e. compressed-tensors' own decompression."""
import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.api import replace_layer
from lowbit.errors import CheckpointError
from lowbit.formats import bitpack
from lowbit.integrations import ct_import
from lowbit.kernels.fp8_w8a8 import W8A8_MIN_M

from ..conftest import bf16_llama_dir, kernel_devices, make_tiny_moe, nudge_norm_weights, requires_gpu
from ..damage import damaged_copy, loads_and_runs_or_refuses

transformers = pytest.importorskip("transformers")
ct_quantization = pytest.importorskip("compressed_tensors.quantization")
ct_compressors = pytest.importorskip("compressed_tensors.compressors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return bf16_llama_dir(tmp_path_factory.mktemp("bf16"))


def _args(bits, symmetric=True, strategy="group", group_size=64):
    return ct_quantization.QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                                            group_size=group_size if strategy == "group" else None)


def _fp8_args(strategy, block=128):
    """(weights, input activations) QuantizationArgs of FP8 W8A8 as llm-compressor's FP8_DYNAMIC /
    FP8_BLOCK recipes write them."""
    weights = ct_quantization.QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy,
                                               block_structure=[block, block] if strategy == "block" else None)
    activations = ct_quantization.QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=True,
                                                   strategy="group" if strategy == "block" else "token",
                                                   group_size=block if strategy == "block" else None)
    return weights, activations


def _min_max(args, w):
    """The weight's min and max per scale group of `args` (as llm-compressor's observer takes them)."""
    n, k = w.shape
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if args.strategy == "block":
        side = args.block_structure[0]
        tiles = torch.nn.functional.pad(w, (0, -k % side, 0, -n % side)).reshape(-(-n // side), side, -1, side)
        return tiles.amin((1, 3)), tiles.amax((1, 3))
    groups = w.reshape(n, -1, args.group_size if args.strategy in ("group", "tensor_group") else k)  # K % size == 0
    return groups.amin(-1), groups.amax(-1)


def _preset(name):
    """(targets, weights[, input activations]) of one of compressed-tensors' preset schemes on every Linear."""
    scheme = ct_quantization.preset_name_to_scheme(name, ["Linear"])
    return (["Linear"], scheme.weights) + ((scheme.input_activations,) if scheme.input_activations else ())


def _input_amax(model):
    """{Linear name: amax of its input on IDS}, the min-max calibration of static activation scales."""
    amax = {}
    def record(name):
        return lambda module, inputs, output: amax.__setitem__(name, inputs[0].abs().amax())

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        model(IDS)
    for hook in hooks:
        hook.remove()
    return amax


def _set_min_max_qparams(model, input_amax, scale_dtype=None, fused=()):
    """Set the quantization parameters compressed-tensors' lifecycle gave each quantized module of
    `model`: min-max weight scales and zero points (calculate_qparams, llm-compressor's default
    observer), NVFP4's global scales as llm-compressor's generate_gparam sets them (the least of
    them for each group of module names in `fused`, as its update_fused_layer_weight_global_scales
    gives gate and up one), the activations' from `input_amax` ({name: input amax}); scale_dtype:
    see `_ct_saved`."""
    modules = {name: m for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    global_scales = {name: generate_gparam(m.weight.data.amin(), m.weight.data.amax())
                     for name, m in modules.items() if hasattr(m, "weight_global_scale")}
    for group in (group for group in fused if group[0] in global_scales):  # NVFP4 only
        global_scales.update(dict.fromkeys(group, torch.cat([global_scales[name] for name in group]).min().reshape(1)))
    for name, module in modules.items():
        scheme, global_scale = module.quantization_scheme, global_scales.get(name)
        if global_scale is not None:
            module.weight_global_scale.data.copy_(global_scale)
        scale, zero = calculate_qparams(*_min_max(scheme.weights, module.weight.data), scheme.weights,
                                        global_scale=global_scale)
        if scale_dtype is not None:
            scale = scale.to(scale_dtype).to(scale.dtype)
        if hasattr(module, "input_global_scale"):
            amax = input_amax[name].float()
            module.input_global_scale.data.copy_(generate_gparam(-amax, amax))
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))


def _ct_saved(source, out, groups, fmt="pack-quantized", qdq_logits=False, dtype=torch.bfloat16, scale_dtype=None):
    """compressed-tensors: quantize the model at `source` (in `dtype`) with `groups` ({name:
    (targets, weights QuantizationArgs[, input activations QuantizationArgs])}; min-max scales,
    NVFP4's global scales as llm-compressor's generate_gparam sets them, the activations' from
    the input amax on IDS), compress it to `fmt` (None: the format compressed-tensors infers, as
    llm-compressor saves) and save it to `out`. qdq_logits: also return the logits of IDS through
    the quantized model before compression, which runs compressed-tensors' own
    quantize-dequantize forward (weights and activations). scale_dtype: round the weight scales
    through it first (float16: an fp32 model whose scales lowbit's integer layers hold exactly)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    input_amax = _input_amax(model)
    schemes = {name: ct_quantization.QuantizationScheme(targets=targets, weights=args[0],
                                                        input_activations=args[1] if len(args) > 1 else None)
               for name, (targets, *args) in groups.items()}
    ct_quantization.apply_quantization_config(model, ct_quantization.QuantizationConfig(config_groups=schemes,
                                                                                        ignore=["lm_head"]))
    _set_min_max_qparams(model, input_amax, scale_dtype)
    if qdq_logits:
        with torch.no_grad():
            logits = model(IDS).logits
    compressor = ct_compressors.ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    return (out, logits) if qdq_logits else out


def _decompressed(folder, dtype=torch.bfloat16):
    config = transformers.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: the folder's own quantization_config is used
        return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype)


def _quant_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}


@pytest.mark.parametrize("bits,symmetric,strategy", [(4, True, "group"), (4, False, "group"), (8, True, "channel"),
                                                     (8, False, "channel"), (2, True, "group"), (3, True, "group"),
                                                     (5, False, "group"), (6, True, "channel"), (7, False, "channel")])
def test_pack_quantized_folder_imports_bit_for_bit(bf16_dir, tmp_path, bits, symmetric, strategy):
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (["Linear"], _args(bits, symmetric, strategy))})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lowbit.load(folder)
    assert not [w for w in caught if "float16 values" in str(w.message)]  # every bf16 scale is a float16 one
    reference = _decompressed(folder)
    layers = _quant_layers(model)
    assert len(layers) == 14  # 7 Linear per layer; lm_head is ignored (and tied)
    saw_lowest_code = False
    for name, layer in layers.items():
        packed = layer.packed
        assert layer.format == f"int{bits}" and packed.attrs["symmetric"] is symmetric
        k = packed.shape[1]
        assert packed.attrs["group_size"] == (64 if strategy == "group" else -(-k // 32) * 32)
        got = lowbit.get_format(layer.format).dequantize(packed)
        want = reference.get_submodule(name).weight
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name
        codes = bitpack.unpack(packed.qweight, bits, packed.qweight.shape[1] * 32 // bits)
        saw_lowest_code |= bool((codes == 0).any())
    if symmetric:  # q = -2^(b-1): compressed-tensors' symmetric range, outside lowbit's own quantizer's
        assert saw_lowest_code
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


@pytest.mark.parametrize("bits,symmetric,strategy", [(8, True, "channel"), (4, False, "group")])
def test_naive_quantized_integer_folder_imports_bit_for_bit(bf16_dir, tmp_path, bits, symmetric, strategy):
    """Integer codes stored one per int8 ("naive-quantized": weight int8 [N, K], asymmetric zero
    points int8 [N, G]) go through the int8-code path to the same layers as packed ones."""
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (["Linear"], _args(bits, symmetric, strategy))},
                       fmt="naive-quantized")
    stored = load_file(folder / "model.safetensors")
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    model, reference = lowbit.load(folder), _decompressed(folder)
    layers = _quant_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.format == f"int{bits}" and layer.packed.attrs["symmetric"] is symmetric
        got = lowbit.get_format(layer.format).dequantize(layer.packed)
        assert torch.equal(got.view(torch.int16), reference.get_submodule(name).weight.view(torch.int16)), name
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


@pytest.mark.skipif(not kernel_devices(), reason="Triton cannot run here")
def test_triton_kernel_decodes_the_lowest_symmetric_code(bf16_dir, tmp_path):
    """Symmetric layers imported from compressed-tensors hold code 0 (q = -8); the Triton kernel
    decodes it as the reference does."""
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (["Linear"], _args(4))})
    device = kernel_devices()[0]
    packed = lowbit.load(folder).model.layers[0].self_attn.q_proj.packed.to(device)
    assert bool((bitpack.unpack(packed.qweight.cpu(), 4, 128) == 0).any())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).bfloat16().to(device)
    expected = torch.nn.functional.linear(x.float(), lowbit.get_format("int4").dequantize(packed).float())
    got = lowbit.linear(x, packed, None, backend="triton").float()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_mixed_config_groups(tmp_path):
    """Two config groups matched by regular expression, as compressed-tensors matches them: the
    attention in int4 (asymmetric, groups of 32 on 96-wide rows), the MLP in int8 per channel."""
    source = bf16_llama_dir(tmp_path / "bf16", hidden=96)
    folder = _ct_saved(source, tmp_path / "ct", {"attention": (["re:.*self_attn.*"],
                                                               _args(4, symmetric=False, group_size=32)),
                                                 "mlp": (["re:.*mlp.*"], _args(8, strategy="channel"))})
    model = lowbit.load(folder)
    formats = {name: layer.format for name, layer in _quant_layers(model).items()}
    assert formats["model.layers.0.self_attn.q_proj"] == "int4" and formats["model.layers.1.mlp.down_proj"] == "int8"
    assert set(formats.values()) == {"int4", "int8"} and len(formats) == 14
    # the oracle is compressed-tensors' decompression of each layer with its group's scheme
    # (transformers 5.23's dequantize=True loading applies one group's scheme to every layer)
    stored = load_file(folder / "model.safetensors")
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    for name, layer in _quant_layers(model).items():
        (group,) = [g for g in groups.values() if ("self_attn" in g["targets"][0]) == ("self_attn" in name)]
        scheme = ct_quantization.QuantizationScheme(**group)
        fields = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        state = {f: stored[f"{name}.{f}"] for f in fields if f"{name}.{f}" in stored}
        want = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        got = lowbit.get_format(layer.format).dequantize(layer.packed)
        assert want.dtype == got.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name


@pytest.mark.parametrize("scheme", ["int4", "MXFP4"])
def test_convert_command_writes_a_lowbit_folder(bf16_dir, tmp_path, capsys, scheme):
    """The converted folder loads to the same model (MXFP4: with its activation rule)."""
    from lowbit.cli import main as cli_main

    group = (["Linear"], _args(4, symmetric=False)) if scheme == "int4" else _preset(scheme)
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": group}, fmt=None)
    out = tmp_path / "lowbit"
    assert cli_main(["convert", str(folder), str(out)]) == 0  # in process (the bnb test runs the entry point)
    stdout = capsys.readouterr().out
    fmt = "int4" if scheme == "int4" else "mxfp4"
    assert "(compressed-tensors)" in stdout and f"{fmt + ' layers:':<18}14" in stdout
    layers = json.loads((out / "lowbit.json").read_text())["layers"]
    assert {entry["format"] for entry in layers.values()} == {fmt}
    if scheme == "MXFP4":
        assert {entry["attrs"]["act_amax_round"] for entry in layers.values()} == {1}
    with torch.no_grad():
        assert torch.equal(lowbit.load(out)(IDS).logits, lowbit.load(folder)(IDS).logits)


@pytest.fixture(scope="module")
def int4_folder(bf16_dir, tmp_path_factory):
    return _ct_saved(bf16_dir, tmp_path_factory.mktemp("ct4"), {"group_0": (["Linear"], _args(4, symmetric=False))})


@pytest.fixture(scope="module")
def mxfp4_folder(bf16_dir, tmp_path_factory):
    return _ct_saved(bf16_dir, tmp_path_factory.mktemp("mxfp4"), {"group_0": _preset("MXFP4A16")}, fmt=None)


@pytest.fixture(scope="module")
def fp8_block_folder(bf16_dir, tmp_path_factory):
    return _ct_saved(bf16_dir, tmp_path_factory.mktemp("fp8"), {"group_0": (["Linear"], *_fp8_args("block"))}, fmt=None)


@pytest.fixture(scope="module")
def w8a8_folder(bf16_dir, tmp_path_factory):
    return _ct_saved(bf16_dir, tmp_path_factory.mktemp("w8a8"), {"group_0": _preset("W8A8")}, fmt=None)


def _copy(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "ct")
    return tmp_path / "ct"


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


GROUP = "quantization_config.config_groups.group_0"


@pytest.mark.parametrize("source,edit,message", [("int4_folder", *case) for case in [
    (lambda q: q["config_groups"]["group_0"].update(format="marlin-24"),
     rf"{GROUP}\.format: 'marlin-24': lowbit imports 'pack-quantized', 'int-quantized', "
     r"'float-quantized', 'naive-quantized', 'nvfp4-pack-quantized'"),
    (lambda q: q["config_groups"]["group_0"].update(format=["pack-quantized"]),  # was a TypeError
     rf"{GROUP}\.format: \['pack-quantized'\]: lowbit imports 'pack-quantized'"),
    (lambda q: q["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"),
     rf"{GROUP}\.weights\.type: 'int': nvfp4-pack-quantized layers hold float weights"),
    (lambda q: q["config_groups"]["group_0"].update(format="float-quantized"),
     rf"{GROUP}\.weights\.type: 'int': float-quantized layers hold float weights"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=9),
     rf"{GROUP}\.weights\.num_bits: 9: lowbit imports 2- to 8-bit integer weights"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4.0),  # was an IndexError
     rf"{GROUP}\.weights\.num_bits: 4\.0: lowbit imports 2- to 8-bit integer weights"),
    (lambda q: q["config_groups"]["group_0"].update(targets=["re:("]),  # was a re.error
     rf"{GROUP}\.targets: '\(' is not a regular expression"),
    (lambda q: q.update(version="0.19.1") or q["config_groups"]["group_0"]["weights"].update(num_bits=3),
     r"quantization_config\.version: '0\.19\.1': lowbit imports packed 3-bit codes from compressed-tensors 0\.20"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=48),
     rf"{GROUP}\.weights\.group_size: 48: lowbit's groups are a positive multiple of 32 long, or 16"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=16) or q["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}),
     rf"{GROUP}\.input_activations: quantized activations with weight groups of 16"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 4, "type": "int"}),
     rf"{GROUP}\.input_activations: lowbit quantizes activations dynamically to int8 or E4M3, symmetric, per token; "
     r"got type/num_bits/dynamic/symmetric/strategy/group_size \['int', 4, None"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), r"quantization_config\.kv_cache_scheme: is set"),
    (lambda q: q["config_groups"]["group_0"].update(targets=["re:.*mlp.*"]),
     r"config_groups: layer 'model\.layers\.0\.self_attn\.k_proj': no config group targets it"),
]] + [("mxfp4_folder", *case) for case in [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=64),
     rf"{GROUP}\.weights: mxfp4-pack-quantized weights are num_bits/strategy/group_size/symmetric/dynamic/"
     r"scale_dtype \[4, 'group', 32, True, False, 'torch\.uint8'\], got \[4, 'group', 64"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations=dict(
        num_bits=8, type="float", symmetric=True, dynamic=True, strategy="group", group_size=128)),
     rf"{GROUP}\.input_activations: lowbit quantizes MX activations dynamically to MXFP4, MXFP6 or MXFP8"),
]])
def test_schemes_lowbit_does_not_hold_are_refused_naming_the_field(request, tmp_path, source, edit, message):
    folder = _copy(request.getfixturevalue(source), tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(folder)


def test_a_target_that_backtracks_without_end_is_refused(int4_folder, tmp_path, monkeypatch):
    """A "re:" target is matched under foreign_folder's time limit (shortened here): with Python's
    re, a target such as "re:(.*.*)*x" hung the load (killed after 60 s)."""
    from lowbit.integrations import foreign_folder

    folder = _copy(int4_folder, tmp_path)
    _edit_config(folder, lambda q: q["config_groups"]["group_0"].update(targets=[r"re:(.*?)*(?=x)\1"]))
    monkeypatch.setattr(foreign_folder, "MATCH_TIMEOUT_S", 0.2)
    with pytest.raises(CheckpointError, match=rf"{GROUP}\.targets: .* took over 0\.2 s to match 'model\.layers\.0\."):
        lowbit.load(folder)


LAYER = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("source,damage,message", [
    ("int4_folder", "packed",
     rf"{LAYER}\.weight_packed: expected torch\.int32 \[128, 24\], got torch\.int32 \[128, 23\]"),
    ("int4_folder", "zero_point", rf"{LAYER}\.weight_zero_point: missing"),
    ("int4_folder", "g_idx", rf"{LAYER}\.weight_g_idx: groups do not each hold 64 columns"),
    ("int4_folder", "scale", rf"{LAYER}\.weight_scale: values up to 9\.99e\+05: not finite in float16"),
    ("int4_folder", "experts", rf"{LAYER}\.weight_shape: 3-D: fused expert weights are not imported"),
    ("mxfp4_folder", "packed",
     rf"{LAYER}\.weight_packed: expected torch\.uint8 \[128, 96\], got torch\.uint8 \[128, 95\]"),
    ("mxfp4_folder", "nan scale", rf"{LAYER}\.weight_scale: holds NaN scales"),
    ("w8a8_folder", "empty", rf"{LAYER}\.weight: an empty layer \(128 out, 0 in features\)"),  # was ZeroDivisionError
])
def test_damaged_layers_are_refused_naming_the_tensor(request, tmp_path, source, damage, message):
    folder = _copy(request.getfixturevalue(source), tmp_path)

    def edit(tensors):
        if damage == "packed":
            tensors[f"{LAYER}.weight_packed"] = tensors[f"{LAYER}.weight_packed"][:, :-1].contiguous()
        elif damage == "nan scale":
            tensors[f"{LAYER}.weight_scale"][3, 2] = 255  # E8M0 NaN
        elif damage == "zero_point":
            del tensors[f"{LAYER}.weight_zero_point"]
        elif damage == "g_idx":
            tensors[f"{LAYER}.weight_g_idx"] = torch.zeros(192, dtype=torch.int32)  # one group of 192
        elif damage == "scale":
            tensors[f"{LAYER}.weight_scale"][5, 1] = 1e6
        elif damage == "empty":
            tensors[f"{LAYER}.weight"] = tensors[f"{LAYER}.weight"][:, :0].contiguous()
        else:
            tensors[f"{LAYER}.weight_shape"] = torch.tensor([2, 128, 192])

    _edit_tensors(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(folder)


@pytest.fixture(scope="module")
def nvfp4_moe_folder(tmp_path_factory):
    return _ct_moe_folder(tmp_path_factory.mktemp("moe") / "ct", _preset("NVFP4A16")[1:], None)[0]


@pytest.mark.parametrize("source", ["int4_folder", "w8a8_folder", "fp8_block_folder", "mxfp4_folder", "nvfp4_moe_folder"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_import_against_random_damage(request, tmp_path_factory, source, data):
    """Any config.json value replaced by a JSON value of any type, or any tensor cut, cast,
    reshaped, overwritten in places or removed: CheckpointError or a model that runs (this found
    an object as a group's format -> TypeError, an int8 weight of 0 columns -> ZeroDivisionError)."""
    folder = tmp_path_factory.mktemp("damaged") / "folder"
    damaged_copy(data, request.getfixturevalue(source), folder)
    loads_and_runs_or_refuses(folder, IDS)


def test_activation_ordered_groups_import_with_an_input_permutation(int4_folder, tmp_path):
    """actorder "group" (weight_g_idx: each column's group, groups gathering columns from all over
    K): the layer stores the order that makes its groups consecutive; its weight is
    (q - z[g_idx[k]]) * scale[g_idx[k]] column by column (compressed-tensors 0.20's decompression
    no longer reads g_idx, so the oracle is that rule on the codes of the plain import, which
    equal compressed-tensors' above), and its logits follow."""
    plain = lowbit.load(int4_folder).get_submodule(LAYER).packed
    g_idx = torch.empty(192, dtype=torch.long)
    g_idx[torch.randperm(192, generator=torch.Generator().manual_seed(0))] = torch.arange(192) // 64
    folder = _copy(int4_folder, tmp_path)
    _edit_tensors(folder, lambda tensors: tensors.__setitem__(f"{LAYER}.weight_g_idx", g_idx.to(torch.int32)))
    model = lowbit.load(folder)
    packed = model.get_submodule(LAYER).packed
    assert packed.attrs["permuted"] is True
    codes = bitpack.unpack(plain.qweight, 4, 192).float()
    want = ((codes - plain.zeros.t().float()[:, g_idx]) * plain.scales.t().float()[:, g_idx]).bfloat16()
    assert torch.equal(lowbit.get_format("int4").dequantize(packed), want)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(1)).bfloat16()
    torch.testing.assert_close(lowbit.linear(x, packed), torch.nn.functional.linear(x, want))


def test_scales_float16_cannot_hold_are_rounded_with_a_warning(int4_folder, tmp_path):
    """A bf16 scale below 2^-17 has more significant bits than a float16 subnormal: lowbit rounds
    it to the nearest float16 and says how many it rounded."""
    folder = _copy(int4_folder, tmp_path)
    tiny = torch.tensor(3e-7, dtype=torch.bfloat16)
    assert float(tiny.half()) != float(tiny)
    _edit_tensors(folder, lambda tensors: tensors[f"{LAYER}.weight_scale"].__setitem__((5, 1), tiny))
    with pytest.warns(UserWarning, match=r"1 of \d+ weight scales are not float16 values"):
        model = lowbit.load(folder)
    scales = model.get_submodule(LAYER).packed.scales
    assert float(scales[1, 5]) == float(tiny.half())


def _relative_distance(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int4", "int8-asymmetric", "w8a8-int8", "fp8-dynamic", "fp8-block", "NVFP4A16",
                                    "NVFP4", "MXFP4", "MXFP6A8"])
def test_gpu_imported_layers_match_the_cpu_import(bf16_dir, tmp_path, scheme):
    """On CUDA the imported layers run lowbit's kernels: close to the CPU import (torch reference),
    whose weights equal compressed-tensors' decompressed ones (tested above).

    Layer by layer, on the same 40-row input (from W8A8_MIN_M rows the GPU quantizes int8 / FP8
    activations as the reference does), within 1% (the kernels' summation order). The whole model
    within 1% too where activations stay in 16 bits; where they are quantized, a rounding-sized
    difference upstream moves a value across a rounding boundary of the activation codes, and the
    model's logits amplify that: the second H100 run's GPU logits were 1.1% (w8a8-int8), 2.5%
    (fp8-dynamic), 3.2% (fp8-block) and 8.6% (NVFP4) from the CPU's, as far as the CPU import's
    own logits move when a fifth of its norm weights go up by one bf16 ulp (`nudge_norm_weights`:
    1.3%, 3.3%, 3.4%, 11%; 0.8% for the weight-only schemes). So there the bound is twice that
    movement, measured here."""
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    assert ids.numel() >= W8A8_MIN_M
    int8_tokens = ct_quantization.QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True,
                                                   strategy="token")
    args = {"int4": (_args(4),), "int8-asymmetric": (_args(8, False, "channel"),),
            "w8a8-int8": (_args(8, strategy="channel"), int8_tokens),
            "fp8-dynamic": _fp8_args("channel"), "fp8-block": _fp8_args("block")}.get(scheme)
    targets_and_args = (["Linear"], *args) if args else _preset(scheme)
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": targets_and_args}, fmt=None)  # as inferred
    on_cpu, on_gpu = lowbit.load(folder), lowbit.load(folder, device="cuda")
    generator = torch.Generator().manual_seed(2)
    layers = {name: layer for name, layer in on_cpu.named_modules() if isinstance(layer, lowbit.QuantLinear)}
    assert layers
    with torch.no_grad():
        for name, layer in layers.items():
            x = torch.randn(ids.numel(), layer.in_features, generator=generator).bfloat16()
            got = on_gpu.get_submodule(name)(x.cuda()).cpu()
            assert _relative_distance(got, layer(x)) < 1e-2, name
        expected = on_cpu(ids).logits
        got = on_gpu(ids.cuda()).logits.cpu()
        bound = 1e-2
        if any(layer.packed.attrs.get("act") for layer in layers.values()):
            bound = 2 * _relative_distance(nudge_norm_weights(lowbit.load(folder))(ids).logits, expected)
    assert _relative_distance(got, expected) < bound


@pytest.mark.parametrize("strategy,dynamic_activations", [("channel", True), ("tensor", True), ("block", True),
                                                          ("channel", False)])
def test_float_quantized_folder_imports_as_fp8(bf16_dir, tmp_path, strategy, dynamic_activations):
    """FP8 (E4M3) weights per channel, per tensor or per 128 x 128 block, with dynamic FP8
    activations (llm-compressor's FP8_DYNAMIC / FP8_BLOCK) or none (W8A16): lowbit `fp8` layers
    with the same elements and scales, act="fp8" for the dynamic activations."""
    weights, activations = _fp8_args(strategy)
    scheme = (["Linear"], weights, activations) if dynamic_activations else (["Linear"], weights)
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": scheme}, fmt="float-quantized")
    model, reference = lowbit.load(folder), _decompressed(folder)
    layers = _quant_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.format == "fp8"
        assert layer.packed.attrs == {"block": 128 if strategy == "block" else None,
                                      "act": "fp8" if dynamic_activations else None}
        got = lowbit.get_format("fp8").dequantize(layer.packed)
        want = reference.get_submodule(name).weight
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name
    with torch.no_grad():
        logits, want = model(IDS).logits.float(), reference(IDS).logits.float()
    if dynamic_activations:  # lowbit also quantizes the activations; the decompressed model does not
        assert (logits - want).norm() / want.norm() < 0.05
    else:
        assert torch.equal(logits, want)


def test_static_activation_scales_are_refused(bf16_dir, tmp_path):
    weights, activations = _fp8_args("channel")
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (["Linear"], weights, activations)},
                       fmt="float-quantized")
    _edit_config(folder, lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False))
    with pytest.raises(CheckpointError, match=rf"{GROUP}\.input_activations: lowbit quantizes activations "
                                              r"dynamically to E4M3, symmetric, per token; got .*\[.float., 8, False"):
        lowbit.load(folder)


@pytest.mark.parametrize("strategy", ["channel", "block"])
def test_fp8_activation_rule_is_compressed_tensors_dynamic_rule_in_fp32(strategy):
    """act="fp8" quantizes activations as compressed-tensors' dynamic per-token (per group of
    128 with block weights) E4M3 scheme does: on fp32 activations the quantize-dequantize
    results are equal. (On bf16 ones compressed-tensors rounds the scale to bf16 first; lowbit
    keeps it in fp32.)"""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    from lowbit.formats.activations import dequantize_activations, quantize_activations_fp8

    _, args = _fp8_args(strategy)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)) * 3
    x[2, 17] = 40.0  # an outlier token
    scale, zero = compute_dynamic_scales_and_zp(x.unsqueeze(0), args, None)
    theirs = fake_quantize(x.unsqueeze(0), scale, zero, args)[0]
    ours = dequantize_activations(*quantize_activations_fp8(x, 256, 128 if strategy == "block" else None))
    assert torch.equal(ours, theirs)


def test_w8a8_int8_folder_imports_with_int8_activations(bf16_dir, tmp_path):
    """llm-compressor's W8A8 int8 scheme (int8 weights per channel, dynamic int8 activations per
    token), saved as compressed-tensors infers: "int-quantized", the int8 codes unpacked. lowbit:
    `int8` act="int8" layers with the same codes and scales."""
    weights = _args(8, strategy="channel")
    activations = ct_quantization.QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True,
                                                   strategy="token")
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (["Linear"], weights, activations)}, fmt=None)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    model, reference = lowbit.load(folder), _decompressed(folder)
    for name, layer in _quant_layers(model).items():
        assert layer.format == "int8" and layer.packed.attrs == {"group_size": 128 if "down" not in name else 192,
                                                                 "symmetric": True, "act": "int8"}
        got = lowbit.get_format("int8").dequantize(layer.packed)
        assert torch.equal(got.view(torch.int16), reference.get_submodule(name).weight.view(torch.int16)), name
    with torch.no_grad():  # lowbit also quantizes the activations; the decompressed model does not
        logits, want = model(IDS).logits.float(), reference(IDS).logits.float()
    assert (logits - want).norm() / want.norm() < 0.05
    if kernel_devices():  # code 0 (q = -128) through the int8 GEMM (M >= 32), as the W8A8 reference has it
        # an fp32 layer, so that the reference's dequantized weight is exact, as the kernel's is
        packed = dataclasses.replace(model.model.layers[0].self_attn.q_proj.packed, dtype=torch.float32)
        packed = packed.to(kernel_devices()[0])
        assert bool((bitpack.unpack(packed.qweight.cpu(), 8, 128) == 0).any())
        x = torch.randn(33, 128, generator=torch.Generator().manual_seed(2)).to(packed.qweight.device)
        expected = lowbit.linear(x, packed, None, backend="torch")
        got = lowbit.linear(x, packed, None, backend="triton")
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("fmt", [None, "pack-quantized"])
def test_w4a8_folder_imports_with_int8_activations(bf16_dir, tmp_path, fmt):
    """llm-compressor's W4A8 (int4 weights in groups, dynamic int8 activations per token), saved
    as compressed-tensors infers ("int-quantized") or packed: lowbit `int4` act="int8" layers,
    whose logits are close to compressed-tensors' own quantize-dequantize forward (the rules
    differ: lowbit's int8 scale is amax / 127, compressed-tensors' amax / 127.5)."""
    activations = ct_quantization.QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True,
                                                   strategy="token")
    folder, qdq = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (["Linear"], _args(4), activations)}, fmt=fmt,
                            qdq_logits=True)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt or (fmt is None and config["format"] == "int-quantized")
    model = lowbit.load(folder)
    for layer in _quant_layers(model).values():
        assert layer.format == "int4" and layer.packed.attrs == {"group_size": 64, "symmetric": True, "act": "int8"}
    with torch.no_grad():
        logits = model(IDS).logits.float()
    assert (logits - qdq.float()).norm() / qdq.float().norm() < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4afp8_folder_imports_with_fp8_activations(bf16_dir, tmp_path, dtype):
    """compressed-tensors' W4AFP8 preset (int4 weights in groups, symmetric; dynamic E4M3
    activations per token; groups of 64 here, as the test model's K = 192 needs): lowbit `int4`
    act="fp8" layers with the same weights. The activation rule is compressed-tensors' in fp32:
    on an fp32 model (weight scales made float16 values) the logits equal its own
    quantize-dequantize forward up to summation order. On bf16 activations it rounds each token's
    scale and the fake-quantized values to bf16, lowbit keeps fp32: 3.6% of the logits' norm on
    this tiny random model."""
    targets, weights, activations = _preset("W4AFP8")
    weights = weights.model_copy(update={"group_size": 64})
    folder, qdq = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (targets, weights, activations)}, fmt=None,
                            qdq_logits=True, dtype=dtype, scale_dtype=torch.float16)
    model, reference = lowbit.load(folder), _decompressed(folder, dtype)
    layers = _quant_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.format == "int4" and layer.packed.attrs == {"group_size": 64, "symmetric": True,
                                                                 "act": "fp8"}, name
        got = lowbit.get_format("int4").dequantize(layer.packed)
        assert got.dtype == dtype and torch.equal(got, reference.get_submodule(name).weight), name
    with torch.no_grad():
        logits = model(IDS).logits.float()
    error = float((logits - qdq.float()).norm() / qdq.float().norm())
    assert error < (1e-5 if dtype == torch.float32 else 0.05), error


def test_fp8_weight_only_folder_saved_as_naive_quantized(bf16_dir, tmp_path):
    """FP8 weights without activation quantization are saved as "naive-quantized" when
    compressed-tensors infers the format: the same fp8 layers."""
    weights, _ = _fp8_args("channel")
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": (["Linear"], weights)}, fmt=None)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "naive-quantized"
    model, reference = lowbit.load(folder), _decompressed(folder)
    assert {layer.format for layer in _quant_layers(model).values()} == {"fp8"}
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


# -- NVFP4 and MX (microscaled FP4 / FP6 / FP8) ---------------------------------------------------

MICROSCALED = {"NVFP4A16": ("nvfp4-pack-quantized", "nvfp4"), "MXFP4A16": ("mxfp4-pack-quantized", "mxfp4"),
               "MXFP6A16": ("mxfp6-pack-quantized", "mxfp6"), "MXFP8A16": ("mxfp8-quantized", "mxfp8")}


@pytest.mark.parametrize("preset", sorted(MICROSCALED))
def test_microscaled_folder_imports_bit_for_bit(bf16_dir, tmp_path, preset):
    """llm-compressor's weight-only NVFP4 / MX presets, saved in the format compressed-tensors
    infers: lowbit layers of the same format with the same element codes and block scales
    (nvfp4: tensor scale 1 / weight_global_scale), dequantized bit for bit as compressed-tensors
    decompresses them."""
    ct_format, lowbit_format = MICROSCALED[preset]
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": _preset(preset)}, fmt=None)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == ct_format
    assert ct_import.target_format(folder) == lowbit_format  # what `lowbit convert` reports
    model, reference = lowbit.load(folder), _decompressed(folder)
    stored = load_file(folder / "model.safetensors")
    layers = _quant_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.format == lowbit_format and layer.packed.attrs == {"act": None, "rotate": None}
        got = lowbit.get_format(lowbit_format).dequantize(layer.packed)
        want = reference.get_submodule(name).weight
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name
        if lowbit_format == "nvfp4":
            assert torch.equal(layer.packed.tensors["tensor_scale"], 1 / stored[f"{name}.weight_global_scale"])
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


@pytest.mark.parametrize("preset,act,amax_round", [("MXFP4", "mxfp4", 1), ("MXFP8", "mxfp8", 1),
                                                   ("MXFP6A8", "mxfp8", 1)])
def test_mx_activations_import_with_compressed_tensors_rule(bf16_dir, tmp_path, preset, act, amax_round):
    """MX weights with dynamic MX activations (llm-compressor's MXFP4, MXFP8, MXFP6A8): lowbit's
    act of that element with act_amax_round, compressed-tensors' block-exponent rule; the logits
    equal those of compressed-tensors' own quantize-dequantize forward, which lowbit's FLOOR rule
    (act_amax_round unset) does not give."""
    folder, qdq = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": _preset(preset)}, fmt=None, qdq_logits=True)
    model = lowbit.load(folder)
    for layer in _quant_layers(model).values():
        assert layer.packed.attrs == {"act": act, "rotate": None, "act_amax_round": amax_round}
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, qdq)
        for name, layer in _quant_layers(model).items():
            floor = dataclasses.replace(layer.packed, attrs={"act": act, "rotate": None})
            replace_layer(model, name, lowbit.QuantLinear.from_packed(floor, layer.bias))
        assert not torch.equal(model(IDS).logits, qdq)


@pytest.mark.parametrize("name,mantissa_bits", [("mxfp4", 1), ("mxfp6", 3), ("mxfp8", 1)])
def test_mx_activation_rule_is_compressed_tensors_dynamic_rule(name, mantissa_bits):
    """act_amax_round=m quantizes activations as compressed-tensors' dynamic MX scheme does (its
    generate_mx_scales rounds the block amax to FP6's 3 mantissa bits for MXFP6, to FP4's 1
    otherwise), in fp32 and bf16, blocks whose amax has mantissa >= 1.75 included."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    from lowbit.formats.microscaling import MICROSCALING_FORMATS

    bits = {"mxfp4": 4, "mxfp6": 6, "mxfp8": 8}[name]
    args = ct_quantization.QuantizationArgs(num_bits=bits, type="float", symmetric=True, dynamic=True,
                                            strategy="group", group_size=32, scale_dtype=torch.uint8)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(0)) * 3
    x[1, :32] *= 7.9 / x[1, :32].abs().max()  # amax 7.9 = 1.975 * 4
    x[2, 32:64] *= 1.8 / x[2, 32:64].abs().max()
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        scale, zero = compute_dynamic_scales_and_zp(xd.unsqueeze(0), args, None)
        theirs = fake_quantize(xd.unsqueeze(0), scale, zero, args)[0].float()
        ours = MICROSCALING_FORMATS[name].fake_quantize(xd.float(), mantissa_bits)
        assert torch.equal(ours, theirs), dtype
        assert not torch.equal(MICROSCALING_FORMATS[name].fake_quantize(xd.float()), theirs)  # FLOOR differs


def test_nvfp4_w4a4_imports_with_the_calibrated_activation_scale(bf16_dir, tmp_path):
    """llm-compressor's NVFP4 (W4A4): E4M3 scales of 16-activation blocks from each call, times
    the calibrated input_global_scale g -> lowbit act="nvfp4" with act_tensor_scale=1/g. On an
    fp32 model the logits equal compressed-tensors' own quantize-dequantize forward up to fp32
    rounding (its bf16 path rounds amax/6 and the results to bf16; see the README)."""
    folder, qdq = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": _preset("NVFP4")}, fmt=None, qdq_logits=True,
                            dtype=torch.float32)
    stored = load_file(folder / "model.safetensors")
    model = lowbit.load(folder)
    for name, layer in _quant_layers(model).items():
        t = float(1 / stored[f"{name}.input_global_scale"])
        assert layer.packed.attrs == {"act": "nvfp4", "rotate": None, "act_tensor_scale": t}
    with torch.no_grad():
        logits = model(IDS).logits
        assert (logits - qdq).norm() / qdq.norm() < 1e-5
        weight_only = lowbit.load(folder)  # the same layers without the activation quantization
        for name, layer in _quant_layers(weight_only).items():
            plain = dataclasses.replace(layer.packed, attrs={"act": None, "rotate": None})
            replace_layer(weight_only, name, lowbit.QuantLinear.from_packed(plain, layer.bias))
        assert (weight_only(IDS).logits - qdq).norm() / qdq.norm() > 1e-3
    _edit_config(folder, lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=True))
    with pytest.raises(CheckpointError, match=rf"{GROUP}\.input_activations: lowbit quantizes NVFP4 activations as "
                                              r"compressed-tensors' NVFP4 scheme does"):
        lowbit.load(folder)


@pytest.mark.skipif(not kernel_devices(), reason="Triton cannot run here")
@pytest.mark.parametrize("preset", ["NVFP4A16", "MXFP6A8"])
def test_triton_kernels_run_imported_microscaled_layers(bf16_dir, tmp_path, preset):
    """The imported layers through lowbit's Triton kernels (MXFP6A8: MXFP8 activations with
    compressed-tensors' rule) match the torch reference."""
    folder = _ct_saved(bf16_dir, tmp_path / "ct", {"group_0": _preset(preset)}, fmt=None)
    device = kernel_devices()[0]
    packed = lowbit.load(folder).model.layers[1].mlp.down_proj.packed.to(device)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(1)).bfloat16().to(device)
    expected = lowbit.linear(x, packed, None, backend="torch").float()
    got = lowbit.linear(x, packed, None, backend="triton").float()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ct_moe_folder(out, args, fmt="pack-quantized", shared_gate_up_scale=True):
    """A compressed-tensors folder of a tiny bf16 Qwen3-MoE (`make_tiny_moe`; 4 experts per layer,
    stored per expert and fused by transformers when loaded) as llm-compressor saves MoE models:
    every projection (attention and each expert's gate / up / down, as per-expert Linears under
    their checkpoint names) compressed by compressed-tensors with `args` ((weights[, input
    activations]) QuantizationArgs; NVFP4's gate and up share a global scale, as llm-compressor
    gives them, unless not shared_gate_up_scale) to `fmt` (None: the format it infers); (folder,
    oracle model that transformers builds from compressed-tensors' own decompression of those
    Linears)."""
    model = make_tiny_moe("qwen3_moe", torch.bfloat16)
    model.save_pretrained(out)  # transformers writes the per-expert checkpoint names
    stored = load_file(out / "model.safetensors")
    linears = torch.nn.Module()  # one Linear per stored projection, under its checkpoint name
    for key, weight in stored.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name.rsplit(".", 1)[-1] in PROJECTIONS:
            parent = linears
            for part in name.split(".")[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
            layer.weight.data.copy_(weight)
            parent.add_module(name.rsplit(".", 1)[-1], layer)
    scheme = ct_quantization.QuantizationScheme(targets=["Linear"], weights=args[0],
                                                input_activations=args[1] if len(args) > 1 else None)
    ct_quantization.apply_quantization_config(linears, ct_quantization.QuantizationConfig(
        config_groups={"group_0": scheme}))
    gate_up = [(name, name.replace("gate_proj", "up_proj")) for name, _ in linears.named_modules()
               if name.endswith("gate_proj")]
    _set_min_max_qparams(linears, {}, fused=gate_up if shared_gate_up_scale else ())
    compressor = ct_compressors.ModelCompressor.from_pretrained_model(linears, quantization_format=fmt)
    compressor.compress_model(linears)
    compressed = linears.state_dict()
    rest = {k: v for k, v in stored.items() if k.removesuffix(".weight") not in dict(linears.named_modules())}
    save_file({**rest, **compressed}, out / "model.safetensors", metadata={"format": "pt"})
    compressor.update_config(out)
    compressor.decompress_model(linears)
    dequantized = {f"{name}.weight": m.weight.data for name, m in linears.named_modules()
                   if isinstance(m, torch.nn.Linear)}
    oracle = type(model).from_pretrained(None, config=model.config, state_dict={**rest, **dequantized},
                                         dtype=torch.bfloat16).eval()
    return out, oracle


@pytest.mark.parametrize("args,fmt,lowbit_format", [
    ((_args(4, symmetric=False, group_size=32),), "pack-quantized", "int4"), (_preset("MXFP4A16")[1:], None, "mxfp4"),
    (_preset("NVFP4A16")[1:], None, "nvfp4"), (_fp8_args("channel")[:1], None, "fp8")])  # weight-only: logits compare
def test_moe_folder_experts_become_lowbit_quantized_experts(tmp_path, args, fmt, lowbit_format):
    """llm-compressor saves a transformers 5 MoE model's experts as per-expert Linears
    (mlp.experts.E.gate_proj / up_proj / down_proj), which transformers fuses on load: each lands in
    lowbit's quantized experts (gate and up stacked) with compressed-tensors' own decompression as
    its weight (was refused: "the model has no such layer"); lowbit.save and save_pretrained
    folders reload to the same logits."""
    folder, oracle = _ct_moe_folder(tmp_path / "ct", args, fmt)
    model = lowbit.load(folder)
    for index in range(2):
        experts, want = model.model.layers[index].mlp.experts, oracle.model.layers[index].mlp.experts
        for weight_name in ("gate_up_proj", "down_proj"):
            layers = experts.quantized[weight_name]
            assert [layer.format for layer in layers] == [lowbit_format] * 4
            for expert, layer in enumerate(layers):
                got = lowbit.get_format(layer.format).dequantize(layer.packed)
                assert torch.equal(got, getattr(want, weight_name)[expert]), (index, weight_name, expert)
        assert model.model.layers[index].self_attn.q_proj.format == lowbit_format
    with torch.no_grad():
        got, want = model(IDS).logits.float(), oracle(IDS).logits.float()
        assert float((got - want).norm() / want.norm()) < 2e-2  # the same weights; bf16 matmuls round differently
        lowbit.save(model, tmp_path / "lowbit")
        model.save_pretrained(tmp_path / "hf")
        for again in (lowbit.load(tmp_path / "lowbit"), transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")):
            assert torch.equal(again(IDS).logits.float(), got)
    assert ct_import.target_format(folder) == lowbit_format


def test_moe_nvfp4_gate_and_up_with_different_global_scales_are_refused(tmp_path):
    """One nvfp4 layer holds one tensor scale, so an expert's gate and up stack only when they
    share it (llm-compressor gives them one, for vLLM's fused kernels); otherwise the folder is
    refused naming the weight, not imported with one of the two scales."""
    folder, _ = _ct_moe_folder(tmp_path / "ct", _preset("NVFP4A16")[1:], None, shared_gate_up_scale=False)
    with pytest.raises(CheckpointError, match=r"mlp\.experts\.gate_up_proj \(expert 0\): its gate and up layers have "
                                              r"different tensor scales"):
        lowbit.load(folder)


def test_fp8_block_layers_stack_by_whole_row_blocks():
    """An FP8 block layer's scales cover `block` rows, so gate and up stack when the gate's rows
    are whole blocks (the stacked layer dequantizes to the two weights one above the other) and
    are refused when they are not."""
    from lowbit.integrations.foreign_folder import stacked_rows

    fp8, generator = lowbit.get_format("fp8"), torch.Generator().manual_seed(3)
    gate, up, short = (torch.randn(n, 256, generator=generator).bfloat16() for n in (128, 96, 64))
    parts = [fp8.quantize(gate, block=128), fp8.quantize(up, block=128)]
    stacked = stacked_rows(parts, "experts.gate_up_proj")
    assert stacked.shape == (224, 256) and stacked.attrs == parts[0].attrs
    assert torch.equal(fp8.dequantize(stacked), torch.cat([fp8.dequantize(p) for p in parts]))
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj: its gate layer's 64 rows are not whole "
                                              r"128-row scale blocks"):
        stacked_rows([fp8.quantize(short, block=128), parts[1]], "experts.gate_up_proj")


def test_a_layer_count_the_tensors_do_not_have_is_refused(tmp_path):
    """config.json's num_hidden_layers above the tensors' module numbers (a damaged count would
    have transformers build millions of layers) is refused naming the field; so it is for every
    foreign folder (foreign_folder.skeleton)."""
    from ..conftest import make_tiny_llama

    model = lowbit.quantize(make_tiny_llama(), "int4", group_size=32, progress=False)
    lowbit.export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    config["num_hidden_layers"] = 3_000_000
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: num_hidden_layers: 3000000, but the tensors number "
                       r"only 2 modules"):
        lowbit.load(tmp_path / "ct")
    config["num_hidden_layers"] = 2
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(lowbit.load(tmp_path / "ct")(ids).logits, model(ids).logits)
