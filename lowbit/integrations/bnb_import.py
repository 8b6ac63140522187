"""Import a folder of a bitsandbytes model: transformers' save_pretrained of a model loaded with
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" or "fp4") (e.g. the Hub's
"-bnb-4bit" checkpoints) or BitsAndBytesConfig(load_in_8bit=True) (LLM.int8).

config.json holds quantization_config {"quant_method": "bitsandbytes", ...}; for each 4-bit
Linear M the safetensors files hold:
  M.weight                         uint8 [N*K/2, 1]  the codes of the row-major [N, K] weight,
                                                     two per byte, the first in the high nibble
                                                     (another quant_storage dtype: the same bytes)
  M.weight.absmax                  float32 [N*K/64]  one scale per 64 consecutive weights, or
                                   uint8 [N*K/64]    with double quantization, where
  M.weight.nested_absmax           float32           absmax = nested_quant_map[absmax_u8]
  M.weight.nested_quant_map        float32 [256]              * nested_absmax[i // nested_blocksize]
                                                              + nested_offset
  M.weight.quant_map               float32 [16]      the code values (NF4's or FP4's)
  M.weight.quant_state.bitsandbytes__nf4   uint8     JSON: quant_type, blocksize, dtype, shape,
  (or ...bitsandbytes__fp4)                          nested_blocksize, nested_offset
With K a multiple of 64, bitsandbytes' blocks are lowbit's codebook blocks along K: each layer
becomes a lowbit `nf4` (NF4) or `bnb_fp4` (FP4) layer with the same codes and the fp32 absmax
bitsandbytes multiplies with (its double quantization undone in its own fp32 arithmetic), so the
dequantized weight is bitsandbytes' bit for bit.

For each 8-bit Linear M:
  M.weight         int8 [N, K]   codes q in [-127, 127]; bitsandbytes dequantizes q * SCB / 127
  M.SCB            float32 [N]   each row's absmax
  M.weight_format  uint8 []      the layout: 0 (row-major), the only one bitsandbytes saves
Each becomes a lowbit `int8` layer, symmetric with one group per row (group_size=-1): the same
codes, and the row scale SCB / 127 rounded to float16, lowbit's scale dtype (relative change at
most 2^-11). lowbit's layer is weight-only: it does not quantize activations or split off
outlier columns the way bitsandbytes' int8 matmul does.

Refused with a CheckpointError naming the file, tensor or field: other block sizes, K not a
multiple of 64 (4-bit), a code table other than the quant type's, damaged tensors. The other tensors
keep their stored values; the quantized layers' float weights are never allocated (foreign_folder.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import bitpack, get_format
from ..formats.division import divide
from ..formats.integer import SCALE_DTYPE, padded_k
from ..formats.nf4 import BLOCK
from ..packed import PackedWeight
from .foreign_folder import (DTYPES, config_dtype, fail, has_quant_method, integer_layer, is_name_in, model_with_layers,
                             read_config, read_tensors, skeleton, stored_tensor, weight_matrix)

QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__"
#: bitsandbytes' 4-bit quant_type -> the lowbit format its layers become
FOUR_BIT_FORMATS = {"nf4": "nf4", "fp4": "bnb_fp4"}


def is_bitsandbytes_folder(path: str | Path) -> bool:
    """True when `path` has a config.json whose quantization_config says quant_method "bitsandbytes"."""
    return has_quant_method(path, "bitsandbytes")


def _quant_kind(folder: Path, config: dict[str, Any]) -> str:
    """What the folder's quantized layers are: "8bit", or the 4-bit quant_type "nf4" / "fp4"."""
    quantization = config["quantization_config"]
    where = f"{folder / 'config.json'}: quantization_config"
    if quantization.get("load_in_8bit"):
        return "8bit"
    quant_type = quantization.get("bnb_4bit_quant_type", "nf4")
    if not is_name_in(quant_type, FOUR_BIT_FORMATS):
        raise fail(f"{where}.bnb_4bit_quant_type", f"{quant_type!r}: expected one of {sorted(FOUR_BIT_FORMATS)}")
    return quant_type


def target_format(path: str | Path) -> str:
    """The lowbit format a bitsandbytes folder's quantized layers import as: "nf4", "bnb_fp4" or
    "int8"; CheckpointError for a folder lowbit cannot import."""
    folder = Path(path)
    kind = _quant_kind(folder, read_config(folder))
    return "int8" if kind == "8bit" else FOUR_BIT_FORMATS[kind]


