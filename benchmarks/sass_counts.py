#!/usr/bin/env python3
"""Static cost of lowbit's hot loops on Hopper, without a GPU: SASS instructions per weight.

Every kernel variant is compiled for sm_90 the way tests/kernels/hopper_codegen.py does it
(Triton's bundled ptxas, the signatures and alignment the JIT sees for real shapes), then
disassembled with Triton's bundled cuobjdump. Its hot loop, the largest loop that contains no
other loop, is counted: SASS instructions per weight per thread, the kinds that decide where the
time goes (global and shared loads, shuffles, barriers, int -> float converts, integer-ALU
instructions, integer multiply-adds), and registers.

These are issue-slot counts, not timings. A GEMV at M=1 must stay under a few instructions per
weight to run at memory speed (an H200 issues ~3.4e13 thread-instructions/s and streams an int4
weight at ~1e13 weights/s), and under half as many integer-ALU instructions, which issue at half
that rate (as do integer multiply-adds, on another pipe); bench_gemm.py on a GPU is what
measures speed.

    python benchmarks/sass_counts.py [--kernels gemv-int4 dfloat11-gemv ...] [--out-dir DIR]

Output: JSON {"env", "results"} + markdown, benchmarks/results/sass-sm90-<date>.* by default.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import triton  # noqa: E402

from lowbit.kernels import dfloat11  # noqa: E402
from tests.kernels import hopper_codegen as codegen  # noqa: E402

#: weights per thread in one trip of the LUT kernel's K loop: hopper_codegen's tiles (BLOCK_N=32,
#: BLOCK_K=128, BLOCK_M=1) over 4 warps
LUT_PER_THREAD = 32 * 128 // 128


def _gemv(bits: int, symmetric: bool, element: str, scale_kind: str = "float", one_bit_planes: bool = False):
    """A dequant GEMV variant: one trip of its K loop is one column (COLUMN_K weights) of each of
    the thread's BLOCK_N rows."""
    weights = codegen.GEMV_BLOCK_N * codegen.variant_column_k(bits, element, scale_kind, one_bit_planes)
    return (lambda: codegen.compile_variant("gemv", bits, symmetric, "bf16", element, scale_kind, one_bit_planes),
            weights)


