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


def test_golden_6bit_is_a_4bit_plane_then_a_nibble_aligned_2bit_plane():
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 0] = 0b101101  # low nibble 0b1101 -> 4-bit plane, high bits 0b10 -> 2-bit plane slot 0 (bit 0)
    codes[0, 9] = 0b010000  # 2-bit plane word 0, slot 9: the second 8 codes sit 2 bits above the first 8
    codes[0, 17] = 0b110000  # 2-bit plane word 1, slot 1: bit 4
    assert bitpack.pack(codes, 6).tolist() == [[0b1101, 0, 0, 0, 0b10 | 0b01 << 6, 0b11 << 4]]


@pytest.mark.parametrize("bits,one_bit,nibbles", [(6, False, True), (7, False, True), (3, False, False),
                                                   (2, False, False), (6, True, False)])
def test_2bit_plane_slot_positions(bits, one_bit, nibbles):
    """Slot j of the 2-bit plane at bit 4 (j % 8) + 2 (j // 8) for int6 / int7 (layout 2), at 2j
    elsewhere (layout 1; the LUT formats have no 2-bit plane)."""
    assert bitpack.nibble_aligned(bits, one_bit) == nibbles
    assert bitpack.layout_version(bits, one_bit) == (2 if nibbles else 1)
    if one_bit:
        return
    lo = dict((w, lo) for w, lo in bitpack.planes(bits))[2]
    start = lo  # a plane starts at word Kp * lo / 32, here Kp = 32
    for j in range(16):
        codes = torch.zeros(1, 32, dtype=torch.int32)
        codes[0, j] = 1 << lo  # lowest bit of the 2-bit field only
        word = bitpack.pack(codes, bits)[0, start].item()
        assert word == 1 << ((j % 8) * 4 + (j // 8) * 2 if nibbles else 2 * j)


def test_golden_8bit_top_byte_sets_sign_bit():
    codes = torch.tensor([[1, 2, 3, 0xFF] + [0] * 28], dtype=torch.int32)
    assert bitpack.pack(codes, 8)[0, 0].item() == 0xFF030201 - 2**32


def test_rejects_lengths_not_multiple_of_32():
    with pytest.raises(ValueError):
        bitpack.pack(torch.zeros(1, 40, dtype=torch.int32), 4)
