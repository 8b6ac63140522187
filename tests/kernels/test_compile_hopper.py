"""Compile every kernel variant for Hopper (sm_90) without a GPU, and check the generated code.

Triton's interpreter accepts programs the real compiler rejects, and shows nothing of the code a
GPU would run. Triton ships ptxas, so the kernels are compiled ahead of time (in a subprocess
with the interpreter off) exactly as the JIT would on an H100, and the PTX is checked for the
properties speed depends on.
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lowbit.formats.dfloat11 import CODE_BITS
from lowbit.kernels import dequant_gemm as kernels
from lowbit.kernels import dfloat11

from . import hopper_codegen

REPO = Path(__file__).resolve().parents[2]
# A variant's bit decoding and its activation loads are independent parts of the kernel, and the
# GEMV's unrolled K loops take 2-5 s each to compile (most of this module's time on 2 cores): each
# width once, the (symmetric, activation) pairs rotated so that every activation dtype meets odd
# and even widths and both zero-point kinds. The GEMM (about a second) takes every width in bf16
# and fp16; its fp32 path (1.5-2 s: a full-precision dot) an odd and an even width.
GEMV_INT_PAIRS = {2: [(True, "bf16")], 3: [(False, "fp16")], 4: [(True, "fp32"), (False, "fp16"), (True, "fp16")],
                  5: [(False, "bf16")], 6: [(True, "fp16")], 7: [(False, "fp32")], 8: [(True, "bf16")]}
INT_VARIANTS = [["gemv", b, s, a, "int"] for b, pairs in GEMV_INT_PAIRS.items() for s, a in pairs]
INT_VARIANTS += [["gemm", b, s, a, "int"] for b in range(2, 9) for s, a in [(True, "bf16"), (False, "fp16")]]
INT_VARIANTS += [["gemm", 3, False, "fp32", "int"], ["gemm", 4, True, "fp32", "int"], ["gemm", 4, False, "bf16", "int"]]
# the FP8 GEMV's decoders in bf16; its fp16 activations load as the int GEMV's do
FP8_VARIANTS = [["gemv", 8, True, "bf16", e] for e in ("e4m3", "e5m2")]
FP8_VARIANTS += [["gemm", 8, True, a, e] for a in ("bf16", "fp16") for e in ("e4m3", "e5m2")]
MX_VARIANTS = [[path, bits, True, "bf16", element, scale] for path in ("gemv", "gemm")
               for bits, element, scale in [(4, "e2m1", "e8m0"), (4, "e2m1", "e4m3"), (6, "e2m3", "e8m0"),
                                            (8, "sint", "e8m0"), (8, "e4m3", "e8m0")]]
# nf4 and bnb_fp4: the 16-entry codebook lookup
CODEBOOK_VARIANTS = [[path, 4, True, "bf16", "codebook"] for path in ("gemv", "gemm")]
# the table-lookup kernel, and the dequant GEMV on the LUT formats' one-bit planes
LUT_VARIANTS = [["lut", b] for b in range(1, 5)] + [["gemv", b, False, "bf16", "int", "float", True] for b in range(1, 5)]
# the launchers' defaults, and with stream words fetched one at a time (stage 1) to compare
DF11_VARIANTS = [["dfloat11", "decode"], ["dfloat11", "gemv"]]
DF11_VARIANTS += [["dfloat11", kind, "fp32", None, 1] for kind in ("decode", "gemv")]
# act="int8" / "fp8": the GEMM on int8 / E4M3 activation codes (E4M3: weight codes up to 5 bits)
INT8_ACT_VARIANTS = [["gemm", b, s, "int8", "int"] for b, s in [(8, True), (4, False), (6, False), (3, True)]]
FP8_ACT_VARIANTS = [["gemm", b, s, "e4m3", "int"] for b, s in [(4, True), (4, False), (5, False), (2, True)]]
VARIANTS = (INT_VARIANTS + FP8_VARIANTS + MX_VARIANTS + CODEBOOK_VARIANTS + LUT_VARIANTS + DF11_VARIANTS + INT8_ACT_VARIANTS
            + FP8_ACT_VARIANTS + [["act_quant", "e4m3"], ["act_quant", "int8"]])
# the GEMV at M = 2 and 4 (BLOCK_M activation rows per program): compile_variant's gemv_block_m
GEMV_BLOCK_M_VARIANTS = [["gemv", 4, False, "bf16", "int", "float", False, 64, m] for m in (2, 4)]
GEMV_BLOCK_M_VARIANTS += [["gemv", 8, True, "fp16", "e4m3", "float", False, 64, 4]]
# integer groups of 16 (GGUF's Q2_K / Q3_K / Q6_K): GEMM tiles span 4 groups, GEMV columns are 16 long
GROUP_16_VARIANTS = [["gemm", 6, True, "bf16", "int", "float", False, 64, 1, 16],
                     ["gemm", 2, False, "fp16", "int", "float", False, 64, 1, 16],
                     ["gemv", 6, True, "bf16", "int", "float", False, 64, 1, 16]]
# the GEMV's tile loop software-pipelined (a tuned config's num_stages = 2)
GEMV_PIPELINED_VARIANTS = [["gemv", 4, False, "bf16", "int", "float", False, 64, 1, None, None, 2]]
# the int8 GEMV (asymmetric) at 16 rows per program (the M=1 default until the second H100 run, a
# row count the tuner tries: 152 registers uncapped), and under a tuned config's maxnreg of 128
GEMV_MAXNREG_VARIANTS = [["gemv", 8, False, "bf16", "int", "float", False, 64, 1, None, None, 1, None, 16],
                         ["gemv", 8, False, "bf16", "int", "float", False, 64, 1, None, None, 1, 128, 16]]
# the GEMV's tile loop asking L2 for the next tile (a tuned config's PREFETCH): the int6 GEMV (two bit
# planes, zero points) and lut3 (three one-bit planes)
GEMV_PREFETCH_VARIANTS = [["gemv", 6, False, "bf16", "int", "float", False, 64, 1, None, None, 1, None, 8, True],
                          ["gemv", 3, False, "bf16", "int", "float", True, 64, 1, None, None, 1, None, 8, True]]
# the E4M3 GEMV as GPUs before sm_89 run it: no hardware conversion (the launcher's fp8_conversions)
GEMV_E4M3_INTEGER_VARIANT = ["gemv", 8, True, "bf16", "e4m3", "float", False, 64, 1, None, None, 1, None, 8, False,
                             False]
# iq4_nl: the codebook in blocks of 32 with float16 scales (nf4's above: fp32 scales, a wider column)
IQ4_NL_VARIANTS = [[path, 4, True, "bf16", "codebook", "float", False, 64, 1, 32, "*fp16"] for path in ("gemv", "gemm")]


# one xdist worker runs this module (`make test` uses --dist loadgroup), so the variants compile
# once (~2 minutes on 2 cores with a cold Triton cache); the fixture is session-scoped so that a
# worker never compiles them twice, even if its tests of this module are not run back to back
pytestmark = pytest.mark.xdist_group("hopper-codegen")


@pytest.fixture(scope="session")
def hopper():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.hopper_codegen",
                           json.dumps(VARIANTS + GEMV_BLOCK_M_VARIANTS + GROUP_16_VARIANTS + IQ4_NL_VARIANTS
                                      + GEMV_PIPELINED_VARIANTS + GEMV_MAXNREG_VARIANTS + GEMV_PREFETCH_VARIANTS
                                      + [GEMV_E4M3_INTEGER_VARIANT])],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"this triton install cannot compile for CUDA: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _ptx(hopper, path, bits=None, symmetric=None, act=None, element="int", scale_kind=None, one_bit_planes=False):
    if path in ("lut", "dfloat11", "act_quant"):
        return _checked(hopper[f"{path}-{bits}"])
    key = f"{path}-{bits}-{symmetric}-{act}-{element}"
    key += f"-{scale_kind}" if scale_kind else ""
    key += "-True" if one_bit_planes else ""
    return _checked(hopper[key])


def _checked(result):
    assert "error" not in result, result.get("error")
    assert result["cubin_bytes"] > 0
    return result["ptx"]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_compiles_for_sm90(hopper, variant):
    _ptx(hopper, *variant)


@pytest.mark.parametrize("act", ["bf16", "fp16"])
def test_gemm_uses_hopper_tensor_cores(hopper, act):
    assert "wgmma.mma_async" in _ptx(hopper, "gemm", 4, act == "bf16", act)


def _loop_bodies(ptx):
    """The PTX of each loop, by LLVM's block annotations: a loop's header block ("Loop Header")
    and the blocks marked "in Loop: Header=" it, in their order in the code (a loop body with a
    branch in it may be laid out around its header). An inner loop's blocks are its own, not
    its outer loop's."""
    loops, current = {}, None
    for line in ptx.splitlines():
        label = re.match(r"\s*\$L__(BB\w+):(.*)", line)  # blocks (not the debug info's $L__tmp labels)
        if label:
            header = re.search(r"Header=(\w+)", label.group(2))
            current = header.group(1) if header else label.group(1) if "Loop Header" in label.group(2) else None
        if current is not None:
            loops.setdefault(current, []).append(line)
    return ["\n".join(lines) for lines in loops.values()]


