"""Export of a lowbit-quantized transformers model as a GGUF file (llama.cpp's format), its
quantized layers bit for bit.

Layers are written in the GGML type that decodes to exactly the weights lowbit computes with
(the inverse of gguf_blocks.py's decoders), so llama.cpp runs the model lowbit quantized:

    int4 / int5 / int8, symmetric, group 32   -> Q4_0 / Q5_0 / Q8_0   (w = d * (u - 2^(b-1)))
    int2, symmetric, group 256                -> TQ2_0                (w = d * (t - 1), t = u - 1)
    iq4_nl                                    -> IQ4_NL               (w = d * KVALUES[u])
    dfloat11 (lossless bf16)                  -> BF16

with lowbit's float16 scale as the block's d. Any other layer (asymmetric or another group: their
float16 zero points times the scale are not a float16 min; K types' 6-bit sub-block scales
cannot hold arbitrary float16 scales) is refused by name before anything is written: quantize
with `symmetric=True, group_size=32` for llama.cpp. Unquantized 2-D weights keep their dtype
(F32 / F16 / BF16), 1-D ones (norms, biases) are F32, as llama.cpp expects.

Models: dense Llama, Mistral (as Llama, without a sliding window), Qwen2 and Qwen3 causal LMs with
default RoPE, or Llama 3.1's llama3 scaling
(`rope_freqs.weight`, gguf_rope.py) (`ARCHITECTURES`); names follow the `gguf` package's tensor
map, the metadata llama.cpp's converter writes, and Llama's q / k rows are interleaved per head as
llama.cpp's rotary embedding reads them. The tokenizer, byte-level BPE (Llama 3, Qwen) or
SentencePiece BPE (Llama 2, Mistral 7B), is written by gguf_tokenizer.py. The file is written beside the target and renamed
into place, so a failed export leaves no partial file.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import io
from ..errors import CheckpointError, check_module
from ..formats import bitpack, get_format
from ..formats.integer import padded_k
from ..linear import QuantLinear
from .gguf_rope import ROPE_FREQS, rope_divisors
from .gguf_tokenizer import add_tokenizer

logger = logging.getLogger(__name__)

#: transformers model_type -> llama.cpp's architecture name (its converter writes Mistral as Llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _fail(where: str, problem: str) -> CheckpointError:
    return CheckpointError(f"GGUF export: {where}: {problem}")


@dataclass(frozen=True)
class _Encoding:
    """How one kind of lowbit layer is written: GGML type name, the width of the layer's codes, and
    the block encoder, which takes codes int32 [N, G, group] and the float16 block scales [N, G]
    and returns uint8 [N, G, bytes]."""

    ggml_type: str
    bits: int
    group_size: int
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _half_bytes(d: torch.Tensor) -> torch.Tensor:
    """float16 [N, G] -> its little-endian bytes uint8 [N, G, 2]."""
    return d.to(torch.float16).contiguous().view(torch.int16).unsqueeze(-1).view(torch.uint8).reshape(*d.shape, 2)


def _nibble_bytes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, G, 32] -> 16 bytes [N, G, 16]: element j in byte j's low nibble, j + 16 in its high."""
    return ((codes[..., :16] & 0xF) | ((codes[..., 16:] & 0xF) << 4)).to(torch.uint8)


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


def _tq2_0(codes, d):
    # t = u - 1 in 0..2; element 128h + 32j + l at bits 2j of byte 32h + l (Q2_K's field order)
    t = (codes - 1).unflatten(-1, (2, 4, 32))
    fields = (t << (2 * torch.arange(4, dtype=torch.int32)).view(4, 1)).sum(-2)
    return torch.cat([fields.flatten(-2).to(torch.uint8), _half_bytes(d)], dim=-1)


#: symmetric int layers by (bits, group_size)
_SYMMETRIC_INT = {(4, 32): _Encoding("Q4_0", 4, 32, _q4_0), (5, 32): _Encoding("Q5_0", 5, 32, _q5_0),
                  (8, 32): _Encoding("Q8_0", 8, 32, _q8_0), (2, 256): _Encoding("TQ2_0", 2, 256, _tq2_0)}
_IQ4_NL = _Encoding("IQ4_NL", 4, 32, _q4_0)  # IQ4_NL's block is Q4_0's: d, then the nibbles


def _exportable() -> str:
    return ("int4 / int5 / int8 with symmetric=True, group_size=32 (Q4_0 / Q5_0 / Q8_0), int2 symmetric group 256 "
            "(TQ2_0), iq4_nl (IQ4_NL) and dfloat11 (BF16)")


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
    elif layer.format.startswith("int") and attrs.get("symmetric"):
        encoding = _SYMMETRIC_INT.get((get_format(layer.format).bits, attrs.get("group_size")))
    else:
        encoding = None
    if encoding is None:
        raise _fail(name, f"{layer.format} {attrs} has no GGML type that holds it bit for bit; GGUF export "
                    f"writes {_exportable()}")
    if layer.in_features % encoding.group_size:
        raise _fail(name, f"in_features {layer.in_features} is not a multiple of {encoding.ggml_type}'s "
                    f"block of {encoding.group_size} (GGUF rows are whole blocks)")
    return encoding


