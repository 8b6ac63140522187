"""act="int8" on the integer formats: the int8 activation-quantization kernel (bit-exact vs the
torch spec) and the int8 tensor-core GEMM of `dequant_gemm` (vs the W8A8 reference, which is
exact up to fp32 rounding: the kernel sums int8 products in int32), with the per-M path rule.

Without a GPU these run through Triton's interpreter on CPU tensors; `gpu` tests add real shapes.
"""
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import InputError
from lowbit.formats import get_format
from lowbit.formats.activations import dequantize_activations, quantize_activations_int8
from lowbit.kernels.act_quant import quantize_activations_triton
from lowbit.kernels.dequant_gemm import dequant_matmul
from lowbit.kernels.fp8_w8a8 import W8A8_MIN_M
from lowbit.kernels.int8_act import takes_int8_path

from ..conftest import kernel_devices, requires_gpu

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the kernel against the fp32 W8A8 reference: fp32 rounding of the group sums, then the output cast
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
N, K = 37, 300


def _case(bits, m, dtype, device, symmetric=False, group_size=128, n=N, k=K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    p = get_format(f"int{bits}").quantize(w, act="int8", symmetric=symmetric, group_size=group_size).to(device)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, k)  # uneven channels, as in real activations
    b = torch.randn(n, generator=gen)
    return p, x.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _w8a8_reference(x, p, b):
    """fp32 W8A8 numerics from the torch spec, for a weight packed from fp32 (exact dequant)."""
    return lowbit.linear(x.float(), p, b.float(), backend="torch")


def _assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_quant_kernel_is_bit_exact(device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, generator=gen) * torch.logspace(-6, 4, 300)[torch.randperm(300, generator=gen)]
    x[0] = 0.0  # an all-zero token: scale 1, codes 0
    # amax 127 -> scale 1: exact ties (round half to even), the ends of the range and -0
    x[1] = 0.0
    x[1, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -126.5, -0.0, -127.0])
    x = x.to(dtype)
    q_ref, s_ref = quantize_activations_int8(x, 320)
    q, s = quantize_activations_triton(x.to(device), 320, encoding="int8")
    assert q.dtype == torch.int8 and q.shape == (6, 320) and s.shape == (6, 1)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)
    assert q_ref[1, :8].tolist() == [127, 0, 2, 2, -2, -126, 0, -127] and s_ref[0].item() == 1.0
    assert not q[:, 300:].any()  # the K padding


def test_spec_round_trip_error_is_half_a_step():
    x = torch.randn(4, 96) * 3
    q, s = quantize_activations_int8(x, 96)
    assert q.abs().max().item() == 127
    assert ((dequantize_activations(q, s) - x).abs() <= s / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, False), (4, True), (6, False), (3, True),
                                            (2, False)])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_int8_gemm_matches_the_w8a8_reference(device, bits, symmetric, group_size):
    """M >= W8A8_MIN_M takes the int8 path; N odd, K not a multiple of the group."""
    m = W8A8_MIN_M + bits  # 33 .. 40: a partial M tile
    dtype = DTYPES[(bits + (group_size > 0)) % 3]
    p, x, b = _case(bits, m, dtype, device, symmetric, group_size)
    assert takes_int8_path(m, x.device)
    _assert_close(lowbit.linear(x, p, b, backend="triton"), _w8a8_reference(x, p, b), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_small_m_takes_the_weight_only_path(device, m):
    """Below W8A8_MIN_M activations stay in 16 bits: the result is F.linear with the dequantized
    weight, not the W8A8 numerics (which differ by the activation rounding)."""
    p, x, b = _case(4, m, torch.float32, device)
    assert not takes_int8_path(m, x.device)
    y = lowbit.linear(x, p, b, backend="triton")
    weight_only = F.linear(x.float(), get_format("int4").dequantize(p).float(), b.float())
    _assert_close(y, weight_only, torch.float32)
    assert (y.float() - _w8a8_reference(x, p, b)).abs().max() > 1e-3 * weight_only.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [
    {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 5},  # splits end mid-group
    {"path": "gemm", "BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1},
    {"path": "gemm", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2},
])
def test_any_gemm_tiles_and_split(device, cfg):
    """Several K tiles per scale group, split boundaries inside a group: the int32 sums are scaled
    at the end of each group and of each split."""
    p, x, b = _case(5, 40, torch.float32, device, group_size=128, k=700)
    xq, xs = quantize_activations_triton(x, 700, encoding="int8")
    y = dequant_matmul(xq, p.qweight, p.scales, p.zeros, b, bits=5, group_size=128, in_features=700,
                       act_scales=xs, out_dtype=torch.float32, config=cfg)
    _assert_close(y, _w8a8_reference(x, p, b), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_long_rows_do_not_overflow_the_int32_sums(device):
    """Per-channel int8, K = 2^17, every product at its extreme (127 x -128 after centring, the
    asymmetric zero-point term at its largest): one int32 sum over the row would overflow
    (127 * 255 * 2^17 > 2^31); the kernel scales its int32 sums into fp32 every 2^15 K."""
    k = 2**17
    w = torch.full((16, k), -1.0)
    w[:, ::2] = 254 / 255 * -1.0  # codes 1 and 0 with zero point 255: centred codes -127 / -128, z' = 127
    p = get_format("int8").quantize(w, act="int8", group_size=-1).to(device)
    assert p.zeros.min().item() == 255
    x = torch.full((W8A8_MIN_M, k), 1.0).to(device)
    xq, xs = quantize_activations_int8(x, k)  # the spec (the kernel's output is bit-identical)
    assert xq.min().item() == 127
    y = dequant_matmul(xq, p.qweight, p.scales, p.zeros, None, bits=8, group_size=k, in_features=k, act_scales=xs,
                       out_dtype=torch.float32, config={"path": "gemm", "BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 512,
                                                       "SPLIT_K": 1})
    ref = _w8a8_reference(x, p, torch.zeros(16, device=device))
    assert ref.abs().min() > 1e5
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_launcher_refuses_inconsistent_int8_operands(device):
    p, x, _ = _case(4, 40, torch.float32, device)
    xq, xs = quantize_activations_triton(x, K, encoding="int8")
    with pytest.raises(InputError, match="int8 activations"):
        dequant_matmul(x, p.qweight, p.scales, p.zeros, None, bits=4, group_size=128, in_features=K, act_scales=xs,
                       out_dtype=torch.float32)  # float x
    with pytest.raises(InputError, match="int8 activations"):
        dequant_matmul(xq, p.qweight, p.scales, p.zeros, None, bits=4, group_size=128, in_features=K,
                       act_scales=xs[:3], out_dtype=torch.float32)
    with pytest.raises(InputError, match="'gemm' with int8 activations"):
        dequant_matmul(xq, p.qweight, p.scales, p.zeros, None, bits=4, group_size=128, in_features=K, act_scales=xs,
                       out_dtype=torch.float32, config={"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "COLUMN_K": 32,
                                                        "SPLIT_K": 1})


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits,symmetric,group_size", [(8, True, -1), (4, False, 128), (6, False, 128)])
@pytest.mark.parametrize("m", [32, 256, 4096])
def test_real_shapes_on_gpu(bits, symmetric, group_size, m):
    """A Llama-3-8B gate_proj (14336 x 4096) in bf16 on int8 tensor cores."""
    p, x, b = _case(bits, m, torch.bfloat16, "cuda", symmetric, group_size, n=14336, k=4096)
    _assert_close(lowbit.linear(x, p, b), _w8a8_reference(x, p, b), torch.bfloat16)