#: the GEMV's K-loop loads (the split-K reduction's partial sums load with .cg): width and vector size
_GEMV_LOAD = re.compile(r"ld\.global(?:\.nc)?(?:\.v([24]))?\.b(16|32)\b")


def _gemv_k_loops(ptx):
    """The GEMV's two K loops (whole tiles, then the masked last tile): the loops that load."""
    return [body for body in _loop_bodies(ptx) if _GEMV_LOAD.search(body)]


def _loads(body):
    """(load instructions, 32-bit words loaded) of a K loop."""
    found = _GEMV_LOAD.findall(body)
    return len(found), sum(int(vec or 1) * int(width) / 32 for vec, width in found)


def _runs(bits, symmetric, act, element, scale_kind=None, one_bit_planes=False, block_m=1, column_k=None,
          scale_bytes=None, rows=hopper_codegen.GEMV_BLOCK_N):
    """The contiguous runs (bytes) a thread reads from memory in one K-loop trip: each row's
    words of each bit plane of its column, the column's activations (of each activation row),
    and the thread's rows' scales (and zero points) of its group. rows: the thread's rows
    (BLOCK_N)."""
    column_k = column_k or hopper_codegen.variant_column_k(bits, element, scale_kind or "float", one_bit_planes)
    if one_bit_planes:
        planes = [1] * bits
    elif element == "int" and bits in (6, 7):
        planes = [4, 2] + [1] * (bits - 6)  # the 2-bit plane of the top bits, nibble-aligned
    elif element in ("int", "e2m3"):
        planes = [w for w in (8, 4, 2, 1) if bits & w] if bits < 8 else [8]
    else:
        planes = [bits]
    runs = [column_k * width // 8 for width in planes for _ in range(rows)]
    runs += [column_k * (4 if act == "fp32" else 2)] * block_m
    scale_bytes = scale_bytes or (1 if scale_kind in ("e8m0", "e4m3") else 2 if element == "int" else 4)
    runs += [rows * scale_bytes] * (2 if element == "int" and not symmetric else 1)
    return runs


def _expected_loads(bits, symmetric, act, element, scale_kind=None, one_bit_planes=False, block_m=1,
                    column_k=None, scale_bytes=None, rows=hopper_codegen.GEMV_BLOCK_N):
    """(load instructions, words) of one K-loop trip when every thread reads each of its `_runs`
    once, in 128-bit pieces, plus one 32-bit table lookup per code for the codebook formats."""
    runs = _runs(bits, symmetric, act, element, scale_kind, one_bit_planes, block_m, column_k, scale_bytes, rows)
    column_k = column_k or hopper_codegen.variant_column_k(bits, element, scale_kind or "float", one_bit_planes)
    lookups = rows * column_k if element == "codebook" else 0
    return sum(-(-run // 16) for run in runs) + lookups, sum(run / 4 for run in runs) + lookups


def _check_gemv_k_loops(ptx, expected):
    k_loops = _gemv_k_loops(ptx)
    assert len(k_loops) == 2
    for body in k_loops:
        assert _loads(body) == expected
        assert not re.search(r"shfl\.sync|(?:ld|st)\.shared|(?:ld|st)matrix|bar\.sync", body)
        assert not re.search(r"cvt\.rn\.f32\.[su]32", body)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] == "gemv"], ids=lambda v: "-".join(map(str, v)))
