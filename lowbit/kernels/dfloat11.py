"""Triton DFloat11 decoders (format: lowbit/formats/dfloat11.py).

One lane per segment of `segment` weights: a lane starts at its segment's stored bit offset
and decodes one weight per step, so the lanes of a program run in lockstep (no prefix sums,
no divergence). A lane keeps its next stream bits right-aligned in a 64-bit buffer and a count
of them: a step looks the CODE_BITS bits under that count up in the 512 B decode table
(cache-resident) with one funnel shift and takes the code's length off the count, and the
buffer itself never shifts by a code. Every 32 // CODE_BITS steps (4 for 8-bit codes) the lane
checks the count and, once 32 or fewer bits remain, moves them up a word and puts the next
stream word below (about every twelfth step: codes average under 3 bits), from a group of STAGE
words it holds in registers and refetches, one vector load, as soon as it has used the last.
The lanes of a warp read segments far apart, so every global access costs a cache line of its
own: the stream words, the sign|mantissa bytes (and the decoder's bf16 results) move as vectors
per lane, several words or a chunk of weights at a time. (The H100 profile of 2026-11-25 found
both kernels moving 3x (fused GEMV) and 5.7x (decoder) the DRAM bytes of their data: sectors
fetched for a few bytes, evicted by the other lanes' lines, then fetched again.)

- `_decode_kernel` writes bf16 weights. It takes a table of layers (addresses of each layer's
  fields and output, plus its sizes), so the Linear weights of a whole transformer block
  decode in one launch into one reused buffer (lowbit/block_decode.py).
- `_decode_gemv_kernel` fuses decoding with a GEMV for small M: the bf16 weight never
  reaches memory. A program's lanes are GEMV_BLOCK_N rows at the same segment column, so the
  activations are the same for every lane: one broadcast 16-byte vector per 8 (fp32: 4)
  steps, each lane picking its step's column from registers; programs along axis 1 take segment
  columns and are reduced inside the launch (deterministic split-K: lowbit/kernels/split_k.py).
  Its lanes per program, chunk, stage, split count and warps are tuned per GPU and M bucket
  (`fused_gemv_config`, benchmarks/tune.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import InputError
from ..formats.dfloat11 import STREAM_BLOCK_WORDS as _STREAM_BLOCK_WORDS
from .runtime import FP_FUSION, cdiv, next_power_of_2, num_sms
from .split_k import split_k_buffers, store_split_k, valid_split_count
from .tuning import launch_options, lookup, valid_launch_options

#: largest M the fused decode + GEMV takes; above it, decode to bf16 and use the bf16 GEMM
FUSED_MAX_M = 4
#: columns of the layer table
LAYER_FIELDS = ("words", "sign_mantissa", "segment_offsets", "decode_table", "out_offset", "segments", "k",
                "segments_per_row", "code_words", "segment")
#: weights a lane decodes per chunk: their sign|mantissa bytes are loaded first, one vector of
#: up to 16 (128 bits; a wider tile would be split between threads, its columns passed through
#: shared memory) per piece
GEMV_CHUNK = 32
DECODE_CHUNK = 32
#: the fused GEMV's chunk lengths: whole 16-byte activation vectors (8 bf16 / fp16, 4 fp32) per
#: chunk; 32: two 16-byte sign loads back to back, a whole 32-byte sector
FUSED_CHUNKS = (8, 16, 32)
#: the decoder's chunk lengths (benchmarks/bench_dfloat11.py times each), and the weights per
#: vector store of its bf16 results (16 bytes): a chunk of 16 writes a whole 32-byte sector (32:
#: two, and loads a whole sector of sign bytes)
DECODE_CHUNKS = (8, 16, 32)
DECODE_STORE = 8
#: stream words a lane fetches per load (`_load_stage`): 1, or one 16-byte vector. Not yet
#: measured on a GPU: the fused GEMV's tuner and bench_dfloat11.py's decoder rows compare them
STAGES = (1, 4)
GEMV_STAGE = DECODE_STAGE = 4
#: lanes (segments) per program of the decoder, and the fused GEMV's default rows per program
#: (`fused_gemv_config`): one per thread of 4 warps
DECODE_BLOCK = 128
GEMV_BLOCK_N = 128
#: the sign and mantissa bits of an fp32 whose top half is a bf16 (0x807F0000 as int32), a kernel
#: argument so that it sits in a register (see `_weight_bits`)
WEIGHT_FIELDS = -2139160576
#: the encoder pads every stream to whole blocks of this many words (a constexpr, for the kernels)
STREAM_BLOCK_WORDS = tl.constexpr(_STREAM_BLOCK_WORDS)
_LAYER_COLUMNS = tl.constexpr(len(LAYER_FIELDS))
#: threads one SM keeps resident (H100/H200): the fused GEMV's parallelism is its lanes
RESIDENT_LANES_PER_SM = 2048


@triton.jit
def _weight_bits(entry, byte, fields):
    """A decoded weight as fp32 bits (its bf16 in the top half), from its decode-table entry
    (symbol | length << 8, int32) and sign|mantissa byte (int32). The byte is copied to bits
    16-23 and 24-31 (one multiply) and the entry shifted so its symbol, the exponent, lands
    on bits 23-30; one LOP3 then keeps the byte's copy where `fields` (0x807F0000: the sign at
    bit 31, the mantissa at 16-22) is set and the entry elsewhere. `fields` is a run-time value
    so that it sits in a register: LOP3 takes one immediate. The entry's length bits shifted
    to 31 and above are masked off or shifted out."""
    return ((byte * 0x01010000) & fields) | ((entry << 23) & ~fields)


@triton.jit
def _column(tile, u, c: tl.constexpr):
    """Column c of the last axis of an integer tile whose last axis sits in one thread (u =
    arange of its length): the select folds to a register pick, no data moves. Integer, as
    adding a float 0 would not fold."""
    return tl.sum(tl.where(u == c, tile, 0), axis=len(tile.shape) - 1).to(tile.dtype)


@triton.jit
def _start_segment(words_ptr, code_words, position, CODE_BITS: tl.constexpr, STAGE: tl.constexpr):
    """Bit-buffer state (buf, shift, next_word, staged) of lanes starting at stream bit
    `position` (see `_take_code`, `_refill`): the two words around it, 64 - (position & 31) of
    their bits unread, and the STAGE-aligned group of words that holds the word after them,
    moved down so that that word is column 0."""
    word = position >> 5
    w0 = tl.load(words_ptr + word).to(tl.uint32, bitcast=True)
    w1 = tl.load(words_ptr + word + 1, mask=word + 1 < code_words, other=0).to(tl.uint32, bitcast=True)
    buf = (w0.to(tl.uint64) << 32) | w1.to(tl.uint64)
    next_word = word + 2
    staged = _load_stage(words_ptr, code_words, next_word, tl.full(next_word.shape, True, tl.int1),
                         tl.zeros((next_word.shape[0], STAGE), tl.int32), STAGE)
    for c in tl.static_range(1, STAGE):  # once per segment
        staged = tl.where((next_word % STAGE >= c)[:, None], _advance(staged, STAGE), staged)
    return buf, 64 - (position & 31) - CODE_BITS - 1, next_word, staged


@triton.jit
def _load_stage(words_ptr, code_words, word, load, staged, STAGE: tl.constexpr):
    """Stream words [STAGE * (word // STAGE), + STAGE) of the lanes where `load` is set, int32
    [lanes, STAGE] (each lane's in its own registers), `staged` elsewhere (and past the stream's
    end). Stage-aligned, so a stage of 4 is one 16-byte vector per lane: with lanes far apart in
    the stream, a whole vector costs the same cache-line visit as one word, and no sector is
    fetched for one word and then again for the next (the stream is padded to whole 16-word
    blocks, lowbit/formats/dfloat11.py, so the bounds mask is uniform over a vector)."""
    s = tl.arange(0, STAGE)
    first = (word // STAGE) * STAGE
    index = first[:, None] + s[None, :]
    return tl.load(words_ptr + index, mask=load[:, None] & (index < code_words), other=staged)


@triton.jit
def _advance(staged, STAGE: tl.constexpr):
    """`staged` with every column moved down one (column c takes column c + 1; the last keeps
    its own): a renaming of registers, no instructions."""
    s = tl.arange(0, STAGE)
    moved = staged
    for c in tl.static_range(STAGE - 1):
        moved = tl.where(s[None, :] == c, _column(staged, s, c + 1)[:, None], moved)
    return moved


@triton.jit
def _take_code(buf, shift, table_ptr, CODE_BITS: tl.constexpr):
    """One decode step per lane of a bit buffer -> (decode-table entry, shift).

    `buf` (uint64) holds the lane's stream bits right-aligned: its low shift + CODE_BITS + 1
    bits are unread (at least CODE_BITS + 1, see `_refill`), the bits above them spent.
    `buf >> shift` (one funnel shift) brings the next CODE_BITS bits to bits 1..CODE_BITS, which
    is the byte offset of their int16 table entry, and the code's length is taken off `shift`:
    the buffer never moves by a code (a 64-bit shift by a variable amount costs two
    instructions). Entries are symbol | length << 8 (`_weight_bits` reads the symbol)."""
    offset = ((buf >> shift.to(tl.uint64)) & (2**(CODE_BITS + 1) - 2)).to(tl.int32)
    # uint16: a zero-extending load (entries are non-negative)
    entry = tl.load((table_ptr.to(tl.pointer_type(tl.int8)) + offset).to(tl.pointer_type(tl.int16)))
    entry = entry.to(tl.uint16, bitcast=True).to(tl.int32)
    return entry, shift - (entry >> 8)


@triton.jit
def _refill(buf, shift, next_word, staged, words_ptr, code_words, CODE_BITS: tl.constexpr, STAGE: tl.constexpr):
    """Once 32 or fewer bits of `buf` are unread (all in its low word), move them up a word and
    put stream word `next_word` below them -> (buf, shift, next_word, staged). The word is
    already in registers, column 0 of `staged` (the rest of its STAGE-aligned group after it),
    which then moves down a column. Either way more than 32 bits are then unread, enough for
    the `32 // CODE_BITS` steps of `_take_code` until the next check (each needs CODE_BITS + 1),
    so a lane checks once per that many steps. A lane that has used its group's last word loads
    the next group right away: the load's latency passes while the buffer's bits decode,
    instead of stalling the step that needs them. Loads are bounds-masked: a lane may decode on
    past its segment's last code (it then moves in stale words or later segments' codes,
    decodes garbage that is never used, and its shift stays in range)."""
    refill = shift <= 32 - CODE_BITS - 1
    fresh = _column(staged, tl.arange(0, STAGE), 0)
    buf = tl.where(refill, (buf << 32) | fresh.to(tl.uint32, bitcast=True).to(tl.uint64), buf)
    next_word = next_word + refill.to(tl.int32)
    staged = tl.where(refill[:, None], _advance(staged, STAGE), staged)
    staged = _load_stage(words_ptr, code_words, next_word, refill & (next_word % STAGE == 0), staged, STAGE)
    return buf, shift + tl.where(refill, 32, 0), next_word, staged


@triton.jit
def _decode_step(buf, shift, next_word, staged, sign_mantissa, u, words_ptr, code_words, table_ptr, fields,
                 C: tl.constexpr, CODE_BITS: tl.constexpr, STAGE: tl.constexpr):
    """Step C of a piece of weights per lane (their sign|mantissa bytes [lanes, PIECE], u =
    arange(PIECE)): a refill check every 32 // CODE_BITS steps (`_refill`), then one code
    (`_take_code`) -> (weight C as fp32 bits (`_weight_bits`), buf, shift, next_word, staged)."""
    if C % (32 // CODE_BITS) == 0:
        buf, shift, next_word, staged = _refill(buf, shift, next_word, staged, words_ptr, code_words, CODE_BITS,
                                                STAGE)
    entry, shift = _take_code(buf, shift, table_ptr, CODE_BITS)
    return _weight_bits(entry, _column(sign_mantissa, u, C), fields), buf, shift, next_word, staged


@triton.jit
def _decode_kernel(layers_ptr, out_ptr, fields, CODE_BITS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                   STORE: tl.constexpr, STAGE: tl.constexpr, ALIGNED: tl.constexpr):
    """Program (i, l) decodes segments i*BLOCK.. of layer l (a row of LAYER_FIELDS, its segment
    length among them: a block's layers may have different ones), one per lane, fetching STAGE
    stream words at a time (`_load_stage`). ALIGNED: every layer's K, segment, output
    offset and sign_mantissa address are multiples of CHUNK, so each lane's CHUNK sign bytes are
    one vector load and its weights whole vector stores of STORE, and every stream starts on 16
    bytes and is padded to whole blocks of STREAM_BLOCK_WORDS, so a stage of words is one vector
    load with one bounds check."""
    layer = layers_ptr + tl.program_id(1) * _LAYER_COLUMNS
    words_ptr = tl.load(layer + 0).to(tl.pointer_type(tl.int32))
    sign_ptr = tl.load(layer + 1).to(tl.pointer_type(tl.uint8))
    offsets_ptr = tl.load(layer + 2).to(tl.pointer_type(tl.int32))
    table_ptr = tl.load(layer + 3).to(tl.pointer_type(tl.int16))
    out_offset = tl.load(layer + 4)
    n_segments = tl.load(layer + 5)
    k = tl.load(layer + 6)
    segments_per_row = tl.load(layer + 7)
    code_words = tl.load(layer + 8).to(tl.int32)  # < 2^26 (stream positions are int32 bits)
    segment = tl.load(layer + 9)
    if ALIGNED:
        sign_ptr = tl.multiple_of(sign_ptr, CHUNK)
        k = tl.multiple_of(k, CHUNK)
        out_offset = tl.multiple_of(out_offset, CHUNK)
        segment = tl.multiple_of(segment, CHUNK)
        code_words = tl.multiple_of(code_words, STREAM_BLOCK_WORDS)
        words_ptr = tl.multiple_of(words_ptr, 16)  # bytes: a stage of 4 words is one vector

    # The grid fits the layer with the most segments; a program wholly past this layer's does
    # nothing (its lanes would all decode the last segment again, unstored: in a Llama block
    # nearly half the programs, each as long as a working one).
    if tl.program_id(0) * BLOCK < n_segments:
        seg = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        active = seg < n_segments
        lane_seg = tl.minimum(seg, n_segments - 1)  # idle lanes decode the last segment, unstored
        col0 = (lane_seg % segments_per_row) * segment
        first = (lane_seg // segments_per_row) * k + col0  # within the layer
        count = tl.minimum(k - col0, segment)
        buf, shift, next_word, staged = _start_segment(words_ptr, code_words, tl.load(offsets_ptr + lane_seg),
                                                       CODE_BITS, STAGE)
        PIECE: tl.constexpr = 16 if CHUNK > 16 else CHUNK
        p = tl.arange(0, STORE)
        for i in range(0, segment, CHUNK):
            # The chunk's sign|mantissa bytes first, one 16-byte vector per piece, back to back.
            u = i + tl.arange(0, PIECE)
            first_piece = _sign_piece(sign_ptr + first, u, _kept(active, count, i, u, ALIGNED))
            if CHUNK > PIECE:
                second_piece = _sign_piece(sign_ptr + first, u + PIECE, _kept(active, count, i, u + PIECE, ALIGNED))
            # Stored STORE weights (16 bytes) at a time: a wider tile would be split between
            # threads and pass through shared memory, a barrier per chunk. A chunk's stores
            # leave back to back, so its sectors are written whole before the L2 can evict them.
            for h in tl.static_range(CHUNK // STORE):
                if h * STORE < PIECE:
                    sign_mantissa = first_piece
                else:
                    sign_mantissa = second_piece
                bits = tl.zeros((BLOCK, STORE), dtype=tl.int32)
                for c in tl.static_range(STORE):
                    # Lanes past their segment's last code decode on and are not stored.
                    weight, buf, shift, next_word, staged = _decode_step(
                        buf, shift, next_word, staged, sign_mantissa, tl.arange(0, PIECE), words_ptr, code_words,
                        table_ptr, fields, (h * STORE) % PIECE + c, CODE_BITS, STAGE)
                    bits = tl.where(p[None, :] == c, (weight >> 16)[:, None], bits)  # bf16: the top half
                columns = i + h * STORE + p
                tl.store(out_ptr + out_offset + first[:, None] + columns[None, :], bits.to(tl.int16),
                         mask=_kept(active, count, i, columns, ALIGNED))


@triton.jit
def _kept(active, count, chunk, columns, ALIGNED: tl.constexpr):
    """The decoder's mask [lanes, len(columns)] of the weights it loads or stores: columns (of
    the chunk starting at column `chunk`) within each active lane's segment of `count` weights.
    ALIGNED: count is a multiple of the chunk, so a lane keeps all of a chunk or none, and the
    mask is uniform over a lane's vector."""
    if ALIGNED:
        keep = (active & (chunk < count))[:, None]
    else:
        keep = active[:, None] & (columns[None, :] < count[:, None])
    return keep


@triton.jit
def _gemv_chunk(acc, buf, shift, next_word, staged, x_ptr, stride_xm, x_rows, col, left, sign_ptrs, words_ptr,
                code_words, table_ptr, fields, CODE_BITS: tl.constexpr, CHUNK: tl.constexpr, STAGE: tl.constexpr,
                TAIL: tl.constexpr):
    """Decode CHUNK weights per lane (columns col.. of each row) and add their products with x
    into acc [BLOCK_M, BLOCK_N]. TAIL: only the first `left` columns are weights. The chunk's
    sign|mantissa bytes are loaded first, one 16-byte vector per piece of 16 (a wider tile would
    be split between threads): a chunk of 32 asks for a whole 32-byte sector at once."""
    PIECE: tl.constexpr = 16 if CHUNK > 16 else CHUNK
    u = tl.arange(0, PIECE)
    first = _sign_piece(sign_ptrs, u, (u < left)[None, :] if TAIL else None)
    if CHUNK > PIECE:
        second = _sign_piece(sign_ptrs, u + PIECE, (u + PIECE < left)[None, :] if TAIL else None)
    acc, buf, shift, next_word, staged = _gemv_piece(acc, buf, shift, next_word, staged, x_ptr, stride_xm, x_rows,
                                                     col, left, first, sign_ptrs, words_ptr, code_words, table_ptr,
                                                     fields, CODE_BITS, PIECE, STAGE, TAIL)
    if CHUNK > PIECE:
        acc, buf, shift, next_word, staged = _gemv_piece(acc, buf, shift, next_word, staged, x_ptr, stride_xm, x_rows,
                                                         col + PIECE, left - PIECE, second, sign_ptrs, words_ptr,
                                                         code_words, table_ptr, fields, CODE_BITS, PIECE, STAGE, TAIL)
    return acc, buf, shift, next_word, staged


@triton.jit
def _sign_piece(row_ptrs, columns, mask):
    """Sign|mantissa bytes at `columns` (a piece of up to 16) from each lane's row_ptrs [lanes],
    int32 [lanes, len(columns)]: one vector load per lane, not a byte load per weight; zeros where
    `mask` is off (None: no mask). Both kernels load a chunk's pieces back to back."""
    return tl.load(row_ptrs[:, None] + columns[None, :], mask=mask, other=None if mask is None else 0).to(tl.int32)


@triton.jit
def _gemv_piece(acc, buf, shift, next_word, staged, x_ptr, stride_xm, x_rows, col, left, sign_mantissa, lanes_like,
                words_ptr, code_words, table_ptr, fields, CODE_BITS: tl.constexpr, PIECE: tl.constexpr,
                STAGE: tl.constexpr, TAIL: tl.constexpr):
    """Decode PIECE weights per lane (columns col.., their sign|mantissa bytes [lanes, PIECE]) and
    add their products with x into acc (see `_gemv_chunk`)."""
    u = tl.arange(0, PIECE)
    VECTOR: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth  # activations per 16 bytes
    v = tl.arange(0, VECTOR)
    for c in tl.static_range(PIECE):
        weight, buf, shift, next_word, staged = _decode_step(buf, shift, next_word, staged, sign_mantissa, u,
                                                               words_ptr, code_words, table_ptr, fields, c, CODE_BITS,
                                                               STAGE)
        w = weight.to(tl.float32, bitcast=True)
        if TAIL:
            acc = _add_tail_product(acc, w, x_ptr, stride_xm, x_rows, col, left, c)
        else:
            if c % VECTOR == 0:
                x_bits = _activation_vector(x_ptr, stride_xm, x_rows, col + c, lanes_like, v)
            x = _column(x_bits, v, c % VECTOR).to(x_ptr.dtype.element_ty, bitcast=True)
            acc = acc + x.to(tl.float32) * w[None, :]
    return acc, buf, shift, next_word, staged


@triton.jit
def _activation_vector(x_ptr, stride_xm, x_rows, col, lanes_like, v):
    """x[x_rows, col + v] as integer bits [BLOCK_M, lanes, VECTOR] (v = arange(VECTOR), 16 bytes):
    every lane loads the same vector, one broadcast request per VECTOR columns instead of one per
    column, and holds all of it, so a column is a register pick (`_column`). x_rows are in bounds
    (clamped): no mask."""
    lanes = tl.zeros(lanes_like.shape, tl.int32)
    x = tl.load(x_ptr + x_rows[:, None, None] * stride_xm + col + lanes[None, :, None] + v[None, None, :])
    return x.to(tl.int16 if x.dtype.primitive_bitwidth == 16 else tl.int32, bitcast=True)


@triton.jit
def _add_tail_product(acc, w, x_ptr, stride_xm, x_rows, col, left, C: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x[x_rows, col + C] * w [BLOCK_N] (the lanes' weights at column col
    + C) in a segment's last, partial chunk: columns from `left` on are past the segment (weights
    garbage, possibly Inf/NaN; no x to load)."""
    w = tl.where(C < left, w, 0.0)
    x = tl.load(x_ptr + x_rows * stride_xm + col + C, mask=tl.full(x_rows.shape, C, tl.int32) < left, other=0.0)
    return acc + x.to(tl.float32)[:, None] * w[None, :]


@triton.jit
def _segment_dot(acc, seg, lane_rows, x_ptr, stride_xm, x_rows, K, words_ptr, sign_ptr, offsets_ptr, table_ptr,
                 segments_per_row, code_words, fields, SEGMENT: tl.constexpr, CODE_BITS: tl.constexpr,
                 CHUNK: tl.constexpr, STAGE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x[:, segment seg] @ (segment seg of rows lane_rows, decoded)^T."""
    buf, shift, next_word, staged = _start_segment(
        words_ptr, code_words, tl.load(offsets_ptr + lane_rows * segments_per_row + seg), CODE_BITS, STAGE)
    col0 = seg * SEGMENT
    count = tl.minimum(K - col0, SEGMENT)
    sign_ptrs = sign_ptr + lane_rows * K + col0
    full = count // CHUNK * CHUNK
    for i in range(0, full, CHUNK):
        acc, buf, shift, next_word, staged = _gemv_chunk(acc, buf, shift, next_word, staged, x_ptr, stride_xm, x_rows,
                                                           col0 + i, CHUNK, sign_ptrs + i, words_ptr, code_words,
                                                           table_ptr, fields, CODE_BITS, CHUNK, STAGE, False)
    if full < count:  # the last segment of a row, when K is not a multiple of CHUNK
        acc, buf, shift, next_word, staged = _gemv_chunk(acc, buf, shift, next_word, staged, x_ptr, stride_xm, x_rows,
                                                           col0 + full, count - full, sign_ptrs + full, words_ptr,
                                                           code_words, table_ptr, fields, CODE_BITS, CHUNK, STAGE, True)
    return acc


@triton.jit
def _decode_gemv_kernel(x_ptr, words_ptr, sign_ptr, offsets_ptr, table_ptr, bias_ptr, out_ptr, ws_ptr, counters_ptr,
                        M, N, K, segments_per_row, code_words, stride_xm, segments_per_split, fields,
                        SEGMENT: tl.constexpr, CODE_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, STAGE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    x_rows = tl.minimum(m, M - 1)  # rows of x past M read row M-1 and are not stored
    # Lanes past the last row decode row N-1 (in bounds, finite) and are masked at the store only.
    lane_rows = tl.minimum(rows, N - 1).to(tl.int64)
    first = tl.program_id(1) * segments_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for seg in range(first, tl.minimum(first + segments_per_split, segments_per_row)):
        acc = _segment_dot(acc, seg, lane_rows, x_ptr, stride_xm, x_rows, K, words_ptr, sign_ptr, offsets_ptr,
                           table_ptr, segments_per_row, code_words, fields, SEGMENT, CODE_BITS, CHUNK, STAGE)
    if HAS_BIAS:
        if tl.program_id(1) == 0:  # the bias goes into exactly one partial sum
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    store_split_k(acc, out_ptr, ws_ptr, counters_ptr, m, rows, M, N, N, SPLIT)


def _check_fields(words, sign_mantissa, segment_offsets, decode_table, segment, code_bits) -> tuple[int, int]:
    """InputError unless the fields fit together (the table is indexed by code_bits stream bits);
    returns (N, K)."""
    if sign_mantissa.dim() != 2 or sign_mantissa.dtype != torch.uint8:
        raise InputError(f"sign_mantissa must be uint8 [N, K], got {sign_mantissa.dtype} {tuple(sign_mantissa.shape)}")
    n, k = sign_mantissa.shape
    if segment_offsets.shape != (n, -(-k // segment)) or segment_offsets.dtype != torch.int32:
        raise InputError(f"segment_offsets must be int32 [{n}, {-(-k // segment)}], got "
                         f"{segment_offsets.dtype} {tuple(segment_offsets.shape)}")
    if words.dim() != 1 or words.dtype != torch.int32 or decode_table.dtype != torch.int16:
        raise InputError("exponent_code must be int32 [W] and decode_table int16")
    if decode_table.shape != (2**code_bits,):
        raise InputError(f"decode_table must have 2^code_bits = {2**code_bits} entries, got "
                         f"{tuple(decode_table.shape)}")
    for t in (words, sign_mantissa, segment_offsets, decode_table):
        if not t.is_contiguous():
            raise InputError("dfloat11 fields must be contiguous")
    return n, k


def layer_row(words, sign_mantissa, segment_offsets, decode_table, out_offset: int, segment: int,
              code_bits: int) -> tuple[int, ...]:
    """One row of the layer table (LAYER_FIELDS) for `_decode_kernel`: the field addresses,
    where the layer's [N, K] weight starts in the output (elements), and the sizes."""
    _, k = _check_fields(words, sign_mantissa, segment_offsets, decode_table, segment, code_bits)
    return (words.data_ptr(), sign_mantissa.data_ptr(), segment_offsets.data_ptr(), decode_table.data_ptr(),
            out_offset, segment_offsets.numel(), k, segment_offsets.shape[1], words.numel(), segment)


@functools.lru_cache(maxsize=4096)
def _layer_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    # Rows hold only addresses and sizes, so equal rows are an equal table: each distinct table
    # is copied to the device once, not on every call.
    return torch.tensor(rows, dtype=torch.int64, device=device)


def decode_layers(rows: list[tuple[int, ...]], out: torch.Tensor, code_bits: int, *, chunk: int = DECODE_CHUNK,
                  stage: int = DECODE_STAGE) -> None:
    """Decode the layers `rows` (from `layer_row`, all with this `code_bits`, each with its own
    segment length) into the contiguous bf16 tensor `out` in one launch. chunk (DECODE_CHUNKS)
    and stage (STAGES): the kernel's sign bytes per chunk and stream words per load, for
    benchmarks to compare."""
    for row in rows:
        n = row[5] // row[7]
        if row[4] < 0 or row[4] + n * row[6] > out.numel():
            raise InputError(f"a {n}x{row[6]} weight at element {row[4]} does not fit an output of {out.numel()}")
    if out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise InputError("the output must be a contiguous bf16 tensor")
    if chunk not in DECODE_CHUNKS or stage not in STAGES:
        raise InputError(f"chunk must be one of {DECODE_CHUNKS} and stage one of {STAGES}, got {chunk}, {stage}")
    grid = (cdiv(max(row[5] for row in rows), DECODE_BLOCK), len(rows))
    aligned = all(row[0] % 16 == 0 and row[1] % chunk == 0 and row[4] % chunk == 0 and row[6] % chunk == 0
                  and row[8] % _STREAM_BLOCK_WORDS == 0 and row[9] % chunk == 0 for row in rows)
    _decode_kernel[grid](_layer_table(tuple(rows), out.device), out.view(torch.int16), WEIGHT_FIELDS,
                         CODE_BITS=code_bits, BLOCK=DECODE_BLOCK, CHUNK=chunk, STORE=DECODE_STORE, STAGE=stage,
                         ALIGNED=aligned, **FP_FUSION)


def decode_weight(words, sign_mantissa, segment_offsets, decode_table, *, segment: int, code_bits: int,
                  chunk: int = DECODE_CHUNK, stage: int = DECODE_STAGE) -> torch.Tensor:
    """One dfloat11 weight -> bf16 [N, K] (a fresh tensor); chunk, stage: see `decode_layers`."""
    out = torch.empty(sign_mantissa.shape, dtype=torch.bfloat16, device=sign_mantissa.device)
    decode_layers([layer_row(words, sign_mantissa, segment_offsets, decode_table, 0, segment, code_bits)], out,
                  code_bits, chunk=chunk, stage=stage)
    return out


def dfloat11_matmul(x, words, sign_mantissa, segment_offsets, decode_table, bias, *, segment: int,
                    code_bits: int) -> torch.Tensor:
    """[M, K] x times a dfloat11 weight -> [M, N] in x.dtype: fused decode + GEMV for
    M <= FUSED_MAX_M, otherwise decode to bf16 and F.linear."""
    n, k = _check_fields(words, sign_mantissa, segment_offsets, decode_table, segment, code_bits)
    if x.dim() != 2 or x.shape[1] != k:
        raise InputError(f"expected x of shape [M, {k}], got {tuple(x.shape)}")
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    if m > FUSED_MAX_M:
        weight = decode_weight(words, sign_mantissa, segment_offsets, decode_table, segment=segment,
                               code_bits=code_bits)
        return F.linear(x, weight.to(x.dtype), bias)
    x = x.contiguous()
    segments = segment_offsets.shape[1]
    cfg = fused_gemv_config(x, n, k, segments, segment)
    n_tiles = cdiv(n, cfg["BLOCK_N"])
    out, workspace, tickets, per_split, splits = split_k_buffers(x, n, segments, cfg["SPLIT_K"], n_tiles)
    _decode_gemv_kernel[(n_tiles, splits)](x, words, sign_mantissa, segment_offsets, decode_table,
                                           bias if bias is not None else x, out, workspace, tickets,
                                           m, n, k, segments, words.numel(), x.stride(0), per_split, WEIGHT_FIELDS,
                                           SEGMENT=segment, CODE_BITS=code_bits, HAS_BIAS=bias is not None,
                                           SPLIT=splits > 1, BLOCK_M=next_power_of_2(m), BLOCK_N=cfg["BLOCK_N"],
                                           CHUNK=cfg["CHUNK"], STAGE=cfg["STAGE"], **launch_options(cfg))
    return out


def fused_gemv_config(x: torch.Tensor, n: int, k: int, segments: int, segment: int) -> dict:
    """The fused decode + GEMV's launch config for x [M, K] times an [N, K] weight of `segments`
    segments per row: this GPU's tuned entry for the variant, shape and M bucket
    (benchmarks/tune.py, lowbit/kernels/tuning.py) when `valid_fused_config`, else the defaults:
    GEMV_BLOCK_N lanes (rows) per program on 4 warps, GEMV_CHUNK, GEMV_STAGE, and one segment column per
    program while the lanes fit on the GPU at once, so that the most decode chains run side by
    side; beyond that, programs walk several segments each."""
    tuned = lookup(x.device, f"dfloat11-s{segment}-{x.dtype}", n, k, x.shape[0])
    if tuned is not None and valid_fused_config(tuned):
        return tuned
    lanes = cdiv(n, GEMV_BLOCK_N) * GEMV_BLOCK_N * segments
    per_split = max(1, lanes // (RESIDENT_LANES_PER_SM * num_sms(x.device)))
    return {"path": "fused", "BLOCK_N": GEMV_BLOCK_N, "CHUNK": GEMV_CHUNK, "STAGE": GEMV_STAGE,
            "SPLIT_K": cdiv(segments, per_split), "num_warps": 4}


def valid_fused_config(cfg: dict) -> bool:
    """A fused-GEMV config the launcher can take: path "fused"; BLOCK_N a power of two up to 1024
    with a lane for every thread (BLOCK_N >= 32 * num_warps); CHUNK one of FUSED_CHUNKS; STAGE
    one of STAGES; SPLIT_K a positive count; valid launch options. A stale or hand-edited table
    must not break a launch."""
    block_n, chunk, stage = cfg.get("BLOCK_N"), cfg.get("CHUNK"), cfg.get("STAGE")
    return (cfg.get("path") == "fused" and type(block_n) is int and 32 <= block_n <= 1024
            and not block_n & (block_n - 1) and type(chunk) is int and chunk in FUSED_CHUNKS
            and type(stage) is int and stage in STAGES
            and valid_split_count(cfg.get("SPLIT_K")) and valid_launch_options(cfg)
            and block_n >= 32 * cfg.get("num_warps", 4))
