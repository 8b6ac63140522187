"""lowbit.save / lowbit.load: safetensors shards + a JSON manifest, atomic, fully validated.

Folder layout:
  lowbit.json                       manifest (see `_manifest`): versions, model class + config,
                                    per-layer format / shape / dtype / attrs, every tensor's
                                    dtype, shape and file, aliases of tied tensors
  model.safetensors                 or model-00001-of-0000N.safetensors when sharded
  non-persistent-buffers.safetensors  the non-persistent buffers, when there are any
  config.json (+ model.safetensors.index.json when sharded)  for transformers models
  anything passed as extra_files    e.g. the source folder's tokenizer (`companion_files`)
Keys are `{qualified_name}.{field}`. Every unique parameter and buffer is stored (non-persistent
buffers too), so `load` rebuilds the module from the manifest alone. Nothing read from the folder
is executed: safetensors and JSON only, model classes are looked up by name in `transformers`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .api import place_layers
from .errors import CheckpointError, InputError, LowbitError, check_module
from .linear import QuantLinear
from .packed import dtype_name

logger = logging.getLogger(__name__)

MANIFEST = "lowbit.json"
#: non-persistent buffers (rotary inv_freq, ...): load needs them, as it builds the model on the
#: meta device; from_pretrained computes them itself and reported them as unexpected keys, so
#: they live apart from the shards it reads
NON_PERSISTENT_FILE = "non-persistent-buffers.safetensors"
#: 2: every layer entry records its packed layout (`Format.layout`). Version-1 folders still load,
#: except layers in a layout that has changed since (int6 / int7 / mxfp6: CheckpointError); the bump
#: makes lowbit versions that read only version 1 refuse new folders instead of misreading them.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
_DTYPES = {dtype_name(d): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer once (first name wins) + {alias name: stored name}."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
        else:
            first_name[id(tensor)] = name
            tensors[name] = tensor.detach()
    return tensors, aliases


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    """Qualified names of the buffers registered with persistent=False."""
    return {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules(remove_duplicate=False)
            for name in module._non_persistent_buffers_set}


def model_entry(model: nn.Module) -> dict[str, Any]:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        config = json.loads(model.config.to_json_string(use_diff=False))
        # as save_pretrained records it: the dtype the model holds now (a model built from a config
        # has none, and from_pretrained then took the first float tensor's, a float16 scale)
        config["dtype"] = dtype_name(model.dtype)
        return {"kind": "transformers", "class": type(model).__name__, "config": config}
    return {"kind": "module", "class": type(model).__name__}


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _write_shard(path: Path, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    shard = {n: tensors[n].to("cpu").contiguous() for n in names}
    # safetensors refuses tensors that share storage (e.g. views of one fused weight): copy those.
    seen: dict[tuple[int, int], str] = {}
    for n, t in shard.items():
        key = (t.untyped_storage().data_ptr(), t.device.index or 0)
        if key in seen and t.numel():
            shard[n] = t.clone()
        seen.setdefault(key, n)
    save_file(shard, str(path), metadata={"format": "pt", "producer": "lowbit"})


def check_save_target(out_dir: Path, replaceable: Callable[[Path], bool] = lambda d: (d / MANIFEST).is_file(),
                      kind: str = "a lowbit checkpoint") -> None:
    """CheckpointError unless `out_dir` may be written: absent, empty, or a folder `replaceable`
    says is `kind` (by default a lowbit checkpoint, which `save` replaces); the CLI asks before it
    spends time loading and quantizing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; refusing to overwrite it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not replaceable(out_dir):
        raise CheckpointError(f"{out_dir}: non-empty directory that is not {kind}; refusing to replace it")


def check_shard_bytes(max_shard_bytes: Any) -> None:
    """CheckpointError unless `max_shard_bytes` is a positive int."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")


def check_not_on_meta(tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming the tensors on the meta device (they hold no data to write)."""
    on_meta = [name for name, t in tensors.items() if t.device.type == "meta"]
    if on_meta:
        raise CheckpointError(f"cannot save {on_meta[:5]}: on the meta device (no data)")


