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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError, LowbitError
from ..formats import get_format
from ..io import build_meta_model, numbered_modules
from ..packed import PackedWeight
from .checkpoint_keys import ExpertSlice
from . import gguf_gpt_oss, gguf_mixtral
from .foreign_folder import fail, stacked_rows
from .gguf_blocks import BLOCK_TYPES, BlockType, decode_blocks, lowbit_layer, reference_weights
from .gguf_rope import LONGROPE_FACTORS, ROPE_FREQS, head_dim, llama3_parameters, longrope_parameters
from .gguf_split_experts import stack_split_experts

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
#: tensors llama.cpp stores that transformers computes from the config (Llama 3's and Phi-3's RoPE
#: scaling, which `_with_rope_scaling` reads into the config)
_DERIVED = (ROPE_FREQS, *LONGROPE_FACTORS)
#: metadata transformers' GGUF reader does not read, per model type: {key after "<architecture>.":
#: (config key, whether the file must hold it)}. Without them a Qwen3-MoE file whose experts are
#: not 768 wide (Qwen3-235B-A22B's are 1536) does not load, nor a Qwen3 file whose heads are not
#: 128 wide, a Mixtral file has no experts, and a GPT-OSS file (whose config gguf_gpt_oss reads)
#: keeps the class's head_dim and sliding window.
_UNREAD_FIELDS = {"qwen3": {"attention.key_length": ("head_dim", False)},
                  "qwen3_moe": {"expert_feed_forward_length": ("moe_intermediate_size", False)},
                  "qwen2_moe": {"expert_feed_forward_length": ("moe_intermediate_size", False),
                                "expert_shared_feed_forward_length": ("shared_expert_intermediate_size", False)},
                  "mixtral": {"expert_count": ("num_local_experts", True),
                              "expert_used_count": ("num_experts_per_tok", True)},
                  "gpt_oss": {"attention.key_length": ("head_dim", False),
                              "attention.sliding_window": ("sliding_window", False)}}


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


def _quantized_weight_type(tensor) -> BlockType | None:
    """The BlockType of a 2-D GGUF tensor (or 3-D: MoE experts) in a type lowbit imports, else None."""
    return BLOCK_TYPES.get(tensor.tensor_type.name) if len(tensor.shape) in (2, 3) else None


def target_format(path: str | Path) -> str:
    """The lowbit formats the file's 2-D and expert (3-D) quantized tensors import as, e.g.
    "int4/int6" for Q4_K_M files (Q4_K and Q6_K); "none" when it has no such tensor."""
    return "/".join(sorted({row["format"] for row in tensor_table(path)[1] if row["format"]})) or "none"


def tensor_table(path: str | Path) -> tuple[str | None, list[dict]]:
    """(the file's general.architecture, one row per tensor in file order): {"name", "type" (GGML),
    "shape" (torch order, [N, K] for a Linear's weight; [E, N, K] for experts), "bytes",
    "weights", "format", "imports_as"}: the lowbit format a Linear / expert weight of that type
    imports as (None: decoded dense, as are float types, types lowbit has no layout for and the
    token embedding) and its label, e.g. "int4 g32" ("exact" when lowbit holds its weights bit for
    bit), "dense", "dense (IQ2_XXS)". Which tensors are Linears is the architecture's to say when
    the file loads."""
    path = Path(path)
    reader = _reader(path)
    rows = []
    for tensor in reader.tensors:
        embedding, ggml = tensor.name.startswith("token_embd"), tensor.tensor_type.name
        kind = None if embedding else _quantized_weight_type(tensor)
        if kind is not None:
            imports_as = f"{kind.lowbit_format} g{kind.group_size}" + (" exact" if kind.exact else "")
        elif embedding or ggml in ("F32", "F16", "BF16"):
            imports_as = "dense"
        else:
            imports_as = f"dense ({ggml})"
        rows.append({"name": tensor.name, "type": ggml, "shape": [int(d) for d in reversed(tensor.shape)],
                     "bytes": int(tensor.n_bytes), "weights": int(tensor.n_elements),
                     "format": None if kind is None else kind.lowbit_format, "imports_as": imports_as})
    return _field(path, reader, "general.architecture"), rows


