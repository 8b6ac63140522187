"""Table-lookup matmul for the `lut1` ... `lut4` formats (T-MAC style): no weight dequantization.

A b-bit code is sum_j 2^j bit_j, stored as b one-bit planes. For every group of 4 consecutive
activations the kernel builds the 16 sums sum_{i<4} bit_i(c) * x_i (c = 0..15) in registers,
then each plane's 4 weight bits of that group are a 4-bit index into the table:

    sum_k code_k x_k = sum_j 2^j sum_groups table[group, index_j(group)]

and the asymmetric zero point costs one more table entry, table[group, 15] = sum of the 4 x's:
    y_n = sum_groups scale * (sum_k code_k x_k - zero * sum_k x_k).
The table is built inside the kernel per K tile (no separate launch, nothing written to memory)
in fp32, and indexed with `tl.gather`. Split-K with the deterministic in-launch reduction of
lowbit/kernels/split_k.py, as in the dequant GEMV.

`lut_matmul` runs this kernel only where benchmarks/tune.py measured it fastest. By default the
dequant kernels read the same planes, because on NVIDIA GPUs Triton has no register-indexed
table: `tl.gather` lowers to warp shuffles (plus shared memory to move the indices into the
gather's layout), about 10.8 SASS instructions per weight for lut2 on sm_90, where the split-K
GEMV merging each pair of planes into 2-bit codes needs about 4.1
(benchmarks/results/sass-sm90-*.md). The GPU tuning run decides per shape and M.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .dequant_gemm import _block_k, _plane_tile, check_block_k, check_operands, dequant_matmul, pick_config
from .runtime import cdiv, next_power_of_2, num_sms
from .split_k import default_splits, split_k_buffers, store_split_k
from .tuning import launch_options

#: benchmarks/tune.py tries the lookup kernel up to this many rows (its work grows with M; the
#: tensor-core GEMM's does not)
LUT_MAX_M = 16


@triton.jit
def _lut_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, counters_ptr,
                     M, N, K, words_per_plane, tiles_per_split,
                     stride_xm, stride_qn, stride_sg, stride_om,
                     BITS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT: tl.constexpr,
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
                # 4 consecutive bits of plane j = one table index per group of 4 weights: the
                # plane's words split into nibbles (K counted in groups of 4)
                index = tl.trans(_plane_tile(row_ptrs, k0 // 4, words_per_plane * j, n_mask[:, None], 4,
                                             BLOCK_N, BLOCK_K // 4, False))  # [BLOCK_K/4, BLOCK_N]
                dot += tl.gather(table, index, axis=1) * (1 << j)
            contrib = scale * (tl.sum(dot, axis=0) - zero * tl.sum(x, axis=0))  # [BLOCK_N]
            acc += tl.where(rows[:, None] == m, contrib[None, :], 0.0)
    if HAS_BIAS:
        if pid_k == 0:  # with split-K, the bias goes into exactly one partial sum
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    store_split_k(acc, out_ptr, ws_ptr, counters_ptr, pid_m * BLOCK_M + rows, offs_n, M, N, stride_om, SPLIT)


def lut_gemv_config(m: int, n: int, kp: int, group_size: int, device: torch.device) -> dict:
    """Default tiles of the LUT GEMV (`_lut_gemv_kernel`): up to LUT_MAX_M batch rows and 32
    output features per program, K tiles of up to 128 inside one group, `default_splits`."""
    block_k = _block_k(group_size, kp, 128, multi_group=False)
    return {"BLOCK_M": min(next_power_of_2(m), LUT_MAX_M), "BLOCK_N": 32, "BLOCK_K": block_k,
            "SPLIT_K": default_splits(kp // block_k, cdiv(n, 32), num_sms(device))}


def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None, *, bits: int, group_size: int, in_features: int,
               config: dict | None = None) -> torch.Tensor:
    """[M, K] x (fp16/bf16/fp32) times a lutN weight -> [M, N] in x.dtype.

    qweight int32 [N, bits*Kp/32] (bits one-bit planes), scales / zeros float16 [Kp/group, N].
    The path is the tuned entry benchmarks/tune.py measured fastest for this GPU, shape and M
    bucket, else the defaults of the dequant kernels reading the same planes (the split-K GEMV,
    which merges plane pairs into 2-bit codes, up to M=4; the tensor-core GEMM above). A
    {"path": "lut", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"} entry runs the table-lookup
    kernel. `config` replaces the choice (a "lut" config may leave out tiles: `lut_gemv_config`).
    """
    n = qweight.shape[0]
    kp = scales.shape[0] * group_size
    check_operands(x, qweight, kp, bits, in_features)
    x = x.contiguous()
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    if config is not None and config.get("path") not in ("gemv", "lut", "gemm"):
        raise InputError(f"a LUT launch config needs a path 'gemv', 'lut' or 'gemm', got {config!r}")
    cfg = config or pick_config(m, n, kp, group_size, x.device, False, f"lut{bits}-g{group_size}-{x.dtype}", bits=1,
                                lut=True)
    if cfg.get("path") != "lut":
        return dequant_matmul(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size,
                              in_features=in_features, one_bit_planes=True, config=cfg)
    cfg = {**lut_gemv_config(m, n, kp, group_size, x.device), **cfg}
    check_block_k(cfg["BLOCK_K"], group_size, kp, multi_group=False)
    n_tiles, m_tiles = cdiv(n, cfg["BLOCK_N"]), cdiv(m, cfg["BLOCK_M"])
    out, workspace, tickets, tiles_per_split, split_k = split_k_buffers(x, n, kp // cfg["BLOCK_K"], cfg["SPLIT_K"],
                                                                        n_tiles * m_tiles)
    _lut_gemv_kernel[(n_tiles, split_k, m_tiles)](x, qweight, scales, zeros, bias if bias is not None else scales, out,
                                                  workspace, tickets, m, n, in_features, kp // 32, tiles_per_split,
                                                  x.stride(0), qweight.stride(0), scales.stride(0), n,
                                                  BITS=bits, HAS_BIAS=bias is not None, GROUP_SIZE=group_size,
                                                  SPLIT=split_k > 1, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                                  BLOCK_K=cfg["BLOCK_K"], **launch_options(cfg))
    return out
