"""Write a lowbit-quantized transformers model as a compressed-tensors folder: the checkpoint
format llm-compressor writes and vLLM (and transformers' CompressedTensorsConfig) load. The
inverse of ct_import.py, in the layouts of compressed-tensors 0.20 (its docstring has the tensors):

  lowbit layer                         compressed-tensors format    tensors per layer
  int2 ... int8, weight-only           pack-quantized               weight_packed, weight_scale,
                                                                    weight_shape (+ weight_zero_point)
  int2 ... int8, act="int8" / "fp8"    int-quantized                weight (int8 q), weight_scale
                                                                    (+ weight_zero_point)
  fp8 (E4M3), weight-only / act="fp8"  naive- / float-quantized     weight (E4M3), weight_scale
  nvfp4 (+ act="nvfp4" with a static   nvfp4-pack-quantized         weight_packed, weight_scale,
    act_tensor_scale)                                               weight_global_scale (+ input_global_scale)
  mxfp4 / mxfp6 / mxfp8 (+ MX act      mxfp4- / mxfp6-pack-, mxfp8- weight_packed or weight,
    with compressed-tensors' rule)     quantized                    weight_scale

Each format is the one compressed-tensors itself infers for that scheme (its
COMPRESSION_FORMAT_PRIORITY), the one llm-compressor's folders of that scheme carry (vLLM
loading is not tested here).
The codes, zero points and block scales are lowbit's, unchanged. Integer and FP8 scales are
stored in the model's dtype when it holds them exactly (always for float16 / float32 models),
else in float32, so compressed-tensors' decompression gives lowbit's weights. NVFP4's global
scale is 1 / lowbit's tensor scale (compressed-tensors divides by it; the two products can
differ in the last fp32 bit, which changes a weight where lowbit's product is a rounding tie of the
model dtype: 0.2% of bf16 weights, measured). Integer layers' groups must be whole (K a multiple of
group_size); activation-ordered imports (`permuted`) are refused: compressed-tensors 0.20 has no
layout for groups gathered from all over K (it removed actorder "group").

Quantized MoE experts are written as the per-expert Linears that transformers' save_pretrained
writes and llm-compressor quantizes (mlp.experts.E.gate_proj / up_proj / down_proj, Mixtral's
block_sparse_moe.experts.E.w1 / w3 / w2; found with transformers' revert_weight_conversion and
the class's default conversions, however the model was loaded): gate
and up are the rows of lowbit's stacked gate_up layer (an NVFP4 pair shares its global scale, as
llm-compressor gives them). Every tensor gets the name of the class's checkpoint layout (what save_pretrained
of a model built anew writes).

Layers grouped by scheme into config groups: targets ["Linear"] when every quantized layer has one
scheme (as llm-compressor writes it), else the layers' names; the model's other Linear layers are
listed in `ignore`. Refused with a CheckpointError naming the layer:
formats compressed-tensors has no layout for (lut, nf4, bnb_fp4, iq4_nl, dfloat11, mxint8, fp8_e5m2),
rotate="hadamard", activation rules that differ from compressed-tensors' (MX activations without
its act_amax_round, NVFP4 activations without a static act_tensor_scale), experts modules holding
anything but quantized weights (or stored transposed), FP8 block scales that a gate / up split
would cut, GPT-2-style Conv1D layers, and models that are not transformers models.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import io
from ..errors import CheckpointError, check_module
from ..formats import bitpack, get_format
from ..formats.integer import IntFormat, padded_k
from ..formats.microscaling import MicroscalingFormat
from ..linear import QuantLinear
from ..packed import PackedWeight, dtype_name
from .ct_import import DENSE_PACKING_VERSION, MICROSCALED, MX_ACT_AMAX_ROUND, QUANT_METHOD, is_compressed_tensors_folder
from .foreign_folder import pack_bitstream, row_slice

logger = logging.getLogger(__name__)

#: the compressed-tensors version whose layouts this writes (3/5/6/7-bit codes packed densely), which
#: the import reads them from
LAYOUT_VERSION = "{}.{}.0".format(*DENSE_PACKING_VERSION)
#: lowbit microscaled format -> its compressed-tensors format
_MICROSCALED_FORMATS = {lowbit_name: fmt for fmt, (lowbit_name, *_) in MICROSCALED.items()}


def _refused(name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"layer {name!r}: {problem}; it cannot be written as compressed-tensors")


def _scales(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp16 / fp32 scales in the model's `dtype` when it holds every one exactly, else in fp32."""
    cast = scales.to(dtype)
    return cast if torch.equal(cast.float(), scales.float()) else scales.float()


