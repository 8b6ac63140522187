"""Table-lookup matmul for the `lut1` ... `lut4` formats (T-MAC style): no weight dequantization.

A b-bit code is sum_j 2^j bit_j, stored as b one-bit planes. For every group of 4 consecutive
activations the kernel builds the 16 sums sum_{i<4} bit_i(c) * x_i (c = 0..15) in registers,
then each plane's 4 weight bits of that group are a 4-bit index into the table:

    sum_k code_k x_k = sum_j 2^j sum_groups table[group, index_j(group)]

and the asymmetric zero point costs one more table entry, table[group, 15] = sum of the 4 x's:
    y_n = sum_groups scale * (sum_k code_k x_k - zero * sum_k x_k).
The table is built inside the kernel per K tile (no separate launch, nothing written to memory)
in fp32, and indexed with `tl.gather`. Split-K with a deterministic partial-sum reduction, as in
the dequant GEMV. Large M goes to the dequant GEMM instead (`lut_matmul`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .dequant_gemm import dequant_matmul
from .runtime import num_sms

#: up to this many rows the lookup kernel runs; above it, the dequant GEMM (tensor cores) wins
LUT_MAX_M = 16


@triton.jit
def _plane_indices(row_ptrs, word0, mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K / 4, BLOCK_N] 4-bit table indices of one one-bit plane: each int32 word holds 32
    consecutive weights' bits LSB first, so nibble i is the index of group i."""
    words = tl.load(row_ptrs + word0 + tl.arange(0, BLOCK_K // 32)[None, :], mask=mask, other=0)
    nibbles = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15
    return tl.trans(tl.reshape(nibbles, (BLOCK_N, BLOCK_K // 4)))


@triton.jit
def _lut_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
                     M, N, K, words_per_plane, tiles_per_split,
                     stride_xm, stride_qn, stride_sg, stride_os, stride_om,
                     BITS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    row_ptrs = qw_ptr + offs_n[:, None] * stride_qn
    # which of the 4 activations of a group each of the 16 table entries adds: [16, 4]
    entry_bits = ((tl.arange(0, 16)[:, None] >> tl.arange(0, 4)[None, :]) & 1).to(tl.float32)
    k_tiles = words_per_plane * 32 // BLOCK_K
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        group = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        for m in tl.static_range(BLOCK_M):
            row = pid_m * BLOCK_M + m
            # a vector mask: scalar & vector masks trip the interpreter
            in_bounds = (offs_k < K) & (tl.zeros_like(offs_k) + row < M)
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=in_bounds, other=0.0).to(tl.float32)
            x4 = tl.reshape(x, (BLOCK_K // 4, 4))
            table = tl.sum(x4[:, None, :] * entry_bits[None, :, :], axis=2)  # [BLOCK_K/4, 16]
            dot = tl.zeros((BLOCK_K // 4, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(BITS):
                index = _plane_indices(row_ptrs, words_per_plane * j + k0 // 32, n_mask[:, None], BLOCK_N, BLOCK_K)
                dot += tl.gather(table, index, axis=1) * (1 << j)
            contrib = scale * (tl.sum(dot, axis=0) - zero * tl.sum(x, axis=0))  # [BLOCK_N]
            acc += tl.where(rows[:, None] == m, contrib[None, :], 0.0)
    if HAS_BIAS:
        if pid_k == 0:  # with split-K, the bias goes into exactly one partial sum
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    offs_m = pid_m * BLOCK_M + rows
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


def _block_k(group_size: int, preferred: int = 128) -> int:
    block = preferred
    while group_size % block:
        block //= 2
    return block


def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None, *, bits: int, group_size: int, in_features: int,
               config: dict | None = None) -> torch.Tensor:
    """[M, K] x (fp16/bf16/fp32) times a lutN weight -> [M, N] in x.dtype.

    qweight int32 [N, bits*Kp/32] (bits one-bit planes), scales / zeros float16 [Kp/group, N].
    M <= LUT_MAX_M: the lookup kernel; larger M: the dequant GEMM reading the same planes.
    `config` overrides {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"} of the lookup kernel.
    """
    if x.dim() != 2 or x.shape[1] != in_features:
        raise InputError(f"expected x of shape [M, {in_features}], got {tuple(x.shape)}")
    n = qweight.shape[0]
    kp = scales.shape[0] * group_size
    if qweight.shape[1] * 32 != kp * bits:
        raise InputError(f"qweight shape {tuple(qweight.shape)} does not hold {bits} planes of {kp} bits per row")
    x = x.contiguous()
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    if m > LUT_MAX_M and config is None:
        return dequant_matmul(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size,
                              in_features=in_features, one_bit_planes=True)
    block_n = 32
    block_k = _block_k(group_size)
    k_tiles = kp // block_k
    split = max(1, min(k_tiles, triton.cdiv(2 * num_sms(x.device), triton.cdiv(n, block_n))))
    cfg = {"BLOCK_M": min(triton.next_power_of_2(m), LUT_MAX_M), "BLOCK_N": block_n, "BLOCK_K": block_k,
           "SPLIT_K": split, **(config or {})}
    if cfg["BLOCK_K"] < 32 or cfg["BLOCK_K"] & (cfg["BLOCK_K"] - 1) or group_size % cfg["BLOCK_K"]:
        raise InputError(f"BLOCK_K={cfg['BLOCK_K']} must be a power of two >= 32 dividing group_size={group_size}")
    tiles_per_split = triton.cdiv(kp // cfg["BLOCK_K"], cfg["SPLIT_K"])
    split_k = triton.cdiv(kp // cfg["BLOCK_K"], tiles_per_split)
    if split_k == 1:
        target = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        target = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k, triton.cdiv(m, cfg["BLOCK_M"]))
    _lut_gemv_kernel[grid](x, qweight, scales, zeros, bias if bias is not None else scales, target,
                           m, n, in_features, kp // 32, tiles_per_split,
                           x.stride(0), qweight.stride(0), scales.stride(0),
                           target.stride(0) if split_k > 1 else 0, n,
                           BITS=bits, HAS_BIAS=bias is not None, GROUP_SIZE=group_size,
                           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    return target if split_k == 1 else target.sum(dim=0).to(x.dtype)
