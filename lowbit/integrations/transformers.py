"""Hugging Face transformers integration: `quant_method: "lowbit"`.

- `HfQuantConfig` (a `QuantizationConfigMixin`) holds a lowbit QuantConfig (format, options,
  skip, overrides) and, for a quantized model, `layers`: each quantized layer's format, shape,
  dtype, attributes and bias flag (the same entries as lowbit.json's `layers`).
- `LowbitHfQuantizer` (an `HfQuantizer`):
  * pre-quantized checkpoints: before weights load, the meta model's Linear / Conv1D layers named in
    `layers` become QuantLinear with the declared buffers; transformers then fills those buffers
    from the safetensors keys `{layer}.{field}` like any other tensor (no cast: the buffers'
    dtypes are the format's);
  * quantize while loading (`from_pretrained(..., quantization_config=HfQuantConfig("int4"))`):
    each target Linear's weight is quantized as it arrives from the checkpoint and the layer is
    swapped for a QuantLinear on the spot, so the full-precision model is never materialized; a
    MoE layer's fused expert weight likewise, once transformers has merged it from the file's
    per-expert tensors (lowbit/experts.py).
- `attach_hf_config(model)`: lowbit.quantize / lowbit.load call it on transformers models (or on
  wrappers holding them), so `save_pretrained(d)` writes `quantization_config` and the packed buffers.

Both are registered with transformers when lowbit is imported (once per process).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import place_layers, replace_layer, tied_linears, transformers_models, within
from ..config import CONFIG_VERSION, QuantConfig, as_mapping, as_patterns
from ..errors import CheckpointError, FormatError, LowbitError
from ..experts import fused_weights, quantize_fused_weight, quantized_weights
from ..linear import QuantLinear, is_quantize_target, linear_shape, linear_weight
from ..packed import dtype_name

try:  # transformers is a dependency, but keep `import lowbit` working without it
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError:  # pragma: no cover
    HfQuantizer = QuantizationConfigMixin = ConversionOps = None

QUANT_METHOD = "lowbit"


class HfQuantConfig(QuantizationConfigMixin if QuantizationConfigMixin else object):
    """`quantization_config` for transformers: HfQuantConfig(format="int4", group_size=128,
    skip=["lm_head"], overrides={"*.down_proj": "int8"}, **format_options).

    `layers` (filled when a quantized model is saved) maps each quantized layer to its stored
    format entry; a checkpoint with `layers` is loaded as is, without one it is quantized while
    loading. Unknown formats, options or versions raise LowbitError."""

    def __init__(self, format: str = "int4", group_size: int | None = None, skip: str | list[str] | None = None,
                 overrides: dict[str, Any] | None = None, layers: dict[str, Any] | None = None,
                 version: int = CONFIG_VERSION, options: dict[str, Any] | None = None, **format_options: Any):
        format_options.pop("quant_method", None)
        options = {**as_mapping({} if options is None else options, "quantization_config.options"), **format_options}
        if group_size is not None:
            options["group_size"] = group_size
        self.quant_method = QUANT_METHOD
        self.version = version
        self.format = format
        self.options = options
        self.skip = list(as_patterns([] if skip is None else skip, "quantization_config.skip"))
        self.overrides = as_mapping({} if overrides is None else overrides, "quantization_config.overrides")
        if layers is not None:
            layers = as_mapping(layers, "quantization_config.layers")
        self.layers = layers or None  # {}: nothing quantized yet, as when absent
        self.quant_config()  # validates format, options, skip, overrides and version
        for name in self.layers or {}:
            self.layer(name)  # validates every entry

    def layer(self, name: str) -> QuantLinear:
        """The empty (meta) QuantLinear that `layers[name]` describes; FormatError if malformed."""
        try:
            return QuantLinear.from_metadata(self.layers[name])
        except LowbitError as exc:
            raise FormatError(f"quantization_config.layers.{name}: {exc}") from None

    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.format, options=self.options, skip=tuple(self.skip), overrides=self.overrides,
                           version=self.version)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "version": self.version, "format": self.format,
                "options": dict(self.options), "skip": list(self.skip), "overrides": dict(self.overrides),
                "layers": None if self.layers is None else dict(self.layers)}


def _layer_entries(model: nn.Module) -> dict[str, Any]:
    return {name: m.metadata() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


class _QuantizeOnLoad(ConversionOps if ConversionOps else object):
    """Quantizes one Linear weight as it is loaded and swaps the layer for a QuantLinear."""

    def __init__(self, hf_quantizer: "LowbitHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None,
                missing_keys=None, **kwargs) -> dict[str, torch.Tensor]:
        from ..formats import get_format

        key, value = next(iter(input_dict.items()))
        weight = value[0] if isinstance(value, list) else value
        if key in self.hf_quantizer.fused:  # a MoE layer's fused expert weight, merged from the file's experts
            fmt_name, options = self.hf_quantizer.plan[key]
            experts_name, _, weight_name = key.rpartition(".")
            quantize_fused_weight(model.get_submodule(experts_name), weight_name, fmt_name, name=key, weight=weight,
                                  **options)
            if missing_keys is not None:
                missing_keys.discard(key)
            return {}
        layer_name = (full_layer_name or key).rpartition(".")[0]
        linear = model.get_submodule(layer_name)
        fmt_name, options = self.hf_quantizer.plan[layer_name]
        packed = get_format(fmt_name).quantize(linear_weight(linear, weight), name=layer_name, **options)
        out_features, in_features = linear_shape(linear)
        layer = QuantLinear(in_features, out_features, fmt_name, packed.attrs,
                            bias=linear.bias is not None, dtype=packed.dtype, device="meta")
        for field, tensor in packed.tensors.items():
            layer._buffers[field] = tensor
        if linear.bias is not None:
            layer.bias = linear.bias  # loaded already (keys load in sorted order) or still meta
        replace_layer(model, layer_name, layer)
        if missing_keys is not None:
            missing_keys.discard(f"{layer_name}.weight")
        return {}


def _check_checkpoint_keys(layers: dict[str, QuantLinear], checkpoint_files: Any) -> None:
    """FormatError naming the file and key when a safetensors file holds, for a layer that
    quantization_config.layers declares, a tensor that layer does not have (e.g. `zeros` beside
    an entry that says symmetric) or a packed field of another dtype or shape than declared.
    transformers would only warn about an unexpected key and compute without it (a silently wrong
    layer), and report a mismatched one without naming lowbit's entry. Reads the file headers
    only; fields the file lacks are caught after loading (`_check_loaded_layer`)."""
    from pathlib import Path

    from ..io import SAFETENSORS_DTYPES, read_headers

    for path in map(Path, checkpoint_files or ()):
        if path.suffix != ".safetensors":
            continue
        for key, (dtype, shape) in read_headers(path.parent, {path.name})[path.name].items():
            name, _, field = key.rpartition(".")
            if name not in layers:
                continue
            layer = layers[name]
            if field == "bias" and layer.bias is not None:  # its dtype follows the model's
                continue
            fields = layer.packed.tensors  # the declared packed fields, on the meta device
            if field not in fields:
                raise FormatError(f"{path}: {key}: the checkpoint holds '{field}' for layer {name}, which "
                                  f"quantization_config.layers declares without it: {layer.metadata()}")
            stored = (SAFETENSORS_DTYPES.get(dtype), shape)
            declared = (dtype_name(fields[field].dtype), list(fields[field].shape))
            if stored != declared:
                raise FormatError(f"{path}: {key}: holds {stored[0]} {stored[1]}, but quantization_config.layers "
                                  f"declares {declared[0]} {declared[1]} for it: {layer.metadata()}")


def _check_float_parameters(model: nn.Module) -> None:
    """CheckpointError naming the parameter when one of `model`'s is not floating point:
    from_pretrained casts stored float tensors to the model's dtype but keeps integer ones
    (quantizers' codes) as they are, so an integer tensor in a float weight's place would load,
    and compute garbage or fail deep in the forward (lowbit's integer fields are buffers)."""
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point():
            raise CheckpointError(f"{name}: stored as {parameter.dtype}, where the model holds a floating-point "
                                  "parameter")


def _check_loaded_layer(name: str, layer: QuantLinear) -> None:
    """FormatError unless every tensor of a pre-quantized layer came from the checkpoint and holds
    values a kernel can take. transformers only warns about missing keys and leaves such a tensor
    uninitialized (torch.empty): a layer declared with a field or bias the file lacks would compute
    with garbage. Loaded tensors carry transformers' `_is_hf_initialized` flag (what keeps its own
    weight init off them); tensors still on meta are offloaded and not loaded here: skipped."""
    tensors = {**layer.packed.tensors, **({} if layer.bias is None else {"bias": layer.bias})}
    if any(t.is_meta for t in tensors.values()):
        return
    absent = [field for field, t in tensors.items() if not getattr(t, "_is_hf_initialized", False)]
    if absent:
        raise FormatError(f"{name}: the checkpoint has no {absent} for this layer, which quantization_config.layers "
                          f"declares as {layer.metadata()}")
    layer.check_loaded_data(name)


class LowbitHfQuantizer(HfQuantizer if HfQuantizer else object):
    """transformers quantizer for lowbit formats (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: HfQuantConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        #: quantize-on-load targets: Linear / Conv1D layer names and fused expert weight names -> (format, options)
        self.plan: dict[str, tuple[str, dict[str, Any]]] = {}
        self.fused: set[str] = set()  # the fused expert weights among them

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            if config.layers is None:
                raise FormatError("quantization_config (lowbit) of a saved model lacks 'layers'")
            layers = {name: config.layer(name) for name in config.layers}
            _check_checkpoint_keys(layers, kwargs.get("checkpoint_files"))
            place_layers(model, layers, "quantization_config.layers")
            return model
        from ..formats import get_format

        quant_config = config.quant_config()
        tied = tied_linears(model)  # not in the checkpoint under their own name: left tied, full precision

        def check_plan(name: str, plan: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
            """Fail before anything loads, naming the layer (e.g. dfloat11 on an fp32 load)."""
            if plan[1].get("method") == "gptq":
                raise FormatError(f"layer '{name}': method='gptq' needs calibration batches, which quantizing while "
                                  "loading cannot run: load the model, then lowbit.quantize(model, ..., method='gptq', "
                                  "calibration=...)")
            get_format(plan[0]).check_weight_dtype(dtype, plan[1], name)

        for name, module in model.named_modules():
            if is_quantize_target(module) and name not in tied:
                plan = quant_config.layer_plan(name)
                if plan is not None:
                    check_plan(name, plan, module.weight.dtype)
                    self.plan[name] = plan
        for name, module, weight_name in fused_weights(model):
            plan = quant_config.layer_plan(name)
            if plan is not None:
                check_plan(name, plan, module._parameters[weight_name].dtype)
                self.plan[name] = plan
                self.fused.add(name)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        layer, _, leaf = param_name.rpartition(".")
        return param_name in self.fused or (leaf == "weight" and layer in self.plan and layer not in self.fused)

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = [name for name in self.plan if not self._quantized(model, name)]
        if missing:
            raise LowbitError(f"lowbit: these layers were never loaded, so not quantized: {missing[:5]}")
        if self.pre_quantized:  # the file's values, as lowbit.load checks them
            for name, module in model.named_modules():
                if isinstance(module, QuantLinear):
                    _check_loaded_layer(name, module)
            _check_float_parameters(model)
        # the layers as this lowbit holds them, so save_pretrained writes the current layouts and version
        self.quantization_config.layers = _layer_entries(model)
        self.quantization_config.version = CONFIG_VERSION
        return model

    def _quantized(self, model: nn.Module, name: str) -> bool:
        if name in self.fused:
            experts_name, _, weight_name = name.rpartition(".")
            return weight_name in quantized_weights(model.get_submodule(experts_name))
        return isinstance(model.get_submodule(name), QuantLinear)

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: lowbit.dequantize (transformers passes the model's dtype)."""
        from ..api import dequantize

        return dequantize(model, dtype)

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        """True: adapters (lowbit.lora_config) train over the frozen quantized layers, so transformers'
        Trainer accepts a lowbit model with PEFT adapters (and still refuses one without)."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def attach_hf_config(model: nn.Module, config: QuantConfig | None = None) -> None:
    """Mark each transformers model in `model` that holds QuantLinear layers as lowbit-quantized, so
    that its save_pretrained writes `quantization_config` (with every layer's entry) and the buffers.
    `model` may be one (the usual case) or a wrapper holding them (`api.transformers_models`: a
    SentenceTransformer saves its transformer with save_pretrained, which must carry the config)."""
    if HfQuantizer is None:  # pragma: no cover
        return
    inners = transformers_models(model)
    outside = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)
               and not any(within(name, prefix) for prefix, _ in inners)]
    if inners and outside:  # e.g. a sentence-transformers Dense head: its own save writes a plain state dict
        import warnings

        warnings.warn(f"quantized layers outside the transformers model(s) {[p for p, _ in inners]}: {outside[:5]}; "
                      "save_pretrained cannot record them, so a wrapper that saves its parts its own way "
                      "(SentenceTransformer.save) writes them where its loader expects nn.Linear weights: "
                      "skip them or save the whole model with lowbit.save", stacklevel=3)
    for _, inner in inners:
        layers = _layer_entries(inner)
        if not layers:
            continue
        previous = getattr(inner.config, "quantization_config", None)
        inner_config = previous.quant_config() if config is None and isinstance(previous, HfQuantConfig) else config
        if inner_config is None:  # e.g. after lowbit.load: `layers` is what matters, format is informative
            inner_config = QuantConfig(sorted(entry["format"] for entry in layers.values())[0])
        hf_config = HfQuantConfig(format=inner_config.format, options=dict(inner_config.options),
                                  skip=list(inner_config.skip), overrides=dict(inner_config.overrides),
                                  layers=layers)  # current version: layers as held now
        inner.config.quantization_config = hf_config
        inner.hf_quantizer = LowbitHfQuantizer(hf_config, pre_quantized=True)
        inner.is_quantized = True
        inner.quantization_method = QUANT_METHOD


def detach_hf_config(model: nn.Module) -> None:
    """Undo `attach_hf_config` (lowbit.dequantize): plain models again for save_pretrained."""
    for _, inner in transformers_models(model):
        if not isinstance(getattr(inner.config, "quantization_config", None), HfQuantConfig):
            continue
        del inner.config.quantization_config
        for attribute in ("hf_quantizer", "quantization_method"):
            if hasattr(inner, attribute):
                delattr(inner, attribute)
        inner.is_quantized = False


#: the oldest transformers lowbit is tested with: 5.19 and older route MoE experts through another
#: interface (tests/integrations/test_moe.py fails there), 4.x lacks the loading API used here
MIN_TRANSFORMERS = "5.20"


def register() -> None:
    """Register the config and quantizer under quant_method "lowbit" (no-op when already done);
    a warning instead when the installed transformers is older than MIN_TRANSFORMERS."""
    import warnings

    try:
        import transformers
        from packaging.version import Version
    except ImportError:  # pragma: no cover - both are dependencies
        return

    if HfQuantizer is None or Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        warnings.warn(f"lowbit needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}: upgrade "
                      f"it (pip install 'transformers>={MIN_TRANSFORMERS},<6'); older ones route MoE experts another "
                      "way (MoE quantization gives wrong results there) and 4.x lacks the loading API that "
                      "from_pretrained / save_pretrained of lowbit models use", stacklevel=3)
        if HfQuantizer is None:
            return
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(HfQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)
