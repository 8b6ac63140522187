"""`lowbit::grouped_linear`: rows grouped by expert, each group through its expert's packed weight.

A quantized MoE layer (lowbit/experts.py) runs each expert on its share of the routed rows, and
the shares are known only on the device. This op reads them on the host inside itself, so
torch.compile and torch.export see one node with a static [S, N] output (transformers' own
experts do the same with `grouped_mm`): a quantized MoE model compiles with `fullgraph=True`
and exports. The experts' packed tensors travel as one flat list and their metadata as one
JSON string (each QuantLinear's `packed_json`), the only forms a custom op's schema takes.
Gradients reach x (`lowbit::grouped_linear_input_grad`), as `lowbit.linear`'s do.
"""
from __future__ import annotations

import functools
import json
from typing import Sequence

import torch

from .linear import QuantLinear
from .ops import as_under_autocast, default_backend, input_gradient, linear
from .packed import PackedWeight, parse_metadata


@functools.lru_cache(maxsize=256)
def _layout(experts_json: str) -> tuple[tuple[str, tuple[int, int], torch.dtype, dict, tuple[str, ...]], ...]:
    """(format, (N, K), dtype, attrs, field names in `field_specs` order) per expert, parsed once per layout."""
    layout = []
    for entry in json.loads(experts_json):
        fmt, shape, dtype, attrs = parse_metadata(entry)
        layout.append((fmt.name, shape, dtype, attrs, tuple(fmt.field_specs(shape, attrs))))
    return tuple(layout)


def _packed_experts(tensors: Sequence[torch.Tensor], experts_json: str) -> list[PackedWeight]:
    """The experts' PackedWeights from the flat tensor list (expert by expert, each in field order)."""
    fields = iter(tensors)
    return [PackedWeight.unchecked(name, shape, dtype, attrs, {field: next(fields) for field in names})
            for name, shape, dtype, attrs, names in _layout(experts_json)]


def _groups(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, row count) of every expert with rows; one host read of the counts."""
    starts, groups = 0, []
    for expert, count in enumerate(counts.tolist()):
        if count:
            groups.append((expert, starts, count))
        starts += count
    return groups


@torch.library.custom_op("lowbit::grouped_linear", mutates_args=())
def grouped_linear_op(x: torch.Tensor, counts: torch.Tensor, tensors: list[torch.Tensor], experts_json: str,
                      out_features: int) -> torch.Tensor:
    """x [S, K] (rows sorted by expert), counts [E] int64 (rows per expert, summing to S) -> [S, N] in x.dtype."""
    out = x.new_empty((x.shape[0], out_features))
    packed = _packed_experts(tensors, experts_json)
    for expert, start, count in _groups(counts):
        out[start:start + count] = linear(x[start:start + count], packed[expert])
    return out


@grouped_linear_op.register_fake
def _fake_grouped_linear(x, counts, tensors, experts_json, out_features):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("lowbit::grouped_linear_input_grad", mutates_args=())
def grouped_linear_input_grad(grad: torch.Tensor, counts: torch.Tensor, tensors: list[torch.Tensor],
                              experts_json: str, in_features: int) -> torch.Tensor:
    """grad_y [S, N] of `lowbit::grouped_linear` -> grad_x [S, K]: each group times its expert's W_hat."""
    grad_x = grad.new_empty((grad.shape[0], in_features))
    packed = _packed_experts(tensors, experts_json)
    backend = default_backend(grad.device)
    for expert, start, count in _groups(counts):
        grad_x[start:start + count] = input_gradient(grad[start:start + count], packed[expert], backend)
    return grad_x


@grouped_linear_input_grad.register_fake
def _fake_input_grad(grad, counts, tensors, experts_json, in_features):
    return grad.new_empty((grad.shape[0], in_features))


def _save_for_backward(ctx, inputs, output) -> None:
    x, counts, tensors, experts_json, _ = inputs
    ctx.save_for_backward(counts, *tensors)
    ctx.experts_json, ctx.in_features = experts_json, x.shape[1]


def _backward(ctx, grad: torch.Tensor):
    counts, *tensors = ctx.saved_tensors
    grad_x = grouped_linear_input_grad(grad, counts, tensors, ctx.experts_json, ctx.in_features)
    return grad_x, None, [None] * len(tensors), None, None  # the same structure as the inputs


grouped_linear_op.register_autograd(_backward, setup_context=_save_for_backward)


def grouped_linear(x: torch.Tensor, counts: torch.Tensor, layers: Sequence[QuantLinear]) -> torch.Tensor:
    """x [S, K] with rows sorted by expert, counts [E] (rows per expert) -> [S, N]: rows of expert e
    through `layers[e]` (bias-less QuantLinears of one shape) in one `lowbit::grouped_linear` node.
    Under torch.autocast, computed in its dtype, as `lowbit.linear`."""
    if torch.is_autocast_enabled(x.device.type):
        return as_under_autocast(grouped_linear, x, counts, layers)
    return grouped_linear_op(x, counts, *op_arguments(layers), layers[0].out_features)


def op_arguments(layers: Sequence[QuantLinear]) -> tuple[list[torch.Tensor], str]:
    """The experts as the op takes them: every layer's packed fields in one flat list (expert by
    expert, each in field order), and their metadata as one JSON array."""
    tensors = [layer._buffers[field] for layer in layers for field in layer._fields]
    return tensors, "[" + ",".join(layer.packed_json for layer in layers) + "]"
