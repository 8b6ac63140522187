"""Mixture-of-experts layers: transformers' fused expert weights, quantized one expert at a time.

transformers (5.x) stores a MoE layer's experts as one module with 3-D parameters, `gate_up_proj`
(or `up_proj`) and `down_proj`: [E, N, K], or [E, K, N] when the module's `is_transposed` is set.
Such a module is marked by `@use_experts_implementation`, which gives it the flags read here
(`has_gate`, `has_bias`, `is_transposed`, `has_post_expert_norm`) and its gate (`_apply_gate`:
model-specific clamps and interleaving).

Quantizing one of these weights turns each expert's [N, K] slice into a bias-less QuantLinear,
held at `{experts}.quantized.{weight}.{expert}` (so every save / load path treats it as any
other QuantLinear, and its checkpoint keys match none of transformers' expert-merging
patterns); the 3-D parameter goes, and reading it gives a `WeightStandIn` of its shape. The
module keeps its attributes, biases and gate; its class becomes a subclass of its own class
(`QuantizedExperts` first) whose forward runs each routed expert through its QuantLinears
(traced by torch.compile / torch.export: each weight's experts as one `lowbit::grouped_linear`
op, lowbit/expert_ops.py, so the graph never holds a data-dependent shape).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .errors import FormatError, InputError
from .expert_ops import grouped_linear
from .linear import QuantLinear, weight_stand_in

#: the fused weights of transformers' experts modules, in the order the forward uses them
WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")
#: the module that holds the quantized experts, under the experts module
CONTAINER = "quantized"
#: `{experts}.quantized.{weight}.{expert}`, the expert index written as ModuleList names it (no "01")
_SLOT = re.compile(rf"^(?:(.*)\.)?{CONTAINER}\.({'|'.join(WEIGHT_NAMES)})\.(0|[1-9][0-9]*)$")


def fused_weight_names(module: nn.Module) -> list[str]:
    """The fused (3-D) expert weights `module` holds in full precision, in WEIGHT_NAMES order."""
    return [name for name in WEIGHT_NAMES
            if isinstance(module._parameters.get(name), torch.Tensor) and module._parameters[name].dim() == 3]


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module lowbit can quantize: the `@use_experts_implementation` flags
    and 3-D expert weights (fused, or already quantized)."""
    flags = ("num_experts", "has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_apply_gate")
    return all(hasattr(module, flag) for flag in flags) and (
        bool(fused_weight_names(module)) or isinstance(module, QuantizedExperts))


def unsupported_experts(model: nn.Module) -> list[str]:
    """Names of modules holding 3-D expert weights without transformers' experts interface (e.g.
    Llama 4's): lowbit leaves those in full precision."""
    return [name for name, module in model.named_modules()
            if fused_weight_names(module) and not is_experts_module(module)]


def expert_shape(module: nn.Module, weight_name: str) -> tuple[int, int, int]:
    """(experts E, out_features N, in_features K) of one fused weight (quantized or not)."""
    quantized = quantized_weights(module).get(weight_name)
    if quantized is not None:
        return len(quantized), quantized[0].out_features, quantized[0].in_features
    experts, rows, cols = module._parameters[weight_name].shape
    return (experts, cols, rows) if module.is_transposed else (experts, rows, cols)


def expert_weight(module: nn.Module, weight_name: str, expert: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Expert `expert`'s [N, K] slice of a fused weight (of `weight`, e.g. from a checkpoint, if given)."""
    weight = module._parameters[weight_name] if weight is None else weight
    return weight[expert].t() if module.is_transposed else weight[expert]


def quantized_weights(module: nn.Module) -> Mapping[str, nn.ModuleList]:
    """weight name -> its per-expert QuantLinear layers, for the quantized weights of `module` (a
    live view, not a copy: the forward reads it per expert)."""
    container = module._modules.get(CONTAINER) if isinstance(module, QuantizedExperts) else None
    return container._modules if container is not None else {}


def slot_name(experts_name: str, weight_name: str, expert: int) -> str:
    """Qualified name of the QuantLinear for one expert of one weight."""
    slot = f"{CONTAINER}.{weight_name}.{expert}"
    return f"{experts_name}.{slot}" if experts_name else slot


def parse_slot(name: str) -> tuple[str, str, int] | None:
    """(experts module name, weight name, expert) of a `slot_name`, None for any other name."""
    match = _SLOT.match(name)
    return None if match is None else (match.group(1) or "", match.group(2), int(match.group(3)))


def fused_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name `{experts}.{weight}`, experts module, weight name) of every fused expert
    weight of `model` that lowbit can quantize (the name skip / override patterns match)."""
    return [(f"{name}.{weight_name}" if name else weight_name, module, weight_name)
            for name, module in model.named_modules() if is_experts_module(module)
            for weight_name in fused_weight_names(module)]


def quantize_fused_weight(module: nn.Module, weight_name: str, format: str, *, name: str,
                          weight: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                          **options: Any) -> None:
    """Quantize every expert of `module`'s fused weight `weight_name` (or of `weight`, the same
    weight read from a checkpoint) into `format` and `install` the layers; errors name `name`.
    hessian: method="gptq"'s per-expert input Hessians, fp32 [E, K, K]."""
    from .formats import get_format

    fmt = get_format(format)
    count = expert_shape(module, weight_name)[0]
    if hessian is not None and (not isinstance(hessian, torch.Tensor) or hessian.dim() != 3 or len(hessian) != count):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise FormatError(f"{name}: expected one Hessian per expert, [{count}, K, K], got {shape}")
    per_expert = [{} if hessian is None else {"hessian": hessian[expert]} for expert in range(count)]
    layers = [QuantLinear.from_packed(fmt.quantize(expert_weight(module, weight_name, expert, weight).detach(),
                                                   name=f"{name} (expert {expert})", **options, **per_expert[expert]))
              for expert in range(count)]
    install(module, weight_name, layers)


