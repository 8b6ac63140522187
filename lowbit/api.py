"""lowbit.quantize(): swap a model's nn.Linear layers (and MoE expert weights) for QuantLinear, in place."""
from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import experts
from .calibration import check_batches, collect_hessians, hessian_chunks
from .config import QuantConfig
from .errors import FormatError, InputError, LowbitError, check_module
from .linear import QuantLinear, is_conv1d, is_quantize_target, linear_shape

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
    model.set_submodule(qualified_name, layer)


def place_layers(model: nn.Module, layers: dict[str, QuantLinear], field: str) -> None:
    """Put every QuantLinear of `layers` (qualified name -> layer, e.g. read from a checkpoint's
    `field`) into `model`: `replace_layer` for Linear / Conv1D names, and for the slots of a fused
    MoE weight (`experts.slot_name`) all of that weight's experts at once. FormatError naming
    `{field}.{name}` when a layer has no place, or a fused weight does not get one layer per expert."""
    fused: dict[tuple[str, str], dict[int, QuantLinear]] = {}
    for name, layer in layers.items():
        slot = experts.parse_slot(name)
        try:
            model.get_submodule(name)
        except AttributeError:
            if slot is not None:  # an expert of a fused weight the model still holds in full precision
                fused.setdefault(slot[:2], {})[slot[2]] = layer
                continue
        try:
            replace_layer(model, name, layer)
        except LowbitError as exc:
            raise FormatError(f"{field}.{name}: {exc}") from None
    for (experts_name, weight_name), by_index in fused.items():
        where = f"{field}.{experts.slot_name(experts_name, weight_name, min(by_index))}"
        try:
            module = model.get_submodule(experts_name)
        except AttributeError:
            raise FormatError(f"{where}: no such module in the model") from None
        try:
            experts.check_fused_weight(module, weight_name)
            count = experts.expert_shape(module, weight_name)[0]
            if len(by_index) != count or sorted(by_index) != list(range(count)):  # a damaged count may be billions
                raise FormatError(f"{experts_name}.{weight_name} has {count} experts, {field} declares "
                                  f"experts {sorted(by_index)}")
            experts.install(module, weight_name, [by_index[index] for index in range(count)])
        except LowbitError as exc:
            raise FormatError(f"{where}: {exc}") from None


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
             overrides: dict[str, Any] | None = None, progress: bool = True, calibration: Any = None,
             **options: Any) -> nn.Module:
    """Quantize every nn.Linear (and transformers Conv1D) of `model` in place and return the model;
    the fused expert weights of transformers MoE layers too (lowbit/experts.py: one QuantLinear per
    expert, named `{experts}.gate_up_proj` / `.down_proj` in skip and override patterns).

    config: a format name (with `options`, e.g. group_size=128) or a QuantConfig.
    skip: glob patterns of qualified names to leave alone (e.g. ["lm_head", "*.gate"]). Linear
    layers whose weight is tied to another parameter are always left alone (`tied_linears`), and so
    are layers already quantized (a second call quantizes only what the first one skipped).
    overrides: glob pattern -> format name or {"format": name, **options}.
    calibration: for method="gptq" (int / lut / microscaling / nf4 / bnb_fp4 / iq4_nl formats), the
    batches the model runs on to collect each layer's input Hessian: a list of tensors
    (model(batch)) or dicts (model(**batch)), on the model's device. Layers are calibrated in model
    order, in passes of at most calibration.HESSIAN_BUDGET_BYTES of Hessians; each pass runs with
    the earlier passes' layers already quantized. A fused MoE weight gets one Hessian per expert, from the tokens routed to it.
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
    fused = experts.fused_weights(model)
    if not linears and not fused:
        warnings.warn(f"lowbit.quantize: {type(model).__name__} has no nn.Linear (or Conv1D) layer or MoE expert "
                      "weight to quantize (already quantized?)", stacklevel=2)
    unsupported = experts.unsupported_experts(model)
    if unsupported:
        warnings.warn(f"lowbit.quantize: leaving the expert weights of {unsupported[:3]} in full precision: "
                      "3-D expert weights without transformers' experts interface", stacklevel=2)
    tied = tied_linears(model)  # logged
    targets = _in_model_order(model, [(name, mod, None) for name, mod in linears if name not in tied] + fused)
    calibrated = _calibrated_layers(targets, config, calibration)
    hessians: dict[str, torch.Tensor] = {}
    for name, module, weight_name in tqdm(targets, desc=f"lowbit quantize ({config.format})", unit="layer",
                                          disable=not progress):
        plan = config.layer_plan(name)
        if plan is None:
            continue
        fmt, layer_options = plan
        try:
            if name in calibrated.chunk_of:
                if name not in hessians:  # the next pass: this layer and the ones after it that fit
                    chunk = calibrated.chunk_of[name]
                    hessians = collect_hessians(model, {n: calibrated.modules[n] for n in chunk},
                                                calibrated.batches, progress)
                layer_options["hessian"] = hessians.pop(name)
            if weight_name is not None:  # a fused MoE weight: one QuantLinear per expert
                experts.quantize_fused_weight(module, weight_name, fmt, name=name, **layer_options)
                continue
            quantized = QuantLinear.from_linear(module, fmt, name=name, **layer_options)
        except LowbitError as exc:
            if name in str(exc):
                raise
            raise type(exc)(f"layer '{name}': {exc}") from None
        replace_layer(model, name, quantized)
    from .integrations.transformers import attach_hf_config

    attach_hf_config(model, config)  # transformers models: save_pretrained writes quantization_config
    return model


def _in_model_order(model: nn.Module, targets: list) -> list:
    """`targets` (name, module, fused weight name or None) in the order model.named_modules()
    lists their modules (a fused weight's module is its experts module): gptq's passes calibrate
    each layer on the model with the layers before it already quantized."""
    position = {module: index for index, module in enumerate(model.modules())}
    return sorted(targets, key=lambda target: position[target[1]])


@dataclass(frozen=True)
class _Calibration:
    """The method="gptq" layers of a quantize call: layer name -> the names calibrated in the
    same pass (hessian_chunks), layer name -> the module whose inputs give its Hessian (the
    experts module for a fused expert weight), and the checked batches."""

    chunk_of: dict[str, list[str]]
    modules: dict[str, nn.Module]
    batches: list[Any]


def _calibrated_layers(targets: list, config: QuantConfig, calibration: Any) -> _Calibration:
    """The gptq plan of `targets` (name, module, fused weight name or None); InputError for gptq
    layers without calibration batches and for calibration batches nothing would use."""
    layers, modules = [], {}
    for name, module, weight_name in targets:
        plan = config.layer_plan(name)
        if plan is None or plan[1].get("method") != "gptq":
            continue
        if weight_name is None:
            layers.append((name, linear_shape(module)[1], 1))
        else:  # one Hessian per expert
            count, _, k = experts.expert_shape(module, weight_name)
            layers.append((name, k, count))
        modules[name] = module
    if not layers:
        if calibration is not None:
            raise InputError("calibration batches are only used by method='gptq', which no layer has")
        return _Calibration({}, {}, [])
    if calibration is None:
        raise InputError(f"layer '{layers[0][0]}': method='gptq' needs calibration=[batches] to collect the "
                         "layers' input Hessians")
    batches = check_batches(calibration)
    return _Calibration({name: chunk for chunk in hessian_chunks(layers) for name in chunk}, modules, batches)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Undo lowbit.quantize in place and return the model: every QuantLinear becomes the nn.Linear
    (or transformers Conv1D, where the model's class builds one there) holding its dequantized
    weight, every quantized MoE experts module gets its fused 3-D weights back, dfloat11 block
    decompression hooks are removed, and a transformers model loses its quantization_config (so
    save_pretrained writes a plain model; `model.dequantize()` calls this). dtype: of the restored
    weights and biases (float16 / bfloat16 / float32; default each layer's original dtype).
    Lossless for dfloat11; for the other formats the weights keep their quantization error, and
    activation quantization (fp8 / mxfp4 / nvfp4 with `act`) is gone."""
    from .block_decode import remove_block_decompression
    from .formats import get_format
    from .packed import WEIGHT_DTYPES

    check_module(model)
    if dtype is not None and dtype not in WEIGHT_DTYPES.values():
        raise InputError(f"dequantize: dtype must be one of {sorted(WEIGHT_DTYPES)}, got {dtype!r}")
    remove_block_decompression(model)
    for module in list(model.modules()):
        if isinstance(module, experts.QuantizedExperts):
            experts.dequantize_experts(module, dtype)
    conv1d = conv1d_names(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        weight = get_format(layer.format).dequantize(layer.packed).to(dtype or layer.weight_dtype)
        bias = None if layer.bias is None else layer.bias.detach().to(weight.dtype)
        # a peft LoRA layer holds the layer it wraps as `base_layer`: the model's class names the wrapper
        if name.removesuffix(".base_layer") in conv1d:
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                restored = Conv1D(layer.out_features, layer.in_features)
            restored.weight = nn.Parameter(weight.t().contiguous())  # Conv1D stores [in, out]
            restored.bias = nn.Parameter(torch.zeros_like(weight[:, 0]) if bias is None else bias)
        else:
            restored = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
            restored.weight = nn.Parameter(weight)
            if bias is not None:
                restored.bias = nn.Parameter(bias)
        model.set_submodule(name, restored)
    from .integrations.transformers import detach_hf_config

    detach_hf_config(model)
    return model


def transformers_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each outermost transformers PreTrainedModel in `model`: `model`
    itself [("", model)], or the ones a wrapper holds (a peft PeftModel, a sentence-transformers
    SentenceTransformer); [] if none. Models nested in one of these (a vision tower) are its parts."""
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():  # parents come before their children
        if isinstance(module, PreTrainedModel) and not any(within(name, outer) for outer, _ in found):
            found.append((name, module))
    return found


def within(name: str, prefix: str) -> bool:
    """Whether the qualified name `name` lies in the submodule named `prefix` ("": the whole model)."""
    return prefix == "" or name.startswith(f"{prefix}.")


def conv1d_names(model: nn.Module) -> set[str]:
    """Names in `model` of the layers a transformers model's class builds as Conv1D (GPT-2's
    projections): read from a skeleton of each transformers model's class on the meta device,
    built only when its modeling code uses Conv1D at all."""
    names = set()
    for prefix, inner in transformers_models(model):
        if getattr(sys.modules.get(type(inner).__module__), "Conv1D", None) is None:
            continue
        with torch.device("meta"):
            skeleton = type(inner)(inner.config)
        names |= {f"{prefix}.{name}" if prefix else name for name, layer in skeleton.named_modules() if is_conv1d(layer)}
    return names


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
