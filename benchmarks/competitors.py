"""The same format in other libraries, timed in the same run as lowbit (GPU only).

`competitors(name)` lists (label, build) for the lowbit format `name`: build(options, w, packed)
sets the library's layer up for the weight w [N, K] (lowbit's `packed` of it at hand) and
returns run, where run(x) computes x @ w^T with that library's kernel, or returns None when
these options have no counterpart there. Set-up is done once per weight, whatever the M.
Import or set-up failures raise; bench_gemm records them in the row instead of failing.

| lowbit                     | competitors                                                           |
|----------------------------|-----------------------------------------------------------------------|
| int2 / int4 / int8         | gemlite A16Wn (fed lowbit's own codes, scales and zero points)      |
| int4 (asymmetric)          | torchao Int4WeightOnlyConfig (same group size): tinygemm and fbgemm packings |
| int4 act="fp8" (group 128) | torchao Float8DynamicActivationInt4WeightConfig (fbgemm's FP8 x int4 kernel; preshuffled packing) |
| int8                       | torchao Int8WeightOnlyConfig                                          |
| int8 act="int8" (symmetric, per channel) | torchao Int8DynamicActivationInt8WeightConfig, gemlite A8W8_int8_dynamic, bitsandbytes LLM.int8 (threshold 0: no float16 outlier columns) |
| fp8 (per channel)          | torchao Float8WeightOnlyConfig, gemlite A16W8_FP8                     |
| fp8 act="fp8" (per channel)| torchao Float8DynamicActivationFloat8WeightConfig(PerRow), gemlite A8W8_fp8_dynamic |
| mxfp8 / mxfp4 / nvfp4      | gemlite A16W8_MXFP / A16W4_MXFP / A16W4_NVFP (weight-only)            |
| nf4                        | torchao NF4Tensor (block 64, as QLoRA-in-torchao uses it); bitsandbytes matmul_4bit (Linear4bit's inference path: its GEMV kernel at M=1; double quantization as lowbit's option says) |
| bnb_fp4                    | bitsandbytes matmul_4bit with quant_type="fp4" (as for nf4)           |
| dfloat11                   | the dfloat11 package's cupy decoder, then bf16 F.linear (its forward hook) |

gemlite autotunes a shape on its first call unless its bundled per-GPU config table covers the
GPU; it has an H100 table and none for the H200 (same sm_90 chip), so on an H200 the H100
table is loaded (`_gemlite`) instead of autotuning inside the timed run.
torchao's MX / NVFP4 configs need Blackwell (sm_100) kernels, so they are not competitors on
the Hopper GPUs this benchmark targets. int3/5/6/7, mxint8, mxfp6 and the LUT formats have no
counterpart in these libraries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _linear(w: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def _torchao(make_config):
    def build(options, w, packed):
        from torchao.quantization import quantize_

        config = make_config(options)
        if config is None:
            return None
        linear = _linear(w)
        quantize_(linear, config)
        return linear

    return build


def _torchao_int4(packing: str):
    """torchao int4 weight-only: "tile_packed_to_4d" is tinygemm (torch's own
    _weight_int4pack_mm), "plain" needs fbgemm-gpu-genai's kernels."""
    def make(options):
        from torchao.quantization import Int4WeightOnlyConfig

        if options.get("symmetric") or options.get("act"):
            return None
        return Int4WeightOnlyConfig(group_size=options.get("group_size", 128), int4_packing_format=packing)

    return make


def _torchao_int4_fp8(options):
    """W4AFP8: torchao's int4 groups of 128 with per-row E4M3 activations (fbgemm-gpu-genai)."""
    from torchao.quantization import Float8DynamicActivationInt4WeightConfig

    if options.get("act") != "fp8" or options.get("group_size", 128) != 128:
        return None
    return Float8DynamicActivationInt4WeightConfig()


