"""Microscaling formats (the torch spec; DESIGN.md section 4, OCP MX v1.0 and NVIDIA NVFP4).

One block-scale machinery, element codecs as data:

  format   element                      block  block scale                       bits/weight
  mxint8   INT8, k/64, k in [-127, 127]  32     E8M0 (power of two)                8.25
  mxfp8    FP8 E4M3                       32     E8M0                               8.25
  mxfp6    FP6 E2M3                       32     E8M0                               6.25
  mxfp4    FP4 E2M1                       32     E8M0                               4.25
  nvfp4    FP4 E2M1                       16     FP8 E4M3, times one fp32 tensor    4.5

MX (FLOOR, as torchao's `to_mx`): per block, e = floor(log2(amax)) - emax_elem, read from the
fp32 exponent bits of amax (torch.log2 rounds up just below powers of two), clamped to
[-127, 127]; scale byte = e + 127; elements = round-half-even(v / 2^e), saturated at the element
maximum (so 7.9 in an FP4 block whose scale is 1 stores 6). All-zero block: byte 0, data 0.

NVFP4: t = amax(W) / (448 * 6) (fp32; an all-zero weight gets t = 1),
s = e4m3(clamp((block_amax / 6) / t, 2^-6, 448)), q = e2m1(clamp(w * ((1 / t) / s), -6, 6)),
w_hat = value(q) * s * t.

Storage: K is zero-padded to Kp (a multiple of 32). qweight int32 [N, Kp*bits/32] in the bit
planes of lowbit/formats/bitpack.py: for 4- and 8-bit elements that is exactly the packed byte
stream (element 2i in the low nibble). scales uint8 [Kp/block, N] (E8M0 bytes) or float8_e4m3fn
[Kp/16, N]; nvfp4 adds tensor_scale float32 [1].

Options (accuracy studies; the seed paper "INT v.s. FP"):
  act="mxfp4" | "nvfp4" | "mxint8" | "mxfp8" | "mxfp6": activations are fake-quantized per block
      along K with that format's rules, in torch, on the fly (W4A4 / W8A8 numerics).
  act_amax_round=m (MX activations only; stored only when set): before a block's E8M0 exponent is
      read, its amax is rounded half up to m mantissa bits, so a block whose amax has mantissa
      >= 2 - 2^-(m+1) (1.75 for m=1) gets the next power of two instead of saturating its largest
      elements. This is compressed-tensors' dynamic MX activation rule (m=1 for MXFP4 and MXFP8, m=3 for MXFP6;
      torchao's EVEN mode with m = the element's mantissa bits); unset is torchao's FLOOR.
  act_tensor_scale=t (act="nvfp4" only; stored only when set): a static (calibrated) fp32 tensor
      scale for the activations instead of one from each call's amax, as NVFP4 W4A4 checkpoints
      store it (compressed-tensors' input_global_scale g, t = 1/g).
  rotate="hadamard": a block Hadamard transform along K (block = the format's block), applied to
      the weight before quantization and to activations at run time. H is orthogonal, so
      (x H)(W H)^T = x W^T; dequantize() returns the weight in the original basis.
  method="gptq" (not stored): GPTQ (lowbit/formats/gptq.py) on the layer's input Hessian; each
      block's scale follows the rules above on the block as GPTQ's updates left it. mxfp4 with
      gptq and no rotation warns (GPTQ_WITHOUT_ROTATION_WARNING). act_order=True (not stored):
      gptq.py's column order, each block's scale from the weight as given.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import FormatError
from ..packed import PackedWeight
from . import bitpack, gptq, register_format
from .base import FieldSpec, Format, launch
from .division import divide
from .integer import padded_k

_ROTATIONS = (None, "hadamard")
#: measured on MiniLM (README, microscaling formats): one massive activation ([CLS], one channel)
#: dominates a layer's Hessian, mxfp4's E8M0 blocks round that channel's weights coarsely, and
#: GPTQ moves the error onto every other token
GPTQ_WITHOUT_ROTATION_WARNING = (
    "mxfp4 with method='gptq' and no rotation lost accuracy against method='rtn' on MiniLM (min embedding "
    "cosine 0.79 vs 0.96), whose [CLS] token carries a massive activation; rotate='hadamard' with gptq gave 0.97 "
    "there. Measure it on your model (README: microscaling formats, GPTQ)")
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = 2.0**-6


# -- element codecs -------------------------------------------------------------------------------

def encode_minifloat(v: torch.Tensor, exp_bits: int, man_bits: int, max_value: float) -> torch.Tensor:
    """fp32 -> codes (int32, sign bit at exp_bits + man_bits) of a small float without inf/NaN:
    round half to even, saturating at max_value. Normals keep `man_bits` fp32 mantissa bits with
    round-half-even on the integer bits; subnormals are rne(|v| / smallest subnormal), done by an
    fp32 add of 2^23 (which rounds to nearest even)."""
    bias = 2 ** (exp_bits - 1) - 1
    sign = torch.signbit(v).int() << (exp_bits + man_bits)
    a = v.abs().clamp(max=max_value)
    bits = a.view(torch.int32)
    shift = 23 - man_bits
    normal = ((bits + (1 << (shift - 1)) - 1 + ((bits >> shift) & 1)) >> shift) - ((127 - bias) << man_bits)
    subnormal = (a * 2.0 ** (bias - 1 + man_bits) + 2.0**23).view(torch.int32) - 0x4B000000
    return torch.where(a < 2.0 ** (1 - bias), subnormal, normal) | sign


def decode_minifloat(codes: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """Codes -> fp32 values (exact)."""
    bias = 2 ** (exp_bits - 1) - 1
    codes = codes.int()
    sign = 1.0 - 2.0 * ((codes >> (exp_bits + man_bits)) & 1).float()
    exponent = (codes >> man_bits) & ((1 << exp_bits) - 1)
    mantissa = (codes & ((1 << man_bits) - 1)).float() / 2**man_bits
    normal = exponent > 0
    magnitude = torch.where(normal, 1.0 + mantissa, mantissa) * torch.exp2((torch.where(normal, exponent, 1) - bias).float())
    return sign * magnitude


@dataclass(frozen=True)
class ElementCodec:
    """An element type: its kernel decoder name, width, the exponent of its largest power of two
    (`emax`, for the E8M0 shared exponent), and exact encode (fp32 -> int32 codes, rne,
    saturating) / decode (codes -> fp32)."""

    kernel: str
    bits: int
    emax: int
    max_value: float
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]


def _minifloat_codec(kernel: str, exp_bits: int, man_bits: int, max_value: float) -> ElementCodec:
    return ElementCodec(kernel, 1 + exp_bits + man_bits, int(math.floor(math.log2(max_value))), max_value,
                        lambda v: encode_minifloat(v, exp_bits, man_bits, max_value),
                        lambda c: decode_minifloat(c, exp_bits, man_bits))


def _int8_encode(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v * 64).clamp(-127, 127).int() & 0xFF  # two's complement byte


def _int8_decode(codes: torch.Tensor) -> torch.Tensor:
    return (((codes.int() + 128) & 0xFF) - 128).float() / 64


E2M1 = _minifloat_codec("e2m1", 2, 1, 6.0)
E2M3 = _minifloat_codec("e2m3", 2, 3, 7.5)
E4M3 = _minifloat_codec("e4m3", 4, 3, 448.0)
INT8 = ElementCodec("sint", 8, 0, 127 / 64, _int8_encode, _int8_decode)


def hadamard(size: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [size, size] (size a power of two), symmetric."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(size)).to(dtype=dtype, device=device)


# rotate="hadamard" layers rotate activations on every forward: build each matrix once.
_cached_hadamard = functools.lru_cache(maxsize=None)(hadamard)


def rotate_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., Kp] -> [..., Kp] with every length-`block` slice along K multiplied by H (= H^-1)."""
    shape = x.shape
    # (torch.compile traces the construction instead: dynamo does not honour lru_cache)
    h = (hadamard if torch.compiler.is_compiling() else _cached_hadamard)(block, x.dtype, x.device)
    return (x.reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Integer exponents in [-127, 127] -> exact fp32 powers of two (2^-127 is subnormal)."""
    normal = ((e.clamp(min=-126) + 127) << 23).view(torch.float32)
    return torch.where(e == -127, torch.tensor(2.0**-127), normal)


# -- the formats --------------------------------------------------------------------------------

class MicroscalingFormat(Format):
    """Block-scaled formats: `mx*` (E8M0 scale per 32) and `nvfp4` (E4M3 per 16 + tensor scale)."""

    ATTRS = ("act", "rotate", "act_amax_round", "act_tensor_scale")
    OPTIONAL_ATTRS = ("act_amax_round", "act_tensor_scale")
    DEFAULTS = {"act": None, "rotate": None}
    QUANTIZER_OPTIONS = ("method", "act_order")
    METHODS = ("rtn", "gptq")

    def __init__(self, name: str, codec: ElementCodec, block: int, scale_kind: str):
        self.name = name
        self.codec = codec
        self.block = block
        self.scale_kind = scale_kind  # "e8m0" or "e4m3" (NVFP4, two-level with a tensor scale)
        self.layout = bitpack.layout_version(codec.bits)

    # -- options / attributes -------------------------------------------------------------
    def check_values(self, values: dict[str, Any]) -> None:
        act, rotate = values["act"], values["rotate"]
        if act is not None and not (isinstance(act, str) and act in MICROSCALING_FORMATS):
            raise FormatError(f"{self.name}: act must be None or one of {sorted(MICROSCALING_FORMATS)}, got {act!r}")
        if rotate not in _ROTATIONS:
            raise FormatError(f"{self.name}: rotate must be one of {_ROTATIONS}, got {rotate!r}")
        amax_round = values.get("act_amax_round")
        if amax_round is not None and not (isinstance(act, str) and act in MICROSCALING_FORMATS
                                           and MICROSCALING_FORMATS[act].scale_kind == "e8m0"
                                           and type(amax_round) is int and 1 <= amax_round <= 7):
            raise FormatError(f"{self.name}: act_amax_round must be None, or 1 to 7 with an MX act (E8M0 scales), "
                              f"got {amax_round!r} with act={act!r}")
        tensor_scale = values.get("act_tensor_scale")
        if tensor_scale is not None and not (act == "nvfp4" and type(tensor_scale) is float
                                             and math.isfinite(tensor_scale) and tensor_scale > 0):
            raise FormatError(f"{self.name}: act_tensor_scale must be None, or a finite positive float with "
                              f"act='nvfp4', got {tensor_scale!r} with act={act!r}")

    def field_specs(self, shape: tuple[int, int], attrs: dict[str, Any]) -> dict[str, FieldSpec]:
        n, k = shape
        kp = padded_k(k, 32)
        scale_dtype = torch.uint8 if self.scale_kind == "e8m0" else torch.float8_e4m3fn
        specs = {"qweight": FieldSpec(torch.int32, (n, kp * self.codec.bits // 32)),
                 "scales": FieldSpec(scale_dtype, (kp // self.block, n))}
        if self.scale_kind == "e4m3":
            specs["tensor_scale"] = FieldSpec(torch.float32, (1,))
        return specs

    # -- the spec ---------------------------------------------------------------------------
    def encode(self, w: torch.Tensor, tensor_scale: torch.Tensor | None = None, amax_round: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """[R, Kp] fp32 (Kp a multiple of the block) -> (codes int32 [R, Kp], block scales
        [R, Kp/block] (uint8 E8M0 bytes or float8_e4m3fn), tensor scale fp32 [1] or None).
        nvfp4: tensor_scale given is used instead of the one w's amax sets. amax_round: see
        act_amax_round (MX only)."""
        r, kp = w.shape
        blocks = w.reshape(r, kp // self.block, self.block)
        scales, tensor_scale = self.block_scales(blocks.abs().amax(dim=-1), tensor_scale, amax_round)
        return self.encode_elements(blocks, scales, tensor_scale).reshape(r, kp), scales, tensor_scale

    def block_scales(self, amax: torch.Tensor, tensor_scale: torch.Tensor | None = None, amax_round: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block amax fp32 [R, B] -> (stored block scales [R, B]: uint8 E8M0 bytes or
        float8_e4m3fn, tensor scale fp32 [1] (nvfp4: from the amax of all blocks unless given)
        or None). amax_round: MX only, amax rounded half up to that many mantissa bits first."""
        if self.scale_kind == "e8m0":
            bits = amax.view(torch.int32)
            if amax_round is not None:  # a carry out of the mantissa bumps the exponent
                bits = bits + (1 << (22 - amax_round))
            exponent = ((bits >> 23) & 0xFF) - 127
            return (exponent - self.codec.emax).clamp(-127, 127).add(127).to(torch.uint8), None
        if tensor_scale is None:
            w_amax = amax.amax() if amax.numel() else amax.new_zeros(())  # activations: M may be 0
            tensor_scale = torch.where(w_amax > 0, divide(w_amax, _E4M3_MAX * self.codec.max_value), 1.0).reshape(1)
        s = (divide(amax, self.codec.max_value) / tensor_scale).clamp(_E4M3_MIN_NORMAL, _E4M3_MAX).to(torch.float8_e4m3fn)
        return s, tensor_scale

    def encode_elements(self, blocks: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor | None
                        ) -> torch.Tensor:
        """fp32 blocks [R, B, b] and their stored scales [R, B] -> element codes int32 [R, B, b]."""
        if self.scale_kind == "e8m0":
            return self.codec.encode(blocks / _pow2(scales.int() - 127).unsqueeze(-1))
        reciprocal = (1.0 / tensor_scale) / scales.float()
        return self.codec.encode((blocks * reciprocal.unsqueeze(-1)).clamp(-self.codec.max_value, self.codec.max_value))

    def scale_values(self, scales: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
        """Stored block scales [...] -> the fp32 factors their elements decode with [...]."""
        if self.scale_kind == "e8m0":
            return _pow2(scales.int() - 127)
        return scales.float() * tensor_scale

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
        """Inverse of `encode`: [R, Kp] fp32."""
        r, kp = codes.shape
        values = self.codec.decode(codes).reshape(r, kp // self.block, self.block)
        return (values * self.scale_values(scales, tensor_scale).unsqueeze(-1)).reshape(r, kp)

    def fake_quantize(self, x: torch.Tensor, amax_round: int | None = None, tensor_scale: float | None = None
                      ) -> torch.Tensor:
        """[M, Kp] fp32 activations -> the values this format represents (dynamic, per block;
        amax_round: see act_amax_round; tensor_scale: nvfp4's static scale, see act_tensor_scale)."""
        if tensor_scale is not None:  # filled on x's device: no host-to-device copy (and sync) per call
            tensor_scale = x.new_full((1,), tensor_scale, dtype=torch.float32)
        return self.decode(*self.encode(x, tensor_scale, amax_round))

    def _prepare(self, x: torch.Tensor, kp: int, attrs: dict[str, Any]) -> torch.Tensor:
        """[M, K] -> [M, Kp] fp32 as the stored weight sees it: zero-padded, rotated, fake-quantized."""
        x = F.pad(x.float(), (0, kp - x.shape[-1]))
        if attrs["rotate"] == "hadamard":
            x = rotate_blocks(x, self.block)
        if attrs["act"] is not None:
            x = MICROSCALING_FORMATS[attrs["act"]].fake_quantize(x, attrs.get("act_amax_round"),
                                                                 attrs.get("act_tensor_scale"))
        return x

    def quantize(self, weight: torch.Tensor, *, name: str = "weight", hessian: torch.Tensor | None = None,
                 **options: Any) -> PackedWeight:
        """[N, K] float weight -> PackedWeight. hessian: fp32 [K, K] Gram matrix of the layer's
        inputs (X^T X / rows), needed by method="gptq" and only by it."""
        weight = self.check_weight(weight, name)
        n, k = weight.shape
        attrs = self.resolve_attrs((n, k), options)
        method = options.get("method", "rtn")
        gptq.check_method(method, hessian, name)
        kp = padded_k(k, 32)
        w = F.pad(weight.float(), (0, kp - k))
        if attrs["rotate"] == "hadamard":
            w = rotate_blocks(w, self.block)
        if method == "gptq":
            if self.name == "mxfp4" and attrs["rotate"] is None:
                warnings.warn(GPTQ_WITHOUT_ROTATION_WARNING, stacklevel=2)
            codes, scales, tensor_scale = self._gptq_encode(w, gptq.check_hessian(hessian, k, name), attrs, name,
                                                            options.get("act_order", False))
        else:
            codes, scales, tensor_scale = self.encode(w)
        tensors = {"qweight": bitpack.pack(codes & ((1 << self.codec.bits) - 1), self.codec.bits),
                   "scales": scales.t().contiguous()}
        if tensor_scale is not None:
            tensors["tensor_scale"] = tensor_scale
        return PackedWeight(self.name, (n, k), weight.dtype, attrs, tensors)

    def _gptq_encode(self, w: torch.Tensor, hessian: torch.Tensor, attrs: dict[str, Any], name: str,
                     act_order: bool = False):
        """`encode` of the stored weight w fp32 [N, Kp] with codes chosen by GPTQ (gptq.py): each
        block's scale by the format's rule on the block as GPTQ's updates left it; nvfp4's tensor
        scale from the weight before any update. With rotate="hadamard" the Hessian is rotated
        as the inputs are (R^T H R). With act=..., H is that of the unquantized activations."""
        n, kp = w.shape
        k = hessian.shape[0]
        if attrs["rotate"] == "hadamard":
            hessian = F.pad(hessian, (0, kp - k, 0, kp - k))
            hessian = rotate_blocks(rotate_blocks(hessian, self.block).t(), self.block).t()
        tensor_scale = self.block_scales(w.reshape(n, kp // self.block, self.block).abs().amax(dim=-1))[1]

        def group_params(block):  # (stored scales [N, 1], the fp32 factors they decode with [N])
            scales = self.block_scales(block.abs().amax(dim=-1, keepdim=True), tensor_scale)[0]
            return scales, self.scale_values(scales, tensor_scale).reshape(n)

        def round_column(column, params):  # column [N]
            scales, factors = params
            codes = self.encode_elements(column.reshape(n, 1, 1), scales, tensor_scale).reshape(n)
            return codes, self.codec.decode(codes) * factors

        codes, params = gptq.solve(w, hessian, self.block, group_params, round_column, name, act_order)
        return codes, torch.cat([scales for scales, _ in params], dim=1), tensor_scale

    def stored_weight(self, packed: PackedWeight) -> torch.Tensor:
        """[N, Kp] fp32: the weight as stored (rotated when rotate="hadamard", K padding kept)."""
        n, k = packed.shape
        kp = padded_k(k, 32)
        codes = bitpack.unpack(packed.qweight, self.codec.bits, kp)
        return self.decode(codes, packed.scales.t(), packed.tensors.get("tensor_scale"))

    def _dequantize(self, packed: PackedWeight) -> torch.Tensor:
        w = self.stored_weight(packed)
        if packed.attrs["rotate"] == "hadamard":
            w = rotate_blocks(w, self.block)  # H is its own inverse
        return w[:, : packed.shape[1]].to(packed.dtype)

    def reference_linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """Weight-only: F.linear(x, dequantize(W)). With act / rotate: x is rotated and
        fake-quantized like the weight, then multiplied with the stored weight in fp32."""
        attrs = packed.attrs
        if attrs["act"] is None and attrs["rotate"] is None:
            return super().reference_linear(x, packed, bias)
        k = packed.shape[1]
        return self.fp32_linear(x, self._prepare(x.reshape(-1, k), padded_k(k, 32), attrs), self.stored_weight(packed),
                                bias)

    # -- kernels ------------------------------------------------------------------------------
    def triton_linear(self, x2d, packed, bias):
        n, k = packed.shape
        attrs = packed.attrs
        if attrs["act"] is not None or attrs["rotate"] is not None:
            kp = padded_k(k, 32)
            x2d, k = self._prepare(x2d, kp, attrs).to(x2d.dtype), kp
        return launch("dequant_linear", x2d, packed.qweight, packed.scales.view(torch.uint8), None,
                      packed.tensors.get("tensor_scale"), bias, self.codec.bits, self.codec.kernel, self.block, 1,
                      self.scale_kind, k)


MICROSCALING_FORMATS = {
    fmt.name: register_format(fmt)
    for fmt in (
        MicroscalingFormat("mxint8", INT8, 32, "e8m0"),
        MicroscalingFormat("mxfp8", E4M3, 32, "e8m0"),
        MicroscalingFormat("mxfp6", E2M3, 32, "e8m0"),
        MicroscalingFormat("mxfp4", E2M1, 32, "e8m0"),
        MicroscalingFormat("nvfp4", E2M1, 16, "e4m3"),
    )
}