def save(model: nn.Module, out_dir: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
         extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Save `model` (quantized or not) to `out_dir` atomically; returns the folder path.

    Writes into a temporary sibling folder and renames it into place: on any failure the
    previous contents of `out_dir` are untouched. An existing regular file, or a non-empty
    folder that is not a lowbit checkpoint, is refused. extra_files: {relative path in the
    folder: source file} copied in within the same atomic write (a tokenizer, e.g. from
    `companion_files`); a path that save writes itself, or one leaving the folder, is refused.
    """
    check_module(model)
    out_dir = as_path(out_dir, "save(..., out_dir)")
    check_save_target(out_dir)
    check_shard_bytes(max_shard_bytes)
    extra = checked_extra_files(extra_files or {})
    tensors, aliases = unique_tensors(model)
    check_not_on_meta(tensors)
    layers = {name: mod.metadata() for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}
    non_persistent = sorted(_non_persistent_buffers(model) & set(tensors))
    groups = _shards({n: t for n, t in tensors.items() if n not in non_persistent}, max_shard_bytes)
    files = shard_file_names(len(groups))
    if non_persistent:
        groups.append(non_persistent)
        files.append(NON_PERSISTENT_FILE)
    manifest = {
        "lowbit": {"format_version": FORMAT_VERSION, "library_version": _library_version()},
        "model": model_entry(model),
        "layers": layers,
        "tensors": {n: {"dtype": dtype_name(tensors[n].dtype), "shape": list(tensors[n].shape), "file": f}
                    for f, names in zip(files, groups) for n in names},
        "aliases": aliases,
    }
    with atomic_folder(out_dir) as tmp:
        for f, names in tqdm(list(zip(files, groups)), desc="lowbit save", unit="file", disable=_single_shard(files)):
            _write_shard(tmp / f, names, tensors)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _write_transformers_files(tmp, manifest, files)
        copy_extra_files(tmp, extra, "save")
    return out_dir


def shard_file_names(count: int) -> list[str]:
    """The safetensors file names of `count` shards, as save_pretrained names them."""
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                     for i in range(count)]


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, desc: str) -> dict[str, str]:
    """Write `tensors` into safetensors shards of at most `max_shard_bytes` (a larger tensor gets
    its own) in `folder`, plus model.safetensors.index.json when there is more than one;
    returns {tensor name: file}."""
    groups = _shards(tensors, max_shard_bytes)
    files = shard_file_names(len(groups))
    for f, names in tqdm(list(zip(files, groups)), desc=desc, unit="file", disable=len(files) < 2):
        _write_shard(folder / f, names, tensors)
    weight_map = {name: f for f, names in zip(files, groups) for name in names}
    if len(files) > 1:
        write_weight_index(folder, weight_map)
    return weight_map


def write_weight_index(folder: Path, weight_map: dict[str, str]) -> None:
    """model.safetensors.index.json, which from_pretrained reads to find each tensor's shard."""
    index = {"metadata": {"producer": "lowbit"}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


@contextlib.contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder of `out_dir` to write into; on success it replaces
    `out_dir` (an existing one is removed only then), on any failure it is removed and `out_dir`
    is untouched."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_extra_files(folder: Path, extra: dict[str, Path], writer: str) -> None:
    """Copy `checked_extra_files`' {relative path: source} into `folder`; a file `writer` (the
    function's name, for the message) already wrote there (config.json, a shard, ...) is refused:
    its own files win."""
    for name, source in extra.items():
        if (folder / name).exists():
            raise CheckpointError(f"extra_files[{name!r}]: {writer} writes {name} itself")
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / name)


def checked_extra_files(extra_files: Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """{relative POSIX path: existing source file}, or CheckpointError naming the bad entry."""
    if not isinstance(extra_files, Mapping):
        raise CheckpointError(f"extra_files must map folder-relative paths to files, got {type(extra_files).__name__}")
    checked = {}
    for name, source in extra_files.items():
        parts = Path(name).parts if isinstance(name, str) else ()
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise CheckpointError(f"extra_files: {name!r} is not a relative path inside the folder")
        source = as_path(source, f"extra_files[{name!r}]")
        if not source.is_file():
            raise CheckpointError(f"extra_files[{name!r}]: {source} is not a file")
        checked[Path(name).as_posix()] = source
    return checked


#: weight files in the formats Hugging Face folders ship (the source model's full-precision tensors)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot",
                    ".tflite")


def companion_files(folder: Path) -> dict[str, Path]:
    """The files of a Hugging Face model folder that a quantized copy needs besides its weights and
    config.json, as `save(..., extra_files=)` takes them: every top-level file that is not a weight
    file or a weight index (tokenizer, generation_config.json, chat template, model card, license,
    sentence-transformers' module list), and the folders of the sentence-transformers modules that
    modules.json names (pooling, normalize, a Dense head, which stay as they are). Other folders
    (onnx/, openvino/: exports of the full-precision weights) are left out, and logged."""
    files = {f.name: f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")
             and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json")
             and f.name not in ("config.json", MANIFEST)}
    module_dirs = set()
    try:
        modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
        module_dirs = {m["path"] for m in modules if isinstance(m, dict) and isinstance(m.get("path"), str) and m["path"]}
    except (OSError, ValueError, TypeError) as exc:  # not a sentence-transformers folder after all
        logger.warning("%s: modules.json is unreadable (%s); its module folders are not copied", folder, exc)
    left_out = []
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if sub.name not in module_dirs:
            left_out.append(f"{sub.name}/")
            continue
        files.update({f.relative_to(folder).as_posix(): f for f in sorted(sub.rglob("*")) if f.is_file()})
    if left_out:
        logger.info("%s: not copied: %s (only the sentence-transformers module folders are)", folder, left_out)
    return files


def _single_shard(files) -> bool:
    """No progress bar for one shard (plus the small non-persistent-buffers file)."""
    return len([f for f in files if f != NON_PERSISTENT_FILE]) < 2


def _write_transformers_files(folder: Path, manifest: dict[str, Any], files: list[str]) -> None:
    """For transformers models, the files from_pretrained reads besides the shards: config.json
    (with `quantization_config`) and, when sharded, model.safetensors.index.json."""
    entry = manifest["model"]
    if entry["kind"] != "transformers":
        return
    (folder / "config.json").write_text(json.dumps({**entry["config"], "architectures": [entry["class"]]}, indent=1))
    if not _single_shard(files):
        write_weight_index(folder, {name: e["file"] for name, e in manifest["tensors"].items()
                                    if e["file"] != NON_PERSISTENT_FILE})


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is swapped out and removed only on success."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "x")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "x", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _library_version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _fail(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {field}: {problem}")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: manifest missing (not a lowbit checkpoint?)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, "<file>", f"not valid JSON ({exc})") from None
    expected = {"lowbit": dict, "model": dict, "layers": dict, "tensors": dict, "aliases": dict}
    if not isinstance(manifest, dict):
        raise _fail(path, "<root>", "expected a JSON object")
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            raise _fail(path, key, f"missing or not a {kind.__name__}")
    version = manifest["lowbit"].get("format_version")
    if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
        raise _fail(path, "lowbit.format_version",
                    f"{version!r} is not supported (this lowbit reads {list(READABLE_FORMAT_VERSIONS)})")
    for name, entry in manifest["tensors"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] in _DTYPES
                and isinstance(entry.get("file"), str)
                and isinstance(entry.get("shape"), list) and all(isinstance(s, int) and s >= 0 for s in entry["shape"])):
            raise _fail(path, f"tensors.{name}", f"malformed entry {entry!r}")
        if "/" in entry["file"] or "\\" in entry["file"] or entry["file"].startswith("."):
            raise _fail(path, f"tensors.{name}.file", f"file name {entry['file']!r} is not a plain file name")
    return manifest


