"""Dynamic activation quantization shared by the W8A8 paths (the torch spec; the Triton kernel
of lowbit/kernels/act_quant.py matches it bit for bit).

Each token (row), or each 1 x group slice of it along K, gets `scale = amax / qmax` (fp32; 1 for
an all-zero slice, never below the smallest normal fp32), and its values are divided by it,
clamped to [-qmax, qmax] and rounded to the element type: E4M3 with qmax 448 for `act="fp8"`
(`quantize_activations_fp8`), int8 with qmax 127 and ties-to-even for `act="int8"`
(`quantize_activations_int8`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .division import divide

INT8_MAX = 127  # symmetric int8 codes: -128 is never used, so negation is exact
FP8_ACT_DTYPE = torch.float8_e4m3fn
FP8_ACT_MAX = torch.finfo(FP8_ACT_DTYPE).max  # 448
_TINY = torch.finfo(torch.float32).tiny


def safe_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """fp32 amax (>= 0) -> fp32 scale amax / qmax; 1 for an all-zero group; never below the
    smallest normal fp32 (x / scale is never NaN)."""
    return torch.where(amax > 0, divide(amax, qmax), torch.ones_like(amax)).clamp(min=_TINY)


def cast_fp8(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> fp8 `dtype`, saturating: clamp to the finite range, then round to nearest even."""
    fp8_max = torch.finfo(dtype).max
    return values.clamp(-fp8_max, fp8_max).to(dtype)


def quantize_activations_fp8(x: torch.Tensor, kp: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic E4M3 quantization of activations (the spec the Triton kernel matches bit for bit).

    x: [M, K] float16 / bfloat16 / float32 with K <= kp; zero-padded to kp columns.
    group: None = one scale per token (row); else one per 1 x group slice (group divides kp).
    Returns (xq float8_e4m3fn [M, kp], scales float32 [M, kp // group] (or [M, 1])).
    """
    m, k = x.shape
    group = group or kp
    xf = F.pad(x.float(), (0, kp - k)).reshape(m, kp // group, group)
    scale = safe_scale(xf.abs().amax(dim=-1, keepdim=True), FP8_ACT_MAX)
    return cast_fp8(xf / scale, FP8_ACT_DTYPE).reshape(m, kp), scale.squeeze(-1)


def quantize_activations_int8(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8 quantization.

    x: [M, K] float16 / bfloat16 / float32 with K <= kp; zero-padded to kp columns.
    Returns (xq int8 [M, kp] in [-127, 127], scales float32 [M, 1]); x ~ xq * scale.
    """
    m, k = x.shape
    xf = F.pad(x.float(), (0, kp - k))
    scale = safe_scale(xf.abs().amax(dim=1, keepdim=True), INT8_MAX)
    return torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_activations(xq: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of the activation quantizers: xq [M, kp] (fp8 or int8) and scales fp32
    [M, groups] -> [M, kp] fp32 values xq * scale."""
    m, kp = xq.shape
    groups = scales.shape[1]
    return (xq.float().reshape(m, groups, kp // groups) * scales.unsqueeze(-1)).reshape(m, kp)
