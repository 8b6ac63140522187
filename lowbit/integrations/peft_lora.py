"""LoRA adapters (PEFT) over lowbit layers: QLoRA-style fine-tuning with any lowbit format as the
frozen base.

PEFT wraps only the layer types it knows. `lora_config` registers `LoraQuantLinear` for
`QuantLinear` through LoraConfig's custom-module mapping (`_register_custom_module`, the hook PEFT
documents for layers it does not ship, marked experimental there; tested with peft 0.21)."""
from __future__ import annotations

from typing import Any

from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear

from ..errors import InputError, LowbitError
from ..linear import QuantLinear, is_conv1d

#: `init_lora_weights` values that build the adapter from the base layer's full-precision weight
#: (PiSSA, CorDA, OLoRA, MiCA, LoftQ, orthogonal, LoRA-GA): a QuantLinear holds a packed one
_INITS_FROM_THE_BASE_WEIGHT = ("pissa", "corda", "olora", "mica", "loftq", "orthogonal", "lora_ga")


class LoraQuantLinear(PeftLoraLinear):
    """PEFT's LoRA layer over a QuantLinear: y = base(x) + scaling * B(A(dropout(x))), with the base's
    packed weight frozen and A [r, in_features], B [out_features, r] the trainable nn.Linear weights.
    The gradient reaches A, B and x through the base's backward (`ops.FrozenWeightLinear`).

    Plain LoRA only: variants (DoRA, ...) and initializations that read the base weight need the
    full-precision weight, and so does merging; those raise LowbitError on a quantized base. After
    `lowbit.dequantize(model)` the base is an nn.Linear again and PEFT's merge works as usual."""

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base stores its weight [in, out], which merging needs to know: only a Conv1D
        that lowbit.dequantize restored (GPT-2). The adapter itself is the same over any base, so
        LoraConfig's fan_in_fan_out (which PEFT sets for a Conv1D target) is not used."""
        return is_conv1d(self.get_base_layer())

    @fan_in_fan_out.setter
    def fan_in_fan_out(self, value: bool) -> None:
        pass  # PEFT's __init__ assigns LoraConfig's value; the base decides (above)

    def _get_in_out_features(self, module: Any) -> tuple[int, int]:
        """(in_features, out_features) of the base, without PEFT's "Unsupported layer type" warning."""
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        #: the layer's qualified name, for error messages (PEFT passes it on each adapter it adds)
        self.target_name = kwargs.get("target_name") or getattr(self, "target_name", "a lowbit layer")
        init = config.init_lora_weights
        if (isinstance(self.get_base_layer(), QuantLinear) and isinstance(init, str)
                and init.lower().startswith(_INITS_FROM_THE_BASE_WEIGHT)):
            raise LowbitError(f"LoRA adapter {adapter_name!r} on {self.target_name}: init_lora_weights={init!r} "
                              f"starts from the full-precision weight, and this layer holds a packed "
                              f"{self.get_base_layer().format} one; use the default initialization "
                              f"(init_lora_weights=True or 'gaussian')")
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> Any:
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None and isinstance(self.get_base_layer(), QuantLinear):
            raise LowbitError(f"LoRA on {self.target_name}: {type(variant).__name__} (a LoRA variant: DoRA, "
                              f"VeLoRA, ...) reads the full-precision weight, and this layer holds a packed "
                              f"{self.get_base_layer().format} one; use plain LoRA")
        return variant

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if isinstance(base, QuantLinear):
            # merging into packed weights would round W_hat + scaling * BA to the format again: a second
            # rounding, which the adapter was not trained with
            raise LowbitError(f"merging a LoRA adapter into {self.target_name} ({base.format}) would quantize "
                              f"the merged weight again: call lowbit.dequantize(model) first (the base layers "
                              f"become nn.Linear with the dequantized weights), then merge (merge_and_unload), "
                              f"and quantize the merged model again if you want it quantized")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


def lora_config(config: LoraConfig) -> LoraConfig:
    """Register LoraQuantLinear for QuantLinear layers on `config` (a peft LoraConfig, changed in place
    and returned). Pass it wherever PEFT builds LoRA layers: `get_peft_model(model, config)`,
    `PeftModel.from_pretrained(model, folder, config=config)` (from `LoraConfig.from_pretrained(folder)`:
    the saved adapter_config.json cannot carry the registration), `model.add_adapter(config)`."""
    if not isinstance(config, LoraConfig):
        raise InputError(f"lora_config takes a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: LoraQuantLinear})
    return config
