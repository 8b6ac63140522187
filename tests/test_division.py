"""The quantizers divide by constants only through lowbit.formats.division.divide.

CUDA computes `tensor / python_number` as a product with the rounded reciprocal, the CPU as a
division; they differ in the last bit for some values, and a scale one bit off can change the
codes. The first H100 run found GPU-quantized models whose codes differed from the CPU spec's
(tests/test_api.py's `gpu` test) for int3/4/6, fp8, nvfp4, lut3/4 and nf4's double quantization.
This CPU test watches every float32 / float16 / bfloat16 division lowbit makes while quantizing
every format (and running its activation quantizers), and fails on one by a Python number that is
not a power of two (a power of two has an exact reciprocal, so both devices agree).
"""
import math
import traceback

import pytest
import torch

import lowbit
from lowbit.formats import division

from .conftest import make_tiny_llama
from .test_io import EVERY_FORMAT

CALIBRATED = [("int4", {"method": "gptq"}), ("nvfp4", {"method": "gptq"}), ("nf4", {"method": "gptq"}),
              ("mxfp4", {"method": "gptq", "rotate": "hadamard"}), ("int4", {"method": "mse"}),
              ("iq4_nl", {"method": "mse"})]


def _inexact_reciprocal(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0 or not math.isfinite(value):
        return False
    return math.frexp(abs(value))[0] != 0.5


@pytest.fixture
def divisions_by_numbers(monkeypatch):
    """Records (file, line) of each lowbit division of a 16/32-bit float tensor by a Python
    number whose reciprocal is inexact."""
    found = []

    def watched(original):
        def divide(tensor, other, *args, **kwargs):
            if (isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float32, torch.float16, torch.bfloat16)
                    and _inexact_reciprocal(other)):
                frames = [f for f in traceback.extract_stack()[:-1] if "/lowbit/" in f.filename]
                if frames and frames[-1].filename != division.__file__:
                    found.append(f"{frames[-1].filename.split('/lowbit/')[-1]}:{frames[-1].lineno}")
            return original(tensor, other, *args, **kwargs)
        return divide

    for name in ("__truediv__", "__itruediv__", "div", "true_divide"):
        monkeypatch.setattr(torch.Tensor, name, watched(getattr(torch.Tensor, name)))
    for name in ("div", "true_divide"):
        monkeypatch.setattr(torch, name, watched(getattr(torch, name)))
    return found


def test_the_quantizers_divide_by_constants_on_every_device_alike(divisions_by_numbers):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))  # >= 32 rows: W8A8 paths
    for fmt, options in [*EVERY_FORMAT, *CALIBRATED]:
        calibration = {"calibration": [ids]} if options.get("method") == "gptq" else {}
        model = lowbit.quantize(make_tiny_llama(dtype=torch.bfloat16), fmt, skip=["lm_head"], progress=False,
                                **options, **calibration)
        with torch.no_grad():
            model(ids)  # the torch reference on CPU: the activation quantizers of act= formats
    assert not divisions_by_numbers, sorted(set(divisions_by_numbers))


def test_divide_rounds_as_the_cpu_division():
    values = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 100
    for divisor in (7, 15, 127, 448.0, 6 * 448.0):
        assert torch.equal(division.divide(values, divisor), values / divisor)
        assert torch.equal(division.divide(values.double(), divisor), values.double() / divisor)
