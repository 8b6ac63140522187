"""dfloat11: the Huffman code, the bit stream, losslessness on every bf16 pattern, MiniLM."""
import copy
import heapq

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import FormatError, WeightError
from lowbit.formats import dfloat11, huffman
from lowbit.formats.dfloat11 import CODE_BITS
from lowbit.packed import PackedWeight

FMT = lowbit.get_format("dfloat11")


def all_bf16_patterns() -> torch.Tensor:
    """Every one of the 65,536 bf16 bit patterns (NaNs, +-Inf, subnormals, -0), [256, 256]."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16))


def huffman_cost(counts: list[int]) -> int:
    """Total bits of an unrestricted optimal Huffman code (independent heap construction)."""
    heap = [c for c in counts if c]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


# -- the code --------------------------------------------------------------------------------
def test_code_lengths_are_optimal_when_the_limit_does_not_bind():
    counts = torch.zeros(256, dtype=torch.int64)
    counts[[3, 7, 100, 200, 201]] = torch.tensor([50, 20, 15, 10, 5])
    lengths = huffman.limited_code_lengths(counts, 10)
    assert int((lengths * counts).sum()) == huffman_cost(counts.tolist())
    assert sorted(lengths[[3, 7, 100, 200, 201]].tolist()) == [1, 2, 3, 4, 4]


@pytest.mark.parametrize("limit", sorted({CODE_BITS, 10}))
def test_length_limit_is_respected_and_the_code_is_complete(limit):
    counts = torch.zeros(256, dtype=torch.int64)
    counts[:40] = torch.tensor([2**i for i in range(40)])  # a Fibonacci-like skew: unrestricted depth 39
    lengths = huffman.limited_code_lengths(counts, limit)
    used = lengths[:40]
    assert int(used.max()) == limit and int(used.min()) >= 1
    assert sum(2.0 ** -int(n) for n in used) == 1.0  # Kraft equality: no wasted code space
    assert int((lengths * counts).sum()) >= huffman_cost(counts.tolist())


def test_single_symbol_gets_a_one_bit_code():
    counts = torch.zeros(256, dtype=torch.int64)
    counts[120] = 99
    assert huffman.limited_code_lengths(counts, 10)[120] == 1


def test_canonical_codes_and_table():
    lengths = torch.zeros(256, dtype=torch.int64)
    lengths[[5, 9, 2, 7]] = torch.tensor([1, 2, 3, 3])
    codes = huffman.canonical_codes(lengths)
    assert codes[[5, 9, 2, 7]].tolist() == [0b0, 0b10, 0b110, 0b111]
    table = huffman.decode_table(lengths, 4)
    assert table[0b0000].item() == 5 | 1 << 8 and table[0b0111].item() == 5 | 1 << 8
    assert table[0b1011].item() == 9 | 2 << 8
    assert table[0b1100].item() == 2 | 3 << 8 and table[0b1111].item() == 7 | 3 << 8


def _naive_stream(exponents: list[int], lengths: torch.Tensor) -> tuple[list[int], list[int]]:
    """Reference bit stream built as a string of '0'/'1' (slow, obviously right)."""
    codes = huffman.canonical_codes(lengths)
    bits, starts = "", []
    for e in exponents:
        starts.append(len(bits))
        bits += format(int(codes[e]), f"0{int(lengths[e])}b")
    bits += "0" * (-len(bits) % 32 + 32)  # whole words, then at least one zero word
    bits += "0" * (-len(bits) % (32 * dfloat11.STREAM_BLOCK_WORDS))  # zero words up to a whole block
    words = [int(bits[i:i + 32], 2) for i in range(0, len(bits), 32)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words], starts


@pytest.mark.parametrize("shape,segment", [((3, 70), 64), ((5, 129), 128), ((1, 1), 64), ((7, 33), 64)])
def test_stream_and_segment_offsets_match_a_naive_encoder(shape, segment):
    torch.manual_seed(sum(shape))
    w = (torch.randn(shape) * torch.logspace(-3, 1, shape[1])).bfloat16()
    p = FMT.quantize(w, segment=segment)
    exponents = ((w.view(torch.int16).to(torch.int32) >> 7) & 0xFF).flatten().tolist()
    lengths = torch.zeros(256, dtype=torch.int64)
    for entry in p.decode_table.tolist():
        lengths[entry & 0xFF] = entry >> 8
    words, starts = _naive_stream(exponents, lengths)
    assert p.exponent_code.tolist() == words and p.attrs["code_words"] == len(words)
    n, k = shape
    expected_offsets = [[starts[r * k + c] for c in range(0, k, segment)] for r in range(n)]
    assert p.segment_offsets.tolist() == expected_offsets


# -- losslessness ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(256, 256), (1, 65536), (65536, 1), (128, 512)])
def test_every_bf16_bit_pattern_round_trips(shape):
    w = all_bf16_patterns().reshape(shape)
    p = FMT.quantize(w)
    assert same_bits(FMT.dequantize(p), w)
    assert p.exponent_code.dtype == torch.int32 and p.sign_mantissa.shape == shape
    FMT.check_data(p)


@pytest.mark.parametrize("n,k,segment", [
    (1024, 4096, 64), (4096, 4096, 128), (14336, 4096, 256), (4096, 14336, 256),  # Llama-3-8B k/v, q/o, gate, down
    (1536, 384, 256), (384, 1536, 256),  # MiniLM's Linears: under LATENCY_MIN_WEIGHTS, the size-saving default
    (30522, 384, 64), (64, 65536, 64), (1024, 16384, 128)])  # the lane count decides, not the shape
def test_default_segment_gives_large_weights_enough_lanes(n, k, segment):
    assert dfloat11.default_segment(n, k) == segment
    if n * k >= dfloat11.LATENCY_MIN_WEIGHTS and segment > 64:
        assert n * dfloat11.segments_per_row(k, segment) >= dfloat11.MIN_LANES
        assert n * dfloat11.segments_per_row(k, segment * 2) < dfloat11.MIN_LANES or segment == 256


def test_quantize_takes_the_default_segment_unless_given_one():
    w = (torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    auto, fixed = FMT.quantize(w), FMT.quantize(w, segment=256)
    assert auto.attrs["segment"] == 64 and auto.segment_offsets.shape == (1024, 64)
    assert fixed.attrs["segment"] == 256
    assert same_bits(FMT.dequantize(auto), w)
    # 32 offset bits per segment: 0.375 bits per weight more than at 256
    assert auto.nbytes - fixed.nbytes == 4 * 1024 * (64 - 16) + 4 * (auto.attrs["code_words"] - fixed.attrs["code_words"])


@pytest.mark.parametrize("segment", dfloat11.SEGMENTS)
def test_every_segment_size_round_trips(segment):
    w = all_bf16_patterns()[:, torch.randperm(256, generator=torch.Generator().manual_seed(0))][:, :250]
    assert same_bits(FMT.dequantize(FMT.quantize(w, segment=segment)), w)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), k=st.integers(1, 700), segment=st.sampled_from(dfloat11.SEGMENTS),
       kind=st.sampled_from(["bits", "normal", "constant"]), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_round_trip(n, k, segment, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "bits":
        w = torch.randint(-(2**15), 2**15, (n, k), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    elif kind == "normal":
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    else:
        w = torch.full((n, k), -0.0, dtype=torch.bfloat16)
    p = FMT.quantize(w, segment=segment)
    assert same_bits(FMT.dequantize(p), w)
    FMT.check_data(p)  # what the encoder writes is what the loader accepts


def test_many_chunks_and_odd_element_counts(monkeypatch):
    monkeypatch.setattr(dfloat11, "CHUNK_WEIGHTS", 100)  # many word-aligned chunks, odd ones included
    w = (torch.randn(37, 51) * 0.1).bfloat16()
    p = FMT.quantize(w, segment=64)
    assert same_bits(FMT.dequantize(p), w)


def test_trained_weights_compress_to_about_eleven_bits(minilm_weights):
    """All MiniLM Linear weights in bf16: lossless, and at most 0.70 of their bf16 size."""
    original = compressed = 0
    for name, weight in minilm_weights.items():
        w = weight.bfloat16()
        p = FMT.quantize(w, name=name)
        assert same_bits(FMT.dequantize(p), w), name
        original += 2 * w.numel()
        compressed += p.nbytes
    assert compressed / original <= 0.70, compressed / original


def test_bf16_minilm_embeddings_are_bit_identical(minilm):
    model, tokenizer = minilm
    reference = copy.deepcopy(model).bfloat16()
    compressed = lowbit.quantize(copy.deepcopy(reference), "dfloat11", progress=False)
    batch = tokenizer(["lossless compression of trained weights", "a second, longer sentence to pad"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        got = compressed(**batch).last_hidden_state
    linears = sum(isinstance(m, torch.nn.Linear) for m in reference.modules())
    assert linears > 30 and sum(isinstance(m, lowbit.QuantLinear) for m in compressed.modules()) == linears
    assert same_bits(got, expected)


# -- errors ------------------------------------------------------------------------------------
def test_other_dtypes_need_an_explicit_cast():
    w = torch.randn(4, 40)
    with pytest.raises(WeightError, match="layer.x.*bfloat16 weights only"):
        FMT.quantize(w, name="layer.x")
    p = FMT.quantize(w, cast=True)
    assert p.dtype == torch.bfloat16 and same_bits(FMT.dequantize(p), w.bfloat16())


@pytest.mark.parametrize("options", [{"segment": 100}, {"segment": True}, {"segment": 64.0}, {"segment": [64]},
                                     {"cast": "yes"}, {"group_size": 64}])
def test_bad_options(options):
    with pytest.raises(FormatError):
        FMT.quantize(torch.randn(4, 40).bfloat16(), **options)


def test_bad_attrs_are_refused():
    with pytest.raises(FormatError, match="code_words"):
        FMT.check_attrs((4, 4), {"segment": 256, "code_words": -3})
    with pytest.raises(FormatError):
        FMT.check_attrs((4, 4), {"segment": 256})


def _damaged(p, field: str, edit):
    tensors = {name: t.clone() for name, t in p.tensors.items()}
    edit(tensors[field])
    return PackedWeight(p.format, p.shape, p.dtype, p.attrs, tensors)


def _set(index, value):
    return lambda t: t.__setitem__(index, value)


# decode_table entries are symbol | length << 8; the stream ends with zero words
STORED_DAMAGE = {
    "code too long": ("decode_table", _set(7, 7 | (CODE_BITS + 1) << 8),
                      rf"'decode_table': entry 7 has code length {CODE_BITS + 1}, over"),
    "negative entry": ("decode_table", _set(9, -1), r"entry 9 has code length 255"),
    "negative offset": ("segment_offsets", _set((1, 0), -8), r"segment 0 of row 1 starts at bit -8, outside"),
    "offset past the end": ("segment_offsets", _set((7, 1), 2**30), r"segment 1 of row 7 starts at bit 1073741824"),
    # all-ones bits are the longest code: the last segments' codes no longer fit the stream
    "stream tail": ("exponent_code", _set(slice(0, -1), -1),
                    r"'exponent_code': segment \d of row \d decodes past the end"),
}


@pytest.mark.parametrize("case", sorted(STORED_DAMAGE))
def test_check_data_refuses_values_a_kernel_cannot_take(case):
    field, edit, message = STORED_DAMAGE[case]
    p = FMT.quantize((torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16())
    FMT.check_data(p)
    with pytest.raises(FormatError, match=message):
        FMT.check_data(_damaged(p, field, edit))


def test_meta_and_empty_weights_are_refused():
    with pytest.raises(WeightError, match="meta"):
        FMT.quantize(torch.empty(4, 4, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(WeightError, match="non-empty"):
        FMT.quantize(torch.empty(0, 4, dtype=torch.bfloat16))


def test_pack_codes_handles_codes_that_straddle_words():
    # three 20-bit codes: the second straddles words 0 and 1
    codes = np.array([0xABCDE, 0x12345, 0xFFFFF], dtype=np.uint64)
    aligned = codes << np.uint64(44)
    stream = huffman.pack_codes(aligned, np.array([0, 20, 40], dtype=np.uint64), 2)
    bits = "".join(format(int(c), "020b") for c in codes) + "0" * 4
    assert [w & 0xFFFFFFFF for w in stream.tolist()] == [int(bits[:32], 2), int(bits[32:64], 2)]
