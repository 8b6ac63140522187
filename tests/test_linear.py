import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import FormatError, InputError
from lowbit.formats import get_format

from .conftest import requires_gpu
from .test_io import EVERY_FORMAT


def _layer(bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(300, 37, bias=bias).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_functional_reference(bias):
    dense = _layer(bias)
    q = lowbit.QuantLinear.from_linear(dense, "int6", group_size=64)
    x = torch.randn(2, 5, 300)
    w_hat = get_format("int6").dequantize(q.packed)
    assert torch.equal(q(x), torch.nn.functional.linear(x, w_hat, dense.bias))
    assert (q(x) - dense(x)).abs().max() < 0.05 * dense(x).abs().max()


@pytest.mark.parametrize("act_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_activation_dtypes(act_dtype):
    q = lowbit.QuantLinear.from_linear(_layer(), "int8")
    y = q(torch.randn(3, 300).to(act_dtype))
    assert y.dtype == act_dtype and y.shape == (3, 37)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt,options,autocast_dtype", [
    ("int4", {}, torch.bfloat16), ("int4", {}, torch.float16), ("fp8", {"act": "fp8"}, torch.bfloat16),
    ("nvfp4", {"act": "nvfp4"}, torch.float16), ("dfloat11", {}, torch.bfloat16)], ids=lambda v: str(v))
def test_autocast_computes_in_its_dtype_as_nn_linear(fmt, options, autocast_dtype, backend):
    """Under torch.autocast an fp32 x is multiplied in the autocast dtype, as nn.Linear does, on both
    backends (the Triton ops are not autocast-aware: they returned fp32), and the reference's own
    fp32 product (act=) stays fp32 inside: the layer on x cast by hand, without autocast."""
    dense = _layer().to(torch.bfloat16 if fmt == "dfloat11" else torch.float32)
    q = lowbit.QuantLinear.from_linear(dense, fmt, **options)
    x = torch.randn(3, 300)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = q(x, backend=backend)
        assert dense(x.to(dense.weight.dtype)).dtype == autocast_dtype
    assert y.dtype == autocast_dtype
    assert torch.equal(y, q(x.to(autocast_dtype), backend=backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_an_empty_batch_gives_an_empty_output(fmt, options, backend):
    """Zero tokens (an empty batch, a padded-away chunk) give a [..., 0, N] output and gradient, as
    nn.Linear does; nvfp4 activations once failed taking the amax of no values."""
    q = lowbit.QuantLinear.from_linear(nn.Linear(64, 48).bfloat16(), fmt, **options)
    for shape in [(0, 64), (2, 0, 64)]:
        x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
        y = q(x, backend=backend)
        assert y.shape == (*shape[:-1], 48) and y.dtype == torch.bfloat16
        y.sum().backward()
        assert x.grad.shape == shape


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_gpu_an_empty_batch_gives_an_empty_output(fmt, options):
    q = lowbit.QuantLinear.from_linear(nn.Linear(4096, 1024).bfloat16(), fmt, **options).cuda()
    y = q(torch.randn(0, 4096, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.synchronize()
    assert y.shape == (0, 1024) and y.is_cuda


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "fp8", "dfloat11"])
def test_gpu_autocast_runs_the_kernel_in_its_dtype(fmt):
    dense = nn.Linear(4096, 1024).to(torch.bfloat16 if fmt == "dfloat11" else torch.float32)
    q = lowbit.QuantLinear.from_linear(dense, fmt).cuda()
    x = torch.randn(16, 4096, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, q(x.bfloat16()))


def test_extra_repr_shows_format_and_bits():
    text = repr(lowbit.QuantLinear.from_linear(_layer(), "int4", symmetric=True))
    assert "format=int4" in text and "group_size=128" in text
    assert "bits_per_weight=5.280" in text  # (384*4 + 3*16) / 300


def test_state_dict_keys_are_fields():
    model = nn.Sequential(_layer())
    lowbit.quantize(model, "int4", progress=False)
    assert set(model.state_dict()) == {"0.qweight", "0.scales", "0.zeros", "0.bias"}


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_model_dtype_casts_do_not_touch_packed_fields(fmt):
    """fp8 codes are floating-point tensors, so .half() would cast them if nothing stopped it."""
    q = lowbit.QuantLinear.from_linear(_layer(), fmt)
    before = {k: v.clone() for k, v in q.packed.tensors.items()}
    q.to(torch.bfloat16)
    q.half()
    for name, tensor in q.packed.tensors.items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name])
    assert q.bias.dtype == torch.float16
    assert q(torch.randn(2, 300, dtype=torch.float16)).dtype == torch.float16