def write_tokenizer(path: str | Path, folder: Path) -> dict[str, Path]:
    """Save the tokenizer a GGUF file holds (transformers builds it from the file's tokenizer.ggml.*
    metadata, as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does) into `folder` ->
    {file name: path} of what it wrote; {} with a warning when the file has none transformers can
    build (the weights convert all the same)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    try:
        # AutoTokenizer reads the model config from the file first, to pick the tokenizer class, with
        # the reader that fails on GPT-OSS files; the class it would pick for gpt_oss, which has none
        # of its own, is the generic one, and that builds the tokenizer from tokenizer.ggml.* alone
        gpt_oss = _field(path, _reader(path), "general.architecture") == gguf_gpt_oss.ARCHITECTURE
        tokenizer_class = PreTrainedTokenizerFast if gpt_oss else AutoTokenizer
        tokenizer = tokenizer_class.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(str(folder))
    except Exception as exc:  # no tokenizer.ggml.* fields, a tokenizer model transformers lacks, damaged metadata
        warnings.warn(f"{path}: no tokenizer written: transformers cannot build one from the file "
                      f"({type(exc).__name__}: {str(exc)[:160]})", stacklevel=2)
        return {}
    return {file.name: file for file in sorted(folder.iterdir()) if file.is_file()}


def _architecture(path: Path, reader):
    """(transformers' parsed GGUF metadata, its tensor processor, the causal LM class to build,
    the architecture whose GGUF tensor names the model's map to when not its own model type: a
    Mixtral file's "llama")."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, load_gguf_checkpoint
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    gguf_architecture, names_of = _field(path, reader, "general.architecture"), None
    if gguf_architecture == gguf_gpt_oss.ARCHITECTURE:  # transformers' reader fails on these files
        config = gguf_gpt_oss.config(path, reader, lambda key: _field(path, reader, key))
    else:
        try:
            config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        except Exception as exc:  # transformers' ValueError for unsupported architectures, numpy errors for bad fields
            raise fail(str(path), f"transformers cannot read its metadata ({type(exc).__name__}: "
                       f"{str(exc)[:160]})") from None
    if gguf_architecture == "llama" and _field(path, reader, "llama.expert_count"):  # Mixtral: gguf_mixtral.py
        config, names_of = {**config, "model_type": "mixtral"}, "llama"
    model_type = config.get("model_type")
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]
    except (KeyError, TypeError):  # TypeError: a list or object where a name belongs
        raise fail(str(path), f"model_type {model_type!r}: lowbit imports GGUF files of causal language models "
                   "that transformers builds from GGUF") from None
    for suffix, (key, required) in _UNREAD_FIELDS.get(model_type, {}).items():
        value = _field(path, reader, f"{gguf_architecture}.{suffix}")
        if value is None and not required:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise fail(str(path), f"{gguf_architecture}.{suffix} is {value!r}, not a positive count")
        config[key] = value
    processor_class = (gguf_mixtral.processor_class() if names_of is not None
                       else gguf_gpt_oss.processor_class() if gguf_architecture == gguf_gpt_oss.ARCHITECTURE
                       else TENSOR_PROCESSORS.get(gguf_architecture, TensorProcessor))
    return config, processor_class(config=config), cls, names_of


def _with_rope_scaling(path: Path, reader, tensors: list, config: dict) -> dict:
    """`config` with the RoPE scaling a file's tensors stand for (transformers' reader ignores them:
    its model would run default RoPE; gguf_rope.py): llama3 from a Llama file's rope_freqs, longrope
    from a Phi-3 file's rope_factors_long / short; unchanged without them."""
    model_type = config.get("model_type")
    if model_type == "phi3":
        config = _with_rotary_dimensions(path, reader, config)
        factors = {t.name: _f32_values(path, t) for t in tensors if t.name in LONGROPE_FACTORS}
        if not factors:
            return config
        parameters = longrope_parameters(str(path), factors, config,
                                         _field(path, reader, "phi3.rope.scaling.original_context_length"),
                                         _field(path, reader, "phi3.rope.scaling.attn_factor"))
        return {**config, "rope_parameters": parameters,
                "original_max_position_embeddings": parameters["original_max_position_embeddings"]}
    rope = next((t for t in tensors if t.name == ROPE_FREQS), None)
    if rope is None or model_type != "llama":
        return config
    divisors = _f32_values(path, rope)
    return {**config, "rope_parameters": llama3_parameters(f"{path}: {ROPE_FREQS}", divisors, config)}


def _f32_values(path: Path, tensor) -> torch.Tensor:
    """A RoPE tensor's float32 values; CheckpointError naming it unless stored as F32 (as llama.cpp writes it)."""
    if tensor.tensor_type.name != "F32":
        raise fail(f"{path}: {tensor.name}", f"stored as {tensor.tensor_type.name}; llama.cpp writes it as F32")
    return torch.from_numpy(np.array(tensor.data, dtype=np.float32))


