"""Generic dequantize-in-register matmul: y = x @ dequant(W)^T (+ bias).

One kernel family for every element type (ELEMENT: "int" codes of any width BITS, two's-complement
"sint", small floats "e4m3" / "e5m2" / "e2m3" / "e2m1", the "nf4" codebook), scale decoder (float, E8M0 or E4M3 bytes,
optional fp32 tensor scale) and scale layout (per row and K group, or per SCALE_GROUP_N rows), all
constexprs, two paths:
  * `_gemv_kernel`: small M (no tensor cores needed at M <= 4), split-K; each thread sums a
    column of COLUMN_K consecutive K for all BLOCK_N rows of its program, in registers, and
    the sums are reduced across threads once, after the K loop (see `_column_sums`); the
    splits are reduced inside the same launch (lowbit/kernels/split_k.py).
  * `_gemm_kernel`: larger M, tiles dequantized in registers (`_dequant_tile`) then fed to `tl.dot`.
Both read the bit planes written by `lowbit.formats.bitpack` (8-bit elements: 4 per int32 word,
LSB first), each packed word loaded once.
The launcher `dequant_matmul` validates, picks path / tile sizes and launches.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..errors import InputError
from ..formats.nf4 import NF4_CODEBOOK
from .runtime import interpreting, num_sms
from .split_k import split_k_buffers, store_split_k
from .tuning import launch_options, lookup, valid_launch_options

GEMV_MAX_M = 4
#: BLOCK_M * BLOCK_N, the (batch row, output row) pairs one GEMV thread sums, that
#: benchmarks/tune.py may try: each holds two fp32 sums in registers (~170 registers at 32)
GEMV_MAX_ROWS_PER_THREAD = 32
#: the GEMV's default (and longest) column: K values one thread reads per row and tile
GEMV_COLUMN_K = 32


@triton.jit
def _plane_tile(row_ptrs, k0, word_base, mask, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] codes of one bit plane for K = k0 .. k0+BLOCK_K. Each packed word is
    loaded once (contiguous along K, so the loads vectorize) and split into its 32/WIDTH codes
    in registers (LSB first), instead of re-loading the word once per code."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    word_offs = word_base + k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    words = tl.load(row_ptrs + word_offs[None, :], mask=mask, other=0)  # [BLOCK_N, BLOCK_K/PER_WORD]
    shifts = tl.arange(0, PER_WORD) * WIDTH
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << WIDTH) - 1)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _decode_minifloat(codes, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr):
    """Codes of a small float (1 sign, EXP_BITS, MAN_BITS; FP8 E4M3/E5M2, FP6 E2M3, FP4 E2M1)
    -> fp32 value * 2^(bias - 15). Exponent and mantissa bits moved into fp16 position and
    reinterpreted as fp16 give exactly that, for normals and subnormals alike: only integer ops
    and an fp16 convert, so no FP8/FP4 hardware is needed (and the interpreter agrees)."""
    sign = (codes >> (EXP_BITS + MAN_BITS)) & 1
    magnitude = codes & ((1 << (EXP_BITS + MAN_BITS)) - 1)
    bits = (sign << 15) | (magnitude << (10 - MAN_BITS))
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode(codes, ELEMENT: tl.constexpr, BITS: tl.constexpr):
    """Element decoder: int32 codes -> fp32 values up to the constant `_element_factor`, which
    `_dequant_tile` folds into the (float / E4M3, so bounded) scale instead of multiplying every
    element.
      "int":  the unsigned code + 2^23 (the caller subtracts 2^23 + the zero point in one add).
      "sint": a BITS-wide two's-complement code.
      "e4m3", "e5m2", "e2m3", "e2m1": small floats, see `_decode_minifloat`.
    ("nf4" codes are looked up in the codebook by `_dequant_tile`.)
    Integers become floats as code | 0x4B000000 reinterpreted (= 2^23 + code, exact): an integer
    op at full rate instead of an int -> float convert (quarter rate on NVIDIA GPUs)."""
    if ELEMENT == "int":
        return (codes | 0x4B000000).to(tl.float32, bitcast=True)
    elif ELEMENT == "sint":
        half = 1 << (BITS - 1)
        biased = (((codes + half) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True)
        return biased - (8388608.0 + half)
    elif ELEMENT == "e4m3":
        return _decode_minifloat(codes, 4, 3)
    elif ELEMENT == "e5m2":
        return _decode_minifloat(codes, 5, 2)
    elif ELEMENT == "e2m3":
        return _decode_minifloat(codes, 2, 3)
    else:
        tl.static_assert(ELEMENT == "e2m1", "unknown ELEMENT")
        return _decode_minifloat(codes, 2, 1)


@triton.jit
def _element_factor(ELEMENT: tl.constexpr, BITS: tl.constexpr):
    """value = _decode(code) * factor: 2^(15 - bias) for small floats (fp16 has bias 15),
    2^-(BITS-2) for "sint" (MX INT8 elements are k/64), 1 for "int"."""
    if ELEMENT == "e4m3":
        return 256.0
    elif ELEMENT == "e2m3" or ELEMENT == "e2m1":
        return 16384.0
    elif ELEMENT == "sint":
        return 1.0 / (1 << (BITS - 2))
    else:
        return 1.0


@triton.jit
def _decode_scale(raw, SCALE_KIND: tl.constexpr):
    """Stored scales -> fp32. "float": any float dtype; "e8m0": a biased power-of-two exponent
    byte, decoded by building the fp32 exponent bits (byte 0 = 2^-127, an fp32 subnormal);
    "e4m3": FP8 E4M3 bytes."""
    if SCALE_KIND == "float":
        return raw.to(tl.float32)
    elif SCALE_KIND == "e8m0":
        exponent = raw.to(tl.int32)
        return tl.where(exponent == 0, 5.877471754111438e-39, (exponent << 23).to(tl.float32, bitcast=True))
    else:
        tl.static_assert(SCALE_KIND == "e4m3", "unknown SCALE_KIND")
        return _decode_minifloat(raw.to(tl.int32), 4, 3) * 256.0


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, n_mask, words_per_bit, stride_qn, stride_sg,
                  BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr,
                  GROUP_SIZE: tl.constexpr, SCALE_GROUP_N: tl.constexpr, SCALE_KIND: tl.constexpr,
                  ONE_BIT_PLANES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 weights [BLOCK_N, BLOCK_K] of rows offs_n, K = k0 .. k0+BLOCK_K. Plane p of a row
    starts at word words_per_bit * (low bit of p), see lowbit/formats/bitpack.py; BITS and the
    plane split are compile-time. Scales are [K groups, ceil(N / SCALE_GROUP_N)]; a tile lies
    inside one group (GROUP_SIZE >= BLOCK_K) or covers BLOCK_K / GROUP_SIZE whole groups
    (microscaling blocks of 16 / 32)."""
    row_ptrs = qw_ptr + offs_n[:, None] * stride_qn
    mask = n_mask[:, None]
    if ONE_BIT_PLANES:  # the LUT formats' layout: bit j of every code in plane j
        codes = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for j in tl.static_range(BITS):
            codes += _plane_tile(row_ptrs, k0, words_per_bit * j, mask, 1, BLOCK_N, BLOCK_K) << j
    elif BITS == 8:
        codes = _plane_tile(row_ptrs, k0, 0, mask, 8, BLOCK_N, BLOCK_K)
    else:
        codes = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        if BITS & 4:
            codes += _plane_tile(row_ptrs, k0, 0, mask, 4, BLOCK_N, BLOCK_K)
        if BITS & 2:
            codes += _plane_tile(row_ptrs, k0, words_per_bit * (BITS & 4), mask, 2, BLOCK_N, BLOCK_K) << (BITS & 4)
        if BITS & 1:
            codes += _plane_tile(row_ptrs, k0, words_per_bit * (BITS & 6), mask, 1, BLOCK_N, BLOCK_K) << (BITS & 6)
    if ELEMENT == "nf4":
        # z_ptr is the fp32 [16] codebook: a gather within 64 bytes (one cache sector pair per
        # warp), where a 15-select tree cost ~10 instructions and ~190 registers per thread
        values = tl.load(z_ptr + codes)
    else:
        values = _decode(codes, ELEMENT, BITS)
    factor = _element_factor(ELEMENT, BITS)
    if SCALE_KIND == "e8m0":
        # E8M0 scales reach 2^127: scale * factor could overflow, so scale the elements instead.
        values = values * factor
        factor = 1.0
    scale_offs = offs_n if SCALE_GROUP_N == 1 else offs_n // SCALE_GROUP_N
    if GROUP_SIZE >= BLOCK_K:
        group = k0 // GROUP_SIZE
        raw = tl.load(s_ptr + group * stride_sg + scale_offs, mask=n_mask, other=0)
        scale = _decode_scale(raw, SCALE_KIND) * factor
        if ELEMENT == "int":  # values hold code + 2^23
            if SYMMETRIC:
                values -= 8388608.0 + (1 << (BITS - 1))
            else:
                zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                values -= (8388608.0 + zero)[:, None]
        return values * scale[:, None]
    else:
        GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
        groups = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
        raw = tl.load(s_ptr + groups[None, :] * stride_sg + scale_offs[:, None], mask=mask, other=0)
        scale = _decode_scale(raw, SCALE_KIND) * factor  # [BLOCK_N, GROUPS]
        values = tl.reshape(values, (BLOCK_N, GROUPS, GROUP_SIZE)) * scale[:, :, None]
        return tl.reshape(values, (BLOCK_N, BLOCK_K))


