"""GGML quantization blocks (llama.cpp's GGUF tensor types) as lowbit layers.

Each GGML type stores a row of K weights as K / block_size blocks of bytes. The types read here
decode every group of `group_size` weights as one of three maps of 2- to 8-bit codes u:

    symmetric:  w = a * (u - 2^(bits-1))      (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K)    -> int2 ... int8
    with a min: w = a * u - c                 (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K;
                                               TQ1_0, TQ2_0 with c = a)       -> int2 ... int8
    a table:    w = a * TABLE[u]              (IQ4_NL, IQ4_XS -> iq4_nl; MXFP4 -> mxfp4; NVFP4 -> nvfp4)

with a, c float32 per group: a float16 d itself, or d times a small integer sub-block scale (K
types, IQ4_XS; signed in Q3_K, Q6_K and IQ4_XS), or a power of two (MXFP4's E8M0 byte) or an
E4M3 value (NVFP4's byte) over 2: ggml's MXFP4 / NVFP4 tables are E2M1 doubled. `decode_blocks`
returns the codes, a and c; `lowbit_layer` makes the lowbit layer. For the integer types
`lowbit_groups` turns them into lowbit's float16 scales and zero points, w = s * (u - z); the table
types keep their codes, with a as lowbit's block scale (iq4_nl: float16; mxfp4: 2a as an E8M0 byte;
nvfp4: 2a as an E4M3 scale, tensor scale 1). Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4 and NVFP4 are exact,
and so are the ternary TQ1_0 / TQ2_0 (w = d * (t - 1), t in 0 ... 2: int2 codes t with s = d and
z = 1); for the others a (a float16 times up to 127) and z = c / s are rounded to float16, so
weights differ from llama.cpp's by that rounding (measured in tests/integrations/test_gguf_import.py).

Layouts (ggml-common.h): Q4_0 / Q4_1 / Q5_* / IQ4_NL / MXFP4 keep element j of a 32-block in byte
j's low nibble and element j + 16 in its high nibble, Q5's fifth bits in a little-endian uint32.
The K types and IQ4_XS have 256-weight blocks:
- Q4_K / Q5_K: 8 sub-blocks of 32 whose 6-bit scales and mins are packed in 12 bytes, codes
  running 64 at a time: sub-block 2i in the low nibbles of 32 bytes, 2i + 1 in the high.
- Q2_K / Q3_K / Q6_K: 16 sub-blocks of 16 (lowbit groups of 16). Their 2-bit fields run 128
  at a time: element 32j + l of a half in bits 2j of byte l of its 32 bytes (Q3_K's third bit:
  bit 4h + j of byte l of the 32 hmask bytes; Q6_K's high 2 bits the same way, its low 4 in
  nibbles as Q4_K's).
- IQ4_XS: 8 sub-blocks of 32, each with IQ4_NL's nibble layout in its 16 bytes; 6-bit scales
  (minus 32): the low 4 bits of sub-block 2i / 2i + 1 in the low / high nibble of byte i of 4,
  the top 2 bits at bit 2i of a little-endian uint16.
- TQ2_0: 2-bit fields as Q2_K's in 64 bytes, then d. TQ1_0: five base-3 digits per byte, scaled
  to fill it (byte = ceil(256 * n / 243) for the 5-digit number n, most significant digit first):
  digit i of byte b is (((b * 3^i) mod 256) * 3) >> 8; the first 32 bytes give elements 32i + l,
  the next 16 elements 160 + 16i + l, then 4 bytes of four digits elements 240 + 4i + l; then d.
NVFP4 blocks hold 64 weights: 4 sub-blocks of 16 (lowbit's nvfp4 blocks) with one scale byte
each, elements 0-7 / 8-15 of sub-block s in the low / high nibbles of bytes 8s ... 8s + 7.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..formats import bitpack, get_format
from ..formats.integer import SCALE_DTYPE
from ..formats.iq4_nl import KVALUES
from ..packed import PackedWeight
from .foreign_folder import integer_layer

QK_K = 256  # weights per K-type and IQ4_XS block
#: ggml's MXFP4 / NVFP4 table: the E2M1 values doubled, in E2M1's code order
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@dataclass(frozen=True)
class BlockType:
    """One GGML type lowbit imports: `bits`-wide codes in groups of `group_size` weights."""

    name: str
    bits: int
    group_size: int
    block_size: int  # weights per block
    block_bytes: int
    symmetric: bool
    decode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    exact: bool = False  # lowbit holds the weights bit for bit (a itself, and no min or a min of a)
    table: tuple[int, ...] = ()  # table types: the code values (w = a * table[u])
    target: str = ""  # table types: the lowbit format ("iq4_nl", "mxfp4", "nvfp4")

    @property
    def lowbit_format(self) -> str:
        """The lowbit format the type imports as: "int4", "iq4_nl", ..."""
        return self.target or f"int{self.bits}"


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian float16 at byte `offset` of each block [R, B, bytes] -> float32 [R, B, 1]."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] -> their low nibbles, then their high nibbles: int32 [..., 2n]."""
    qs = qs.int()
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _fifth_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Bit j of the little-endian bytes qh [..., count / 8], for j < count: int32 [..., count]."""
    bits = (qh.int().unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.flatten(-2)[..., :count]


def _q4_0(blocks):
    return _nibbles(blocks[..., 2:18]), _half(blocks, 0), None


def _q4_1(blocks):
    return _nibbles(blocks[..., 4:20]), _half(blocks, 0), -_half(blocks, 2)


def _q5_0(blocks):
    return _nibbles(blocks[..., 6:22]) | (_fifth_bits(blocks[..., 2:6], 32) << 4), _half(blocks, 0), None


def _q5_1(blocks):
    return _nibbles(blocks[..., 8:24]) | (_fifth_bits(blocks[..., 4:8], 32) << 4), _half(blocks, 0), -_half(blocks, 2)


def _q8_0(blocks):
    return blocks[..., 2:34].contiguous().view(torch.int8).int() + 128, _half(blocks, 0), None


def _k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes [..., 12] of a K block's eight 6-bit sub-block scales and mins -> int32 [..., 8]
    each: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7's
    low 4 bits in bytes 8-11 (scales low nibble, mins high) and top 2 bits in bytes 0-7's top bits."""
    s = packed.int()
    low_scales, low_mins, rest = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scales = torch.cat([low_scales & 63, (rest & 0xF) | ((low_scales >> 6) << 4)], dim=-1)
    mins = torch.cat([low_mins & 63, (rest >> 4) | ((low_mins >> 6) << 4)], dim=-1)
    return scales, mins


