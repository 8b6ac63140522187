"""The same format in other libraries, timed in the same run as lowbit (GPU only).

`competitor(name, options, w, x)` returns (label, fn) where fn() computes x @ w^T with that
library's kernel for the lowbit format `name`, or None when no library here has the format.
Import or set-up failures raise; bench_gemm records them in the row instead of failing.
Mapping: int4 -> torchao Int4WeightOnlyConfig (same group size); int8 -> torchao
Int8WeightOnlyConfig; fp8 -> torchao Float8WeightOnlyConfig, fp8 with act="fp8" -> torchao
Float8DynamicActivationFloat8WeightConfig (per-row); dfloat11 -> the dfloat11 package's cupy
decoder followed by bf16 F.linear (what its forward hook does). gemlite is not wired yet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _torchao(config, w: torch.Tensor, x: torch.Tensor):
    from torchao.quantization import quantize_

    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    quantize_(linear, config)
    return lambda: linear(x)


def dfloat11_package_decoder(w: torch.Tensor):
    """(decode, out): decode() runs the dfloat11 package's cupy kernel on `w` encoded by the
    package's own encoder, writing bf16 into `out` [w.numel()] (its forward hook's launch)."""
    import math

    import cupy as cp
    from dfloat11 import dfloat11 as package

    from lowbit.integrations.dfloat11_package import (BYTES_PER_THREAD, THREADS_PER_BLOCK, package_encode,
                                                      package_encoder)

    buffers = {k: v.to(w.device) for k, v in package_encode(package_encoder(), [w.cpu().flatten()]).items()}
    n_elements, n_bytes = w.numel(), buffers["encoded_exponent"].numel()
    positions = buffers["output_positions"].cpu().view(torch.int32)
    shared = THREADS_PER_BLOCK * 4 + 4 + int((positions[1:] - positions[:-1]).max()) * 2
    out = torch.empty(n_elements, dtype=torch.bfloat16, device=w.device)
    grid = (math.ceil(n_bytes / (THREADS_PER_BLOCK * BYTES_PER_THREAD)),)

    def decode():
        with cp.cuda.Device(w.device.index or 0):
            package._decode(grid=grid, block=(THREADS_PER_BLOCK,), shared_mem=shared, args=[
                buffers["luts"].data_ptr(), buffers["encoded_exponent"].data_ptr(),
                buffers["sign_mantissa"].data_ptr(), buffers["output_positions"].data_ptr(),
                buffers["gaps"].data_ptr(), out.data_ptr(), buffers["luts"].shape[0], n_bytes, n_elements])

    return decode, out


def _dfloat11_package(w: torch.Tensor, x: torch.Tensor):
    decode, out = dfloat11_package_decoder(w)

    def run():
        decode()
        return F.linear(x, out.view(w.shape))

    return run


def competitor(name: str, options: dict, w: torch.Tensor, x: torch.Tensor):
    """(label, fn) or None; see the module docstring."""
    if name == "int4" and options.get("symmetric") is not True:
        from torchao.quantization import Int4WeightOnlyConfig

        return "torchao-int4wo", _torchao(Int4WeightOnlyConfig(group_size=options.get("group_size", 128)), w, x)
    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return "torchao-int8wo", _torchao(Int8WeightOnlyConfig(), w, x)
    if name == "fp8" and not options.get("block"):
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

        if options.get("act") == "fp8":
            return "torchao-float8-dyn-rowwise", _torchao(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), w, x)
        return "torchao-float8wo", _torchao(Float8WeightOnlyConfig(), w, x)
    if name == "dfloat11":
        return "dfloat11-package", _dfloat11_package(w, x)
    return None