def _w8a8_per_channel(options) -> bool:
    """lowbit options of the usual W8A8 int8 recipe: per-token int8 activations, symmetric
    per-channel int8 weights (what torchao's and gemlite's dynamic int8 layers do)."""
    return options.get("act") == "int8" and options.get("symmetric") is True and options.get("group_size") == -1


def _torchao_int8(options):
    from torchao.quantization import Int8WeightOnlyConfig

    return None if options.get("act") else Int8WeightOnlyConfig()


def _torchao_int8_dynamic(options):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig() if _w8a8_per_channel(options) else None


def _torchao_fp8(options):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    if options.get("block"):
        return None
    return (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if options.get("act") == "fp8"
            else Float8WeightOnlyConfig())


def _torchao_nf4(options, w, packed):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    weight = to_nf4(w, block_size=64, scaler_block_size=256)
    return lambda x: F.linear(x, weight)


def _bitsandbytes_4bit(quant_type: str):
    """bitsandbytes' Linear4bit inference path for `quant_type` ("nf4" or "fp4"), blocks of 64."""
    def build(options, w, packed):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional

        codes, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                    compress_statistics=bool(options.get("double_quant")))
        return lambda x: bnb.matmul_4bit(x, codes.t(), quant_state=state)
    return build


def _bitsandbytes_int8(options, w, packed):
    """LLM.int8 with threshold 0 (no outlier columns split off in float16): Linear8bitLt's
    inference path, per-token int8 activations times per-row int8 weights."""
    if not _w8a8_per_channel(options):
        return None
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    codes, row_absmax, _ = bnb_functional.int8_vectorwise_quant(w.half())
    state = bnb.MatmulLtState()
    state.CB, state.SCB, state.threshold, state.has_fp16_weights, state.is_training = codes, row_absmax, 0.0, False, False
    return lambda x: bnb.matmul(x, codes, state=state)


