"""Format base class: the contract every quantization format implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FormatError, InputError, WeightError
from ..packed import PackedWeight

#: Weight / activation dtypes lowbit quantizes and computes with.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def launch(op: str, *args):
    """Call lowbit's custom op `op` on args (lowbit.ops.launch): how a format's `triton_linear`
    reaches its kernel. lowbit.ops is imported at the call, as it imports the formats."""
    from ..ops import launch as launch_op

    return launch_op(op, *args)


@dataclass(frozen=True)
class FieldSpec:
    """Declared dtype and shape of one packed tensor field."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * torch.Size(self.shape).numel()

    def check(self, tensor: Any, where: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise FormatError(f"{where}: expected a tensor, got {type(tensor).__name__}")
        if tensor.dtype != self.dtype:
            raise FormatError(f"{where}: dtype {tensor.dtype}, expected {self.dtype}")
        if tuple(tensor.shape) != self.shape:
            raise FormatError(f"{where}: shape {tuple(tensor.shape)}, expected {self.shape}")


class Format:
    """One quantization format: quantizer + dequantizer (the torch spec) + kernel entry.

    Subclasses set `name` and `ATTRS` (the attribute names stored per layer) and implement the
    methods below; `field_specs` declares the packed tensor fields with their dtypes and shapes.
    """

    name: str = ""
    ATTRS: tuple[str, ...] = ()
    #: default of every option, for formats whose options are exactly their ATTRS (the methods
    #: below then need only `check_values`); formats with shorthands override the methods
    DEFAULTS: dict[str, Any] = {}
    #: ATTRS a layer stores only when set (added after layers without them were written, which
    #: stay valid and are still written the same way)
    OPTIONAL_ATTRS: tuple[str, ...] = ()
    #: options that only steer how the quantizer picks codes and scales, never stored: a layer
    #: decodes the same way whatever they were (e.g. the integer formats' `method`)
    QUANTIZER_OPTIONS: tuple[str, ...] = ()
    #: values the `method` quantizer option takes, "rtn" (the default) first; formats with
    #: "method" in QUANTIZER_OPTIONS set it (and take "act_order" when "gptq" is one)
    METHODS: tuple[str, ...] = ("rtn",)
    #: the number of this format's packed layout, stored with every layer (`PackedWeight.metadata`);
    #: a layer stored in another layout is refused at load. Raise it when stored tensors change meaning.
    layout: int = 1

    # -- options / attributes -------------------------------------------------------------
    def check_values(self, values: dict[str, Any]) -> None:
        """FormatError for a complete set of option values (DEFAULTS filled in) that is invalid."""

    def resolve_attrs(self, shape: tuple[int, int], options: dict[str, Any]) -> dict[str, Any]:
        """User options (may be partial / use shorthands) -> complete, validated attrs (without
        QUANTIZER_OPTIONS, which are never stored)."""
        self.check_options(options)
        # OPTIONAL_ATTRS are stored only when set, so layers written before they existed stay as written
        return {key: value for key, value in {**self.DEFAULTS, **options}.items()
                if key not in self.QUANTIZER_OPTIONS and not (key in self.OPTIONAL_ATTRS and value is None)}

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise FormatError for option names or values this format does not accept."""
        self.check_option_names(options)
        self.check_values({**self.DEFAULTS, **options})

    def check_attrs(self, shape: tuple[int, int], attrs: Any) -> dict[str, Any]:
        """Validate stored attrs (e.g. read from a manifest); returns them. FormatError if bad."""
        self.check_attr_keys(attrs)
        self.check_values(attrs)
        return attrs

    def check_option_names(self, options: dict[str, Any]) -> None:
        """FormatError for option names this format does not take (its ATTRS and QUANTIZER_OPTIONS),
        and for a `method` not in METHODS."""
        accepted = sorted({*self.ATTRS, *self.QUANTIZER_OPTIONS})
        unknown = set(options) - set(accepted)
        if unknown:
            raise FormatError(f"{self.name}: unknown option(s) {sorted(unknown)}; accepted: {accepted}")
        if options.get("method", "rtn") not in self.METHODS:
            raise FormatError(f"{self.name}: method must be one of {self.METHODS}, got {options['method']!r}")
        if "act_order" in options:  # GPTQ's column order (lowbit/formats/gptq.py)
            if not isinstance(options["act_order"], bool):
                raise FormatError(f"{self.name}: act_order must be a bool, got {options['act_order']!r}")
            if options["act_order"] and options.get("method") != "gptq":
                raise FormatError(f"{self.name}: act_order=True orders GPTQ's columns: it needs method='gptq', "
                                  f"got method={options.get('method', 'rtn')!r}")

    def check_attr_keys(self, attrs: Any) -> None:
        """FormatError unless attrs is a dict with the ATTRS keys (OPTIONAL_ATTRS may be absent)."""
        required = [a for a in self.ATTRS if a not in self.OPTIONAL_ATTRS]
        if not isinstance(attrs, dict) or not set(required) <= set(attrs) <= set(self.ATTRS):
            optional = f" (optional: {list(self.OPTIONAL_ATTRS)})" if self.OPTIONAL_ATTRS else ""
            raise FormatError(f"{self.name}: attrs must have the keys {required}{optional} and no others, got {attrs!r}")

    def field_specs(self, shape: tuple[int, int], attrs: dict[str, Any]) -> dict[str, FieldSpec]:
        """The tensor fields (dtype, shape) a weight of `shape` with `attrs` packs into."""
        raise NotImplementedError

    def check_data(self, packed: PackedWeight) -> None:
        """FormatError for field values a kernel could not take safely: what data read from a file
        needs beyond the dtypes and shapes every PackedWeight checks when built. Run on loaded
        data (lowbit.load, from_pretrained, PackedWeight.from_state_dict). By default every value
        is safe (codes and scales are only decoded, never used as addresses)."""

    # -- the spec ---------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, *, name: str = "weight", **options: Any) -> PackedWeight:
        """Quantize a [N, K] float weight. `name` appears in error messages."""
        raise NotImplementedError

    def dequantize(self, packed: PackedWeight) -> torch.Tensor:
        """[N, K] tensor in packed.dtype: the exact values the format represents. FormatError for
        anything but a PackedWeight of this format (another format's fields would decode into a
        wrong answer or a crash deep in the unpacking)."""
        if not isinstance(packed, PackedWeight) or packed.format != self.name:
            got = f"format {packed.format!r}" if isinstance(packed, PackedWeight) else type(packed).__name__
            raise FormatError(f"{self.name}.dequantize: expected a PackedWeight of format {self.name!r}, got {got}")
        return self._dequantize(packed)

    def backward_weight(self, packed: PackedWeight, backend: str) -> torch.Tensor:
        """[N, K] W_hat for the backward pass of `lowbit.linear` on `backend` ("torch" or
        "triton"): the dequantized weight; a format with a faster decoder on that backend uses it."""
        return self._dequantize(packed)

    def _dequantize(self, packed: PackedWeight) -> torch.Tensor:
        """`dequantize` of a PackedWeight known to be of this format."""
        raise NotImplementedError

    def reference_linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """The torch reference of `lowbit.linear`: [..., K] x -> [..., N] in x.dtype. By default
        F.linear(x, dequantize(W)); formats that also quantize activations override it."""
        return torch.nn.functional.linear(x, self.dequantize(packed).to(x.dtype), bias)

    @staticmethod
    def fp32_linear(x: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
        """The reference product of formats that also quantize activations: x_hat [M, K'] (x
        [..., K] flattened and quantized as the format does it) times the fp32 weight [N, K'],
        plus bias, all in fp32 -> [..., N] in x.dtype."""
        y = torch.nn.functional.linear(x_hat, weight, None if bias is None else bias.float())
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    # -- kernels ------------------------------------------------------------------------------
    def triton_linear(
        self, x2d: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """[M, K] activations -> [M, N] through this format's Triton kernel."""
        raise InputError(f"format {self.name!r} has no Triton kernel")

    # -- shared helpers -------------------------------------------------------------------------
    def check_weight_dtype(self, dtype: torch.dtype, options: dict[str, Any], name: str = "weight") -> None:
        """WeightError unless weights of `dtype` can be quantized with `options` (also checked
        before a checkpoint is loaded, so quantize-while-loading fails early and clearly)."""
        if dtype not in FLOAT_DTYPES:
            raise WeightError(f"{name}: dtype {dtype} is not one of {FLOAT_DTYPES}")

    def check_weight(self, weight: Any, name: str) -> torch.Tensor:
        """Common weight validation: a finite 2-D float tensor."""
        if not isinstance(weight, torch.Tensor):
            raise WeightError(f"{name}: expected a tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise WeightError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        self.check_weight_dtype(weight.dtype, {}, name)
        if weight.shape[0] == 0 or weight.shape[1] == 0:
            raise WeightError(f"{name}: empty weight of shape {tuple(weight.shape)}")
        if weight.device.type == "meta":
            raise WeightError(f"{name}: weight is on the meta device (no values to quantize; offloaded by a "
                              "device_map? quantize while loading instead: from_pretrained(..., "
                              "quantization_config=lowbit.HfQuantConfig(format=...)))")
        bad = ~torch.isfinite(weight)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise WeightError(
                f"{name}: {int(bad.sum())} non-finite value(s) (NaN/Inf), first at [{row}, {col}]"
            )
        return weight