@triton.jit
def _word(qw_ptr, rows, col, plane_start, stride_qn, one, WORDS_PER_COLUMN: tl.constexpr, INDEX: tl.constexpr):
    """Word INDEX of each thread's column in one bit plane, for every row: [1, BLOCK_N, COLUMNS]
    int32. The column's offset is multiplied by the run-time 1 `one`: with no contiguity to see,
    the compiler loads the words in the activations' layout (one column per thread, its rows in
    registers) instead of a vectorised one that would send every decoded weight through shared
    memory to meet the activations. The word index stays a constant offset (no address math)."""
    return tl.load(qw_ptr + rows * stride_qn + (col * WORDS_PER_COLUMN) * one + plane_start + INDEX)


@triton.jit
def _window(window, qw_ptr, rows, col, plane_start, stride_qn, one, KK: tl.constexpr, WIDTH: tl.constexpr,
            COLUMN_K: tl.constexpr, SINT: tl.constexpr):
    """The bits of one plane that code KK of a column is read from (integer fast path of
    `_column_sums`): the next word where a word starts, the word shifted down past the codes
    already read where they reach bit 23, else `window` unchanged."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    WINDOW: tl.constexpr = 23 // WIDTH  # codes readable in place: pos + WIDTH <= 23
    if KK % PER_WORD == 0:
        window = _word(qw_ptr, rows, col, plane_start, stride_qn, one, COLUMN_K * WIDTH // 32, KK // PER_WORD)
        if SINT:
            window ^= -2139062144  # 0x80808080: every byte + 128, two's complement -> offset binary
    elif (KK % PER_WORD) % WINDOW == 0:
        window = window >> (WINDOW * WIDTH)
    return window


@triton.jit
def _plane_fma(sums, window, x, magic, KK: tl.constexpr, WIDTH: tl.constexpr, SHIFT: tl.constexpr,
               OFFSET: tl.constexpr):
    """sums + (plane bits of code KK << SHIFT) * x, minus OFFSET * x (the first plane carries
    the offset). (window & (mask << pos)) | magic reinterpreted is 2^23 + bits * 2^pos, exactly:
    one LOP3 and one FADD, and the 2^(SHIFT - pos) rides on x, which all the thread's rows share."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    WINDOW: tl.constexpr = 23 // WIDTH
    pos: tl.constexpr = ((KK % PER_WORD) % WINDOW) * WIDTH
    bits = ((window & (((1 << WIDTH) - 1) << pos)) | magic).to(tl.float32, bitcast=True)
    if SHIFT != pos:
        x = x * (2.0 ** (SHIFT - pos))
    return tl.fma(bits - (8388608.0 + OFFSET * (1 << pos)), x, sums)


