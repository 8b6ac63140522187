"""Compile lowbit's kernels for Hopper (sm_90) ahead of time, without a GPU.

Run as a script (with TRITON_INTERPRET unset, so kernels are real JIT functions):
    python -m tests.kernels.hopper_codegen '[["gemv", 4, true, "bf16", "int"], ["act_quant", "int8"], ...]'
prints {"gemv-4-True-bf16-int": {"ptx": ..., "cubin_bytes": n, "registers": r, "stack_bytes": s} |
{"error": ...}, ...} as JSON (registers per thread and stack-frame bytes per thread, where ptxas
spills registers; from Triton's bundled cuobjdump). Signatures and alignment specialisation
mirror what the JIT sees for real shapes.
"""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.kernels import dequant_gemm as kernels
from lowbit.formats.dfloat11 import CODE_BITS
from lowbit.kernels import act_quant, dequant_gemv, dfloat11, lut_gemm
from lowbit.kernels.runtime import FP_FUSION

HOPPER = GPUTarget("cuda", 90, 32)
ACT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "int8": "*i8", "e4m3": "*fp8e4nv"}
#: activation codes (quantized activations: act="int8" / "fp8" layers)
ACT_CODES = ("int8", "e4m3")
GEMV_BLOCK_N = kernels.gemv_block_n(1)  # gemv_config's rows per program at M=1
GEMV_K = 4096  # the GEMV is compiled per K: a Llama-3-8B q_proj's
GEMM_TILE = 64  # the GEMM's BLOCK_N and BLOCK_K (the launcher's defaults)
SPLIT_K_POINTERS = {"ws_ptr": "*fp32", "counters_ptr": "*i32"}  # lowbit/kernels/split_k.py (kernels compiled split)


