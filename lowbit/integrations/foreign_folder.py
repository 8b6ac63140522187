"""Shared steps of importing a Hugging Face folder written by another library (the dfloat11
package, bitsandbytes, compressed-tensors, GPTQ / AWQ writers): read its config.json and
safetensors, check the tensors a layer is read from, build lowbit integer layers from their
codes, build the model config.json describes and fill it (checkpoint names mapped as transformers
maps them, per-expert layers placed in lowbit's quantized experts). Nothing from the folder is
executed: JSON and safetensors only, model classes looked up by name in transformers."""
from __future__ import annotations

import json
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import regex
import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError, LowbitError
from ..formats import bitpack
from ..formats.integer import SCALE_DTYPE, in_input_order, padded_k
from ..packed import PackedWeight
from .checkpoint_keys import CheckpointKeys, ExpertSlice


#: the model dtypes config.json may name
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: the dtypes other libraries store float scales in
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fail(where: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}")


def is_name_in(value: Any, table: Any) -> bool:
    """True when `value`, read from a JSON file, is a string among `table`'s names (a dict's keys or
    a tuple's items); False for any other JSON value, lists and objects (unhashable) included."""
    return isinstance(value, str) and value in table


#: the longest a regular expression read from a folder may take to match one module name (real
#: ones take microseconds; Python's re had not finished `(.*.*)*x` on a Llama name after 10 minutes)
MATCH_TIMEOUT_S = 1.0


def folder_pattern(text: str, where: str) -> regex.Pattern:
    """A regular expression read from a folder (GPTQModel's `dynamic` keys, compressed-tensors'
    "re:" targets, the dfloat11 package's pattern_dict), compiled by the `regex` package (PCRE-like,
    and it can time a match out); CheckpointError naming `where` when it does not compile."""
    try:
        return regex.compile(text)
    except (regex.error, OverflowError, RecursionError) as error:  # the last two: huge counts, deep nesting
        raise fail(where, f"{text[:80]!r} is not a regular expression ({type(error).__name__}: "
                   f"{str(error)[:80]})") from None


