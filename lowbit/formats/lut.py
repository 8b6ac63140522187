"""LUT formats `lut1` ... `lut4` (DESIGN.md section 4): the asymmetric group quantizer of `intN`
(same codes, scales and zero points, default group 128), stored as b one-bit planes so the
kernel can use 4 weights of a plane as a 4-bit index into a table of activation sums
(T-MAC identity: code = sum_j 2^j bit_j). `lutN` and `intN` of the same width dequantize to the
same values; only the layout and the kernels (lowbit/kernels/lut_gemm.py picks the lookup kernel
or the dequant kernels on the same planes, per tuning) differ.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import FormatError
from . import register_format
from .base import launch
from .integer import IntFormat


class LutFormat(IntFormat):
    """`lut{bits}`: intN-asymmetric codes in one-bit planes (table lookup or merged-plane dequant)."""

    ONE_BIT_PLANES = True
    ATTRS = ("group_size", "symmetric")  # no act="int8": the lookup kernel sums 16-bit activations
    OPTIONAL_ATTRS = ()
    SMALL_GROUP_SIZES = ()  # the lookup kernel's K tiles lie inside one group

    def __init__(self, bits: int):
        super().__init__(bits, prefix="lut")

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        if options.get("symmetric"):
            raise FormatError(f"{self.name}: LUT formats are asymmetric (the zero point is one table entry)")

    def check_attrs(self, shape: tuple[int, int], attrs: Any) -> dict[str, Any]:
        attrs = super().check_attrs(shape, attrs)
        if attrs["symmetric"]:
            raise FormatError(f"{self.name}: symmetric must be False")
        return attrs

    def triton_linear(self, x2d, packed, bias):
        return launch("lut_linear", x2d, packed.qweight, packed.scales, packed.zeros, bias, self.bits,
                      packed.attrs["group_size"], packed.shape[1])


for _bits in range(1, 5):
    register_format(LutFormat(_bits))