def _k_codes(qs: torch.Tensor) -> torch.Tensor:
    """A K block's 128 bytes of 4-bit codes -> int32 [..., 256]: each 32-byte run holds two
    sub-blocks, the first in its low nibbles."""
    runs = qs.int().unflatten(-1, (4, 32))
    return torch.stack([runs & 0xF, runs >> 4], dim=-2).flatten(-3)


def _k_affine(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A K block's per-sub-block a = d * scale and c = dmin * min: float32 [R, B, 8] each."""
    scales, mins = _k_scales_and_mins(blocks[..., 4:16])
    return _half(blocks, 0) * scales.float(), _half(blocks, 2) * mins.float()


def _q4_k(blocks):
    a, c = _k_affine(blocks)
    return _k_codes(blocks[..., 16:144]), a, c


def _q5_k(blocks):
    a, c = _k_affine(blocks)
    # fifth bit of sub-block i's element e: bit i of byte e of the 32 qh bytes
    high = (blocks[..., 16:48].int().unsqueeze(-2) >> torch.arange(8, dtype=torch.int32).unsqueeze(-1)) & 1
    return _k_codes(blocks[..., 48:176]) | (high.flatten(-2) << 4), a, c


def _two_bit_fields(qs: torch.Tensor) -> torch.Tensor:
    """A K block's 2-bit fields, 64 bytes [..., 64] -> int32 [..., 256]: each 32-byte half holds
    128 fields, field 32j + l in bits 2j of byte l."""
    halves = qs.int().unflatten(-1, (2, 1, 32))
    return ((halves >> (2 * torch.arange(4, dtype=torch.int32)).view(4, 1)) & 3).flatten(-3)


def _q2_k(blocks):
    scales = blocks[..., 0:16].int()
    a, c = _half(blocks, 80) * (scales & 0xF).float(), _half(blocks, 82) * (scales >> 4).float()
    return _two_bit_fields(blocks[..., 16:80]), a, c


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes [..., 12] of sixteen 6-bit scales -> int32 [..., 16] in [-32, 31]: scale i's
    low 4 bits in nibble i // 8 of byte i % 8, its top 2 bits at 2 (i // 4) in byte 8 + i % 4."""
    b = packed.int()
    low = torch.cat([b[..., 0:8] & 0xF, b[..., 0:8] >> 4], dim=-1)
    high = (b[..., 8:12].unsqueeze(-2) >> (2 * torch.arange(4, dtype=torch.int32)).view(4, 1)) & 3
    return (low | (high.flatten(-2) << 4)) - 32


def _q3_k(blocks):
    # third bit of element 128h + 32j + l: bit 4h + j of hmask byte l
    high = (blocks[..., 0:32].int().unsqueeze(-2) >> torch.arange(8, dtype=torch.int32).view(8, 1)) & 1
    codes = _two_bit_fields(blocks[..., 32:96]) | (high.flatten(-2) << 2)
    return codes, _half(blocks, 108) * _q3_k_scales(blocks[..., 96:108]).float(), None


def _q6_k(blocks):
    low = _nibbles(blocks[..., 0:128].unflatten(-1, (2, 64))).flatten(-2)
    codes = low | (_two_bit_fields(blocks[..., 128:192]) << 4)
    return codes, _half(blocks, 208) * blocks[..., 192:208].contiguous().view(torch.int8).float(), None


def _tq2_0(blocks):
    d = _half(blocks, 64)
    return _two_bit_fields(blocks[..., 0:64]), d, d  # w = d * t - d


def _base3_digits(packed: torch.Tensor, digits: int) -> torch.Tensor:
    """TQ1_0's bytes [..., n] -> their first `digits` base-3 digits, int32 [..., digits * n]: digit i
    of byte l at i * n + l."""
    powers = torch.tensor([3 ** i for i in range(digits)], dtype=torch.int32).view(digits, 1)
    return ((((packed.int().unsqueeze(-2) * powers) & 0xFF) * 3) >> 8).flatten(-2)


def _tq1_0(blocks):
    digits = torch.cat([_base3_digits(blocks[..., 0:32], 5), _base3_digits(blocks[..., 32:48], 5),
                        _base3_digits(blocks[..., 48:52], 4)], dim=-1)
    d = _half(blocks, 52)
    return digits, d, d  # w = d * t - d


def _iq4_nl(blocks):
    return _nibbles(blocks[..., 2:18]), _half(blocks, 0), None


def _iq4_xs(blocks):
    low = blocks[..., 4:8].int()
    low = torch.stack([low & 0xF, low >> 4], dim=-1).flatten(-2)  # sub-block 2i: low nibble of byte i
    high = blocks[..., 2:4].int()
    high = (high[..., :1] | (high[..., 1:] << 8)) >> (2 * torch.arange(8, dtype=torch.int32)) & 3
    scales = (low | (high << 4)) - 32
    codes = _nibbles(blocks[..., 8:136].unflatten(-1, (8, 16))).flatten(-2)
    return codes, _half(blocks, 0) * scales.float(), None


def _mxfp4(blocks):
    # a = 2^(e - 128), ggml's E8M0 "half" (its table is E2M1 doubled): float32 bits as ggml makes them
    e = blocks[..., 0:1].int()
    a = torch.where(e < 2, 0x200000 << e, (e - 1) << 23).view(torch.float32)
    return _nibbles(blocks[..., 1:17]), a, None


def _nvfp4(blocks):
    # ggml's unsigned E4M3 (bit 7 ignored, so 0xFF is 480; the byte 0x7F is 0) over 2 (its table is
    # E2M1 doubled); decoded by hand, as torch's E4M3 has NaN where ggml has 480 or 0
    byte = blocks[..., 0:4].int()
    exponent, mantissa = (byte >> 3) & 0xF, (byte & 7).float()
    value = torch.where(exponent == 0, mantissa * 2.0**-9, (1 + mantissa / 8) * torch.exp2(exponent.float() - 7))
    a = torch.where((byte == 0) | (byte == 0x7F), torch.zeros_like(value), value * 0.5)
    return _nibbles(blocks[..., 4:36].unflatten(-1, (4, 8))).flatten(-2), a, None


BLOCK_TYPES = {t.name: t for t in (
    BlockType("Q4_0", 4, 32, 32, 18, True, _q4_0, exact=True),
    BlockType("Q4_1", 4, 32, 32, 20, False, _q4_1),
    BlockType("Q5_0", 5, 32, 32, 22, True, _q5_0, exact=True),
    BlockType("Q5_1", 5, 32, 32, 24, False, _q5_1),
    BlockType("Q8_0", 8, 32, 32, 34, True, _q8_0, exact=True),
    BlockType("Q2_K", 2, 16, QK_K, 84, False, _q2_k),
    BlockType("Q3_K", 3, 16, QK_K, 110, True, _q3_k),
    BlockType("Q4_K", 4, 32, QK_K, 144, False, _q4_k),
    BlockType("Q5_K", 5, 32, QK_K, 176, False, _q5_k),
    BlockType("Q6_K", 6, 16, QK_K, 210, True, _q6_k),
    BlockType("TQ1_0", 2, QK_K, QK_K, 54, False, _tq1_0, exact=True),
    BlockType("TQ2_0", 2, QK_K, QK_K, 66, False, _tq2_0, exact=True),
    BlockType("IQ4_NL", 4, 32, 32, 18, True, _iq4_nl, exact=True, table=KVALUES, target="iq4_nl"),
    BlockType("IQ4_XS", 4, 32, QK_K, 136, True, _iq4_xs, table=KVALUES, target="iq4_nl"),
    BlockType("MXFP4", 4, 32, 32, 17, True, _mxfp4, exact=True, table=E2M1_DOUBLED, target="mxfp4"),
    BlockType("NVFP4", 4, 16, 64, 36, True, _nvfp4, exact=True, table=E2M1_DOUBLED, target="nvfp4"),
)}

#: the types lowbit holds bit for bit
EXACT_TYPES = tuple(name for name, kind in BLOCK_TYPES.items() if kind.exact)


def decode_blocks(kind: BlockType, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF tensor's bytes uint8 [N, K / block_size * block_bytes] -> (codes int32 [N, K],
    a float32 [N, G], c float32 [N, G] or None for symmetric types), G = K / group_size."""
    n = data.shape[0]
    codes, a, c = kind.decode(data.reshape(n, -1, kind.block_bytes))
    return codes.reshape(n, -1), a.reshape(n, -1), None if c is None else c.reshape(n, -1)


def reference_weights(kind: BlockType, codes: torch.Tensor, a: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """The float32 weights [N, K] llama.cpp decodes from (codes, a, c) (`decode_blocks`)."""
    u = codes.unflatten(-1, (a.shape[1], kind.group_size))
    if kind.table:
        return (a.unsqueeze(-1) * torch.tensor(kind.table, dtype=torch.float32)[u.long()]).flatten(-2)
    u = u.float()
    w = a.unsqueeze(-1) * (u - 2 ** (kind.bits - 1)) if c is None else a.unsqueeze(-1) * u - c.unsqueeze(-1)
    return w.flatten(-2)


def lowbit_groups(kind: BlockType, codes: torch.Tensor, a: torch.Tensor, c: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, a, c) from `decode_blocks` -> lowbit's (codes int32 [N, K], float16 scales s [N, G],
    float16 zero points z [N, G] or None when symmetric), w = s * (u - z).

    Symmetric types: s = a rounded to float16 (exactly a for Q4_0 / Q5_0 / Q8_0; Q3_K's and
    Q6_K's may be negative). Types with a min: s = a rounded to float16, z = c / s rounded.
    A group whose a is 0 or so small that z overflows float16 (|c / a| > 65504) decodes to the
    constant -c, within a * (2^bits - 1) < |c| * 2^bits / 65504 of llama.cpp's weights: its codes
    become 2^bits - 1 with z = 0 and s = -c / (2^bits - 1). ValueError when a or c is not finite
    or a scale overflows float16."""
    if not (bool(torch.isfinite(a).all()) and (c is None or bool(torch.isfinite(c).all()))):
        raise ValueError("a block scale or min is not finite")
    scales, zeros = a.to(SCALE_DTYPE), None
    if c is not None:
        zeros = (c.double() / scales.double()).to(SCALE_DTYPE)
        constant = (scales == 0) | ~torch.isfinite(zeros)
        if bool(constant.any()):
            top = 2 ** kind.bits - 1
            scales = torch.where(constant, (-c.double() / top).to(SCALE_DTYPE), scales)
            zeros = torch.where(constant, torch.zeros_like(zeros), zeros)
            grouped = codes.unflatten(-1, (a.shape[1], kind.group_size))
            codes = torch.where(constant.unsqueeze(-1), top, grouped).flatten(-2)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"a group scale exceeds float16's range (largest |d * scale| {float(a.abs().max()):.6g})")
    return codes, scales, zeros