def _activations(num_bits: int, element: str, strategy: str, group_size: int | None, *, dynamic: Any = True,
                 scale_dtype: str | None = None) -> dict[str, Any]:
    """A scheme's input_activations: symmetric, quantized at run time (`dynamic`; NVFP4's "local"
    scales times a stored global one), as ct_import's _activation_rule reads them back."""
    args = {"num_bits": num_bits, "type": element, "symmetric": True, "dynamic": dynamic, "strategy": strategy,
            "group_size": group_size}
    return args if scale_dtype is None else {**args, "scale_dtype": scale_dtype}


def _integer_layer(name: str, packed: PackedWeight, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An int2 ... int8 layer: pack-quantized when weight-only, int-quantized (q one per int8)
    with dynamic int8 / E4M3 activations per token."""
    fmt = get_format(packed.format)
    bits, offset = fmt.bits, 2 ** (fmt.bits - 1)
    (n, k), attrs = packed.shape, packed.attrs
    group_size, act = attrs["group_size"], attrs.get("act")
    channel = group_size >= k  # one group spans the row
    if not channel and k % group_size:
        raise _refused(name, f"in_features {k} is not a multiple of group_size {group_size} (compressed-tensors' "
                       "groups are whole)")
    if attrs.get("permuted"):
        raise _refused(name, "its groups gather columns from all over K (an activation-ordered import); "
                       "compressed-tensors 0.20 no longer stores such groups (its actorder 'group' was removed)")
    codes = bitpack.unpack(packed.qweight.cpu(), bits, padded_k(k, group_size)).to(torch.int64)[:, :k]  # q + 2^(b-1)
    weights = {"num_bits": bits, "type": "int", "symmetric": attrs["symmetric"], "dynamic": False,
               "strategy": "channel" if channel else "group", "group_size": None if channel else group_size}
    tensors = {"weight_scale": _scales(packed.scales.cpu().t().contiguous(), dtype)}
    if not attrs["symmetric"]:
        bad = fmt.first_non_code_zero_point(packed)
        if bad is not None:
            group, row = bad
            raise _refused(name, f"zero point [{row}, {group}] = {float(packed.zeros[group, row])!r} is not an integer "
                           f"code in [0, {2**bits - 1}], which compressed-tensors stores")
        zeros = packed.zeros.cpu().t().to(torch.int64)  # u_z = z + 2^(b-1), [N, G]
    if act is None:
        tensors["weight_packed"] = pack_bitstream(codes, bits, torch.int32)
        tensors["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not attrs["symmetric"]:  # packed down each column: [ceil(N*b/32), G]
            tensors["weight_zero_point"] = pack_bitstream(zeros.t(), bits, torch.int32).t().contiguous()
        ct_format = "pack-quantized"
    else:
        tensors["weight"] = (codes - offset).to(torch.int8)
        if not attrs["symmetric"]:
            tensors["weight_zero_point"] = (zeros - offset).to(torch.int8)
        ct_format = "int-quantized"
    activations = None if act is None else _activations(8, "int" if act == "int8" else "float", "token", None)
    return {"format": ct_format, "weights": weights, "input_activations": activations}, tensors


def _fp8_layer(name: str, packed: PackedWeight, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An fp8 (E4M3) layer: naive-quantized weight-only, float-quantized with dynamic E4M3
    activations (per token, or per 1 x B group with B x B weight blocks)."""
    (n, k), block, act = packed.shape, packed.attrs["block"], packed.attrs["act"]
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
               "strategy": "channel" if block is None else "block"}
    if block is not None:
        weights["block_structure"] = [block, block]
    scales = packed.scales.cpu()  # per channel [1, N]; per block [Kp/B, ceil(N/B)]
    tensors = {"weight": packed.qweight.cpu()[:, :k].contiguous(),
               "weight_scale": _scales(scales.reshape(n, 1) if block is None else scales.t().contiguous(), dtype)}
    activations = None if act is None else _activations(8, "float", "token" if block is None else "group", block)
    return ({"format": "naive-quantized" if act is None else "float-quantized", "weights": weights,
             "input_activations": activations}, tensors)


