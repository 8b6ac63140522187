"""Generic dequantize-in-register matmul: y = x @ dequant(W)^T (+ bias).

One kernel family for every element type (ELEMENT: "int" codes of any width BITS, two's-complement
"sint", small floats "e4m3" / "e5m2" / "e2m3" / "e2m1", a 16-entry "codebook": nf4's, bnb_fp4's,
iq4_nl's), scale decoder (float, E8M0 or E4M3 bytes, optional fp32 tensor scale) and scale layout
(per row and K group, or per SCALE_GROUP_N rows), all constexprs, two paths:
  * `_gemv_kernel` (lowbit/kernels/dequant_gemv.py): small M (no tensor cores needed at M <= 4),
    split-K; each thread sums a column of COLUMN_K consecutive K for all BLOCK_N rows of its
    program, in registers, and the sums are reduced across threads once, after the K loop; the
    splits are reduced inside the same launch (lowbit/kernels/split_k.py).
  * `_gemm_kernel` (here): larger M, tiles dequantized in registers (`_dequant_tile`) then fed
    to `tl.dot`; split-K too where the output tiles are fewer than the SMs.
Both read the bit planes written by `lowbit.formats.bitpack` (8-bit elements: 4 per int32 word,
LSB first), each packed word loaded once, and share the element / scale decoders of
lowbit/kernels/element_decode.py. This file also holds the path and tile choice (defaults, or
the tuned table) and the launcher `dequant_matmul`, which validates, picks and launches.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..errors import InputError
from ..formats import bitpack
from ..formats.bnb_fp4 import BNB_FP4_CODEBOOK
from ..formats.iq4_nl import IQ4_NL_CODEBOOK
from ..formats.nf4 import NF4_CODEBOOK
from .dequant_gemv import _e4m3_value, _gemv_kernel, _scale_value, _value_factor
from .element_decode import _decode
from .runtime import cdiv, interpreting, next_power_of_2, num_sms
from .split_k import default_splits, split_k_buffers, store_split_k, valid_split_count
from .tuning import launch_options, lookup, valid_launch_options

GEMV_MAX_M = 4
#: BLOCK_M * BLOCK_N, the (batch row, output row) pairs one GEMV thread sums, that
#: benchmarks/tune.py may try: each holds two fp32 sums in registers (~170 registers at 32)
GEMV_MAX_ROWS_PER_THREAD = 32
#: the GEMV's default (and longest) column: K values one thread reads per row and tile
GEMV_COLUMN_K = 32


@triton.jit
def _codes_in_order(words, SHIFT: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr, WIDTH: tl.constexpr):
    """The COUNT WIDTH-bit codes at bits SHIFT, SHIFT + STRIDE, ... of each of `words` [R, W]:
    [R, W * COUNT], code j of word w at column w * COUNT + j, built by interleaving the even and
    the odd codes (recursively). Interleaving keeps a word's codes in the registers of the thread
    that loaded it, in K order."""
    if COUNT == 1:
        return (words >> SHIFT) & ((1 << WIDTH) - 1)
    else:
        even = _codes_in_order(words, SHIFT, 2 * STRIDE, COUNT // 2, WIDTH)
        odd = _codes_in_order(words, SHIFT + STRIDE, 2 * STRIDE, COUNT // 2, WIDTH)
        return tl.interleave(even, odd)


@triton.jit
def _plane_tile(row_ptrs, k0, word_base, mask, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, INTERLEAVE: tl.constexpr, NIBBLES: tl.constexpr = False):
    """[BLOCK_N, BLOCK_K] codes of one bit plane for K = k0 .. k0+BLOCK_K. Each packed word is
    loaded once (contiguous along K, so the loads vectorize) and split into its 32/WIDTH codes
    in registers (LSB first), instead of re-loading the word once per code. INTERLEAVE: split by
    `_codes_in_order`, so the dequantized tile reaches `tl.dot`'s shared memory in 16-byte stores
    (sm_90 SASS: one 2-byte store per weight otherwise, where Triton's layout for the 3-D
    broadcast + reshape spreads a word's codes over threads); `_dequant_tile` takes it where the
    SASS counts came out lower (benchmarks/sass_counts.py). NIBBLES: a nibble-aligned 2-bit plane
    (int6, int7, e2m3; see bitpack.py), code j of a word at bit 4 (j % 8) + 2 (j // 8)."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    word_offs = word_base + k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    words = tl.load(row_ptrs + word_offs[None, :], mask=mask, other=0)  # [BLOCK_N, BLOCK_K/PER_WORD]
    if INTERLEAVE:
        return _codes_in_order(words, 0, WIDTH, PER_WORD, WIDTH)
    slot = tl.arange(0, PER_WORD)
    shifts = (slot % 8) * 4 + (slot // 8) * 2 if NIBBLES else slot * WIDTH
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << WIDTH) - 1)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _code_tile(qw_ptr, offs_n, k0, n_mask, words_per_bit, stride_qn, BITS: tl.constexpr, ELEMENT: tl.constexpr,
               ONE_BIT_PLANES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes [BLOCK_N, BLOCK_K] of rows offs_n, K = k0 .. k0+BLOCK_K. Plane p of a row
    starts at word words_per_bit * (low bit of p), see lowbit/formats/bitpack.py; BITS and the
    plane split are compile-time."""
    row_ptrs = qw_ptr + offs_n[:, None] * stride_qn
    mask = n_mask[:, None]
    # one plane of 4 or 8 bits: interleaved codes cut 0.5-3.6 instructions per weight on sm_90; for
    # narrower or several planes, and the codebook gather, they came out even or worse
    INTERLEAVE: tl.constexpr = (BITS == 4 or BITS == 8) and ELEMENT != "codebook"
    if ONE_BIT_PLANES:  # the LUT formats' layout: bit j of every code in plane j
        codes = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for j in tl.static_range(BITS):
            codes += _plane_tile(row_ptrs, k0, words_per_bit * j, mask, 1, BLOCK_N, BLOCK_K, False) << j
    elif BITS == 8:
        codes = _plane_tile(row_ptrs, k0, 0, mask, 8, BLOCK_N, BLOCK_K, INTERLEAVE)
    else:
        codes = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        if BITS & 4:
            codes += _plane_tile(row_ptrs, k0, 0, mask, 4, BLOCK_N, BLOCK_K, INTERLEAVE)
        if BITS & 2:
            codes += _plane_tile(row_ptrs, k0, words_per_bit * (BITS & 4), mask, 2, BLOCK_N, BLOCK_K,
                                 False, (BITS & 6) == 6) << (BITS & 4)
        if BITS & 1:
            codes += _plane_tile(row_ptrs, k0, words_per_bit * (BITS & 6), mask, 1, BLOCK_N, BLOCK_K,
                                 False) << (BITS & 6)
    return codes


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, n_mask, words_per_bit, stride_qn, stride_sg,
                  BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr,
                  GROUP_SIZE: tl.constexpr, SCALE_GROUP_N: tl.constexpr, SCALE_KIND: tl.constexpr,
                  ONE_BIT_PLANES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  FP8_CVT: tl.constexpr, PTX: tl.constexpr):
    """fp32 weights [BLOCK_N, BLOCK_K] of rows offs_n, K = k0 .. k0+BLOCK_K (codes as
    `_code_tile` reads them). Scales are [K groups, ceil(N / SCALE_GROUP_N)]; a tile lies inside
    one group (GROUP_SIZE >= BLOCK_K) or covers BLOCK_K / GROUP_SIZE whole groups (microscaling
    blocks of 16 / 32, integer groups of 16). FP8_CVT: E4M3 codes and scales convert in hardware
    (`dequant_gemv._e4m3_value`, sm_89 on; PTX: compiled, not interpreted)."""
    codes = _code_tile(qw_ptr, offs_n, k0, n_mask, words_per_bit, stride_qn, BITS, ELEMENT, ONE_BIT_PLANES,
                       BLOCK_N, BLOCK_K)
    mask = n_mask[:, None]
    if ELEMENT == "codebook":
        # z_ptr is the fp32 [16] codebook: a gather within 64 bytes (one cache sector pair per
        # warp), where a 15-select tree cost ~10 instructions and ~190 registers per thread
        values = tl.load(z_ptr + codes)
    elif FP8_CVT and ELEMENT == "e4m3":
        values = _e4m3_value(codes, PTX)  # the value itself (no `_element_factor`)
    else:
        values = _decode(codes, ELEMENT, BITS)
    if ELEMENT == "int":
        # values hold code + 2^23: take it off on its own (exact), as 2^23 + a fractional zero point
        # (GGUF's Q4_1 / K types) would round to an integer in fp32; zero points go per group below
        values -= 8388608.0 + (1 << (BITS - 1)) if SYMMETRIC else 8388608.0
    factor = _value_factor(ELEMENT, BITS, FP8_CVT)
    if SCALE_KIND == "e8m0":
        # E8M0 scales reach 2^127: scale * factor could overflow, so scale the elements instead.
        values = values * factor
        factor = 1.0
    scale_offs = offs_n if SCALE_GROUP_N == 1 else offs_n // SCALE_GROUP_N
    if GROUP_SIZE >= BLOCK_K:
        group = k0 // GROUP_SIZE
        raw = tl.load(s_ptr + group * stride_sg + scale_offs, mask=n_mask, other=0)
        scale = _scale_value(raw, SCALE_KIND, FP8_CVT, PTX) * factor
        if ELEMENT == "int" and not SYMMETRIC:
            zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            values -= zero[:, None]
        return values * scale[:, None]
    else:
        GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
        groups = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
        raw = tl.load(s_ptr + groups[None, :] * stride_sg + scale_offs[:, None], mask=mask, other=0)
        scale = _scale_value(raw, SCALE_KIND, FP8_CVT, PTX) * factor  # [BLOCK_N, GROUPS]
        values = tl.reshape(values, (BLOCK_N, GROUPS, GROUP_SIZE))
        if ELEMENT == "int" and not SYMMETRIC:
            zero = tl.load(z_ptr + groups[None, :] * stride_sg + offs_n[:, None], mask=mask, other=0.0)
            values -= zero.to(tl.float32)[:, :, None]
        return tl.reshape(values * scale[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _code_group_sum(cacc, xsum, s_ptr, z_ptr, group, offs_n, n_mask, stride_sg, BITS: tl.constexpr,
                    SYMMETRIC: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] share of one scale group (before the activations' per-row scales):
    cacc [BLOCK_M, BLOCK_N], sums of activation codes times centred weight codes
    (code - 2^(BITS-1)) over K in the group (int32 for int8 codes, fp32 for E4M3 ones); xsum
    [BLOCK_M] (same dtype), the activation codes' sums there. An asymmetric group's weights are
    (code - z) * s = (centred - (z - 2^(BITS-1))) * s."""
    if not SYMMETRIC:
        zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(cacc.dtype)
        cacc -= xsum[:, None] * (zero - (1 << (BITS - 1)))[None, :]
    scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return cacc.to(tl.float32) * scale[None, :]


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, ts_ptr, xs_ptr, bias_ptr, out_ptr, ws_ptr, counters_ptr,
                 M, N, K, words_per_bit, tiles_per_split,
                 stride_xm, stride_qn, stride_sg, stride_om,
                 BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_GROUP_N: tl.constexpr,
                 SCALE_KIND: tl.constexpr, HAS_TENSOR_SCALE: tl.constexpr, ONE_BIT_PLANES: tl.constexpr,
                 DOT_FP32: tl.constexpr, ACT_CODES: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_CVT: tl.constexpr, PTX: tl.constexpr):
    """Program (m, s, n) computes output tile (m, n) over K tiles s * tiles_per_split onwards;
    with SPLIT, the splits are reduced inside the launch (lowbit/kernels/split_k.py). Splitting K
    keeps every SM streaming weights when M is small and N has fewer tiles than the GPU has SMs.
    ACT_CODES ("int" codes only): "" for 16/32-bit activations, else x holds activation codes,
    "int8" or "e4m3", and xs_ptr their fp32 per-row scales. The K loop multiplies them with the
    centred weight codes (code - 2^(BITS-1): exact in int8 for BITS <= 8, in E4M3 for BITS <= 5)
    on int8 / FP8 tensor cores into a code accumulator (int32 / fp32), which is scaled into the
    fp32 one (`_code_group_sum`) at the end of each scale group, of the split, and every FLUSH_K
    within a group: int8 so the int32 sums cannot overflow (127 * 255 * 2^15 < 2^31); E4M3
    because Hopper's FP8 tensor cores add with fewer bits than fp32 (Triton's default there
    never promotes), so partial sums are promoted every 128 K (DeepSeek-V3's interval)."""
    FLUSH_K: tl.constexpr = 32768 if ACT_CODES == "int8" else 128
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, words_per_bit * 32 // BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACT_CODES != "":
        CODE_ACC: tl.constexpr = tl.int32 if ACT_CODES == "int8" else tl.float32
        cacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=CODE_ACC)
        xsum = tl.zeros((BLOCK_M,), dtype=CODE_ACC)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if ACT_CODES != "":
            codes = _code_tile(qw_ptr, offs_n, t * BLOCK_K, n_mask, words_per_bit, stride_qn, BITS, "int", False,
                               BLOCK_N, BLOCK_K)
            centred = codes - (1 << (BITS - 1))
            if ACT_CODES == "int8":
                cacc = tl.dot(x, tl.trans(centred.to(tl.int8)), cacc, out_dtype=tl.int32)
            else:  # small integers convert to E4M3 exactly; through fp16, which converts natively
                cacc = tl.dot(x, tl.trans(centred.to(tl.float16).to(tl.float8e4nv)), cacc)
            if not SYMMETRIC:
                xsum += tl.sum(x.to(CODE_ACC), axis=1)
            k_end = (t + 1) * BLOCK_K
            if (k_end % GROUP_SIZE) % FLUSH_K == 0 or t == t_end - 1:
                acc += _code_group_sum(cacc, xsum, s_ptr, z_ptr, t * BLOCK_K // GROUP_SIZE, offs_n, n_mask, stride_sg,
                                       BITS, SYMMETRIC)
                cacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=CODE_ACC)
                xsum = tl.zeros((BLOCK_M,), dtype=CODE_ACC)
        else:
            w = tl.trans(_dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, t * BLOCK_K, n_mask, words_per_bit, stride_qn,
                                       stride_sg, BITS, ELEMENT, SYMMETRIC, GROUP_SIZE, SCALE_GROUP_N,
                                       SCALE_KIND, ONE_BIT_PLANES, BLOCK_N, BLOCK_K, FP8_CVT,
                                       PTX))  # [BLOCK_K, BLOCK_N]
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_TENSOR_SCALE:
        acc *= tl.load(ts_ptr).to(tl.float32)
    if ACT_CODES != "":
        acc *= tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_BIAS:
        if pid_k == 0:  # with split-K, the bias goes into exactly one partial sum
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    store_split_k(acc, out_ptr, ws_ptr, counters_ptr, offs_m, offs_n, M, N, stride_om, SPLIT)


