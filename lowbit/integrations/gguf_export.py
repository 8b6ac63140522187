"""Export of a lowbit-quantized transformers model as a GGUF file (llama.cpp's format), its
quantized layers bit for bit.

Layers are written in the GGML type that decodes to exactly the weights lowbit computes with
(the inverse of gguf_blocks.py's decoders), so llama.cpp runs the model lowbit quantized:

    int4 / int5 / int8, symmetric, group 32   -> Q4_0 / Q5_0 / Q8_0   (w = d * (u - 2^(b-1)))
    int2, symmetric, group 256                -> TQ2_0                (w = d * (t - 1), t = u - 1)
    int2, group 256, zero points 1            -> TQ2_0                (w = d * (t - 1), t = u: a TQ import's)
    iq4_nl                                    -> IQ4_NL               (w = d * KVALUES[u])
    mxfp4 (weight-only, not rotated)          -> MXFP4                (w = 2^(e - 127) * E2M1[u])
    nvfp4 with tensor scale 1                 -> NVFP4                (w = s * E2M1[u], E4M3 s per 16)
    dfloat11 (lossless bf16)                  -> BF16

with lowbit's float16 scale as the block's d (MXFP4: its E8M0 byte; NVFP4: its E4M3 bytes). Any
other layer (asymmetric or another group: their float16 zero points times the scale are not a
float16 min; K types' 6-bit sub-block scales cannot hold arbitrary float16 scales; nvfp4's own
tensor scale) is refused by name before anything is written: quantize with `symmetric=True,
group_size=32` (or mxfp4) for llama.cpp. Unquantized 2-D weights keep their dtype
(F32 / F16 / BF16), 1-D ones (norms, biases) are F32, as llama.cpp expects.

Models: Llama, Mistral (as Llama, without a sliding window), Qwen2, Qwen3 and Phi-3 / Phi-4 (fused
qkv_proj and gate_up_proj, written fused as llama.cpp's attn_qkv and ffn_up) causal LMs with
default RoPE, Llama 3.1's llama3 scaling (`rope_freqs.weight`) or Phi-3's longrope
(`rope_factors_long` / `_short.weight`; gguf_rope.py), and the MoE
models Mixtral (as Llama with experts), Qwen2-MoE and Qwen3-MoE (`ARCHITECTURES`); names follow
the `gguf` package's tensor map, the metadata llama.cpp's converter writes, and Llama's q / k rows
are interleaved per head as llama.cpp's rotary embedding reads them. A MoE layer's experts are
written as llama.cpp stores them, one 3-D tensor [E, N, K] per part (ffn_gate_exps, ffn_up_exps:
the two halves of transformers' gate_up_proj; ffn_down_exps), each expert's rows encoded as its
QuantLinear's (so every expert of a weight must be in one format), and the routers as F32. The
tokenizer, byte-level BPE (Llama 3, Qwen) or SentencePiece BPE (Llama 2, Mistral 7B), is written
by gguf_tokenizer.py. The file is written beside the target and renamed into place, so a failed
export leaves no partial file.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import io
from ..errors import CheckpointError, check_module
from ..experts import expert_weight, fused_weight_names, is_experts_module, parse_slot, quantized_weights, slot_name
from ..formats import bitpack, get_format
from ..formats.integer import padded_k
from ..linear import QuantLinear
from .gguf_rope import ROPE_FREQS, longrope_tensors, rope_divisors, rope_parameters
from .gguf_tokenizer import add_tokenizer

logger = logging.getLogger(__name__)

#: transformers model_type -> llama.cpp's architecture name (its converter writes Mistral and Mixtral as Llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "phi3": "phi3"}
#: MoE model types -> whether llama.cpp's graph renormalizes the chosen experts' routing weights to
#: sum to 1 (build_moe_ffn's norm_w: fixed per architecture, read from no metadata); transformers'
#: Mixtral always does, Qwen-MoE's as config.norm_topk_prob says
_NORMALIZED_TOP_K = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}
#: a fused expert weight -> the GGUF parts it is written as, by their unfused transformers names
#: (row blocks of equal height, in order: gate_up_proj's gate rows come first)
_EXPERT_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
#: tensors llama.cpp's converter keeps in F32 whatever the model's dtype: the MoE routers
_F32_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def _fail(where: str, problem: str) -> CheckpointError:
    return CheckpointError(f"GGUF export: {where}: {problem}")


@dataclass(frozen=True)
class _Encoding:
    """How one kind of lowbit layer is written: GGML type name, the width of the layer's codes, the
    weights per GGML block, and the block encoder, which takes codes int32 [N, G, group] and the
    layer's stored scales [N, G * scales_per_block] (float16 d; MXFP4's E8M0 bytes; NVFP4's E4M3
    of 16-weight sub-blocks) and returns uint8 [N, G, bytes]."""

    ggml_type: str
    bits: int
    group_size: int
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scales_per_block: int = 1


def _half_bytes(d: torch.Tensor) -> torch.Tensor:
    """float16 [N, G] -> its little-endian bytes uint8 [N, G, 2]."""
    return d.to(torch.float16).contiguous().view(torch.int16).unsqueeze(-1).view(torch.uint8).reshape(*d.shape, 2)


def _nibble_bytes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [..., 2h] -> h bytes [..., h]: element j in byte j's low nibble, j + h in its high."""
    half = codes.shape[-1] // 2
    return ((codes[..., :half] & 0xF) | ((codes[..., half:] & 0xF) << 4)).to(torch.uint8)


