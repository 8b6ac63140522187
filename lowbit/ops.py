"""lowbit.linear(): dispatch to the Triton kernel (CUDA) or the torch reference (CPU).

The Triton launchers are registered as custom ops (`lowbit::dequant_linear`, ...) with fake
implementations, so torch.compile traces through lowbit layers without a graph break; the
formats call them through `launch`, which skips the dispatcher when nothing traces the call. Where
autograd records, `FrozenWeightLinear` gives x (and bias) their gradients on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import InputError
from .formats import get_format
from .formats.base import FLOAT_DTYPES
from .packed import PackedWeight

BACKENDS = (None, "torch", "triton")
_IMPLEMENTATIONS: dict = {}  # op name -> its Python implementation, for eager launches


def _lowbit_op(implementation):
    """Register `implementation` as the custom op lowbit::<its name> (returned, for register_fake)
    and keep it for `launch`."""
    _IMPLEMENTATIONS[implementation.__name__] = implementation
    return torch.library.custom_op(f"lowbit::{implementation.__name__}", mutates_args=())(implementation)


def runs_eagerly(x: torch.Tensor) -> bool:
    """Whether a launch on x can skip the dispatcher: a plain tensor with nothing tracing it (not
    torch.compile, torch.export or torch.jit.trace, no fake / functional tensor, dispatch mode or
    functorch transform), where the op would only forward to its implementation."""
    return (not torch.compiler.is_compiling() and type(x) is torch.Tensor and not torch.jit.is_tracing()
            and not torch._C._len_torch_dispatch_stack() and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def launch(name: str, *args):
    """Call lowbit's custom op `name` (as torch.ops.lowbit.<name>(*args)). Eagerly its Python
    implementation is called directly: the custom-op dispatcher costs ~35 us per call on a slow
    host (measured on the CPU machine, about what the launcher itself costs), more than a decode
    GEMV runs on the GPU. Traced, the op is called, so torch.compile / export see one node."""
    if runs_eagerly(args[0]):
        return _IMPLEMENTATIONS[name](*args)
    return getattr(torch.ops.lowbit, name)(*args)


@_lowbit_op
def dequant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    tensor_scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    element: str,
    group_size: int,
    scale_group_n: int,
    scale_kind: str,
    in_features: int,
) -> torch.Tensor:
    """[M, K] x times a bit-plane packed weight -> [M, N] through the generic Triton dequant
    kernel (arguments as `lowbit.kernels.dequant_gemm.dequant_matmul` takes them)."""
    from .kernels.dequant_gemm import dequant_matmul

    return dequant_matmul(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size,
                          in_features=in_features, element=element, scale_group_n=scale_group_n,
                          scale_kind=scale_kind, tensor_scale=tensor_scale)


def _fake_linear(x: torch.Tensor, qweight: torch.Tensor, *args) -> torch.Tensor:
    """Fake (meta) implementation shared by every linear op: [M, K] x, [N, ...] qweight -> [M, N]."""
    return x.new_empty((x.shape[0], qweight.shape[0]))


dequant_linear.register_fake(_fake_linear)


@_lowbit_op
def lut_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """[M, K] x times a lutN weight -> [M, N]: the dequant GEMV / GEMM on its one-bit planes, or the
    table-lookup kernel where tuning measured it faster (lowbit/kernels/lut_gemm.py)."""
    from .kernels.lut_gemm import lut_matmul

    return lut_matmul(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size, in_features=in_features)


lut_linear.register_fake(_fake_linear)


@_lowbit_op
def fp8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    element: str,
    block: int,
    act_fp8: bool,
    in_features: int,
) -> torch.Tensor:
    """[M, K] x times an FP8 weight -> [M, N]: W8A8 tensor cores or the weight-only Triton
    kernel, chosen per M inside the op (so the choice never breaks a torch.compile graph)."""
    from .kernels.fp8_w8a8 import fp8_matmul

    return fp8_matmul(x, qweight, scales, bias, element=element, block=block or None, act_fp8=act_fp8,
                      in_features=in_features)


fp8_linear.register_fake(_fake_linear)


@_lowbit_op
def quantized_act_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    act: str,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """[M, K] x times an intN weight quantized with act="int8" / "fp8" -> [M, N]: int8 / FP8
    tensor cores or the weight-only Triton kernel, chosen per M inside the op."""
    from .kernels.quantized_act import quantized_act_matmul

    return quantized_act_matmul(x, qweight, scales, zeros, bias, act=act, bits=bits, group_size=group_size,
                                in_features=in_features)


quantized_act_linear.register_fake(_fake_linear)


@_lowbit_op
def dfloat11_linear(
    x: torch.Tensor,
    sign_mantissa: torch.Tensor,
    exponent_code: torch.Tensor,
    segment_offsets: torch.Tensor,
    decode_table: torch.Tensor,
    bias: Optional[torch.Tensor],
    segment: int,
    code_bits: int,
) -> torch.Tensor:
    """[M, K] x times a dfloat11 weight -> [M, N]: fused decode + GEMV for small M, otherwise
    Triton decode to bf16 + F.linear."""
    from .kernels.dfloat11 import dfloat11_matmul

    return dfloat11_matmul(x, exponent_code, sign_mantissa, segment_offsets, decode_table, bias,
                           segment=segment, code_bits=code_bits)


dfloat11_linear.register_fake(_fake_linear)


@_lowbit_op
def dfloat11_decode(
    sign_mantissa: torch.Tensor,
    exponent_code: torch.Tensor,
    segment_offsets: torch.Tensor,
    decode_table: torch.Tensor,
    segment: int,
    code_bits: int,
    backend: str,
) -> torch.Tensor:
    """A dfloat11 weight -> its bf16 [N, K] values: the reference decoder (backend "torch") or the
    Triton one ("triton"). An op so that torch.compile and torch.export see one node: traced, the
    reference's loop over a segment's weights would unroll into thousands of nodes per layer."""
    if backend == "torch":
        from .formats.dfloat11 import decode

        return decode(sign_mantissa, exponent_code, segment_offsets, decode_table, segment, code_bits)
    from .kernels.dfloat11 import decode_weight

    return decode_weight(exponent_code, sign_mantissa, segment_offsets, decode_table, segment=segment,
                         code_bits=code_bits)


@dfloat11_decode.register_fake
def _fake_dfloat11_decode(sign_mantissa: torch.Tensor, *args) -> torch.Tensor:
    return torch.empty_like(sign_mantissa, dtype=torch.bfloat16)


class FrozenWeightLinear(torch.autograd.Function):
    """y = lowbit.linear(x, W, bias) with gradients for x and bias; the packed weight is frozen.

    grad_x = grad_y @ W_hat in x.dtype, W_hat = the format's dequantized [N, K] weight, rebuilt in
    the backward pass (nothing [N, K] is kept between the passes). For weight-only formats this is
    the exact gradient of the reference F.linear(x, W_hat); where the format also quantizes x
    (act=...) it is the straight-through estimator, as in quantization-aware training: the rounding
    of x has no useful derivative (zero almost everywhere; autograd through the reference's scale
    computation gives noise). Same gradient on the torch and Triton backends."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight, backend: str) -> torch.Tensor:
        ctx.packed, ctx.backend = packed, backend
        return _dispatch(x, packed, bias, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = input_gradient(grad_y, ctx.packed, ctx.backend)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def input_gradient(grad_y: torch.Tensor, packed: PackedWeight, backend: str) -> torch.Tensor:
    """grad_x = grad_y @ W_hat for y = lowbit.linear(x, W) on `backend`: [..., N] -> [..., K] in
    grad_y's dtype (W_hat: the format's `backward_weight`, rebuilt here, not kept)."""
    weight = get_format(packed.format).backward_weight(packed, backend)
    return torch.matmul(grad_y, weight.to(grad_y.dtype))


def default_backend(device: torch.device) -> str:
    """The backend `lowbit.linear(backend=None)` takes on `device`: Triton on CUDA, else the torch reference."""
    return "triton" if device.type == "cuda" else "torch"


def as_under_autocast(product, x: torch.Tensor, *args):
    """product(x, *args) as nn.Linear computes under torch.autocast: in the autocast dtype, with
    autocast off inside (lowbit's ops know nothing of it, and the reference's own fp32 products
    must stay fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        return product(x.to(torch.get_autocast_dtype(x.device.type)), *args)


def records_gradient(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd records a product with x and bias (grad mode on and one of them needs it)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def _dispatch(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """The forward product on `backend` ("torch" or "triton"), inputs already checked."""
    fmt = get_format(packed.format)
    if backend == "torch":
        return fmt.reference_linear(x, packed, bias)

    from .kernels.runtime import check_triton_device

    check_triton_device(x.device)
    n, k = packed.shape
    y = fmt.triton_linear(x.reshape(-1, k), packed, bias)
    return y.reshape(*x.shape[:-1], n)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a packed W of shape [N, K].

    x: [..., K] float16 / bfloat16 / float32; returns [..., N] in x.dtype (under torch.autocast,
    in its dtype, as nn.Linear).
    backend: None = Triton on CUDA, torch reference elsewhere; "triton" forces the kernel
    (CPU tensors need TRITON_INTERPRET=1); "torch" forces the reference
    F.linear(x, dequantize(W)).
    Differentiable in x and bias on both backends (`FrozenWeightLinear`); W gets no gradient.
    """
    if not isinstance(packed, PackedWeight):
        raise InputError(f"packed must be a PackedWeight (Format.quantize's result), got {type(packed).__name__}")
    n, k = packed.shape
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise InputError(f"x dtype {x.dtype} is not one of {FLOAT_DTYPES}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise InputError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={k}")
    if x.device != packed.device:
        raise InputError(f"x is on {x.device} but the packed weight is on {packed.device}")
    if torch.is_autocast_enabled(x.device.type):
        return as_under_autocast(linear, x, packed, bias, backend)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise InputError(f"bias must be a tensor of shape ({n},), got {got}")
        if bias.device != x.device:
            raise InputError(f"bias is on {bias.device} but x is on {x.device}")
        bias = bias.to(x.dtype)
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend is None:
        backend = default_backend(x.device)
    if records_gradient(x, bias):
        return FrozenWeightLinear.apply(x, bias, packed, backend)
    return _dispatch(x, packed, bias, backend)