def _with_rotary_dimensions(path: Path, reader, config: dict) -> dict:
    """A Phi-3 file's `config` with the partial rotary factor its rope.dimension_count stands for
    (Phi-4-mini rotates 96 of each head's 128 dimensions; transformers' reader ignores the key and
    would rotate whole heads)."""
    dimensions = _field(path, reader, "phi3.rope.dimension_count")
    if dimensions is None:
        return config
    width = head_dim(str(path), config)
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 0 < dimensions <= width \
            or dimensions % 2:
        raise fail(f"{path}: phi3.rope.dimension_count", f"{dimensions!r} is not an even count of rotated "
                   f"dimensions of a {width}-wide head")
    return config if dimensions == width else {**config, "partial_rotary_factor": dimensions / width}


def _check_block_count(path: Path, tensors: list, config: dict) -> None:
    """CheckpointError unless the file holds tensors for exactly the blocks its metadata counts: a
    count damaged upwards would have transformers build (millions of) layers that have no weights,
    one damaged downwards would drop the last blocks' tensors without a word."""
    layers, held = config.get("num_hidden_layers"), numbered_modules(t.name for t in tensors)
    if layers != held:
        raise fail(str(path), f"block_count {layers!r} in its metadata, but it holds tensors for {held} blocks")


def _field(path: Path, reader, key: str):
    """The metadata field `key`'s (first) value, None when the file lacks it; CheckpointError naming
    the file and key when its bytes do not decode (e.g. a string that is not UTF-8)."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        values = read_field(reader, key)
    except (ValueError, IndexError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise fail(f"{path}: {key}", f"its value does not decode ({type(exc).__name__}: {str(exc)[:120]})") from None
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


def _expert_placement(processor, tensor, names: dict, config: dict) -> tuple[str, torch.Tensor, int] | None:
    """Where transformers' processor puts a 3-D GGUF expert weight [E, N, K] (ggml lists it K, N,
    E): (the fused weight's name, the row [N] of each stored row in an expert's slice of it, the
    slice's rows), read from a probe [E, N, 1] whose every row holds 1 + its index; a slice held
    transposed ([E, K, rows]: GPT-OSS) is read as its rows. None when the processor does anything
    but give every expert the same rows of its own slice."""
    experts, n = int(tensor.shape[2]), int(tensor.shape[1])
    probe = (np.arange(experts * n, dtype=np.float32) + 1).reshape(experts, n, 1)
    parsed = {"config": config, "tensors": {}}
    try:
        processor.process(weights=probe, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed)
    except Exception:  # a processor written for other tensors
        return None
    if len(parsed["tensors"]) != 1:
        return None
    (fused, out), = parsed["tensors"].items()
    out = torch.as_tensor(np.asarray(out), dtype=torch.float32)
    if out.dim() == 3 and out.shape[1] == 1 and out.shape[2] != 1:  # held transposed
        out = out.transpose(1, 2)
    if out.dim() != 3 or out.shape[0] != experts or out.shape[2] != 1:
        return None
    out = out[:, :, 0]
    filled = (out[0] != 0).nonzero().flatten()  # the slice rows expert 0's stored rows went to
    if len(filled) != n or int((out != 0).sum()) != experts * n:
        return None
    source = out[:, filled].long() - 1  # [E, N] stored (expert * N + row) of each filled row
    rows = source[0]
    if not torch.equal(source, rows + n * torch.arange(experts)[:, None]) or not torch.equal(
            rows.sort().values, torch.arange(n)):
        return None
    positions = torch.empty(n, dtype=torch.long)
    positions[rows] = filled
    return fused, positions, int(out.shape[1])


@dataclass(frozen=True)
class _ExpertTensor:
    """A 3-D GGUF expert weight in a type lowbit imports and where `_expert_placement` puts it."""
    tensor: Any
    kind: BlockType
    positions: torch.Tensor  # [N] the row of each stored row in an expert's slice of the fused weight
    slice_rows: int

    def block(self) -> tuple[int, int, torch.Tensor] | None:
        """(part, parts, the stored row of each of the part's rows) when the tensor's rows are
        one block of the slice (Qwen-MoE's gate rows, then up), else None (GPT-OSS interleaves)."""
        n, start = len(self.positions), int(self.positions.min())
        if start % n or self.slice_rows % n or not torch.equal(self.positions.sort().values,
                                                               torch.arange(start, start + n)):
            return None
        return start // n, self.slice_rows // n, (self.positions - start).argsort()

    def expert_name(self, expert: int) -> str:
        names = getattr(self.tensor, "expert_names", None)  # an older file's tensor per expert
        return names[expert] if names else f"{self.tensor.name} (expert {expert})"


def _expert_layers(path: Path, fused: str, parts: list[_ExpertTensor], dtype: torch.dtype, partly_dense: bool
                   ) -> dict[str, tuple[PackedWeight, ExpertSlice, float]] | None:
    """{name: (layer, where it goes, its difference from llama.cpp's weights)} of each expert's
    slice of the fused expert weight `fused` stored as `parts`; None when lowbit cannot hold it as
    one layer per expert (a part `partly_dense`, in a type lowbit does not import; or parts whose
    layouts differ, e.g. a Q4_K gate and a Q6_K up), for the caller to decode it in full precision.
    CheckpointError naming the weight when the parts do not fill the slice's rows once each."""
    if partly_dense:
        return None
    experts_name, _, weight_name = fused.rpartition(".")
    positions = torch.cat([p.positions for p in parts])
    if not torch.equal(positions.sort().values, torch.arange(parts[0].slice_rows)):
        raise fail(f"{path}: {fused}", f"its expert tensors {[p.tensor.name for p in parts]} give "
                   f"{len(positions)} rows for its {parts[0].slice_rows} (a tensor missing or stored twice?)")
    blocks = [p.block() for p in parts]
    if any(block is None for block in blocks):  # interleaved rows: one layer from the parts' rows together
        if len({p.kind.name for p in parts}) > 1:
            return None
        order, layers = positions.argsort(), {}
        for expert in range(len(parts[0].tensor.data)):
            where = f"{path}: " + " + ".join(p.expert_name(expert) for p in parts)
            rows = np.concatenate([np.asarray(p.tensor.data[expert]) for p in parts])
            layer, error = _layer(where, rows, parts[0].kind, order, dtype)
            layers[f"{fused}.{expert}.0"] = (layer, ExpertSlice(experts_name, weight_name, expert, 0, 1), error)
        return layers

    def decoded(part: _ExpertTensor, order: torch.Tensor, expert: int) -> tuple[PackedWeight, float]:
        return _layer(f"{path}: {part.expert_name(expert)}", part.tensor.data[expert], part.kind, order, dtype)

    first = {part: decoded(p, order, 0) for p, (part, _, order) in zip(parts, blocks)}  # do the parts stack?
    try:
        stacked_rows([first[part][0] for part in sorted(first)], fused)
    except CheckpointError:
        return None
    layers = {}
    for p, (part, count, order) in zip(parts, blocks):
        for expert in range(len(p.tensor.data)):
            layer, error = first[part] if expert == 0 else decoded(p, order, expert)
            layers[f"{fused}.{expert}.{part}"] = (layer, ExpertSlice(experts_name, weight_name, expert, part, count),
                                                  error)
    return layers


def _layer(where: str, blocks: np.ndarray, kind: BlockType, order: torch.Tensor, dtype: torch.dtype
           ) -> tuple[PackedWeight, float]:
    """The lowbit layer of a quantized GGUF weight's block bytes [N, K / block * block bytes] with
    rows in `order` -> (layer, its largest difference from llama.cpp's weights relative to its
    largest |weight|; 0 for exact types). CheckpointError naming `where` for blocks lowbit cannot hold."""
    data = torch.from_numpy(np.array(blocks))[order]
    codes, a, c = decode_blocks(kind, data)
    try:
        layer = lowbit_layer(kind, codes, a, c, dtype)
    except ValueError as exc:
        raise fail(where, f"{kind.name} blocks lowbit cannot hold: {exc}") from None
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
        weights = gguf.dequantize(np.asarray(tensor.data), tensor.tensor_type)
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
    (IQ4_XS's scales rounded to float16), MXFP4 ones mxfp4 and NVFP4 ones nvfp4; MoE experts stored
    in these types (3-D [E, N, K] tensors, or one 2-D tensor per expert as files written before
    April 2024 hold them) become the model's quantized experts, one layer per expert, gate and up
    stacked; every other tensor decoded to `dtype` (quantized weights of other
    types too, and gate / up pairs lowbit cannot stack, with a warning). model:
    optional skeleton to fill. CheckpointError naming the file or tensor for anything it cannot
    import."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from .foreign_folder import model_with_layers

    path = Path(path)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise LowbitError(f"load_gguf(dtype=) must be torch.bfloat16, float16 or float32, got {dtype!r}")
    reader = _reader(path)
    config, processor, cls, names_of = _architecture(path, reader)
    tensors = stack_split_experts(path, reader.tensors, config.get("num_local_experts", config.get("num_experts")))
    _check_block_count(path, tensors, config)
    config = _with_rope_scaling(path, reader, tensors, config)
    skeleton_model = (build_meta_model(path, cls, config, "<GGUF metadata>", [t.name for t in tensors])
                      if model is None else model)
    try:
        names = get_gguf_hf_weights_map(skeleton_model, processor, model_type=names_of)
    except (AttributeError, NotImplementedError) as exc:  # a model= without a transformers config; a model_type gguf lacks
        raise fail(str(path), f"transformers cannot map its tensor names to the model's ({exc})") from None
    # transformers' MoE processors merge 3-D expert weights into parsed_parameters' tensors
    context = {"tensor_key_mapping": names, "parsed_parameters": {"config": config, "tensors": {}}}
    linears = {name for name, module in skeleton_model.named_modules() if isinstance(module, nn.Linear)}
    packed, dense, kept_dense, errors = {}, {}, Counter(), {}
    experts: dict[str, list[_ExpertTensor]] = {}  # fused weight -> its parts stored in types lowbit imports
    skipped = []  # tensors the model has no place for
    for tensor in tqdm(tensors, desc="import GGUF", unit="tensor", disable=len(tensors) < 16):
        hf_name = names.get(tensor.name, "")
        layer = hf_name.removesuffix(".weight")
        kind = BLOCK_TYPES.get(tensor.tensor_type.name)
        dims, decoded_as = len(tensor.shape), None  # decoded_as: why a quantized weight is decoded (the warning's count)
        if dims > 3:
            raise fail(f"{path}: {tensor.name}", f"a tensor of {dims} dimensions: lowbit imports 2-D and 3-D (expert) "
                       "weights")
        if not all(int(size) > 0 for size in tensor.shape):
            raise fail(f"{path}: {tensor.name}", f"shape {[int(size) for size in tensor.shape]} has an empty dimension")
        if dims == 3 and kind is not None:
            placement = _expert_placement(processor, tensor, names, config)
            if placement is not None:
                experts.setdefault(placement[0], []).append(_ExpertTensor(tensor, kind, *placement[1:]))
                continue
            decoded_as = f"{kind.name} experts transformers places in another way"
        elif dims == 3:
            decoded_as = f"{tensor.tensor_type.name} experts"
        elif dims == 2 and layer in linears and hf_name.endswith(".weight"):
            shape = (int(tensor.shape[1]), int(tensor.shape[0]))  # GGUF lists dimensions innermost first
            order = _row_order(processor, tensor.name, shape, context) if kind is not None else None
            if order is not None:
                packed[layer], errors[layer] = _layer(f"{path}: {tensor.name}", tensor.data, kind, order, dtype)
                continue
            decoded_as = tensor.tensor_type.name + ("" if kind is None else " changed by transformers")
        name, value = _dense(path, tensor, processor, context, dtype)
        if name is not None:  # None: merged into parsed_parameters' tensors by the processor
            if name not in names:
                skipped += [] if tensor.name in _DERIVED else [tensor.name]
                continue
            dense[names[name]] = value
        if decoded_as and tensor.tensor_type.name not in ("F32", "F16", "BF16"):
            kept_dense[decoded_as] += 1
    if skipped:
        warnings.warn(f"{path}: {len(skipped)} tensors have no place in {cls.__name__} and were not read: "
                      f"{skipped[:5]}", stacklevel=2)
    slices = {}
    for fused, parts in tqdm(experts.items(), desc="import GGUF experts", unit="weight", disable=len(experts) < 4):
        layers = _expert_layers(path, fused, parts, dtype, fused in context["parsed_parameters"]["tensors"])
        if layers is None:  # decoded as transformers does, merged into parsed_parameters' tensors
            for part in parts:
                _dense(path, part.tensor, processor, context, dtype)
                kept_dense[f"{part.kind.name} experts stored with parts lowbit cannot stack"] += 1
            continue
        for name, (layer, slice_, error) in layers.items():
            packed[name], slices[name], errors[name] = layer, slice_, error
    for name, value in context["parsed_parameters"]["tensors"].items():  # experts in full precision
        dense[name] = value.to(dtype) if value.is_floating_point() else value
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
    return model_with_layers(path, skeleton_model, dense, set(), packed, model, slices).to(device).eval()