def _bits_little_endian(bits: torch.Tensor) -> torch.Tensor:
    """0/1 values [..., 8m] -> m bytes [..., m], bit i of byte b = value 8b + i."""
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (bits.unflatten(-1, (-1, 8)) * weights).sum(-1).to(torch.uint8)


def _q4_0(codes, d):
    return torch.cat([_half_bytes(d), _nibble_bytes(codes)], dim=-1)


def _q5_0(codes, d):
    return torch.cat([_half_bytes(d), _bits_little_endian((codes >> 4) & 1), _nibble_bytes(codes)], dim=-1)


def _q8_0(codes, d):
    return torch.cat([_half_bytes(d), (codes - 128).to(torch.int8).view(torch.uint8)], dim=-1)


def _mxfp4(codes, e):
    # ggml's scale is 2^(e - 128) and its table E2M1 doubled: the same weight as lowbit's 2^(e - 127) E2M1
    return torch.cat([e.view(torch.uint8).unsqueeze(-1), _nibble_bytes(codes)], dim=-1)


def _nvfp4(codes, s):
    # 4 sub-blocks of 16: their E4M3 scales (ggml halves them, its table is E2M1 doubled), then each
    # sub-block's 8 bytes of nibbles
    nibbles = _nibble_bytes(codes.unflatten(-1, (4, 16))).flatten(-2)
    return torch.cat([s.contiguous().view(torch.uint8).unflatten(-1, (-1, 4)), nibbles], dim=-1)


def _tq2_0(codes, d):
    return _tq2_0_fields(codes - 1, d)  # symmetric int2: w = d * (u - 2) = d * (t - 1), t = u - 1


def _tq2_0_fields(t, d):
    # t in 0..2; element 128h + 32j + l at bits 2j of byte 32h + l (Q2_K's field order)
    t = t.unflatten(-1, (2, 4, 32))
    fields = (t << (2 * torch.arange(4, dtype=torch.int32)).view(4, 1)).sum(-2)
    return torch.cat([fields.flatten(-2).to(torch.uint8), _half_bytes(d)], dim=-1)


#: symmetric int layers by (bits, group_size)
_SYMMETRIC_INT = {(4, 32): _Encoding("Q4_0", 4, 32, _q4_0), (5, 32): _Encoding("Q5_0", 5, 32, _q5_0),
                  (8, 32): _Encoding("Q8_0", 8, 32, _q8_0), (2, 256): _Encoding("TQ2_0", 2, 256, _tq2_0)}