def _table_scales(kind: BlockType, codes: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """A table type's a [N, G] -> lowbit's scale fields ([G, N] as the format stores them)."""
    if kind.target == "iq4_nl":  # float16 scales, checked as the symmetric integer types' are
        return {"scales": lowbit_groups(kind, codes, a, None)[1].t().contiguous()}
    if kind.target == "mxfp4":  # lowbit's E8M0 byte b scales E2M1 values by 2^(b - 127): b = log2(a) + 128
        exponent = torch.log2(a.double()).round()
        if bool((exponent > 126).any()):
            raise ValueError("an E8M0 scale byte is 255 (2^127 in ggml, NaN in OCP MX and lowbit)")
        return {"scales": (exponent + 128).to(torch.uint8).t().contiguous()}
    scales = (2 * a).to(torch.float8_e4m3fn)  # nvfp4: E4M3 block scales, tensor scale 1
    if not torch.equal(scales.float(), 2 * a):
        raise ValueError("a block scale byte is 0xFF (480 in ggml's unsigned E4M3, more than E4M3 holds)")
    return {"scales": scales.t().contiguous(), "tensor_scale": torch.ones(1)}


def lowbit_layer(kind: BlockType, codes: torch.Tensor, a: torch.Tensor, c: torch.Tensor | None,
                 dtype: torch.dtype) -> PackedWeight:
    """(codes, a, c) from `decode_blocks` -> the lowbit layer (`kind.lowbit_format`) of output dtype
    `dtype` with the same codes. ValueError for scales lowbit cannot hold (see `lowbit_groups`,
    `_table_scales`)."""
    if not kind.table:
        u, scales, zeros = lowbit_groups(kind, codes, a, c)
        return integer_layer(u, kind.bits, kind.group_size, scales, zeros, dtype)
    n, k = codes.shape  # K is a whole number of blocks of 32 or more: no padding
    fields = {"qweight": bitpack.pack(codes, 4), **_table_scales(kind, codes, a)}
    attrs = get_format(kind.target).resolve_attrs((n, k), {})
    return PackedWeight(kind.target, (n, k), dtype, attrs, fields)
