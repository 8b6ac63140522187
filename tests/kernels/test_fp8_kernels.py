"""FP8 kernels: the weight-only path of the generic dequant kernel (E4M3 / E5M2 element decoders),
the fused activation-quantization kernel (bit-exact vs the torch spec) and the W8A8 product.

Without a GPU these run through Triton's interpreter on CPU tensors; `gpu` tests add real
shapes and the torch._scaled_mm path on FP8 tensor cores.
"""
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import get_format
from lowbit.formats.activations import quantize_activations_fp8
from lowbit.kernels import dequant_gemm, fp8_w8a8
from lowbit.kernels.act_quant import quantize_activations_triton
from lowbit.kernels.fp8_w8a8 import fp8_matmul, scaled_mm_w8a8

from ..conftest import kernel_devices, requires_gpu

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
N, K = 37, 300


def _case(name, m, dtype, device, block=None, act=None, n=N, k=K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.1
    p = get_format(name).quantize(w, block=block, act=act).to(device)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    return p, x, b


def _assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("block", [None, 32, 128])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_weight_only_kernel_matches_reference(device, name, block, m):
    dtype = DTYPES[(m + (block or 0) // 32) % 3]
    p, x, b = _case(name, m, dtype, device, block=block)
    ref = F.linear(x.float(), get_format(name).dequantize(p).float(), b.float())
    _assert_close(lowbit.linear(x, p, b, backend="triton"), ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_decoder_covers_every_code(device, name):
    """Every one of the 256 byte codes (except NaN / Inf ones, which the quantizer never writes)
    decodes to torch's value: weight rows hold all codes, x = one-hot, scale 1."""
    dtype = torch.float8_e4m3fn if name == "fp8" else torch.float8_e5m2
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    values = codes.float()
    keep = values.isfinite()
    qweight = torch.zeros(1, 256, dtype=dtype)
    qweight[0] = torch.where(keep, codes.view(torch.uint8), 0).view(dtype)
    x = torch.eye(256, dtype=torch.float32)
    y = fp8_matmul(x.to(device), qweight.to(device), torch.ones(1, 1, device=device), None,
                   element="e4m3" if name == "fp8" else "e5m2", block=None, act_fp8=False, in_features=256)
    expected = torch.where(keep, values, 0.0)
    assert torch.equal(y[:, 0].cpu(), expected)


def _check_decodes_every_code(device, name, hardware, m, monkeypatch):
    dtype = torch.float8_e4m3fn if name == "fp8" else torch.float8_e5m2
    monkeypatch.setattr(dequant_gemm, "fp8_conversions", lambda device: hardware)
    codes = torch.arange(256, dtype=torch.uint8)
    codes = torch.where(codes.view(dtype).float().isfinite(), codes, 0)  # no NaN / Inf: the quantizer writes none
    # 8 rows, each every code once, rotated by 32 per row: every code meets every position in a word
    qweight = torch.stack([codes.roll(32 * r) for r in range(8)]).view(dtype)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(1))
    y = fp8_matmul(x.to(device), qweight.to(device), torch.ones(1, 8, device=device), None,
                   element="e4m3" if name == "fp8" else "e5m2", block=None, act_fp8=False, in_features=256)
    expected = x.double() @ qweight.float().double().T
    assert (y.cpu().double() - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, hardware", [("fp8", True), ("fp8", False), ("fp8_e5m2", True)])
@pytest.mark.parametrize("m", [1, 8])
def test_kernels_decode_every_code(device, name, hardware, m, monkeypatch):
    """The GEMV (M=1) and the GEMM (M=8) decode each of the 256 byte codes (but NaN / Inf) to
    torch's value: E4M3 with the hardware conversion (`dequant_gemv._e4m3_pair` / `_e4m3_value`,
    sm_89 on; emulated by the interpreter) and without it (older GPUs: integer ops)."""
    _check_decodes_every_code(device, name, hardware, m, monkeypatch)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name, hardware", [("fp8", True), ("fp8", False), ("fp8_e5m2", True)])
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_kernels_decode_every_code(name, hardware, m, monkeypatch):
    """As test_kernels_decode_every_code, compiled: on sm_89 on, `hardware` runs
    cvt.rn.f16x2.e4m3x2 itself."""
    _check_decodes_every_code("cuda", name, hardware, m, monkeypatch)


def test_act_fp8_layer_takes_the_weight_only_kernel_off_fp8_tensor_cores():
    """Path rule: without FP8 tensor cores (here: the interpreter) act="fp8" runs W8A16."""
    if "cpu" not in DEVICES:
        pytest.skip("needs the interpreter")
    p, x, b = _case("fp8", 40, torch.bfloat16, "cpu", act="fp8")
    ref = F.linear(x.float(), get_format("fp8").dequantize(p).float(), b.float())
    assert not fp8_w8a8.w8a8_supported(torch.device("cpu"), torch.float8_e4m3fn, None)
    _assert_close(lowbit.linear(x, p, b, backend="triton"), ref, torch.bfloat16)


def _hard_activations(m, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-6, 4, k)[torch.randperm(k, generator=gen)]
    x[0, :] = 0.0  # an all-zero token
    x[1, :8] = torch.tensor([448.0, 2**-9, 2**-10, 1.5 * 2**-9, 1.0625, 1.1875, -0.0, -448.0])  # ties, -0
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [None, 32, 128])
def test_activation_quant_kernel_is_bit_exact(device, dtype, group):
    x = _hard_activations(6, 300, dtype)
    kp = 384
    q_ref, s_ref = quantize_activations_fp8(x, kp, group)
    q, s = quantize_activations_triton(x.to(device), kp, group)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (6, kp)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_activation_encoder_on_every_value_and_midpoint(device):
    """Row amax 448 -> scale 1, so the kernel's E4M3 encoder sees each finite value, each midpoint
    between neighbours (ties to even) and points just beside them, and must match torch's cast."""
    finite = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (finite[1:] + finite[:-1]) / 2
    probes = torch.cat([finite, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9))])
    row = torch.cat([probes, -probes])
    x = row.unsqueeze(0)
    kp = -(-x.shape[1] // 32) * 32
    q, s = quantize_activations_triton(x.to(device), kp)
    assert s.item() == 1.0
    expected = F.pad(row, (0, kp - row.numel())).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(q.cpu().view(torch.uint8)[0], expected)


def test_scaled_mm_layout_on_cpu():
    """The W8A8 call (row-major A, column-major B, fp32 scales [M, 1] and [1, N]) against the
    fp32 emulation; torch._scaled_mm's CPU kernel accepts the same row-wise layout as cuBLAS."""
    if "cpu" not in DEVICES:
        pytest.skip("runs the activation kernel through the interpreter")
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError as exc:  # torch 2.11's CPU kernel: "only supports per-tensor scaling"
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm has no row-wise scales: {exc}"[:200])
    p, x, _ = _case("fp8", 9, torch.bfloat16, "cpu", act="fp8", n=48)
    y = scaled_mm_w8a8(x, p.qweight, p.scales, None)
    ref = lowbit.linear(x.float(), p, backend="torch")
    assert y.dtype == torch.bfloat16
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_registration(device):
    p, x, b = _case("fp8", 3, torch.float16, device, block=32, n=40, k=64)
    args = (x, p.qweight, p.scales, b, "e4m3", 32, False, 64)
    # opcheck's "test_schema" multiplies every input, which torch cannot do on CPU float8 tensors.
    torch.library.opcheck(torch.ops.lowbit.fp8_linear.default, args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", [None, "triton"])
def test_compiled_layer_has_no_graph_break(backend):
    device = DEVICES[0]
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(64, 48), "fp8", act="fp8").to(device)
    x = torch.randn(3, 64, device=device)
    compiled = torch.compile(lambda t: layer(t, backend=backend), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x, backend=backend))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("block", [None, 128])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 1024, 4096), (64, 14336, 4096), (1, 4096, 14336)])
