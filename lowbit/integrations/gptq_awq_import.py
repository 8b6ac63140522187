"""Import a folder of a GPTQ or AWQ model: the Hub's "-GPTQ" / "-AWQ" checkpoints, written by
AutoGPTQ / GPTQModel (config.json quantization_config {"quant_method": "gptq", ...}) or AutoAWQ's
GEMM layout ({"quant_method": "awq", "version": "gemm", ...}); in older folders config.json has
no quantization_config and the settings sit in AutoGPTQ's quantize_config.json or AutoAWQ's
quant_config.json (w_bit, q_group_size, version "GEMM").

For each GPTQ Linear M (b = bits in {2, 3, 4, 8}, G = ceil(K / group_size) groups, one with -1):
  M.qweight  int32 [ceil(K*b/32), N]  the codes u of each column as one little-endian bit stream
                                      down K: code k at bits [k*b, k*b+b) (3 bits: 32 codes per
                                      three words, some straddling two)
  M.qzeros   int32 [G, ceil(N*b/32)]  the zero points z of each group, packed the same way along N
  M.scales   float16 [G, N]
  M.g_idx    int32 [K]                each column's group
  M.bias     float16 [N]              optional
and the weight is (u - z) * scale. checkpoint_format "gptq" (v1, the default) stores z - 1:
GPTQModel writes it by subtracting 0x11111111 (4 bits; 0x55555555, 0x01010101 for 2, 8) from
each packed word and reads it back by adding that constant, borrows and carries included, so z = 0
round-trips; lowbit reads it that way. 3-bit words are shifted per field, modulo 8, as GPTQModel
does for them. "gptq_v2" stores z itself.

For each AWQ GEMM Linear M (4 bits): M.qweight int32 [K, N/8] and M.qzeros int32 [G, N/8] hold
eight codes per word along N, the word's nibble i holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i];
M.scales float16 [G, N]; the weight is (u - z) * scale, with z as stored.

Each becomes a lowbit `int{b}` layer with the same codes and groups, the scales in float16 (other
dtypes rounded to it, with a warning that counts inexact ones) and the zero points as lowbit's
float16 zeros: symmetric when every zero point of the layer is 2^(b-1) (GPTQ's sym=True; the
dequantized weight is the same either way, and symmetric layers skip the zero-point load).
desc_act without static groups (g_idx not k // group_size: each group gathers columns from all
over K) is stored in the order that makes each group consecutive, with that order as the layer's
input permutation (`permuted`, lowbit/formats/integer.py).

GPTQModel's per-module `dynamic` overrides ({"regex": {overrides}}, in order; the first entry
whose regex matches the start of a module's name, as GPTQModel's re.match, decides): "-:regex" leaves the
module unquantized (it is stored as a float weight), "regex" or "+:regex" gives it the entry's
`bits` and `group_size` in place of the folder's (its calibration settings, such as sym and
desc_act, need nothing: zero points and g_idx are read per layer). lowbit matches with the `regex`
package (PCRE-like, as GPTQModel's `pcre` and vLLM's `regex`), each match under a time limit
(foreign_folder.pattern_matches), so a pattern that backtracks without end is refused rather than
hanging the load.

Refused with a CheckpointError naming the file, tensor or field: a g_idx whose groups do not each
hold group_size columns, other checkpoint formats (marlin, bitblas, GPTQModel's planar gptq_p),
other AWQ versions (gemv, gemv_fast, exllama, ipex, marlin), pack dtypes other than int32,
`dynamic` entries that are not regular expressions (or take over a second to match a name)
or override anything but the settings above (a per-module adapter, format or pack dtype), codes
stored for a module a "-:" entry leaves unquantized, group sizes that are not a multiple of 32,
damaged tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import regex
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..formats.integer import SCALE_DTYPE, padded_k
from ..packed import PackedWeight
from .foreign_folder import (check_not_empty, config_dtype, fail, float16_scales, folder_pattern, group_order,
                             has_quant_method, integer_layer, is_name_in, model_with_layers, pattern_matches,
                             read_config, read_tensors, skeleton, stored_tensor, unpack_bitstream,
                             warn_inexact_scales)

QUANT_METHODS = ("gptq", "awq")
#: GPTQ's checkpoint_format -> whether its zero points are stored minus one (v1)
GPTQ_FORMATS = {"gptq": True, "gptq_v2": False}
GPTQ_BITS = (2, 3, 4, 8)
#: AWQ GEMM's word slot i holds column 8c + AWQ_ORDER[i]; column 8c + j sits in slot AWQ_SLOT[j]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_SLOT = tuple(AWQ_ORDER.index(j) for j in range(8))
LAYER_FIELDS = ("qweight", "qzeros", "scales", "g_idx")


#: `dynamic` override keys that change nothing lowbit reads: the quantizer's calibration settings
#: (zero points, and with them sym, are read per layer; so is desc_act's g_idx)
CALIBRATION_ONLY = ("sym", "desc_act", "damp_percent", "damp_auto_increment", "static_groups", "true_sequential",
                    "mse", "act_group_aware")


@dataclass(frozen=True)
class DynamicRule:
    """One entry of GPTQModel's `dynamic`: the modules whose name `pattern` matches are left
    unquantized (skip) or take the entry's bits / group_size (None: the folder's)."""
    field: str         # where the entry sits, for errors
    pattern: regex.Pattern  # foreign_folder.folder_pattern
    skip: bool
    bits: int | None
    group_size: int | None


@dataclass(frozen=True)
class Scheme:
    """What quantization_config says about the folder's quantized layers."""
    method: str        # "gptq" or "awq"
    bits: int
    group_size: int    # -1: one group per row
    zeros_minus_one: bool  # GPTQ v1
    dynamic: tuple[DynamicRule, ...] = ()  # per-module overrides, first match wins

    def for_layer(self, name: str) -> Scheme:
        """The scheme of the layer whose codes are stored under `name` (its module name):
        the first matching `dynamic` entry's overrides, else the folder's own settings.
        CheckpointError when that entry leaves the module unquantized."""
        for rule in self.dynamic:
            if pattern_matches(rule.pattern, name, rule.field):
                if rule.skip:
                    raise fail(f"{name}.qweight", f"{rule.field} leaves this module unquantized, yet the folder "
                               "holds its codes")
                return replace(self, dynamic=(),
                               bits=self.bits if rule.bits is None else rule.bits,
                               group_size=self.group_size if rule.group_size is None else rule.group_size)
        return replace(self, dynamic=())


