"""bnb_fp4: bitsandbytes' 4-bit float (BitsAndBytesConfig(bnb_4bit_quant_type="fp4"), QLoRA's
"FP4"), the torch spec.

Not the OCP E2M1 of mxfp4 / nvfp4: bitsandbytes' table is a sign bit over the 8 magnitudes
{0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 (codes 0..7; codes 8..15 the same, negated: code 8 is a
second zero). Layout, block-64 absmax scales, double_quant and method="gptq" are nf4's
(`CodebookFormat`, lowbit/formats/nf4.py), and so is the rounding, bitsandbytes' own (its
torch quantizer), so lowbit writes its codes: with the 16 codes in ascending value (code 0
before code 8), each weight / absmax goes to the nearest, a midpoint to the lower one; so values
in (0, 1/384] (half the smallest nonzero value) get code 8 and 0 itself, or a small negative,
code 0; both decode to +0. Only the code values differ.
"""
from __future__ import annotations

import torch

from . import register_format
from .nf4 import CodebookFormat

_MAGNITUDES_X12 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
#: code 0..15 -> value, computed as bitsandbytes computes its table (v / 12 in fp32), so the
#: values are its bit for bit (code 8 included: 0.0 - v makes it +0, as bitsandbytes' is)
BNB_FP4_CODEBOOK = tuple((torch.tensor(_MAGNITUDES_X12 + tuple(0.0 - v for v in _MAGNITUDES_X12)) / 12).tolist())


class BnbFP4Format(CodebookFormat):
    """`bnb_fp4`: bitsandbytes' FP4 codes with block-64 absmax (optionally double-quantized) scales."""

    name = "bnb_fp4"
    CODEBOOK = BNB_FP4_CODEBOOK


register_format(BnbFP4Format())
