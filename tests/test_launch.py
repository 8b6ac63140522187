"""lowbit.ops.launch: eager calls skip the custom-op dispatcher, traced ones go through the op."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit import ops

from .conftest import kernel_devices


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_only_plain_untraced_tensors_run_eagerly():
    x = torch.ones(2, 3)
    assert ops.runs_eagerly(x)
    with FakeTensorMode() as mode:
        assert not ops.runs_eagerly(mode.from_tensor(x))
    with _Passthrough():
        assert not ops.runs_eagerly(x)
    assert not torch.func.vmap(lambda row: torch.tensor(ops.runs_eagerly(row)))(x).any()
    assert not torch.compile(lambda t: t + ops.runs_eagerly(t), backend="eager", fullgraph=True)(x).ne(1).any()
    seen = []
    torch.jit.trace(lambda t: seen.append(ops.runs_eagerly(t)) or t * 2, x, check_trace=False)
    assert seen and not any(seen)


@pytest.mark.skipif("cpu" not in [d.type for d in map(torch.device, kernel_devices())],
                    reason="needs Triton's interpreter")
def test_an_eager_launch_calls_the_implementation_not_the_op(monkeypatch):
    packed = lowbit.get_format("int4").quantize(torch.randn(40, 64))
    x = torch.randn(3, 64)
    expected = lowbit.linear(x, packed, backend="triton")

    def refuse(*args):
        raise AssertionError("the eager call went through the dispatcher")

    monkeypatch.setattr(torch.ops.lowbit, "dequant_linear", refuse)
    assert torch.equal(lowbit.linear(x, packed, backend="triton"), expected)
    with _Passthrough(), pytest.raises(AssertionError, match="through the dispatcher"):
        lowbit.linear(x, packed, backend="triton")  # a dispatch mode watching: the op