def _tile_fits(block_k: int, group_size: int, kp: int, multi_group: bool) -> bool:
    """A K tile lies inside one scale group, or (multi_group) covers whole groups and divides Kp."""
    return group_size % block_k == 0 or (multi_group and block_k % group_size == 0 and kp % block_k == 0)


def _block_k(group_size: int, kp: int, preferred: int, multi_group: bool) -> int:
    """Largest power of two BLOCK_K in [32, preferred] that `_tile_fits` (32 always does: groups
    are multiples of 32, or of 16 with Kp a multiple of 32)."""
    block = preferred
    while block > 32 and not _tile_fits(block, group_size, kp, multi_group):
        block //= 2
    return block


def min_column_k(bits: int) -> int:
    """Fewest K a GEMV column may hold for `bits`-wide codes: whole words of the narrowest bit plane."""
    return 4 if bits == 8 else 32 // (bits & -bits)


def gemv_column_k(bits: int, group_size: int, longest: int = GEMV_COLUMN_K) -> int | None:
    """Longest power-of-two GEMV column (<= longest) that holds whole words of every bit plane
    and lies inside one scale group; None if there is none (then the GEMM path runs)."""
    column_k = longest
    while column_k >= min_column_k(bits):
        if group_size % column_k == 0:
            return column_k
        column_k //= 2
    return None


