"""Microscaling formats through the generic dequant kernel: element decoders (E2M1 / E2M3 / E4M3 /
INT8), scale decoders (E8M0 / E4M3 + tensor scale), tiles spanning several 16/32-element blocks,
and the act= / rotate= options, against the torch reference. Interpreter on CPU; `gpu` tests add
real shapes."""
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import bitpack, get_format
from lowbit.kernels import dequant_gemm
from lowbit.kernels.dequant_gemm import dequant_matmul

from ..conftest import kernel_devices, requires_gpu

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
MX = ["mxint8", "mxfp8", "mxfp6", "mxfp4", "nvfp4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * ref.float().abs().max().item(), err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernel_matches_reference_odd_shapes(device, name, m):
    dtype = DTYPES[(m + MX.index(name)) % 3]
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(37, 300, generator=gen)  # N odd, K not a multiple of 32
    x = torch.randn(m, 300, generator=gen).to(dtype)
    b = torch.randn(37, generator=gen).to(dtype)
    p = get_format(name).quantize(w)
    ref = F.linear(x.float(), get_format(name).dequantize(p).float(), b.float())
    _assert_close(lowbit.linear(x.to(device), p.to(device), b.to(device), backend="triton").cpu(), ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,options", [("mxfp4", {"rotate": "hadamard"}), ("nvfp4", {"act": "nvfp4"}),
                                          ("mxfp4", {"act": "mxfp4", "rotate": "hadamard"}),
                                          ("mxint8", {"act": "mxint8"})])
def test_kernel_with_act_and_rotate_options(device, name, options):
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(40, 200, generator=gen), torch.randn(5, 200, generator=gen)
    p = get_format(name).quantize(w, **options)
    ref = lowbit.linear(x, p, backend="torch")
    _assert_close(lowbit.linear(x.to(device), p.to(device), backend="triton").cpu(), ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,tile", [("gemv", 8), ("gemv", 16), ("gemm", 32), ("gemm", 64)])
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_tiles_spanning_several_blocks(device, path, tile, name):
    """GEMM: BLOCK_K 64 covers 2 (mx) or 4 (nvfp4) scale blocks per tile, 32 one or two. GEMV:
    columns of 8 / 16 K lie inside a block, a tile of 32 columns spans several."""
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(33, 256, generator=gen), torch.randn(6, 256, generator=gen)
    p = get_format(name).quantize(w)
    cfg = ({"path": "gemv", "BLOCK_M": 8, "BLOCK_N": 16, "COLUMN_K": tile, "SPLIT_K": 3, "num_warps": 1}
           if path == "gemv" else {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": tile})
    fmt = get_format(name)
    y = dequant_matmul(x.to(device), p.qweight.to(device), p.scales.view(torch.uint8).to(device), None, None,
                       bits=4, group_size=fmt.block, in_features=256, element="e2m1", scale_kind=fmt.scale_kind,
                       tensor_scale=p.tensors.get("tensor_scale", None) if name == "nvfp4" else None, config=cfg)
    if name == "nvfp4":
        y = y.to(device)
    _assert_close(y.cpu(), F.linear(x, fmt.dequantize(p)), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mxint8", "mxfp8", "mxfp6", "mxfp4"])
def test_element_decoder_covers_every_code(device, name):
    """Each code (except E4M3's NaN) in its own column, scale byte 127 (= 1), x = identity."""
    fmt = get_format(name)
    bits = fmt.codec.bits
    codes = torch.arange(2**bits, dtype=torch.int32)
    if name == "mxfp8":
        codes = codes[(codes & 0x7F) != 0x7F]
    k = 32 * -(-codes.numel() // 32)
    row = F.pad(codes, (0, k - codes.numel())).unsqueeze(0)
    qweight = bitpack.pack(row, bits)
    scales = torch.full((k // 32, 1), 127, dtype=torch.uint8)
    y = dequant_matmul(torch.eye(k).to(device), qweight.to(device), scales.to(device), None, None, bits=bits,
                       group_size=32, in_features=k, element=fmt.codec.kernel, scale_kind="e8m0")
    assert torch.equal(y[: codes.numel(), 0].cpu(), fmt.codec.decode(codes))


def _check_scale_decoders(device, hardware, m, monkeypatch):
    monkeypatch.setattr(dequant_gemm, "fp8_conversions", lambda device: hardware)
    e8m0 = torch.arange(255, dtype=torch.uint8)
    e4m3 = torch.arange(256, dtype=torch.uint8)
    e4m3 = e4m3[(e4m3 & 0x7F) != 0x7F]
    for kind, scale_bytes, expected in [
        ("e8m0", e8m0, torch.exp2(e8m0.double() - 127)),
        ("e4m3", e4m3, e4m3.view(torch.float8_e4m3fn).double()),
    ]:
        n = scale_bytes.numel()
        qweight = bitpack.pack(torch.full((n, 32), 0x2, dtype=torch.int32), 4)  # E2M1 1.0
        x = F.one_hot(torch.zeros(m, dtype=torch.long), 32).float().to(device)  # y = the decoded weight itself
        y = dequant_matmul(x, qweight.to(device),
                           scale_bytes.reshape(1, n).to(device), None, None, bits=4, group_size=32,
                           in_features=32, element="e2m1", scale_kind=kind)
        assert torch.equal(y[-1].cpu().double(), expected.float().double()), kind


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hardware", [True, False])
@pytest.mark.parametrize("m", [1, 8])
def test_scale_decoders_cover_every_byte(device, hardware, m, monkeypatch):
    """E8M0 bytes 0..254 (0 = 2^-127, 254 = 2^127: no overflow on the way) and every finite E4M3
    byte as the scale of the element 1.0, through the GEMV (M=1) and the GEMM (M=8): E4M3 in
    hardware (`dequant_gemv._e4m3_value`, sm_89 on; emulated by the interpreter) and with
    integer ops."""
    _check_scale_decoders(device, hardware, m, monkeypatch)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("hardware", [True, False])
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_scale_decoders_cover_every_byte(hardware, m, monkeypatch):
    """As test_scale_decoders_cover_every_byte, compiled: on sm_89 on, `hardware` runs
    cvt.rn.f16x2.e4m3x2 itself."""
    _check_scale_decoders("cuda", hardware, m, monkeypatch)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 1024, 4096), (64, 14336, 4096), (1, 4096, 14336)])
def test_gpu_real_shapes(name, m, n, k):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    p = get_format(name).quantize(w)
    ref = F.linear(x.float(), get_format(name).dequantize(p).float())
    _assert_close(lowbit.linear(x, p), ref, torch.bfloat16)