def _microscaled_layer(name: str, packed: PackedWeight) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An nvfp4 / mxfp4 / mxfp6 / mxfp8 layer with its codes and block scales as stored."""
    ct_format = _MICROSCALED_FORMATS[packed.format]
    _, bits, strategy, block, scale_dtype = MICROSCALED[ct_format]
    k, attrs = packed.shape[1], packed.attrs
    if attrs["rotate"] is not None:
        raise _refused(name, f"rotate={attrs['rotate']!r} (compressed-tensors' transforms are not written)")
    if k % block:
        raise _refused(name, f"in_features {k} is not a multiple of the {block}-element block (compressed-tensors' "
                       "blocks are whole)")
    codes = bitpack.unpack(packed.qweight.cpu(), bits, padded_k(k, 32))[:, :k]
    tensors = {"weight_scale": packed.scales.cpu().t()[:, : k // block].contiguous()}
    if bits == 8:
        tensors["weight"] = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    else:  # FP4: element 2i in the low nibble; FP6: four codes per three bytes, little-endian
        tensors["weight_packed"] = pack_bitstream(codes, bits, torch.uint8)
    weights = {"num_bits": bits, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
               "group_size": block, "scale_dtype": scale_dtype}
    act, activations = attrs["act"], None
    if packed.format == "nvfp4":
        tensors["weight_global_scale"] = (1.0 / packed.tensor_scale.cpu().float()).reshape(1)
        if act is not None:
            if act != "nvfp4" or attrs.get("act_tensor_scale") is None:
                raise _refused(name, f"act={act!r} without a static act_tensor_scale: compressed-tensors' NVFP4 "
                               "activations are E4M3 16-block scales times a stored global scale")
            tensors["input_global_scale"] = torch.tensor([1.0 / attrs["act_tensor_scale"]], dtype=torch.float32)
            activations = _activations(4, "float", "tensor_group", 16, dynamic="local", scale_dtype=scale_dtype)
    elif act is not None:
        wanted = MX_ACT_AMAX_ROUND.get(act)
        if wanted is None or attrs.get("act_amax_round") != wanted:
            raise _refused(name, f"act={act!r} with act_amax_round={attrs.get('act_amax_round')!r}: compressed-"
                           "tensors quantizes MX activations dynamically to mxfp4 / mxfp6 / mxfp8 by its own block "
                           f"exponent rule, act_amax_round {MX_ACT_AMAX_ROUND} (quantize with that option)")
        activations = _activations(get_format(act).codec.bits, "float", "group", 32, scale_dtype="torch.uint8")
    return {"format": ct_format, "weights": weights, "input_activations": activations}, tensors


def exported_layer(name: str, packed: PackedWeight, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(compressed-tensors scheme {"format", "weights", "input_activations"}, {field: tensor}) of
    the layer `name` in a model of float `dtype`; CheckpointError naming the layer when
    compressed-tensors has no layout for it."""
    fmt = get_format(packed.format)
    if isinstance(fmt, IntFormat) and fmt.name.startswith("int") and 2 <= fmt.bits <= 8:
        return _integer_layer(name, packed, dtype)
    if fmt.name == "fp8":
        return _fp8_layer(name, packed, dtype)
    if isinstance(fmt, MicroscalingFormat) and fmt.name in _MICROSCALED_FORMATS:
        return _microscaled_layer(name, packed)
    writable = ["int2 ... int8", "fp8", *sorted(_MICROSCALED_FORMATS)]
    raise _refused(name, f"format {packed.format!r} has no compressed-tensors layout (written: {', '.join(writable)})")


