"""DFloat11: lossless BF16 with entropy-coded exponents (the torch spec; DESIGN.md section 4).

A bf16 value is sign(1) | exponent(8) | mantissa(7). The exponent byte `(w >> 7) & 0xFF` of a
trained weight carries ~2.6 bits of information, so it is Huffman-coded; the byte
`sign << 7 | mantissa` is stored raw. Decoding restores every one of the 65,536 bf16 bit
patterns exactly (NaN payloads, +-Inf, subnormals and -0 included).

Layout (one code per tensor):
- The exponents of the row-major [N, K] weight form one bit stream (huffman.py bit order),
  coded with a canonical Huffman code of at most CODE_BITS bits per symbol.
- Each row is cut into segments of `segment` weights (the last one of a row may be shorter);
  `segment_offsets[n, j]` is the stream bit where segment j of row n starts. Segments decode
  independently: a kernel gives each lane one segment, and every lane runs the same number
  of steps, with no prefix sums and no per-thread output positions. (The `dfloat11` package
  stores 5-bit per-thread gaps plus per-block output positions; its checkpoints are imported
  by lowbit/integrations/dfloat11_import.py.)
- `decode_table[peek]`, indexed by the next CODE_BITS stream bits, holds the symbol and code
  length (symbol | length << 8): one on-chip lookup per weight.

Packed fields: exponent_code int32 [code_words] (the stream, then zero words up to a multiple of
STREAM_BLOCK_WORDS, at least one: a decoder may always read the word after the current one, and
a kernel may load aligned 16-byte groups of words with one bounds check per group; streams
written before that padding, with one zero word, decode the same), sign_mantissa uint8 [N, K], segment_offsets
int32 [N, ceil(K/segment)], decode_table int16 [2^CODE_BITS].
Attrs: segment (weights per segment), code_words.
Options: segment (default: `default_segment`, 256 but shorter for large weights with few rows
of segments), cast (False: any dtype but bf16 is a WeightError; True: fp16 / fp32 weights are
rounded to bf16 first, which is lossy, so it must be asked for).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..errors import FormatError, WeightError
from ..packed import PackedWeight
from . import huffman, register_format
from .base import FieldSpec, Format, launch

#: longest code, and the index width of decode_table (2^8 int16 entries = 512 B per tensor). A
#: lookup is a gather by 32 lanes at once: over 512 B it touches at most 4 cache lines (over the
#: 2 KiB of 10-bit codes, about 14), and the kernels check their bit buffers every 32 // 8 = 4
#: codes instead of every 3. The longer codes cost ~0.04 bits per weight (MiniLM's Linear
#: weights: 2.672 -> 2.715 bits per exponent), about what the smaller table saves on small
#: tensors (README: sizes)
CODE_BITS = 8
DEFAULT_SEGMENT = 256
SEGMENTS = (64, 128, 256, 512, 1024)
#: `default_segment`: weights from this size on get segments short enough for this many lanes
LATENCY_MIN_WEIGHTS = 2**22
MIN_LANES = 2**17
#: the stream is zero-padded to a multiple of this many words (see the module docstring)
STREAM_BLOCK_WORDS = 16
#: stream positions are int32 bit offsets, the padding included
MAX_STREAM_BITS = 2**31 - 32 * (STREAM_BLOCK_WORDS + 1)


def join_bf16(exponent: torch.Tensor, sign_mantissa: torch.Tensor) -> torch.Tensor:
    """Int exponent bytes (w >> 7) & 0xFF + uint8 sign|mantissa bytes -> bf16 (same shape)."""
    sm = sign_mantissa.to(torch.int32)
    bits = ((sm & 0x80) << 8) | (exponent.to(torch.int32) << 7) | (sm & 0x7F)
    return (bits - ((bits >> 15) << 16)).to(torch.int16).view(torch.bfloat16)


def segments_per_row(k: int, segment: int) -> int:
    return -(-k // segment)


def default_segment(n: int, k: int) -> int:
    """The segment length of an [n, K] weight quantized without one: DEFAULT_SEGMENT (256), or
    for weights of LATENCY_MIN_WEIGHTS (4 M) or more the longest of 128 and 64 giving at least
    MIN_LANES (128 K) segments (64 if neither does). Each segment is one lane's serial chain of
    decode steps, so a weight with few segments leaves the GPU idle: at M=1 on the H100
    (2026-11-25) Llama-3-8B's k_proj (1024 x 4096: 16 K segments of 256) took 29.4 us, 3.7x
    bf16's time, against 2.8x at gate_proj's 229 K segments. Shorter segments cost 32 offset bits
    each: Llama-3-8B gets 128 for q/o_proj and 64 for k/v_proj, ~0.03 bits per weight over a
    block; smaller models keep 256 (their GEMVs are too short for the chain to matter)."""
    if n * k < LATENCY_MIN_WEIGHTS:
        return DEFAULT_SEGMENT
    return next((segment for segment in (DEFAULT_SEGMENT, 128) if n * segments_per_row(k, segment) >= MIN_LANES), 64)


#: rows are encoded in chunks of about this many weights, one thread per chunk: each chunk's
#: arrays stay in cache across the passes, and numpy releases the GIL inside them
CHUNK_WEIGHTS = 1 << 18


def _exponent_pairs(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bf16 [R, K] -> (uint16 [ceil(RK/2)] pairs e[2i] | e[2i+1] << 8 of exponent bytes, the
    last one padded with a repeat of the final exponent; uint8 [RK] sign|mantissa bytes;
    int64 [256] exponent histogram)."""
    bits = rows.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    count = bits.size
    exponent = np.empty(count + count % 2, dtype=np.uint8)
    exponent[:count] = bits >> np.uint16(7)  # the cast to uint8 drops the sign bit
    exponent[count:] = exponent[count - 1]
    sign_and_mantissa = bits & np.uint16(0x807F)
    sign_mantissa = (sign_and_mantissa | (sign_and_mantissa >> np.uint16(8))).astype(np.uint8)
    pair_counts = np.bincount(exponent.view(np.uint16), minlength=65536).reshape(256, 256)  # [second, first]
    histogram = pair_counts.sum(axis=0) + pair_counts.sum(axis=1)
    histogram[exponent[-1]] -= count % 2  # the padding repeat is not a weight
    return exponent.view(np.uint16), sign_mantissa, histogram