def test_gpu_weight_only_real_shapes(name, block, m, n, k):
    p, x, b = _case(name, m, torch.bfloat16, "cuda", block=block, n=n, k=k)
    ref = F.linear(x.float(), get_format(name).dequantize(p).float(), b.float())
    _assert_close(lowbit.linear(x, p, b), ref, torch.bfloat16)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block", [None, 128])
@pytest.mark.parametrize("m", [32, 256, 1024])
def test_gpu_w8a8_matches_emulation(block, m):
    """On sm89+ the act="fp8" layer at M >= W8A8_MIN_M runs torch._scaled_mm; it must agree with
    the torch reference that emulates W8A8 rounding (the activation bytes are bit-exact)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm89+")
    assert m >= fp8_w8a8.W8A8_MIN_M
    p, x, b = _case("fp8", m, torch.bfloat16, "cuda", block=block, act="fp8", n=4096, k=4096)
    supported = fp8_w8a8.w8a8_supported(x.device, torch.float8_e4m3fn, block)
    if block is None:
        assert supported, "row-wise torch._scaled_mm must work on sm89+"
    emulated = p if supported else get_format("fp8").quantize(get_format("fp8").dequantize(p).float(), block=block)
    ref = lowbit.linear(x.float().cpu(), emulated.to("cpu"), b.float().cpu(), backend="torch")
    _assert_close(lowbit.linear(x, p, b).cpu(), ref, torch.bfloat16)
