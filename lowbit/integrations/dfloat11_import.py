"""Import a folder written by the `dfloat11` package (its compress_model / DFloat11Model layout).

The folder holds config.json with a `dfloat11_config` object ({version, threads_per_block,
bytes_per_thread, pattern_dict}), normally beside the Hugging Face model config, and
safetensors files with the plain tensors plus, for each compressed module M:
  M.luts              uint8 [T+1, 256]  T chained 256-entry byte tables (an entry >= 240 points
                                        to table 256-entry) and a last row of code lengths
  M.encoded_exponent  uint8 [B]         the Huffman-coded exponent bytes, MSB first
  M.sign_mantissa     uint8 [E]         sign|mantissa bytes, raw
  M.output_positions  uint8 [4(G+1)]    uint32 index of the first weight decoded by each GPU
                                        thread block of threads_per_block threads
  M.gaps              uint8             5-bit big-endian start offset of each thread's first code
                                        in its bytes_per_thread-byte chunk
  M.split_positions   int64             where the concatenated weights of M's Linear layers split
M is a Linear (or Embedding) itself, or a block whose pattern_dict entry lists its Linear
sub-paths. The package decodes on the GPU with a prebuilt PTX; here the same stream is
decoded on the CPU, vectorized over threads, bit for bit, and the weights are re-encoded as
lowbit `dfloat11` layers (Embeddings stay plain bf16). Nothing from the folder is executed:
JSON and safetensors only, model classes looked up by name in transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import regex
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..formats.dfloat11 import join_bf16
from ..linear import linear_shape
from .foreign_folder import fail as _fail
from .foreign_folder import (filled_model, folder_pattern, pattern_matches, read_config, read_tensors, skeleton,
                             state_shapes)

DF11_FIELDS = ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps", "split_positions")
#: byte-table entries at or above this point to another table (the package's convention)
POINTER_BASE = 240


def is_dfloat11_folder(path: str | Path) -> bool:
    """True when `path` has a config.json with a `dfloat11_config` object."""
    try:
        return isinstance(read_config(Path(path)).get("dfloat11_config"), dict)
    except CheckpointError:  # no config.json, or not a JSON object
        return False


def decode_stream(fields: dict[str, torch.Tensor], bytes_per_thread: int, threads_per_block: int,
                  where: str = "dfloat11") -> torch.Tensor:
    """The package's encoded exponents + sign|mantissa bytes -> bf16 [E], bit-exact.

    Thread t owns stream bits [t*C, (t+1)*C), C = 8*bytes_per_thread, and decodes every code
    that starts there, from bit t*C + gap[t]; the threads' outputs follow each other in
    order. Every step below decodes one code of every thread at once."""
    luts = fields["luts"]
    if (luts.dtype != torch.uint8 or luts.dim() != 2 or luts.shape[1] != 256
            or not 2 <= luts.shape[0] <= 256 - POINTER_BASE + 1):
        raise _fail(f"{where}.luts", f"expected uint8 [T+1, 256] with 1 <= T <= 16, got {luts.dtype} {list(luts.shape)}")
    for name in ("encoded_exponent", "sign_mantissa", "gaps", "output_positions"):
        if fields[name].dim() != 1 or fields[name].dtype != torch.uint8:
            raise _fail(f"{where}.{name}", f"expected a 1-D uint8 tensor, got {fields[name].dtype} {list(fields[name].shape)}")
    luts, stream, sign_mantissa = luts.numpy(), fields["encoded_exponent"].numpy(), fields["sign_mantissa"]
    n_elements, chunk_bits = sign_mantissa.numel(), 8 * bytes_per_thread
    n_threads = -(-stream.size // bytes_per_thread)
    gap_bits = np.unpackbits(fields["gaps"].numpy())
    if gap_bits.size < 5 * n_threads:
        raise _fail(f"{where}.gaps", f"{gap_bits.size // 5} gaps for {n_threads} threads")
    gaps = gap_bits[: 5 * n_threads].reshape(-1, 5).astype(np.int64) @ (1 << np.arange(4, -1, -1))
    padded = np.concatenate([stream, np.zeros(8, np.uint8)]).astype(np.int64)
    tables, lengths = luts[:-1].astype(np.int64), luts[-1].astype(np.int64)
    if (256 - tables[tables >= POINTER_BASE] >= len(tables)).any():
        raise _fail(f"{where}.luts", f"an entry points past the last of its {len(tables)} tables")
    thread_end = (np.arange(n_threads, dtype=np.int64) + 1) * chunk_bits
    position = thread_end - chunk_bits + gaps
    symbols, decoded = [], []
    for _ in range(chunk_bits + 1):
        active = position < np.minimum(thread_end, 8 * stream.size)
        if not active.any():
            break
        byte = np.minimum(position >> 3, stream.size)
        window = (padded[byte] << 32) | (padded[byte + 1] << 24) | (padded[byte + 2] << 16) | (padded[byte + 3] << 8) | padded[byte + 4]
        peek = (window >> (8 - (position & 7))) & 0xFFFFFFFF  # the next 32 stream bits
        symbol = tables[0, peek >> 24]
        for level in range(1, 4):  # codes of up to 32 bits: at most three table hops
            hop = symbol >= POINTER_BASE
            symbol = np.where(hop, tables[np.where(hop, 256 - symbol, 0), (peek >> (24 - 8 * level)) & 0xFF], symbol)
        length = lengths[symbol]
        if (active & ((length == 0) | (symbol >= POINTER_BASE))).any():
            raise _fail(f"{where}.luts", "the tables do not decode the stream (zero-length or dangling code)")
        symbols.append(symbol.astype(np.uint8))
        decoded.append(active)
        position = np.where(active, position + length, position)
    else:
        raise _fail(f"{where}.encoded_exponent", "a thread decodes more codes than its chunk holds")
    if not decoded:  # no thread starts a code (an empty stream, or every gap past its chunk)
        raise _fail(f"{where}.encoded_exponent", f"decodes to 0 weights, sign_mantissa has {n_elements}")
    decoded_matrix = np.stack(decoded, axis=1)  # [threads, steps], thread-major like the outputs
    exponent = np.stack(symbols, axis=1)[decoded_matrix]
    if exponent.size < n_elements:
        raise _fail(f"{where}.encoded_exponent", f"decodes to {exponent.size} weights, sign_mantissa has {n_elements}")
    _check_output_positions(fields["output_positions"], decoded_matrix.sum(axis=1), threads_per_block, n_elements, where)
    return join_bf16(torch.from_numpy(exponent[:n_elements].astype(np.int64)), sign_mantissa)


def _check_output_positions(raw: torch.Tensor, per_thread: np.ndarray, threads_per_block: int, n_elements: int,
                            where: str) -> None:
    """The stored first-weight index of every thread block must match the decoded counts."""
    if raw.numel() % 4:
        raise _fail(f"{where}.output_positions", f"{raw.numel()} bytes is not a whole number of uint32")
    stored = raw.numpy().view(np.uint32).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(per_thread)])[::threads_per_block]
    blocks = -(-per_thread.size // threads_per_block)
    expected = np.minimum(starts[:blocks], n_elements)
    if stored.size < blocks + 1 or not np.array_equal(stored[:blocks], expected) or stored[blocks] != n_elements:
        raise _fail(f"{where}.output_positions", "does not match the decoded stream (damaged file?)")


def _read_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any], list[tuple[regex.Pattern, list[str]]]]:
    """(config.json, its dfloat11_config checked, pattern_dict as [(compiled regex, sub-module paths)])."""
    path = folder / "config.json"
    config = read_config(folder)
    df11 = config.get("dfloat11_config")
    if not isinstance(df11, dict):
        raise _fail(f"{path}: dfloat11_config", "missing or not an object")
    tpb, bpt, patterns = df11.get("threads_per_block"), df11.get("bytes_per_thread"), df11.get("pattern_dict")
    if not (isinstance(tpb, list) and len(tpb) == 1 and _is_int(tpb[0]) and tpb[0] > 0):
        raise _fail(f"{path}: dfloat11_config.threads_per_block", f"expected [positive int], got {tpb!r}")
    if not (_is_int(bpt) and 1 <= bpt <= 64):
        raise _fail(f"{path}: dfloat11_config.bytes_per_thread", f"expected an int in [1, 64], got {bpt!r}")
    if not (isinstance(patterns, dict) and all(isinstance(v, list) and all(isinstance(a, str) for a in v)
                                               for v in patterns.values())):
        raise _fail(f"{path}: dfloat11_config.pattern_dict", "expected {regex: [sub-module paths]}")
    where = f"{path}: dfloat11_config.pattern_dict"
    return config, df11, [(folder_pattern(pattern, where), attrs) for pattern, attrs in patterns.items()]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_dfloat11(path: str | Path, *, model: nn.Module | None = None, device: str | torch.device = "cpu",
                  segment: int | None = None) -> nn.Module:
    """Read a `dfloat11` package folder -> model whose compressed Linear layers are lowbit
    `dfloat11` QuantLinears holding bit-identical weights (other modules plain bf16).

    model: optional bf16 skeleton to fill (needed when config.json has no model config).
    segment: the re-encoded layers' segment length (None: each weight's `default_segment`).
    The whole bf16 model is materialized once before re-encoding. Every problem with the
    folder raises CheckpointError naming the file or tensor."""
    from ..api import quantize

    folder = Path(path)
    config, df11, patterns = _read_config(folder)
    skeleton_model = skeleton(folder, config, "dfloat11_config") if model is None else model
    shapes = state_shapes(skeleton_model)
    tensors = read_tensors(folder)
    compressed = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".encoded_exponent")})
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in DF11_FIELDS}
    decoded = []
    for module in tqdm(compressed, desc="decode dfloat11", unit="module", disable=len(compressed) < 4):
        missing = [f for f in DF11_FIELDS if f"{module}.{f}" not in tensors]
        if missing:
            raise _fail(str(folder), f"module {module!r} lacks {missing}")
        fields = {f: tensors[f"{module}.{f}"] for f in DF11_FIELDS}
        flat = decode_stream(fields, df11["bytes_per_thread"], df11["threads_per_block"][0], where=module)
        targets = _targets(module, patterns, f"{folder / 'config.json'}: dfloat11_config.pattern_dict")
        splits = fields["split_positions"]
        if splits.dim() != 1 or splits.dtype not in (torch.int32, torch.int64):
            raise _fail(f"{module}.split_positions", f"expected a 1-D integer tensor, got {splits.dtype} "
                        f"{list(splits.shape)}")
        splits = splits.tolist()
        if len(splits) != len(targets) - 1:
            raise _fail(f"{module}.split_positions", f"{len(splits) + 1} weights for {len(targets)} targets {targets}")
        for target, weight in zip(targets, torch.tensor_split(flat, splits)):
            key = f"{target}.weight"
            if key not in shapes or shapes[key].numel() != weight.numel():
                raise _fail(f"{module}", f"decodes {weight.numel()} weights for {key!r}, which the model "
                            f"{'lacks' if key not in shapes else f'holds as {list(shapes[key])}'}")
            state[key] = weight.reshape(shapes[key])
            decoded.append(target)
    model = filled_model(folder, skeleton_model, state, model, torch.bfloat16)
    for name in decoded:
        weight = model.get_submodule(name).weight
        if not torch.equal(weight.view(torch.int16), state[f"{name}.weight"].view(torch.int16)):
            raise _fail(f"{name}.weight", f"the model holds {weight.dtype} weights, not the decoded bf16 ones")
    linears = {n for n in decoded if linear_shape(model.get_submodule(n))}
    skip = [n for n, m in model.named_modules() if linear_shape(m) and n not in linears]
    options = {} if segment is None else {"segment": segment}  # None: each weight's default_segment
    quantize(model, "dfloat11", **options, skip=skip, progress=len(linears) > 8)
    return model.to(device).eval()


def _targets(module: str, patterns: list[tuple[regex.Pattern, list[str]]], where: str) -> list[str]:
    """The weights a compressed module holds, in the order they were concatenated."""
    for pattern, attrs in patterns:
        if pattern_matches(pattern, module, where, full=True):
            return [f"{module}.{a}" for a in attrs] if attrs else [module]
    return [module]
