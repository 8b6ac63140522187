"""Import a folder of a compressed-tensors model (the checkpoint format of llm-compressor and
vLLM: config.json quantization_config {"quant_method": "compressed-tensors", ...}) whose quantized
Linear layers are integer weight-only ("pack-quantized": W2A16 ... W8A16), int8 with dynamic
int8 activations ("int-quantized": W8A8), FP8 ("float-quantized": W8A8 with dynamic FP8
activations; "naive-quantized": FP8 or integer codes stored one per int8 / fp8 element, which is
what compressed-tensors writes for schemes without activations that it does not pack), NVFP4
("nvfp4-pack-quantized": NVFP4A16, and NVFP4 with calibrated activation scales) or MX ("mxfp4-pack-quantized",
"mxfp6-pack-quantized", "mxfp8-quantized": MXFP4A16 / MXFP6A16 / MXFP8A16, and MXFP4 / MXFP8 /
MXFP6A8 with dynamic MX activations).

For each pack-quantized Linear M (b = num_bits, G groups of group_size along K):
  M.weight_packed      int32 [N, ceil(K*b/32)]  the codes u = q + 2^(b-1) of each row as one
                                                little-endian bit stream: code i at bits [i*b, i*b+b)
  M.weight_scale       model dtype [N, G]       ([N, 1] with strategy "channel")
  M.weight_zero_point  int32 [ceil(N*b/32), G]  asymmetric only: z + 2^(b-1), packed the same way
                                                down each column
  M.weight_shape       int64 [2]                [N, K]
  M.weight_g_idx       int32 [K]                with actorder "group": each column's group
and the weight is (q - z) * scale (z = 0 when symmetric), q in [-2^(b-1), 2^(b-1) - 1]. Each
becomes a lowbit `int{b}` layer with the same codes u, the same groups (group_size=-1 for
"channel") and the scales in float16: symmetric layers stay symmetric (their codes may include 0,
i.e. q = -2^(b-1), which lowbit's reference and kernels decode by the same (u - 2^(b-1)) * scale),
asymmetric ones store the zero points u_z = z + 2^(b-1) as lowbit's float16 zeros. Activation-
ordered groups (weight_g_idx not k // group_size) are stored in the order that makes each group
consecutive, with that order as the layer's input permutation (`permuted`, integer.py). A bf16 scale
of at least 2^-17 is a float16 value, so the dequantized weights are compressed-tensors' bit for
bit; a scale float16 cannot hold exactly is rounded to it, with a warning that counts them.

int- and naive-quantized integer layers hold the same fields but q itself, one int8 per weight, as
M.weight [N, K] (no weight_packed / weight_shape), and asymmetric zero points z as int8 [N, G].
On any integer layer, dynamic symmetric int8 activations per token (W8A8, W4A8) become lowbit's
act="int8" (lowbit's rule: scale amax / 127, codes in [-127, 127]; compressed-tensors' reference
divides by 127.5), and dynamic symmetric E4M3 ones per token (W4AFP8) act="fp8" (the same rule).

For each float- (or naive-) quantized FP8 Linear M: M.weight float8_e4m3fn [N, K] and M.weight_scale: [N, 1]
("channel"), [1] ("tensor") or [ceil(N/B), ceil(K/B)] ("block", B x B); the weight is
float(M.weight) * scale. Each becomes a lowbit `fp8` layer with the same elements and the scales
in fp32 (exact), block=B for blocks, act="fp8" when the scheme's input activations are dynamic
symmetric E4M3 per token (per group of B with block weights).

For each NVFP4 / MX Linear M (codes with the sign in the top bit: E2M1, E2M3, E4M3):
  M.weight_packed        uint8 [N, K/2]   FP4: element 2i in the low nibble, 2i+1 in the high one
                         uint8 [N, 3K/4]  FP6: four codes per three bytes, little-endian
  M.weight               float8_e4m3fn [N, K]   MXFP8, instead of weight_packed
  M.weight_scale         uint8 [N, K/32] E8M0 bytes (MX), float8_e4m3fn [N, K/16] (NVFP4)
  M.weight_global_scale  fp32 [1]         NVFP4: g, the weight is e2m1 * weight_scale / g
Each becomes the lowbit format of the same name with the same codes and block scales (nvfp4:
tensor scale 1/g: compressed-tensors divides by g, lowbit multiplies by 1/g, which can differ in
the last fp32 bit; the bf16 weights were equal in every folder tested and in 134M random E2M1 x
E4M3 products under 8 random g). Dynamic
MX activations of element E become act=E with act_amax_round: compressed-tensors' block exponent
rule (lowbit/formats/microscaling.py), which lowbit's default FLOOR rule is not. NVFP4 activations
(E4M3 scales of 16-blocks from each call, times the calibrated M.input_global_scale g_in) become
act="nvfp4" with act_tensor_scale=1/g_in: compressed-tensors' rule in fp32 (its bf16 path rounds
amax/6 and the fake-quantized values to bf16; lowbit keeps fp32).

Mixture-of-experts folders store each expert's Linears under their own names
(mlp.experts.E.gate_proj, ...; llm-compressor quantizes transformers 5's fused experts as such
Linears): they are matched to config groups as class "Linear" and placed in lowbit's quantized
experts as transformers' key mapping fuses them (foreign_folder.model_with_layers).

Refused with a CheckpointError naming the file, tensor or field: other formats (sparse, marlin),
static activation scales, integer layers' activations other than int8 or E4M3 per token, KV cache schemes, transforms, packed
3/5/6/7-bit codes from folders of compressed-tensors before 0.20 (quantization_config.version;
some earlier versions packed 32 // b codes per int32 word), group sizes that are not a multiple
of 32, a weight_g_idx whose groups do not each hold group_size columns, fused 3-D expert
weights, damaged tensors.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import FormatError
from ..experts import check_fused_weight, expert_shape
from ..formats import bitpack, get_format
from ..formats.integer import SCALE_DTYPE, IntFormat, padded_k
from ..packed import PackedWeight
from .checkpoint_keys import CheckpointKeys
from .foreign_folder import (SCALE_DTYPES, config_dtype, fail, float16_scales, folder_pattern, group_order,
                             has_quant_method, integer_layer, is_name_in, model_with_layers, pattern_matches,
                             read_config, read_tensors, skeleton, stored_tensor, unpack_bitstream,
                             warn_inexact_scales, weight_matrix)

QUANT_METHOD = "compressed-tensors"
#: the formats imported -> the weight types their layers hold
FORMATS = {"pack-quantized": ("int",), "int-quantized": ("int",), "float-quantized": ("float",),
           "naive-quantized": ("int", "float"), "nvfp4-pack-quantized": ("float",),
           "mxfp4-pack-quantized": ("float",), "mxfp6-pack-quantized": ("float",), "mxfp8-quantized": ("float",)}
#: the microscaled formats -> (lowbit format, element bits, weight strategy, block, scale dtype)
MICROSCALED = {"nvfp4-pack-quantized": ("nvfp4", 4, "tensor_group", 16, "torch.float8_e4m3fn"),
               "mxfp4-pack-quantized": ("mxfp4", 4, "group", 32, "torch.uint8"),
               "mxfp6-pack-quantized": ("mxfp6", 6, "group", 32, "torch.uint8"),
               "mxfp8-quantized": ("mxfp8", 8, "group", 32, "torch.uint8")}
#: compressed-tensors' dynamic MX activation scales (generate_mx_scales) round the block amax half up
#: to FP6's 3 mantissa bits for MXFP6 and to FP4's 1 bit otherwise (MXFP8 too) before taking its
#: exponent: lowbit's act_amax_round
MX_ACT_AMAX_ROUND = {"mxfp4": 1, "mxfp6": 3, "mxfp8": 1}
#: the tensors a quantized layer is read from (float-quantized: weight, weight_scale)
LAYER_FIELDS = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                "weight_global_scale", "input_global_scale")
#: widths whose codes never straddle an int32 word, packed alike by every compressed-tensors version
_WORD_ALIGNED_WIDTHS = (2, 4, 8)
#: compressed-tensors 0.20 packs 3/5/6/7-bit codes densely (code i at bit i*b of the row, across
#: word boundaries); some earlier versions put 32 // b codes in each word. Those widths are
#: imported from folders whose quantization_config.version is at least this.
DENSE_PACKING_VERSION = (0, 20)
#: integer groups shorter than 32 that lowbit holds (weight-only layers: not with quantized activations)
SMALL_GROUPS = IntFormat.SMALL_GROUP_SIZES


def is_compressed_tensors_folder(path: str | Path) -> bool:
    """True when `path` has a config.json whose quantization_config says quant_method "compressed-tensors"."""
    return has_quant_method(path, QUANT_METHOD)


def _weight_schemes(folder: Path, quantization: dict[str, Any]) -> dict[str, tuple[list[Any], dict[str, Any]]]:
    """{group name: (targets, scheme)} of the config groups, each checked to be one lowbit holds;
    targets: layer or class names, and "re:" ones as compiled regexes (folder_pattern);
    scheme: {"format": "pack-quantized" | "float-quantized", "weights": args, "act": None | "fp8"}."""
    where = f"{folder / 'config.json'}: quantization_config"
    if quantization.get("quantization_status", "compressed") != "compressed":
        raise fail(f"{where}.quantization_status", f"{quantization['quantization_status']!r}: only compressed "
                   "checkpoints are imported")
    for key in ("kv_cache_scheme", "transform_config", "sparsity_config"):
        if quantization.get(key):
            raise fail(f"{where}.{key}", "is set: lowbit imports weight and activation quantization only")
    groups = quantization.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise fail(f"{where}.config_groups", "missing or empty")
    schemes = {}
    for group_name, scheme in groups.items():
        at = f"{where}.config_groups.{group_name}"
        if not isinstance(scheme, dict):
            raise fail(at, "not an object")
        fmt = scheme.get("format") or quantization.get("format")
        if not is_name_in(fmt, FORMATS):
            raise fail(f"{at}.format", f"{fmt!r}: lowbit imports {', '.join(map(repr, FORMATS))}")
        weights = scheme.get("weights")
        if not isinstance(weights, dict):
            raise fail(f"{at}.weights", "missing")
        if weights.get("type") not in FORMATS[fmt]:
            raise fail(f"{at}.weights.type", f"{weights.get('type')!r}: {fmt} layers hold {' or '.join(FORMATS[fmt])} "
                       "weights")
        if weights["type"] == "int":
            _check_int_weights(f"{at}.weights", weights)
            if (fmt == "pack-quantized" and weights["num_bits"] not in _WORD_ALIGNED_WIDTHS
                    and not _packs_densely(quantization.get("version"))):
                raise fail(f"{where}.version", f"{quantization.get('version')!r}: lowbit imports packed "
                           f"{weights['num_bits']}-bit codes from compressed-tensors 0.20 or later, which packs them "
                           "densely (some earlier versions put 32 // num_bits codes in each int32 word)")
        elif fmt in MICROSCALED:
            _check_microscaled_weights(f"{at}.weights", weights, fmt)
        else:
            _check_fp8_weights(f"{at}.weights", weights)
        if scheme.get("output_activations"):
            raise fail(f"{at}.output_activations", "is set: lowbit does not quantize layer outputs")
        act = _activation_rule(f"{at}.input_activations", scheme.get("input_activations"), fmt, weights)
        if act is not None and weights.get("strategy") == "group" and weights.get("group_size") in SMALL_GROUPS:
            raise fail(f"{at}.input_activations", f"quantized activations with weight groups of "
                       f"{weights['group_size']}: lowbit's int8 / FP8 activation GEMM scales whole K tiles of at "
                       "least 32 by one group")
        targets = scheme.get("targets")
        if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
            raise fail(f"{at}.targets", f"expected a list of names, got {targets!r}")
        # "re:" targets compiled here, once: a bad one is refused before any layer is read
        targets = [folder_pattern(t[3:], f"{at}.targets") if t.startswith("re:") else t for t in targets]
        schemes[group_name] = (targets, {"format": fmt, "weights": weights, "act": act})
    return schemes


def _packs_densely(version: Any) -> bool:
    """Whether compressed-tensors `version` (e.g. "0.20.0") packs 3/5/6/7-bit codes as 0.20 does."""
    match = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return match is not None and (int(match[1]), int(match[2])) >= DENSE_PACKING_VERSION


def _check_int_weights(at: str, weights: dict[str, Any]) -> None:
    num_bits = weights.get("num_bits")
    if type(num_bits) is not int or num_bits not in range(2, 9):  # not 4.0: its codes are unpacked by it
        raise fail(f"{at}.num_bits", f"{num_bits!r}: lowbit imports 2- to 8-bit integer weights")
    if weights.get("dynamic"):
        raise fail(f"{at}.dynamic", "dynamic weight quantization has no stored scales")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise fail(f"{at}.strategy", f"{strategy!r}: lowbit imports 'group' and 'channel'")
    size = weights.get("group_size")
    if strategy == "group" and not (type(size) is int and size > 0 and (size % 32 == 0 or size in SMALL_GROUPS)):
        raise fail(f"{at}.group_size", f"{size!r}: lowbit's groups are a positive multiple of 32 long, or "
                   f"{' or '.join(map(str, SMALL_GROUPS))}")


def _check_fp8_weights(at: str, weights: dict[str, Any]) -> None:
    if weights.get("num_bits") != 8:
        raise fail(f"{at}.num_bits", f"{weights.get('num_bits')!r}: lowbit imports 8-bit float (E4M3) weights")
    if weights.get("dynamic") or not weights.get("symmetric", True):
        raise fail(f"{at}", "lowbit imports static symmetric FP8 weight scales")
    strategy = weights.get("strategy")
    if strategy not in ("channel", "tensor", "block"):
        raise fail(f"{at}.strategy", f"{strategy!r}: lowbit imports 'channel', 'tensor' and 'block'")
    block = weights.get("block_structure")
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2 and block[0] == block[1]
                                    and isinstance(block[0], int) and block[0] > 0 and block[0] % 32 == 0):
        raise fail(f"{at}.block_structure", f"{block!r}: lowbit's blocks are square, a multiple of 32 on a side")


def _check_microscaled_weights(at: str, weights: dict[str, Any], fmt: str) -> None:
    """The weights of a microscaled format are its elements in symmetric blocks along K with
    stored scales, as compressed-tensors' NVFP4 / MX presets write them."""
    _, bits, strategy, block, scale_dtype = MICROSCALED[fmt]
    rule = [weights.get("num_bits"), weights.get("strategy"), weights.get("group_size"), weights.get("symmetric", True),
            bool(weights.get("dynamic")), weights.get("scale_dtype")]
    wanted = [bits, strategy, block, True, False, scale_dtype]
    if rule != wanted:
        raise fail(at, f"{fmt} weights are num_bits/strategy/group_size/symmetric/dynamic/scale_dtype {wanted}, "
                   f"got {rule}")


