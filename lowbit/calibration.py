"""Input Hessians of a model's layers from calibration batches (for method="gptq")."""
from __future__ import annotations

import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import experts
from .errors import InputError, LowbitError

#: the most fp32 Hessian bytes one calibration pass collects: later layers wait for another pass
#: (Llama-3-8B's down_proj alone holds 14336^2 * 4 bytes = 0.8 GiB)
HESSIAN_BUDGET_BYTES = 2 * 2**30


def builtin_sentences() -> list[str]:
    """163 short English sentences on everyday topics, written for lowbit (lowbit/data): a
    calibration set that ships with the package, for when no text of the model's own domain is
    at hand. Real workloads calibrate better on their own text."""
    text = (Path(__file__).parent / "data" / "calibration_sentences.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def tokenized_batches(tokenizer: Any, sentences: list[str], batch_size: int = 16) -> list[dict]:
    """Calibration batches for lowbit.quantize(..., calibration=...): the sentences tokenized
    `batch_size` at a time (padded to the longest in each batch; padding tokens count too)."""
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


def check_batches(calibration: Any) -> list[Any]:
    """The calibration batches as a list: each a tensor (called as model(batch)) or a dict of
    keyword arguments (model(**batch), e.g. a tokenizer's output). InputError otherwise."""
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    if not isinstance(calibration, Sequence) or isinstance(calibration, str) or not calibration:
        raise InputError("calibration must be a non-empty list of batches (tensors, or dicts of model inputs), "
                         f"got {type(calibration).__name__}")
    for index, batch in enumerate(calibration):
        if not isinstance(batch, (torch.Tensor, dict)):
            raise InputError(f"calibration[{index}]: expected a tensor or a dict of model inputs, "
                             f"got {type(batch).__name__}")
    return list(calibration)


def hessian_chunks(layers: list[tuple[str, int, int]], budget: int = HESSIAN_BUDGET_BYTES) -> list[list[str]]:
    """(name, input width K, Hessians: 1, or a fused expert weight's expert count) in model order
    -> consecutive runs of names whose fp32 [K, K] Hessians fit `budget` together (a layer larger
    than the budget gets a run of its own)."""
    chunks: list[list[str]] = []
    used = budget
    for name, k, copies in layers:
        size = 4 * k * k * copies
        if used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


@torch.no_grad()
def collect_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any],
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Run `model` over every batch (in eval mode, without gradients) and return, for each named
    layer (nn.Linear or transformers Conv1D), H = X^T X / rows: fp32 [K, K] on the layer's
    device, X its inputs [rows, K] over all batches (every token counts, padding included).
    A name `{experts}.{weight}` mapped to a transformers experts module (lowbit/experts.py) gets
    one Hessian per expert, fp32 [E, K, K], from the tokens routed to it (all zeros for an expert
    no token reached, with a warning naming how many).
    InputError naming the batch when the model's forward fails on it, or a layer never runs."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}

    def start(name: str, k: int, device: torch.device, copies: tuple[int, ...] = ()) -> None:
        if name not in sums:
            sums[name] = torch.zeros(*copies, k, k, device=device)
            rows[name] = torch.zeros(copies, dtype=torch.int64)

    def accumulate(name: str, x: torch.Tensor, expert: int | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        (sums[name] if expert is None else sums[name][expert]).addmm_(x.t(), x)
        rows[name][() if expert is None else expert] += x.shape[0]

    def accumulate_linear(name: str, x: torch.Tensor) -> None:
        start(name, x.shape[-1], x.device)
        accumulate(name, x)

    def accumulate_experts(module: nn.Module, weights: list[tuple[str, str]], args: tuple, kwargs: dict) -> None:
        """weights: (layer name, fused weight name) of the module's calibrated weights; the tokens
        are routed once for all of them."""
        inputs = dict(zip(("hidden_states", "top_k_index"), args)) | kwargs
        hidden = inputs["hidden_states"]
        for name, weight_name in weights:  # the module ran: every expert has a Hessian
            start(name, experts.expert_shape(module, weight_name)[2], hidden.device, (module.num_experts,))
        routing = experts.route(module, hidden, inputs["top_k_index"])
        for name, weight_name in weights:
            x = experts.hidden_activations(module, routing) if weight_name == "down_proj" else routing.rows
            for expert, rows in enumerate(x.split(routing.sizes)):
                if len(rows):
                    accumulate(name, rows, expert)

    training = model.training
    model.eval()  # dropout off: the Hessian of the inputs the layer sees at inference
    try:
        with ExitStack() as hooks:
            fused: dict[nn.Module, list[tuple[str, str]]] = {}  # experts module -> its calibrated weights
            for name, module in layers.items():
                if experts.is_experts_module(module):
                    fused.setdefault(module, []).append((name, name.rsplit(".", 1)[-1]))
                    continue
                handle = module.register_forward_pre_hook(
                    lambda _m, inputs, name=name: accumulate_linear(name, inputs[0]))
                hooks.callback(handle.remove)
            for module, weights in fused.items():
                handle = module.register_forward_pre_hook(
                    lambda m, args, kwargs, weights=weights: accumulate_experts(m, weights, args, kwargs),
                    with_kwargs=True)
                hooks.callback(handle.remove)
            for index, batch in enumerate(tqdm(batches, desc="lowbit calibrate", unit="batch", disable=not progress)):
                try:
                    model(**batch) if isinstance(batch, dict) else model(batch)
                except LowbitError:
                    raise
                except Exception as exc:
                    raise InputError(f"calibration[{index}]: the model's forward failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(training)
    unused = [name for name in layers if name not in sums or int(rows[name].sum()) == 0]
    if unused:
        raise InputError(f"layer '{unused[0]}' received no input from the calibration batches "
                         "(method='gptq' needs its inputs; skip it or use another method)")
    for name, counts in rows.items():
        unreached = int((counts == 0).sum()) if counts.dim() else 0
        if unreached:
            warnings.warn(f"{name}: {unreached} of {len(counts)} experts received no calibration token; GPTQ gives "
                          "them its plain rounding, without error feedback (more calibration text reaches more "
                          "experts)", stacklevel=3)

    def mean(name: str) -> torch.Tensor:
        counts = rows[name].clamp(min=1).to(sums[name].device, torch.float32)
        return sums[name] / (counts.reshape(-1, 1, 1) if counts.dim() else counts)

    return {name: mean(name) for name in layers}
