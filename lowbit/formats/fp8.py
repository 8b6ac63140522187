"""FP8 weight formats `fp8` (E4M3FN) and `fp8_e5m2` (the torch spec; DESIGN.md section 4).

Weights are scaled so that the largest magnitude of each scale group maps to the element type's
largest finite value (E4M3FN: 448, E5M2: 57344), clamped to that range *before* the cast (a
cast of an out-of-range value gives NaN / Inf), then rounded to nearest even by torch's cast:

  scale = amax / fp8_max   (fp32; an all-zero group gets scale 1, never 0)
  q     = fp8(clamp(w / scale, -fp8_max, fp8_max))
  w_hat = float(q) * scale

Scale groups: option `block=None` (default) is one scale per output channel; `block=B` (B a
multiple of 32, DeepSeek-V3 uses 128) is one scale per B x B tile of the [N, K] weight.
K is zero-padded to Kp (a multiple of 32, or of B); N is never padded.

Packed fields: qweight float8 [N, Kp] (row-major, so the kernels read 4 elements per int32
word, LSB first, exactly like the 8-bit integer plane), scales float32 [Kp/B, ceil(N/B)]
(per channel: [1, N]).

Option `act="fp8"` (W8A8): activations are quantized too, dynamically, per token (block mode:
per 1 x B group along K) with the same rule and E4M3 elements
(lowbit.formats.activations.quantize_activations_fp8). The
torch reference emulates exactly that rounding; on CUDA the kernel path is chosen per M (see
`lowbit.kernels.fp8_w8a8`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import FormatError
from ..packed import MAX_DIM, PackedWeight
from . import register_format
from .activations import cast_fp8, dequantize_activations, quantize_activations_fp8, safe_scale
from .base import FieldSpec, Format, launch
from .integer import padded_k

SCALE_DTYPE = torch.float32
_ACTS = (None, "fp8")


class Fp8Format(Format):
    """`fp8` / `fp8_e5m2`: FP8 weights with fp32 scales per output channel or per B x B block."""

    ATTRS = ("block", "act")
    DEFAULTS = {"block": None, "act": None}

    def __init__(self, name: str, dtype: torch.dtype, element: str):
        self.name = name
        self.dtype = dtype
        self.element = element  # the kernels' element decoder ("e4m3" / "e5m2")
        self.max = torch.finfo(dtype).max

    # -- options / attributes -------------------------------------------------------------
    def check_values(self, values: dict[str, Any]) -> None:
        block, act = values["block"], values["act"]
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % 32):
            raise FormatError(f"{self.name}: block must be None (per channel) or a positive multiple of 32, got {block!r}")
        if act not in _ACTS:
            raise FormatError(f"{self.name}: act must be one of {_ACTS}, got {act!r}")

    def check_attrs(self, shape: tuple[int, int], attrs: Any) -> dict[str, Any]:
        attrs = super().check_attrs(shape, attrs)
        # resolve_attrs stores at most the whole weight's tile; bounded so a damaged entry cannot
        # overflow the buffers built from it
        if attrs["block"] is not None and attrs["block"] > MAX_DIM:
            raise FormatError(f"{self.name}: block must be at most {MAX_DIM}, got {attrs['block']!r}")
        return attrs

    def resolve_attrs(self, shape: tuple[int, int], options: dict[str, Any]) -> dict[str, Any]:
        attrs = super().resolve_attrs(shape, options)
        # a tile larger than the whole (32-padded) weight is that one tile, stored as such: the
        # same single scale, without padding the weight out to the block
        whole = max(padded_k(shape[0], 32), padded_k(shape[1], 32))
        if attrs["block"] is not None and attrs["block"] > whole:
            attrs["block"] = whole
        return attrs

    def padded_k(self, k: int, block: int | None) -> int:
        return padded_k(k, block or 32)

    def field_specs(self, shape: tuple[int, int], attrs: dict[str, Any]) -> dict[str, FieldSpec]:
        n, k = shape
        block = attrs["block"]
        kp = self.padded_k(k, block)
        scale_shape = (1, n) if block is None else (kp // block, -(-n // block))
        return {"qweight": FieldSpec(self.dtype, (n, kp)), "scales": FieldSpec(SCALE_DTYPE, scale_shape)}

    # -- the spec ---------------------------------------------------------------------------
    def _expand_scales(self, scales: torch.Tensor, n: int, kp: int, block: int | None) -> torch.Tensor:
        """[G, Nb] stored scales -> [N, kp] (or broadcastable [N, 1]) per-element scales."""
        if block is None:
            return scales.t()
        return scales.t().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)

    def quantize(self, weight: torch.Tensor, *, name: str = "weight", **options: Any) -> PackedWeight:
        weight = self.check_weight(weight, name)
        n, k = weight.shape
        attrs = self.resolve_attrs((n, k), options)
        block = attrs["block"]
        kp = self.padded_k(k, block)
        w = F.pad(weight.float(), (0, kp - k))
        if block is None:
            scales = safe_scale(w.abs().amax(dim=1), self.max).unsqueeze(0)  # [1, N]
        else:
            np_ = padded_k(n, block)
            tiles = F.pad(w, (0, 0, 0, np_ - n)).reshape(np_ // block, block, kp // block, block)
            scales = safe_scale(tiles.abs().amax(dim=(1, 3)), self.max).t().contiguous()  # [Kb, Nb]
        q = cast_fp8(w / self._expand_scales(scales, n, kp, block), self.dtype)
        return PackedWeight(self.name, (n, k), weight.dtype, attrs, {"qweight": q, "scales": scales})

    def _dequantize(self, packed: PackedWeight) -> torch.Tensor:
        n, k = packed.shape
        block = packed.attrs["block"]
        kp = self.padded_k(k, block)
        w = packed.qweight.float() * self._expand_scales(packed.scales, n, kp, block)
        return w[:, :k].to(packed.dtype)

    def reference_linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """Weight-only: F.linear(x, dequantize(W)). act="fp8": x is quantized per token (per
        1 x block group) first and the product is taken in fp32 — the W8A8 numerics."""
        if packed.attrs["act"] is None:
            return super().reference_linear(x, packed, bias)
        k, block = packed.shape[1], packed.attrs["block"]
        x_hat = dequantize_activations(*quantize_activations_fp8(x.reshape(-1, k), self.padded_k(k, block), block))
        return self.fp32_linear(x, x_hat[:, :k], self.dequantize(packed).float(), bias)

    # -- kernels ------------------------------------------------------------------------------
    def triton_linear(self, x2d, packed, bias):
        return launch("fp8_linear", x2d, packed.qweight, packed.scales, bias, self.element,
                      packed.attrs["block"] or 0, packed.attrs["act"] == "fp8", packed.shape[1])


register_format(Fp8Format("fp8", torch.float8_e4m3fn, "e4m3"))
register_format(Fp8Format("fp8_e5m2", torch.float8_e5m2, "e5m2"))
