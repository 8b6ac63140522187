"""Triton kernel that quantizes activations at run time for the W8A8 paths: per token (or per
1 x group slice along K), scale = amax / qmax, then E4M3 codes (act="fp8") or int8 codes
(act="int8"), bit-identical to the torch spec (lowbit.formats.activations:
quantize_activations_fp8, quantize_activations_int8). One kernel, the encoding a constexpr.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .runtime import FP_FUSION, next_power_of_2

E4M3_MAX = tl.constexpr(448.0)
INT8_MAX = tl.constexpr(127.0)
_FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32, as in formats.activations.safe_scale
ENCODINGS = ("e4m3", "int8")


@triton.jit
def _encode_e4m3(v):
    """fp32 values in [-448, 448] -> E4M3FN codes (int32 0..255), round to nearest even.
    Bit arithmetic rather than a fp8 cast: the interpreter casts differently from torch, and
    it is exact on every GPU."""
    sign = (v.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.abs(v)
    a_bits = a.to(tl.int32, bitcast=True)
    # Normal range: keep 3 mantissa bits with round-half-even, then rebias the exponent 127 -> 7.
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # Subnormal range (a < 2^-6): code = rne(a * 2^9); adding 2^23 makes the fp32 add round it.
    subnormal = (a * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    return tl.where(a < 0.015625, subnormal, normal) | sign


@triton.jit
def _round_int(v):
    """fp32 values in [-2^22, 2^22] -> int32, round half to even (torch.round): adding 1.5 * 2^23
    lands every such value where the fp32 spacing is 1, so the add itself rounds."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, group, stride_xm, stride_qm, stride_sm,
                      ENCODING: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (row, K group): amax pass, then scale / clamp / encode pass."""
    QMAX: tl.constexpr = E4M3_MAX if ENCODING == "e4m3" else INT8_MAX
    row = tl.program_id(0)
    g = tl.program_id(1)
    start = g * group
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, group, BLOCK):
        in_group = k0 + tl.arange(0, BLOCK) < group
        offs = start + k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=in_group & (offs < K), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    amax_all = tl.max(amax, axis=0)
    scale = tl.where(amax_all > 0, tl.math.div_rn(amax_all, QMAX), 1.0)
    scale = tl.maximum(scale, _FP32_TINY)
    tl.store(s_ptr + row * stride_sm + g, scale)
    for k0 in range(0, group, BLOCK):
        in_group = k0 + tl.arange(0, BLOCK) < group
        offs = start + k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=in_group & (offs < K), other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
        if ENCODING == "e4m3":
            tl.store(q_ptr + row * stride_qm + offs, _encode_e4m3(v).to(tl.uint8), mask=in_group)
        else:
            tl.store(q_ptr + row * stride_qm + offs, _round_int(v).to(tl.int8), mask=in_group)


def quantize_activations_triton(x: torch.Tensor, kp: int, group: int | None = None,
                                encoding: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of the activation quantizers (bit-identical to the torch spec).

    x: [M, K] float16 / bfloat16 / float32, K <= kp. encoding: "e4m3" or "int8". Returns (codes
    [M, kp]: float8_e4m3fn or int8, zero past K; float32 scales [M, kp // group], or [M, 1] when
    group is None).
    """
    m, k = x.shape
    group = group or kp
    if encoding not in ENCODINGS:
        raise InputError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if k > kp or kp % group:
        raise InputError(f"cannot quantize activations of width {k} into {kp} columns in groups of {group}")
    x = x.contiguous()
    q = torch.empty((m, kp), dtype=torch.uint8 if encoding == "e4m3" else torch.int8, device=x.device)
    s = torch.empty((m, kp // group), dtype=torch.float32, device=x.device)
    if m:
        block = min(1024, next_power_of_2(group))
        _act_quant_kernel[(m, kp // group)](x, q, s, k, group, x.stride(0), q.stride(0), s.stride(0),
                                            ENCODING=encoding, BLOCK=block, **FP_FUSION)
    return (q.view(torch.float8_e4m3fn) if encoding == "e4m3" else q), s
