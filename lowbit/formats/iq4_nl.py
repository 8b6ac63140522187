"""iq4_nl: llama.cpp's IQ4_NL, 4-bit codes into a fixed non-linear table of 16 integers with one
float16 scale per block of 32 weights along K (the torch spec).

    w = scale * KVALUES[code],  KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10,
                                           1, 13, 25, 38, 53, 69, 89, 113)

The table is ggml's kvalues_iq4nl, so GGUF IQ4_NL blocks hold these codes and scales bit for bit
and IQ4_XS blocks (d times a 6-bit signed sub-block scale) hold them up to the float16 rounding of
the scale (lowbit/integrations/gguf_blocks.py). 4.5 bits/weight.

Quantizer (method="rtn"): each block's scale is its signed extreme over -127 rounded to float16,
so the weight of largest |w| lands on code 0 (the table's long end: -127 against 113 at the other),
whatever its sign; each weight / scale then goes to the nearest table value, a midpoint to the
lower. An all-zero block gets scale 0 (no table value is 0; every code decodes to 0 there). K is
zero-padded to a multiple of 32.
method="mse" (llama.cpp's search, without its importance weights): besides the rtn scale, 15
trial scales put the extreme on -127 + t, t = -7 ... 7; each trial's nearest codes q get the least
squares scale sum(w q) / sum(q^2), rounded to float16, and the block keeps the fitted scale whose
codes give the smallest squared error below rtn's (the rtn scale otherwise). The codes stored
are the nearest under the kept scale, as for rtn, which can only lower the error further: a
block's error is never above rtn's.
method="gptq": the codes by GPTQ on the layer's input Hessian (lowbit/formats/gptq.py), each
block's scale by the rtn rule on the block as GPTQ's updates left it.

Packed fields: qweight int32 [N, Kp/8] (one 4-bit plane, bitpack.py), scales float16 [Kp/32, N].
Layout, rounding and kernels are the codebook formats' (`CodebookFormat`, nf4.py).
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import WeightError
from . import register_format
from .base import FieldSpec
from .division import divide
from .nf4 import CodebookFormat

#: ggml's kvalues_iq4nl (ggml-common.h), code 0..15 -> value
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4_NL_CODEBOOK = tuple(float(v) for v in KVALUES)
SCALE_DTYPE = torch.float16
#: method="mse" tries the extreme on KVALUES[0] + t for |t| <= SEARCH_STEPS (llama.cpp's ntry = 7)
SEARCH_STEPS = 7


class IQ4NLFormat(CodebookFormat):
    """`iq4_nl`: llama.cpp's IQ4_NL table with float16 block-32 scales (no options)."""

    name = "iq4_nl"
    CODEBOOK = IQ4_NL_CODEBOOK
    BLOCK = 32
    ATTRS = ()
    DEFAULTS: dict[str, Any] = {}
    METHODS = ("rtn", "mse", "gptq")

    def check_values(self, values: dict[str, Any]) -> None:
        pass  # no stored options

    def _block_scale(self, blocks: torch.Tensor, name: str, method: str = "rtn") -> torch.Tensor:
        """fp32 blocks [..., 32] -> float16 scales as fp32 [...]: signed extreme / -127 ("rtn"), or
        the best of it and the trial scales ("mse", see the module docstring)."""
        extreme = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        scales = divide(extreme, KVALUES[0]).to(SCALE_DTYPE)  # KVALUES[0] = -127
        if not bool(torch.isfinite(scales).all()):
            largest = float(torch.finfo(SCALE_DTYPE).max) * -KVALUES[0]
            raise WeightError(f"{name}: values too large for float16 block scales (|w| up to "
                              f"{float(extreme.abs().max()):.3g}, the most is {largest:.3g})")
        scales = scales.float()
        return self._searched_scales(blocks, extreme, scales) if method == "mse" else scales

    def _searched_scales(self, blocks: torch.Tensor, extreme: torch.Tensor, rtn: torch.Tensor) -> torch.Tensor:
        book = self.codebook(blocks.device)

        def values(scales):  # the table values of the nearest codes under `scales` [...]
            return book[self._codes(blocks, scales.unsqueeze(-1)).long()]

        best = rtn
        best_error = (blocks - values(rtn) * rtn.unsqueeze(-1)).square().sum(dim=-1)
        for t in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
            q = values(divide(extreme, KVALUES[0] + t))
            fitted = ((blocks * q).sum(dim=-1) / q.square().sum(dim=-1)).to(SCALE_DTYPE).float()
            # the error of these codes under the fitted scale; the nearest codes under it (what is
            # stored) do at least as well, so a block never ends above its rtn error
            error = (blocks - q * fitted.unsqueeze(-1)).square().sum(dim=-1)
            better = error < best_error  # a fit past float16 (inf) never is
            best, best_error = torch.where(better, fitted, best), torch.where(better, error, best_error)
        return best

    def _scale_specs(self, groups: int, n: int, attrs: dict[str, Any]) -> dict[str, FieldSpec]:
        return {"scales": FieldSpec(SCALE_DTYPE, (groups, n))}

    def _store_scales(self, scales: torch.Tensor, attrs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"scales": scales.to(SCALE_DTYPE)}  # exact: `_block_scale` rounded them

    def block_scales(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["scales"]


register_format(IQ4NLFormat())
