"""The generic dequant GEMV/GEMM kernels against F.linear(x, dequantize(p)) in fp32.

Without a GPU these run through Triton's interpreter (TRITON_INTERPRET=1, CPU tensors, small
shapes). On a CUDA machine the same tests run the compiled kernels; `gpu` tests add real shapes.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import InputError, KernelUnavailableError
from lowbit.formats import get_format
from lowbit.kernels import dequant_gemm, tuning
from lowbit.kernels.dequant_gemm import GEMV_MAX_ROWS_PER_THREAD, dequant_matmul, pick_config
from lowbit.kernels.lut_gemm import lut_gemv_config
from lowbit.kernels.split_k import split_k_buffers

from ..conftest import kernel_devices, requires_gpu

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative to max |reference|: fp32 is exact up to summation order; 16-bit outputs round
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
N, K = 37, 300  # odd N, K not a multiple of the group size


def _case(bits, m, symmetric, dtype, device, group_size=128, bias=True, n=N, k=K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    p = get_format(f"int{bits}").quantize(w, group_size=group_size, symmetric=symmetric).to(device)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    w_hat = get_format(p.format).dequantize(p).float()
    ref = F.linear(x.float(), w_hat, None if b is None else b.float())
    return p, x, b, ref


def _assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("symmetric", [True, False])
def test_linear_triton_matches_reference(device, bits, m, symmetric):
    dtype = DTYPES[(bits + m + symmetric) % 3]  # every dtype meets every width and M across the grid
    p, x, b, ref = _case(bits, m, symmetric, dtype, device, bias=(bits % 2 == 0))
    _assert_close(lowbit.linear(x, p, b, backend="triton"), ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,m", [("gemv", 17), ("gemm", 1), ("gemv", 2), ("gemm", 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_paths_at_any_m(device, path, m, dtype):
    for bits in (3, 4, 6):
        p, x, b, ref = _case(bits, m, False, dtype, device, seed=bits)
        cfg = ({"path": "gemv", "BLOCK_M": 4, "BLOCK_N": 16, "COLUMN_K": 32, "SPLIT_K": 4, "num_warps": 1}
               if path == "gemv" else {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32})
        y = dequant_matmul(x, p.qweight, p.scales, p.tensors.get("zeros"), b, bits=bits, group_size=128,
                           in_features=K, config=cfg)
        _assert_close(y, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("split_k", [1, 2, 5, 64])
def test_split_k_counts_bias_once(device, path, split_k):
    """K=3000 (Kp=3008) of 5-bit codes. GEMV: columns of 32 (whole words of the 1-bit plane), 32
    per tile: two whole tiles and a partial one, split up to 3 ways. GEMM: 94 K tiles of 32
    (Kp/32), split unevenly (2 x 47, 5 x 19 minus one, 64 -> 47 x 2)."""
    p, x, b, ref = _case(5, 2, True, torch.float32, device, group_size=32, k=3000)
    cfg = ({"path": "gemv", "BLOCK_M": 2, "BLOCK_N": 32, "COLUMN_K": 32, "SPLIT_K": split_k, "num_warps": 1}
           if path == "gemv" else {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split_k})
    y = dequant_matmul(x, p.qweight, p.scales, None, b, bits=5, group_size=32, in_features=3000, config=cfg)
    _assert_close(y, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("split_k", [0, -2, 2.5, "4"])
def test_bad_split_k_is_a_clear_error(device, path, split_k):
    p, x, b, _ = _case(4, 1, False, torch.float32, device, group_size=32)
    cfg = ({"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "COLUMN_K": 8, "SPLIT_K": split_k}
           if path == "gemv" else {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split_k})
    with pytest.raises(InputError, match="SPLIT_K"):
        dequant_matmul(x, p.qweight, p.scales, p.zeros, b, bits=4, group_size=32, in_features=K, config=cfg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad, problem", [({"PREFETCH": 2}, "PREFETCH must be 0 or 1, got 2"),
                                          ({"PREFETCH": 1, "num_stages": 2}, "PREFETCH=1 needs num_stages=1")])
def test_bad_gemv_prefetch_is_a_clear_error(device, bad, problem):
    p, x, b, _ = _case(4, 1, False, torch.float32, device, group_size=32)
    cfg = {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "COLUMN_K": 8, "SPLIT_K": 1, **bad}
    with pytest.raises(InputError, match=problem):
        dequant_matmul(x, p.qweight, p.scales, p.zeros, b, bits=4, group_size=32, in_features=K, config=cfg)


def _gemv_sum_error(device, fmt, dtype, seed, monkeypatch) -> float:
    """The GEMV's largest error at M=1, n=64, K=4096 with outlier activations in `dtype`, its sums
    stored as fp32 (the output buffer swapped for an fp32 one), over its largest value."""
    def fp32_output(x, *args, **kwargs):
        out, *rest = split_k_buffers(x, *args, **kwargs)
        return (out.float(), *rest)

    monkeypatch.setattr(dequant_gemm, "split_k_buffers", fp32_output)
    gen = torch.Generator().manual_seed(seed)
    n, k = 64, 4096
    p = get_format(fmt).quantize(torch.randn(n, k, generator=gen)).to(device)
    x = torch.randn(1, k, generator=gen) * (1 + 20 * (torch.rand(1, k, generator=gen) < 0.01))
    x = x.to(device=device, dtype=dtype)
    ref = x.double() @ get_format(p.format).dequantize(p).double().T
    y = lowbit.linear(x, p, None, backend="triton")
    assert y.dtype == torch.float32
    return (y.double() - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["int2", "int3", "int4", "int5", "int8", "mxint8", "lut1", "lut2", "lut3"])
def test_gemv_16bit_activations_sum_within_2_to_the_minus_14(device, fmt, monkeypatch):
    """Under 16-bit activations the GEMV leaves the 2^23 of its code floats in the fp32 column sums
    and takes it off per column (no FADD per weight, `_plane_fma`'s FOLD), which costs the sums low
    bits. The product at a real K with outlier activations stays within 2^-14 of its largest
    value: 1/16 of an fp16 output step, 1/128 of a bf16 one (measured: 2^-15.2 at worst, lut1).
    Codes read from 2 bits lower miss it (int4: 2^-13.5). 8-bit codes under fp16 activations
    keep their FADD (`_byte_fma`): 2^-22."""
    assert _gemv_sum_error(device, fmt, torch.float16, 7, monkeypatch) <= 2.0**-14


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["int8", "mxint8"])
def test_gemv_8bit_codes_under_bf16_activations_sum_within_2_to_the_minus_12(device, fmt, monkeypatch):
    """8-bit codes under bf16 activations fold their constant into the column's correction too
    (`_byte_fma`): it stands 2^15 next to codes up to 2^8, and the sums stay within 2^-12 of
    their largest value, 1/32 of a bf16 output step (measured over seeds 7-9: 2^-13.2 at worst,
    mxint8)."""
    for seed in (7, 8, 9):
        assert _gemv_sum_error(device, fmt, torch.bfloat16, seed, monkeypatch) <= 2.0**-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [{"COLUMN_K": 4}, {"COLUMN_K": 24}, {"COLUMN_K": 64}])
def test_gemv_rejects_columns_it_cannot_take(device, bad):
    """int4 in groups of 32: a column must hold whole words (>= 8), be a power of two and lie in one group."""
    p, x, b, _ = _case(4, 1, False, torch.float32, device, group_size=32)
    cfg = {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "SPLIT_K": 1, **bad}
    with pytest.raises(InputError, match="COLUMN_K"):
        dequant_matmul(x, p.qweight, p.scales, p.zeros, b, bits=4, group_size=32, in_features=K, config=cfg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [32, 64, 256, -1])
def test_group_sizes(device, group_size):
    p, x, b, ref = _case(4, 3, False, torch.float32, device, group_size=group_size)
    _assert_close(lowbit.linear(x, p, b, backend="triton"), ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_groups_of_16_in_both_paths(device, bits):
    """Groups of 16 (GGUF's Q2_K / Q3_K / Q6_K): GEMM tiles of 32 and 64 K span 2 and 4 groups,
    split 3 ways; the GEMV takes columns of 16 where they hold whole words of every bit plane (2,
    4, 6, 8 bits; 3, 5, 7 have a 1-bit plane, whose words hold 32). K = 300: Kp = 320, and the
    last of its 20 groups is all padding. One symmetry per width (as GGUF: Q2_K asymmetric, Q3_K /
    Q6_K symmetric), both in each path; every dtype across widths."""
    dtype = DTYPES[bits % 3]
    symmetric = bits in (3, 5, 6, 8)
    p, x, b, ref = _case(bits, 5, symmetric, dtype, device, group_size=16, seed=bits)
    assert p.scales.shape[0] == 20
    zeros = p.tensors.get("zeros")
    configs = [{"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": 3}
               for block_k in (32, 64)]
    if bits % 2 == 0:
        configs.append({"path": "gemv", "BLOCK_M": 4, "BLOCK_N": 16, "COLUMN_K": 16, "SPLIT_K": 3, "num_warps": 1})
    for cfg in configs:
        y = dequant_matmul(x, p.qweight, p.scales, zeros, b, bits=bits, group_size=16, in_features=K,
                           config=cfg)
        _assert_close(y, ref, dtype)
    _assert_close(lowbit.linear(x[:1], p, b, backend="triton"), ref[:1], dtype)  # the launcher's own pick


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [32, 16])
def test_fractional_zero_points_in_both_paths(device, group_size):
    """Imports keep float16 zero points that are not integers (GGUF's Q4_1 / Q5_1 / K types: z =
    c / s). Both paths decode them as the spec does: the GEMM took 2^23 + z off its code floats
    in one subtraction, which rounded z to an integer in fp32 (5% off at M = 17)."""
    from lowbit.integrations.foreign_folder import integer_layer

    gen = torch.Generator().manual_seed(3)
    n, k = 37, 256
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, k // group_size, generator=gen) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, k // group_size, generator=gen) * 15).half()
    assert not torch.equal(zeros, zeros.round())
    p = integer_layer(codes, 4, group_size, scales, zeros, torch.float32).to(device)
    x = torch.randn(17, k, generator=gen).to(device)
    ref = F.linear(x, get_format("int4").dequantize(p).float())
    for cfg in ({"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32},
                {"path": "gemv", "BLOCK_M": 4, "BLOCK_N": 16, "COLUMN_K": 16, "SPLIT_K": 1}):
        y = dequant_matmul(x, p.qweight, p.scales, p.zeros, None, bits=4, group_size=group_size, in_features=k,
                           config=cfg)
        _assert_close(y, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_groups_of_16_refuse_columns_and_quantized_activations(device):
    """A GEMV column of 32 would span two groups of 16; the int8 GEMM scales a K tile by one group."""
    p, x, b, _ = _case(4, 1, False, torch.float32, device, group_size=16)
    with pytest.raises(InputError, match="COLUMN_K=32 .* dividing the group size 16"):
        dequant_matmul(x, p.qweight, p.scales, p.zeros, b, bits=4, group_size=16, in_features=K,
                       config={"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "COLUMN_K": 32, "SPLIT_K": 1})
    codes = torch.zeros(1, K, dtype=torch.int8, device=device)
    with pytest.raises(InputError, match="groups of at least 32, got group_size=16"):
        dequant_matmul(codes, p.qweight, p.scales, p.zeros, None, bits=4, group_size=16, in_features=K,
                       act_scales=torch.ones(1, 1, device=device), out_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_empty_batch(device):
    p, _, b, _ = _case(4, 1, True, torch.float16, device)
    x = torch.randn(2, 3, K).to(device=device, dtype=torch.float16)
    ref = F.linear(x.float(), get_format("int4").dequantize(p).float(), b.float())
    _assert_close(lowbit.linear(x, p, b, backend="triton"), ref, torch.float16)
    empty = lowbit.linear(x[:0], p, b, backend="triton")
    assert empty.shape == (0, 3, N)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    p, _, b, _ = _case(8, 1, False, torch.float32, device)
    x = torch.randn(K, 4).to(device).t()  # [4, K], not contiguous
    ref = F.linear(x.float(), get_format("int8").dequantize(p).float(), b.float())
    _assert_close(lowbit.linear(x, p, b, backend="triton"), ref, torch.float32)


def test_torch_backend_is_the_reference():
    p, x, b, _ = _case(4, 3, False, torch.float32, "cpu")
    expected = F.linear(x, get_format("int4").dequantize(p), b)
    assert torch.equal(lowbit.linear(x, p, b, backend="torch"), expected)
    assert torch.equal(lowbit.linear(x, p, b), expected)  # CPU default


@pytest.mark.parametrize("bad", [
    lambda x, b: (x[:, :-1], b, None),                # wrong K
    lambda x, b: (x.to(torch.int32), b, None),        # integer activations
    lambda x, b: (x, b[:-1], None),                   # wrong bias length
    lambda x, b: (x, b.tolist(), None),               # bias not a tensor
    lambda x, b: (x, b.to("meta"), None),             # bias on another device than x
    lambda x, b: (x, b, "cuda-please"),               # unknown backend
])
def test_bad_inputs_raise(bad):
    p, x, b, _ = _case(4, 2, True, torch.float32, "cpu")
    x, b, backend = bad(x, b)
    with pytest.raises(InputError):
        lowbit.linear(x, p, b, backend=backend)


def test_a_packed_weight_is_required():
    with pytest.raises(InputError, match="packed must be a PackedWeight"):
        lowbit.linear(torch.randn(2, 64), torch.randn(8, 64))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p, x, b, _ = _case(4, 1, True, torch.float32, "cpu")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        lowbit.linear(x, p, b, backend="triton")


def test_pick_config_paths():
    cpu = torch.device("cpu")
    assert pick_config(1, 4096, 4096, 128, cpu)["path"] == "gemv"
    assert pick_config(4, 4096, 4096, 128, cpu)["path"] == "gemv"
    assert pick_config(5, 4096, 4096, 128, cpu)["path"] == "gemm"
    assert pick_config(1, 64, 4096, 16, cpu)["COLUMN_K"] == 16  # inside a group of 16
    assert pick_config(1, 64, 4096, 32, cpu, bits=6)["COLUMN_K"] == 32
    # 3-bit codes need columns of 32 (whole words of their 1-bit plane): none fits groups of 16
    assert pick_config(1, 64, 4096, 16, cpu, bits=3)["path"] == "gemm"


def test_gemm_default_split_k(monkeypatch):
    """On a 132-SM GPU the GEMM splits K only while its output tiles leave SMs idle: M=16 of a
    k/v projection (16 tiles of 64 rows) gets ~2 programs per SM; a large-N or large-M problem none."""
    monkeypatch.setattr(dequant_gemm, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    kv = pick_config(16, 1024, 4096, 128, cpu)
    assert kv["path"] == "gemm" and kv["SPLIT_K"] == 17  # cdiv(264, 16) of the 64 K tiles
    assert pick_config(16, 14336, 4096, 128, cpu)["SPLIT_K"] == 1  # 224 tiles
    assert pick_config(4096, 1024, 4096, 128, cpu)["SPLIT_K"] == 1
    assert pick_config(16, 1024, 128, 128, cpu)["SPLIT_K"] == 2  # never more splits than K tiles


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_default_tiles(m, monkeypatch):
    """8 rows per thread at M=1 (the H100 tuner's int4 picks), 8 at M=2, 4 at M=3-4 (within what tune.py may try), columns of
    32; on a 132-SM GPU a k/v projection (N=1024) still gets two programs per SM; the LUT
    kernel keeps K tiles of 128."""
    cfg = pick_config(m, 4096, 4096, 128, torch.device("cpu"))
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["COLUMN_K"]) == ({1: 1, 2: 2}.get(m, 4), {1: 8, 2: 8}.get(m, 4), 32)
    assert cfg["BLOCK_M"] * cfg["BLOCK_N"] <= GEMV_MAX_ROWS_PER_THREAD
    monkeypatch.setattr(dequant_gemm, "num_sms", lambda device: 132)
    kv = pick_config(m, 1024, 4096, 128, torch.device("cpu"))
    programs = -(-1024 // kv["BLOCK_N"]) * min(kv["SPLIT_K"], -(-4096 // (kv["COLUMN_K"] * 128)))
    assert programs >= 2 * 132
    assert lut_gemv_config(m, 4096, 4096, 128, torch.device("cpu"))["BLOCK_K"] == 128


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_registration(device):
    """Schema, fake (meta) implementation and autograd registration agree with the kernel."""
    p, x, b, _ = _case(4, 3, False, torch.float16, device, n=33, k=64, group_size=32)
    args = (x, p.qweight, p.scales, p.zeros, None, b, 4, "int", 32, 1, "float", 64)
    torch.library.opcheck(torch.ops.lowbit.dequant_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 1024, 4096), (64, 14336, 4096), (1, 4096, 14336),
                                   (256, 4096, 4096)])
def test_gpu_real_shapes(bits, m, n, k):
    for dtype, symmetric in itertools.product((torch.float16, torch.bfloat16), (True, False)):
        p, x, b, ref = _case(bits, m, symmetric, dtype, "cuda", n=n, k=k)
        _assert_close(lowbit.linear(x, p, b), ref, dtype)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "int3", "int6", "int8", "nvfp4", "mxfp4", "fp8", "nf4", "lut2", "lut3"])
def test_gpu_gemv_prefetch_gives_the_reference(fmt):
    """PREFETCH=1 on a GPU (the interpreter skips the prefetches): the GEMV's `prefetch.global.L2`
    of each next whole tile, with 4 to 8 tiles per program (one warp, columns of 16 or 32), on a
    row count that leaves the last program's rows partly past N (clamped scale and zero-point
    runs) and an in_features that pads K (clamped activation runs), gives the reference's values;
    over the same tiles without it, the same sums bit for bit."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(1003, 4000, generator=gen) * 0.02
    p = get_format(fmt).quantize(w).to("cuda")
    x = torch.randn(1, 4000, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), get_format(fmt).dequantize(p).float().to("cuda"))
    column_k = 16 if fmt == "nvfp4" else 32
    config = {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 8, "COLUMN_K": column_k, "SPLIT_K": 1, "num_warps": 1}
    with tuning.force({**config, "PREFETCH": 1}):
        y = lowbit.linear(x, p, None)
    with tuning.force(config):
        y_plain = lowbit.linear(x, p, None)
    _assert_close(y, ref, torch.bfloat16)
    assert torch.equal(y, y_plain)


@pytest.mark.parametrize("fmt,options", [("int4", {}), ("int3", {"symmetric": True}), ("int6", {}), ("nf4", {}),
                                         ("bnb_fp4", {}), ("nvfp4", {}), ("mxfp4", {}), ("fp8", {}), ("lut2", {})])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_transposed_loads_give_the_same_values(monkeypatch, fmt, options, m):
    """Under Triton < 3.7 (the GPU image's 3.6) the GEMV loads activations, words, scales, zero
    points and the nf4 / bnb_fp4 code values through pointers with the column axis first
    (dequant_gemv._TRANSPOSED_LOADS, a layout choice): forced on in the interpreter, it gives what
    the reference gives, at M=1 and at M=3 (4 activation rows, the 4th masked off; K=300 leaves
    the last tile's activations masked too). On a GPU the other path is compiled and already
    under test, so this runs on the interpreter only."""
    import triton.language as tl

    from lowbit.kernels import dequant_gemv

    if "cpu" not in DEVICES:
        pytest.skip("checks the interpreter's path; compiled kernels read the flag once")
    monkeypatch.setattr(dequant_gemv, "_TRANSPOSED_LOADS", tl.constexpr(True))
    gen = torch.Generator().manual_seed(3)
    p = get_format(fmt).quantize(torch.randn(N, K, generator=gen), **options)
    x = torch.randn(m, K, generator=gen, dtype=torch.float32).bfloat16()
    ref = F.linear(x.float(), get_format(fmt).dequantize(p).float())
    _assert_close(lowbit.linear(x, p, None, backend="triton"), ref, torch.bfloat16)