def cuobjdump(cubin: bytes, flag: str) -> str:
    """Triton's bundled cuobjdump run with `flag` ("-sass", "-res-usage") on a compiled kernel."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """{"registers": per thread, "stack_bytes": its stack frame per thread (where ptxas spills registers)}."""
    usage = cuobjdump(cubin, "-res-usage")
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1))}


def _compile(kernel, pointer_types: dict, constexprs: dict, unaligned=(), maxnreg: int | None = None):
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        signature[param.name] = pointer_types.get(param.name, "i32")
        if param.name not in unaligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs),
                          target=HOPPER, options={"num_warps": 4, **FP_FUSION,
                                                  **({"maxnreg": maxnreg} if maxnreg else {})})


def compile_act_quant(encoding: str):
    return _compile(act_quant._act_quant_kernel,
                    {"x_ptr": "*bf16", "q_ptr": "*u8" if encoding == "e4m3" else "*i8", "s_ptr": "*fp32"},
                    {"ENCODING": encoding, "BLOCK": 1024}, unaligned=("stride_sm",))


def compile_lut(bits: int):
    return _compile(lut_gemm._lut_gemv_kernel,
                    {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "bias_ptr": "*bf16",
                     "out_ptr": "*bf16", **SPLIT_K_POINTERS},
                    {"BITS": bits, "HAS_BIAS": True, "GROUP_SIZE": 128, "SPLIT": True, "BLOCK_M": 1, "BLOCK_N": 32,
                     "BLOCK_K": 128},
                    unaligned=("M", "tiles_per_split"))


def compile_dfloat11(kind: str, act: str = "fp32", chunk: int | None = None, stage: int | None = None):
    """kind "decode": the multi-layer decoder (aligned layers); "gemv": the fused decode + GEMV (M=1, split-K;
    by default fp32 activations and output, so any 16-bit global store would be a decoded weight). chunk,
    stage: other than the launchers' defaults. The stream's length is a multiple of 16 words, as
    the encoder pads it."""
    if kind == "decode":
        return _compile(dfloat11._decode_kernel, {"layers_ptr": "*i64", "out_ptr": "*i16"},
                        {"CODE_BITS": CODE_BITS, "BLOCK": dfloat11.DECODE_BLOCK,
                         "CHUNK": chunk or dfloat11.DECODE_CHUNK, "STORE": dfloat11.DECODE_STORE,
                         "STAGE": stage or dfloat11.DECODE_STAGE,
                         "ALIGNED": True})
    return _compile(dfloat11._decode_gemv_kernel,
                    {"x_ptr": ACT[act], "words_ptr": "*i32", "sign_ptr": "*u8", "offsets_ptr": "*i32",
                     "table_ptr": "*i16", "bias_ptr": ACT[act], "out_ptr": ACT[act], **SPLIT_K_POINTERS},
                    {"SEGMENT": 256, "CODE_BITS": CODE_BITS, "HAS_BIAS": True, "SPLIT": True, "BLOCK_M": 1,
                     "BLOCK_N": dfloat11.GEMV_BLOCK_N, "CHUNK": chunk or dfloat11.GEMV_CHUNK,
                     "STAGE": stage or dfloat11.GEMV_STAGE},
                    unaligned=("M", "segments_per_row", "segments_per_split"))


def variant_column_k(bits: int, element: str, scale_kind: str = "float", one_bit_planes: bool = False) -> int:
    """The GEMV column `compile_variant` compiles a variant with: the launcher's default for its
    group (int: 128; fp8: per channel, GEMV_K; microscaling: E8M0 blocks of 32, NVFP4's E4M3 of 16)
    and narrowest bit plane (one bit wide in the LUT formats' layout)."""
    return kernels.gemv_column_k(1 if one_bit_planes else bits, _group(element, scale_kind))


def _group(element: str, scale_kind: str) -> int:
    return {"e8m0": 32, "e4m3": 16}.get(scale_kind, 128 if element == "int" else GEMV_K)


def compile_variant(path: str, bits: int, symmetric: bool, act: str, element: str, scale_kind: str = "float",
                    one_bit_planes: bool = False, gemm_block_m: int = 64, gemv_block_m: int = 1,
                    group_size: int | None = None, scale_pointer: str | None = None, gemv_stages: int = 1,
                    maxnreg: int | None = None, gemv_block_n: int = GEMV_BLOCK_N, gemv_prefetch: bool = False,
                    fp8_cvt: bool = True):
    """int: fp16 group scales (128); fp8: fp32 per-channel scales; microscaling (scale_kind e8m0:
    32-element blocks, e4m3: NVFP4's 16-element blocks with a tensor scale); one_bit_planes: the
    LUT formats' layout (int codes). The GEMV with the launcher's default tiles at M=1 for a
    Llama-3-8B q_proj (K = GEMV_K; GEMV_BLOCK_N rows, columns of 32 K or the group); the GEMM with 64 x 64 x
    GEMM_BLOCK_M tiles (64: Hopper's wgmma; the launcher's default at M <= 16 is 16). act "int8" /
    "e4m3": the GEMM on int8 / E4M3 activation codes (act="int8" / "fp8" layers; bf16 output). gemv_block_m: the GEMV's
    activation rows (the launcher takes M up to 4 in one program); group_size: another group than
    the default (int groups of 16: GEMM tiles span 4 groups, GEMV columns are 16 long);
    scale_pointer: the scales' pointer type where it is not the element's default (iq4_nl's
    float16 scales of a codebook); gemv_stages: the GEMV tile loop's software-pipeline stages
    (the launcher's default 1: none; a tuned config's num_stages); maxnreg: a tuned config's cap on
    registers per thread (default: none); gemv_block_n: the GEMV's rows per program;
    gemv_prefetch: a tuned config's PREFETCH (the next tile asked of L2 a tile ahead); fp8_cvt:
    E4M3 weights and scales converted in hardware, as the launcher does on sm_89 on (False: GPUs
    before)."""
    kernel = dequant_gemv._gemv_kernel if path == "gemv" else kernels._gemm_kernel
    group = group_size or _group(element, scale_kind)
    constexprs = dict(BITS=bits, ELEMENT=element, SYMMETRIC=symmetric, HAS_BIAS=True, GROUP_SIZE=group,
                      SCALE_GROUP_N=1, SCALE_KIND=scale_kind, HAS_TENSOR_SCALE=scale_kind == "e4m3",
                      ONE_BIT_PLANES=one_bit_planes)
    if path == "gemv":
        constexprs.update(WORDS_PER_BIT=GEMV_K // 32, SPLIT=True, PADDED_K=False, BLOCK_M=gemv_block_m,
                          BLOCK_N=gemv_block_n,
                          COLUMNS=kernels.gemv_columns({}),
                          COLUMN_K=kernels.gemv_column_k(1 if one_bit_planes else bits, group),
                          STAGES=gemv_stages, PREFETCH=gemv_prefetch, FP8_CVT=fp8_cvt and "e4m3" in (element, scale_kind),
                          PTX=True)
    else:
        constexprs.update(DOT_FP32=act == "fp32", ACT_CODES=act if act in ACT_CODES else "", SPLIT=True, BLOCK_M=gemm_block_m,
                          BLOCK_N=GEMM_TILE, BLOCK_K=GEMM_TILE, FP8_CVT=fp8_cvt and "e4m3" in (element, scale_kind),
                          PTX=True)
    scale_type = "*u8" if scale_kind != "float" else "*fp16" if element == "int" else "*fp32"
    out = "*bf16" if act in ACT_CODES else ACT[act]
    pointer_types = {"x_ptr": ACT[act], "qw_ptr": "*i32", "s_ptr": scale_pointer or scale_type, "z_ptr": scale_type,
                     "ts_ptr": "*fp32", "xs_ptr": "*fp32", "bias_ptr": out, "out_ptr": out, **SPLIT_K_POINTERS}
    return _compile(kernel, pointer_types, constexprs, unaligned=("M", "tiles_per_split", "one"), maxnreg=maxnreg)


def main(argv):
    results = {}
    for variant in json.loads(argv[1]):
        key = "-".join(str(v) for v in variant)
        try:
            if variant[0] == "act_quant":
                compiled = compile_act_quant(variant[1])
            elif variant[0] == "dfloat11":
                compiled = compile_dfloat11(*variant[1:])
            elif variant[0] == "lut":
                compiled = compile_lut(variant[1])
            else:
                compiled = compile_variant(*variant)
            results[key] = {"ptx": compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"]),
                            **resource_usage(compiled.asm["cubin"])}
        except Exception as exc:  # reported to the test, which fails on it
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(sys.argv)