#: the files older AutoGPTQ / AutoAWQ folders keep their settings in (config.json then has no
#: quantization_config), and the quant_method each implies when it names none
SIDE_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


def is_gptq_awq_folder(path: str | Path) -> bool:
    """True when `path` has a config.json whose quantization_config says quant_method "gptq" or
    "awq", or a config.json without quantization_config beside AutoGPTQ's quantize_config.json /
    AutoAWQ's quant_config.json."""
    if any(has_quant_method(path, method) for method in QUANT_METHODS):
        return True
    folder = Path(path)
    try:
        config = read_config(folder)
    except CheckpointError:
        return False
    return "quantization_config" not in config and any((folder / name).is_file() for name in SIDE_CONFIGS)


def _quantization_config(folder: Path, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the settings, the prefix of their field names in errors): config.json's
    quantization_config, else the side file of an older AutoGPTQ / AutoAWQ folder."""
    if "quantization_config" in config:
        return config["quantization_config"], f"{folder / 'config.json'}: quantization_config."
    for name, method in SIDE_CONFIGS.items():
        if (folder / name).is_file():
            settings = read_config(folder, name)
            return {"quant_method": method, **settings}, f"{folder / name}: "
    raise fail(f"{folder / 'config.json'}: quantization_config", "missing (and no quantize_config.json / "
               "quant_config.json beside it)")


def _option(quantization: dict[str, Any], where: str, names: tuple[str, ...], default: Any) -> tuple[str, Any]:
    """(field, value) of the first of `names` that quantization_config sets to something other
    than null (AutoAWQ, transformers and GPTQModel spell some fields differently), else
    (names[0], default)."""
    for name in names:
        if quantization.get(name) is not None:
            return f"{where}{name}", quantization[name]
    return f"{where}{names[0]}", default


def read_scheme(folder: Path, config: dict[str, Any]) -> Scheme:
    """The folder's Scheme, every field checked; CheckpointError naming the field otherwise."""
    quantization, where = _quantization_config(folder, config)
    if not isinstance(quantization, dict) or quantization.get("quant_method") not in QUANT_METHODS:
        raise fail(f"{where}quant_method", f"expected one of {list(QUANT_METHODS)}")
    method = quantization["quant_method"]
    bits = _checked_bits(*_option(quantization, where, ("bits", "w_bit"), 4), method)
    group_size = _checked_group_size(*_option(quantization, where, ("group_size", "q_group_size"), 128))
    dynamic = _dynamic_rules(*_option(quantization, where, ("dynamic",), None), method)
    if method == "awq":
        field, version = _option(quantization, where, ("version",), "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise fail(field, f"{version!r}: lowbit imports AWQ's GEMM layout ('gemm')")
        field, zero_point = _option(quantization, where, ("zero_point",), True)
        if zero_point is not True:
            raise fail(field, f"{zero_point!r}: lowbit imports AWQ GEMM layers with zero points (true)")
        return Scheme(method, bits, group_size, False, dynamic)
    field, checkpoint_format = _option(quantization, where, ("checkpoint_format", "format"), "gptq")
    if not is_name_in(checkpoint_format, GPTQ_FORMATS):
        raise fail(field, f"{checkpoint_format!r}: lowbit imports GPTQ's {' and '.join(map(repr, GPTQ_FORMATS))} "
                   "layouts")
    field, pack_dtype = _option(quantization, where, ("pack_dtype",), "int32")
    if pack_dtype not in ("int32", "torch.int32"):
        raise fail(field, f"{pack_dtype!r}: lowbit imports codes packed in int32 words")
    return Scheme(method, bits, group_size, GPTQ_FORMATS[checkpoint_format], dynamic)


def _checked_bits(field: str, bits: Any, method: str) -> int:
    allowed = GPTQ_BITS if method == "gptq" else (4,)
    if type(bits) is not int or bits not in allowed:  # not bools, nor floats such as 4.0
        raise fail(field, f"{bits!r}: lowbit imports {method.upper()} weights of {' / '.join(map(str, allowed))} bits")
    return bits


def _checked_group_size(field: str, group_size: Any) -> int:
    if type(group_size) is not int or not (group_size == -1 or group_size > 0):  # not bools
        raise fail(field, f"{group_size!r}: expected -1 (per channel) or a positive int")
    if group_size > 0 and group_size % 32:
        raise fail(field, f"{group_size}: lowbit's groups are a positive multiple of 32 (or -1, per channel)")
    return group_size


def _dynamic_rules(field: str, dynamic: Any, method: str) -> tuple[DynamicRule, ...]:
    """GPTQModel's `dynamic` ({"[+:|-:]regex": {overrides}}; null or {}: none) as DynamicRules, in order."""
    if dynamic is None:
        return ()
    if not isinstance(dynamic, dict):
        raise fail(field, f"{dynamic!r}: expected an object of module-name regexes and their overrides")
    rules = []
    for key, overrides in dynamic.items():
        where = f"{field}[{key!r}]"
        skip = key.startswith("-:")
        pattern = folder_pattern(key[2:] if skip or key.startswith("+:") else key, where)
        if not isinstance(overrides, dict):
            raise fail(where, f"{overrides!r}: expected an object of overrides")
        for name in overrides:
            if name not in ("bits", "group_size", *CALIBRATION_ONLY):
                raise fail(f"{where}.{name}", "lowbit imports per-module bits and group_size overrides (and "
                           f"ignores the calibration settings {', '.join(CALIBRATION_ONLY)}), not this one")
        bits = overrides.get("bits")
        group_size = overrides.get("group_size")
        rules.append(DynamicRule(
            where, pattern, skip,
            None if skip or bits is None else _checked_bits(f"{where}.bits", bits, method),
            None if skip or group_size is None else _checked_group_size(f"{where}.group_size", group_size)))
    return tuple(rules)


def target_format(path: str | Path) -> str:
    """The lowbit formats a GPTQ / AWQ folder's layers import as ("int4", or with `dynamic`
    overrides e.g. "int4/int8"); CheckpointError for a folder lowbit cannot import."""
    folder = Path(path)
    scheme = read_scheme(folder, read_config(folder))
    widths = {scheme.bits} | {rule.bits for rule in scheme.dynamic if rule.bits is not None}
    return "/".join(f"int{bits}" for bits in sorted(widths))


def _groups(scheme: Scheme, k: int) -> tuple[int, int]:
    """(the layer's number of groups G, lowbit's group_size) for K = k."""
    if scheme.group_size == -1 or scheme.group_size >= k:
        return 1, padded_k(k, 32)
    return -(-k // scheme.group_size), scheme.group_size


def _v1_zero_points(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """GPTQ v1 qzeros int32 [G, W] (z - 1 stored) -> z, int32 [G, n] (see the module doc)."""
    if bits == 3:
        return (unpack_bitstream(words, bits, n) + 1) % 8
    one_per_field = sum(1 << (bits * i) for i in range(32 // bits))
    words = (words.to(torch.int64) + one_per_field) & 0xFFFFFFFF  # modulo 2^32, as int32 words add
    return unpack_bitstream(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32), bits, n)


def gptq_layer(tensors: dict[str, torch.Tensor], name: str, scheme: Scheme,
               dtype: torch.dtype) -> tuple[PackedWeight, int]:
    """The GPTQ layer `name` (name.qweight, name.qzeros, name.scales, name.g_idx) as a lowbit
    `int{b}` PackedWeight of `dtype`, and how many of its scales float16 could not hold exactly."""
    bits = scheme.bits
    qweight = _qweight(tensors, name)
    n = qweight.shape[1]
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None:
        if g_idx.dim() != 1 or g_idx.dtype not in (torch.int32, torch.int64):
            raise fail(f"{name}.g_idx", f"expected an int32 [in_features] tensor, got {g_idx.dtype} {list(g_idx.shape)}")
        k = g_idx.numel()
    else:  # GPTQModel may leave g_idx out when it is k // group_size
        k = qweight.shape[0] * 32 // bits
    check_not_empty(f"{name}.qweight", n, k)
    stored_tensor(tensors, f"{name}.qweight", (torch.int32,), shape=(-(-k * bits // 32), n))
    groups, group_size = _groups(scheme, k)
    perm = None if g_idx is None else group_order(g_idx, group_size, f"{name}.g_idx")
    scales, inexact = float16_scales(tensors, f"{name}.scales", (groups, n))
    qzeros = stored_tensor(tensors, f"{name}.qzeros", (torch.int32,), shape=(groups, -(-n * bits // 32)))
    zeros = _v1_zero_points(qzeros, bits, n) if scheme.zeros_minus_one else unpack_bitstream(qzeros, bits, n)
    codes = unpack_bitstream(qweight.t(), bits, k)  # [N, K]
    return _layer(codes, bits, group_size, scales, zeros, dtype, perm), inexact


def awq_layer(tensors: dict[str, torch.Tensor], name: str, scheme: Scheme,
              dtype: torch.dtype) -> tuple[PackedWeight, int]:
    """The AWQ GEMM layer `name` (name.qweight, name.qzeros, name.scales) as a lowbit `int4`
    PackedWeight of `dtype`, and how many of its scales float16 could not hold exactly."""
    qweight = _qweight(tensors, name)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    check_not_empty(f"{name}.qweight", n, k)
    groups, group_size = _groups(scheme, k)
    scales, inexact = float16_scales(tensors, f"{name}.scales", (groups, n))
    qzeros = stored_tensor(tensors, f"{name}.qzeros", (torch.int32,), shape=(groups, n // 8))
    # slot order -> column order: column 8c + j is slot AWQ_SLOT[j] of word c
    columns = (torch.arange(n) // 8 * 8 + torch.tensor(AWQ_SLOT).repeat(n // 8))
    codes = unpack_bitstream(qweight, 4, n)[:, columns].t()  # [N, K]
    zeros = unpack_bitstream(qzeros, 4, n)[:, columns]
    return _layer(codes, 4, group_size, scales, zeros, dtype), inexact


def _qweight(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """name.qweight, checked to be a 2-D int32 tensor (its shape is checked against the layer's later)."""
    qweight = stored_tensor(tensors, f"{name}.qweight", (torch.int32,))
    if qweight.dim() != 2:
        raise fail(f"{name}.qweight", f"expected a 2-D int32 tensor, got {list(qweight.shape)}")
    return qweight


def _layer(codes: torch.Tensor, bits: int, group_size: int, scales: torch.Tensor, zeros: torch.Tensor,
           dtype: torch.dtype, perm: torch.Tensor | None = None) -> PackedWeight:
    """The lowbit layer of unsigned codes [N, K], float16 scales and integer zero points [G, N]:
    symmetric when every zero point is 2^(b-1); perm: activation order (`group_order`)."""
    symmetric = bool((zeros == 2 ** (bits - 1)).all())
    return integer_layer(codes, bits, group_size, scales.t(), None if symmetric else zeros.t().to(SCALE_DTYPE),
                         dtype, perm=perm)


def load_gptq_awq(path: str | Path, *, model: nn.Module | None = None,
                  device: str | torch.device = "cpu") -> nn.Module:
    """Read a GPTQ or AWQ (GEMM) folder -> model whose quantized Linear layers are lowbit
    `int{b}` QuantLinears with the same codes, groups and zero points (scales in float16); the
    other modules keep their stored tensors. model: optional skeleton to fill (needed when
    config.json names no transformers class). CheckpointError naming the file, tensor or field
    for anything it cannot import."""
    folder = Path(path)
    config = read_config(folder)
    scheme = read_scheme(folder, config)
    dtype = config_dtype(folder, config, "the quantized layers' output dtype")
    skeleton_model = skeleton(folder, config, "quantization_config") if model is None else model
    tensors = read_tensors(folder)
    names = sorted(key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight"))
    if not names:
        raise fail(str(folder), f"no {scheme.method.upper()} layers (no *.qweight tensors)")
    read_layer = gptq_layer if scheme.method == "gptq" else awq_layer
    packed, inexact, total = {}, 0, 0
    for name in tqdm(names, desc=f"import {scheme.method.upper()}", unit="layer", disable=len(names) < 8):
        packed[name], rounded = read_layer(tensors, name, scheme.for_layer(name), dtype)
        inexact, total = inexact + rounded, total + packed[name].scales.numel()
    warn_inexact_scales(folder, inexact, total, "scales", scheme.method.upper())
    layer_fields = {f"{name}.{field}" for name in packed for field in LAYER_FIELDS}
    return model_with_layers(folder, skeleton_model, tensors, layer_fields, packed, model).to(device).eval()
