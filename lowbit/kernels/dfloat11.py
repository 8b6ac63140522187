"""Triton DFloat11 decoders (format: lowbit/formats/dfloat11.py).

One lane per segment of `segment` weights: a lane starts at its segment's stored bit offset
and decodes one weight per step, so every lane runs the same `segment` steps in lockstep (no
prefix sums, no divergence). A step reads the two stream words under the lane's position,
looks the next CODE_BITS bits up in the 2 KiB decode table (cache-resident), and joins the
exponent with the raw sign|mantissa byte.

- `_decode_kernel` writes bf16 weights. It takes a table of layers (addresses of each layer's
  fields and output, plus its sizes), so the Linear weights of a whole transformer block
  decode in one launch into one reused buffer (lowbit/block_decode.py).
- `_decode_gemv_kernel` fuses decoding with a GEMV for small M: the bf16 weight never
  reaches memory; each program reduces its K segments into fp32 partial sums (deterministic
  split-K, reduced inside the launch: lowbit/kernels/split_k.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import InputError
from .split_k import split_k_buffers, store_split_k

#: largest M the fused decode + GEMV takes; above it, decode to bf16 and use the bf16 GEMM
FUSED_MAX_M = 4
#: columns of the layer table
LAYER_FIELDS = ("words", "sign_mantissa", "segment_offsets", "decode_table", "out_offset", "segments", "k",
                "segments_per_row", "code_words")
DECODE_BLOCK = 64


@triton.jit
def _next_code(words_ptr, code_words, table_ptr, position, CODE_BITS: tl.constexpr):
    """Per lane: (exponent byte, code length) of the code at int64 stream bit `position`."""
    word = position >> 5
    w0 = tl.load(words_ptr + word, mask=word < code_words, other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(words_ptr + word + 1, mask=word + 1 < code_words, other=0).to(tl.uint32, bitcast=True)
    window = (w0.to(tl.uint64) << 32) | w1.to(tl.uint64)
    peek = (window >> (64 - CODE_BITS - (position & 31)).to(tl.uint64)) & ((1 << CODE_BITS) - 1)
    entry = tl.load(table_ptr + peek.to(tl.int32)).to(tl.int32)
    return entry & 0xFF, (entry >> 8) & 0xFF


@triton.jit
def _bf16_bits(symbol, sign_mantissa):
    """Exponent byte + sign|mantissa byte (int32 lanes) -> the 16 bf16 bits, in an int32."""
    return ((sign_mantissa & 0x80) << 8) | (symbol << 7) | (sign_mantissa & 0x7F)


@triton.jit
def _decode_kernel(layers_ptr, out_ptr, SEGMENT: tl.constexpr, CODE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    layer = layers_ptr + tl.program_id(1) * 9  # one row of LAYER_FIELDS
    words_ptr = tl.load(layer + 0).to(tl.pointer_type(tl.int32))
    sign_ptr = tl.load(layer + 1).to(tl.pointer_type(tl.uint8))
    offsets_ptr = tl.load(layer + 2).to(tl.pointer_type(tl.int32))
    table_ptr = tl.load(layer + 3).to(tl.pointer_type(tl.int16))
    out_offset = tl.load(layer + 4)
    n_segments = tl.load(layer + 5)
    k = tl.load(layer + 6)
    segments_per_row = tl.load(layer + 7)
    code_words = tl.load(layer + 8)

    seg = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    active = seg < n_segments
    col0 = (seg % segments_per_row) * SEGMENT
    first = (seg // segments_per_row) * k + col0  # within the layer
    count = tl.minimum(k - col0, SEGMENT)
    position = tl.load(offsets_ptr + seg, mask=active, other=0).to(tl.int64)
    for i in range(SEGMENT):
        symbol, length = _next_code(words_ptr, code_words, table_ptr, position, CODE_BITS)
        keep = active & (i < count)
        sign_mantissa = tl.load(sign_ptr + first + i, mask=keep, other=0).to(tl.int32)
        tl.store(out_ptr + out_offset + first + i, _bf16_bits(symbol, sign_mantissa).to(tl.int16), mask=keep)
        position += length


@triton.jit
def _decode_gemv_kernel(x_ptr, words_ptr, sign_ptr, offsets_ptr, table_ptr, bias_ptr, out_ptr, ws_ptr, counters_ptr,
                        M, N, K, segments_per_row, code_words, stride_xm,
                        SEGMENT: tl.constexpr, CODE_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    segs = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    m = tl.arange(0, BLOCK_M)
    lanes = (rows < N)[:, None] & (segs < segments_per_row)[None, :]  # [BLOCK_N, BLOCK_J]
    seg_index = rows.to(tl.int64)[:, None] * segments_per_row + segs[None, :]
    position = tl.load(offsets_ptr + seg_index, mask=lanes, other=0).to(tl.int64)
    col0 = segs * SEGMENT
    first = rows.to(tl.int64)[:, None] * K + col0[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_J), dtype=tl.float32)
    for i in range(SEGMENT):
        symbol, length = _next_code(words_ptr, code_words, table_ptr, position, CODE_BITS)
        col = col0 + i
        keep = lanes & (col < K)[None, :]
        sign_mantissa = tl.load(sign_ptr + first + i, mask=keep, other=0).to(tl.int32)
        w = (_bf16_bits(symbol, sign_mantissa) << 16).to(tl.float32, bitcast=True)
        w = tl.where(keep, w, 0.0)  # masked lanes decode garbage, possibly Inf/NaN
        x = tl.load(x_ptr + m[:, None] * stride_xm + col[None, :],
                    mask=(m < M)[:, None] & (col < K)[None, :], other=0.0).to(tl.float32)
        acc += w[None, :, :] * x[:, None, :]
        position += length
    partial = tl.sum(acc, axis=2)
    if HAS_BIAS:
        if tl.program_id(1) == 0:  # the bias goes into exactly one partial sum
            partial += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    store_split_k(partial, out_ptr, ws_ptr, counters_ptr, m, rows, M, N, N, SPLIT)


def _check_fields(words, sign_mantissa, segment_offsets, decode_table, segment) -> tuple[int, int]:
    """InputError unless the fields fit together; returns (N, K)."""
    if sign_mantissa.dim() != 2 or sign_mantissa.dtype != torch.uint8:
        raise InputError(f"sign_mantissa must be uint8 [N, K], got {sign_mantissa.dtype} {tuple(sign_mantissa.shape)}")
    n, k = sign_mantissa.shape
    if segment_offsets.shape != (n, -(-k // segment)) or segment_offsets.dtype != torch.int32:
        raise InputError(f"segment_offsets must be int32 [{n}, {-(-k // segment)}], got "
                         f"{segment_offsets.dtype} {tuple(segment_offsets.shape)}")
    if words.dim() != 1 or words.dtype != torch.int32 or decode_table.dtype != torch.int16:
        raise InputError("exponent_code must be int32 [W] and decode_table int16")
    for t in (words, sign_mantissa, segment_offsets, decode_table):
        if not t.is_contiguous():
            raise InputError("dfloat11 fields must be contiguous")
    return n, k


def layer_row(words, sign_mantissa, segment_offsets, decode_table, out_offset: int, segment: int) -> tuple[int, ...]:
    """One row of the layer table (LAYER_FIELDS) for `_decode_kernel`: the field addresses,
    where the layer's [N, K] weight starts in the output (elements), and the sizes."""
    _, k = _check_fields(words, sign_mantissa, segment_offsets, decode_table, segment)
    return (words.data_ptr(), sign_mantissa.data_ptr(), segment_offsets.data_ptr(), decode_table.data_ptr(),
            out_offset, segment_offsets.numel(), k, segment_offsets.shape[1], words.numel())