def gemv_columns(cfg: dict) -> int:
    """Columns per GEMV tile: one per thread."""
    return 32 * cfg.get("num_warps", 4)


def gemv_block_n(block_m: int) -> int:
    """The GEMV's default rows per program for BLOCK_M batch rows: 8 at M=1, 16 (batch row, row)
    pairs per thread at M=2 and 4. At M=1 every config the H100 tuner picked for int4 (the four
    Llama-3-8B shapes) had 8 rows or fewer, and at the 4096 x 4096 q_proj 8 rows alone made it
    1.29x faster than 16: twice the programs keep more loads in flight (16 rows left the nvfp4 /
    int6 gate_proj GEMVs at 46% of DRAM bandwidth, latency-bound). M=2 and 4 are not measured."""
    return 8 if block_m == 1 else 16 // block_m


def gemv_config(m: int, n: int, kp: int, bits: int, group_size: int, device: torch.device) -> dict | None:
    """Default tiles of the split-K dequant GEMV, or None if it cannot take this variant.
    8 rows per program at M=1 and 2, 4 at M=4 (gemv_block_n): every activation a thread loads serves
    that many weights, and 2 * BLOCK_M * BLOCK_N fp32 sums stay in registers; columns of 32 K,
    shortened and then fewer rows per program until the grid has two programs per SM;
    `default_splits` K splits. A default, not a measurement: benchmarks/tune.py replaces it per
    GPU and shape."""
    column_k = gemv_column_k(bits, group_size)
    if column_k is None:
        return None
    block_m = min(next_power_of_2(m), GEMV_MAX_M)
    block_n = gemv_block_n(block_m)
    sms = num_sms(device)

    def k_tiles() -> int:
        return cdiv(kp // column_k, gemv_columns({}))

    while cdiv(n, block_n) * k_tiles() < 2 * sms and column_k // 2 >= min_column_k(bits):
        column_k //= 2
    while cdiv(n, block_n) * k_tiles() < 2 * sms and block_n > 2:
        block_n //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "COLUMN_K": column_k,
            "SPLIT_K": default_splits(k_tiles(), cdiv(n, block_n), sms)}