def test_gemv_k_loop_stays_in_registers(hopper, variant):
    """The dequant GEMV's two K loops (whole tiles, then the masked last tile) each load every
    packed word, activation and scale of a thread's column once, in 128-bit vectors where a
    run is that long (`dequant_gemv._word`, `_column_x`, `_row_params`: a warp's load then
    covers whole cache lines, where a 32- or 16-bit load per value used a quarter or less of
    each line it touched), and a 32-bit lookup per code for the codebook formats. Weights and
    activations share one layout, so nothing crosses threads or passes through shared memory
    inside the loop: no shuffles, shared-memory accesses or barriers; and integer codes become
    floats by an OR and a reinterpret, never an int -> float convert (quarter rate on NVIDIA GPUs)."""
    _, bits, symmetric, act, element, *rest = variant
    _check_gemv_k_loops(_ptx(hopper, *variant), _expected_loads(bits, symmetric, act, element, *rest))


@pytest.mark.parametrize("variant", GEMV_BLOCK_M_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_gemv_k_loop_stays_in_registers_at_m_up_to_4(hopper, variant):
    """With 2 or 4 activation rows per program the K loops still keep everything in registers
    (under Triton 3.6 the activation load's M went across threads until it too loaded with the
    column axis first, `dequant_gemv._load_by_column`) and load each activation row's column once."""
    _, bits, symmetric, act, element, scale_kind, one_bit_planes, _, block_m = variant
    _check_gemv_k_loops(_checked(hopper["-".join(map(str, variant))]),
                        _expected_loads(bits, symmetric, act, element, scale_kind, one_bit_planes, block_m))


@pytest.mark.parametrize("variant", GEMV_PIPELINED_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_gemv_tile_loop_pipelines_its_loads_with_num_stages(hopper, variant):
    """num_stages = 2 (a tuning choice, `dequant_gemv._gemv_kernel`'s STAGES): the whole-tile K
    loop copies the next tile's words, activations and scales into shared memory with 16-byte
    cp.async while it computes on the current one, the same 128-bit pieces the unpipelined loop
    loads into registers (`_expected_loads`), and reads them back with 128-bit shared loads."""
    _, bits, symmetric, act, element, *_ = variant
    expected, _ = _expected_loads(bits, symmetric, act, element)
    ptx = _checked(hopper["-".join(map(str, variant))])
    pipelined = [body for body in _loop_bodies(ptx) if "cp.async" in body]
    assert len(pipelined) == 1
    assert len(re.findall(r"cp\.async\.cg\.shared\.global\S* \[[^]]+\], \[[^]]+\], 0x10", pipelined[0])) == expected
    assert len(re.findall(r"ld\.shared\.v4\.b32", pipelined[0])) == expected
    assert not _GEMV_LOAD.search(pipelined[0])  # nothing loaded from global memory into registers


@pytest.mark.parametrize("variant", GEMV_PREFETCH_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_gemv_tile_loop_prefetches_the_next_tile_into_l2(hopper, variant):
    """PREFETCH (a tuning choice): each whole-tile trip asks L2 for every 32-byte sector of the
    next tile's runs (`_runs`: words of each bit plane, activations, scales, zero points) with
    `prefetch.global.L2`, which writes no register; the trip's own loads are those of the
    loop without it, nothing goes through shared memory, and nothing spills. The masked last
    tile has no next one: its loop prefetches nothing."""
    _, bits, symmetric, act, element, scale_kind, one_bit_planes, *_ = variant
    result = hopper["-".join(map(str, variant))]
    ptx = _checked(result)
    _check_gemv_k_loops(ptx, _expected_loads(bits, symmetric, act, element, scale_kind, one_bit_planes))
    whole_tiles, last_tile = _gemv_k_loops(ptx)
    runs = _runs(bits, symmetric, act, element, scale_kind, one_bit_planes)
    assert len(re.findall(r"prefetch\.global\.L2 \[", whole_tiles)) == sum(-(-run // 32) for run in runs)
    assert "prefetch" not in last_tile
    assert result["stack_bytes"] == 0


def test_gemv_maxnreg_caps_its_registers(hopper):
    """A tuned config's maxnreg (benchmarks/tune.py tries 168 and 128) reaches the compiler: the
    int8 GEMV at 16 rows takes 152 registers per thread uncapped (three 128-thread programs per
    SM; 255 before its bytes became floats by one PRMT, `dequant_gemv._byte_fma`) and 128 under a
    cap of 128 (four per SM), its K loops' loads unchanged. ptxas then spills 56-72 bytes per
    thread (Triton 3.6 / 3.9), a cost the tuner weighs by measuring; uncapped, nothing."""
    uncapped, capped = (hopper["-".join(map(str, variant))] for variant in GEMV_MAXNREG_VARIANTS)
    _check_gemv_k_loops(_checked(capped), _expected_loads(8, False, "bf16", "int", rows=16))
    assert uncapped["registers"] > 128 >= capped["registers"]
    assert uncapped["stack_bytes"] == 0


@pytest.mark.parametrize("variant", GROUP_16_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_groups_of_16_compile_to_the_same_inner_loops(hopper, variant):
    """Integer groups of 16: the GEMM's K loop still multiplies on Hopper tensor cores (its tile's
    four groups scaled in registers); the GEMV's (columns of 16) loads each packed word once and
    keeps everything in registers."""
    ptx = _checked(hopper["-".join(map(str, variant))])
    if variant[0] == "gemm":
        assert any("wgmma.mma_async" in body for body in _loop_bodies(ptx))
        return
    _, bits, symmetric, act, element, *_ = variant
    _check_gemv_k_loops(ptx, _expected_loads(bits, symmetric, act, element, column_k=16))


@pytest.mark.parametrize("variant", IQ4_NL_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_iq4_nl_blocks_of_32_compile_to_the_codebook_inner_loops(hopper, variant):
    """iq4_nl (16-value table, float16 scale per 32): the GEMM's K loop multiplies on Hopper tensor
    cores; the GEMV's (columns of one block) loads each packed word once and looks up each code in
    the table (a 32-bit load per code), loads its rows' float16 scales as vectors, nothing
    through shared memory and no int -> float convert."""
    ptx = _checked(hopper["-".join(map(str, variant))])
    if variant[0] == "gemm":
        assert any("wgmma.mma_async" in body for body in _loop_bodies(ptx))
        return
    _check_gemv_k_loops(ptx, _expected_loads(4, True, "bf16", "codebook", column_k=kernels.gemv_column_k(4, 32),
                                             scale_bytes=2))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] == "gemv" and v[4] in ("e4m3", "e5m2", "e2m1")],
                         ids=lambda v: "-".join(map(str, v)))
def test_gemv_small_floats_convert_from_their_own_register(hopper, variant):
    """A decoded pair of small floats (two fp16 halves of one register) converts to fp32 in place
    (`_fp16_pair_to_fp32`, inline PTX), where tl ops let LLVM pack two rows' halves into one
    register first, a prmt.b32 per two weights. The only prmt in the K loops takes each row's
    one-byte block scale (E8M0 / E4M3) out of the 128-bit vector the rows' scales load in."""
    _, bits, _, act, element, *rest = variant
    rows = hopper_codegen.GEMV_BLOCK_N
    column_k = hopper_codegen.variant_column_k(bits, element, *rest)
    byte_scales = rows if rest and rest[0] in ("e8m0", "e4m3") else 0
    k_loops = _gemv_k_loops(_ptx(hopper, *variant))
    assert len(k_loops) == 2
    for body in k_loops:
        assert len(re.findall(r"cvt\.f32\.f16", body)) >= rows * column_k
        assert len(re.findall(r"prmt\.b32", body)) <= byte_scales


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] == "gemm" and "e4m3" in v[4:6]],
                         ids=lambda v: "-".join(map(str, v)))
def test_e4m3_gemm_converts_in_hardware(hopper, variant):
    """On sm_89 on (here sm_90) the GEMM's weight tiles convert E4M3 codes in hardware, one
    cvt.rn.f16x2.e4m3x2 per code (`dequant_gemv._e4m3_value`: 32 per thread of a 64 x 64 tile
    over 128 threads), and NVFP4's E4M3 block scales too (2 per thread: 64 rows x 4 blocks)."""
    _, _, _, _, element, *rest = variant
    expected = 32 if element == "e4m3" else 2
    k_loops = [body for body in _loop_bodies(_ptx(hopper, *variant)) if "wgmma.mma_async" in body]
    assert [len(re.findall(r"cvt\.rn\.f16x2\.e4m3x2", body)) for body in k_loops] == [expected]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] == "gemv" and v[1] == 8 and v[4] in ("int", "sint")],
                         ids=lambda v: "-".join(map(str, v)))