_IQ4_NL = _Encoding("IQ4_NL", 4, 32, _q4_0)  # IQ4_NL's block is Q4_0's: d, then the nibbles
#: int2, group 256, zero points 1 (a TQ1_0 / TQ2_0 import's: w = s * (t - 1)): the codes are TQ2_0's t
_TERNARY_INT2 = _Encoding("TQ2_0", 2, 256, _tq2_0_fields)
#: microscaled layers by format (weight-only, not rotated: llama.cpp multiplies plain weights)
_MICROSCALED = {"mxfp4": _Encoding("MXFP4", 4, 32, _mxfp4), "nvfp4": _Encoding("NVFP4", 4, 64, _nvfp4, 4)}


def _exportable() -> str:
    return ("int4 / int5 / int8 with symmetric=True, group_size=32 (Q4_0 / Q5_0 / Q8_0), int2 symmetric group 256 "
            "(TQ2_0), iq4_nl (IQ4_NL), mxfp4 (MXFP4), nvfp4 with tensor scale 1 (NVFP4; an imported NVFP4 file's) "
            "and dfloat11 (BF16)")


def _layer_encoding(name: str, layer: QuantLinear) -> _Encoding | None:
    """The encoding of a quantized layer; None for dfloat11 (written decoded, BF16); CheckpointError
    for a layer no GGML type holds bit for bit."""
    attrs = layer.attrs
    if attrs.get("permuted"):
        raise _fail(name, "its groups gather columns from all over K (an activation-ordered import), which GGUF "
                    "does not store")
    if layer.format == "dfloat11":
        return None
    if layer.format == "iq4_nl":
        encoding = _IQ4_NL
    elif layer.format in _MICROSCALED:
        if attrs.get("act") or attrs.get("rotate"):
            raise _fail(name, f"{layer.format} with act={attrs.get('act')!r}, rotate={attrs.get('rotate')!r}: "
                        "llama.cpp multiplies plain (unrotated) weights by unquantized activations")
        tensor_scale = layer.packed.tensors.get("tensor_scale")
        tensor_scale = 1.0 if tensor_scale is None else float(tensor_scale.flatten()[0])
        if tensor_scale != 1.0:
            raise _fail(name, f"nvfp4's tensor scale {tensor_scale:g}: NVFP4 blocks have none "
                        "(only layers imported from GGUF NVFP4, tensor scale 1, are written)")
        encoding = _MICROSCALED[layer.format]
    elif layer.format.startswith("int") and attrs.get("symmetric"):
        encoding = _SYMMETRIC_INT.get((get_format(layer.format).bits, attrs.get("group_size")))
    elif layer.format == "int2" and attrs.get("group_size") == 256 and _zero_points_one(layer.packed):
        encoding = _TERNARY_INT2
    else:
        encoding = None
    if encoding is None:
        raise _fail(name, f"{layer.format} {attrs} has no GGML type that holds it bit for bit; GGUF export "
                    f"writes {_exportable()}")
    if layer.in_features % encoding.group_size:
        raise _fail(name, f"in_features {layer.in_features} is not a multiple of {encoding.ggml_type}'s "
                    f"block of {encoding.group_size} (GGUF rows are whole blocks)")
    return encoding


def _zero_points_one(packed) -> bool:
    """Whether every group of an asymmetric int layer has zero point 1, or scale 0 (all its weights 0,
    whatever TQ2_0's t: an import's block whose d is 0)."""
    return bool(((packed.zeros == 1) | (packed.scales == 0)).all())