def _encoded_layer(name: str, layer: QuantLinear, encoding: _Encoding, rows: torch.Tensor | None):
    """A quantized layer's GGUF bytes: uint8 [N, K / group * block bytes] (rows reordered by `rows`)."""
    packed = layer.packed
    n, k = layer.out_features, layer.in_features
    codes = bitpack.unpack(packed.qweight.cpu(), encoding.bits, padded_k(k, encoding.group_size))[:, :k].to(torch.int32)
    d = packed.scales.cpu().t()[:, : k // encoding.group_size]  # [N, G]
    if encoding.ggml_type == "TQ2_0" and bool((codes == 0).any()):
        raise _fail(name, "an int2 code 0 (the weight -2 d) is outside TQ2_0's ternary range")
    if rows is not None:
        codes, d = codes[rows], d[rows]
    blocks = encoding.encode(codes.unflatten(-1, (-1, encoding.group_size)), d)
    return blocks.reshape(n, -1)


def _interleaved_rows(n: int, heads: int) -> torch.Tensor:
    """Llama's q / k rows [N] as llama.cpp stores them: per head, the two halves of its rotary
    pairs interleaved (row i of head h's second half follows row i of its first)."""
    return torch.arange(n).reshape(heads, 2, n // heads // 2).transpose(1, 2).reshape(-1)


def _rope_theta(config, architecture: str) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    if rope_type not in ("default", "llama3") or rope_type == "llama3" and architecture != "llama":
        raise _fail("config.rope_parameters.rope_type", f"{rope_type!r}: GGUF export writes default RoPE, and "
                    "Llama's llama3 scaling (rope_freqs); llama.cpp's other scaled variants are not written yet")
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
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        raise _fail("config.sliding_window", f"{config.sliding_window}: GGUF export writes Mistral models with full "
                    "attention (sliding_window None, as Mistral 7B v0.2 on and Mistral-Nemo)")


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
    if architecture == "llama":
        writer.add_rope_dimension_count(head_dim)
    if architecture == "qwen3" or head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _float_tensor(tensor: torch.Tensor) -> tuple[np.ndarray, Any, str]:
    """(array, raw GGML type or None, GGML type name) of an unquantized tensor: 1-D as F32, 2-D in its dtype."""
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


def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer) -> dict[str, int]:
    """Write the transformers causal LM `model` (Llama, Mistral, Qwen2, Qwen3; lowbit-quantized or not) and
    its `tokenizer` (byte-level or SentencePiece BPE, gguf_tokenizer.py) as the GGUF file `path`, atomically -> {GGML type: tensors
    written}. Quantized layers must be in a format a GGML type holds bit for bit (module
    docstring), else CheckpointError naming the layer before anything is written."""
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
    tensor_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.num_hidden_layers)
    tensors, _ = io.unique_tensors(model)  # a tied lm_head once: llama.cpp reuses token_embd for a missing output
    io.check_not_on_meta(tensors)
    persistent = set(model.state_dict(keep_vars=True))
    packed_fields = {f"{name}.{field}" for name, m in quantized.items() for field in m.packed.tensors}
    # (state dict key, the QuantLinear whose weight it is, or None): float tensors (a QuantLinear's
    # bias too), then the quantized weights
    entries = [(key, None) for key in tensors if key in persistent and key not in packed_fields]
    entries += [(f"{name}.weight", name) for name in quantized]
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
            writer.add_tensor(ROPE_FREQS, divisors.numpy())
            written["F32"] += 1
        for key, layer_name in tqdm(entries, desc="export GGUF", unit="tensor", disable=len(entries) < 64):
            gguf_name = tensor_names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise _fail(key, f"no GGUF tensor name for it in llama.cpp's {architecture} map")
            projection = re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", key) if architecture == "llama" else None
            layer = quantized.get(layer_name) if layer_name else None
            n = layer.out_features if layer is not None else tensors[key].shape[0]
            rows = _interleaved_rows(n, heads[projection.group(1)]) if projection else None
            if layer is not None and encodings[layer_name] is not None:
                encoding = encodings[layer_name]
                blocks = _encoded_layer(layer_name, layer, encoding, rows).numpy()
                ggml_type = gguf.GGMLQuantizationType[encoding.ggml_type]
                writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=ggml_type)
                written[encoding.ggml_type] += 1
                continue
            value = get_format(layer.format).dequantize(layer.packed) if layer is not None else tensors[key]
            value = value if rows is None else value[rows]
            array, raw_type, type_name = _float_tensor(value.to(torch.bfloat16) if layer is not None else value)
            writer.add_tensor(gguf_name, array, raw_shape=array.shape if raw_type is not None else None,
                              raw_dtype=raw_type)
            written[type_name] += 1
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
