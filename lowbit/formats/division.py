"""Division by a constant that rounds the same on every device.

On CUDA, PyTorch computes `tensor / python_number` as `tensor * (1 / number)` (one rounding of
the reciprocal, then one of the product), which differs from the correctly rounded quotient in
the last bit for some values; the CPU divides. A quantizer's scales feed roundings (codes, the
float16 / E4M3 scale casts), so one such bit can change a stored code, and a model quantized on
the GPU would not hold the bits the torch spec gives on the CPU. Dividing by a tensor divides
on both devices.
"""
from __future__ import annotations

import torch


def divide(values: torch.Tensor, divisor: float) -> torch.Tensor:
    """values / divisor, correctly rounded on every device (same shape and dtype as values)."""
    return values / torch.full((), divisor, dtype=values.dtype, device=values.device)