def _checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (model names) under the names of the class's checkpoint layout: transformers'
    revert_weight_conversion with the class's default conversions. (It would follow the ones a
    from_pretrained recorded instead, and loading a checkpoint that already holds fused expert
    weights, as a save_pretrained folder of lowbit's quantized experts does, records none:
    its experts would be written fused, which compressed-tensors readers do not take.)"""
    from transformers.core_model_loading import revert_weight_conversion

    recorded = model.__dict__.pop("_weight_conversions", None)
    try:
        return revert_weight_conversion(model, tensors)
    finally:
        if recorded is not None:
            model._weight_conversions = recorded


def _expert_layers(model: nn.Module) -> dict[str, tuple[str, PackedWeight]]:
    """{checkpoint name of one expert's Linear: (the fused weight it is part of, its layer)} for
    every quantized MoE experts module of `model`: the per-expert Linears that transformers'
    save_pretrained writes (and llm-compressor quantizes), found by reverting transformers' weight
    conversion on probe tensors that number each fused weight's rows; each layer is its rows of
    the expert's lowbit layer (an expert's gate_up layer splits into gate and up)."""
    from ..experts import QuantizedExperts, fused_weight_names, quantized_weights

    probes, origins, first_id = {}, [], 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedExperts):
            continue
        others = [n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        if getattr(module, "is_transposed", False) or fused_weight_names(module) or others:
            raise _refused(name, "only experts whose every weight is quantized, stored [experts, N, K] with no "
                           f"other tensors, are written (full precision: {fused_weight_names(module) + others})")
        for weight_name, slots in quantized_weights(module).items():
            experts, n = len(slots), slots[0].out_features
            probes[f"{name}.{weight_name}"] = torch.arange(first_id, first_id + experts * n).reshape(experts, n, 1)
            origins.append((first_id, f"{name}.{weight_name}", slots, n))
            first_id += experts * n
    layers = {}
    for key, ids in (_checkpoint_names(model, probes) if probes else {}).items():
        first = int(ids.reshape(-1)[0])
        start_id, where, slots, n = next(origin for origin in reversed(origins) if origin[0] <= first)
        expert, start = divmod(first - start_id, n)
        stop = start + ids.shape[0]
        if (not key.endswith(".weight") or stop > n
                or not torch.equal(ids, torch.arange(first, first + stop - start).reshape(-1, 1))):
            raise _refused(where, f"transformers writes it as {key!r}, which is not rows of one expert's layer")
        layers[key.removesuffix(".weight")] = (where, row_slice(slots[expert].packed, start, stop, where))
    return layers


def _quantization_config(schemes: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    """config.json's quantization_config: one config group per distinct scheme, targeting its
    layers by name in the order the layers come, or, when every quantized layer has one scheme,
    the class "Linear" as llm-compressor writes it (the other Linears are in `ignore`)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, scheme in schemes.items():
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": [], "output_activations": None})["targets"].append(name)
    if len(groups) == 1:
        next(iter(groups.values()))["targets"] = [nn.Linear.__name__]
    formats = {scheme["format"] for scheme in schemes.values()}
    return {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "version": LAYOUT_VERSION,
            "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
            "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
            "global_compression_ratio": None}


