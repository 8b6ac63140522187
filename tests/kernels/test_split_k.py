"""The in-launch split-K reduction (lowbit/kernels/split_k.py) of the GEMVs and the GEMM: one launch,
the same bits every run, counters back at zero afterwards, and a grid larger than the counter
buffer grows it. On a GPU, a stress run checks the semaphore under real concurrency."""
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats.dfloat11 import CODE_BITS
from lowbit.kernels import split_k
from lowbit.kernels.dequant_gemm import dequant_matmul
from lowbit.kernels.dfloat11 import dfloat11_matmul
from lowbit.kernels.lut_gemm import lut_matmul

from ..conftest import kernel_devices, requires_gpu

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")


def _run(name: str, packed, x, bias, split: int):
    """`packed` times x with `split` K splits through its kernel (int4-gemm: the tensor-core GEMM)."""
    fields = packed.tensors
    if name.startswith("int4"):
        config = ({"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split}
                  if name == "int4-gemm" else
                  {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "COLUMN_K": 8, "SPLIT_K": split, "num_warps": 1})
        return dequant_matmul(x, fields["qweight"], fields["scales"], fields["zeros"], bias, bits=4, group_size=32,
                              in_features=packed.shape[1], config=config)
    if name == "lut2":
        return lut_matmul(x, fields["qweight"], fields["scales"], fields["zeros"], bias, bits=2, group_size=32,
                          in_features=packed.shape[1],
                          config={"path": "lut", "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split})
    return dfloat11_matmul(x, fields["exponent_code"], fields["sign_mantissa"], fields["segment_offsets"],
                           fields["decode_table"], bias, segment=packed.attrs["segment"], code_bits=CODE_BITS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,m", [("int4", 1), ("int4-gemm", 20), ("lut2", 1), ("dfloat11", 1)])
def test_split_k_is_one_deterministic_launch_that_resets_its_counters(device, name, m):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(40, 640, generator=gen) * 0.02).to(device)  # dfloat11: 10 segments of 64 per row, 2 splits
    x = torch.randn(m, 640, generator=gen).to(device)  # int4-gemm: 2 x 3 output tiles, 20 K tiles in 4 splits
    bias = torch.randn(40, generator=gen).to(device)
    options = {"segment": 64, "cast": True} if name == "dfloat11" else {"group_size": 32}
    fmt = lowbit.get_format(name.split("-")[0])
    packed = fmt.quantize(w, **options)
    ref = F.linear(x, fmt.dequantize(packed).float(), bias)
    split_k._counters.clear()
    outputs = [_run(name, packed, x, bias, split=4) for _ in range(3)]
    assert len(split_k._counters) == 1  # the launches took the split path
    assert int(split_k.counters(x.device, 1).abs().sum()) == 0  # every reducing program reset its counter
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])
    torch.testing.assert_close(outputs[0], ref, rtol=1e-5, atol=1e-5)
    if name != "dfloat11":  # (its split count is the number of segment blocks)
        torch.testing.assert_close(_run(name, packed, x, bias, split=1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_counter_buffer_grows_for_large_grids(device):
    split_k._counters.clear()
    small = split_k.counters(torch.device(device), 10)
    assert small.numel() >= 10 and int(small.abs().sum()) == 0
    assert split_k.counters(torch.device(device), 10) is small  # reused while large enough
    big = split_k.counters(torch.device(device), small.numel() + 1)
    assert big.numel() > small.numel() and int(big.abs().sum()) == 0


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path,m", [("gemv", 1), ("gemv", 4), ("gemm", 16), ("gemm", 100)])
def test_gpu_split_k_stress(path, m):
    """Hundreds of launches of a heavily split GEMV / GEMM on a real shape give the same bits each
    time (a missing barrier or fence in the semaphore would show up as a stale partial sum)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    packed = lowbit.get_format("int4").quantize(w)
    f = packed.tensors
    cfg = ({"path": "gemv", "BLOCK_M": min(m, 4), "BLOCK_N": 4, "COLUMN_K": 8, "SPLIT_K": 16, "num_warps": 1}
           if path == "gemv" else {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 16})
    first = dequant_matmul(x, f["qweight"], f["scales"], f["zeros"], None, bits=4, group_size=128, in_features=4096,
                           config=cfg)
    ref = F.linear(x.float(), lowbit.get_format("int4").dequantize(packed).float())
    assert float((first.float() - ref).abs().max() / ref.abs().max()) < 1e-2
    for _ in range(300):
        y = dequant_matmul(x, f["qweight"], f["scales"], f["zeros"], None, bits=4, group_size=128, in_features=4096,
                           config=cfg)
        assert torch.equal(y, first)
