"""Matmul of the integer formats with act="int8" (W8A8 for int8, W4A8 for int4, ...): the per-M
choice between int8 tensor cores and the weight-only dequant kernel.

Path rule (`int8_act_matmul`), the same as the fp8 formats' (lowbit/kernels/fp8_w8a8.py):
  * M < W8A8_MIN_M: the weight-only GEMV / GEMM of `dequant_gemm`. Small M is memory-bound: the
    weight bytes are the same on both paths, and quantizing the activations would add a launch.
    Activations stay in 16 bits here, so these rows are (slightly) more accurate than the
    W8A8 reference.
  * M >= W8A8_MIN_M on a GPU with int8 tensor cores (sm80+), or in Triton's interpreter: the
    Triton kernel of lowbit/kernels/act_quant.py writes int8 activations and fp32 per-token
    scales, then `dequant_gemm`'s GEMM multiplies int8 x int8 -> int32 per scale group
    (`_int8_tile_product`) and applies the group, token and weight scales in fp32.
"""
from __future__ import annotations

import functools

import torch

from .act_quant import quantize_activations_triton
from .dequant_gemm import check_operands, dequant_matmul
from .fp8_w8a8 import W8A8_MIN_M
from .runtime import interpreting


@functools.lru_cache(maxsize=None)
def int8_tensor_cores(device: torch.device) -> bool:
    """Whether Triton's int8 dot runs on `device`: sm80+ GPUs, or the interpreter on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and interpreting()


def takes_int8_path(m: int, device: torch.device) -> bool:
    """The path rule for an act="int8" layer: True = int8 tensor cores, False = weight-only."""
    return m >= W8A8_MIN_M and int8_tensor_cores(device)


def int8_act_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bias: torch.Tensor | None, *, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """[M, K] x (fp16/bf16/fp32) times an "int" bit-plane weight (as `dequant_matmul` takes it)
    -> [M, N] in x.dtype, by the path rule in the module docstring."""
    check_operands(x, qweight, scales.shape[0] * group_size, bits, in_features)
    if takes_int8_path(x.shape[0], x.device):
        xq, xs = quantize_activations_triton(x, in_features, None, "int8")
        return dequant_matmul(xq, qweight, scales, zeros, bias, bits=bits, group_size=group_size,
                              in_features=in_features, act_scales=xs, out_dtype=x.dtype)
    return dequant_matmul(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size, in_features=in_features)