def transformers_class(path: Path, name: Any, field: str = "architectures") -> type:
    """The transformers PreTrainedModel class called `name` (looked up by name, never imported
    from the folder); CheckpointError naming `path` and `field` for anything else."""
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise _fail(path, field, f"{name!r} is not a transformers model class")
    return cls


def architecture(config: dict[str, Any]) -> Any:
    """The class name config.json's `architectures` lists first (the raw value when it is not a
    non-empty list, for `transformers_class` to refuse)."""
    names = config.get("architectures")
    return names[0] if isinstance(names, list) and names else names


#: config keys that count layers: num_hidden_layers and its aliases (GPT-2's n_layer, BART's
#: encoder_layers / decoder_layers, T5's num_decoder_layers), in the config or a nested one (text_config)
_LAYER_COUNT_KEY = re.compile(r"num_\w*layers|n_layers?|\w*(?:encoder|decoder)_layers")
#: transformers builds this many layers on the meta device in about a second; a larger count must
#: be backed by numbered tensors (a damaged count of millions would build for hours). Counts the
#: tensors do not back below it are legal: ALBERT shares one numbered layer among its 12.
_UNBACKED_LAYERS = 1024


def numbered_modules(names: Iterable[str]) -> int:
    """1 + the largest module number (a ".N." component, e.g. "model.layers.N." or GGUF's "blk.N.")
    in tensor names; 0 when none has one."""
    return max((int(n) for name in names for n in re.findall(r"\.(\d+)(?=\.)", f".{name}")), default=-1) + 1