def gemlite_int_weights(packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lowbit's int-format weight as gemlite's A16Wn takes it (HQQ convention,
    w = (W_q - zero) * scale): (W_q uint8 [N, K], scales [N, K/g], zeros [N, K/g]) in the
    weight's dtype, which is how gemlite stores them (so a bf16 run rounds lowbit's fp16 scales
    to bf16). Symmetric formats get the implicit zero point 2^(b-1)."""
    from lowbit.formats import bitpack, get_format
    from lowbit.formats.integer import padded_k

    n, k = packed.shape
    bits, group = get_format(packed.format).bits, packed.attrs["group_size"]
    if padded_k(k, group) != k:
        raise ValueError(f"gemlite needs K ({k}) to be a multiple of the group size ({group})")
    codes = bitpack.unpack(packed.qweight, bits, k).to(torch.uint8)
    scales = packed.scales.t().contiguous()
    zeros = (torch.full_like(scales, 2 ** (bits - 1)) if packed.attrs["symmetric"]
             else packed.zeros.t().contiguous())
    return codes, scales.to(packed.dtype), zeros.to(packed.dtype)


def _gemlite():
    """gemlite.helper, with the bundled H100 config table loaded on other sm_90 GPUs."""
    import os

    import gemlite
    from gemlite.core import get_default_cache_config

    if get_default_cache_config() is None and torch.cuda.get_device_capability() == (9, 0):
        table = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
        if os.path.isfile(table):
            gemlite.load_config(table)
    return gemlite.helper


def _gemlite_int(options, w, packed):
    from lowbit.formats import get_format

    bits = get_format(packed.format).bits
    if bits not in (2, 4, 8) or options.get("act"):
        return None  # gemlite's A16Wn: lowbit's weight-only rows only
    codes, scales, zeros = gemlite_int_weights(packed)
    return _gemlite().A16Wn(device=w.device, dtype=w.dtype).from_weights(codes, scales, zeros, W_nbits=bits,
                                                                          group_size=packed.attrs["group_size"])


def _gemlite_from_linear(make_processor):
    def build(options, w, packed):
        processor = make_processor(options, w)
        return None if processor is None else processor.from_linear(_linear(w))

    return build


def _gemlite_int8_dynamic(options, w):
    return _gemlite().A8W8_int8_dynamic(device=w.device, dtype=w.dtype) if _w8a8_per_channel(options) else None


def _gemlite_fp8(options, w):
    helper = _gemlite()
    if options.get("block"):
        return None
    return (helper.A8W8_fp8_dynamic(device=w.device, dtype=w.dtype) if options.get("act") == "fp8"
            else helper.A16W8_FP8(device=w.device, dtype=w.dtype))


def _gemlite_mx(class_name: str):
    def make(options, w):
        if options.get("act") or options.get("rotate"):
            return None  # gemlite's weight-only processors: lowbit's weight-only rows only
        return getattr(_gemlite(), class_name)(device=w.device, dtype=w.dtype)

    return make


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
        # on torch's current stream: under CUDA-graph capture (benchmarks/timing.py) a launch on
        # cupy's own stream is not captured, so the second H100 run's graph replays timed the bf16
        # F.linear alone (dfloat11-package ~= bf16) while the decode ran once, at capture
        stream = cp.cuda.ExternalStream(torch.cuda.current_stream(w.device).cuda_stream, w.device.index or 0)
        with cp.cuda.Device(w.device.index or 0), stream:
            package._decode(grid=grid, block=(THREADS_PER_BLOCK,), shared_mem=shared, args=[
                buffers["luts"].data_ptr(), buffers["encoded_exponent"].data_ptr(),
                buffers["sign_mantissa"].data_ptr(), buffers["output_positions"].data_ptr(),
                buffers["gaps"].data_ptr(), out.data_ptr(), buffers["luts"].shape[0], n_bytes, n_elements])

    return decode, out


def _dfloat11_package(options, w, packed):
    decode, out = dfloat11_package_decoder(w)

    def run(x):
        decode()
        return F.linear(x, out.view(w.shape))

    return run


#: lowbit format name -> [(competitor label, build(options, w, packed) -> run(x) | None)]
COMPETITORS = {
    "int2": [("gemlite-a16w2", _gemlite_int)],
    "int4": [("torchao-int4wo-tinygemm", _torchao(_torchao_int4("tile_packed_to_4d"))),
             ("torchao-int4wo-fbgemm", _torchao(_torchao_int4("plain"))), ("gemlite-a16w4", _gemlite_int),
             ("torchao-int4-fp8-dynamic", _torchao(_torchao_int4_fp8))],
    "int8": [("torchao-int8wo", _torchao(_torchao_int8)), ("gemlite-a16w8", _gemlite_int),
             ("torchao-int8-dynamic", _torchao(_torchao_int8_dynamic)),
             ("gemlite-a8w8-int8", _gemlite_from_linear(_gemlite_int8_dynamic)),
             ("bitsandbytes-int8", _bitsandbytes_int8)],
    "fp8": [("torchao-float8", _torchao(_torchao_fp8)), ("gemlite-fp8", _gemlite_from_linear(_gemlite_fp8))],
    "mxfp8": [("gemlite-a16w8-mxfp", _gemlite_from_linear(_gemlite_mx("A16W8_MXFP")))],
    "mxfp4": [("gemlite-a16w4-mxfp", _gemlite_from_linear(_gemlite_mx("A16W4_MXFP")))],
    "nvfp4": [("gemlite-a16w4-nvfp", _gemlite_from_linear(_gemlite_mx("A16W4_NVFP")))],
    "nf4": [("torchao-nf4", _torchao_nf4), ("bitsandbytes-nf4", _bitsandbytes_4bit("nf4"))],
    "bnb_fp4": [("bitsandbytes-fp4", _bitsandbytes_4bit("fp4"))],
    "dfloat11": [("dfloat11-package", _dfloat11_package)],
}


def competitors(name: str) -> list:
    """[(label, build)] for the lowbit format `name` (empty when no library has it)."""
    return COMPETITORS.get(name, [])
