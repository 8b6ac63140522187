"""GPTQ (Frantar et al., 2022, arXiv:2210.17323) for the formats whose scale groups run along K:
the integer and LUT formats, the microscaling formats and NF4.

Round-to-nearest minimises each weight's own error. GPTQ minimises the layer's *output* error on
calibration inputs X, ||X W^T - X W_hat^T||^2, which only depends on W through the Hessian
H = X^T X / rows. It quantizes one column (input channel) at a time and spreads that column's
rounding error over the columns not yet quantized, in proportion to the inverse Hessian, so the
inputs that move together absorb each other's error. The codes, scales and zero points it picks
use the format's layout and rules unchanged (a group's scale and zero point follow the format's
range rule, applied to the group as it stands when its first column is reached), so every
kernel and checkpoint reads them as any other layer.

Option act_order (GPTQ's "desc_act" with static groups, llm-compressor's actorder="weight"):
the columns are quantized in order of decreasing Hessian diagonal (the inputs with the most
energy first, while the most columns remain to absorb their error), and every group's scale and
zero point are set from the weight as given, before any column moves (a group's columns are no
longer reached together). The groups stay contiguous in K, so the layout is unchanged and no
permutation is stored (GPTQ's dynamic act-order groups would need one per layer).

Not implemented: GPTQ's lazy batching across groups without act_order (a block there never spans
two groups).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import FormatError, WeightError

#: fraction of the mean Hessian diagonal added to the diagonal (GPTQ's "percdamp"): keeps the
#: Cholesky factorisation stable when inputs are (nearly) collinear. The paper's 0.01 generalised
#: worse than 0.1 from a few thousand calibration tokens on MiniLM (README, integer formats)
DAMPING = 0.1
#: columns per block: errors reach the columns past a block in one matrix product at its end
BLOCK_COLUMNS = 128


def check_method(method: str, hessian: object, name: str) -> None:
    """FormatError naming the layer unless a Hessian is given exactly when method is "gptq"."""
    if method == "gptq" and hessian is None:
        raise FormatError(f"{name}: method='gptq' needs the layer's input Hessian (lowbit.quantize(model, ..., "
                          "method='gptq', calibration=batches) collects it)")
    if method != "gptq" and hessian is not None:
        raise FormatError(f"{name}: a hessian is only used by method='gptq', not {method!r}")


def check_hessian(hessian: object, k: int, name: str) -> torch.Tensor:
    """The Hessian as fp32 [K, K]; WeightError naming the layer unless it is a finite square
    tensor of the layer's input width K."""
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise WeightError(f"{name}: hessian must be a [{k}, {k}] tensor (the layer's input width), got {shape}")
    if not bool(torch.isfinite(hessian).all()):
        raise WeightError(f"{name}: hessian has non-finite values (NaN/Inf in the calibration activations?)")
    return hessian.float()


def activation_order(hessian: torch.Tensor, kp: int) -> torch.Tensor:
    """int64 [Kp]: the columns of a K-padded weight by decreasing Hessian diagonal (ties, and the
    padding columns past K, which come last, in K order) — act_order's quantization order."""
    diagonal = torch.zeros(kp, dtype=torch.float32, device=hessian.device)
    diagonal[:hessian.shape[0]] = hessian.diagonal()
    return torch.argsort(diagonal, descending=True, stable=True)


def inverse_hessian_factor(hessian: torch.Tensor, kp: int, name: str = "weight",
                           order: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [K, K] Hessian -> fp32 [Kp, Kp] upper Cholesky factor U of its damped inverse
    (H + damping * mean(diag H) * I)^-1 = U^T U, with rows and columns in `order` (int64 [Kp],
    default K order). Inputs that never fired (zero diagonal) and the padding columns past K get a
    unit diagonal: they take no error and pass none on. WeightError naming the layer when the
    damped Hessian is not positive definite (not a Gram matrix)."""
    k = hessian.shape[0]
    h = torch.zeros(kp, kp, dtype=torch.float64, device=hessian.device)
    h[:k, :k] = hessian
    if order is not None:
        h = h[order][:, order]
    diagonal = h.diagonal()
    diagonal[diagonal <= 0] = 1.0
    diagonal += DAMPING * diagonal.mean()
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise WeightError(f"{name}: hessian is not positive semi-definite (expected X^T X of the layer's inputs)")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()


def solve(weight: torch.Tensor, hessian: torch.Tensor, group_size: int,
          group_params: Callable[[torch.Tensor], Any],
          round_column: Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]], name: str = "weight",
          act_order: bool = False):
    """GPTQ codes of a padded weight, for any format whose groups run along K.

    weight: fp32 [N, Kp] (K zero-padded to whole groups); hessian: fp32 [K, K].
    group_params(group fp32 [N, group_size]) -> the format's parameters of one group (scales,
    zero points, ...), by its rule for the group as it stands (with act_order: as given).
    round_column(column fp32 [N], params) -> (codes [N], the fp32 values [N] they decode to).
    act_order: columns in `activation_order`, static groups (module docstring).
    Returns (codes [N, Kp] in round_column's dtype, [params of each group, in K order]); name:
    the layer, for errors.
    """
    n, kp = weight.shape
    order = activation_order(hessian, kp) if act_order else None
    u = inverse_hessian_factor(hessian, kp, name, order)
    # w holds the columns in quantization order; column_of maps a position there to its K index
    w = weight.clone() if order is None else weight[:, order]
    column_of = range(kp) if order is None else order.tolist()
    params = [group_params(weight[:, g:g + group_size]) for g in range(0, kp, group_size)] if act_order else []
    codes = None
    start = 0
    while start < kp:
        if act_order:
            end = min(start + BLOCK_COLUMNS, kp)
        else:
            if start % group_size == 0:  # every earlier column's error has reached this group
                params.append(group_params(w[:, start:start + group_size]))
            end = min(start + BLOCK_COLUMNS, (start // group_size + 1) * group_size, kp)
        block = w[:, start:end]  # a view: in-block updates land in w
        errors = torch.empty_like(block)
        for j in range(end - start):
            column, k_index = block[:, j], column_of[start + j]
            code, value = round_column(column, params[k_index // group_size])
            if codes is None:
                codes = torch.empty(n, kp, dtype=code.dtype, device=w.device)
            codes[:, k_index] = code
            errors[:, j] = (column - value) / u[start + j, start + j]
            block[:, j + 1:] -= errors[:, j:j + 1] * u[start + j, start + j + 1:end]
        w[:, end:] -= errors @ u[start:end, end:]
        start = end
    return codes, params
