"""Generic dequantize-in-register matmul: y = x @ dequant(W)^T (+ bias).

One kernel family for every integer width (BITS is a constexpr), two paths:
  * `_gemv_kernel`: small M, split-K; each program reduces a K slice of BLOCK_N output
    features with a broadcast multiply + sum (no tensor cores needed at M <= 4).
  * `_gemm_kernel`: larger M, tiles dequantized in registers then fed to `tl.dot`.
Both decode the bit planes written by `lowbit.formats.bitpack` through `_dequant_tile`.
The launcher `dequant_matmul` validates, picks path / tile sizes and launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .runtime import interpreting, num_sms

GEMV_MAX_M = 4


@triton.jit
def _load_plane(row_ptrs, k_idx, word_base, mask, WIDTH: tl.constexpr):
    """Codes of one bit plane: 32/WIDTH codes per int32 word, LSB first along K."""
    words = tl.load(row_ptrs + word_base + k_idx // (32 // WIDTH), mask=mask, other=0)
    return (words >> ((k_idx % (32 // WIDTH)) * WIDTH)) & ((1 << WIDTH) - 1)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, n_idx, k_idx, n_mask, group, words_per_bit,
                  stride_qn, stride_sg, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """fp32 weights for the tile at (n_idx, k_idx) (broadcastable index tensors; the tile's
    K range lies inside one quantization group `group`). Plane p starts at word
    words_per_bit * (low bit of p), see bitpack.py."""
    row_ptrs = qw_ptr + n_idx * stride_qn
    mask = n_mask & (k_idx >= 0)
    if BITS == 8:
        codes = _load_plane(row_ptrs, k_idx, 0, mask, 8)
    else:
        codes = n_idx * 0 + k_idx * 0  # int32 zeros of the tile's shape
        if BITS & 4:
            codes += _load_plane(row_ptrs, k_idx, 0, mask, 4)
        if BITS & 2:
            codes += _load_plane(row_ptrs, k_idx, words_per_bit * (BITS & 4), mask, 2) << (BITS & 4)
        if BITS & 1:
            codes += _load_plane(row_ptrs, k_idx, words_per_bit * (BITS & 6), mask, 1) << (BITS & 6)
    scale = tl.load(s_ptr + group * stride_sg + n_idx, mask=n_mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        zero = 1 << (BITS - 1)
    else:
        zero = tl.load(z_ptr + group * stride_sg + n_idx, mask=n_mask, other=0.0).to(tl.float32)
    return (codes.to(tl.float32) - zero) * scale


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
                 M, N, K, words_per_bit, tiles_per_split,
                 stride_xm, stride_qn, stride_sg, stride_os, stride_om,
                 BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_tiles = words_per_bit * 32 // BLOCK_K
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n[:, None], offs_k[None, :], n_mask[:, None],
                          (t * BLOCK_K) // GROUP_SIZE, words_per_bit, stride_qn, stride_sg,
                          BITS, SYMMETRIC)  # [BLOCK_N, BLOCK_K]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        if pid_k == 0:  # with split-K, the bias goes into exactly one partial sum
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
                 M, N, K, words_per_bit,
                 stride_xm, stride_qn, stride_sg, stride_om,
                 BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_tiles = words_per_bit * 32 // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, k_tiles):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n[None, :], offs_k[:, None], n_mask[None, :],
                          (t * BLOCK_K) // GROUP_SIZE, words_per_bit, stride_qn, stride_sg,
                          BITS, SYMMETRIC)  # [BLOCK_K, BLOCK_N]
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


def _block_k(group_size: int, preferred: int) -> int:
    """Largest power of two <= preferred that divides group_size (>= 32 as groups are)."""
    block = preferred
    while group_size % block:
        block //= 2
    return block


def pick_config(m: int, n: int, kp: int, group_size: int, device: torch.device) -> dict:
    """Default path and tile sizes for an [m, kp] x [n, kp]^T problem (tuned later per GPU)."""
    if m <= GEMV_MAX_M:
        block_m = triton.next_power_of_2(m)
        block_n = 32
        block_k = _block_k(group_size, 128)
        k_tiles = kp // block_k
        n_blocks = triton.cdiv(n, block_n)
        # Enough programs to fill the GPU twice over; never more splits than K tiles.
        split_k = max(1, min(k_tiles, triton.cdiv(2 * num_sms(device), n_blocks)))
        return {"path": "gemv", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                "SPLIT_K": split_k}
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return {"path": "gemm", "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": _block_k(group_size, 64)}


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int,
                   group_size: int, in_features: int, config: dict | None = None) -> torch.Tensor:
    """[M, K] x (fp16/bf16/fp32) times the packed [N, K] weight -> [M, N] in x.dtype.

    qweight int32 [N, Kp*bits/32], scales / zeros float16 [Kp/group_size, N], bias [N] or None.
    `config` overrides the path / tile choice (keys as returned by `pick_config`).
    """
    if x.dim() != 2 or x.shape[1] != in_features:
        raise InputError(f"expected x of shape [M, {in_features}], got {tuple(x.shape)}")
    n = qweight.shape[0]
    kp = scales.shape[0] * group_size
    if qweight.shape[1] * 32 != kp * bits:
        raise InputError(f"qweight shape {tuple(qweight.shape)} does not hold {kp} {bits}-bit codes per row")
    x = x.contiguous()
    m = x.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    cfg = {**pick_config(m, n, kp, group_size, x.device), **(config or {})}
    if group_size % cfg["BLOCK_K"]:
        raise InputError(f"BLOCK_K={cfg['BLOCK_K']} must divide group_size={group_size}")
    zeros_arg = zeros if zeros is not None else scales  # never read when symmetric
    bias_arg = bias if bias is not None else scales  # never read without bias
    common = dict(BITS=bits, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None, GROUP_SIZE=group_size,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    words_per_bit = kp // 32
    if cfg["path"] == "gemv":
        k_tiles = kp // cfg["BLOCK_K"]
        tiles_per_split = triton.cdiv(k_tiles, cfg["SPLIT_K"])
        split_k = triton.cdiv(k_tiles, tiles_per_split)
        # Deterministic split-K: partial sums to a buffer, reduced in a fixed order.
        target = out if split_k == 1 else torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k, triton.cdiv(m, cfg["BLOCK_M"]))
        _gemv_kernel[grid](x, qweight, scales, zeros_arg, bias_arg, target,
                           m, n, in_features, words_per_bit, tiles_per_split,
                           x.stride(0), qweight.stride(0), scales.stride(0),
                           target.stride(0) if split_k > 1 else 0, n, **common)
        if split_k > 1:
            out.copy_(target.sum(dim=0))
        return out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    dot_fp32 = x.dtype == torch.float32 or interpreting()  # the interpreter's bf16 tl.dot is wrong
    _gemm_kernel[grid](x, qweight, scales, zeros_arg, bias_arg, out,
                       m, n, in_features, words_per_bit,
                       x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
                       DOT_FP32=dot_fp32, **common)
    return out
