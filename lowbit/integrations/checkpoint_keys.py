"""Checkpoint keys -> model keys, as transformers' loading maps them: its conversion mapping
renames keys (Mixtral's `block_sparse_moe` -> `mlp`, legacy names) and merges per-expert Linear
weights (`experts.3.w1.weight`, `experts.3.up_proj.weight`, ...) into an experts module's fused
3-D weight (`experts.gate_up_proj`, gate rows first, then up; `experts.down_proj`). The imports of
other libraries' folders use it to place a quantized layer stored under a checkpoint name: a
plain Linear under its model name, an expert's slice of a fused weight in lowbit's quantized
experts (lowbit/experts.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ExpertSlice:
    """Where one per-expert Linear of a checkpoint goes: rows `part` of `parts` (gate 0, up 1 of
    a gate_up weight; 0 of 1 otherwise) of expert `expert` of `experts`' fused weight `weight`."""
    experts: str
    weight: str
    expert: int
    part: int
    parts: int


class CheckpointKeys:
    """The key mapping transformers applies when it loads a checkpoint into `model` (none for a
    module that is not a transformers PreTrainedModel)."""

    def __init__(self, model: nn.Module):
        from transformers import PreTrainedModel

        self.renamings, self.converters, self.prefix, self.meta = [], [], None, None
        if isinstance(model, PreTrainedModel):
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter

            mapping = get_model_conversion_mapping(model)
            self.converters = [t for t in mapping if isinstance(t, WeightConverter)]
            self.renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
            self.prefix, self.meta = model.base_model_prefix, dict.fromkeys(model.state_dict())

    def rename(self, key: str) -> tuple[str, str | None]:
        """(the model's name for checkpoint tensor `key`, the converter pattern that matched it):
        for a per-expert weight that transformers merges with others, the fused weight's name and
        its pattern, else the pattern is None."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, self.renamings, self.converters, self.prefix, self.meta)

    def layer_target(self, name: str) -> tuple[str, ExpertSlice | None]:
        """(the model's module name, None) for a checkpoint Linear `name` that transformers loads
        as a Linear; (the fused weight's key, its ExpertSlice) for a per-expert Linear it merges.
        ValueError for a merge other than stacking experts and concatenating parts along N."""
        target, pattern = self.rename(f"{name}.weight")
        if pattern is None:
            return target.removesuffix(".weight"), None
        converter = next(c for c in self.converters if pattern in c.source_patterns)
        operations = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
        if operations not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            raise ValueError(f"transformers merges it into {target} by {operations}: lowbit places per-expert "
                             "layers by stacking experts and concatenating gate / up rows only")
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), f"{name}.weight")
        experts, _, weight = target.rpartition(".")
        return target, ExpertSlice(experts, weight, int(expert.group(1)), converter.source_patterns.index(pattern),
                                   len(converter.source_patterns))
