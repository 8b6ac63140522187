"""Writes checkpoints in the `dfloat11` package's layout with that package's own encoder
(lowbit/integrations/dfloat11_package.py): the import tests compare lowbit against it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.integrations.dfloat11_package import BYTES_PER_THREAD, THREADS_PER_BLOCK, package_encoder
from lowbit.integrations.dfloat11_package import package_encode as encode_with



def package_encode(weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's compress_model steps for one module (skips the test without the package)."""
    utils = package_encoder()
    if utils is None:
        pytest.skip("the dfloat11 package (and dahuffman) is not installed")
    return encode_with(utils, weights)


def write_df11_folder(model: nn.Module, folder: Path, pattern_dict: dict[str, list[str]]) -> None:
    """compress_model's single-file layout: model.safetensors with the plain tensors and each
    matching module's buffers; config.json = the model config + dfloat11_config."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        attrs = next((a for p, a in pattern_dict.items() if re.fullmatch(p, name)), None)
        if attrs is None:
            continue
        paths = attrs or [""]
        keys = [".".join(x for x in (name, a, "weight") if x) for a in paths]
        buffers = package_encode([state.pop(k).flatten() for k in keys])
        state.update({f"{name}.{field}": t.contiguous() for field, t in buffers.items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # as save_pretrained writes it
    config["dfloat11_config"] = {"version": "0.5.0", "threads_per_block": [THREADS_PER_BLOCK],
                                 "bytes_per_thread": BYTES_PER_THREAD, "pattern_dict": pattern_dict}
    (folder / "config.json").write_text(json.dumps(config))