def _gemm(bits: int, symmetric: bool, element: str, scale_kind: str = "float"):
    """The tensor-core GEMM with the launcher's default tiles for 4 < M <= 16 (BLOCK_M=16, 64 x 64
    weights per K step over 4 warps)."""
    return (lambda: codegen.compile_variant("gemm", bits, symmetric, "bf16", element, scale_kind, gemm_block_m=16),
            codegen.GEMM_TILE * codegen.GEMM_TILE // 128)


#: name -> (compile the variant, weights one trip of its hot loop covers per thread)
KERNELS = {
    # the integer formats' default: asymmetric (a zero point per group); bf16 activations throughout
    "gemv-int2": _gemv(2, False, "int"),
    "gemv-int4": _gemv(4, False, "int"),
    "gemv-int4-symmetric": _gemv(4, True, "int"),
    "gemv-int6": _gemv(6, False, "int"),
    "gemv-int8": _gemv(8, False, "int"),
    "gemv-fp8": _gemv(8, True, "e4m3"),
    "gemv-mxint8": _gemv(8, True, "sint", "e8m0"),
    "gemv-mxfp4": _gemv(4, True, "e2m1", "e8m0"),
    "gemv-nvfp4": _gemv(4, True, "e2m1", "e4m3"),
    "gemv-nf4": _gemv(4, True, "codebook"),  # bnb_fp4 runs the same variant
    # the LUT formats: the dequant GEMV on their one-bit planes (the default), the table-lookup kernel
    "gemv-lut2": _gemv(2, False, "int", one_bit_planes=True),
    "gemv-lut4": _gemv(4, False, "int", one_bit_planes=True),
    "lookup-lut2": (lambda: codegen.compile_lut(2), LUT_PER_THREAD),
    "lookup-lut4": (lambda: codegen.compile_lut(4), LUT_PER_THREAD),
    # the tensor-core GEMM at 4 < M <= 16: one trip dequantizes a 64 x 64 weight tile into shared memory
    "gemm-int4": _gemm(4, False, "int"),
    "gemm-int8": _gemm(8, False, "int"),
    "gemm-fp8": _gemm(8, True, "e4m3"),
    "gemm-mxfp4": _gemm(4, True, "e2m1", "e8m0"),
    "gemm-nvfp4": _gemm(4, True, "e2m1", "e4m3"),
    # one lane (row or segment) per thread; the hot loop decodes one chunk per lane
    # bf16 activations, as a bf16 model's (each lane converts every activation it uses)
    "dfloat11-gemv": (lambda: codegen.compile_dfloat11("gemv", "bf16"), dfloat11.GEMV_CHUNK),
    "dfloat11-decode": (lambda: codegen.compile_dfloat11("decode"), dfloat11.DECODE_CHUNK),
}
#: instruction kinds reported per weight (SASS opcodes without their modifiers; LDGSTS: cp.async)
KINDS = {"global loads": ("LDG", "LDGSTS"), "shared loads": ("LDS", "LDSM"), "shared stores": ("STS",),
         "shuffles": ("SHFL",), "barriers": ("BAR",), "int->float": ("I2F", "I2FP"), "fp32 fma": ("FFMA",),
         # the integer ALU pipe (add / logic / shift / compare / select / move, not IMAD): 16 lanes per SM
         # quarter on Volta to Hopper, so it takes one warp instruction every other cycle
         "integer ALU": ("IADD3", "LEA", "LOP3", "MOV", "PLOP3", "PRMT", "SEL", "SGXT", "SHF", "ISETP", "FSEL"),
         # integer multiply-adds (also the compiler's IMAD.MOV / IMAD.SHL / IMAD.X) run on the FMA-heavy
         # pipe, also 16 lanes per SM quarter: a second half-rate bound, beside the ALU's
         "IMAD": ("IMAD",)}
_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*);")


def hot_loop(sass: str) -> list[str]:
    """Opcodes of the hot loop: of the loops (backward branches' ranges) that contain no other
    loop, the first at least half as long as the longest. The dequant GEMV compiles its K loop
    twice, the unmasked loop over whole tiles first and then the slightly longer masked one
    for the last, partial tile, which runs at most once per program."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for line in sass.splitlines() if (m := _LINE.match(line))]
    loops = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    if not innermost:
        return []
    longest = max(hi - lo for lo, hi in innermost)
    lo, hi = min(span for span in innermost if 2 * (span[1] - span[0]) >= longest)
    return [opcode for address, opcode, _ in code if lo <= address <= hi]


def count(name: str) -> dict:
    """The hot-loop counts of kernel `name` (a key of KERNELS)."""
    build, weights = KERNELS[name]
    compiled = build()
    loop = hot_loop(codegen.cuobjdump(compiled.asm["cubin"], "-sass"))
    opcodes = collections.Counter(op.split(".")[0] for op in loop)
    return {"kernel": name, "weights_per_trip": weights, "instructions_per_weight": round(len(loop) / weights, 2),
            "per_weight": {kind: round(sum(opcodes[op] for op in ops) / weights, 2) for kind, ops in KINDS.items()},
            "registers": codegen.resource_usage(compiled.asm["cubin"])["registers"]}


def markdown(rows: list[dict]) -> str:
    lines = ["# Hot-loop SASS per weight (sm_90, compiled offline; instruction counts, not timings)", "",
             "| kernel | instructions / weight | " + " | ".join(KINDS) + " | registers |",
             "|---|---|" + "---|" * len(KINDS) + "---|"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['instructions_per_weight']} | "
                     + " | ".join(str(row["per_weight"][kind]) for kind in KINDS) + f" | {row['registers']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=list(KERNELS))
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must compile for the GPU, not run in the interpreter")
    rows = [count(name) for name in args.kernels]
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    env = {"target": "sm_90", "triton": triton.__version__, "date": day,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip() or None}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"sass-sm90-{day}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "results": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows))
    sys.stdout.write(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
