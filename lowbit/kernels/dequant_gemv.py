"""The split-K dequant GEMV for small M (the launcher, `dequant_matmul` in
lowbit/kernels/dequant_gemm.py, picks it at M <= GEMV_MAX_M).

Each thread sums a column of COLUMN_K consecutive K for all BLOCK_N rows of its program, in
registers (`_column_sums`: one decoder per code layout, reading each packed word once; words,
activations and its rows' scales come in 128-bit vector loads), and
the sums are reduced across threads once, after the K loop; the splits are reduced inside the
same launch (lowbit/kernels/split_k.py).
"""
import triton
import triton.language as tl

from .element_decode import _decode, _decode_scale, _element_factor
from .split_k import store_split_k

#: Triton before 3.7 orders the dimensions of a load whose addresses show no contiguity first to
#: last (3.7 on: last to first), so a [1, BLOCK_N, COLUMNS] word load spread its rows (and a
#: [BLOCK_M, 1, COLUMNS] activation load its M) across threads, and every decoded weight went
#: through shared memory to meet the other operand (ldmatrix / stmatrix and barriers in the K loop,
#: tests/kernels/test_compile_hopper.py). There `_load_by_column` loads through pointers with the
#: column axis moved first, which that order lays out one column per thread.
_TRANSPOSED_LOADS = tl.constexpr(tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7))


@triton.jit
def _load_by_column(ptrs, mask=None, other=None):
    """tl.load of [*, *, COLUMNS] pointers, or [*, *, COLUMNS, VEC] ones contiguous along the last
    axis only (one vector load of up to 128 bits per thread), in the K loop's layout: one column
    per thread, its rows, M and vector in that thread's registers, under every Triton
    (`_TRANSPOSED_LOADS`). mask (broadcastable to `ptrs`) and other: as tl.load's."""
    if not _TRANSPOSED_LOADS:
        loaded = tl.load(ptrs, mask=mask, other=other)
    elif len(ptrs.shape) == 4:
        loaded = _permuted_load(ptrs, mask, other, (2, 1, 0, 3))
    else:
        loaded = _permuted_load(ptrs, mask, other, (2, 1, 0))
    return loaded


@triton.jit
def _permuted_load(ptrs, mask, other, PERM: tl.constexpr):
    """tl.load through pointers (and mask) with their axes permuted by PERM, permuted back."""
    if mask is None:
        loaded = tl.load(tl.permute(ptrs, PERM))
    else:
        loaded = tl.load(tl.permute(ptrs, PERM), mask=tl.permute(mask, PERM), other=other)
    return tl.permute(loaded, PERM)