def pattern_matches(pattern: regex.Pattern, name: str, where: str, *, full: bool = False) -> bool:
    """Whether `pattern` (folder_pattern) matches the start of module `name` (all of it when
    `full`), within MATCH_TIMEOUT_S; CheckpointError naming `where` when it takes longer."""
    try:
        return (pattern.fullmatch if full else pattern.match)(name, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise fail(where, f"{pattern.pattern[:80]!r} took over {MATCH_TIMEOUT_S} s to match {name!r} (a pattern "
                   "that backtracks without end)") from None


def read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    """The folder's JSON file `name` as a JSON object; CheckpointError naming the file otherwise."""
    path = folder / name
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(str(path), f"unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise fail(str(path), "not a JSON object")
    return config


def has_quant_method(path: str | Path, method: str) -> bool:
    """True when `path` has a config.json whose quantization_config says quant_method `method`."""
    try:
        config = read_config(Path(path))
    except CheckpointError:  # no config.json, or not a JSON object
        return False
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == method


def config_dtype(folder: Path, config: dict[str, Any], why: str) -> torch.dtype:
    """The model dtype config.json names (transformers 5: "dtype", 4.x: "torch_dtype");
    CheckpointError naming the field, and `why` it is needed, otherwise."""
    name = config.get("dtype", config.get("torch_dtype"))
    if not is_name_in(name, DTYPES):
        raise fail(f"{folder / 'config.json'}: dtype", f"expected one of {sorted(DTYPES)} ({why}), got {name!r}")
    return DTYPES[name]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's *.safetensors files, by key (CPU)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise fail(str(folder), "no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key in tensors:
                        raise fail(str(f), f"tensor {key!r} appears in two files")
                    tensors[key] = handle.get_tensor(key)
        except LowbitError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise fail(str(f), f"unreadable safetensors file ({exc})") from None
    return tensors


def stored_tensor(tensors: dict[str, torch.Tensor], key: str, dtypes: tuple[torch.dtype, ...], *,
                  shape: tuple[int, ...] | None = None, numel: int | None = None) -> torch.Tensor:
    """tensors[key], checked to have one of `dtypes` and the given shape (or number of values);
    CheckpointError naming the key otherwise."""
    tensor = tensors.get(key)
    if tensor is None:
        raise fail(key, "missing")
    if (tensor.dtype not in dtypes or (shape is not None and tuple(tensor.shape) != shape)
            or (numel is not None and tensor.numel() != numel)):
        want = " or ".join(str(d) for d in dtypes)
        want += f" {list(shape)}" if shape is not None else "" if numel is None else f" with {numel} values"
        raise fail(key, f"expected {want}, got {tensor.dtype} {list(tensor.shape)}")
    return tensor


def weight_matrix(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """tensors[name.weight], checked to be a [out_features, in_features] matrix of `dtype`."""
    weight = tensors.get(f"{name}.weight")
    if weight is None:
        raise fail(f"{name}.weight", "missing")
    if weight.dtype != dtype or weight.dim() != 2:
        dtype_name = str(dtype).removeprefix("torch.")
        raise fail(f"{name}.weight", f"expected {'an' if dtype_name[0] in 'aeiou' else 'a'} {dtype_name} "
                   f"[out_features, in_features] matrix, got {weight.dtype} {list(weight.shape)}")
    check_not_empty(f"{name}.weight", *weight.shape)
    return weight


def check_not_empty(key: str, out_features: int, in_features: int) -> None:
    """CheckpointError naming `key` for a layer with no weights."""
    if out_features == 0 or in_features == 0:
        raise fail(key, f"an empty layer ({out_features} out, {in_features} in features)")


def float16_scales(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """tensors[key] (SCALE_DTYPES, `shape`) in float16, lowbit's integer scale dtype, and how many
    of its values float16 could not hold exactly (rounded to nearest); CheckpointError naming
    `key` when one is not finite in float16."""
    scales = stored_tensor(tensors, key, SCALE_DTYPES, shape=shape)
    scales16 = scales.to(SCALE_DTYPE)
    if not bool(torch.isfinite(scales16).all()):
        raise fail(key, f"values up to {float(scales.float().abs().max()):.3g}: not finite in float16, lowbit's "
                   "scale dtype")
    return scales16, int((scales16.float() != scales.float()).sum())


def warn_inexact_scales(folder: Path, inexact: int, total: int, what: str, library: str) -> None:
    """Warn (for the caller of the import) when `inexact` of the `total` scales (`what`) read by
    `float16_scales` were rounded to float16."""
    if inexact:
        warnings.warn(f"{folder}: {inexact} of {total} {what} are not float16 values (lowbit's scale dtype) and were "
                      f"rounded to the nearest one; those groups' weights differ from {library}'s by that rounding",
                      stacklevel=3)


def unpack_bitstream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 or uint8 [R, W] dense bit streams -> int32 [R, count] unsigned codes: code i at bits
    [i*b, i*b+b) of the row's words read as one little-endian stream (it may straddle two words;
    b <= the word width)."""
    word_bits = torch.iinfo(words.dtype).bits
    stream = torch.nn.functional.pad(words.to(torch.int64) & (2**word_bits - 1), (0, 1))  # a zero word after the last
    start = torch.arange(count, dtype=torch.int64) * bits
    word = start // word_bits
    pairs = stream[:, word] | (stream[:, word + 1] << word_bits)
    return ((pairs >> (start % word_bits)) & (2**bits - 1)).to(torch.int32)


def pack_bitstream(codes: torch.Tensor, bits: int, word_dtype: torch.dtype) -> torch.Tensor:
    """`unpack_bitstream`'s inverse: int [R, C] unsigned codes (< 2^bits) -> [R, ceil(C*b/w)]
    words of `word_dtype` (int32 or uint8, w bits each), code i at bits [i*b, i*b+b) of the row's
    words read as one little-endian stream."""
    word_bits = torch.iinfo(word_dtype).bits
    rows, count = codes.shape
    words = -(-count * bits // word_bits)
    start = torch.arange(count, dtype=torch.int64) * bits
    word, shift = (start // word_bits).expand(rows, -1), (start % word_bits).expand(rows, -1)
    codes = codes.to(torch.int64)
    # the fields are disjoint, so adding them up is or-ing them; the part of a code that straddles
    # a word boundary goes to the next word (a spare one after the last)
    stream = torch.zeros(rows, words + 1, dtype=torch.int64)
    stream.scatter_add_(1, word, (codes << shift) & (2**word_bits - 1))
    stream.scatter_add_(1, word + 1, codes >> (word_bits - shift))
    stream = stream[:, :words]
    if word_dtype == torch.int32:  # the unsigned words' two's-complement values
        stream = torch.where(stream >= 2**31, stream - 2**32, stream)
    return stream.to(word_dtype)


def group_order(g_idx: torch.Tensor, group_size: int, key: str) -> torch.Tensor | None:
    """The column order that makes activation-ordered groups consecutive: None when `g_idx`
    (int [K], each input column's group) is already k // group_size, else perm int32 [K] with
    g_idx[perm] == k // group_size (GPTQ's desc_act: each group holds group_size columns picked
    from all over K). CheckpointError naming `key` when no order does that."""
    k = g_idx.numel()
    in_order = torch.arange(k) // group_size
    groups = g_idx.long()
    if torch.equal(groups, in_order):
        return None
    perm = torch.argsort(groups, stable=True)
    if not torch.equal(groups[perm], in_order):
        raise fail(key, f"groups do not each hold {group_size} columns (the last one the rest): no column order "
                   "makes them lowbit's consecutive groups")
    return perm.to(torch.int32)


def integer_layer(codes: torch.Tensor, bits: int, group_size: int, scales: torch.Tensor, zeros: torch.Tensor | None,
                  dtype: torch.dtype, act: str | None = None, perm: torch.Tensor | None = None) -> PackedWeight:
    """A lowbit `int{bits}` PackedWeight of `dtype` from another library's codes: unsigned codes
    int32 [N, K] in [0, 2^bits), float16 scales [N, G] and, when asymmetric, float16 zero points
    [N, G] (else the constant 2^(bits-1)), G groups of `group_size` along K; act: "int8", "fp8" or
    None. perm: int32 [K] from `group_order` for activation-ordered groups (the codes are given
    in input order and stored in perm's)."""
    n, k = codes.shape
    kp = padded_k(k, group_size)
    if perm is not None:
        codes = codes[:, perm.long()]
    # the padding codes decode to 0 in symmetric layers; lowbit's kernels never read them
    unsigned = torch.nn.functional.pad(codes, (0, kp - k), value=2 ** (bits - 1))
    attrs = {"group_size": group_size, "symmetric": zeros is None}
    if act is not None:
        attrs["act"] = act
    fields = {"qweight": bitpack.pack(unsigned, bits), "scales": scales.t().contiguous()}
    if zeros is not None:
        fields["zeros"] = zeros.t().contiguous()
    layer = PackedWeight(f"int{bits}", (n, k), dtype, attrs, fields)
    return layer if perm is None else in_input_order(layer, perm)


def skeleton(folder: Path, config: dict[str, Any], library_key: str) -> nn.Module:
    """The meta-device model config.json describes, without the library's own `library_key` entry
    (CheckpointError for what `io.build_meta_model` refuses)."""
    from ..io import architecture, build_meta_model, stored_tensor_names, transformers_class

    path = folder / "config.json"
    try:
        cls = transformers_class(path, architecture(config))
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; pass load(..., model=skeleton) with a bf16 model of the right shape") from None
    return build_meta_model(path, cls, {k: v for k, v in config.items() if k != library_key}, "<model config>",
                            stored_tensor_names(folder))


def state_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """The shape of every state-dict entry of `model` (tied aliases included)."""
    return {k: v.shape for k, v in model.state_dict().items()}


def filled_model(folder: Path, skeleton_model: nn.Module, state: dict[str, torch.Tensor], model: nn.Module | None,
                 dtype: torch.dtype) -> nn.Module:
    """The model holding `state` (checkpoint keys: every state-dict entry but tied aliases, under
    the names transformers' conversion mapping gives them, per-expert weights merged into fused
    ones): built by transformers' from_pretrained from `skeleton_model`'s config (non-persistent
    buffers such as rotary tables initialized its way, the mapping applied) when `model` is None,
    else `model` filled in place (renamed keys only: merging is transformers')."""
    from ..io import unique_tensors

    keys = CheckpointKeys(skeleton_model)
    expected, aliases = skeleton_model.state_dict(), set(unique_tensors(skeleton_model)[1])
    renamed = {key: keys.rename(key) for key in state}
    targets = {key: target for key, (target, _) in renamed.items()}
    merged = {key for key, (_, pattern) in renamed.items() if pattern is not None}
    missing = sorted(set(expected) - set(targets.values()) - aliases)
    extra = sorted(key for key, target in targets.items() if target not in expected)
    if missing or extra:
        raise fail(str(folder), f"does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, tensor in state.items():
        if key in merged:
            continue
        model_tensor = expected[targets[key]]
        if tensor.shape != model_tensor.shape:
            raise fail(f"{folder}: {key}", f"shape {list(tensor.shape)} does not fit the model's "
                       f"{list(model_tensor.shape)}")
        # transformers would cast an integer tensor to the float model dtype (or a float one to an integer buffer's)
        if tensor.is_floating_point() != model_tensor.is_floating_point():
            kind = "a floating-point" if model_tensor.is_floating_point() else "an integer"
            raise fail(f"{folder}: {key}", f"stored as {tensor.dtype}, where the model holds {kind} tensor")
    if model is None:
        cls = type(skeleton_model)
        try:
            loaded = cls.from_pretrained(None, config=skeleton_model.config, state_dict=state, dtype=dtype)
        except Exception as exc:
            raise fail(str(folder), f"transformers could not build {cls.__name__}: {exc}") from None
        # the conversions transformers records describe `state` (fused expert weights under their
        # model names: none), not a checkpoint layout; without them save_pretrained and
        # export_compressed_tensors revert the class's default mapping, as for a model built anew
        # (per-expert Linears), instead of writing fused expert weights no other tool reads
        loaded.__dict__.pop("_weight_conversions", None)
        return loaded
    if merged:
        raise fail(str(folder), f"per-expert weights ({sorted(merged)[0]}, ...) are merged by transformers' loading: "
                   "load without model=")
    by_target = {target: state[key] for key, target in targets.items()}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in by_target:
                tensor.copy_(by_target[name])
    return model


#: how a layer's packed fields stack along N: qweight by rows (dim 0); scales and zero points
#: group-major ([G, N], or [G, N / block] for FP8 blocks) along dim 1. The formats whose fields
#: are all of these (integer, FP8, MX, NVFP4 with its tensor_scale) stack; others (NF4, LUT,
#: dfloat11) do not.
_STACK_DIMS = {"qweight": 0, "scales": 1, "zeros": 1}


def _not_row_major(packed: PackedWeight) -> list[str]:
    """The fields of `packed` that neither follow its rows (`_STACK_DIMS`) nor are shared by all
    of them (perm, tensor_scale): what keeps it from being stacked or split by rows."""
    return sorted(set(packed.tensors) - set(_STACK_DIMS) - {"perm", "tensor_scale"})


def stacked_rows(parts: list[PackedWeight], where: str) -> PackedWeight:
    """Layers [N_i, K] of one format with the same K, attrs, perm and tensor scale -> one
    [sum N_i, K] layer (a fused gate_up expert weight from its gate and up Linears); integer
    layers: asymmetric if any part is. CheckpointError naming `where` when they cannot be one."""
    from ..formats import get_format

    first = parts[0]
    if len(parts) == 1:
        return first
    # attrs other than symmetric (groups, act, block, permuted) must agree, and so must perm where present
    if any(p.format != first.format or p.dtype != first.dtype or p.shape[1] != first.shape[1]
           or {**p.attrs, "symmetric": 0} != {**first.attrs, "symmetric": 0}
           or ("perm" in first.tensors and not torch.equal(p.perm, first.perm)) for p in parts):
        raise fail(where, "its gate and up layers differ in format, dtype, in_features, groups, act or column order "
                   f"({[(p.format, p.shape, p.attrs) for p in parts]}): lowbit holds them as one layer")
    unstackable = _not_row_major(first)
    if unstackable:
        raise fail(where, f"its gate and up layers are {first.format}, whose {unstackable} lowbit cannot stack into "
                   "one layer (integer, FP8, MX and NVFP4 layers stack)")
    if "tensor_scale" in first.tensors and not all(torch.equal(p.tensor_scale, first.tensor_scale) for p in parts):
        raise fail(where, f"its gate and up layers have different tensor scales "
                   f"({[float(p.tensor_scale) for p in parts]}): one {first.format} layer holds one")
    row_block = first.attrs.get("block") or 1  # FP8 block scales cover `block` rows
    uneven = [p.shape[0] for p in parts[:-1] if p.shape[0] % row_block]
    if uneven:
        raise fail(where, f"its gate layer's {uneven[0]} rows are not whole {row_block}-row scale blocks")
    fields = {field: torch.cat([p.tensors[field] for p in parts], dim=dim)
              for field, dim in _STACK_DIMS.items() if field in first.tensors and field != "zeros"}
    fields.update({field: first.tensors[field] for field in ("perm", "tensor_scale") if field in first.tensors})
    attrs = dict(first.attrs)
    if "symmetric" in attrs:  # integer layers: zero points 2^(b-1) for the symmetric parts
        offset = 2 ** (get_format(first.format).bits - 1)
        attrs["symmetric"] = all(p.attrs["symmetric"] for p in parts)
        if not attrs["symmetric"]:
            fields["zeros"] = torch.cat([p.zeros if "zeros" in p.tensors else torch.full_like(p.scales, offset)
                                         for p in parts], dim=1)
    return PackedWeight(first.format, (sum(p.shape[0] for p in parts), first.shape[1]), first.dtype, attrs, fields)


def row_slice(packed: PackedWeight, start: int, stop: int, where: str) -> PackedWeight:
    """Rows [start, stop) of a layer whose fields `stacked_rows` stacks (its inverse: an expert's
    gate or up share of its fused gate_up layer); the other fields (perm, tensor_scale) are
    shared. CheckpointError naming `where` for formats with other fields, and for FP8 block
    scales that a row range would cut."""
    if (start, stop) == (0, packed.shape[0]):
        return packed
    unsplittable = _not_row_major(packed)
    if unsplittable:
        raise fail(where, f"{packed.format} layers' {unsplittable} are not split by rows")
    block = packed.attrs.get("block") or 1  # FP8 block scales cover `block` rows
    if start % block or (stop % block and stop != packed.shape[0]):
        raise fail(where, f"rows [{start}, {stop}) cut its {block}-row scale blocks")
    fields = {field: tensor if field not in _STACK_DIMS else tensor[start:stop] if _STACK_DIMS[field] == 0
              else tensor[:, start // block: -(-stop // block)] for field, tensor in packed.tensors.items()}
    return PackedWeight(packed.format, (stop - start, packed.shape[1]), packed.dtype, packed.attrs, fields)


def _placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` that takes 1 element of memory (uninitialized: nothing reads it)."""
    return torch.empty(1, dtype=dtype).expand(shape)


def model_with_layers(folder: Path, skeleton_model: nn.Module, tensors: dict[str, torch.Tensor],
                      layer_fields: set[str], packed: dict[str, PackedWeight], model: nn.Module | None,
                      slices: dict[str, ExpertSlice] | None = None) -> nn.Module:
    """The model holding the folder's `tensors`, with a QuantLinear of `packed[name]` (and the
    stored bias) as each layer `name` (checkpoint names: a per-expert Linear that transformers
    merges into a fused expert weight becomes that expert's layer in lowbit's quantized experts,
    gate and up stacked; a name in `slices` is placed where its ExpertSlice says instead, for
    files that store experts fused, as GGUF does); `layer_fields` are the tensor keys those layers
    were read from. Every other tensor keeps its stored values and dtype; the layers' float
    weights are one-element placeholders, never allocated."""
    from ..api import replace_layer
    from ..errors import FormatError
    from ..experts import check_fused_weight, expert_shape, install
    from ..linear import QuantLinear
    from .transformers import attach_hf_config

    keys, targets, slices = CheckpointKeys(skeleton_model), {}, slices or {}
    for name in packed:
        if name in slices:
            targets[name] = f"{slices[name].experts}.{slices[name].weight}", slices[name]
            continue
        try:
            targets[name] = keys.layer_target(name)
        except ValueError as exc:
            raise fail(f"{folder}: {name}", str(exc)) from None
    # (experts module, fused weight) -> (parts per expert, {expert: {part: layer}})
    fused: dict[tuple[str, str], tuple[int, dict[int, dict[int, PackedWeight]]]] = {}
    for name, (_, piece) in targets.items():
        if piece is not None:
            experts = fused.setdefault((piece.experts, piece.weight), (piece.parts, {}))[1]
            experts.setdefault(piece.expert, {})[piece.part] = packed[name]
    dtype = next(iter(packed.values())).dtype
    # the full-precision model needs a weight in each layer's place until the QuantLinear replaces
    # it: a one-element tensor expanded to the weight's shape, which from_pretrained keeps as the
    # parameter (it assigns loaded tensors), so no float weight is ever allocated; a fused expert
    # weight gets one under its model name (nothing for transformers to merge)
    placeholders = {f"{name}.weight": _placeholder(p.shape, dtype) for name, p in packed.items()
                    if targets[name][1] is None}
    for (experts_name, weight_name), (parts, experts) in fused.items():
        where = f"{folder}: {experts_name}.{weight_name}"
        try:  # transformers' mapping names the fused weight whether the model has it or not
            module = skeleton_model.get_submodule(experts_name)
            check_fused_weight(module, weight_name)
        except AttributeError:
            raise fail(where, "the model has no such experts module") from None
        except FormatError as exc:
            raise fail(where, str(exc)) from None
        count = expert_shape(module, weight_name)[0]
        # a damaged config may count billions of experts: name only the first few absent
        absent = list(islice((f"expert {e} part {p}" for e in range(count) for p in range(parts)
                              if p not in experts.get(e, {})), 3))
        if absent:
            raise fail(where, f"no quantized layer for {absent}: lowbit quantizes a fused weight's experts together")
        if len(experts) != count:
            raise fail(where, f"layers for experts {sorted(experts)[count:]} beyond the module's {count}")
        placeholders[f"{experts_name}.{weight_name}"] = _placeholder(module._parameters[weight_name].shape, dtype)
    state = {**{k: v for k, v in tensors.items() if k not in layer_fields}, **placeholders}
    model = filled_model(folder, skeleton_model, state, model, dtype)
    for name, weight in packed.items():
        target, piece = targets[name]
        if piece is None:
            bias = getattr(model.get_submodule(target), "bias", None)
            replace_layer(model, target, QuantLinear.from_packed(weight, bias))
    for (experts_name, weight_name), (parts, experts) in fused.items():
        where = f"{folder}: {experts_name}.{weight_name}"
        layers = [QuantLinear.from_packed(stacked_rows([experts[e][p] for p in range(parts)], f"{where} (expert {e})"))
                  for e in range(len(experts))]
        try:
            install(model.get_submodule(experts_name), weight_name, layers)
        except FormatError as exc:
            raise fail(where, str(exc)) from None
    attach_hf_config(model)
    return model