def _quant_state(key: str, raw: torch.Tensor, quant_type: str) -> dict[str, Any]:
    """The JSON a `...quant_state.bitsandbytes__<quant_type>` tensor holds, checked."""
    try:
        state = json.loads(bytes(raw.flatten().to(torch.uint8).tolist()))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(key, f"not a JSON quant state ({exc})") from None
    if not isinstance(state, dict):
        raise fail(key, "not a JSON object")
    if state.get("quant_type") != quant_type:
        raise fail(f"{key}: quant_type", f"{state.get('quant_type')!r}, expected {quant_type!r} as the tensor's name "
                   "and the folder's config say")
    if state.get("blocksize") != BLOCK:
        raise fail(f"{key}: blocksize", f"{state.get('blocksize')!r}: lowbit's codebook formats take blocks of {BLOCK}")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise fail(f"{key}: shape", f"expected [out_features, in_features], got {shape!r}")
    if shape[1] % BLOCK:
        raise fail(f"{key}: shape", f"in_features {shape[1]} is not a multiple of {BLOCK}: bitsandbytes' blocks "
                   "then run across rows, which lowbit's blocks (along K) cannot hold")
    if not is_name_in(state.get("dtype"), DTYPES):
        raise fail(f"{key}: dtype", f"expected one of {sorted(DTYPES)}, got {state.get('dtype')!r}")
    return state


