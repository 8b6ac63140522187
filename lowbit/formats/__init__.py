"""Format registry: register_format, get_format, formats()."""
from __future__ import annotations

from ..errors import FormatError
from .base import FieldSpec, Format

_REGISTRY: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format instance under `fmt.name`; a name may be registered once."""
    if not fmt.name:
        raise FormatError("a format needs a non-empty name")
    if fmt.name in _REGISTRY:
        raise FormatError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format called `name`; FormatError listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown format {name!r}; known formats: {', '.join(formats())}") from None


def formats() -> list[str]:
    """Sorted list of registered format names."""
    return sorted(_REGISTRY)


# Formats register themselves on import.
from . import bnb_fp4, dfloat11, fp8, integer, iq4_nl, lut, microscaling, nf4  # noqa: E402,F401

__all__ = ["FieldSpec", "Format", "formats", "get_format", "register_format"]
