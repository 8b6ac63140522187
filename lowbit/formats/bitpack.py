"""Bit-plane packing of unsigned integer codes into int32 words, generic in the bit width.

A width b splits into power-of-two planes so that no value ever straddles a word:
8 -> [8]; otherwise b's binary digits from {4, 2, 1}, low bits first (6 = 4+2, 7 = 4+2+1,
3 = 2+1). Each plane of width w holds bits [lo, lo+w) of every code, packed LSB-first along K,
32/w codes per int32 word. A row of Kp codes therefore takes Kp*b/32 words: plane p starts at
word Kp*lo_p/32. A kernel reads each plane with aligned 32-bit loads and one shift + mask.

Nibble-aligned 2-bit plane (widths 6 and 7, layout 2): a 2-bit plane above a 4-bit plane holds
code i of its word (i < 8) at bits 4i, 4i+1 and code 8+i at bits 4i+2, 4i+3. Each 4-bit-plane
word's 8 codes then have their top bits at the same nibbles of one 2-bit-plane word (shifted by
0 or 2), so a kernel lines the two planes up with one shift where K order needs ~6 operations to
spread 8 codes out to nibble spacing. (Layout 1, written before this, kept K order there.)

`one_bit=True` splits every width into b one-bit planes instead (the LUT formats' layout: plane j
holds bit j of every code, so 4 consecutive weights of a plane form one 4-bit table index).
"""
from __future__ import annotations

import torch


def planes(bits: int, one_bit: bool = False) -> tuple[tuple[int, int], ...]:
    """((width, low_bit), ...) of the planes a `bits`-wide code is split into, low bits first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if one_bit:
        widths = (1,) * bits
    else:
        widths = (8,) if bits == 8 else tuple(w for w in (4, 2, 1) if bits & w)
    out, lo = [], 0
    for w in widths:
        out.append((w, lo))
        lo += w
    return tuple(out)


def nibble_aligned(bits: int, one_bit: bool = False) -> bool:
    """Whether the 2-bit plane of `bits`-wide codes is stored nibble-aligned (see the module doc)."""
    return not one_bit and bits in (6, 7)


def layout_version(bits: int, one_bit: bool = False) -> int:
    """The packed-layout number of `bits`-wide codes: 2 where the 2-bit plane is nibble-aligned,
    else 1 (unchanged since the first layout). Checkpoints record it per layer."""
    return 2 if nibble_aligned(bits, one_bit) else 1


def _slot_shifts(width: int, bits: int, one_bit: bool, device: torch.device) -> torch.Tensor:
    """[32/width] int64: the bit position of each code slot of a plane's word, in K order."""
    slot = torch.arange(32 // width, device=device, dtype=torch.int64)
    if width == 2 and nibble_aligned(bits, one_bit):  # slots 0-7 at nibble bases, 8-15 two bits above
        return (slot % 8) * 4 + (slot // 8) * 2
    return slot * width


def pack(codes: torch.Tensor, bits: int, one_bit: bool = False) -> torch.Tensor:
    """[N, Kp] integer codes in [0, 2^bits) -> [N, Kp*bits/32] int32 words. Kp % 32 == 0."""
    n, kp = codes.shape
    if kp % 32:
        raise ValueError(f"packed length must be a multiple of 32, got {kp}")
    codes = codes.to(torch.int64)
    parts = []
    for width, lo in planes(bits, one_bit):
        per_word = 32 // width
        field = ((codes >> lo) & ((1 << width) - 1)).reshape(n, kp // per_word, per_word)
        shifts = _slot_shifts(width, bits, one_bit, codes.device)
        words = (field << shifts).sum(dim=-1)  # disjoint bit ranges: sum == bitwise or
        parts.append(words)
    words = torch.cat(parts, dim=1)
    # Reinterpret the unsigned 32-bit patterns as int32 (two's complement).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, kp: int, one_bit: bool = False) -> torch.Tensor:
    """Inverse of `pack`: [N, Kp*bits/32] int32 -> [N, Kp] int32 codes."""
    n = words.shape[0]
    words = words.to(torch.int32)
    codes = None
    start = 0
    for width, lo in planes(bits, one_bit):
        per_word = 32 // width
        count = kp // per_word
        plane_words = words[:, start : start + count]
        shifts = _slot_shifts(width, bits, one_bit, words.device).to(torch.int32)
        # int32 throughout (the decoder of every CPU forward): >> is arithmetic, but each field
        # lies within the word (shift + width <= 32), so the mask drops the copied sign bits
        field = ((plane_words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(n, kp)
        if lo:
            field <<= lo
        codes = field if codes is None else codes.bitwise_or_(field)
        start += count
    return codes
