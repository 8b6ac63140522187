"""lowbit.quantize(): swap a model's nn.Linear layers for QuantLinear, in place."""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .errors import FormatError, LowbitError, check_module
from .linear import QuantLinear, is_quantize_target, linear_shape

logger = logging.getLogger(__name__)


def replace_layer(model: nn.Module, qualified_name: str, layer: QuantLinear) -> None:
    """Put `layer` where `model` has an nn.Linear, Conv1D or QuantLinear of the same shape; FormatError
    when there is no such module or it does not match."""
    try:
        current = model.get_submodule(qualified_name)
    except AttributeError:
        raise FormatError("no such module in the model") from None
    shape = (current.out_features, current.in_features) if isinstance(current, QuantLinear) else linear_shape(current)
    if shape != (layer.out_features, layer.in_features):
        raise FormatError(f"does not match the model's {current!r}")
    parent_name, _, child = qualified_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def tied_linears(model: nn.Module) -> set[str]:
    """Qualified names of the Linear (or Conv1D) layers whose weight is tied to another parameter (lm_head
    with tie_word_embeddings): the same tensor under two names, or a tie a transformers model
    declares (`all_tied_weights_keys`, also on the meta device before the tie is made). These stay
    in full precision: quantizing the Linear would untie it, store the weight twice (the
    embedding keeps its copy), and transformers re-ties by name when it loads the model. Logged
    (INFO) when there are any."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = {name for name, m in model.named_modules() if is_quantize_target(m) and uses[id(m.weight)] > 1}
    declared = getattr(model, "all_tied_weights_keys", None)
    for key in (*declared.keys(), *declared.values()) if isinstance(declared, dict) else ():
        name = str(key).removesuffix(".weight")
        try:
            if is_quantize_target(model.get_submodule(name)):
                tied.add(name)
        except AttributeError:
            continue
    if tied:
        logger.info("lowbit: leaving %s in full precision: tied to another parameter", sorted(tied))
    return tied


def quantize(model: nn.Module, config: str | QuantConfig, *, skip: str | list[str] | tuple[str, ...] | None = None,
             overrides: dict[str, Any] | None = None, progress: bool = True, **options: Any) -> nn.Module:
    """Quantize every nn.Linear (and transformers Conv1D) of `model` in place and return the model.

    config: a format name (with `options`, e.g. group_size=128) or a QuantConfig.
    skip: glob patterns of qualified names to leave alone (e.g. ["lm_head", "*.gate"]). Linear
    layers whose weight is tied to another parameter are always left alone (`tied_linears`).
    overrides: glob pattern -> format name or {"format": name, **options}.
    Errors name the layer. Shows a progress bar unless progress=False.
    """
    check_module(model)
    if isinstance(config, QuantConfig):
        if skip is not None or overrides is not None or options:
            raise FormatError("pass skip / overrides / options inside the QuantConfig, not beside it")
    else:
        config = QuantConfig(config, options=options, skip=() if skip is None else skip,
                             overrides={} if overrides is None else overrides)
    linears = [(name, mod) for name, mod in model.named_modules() if is_quantize_target(mod)]
    if not linears:
        warnings.warn(f"lowbit.quantize: {type(model).__name__} has no nn.Linear (or Conv1D) layer to quantize "
                      "(already quantized?)", stacklevel=2)
    tied = tied_linears(model)  # logged
    targets = [(name, mod) for name, mod in linears if name not in tied]
    for name, linear in tqdm(targets, desc=f"lowbit quantize ({config.format})", unit="layer",
                             disable=not progress):
        plan = config.layer_plan(name)
        if plan is None:
            continue
        fmt, layer_options = plan
        try:
            quantized = QuantLinear.from_linear(linear, fmt, name=name, **layer_options)
        except LowbitError as exc:
            if name in str(exc):
                raise
            raise type(exc)(f"layer '{name}': {exc}") from None
        replace_layer(model, name, quantized)
    from .integrations.transformers import attach_hf_config

    attach_hf_config(model, config)  # transformers models: save_pretrained writes quantization_config
    return model


@dataclass(frozen=True)
class ModelSummary:
    """Storage of a model: every unique parameter / buffer, and its quantized layers."""

    total_bytes: int
    quantized_layers: int
    quantized_weights: int  # elements of the original [N, K] weights of the quantized layers
    packed_bytes: int  # their packed weights, scales and zero points

    @property
    def bits_per_weight(self) -> float:
        """Packed bits per original weight over the quantized layers (0.0 when there are none)."""
        return 8 * self.packed_bytes / self.quantized_weights if self.quantized_weights else 0.0


def summarize(model: nn.Module) -> ModelSummary:
    """Sizes of `model` (tied / shared tensors counted once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return ModelSummary(
        total_bytes=sum(t.numel() * t.element_size() for t in tensors),
        quantized_layers=len(layers),
        quantized_weights=sum(m.in_features * m.out_features for m in layers),
        packed_bytes=sum(m.packed.nbytes for m in layers),
    )
