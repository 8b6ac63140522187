"""Errors lowbit raises on bad input. Every one derives from LowbitError."""


class LowbitError(Exception):
    """Base class of every error lowbit raises on bad input."""


class FormatError(LowbitError, ValueError):
    """Unknown format name, or options / attributes a format does not accept."""


class WeightError(LowbitError, ValueError):
    """A weight that cannot be quantized (NaN/Inf, wrong rank or dtype, out of range)."""


class InputError(LowbitError, ValueError):
    """An argument that does not fit: an activation or bias that does not fit the packed weight it
    meets, a model that is not an nn.Module, a device that does not exist here."""


def check_module(model: object, what: str = "model") -> None:
    """InputError unless `model` is a torch nn.Module (caught before it fails deep inside)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise InputError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")


class CheckpointError(LowbitError):
    """A checkpoint folder that cannot be written or read (names the file and field)."""


class KernelUnavailableError(LowbitError, RuntimeError):
    """The Triton backend was asked for where it cannot run."""
