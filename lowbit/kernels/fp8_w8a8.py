"""FP8 matmul for the `fp8` / `fp8_e5m2` formats: the per-M choice between W8A8 on FP8 tensor
cores and the weight-only (W8A16) dequant kernel.

Path rule (`fp8_matmul`), for a layer quantized with act="fp8" on CUDA:
  * M < W8A8_MIN_M: weight-only Triton kernel (GEMV / GEMM of `dequant_gemm`). Small M is
    memory-bound: both paths read one byte per weight, and the W8A8 path would add an
    activation-quantization launch and cuBLAS's fixed cost. Activations stay in 16 bits here,
    so these rows are (slightly) more accurate than the W8A8 reference.
  * M >= W8A8_MIN_M on a GPU whose `torch._scaled_mm` passes a one-time probe (sm89+; per
    channel: row-wise scales; block=128: DeepSeek-style 1x128 / 128x128 block scales): the
    Triton kernel of lowbit/kernels/act_quant.py writes E4M3 activations and fp32 scales, then
    `torch._scaled_mm` (row-major A, column-major B) multiplies on FP8 tensor cores.
  * Anything else (no FP8 tensor cores, other block sizes, N not a multiple of 16): weight-only.
Without act="fp8" it is always the weight-only kernel.
"""
from __future__ import annotations

import functools
import logging

import torch

from ..errors import InputError
from .act_quant import quantize_activations_triton
from .dequant_gemm import dequant_matmul

logger = logging.getLogger(__name__)

W8A8_MIN_M = 32


def scaled_mm_w8a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, block: int | None) -> torch.Tensor:
    """W8A8 product on FP8 tensor cores: [M, K] x, qweight float8 [N, Kp], scales fp32 [1, N]
    (per channel) or [Kp/128, N/128] (block=128). Returns bfloat16 [M, N] (cuBLAS's row-wise
    scaled GEMM writes bf16)."""
    xq, xs = quantize_activations_triton(x, qweight.shape[1], block, "e4m3")
    if block is None:
        return torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=scales, out_dtype=torch.bfloat16)
    from torch.nn.functional import ScalingType, scaled_mm

    # cuBLAS's block-scaled GEMM reads both scale tensors K-block-major (column-major here).
    return scaled_mm(xq, qweight.t(), xs.t().contiguous().t(), ScalingType.BlockWise1x128,
                     scales.t().contiguous().t(), ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)


@functools.lru_cache(maxsize=None)
def w8a8_supported(device: torch.device, weight_dtype: torch.dtype, block: int | None) -> bool:
    """Whether `scaled_mm_w8a8` runs and is right on `device` for this weight dtype and block:
    sm89+ only, then a one-time probe on an awkward shape (M=40, K=384, N=256) against the
    fp32 emulation. A failing probe is logged once and the weight-only kernel is used instead."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9) or block not in (None, 128):
        return False
    from ..formats.activations import cast_fp8, dequantize_activations, quantize_activations_fp8, safe_scale

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(40, 384, device=device, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(256, 384, device=device, generator=gen)
    fp8_max = torch.finfo(weight_dtype).max
    if block is None:
        scales = safe_scale(w.abs().amax(dim=1), fp8_max).unsqueeze(0)
        w_scale = scales.t()
    else:
        scales = safe_scale(w.reshape(2, 128, 3, 128).abs().amax(dim=(1, 3)), fp8_max).t().contiguous()
        w_scale = scales.t().repeat_interleave(128, 0).repeat_interleave(128, 1)
    qweight = cast_fp8(w / w_scale, weight_dtype)
    expected = dequantize_activations(*quantize_activations_fp8(x, 384, block)) @ (qweight.float() * w_scale).t()
    try:
        got = scaled_mm_w8a8(x, qweight, scales, block).float()
    except (RuntimeError, NotImplementedError, ValueError, ImportError) as exc:  # ImportError: no F.scaled_mm
        logger.warning("W8A8 torch._scaled_mm unavailable on %s (%s, block=%s): %s; using the weight-only "
                       "FP8 kernel", torch.cuda.get_device_name(device), weight_dtype, block, exc)
        return False
    err = float((got - expected).abs().max() / expected.abs().max())
    if not err < 2e-2:
        logger.warning("W8A8 torch._scaled_mm gave wrong results on %s (%s, block=%s; max rel err %.3g); "
                       "using the weight-only FP8 kernel", torch.cuda.get_device_name(device), weight_dtype, block, err)
        return False
    return True


def takes_w8a8_path(m: int, n: int, device: torch.device, weight_dtype: torch.dtype, block: int | None) -> bool:
    """The path rule for an act="fp8" layer: True = W8A8 on FP8 tensor cores, False = W8A16."""
    return m >= W8A8_MIN_M and n % 16 == 0 and w8a8_supported(device, weight_dtype, block)


def fp8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
               element: str, block: int | None, act_fp8: bool, in_features: int) -> torch.Tensor:
    """[M, K] x (fp16/bf16/fp32) times an FP8 weight qweight [N, Kp] -> [M, N] in x.dtype,
    by the path rule in the module docstring. scales fp32 [1, N] or [Kp/block, ceil(N/block)]."""
    if x.dim() != 2 or x.shape[1] != in_features:
        raise InputError(f"expected x of shape [M, {in_features}], got {tuple(x.shape)}")
    n, kp = qweight.shape
    if act_fp8 and takes_w8a8_path(x.shape[0], n, x.device, qweight.dtype, block):
        y = scaled_mm_w8a8(x, qweight, scales, block).to(x.dtype)
        return y if bias is None else y + bias
    # 8-bit elements read as int32 words (4 per word, LSB first), like the int8 bit plane.
    return dequant_matmul(x, qweight.view(torch.int32), scales, None, bias, bits=8, group_size=block or kp,
                          in_features=in_features, element=element, scale_group_n=block or 1)
