"""The `dfloat11` package's own encoder, for comparisons (benchmarks, import tests).

`dfloat11/dfloat11_utils.py` is pure Python (numpy, dahuffman); it is loaded from the installed
package by file path because the package's __init__ imports cupy. lowbit never uses it to
encode: it is the reference lowbit's encoder and importer are measured against.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path
from types import ModuleType

import torch

#: the package's launch geometry (its dfloat11.py constants)
BYTES_PER_THREAD = 8
THREADS_PER_BLOCK = 512


def package_encoder() -> ModuleType | None:
    """The package's dfloat11_utils module, or None when dfloat11 or dahuffman is not installed."""
    spec = importlib.util.find_spec("dfloat11")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("dahuffman") is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "dfloat11_utils.py"
    module_spec = importlib.util.spec_from_file_location("dfloat11_package_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def package_encode(utils: ModuleType, weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """compress_model's steps for one module (its weights concatenated, flattened bf16):
    the buffers it registers, by name. The package's prints and progress bars are silenced."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, counter = utils.get_codec(torch.cat(weights))
        codec, _, table = utils.get_32bit_codec(counter)
        luts = utils.get_luts(table)
        encoded, sign_mantissa, positions, gaps, splits = utils.encode_weights(
            weights, codec, BYTES_PER_THREAD, THREADS_PER_BLOCK)
    return {"luts": luts, "encoded_exponent": encoded, "sign_mantissa": sign_mantissa,
            "output_positions": positions.view(torch.uint8), "gaps": gaps, "split_positions": splits}
