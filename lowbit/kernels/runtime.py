"""Where Triton kernels can run: compiled on CUDA, or Triton's interpreter on CPU tensors."""
from __future__ import annotations

import functools
import os

import torch

from ..errors import KernelUnavailableError

# Fused multiply-adds, asked for at every launch (and in the offline codegen checks): Triton 3.9
# warns at each kernel's first compile, when neither the launch nor TRITON_DEFAULT_FP_FUSION says,
# that 3.10 will turn them off by default. The kernels were tuned, and their SASS counted, with them on.
FP_FUSION = {"enable_fp_fusion": True}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host-side arithmetic: plain Python, where triton.cdiv (a
    constexpr function in recent Triton) costs microseconds per call on every launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2, in plain Python."""
    return 1 << max(n - 1, 0).bit_length()


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1 before kernels were defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(device: torch.device) -> None:
    """Raise KernelUnavailableError unless a Triton kernel can run on tensors on `device`."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a Linux dependency
        raise KernelUnavailableError(f"backend='triton' needs the triton package: {exc}") from None
    if device.type == "cuda":
        if interpreting():
            raise KernelUnavailableError(
                "TRITON_INTERPRET=1 is set: Triton would interpret kernels on CUDA tensors; unset it"
            )
        return
    if device.type == "cpu":
        if not interpreting():
            raise KernelUnavailableError(
                "backend='triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing lowbit (or use backend='torch')"
            )
        return
    raise KernelUnavailableError(f"backend='triton' cannot run on device {device}")


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (1 for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
