"""NF4: QLoRA's 4-bit NormalFloat (the torch spec; DESIGN.md section 4), and `CodebookFormat`,
the 4-bit block-absmax codebook layout it shares with bitsandbytes' FP4 (lowbit/formats/bnb_fp4.py)
and, with float16 scales per block of 32, llama.cpp's IQ4_NL (lowbit/formats/iq4_nl.py).

Blocks of 64 consecutive weights along K share an absmax scale; each weight is w / absmax
rounded to the nearest of the 16 code values: with the codes in ascending value (a tie in code
order), a midpoint goes to the lower one, bitsandbytes' rule (for NF4, whose table ascends, the
lower code). An all-zero block gets absmax 1. K is zero-padded to a multiple of 64.

double_quant=True (QLoRA's double quantization) stores the fp32 absmax values themselves in
8 bits: the mean is subtracted, then each run of 256 consecutive values (group-major order) is
quantized symmetrically to int8 with one fp32 scale (QLoRA uses an 8-bit float code here;
**choice:** a linear int8 code, simpler and as accurate at this block size). Scales cost
32/64 = 0.5 bits/weight without it and 8/64 + 32/(64*256) ~ 0.127 with it.

Packed fields: qweight int32 [N, Kp/8] (one 4-bit plane, bitpack.py), and either absmax
float32 [Kp/64, N] or absmax_q int8 [Kp/64, N] + absmax_scale float32 [ceil(G*N/256)] +
absmax_mean float32 [1].

Option method="gptq" (not stored; not with double_quant): codes chosen by GPTQ on the layer's
input Hessian (lowbit/formats/gptq.py), same layout and rules; with act_order=True in gptq.py's
column order, each block's absmax from the weight as given.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import FormatError
from ..packed import PackedWeight
from . import bitpack, gptq, register_format
from .base import FieldSpec, Format, launch
from .division import divide
from .integer import padded_k

#: QLoRA's NF4 code values (bitsandbytes' table), code 0..15
NF4_CODEBOOK = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0)
BLOCK = 64
DQ_BLOCK = 256


class CodebookFormat(Format):
    """4-bit codes into a table of 16 values, one scale per block of `BLOCK` weights along K:
    w = CODEBOOK[code] * scale. Subclasses set `name` and `CODEBOOK` (the values of codes 0..15,
    fp32-exact); the kernel launcher finds the table by the format's name
    (lowbit/kernels/dequant_gemm.py, CODEBOOKS). The block scales are nf4's here (block-64 absmax,
    values in [-1, 1], optionally double-quantized); a subclass with other scales overrides
    `BLOCK`, `_block_scale`, `_scale_specs`, `_store_scales` and `block_scales` (iq4_nl.py)."""

    CODEBOOK: tuple[float, ...] = ()
    BLOCK = BLOCK
    ATTRS = ("double_quant",)
    DEFAULTS = {"double_quant": False}
    QUANTIZER_OPTIONS = ("method", "act_order")
    METHODS = ("rtn", "gptq")

    def check_values(self, values: dict[str, Any]) -> None:
        if not isinstance(values["double_quant"], bool):
            raise FormatError(f"{self.name}: double_quant must be a bool, got {values['double_quant']!r}")
        if values.get("method") == "gptq" and values["double_quant"]:
            # double quantization needs every block's absmax before any is stored, GPTQ sets them one by one
            raise FormatError(f"{self.name}: method='gptq' does not combine with double_quant=True")

    @functools.lru_cache(maxsize=None)  # GPTQ rounds column by column: no host copies per call
    def _rounding_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 [16] codes in ascending value, equal values (bnb_fp4's two zeros) in code order;
        fp32 [15] midpoints between neighbours in that order), on `device`."""
        ascending = sorted(range(16), key=lambda code: (self.CODEBOOK[code], code))
        values = self.codebook(device)[ascending]
        return torch.tensor(ascending, dtype=torch.int32, device=device), (values[1:] + values[:-1]) / 2

    def codebook(self, device=None) -> torch.Tensor:
        """The 16 code values, fp32 [16] (a new tensor)."""
        return torch.tensor(self.CODEBOOK, dtype=torch.float32, device=device)

    def nearest_code(self, normalized: torch.Tensor) -> torch.Tensor:
        """fp32 values (weight / scale) -> int32 codes 0..15 of the nearest code value (a midpoint to
        the lower one; of equal values, the lower code; beyond the table's ends, the end's code)."""
        order, midpoints = self._rounding_tables(normalized.device)
        return order[torch.bucketize(normalized, midpoints, right=False)]

    def _codes(self, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """fp32 weights [...] and their block's scale (broadcast) -> int32 codes [...]; a block of
        scale 0 decodes to 0 whatever its codes, so it is divided by 1."""
        return self.nearest_code(values / torch.where(scales != 0, scales, torch.ones_like(scales)))

    # -- block scales: nf4's (subclasses with other scales override these four) -------------------
    def _block_scale(self, blocks: torch.Tensor, name: str, method: str = "rtn") -> torch.Tensor:
        """fp32 blocks [..., BLOCK] -> each block's scale fp32 [...], a value its storage holds
        (here the absmax, 1 for an all-zero block), by `method` ("rtn"; "mse" where METHODS has it)."""
        absmax = blocks.abs().amax(dim=-1)
        return torch.where(absmax > 0, absmax, torch.ones_like(absmax))

    def _scale_specs(self, groups: int, n: int, attrs: dict[str, Any]) -> dict[str, FieldSpec]:
        if attrs["double_quant"]:
            return {"absmax_q": FieldSpec(torch.int8, (groups, n)),
                    "absmax_scale": FieldSpec(torch.float32, (-(-groups * n // DQ_BLOCK),)),
                    "absmax_mean": FieldSpec(torch.float32, (1,))}
        return {"absmax": FieldSpec(torch.float32, (groups, n))}

    def _store_scales(self, scales: torch.Tensor, attrs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """fp32 block scales [G, N] -> the packed fields that hold them (`_scale_specs`)."""
        if attrs["double_quant"]:
            q, scale, mean = self._double_quantize(scales)
            return {"absmax_q": q, "absmax_scale": scale, "absmax_mean": mean}
        return {"absmax": scales}

    def block_scales(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The [G, N] block scales (a float dtype) the codes' values are multiplied with."""
        if "absmax" in tensors:
            return tensors["absmax"]
        q = tensors["absmax_q"]
        scale = tensors["absmax_scale"].repeat_interleave(DQ_BLOCK)[: q.numel()].reshape(q.shape)
        return q.float() * scale + tensors["absmax_mean"]

    @staticmethod
    def _double_quantize(absmax: torch.Tensor):
        """[G, N] fp32 -> (int8 [G, N], fp32 scales [ceil(G*N/256)], fp32 mean [1])."""
        # summed in float64: an fp32 sum's rounding depends on the device's (and thread count's)
        # summation order, and every stored value below depends on this mean (the second H100 run
        # quantized other absmax scales on the GPU than on the CPU); rounded once to fp32, the
        # float64 mean is the same on every device unless it lies within ~1e-16 of a rounding tie
        mean = absmax.double().mean().float().reshape(1)
        flat = absmax.flatten() - mean
        padded = F.pad(flat, (0, -flat.numel() % DQ_BLOCK)).reshape(-1, DQ_BLOCK)
        amax = padded.abs().amax(dim=-1)
        scale = torch.where(amax > 0, divide(amax, 127), torch.ones_like(amax))
        q = torch.round(padded / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        # clone: a view would keep the padded storage alive, and torch.save / torch.export write all of it
        return q.flatten()[: flat.numel()].reshape(absmax.shape).clone(), scale, mean

    # -- the format --------------------------------------------------------------------------
    def field_specs(self, shape: tuple[int, int], attrs: dict[str, Any]) -> dict[str, FieldSpec]:
        n, k = shape
        kp = padded_k(k, self.BLOCK)
        return {"qweight": FieldSpec(torch.int32, (n, kp // 8)), **self._scale_specs(kp // self.BLOCK, n, attrs)}

    def quantize(self, weight: torch.Tensor, *, name: str = "weight", hessian: torch.Tensor | None = None,
                 **options: Any) -> PackedWeight:
        """[N, K] float weight -> PackedWeight. hessian: fp32 [K, K] Gram matrix of the layer's
        inputs (X^T X / rows), needed by method="gptq" (GPTQ, lowbit/formats/gptq.py: each
        block's scale from the block as GPTQ's updates left it) and only by it."""
        weight = self.check_weight(weight, name)
        n, k = weight.shape
        attrs = self.resolve_attrs((n, k), options)
        method = options.get("method", "rtn")
        gptq.check_method(method, hessian, name)
        kp = padded_k(k, self.BLOCK)
        w = F.pad(weight.float(), (0, kp - k))
        if method == "gptq":
            codes, scales = self._gptq_codes(w, gptq.check_hessian(hessian, k, name), name,
                                             options.get("act_order", False))
            tensors = self._store_scales(scales.t().contiguous(), attrs)
        else:
            blocks = w.reshape(n, kp // self.BLOCK, self.BLOCK)
            tensors = self._store_scales(self._block_scale(blocks, name, method).t().contiguous(), attrs)
            # round against the scales the kernel will see (double_quant changes them)
            codes = self._codes(blocks, self.block_scales(tensors).t().unsqueeze(-1)).reshape(n, kp)
        tensors["qweight"] = bitpack.pack(codes, 4)
        return PackedWeight(self.name, (n, k), weight.dtype, attrs, tensors)

    def _gptq_codes(self, w: torch.Tensor, hessian: torch.Tensor, name: str,
                    act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded weight fp32 [N, Kp] -> (int32 codes [N, Kp], fp32 block scales [N, Kp/BLOCK]) by
        GPTQ (act_order: gptq.solve's)."""
        book = self.codebook(w.device)

        def round_column(column, scale):  # column [N], scale [N, 1] (this block's)
            codes = self._codes(column, scale[:, 0])
            return codes, book[codes.long()] * scale[:, 0]

        codes, params = gptq.solve(w, hessian, self.BLOCK, lambda block: self._block_scale(block, name).unsqueeze(-1),
                                   round_column, name, act_order)
        return codes, torch.cat(params, dim=1)

    def _dequantize(self, packed: PackedWeight) -> torch.Tensor:
        n, k = packed.shape
        kp = padded_k(k, self.BLOCK)
        values = self.codebook(packed.qweight.device)[bitpack.unpack(packed.qweight, 4, kp)]
        scales = self.block_scales(packed.tensors).t().float()  # [N, G]
        w = values.reshape(n, kp // self.BLOCK, self.BLOCK).mul_(scales.unsqueeze(-1)).reshape(n, kp)
        return w[:, :k].to(packed.dtype)

    def triton_linear(self, x2d, packed, bias):
        # double_quant: the [G, N] absmax is rebuilt in torch per call (N*K/64 values, tiny).
        return launch("dequant_linear", x2d, packed.qweight, self.block_scales(packed.tensors), None, None, bias,
                      4, self.name, self.BLOCK, 1, "float", packed.shape[1])


class NF4Format(CodebookFormat):
    """`nf4`: NormalFloat-4 codes with block-64 absmax (optionally double-quantized) scales."""

    name = "nf4"
    CODEBOOK = NF4_CODEBOOK


register_format(NF4Format())