def pick_config(m: int, n: int, kp: int, group_size: int, device: torch.device, multi_group: bool = False,
                variant: str | None = None, bits: int = 4, lut: bool = False, allow_gemv: bool = True) -> dict:
    """Path and tile sizes for an [m, kp] x [n, kp]^T problem of `bits`-wide codes (1 for the LUT
    formats: the narrowest bit plane decides the GEMV's shortest column): the tuned config
    for this GPU, kernel `variant` and M bucket when benchmarks/tune.py measured one
    (lowbit/kernels/tuning.py), else defaults. multi_group: GEMM tiles may span several scale
    groups (no zero points); lut: the launch also has the table-lookup kernel (a tuned "lut" path);
    allow_gemv: the launch has the GEMV path (not with int8 activations)."""
    tuned = tuned_config(device, variant, n, kp, m, group_size, multi_group, bits, lut) if variant else None
    if tuned and (allow_gemv or tuned["path"] != "gemv"):
        return tuned
    gemv = gemv_config(m, n, kp, bits, group_size, device) if allow_gemv and m <= GEMV_MAX_M else None
    if gemv:
        return {"path": "gemv", **gemv}
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_k = _block_k(group_size, kp, 64, multi_group)
    return {"path": "gemm", "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": block_k,
            "SPLIT_K": gemm_splits(kp // block_k, cdiv(m, block_m) * cdiv(n, 64), num_sms(device))}


def gemm_splits(k_tiles: int, output_tiles: int, sms: int) -> int:
    """The tensor-core GEMM's default split-K: none once the output tiles fill every SM (each
    split adds an fp32 partial of its tile to write and read back), else enough splits for about
    two programs per SM (a small-M tile, e.g. M=16 of a 1024-row k_proj, would leave most SMs
    idle). A default, not a measurement: benchmarks/tune.py replaces it per GPU and shape."""
    return 1 if output_tiles >= sms else default_splits(k_tiles, output_tiles, sms, programs_per_sm=2)


def tuned_config(device: torch.device, variant: str, n: int, kp: int, m: int, group_size: int,
                 multi_group: bool, bits: int, lut: bool = False) -> dict | None:
    """The tuned entry for this launch (lowbit/kernels/tuning.py) if there is one this launch can
    take, else None."""
    tuned = lookup(device, variant, n, kp, m)
    return tuned if tuned and valid_config(tuned, group_size, kp, multi_group, bits, lut) else None


#: the tile keys of each path's configs (besides "path" and the launch options); "lut" is the LUT
#: formats' table-lookup kernel (lowbit/kernels/lut_gemm.py)
#: ("gemm" may leave out SPLIT_K: no split)
CONFIG_KEYS = {"gemv": ("BLOCK_M", "BLOCK_N", "COLUMN_K", "SPLIT_K"), "gemm": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
               "lut": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")}


def valid_config(cfg: dict, group_size: int, kp: int, multi_group: bool, bits: int, lut: bool = False) -> bool:
    """A tuned entry this launch can take (a stale or hand-edited table must not break it).
    bits: the code width (1 for the LUT formats: their planes are one bit wide); lut: a "lut" path
    (the table-lookup kernel) is one this launch has."""
    path = cfg.get("path")
    keys = CONFIG_KEYS.get(path) if path != "lut" or lut else None
    if keys is None or not set(keys) <= set(cfg) or not all(isinstance(cfg[k], int) and cfg[k] > 0 for k in keys):
        return False
    if not valid_launch_options(cfg) or not valid_split_count(cfg.get("SPLIT_K", 1)):
        return False
    if "COLUMN_K" in keys:
        return check_column_k(cfg["COLUMN_K"], bits, group_size) is None and check_prefetch(cfg) is None
    return cfg["BLOCK_K"] >= 32 and not cfg["BLOCK_K"] & (cfg["BLOCK_K"] - 1) and _tile_fits(
        cfg["BLOCK_K"], group_size, kp, multi_group)


def check_operands(x: torch.Tensor, qweight: torch.Tensor, kp: int, bits: int, in_features: int) -> None:
    """InputError unless x is [M, in_features] and qweight holds `bits` bits for each of Kp columns."""
    if x.dim() != 2 or x.shape[1] != in_features:
        raise InputError(f"expected x of shape [M, {in_features}], got {tuple(x.shape)}")
    if qweight.shape[1] * 32 != kp * bits:
        raise InputError(f"qweight shape {tuple(qweight.shape)} does not hold {kp} {bits}-bit codes per row")


def check_column_k(column_k: int, bits: int, group_size: int) -> str | None:
    """Why a GEMV column of column_k K cannot serve `bits`-wide codes in groups of group_size, or None."""
    if column_k < min_column_k(bits) or column_k & (column_k - 1) or group_size % column_k:
        return (f"COLUMN_K={column_k} must be a power of two >= {min_column_k(bits)} (whole words of each bit "
                f"plane of {bits}-bit codes) dividing the group size {group_size}")
    return None


def check_prefetch(cfg: dict) -> str | None:
    """Why a GEMV config's PREFETCH (0 or 1, default 0: the next tile's bytes asked of L2 a tile
    ahead, `dequant_gemv._gemv_kernel`) cannot be, or None. Only with num_stages 1: from 2 on the
    pipelined loop already loads ahead."""
    prefetch = cfg.get("PREFETCH", 0)
    if not isinstance(prefetch, int) or prefetch not in (0, 1):
        return f"PREFETCH must be 0 or 1, got {prefetch!r}"
    if prefetch and cfg.get("num_stages", 1) != 1:
        return f"PREFETCH=1 needs num_stages=1 (the pipelined loop loads ahead itself), got {cfg['num_stages']!r}"
    return None


def check_block_k(block_k: int, group_size: int, kp: int, multi_group: bool) -> None:
    # >= 32: a tile must hold whole words of the 1-bit plane; scales per whole group
    if block_k < 32 or block_k & (block_k - 1) or not _tile_fits(block_k, group_size, kp, multi_group):
        raise InputError(f"BLOCK_K={block_k} must be a power of two >= 32 inside one group of "
                         f"{group_size}" + (f" or covering whole groups of Kp={kp}" if multi_group else ""))


#: the codebook elements: 4-bit codes looked up in these 16 fp32 values (the kernels' ELEMENT "codebook")
CODEBOOKS = {"nf4": NF4_CODEBOOK, "bnb_fp4": BNB_FP4_CODEBOOK, "iq4_nl": IQ4_NL_CODEBOOK}
#: element decoder -> the code width it needs (None: any width 2..8)
ELEMENTS = {"int": None, "sint": 8, "e4m3": 8, "e5m2": 8, "e2m3": 6, "e2m1": 4, **{name: 4 for name in CODEBOOKS}}
SCALE_KINDS = ("float", "e8m0", "e4m3")
#: activation-code dtype -> the GEMM's ACT_CODES (x holds quantized activations, see dequant_matmul)
ACT_CODES = {torch.int8: "int8", torch.float8_e4m3fn: "e4m3"}
#: widest weight codes the E4M3-activation GEMM takes: centred codes in [-16, 15] are exact in E4M3
E4M3_MAX_BITS = 5
#: 2^23 as fp32 bits, a kernel argument so the GEMV holds it in a register (see `_column_sums`)
MAGIC = 0x4B000000


@functools.lru_cache(maxsize=None)
def fp8_conversions(device: torch.device) -> bool:
    """Whether the GEMV and GEMM convert E4M3 weights and block scales in hardware
    (`dequant_gemv._e4m3_pair`, `_e4m3_value`): on CUDA GPUs of compute capability 8.9 on (Ada, Hopper, Blackwell); older ones
    decode with integer ops. The interpreter takes that path too, with the same values computed
    without PTX."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _codebook(element: str, device: torch.device) -> torch.Tensor:
    """A codebook element's values, fp32 [16], made once per device (no host copy per call)."""
    return torch.tensor(CODEBOOKS[element], dtype=torch.float32, device=device)


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int,
                   group_size: int, in_features: int, element: str = "int", scale_group_n: int = 1,
                   scale_kind: str = "float", tensor_scale: torch.Tensor | None = None,
                   one_bit_planes: bool = False, config: dict | None = None,
                   act_scales: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[M, K] x (fp16/bf16/fp32) times the packed [N, K] weight -> [M, N] in x.dtype.

    qweight int32 [N, Kp*bits/32] (bit planes, see lowbit/formats/bitpack.py; one_bit_planes: the
      LUT formats' b one-bit planes).
    element: "int" (w = (code - zero) * scale), "sint" (two's complement k/64, MX INT8) or a
      small float "e4m3" / "e5m2" / "e2m3" / "e2m1" (w = value(code) * scale), or a codebook
      "nf4" / "bnb_fp4" / "iq4_nl" (w = CODEBOOKS[element][code] * scale).
    scales [Kp/group_size, ceil(N/scale_group_n)]: any float dtype (scale_kind "float") or uint8
      bytes of E8M0 exponents / E4M3 values (scale_kind "e8m0" / "e4m3").
    zeros float16 [Kp/group_size, N] (asymmetric "int" only, else None).
    tensor_scale: fp32 [1] multiplying the whole product (NVFP4), or None. bias [N] or None.
    `config`: a whole config (with a "path", keys as returned by `pick_config`) replaces the path
      / tile choice; one without a path overrides the keys it has.
    act_scales: fp32 [M, 1] with x activation codes [M, K], int8 or float8_e4m3fn
      (lowbit/kernels/act_quant.py): the int8 / FP8 tensor-core GEMM (element "int" in the
      bit-plane layout, float scales, at most 5 bits with E4M3 codes; always the GEMM path); the
      output is then [M, N] in out_dtype.
    """
    width = ELEMENTS.get(element, -1)
    if width == -1 or (width is not None and bits != width) or (element != "int" and zeros is not None):
        raise InputError(f"element={element!r} with bits={bits}, zeros={zeros is not None} is not a kernel variant")
    act_codes = ACT_CODES.get(x.dtype) if act_scales is not None else ""
    if act_scales is not None and (act_codes is None or element != "int" or one_bit_planes or tensor_scale is not None
                                   or scale_kind != "float" or out_dtype is None
                                   or act_scales.shape != (x.shape[0], 1)):
        raise InputError(f"quantized activations take int8 or float8_e4m3fn x with fp32 act_scales [M, 1], an "
                         f"out_dtype and float-scaled 'int' codes; got x {x.dtype}, act_scales "
                         f"{tuple(act_scales.shape)}, element {element!r}")
    if act_codes and group_size < 32:  # its code sums are scaled once per K tile (>= 32), by one group
        raise InputError(f"quantized activations take groups of at least 32, got group_size={group_size}")
    if act_codes == "e4m3" and bits > E4M3_MAX_BITS:
        raise InputError(f"E4M3 activations take weight codes of at most {E4M3_MAX_BITS} bits (centred codes "
                         f"must be exact in E4M3), got bits={bits}")
    if scale_kind not in SCALE_KINDS:
        raise InputError(f"scale_kind must be one of {SCALE_KINDS}, got {scale_kind!r}")
    n = qweight.shape[0]
    kp = scales.shape[0] * group_size
    check_operands(x, qweight, kp, bits, in_features)
    if scales.shape[1] != cdiv(n, scale_group_n):
        raise InputError(f"scales shape {tuple(scales.shape)} does not match N={n}, scale_group_n={scale_group_n}")
    x = x.contiguous()
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, n), dtype=out_dtype or x.dtype)
    # K tiles may span several groups: microscaling blocks, integer groups shorter than a tile (16)
    multi_group = element != "int" or group_size < 32
    act = f"-{act_codes}-{out_dtype}" if act_codes else f"-{x.dtype}"
    # the codebook formats share one kernel (their table is an argument), so one tuned entry
    kernel_element = "codebook" if element in CODEBOOKS else element
    variant = f"{kernel_element}{bits}{'-1bit' if one_bit_planes else ''}-{'sym' if zeros is None else 'asym'}-g{group_size}-{scale_kind}{act}"
    # GEMV columns hold whole words of the narrowest bit plane: one bit wide in the LUT formats' layout
    plane_bits = 1 if one_bit_planes else bits
    if config and "path" in config:  # a whole config (the LUT launcher's pick): no lookup of our own
        cfg = dict(config)
    else:
        cfg = {**pick_config(m, n, kp, group_size, x.device, multi_group, variant, plane_bits,
                             allow_gemv=not act_codes),
               **(config or {})}
    if cfg["path"] not in (("gemm",) if act_codes else ("gemv", "gemm")):
        raise InputError(f"config path must be 'gemv' or 'gemm' ('gemm' with quantized activations), got "
                         f"{cfg['path']!r}")
    # z_ptr: the zero points (asymmetric "int"), the code values (a codebook element), else never read
    zeros_arg = zeros if zeros is not None else _codebook(element, x.device) if element in CODEBOOKS else scales
    bias_arg = bias if bias is not None else scales  # never read without bias
    ts_arg = tensor_scale if tensor_scale is not None else scales  # never read without one
    xs_arg = act_scales if act_codes else scales  # never read without quantized activations
    common = dict(BITS=bits, ELEMENT=kernel_element, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None,
                  GROUP_SIZE=group_size, SCALE_GROUP_N=scale_group_n, SCALE_KIND=scale_kind,
                  HAS_TENSOR_SCALE=tensor_scale is not None, ONE_BIT_PLANES=one_bit_planes, BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_N=cfg["BLOCK_N"], **launch_options(cfg))
    words_per_bit = kp // 32
    n_tiles, m_tiles = cdiv(n, cfg["BLOCK_N"]), cdiv(m, cfg["BLOCK_M"])
    fp8_cvt = (element == "e4m3" or scale_kind == "e4m3") and fp8_conversions(x.device)
    if cfg["path"] == "gemv":
        problem = check_column_k(cfg["COLUMN_K"], plane_bits, group_size) or check_prefetch(cfg)
        if problem:
            raise InputError(problem)
        columns = kp // cfg["COLUMN_K"]
        # the GEMV compiles per K only where it has later bit planes to find (single-plane codes ignore it)
        planes = len(bitpack.planes(bits, one_bit_planes))
        out, workspace, tickets, tiles_per_split, split_k = split_k_buffers(
            x, n, cdiv(columns, gemv_columns(cfg)), cfg["SPLIT_K"], n_tiles * m_tiles)
        _gemv_kernel[(n_tiles, split_k, m_tiles)](x, qweight, scales, zeros_arg, ts_arg, bias_arg, out, workspace,
                                                  tickets, m, n, in_features, columns, tiles_per_split,
                                                  x.stride(0), qweight.stride(0), scales.stride(0), n, 1, MAGIC,
                                                  WORDS_PER_BIT=words_per_bit if planes > 1 else 0, SPLIT=split_k > 1,
                                                  PADDED_K=in_features != kp,
                                                  COLUMNS=gemv_columns(cfg), COLUMN_K=cfg["COLUMN_K"],
                                                  STAGES=cfg.get("num_stages", 1),
                                                  PREFETCH=bool(cfg.get("PREFETCH", 0)),
                                                  FP8_CVT=fp8_cvt,
                                                  PTX=not interpreting(), **common)
        return out
    check_block_k(cfg["BLOCK_K"], group_size, kp, multi_group)
    out, workspace, tickets, tiles_per_split, split_k = split_k_buffers(
        x, n, kp // cfg["BLOCK_K"], cfg.get("SPLIT_K", 1), n_tiles * m_tiles, out_dtype)
    dot_fp32 = x.dtype == torch.float32 or interpreting()  # the interpreter's bf16 tl.dot is wrong
    _gemm_kernel[(m_tiles, split_k, n_tiles)](x, qweight, scales, zeros_arg, ts_arg, xs_arg, bias_arg, out, workspace,
                                              tickets, m, n, in_features, words_per_bit, tiles_per_split,
                                              x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
                                              DOT_FP32=dot_fp32, ACT_CODES=act_codes, SPLIT=split_k > 1,
                                              BLOCK_K=cfg["BLOCK_K"], FP8_CVT=fp8_cvt, PTX=not interpreting(),
                                              **common)
    return out
