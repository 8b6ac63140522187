"""Random damage to a saved folder, for the loaders' property tests: a JSON value replaced by one
of any type, a tensor changed in dtype, shape or bytes, or removed. A loader must answer every
such folder with LowbitError or a model that runs; any other exception is a bug."""
import json
import shutil
import warnings
from pathlib import Path

import torch
from hypothesis import note
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import LowbitError

#: JSON values of every type and some extreme sizes
ODD_JSON = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(allow_nan=False),
                     st.text(max_size=8), st.just([]), st.just({}), st.lists(st.integers(-3, 3), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

#: the config.json entries lowbit reads itself: the library's own object, and what picks the model
#: class and dtype (the rest is transformers' model config, validated as its from_pretrained does)
_CONFIG_KEYS = ("quantization_config", "dfloat11_config", "architectures", "dtype", "torch_dtype", "model_type")
_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float8_e4m3fn,
           torch.float16, torch.bfloat16, torch.float32, torch.float64]


def json_paths(node, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value, the root's () included."""
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from json_paths(child, prefix + (key,))


def replace_json_value(data, node) -> str:
    """Replace one value anywhere in the JSON object `node` (in place) by a drawn ODD_JSON; what was done."""
    where = data.draw(st.sampled_from([path for path in json_paths(node) if path]))
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = data.draw(ODD_JSON)
    return f"{'.'.join(map(str, where))} = {node[where[-1]]!r}"


def damaged_tensor(data, tensor: torch.Tensor) -> torch.Tensor | None:
    """`tensor` cast to another dtype, cut / grown / reshaped along a dimension, with up to 4 bytes
    set, or zeroed; None: removed."""
    how = data.draw(st.sampled_from(["dtype", "size", "rank", "bytes", "zeros", "remove"]))
    if how == "remove":
        return None
    if how == "dtype":
        return tensor.to(data.draw(st.sampled_from(_DTYPES)))
    if how == "zeros" or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    if how == "rank":
        return tensor.flatten() if data.draw(st.booleans()) else tensor.unsqueeze(0)
    if how == "size":
        if tensor.dim() == 0:
            return tensor.reshape(1).repeat(2)
        dim = data.draw(st.integers(0, tensor.dim() - 1))
        size = data.draw(st.sampled_from([0, 1, tensor.shape[dim] - 1, tensor.shape[dim] + 1]))
        return torch.cat([tensor, tensor], dim).narrow(dim, 0, size).contiguous()
    raw = tensor.contiguous().flatten().view(torch.uint8).clone()
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, raw.numel() - 1))] = data.draw(st.integers(0, 255))
    return raw.view(tensor.dtype).reshape(tensor.shape)


def damaged_copy(data, folder: Path, out: Path, json_tensor_suffix: str | None = None) -> None:
    """Copy `folder` to `out` with one drawn damage (noted for hypothesis' report): a value of
    config.json that lowbit reads (`_CONFIG_KEYS`) replaced, or one tensor of its first
    safetensors file damaged (`damaged_tensor`; a tensor whose key contains `json_tensor_suffix`
    holds JSON bytes, as bitsandbytes' quant states, and may get a value replaced instead)."""
    shutil.copytree(folder, out)
    if data.draw(st.integers(0, 2)) == 0:
        config = json.loads((out / "config.json").read_text())
        read_by_lowbit = {key: config[key] for key in _CONFIG_KEYS if key in config}
        note(f"config.json: {replace_json_value(data, read_by_lowbit)}")
        (out / "config.json").write_text(json.dumps({**config, **read_by_lowbit}))
        return
    path = sorted(out.glob("*.safetensors"))[0]
    tensors = load_file(path)
    key = data.draw(st.sampled_from(sorted(tensors)))
    if json_tensor_suffix is not None and json_tensor_suffix in key and data.draw(st.booleans()):
        state = json.loads(bytes(tensors[key].tolist()))
        note(f"{key}: {replace_json_value(data, state)}")
        tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    else:
        damaged = damaged_tensor(data, tensors[key])
        note(f"{key}: {'removed' if damaged is None else f'{damaged.dtype} {list(damaged.shape)}'}")
        if damaged is None:
            del tensors[key]
        else:
            tensors[key] = damaged
    save_file(tensors, path, metadata={"format": "pt"})


def loads_and_runs_or_refuses(folder: Path, ids: torch.Tensor) -> None:
    """lowbit.load(folder) raises LowbitError, or gives a causal LM whose logits of `ids` [B, T]
    have the right shape."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. damaged scales rounded to float16: a warning, rightly
        try:
            model = lowbit.load(folder)
        except LowbitError:
            return
        with torch.no_grad():
            logits = model(ids).logits
    assert logits.shape[:2] == ids.shape
