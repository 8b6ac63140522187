"""Element and scale decoders shared by the dequant GEMV (lowbit/kernels/dequant_gemv.py) and
GEMM (lowbit/kernels/dequant_gemm.py): packed codes and stored scales -> fp32, with integer ops
only (no int -> float converts, no FP8 / FP4 hardware)."""
import triton
import triton.language as tl


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
    ("codebook" codes are looked up in the fp32 code values by `_dequant_tile`.)
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