def check_export_target(out_dir: Path) -> None:
    """CheckpointError unless `out_dir` is absent, empty, or a compressed-tensors folder (an
    earlier export, which is replaced)."""
    io.check_save_target(out_dir, is_compressed_tensors_folder, "a compressed-tensors folder")


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, *,
                              max_shard_bytes: int | None = None,
                              extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write the lowbit-quantized transformers `model` to `out_dir` as a compressed-tensors
    folder (config.json with quant_method "compressed-tensors", safetensors shards), atomically;
    returns the folder path. Every QuantLinear must be in a format compressed-tensors stores
    (int2 ... int8, fp8, nvfp4, mxfp4 / mxfp6 / mxfp8; see the module docstring), else
    CheckpointError naming the layer before anything is written. extra_files: as lowbit.save's
    (a tokenizer, e.g. from io.companion_files). The folder loads with lowbit.load, vLLM, and
    transformers' from_pretrained (compressed-tensors installed)."""
    from ..api import conv1d_names
    from ..experts import parse_slot

    check_module(model)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if not isinstance(model, PreTrainedModel):
        raise CheckpointError(f"export_compressed_tensors: a transformers PreTrainedModel is needed (config.json "
                              f"names its class), got {type(model).__name__}")
    out_dir = io.as_path(out_dir, "export_compressed_tensors(..., out_dir)")
    check_export_target(out_dir)
    max_shard_bytes = io.DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    io.check_shard_bytes(max_shard_bytes)
    extra = io.checked_extra_files(extra_files or {})
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise CheckpointError("export_compressed_tensors: the model has no quantized layers (lowbit.quantize it first)")
    dense = {name: m.packed for name, m in quantized.items() if parse_slot(name) is None}
    conv1d = conv1d_names(model) & set(dense)
    if conv1d:
        raise _refused(sorted(conv1d)[0], "the model's class builds a Conv1D there (weight [in, out]), which "
                       "compressed-tensors does not quantize")
    entry = io.model_entry(model)
    tensors, _ = io.unique_tensors(model)  # tied weights once: from_pretrained ties them again
    io.check_not_on_meta(tensors)
    persistent = set(model.state_dict(keep_vars=True))
    packed_fields = {f"{name}.{field}" for name, layer in quantized.items() for field in layer.packed.tensors}
    tensors = {n: t for n, t in tensors.items() if n in persistent and n not in packed_fields}
    schemes, scales = {}, {}
    layers = {name: (name, packed) for name, packed in dense.items()}
    layers.update(_expert_layers(model))
    for name, (where, packed) in tqdm(layers.items(), desc="export compressed-tensors", unit="layer",
                                      disable=len(layers) < 8):
        schemes[name], fields = exported_layer(where, packed, model.dtype)
        tensors.update({f"{name}.{field}": tensor for field, tensor in fields.items()})
        scales[name] = fields["weight_scale"]
    # the names save_pretrained writes (legacy ones, e.g. Mixtral's block_sparse_moe): renamed, not copied
    stored_name = {id(tensor): key for key, tensor in _checkpoint_names(model, tensors).items()}
    tensors = {stored_name[id(tensor)]: tensor for tensor in tensors.values()}
    schemes = {stored_name[id(scales[name])].removesuffix(".weight_scale"): scheme for name, scheme in schemes.items()}
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = {key: value for key, value in entry["config"].items() if key != "quantization_config"}
    config["architectures"] = [entry["class"]]
    config["quantization_config"] = _quantization_config(schemes, ignore)
    with io.atomic_folder(out_dir) as tmp:
        io.write_shards(tmp, tensors, max_shard_bytes, "export compressed-tensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        io.copy_extra_files(tmp, extra, "export_compressed_tensors")
    widened = sum(1 for scale in scales.values() if scale.dtype == torch.float32 != model.dtype)
    if widened:
        logger.info("%s: %d layers' scales are stored in float32: the model's %s does not hold them exactly",
                    out_dir, widened, dtype_name(model.dtype))
    return out_dir
