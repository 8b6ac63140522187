"""Llama 3's RoPE scaling ("llama3": Llama 3.1 ... 3.3) in GGUF files.

llama.cpp keeps no config keys for it: its converter stores the tensor `rope_freqs.weight`, float32
[head_dim / 2], and its rotary embedding divides each default frequency theta^(-2i / head_dim) by
entry i. transformers' GGUF reader ignores that tensor (its models would run default RoPE), so the
export writes the divisors of the model's config and the import recovers the config from them.
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError

#: the parameters Llama 3.1 ... 3.3 share besides their factor (8 or 32); a file stores only the
#: divisors they give, so the import takes these and checks the divisors they give against the file's
LLAMA3_SHARED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ROPE_FREQS = "rope_freqs.weight"


def _default_frequencies(theta: float, dim: int) -> torch.Tensor:
    """float32 [dim / 2]: theta^(-2i / dim), as transformers computes the unscaled ones."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_divisors(config) -> torch.Tensor | None:
    """The rope_freqs.weight float32 [head_dim / 2] llama.cpp needs for a transformers `config`
    whose RoPE is default (None: no tensor) or llama3 (the export refuses other types first)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type", "default") == "default":
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
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        probe = LlamaConfig(hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"],
                            head_dim=head_dim, rope_parameters=dict(parameters))
        expected = rope_divisors(probe)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as exc:  # damaged sizes or theta
        raise CheckpointError(f"{where}: cannot check it against the file's sizes and rope.freq_base "
                              f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if expected.shape != divisors.shape or not torch.allclose(expected, divisors, rtol=1e-5, atol=0):
        raise CheckpointError(f"{where}: rope_freqs.weight ({divisors.numel()} divisors) is not Llama 3's RoPE "
                              f"scaling (factor {parameters['factor']:g} with {LLAMA3_SHARED}), the one lowbit reads")
    return parameters