def _field(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    return stored_tensor(tensors, key, (dtype,), numel=numel).flatten()


def _block_absmax(tensors: dict[str, torch.Tensor], weight_key: str, state_key: str, state: dict[str, Any],
                  blocks: int) -> torch.Tensor:
    """The fp32 scale of each block of 64, as bitsandbytes multiplies with it."""
    stored = tensors.get(f"{weight_key}.absmax")
    if stored is not None and stored.dtype == torch.float32:
        return _field(tensors, f"{weight_key}.absmax", torch.float32, blocks)
    absmax_q = _field(tensors, f"{weight_key}.absmax", torch.uint8, blocks).long()
    nested_map = _field(tensors, f"{weight_key}.nested_quant_map", torch.float32, 256)
    nested_block = state.get("nested_blocksize")
    offset = state.get("nested_offset")
    if not (isinstance(nested_block, int) and not isinstance(nested_block, bool) and nested_block > 0
            and isinstance(offset, (int, float)) and not isinstance(offset, bool) and abs(offset) < 3e38):
        raise fail(state_key, "double quantization without an int nested_blocksize "
                   "and a number nested_offset (finite in float32)")
    nested_absmax = _field(tensors, f"{weight_key}.nested_absmax", torch.float32, -(-blocks // nested_block))
    # bitsandbytes: code[q] * absmax[block] in fp32, then += offset (an fp32 scalar)
    scales = nested_map[absmax_q] * nested_absmax[torch.arange(blocks) // nested_block]
    return scales + torch.tensor(offset, dtype=torch.float32)


def packed_4bit(tensors: dict[str, torch.Tensor], weight_key: str, quant_type: str = "nf4") -> PackedWeight:
    """The bitsandbytes 4-bit layer of `quant_type` ("nf4" or "fp4") stored under `weight_key`
    (e.g. "model.layers.0.mlp.down_proj.weight") as a lowbit `nf4` / `bnb_fp4` PackedWeight with
    the same codes and block scales."""
    fmt = get_format(FOUR_BIT_FORMATS[quant_type])
    state_key = f"{weight_key}{QUANT_STATE_SUFFIX}{quant_type}"
    state = _quant_state(state_key, tensors[state_key], quant_type)
    n, k = state["shape"]
    blocks = n * k // BLOCK
    quant_map = _field(tensors, f"{weight_key}.quant_map", torch.float32, 16)
    # bit for bit (a -0 for a +0 would still decode the same; bitsandbytes writes neither otherwise)
    if not torch.equal(quant_map.view(torch.int32), fmt.codebook().view(torch.int32)):
        raise fail(f"{weight_key}.quant_map", f"is not bitsandbytes' {quant_type.upper()} code table")
    raw = tensors.get(weight_key)
    if raw is None:
        raise fail(weight_key, "missing")
    code_bytes = raw.contiguous().view(torch.uint8).flatten()  # any quant_storage dtype holds the same bytes
    if code_bytes.numel() != n * k // 2:
        raise fail(weight_key, f"{code_bytes.numel()} bytes of codes for a [{n}, {k}] weight (expected {n * k // 2})")
    codes = torch.stack([code_bytes >> 4, code_bytes & 15], dim=1).reshape(n, k).to(torch.int32)
    absmax = _block_absmax(tensors, weight_key, state_key, state, blocks).reshape(n, k // BLOCK)
    return PackedWeight(fmt.name, (n, k), DTYPES[state["dtype"]], {"double_quant": False},
                        {"qweight": bitpack.pack(codes, 4), "absmax": absmax.t().contiguous()})


def packed_int8_rows(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> PackedWeight:
    """The bitsandbytes 8-bit layer `name` (e.g. "model.layers.0.mlp.down_proj": tensors
    name.weight, name.SCB, name.weight_format) as a lowbit `int8` PackedWeight of `dtype`:
    symmetric, one group per row, the same codes, float16 row scales SCB / 127."""
    weight_key, scb_key, format_key = f"{name}.weight", f"{name}.SCB", f"{name}.weight_format"
    layout = tensors.get(format_key)
    if layout is not None and (layout.numel() != 1 or int(layout.flatten()[0]) != 0):
        raise fail(format_key, f"{layout.flatten().tolist()}: only the row-major layout (0) is imported")
    codes = weight_matrix(tensors, name, torch.int8)
    if bool((codes == -128).any()):
        raise fail(weight_key, "holds -128: bitsandbytes' row-wise codes lie in [-127, 127]")
    n, k = codes.shape
    absmax = _field(tensors, scb_key, torch.float32, n)
    if not bool((torch.isfinite(absmax) & (absmax >= 0)).all()):
        raise fail(scb_key, "row absmax values must be finite and >= 0")
    # bitsandbytes multiplies q * SCB by fp32 1/127; lowbit keeps the row scale SCB / 127 in float16
    scales = divide(absmax, 127).to(SCALE_DTYPE)
    if not bool(torch.isfinite(scales).all()):
        raise fail(scb_key, f"row absmax up to {float(absmax.max()):.3g}: too large for float16 row scales")
    # lowbit's group_size=-1: one group per row, K padded to a multiple of 32
    return integer_layer(codes.to(torch.int32) + 128, 8, padded_k(k, 32), scales.reshape(n, 1), None, dtype)


def _four_bit_layers(folder: Path, tensors: dict[str, torch.Tensor], quant_type: str) -> dict[str, PackedWeight]:
    for key in tensors:
        if QUANT_STATE_SUFFIX in key and not key.endswith(f"{QUANT_STATE_SUFFIX}{quant_type}"):
            raise fail(key, f"a layer of another quant type in a folder whose config says {quant_type!r}")
    suffix = f".weight{QUANT_STATE_SUFFIX}{quant_type}"
    names = sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))
    return {name: packed_4bit(tensors, f"{name}.weight", quant_type)
            for name in _progress(folder, names, f"4-bit {quant_type.upper()}", suffix)}


def _int8_layers(folder: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, PackedWeight]:
    names = sorted(k[: -len(".SCB")] for k in tensors if k.endswith(".SCB"))
    return {name: packed_int8_rows(tensors, name, dtype) for name in _progress(folder, names, "8-bit", ".SCB")}


def _progress(folder: Path, names: list[str], kind: str, suffix: str):
    """`names` with a progress bar; CheckpointError naming the folder when there are none."""
    if not names:
        raise fail(str(folder), f"no {kind} layers (no *{suffix} tensors)")
    return tqdm(names, desc="import bitsandbytes", unit="layer", disable=len(names) < 8)


_FOUR_BIT_FIELDS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
_LAYER_FIELDS = {**{quant_type: _FOUR_BIT_FIELDS + (f"weight{QUANT_STATE_SUFFIX}{quant_type}",)
                    for quant_type in FOUR_BIT_FORMATS},
                 "8bit": ("weight", "SCB", "weight_format")}


def load_bitsandbytes(path: str | Path, *, model: nn.Module | None = None,
                      device: str | torch.device = "cpu") -> nn.Module:
    """Read a bitsandbytes folder -> model whose quantized Linear layers are lowbit QuantLinears:
    `nf4` / `bnb_fp4` ones from 4-bit NF4 / FP4 layers (bitsandbytes' codes and scales:
    dequantized weights bit-identical), `int8` ones from 8-bit layers (the same codes, float16 row scales); the other
    modules keep their stored tensors. model: optional skeleton to fill (needed when config.json
    names no transformers class). CheckpointError naming the file, tensor or field for anything
    it cannot import."""
    folder = Path(path)
    config = read_config(folder)
    if not is_bitsandbytes_folder(folder):
        raise fail(str(folder / "config.json"), "no quantization_config with quant_method 'bitsandbytes'")
    kind = _quant_kind(folder, config)
    skeleton_model = skeleton(folder, config, "quantization_config") if model is None else model
    tensors = read_tensors(folder)
    if kind == "8bit":
        packed = _int8_layers(folder, tensors, config_dtype(folder, config, "the 8-bit layers' output dtype"))
    else:
        packed = _four_bit_layers(folder, tensors, kind)
    layer_fields = {f"{name}.{field}" for name in packed for field in _LAYER_FIELDS[kind]}
    return model_with_layers(folder, skeleton_model, tensors, layer_fields, packed, model).to(device).eval()