#: compressed-tensors' 8-bit activation type -> its name in messages
ELEMENT_NAMES = {"float": "E4M3", "int": "int8"}


def _activation_rule(at: str, activations: Any, fmt: str, weights: dict[str, Any]) -> str | None:
    """The lowbit `act` of a scheme's input_activations: None; "fp8" for FP8 weights with dynamic
    symmetric E4M3 activations per token (per 1 x B group with B x B weight blocks), the rule of
    lowbit's fp8 act="fp8", and for integer weights with them per token (W4AFP8); "int8" for
    integer weights (W8A8, W4A8) with dynamic symmetric int8 activations per token, lowbit's
    act="int8"; "mxfp4" / "mxfp6" / "mxfp8" for MX weights with
    dynamic MX activations of that element (blocks of 32, E8M0 scales), lowbit's act of that name."""
    if not activations:
        return None
    if not isinstance(activations, dict):
        raise fail(at, "not an object")
    rule = [activations.get("type"), activations.get("num_bits"), activations.get("dynamic"),
            activations.get("symmetric", True), activations.get("strategy"), activations.get("group_size"),
            activations.get("scale_dtype")]
    if fmt == "nvfp4-pack-quantized":
        wanted = ["float", 4, "local", True, "tensor_group", 16, "torch.float8_e4m3fn"]
        if rule != wanted:
            raise fail(at, "lowbit quantizes NVFP4 activations as compressed-tensors' NVFP4 scheme does (E4M3 "
                       "scales of 16-blocks from each call, times the stored input_global_scale): type/num_bits/"
                       f"dynamic/symmetric/strategy/group_size/scale_dtype {wanted}; got {rule}")
        return "nvfp4"
    if fmt in MICROSCALED:
        elements = {4: "mxfp4", 6: "mxfp6", 8: "mxfp8"}
        if rule[0] == "float" and rule[1] in elements and rule[2:] == [True, True, "group", 32, "torch.uint8"]:
            return elements[rule[1]]
        raise fail(at, "lowbit quantizes MX activations dynamically to MXFP4, MXFP6 or MXFP8 (blocks of 32, E8M0 "
                   f"scales); got type/num_bits/dynamic/symmetric/strategy/group_size/scale_dtype {rule}")
    block = weights.get("block_structure") if weights.get("strategy") == "block" else None
    # FP8 weights take E4M3 activations; integer ones int8 (W8A8, W4A8) or E4M3 (W4AFP8)
    elements = ["float"] if weights["type"] == "float" else ["int", "float"]
    granularity = ["token", None] if block is None else ["group", block[0]]
    rule = rule[:6]  # the scale dtype is the model's
    for element in elements:
        if rule == [element, 8, True, True, *granularity]:
            return "fp8" if element == "float" else "int8"
    raise fail(at, f"lowbit quantizes activations dynamically to {' or '.join(ELEMENT_NAMES[e] for e in elements)}, "
               "symmetric, " + ("per token" if block is None else f"per group of {block[0]} (the weight block)")
               + f"; got type/num_bits/dynamic/symmetric/strategy/group_size {rule}")