def test_meta_construction_has_declared_shapes():
    q = lowbit.QuantLinear(300, 37, "int3", {"group_size": 128, "symmetric": False}, device="meta")
    assert q.qweight.shape == (37, 384 * 3 // 32) and q.scales.shape == (3, 37) and q.zeros.shape == (3, 37)


def test_weight_stands_in_with_the_original_shape_dtype_and_device_but_no_values():
    """Model code reads `.weight.dtype` of a Linear (T5's feed-forward); the values are not there,
    so computing with it raises (a meta tensor in a CPU matmul returned uninitialized memory)."""
    q = lowbit.QuantLinear.from_linear(_layer(dtype=torch.bfloat16), "int4")
    w = q.weight
    assert isinstance(w, torch.Tensor) and w.shape == (37, 300) and w.dtype == torch.bfloat16
    assert w.device == q.qweight.device and w.dim() == 2 and "weight" not in q.state_dict()
    x = torch.randn(2, 300, dtype=torch.bfloat16)
    for compute in (lambda: torch.nn.functional.linear(x, w), lambda: x @ w.t(), lambda: w.float(), lambda: w.data):
        with pytest.raises(InputError, match="stands in for a packed weight and has no values"):
            compute()
    assert repr(w) == "WeightStandIn(shape=(37, 300), dtype=torch.bfloat16, device=cpu)"


def test_load_state_dict_round_trips_and_never_casts_a_packed_field():
    """torch's load_state_dict casts into a buffer (float codes would be truncated into int32) and,
    with assign=True, takes any dtype: a packed field of another dtype is refused instead."""
    model = lowbit.quantize(nn.Sequential(_layer()), "int4", progress=False)
    state = model.state_dict()
    fresh = lowbit.quantize(nn.Sequential(_layer(bias=True)), "int4", progress=False)
    fresh[0].qweight.zero_()
    fresh.load_state_dict(state)
    x = torch.randn(3, 300)
    assert torch.equal(fresh(x), model(x))
    for assign, dtype in [(False, torch.float32), (True, torch.int64)]:
        bad = {**state, "0.qweight": state["0.qweight"].to(dtype)}
        with pytest.raises(FormatError, match=rf"0\.qweight: int4 stores this field as torch.int32, the state dict "
                                              rf"holds {dtype}"):
            fresh.load_state_dict(bad, assign=assign)


def test_load_state_dict_checks_values_a_kernel_uses_as_addresses():
    """A dfloat11 segment offset past the end of the stream, arriving through load_state_dict, is
    refused as lowbit.load refuses it (the kernels read a segment's first stream words unmasked)."""
    layer = lowbit.QuantLinear.from_linear(nn.Linear(512, 8, bias=False).bfloat16(), "dfloat11")
    state = {name: t.clone() for name, t in layer.state_dict().items()}
    state["segment_offsets"][7, 1] = 2**30
    with pytest.raises(FormatError, match=r"layer: dfloat11 field 'segment_offsets': segment 1 of row 7 starts at bit"):
        lowbit.QuantLinear.from_metadata(layer.metadata()).load_state_dict(state, assign=True)
