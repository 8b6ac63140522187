"""Import of a GGUF file (llama.cpp's format): its Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 and Q2_K ...
Q6_K Linear weights become lowbit `int2` ... `int8` layers, IQ4_NL / IQ4_XS ones `iq4_nl`, MXFP4
ones `mxfp4` and NVFP4 ones `nvfp4`, with the same codes (gguf_blocks.py); every other tensor is
decoded to the model dtype.

transformers does the parts that are not about the weights' layout: the model config from the
file's metadata (`load_gguf_checkpoint`), GGUF tensor names to the model's (`get_gguf_hf_weights_map`)
and its per-architecture tensor processors (Llama's q / k rows are stored interleaved per head,
for example). A processor's effect on a quantized weight is found by running it on a probe whose
rows hold their own index: a pure row reordering is applied to the codes and scales; a weight it
changes otherwise is decoded like the other tensors. The file is read with the `gguf` package's
reader (a memory map of its header and tensor bytes): nothing in it is executed.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LowbitError
from ..formats import get_format
from ..io import build_meta_model, numbered_modules
from ..packed import PackedWeight
from .foreign_folder import fail
from .gguf_blocks import BLOCK_TYPES, BlockType, decode_blocks, lowbit_layer, reference_weights

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        with path.open("rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


def _gguf():
    """The `gguf` package (GGUF reader and GGML block decoders); LowbitError when it is absent."""
    try:
        import gguf
    except ImportError:
        raise LowbitError("reading GGUF files needs the gguf package: pip install 'lowbit[gguf]'") from None
    return gguf


def _reader(path: Path):
    try:
        return _gguf().GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, TypeError, OSError, OverflowError) as exc:
        # the reader's own checks are ValueErrors; a cut file fails inside numpy's memory map
        raise fail(str(path), f"not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]})") from None


def _quantized_linear_type(tensor) -> BlockType | None:
    """The BlockType of a 2-D GGUF tensor in a type lowbit imports, else None."""
    return BLOCK_TYPES.get(tensor.tensor_type.name) if len(tensor.shape) == 2 else None


def target_format(path: str | Path) -> str:
    """The lowbit formats the file's 2-D quantized tensors import as, e.g. "int4/int6" for Q4_K_M
    files (Q4_K and Q6_K); "none" when it has no such tensor."""
    found = {kind.lowbit_format for t in _reader(Path(path)).tensors
             if (kind := _quantized_linear_type(t)) is not None and not t.name.startswith("token_embd")}
    return "/".join(sorted(found)) or "none"


def write_tokenizer(path: str | Path, folder: Path) -> dict[str, Path]:
    """Save the tokenizer a GGUF file holds (transformers builds it from the file's tokenizer.ggml.*
    metadata, as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does) into `folder` ->
    {file name: path} of what it wrote; {} with a warning when the file has none transformers can
    build (the weights convert all the same)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(str(folder))
    except Exception as exc:  # no tokenizer.ggml.* fields, a tokenizer model transformers lacks, damaged metadata
        warnings.warn(f"{path}: no tokenizer written: transformers cannot build one from the file "
                      f"({type(exc).__name__}: {str(exc)[:160]})", stacklevel=2)
        return {}
    return {file.name: file for file in sorted(folder.iterdir()) if file.is_file()}


def _architecture(path: Path, reader):
    """(transformers' parsed GGUF metadata, its tensor processor, the causal LM class to build)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, load_gguf_checkpoint
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except Exception as exc:  # transformers' ValueError for unsupported architectures, numpy errors for bad fields
        raise fail(str(path), f"transformers cannot read its metadata ({type(exc).__name__}: {str(exc)[:160]})") from None
    config = parsed["config"]
    model_type = config.get("model_type")
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]
    except (KeyError, TypeError):  # TypeError: a list or object where a name belongs
        raise fail(str(path), f"model_type {model_type!r}: lowbit imports GGUF files of causal language models "
                   "that transformers builds from GGUF") from None
    gguf_architecture = _field(reader, "general.architecture")
    processor = TENSOR_PROCESSORS.get(gguf_architecture, TensorProcessor)(config=config)
    return config, processor, cls


def _check_block_count(path: Path, reader, config: dict) -> None:
    """CheckpointError unless the file holds tensors for exactly the blocks its metadata counts: a
    count damaged upwards would have transformers build (millions of) layers that have no weights,
    one damaged downwards would drop the last blocks' tensors without a word."""
    layers, held = config.get("num_hidden_layers"), numbered_modules(t.name for t in reader.tensors)
    if layers != held:
        raise fail(str(path), f"block_count {layers!r} in its metadata, but it holds tensors for {held} blocks")


def _field(reader, key: str):
    from transformers.modeling_gguf_pytorch_utils import read_field

    values = read_field(reader, key)
    return values[0] if values else None


def _row_order(processor, name: str, shape: tuple[int, int], context: dict) -> torch.Tensor | None:
    """The rows [N] transformers' processor puts in row i of the weight `name` [N, K] (it is run
    on a probe whose every row holds its index), or None when it does anything but reorder rows."""
    n, k = shape
    probe = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None], (n, k))
    try:
        out = np.asarray(processor.process(weights=probe, name=name, **context).weights)
    except Exception:  # a processor written for whole weights (reshapes by config sizes): not a row order
        return None
    if out.shape != (n, k) or not (out == out[:, :1]).all():
        return None
    order = torch.from_numpy(np.array(out[:, 0])).long()
    return order if torch.equal(order.sort().values, torch.arange(n)) else None