def test_gemv_bytes_become_floats_by_one_prmt(hopper, variant):
    """int8 / MX INT8 (bf16 activations): each code becomes its float by one prmt.b32 of its
    byte and 2^23's (`dequant_gemv._byte_fma`; selectors 0x74J4), and the 2^23 + offset goes
    into the column's correction: no FADD per weight (the few in the loop convert activations
    and sum them for the zero points)."""
    _, bits, _, _, element, *rest = variant
    weights = hopper_codegen.GEMV_BLOCK_N * hopper_codegen.variant_column_k(bits, element, *rest)
    for body in _gemv_k_loops(_ptx(hopper, *variant)):
        assert len(re.findall(r"prmt\.b32 [^;]*, 0x74[0-3]4;", body)) == weights
        assert len(re.findall(r"(?:add|sub)\.f32", body)) < weights // 4


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] == "gemm" and v[1] in (4, 8) and v[3] != "fp32"
                                     and v[4] != "codebook"], ids=lambda v: "-".join(map(str, v)))
def test_gemm_stores_whole_words_of_weights(hopper, variant):
    """A 4- or 8-bit plane's codes are split in their thread (`_codes_in_order`), so the dequantized
    tile reaches the tensor cores through vector shared-memory stores (or none), not the 2-byte
    store per weight (32 per thread and K step here) that a reshape across threads costs. NVFP4
    stores its 2 decoded E4M3 block scales per step that way."""
    weights_per_thread = hopper_codegen.GEMM_TILE ** 2 // 128
    k_loops = [body for body in _loop_bodies(_ptx(hopper, *variant)) if "wgmma.mma_async" in body]
    assert k_loops
    for body in k_loops:
        assert len(re.findall(r"st\.shared\.(?:b16|u16)", body)) <= weights_per_thread // 16


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_fp8_weight_only_needs_no_fp8_hardware(hopper, element):
    """Where the GPU has no FP8 conversion (before sm_89: the launcher's fp8_conversions), the FP8
    GEMV decodes with integer ops + an fp16 reinterpret, no cvt from e4m3 / e5m2 (E5M2 never
    needs one: its byte is an fp16's top half). The GEMM shares the decoders (`_decode`), and its
    weight-only path is checked on every code without the conversion in the interpreter
    (tests/kernels/test_fp8_kernels.py)."""
    result = hopper["-".join(map(str, GEMV_E4M3_INTEGER_VARIANT))] if element == "e4m3" else None
    ptx = _checked(result) if result else _ptx(hopper, "gemv", 8, True, "bf16", element)
    assert not re.search(r"cvt\S*\.e[45]m[23]", ptx)
    _check_gemv_k_loops(ptx, _expected_loads(8, True, "bf16", element))
    assert "wgmma.mma_async" in _ptx(hopper, "gemm", 8, True, "bf16", element)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] == "gemv" and "e4m3" in v[4:6]],
                         ids=lambda v: "-".join(map(str, v)))