def _layer_counts(config: dict[str, Any], prefix: str = "", depth: int = 0) -> Iterator[tuple[str, int]]:
    """(dotted key, value) of every integer layer count in a config JSON object and those nested in
    it (4 deep: transformers' configs nest one or two; a damaged file may nest to the recursion limit)."""
    for key, value in config.items():
        if isinstance(value, dict) and depth < 4:
            yield from _layer_counts(value, f"{prefix}{key}.", depth + 1)
        elif isinstance(value, int) and not isinstance(value, bool) and _LAYER_COUNT_KEY.fullmatch(str(key)):
            yield f"{prefix}{key}", value


def check_layer_counts(path: Path, field: str, config: dict[str, Any], names: Iterable[str]) -> None:
    """CheckpointError naming `path` and the key (under `field` unless it is a "<placeholder>")
    when a layer count of `config` is above both 1024 and the modules the tensor `names` number:
    a damaged count would have transformers build millions of layers."""
    held = numbered_modules(names)
    for key, value in _layer_counts(config):
        if value > max(held, _UNBACKED_LAYERS):
            where = key if field.startswith("<") else f"{field}.{key}"
            raise _fail(path, where, f"{value}, but the tensors number only {held} modules (a damaged count?)")


def stored_tensor_names(folder: Path) -> list[str]:
    """The keys of every safetensors file in `folder` (headers only; a file that cannot be read
    is skipped: reading its tensors names it)."""
    names: list[str] = []
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                names += handle.keys()
        except Exception:  # safetensors raises its own error types for damaged files
            continue
    return names


def build_meta_model(path: Path, cls: type, config: Any, field: str, names: Iterable[str]) -> nn.Module:
    """`cls` built on the meta device from `config` (a JSON object) for a checkpoint holding the
    tensors `names`; CheckpointError naming `path` and `field` when it is not an object, counts
    layers the tensors do not have (`check_layer_counts`) or transformers rejects it (a negative
    size, an unknown rope type, ...)."""
    if not isinstance(config, dict):
        raise _fail(path, field, "missing or not an object")
    if not isinstance(config.get("model_type", ""), str):  # transformers keeps it, then looks it up in dicts
        raise _fail(path, field, f"model_type {config['model_type']!r} is not a string")
    check_layer_counts(path, field, config, names)
    try:
        model_config = cls.config_class.from_dict(config)
        check_model_config(path, field, model_config)
        with torch.device("meta"):
            return cls(model_config)
    except CheckpointError:
        raise
    except Exception as exc:  # transformers' own errors: ValueError, KeyError, RuntimeError, AssertionError...
        raise _fail(path, field, f"transformers could not build {cls.__name__}: {exc}") from None


