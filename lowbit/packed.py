"""PackedWeight: the quantized form of one [N, K] weight, as declared tensor fields + attributes.

The format (looked up by name) declares which tensor fields exist and their dtype and shape, so
`.to()`, `nbytes`, state dicts and checkpoint validation are written once, here and in io.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import FormatError


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling manifests use)."""
    return str(dtype).removeprefix("torch.")


#: the largest out_features / in_features a stored shape may claim (kernels index rows and columns
#: in int32); a bound, so a damaged manifest cannot overflow the buffers built from it
MAX_DIM = 2**31 - 1

#: dtypes a quantized weight may have had (what dequantize returns), by manifest name.
WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_metadata(metadata: Any):
    """Validate `{"format", "shape", "dtype", "attrs", "layout"}` (as `PackedWeight.metadata()`
    writes it, e.g. read back from JSON) -> (Format, (N, K), dtype, attrs). FormatError on
    anything off. A missing "layout" is layout 1 (what lowbit wrote before it recorded one)."""
    from .formats import get_format

    if not isinstance(metadata, dict) or not {"format", "shape", "dtype", "attrs"} <= set(metadata):
        raise FormatError(f"packed-weight metadata needs format, shape, dtype, attrs; got {metadata!r}")
    fmt = get_format(metadata["format"])
    shape = metadata["shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in shape)):
        raise FormatError(f"{fmt.name}: shape must be [out_features, in_features], ints in 1..{MAX_DIM}, got {shape!r}")
    dtype = WEIGHT_DTYPES.get(metadata["dtype"]) if isinstance(metadata["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"{fmt.name}: unsupported weight dtype {metadata['dtype']!r}")
    shape = (shape[0], shape[1])
    layout = metadata.get("layout", 1)
    if isinstance(layout, bool) or not isinstance(layout, int):
        raise FormatError(f"{fmt.name}: layout must be an integer, got {layout!r}")
    if layout != fmt.layout:
        by = "an older lowbit: quantize the original weights again" if layout < fmt.layout else "a newer lowbit"
        raise FormatError(f"{fmt.name}: packed layout {layout} is not the one this lowbit reads ({fmt.layout}); "
                          f"it was written by {by}")
    attrs = metadata["attrs"]
    return fmt, shape, dtype, fmt.check_attrs(shape, dict(attrs) if isinstance(attrs, dict) else attrs)


def packed_metadata(format: str, shape: tuple[int, int], dtype: torch.dtype, attrs: dict[str, Any]) -> dict[str, Any]:
    """`{"format", "shape", "dtype", "attrs", "layout"}` of a packed weight, JSON-serialisable (what
    a manifest stores per layer; `parse_metadata` reads it back)."""
    from .formats import get_format

    return {"format": format, "shape": list(shape), "dtype": dtype_name(dtype), "attrs": dict(attrs),
            "layout": get_format(format).layout}


@dataclass(eq=False)
class PackedWeight:
    """Quantized weight of logical shape `shape` = (out_features N, in_features K).

    format:  registry name, e.g. "int4".
    shape:   (N, K) of the original weight.
    dtype:   dtype of the original weight; `dequantize` returns this dtype.
    attrs:   JSON-serialisable format attributes (e.g. group_size, symmetric).
    tensors: field name -> tensor, exactly the fields the format declares for these attrs.
    """

    format: str
    shape: tuple[int, int]
    dtype: torch.dtype
    attrs: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        from .formats import get_format

        self.shape = (int(self.shape[0]), int(self.shape[1]))
        specs = get_format(self.format).field_specs(self.shape, self.attrs)
        if set(specs) != set(self.tensors):
            raise FormatError(
                f"{self.format}: tensor fields {sorted(self.tensors)} do not match the declared "
                f"fields {sorted(specs)}"
            )
        for name, spec in specs.items():
            spec.check(self.tensors[name], where=f"{self.format} field '{name}'")

    @classmethod
    def unchecked(cls, format: str, shape: tuple[int, int], dtype: torch.dtype, attrs: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> "PackedWeight":
        """Build without re-validating fields, for hot paths whose tensors were validated when
        they were created (QuantLinear.forward: its buffers keep their declared dtype/shape)."""
        obj = cls.__new__(cls)
        # plain attribute stores: torch.compile (2.11) cannot trace a __dict__.update here
        obj.format, obj.shape, obj.dtype, obj.attrs, obj.tensors = format, shape, dtype, attrs, tensors
        return obj

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device: torch.device | str) -> "PackedWeight":
        """Copy to `device`; tensor dtypes never change (they are part of the format)."""
        moved = {k: v.to(device) for k, v in self.tensors.items()}
        return PackedWeight(self.format, self.shape, self.dtype, dict(self.attrs), moved)

    @property
    def nbytes(self) -> int:
        """Bytes of all packed tensors (weights + scales + zero points)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per original weight element, scales and zero points included."""
        n, k = self.shape
        return self.nbytes * 8 / (n * k)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flatten to `{prefix}{field}` -> tensor (the checkpoint key layout)."""
        return {f"{prefix}{name}": t for name, t in self.tensors.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], metadata: Any, prefix: str = "") -> "PackedWeight":
        """Inverse of `state_dict` + `metadata`: rebuild from `{prefix}{field}` tensors.

        Validates the metadata, every declared field and the values a kernel could not take
        safely (`Format.check_data`; FormatError on any problem)."""
        fmt, shape, dtype, attrs = parse_metadata(metadata)
        names = fmt.field_specs(shape, attrs)
        missing = [f"{prefix}{n}" for n in names if f"{prefix}{n}" not in state]
        if missing:
            raise FormatError(f"{fmt.name}: state dict lacks {missing}")
        packed = cls(fmt.name, shape, dtype, attrs, {n: state[f"{prefix}{n}"] for n in names})
        packed.check_data()
        return packed

    def check_data(self) -> None:
        """FormatError for field values a kernel could not take safely (`Format.check_data`); run
        on data read from a file (lowbit.load, from_pretrained, from_state_dict)."""
        from .formats import get_format

        get_format(self.format).check_data(self)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-serialisable (what a manifest stores per layer)."""
        return packed_metadata(self.format, self.shape, self.dtype, self.attrs)