def test_e4m3_gemv_converts_in_hardware(hopper, variant):
    """On sm_89 on (here sm_90) the E4M3 GEMV converts each pair of neighbouring codes with one
    cvt.rn.f16x2.e4m3x2 (`dequant_gemv._e4m3_pair`): half a conversion per weight, then a
    cvt.f32.f16 per weight, in each K loop; NVFP4's E4M3 block scales take one each
    (`_e4m3_value`: one per row and trip)."""
    _, bits, _, _, element, *rest = variant
    rows = hopper_codegen.GEMV_BLOCK_N
    weights = rows * hopper_codegen.variant_column_k(bits, element, *rest)
    expected = (weights // 2 if element == "e4m3" else 0) + (rows if rest and rest[0] == "e4m3" else 0)
    for body in _gemv_k_loops(_ptx(hopper, *variant)):
        assert len(re.findall(r"cvt\.rn\.f16x2\.e4m3x2", body)) == expected
        assert len(re.findall(r"cvt\.f32\.f16", body)) >= weights


@pytest.mark.parametrize("encoding", ["e4m3", "int8"])
def test_activation_quant_uses_exact_division(hopper, encoding):
    ptx = _ptx(hopper, "act_quant", encoding)
    assert "div.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx


@pytest.mark.parametrize("variant", INT8_ACT_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_int8_activation_gemm_uses_int8_tensor_cores(hopper, variant):
    """act="int8": the K loop multiplies int8 x int8 -> int32 on Hopper tensor cores (wgmma .s8),
    never on 16-bit ones."""
    k_loops = [body for body in _loop_bodies(_ptx(hopper, *variant)) if "wgmma.mma_async" in body]
    assert k_loops
    for body in k_loops:
        assert re.search(r"wgmma\.mma_async\S*\.s32\.s8\.s8", body)
        assert not re.search(r"wgmma\.mma_async\S*\.(?:bf16|f16)", body)


@pytest.mark.parametrize("variant", FP8_ACT_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_fp8_activation_gemm_uses_fp8_tensor_cores(hopper, variant):
    """act="fp8" on intN weights: the K loop multiplies E4M3 x E4M3 -> fp32 on Hopper tensor cores
    (wgmma .e4m3), never on 16-bit ones, and the centred codes reach them through a native
    conversion (cvt to e4m3x2), not a software encoder."""
    k_loops = [body for body in _loop_bodies(_ptx(hopper, *variant)) if "wgmma.mma_async" in body]
    assert k_loops
    for body in k_loops:
        assert re.search(r"wgmma\.mma_async\S*\.f32\.e4m3\.e4m3", body)
        assert not re.search(r"wgmma\.mma_async\S*\.(?:bf16|f16)", body)
        assert re.search(r"cvt\.rn\.satfinite\.e4m3x2\.f16x2", body)


@pytest.mark.parametrize("scale_kind", ["e8m0", "e4m3"])
def test_fp4_needs_no_fp4_hardware(hopper, scale_kind):
    """E2M1 decodes with integer ops (no cvt from e2m1) in the GEMV, and the GEMM runs on
    Hopper tensor cores (wgmma, bf16)."""
    ptx = _ptx(hopper, "gemv", 4, True, "bf16", "e2m1", scale_kind)
    assert not re.search(r"cvt\S*\.e2m1", ptx)
    assert "wgmma.mma_async" in _ptx(hopper, "gemm", 4, True, "bf16", "e2m1", scale_kind)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lut_kernel_gathers_on_chip(hopper, bits):
    """The table lives on chip (tl.gather lowers to shuffles / shared memory): the kernel's only
    global traffic is a handful of loads (plane words as whole 32-bit words, activations, scales,
    zeros, bias) and the bf16 output store; nothing is gathered from global memory per code."""
    ptx = _ptx(hopper, "lut", bits)
    loads = re.findall(r"ld\.global\S*", ptx)
    assert "ld.global.b32" in loads and not any(".b8" in ld or ".u8" in ld for ld in loads)
    # Per thread: one 32-bit word per plane, and at most 32 bits each of activations, scales,
    # zeros, bias and the split-K partial sums read back by the reducing program. Counted in
    # bits, not instructions: Triton 3.6 loads some 16-bit pairs as two b16 loads, 3.9 as one b32.
    assert sum(_load_bits(ld) for ld in loads) <= 32 * (bits + 5), loads
    # the bf16 output and the fp32 split-K partial sums
    assert set(re.findall(r"st\.global\S*", ptx)) == {"st.global.b16", "st.global.b32"}


def _load_bits(load: str) -> int:
    """Bits one PTX load instruction reads per thread, e.g. ld.global.v2.b32 -> 64."""
    vector = re.search(r"\.v(\d)\.", load)
    return int(re.search(r"(\d+)$", load).group(1)) * (int(vector.group(1)) if vector else 1)


def test_dfloat11_fused_gemv_never_writes_the_weight(hopper):
    """The fused decode + GEMV (compiled with fp32 activations and output) stores only 32-bit
    values, its partial sums and output: the 16-bit decoded weights stay on chip."""
    ptx = _ptx(hopper, "dfloat11", "gemv")
    stores = re.findall(r"st\.global[.\w]*", ptx)
    assert stores and all(".b16" not in op and ".u16" not in op for op in stores), stores
    assert "wgmma" not in ptx  # a GEMV: no tensor-core path involved


def _global_ops(ptx):
    """Counter of the global loads and stores in `ptx`, a predicated one marked with a leading '@'."""
    return Counter(re.sub(r"@%p\d+ ", "@", op) for op in re.findall(r"(?:@%p\d+ )?(?:ld|st)\.global[.\w]*", ptx))


def _stream_word_loads(ops: Counter) -> tuple[int, int]:
    """(predicated scalar 32-bit loads, predicated 128-bit loads) of compiled code."""
    return ops["@ld.global.b32"], ops["@ld.global.v4.b32"]


def test_dfloat11_decoder_moves_weights_as_vectors(hopper):
    """Aligned layers: per chunk (DECODE_CHUNK weights) a lane loads their sign|mantissa bytes
    as one vector and stores the bf16 results as 128-bit vectors of DECODE_STORE (lanes hold
    segments far apart, so per-weight byte accesses would each touch another cache line), with
    no pass through shared memory. The refill checks (one per 32 // CODE_BITS = 4 steps) and the
    segment's start fetch stream words a 16-byte stage at a time: each of those loads is one
    vector where stage 1 has one word (the start's first two words are loaded either way)."""
    ptx = _ptx(hopper, "dfloat11", "decode")
    ops = _global_ops(ptx)
    assert ops["@st.global.v4.b32"] == dfloat11.DECODE_CHUNK // dfloat11.DECODE_STORE
    assert not [op for op in ops if op.endswith((".b8", ".u8")) or op.startswith("st.global") and "v4" not in op]
    assert not re.search(r"(?:ld|st)\.shared|bar\.sync", ptx)
    assert ops["ld.global.b16"] == dfloat11.DECODE_CHUNK  # the decode table: one lookup per weight
    stage_loads = dfloat11.DECODE_CHUNK // (32 // CODE_BITS) + 1  # + the segment start's
    word_by_word = _global_ops(_checked(hopper["dfloat11-decode-fp32-None-1"]))
    assert dfloat11.DECODE_STAGE == 4
    scalar, vector = _stream_word_loads(ops)
    scalar_1, vector_1 = _stream_word_loads(word_by_word)
    assert scalar == 1 and scalar_1 - scalar == stage_loads == vector - vector_1


def test_dfloat11_fused_gemv_loads_sign_bytes_as_vectors(hopper):
    """Per chunk of GEMV_CHUNK weights a lane loads their sign|mantissa bytes as 128-bit vectors
    (one per 16), and reads stream words only when its bit buffer runs low: one table lookup per
    weight, a refill check per 32 // CODE_BITS = 4 steps, no byte loads, and no pass through
    shared memory but split-K's (its ticket, broadcast to the program's threads once)."""
    ptx = _ptx(hopper, "dfloat11", "gemv")
    ops = _global_ops(ptx)
    assert ops["ld.global.v4.b32"] >= dfloat11.GEMV_CHUNK // 16  # the unmasked chunk's sign bytes
    assert len(re.findall(r"(?:ld|st)\.shared", ptx)) == 2
    assert not [op for op in ops if op.endswith((".b8", ".u8"))]
    # the unmasked chunk and the tail chunk: 16 table lookups each
    assert ops["ld.global.b16"] == 2 * dfloat11.GEMV_CHUNK
    # the segment's start and the refills (one per 4 steps) fetch a 16-byte stage of stream
    # words, one vector load where stage 1 loads one word: at least the start's and the
    # unmasked chunk's
    word_by_word = _global_ops(_checked(hopper["dfloat11-gemv-fp32-None-1"]))
    assert dfloat11.GEMV_STAGE == 4
    scalar, vector = _stream_word_loads(ops)
    scalar_1, vector_1 = _stream_word_loads(word_by_word)
    assert scalar_1 - scalar == vector - vector_1 >= dfloat11.GEMV_CHUNK // (32 // CODE_BITS) + 1


@pytest.mark.parametrize("variant", [["gemv", 4, False, "fp16", "int"], ["gemv", 4, True, "bf16", "e2m1", "e8m0"],
                                     ["lut", 2], ["dfloat11", "gemv"]], ids=lambda v: "-".join(map(str, v)))
def test_split_k_reduces_in_one_launch_with_ordered_tickets(hopper, variant):
    """lowbit/kernels/split_k.py's semaphore, as compiled: partial sums stored, a barrier of the
    program's threads, then one thread's acq_rel ticket at GPU scope; the reducing program reads
    the partials bypassing L1 and resets the counter. No second launch is needed."""
    ptx = _ptx(hopper, *variant)
    ops = re.findall(r"(st\.global\.b32|bar\.sync|atom\.global\.gpu\.acq_rel\.add|ld\.global\.cg|"
                     r"atom\.global\.gpu\.acq_rel\.exch)", ptx)
    ticket = ops.index("atom.global.gpu.acq_rel.add")
    partial_store = max(i for i, op in enumerate(ops[:ticket]) if op == "st.global.b32")
    assert "bar.sync" in ops[partial_store:ticket]
    reads = [i for i, op in enumerate(ops) if op == "ld.global.cg"]
    assert reads and min(reads) > ticket and ops.index("atom.global.gpu.acq_rel.exch") > max(reads)
    assert re.search(r"@%p\d+ atom\.global\.gpu\.acq_rel\.add", ptx)  # predicated: one thread takes the ticket