#: config attributes that count a MoE layer's routed experts (the name differs by model)
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")
#: a normalization epsilon's attribute name (rms_norm_eps, layer_norm_epsilon, norm_eps, ...)
_EPSILON = re.compile(r"(.+_)?(eps|epsilon)")


def check_model_config(path: Path, field: str, model_config: Any) -> None:
    """CheckpointError naming `path`, `field` and the attribute for values transformers builds a
    model from but that break it (a damaged config): routing each token to more experts than a
    layer has, or to none (the first forward fails in torch.topk; a GGUF file whose
    expert_used_count is damaged gets transformers' default of 8); a negative or non-finite norm
    epsilon (NaN logits); a rope_theta that is not a positive number (wrong logits, silently)."""
    for config in (model_config, model_config.get_text_config()):
        per_token = getattr(config, "num_experts_per_tok", None)
        experts = next((getattr(config, name) for name in _EXPERT_COUNTS
                        if isinstance(getattr(config, name, None), int) and getattr(config, name) > 0), None)
        if isinstance(per_token, int) and experts is not None and not 0 < per_token <= experts:
            raise _fail(path, field, f"num_experts_per_tok {per_token} is not in 1 ... {experts}, the experts "
                        "of a layer (a damaged config?)")
        for name, value in _number_attributes(vars(config)):
            leaf = name.rpartition(".")[2]
            if _EPSILON.fullmatch(leaf) and not 0 <= value < float("inf"):
                raise _fail(path, field, f"{name} {value} is not a finite number >= 0 (a damaged config?)")
            if leaf == "rope_theta" and not 0 < value < float("inf"):
                raise _fail(path, field, f"{name} {value} is not a finite number > 0 (a damaged config?)")


