"""The LUT formats' kernels (the table-lookup kernel; the dequant GEMV and GEMM on one-bit planes)
for lut1-lut4, and the codebook formats nf4 / bnb_fp4 / iq4_nl through the generic dequant kernel,
against F.linear on the dequantized weight. Interpreter on CPU; `gpu` tests add real shapes."""
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import get_format
from lowbit.kernels.lut_gemm import lut_matmul

from ..conftest import kernel_devices, requires_gpu

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _assert_close(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float().cpu() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["lut1", "lut2", "lut3", "lut4", "nf4", "bnb_fp4", "iq4_nl"])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_linear_equals_f_linear_on_dequantized_weight(device, name, m):
    width = int(next(c for c in reversed(name) if c.isdigit()))
    dtype = DTYPES[(m + width) % 3]
    gen = torch.Generator().manual_seed(m)
    w, x, b = torch.randn(37, 300, generator=gen), torch.randn(m, 300, generator=gen), torch.randn(37, generator=gen)
    fmt = get_format(name)
    p = fmt.quantize(w)
    ref = F.linear(x.to(dtype).float(), fmt.dequantize(p), b.to(dtype).float())
    _assert_close(lowbit.linear(x.to(device, dtype), p.to(device), b.to(device, dtype), backend="triton"), ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 3, 4])
@pytest.mark.parametrize("m,split_k", [(1, 1), (4, 3), (16, 2), (17, 1)])
def test_lookup_kernel_any_m_and_split(device, bits, m, split_k):
    """The lookup kernel itself (forced with a config, also above LUT_MAX_M) and its split-K."""
    gen = torch.Generator().manual_seed(bits)
    w, x = torch.randn(33, 256, generator=gen), torch.randn(m, 256, generator=gen)
    fmt = get_format(f"lut{bits}")
    p = fmt.quantize(w, group_size=64)
    cfg = {"path": "lut", "BLOCK_M": min(16, 1 << (m - 1).bit_length()), "BLOCK_N": 16, "BLOCK_K": 64,
           "SPLIT_K": split_k}
    y = lut_matmul(x.to(device), p.qweight.to(device), p.scales.to(device), p.zeros.to(device), None, bits=bits,
                   group_size=64, in_features=256, config=cfg)
    _assert_close(y, F.linear(x, fmt.dequantize(p)), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("m,split_k,column_k", [(1, 1, 32), (2, 3, 64), (4, 2, 32)])
def test_one_bit_plane_gemv(device, bits, m, split_k, column_k):
    """The dequant GEMV on the LUT formats' planes (merged in pairs into 2-bit codes, an odd top
    plane alone), the default at small M: K = 300 pads to 320, so the last tile is partial."""
    gen = torch.Generator().manual_seed(10 + bits)
    w, x, b = torch.randn(21, 300, generator=gen), torch.randn(m, 300, generator=gen), torch.randn(21, generator=gen)
    fmt = get_format(f"lut{bits}")
    p = fmt.quantize(w, group_size=64)
    cfg = {"path": "gemv", "BLOCK_M": m, "BLOCK_N": 4, "COLUMN_K": column_k, "SPLIT_K": split_k, "num_warps": 1}
    y = lut_matmul(x.to(device), p.qweight.to(device), p.scales.to(device), p.zeros.to(device), b.to(device),
                   bits=bits, group_size=64, in_features=300, config=cfg)
    _assert_close(y, F.linear(x, fmt.dequantize(p), b), torch.float32)


def test_launch_config_needs_a_path():
    p = get_format("lut2").quantize(torch.randn(8, 64), group_size=32)
    with pytest.raises(lowbit.LowbitError, match="needs a path"):
        lut_matmul(torch.randn(1, 64), p.qweight, p.scales, p.zeros, None, bits=2, group_size=32, in_features=64,
                   config={"BLOCK_N": 16})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["nf4", "bnb_fp4"])
def test_codebook_double_quant_kernel(device, name):
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(40, 200, generator=gen), torch.randn(2, 200, generator=gen)
    fmt = get_format(name)
    p = fmt.quantize(w, double_quant=True)
    _assert_close(lowbit.linear(x.to(device), p.to(device), backend="triton"), F.linear(x, fmt.dequantize(p)),
                  torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_registration(device):
    p = get_format("lut2").quantize(torch.randn(33, 64), group_size=32).to(device)
    x = torch.randn(3, 64, device=device, dtype=torch.float16)
    torch.library.opcheck(torch.ops.lowbit.lut_linear.default, (x, p.qweight, p.scales, p.zeros, None, 2, 32, 64),
                          test_utils=("test_schema", "test_faketensor"))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lut2", "lut4", "nf4", "bnb_fp4", "iq4_nl"])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (4, 1024, 4096), (16, 14336, 4096), (64, 4096, 4096)])
def test_gpu_real_shapes(name, m, n, k):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    p = get_format(name).quantize(w)
    _assert_close(lowbit.linear(x, p), F.linear(x.float(), get_format(name).dequantize(p).float()).cpu(),
                  torch.bfloat16)