@triton.jit
def _spread_to_nibbles(word, HALF: tl.constexpr):
    """The 8 2-bit codes in half HALF (0: bits 0-15, 1: bits 16-31) of `word`, spread out to
    nibble spacing: code j at bits 4j, 4j + 1."""
    if HALF:
        word = word >> 16
    spread = word & 0xFFFF
    spread = (spread | (spread << 8)) & 0x00FF00FF
    spread = (spread | (spread << 4)) & 0x0F0F0F0F
    return (spread | (spread << 2)) & 0x33333333


@triton.jit
def _two_field_fma(sums, low, high, x, POS: tl.constexpr, LOW_BITS: tl.constexpr, OFFSET: tl.constexpr):
    """`_plane_fma` for a code whose low LOW_BITS bits sit at POS in `low` and whose top 2 bits
    sit right above them in `high`, which has 0x4B000000 OR-ed in (int6 / int7: the 4-bit plane
    and its spread 2-bit codes; lut4: its two merged plane pairs). Two LOP3s put the whole code
    into one float, 2^23 + code * 2^POS; then one FADD and the FFMA, where the parts one at a
    time take two of each. Bits of `high` above bit 23 do no harm: the mask keeps only the
    0x4B000000 positions there, which the OR already set."""
    bits = ((low & (((1 << LOW_BITS) - 1) << POS)) | (high & ((3 << (POS + LOW_BITS)) | 0x4B000000)))
    if POS != 0:
        x = x * (2.0 ** -POS)
    return tl.fma(bits.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET * (1 << POS)), x, sums)


