import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import bitpack


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), words=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, rows, words, seed):
    kp = 32 * words
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, kp), generator=gen, dtype=torch.int32)
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, kp * bits // 32)
    assert torch.equal(bitpack.unpack(packed, bits, kp), codes)


@pytest.mark.parametrize("bits,expected", [
    (8, ((8, 0),)), (7, ((4, 0), (2, 4), (1, 6))), (6, ((4, 0), (2, 4))), (5, ((4, 0), (1, 4))),
    (4, ((4, 0),)), (3, ((2, 0), (1, 2))), (2, ((2, 0),)), (1, ((1, 0),)),
])
def test_plane_decomposition(bits, expected):
    assert bitpack.planes(bits) == expected
    assert sum(w for w, _ in expected) == bits


def test_golden_4bit_lsb_first():
    codes = torch.tensor([[0xF, 0xA, 0xC, 0x6, 0x1, 0x8, 0x8, 0xA] + [0] * 24], dtype=torch.int32)
    words = bitpack.pack(codes, 4)
    assert words.tolist() == [[0xA8816CAF - 2**32, 0, 0, 0]]


def test_golden_6bit_is_a_4bit_plane_then_a_2bit_plane():
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 0] = 0b101101  # low nibble 0b1101 -> 4-bit plane, high bits 0b10 -> 2-bit plane
    codes[0, 17] = 0b110000  # only high bits: second word of the 2-bit plane, slot 1
    assert bitpack.pack(codes, 6).tolist() == [[0b1101, 0, 0, 0, 0b10, 0b11 << 2]]


def test_golden_8bit_top_byte_sets_sign_bit():
    codes = torch.tensor([[1, 2, 3, 0xFF] + [0] * 28], dtype=torch.int32)
    assert bitpack.pack(codes, 8)[0, 0].item() == 0xFF030201 - 2**32


def test_rejects_lengths_not_multiple_of_32():
    with pytest.raises(ValueError):
        bitpack.pack(torch.zeros(1, 40, dtype=torch.int32), 4)
