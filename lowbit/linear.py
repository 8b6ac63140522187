"""QuantLinear: drop-in nn.Linear replacement holding a PackedWeight as registered buffers."""
from __future__ import annotations

import functools
import json
from typing import Any

import torch
from torch import nn

from .errors import FormatError, InputError, LowbitError
from .formats import get_format
from .packed import PackedWeight, packed_metadata, parse_metadata


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2: y = x @ W + b with W stored [in, out])."""
    return type(module).__name__ == "Conv1D" and type(module).__module__ == "transformers.pytorch_utils"


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a layer a QuantLinear can stand in for: an nn.Linear or
    transformers' Conv1D; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.nf, module.weight.shape[0]
    return None


def is_quantize_target(module: nn.Module) -> bool:
    """The layers lowbit.quantize replaces: exactly nn.Linear or Conv1D. Subclasses stay: their
    parents may read the weight directly (nn.MultiheadAttention's out_proj)."""
    return type(module) is nn.Linear or is_conv1d(module)


def linear_weight(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The [out_features, in_features] weight of a layer `linear_shape` accepts (a Conv1D's stored
    [in, out] transposed); `weight`: that layer's weight tensor from elsewhere (a checkpoint)."""
    weight = module.weight if weight is None else weight
    return weight if isinstance(module, nn.Linear) else weight.t()


class WeightStandIn(torch.Tensor):
    """`QuantLinear.weight` (and a quantized fused expert weight, lowbit/experts.py): the original
    weight's shape, dtype and device, and no values. Model code that reads those runs unchanged
    (T5 casts its feed-forward input to `wo.weight.dtype`); any computation with it raises
    InputError. (A meta tensor would not do: torch takes one in a CPU matmul and returns
    uninitialized memory.)"""

    _METADATA = frozenset({torch.Tensor.dtype.__get__, torch.Tensor.shape.__get__, torch.Tensor.device.__get__,
                           torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndim.__get__, torch.Tensor.numel,
                           torch.Tensor.is_meta.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.layout.__get__,
                           torch.Tensor.requires_grad.__get__, torch.Tensor.is_floating_point,
                           torch.Tensor.element_size})

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> "WeightStandIn":
        stand_in = torch.Tensor._make_subclass(cls, torch.empty((), dtype=dtype, device=device).expand(*shape))
        # transformers' "has its values, do not initialize" flag (its init functions check it):
        # the values are the packed fields, loaded from the checkpoint
        stand_in._is_hf_initialized = True
        return stand_in

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise InputError(f"this weight (a QuantLinear's, or a quantized MoE layer's fused expert weight) stands "
                         f"in for a packed weight and has no values ({getattr(func, '__name__', func)}): call the "
                         f"layer, or dequantize its packed weight (lowbit.get_format(layer.format).dequantize("
                         f"layer.packed), for each QuantLinear)")

    def __repr__(self) -> str:
        return f"WeightStandIn(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


@functools.lru_cache(maxsize=1024)
def weight_stand_in(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> WeightStandIn:
    """One stand-in per shape, dtype and device, not an allocation per `.weight` read (T5 reads it
    in every forward); sharing is safe, as nothing can be done with one but read those three."""
    return WeightStandIn(shape, dtype, device)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored in a lowbit format.

    The packed tensor fields are buffers named after the format's fields (so the state dict
    keys are `{qualified_name}.{field}`); `bias` stays a float parameter. Inputs may have any
    leading shape [..., in_features] and dtype float16 / bfloat16 / float32.
    """

    def __init__(self, in_features: int, out_features: int, format: str, attrs: dict[str, Any],
                 bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        fmt = get_format(format)
        self.in_features = in_features
        self.out_features = out_features
        self.format = format
        self.attrs = fmt.check_attrs((out_features, in_features), dict(attrs))
        self.weight_dtype = dtype
        #: the packed weight's metadata as JSON, written once here: traced code cannot call
        #: json.dumps, and lowbit::grouped_linear (MoE experts) takes this string
        self.packed_json = json.dumps(packed_metadata(format, (out_features, in_features), dtype, self.attrs))
        #: an already-decoded [N, K] weight that forward uses instead of the packed one, set
        #: for the duration of one block's forward by lowbit/block_decode.py
        self.decoded_weight: torch.Tensor | None = None
        self._fields = fmt.field_specs((out_features, in_features), self.attrs)
        for name, spec in self._fields.items():
            self.register_buffer(name, torch.empty(spec.shape, dtype=spec.dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap an existing PackedWeight (and optional bias [N])."""
        n, k = packed.shape
        layer = cls(k, n, packed.format, packed.attrs, bias=bias is not None, dtype=packed.dtype,
                    device="meta")
        for name, tensor in packed.tensors.items():
            layer._buffers[name] = tensor
        if bias is not None:
            # the bias takes the weight's dtype (which a checkpoint records), e.g. bf16 for dfloat11 with cast=True
            layer.bias = nn.Parameter(bias.detach().to(packed.dtype, copy=True), requires_grad=False)
        return layer

    @classmethod
    def from_metadata(cls, entry: Any, device: torch.device | str = "meta") -> "QuantLinear":
        """An empty layer (buffers on `device`, meta by default) from a `metadata()` entry, e.g.
        read from a checkpoint; FormatError when the entry is malformed."""
        if not isinstance(entry, dict) or not isinstance(entry.get("bias"), bool):
            raise FormatError(f"expected an object with a true/false 'bias', got {entry!r}")
        fmt, (n, k), dtype, attrs = parse_metadata(entry)
        return cls(k, n, fmt.name, attrs, bias=entry["bias"], dtype=dtype, device=device)

    def metadata(self) -> dict[str, Any]:
        """This layer as JSON: the packed weight's format, shape, dtype, attrs, and the bias flag
        (the entries of lowbit.json's and quantization_config's `layers`)."""
        return {**self.packed.metadata(), "bias": self.bias is not None}

    @classmethod
    def from_linear(cls, linear: nn.Module, format: str, *, name: str = "weight", **options: Any) -> "QuantLinear":
        """Quantize an nn.Linear's (or transformers Conv1D's) weight into `format` (options as the
        format accepts)."""
        if linear_shape(linear) is None:
            raise InputError(f"{name}: expected an nn.Linear (or transformers Conv1D), got {type(linear).__name__}")
        packed = get_format(format).quantize(linear_weight(linear).detach(), name=name, **options)
        return cls.from_packed(packed, None if linear.bias is None else linear.bias.detach())

    @property
    def weight(self) -> WeightStandIn:
        """[out_features, in_features] in the original weight's dtype, on the packed weight's
        device, without values (`WeightStandIn`): for model code that reads `.weight.dtype`."""
        device = self._buffers[next(iter(self._fields))].device
        return weight_stand_in((self.out_features, self.in_features), self.weight_dtype, device)

    @property
    def packed(self) -> PackedWeight:
        """The packed weight (this module's buffers, no copy; validated when they were set)."""
        return PackedWeight.unchecked(self.format, (self.out_features, self.in_features), self.weight_dtype,
                            self.attrs, {name: self._buffers[name] for name in self._fields})

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        from .ops import linear, records_gradient

        # a block-decoded weight is a view of a buffer the next block overwrites: autograd must
        # not keep it for the backward pass, so a recorded call takes lowbit.linear's path
        if self.decoded_weight is not None and backend is None and not records_gradient(x, self.bias):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self.decoded_weight.to(x.dtype), bias)
        return linear(x, self.packed, self.bias, backend=backend)

    def _apply(self, fn, recurse=True):
        # Packed fields keep their declared dtypes: model.half() / .to(bfloat16) must move them
        # between devices but never cast them (a cast would corrupt codes and scales).
        saved = {name: self._buffers.pop(name) for name in self._fields}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in saved.items():
                moved = fn(tensor)
                if moved.dtype != tensor.dtype:
                    moved = tensor.to(device=moved.device)
                self._buffers[name] = moved
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict would cast a packed field into its buffer (float codes truncated into
        # int32) or, with assign=True, take any dtype; packed fields are never cast, so a dtype
        # other than the declared one is refused. The loaded values are then checked as
        # lowbit.load checks them (Format.check_data: values a kernel uses as addresses).
        for name, spec in self._fields.items():
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.dtype != spec.dtype:
                raise FormatError(f"{prefix}{name}: {self.format} stores this field as {spec.dtype}, the state "
                                  f"dict holds {value.dtype} (packed fields are never cast)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.check_loaded_data(prefix.rstrip(".") or "layer")

    def check_loaded_data(self, name: str) -> None:
        """FormatError naming `name` when loaded packed values could not safely reach a kernel
        (`PackedWeight.check_data`); nothing to check while a field is on meta (offloaded)."""
        packed = self.packed
        if any(t.is_meta for t in packed.tensors.values()):
            return
        try:
            packed.check_data()
        except LowbitError as exc:
            raise FormatError(f"{name}: {exc}") from None

    def extra_repr(self) -> str:
        n, k = self.out_features, self.in_features
        packed_bits = 8 * sum(spec.nbytes for spec in self._fields.values())
        attrs = ", ".join(f"{key}={val}" for key, val in self.attrs.items())
        return (f"in_features={k}, out_features={n}, bias={self.bias is not None}, "
                f"format={self.format}, bits_per_weight={packed_bits / (n * k):.3f}, {attrs}")
