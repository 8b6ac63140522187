"""Deterministic split-K inside one launch: the last program of an output tile reduces it.

With split-K, `split_k` programs each compute an fp32 partial sum of the same [BLOCK_M, BLOCK_N]
output tile. A separate reduction (torch `sum` + a cast) would cost two more kernel launches,
which at M=1 is as long as the GEMV itself. Instead every program writes its partial sum to a
workspace, then takes a ticket from a per-tile counter; the program that draws the last ticket
sums the split_k partials *in split order* (so the result does not depend on which program
finished last: the same bits every run), writes the output in its dtype and resets the counter
to 0 for the next launch.

Memory ordering (the usual semaphore pattern): the partial-sum stores are followed by a barrier
of the program's threads, then the counter increment (an acq_rel atomic at GPU scope, so the
stores before it are visible to whoever draws the last ticket); the reducing program reads the
partials with L1-bypassing loads.

Counters live in one zeroed int32 buffer per (device, stream), grown when a grid needs more:
launches on one stream run in order, so they never share a tile's counter concurrently.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .runtime import cdiv

_counters: dict[tuple, torch.Tensor] = {}
_MIN_COUNTERS = 4096


@triton.jit
def store_split_k(acc, out_ptr, ws_ptr, counters_ptr, offs_m, offs_n, M, N, stride_om, SPLIT: tl.constexpr):
    """Store the fp32 tile `acc` [BLOCK_M, BLOCK_N] of rows offs_m, columns offs_n of the
    [M, N] output. SPLIT=False: this program owns the tile, store it cast to the output dtype.
    SPLIT=True: program (axis 1) is one of tl.num_programs(1) splits of the tile; the tile is
    identified by program axes 0 and 2; ws_ptr is fp32 [splits, M, N]; see the module doc."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT:
        splits = tl.num_programs(1)
        tile_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + tl.program_id(1) * M * N + tile_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        ticket = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == splits - 1:
            total = tl.zeros_like(acc)
            for s in range(0, splits):
                total += tl.load(ws_ptr + s * M * N + tile_offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counters_ptr + tile, 0)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least `tiles` counters for launches on the current stream."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _counters.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, _MIN_COUNTERS, 0 if buf is None else 2 * buf.numel()), dtype=torch.int32,
                          device=device)
        _counters[key] = buf
    return buf


def default_splits(k_tiles: int, output_tiles: int, sms: int, programs_per_sm: int = 4) -> int:
    """The default split count: enough programs for about `programs_per_sm` per SM (4 for the
    split-K GEMVs: a GEMV waits on its loads, and more resident programs keep more bytes in
    flight; an extra split costs only its partial sums, reduced inside the launch), never more
    splits than K tiles."""
    return max(1, min(k_tiles, cdiv(programs_per_sm * sms, output_tiles)))


def valid_split_count(requested) -> bool:
    """A split count a launch can take: a positive integer."""
    return isinstance(requested, int) and requested >= 1


def split_k_buffers(x: torch.Tensor, n: int, k_tiles: int, requested: int, tiles: int,
                    out_dtype: torch.dtype | None = None):
    """(out, workspace, counters, tiles_per_split, split_k) for a split-K launch over `tiles`
    output tiles: out [M, N] in out_dtype (default x.dtype); with one split the workspace and
    counters are `out` (never read), else fp32 [split_k, M, N] and the stream's counters."""
    if not valid_split_count(requested):
        raise InputError(f"SPLIT_K must be a positive integer, got {requested!r}")
    tiles_per_split = cdiv(k_tiles, requested)
    split_k = cdiv(k_tiles, tiles_per_split)
    m = x.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=out_dtype or x.dtype)
    if split_k == 1:
        return out, out, out, tiles_per_split, 1
    workspace = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    return out, workspace, counters(x.device, tiles), tiles_per_split, split_k