def _layer(path: Path, tensor, kind: BlockType, order: torch.Tensor, dtype: torch.dtype
           ) -> tuple[PackedWeight, float]:
    """The lowbit layer of a quantized GGUF weight with rows in `order` -> (layer, its largest
    difference from llama.cpp's weights relative to its largest |weight|; 0 for exact types)."""
    data = torch.from_numpy(np.array(tensor.data))[order]
    codes, a, c = decode_blocks(kind, data)
    try:
        layer = lowbit_layer(kind, codes, a, c, dtype)
    except ValueError as exc:
        raise fail(f"{path}: {tensor.name}", f"{kind.name} blocks lowbit cannot hold: {exc}") from None
    if kind.exact:
        return layer, 0.0
    # lowbit's weights by its own spec, in float32 (the layer's dtype would add its rounding)
    decoded = get_format(layer.format).dequantize(PackedWeight(layer.format, layer.shape, torch.float32, layer.attrs,
                                                               layer.tensors))
    reference = reference_weights(kind, codes, a, c)
    return layer, float((decoded - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _dense(path: Path, tensor, processor, context: dict, dtype: torch.dtype) -> tuple[str, torch.Tensor]:
    """(name after transformers' processor, the tensor decoded by the gguf package in `dtype`), as
    transformers' GGUF loading reads it."""
    gguf = _gguf()
    try:
        weights = gguf.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise fail(f"{path}: {tensor.name}", f"GGML type {tensor.tensor_type.name}: {exc}") from None
    try:
        result = processor.process(weights=weights, name=tensor.name, **context)
    except Exception as exc:  # e.g. Llama's head interleaving by head counts that do not divide the rows
        raise fail(f"{path}: {tensor.name}", f"transformers' GGUF processor cannot read it "
                   f"({type(exc).__name__}: {str(exc)[:120]})") from None
    value = torch.from_numpy(np.array(result.weights))
    return result.name, value.to(dtype) if value.is_floating_point() else value


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, model: nn.Module | None = None,
              device: str | torch.device = "cpu") -> nn.Module:
    """Read a GGUF file -> the transformers causal LM it describes, whose Linear weights stored
    as Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K / Q3_K / Q4_K / Q5_K / Q6_K are lowbit int2 ... int8
    QuantLinears of output dtype `dtype` (groups of 32, or 16 for Q2_K / Q3_K / Q6_K; same codes;
    scales and mins rounded to float16 except Q4_0 / Q5_0 / Q8_0's), IQ4_NL / IQ4_XS ones iq4_nl
    (IQ4_XS's scales rounded to float16), MXFP4 ones mxfp4 and NVFP4 ones nvfp4; every other tensor
    decoded to `dtype` (quantized Linear weights of other types too, with a warning). model:
    optional skeleton to fill. CheckpointError naming the file or tensor for anything it cannot
    import."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from .foreign_folder import model_with_layers

    path = Path(path)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise LowbitError(f"load_gguf(dtype=) must be torch.bfloat16, float16 or float32, got {dtype!r}")
    reader = _reader(path)
    config, processor, cls = _architecture(path, reader)
    _check_block_count(path, reader, config)
    skeleton_model = (build_meta_model(path, cls, config, "<GGUF metadata>", [t.name for t in reader.tensors])
                      if model is None else model)
    try:
        names = get_gguf_hf_weights_map(skeleton_model, processor)
    except (AttributeError, NotImplementedError) as exc:  # a model= without a transformers config; a model_type gguf lacks
        raise fail(str(path), f"transformers cannot map its tensor names to the model's ({exc})") from None
    context = {"tensor_key_mapping": names, "parsed_parameters": {"config": config, "tensors": {}}}
    linears = {name for name, module in skeleton_model.named_modules() if isinstance(module, nn.Linear)}
    packed, dense, kept_dense, errors = {}, {}, Counter(), {}
    for tensor in tqdm(reader.tensors, desc="import GGUF", unit="tensor", disable=len(reader.tensors) < 16):
        hf_name = names.get(tensor.name, "")
        layer = hf_name.removesuffix(".weight")
        kind = _quantized_linear_type(tensor)
        if len(tensor.shape) > 2:  # transformers' MoE processors merge these into the model themselves
            raise fail(f"{path}: {tensor.name}", f"a tensor of {len(tensor.shape)} dimensions (fused MoE experts): "
                       "lowbit does not import GGUF experts yet")
        if layer in linears and hf_name.endswith(".weight"):
            shape = (int(tensor.shape[1]), int(tensor.shape[0]))  # GGUF lists dimensions innermost first
            order = _row_order(processor, tensor.name, shape, context) if kind is not None else None
            if order is not None:
                packed[layer], errors[layer] = _layer(path, tensor, kind, order, dtype)
                continue
            if tensor.tensor_type.name not in ("F32", "F16", "BF16"):
                kept_dense[tensor.tensor_type.name + ("" if kind is None else " changed by transformers")] += 1
        name, value = _dense(path, tensor, processor, context, dtype)
        if name in names:
            dense[names[name]] = value
    if not packed:
        raise fail(str(path), f"no Linear weight in a type lowbit imports ({', '.join(BLOCK_TYPES)}); transformers' "
                   "from_pretrained(..., gguf_file=...) loads it dequantized")
    if kept_dense:
        warnings.warn(f"{path}: {sum(kept_dense.values())} quantized Linear weights kept as {dtype} "
                      f"({dict(kept_dense)}): lowbit has no layout for them", stacklevel=2)
    inexact = {name: error for name, error in errors.items() if error}
    if inexact:
        worst = max(inexact, key=inexact.get)
        logger.info("%s: %d layers' scales and mins rounded to float16; largest difference from llama.cpp's "
                    "weights %.3g of the layer's largest weight (%s)", path, len(inexact), inexact[worst], worst)
    return model_with_layers(path, skeleton_model, dense, set(), packed, model).to(device).eval()
