"""Matmul of the integer formats with quantized activations: act="int8" (W8A8 for int8, W4A8 for
int4, ...) and act="fp8" (W4AFP8): the per-M choice between int8 / FP8 tensor cores and the
weight-only dequant kernel.

Path rule (`quantized_act_matmul`), the same as the fp8 formats' (lowbit/kernels/fp8_w8a8.py):
  * M < W8A8_MIN_M: the weight-only GEMV / GEMM of `dequant_gemm`. Small M is memory-bound: the
    weight bytes are the same on both paths, and quantizing the activations would add a launch.
    Activations stay in 16 bits here, so these rows are (slightly) more accurate than the
    quantized-activation reference.
  * M >= W8A8_MIN_M on a GPU with the tensor cores (int8: sm80+; FP8: held back, see ACT_KINDS),
    or in Triton's interpreter: the Triton kernel of lowbit/kernels/act_quant.py writes int8 / E4M3 activations
    and fp32 per-token scales, then `dequant_gemm`'s GEMM multiplies them with the centred weight
    codes (int8 x int8 -> int32, or E4M3 x E4M3 -> fp32) per scale group (`_code_group_sum`) and
    applies the group, token and weight scales in fp32.
  * act="fp8" with codes wider than 5 bits (int6..int8: centred codes past 16 are not exact in
    E4M3) always takes the weight-only kernel.
"""
from __future__ import annotations

import functools

import torch

from .act_quant import quantize_activations_triton
from .dequant_gemm import E4M3_MAX_BITS, check_operands, dequant_matmul
from .fp8_w8a8 import W8A8_MIN_M
from .runtime import interpreting

#: act -> (the activation encoding of lowbit/kernels/act_quant.py, the least GPU capability whose
#: tensor cores the path rule sends that encoding's GEMM to, or None: not on GPUs). E4M3's GEMM
#: (FP8 tensor cores, sm89+) is held back: on the first GPU it ran on (an H100) it missed the
#: reference at Llama-3-8B's gate_proj with groups of 64 / 128 and bf16 activations, while passing
#: per channel in fp32 (tests/kernels/test_quantized_act.py, the `gpu` tests); the cause is not
#: found yet. Until those tests pass on a GPU, act="fp8" layers run the weight-only kernel there.
ACT_KINDS = {"int8": ("int8", (8, 0)), "fp8": ("e4m3", None)}


@functools.lru_cache(maxsize=None)
def act_tensor_cores(act: str, device: torch.device) -> bool:
    """Whether the path rule runs act's GEMM on quantized activations on `device`: GPUs of the
    capability in ACT_KINDS (none for E4M3 for now), or the interpreter on CPU."""
    if device.type == "cuda":
        least = ACT_KINDS[act][1]
        return least is not None and torch.cuda.get_device_capability(device) >= least
    return device.type == "cpu" and interpreting()


def takes_quantized_act_path(act: str, bits: int, m: int, device: torch.device) -> bool:
    """The path rule for an intN layer with act="int8" / "fp8": True = the GEMM on quantized
    activations, False = weight-only on the 16-bit ones."""
    if act == "fp8" and bits > E4M3_MAX_BITS:
        return False
    return m >= W8A8_MIN_M and act_tensor_cores(act, device)


def quantized_act_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         bias: torch.Tensor | None, *, act: str, bits: int, group_size: int,
                         in_features: int) -> torch.Tensor:
    """[M, K] x (fp16/bf16/fp32) times an "int" bit-plane weight (as `dequant_matmul` takes it)
    quantized with act="int8" / "fp8" -> [M, N] in x.dtype, by the path rule in the module docstring."""
    check_operands(x, qweight, scales.shape[0] * group_size, bits, in_features)
    if takes_quantized_act_path(act, bits, x.shape[0], x.device):
        xq, xs = quantize_activations_triton(x, in_features, None, ACT_KINDS[act][0])
        return dequant_matmul(xq, qweight, scales, zeros, bias, bits=bits, group_size=group_size,
                              in_features=in_features, act_scales=xs, out_dtype=x.dtype)
    return dequant_matmul(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size, in_features=in_features)