def _number_attributes(attributes: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted name, value) for every int / float in `attributes` and the dicts nested in it
    (rope_parameters holds rope_theta, per attention type in some models); bools excluded."""
    for name, value in attributes.items():
        if isinstance(value, Mapping):
            yield from _number_attributes(value, f"{prefix}{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{name}", value


def read_headers(folder: Path, files: set[str]) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """{file: {key: (safetensors dtype name, shape)}} from the safetensors headers (no tensor data
    read); CheckpointError naming the file when one is missing or damaged."""
    headers = {}
    for f in sorted(files):
        fpath = folder / f
        if not fpath.is_file():
            raise _fail(fpath, "<file>", "missing")
        try:
            with safe_open(str(fpath), framework="pt") as handle:
                headers[f] = {}
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    headers[f][key] = (sl.get_dtype(), list(sl.get_shape()))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise _fail(fpath, "<header>", f"unreadable safetensors file ({exc})") from None
    return headers


#: safetensors header dtype -> the manifest's dtype name
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, leaf = _owner(model, name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def load(path: str | os.PathLike, *, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by `lowbit.save` and return the module on `device`, in eval mode.

    A transformers model is rebuilt from the manifest (class looked up in `transformers`,
    config from JSON); any other module needs `model=`, a freshly built skeleton with the same
    structure (it is filled in place; after a failed load it may be partly converted, so build
    a fresh one to retry). Every problem with the folder raises CheckpointError naming the file
    and field. A folder written by the `dfloat11` package (config.json with `dfloat11_config`)
    is imported instead: lowbit/integrations/dfloat11_import.py; so are a bitsandbytes 4-bit NF4 /
    FP4 or 8-bit folder (lowbit/integrations/bnb_import.py) and a compressed-tensors integer, FP8,
    NVFP4 or MX one (lowbit/integrations/ct_import.py) and a GPTQ or AWQ one
    (lowbit/integrations/gptq_awq_import.py), and a GGUF file (lowbit/integrations/gguf_import.py:
    its Q4_0 ... Q8_0 and Q2_K ... Q6_K weights as int2 ... int8 layers, IQ4_NL / IQ4_XS as iq4_nl, MXFP4 /
    NVFP4 as mxfp4 / nvfp4, the model in bfloat16; `load_gguf` takes another dtype); a folder written by `save_pretrained`
    (config.json with a lowbit quantization_config) is read through transformers' from_pretrained.
    """
    folder = as_path(path, "load(path)")
    device = _target_device(device)
    if model is not None:
        check_module(model, "load(..., model=)")
    if not (folder / MANIFEST).is_file():
        from .integrations.importers import find_importer

        importer = find_importer(folder)
        if importer is not None:  # GGUF, dfloat11 package, bitsandbytes, compressed-tensors, GPTQ / AWQ
            return importer.load(folder, model=model, device=device)
        config = saved_pretrained_config(folder)
        if model is None and config is not None:  # written by save_pretrained
            return _load_pretrained(folder, config, device)
    manifest = _read_manifest(folder)
    mpath = folder / MANIFEST
    if model is None:
        if manifest["model"].get("kind") != "transformers":
            raise _fail(mpath, "model.kind", f"{manifest['model'].get('kind')!r} checkpoints need load(..., model=skeleton)")
        entry = manifest["model"]
        model = build_meta_model(mpath, transformers_class(mpath, entry.get("class"), "model.class"), entry.get("config"),
                                 "model.config", [*manifest["tensors"], *manifest["layers"]])

    layers = {}
    for name, entry in manifest["layers"].items():
        try:
            layers[name] = QuantLinear.from_metadata(entry)
        except LowbitError as exc:
            raise _fail(mpath, f"layers.{name}", str(exc)) from None
    try:
        place_layers(model, layers, "layers")
    except LowbitError as exc:
        raise CheckpointError(f"{mpath}: {exc}") from None

    expected, aliases = unique_tensors(model)
    stored = manifest["tensors"]
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing:
        raise _fail(mpath, "tensors", f"missing tensor(s) the model needs: {missing[:5]}")
    if extra:
        raise _fail(mpath, "tensors", f"tensor(s) the model does not have: {extra[:5]}")
    headers = read_headers(folder, {e["file"] for e in stored.values()})
    for name, entry in stored.items():
        fpath = folder / entry["file"]
        header = headers[entry["file"]].get(name)
        if header is None:
            raise _fail(fpath, name, "tensor missing from file")
        if SAFETENSORS_DTYPES.get(header[0]) != entry["dtype"] or header[1] != entry["shape"]:
            raise _fail(fpath, name, f"file holds {header[0]} {header[1]}, manifest says {entry['dtype']} {entry['shape']}")
        want = expected[name]
        if list(want.shape) != entry["shape"]:
            raise _fail(fpath, name, f"shape {entry['shape']} does not fit the model's {list(want.shape)}")
        stored_dtype = _DTYPES[entry["dtype"]]
        # Packed fields must have the format's declared dtype; other tensors may change float
        # precision (a bf16 checkpoint of an fp32-built skeleton) but not kind.
        exact = _is_packed_field(model, name)
        if (exact and stored_dtype != want.dtype) or want.is_floating_point() != stored_dtype.is_floating_point:
            raise _fail(fpath, name, f"dtype {entry['dtype']} does not fit the model's {want.dtype}")

    for f in tqdm(sorted(headers), desc="lowbit load", unit="file", disable=_single_shard(headers)):
        fpath = folder / f
        try:
            with safe_open(str(fpath), framework="pt", device=str(device)) as handle:
                for name in (n for n, e in stored.items() if e["file"] == f):
                    _set_tensor(model, name, handle.get_tensor(name))
        except LowbitError:
            raise
        except Exception as exc:
            raise _fail(fpath, "<data>", f"could not read tensor data ({exc})") from None
    for alias, target in manifest["aliases"].items():
        if target not in stored or alias not in aliases:
            raise _fail(mpath, f"aliases.{alias}", f"does not match the model's tied tensors ({target!r})")
        _set_tensor(model, alias, _get_tensor(model, target))
    _align_cpu_tensors(model)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise _fail(mpath, "tensors", f"tensor(s) left without data: {leftover[:5]}")
    for name in manifest["layers"]:
        layer = model.get_submodule(name)
        try:
            layer.packed.check_data()
        except LowbitError as exc:
            files = {stored[key]["file"] for key in (f"{name}.{field}" for field in layer.packed.tensors) if key in stored}
            raise _fail(folder / files.pop() if len(files) == 1 else mpath, name, str(exc)) from None
    from .integrations.transformers import attach_hf_config

    attach_hf_config(model)  # so save_pretrained of a loaded model writes quantization_config
    return model.eval()


