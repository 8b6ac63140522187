"""Compile lowbit's kernels for Hopper (sm_90) ahead of time, without a GPU.

Run as a script (with TRITON_INTERPRET unset, so kernels are real JIT functions):
    python -m tests.kernels.hopper_codegen '[["gemv", 4, true, "bf16"], ...]'
prints {"gemv-4-True-bf16": {"ptx": ..., "cubin_bytes": n} | {"error": ...}, ...} as JSON.
Signatures and alignment specialisation mirror what the JIT sees for real shapes.
"""
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.kernels import dequant_gemm as kernels

HOPPER = GPUTarget("cuda", 90, 32)
ACT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_variant(path: str, bits: int, symmetric: bool, act: str):
    kernel = kernels._gemv_kernel if path == "gemv" else kernels._gemm_kernel
    constexprs = dict(BITS=bits, SYMMETRIC=symmetric, HAS_BIAS=True, GROUP_SIZE=128)
    if path == "gemv":
        constexprs.update(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128)
    else:
        constexprs.update(DOT_FP32=act == "fp32", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
    pointer_types = {"x_ptr": ACT[act], "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
                     "bias_ptr": ACT[act], "out_ptr": ACT[act]}
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        signature[param.name] = pointer_types.get(param.name, "i32")
        if param.name not in ("M", "tiles_per_split"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs),
                          target=HOPPER, options={"num_warps": 4})


def main(argv):
    results = {}
    for path, bits, symmetric, act in json.loads(argv[1]):
        key = f"{path}-{bits}-{symmetric}-{act}"
        try:
            compiled = compile_variant(path, bits, symmetric, act)
            results[key] = {"ptx": compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"])}
        except Exception as exc:  # reported to the test, which fails on it
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(sys.argv)
