"""GGUF files written by llama.cpp before April 2024 (most Mixtral-8x7B files of 2023) hold each
expert's weight as a 2-D tensor of its own, blk.N.ffn_gate.E.weight / ffn_up / ffn_down, where
newer files hold one 3-D blk.N.ffn_gate_exps.weight [E, N, K] per block and part. llama.cpp still
loads them by viewing a part's experts as one 3-D tensor, which it refuses unless every expert is
there in one type and shape; this does the same, so gguf_import imports both layouts alike. The
experts are not copied: each stays a view of the file's memory map until it is decoded."""
from __future__ import annotations

import re
from itertools import islice
from typing import Any, NamedTuple

import numpy as np

from .foreign_folder import fail

_SPLIT_EXPERT = re.compile(r"blk\.(?P<block>\d+)\.ffn_(?P<part>gate|up|down)\.(?P<expert>\d+)\.weight")


class _ExpertViews:
    """The experts' block bytes as the data of a 3-D tensor: `views[e]` is expert e's [N, bytes]
    memory-map view; np.asarray stacks them (only a weight decoded in full precision is stacked)."""

    def __init__(self, views: list[np.ndarray]):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, expert: int) -> np.ndarray:
        return self.views[expert]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        stacked = np.stack(self.views)
        return stacked if dtype is None else stacked.astype(dtype)


class StackedExperts(NamedTuple):
    """A part's per-expert 2-D tensors as the 3-D tensor a newer file stores (the fields of the
    gguf reader's tensors that gguf_import reads; shape in GGUF's order: K, N, experts)."""
    name: str
    tensor_type: Any
    shape: np.ndarray
    data: _ExpertViews
    expert_names: tuple[str, ...]


def stack_split_experts(path, tensors: list, experts: int | None) -> list:
    """The file's tensors with each block's split expert tensors of a part replaced by one
    StackedExperts named as a newer file names it, in the place of its first expert. experts: the
    count the metadata gives (None: whatever the file holds, from 0 on). CheckpointError naming the
    tensor when a part's experts are not all there, differ in type or shape, are not 2-D, or when
    the file also holds the part's 3-D tensor."""
    groups: dict[tuple[str, str], dict[int, Any]] = {}
    for tensor in tensors:
        match = _SPLIT_EXPERT.fullmatch(tensor.name)
        if match:
            group = groups.setdefault((match["block"], match["part"]), {})
            group[int(match["expert"])] = tensor
    if not groups:
        return tensors
    names = {tensor.name for tensor in tensors}
    stacked = {}
    for (block, part), group in groups.items():
        fused = f"blk.{block}.ffn_{part}_exps.weight"
        first = group[min(group)]
        if fused in names:
            raise fail(f"{path}: {first.name}", f"the file also holds {fused}: a part's experts are stored once")
        want = range(experts if experts is not None else max(group) + 1)
        if len(group) != len(want) or any(expert not in want for expert in group):
            # a damaged count may be in the billions: look only as far as the first few missing
            missing = list(islice((expert for expert in want if expert not in group), 4))
            extra = sorted(expert for expert in group if expert not in want)[:4]
            raise fail(f"{path}: blk.{block}.ffn_{part}", f"expert tensors {sorted(group)[:8]}: "
                       f"{len(want)} experts expected" + (f", missing {missing}" if missing else "")
                       + (f", beyond the count {extra}" if extra else ""))
        for expert in want:
            tensor = group[expert]
            if len(tensor.shape) != 2:
                raise fail(f"{path}: {tensor.name}", f"an expert weight of {len(tensor.shape)} dimensions, not 2")
            if tensor.tensor_type != first.tensor_type or _dims(tensor) != _dims(first):
                raise fail(f"{path}: {tensor.name}", f"{tensor.tensor_type.name} {_dims(tensor)}, but expert "
                           f"{min(group)} is {first.tensor_type.name} {_dims(first)}: llama.cpp holds a "
                           "part's experts as one tensor of one type and shape")
        ordered = [group[expert] for expert in want]
        stacked[first.name] = StackedExperts(fused, first.tensor_type, np.array([*first.shape, len(ordered)]),
                                             _ExpertViews([t.data for t in ordered]),
                                             tuple(t.name for t in ordered))
    split = {tensor.name for group in groups.values() for tensor in group.values()}
    return [stacked.get(tensor.name, tensor) for tensor in tensors
            if tensor.name in stacked or tensor.name not in split]


def _dims(tensor) -> list[int]:
    return [int(d) for d in tensor.shape]