def check_fused_weight(module: nn.Module, weight_name: str) -> None:
    """FormatError unless `module` is an experts module holding `weight_name` in full precision."""
    if not is_experts_module(module) or weight_name not in fused_weight_names(module):
        raise FormatError(f"the model's {type(module).__name__} has no fused expert weight {weight_name!r} "
                          "(or it is quantized already)")


def install(module: nn.Module, weight_name: str, layers: list[QuantLinear]) -> None:
    """Replace `module`'s fused weight `weight_name` by `layers` (one QuantLinear per expert, in
    expert order); FormatError unless they are bias-less and fit the weight's [E, N, K]."""
    check_fused_weight(module, weight_name)
    experts, n, k = expert_shape(module, weight_name)
    if len(layers) != experts:
        raise FormatError(f"{weight_name}: {len(layers)} quantized experts for a module of {experts}")
    for index, layer in enumerate(layers):
        if (layer.out_features, layer.in_features) != (n, k) or layer.bias is not None:
            raise FormatError(f"{weight_name}.{index}: expected a bias-less [{n}, {k}] QuantLinear (biases stay "
                              f"in the experts module), got {layer!r}")
    if not isinstance(module, QuantizedExperts):
        module.__class__ = _quantized_class(type(module))
        module.add_module(CONTAINER, nn.ModuleDict())
    del module._parameters[weight_name]
    module._modules[CONTAINER][weight_name] = nn.ModuleList(layers)


def dequantize_experts(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Undo `install` on a quantized experts module, in place: its fused weights come back as 3-D
    parameters holding the dequantized experts (in `dtype`, default their original dtype; the
    expert biases are cast too when `dtype` is given) and it gets its own class back."""
    from .formats import get_format

    for weight_name, layers in quantized_weights(module).items():
        weights = [get_format(layer.format).dequantize(layer.packed) for layer in layers]
        fused = torch.stack([w.t() if module.is_transposed else w for w in weights])
        module._parameters[weight_name] = nn.Parameter(fused.to(dtype or layers[0].weight_dtype))
        bias = module._parameters.get(f"{weight_name}_bias")
        if dtype is not None and bias is not None:
            module._parameters[f"{weight_name}_bias"] = nn.Parameter(bias.detach().to(dtype))
    # each restored weight just before its bias, as the class registers them (the state dict's key order)
    restored, order = set(quantized_weights(module)), {}
    for key in module._parameters:
        if key.removesuffix("_bias") in restored:
            order.setdefault(key.removesuffix("_bias"))
        order.setdefault(key)
    for key in order:  # re-inserted in that order
        module._parameters[key] = module._parameters.pop(key)
    del module._modules[CONTAINER]
    module.__class__ = module.experts_class


@dataclass
class Routing:
    """The (token, choice) pairs of one MoE call, grouped by expert: S = tokens * top_k rows."""

    order: torch.Tensor  # [S]: the pairs' positions in (token, choice) order, sorted by expert (stable)
    expert_ids: torch.Tensor  # [S]: their experts, ascending
    counts: torch.Tensor  # [E] int64: rows per expert
    rows: torch.Tensor  # [S, H]: the pairs' hidden states
    sizes: list[int] | None  # the counts read on the host, once per call (eager); None when traced


def route(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> Routing:
    """Group hidden_states [T, H] by the experts top_k_index [T, k] sends them to. InputError for an
    expert index the module does not have (checked eagerly; traced, the count fails on the device)."""
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    sizes = None
    if torch.compiler.is_compiling():  # a static [E] shape (bincount's depends on the largest index)
        counts = torch.zeros(module.num_experts, dtype=torch.int64, device=expert_ids.device)
        counts = counts.index_add(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int64))
    else:
        counts = torch.bincount(expert_ids, minlength=module.num_experts)
        if len(counts) > module.num_experts:
            raise InputError(f"{type(module).__name__}: expert index {len(counts) - 1} routed to a module of "
                             f"{module.num_experts} experts")
        sizes = counts.tolist()
    return Routing(order, expert_ids[order], counts, hidden_states[order // top_k_index.shape[1]], sizes)


def project(module: nn.Module, weight_name: str, routing: Routing, x: torch.Tensor) -> torch.Tensor:
    """x [S, K], grouped as `routing`, through each group's expert slice of `weight_name` (quantized
    or in full precision) and its bias: [S, N] in x's dtype."""
    quantized = quantized_weights(module).get(weight_name)
    if quantized is not None and torch.compiler.is_compiling():
        y = grouped_linear(x, routing.counts, quantized)  # one op node: no graph break
    else:  # one call per expert with rows (traced, a host read here breaks the graph)
        sizes = routing.counts.tolist() if routing.sizes is None else routing.sizes
        outputs = [expert_linear(module, weight_name, expert, rows)
                   for expert, rows in enumerate(x.split(sizes)) if len(rows)]
        y = torch.cat(outputs) if outputs else x.new_empty((0, expert_shape(module, weight_name)[1]))
    if module.has_bias:
        y = y + getattr(module, f"{weight_name}_bias")[routing.expert_ids].to(y.dtype)
    return y


