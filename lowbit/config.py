"""QuantConfig: which format each Linear of a model gets (frozen, versioned, JSON round trip)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import FormatError
from .formats import get_format

#: 2: saved `quantization_config.layers` entries record their packed layout (see lowbit/io.py's
#: FORMAT_VERSION); the schema is unchanged, so version-1 configs are still read.
CONFIG_VERSION = 2
READABLE_CONFIG_VERSIONS = (1, 2)


def as_mapping(value: Any, field: str) -> dict[str, Any]:
    """A copy of `value` (options, overrides, ...: a mapping, e.g. read from JSON); FormatError naming
    `field` for anything else."""
    if not isinstance(value, Mapping):
        raise FormatError(f"{field} must be a mapping (a JSON object), got {value!r}")
    return dict(value)


def as_patterns(value: Any, field: str) -> tuple[str, ...]:
    """skip patterns: one glob string or a list / tuple of them -> tuple. A lone string is one
    pattern (iterating it would make one pattern per character); FormatError naming `field` else."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise FormatError(f"{field} must be a glob pattern or a list of them, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class QuantConfig:
    """format: default registry name; options: that format's options (e.g. group_size);
    skip: glob patterns of qualified module names left in full precision;
    overrides: glob pattern -> format name, or {"format": name, **options}, for matching layers.
    The first matching override wins; skip wins over overrides."""

    format: str
    options: Mapping[str, Any] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", as_mapping(self.options, "options"))
        object.__setattr__(self, "skip", as_patterns(self.skip, "skip"))
        object.__setattr__(self, "overrides", as_mapping(self.overrides, "overrides"))
        if self.version not in READABLE_CONFIG_VERSIONS or isinstance(self.version, bool):
            raise FormatError(f"QuantConfig version {self.version!r} is not supported "
                              f"(this lowbit reads {list(READABLE_CONFIG_VERSIONS)})")
        get_format(self.format).check_options(self.options)
        for pattern, spec in self.overrides.items():
            if not isinstance(pattern, str):
                raise FormatError(f"override patterns must be strings, got {pattern!r}")
            self._split(spec, pattern)

    @staticmethod
    def _split(spec: Any, pattern: str) -> tuple[str, dict[str, Any]]:
        if isinstance(spec, str):
            fmt, options = spec, {}
        elif isinstance(spec, Mapping) and isinstance(spec.get("format"), str):
            options = {k: v for k, v in spec.items() if k != "format"}
            fmt = spec["format"]
        else:
            raise FormatError(f"override {pattern!r}: expected a format name or {{'format': name, ...}}, got {spec!r}")
        get_format(fmt).check_options(options)
        return fmt, options

    def layer_plan(self, qualified_name: str) -> tuple[str, dict[str, Any]] | None:
        """(format, options) for the Linear called `qualified_name`, or None to skip it."""
        if any(fnmatch.fnmatchcase(qualified_name, p) for p in self.skip):
            return None
        for pattern, spec in self.overrides.items():
            if fnmatch.fnmatchcase(qualified_name, pattern):
                return self._split(spec, pattern)
        return self.format, dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "format": self.format, "options": dict(self.options),
                "skip": list(self.skip), "overrides": dict(self.overrides)}

    @classmethod
    def from_dict(cls, data: Any) -> "QuantConfig":
        if not isinstance(data, Mapping):
            raise FormatError(f"QuantConfig.from_dict expects a mapping, got {type(data).__name__}")
        unknown = set(data) - {"version", "format", "options", "skip", "overrides"}
        if unknown or "format" not in data:
            raise FormatError(f"QuantConfig dict needs 'format' and accepts no keys {sorted(unknown)}")
        return cls(format=data["format"], options=data.get("options", {}), skip=data.get("skip", ()),
                   overrides=data.get("overrides", {}), version=data.get("version", CONFIG_VERSION))