@triton.jit
def _half(vector, ODD: tl.constexpr, N: tl.constexpr):
    """The even (ODD false) or odd elements of the last axis (length N) of a 4-D `vector`."""
    even, odd = tl.split(tl.reshape(vector, (vector.shape[0], vector.shape[1], vector.shape[2], N // 2, 2)))
    return odd if ODD else even


@triton.jit
def _item(vector, I: tl.constexpr, N: tl.constexpr):
    """Element I of the last axis (length N: 1, 2, 4 or 8, held in each thread's registers) of a
    4-D `vector`, that axis dropped: a choice of registers, no instruction."""
    tl.static_assert(N <= 8, "vectors of up to 8 elements (128-bit loads of 16-bit values)")
    if N >= 2:
        vector = _half(vector, I % 2, N)
    if N >= 4:
        vector = _half(vector, (I // 2) % 2, N // 2)
    if N >= 8:
        vector = _half(vector, (I // 4) % 2, N // 4)
    return tl.reshape(vector, (vector.shape[0], vector.shape[1], vector.shape[2]))


@triton.jit
def _word(qw_ptr, rows, col, plane_start, stride_qn, one, WORDS_PER_COLUMN: tl.constexpr, INDEX: tl.constexpr):
    """Word INDEX of each thread's column in one bit plane, for every row: [1, BLOCK_N, COLUMNS]
    int32. The column's words are loaded VEC at a time (128-bit loads: a warp's load of a row
    covers whole cache lines, where one word per thread used a quarter of each line it touched),
    and the compiler merges the loads of one chunk's words into one. The column's offset is
    multiplied by the run-time 1 `one`: with no contiguity to see across columns, the compiler
    keeps the activations' layout (one column per thread, its rows in registers) instead of
    spreading a column's words over threads, which would send every decoded weight through shared
    memory to meet the activations."""
    VEC: tl.constexpr = 4 if WORDS_PER_COLUMN >= 4 else WORDS_PER_COLUMN
    start = qw_ptr + rows * stride_qn + (col * WORDS_PER_COLUMN) * one + plane_start + (INDEX // VEC) * VEC
    chunk = _load_by_column(start[:, :, :, None] + tl.arange(0, VEC)[None, None, None, :])
    return _item(chunk, INDEX % VEC, VEC)


@triton.jit
def _plane_word(word, qw_ptr, rows, col, plane_start, stride_qn, one, KK: tl.constexpr, WIDTH: tl.constexpr,
                COLUMN_K: tl.constexpr, SINT: tl.constexpr):
    """The word of one plane that code KK of a column is read from: the next word where a word
    starts, else `word` unchanged. SINT: two's complement codes, made offset binary."""
    if KK % (32 // WIDTH) == 0:
        word = _word(qw_ptr, rows, col, plane_start, stride_qn, one, COLUMN_K * WIDTH // 32, KK // (32 // WIDTH))
        if SINT:
            word ^= -2139062144  # 0x80808080: every byte + 128, two's complement -> offset binary
    return word


@triton.jit
def _window(word, window, J: tl.constexpr, WIDTH: tl.constexpr, PER_WINDOW: tl.constexpr, FIRST: tl.constexpr):
    """The bits code J of `word` (WIDTH bits each) is read from: at every PER_WINDOW-th code,
    `word` shifted so that code J lies at bit FIRST; else `window` unchanged."""
    if J % PER_WINDOW == 0:
        window = _shifted(word, FIRST - J * WIDTH)
    return window


@triton.jit
def _plane_fma(sums, corr, word, window, x, magic, J: tl.constexpr, WIDTH: tl.constexpr, SHIFT: tl.constexpr,
               OFFSET: tl.constexpr, BITS: tl.constexpr, FOLD: tl.constexpr):
    """sums + (code J of `word`, WIDTH bits, << SHIFT) * x, minus OFFSET * x (the first plane
    carries the offset; BITS: the whole code's width); returns (sums, corr, window). Codes are
    read from a window, `word` shifted so that they lie below bit 23, a new one every PER_WINDOW
    codes. (window & (mask << pos)) | magic reinterpreted is 2^23 + bits * 2^pos, exactly, and
    the 2^(SHIFT - pos) rides on x, which all the thread's rows share: a LOP3, an FADD taking off
    the 2^23 + offset, and the FFMA per weight.

    FOLD (16-bit activations; planes of up to 4 bits): no FADD. The FFMA takes the code's float
    as it is, and the 2^23 + offset it carries goes into `corr` ([BLOCK_M, 1, COLUMNS], the same
    for all the thread's rows: one FFMA per K, not per weight), which the column's sums lose at
    its end. The products are exact, but the sums then hold ~2^(23 - pos + SHIFT) * x next to
    codes of up to 2^BITS and lose low bits to it, so codes are read only from bit LOW up (more,
    narrower windows: a shift per window). With LOW below, a Llama-width product keeps its error
    under 2^-14 of its largest value (tests/kernels/test_dequant_gemm.py), 1/16 of an fp16 step."""
    LOW: tl.constexpr = 17 + SHIFT - BITS  # from there 2^(23 - pos + SHIFT) <= 2^6 * 2^BITS
    FOLDED: tl.constexpr = FOLD and 2 * WIDTH <= 23 - LOW
    PER_WINDOW: tl.constexpr = (23 - LOW) // WIDTH if FOLDED else 23 // WIDTH
    FIRST: tl.constexpr = 23 - PER_WINDOW * WIDTH if FOLDED else 0  # the bit a window's first code is at
    window = _window(word, window, J, WIDTH, PER_WINDOW, FIRST)
    pos: tl.constexpr = FIRST + (J % PER_WINDOW) * WIDTH
    bits = ((window & (((1 << WIDTH) - 1) << pos)) | magic).to(tl.float32, bitcast=True)
    if SHIFT != pos:
        x = x * (2.0 ** (SHIFT - pos))
    if FOLDED:
        sums = tl.fma(bits, x, sums)
        corr = tl.fma(x, 8388608.0 + OFFSET * (1 << pos), corr)
    else:
        sums = tl.fma(bits - (8388608.0 + OFFSET * (1 << pos)), x, sums)
    return sums, corr, window


@triton.jit
def _byte_fma(sums, corr, word, x, magic, J: tl.constexpr, OFFSET: tl.constexpr, FOLD: tl.constexpr,
              PTX: tl.constexpr):
    """`_plane_fma` for byte J of `word` (8-bit codes): one PRMT makes the float 2^23 + code * 2^8
    (the byte moved to bits 8-15, `magic`'s 0x4B above it, zeros elsewhere; `magic` is a
    register, so no mask and no shift), then an FADD takes off 2^23 + OFFSET * 2^8 and the FFMA
    adds the product: three instructions per weight, where a LOP3, the FADD, the FFMA and a
    shift per two codes took 3.5. FOLD (bf16 activations only): no FADD, the constant goes into
    `corr` as in `_plane_fma`, two instructions per weight. It then stands 2^15 next to codes up
    to 2^8 and costs the sums ~2^-13 of their largest value (tests/kernels/test_dequant_gemm.py),
    1/64 of a bf16 step but 1/8 of an fp16 one, so fp16 and fp32 activations keep the FADD. The
    interpreter runs no PTX: tl ops, the same bits."""
    if PTX:  # selector nibbles, byte 0 up: magic's zero byte, byte J of word, a zero, magic's 0x4B
        if J == 0:
            bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7404;", "=r,r,r", [word, magic],
                                             dtype=tl.int32, is_pure=True, pack=1)
        elif J == 1:
            bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7414;", "=r,r,r", [word, magic],
                                             dtype=tl.int32, is_pure=True, pack=1)
        elif J == 2:
            bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7424;", "=r,r,r", [word, magic],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7434;", "=r,r,r", [word, magic],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (((word >> (8 * J)) & 255) << 8) | magic
    x = x * (2.0 ** -8)
    if FOLD:
        sums = tl.fma(bits.to(tl.float32, bitcast=True), x, sums)
        corr = tl.fma(x, 8388608.0 + OFFSET * 256, corr)
    else:
        sums = tl.fma(bits.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET * 256), x, sums)
    return sums, corr


@triton.jit
def _two_field_fma(sums, low, high, x, POS: tl.constexpr, LOW_BITS: tl.constexpr, OFFSET: tl.constexpr):
    """`_plane_fma` for a code whose low LOW_BITS bits sit at POS in `low` and whose top 2 bits
    sit right above them in `high`, which has 0x4B000000 OR-ed in (int6 / int7: the 4-bit plane
    and the shifted nibble-aligned 2-bit plane; lut4: its two merged plane pairs). Two LOP3s put
    the whole code into one float, 2^23 + code * 2^POS; then one FADD and the FFMA, where the
    parts one at a time take two of each. Other bits of `high` do no harm: the mask keeps only
    the code's 2 bits and, above bit 23, the 0x4B000000 positions, which the OR already set."""
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
def _pair_fma(sums, corr, even, odd, even_window, odd_window, qw_ptr, rows, col, words_per_bit, stride_qn, one, x,
              magic, KK: tl.constexpr, OFFSET: tl.constexpr, COLUMN_K: tl.constexpr, BITS: tl.constexpr,
              FOLD: tl.constexpr):
    """`_plane_fma` for code KK of a column on one-bit planes 0 and 1 (lut2, lut3): the pair is
    merged at each word (`_plane_pair`); KK's code is 2-bit code (KK % 32) // 2 of the merged
    word of KK's parity. Returns (sums, corr, even, odd, even_window, odd_window)."""
    if KK % 32 == 0:
        even, odd = _plane_pair(qw_ptr, rows, col, 0, words_per_bit, stride_qn, one, COLUMN_K, KK // 32)
    if KK % 2 == 0:
        sums, corr, even_window = _plane_fma(sums, corr, even, even_window, x, magic, (KK % 32) // 2, 2, 0, OFFSET,
                                             BITS, FOLD)
    else:
        sums, corr, odd_window = _plane_fma(sums, corr, odd, odd_window, x, magic, (KK % 32) // 2, 2, 0, OFFSET,
                                            BITS, FOLD)
    return sums, corr, even, odd, even_window, odd_window


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
def _minifloat_pair(word, INDEX: tl.constexpr, ELEMENT: tl.constexpr, BITS: tl.constexpr, PTX: tl.constexpr):
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
    return _fp16_pair_to_fp32(halves, PTX)


@triton.jit
def _e4m3_pair(word, HALF: tl.constexpr, PTX: tl.constexpr):
    """E4M3 codes 2 * HALF and 2 * HALF + 1 of a word of four (its low or high 16 bits) -> their
    fp32 values, unscaled. PTX: one hardware conversion of both to fp16 (cvt.rn.f16x2.e4m3x2,
    sm_89 on; the higher byte to the higher half) and a cvt.f32.f16 of each half: 1.5
    instructions per weight, where `_minifloat_pair` takes 3 (sm_90 fp8 GEMV: 4.24 -> 2.99 per
    weight). The interpreter runs no PTX: the same values from `_decode`."""
    if PTX:
        if HALF == 0:
            low, high = tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; .reg .b32 h; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 h, lo; "
                "mov.b32 {lo, hi}, h; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
                "=r,=r,r", [word], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            low, high = tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; .reg .b32 h; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 h, hi; "
                "mov.b32 {lo, hi}, h; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
                "=r,=r,r", [word], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        factor = _element_factor("e4m3", 8)
        low = _decode((word >> (16 * HALF)) & 255, "e4m3", 8) * factor
        high = _decode((word >> (16 * HALF + 8)) & 255, "e4m3", 8) * factor
    return low, high


@triton.jit
def _e4m3_value(code, PTX: tl.constexpr):
    """An E4M3 byte (int32, 0..255) -> its fp32 value. PTX: the hardware conversion of
    `_e4m3_pair` on the byte alone (sm_89 on): two instructions, where `_decode_scale`'s integer
    decode takes about seven. The interpreter: `_decode_scale`."""
    if PTX:
        value = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .b32 h; mov.b32 {lo, hi}, $1; cvt.rn.f16x2.e4m3x2 h, lo; "
            "mov.b32 {lo, hi}, h; cvt.f32.f16 $0, lo; }",
            "=r,r", [code], dtype=tl.float32, is_pure=True, pack=1)
    else:
        value = _decode_scale(code, "e4m3")
    return value


@triton.jit
def _scale_value(raw, SCALE_KIND: tl.constexpr, FP8_CVT: tl.constexpr, PTX: tl.constexpr):
    """Stored scales -> fp32 (`_decode_scale`); E4M3 ones (NVFP4's) through `_e4m3_value` under
    FP8_CVT. Shared by the GEMV and the GEMM's weight tiles."""
    if FP8_CVT and SCALE_KIND == "e4m3":
        scale = _e4m3_value(raw.to(tl.int32), PTX)
    else:
        scale = _decode_scale(raw, SCALE_KIND)
    return scale


@triton.jit
def _value_factor(ELEMENT: tl.constexpr, BITS: tl.constexpr, FP8_CVT: tl.constexpr):
    """`_element_factor`, except 1 for E4M3 under FP8_CVT (`_e4m3_pair` / `_e4m3_value` give the
    values themselves)."""
    return 1.0 if FP8_CVT and ELEMENT == "e4m3" else _element_factor(ELEMENT, BITS)


@triton.jit
def _fp16_pair_to_fp32(halves, PTX: tl.constexpr):
    """The two fp16 values in the low and high halves of int32 `halves` -> (low, high) fp32.
    PTX (compiled kernels): two `cvt.f32.f16` of the register's halves, one HADD2.F32 each. With tl
    ops, LLVM packs the low (high) halves of two rows into one register first, one PRMT per two
    weights more (sm_90: fp8 / mxfp4 / nvfp4 GEMV 4.90 / 4.95 / 5.46 -> 4.62 / 4.64 / 5.13
    instructions per weight). The interpreter runs no PTX: it takes the tl ops, the same values."""
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
            "=r,=r,r", [halves], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    low = halves.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (halves >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def _column_x(x_ptr, x_rows, x_mask, k0, K, stride_xm, CHUNK: tl.constexpr, VEC: tl.constexpr,
              MASK_X: tl.constexpr):
    """The activations at K = k0 + CHUNK * VEC .. + VEC - 1 of each thread's column: [BLOCK_M, 1,
    COLUMNS, VEC] fp32, loaded as a vector (`_item` picks one K)."""
    ks = (k0 + CHUNK * VEC)[:, :, :, None] + tl.arange(0, VEC)[None, None, None, :]
    ptrs = x_ptr + x_rows[:, :, :, None] * stride_xm + ks
    if MASK_X:
        x = _load_by_column(ptrs, x_mask[:, :, :, None] & (ks < K), 0.0)
    else:
        x = _load_by_column(ptrs)
    return x.to(tl.float32)


@triton.jit
def _column_sums(x_ptr, qw_ptr, z_ptr, x_rows, rows, col, x_mask, K, words_per_bit, stride_xm, stride_qn, one,
                 magic, BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr,
                 ONE_BIT_PLANES: tl.constexpr, MASK_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 COLUMNS: tl.constexpr, COLUMN_K: tl.constexpr, FP8_CVT: tl.constexpr, PTX: tl.constexpr):
    """For each thread's column of COLUMN_K consecutive K (col [1, 1, COLUMNS]) and each of its
    rows: sum_k value(code) * x [BLOCK_M, BLOCK_N, COLUMNS] fp32, and sum_k x [BLOCK_M, 1, COLUMNS]
    (zero for all but asymmetric "int"). value is the element before scaling, up to
    `_element_factor`; asymmetric "int" leaves out the zero point (the caller subtracts
    zero * sum_k x once per column instead of once per weight).

    Integer elements ("int", "sint") never shift a code out of its word: each bit plane adds its
    bits through `_plane_fma` (a LOP3, an FADD and the FFMA per weight and plane; no FADD for
    planes of up to 4 bits under 16-bit activations, FOLD), 8-bit codes through `_byte_fma` (a
    PRMT per weight instead of the LOP3, no FADD under bf16 activations). `magic` is 0x4B000000
    passed at run time so it sits in a register: LOP3 takes one immediate, which the mask needs. The LUT
    formats' one-bit planes are merged in pairs into 2-bit codes first (`_pair_fma`). E4M3 /
    E5M2 / E2M1 decode two codes at a time (`_minifloat_pair`), so their column is walked in pair
    order (K, K + 16 // BITS, K + 1, ...), except E4M3 under FP8_CVT (`_e4m3_pair`: the hardware
    conversion, pairs of neighbours, walked in order); "codebook" and "e2m3" extract each code,
    then look it up / `_decode` it. PTX: the kernel is compiled (not interpreted), see
    `_fp16_pair_to_fp32`."""
    MINIFLOAT: tl.constexpr = ELEMENT == "e4m3" or ELEMENT == "e5m2" or ELEMENT == "e2m1"
    PAIR_ORDER: tl.constexpr = MINIFLOAT and not (FP8_CVT and ELEMENT == "e4m3")  # see `_minifloat_pair`
    INTEGER: tl.constexpr = ELEMENT == "int" or ELEMENT == "sint"
    ZERO_POINT: tl.constexpr = ELEMENT == "int" and not SYMMETRIC
    # subtracted from every code: the symmetric zero point, or sint's sign flip
    OFFSET: tl.constexpr = 0 if ZERO_POINT else (1 << (BITS - 1))
    PER_WORD: tl.constexpr = 32 // BITS
    # 16-bit activations: the output rounds to 8 or 11 bits, so `_plane_fma` may trade the sums' low bits for
    # its FADD (fp32 activations keep every bit)
    FOLD: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    k0 = col * COLUMN_K
    sums = tl.zeros((BLOCK_M, BLOCK_N, COLUMNS), dtype=tl.float32)
    corr = tl.zeros((BLOCK_M, 1, COLUMNS), dtype=tl.float32)  # what FOLD left in sums, see `_plane_fma`
    x_sum = tl.zeros((BLOCK_M, 1, COLUMNS), dtype=tl.float32)
    # the current word of each bit plane, and the window of it that codes are read from
    w8 = tl.zeros((1, BLOCK_N, COLUMNS), dtype=tl.int32)
    w4 = w8
    w2 = w8
    w1 = w8
    win4 = w8
    win2 = w8
    win1 = w8
    even_window = w8  # of even0 / odd0 in lut2 / lut3
    odd_window = w8
    even0 = w8  # merged one-bit plane pairs (0, 1) and (2, 3), see `_pair_fma` / `_lut4_fma`
    odd0 = w8
    even1 = w8
    odd1 = w8
    high = w8  # the top 2 bits of int6 / int7 codes, of lut4's even-K codes
    high_odd = w8  # of lut4's odd-K codes
    pending = tl.zeros((1, BLOCK_N, COLUMNS), dtype=tl.float32)  # a decoded pair's second value
    # the activations are read 128 bits (X_VEC) at a time, X_SPAN at once: a minifloat word's pairs
    # (PER_WORD K, up to 8) may span two chunks of fp32 activations
    X_WIDEST: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    X_VEC: tl.constexpr = X_WIDEST if COLUMN_K >= X_WIDEST else COLUMN_K
    X_SPAN: tl.constexpr = PER_WORD if MINIFLOAT and PER_WORD > X_VEC else X_VEC
    x_chunk = tl.zeros((BLOCK_M, 1, COLUMNS, X_VEC), dtype=tl.float32)
    x_next = x_chunk
    for kk in tl.static_range(COLUMN_K):
        if kk % X_SPAN == 0:
            x_chunk = _column_x(x_ptr, x_rows, x_mask, k0, K, stride_xm, kk // X_VEC, X_VEC, MASK_X)
            if X_SPAN > X_VEC:
                x_next = _column_x(x_ptr, x_rows, x_mask, k0, K, stride_xm, kk // X_VEC + 1, X_VEC, MASK_X)
        if PAIR_ORDER:  # step kk reads K in pair order: 0, 16 // BITS, 1, 1 + 16 // BITS, ... (inside a word)
            at = (kk % X_SPAN) // PER_WORD * PER_WORD + (kk % PER_WORD) // 2 + (kk % 2) * (16 // BITS)
        else:
            at = kk % X_SPAN
        if at < X_VEC:
            x = _item(x_chunk, at % X_VEC, X_VEC)
        else:
            x = _item(x_next, at % X_VEC, X_VEC)
        if ZERO_POINT:
            x_sum += x
        if INTEGER and ONE_BIT_PLANES and BITS == 4:  # lut4: both merged pairs read as one 4-bit code
            sums, even0, odd0, even1, odd1, high, high_odd = _lut4_fma(
                sums, even0, odd0, even1, odd1, high, high_odd, qw_ptr, rows, col, words_per_bit, stride_qn, one, x,
                magic, kk, OFFSET, COLUMN_K)
        elif INTEGER and ONE_BIT_PLANES:
            tl.static_assert(BITS <= 3, "lut1 - lut3 here (lut4 has the branch above)")
            if BITS >= 2:
                sums, corr, even0, odd0, even_window, odd_window = _pair_fma(
                    sums, corr, even0, odd0, even_window, odd_window, qw_ptr, rows, col, words_per_bit, stride_qn, one,
                    x, magic, kk, OFFSET, COLUMN_K, BITS, FOLD)
            if BITS % 2:  # the top plane of lut1 / lut3
                w1 = _plane_word(w1, qw_ptr, rows, col, words_per_bit * (BITS - 1), stride_qn, one, kk, 1, COLUMN_K,
                                 False)
                sums, corr, win1 = _plane_fma(sums, corr, w1, win1, x, magic, kk % 32, 1, BITS - 1,
                                              0 if BITS > 1 else OFFSET, BITS, FOLD)
        elif INTEGER and BITS == 8:
            w8 = _plane_word(w8, qw_ptr, rows, col, 0, stride_qn, one, kk, 8, COLUMN_K, ELEMENT == "sint")
            sums, corr = _byte_fma(sums, corr, w8, x, magic, kk % 4, OFFSET, x_ptr.dtype.element_ty == tl.bfloat16,
                                   PTX)
        elif INTEGER and BITS & 6 == 6:  # int6, int7: the 4-bit and 2-bit planes read as one 6-bit code
            w4 = _plane_word(w4, qw_ptr, rows, col, 0, stride_qn, one, kk, 4, COLUMN_K, False)
            # codes at bits 0, 4, ..., 16 read in place (6 bits below bit 23), the rest shifted down
            win4 = _window(w4, win4, kk % 8, 4, 23 // 4, 0)
            if kk % 16 == 0:
                w2 = _word(qw_ptr, rows, col, words_per_bit * 4, stride_qn, one, COLUMN_K // 16, kk // 16)
            # The 2-bit plane is nibble-aligned (bitpack.py): the top bits of the 4-bit word's code j
            # sit at bit 4j (first 8 codes of w2) or 4j + 2 (second 8); one shift puts them right
            # above the low bits. `_two_field_fma` masks out the other half's codes.
            if kk % 8 == 0:
                high = (w2 << (4 - 2 * ((kk // 8) % 2))) | magic
            elif kk % 8 == 23 // 4:  # where the 4-bit plane's window moves down by 20
                high = (w2 >> (16 + 2 * ((kk // 8) % 2))) | magic
            sums = _two_field_fma(sums, win4, high, x, ((kk % 8) % (23 // 4)) * 4, 4, OFFSET)
            if BITS & 1:
                w1 = _plane_word(w1, qw_ptr, rows, col, words_per_bit * 6, stride_qn, one, kk, 1, COLUMN_K, False)
                sums, corr, win1 = _plane_fma(sums, corr, w1, win1, x, magic, kk % 32, 1, 6, 0, BITS, FOLD)
        elif INTEGER:
            if BITS & 4:
                w4 = _plane_word(w4, qw_ptr, rows, col, 0, stride_qn, one, kk, 4, COLUMN_K, False)
                sums, corr, win4 = _plane_fma(sums, corr, w4, win4, x, magic, kk % 8, 4, 0, OFFSET, BITS, FOLD)
            if BITS & 2:
                w2 = _plane_word(w2, qw_ptr, rows, col, words_per_bit * (BITS & 4), stride_qn, one, kk, 2, COLUMN_K,
                                 False)
                sums, corr, win2 = _plane_fma(sums, corr, w2, win2, x, magic, kk % 16, 2, BITS & 4,
                                              0 if BITS & 4 else OFFSET, BITS, FOLD)
            if BITS & 1:
                w1 = _plane_word(w1, qw_ptr, rows, col, words_per_bit * (BITS & 6), stride_qn, one, kk, 1, COLUMN_K,
                                 False)
                sums, corr, win1 = _plane_fma(sums, corr, w1, win1, x, magic, kk % 32, 1, BITS & 6,
                                              0 if BITS & 6 else OFFSET, BITS, FOLD)
        elif MINIFLOAT:
            if kk % PER_WORD == 0:
                w8 = _word(qw_ptr, rows, col, 0, stride_qn, one, COLUMN_K // PER_WORD, kk // PER_WORD)
            if kk % 2 == 0 and not PAIR_ORDER:
                value, pending = _e4m3_pair(w8, (kk % PER_WORD) // 2, PTX)
            elif kk % 2 == 0:
                value, pending = _minifloat_pair(w8, (kk % PER_WORD) // 2, ELEMENT, BITS, PTX)
            else:
                value = pending
            sums = tl.fma(value, x, sums)
        else:  # "codebook" (one 4-bit plane) and "e2m3" (4-bit + 2-bit planes): the code, then its value
            tl.static_assert(BITS & 1 == 0 and BITS < 8, "no 1-bit or 8-bit plane here")
            code = tl.zeros((1, BLOCK_N, COLUMNS), dtype=tl.int32)
            if BITS & 4:
                if kk % 8 == 0:
                    w4 = _word(qw_ptr, rows, col, 0, stride_qn, one, COLUMN_K // 8, kk // 8)
                code |= (w4 >> ((kk % 8) * 4)) & 15
            if BITS & 2:
                tl.static_assert(BITS == 6, "a 2-bit plane here is e2m3's, above its 4-bit plane")
                if kk % 16 == 0:
                    w2 = _word(qw_ptr, rows, col, words_per_bit * 4, stride_qn, one, COLUMN_K // 16, kk // 16)
                # e2m3's 2-bit plane is nibble-aligned (bitpack.py): code j of 16 at 4 (j % 8) + 2 (j // 8)
                code |= ((w2 >> ((kk % 8) * 4 + ((kk % 16) // 8) * 2)) & 3) << 4
            if ELEMENT == "codebook":
                value = _load_by_column(z_ptr + code)  # z_ptr: the fp32 codebook (see `_dequant_tile`)
            else:
                value = _decode(code, ELEMENT, BITS)
            sums = tl.fma(value, x, sums)
    return sums - corr, x_sum


@triton.jit
def _row_params(row_ptrs, row0, N, BLOCK_N: tl.constexpr, COLUMNS: tl.constexpr):
    """[1, BLOCK_N, COLUMNS]: row_ptrs[r] ([1, 1, COLUMNS] pointers to row 0 of each thread's
    column's group) for rows r = row0 .. row0 + BLOCK_N - 1 (rows from N on: 0), held by the
    column's thread. Loaded as 128-bit vectors (ROWS rows each), where a load per row
    re-read the same cache lines BLOCK_N times; the vectors' values are then put in row order
    within each thread (a permute and reshape of its registers, no data moves between threads)."""
    ROWS: tl.constexpr = 128 // row_ptrs.dtype.element_ty.primitive_bitwidth
    VEC: tl.constexpr = ROWS if BLOCK_N >= ROWS else BLOCK_N
    r = (row0 + tl.arange(0, BLOCK_N // VEC) * VEC)[None, :, None, None] + tl.arange(0, VEC)[None, None, None, :]
    chunks = _load_by_column(row_ptrs[:, :, :, None] + r, r < N, 0)  # [1, BLOCK_N // VEC, COLUMNS, VEC]
    return tl.reshape(tl.permute(chunks, (0, 1, 3, 2)), (1, BLOCK_N, COLUMNS))


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 32-byte sector at each of `ptrs` (PTX `prefetch.global.L2`, compiled kernels
    only): nothing is written to a register and nothing waits on it. Not pure, so the compiler
    keeps it though its result (a dummy 0) is never used."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_run(start, COUNT: tl.constexpr, first=0, last=None):
    """Prefetch the COUNT contiguous elements start[first:], one prefetch per 32 bytes; with `last`,
    each index clamped to it (a run that may pass the end of its tensor: the last row block's
    scales). A run that starts inside a sector and ends inside the next one may leave that
    last sector out (a hint, not a load: the tile's own load then fetches it)."""
    STEP: tl.constexpr = 256 // start.dtype.element_ty.primitive_bitwidth  # elements per 32 bytes
    for piece in tl.static_range((COUNT + STEP - 1) // STEP):
        if last is None:
            _prefetch_l2(start + (first + piece * STEP))
        else:
            _prefetch_l2(start + tl.minimum(first + piece * STEP, last))


@triton.jit
def _prefetch_plane(qw_ptr, rows, col, plane_start, stride_qn, one, WIDTH: tl.constexpr, COLUMN_K: tl.constexpr):
    """Prefetch each row's words of one WIDTH-bit plane in each thread's column (as `_word` reads them)."""
    WORDS: tl.constexpr = COLUMN_K * WIDTH // 32
    _prefetch_run(qw_ptr + rows * stride_qn + (col * WORDS) * one + plane_start, WORDS)


@triton.jit
def _prefetch_tile(t, x_ptr, qw_ptr, s_ptr, z_ptr, x_rows, rows, row0, N, K, words_per_bit,
                   stride_xm, stride_qn, stride_sg, one, BITS: tl.constexpr, ELEMENT: tl.constexpr,
                   SYMMETRIC: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_GROUP_N: tl.constexpr,
                   ONE_BIT_PLANES: tl.constexpr, PADDED_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   COLUMNS: tl.constexpr, COLUMN_K: tl.constexpr):
    """Prefetch into L2 everything whole K tile t reads from memory: each row's words of every
    bit plane (`_column_sums`' planes), the activations of each thread's column, and its rows'
    scales (and zero points). Issued a tile ahead (the kernel's PREFETCH), the next tile's bytes
    stream in from DRAM while this one is summed, and its loads then wait on L2, not DRAM. A
    whole tile's columns need no clamp; only runs that may pass their tensor's end are clamped."""
    col = (t * COLUMNS + tl.arange(0, COLUMNS))[None, None, :]
    if ONE_BIT_PLANES:
        for plane in tl.static_range(BITS):
            _prefetch_plane(qw_ptr, rows, col, words_per_bit * plane, stride_qn, one, 1, COLUMN_K)
    elif BITS == 8:
        _prefetch_plane(qw_ptr, rows, col, 0, stride_qn, one, 8, COLUMN_K)
    else:  # the 4-, 2- and 1-bit planes, widest first (lowbit/formats/bitpack.py)
        if BITS & 4:
            _prefetch_plane(qw_ptr, rows, col, 0, stride_qn, one, 4, COLUMN_K)
        if BITS & 2:
            _prefetch_plane(qw_ptr, rows, col, words_per_bit * (BITS & 4), stride_qn, one, 2, COLUMN_K)
        if BITS & 1:
            _prefetch_plane(qw_ptr, rows, col, words_per_bit * (BITS & 6), stride_qn, one, 1, COLUMN_K)
    if PADDED_K:  # x has K < Kp columns: the tile's last activations may lie past them
        _prefetch_run(x_ptr + x_rows * stride_xm, COLUMN_K, col * COLUMN_K, K - 1)
    else:
        _prefetch_run(x_ptr + x_rows * stride_xm + col * COLUMN_K, COLUMN_K)
    group = col * COLUMN_K // GROUP_SIZE
    scale_rows = (N + SCALE_GROUP_N - 1) // SCALE_GROUP_N
    _prefetch_run(s_ptr + group * stride_sg, (BLOCK_N + SCALE_GROUP_N - 1) // SCALE_GROUP_N, row0 // SCALE_GROUP_N,
                  scale_rows - 1)
    if ELEMENT == "int" and not SYMMETRIC:
        _prefetch_run(z_ptr + group * stride_sg, BLOCK_N, row0, N - 1)


@triton.jit
def _gemv_tile(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, x_rows, rows, row0, N, columns, K, words_per_bit,
               stride_xm, stride_qn, stride_sg, one, magic,
               BITS: tl.constexpr, ELEMENT: tl.constexpr, SYMMETRIC: tl.constexpr, GROUP_SIZE: tl.constexpr,
               SCALE_GROUP_N: tl.constexpr, SCALE_KIND: tl.constexpr, ONE_BIT_PLANES: tl.constexpr,
               MASKED: tl.constexpr, PADDED_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               COLUMNS: tl.constexpr, COLUMN_K: tl.constexpr, FP8_CVT: tl.constexpr, PTX: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N, COLUMNS] plus K tile t (COLUMNS columns of COLUMN_K) of rows `rows`
    ([1, BLOCK_N, 1]: row0 onwards, clamped to N - 1). MASKED: the tile runs past the last column
    (those columns add nothing); PADDED_K: x has K < Kp columns."""
    col = (t * COLUMNS + tl.arange(0, COLUMNS))[None, None, :]
    in_range = col < columns
    if MASKED:
        col = tl.minimum(col, columns - 1)  # weight and scale loads stay in bounds
    sums, x_sum = _column_sums(x_ptr, qw_ptr, z_ptr, x_rows, rows, col, in_range, K, words_per_bit, stride_xm,
                               stride_qn, one, magic, BITS, ELEMENT, SYMMETRIC, ONE_BIT_PLANES, MASKED or PADDED_K,
                               BLOCK_M, BLOCK_N, COLUMNS, COLUMN_K, FP8_CVT, PTX)
    group = col * COLUMN_K // GROUP_SIZE
    if SCALE_GROUP_N == 1:  # a scale per row: the thread's rows' scales are contiguous, loaded as vectors
        raw_scale = _row_params(s_ptr + group * stride_sg, row0, N, BLOCK_N, COLUMNS)
    else:  # one scale for SCALE_GROUP_N rows (hidden from the compiler, times the run-time 1: loaded like the words)
        raw_scale = _load_by_column(s_ptr + group * stride_sg + (rows * one) // SCALE_GROUP_N)
    scale = _scale_value(raw_scale, SCALE_KIND, FP8_CVT, PTX)  # [1, BLOCK_N, COLUMNS]
    factor = _value_factor(ELEMENT, BITS, FP8_CVT)
    if SCALE_KIND == "e8m0":
        sums = sums * factor  # E8M0 scales reach 2^127: scale * factor could overflow
    else:
        scale = scale * factor
    if ELEMENT == "int" and not SYMMETRIC:
        zero = _row_params(z_ptr + group * stride_sg, row0, N, BLOCK_N, COLUMNS).to(tl.float32)
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
                 BLOCK_N: tl.constexpr, COLUMNS: tl.constexpr, COLUMN_K: tl.constexpr, STAGES: tl.constexpr,
                 PREFETCH: tl.constexpr, FP8_CVT: tl.constexpr, PTX: tl.constexpr):
    """Split-K GEMV. The K axis is cut into columns of COLUMN_K consecutive values and each thread
    takes one column of a tile (COLUMNS = the program's threads) for all BLOCK_N rows: its
    activations are loaded and converted once and used for every row held in its registers,
    weights and activations share one layout (nothing passes through shared memory), and each
    column is scaled once (per-element products need no scale multiply). Rows and activations
    beyond N / M are clamped to the last one (loads need no masks), the stores are masked.
    WORDS_PER_BIT (Kp / 32, the words of one bit plane in a row) is a constexpr so that a row's
    second and later planes sit at constant offsets from its first (folded into the loads, where a
    run-time offset costs a 64-bit add per row and plane): one compile per distinct K, for codes
    with more than one plane (the launcher passes 0 for the others, which never read it). STAGES
    (a config's num_stages, default 1): software-pipeline stages of the whole-tile loop; from 2 on
    the compiler copies the next tiles' words, activations and scales into shared memory (16-byte
    cp.async) while the current one is summed, which helps where a program has several tiles
    (benchmarks/tune.py decides). PREFETCH (a config's PREFETCH, default off; with STAGES 1 only):
    each whole-tile trip first asks L2 for the next tile's bytes (`_prefetch_tile`), so that a
    program with several tiles keeps DRAM busy while it sums, where otherwise each tile's loads
    wait on DRAM and then its arithmetic leaves DRAM idle. PTX: compiled, not interpreted (inline
    PTX allowed; `_fp16_pair_to_fp32`; the interpreter skips the prefetches, hints with no
    effect on the result). FP8_CVT: E4M3 weights and block scales convert in hardware
    (`_e4m3_pair`, `_e4m3_value`; sm_89 on)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row0 = pid_n * BLOCK_N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    x_rows = tl.minimum(offs_m, M - 1)[:, None, None]
    rows = tl.minimum(offs_n, N - 1)[None, :, None]
    k_tiles = tl.cdiv(columns, COLUMNS)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, k_tiles)
    full_end = tl.minimum(t_end, columns // COLUMNS)  # tiles before it hold no column past the last
    acc = tl.zeros((BLOCK_M, BLOCK_N, COLUMNS), dtype=tl.float32)
    for t in tl.range(t_start, full_end, num_stages=STAGES):
        if PREFETCH and PTX:
            if t + 1 < full_end:  # the next tile is whole (a partial last one is not asked for)
                _prefetch_tile(t + 1, x_ptr, qw_ptr, s_ptr, z_ptr, x_rows, rows, row0, N, K, WORDS_PER_BIT,
                               stride_xm, stride_qn, stride_sg, one, BITS, ELEMENT, SYMMETRIC, GROUP_SIZE,
                               SCALE_GROUP_N, ONE_BIT_PLANES, PADDED_K, BLOCK_N, COLUMNS, COLUMN_K)
        acc = _gemv_tile(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, x_rows, rows, row0, N, columns, K, WORDS_PER_BIT,
                         stride_xm, stride_qn, stride_sg, one, magic, BITS, ELEMENT, SYMMETRIC, GROUP_SIZE,
                         SCALE_GROUP_N, SCALE_KIND, ONE_BIT_PLANES, False, PADDED_K, BLOCK_M, BLOCK_N, COLUMNS,
                         COLUMN_K, FP8_CVT, PTX)
    for t in range(tl.maximum(t_start, full_end), t_end):  # the last, partial tile (at most one)
        acc = _gemv_tile(acc, t, x_ptr, qw_ptr, s_ptr, z_ptr, x_rows, rows, row0, N, columns, K, WORDS_PER_BIT,
                         stride_xm, stride_qn, stride_sg, one, magic, BITS, ELEMENT, SYMMETRIC, GROUP_SIZE,
                         SCALE_GROUP_N, SCALE_KIND, ONE_BIT_PLANES, True, PADDED_K, BLOCK_M, BLOCK_N, COLUMNS,
                         COLUMN_K, FP8_CVT, PTX)
    out = tl.sum(acc, axis=2)
    if HAS_TENSOR_SCALE:
        out *= tl.load(ts_ptr).to(tl.float32)
    if HAS_BIAS:
        if pid_k == 0:  # with split-K, the bias goes into exactly one partial sum
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    store_split_k(out, out_ptr, ws_ptr, counters_ptr, offs_m, offs_n, M, N, stride_om, SPLIT)