@functools.lru_cache(maxsize=4096)
def _layer_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    # Rows hold only addresses and sizes, so equal rows are an equal table: each distinct table
    # is copied to the device once, not on every call.
    return torch.tensor(rows, dtype=torch.int64, device=device)


def decode_layers(rows: list[tuple[int, ...]], out: torch.Tensor, segment: int, code_bits: int) -> None:
    """Decode the layers `rows` (from `layer_row`, all with this `segment`) into the contiguous
    bf16 tensor `out` in one launch."""
    for row in rows:
        n = row[5] // row[7]
        if row[4] < 0 or row[4] + n * row[6] > out.numel():
            raise InputError(f"a {n}x{row[6]} weight at element {row[4]} does not fit an output of {out.numel()}")
    if out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise InputError("the output must be a contiguous bf16 tensor")
    grid = (triton.cdiv(max(row[5] for row in rows), DECODE_BLOCK), len(rows))
    _decode_kernel[grid](_layer_table(tuple(rows), out.device), out.view(torch.int16), SEGMENT=segment,
                         CODE_BITS=code_bits, BLOCK=DECODE_BLOCK)


def decode_weight(words, sign_mantissa, segment_offsets, decode_table, *, segment: int, code_bits: int) -> torch.Tensor:
    """One dfloat11 weight -> bf16 [N, K] (a fresh tensor)."""
    out = torch.empty(sign_mantissa.shape, dtype=torch.bfloat16, device=sign_mantissa.device)
    decode_layers([layer_row(words, sign_mantissa, segment_offsets, decode_table, 0, segment)], out, segment, code_bits)
    return out


def dfloat11_matmul(x, words, sign_mantissa, segment_offsets, decode_table, bias, *, segment: int,
                    code_bits: int) -> torch.Tensor:
    """[M, K] x times a dfloat11 weight -> [M, N] in x.dtype: fused decode + GEMV for
    M <= FUSED_MAX_M, otherwise decode to bf16 and F.linear."""
    n, k = _check_fields(words, sign_mantissa, segment_offsets, decode_table, segment)
    if x.dim() != 2 or x.shape[1] != k:
        raise InputError(f"expected x of shape [M, {k}], got {tuple(x.shape)}")
    m = x.shape[0]
    if m > FUSED_MAX_M:
        weight = decode_weight(words, sign_mantissa, segment_offsets, decode_table, segment=segment,
                               code_bits=code_bits)
        return F.linear(x, weight.to(x.dtype), bias)
    x = x.contiguous()
    block_n, block_j = 16, 8
    segment_blocks = triton.cdiv(segment_offsets.shape[1], block_j)
    n_tiles = triton.cdiv(n, block_n)
    out, workspace, tickets, _, splits = split_k_buffers(x, n, segment_blocks, segment_blocks, n_tiles)
    _decode_gemv_kernel[(n_tiles, splits)](x, words, sign_mantissa, segment_offsets, decode_table,
                                           bias if bias is not None else x, out, workspace, tickets,
                                           m, n, k, segment_offsets.shape[1], words.numel(), x.stride(0),
                                           SEGMENT=segment, CODE_BITS=code_bits, HAS_BIAS=bias is not None,
                                           SPLIT=splits > 1, BLOCK_M=triton.next_power_of_2(m),
                                           BLOCK_N=block_n, BLOCK_J=block_j)
    return out