def _stored_layer(skeleton_model: nn.Module, keys: CheckpointKeys, name: str) -> tuple[str, tuple[int, int] | None]:
    """(the module class compressed-tensors matched the layer stored as `name` by, its [N, K] if
    it is a Linear): the model's module under the name transformers loads it as, or, for one
    expert's Linear that transformers merges into a fused expert weight (as llm-compressor saves
    MoE models: experts.E.gate_proj, ...), a Linear of that expert's share of the fused weight."""
    try:
        target, piece = keys.layer_target(name)
        if piece is None:
            module = skeleton_model.get_submodule(target)
            shape = (module.out_features, module.in_features) if isinstance(module, nn.Linear) else None
            return type(module).__name__, shape
        experts = skeleton_model.get_submodule(piece.experts)
        check_fused_weight(experts, piece.weight)
    except AttributeError:
        raise fail(f"{name}.weight_scale", "the model has no such layer") from None
    except (ValueError, FormatError) as exc:
        raise fail(f"{name}.weight_scale", str(exc)) from None
    _, n, k = expert_shape(experts, piece.weight)
    return nn.Linear.__name__, (n // piece.parts, k)


def _scheme_of(name: str, class_name: str, schemes: dict[str, tuple[list[Any], dict[str, Any]]],
               folder: Path) -> dict[str, Any]:
    """The scheme of the config group whose targets match layer `name` as compressed-tensors
    matches them: the layer's name, "re:" + a regular expression, or its module class name."""
    matches = {}
    for group_name, (targets, scheme) in schemes.items():
        where = f"{folder / 'config.json'}: quantization_config.config_groups.{group_name}.targets"
        for target in targets:
            if (target == name or target == class_name
                    or (not isinstance(target, str) and pattern_matches(target, name, where))):
                matches[group_name] = scheme
    distinct = {repr(scheme) for scheme in matches.values()}
    if len(distinct) != 1:
        problem = "no config group targets it" if not matches else f"config groups {sorted(matches)} all target it"
        raise fail(f"{folder / 'config.json'}: quantization_config.config_groups", f"layer {name!r}: {problem}")
    return next(iter(matches.values()))


def _int_codes(tensors: dict[str, torch.Tensor], name: str, bits: int, packed: bool) -> torch.Tensor:
    """A layer's integer codes u = q + 2^(b-1), int32 [N, K]: from name.weight_packed (with
    name.weight_shape) when `packed`, else from name.weight (int8 q, as naive / int-quantized
    layers store them)."""
    if not packed:
        q = weight_matrix(tensors, name, torch.int8).to(torch.int32)
        if bool(((q < -(2 ** (bits - 1))) | (q >= 2 ** (bits - 1))).any()):
            raise fail(f"{name}.weight", f"holds values outside the {bits}-bit range")
        return q + 2 ** (bits - 1)
    shape = tensors.get(f"{name}.weight_shape")
    if shape is None:
        raise fail(f"{name}.weight_shape", "missing")
    if shape.numel() == 3:
        raise fail(f"{name}.weight_shape", "3-D: fused expert weights are not imported")
    if shape.dim() != 1 or shape.numel() != 2 or shape.is_floating_point() or bool((shape <= 0).any()):
        raise fail(f"{name}.weight_shape", f"{shape.tolist()} is not [out_features, in_features]")
    n, k = (int(s) for s in shape)
    words = stored_tensor(tensors, f"{name}.weight_packed", (torch.int32,), shape=(n, -(-k * bits // 32)))
    return unpack_bitstream(words, bits, k)


def int_layer(tensors: dict[str, torch.Tensor], name: str, scheme: dict[str, Any],
              dtype: torch.dtype) -> tuple[PackedWeight, int]:
    """The integer layer `name` (pack-quantized: name.weight_packed, ...; int- / naive-quantized:
    name.weight int8, ...) of `scheme` as a lowbit `int{b}` PackedWeight of `dtype`, and how
    many of its scales float16 could not hold exactly (rounded to nearest)."""
    weights, packed = scheme["weights"], scheme["format"] == "pack-quantized"
    bits, offset = weights["num_bits"], 2 ** (weights["num_bits"] - 1)
    codes = _int_codes(tensors, name, bits, packed)
    n, k = codes.shape
    group_size = weights["group_size"] if weights["strategy"] == "group" else padded_k(k, 32)
    groups = -(-k // group_size)
    scale16, inexact = float16_scales(tensors, f"{name}.weight_scale", (n, groups))
    perm = None
    if f"{name}.weight_g_idx" in tensors:  # actorder "group": groups gather columns from all over K
        g_idx = stored_tensor(tensors, f"{name}.weight_g_idx", (torch.int32, torch.int64), shape=(k,))
        perm = group_order(g_idx, group_size, f"{name}.weight_g_idx")
    zero_key, zeros = f"{name}.weight_zero_point", None
    if not weights.get("symmetric", True):
        if packed:  # [ceil(N*b/32), G], packed down each column
            words = stored_tensor(tensors, zero_key, (torch.int32,), shape=(-(-n * bits // 32), groups))
            zeros = unpack_bitstream(words.t(), bits, n).t()
        else:  # int8 z [N, G]
            zeros = stored_tensor(tensors, zero_key, (torch.int8,), shape=(n, groups)).to(torch.int32) + offset
        zeros = zeros.to(SCALE_DTYPE)  # z + 2^(b-1), [N, G]
    elif zero_key in tensors:
        raise fail(zero_key, "present in a symmetric scheme")
    return integer_layer(codes, bits, group_size, scale16, zeros, dtype, scheme["act"], perm), inexact


def fp8_layer(tensors: dict[str, torch.Tensor], name: str, weights: dict[str, Any], act: str | None,
              dtype: torch.dtype) -> PackedWeight:
    """The float-quantized layer `name` (tensors name.weight float8_e4m3fn [N, K], name.weight_scale)
    as a lowbit `fp8` PackedWeight of `dtype` with the same elements and fp32 scales: per channel
    ("tensor": its one scale on every channel) or per B x B block."""
    weight = weight_matrix(tensors, name, torch.float8_e4m3fn)
    n, k = weight.shape
    fmt = get_format("fp8")
    strategy = weights["strategy"]
    side = weights["block_structure"][0] if strategy == "block" else None
    # a block larger than the whole weight is its one tile, which lowbit stores as such
    attrs = fmt.resolve_attrs((n, k), {"block": side, "act": act})
    if strategy == "block":
        scale_shape = (-(-n // side), -(-k // side))
        scales = stored_tensor(tensors, f"{name}.weight_scale", SCALE_DTYPES, shape=scale_shape).float().t()
    elif strategy == "channel":
        scales = stored_tensor(tensors, f"{name}.weight_scale", SCALE_DTYPES, shape=(n, 1)).float().reshape(1, n)
    else:
        scales = stored_tensor(tensors, f"{name}.weight_scale", SCALE_DTYPES, shape=(1,)).float().expand(1, n)
    if not bool(torch.isfinite(scales).all()):
        raise fail(f"{name}.weight_scale", "holds values that are not finite")
    kp = fmt.padded_k(k, attrs["block"])
    elements = F.pad(weight.view(torch.uint8), (0, kp - k)).view(torch.float8_e4m3fn)  # +0.0
    return PackedWeight("fp8", (n, k), dtype, attrs, {"qweight": elements, "scales": scales.contiguous()})


def _element_codes(tensors: dict[str, torch.Tensor], name: str, bits: int, n: int, k: int) -> torch.Tensor:
    """A microscaled layer's element codes, int32 [N, K] (sign in the top bit): the 4-bit codes of
    name.weight_packed (uint8 [N, K/2], element 2i in the low nibble), the 6-bit ones (uint8
    [N, 3K/4], four codes per three bytes, little-endian) or the E4M3 bytes of name.weight
    (float8_e4m3fn [N, K])."""
    if bits == 8:
        codes = stored_tensor(tensors, f"{name}.weight", (torch.float8_e4m3fn,), shape=(n, k)).view(torch.uint8).int()
        if bool(((codes & 0x7F) == 0x7F).any()):
            raise fail(f"{name}.weight", "holds NaN elements")
        return codes
    if k * bits % 8:
        raise fail(f"{name}.weight_packed", f"in_features {k} of {bits}-bit codes do not fill whole bytes")
    # both packings are the bytes as one little-endian bit stream, as pack-quantized's int32 words are
    words = stored_tensor(tensors, f"{name}.weight_packed", (torch.uint8,), shape=(n, k * bits // 8))
    return unpack_bitstream(words, bits, k)


def _global_scale(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """An NVFP4 global scale g, fp32 [1], checked to be finite and positive."""
    scale = stored_tensor(tensors, key, SCALE_DTYPES, shape=(1,)).float()
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise fail(key, f"{scale.item()!r} is not a finite positive scale")
    return scale


def microscaled_layer(tensors: dict[str, torch.Tensor], name: str, fmt: str, shape: tuple[int, int], act: str | None,
                      dtype: torch.dtype) -> PackedWeight:
    """The nvfp4- / mxfp4- / mxfp6-pack-quantized or mxfp8-quantized layer `name` ([N, K] =
    `shape`) as a lowbit nvfp4 / mxfp4 / mxfp6 / mxfp8 PackedWeight of `dtype` with the same
    element codes and block scales: name.weight_scale [N, ceil(K/block)] holds E8M0 bytes (uint8)
    or, for nvfp4, float8_e4m3fn scales, and nvfp4's name.weight_global_scale g (fp32 [1])
    becomes lowbit's tensor scale 1/g (compressed-tensors divides by g; lowbit multiplies)."""
    lowbit_name, bits, _, block, _ = MICROSCALED[fmt]
    n, k = shape
    kp = padded_k(k, 32)
    codes = F.pad(_element_codes(tensors, name, bits, n, k), (0, kp - k))  # code 0 is +0.0
    nvfp4 = lowbit_name == "nvfp4"
    scale_dtype = torch.float8_e4m3fn if nvfp4 else torch.uint8
    scales = stored_tensor(tensors, f"{name}.weight_scale", (scale_dtype,), shape=(n, -(-k // block)))
    if bool((scales.float().isnan() if nvfp4 else scales == 255).any()):  # E8M0 0xFF is NaN
        raise fail(f"{name}.weight_scale", "holds NaN scales")
    # the padding blocks (zero elements) get scale byte 0, as lowbit's quantizer gives all-zero blocks
    scales = F.pad(scales.view(torch.uint8), (0, kp // block - scales.shape[1])).view(scale_dtype)
    fields = {"qweight": bitpack.pack(codes, bits), "scales": scales.t().contiguous()}
    options: dict[str, Any] = {"act": act}
    if nvfp4:
        fields["tensor_scale"] = 1.0 / _global_scale(tensors, f"{name}.weight_global_scale")
        if act is not None:  # the calibrated activation scale
            options["act_tensor_scale"] = float(1.0 / _global_scale(tensors, f"{name}.input_global_scale"))
    elif act is not None:
        options["act_amax_round"] = MX_ACT_AMAX_ROUND[act]
    attrs = get_format(lowbit_name).resolve_attrs((n, k), options)
    return PackedWeight(lowbit_name, (n, k), dtype, attrs, fields)


def _lowbit_format(scheme: dict[str, Any]) -> str:
    if scheme["format"] in MICROSCALED:
        return MICROSCALED[scheme["format"]][0]
    return "fp8" if scheme["weights"]["type"] == "float" else f"int{scheme['weights']['num_bits']}"


def target_format(path: str | Path) -> str:
    """The lowbit formats a compressed-tensors folder's layers import as, e.g. "int4", "nvfp4" or
    "int4/int8"; CheckpointError for a folder lowbit cannot import."""
    folder = Path(path)
    quantization = read_config(folder)["quantization_config"]
    return "/".join(sorted({_lowbit_format(scheme) for _, scheme in _weight_schemes(folder, quantization).values()}))


def load_compressed_tensors(path: str | Path, *, model: nn.Module | None = None,
                            device: str | torch.device = "cpu") -> nn.Module:
    """Read a compressed-tensors folder -> model whose quantized Linear layers are lowbit QuantLinears:
    `int2` ... `int8` from integer layers (the same codes and groups, float16 scales), `fp8`
    from float-quantized ones (the same E4M3 elements and scales; act="fp8" for dynamic per-token
    FP8 activations), `nvfp4` / `mxfp4` / `mxfp6` / `mxfp8` from NVFP4 and MX ones (the same
    codes and block scales; MX activations with compressed-tensors' rule). The other modules keep
    their stored tensors. model: optional skeleton to fill (needed when config.json names no
    transformers class). CheckpointError naming the file, tensor or field for anything it cannot
    import."""
    folder = Path(path)
    config = read_config(folder)
    if not is_compressed_tensors_folder(folder):
        raise fail(str(folder / "config.json"), f"no quantization_config with quant_method {QUANT_METHOD!r}")
    schemes = _weight_schemes(folder, config["quantization_config"])
    dtype = config_dtype(folder, config, "the dequantized weights' dtype")
    skeleton_model = skeleton(folder, config, "quantization_config") if model is None else model
    tensors = read_tensors(folder)
    names = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    if not names:
        raise fail(str(folder), "no quantized layers (no *.weight_scale tensors)")
    packed, inexact, total, keys = {}, 0, 0, CheckpointKeys(skeleton_model)
    for name in tqdm(names, desc="import compressed-tensors", unit="layer", disable=len(names) < 8):
        class_name, shape = _stored_layer(skeleton_model, keys, name)
        scheme = _scheme_of(name, class_name, schemes, folder)
        if scheme["format"] in MICROSCALED:  # no weight_shape is stored: the model gives [N, K]
            if shape is None:
                raise fail(f"{name}.weight_scale", f"the model's {class_name} there is not a Linear layer")
            packed[name] = microscaled_layer(tensors, name, scheme["format"], shape, scheme["act"], dtype)
            continue
        if scheme["weights"]["type"] == "float":
            packed[name] = fp8_layer(tensors, name, scheme["weights"], scheme["act"], dtype)
            continue
        packed[name], rounded = int_layer(tensors, name, scheme, dtype)
        inexact, total = inexact + rounded, total + packed[name].scales.numel()
    warn_inexact_scales(folder, inexact, total, "weight scales", "compressed-tensors")
    layer_fields = {f"{name}.{field}" for name in packed for field in LAYER_FIELDS}
    return model_with_layers(folder, skeleton_model, tensors, layer_fields, packed, model).to(device).eval()
