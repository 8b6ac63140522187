"""RoPE scaling stored as tensors in GGUF files, which transformers' GGUF reader ignores (its
models would run default RoPE): the export writes them from the model's config and the import
recovers the config from them.

Llama 3's ("llama3": Llama 3.1 ... 3.3): llama.cpp keeps no config keys for it; its converter
stores the tensor `rope_freqs.weight`, float32 [head_dim / 2], and its rotary embedding divides
each default frequency theta^(-2i / head_dim) by entry i.

Phi-3's LongRoPE ("longrope": the 128k Phi-3 / Phi-3.5 models): per-frequency divisors for short
and long contexts, `rope_factors_short.weight` / `rope_factors_long.weight`, float32 [head_dim / 2],
with `rope.scaling.original_context_length` (the pretraining context: transformers takes the long
factors past it) and `rope.scaling.attn_factor` (the cos / sin scale) as metadata.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CheckpointError

#: the parameters Llama 3.1 ... 3.3 share besides their factor (8 or 32); a file stores only the
#: divisors they give, so the import takes these and checks the divisors they give against the file's
LLAMA3_SHARED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ROPE_FREQS = "rope_freqs.weight"
#: LongRoPE's per-frequency divisors: the rope_parameters key each tensor holds
LONGROPE_FACTORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}


def rope_parameters(config) -> dict:
    """A transformers config's rope_parameters ({} when it has none)."""
    return getattr(config, "rope_parameters", None) or {}


def head_dim(where: str, config: dict) -> int:
    """The head width of transformers' parsed GGUF metadata `config`; CheckpointError naming `where`
    when its sizes are missing or damaged."""
    try:
        return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{where}: cannot size the heads from the file's metadata "
                              f"({type(exc).__name__}: {exc})") from None


def _default_frequencies(theta: float, dim: int) -> torch.Tensor:
    """float32 [dim / 2]: theta^(-2i / dim), as transformers computes the unscaled ones."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_divisors(config) -> torch.Tensor | None:
    """The rope_freqs.weight float32 [head_dim / 2] llama.cpp needs for a transformers `config`
    whose RoPE is llama3; None for any other (the export refuses the types it does not write first)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = rope_parameters(config)
    if parameters.get("rope_type", "default") != "llama3":
        return None
    frequencies = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))[0].float()  # its attention factor is 1
    return _default_frequencies(float(parameters["rope_theta"]), 2 * frequencies.numel()) / frequencies


def llama3_parameters(where: str, divisors: torch.Tensor, config: dict) -> dict:
    """The rope_parameters of llama3 RoPE whose divisors are a file's rope_freqs `divisors` [head_dim
    / 2] for the model `config` (transformers' parsed GGUF metadata, with rope_theta): factor the
    largest divisor, the others LLAMA3_SHARED. CheckpointError naming `where` when those do not
    give the file's divisors (within float32 rounding), rather than run another RoPE."""
    from transformers import LlamaConfig

    divisors = divisors.float().flatten()
    if not bool(torch.isfinite(divisors).all()) or not bool((divisors >= 1).all()):
        raise CheckpointError(f"{where}: rope_freqs.weight holds values that are not finite divisors >= 1")
    theta = config.get("rope_theta") or LlamaConfig().rope_parameters["rope_theta"]  # the reader's default
    try:
        parameters = {"rope_type": "llama3", "rope_theta": float(theta), "factor": float(divisors.max()),
                      **LLAMA3_SHARED}
        probe = LlamaConfig(hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"],
                            head_dim=head_dim(where, config), rope_parameters=dict(parameters))
        expected = rope_divisors(probe)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as exc:  # damaged sizes or theta
        raise CheckpointError(f"{where}: cannot check it against the file's sizes and rope.freq_base "
                              f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if expected.shape != divisors.shape or not torch.allclose(expected, divisors, rtol=1e-5, atol=0):
        raise CheckpointError(f"{where}: rope_freqs.weight ({divisors.numel()} divisors) is not Llama 3's RoPE "
                              f"scaling (factor {parameters['factor']:g} with {LLAMA3_SHARED}), the one lowbit reads")
    return parameters


def longrope_tensors(config) -> tuple[dict[str, torch.Tensor], float] | None:
    """({tensor name: float32 [head_dim / 2] factors}, the cos / sin scale transformers applies) of a
    transformers `config` with longrope RoPE, as llama.cpp's converter writes them; None for any
    other RoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = rope_parameters(config)
    if parameters.get("rope_type") != "longrope":
        return None
    attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"))[1]
    return ({name: torch.tensor(parameters[key], dtype=torch.float32) for name, key in LONGROPE_FACTORS.items()},
            float(attention_factor))


def longrope_parameters(where: str, factors: dict[str, torch.Tensor], config: dict, original: Any,
                        attention_factor: Any) -> dict:
    """The rope_parameters of longrope RoPE from a file's factor tensors ({tensor name: values}),
    its rope.scaling.original_context_length `original` and rope.scaling.attn_factor (None: the
    default transformers and llama.cpp's converter both derive), for the model `config`
    (transformers' parsed GGUF metadata). CheckpointError naming `where` for a missing or damaged
    part, rather than run another RoPE."""
    missing = sorted(set(LONGROPE_FACTORS) - set(factors))
    if missing:
        raise CheckpointError(f"{where}: {missing[0]} is missing; LongRoPE needs both factor tensors")
    half = int(head_dim(where, config) * config.get("partial_rotary_factor", 1.0)) // 2  # a factor per rotated pair
    parameters = {"rope_type": "longrope", "rope_theta": float(config.get("rope_theta") or 10000.0)}
    for name, key in LONGROPE_FACTORS.items():
        values = factors[name].float().flatten()
        if values.numel() != half or not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
            raise CheckpointError(f"{where}: {name} holds {values.numel()} values; LongRoPE needs {half} finite "
                                  "positive factors (one per rotary frequency)")
        parameters[key] = values.tolist()
    if not isinstance(original, int) or isinstance(original, bool) or not 0 < original:
        raise CheckpointError(f"{where}: rope.scaling.original_context_length is {original!r}, not a positive "
                              "count; LongRoPE switches to its long factors past it")
    parameters["original_max_position_embeddings"] = original
    if attention_factor is not None:
        if not isinstance(attention_factor, float) or not math.isfinite(attention_factor) or attention_factor <= 0:
            raise CheckpointError(f"{where}: rope.scaling.attn_factor is {attention_factor!r}, not a positive number")
        parameters["attention_factor"] = attention_factor
    return parameters