def _encoded_layer(name: str, layer: QuantLinear, encoding: _Encoding, rows: torch.Tensor | None):
    """A quantized layer's GGUF bytes: uint8 [N, K / group * block bytes] (rows reordered by `rows`)."""
    packed = layer.packed
    n, k = layer.out_features, layer.in_features
    codes = bitpack.unpack(packed.qweight.cpu(), encoding.bits, padded_k(k, encoding.group_size))[:, :k].to(torch.int32)
    d = packed.scales.cpu().t()[:, : k // encoding.group_size * encoding.scales_per_block]  # [N, G * scales]
    if encoding is _SYMMETRIC_INT[(2, 256)] and bool((codes == 0).any()):
        raise _fail(name, "an int2 code 0 (the weight -2 d) is outside TQ2_0's ternary range")
    if rows is not None:
        codes, d = codes[rows], d[rows]
    blocks = encoding.encode(codes.unflatten(-1, (-1, encoding.group_size)), d)
    return blocks.reshape(n, -1)


def _decoded(layer: QuantLinear) -> torch.Tensor:
    """A layer no GGML type holds as blocks (dfloat11) decoded: bfloat16 [N, K], written BF16."""
    return get_format(layer.format).dequantize(layer.packed).to(torch.bfloat16)


def _interleaved_rows(n: int, heads: int) -> torch.Tensor:
    """Llama's q / k rows [N] as llama.cpp stores them: per head, the two halves of its rotary
    pairs interleaved (row i of head h's second half follows row i of its first)."""
    return torch.arange(n).reshape(heads, 2, n // heads // 2).transpose(1, 2).reshape(-1)


def _rope_theta(config, architecture: str) -> float:
    parameters = rope_parameters(config)
    rope_type = parameters.get("rope_type", "default")
    written = {"default": architecture, "llama3": "llama", "longrope": "phi3"}.get(rope_type)
    if written != architecture:
        raise _fail("config.rope_parameters.rope_type", f"{rope_type!r}: GGUF export writes default RoPE, Llama's "
                    "llama3 scaling (rope_freqs) and Phi-3's longrope (rope_factors_long / short); llama.cpp's other "
                    "scaled variants are not written yet")
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise _fail("config.rope_parameters.rope_theta", f"{theta!r} is not a positive number")
    return float(theta)


def _check_config(architecture: str, config) -> None:
    for field in ("attention_bias", "mlp_bias") if architecture == "llama" else ():
        if getattr(config, field, False):
            raise _fail(f"config.{field}", "True: GGUF export writes Llama models without biases")
    if getattr(config, "use_sliding_window", False):
        raise _fail("config.use_sliding_window", "True: GGUF export writes full attention only")
    if config.model_type in ("mistral", "mixtral") and getattr(config, "sliding_window", None) is not None:
        raise _fail("config.sliding_window", f"{config.sliding_window}: GGUF export writes "
                    f"{config.model_type.capitalize()} models with full attention (sliding_window None, as Mistral "
                    "7B v0.2 on, Mistral-Nemo and Mixtral)")
    if config.model_type in _NORMALIZED_TOP_K:
        _check_moe_config(config)
    window = getattr(config, "sliding_window", None) if architecture == "phi3" else None
    if window is not None and window < config.max_position_embeddings:
        warnings.warn(f"GGUF export: config.sliding_window {window}: llama.cpp runs Phi-3 with full attention (its "
                      f"Phi sliding window is disabled), so past {window} tokens its outputs differ from "
                      "transformers'", stacklevel=3)


def _check_moe_config(config) -> None:
    """CheckpointError for a MoE config llama.cpp would run otherwise than transformers does."""
    normalized = _NORMALIZED_TOP_K[config.model_type]
    if getattr(config, "norm_topk_prob", normalized) != normalized:
        raise _fail("config.norm_topk_prob", f"{config.norm_topk_prob}: llama.cpp's {config.model_type} "
                    f"{'renormalizes' if normalized else 'does not renormalize'} the chosen experts' routing weights")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise _fail("config.mlp_only_layers", f"{config.mlp_only_layers} (decoder_sparse_step "
                    f"{config.decoder_sparse_step}): llama.cpp's {config.model_type} has experts in every layer")


def _add_metadata(writer, architecture: str, config) -> None:
    """The hyperparameters llama.cpp's converter writes for these architectures."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config, architecture))
    rope = rope_parameters(config)
    if architecture in ("llama", "phi3"):  # Phi-4-mini rotates 3/4 of each head (partial_rotary_factor)
        partial = rope.get("partial_rotary_factor", 1.0) if architecture == "phi3" else 1.0
        writer.add_rope_dimension_count(int(head_dim * partial))
    if architecture == "phi3":  # as llama.cpp's converter: 0 for no window (Phi-4); the longrope base context
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        original = (rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
                    or config.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(original)
    if architecture in ("qwen3", "qwen3moe") or head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if config.model_type in _NORMALIZED_TOP_K:
        writer.add_expert_count(getattr(config, "num_local_experts", None) or config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if config.model_type in ("qwen2_moe", "qwen3_moe"):  # Mixtral's experts are intermediate_size wide
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if config.model_type == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _float_tensor(tensor: torch.Tensor) -> tuple[np.ndarray, Any, str]:
    """(array, raw GGML type or None, GGML type name) of an unquantized tensor: 1-D as F32, 2-D or 3-D
    (experts) in its dtype."""
    import gguf

    tensor = tensor.detach().cpu()
    if tensor.dim() == 1 or tensor.dtype == torch.float32:
        return tensor.float().numpy(), None, "F32"
    if tensor.dtype == torch.float16:
        return tensor.numpy(), None, "F16"
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bytes, typed BF16
        return tensor.contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16, "BF16"
    raise _fail("tensor", f"dtype {tensor.dtype} is not one GGUF stores")


def _architecture(model: nn.Module) -> str:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in ARCHITECTURES:
        raise _fail("model", f"{type(model).__name__} (model_type {model_type!r}): GGUF export writes "
                    f"{sorted(ARCHITECTURES)} causal language models")
    return ARCHITECTURES[model_type]


def _expert_encoding(name: str, module: nn.Module, weight_name: str, encodings: dict) -> _Encoding | None:
    """The one encoding of every expert of the quantized fused weight `weight_name` of the experts
    module `name` (None: dfloat11, written decoded); CheckpointError where they differ, as a GGUF
    expert tensor has one GGML type."""
    kinds = {encodings[slot_name(name, weight_name, e)] for e in range(len(quantized_weights(module)[weight_name]))}
    if len(kinds) > 1:
        types = sorted(kind.ggml_type if kind is not None else "BF16" for kind in kinds)
        raise _fail(f"{name}.{weight_name}", f"its experts would be written as {types}; llama.cpp's expert tensor "
                    "holds every expert in one GGML type: quantize them in one format")
    return kinds.pop()


def _expert_tensors(name: str, module: nn.Module, encodings: dict) -> list[tuple[str, torch.Tensor, str | None]]:
    """(transformers' unfused name of each part, its data, its GGML type name) of the experts
    module `name` (gated, bias-less: the ARCHITECTURES' experts): blocks uint8 [E, N_part, bytes] of quantized experts,
    float weights [E, N_part, K] (type None) of full-precision or dfloat11 (decoded to bfloat16) ones."""
    out = []
    quantized = quantized_weights(module)
    for weight_name in [*quantized, *fused_weight_names(module)]:
        layers, ggml_type = quantized.get(weight_name), None
        encoding = None if layers is None else _expert_encoding(name, module, weight_name, encodings)
        if layers is None:
            data = torch.stack([expert_weight(module, weight_name, e).detach() for e in range(module.num_experts)])
        elif encoding is None:
            data = torch.stack([_decoded(m) for m in layers])
        else:
            data = torch.stack([_encoded_layer(slot_name(name, weight_name, e), m, encoding, None)
                                for e, m in enumerate(layers)])
            ggml_type = encoding.ggml_type
        parts = _EXPERT_PARTS[weight_name]
        out += [(f"{name}.{part}", rows, ggml_type) for part, rows in zip(parts, data.chunk(len(parts), dim=1))]
    return out


def _add_tensor(writer, name: str, data: torch.Tensor, ggml_type: str | None) -> str:
    """Add `data` to the file as tensor `name`: GGML blocks uint8 [..., bytes] of `ggml_type`, or
    float values (ggml_type None: `_float_tensor`'s type) -> the GGML type name written."""
    import gguf

    if ggml_type is not None:
        blocks = data.contiguous().numpy()
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType[ggml_type])
        return ggml_type
    array, raw_type, type_name = _float_tensor(data.contiguous())
    writer.add_tensor(name, array, raw_shape=array.shape if raw_type is not None else None, raw_dtype=raw_type)
    return type_name


def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer) -> dict[str, int]:
    """Write the transformers causal LM `model` (Llama, Mistral, Qwen2, Qwen3, Phi-3, Mixtral, Qwen2-MoE,
    Qwen3-MoE; lowbit-quantized or not) and its `tokenizer` (byte-level or SentencePiece BPE,
    gguf_tokenizer.py) as the GGUF file `path`, atomically -> {GGML type: tensors written}.
    Quantized layers must be in a format a GGML type holds bit for bit (module docstring), else
    CheckpointError naming the layer before anything is written."""
    import gguf

    check_module(model)
    architecture = _architecture(model)
    config = model.config
    _check_config(architecture, config)
    path = io.as_path(path, "export_gguf(..., path)")
    if path.suffix != ".gguf" or path.is_dir():
        raise _fail(str(path), "the output must be a file path ending in .gguf")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    encodings = {name: _layer_encoding(name, m) for name, m in quantized.items()}
    experts = {name: m for name, m in model.named_modules() if is_experts_module(m)}
    for name, module in experts.items():  # refused before anything is written
        for weight_name in quantized_weights(module):
            _expert_encoding(name, module, weight_name, encodings)
    tensor_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.num_hidden_layers)
    tensors, _ = io.unique_tensors(model)  # a tied lm_head once: llama.cpp reuses token_embd for a missing output
    io.check_not_on_meta(tensors)
    persistent = set(model.state_dict(keep_vars=True))
    packed_fields = {f"{name}.{field}" for name, m in quantized.items() for field in m.packed.tensors}
    fused_experts = {f"{name}.{weight_name}" for name, m in experts.items() for weight_name in fused_weight_names(m)}
    # (state dict key, the QuantLinear whose weight it is, or None): float tensors (a QuantLinear's
    # bias too), then the quantized weights; the experts modules' weights are written per module
    entries = [(key, None) for key in tensors if key in persistent and key not in packed_fields | fused_experts]
    entries += [(f"{name}.weight", name) for name in quantized if parse_slot(name) is None]
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads or config.num_attention_heads}
    written: Counter[str] = Counter()
    writer = None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(tmp), architecture)
        writer.add_name(str(getattr(config, "_name_or_path", "") or architecture).rstrip("/").rsplit("/", 1)[-1])
        _add_metadata(writer, architecture, config)
        if quantized:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size)
        divisors = rope_divisors(config)  # Llama 3.1's scaling: llama.cpp reads it from this tensor
        if divisors is not None:
            written[_add_tensor(writer, ROPE_FREQS, divisors, None)] += 1
        longrope = longrope_tensors(config)  # Phi-3's 128k scaling: two tensors and its cos / sin scale
        if longrope is not None:
            for name, factors in longrope[0].items():
                written[_add_tensor(writer, name, factors, None)] += 1
            writer.add_rope_scaling_attn_factors(longrope[1])
        progress = tqdm(total=len(entries) + len(experts), desc="export GGUF", unit="tensor",
                        disable=len(entries) < 64)
        for key, layer_name in entries:
            gguf_name = tensor_names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise _fail(key, f"no GGUF tensor name for it in llama.cpp's {architecture} map")
            projection = re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", key) if architecture == "llama" else None
            layer = quantized.get(layer_name) if layer_name else None
            n = layer.out_features if layer is not None else tensors[key].shape[0]
            rows = _interleaved_rows(n, heads[projection.group(1)]) if projection else None
            if gguf_name.endswith(_F32_TENSORS):  # a router; Qwen2-MoE's shared expert gate [1, H] is 1-D
                value = tensors[key] if layer is None else get_format(layer.format).dequantize(
                    dataclasses.replace(layer.packed, dtype=torch.float32))
                data, ggml_type = value.float().reshape(-1 if "_shexp" in gguf_name else value.shape), None
            elif layer is not None and encodings[layer_name] is not None:
                ggml_type = encodings[layer_name].ggml_type
                data = _encoded_layer(layer_name, layer, encodings[layer_name], rows)
            else:
                value = _decoded(layer) if layer is not None else tensors[key]
                data, ggml_type = (value if rows is None else value[rows]), None
            written[_add_tensor(writer, gguf_name, data, ggml_type)] += 1
            progress.update()
        for name, module in experts.items():
            for part_name, data, ggml_type in _expert_tensors(name, module, encodings):
                written[_add_tensor(writer, f"{tensor_names.get_name(part_name)}.weight", data, ggml_type)] += 1
            progress.update()
        progress.close()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    logger.info("GGUF export: %s: %s", path, dict(written))
    return dict(written)