def as_path(value: Any, what: str) -> Path:
    """`value` as a Path; InputError for anything but a str or os.PathLike."""
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{what} must be a str or os.PathLike, got {type(value).__name__}")
    return Path(value)


def _target_device(device: Any) -> torch.device:
    """`device` as a torch.device that exists on this machine; InputError before anything is read."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for, but CUDA is not available here")
    return device


def saved_pretrained_config(folder: Path) -> dict[str, Any] | None:
    """config.json of a folder written by save_pretrained from a lowbit model (its
    quantization_config is lowbit's), else None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return config if isinstance(quantization, dict) and quantization.get("quant_method") == "lowbit" else None


def _load_pretrained(folder: Path, config: dict[str, Any], device: str | torch.device) -> nn.Module:
    """A transformers folder with a lowbit quantization_config, through from_pretrained."""
    model_class = transformers_class(folder / "config.json", architecture(config))
    check_layer_counts(folder / "config.json", "<root>", config, stored_tensor_names(folder))
    try:
        # checked before any weight is loaded
        model_config = model_class.config_class.from_pretrained(folder, local_files_only=True)
        check_model_config(folder / "config.json", "<model config>", model_config)
        model, info = model_class.from_pretrained(folder, config=model_config, local_files_only=True,
                                                  output_loading_info=True)
    except LowbitError:
        raise
    except Exception as exc:
        raise _fail(folder, "<checkpoint>", f"transformers could not load it: {exc}") from None
    # transformers only warns about these (and initializes what is missing); lowbit.load refuses,
    # as it does for its own folders: a save_pretrained folder holds exactly the model's tensors
    problems = [f"{kind.replace('_', ' ')}: {sorted(map(str, info[kind]))[:5]}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if info.get(kind)]
    if problems:
        raise _fail(folder, "<checkpoint>", "; ".join(problems))
    _align_cpu_tensors(model)
    return model.to(device).eval()


#: what CPU kernels vectorize for; torch's CPU allocator aligns to it
_ALIGNMENT = 64


def _align_cpu_tensors(model: nn.Module) -> None:
    """Copy every CPU tensor that is not 64-byte aligned into a fresh (aligned) allocation, in
    place (`.data`, so tied tensors stay tied). A CPU load maps safetensors data in place, at the
    file's 8-byte offsets, and CPU kernels take other code paths for misaligned data: a Mixtral
    layer's grouped expert matmul gave fp32 logits 7e-8 off the saved model's until this."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % _ALIGNMENT:
            tensor.data = tensor.data.clone()


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), leaf


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = _owner(model, name)
    return getattr(owner, leaf)


def _is_packed_field(model: nn.Module, name: str) -> bool:
    owner, leaf = _owner(model, name)
    return isinstance(owner, QuantLinear) and leaf in owner._buffers
