"""Block-level DFloat11 decompression: one kernel launch per transformer block.

`enable_block_decompression(model)` hooks every block (each child of an nn.ModuleList) that
holds `dfloat11` layers. Right before the block runs, all its dfloat11 weights are decoded in
one launch into a bf16 buffer shared by every block on the device (sized to the largest
block, so the model never holds more than one block of decoded weights); each layer then runs
a plain bf16 F.linear on its slice, and the slices are released when the block returns.
Calls with at most FUSED_MAX_M tokens skip the block decode: there each layer's fused
decode + GEMV reads the compressed weight only once, which is faster.

This is an eager-mode optimization (forward hooks): under torch.compile and torch.export the
hooks step aside and each layer's own op runs (`lowbit::dfloat11_linear`; a traced decode into
the shared buffer would be a graph break, or a buffer the exported program captures). A layer
whose call autograd records (a gradient is wanted) also runs that op: the decoded slices do not
outlive the block, which its backward pass does.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .errors import InputError, check_module
from .formats import get_format
from .formats.dfloat11 import CODE_BITS
from .kernels.runtime import interpreting
from .linear import QuantLinear
from .ops import records_gradient

#: one reused bf16 decode buffer per device, grown to the largest block seen
_BUFFERS: dict[torch.device, torch.Tensor] = {}


def _shared_buffer(device: torch.device, numel: int) -> torch.Tensor:
    buffer = _BUFFERS.get(device)
    if buffer is None or buffer.numel() < numel:
        _BUFFERS.pop(device, None)
        buffer = _BUFFERS[device] = torch.empty(numel, dtype=torch.bfloat16, device=device)
    return buffer[:numel]


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The block's input hidden states [..., H] (its first argument), None if it takes none."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return hidden if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 and hidden.shape[-1] else None


class BlockDecompressor:
    """Decodes the dfloat11 layers of one block together (see the module docstring)."""

    def __init__(self, block: nn.Module, min_tokens: int | None = None):
        from .kernels.dfloat11 import FUSED_MAX_M

        self.layers = [m for m in block.modules() if isinstance(m, QuantLinear) and m.format == "dfloat11"]
        if not self.layers:
            raise InputError(f"{type(block).__name__} holds no dfloat11 layers to decompress")
        self.min_tokens = FUSED_MAX_M + 1 if min_tokens is None else min_tokens
        self._handles = [block.register_forward_pre_hook(self._before, with_kwargs=True),
                         block.register_forward_hook(self._after)]

    def decode(self) -> list[torch.Tensor]:
        """Decode every layer now; returns their bf16 [N, K] weights (views of the shared
        buffer, valid until the next block decodes) and hands them to the layers."""
        from .kernels.dfloat11 import decode_layers, layer_row

        device = self.layers[0].sign_mantissa.device
        sizes = [m.out_features * m.in_features for m in self.layers]
        buffer = _shared_buffer(device, sum(sizes))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        weights = [buffer[s:s + n].view(m.out_features, m.in_features) for s, n, m in zip(starts, sizes, self.layers)]
        if device.type == "cuda" or interpreting():  # one launch, whatever the layers' segment lengths
            decode_layers([layer_row(layer.exponent_code, layer.sign_mantissa, layer.segment_offsets, layer.decode_table,
                                     start, layer.attrs["segment"], CODE_BITS)
                           for layer, start in zip(self.layers, starts)], buffer, CODE_BITS)
        else:  # no Triton here: the reference decoder, layer by layer
            for weight, layer in zip(weights, self.layers):
                weight.copy_(get_format(layer.format).dequantize(layer.packed))
        for weight, layer in zip(weights, self.layers):
            layer.decoded_weight = weight
        return weights

    def release(self) -> None:
        """Drop the layers' references into the shared buffer."""
        for layer in self.layers:
            layer.decoded_weight = None

    def remove(self) -> None:
        """Unhook from the block."""
        self.release()
        for handle in self._handles:
            handle.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if torch.compiler.is_compiling():  # traced: each layer's own op (see the module docstring)
            return
        hidden = _hidden_states(args, kwargs)
        if hidden is None:
            self.decode()
        # while autograd records, every layer runs lowbit.linear instead (QuantLinear.forward): a
        # decode would be wasted
        elif hidden.numel() // hidden.shape[-1] >= self.min_tokens and not records_gradient(hidden, None):
            self.decode()

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not torch.compiler.is_compiling():
            self.release()


def enable_block_decompression(model: nn.Module, min_tokens: int | None = None) -> list[BlockDecompressor]:
    """Hook every outermost block (child of an nn.ModuleList) holding dfloat11 layers; returns the
    decompressors (call `.remove()` on each to undo). min_tokens: decode per block only for
    calls with at least this many tokens (default: above the fused GEMV's largest M)."""
    check_module(model)
    blocks = [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module
              if any(isinstance(m, QuantLinear) and m.format == "dfloat11" for m in child.modules())]
    # only the outermost: a block inside another (T5's sub-layers inside a T5Block) would decode
    # its layers a second time into the shared buffer
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    hooked = [BlockDecompressor(b, min_tokens) for b in blocks if id(b) not in inner]
    if not hooked:
        warnings.warn("enable_block_decompression: no block (child of an nn.ModuleList) holds dfloat11 "
                      "layers; nothing was hooked", stacklevel=2)
    return hooked


def remove_block_decompression(model: nn.Module) -> int:
    """Remove every BlockDecompressor hooked on `model`'s modules (lowbit.dequantize does, as the
    layers it decodes are gone); returns how many."""
    hooked = {id(hook.__self__): hook.__self__ for module in model.modules()
              for hook in module._forward_pre_hooks.values()
              if isinstance(getattr(hook, "__self__", None), BlockDecompressor)}
    for decompressor in hooked.values():
        decompressor.remove()
    return len(hooked)