class _PairCode:
    """A canonical code of exponent bytes, tabulated for pairs of weights: a 65,536-entry table
    gives the joint code and length of two exponents, so the cumulative sum and the bit packer
    touch half as many items."""

    def __init__(self, histogram: np.ndarray):
        self.lengths = huffman.limited_code_lengths(torch.from_numpy(histogram), CODE_BITS).numpy()
        codes = huffman.canonical_codes(torch.from_numpy(self.lengths)).numpy()
        first, second = np.meshgrid(np.arange(256), np.arange(256))  # pair index = first | second << 8
        joint_lengths = (self.lengths[first] + self.lengths[second]).reshape(-1)
        joint_codes = ((codes[first] << self.lengths[second]) | codes[second]).reshape(-1)
        self.pair_lengths = joint_lengths.astype(np.uint8)
        self.aligned = (joint_codes.astype(np.uint64) << (64 - joint_lengths).astype(np.uint64)) * (joint_lengths > 0)

    def pack(self, pairs: np.ndarray, count: int, k: int, segment: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Encode `count` weights (whole rows of length k) -> (int32 words, int64 [rows, J] bit
        offsets of the segments, code bits)."""
        lengths = self.pair_lengths[pairs]
        ends = np.cumsum(lengths, dtype=np.uint64)
        bits = int(ends[-1]) - (int(self.lengths[pairs[-1] >> 8]) if count % 2 else 0)
        starts = ends - lengths
        words = huffman.pack_codes(self.aligned[pairs], starts, -(-bits // 32))
        if bits % 32:  # clear the padding code's bits after the last weight
            words[-1] &= np.int32(-(1 << (32 - bits % 32)))
        # A segment's first weight: the start of its pair, plus the first code when it is odd.
        first = (np.arange(count // k)[:, None] * k + np.arange(0, k, segment)[None, :])
        offsets = starts[first // 2].astype(np.int64) + (first % 2) * self.lengths[pairs[first // 2] & 0xFF]
        return words, offsets, bits


def encode(weight: torch.Tensor, segment: int, name: str = "weight") -> tuple[dict[str, torch.Tensor], int]:
    """bf16 [N, K] -> (packed fields, code_words). Vectorized (a few array passes per chunk of
    rows) and multi-threaded; each chunk's code starts on a word boundary."""
    n, k = weight.shape
    rows = weight.detach().cpu()
    step = max(1, CHUNK_WEIGHTS // k)
    chunks = [rows[r: r + step] for r in range(0, n, step)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        split = list(pool.map(_exponent_pairs, chunks))
        code = _PairCode(sum(histogram for _, _, histogram in split))
        packed = list(pool.map(lambda c, s: code.pack(s[0], c.numel(), k, segment), chunks, split))
    word_base = np.cumsum([0] + [words.size for words, _, _ in packed])
    total_bits = 32 * int(word_base[-2]) + packed[-1][2]
    if total_bits > MAX_STREAM_BITS:
        raise WeightError(f"{name}: {n}x{k} weight needs {total_bits} code bits, more than the "
                          f"{MAX_STREAM_BITS} a dfloat11 stream addresses; split the tensor")
    used = int(word_base[-1])
    padding = STREAM_BLOCK_WORDS - used % STREAM_BLOCK_WORDS  # at least one zero word: decoders read two at a time
    stream = np.concatenate([words for words, _, _ in packed] + [np.zeros(padding, np.int32)])
    offsets = np.concatenate([off + 32 * int(base) for (_, off, _), base in zip(packed, word_base)])
    tensors = {
        "exponent_code": torch.from_numpy(stream),
        "sign_mantissa": torch.from_numpy(np.concatenate([sm for _, sm, _ in split]).reshape(n, k)),
        "segment_offsets": torch.from_numpy(offsets.astype(np.int32)),
        "decode_table": huffman.decode_table(torch.from_numpy(code.lengths), CODE_BITS),
    }
    return {key: t.to(weight.device) for key, t in tensors.items()}, stream.size


def decode(sign_mantissa: torch.Tensor, exponent_code: torch.Tensor, segment_offsets: torch.Tensor,
           decode_table: torch.Tensor, segment: int, code_bits: int = CODE_BITS) -> torch.Tensor:
    """The reference decoder: a dfloat11 weight's fields -> bf16 [N, K], bit-exact (reached
    through the op `lowbit::dfloat11_decode`, backend "torch").

    Vectorized over segments: step i decodes weight i of every segment at once (the same
    schedule the Triton kernel runs, one lane per segment)."""
    n, k = sign_mantissa.shape
    words = exponent_code.to(torch.int64) & 0xFFFFFFFF
    table = decode_table.to(torch.int64)
    last_word = words.numel() - 1
    position = segment_offsets.flatten().to(torch.int64)
    exponent = torch.empty((position.numel(), segment), dtype=torch.int64, device=words.device)
    for i in range(segment):
        word = position >> 5
        window = (words[word.clamp(max=last_word)] << 32) | words[(word + 1).clamp(max=last_word)]
        entry = table[(window >> (64 - code_bits - (position & 31))) & (2**code_bits - 1)]
        exponent[:, i] = entry & 0xFF
        position = position + (entry >> 8)
    exponent = exponent.reshape(n, -1)[:, :k]
    return join_bf16(exponent, sign_mantissa)


def check_stream(packed: PackedWeight) -> None:
    """FormatError unless every code length in decode_table is at most CODE_BITS, every segment starts
    inside the stream and none decodes past its end (the fields of a file are not trusted: the
    kernels read a segment's first stream words unmasked, so this keeps them in bounds, and a
    segment decoding past the end would give wrong weights, not an error). Only segments
    starting within CODE_BITS * segment bits of the end can run past it, so only those (a few
    per tensor) are decoded: about 0.5 ms for a 4096 x 4096 weight."""
    k = packed.shape[1]
    segment = packed.attrs["segment"]
    entries = packed.decode_table.cpu().to(torch.int64) & 0xFFFF
    lengths = entries >> 8
    bad = torch.nonzero(lengths > CODE_BITS).flatten()  # 0: an entry no complete code reaches
    if bad.numel():
        raise FormatError(f"dfloat11 field 'decode_table': entry {int(bad[0])} has code length "
                          f"{int(lengths[bad[0]])}, over the {CODE_BITS}-bit limit")
    stream_bits = 32 * (packed.attrs["code_words"] - 1)
    offsets = packed.segment_offsets.cpu().to(torch.int64)
    bad = torch.nonzero((offsets < 0) | (offsets >= stream_bits))
    if bad.numel():
        row, column = bad[0].tolist()
        raise FormatError(f"dfloat11 field 'segment_offsets': segment {column} of row {row} starts at bit "
                          f"{int(offsets[row, column])}, outside the {stream_bits}-bit stream")
    near = torch.nonzero(offsets > stream_bits - CODE_BITS * segment).tolist()
    if not near:
        return
    # A few segments, each walked code by code: plain ints beat per-step tensor ops here.
    table = entries.tolist()
    first_word = min(int(offsets[row, column]) for row, column in near) >> 5
    words = (packed.exponent_code[first_word:].cpu().to(torch.int64) & 0xFFFFFFFF).tolist() + [0]
    for row, column in near:
        position = int(offsets[row, column]) - 32 * first_word
        for _ in range(min(k - column * segment, segment)):
            word = position >> 5
            window = (words[word] << 32 | words[word + 1]) >> (64 - CODE_BITS - (position & 31))
            position += table[window & (2**CODE_BITS - 1)] >> 8
            if position > stream_bits - 32 * first_word:
                raise FormatError(f"dfloat11 field 'exponent_code': segment {column} of row {row} decodes past "
                                  f"the end of the {stream_bits}-bit stream (corrupt codes or segment_offsets)")


class DFloat11Format(Format):
    """`dfloat11`: lossless bf16, Huffman-coded exponents decoded right before the matmul."""

    name = "dfloat11"
    ATTRS = ("segment", "code_words")
    OPTIONS = ("segment", "cast")

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise FormatError(f"dfloat11: unknown option(s) {sorted(unknown)}; accepted: {list(self.OPTIONS)}")
        segment = options.get("segment", DEFAULT_SEGMENT)
        if isinstance(segment, bool) or not isinstance(segment, int) or segment not in SEGMENTS:  # not 64.0
            raise FormatError(f"dfloat11: segment must be one of {SEGMENTS}, got {options['segment']!r}")
        if not isinstance(options.get("cast", False), bool):
            raise FormatError(f"dfloat11: cast must be a bool, got {options['cast']!r}")

    def check_weight_dtype(self, dtype: torch.dtype, options: dict[str, Any], name: str = "weight") -> None:
        if dtype != torch.bfloat16 and not (options.get("cast") and dtype in (torch.float16, torch.float32)):
            raise WeightError(f"{name}: dfloat11 is lossless for bfloat16 weights only, got {dtype}; "
                              "convert the model to bf16 first, or pass cast=True to round to bf16")

    def check_attrs(self, shape: tuple[int, int], attrs: Any) -> dict[str, Any]:
        self.check_attr_keys(attrs)
        self.check_options({"segment": attrs["segment"]})
        words = attrs["code_words"]
        most = MAX_STREAM_BITS // 32 + STREAM_BLOCK_WORDS
        if isinstance(words, bool) or not isinstance(words, int) or not 2 <= words <= most:
            raise FormatError(f"dfloat11: code_words must be an int in [2, {most}], got {words!r}")
        return attrs

    def field_specs(self, shape: tuple[int, int], attrs: dict[str, Any]) -> dict[str, FieldSpec]:
        n, k = shape
        return {
            "exponent_code": FieldSpec(torch.int32, (attrs["code_words"],)),
            "sign_mantissa": FieldSpec(torch.uint8, (n, k)),
            "segment_offsets": FieldSpec(torch.int32, (n, segments_per_row(k, attrs["segment"]))),
            "decode_table": FieldSpec(torch.int16, (2**CODE_BITS,)),
        }

    def quantize(self, weight: torch.Tensor, *, name: str = "weight", **options: Any) -> PackedWeight:
        self.check_options(options)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or 0 in weight.shape:
            raise WeightError(f"{name}: expected a non-empty 2-D [out, in] tensor, got "
                              f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if weight.device.type == "meta":
            raise WeightError(f"{name}: weight is on the meta device (no values to encode)")
        self.check_weight_dtype(weight.dtype, options, name)
        weight = weight.to(torch.bfloat16)  # a no-op for bf16; cast=True rounds fp16 / fp32
        segment = options.get("segment", default_segment(*weight.shape))
        tensors, code_words = encode(weight.detach(), segment, name)
        return PackedWeight(self.name, tuple(weight.shape), torch.bfloat16,
                            {"segment": segment, "code_words": code_words}, tensors)

    def _dequantize(self, packed: PackedWeight) -> torch.Tensor:
        return self._decode(packed, "torch")

    def check_data(self, packed: PackedWeight) -> None:
        check_stream(packed)

    def backward_weight(self, packed: PackedWeight, backend: str) -> torch.Tensor:
        return self._decode(packed, backend)  # Triton: the reference decodes step by step, slow on a GPU

    @staticmethod
    def _decode(packed: PackedWeight, backend: str) -> torch.Tensor:
        t = packed.tensors
        return launch("dfloat11_decode", t["sign_mantissa"], t["exponent_code"], t["segment_offsets"],
                      t["decode_table"], packed.attrs["segment"], CODE_BITS, backend)

    def triton_linear(self, x2d, packed, bias):
        t = packed.tensors
        return launch("dfloat11_linear", x2d, t["sign_mantissa"], t["exponent_code"], t["segment_offsets"],
                      t["decode_table"], bias, packed.attrs["segment"], CODE_BITS)


register_format(DFloat11Format())