@triton.jit
def _plane_pair(qw_ptr, rows, col, plane_start, words_per_bit, stride_qn, one, COLUMN_K: tl.constexpr,
                INDEX: tl.constexpr):
    """Word INDEX of two one-bit planes (the LUT formats' layout; plane_start = the lower plane's
    first word) merged into two words of 2-bit codes, so `_plane_fma` reads them as it reads an
    int2 plane: `even` holds the codes of the word's even K (K 2q at bits 2q, 2q+1), `odd` those of
    its odd K. Four integer ops per 32 K of a row, instead of a LOP3 + FADD + FFMA per weight and
    plane."""
    low = _word(qw_ptr, rows, col, plane_start, stride_qn, one, COLUMN_K // 32, INDEX)
    high = _word(qw_ptr, rows, col, plane_start + words_per_bit, stride_qn, one, COLUMN_K // 32, INDEX)
    # bits of `a` where mask is set, of `b` elsewhere, as b ^ ((a ^ b) & mask): one LOP3. The mask
    # is a run-time value (times `one`) so the compiler keeps this form instead of rewriting it as
    # two ANDs with complementary constants, which ptxas cannot fuse into one LOP3
    mask = 0x55555555 * one
    high_up = high << 1
    even = high_up ^ ((low ^ high_up) & mask)
    odd = high ^ (((low >> 1) ^ high) & mask)
    return even, odd


@triton.jit
def _pair_fma(sums, even, odd, qw_ptr, rows, col, words_per_bit, stride_qn, one, x, magic, KK: tl.constexpr,
              OFFSET: tl.constexpr, COLUMN_K: tl.constexpr):
    """`_plane_fma` for code KK of a column on one-bit planes 0 and 1 (lut2, lut3): the pair is
    merged at each word (`_plane_pair`); KK's code is 2-bit code (KK % 32) // 2 of the merged
    word of KK's parity. Returns (sums, even, odd)."""
    SLOT: tl.constexpr = (KK % 32) // 2
    WINDOW: tl.constexpr = 23 // 2  # as in `_window`: the codes from here on are shifted down
    if KK % 32 == 0:
        even, odd = _plane_pair(qw_ptr, rows, col, 0, words_per_bit, stride_qn, one, COLUMN_K, KK // 32)
    if SLOT == WINDOW:
        if KK % 2 == 0:
            even = even >> (2 * WINDOW)
        else:
            odd = odd >> (2 * WINDOW)
    if KK % 2 == 0:
        sums = _plane_fma(sums, even, x, magic, SLOT, 2, 0, OFFSET)
    else:
        sums = _plane_fma(sums, odd, x, magic, SLOT, 2, 0, OFFSET)
    return sums, even, odd


@triton.jit
def _lut4_fma(sums, even0, odd0, even1, odd1, high, high_odd, qw_ptr, rows, col, words_per_bit, stride_qn, one, x,
              magic, KK: tl.constexpr, OFFSET: tl.constexpr, COLUMN_K: tl.constexpr):
    """lut4's code KK of a column: its plane pairs (0, 1) and (2, 3) are merged at each word
    (`_plane_pair`), and the second pair's codes, shifted up by 2 and with 0x4B000000 OR-ed in
    (high / high_odd, by K's parity), sit right above the first's, so `_two_field_fma` reads the
    4-bit code at once. Returns the sums and the updated merged words."""
    SLOT: tl.constexpr = (KK % 32) // 2  # in the merged words of KK's parity, as in `_pair_fma`
    WINDOW: tl.constexpr = (23 - 4) // 2 + 1  # codes read in place: pos = 2 * slot, pos + 4 <= 23
    if KK % 32 == 0:
        even0, odd0 = _plane_pair(qw_ptr, rows, col, 0, words_per_bit, stride_qn, one, COLUMN_K, KK // 32)
        even1, odd1 = _plane_pair(qw_ptr, rows, col, 2 * words_per_bit, words_per_bit, stride_qn, one, COLUMN_K,
                                  KK // 32)
        high = (even1 << 2) | magic
        high_odd = (odd1 << 2) | magic
    if SLOT == WINDOW:  # the rest of the word, shifted down
        if KK % 2 == 0:
            even0 = even0 >> (2 * WINDOW)
            high = (even1 >> (2 * WINDOW - 2)) | magic
        else:
            odd0 = odd0 >> (2 * WINDOW)
            high_odd = (odd1 >> (2 * WINDOW - 2)) | magic
    if KK % 2 == 0:
        sums = _two_field_fma(sums, even0, high, x, 2 * (SLOT % WINDOW), 2, OFFSET)
    else:
        sums = _two_field_fma(sums, odd0, high_odd, x, 2 * (SLOT % WINDOW), 2, OFFSET)
    return sums, even0, odd0, even1, odd1, high, high_odd


@triton.jit
def _shifted(word, SHIFT: tl.constexpr):
    """word << SHIFT, or >> -SHIFT for a negative SHIFT (the bits that matter are masked after)."""
    if SHIFT > 0:
        word = word << SHIFT
    elif SHIFT < 0:
        word = word >> -SHIFT
    return word


@triton.jit
def _minifloat_pair(word, INDEX: tl.constexpr, ELEMENT: tl.constexpr, BITS: tl.constexpr):
    """Small floats INDEX and INDEX + 16 // BITS of a word of BITS-wide codes (E4M3 / E5M2 / E2M1),
    which lie 16 bits apart -> two fp32 values * 2^(bias - 15), as `_decode_minifloat` gives. Both
    move into fp16 position in one go, the first into the word's low half and the second into its
    high half: one shift and mask place the exponent and mantissa fields, another shift places the
    signs, which a single LOP3 masks in (E5M2 needs one shift for both); then each half is
    converted: two shifts and two LOP3s per pair, where one code at a time took three ops each."""
    EXP: tl.constexpr = 4 if ELEMENT == "e4m3" else 5 if ELEMENT == "e5m2" else 2
    MAN: tl.constexpr = BITS - 1 - EXP
    pos: tl.constexpr = INDEX * BITS
    FIELD_SHIFT: tl.constexpr = 10 - MAN - pos  # the code's low bit -> the fp16 mantissa's
    SIGN_SHIFT: tl.constexpr = 16 - BITS - pos  # the code's sign bit -> bit 15
    FIELDS: tl.constexpr = (((1 << (BITS - 1)) - 1) << (10 - MAN)) * 0x10001  # exponent + mantissa, both halves
    SIGNS: tl.constexpr = -2147450880  # 0x80008000 as int32
    if SIGN_SHIFT == FIELD_SHIFT:
        halves = _shifted(word, FIELD_SHIFT) & (FIELDS | SIGNS)
    else:
        halves = (_shifted(word, FIELD_SHIFT) & FIELDS) | (_shifted(word, SIGN_SHIFT) & SIGNS)
    low = halves.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (halves >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def _column_x(x_ptr, x_rows, x_mask, k0, K, stride_xm, KK: tl.constexpr, MASK_X: tl.constexpr):
    """The activations at K = k0 + KK of each thread's column: [BLOCK_M, 1, COLUMNS] fp32."""
    if MASK_X:
        x = tl.load(x_ptr + x_rows * stride_xm + k0 + KK, mask=x_mask & (k0 + KK < K), other=0.0)
    else:
        x = tl.load(x_ptr + x_rows * stride_xm + k0 + KK)
    return x.to(tl.float32)


@triton.jit
def _column_sums(x_ptr, qw_ptr, z_ptr, x_rows, rows, col, x_mask, K, words_per_bit, stride_xm, stride_qn, one,
                 magic, BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr,
                 ONE_BIT_PLANES: tl.constexpr, MASK_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 COLUMNS: tl.constexpr, COLUMN_K: tl.constexpr):
    """For each thread's column of COLUMN_K consecutive K (col [1, 1, COLUMNS]) and each of its
    rows: sum_k value(code) * x [BLOCK_M, BLOCK_N, COLUMNS] fp32, and sum_k x [BLOCK_M, 1, COLUMNS]
    (zero for all but asymmetric "int"). value is the element before scaling, up to
    `_element_factor`; asymmetric "int" leaves out the zero point (the caller subtracts
    zero * sum_k x once per column instead of once per weight).

    Integer elements ("int", "sint") never shift a code out of its word: each bit plane adds its
    bits through `_plane_fma` (a LOP3, an FADD and the FFMA per weight and plane). `magic` is
    0x4B000000 passed at run time so it sits in a register: LOP3 takes one immediate, which the
    mask needs. The LUT formats' one-bit planes are merged in pairs into 2-bit codes first
    (`_pair_fma`). E4M3 / E5M2 / E2M1 decode two codes at a time (`_minifloat_pair`), so their
    column is walked in pair order (K, K + 16 // BITS, K + 1, ...); "nf4" and "e2m3" extract each
    code, then look it up / `_decode` it."""
    MINIFLOAT: tl.constexpr = ELEMENT == "e4m3" or ELEMENT == "e5m2" or ELEMENT == "e2m1"
    INTEGER: tl.constexpr = ELEMENT == "int" or ELEMENT == "sint"
    ZERO_POINT: tl.constexpr = ELEMENT == "int" and not SYMMETRIC
    # subtracted from every code: the symmetric zero point, or sint's sign flip
    OFFSET: tl.constexpr = 0 if ZERO_POINT else (1 << (BITS - 1))
    PER_WORD: tl.constexpr = 32 // BITS
    k0 = col * COLUMN_K
    sums = tl.zeros((BLOCK_M, BLOCK_N, COLUMNS), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M, 1, COLUMNS), dtype=tl.float32)
    # the current word (or window of one) of each bit plane
    w8 = tl.zeros((1, BLOCK_N, COLUMNS), dtype=tl.int32)
    w4 = w8
    w2 = w8
    w1 = w8
    even0 = w8  # merged one-bit plane pairs (0, 1) and (2, 3), see `_pair_fma` / `_lut4_fma`
    odd0 = w8
    even1 = w8
    odd1 = w8
    spread = w8  # int6 / int7: the 2-bit codes of the current 4-bit word, see `_two_field_fma`
    high = w8  # the top 2 bits of int6 / int7 codes, of lut4's even-K codes
    high_odd = w8  # of lut4's odd-K codes
    pending = tl.zeros((1, BLOCK_N, COLUMNS), dtype=tl.float32)  # a decoded pair's second value
    for kk in tl.static_range(COLUMN_K):
        if MINIFLOAT:  # step kk reads K in pair order: 0, 16 // BITS, 1, 1 + 16 // BITS, ...
            x = _column_x(x_ptr, x_rows, x_mask, k0, K, stride_xm,
                          (kk // PER_WORD) * PER_WORD + (kk % PER_WORD) // 2 + (kk % 2) * (16 // BITS), MASK_X)
        else:
            x = _column_x(x_ptr, x_rows, x_mask, k0, K, stride_xm, kk, MASK_X)
        if ZERO_POINT:
            x_sum += x
        if INTEGER and ONE_BIT_PLANES and BITS == 4:  # lut4: both merged pairs read as one 4-bit code
            sums, even0, odd0, even1, odd1, high, high_odd = _lut4_fma(
                sums, even0, odd0, even1, odd1, high, high_odd, qw_ptr, rows, col, words_per_bit, stride_qn, one, x,
                magic, kk, OFFSET, COLUMN_K)
        elif INTEGER and ONE_BIT_PLANES:
            tl.static_assert(BITS <= 3, "lut1 - lut3 here (lut4 has the branch above)")
            if BITS >= 2:
                sums, even0, odd0 = _pair_fma(sums, even0, odd0, qw_ptr, rows, col, words_per_bit, stride_qn, one, x,
                                              magic, kk, OFFSET, COLUMN_K)
            if BITS % 2:  # the top plane of lut1 / lut3
                w1 = _window(w1, qw_ptr, rows, col, words_per_bit * (BITS - 1), stride_qn, one, kk, 1, COLUMN_K, False)
                sums = _plane_fma(sums, w1, x, magic, kk, 1, BITS - 1, 0 if BITS > 1 else OFFSET)
        elif INTEGER and BITS == 8:
            w8 = _window(w8, qw_ptr, rows, col, 0, stride_qn, one, kk, 8, COLUMN_K, ELEMENT == "sint")
            sums = _plane_fma(sums, w8, x, magic, kk, 8, 0, OFFSET)
        elif INTEGER and BITS & 6 == 6:  # int6, int7: the 4-bit and 2-bit planes read as one 6-bit code
            w4 = _window(w4, qw_ptr, rows, col, 0, stride_qn, one, kk, 4, COLUMN_K, False)
            if kk % 16 == 0:
                w2 = _word(qw_ptr, rows, col, words_per_bit * 4, stride_qn, one, COLUMN_K // 16, kk // 16)
            if kk % 8 == 0:  # the 2-bit codes of the 4-bit plane's new word, each right above its low bits
                spread = _spread_to_nibbles(w2, (kk // 8) % 2)
                high = (spread << 4) | magic
            elif kk % 8 == 23 // 4:  # where `_window` shifts the 4-bit plane's word down by 20
                high = (spread >> 16) | magic
            sums = _two_field_fma(sums, w4, high, x, ((kk % 8) % (23 // 4)) * 4, 4, OFFSET)
            if BITS & 1:
                w1 = _window(w1, qw_ptr, rows, col, words_per_bit * 6, stride_qn, one, kk, 1, COLUMN_K, False)
                sums = _plane_fma(sums, w1, x, magic, kk, 1, 6, 0)
        elif INTEGER:
            if BITS & 4:
                w4 = _window(w4, qw_ptr, rows, col, 0, stride_qn, one, kk, 4, COLUMN_K, False)
                sums = _plane_fma(sums, w4, x, magic, kk, 4, 0, OFFSET)
            if BITS & 2:
                w2 = _window(w2, qw_ptr, rows, col, words_per_bit * (BITS & 4), stride_qn, one, kk, 2, COLUMN_K, False)
                sums = _plane_fma(sums, w2, x, magic, kk, 2, BITS & 4, 0 if BITS & 4 else OFFSET)
            if BITS & 1:
                w1 = _window(w1, qw_ptr, rows, col, words_per_bit * (BITS & 6), stride_qn, one, kk, 1, COLUMN_K, False)
                sums = _plane_fma(sums, w1, x, magic, kk, 1, BITS & 6, 0 if BITS & 6 else OFFSET)
        elif MINIFLOAT:
            if kk % PER_WORD == 0:
                w8 = _word(qw_ptr, rows, col, 0, stride_qn, one, COLUMN_K // PER_WORD, kk // PER_WORD)
            if kk % 2 == 0:
                value, pending = _minifloat_pair(w8, (kk % PER_WORD) // 2, ELEMENT, BITS)
            else:
                value = pending
            sums = tl.fma(value, x, sums)
        else:  # "nf4" (one 4-bit plane) and "e2m3" (4-bit + 2-bit planes): the code, then its value
            tl.static_assert(BITS & 1 == 0 and BITS < 8, "no 1-bit or 8-bit plane here")
            code = tl.zeros((1, BLOCK_N, COLUMNS), dtype=tl.int32)
            if BITS & 4:
                if kk % 8 == 0:
                    w4 = _word(qw_ptr, rows, col, 0, stride_qn, one, COLUMN_K // 8, kk // 8)
                code |= (w4 >> ((kk % 8) * 4)) & 15
            if BITS & 2:
                if kk % 16 == 0:
                    w2 = _word(qw_ptr, rows, col, words_per_bit * (BITS & 4), stride_qn, one, COLUMN_K // 16,
                               kk // 16)
                code |= ((w2 >> ((kk % 16) * 2)) & 3) << (BITS & 4)
            if ELEMENT == "nf4":
                value = tl.load(z_ptr + code)  # z_ptr: the fp32 codebook (see `_dequant_tile`)
            else:
                value = _decode(code, ELEMENT, BITS)
            sums = tl.fma(value, x, sums)
    return sums, x_sum


@triton.jit
def _gemv_tile(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, x_rows, rows, columns, K, words_per_bit,
               stride_xm, stride_qn, stride_sg, one, magic,
               BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr, GROUP_SIZE: tl.constexpr,
               SCALE_GROUP_N: tl.constexpr, SCALE_KIND: tl.constexpr, ONE_BIT_PLANES: tl.constexpr,
               MASKED: tl.constexpr, PADDED_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               COLUMNS: tl.constexpr, COLUMN_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N, COLUMNS] plus K tile t (COLUMNS columns of COLUMN_K). MASKED: the
    tile runs past the last column (those columns add nothing); PADDED_K: x has K < Kp columns."""
    col = (t * COLUMNS + tl.arange(0, COLUMNS))[None, None, :]
    in_range = col < columns
    if MASKED:
        col = tl.minimum(col, columns - 1)  # weight and scale loads stay in bounds
    sums, x_sum = _column_sums(x_ptr, qw_ptr, z_ptr, x_rows, rows, col, in_range, K, words_per_bit, stride_xm,
                               stride_qn, one, magic, BITS, ELEMENT, SYMMETRIC, ONE_BIT_PLANES, MASKED or PADDED_K,
                               BLOCK_M, BLOCK_N, COLUMNS, COLUMN_K)
    group = col * COLUMN_K // GROUP_SIZE
    scale_rows = rows if SCALE_GROUP_N == 1 else rows // SCALE_GROUP_N
    scale = _decode_scale(tl.load(s_ptr + group * stride_sg + scale_rows), SCALE_KIND)  # [1, BLOCK_N, COLUMNS]
    factor = _element_factor(ELEMENT, BITS)
    if SCALE_KIND == "e8m0":
        sums = sums * factor  # E8M0 scales reach 2^127: scale * factor could overflow
    else:
        scale = scale * factor
    if ELEMENT == "int" and not SYMMETRIC:
        zero = tl.load(z_ptr + group * stride_sg + rows).to(tl.float32)
        sums = tl.fma(-zero, x_sum, sums)
    if MASKED:
        sums = tl.where(in_range, sums, 0.0)  # a clamped column's weights may decode to NaN
    return tl.fma(scale, sums, acc)


@triton.jit(do_not_specialize=["one", "magic"])  # both must stay run-time values, see their use
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, ts_ptr, bias_ptr, out_ptr, ws_ptr, counters_ptr,
                 M, N, K, columns, tiles_per_split, stride_xm, stride_qn, stride_sg, stride_om, one, magic,
                 BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_GROUP_N: tl.constexpr,
                 SCALE_KIND: tl.constexpr, HAS_TENSOR_SCALE: tl.constexpr, ONE_BIT_PLANES: tl.constexpr,
                 WORDS_PER_BIT: tl.constexpr, SPLIT: tl.constexpr, PADDED_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, COLUMNS: tl.constexpr, COLUMN_K: tl.constexpr):
    """Split-K GEMV. The K axis is cut into columns of COLUMN_K consecutive values and each thread
    takes one column of a tile (COLUMNS = the program's threads) for all BLOCK_N rows: its
    activations are loaded and converted once and used for every row held in its registers,
    weights and activations share one layout (nothing passes through shared memory), and each
    column is scaled once (per-element products need no scale multiply). Rows and activations
    beyond N / M are clamped to the last one (loads need no masks), the stores are masked.
    WORDS_PER_BIT (Kp / 32, the words of one bit plane in a row) is a constexpr so that a row's
    second and later planes sit at constant offsets from its first (folded into the loads, where a
    run-time offset costs a 64-bit add per row and plane): one compile per distinct K, for codes
    with more than one plane (the launcher passes 0 for the others, which never read it)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = tl.minimum(offs_m, M - 1)[:, None, None]
    rows = tl.minimum(offs_n, N - 1)[None, :, None]
    k_tiles = tl.cdiv(columns, COLUMNS)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, k_tiles)
    full_end = tl.minimum(t_end, columns // COLUMNS)  # tiles before it hold no column past the last
    acc = tl.zeros((BLOCK_M, BLOCK_N, COLUMNS), dtype=tl.float32)
    for t in range(t_start, full_end):
        acc = _gemv_tile(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, x_rows, rows, columns, K, WORDS_PER_BIT, stride_xm,
                         stride_qn, stride_sg, one, magic, BITS, ELEMENT, SYMMETRIC, GROUP_SIZE, SCALE_GROUP_N,
                         SCALE_KIND, ONE_BIT_PLANES, False, PADDED_K, BLOCK_M, BLOCK_N, COLUMNS, COLUMN_K)
    for t in range(tl.maximum(t_start, full_end), t_end):  # the last, partial tile (at most one)
        acc = _gemv_tile(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, x_rows, rows, columns, K, WORDS_PER_BIT, stride_xm,
                         stride_qn, stride_sg, one, magic, BITS, ELEMENT, SYMMETRIC, GROUP_SIZE, SCALE_GROUP_N,
                         SCALE_KIND, ONE_BIT_PLANES, True, PADDED_K, BLOCK_M, BLOCK_N, COLUMNS, COLUMN_K)
    out = tl.sum(acc, axis=2)
    if HAS_TENSOR_SCALE:
        out *= tl.load(ts_ptr).to(tl.float32)
    if HAS_BIAS:
        if pid_k == 0:  # with split-K, the bias goes into exactly one partial sum
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    store_split_k(out, out_ptr, ws_ptr, counters_ptr, offs_m, offs_n, M, N, stride_om, SPLIT)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, ts_ptr, bias_ptr, out_ptr,
                 M, N, K, words_per_bit,
                 stride_xm, stride_qn, stride_sg, stride_om,
                 BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_GROUP_N: tl.constexpr,
                 SCALE_KIND: tl.constexpr, HAS_TENSOR_SCALE: tl.constexpr, ONE_BIT_PLANES: tl.constexpr,
                 DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
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
        w = tl.trans(_dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, t * BLOCK_K, n_mask, words_per_bit, stride_qn,
                                   stride_sg, BITS, ELEMENT, SYMMETRIC, GROUP_SIZE, SCALE_GROUP_N,
                                   SCALE_KIND, ONE_BIT_PLANES, BLOCK_N, BLOCK_K))  # [BLOCK_K, BLOCK_N]
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_TENSOR_SCALE:
        acc *= tl.load(ts_ptr).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


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
    """The GEMV's default rows per program for BLOCK_M batch rows: 16 (batch row, row) pairs per thread."""
    return 16 // block_m


def gemv_config(m: int, n: int, kp: int, bits: int, group_size: int, device: torch.device) -> dict | None:
    """Default tiles of the split-K dequant GEMV, or None if it cannot take this variant.
    16 rows per program at M=1 (8 at M=2, 4 at M=4): every activation a thread loads serves
    that many weights, and 2 * BLOCK_M * BLOCK_N fp32 sums stay in registers; columns of 32 K,
    shortened and then fewer rows per program until the grid has two programs per SM; enough K
    splits for ~4 programs per SM (since the splits are reduced inside the launch an extra split
    costs only its partial sums). A default, not a measurement: benchmarks/tune.py replaces it
    per GPU and shape."""
    column_k = gemv_column_k(bits, group_size)
    if column_k is None:
        return None
    block_m = min(triton.next_power_of_2(m), GEMV_MAX_M)
    block_n = gemv_block_n(block_m)
    sms = num_sms(device)

    def k_tiles() -> int:
        return triton.cdiv(kp // column_k, gemv_columns({}))

    while triton.cdiv(n, block_n) * k_tiles() < 2 * sms and column_k // 2 >= min_column_k(bits):
        column_k //= 2
    while triton.cdiv(n, block_n) * k_tiles() < 2 * sms and block_n > 2:
        block_n //= 2
    split_k = max(1, min(k_tiles(), triton.cdiv(4 * sms, triton.cdiv(n, block_n))))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "COLUMN_K": column_k, "SPLIT_K": split_k}


def pick_config(m: int, n: int, kp: int, group_size: int, device: torch.device, multi_group: bool = False,
                variant: str | None = None, bits: int = 4, lut: bool = False) -> dict:
    """Path and tile sizes for an [m, kp] x [n, kp]^T problem of `bits`-wide codes (1 for the LUT
    formats: the narrowest bit plane decides the GEMV's shortest column): the tuned config
    for this GPU, kernel `variant` and M bucket when benchmarks/tune.py measured one
    (lowbit/kernels/tuning.py), else defaults. multi_group: GEMM tiles may span several scale
    groups (no zero points); lut: the launch also has the table-lookup kernel (a tuned "lut" path)."""
    tuned = tuned_config(device, variant, n, kp, m, group_size, multi_group, bits, lut) if variant else None
    if tuned:
        return tuned
    gemv = gemv_config(m, n, kp, bits, group_size, device) if m <= GEMV_MAX_M else None
    if gemv:
        return {"path": "gemv", **gemv}
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return {"path": "gemm", "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": _block_k(group_size, kp, 64, multi_group)}


def tuned_config(device: torch.device, variant: str, n: int, kp: int, m: int, group_size: int,
                 multi_group: bool, bits: int, lut: bool = False) -> dict | None:
    """The tuned entry for this launch (lowbit/kernels/tuning.py) if there is one this launch can
    take, else None."""
    tuned = lookup(device, variant, n, kp, m)
    return tuned if tuned and valid_config(tuned, group_size, kp, multi_group, bits, lut) else None


#: the tile keys of each path's configs (besides "path" and the launch options); "lut" is the LUT
#: formats' table-lookup kernel (lowbit/kernels/lut_gemm.py)
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
    if not valid_launch_options(cfg):
        return False
    if "COLUMN_K" in keys:
        return check_column_k(cfg["COLUMN_K"], bits, group_size) is None
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


def check_block_k(block_k: int, group_size: int, kp: int, multi_group: bool) -> None:
    # >= 32: a tile must hold whole words of the 1-bit plane; scales per whole group
    if block_k < 32 or block_k & (block_k - 1) or not _tile_fits(block_k, group_size, kp, multi_group):
        raise InputError(f"BLOCK_K={block_k} must be a power of two >= 32 inside one group of "
                         f"{group_size}" + (f" or covering whole groups of Kp={kp}" if multi_group else ""))


#: element decoder -> the code width it needs (None: any width 2..8)
ELEMENTS = {"int": None, "sint": 8, "e4m3": 8, "e5m2": 8, "e2m3": 6, "e2m1": 4, "nf4": 4}
SCALE_KINDS = ("float", "e8m0", "e4m3")
#: 2^23 as fp32 bits, a kernel argument so the GEMV holds it in a register (see `_column_sums`)
MAGIC = 0x4B000000


@functools.lru_cache(maxsize=None)
def _nf4_codebook(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int,
                   group_size: int, in_features: int, element: str = "int", scale_group_n: int = 1,
                   scale_kind: str = "float", tensor_scale: torch.Tensor | None = None,
                   one_bit_planes: bool = False, config: dict | None = None) -> torch.Tensor:
    """[M, K] x (fp16/bf16/fp32) times the packed [N, K] weight -> [M, N] in x.dtype.

    qweight int32 [N, Kp*bits/32] (bit planes, see lowbit/formats/bitpack.py; one_bit_planes: the
      LUT formats' b one-bit planes).
    element: "int" (w = (code - zero) * scale), "sint" (two's complement k/64, MX INT8) or a
      small float "e4m3" / "e5m2" / "e2m3" / "e2m1" (w = value(code) * scale), or "nf4" (w =
      NF4_CODEBOOK[code] * scale).
    scales [Kp/group_size, ceil(N/scale_group_n)]: any float dtype (scale_kind "float") or uint8
      bytes of E8M0 exponents / E4M3 values (scale_kind "e8m0" / "e4m3").
    zeros float16 [Kp/group_size, N] (asymmetric "int" only, else None).
    tensor_scale: fp32 [1] multiplying the whole product (NVFP4), or None. bias [N] or None.
    `config`: a whole config (with a "path", keys as returned by `pick_config`) replaces the path
      / tile choice; one without a path overrides the keys it has.
    """
    width = ELEMENTS.get(element, -1)
    if width == -1 or (width is not None and bits != width) or (element != "int" and zeros is not None):
        raise InputError(f"element={element!r} with bits={bits}, zeros={zeros is not None} is not a kernel variant")
    if scale_kind not in SCALE_KINDS:
        raise InputError(f"scale_kind must be one of {SCALE_KINDS}, got {scale_kind!r}")
    n = qweight.shape[0]
    kp = scales.shape[0] * group_size
    check_operands(x, qweight, kp, bits, in_features)
    if scales.shape[1] != triton.cdiv(n, scale_group_n):
        raise InputError(f"scales shape {tuple(scales.shape)} does not match N={n}, scale_group_n={scale_group_n}")
    x = x.contiguous()
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    multi_group = element != "int"
    variant = f"{element}{bits}{'-1bit' if one_bit_planes else ''}-{'sym' if zeros is None else 'asym'}-g{group_size}-{scale_kind}-{x.dtype}"
    # GEMV columns hold whole words of the narrowest bit plane: one bit wide in the LUT formats' layout
    plane_bits = 1 if one_bit_planes else bits
    if config and "path" in config:  # a whole config (the LUT launcher's pick): no lookup of our own
        cfg = dict(config)
    else:
        cfg = {**pick_config(m, n, kp, group_size, x.device, multi_group, variant, plane_bits), **(config or {})}
    if cfg["path"] not in ("gemv", "gemm"):
        raise InputError(f"config path must be 'gemv' or 'gemm', got {cfg['path']!r}")
    # z_ptr: the zero points (asymmetric "int"), the codebook ("nf4"), else never read
    zeros_arg = zeros if zeros is not None else _nf4_codebook(x.device) if element == "nf4" else scales
    bias_arg = bias if bias is not None else scales  # never read without bias
    ts_arg = tensor_scale if tensor_scale is not None else scales  # never read without one
    common = dict(BITS=bits, ELEMENT=element, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None,
                  GROUP_SIZE=group_size, SCALE_GROUP_N=scale_group_n, SCALE_KIND=scale_kind,
                  HAS_TENSOR_SCALE=tensor_scale is not None, ONE_BIT_PLANES=one_bit_planes, BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_N=cfg["BLOCK_N"], **launch_options(cfg))
    words_per_bit = kp // 32
    if cfg["path"] == "gemv":
        problem = check_column_k(cfg["COLUMN_K"], plane_bits, group_size)
        if problem:
            raise InputError(problem)
        columns = kp // cfg["COLUMN_K"]
        # the GEMV compiles per K only where it has later bit planes to find (single-plane codes ignore it)
        planes = bits if one_bit_planes else bin(bits).count("1")
        n_tiles, m_tiles = triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"])
        out, workspace, tickets, tiles_per_split, split_k = split_k_buffers(
            x, n, triton.cdiv(columns, gemv_columns(cfg)), cfg["SPLIT_K"], n_tiles * m_tiles)
        _gemv_kernel[(n_tiles, split_k, m_tiles)](x, qweight, scales, zeros_arg, ts_arg, bias_arg, out, workspace,
                                                  tickets, m, n, in_features, columns, tiles_per_split,
                                                  x.stride(0), qweight.stride(0), scales.stride(0), n, 1, MAGIC,
                                                  WORDS_PER_BIT=words_per_bit if planes > 1 else 0, SPLIT=split_k > 1,
                                                  PADDED_K=in_features != kp,
                                                  COLUMNS=gemv_columns(cfg), COLUMN_K=cfg["COLUMN_K"], **common)
        return out
    check_block_k(cfg["BLOCK_K"], group_size, kp, multi_group)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    dot_fp32 = x.dtype == torch.float32 or interpreting()  # the interpreter's bf16 tl.dot is wrong
    _gemm_kernel[grid](x, qweight, scales, zeros_arg, ts_arg, bias_arg, out,
                       m, n, in_features, words_per_bit,
                       x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
                       DOT_FP32=dot_fp32, BLOCK_K=cfg["BLOCK_K"], **common)
    return out