def expert_linear(module: nn.Module, weight_name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """x [rows, K] through one expert's slice of `weight_name`, bias-less: [rows, N] in x's dtype."""
    quantized = quantized_weights(module).get(weight_name)
    if quantized is not None:
        return quantized[expert](x)
    # not quantized (yet, or left in full precision by skip patterns)
    return nn.functional.linear(x, expert_weight(module, weight_name, expert).to(x.dtype))


def hidden_activations(module: nn.Module, routing: Routing) -> torch.Tensor:
    """The down_proj inputs [S, I] of the routed rows: the up (or fused gate-up) projection, then
    the module's gate or activation."""
    h = project(module, "gate_up_proj" if module.has_gate else "up_proj", routing, routing.rows)
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


@functools.cache
def _quantized_class(experts_class: type) -> type:
    return type(f"Quantized{experts_class.__name__}", (QuantizedExperts, experts_class),
                {"__module__": __name__, "__doc__": f"{experts_class.__name__} with quantized experts.",
                 "experts_class": experts_class})


def _new_quantized(experts_class: type) -> nn.Module:
    """An empty instance of the quantized subclass of `experts_class`, for unpickling."""
    return object.__new__(_quantized_class(experts_class))


class QuantizedExperts(nn.Module):
    """Mixed in before a transformers experts class once one of its weights is quantized (see the
    module docstring). Forward: hidden_states [T, H], top_k_index [T, k] (int), top_k_weights
    [T, k] -> [T, H] in hidden_states' dtype, as the class's own forward computes it."""

    experts_class: type  # the transformers class this one extends (set by _quantized_class)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # the class is made at run time, so pickle (torch.save(model)) cannot name it: record the
        # class it extends, and remake it when unpickling
        return _new_quantized, (self.experts_class,), self.__getstate__()

    def __getattr__(self, name: str) -> Any:
        # nn.Module resolves every submodule / parameter read (self.act_fn, biases) through here
        quantized = quantized_weights(self).get(name) if name in WEIGHT_NAMES and "_modules" in self.__dict__ else None
        if quantized is None:
            return super().__getattr__(name)
        experts, n, k = expert_shape(self, name)
        first = quantized[0]
        # model code may read the weight's shape / dtype / device (transformers' init skips it)
        return weight_stand_in((experts, k, n) if self.is_transposed else (experts, n, k),
                                first.weight_dtype, first.weight.device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_is_expert_parallel", False):
            raise InputError(f"{type(self).__name__}: lowbit's quantized experts do not support expert parallelism")
        unquantized = fused_weight_names(self)
        if unquantized and torch.compiler.is_exporting():  # else a data-dependent-shape error deep in torch
            raise InputError(f"{type(self).__name__}: torch.export cannot trace full-precision expert weights "
                             f"({', '.join(unquantized)}) beside quantized ones (they run one expert at a time, "
                             f"reading the routing on the host): quantize them too")
        tokens, top_k = top_k_index.shape
        routing = route(self, hidden_states, top_k_index)
        out = project(self, "down_proj", routing, hidden_activations(self, routing))
        if self.has_post_expert_norm:
            out = self.post_expert_norm(out)
        weighted = out.float() * top_k_weights.reshape(-1)[routing.order].unsqueeze(-1).float()
        # back in (token, choice) order, each token's choices summed in fp32 (as transformers'
        # grouped forward does; a sum, not index_add_, so the result is deterministic on GPUs)
        unsorted = torch.empty_like(weighted)
        unsorted[routing.order] = weighted
        return unsorted.view(tokens, top_k, weighted.shape[-1]).sum(dim=1).to(hidden_states.dtype)
