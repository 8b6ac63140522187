"""GPT-OSS GGUF files (llama.cpp's "gpt-oss" architecture, e.g. gpt-oss-20b with MXFP4 experts).
transformers (5.x) lists gpt-oss among its GGUF architectures but loads no llama.cpp file of it:
its metadata reader fails on the YaRN rope keys such files hold, and its tensor processor expects
names llama.cpp does not write (ffn_*_projs). lowbit reads the config here and maps llama.cpp's
tensors as its converter wrote them from transformers' GptOssForCausalLM:
- ffn_gate_exps / ffn_up_exps [E, I, H] are the even / odd rows of an expert's gate_up [2I, H],
  which GptOssExperts holds transposed as gate_up_proj [E, H, 2I] (newer files may hold both in one
  ffn_gate_up_exps [E, 2I, H], gate rows first); their biases [E, I] likewise make gate_up_proj_bias;
- ffn_down_exps [E, H, I] is down_proj [E, I, H] transposed; its bias is down_proj_bias;
- attn_sinks.weight is self_attn.sinks (transformers' name map has it as attn_sinks).
gguf_import finds where each expert row lands by running the processor on a probe, as for every
architecture, so the quantized experts keep llama.cpp's codes."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from .foreign_folder import fail

ARCHITECTURE = "gpt-oss"
_EXPERT_TENSOR = re.compile(r"blk\.(?P<block>\d+)\.ffn_(?P<part>gate|up|down|gate_up)_exps\.(?P<kind>weight|bias)")
#: where an expert part's rows go in gate_up (the first of every 2, from which)
_GATE_UP_OFFSET = {"gate": 0, "up": 1}


def config(path, reader, read) -> dict[str, Any]:
    """The GptOssConfig fields of the file's metadata (`read(key)`: a field's value or None):
    transformers' GGUF key table for gpt-oss and the rope scaling (head_dim and the sliding window
    are gguf_import's `_UNREAD_FIELDS`). CheckpointError naming the key for a rope scaling lowbit
    cannot map."""
    from transformers import GptOssConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    values = {"model_type": "gpt_oss",
              "tie_word_embeddings": all(tensor.name != "output.weight" for tensor in reader.tensors)}
    for key, name in GGUF_CONFIG_MAPPING["gpt_oss"].items():
        if name is not None and (value := read(f"{ARCHITECTURE}.{key}")) is not None:
            values[name] = value
    embedding = next((tensor for tensor in reader.tensors if tensor.name == "token_embd.weight"), None)
    if "vocab_size" not in values and embedding is not None and len(embedding.shape) == 2:
        values["vocab_size"] = int(embedding.shape[1])  # GGUF lists dimensions innermost first
    scaling = read(f"{ARCHITECTURE}.rope.scaling.type")
    rope = {"rope_type": "default", "rope_theta": values.pop("rope_theta", 10000.0)}
    if scaling == "yarn":  # what the file does not say (truncate) is GPT-OSS's own
        rope = {**GptOssConfig().rope_parameters, **rope, "rope_type": "yarn"}
        for key, name in (("factor", "factor"), ("original_context_length", "original_max_position_embeddings"),
                          ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := read(f"{ARCHITECTURE}.rope.scaling.{key}")) is not None:
                rope[name] = value
    elif scaling not in (None, "none"):
        raise fail(str(path), f"{ARCHITECTURE}.rope.scaling.type {scaling!r}: lowbit maps only 'yarn' (GPT-OSS's)")
    values["rope_parameters"] = rope
    return values


def processor_class() -> type:
    """A transformers TensorProcessor for llama.cpp's GPT-OSS tensors (the module docstring)."""
    from transformers.modeling_gguf_pytorch_utils import GGUFTensor, TensorProcessor

    class GptOssGgufProcessor(TensorProcessor):
        def process(self, weights, name: str, **kwargs):
            match = _EXPERT_TENSOR.fullmatch(name)
            if match is None:  # llama.cpp's converter names the sinks ".weight"; transformers' map does not
                return GGUFTensor(weights, name.removesuffix(".weight") if name.endswith(".attn_sinks.weight")
                                  else name, {})
            down = kwargs["tensor_key_mapping"].get(f"blk.{match['block']}.ffn_down_exps")
            if down is None:  # a block the model does not have: the caller names the tensor
                return GGUFTensor(weights, name, {})
            experts = down.rpartition(".")[0]
            _merge(kwargs["parsed_parameters"]["tensors"], experts, match["part"], match["kind"],
                   torch.from_numpy(np.array(weights)))
            return GGUFTensor(weights, None, {})

    return GptOssGgufProcessor


def _merge(tensors: dict[str, torch.Tensor], experts: str, part: str, kind: str, value: torch.Tensor) -> None:
    """Put one stored expert tensor (`value`: weights [E, N, K] or biases [E, N]) where
    GptOssExperts holds it, in `tensors` (fused names under `experts`)."""
    if part == "down":
        tensors[f"{experts}.down_proj" + ("_bias" if kind == "bias" else "")] = (
            value.transpose(1, 2) if kind == "weight" else value)
        return
    if part == "gate_up":  # gate rows first
        half = value.shape[1] // 2
        _merge(tensors, experts, "gate", kind, value[:, :half])
        _merge(tensors, experts, "up", kind, value[:, half:])
        return
    offset = _GATE_UP_OFFSET[part]
    if kind == "bias":  # [E, I] -> the even / odd entries of [E, 2I]
        fused = tensors.setdefault(f"{experts}.gate_up_proj_bias", value.new_zeros(value.shape[0], 2 * value.shape[1]))
        fused[:, offset::2] = value
    else:  # [E, I, H] -> the even / odd columns of [E, H, 2I]
        experts_count, rows, cols = value.shape
        fused = tensors.setdefault(f"{experts}.gate_up_proj", value.new_zeros(experts_count, cols, 2 * rows))
        fused[:, :, offset::2] = value.transpose(1, 2)
