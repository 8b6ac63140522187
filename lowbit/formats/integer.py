"""Group-wise integer formats int2 ... int8 (the torch spec; DESIGN.md section 4).

Groups of `group_size` (default 128; 16 or a multiple of 32) consecutive weights along K share
a scale (and, when asymmetric, a zero point). K is zero-padded to a whole number of groups and
of 32 (Kp: the bit planes hold whole int32 words), so groups of 16 may end in a group of padding.

symmetric:  qmax = 2^(b-1)-1, s = amax/qmax, q = clamp(round(w/s), -qmax, qmax),
            stored code u = q + 2^(b-1), w_hat = (u - 2^(b-1)) * s
asymmetric: qmax = 2^b-1, lo = min(w_min, 0), hi = max(w_max, 0), s = (hi-lo)/qmax,
            z = clamp(round(-lo/s), 0, qmax), u = clamp(round(w/s) + z, 0, qmax),
            w_hat = (u - z) * s
round = ties-to-even (torch.round). Scales and zero points are stored as float16 (16 bits
each per group). The fp32 scale is rounded *up* to the next float16 so that no in-range value
clips because of the cast, and is at least 2^-24 (smallest fp16 subnormal) so an all-zero group
gets a safe non-zero scale. The range [lo, hi] always includes 0 (so zero padding and an exact
zero are representable and z lies in [0, qmax]).

Packed fields: qweight int32 [N, Kp*b/32] (bit planes, see bitpack.py), scales float16 [G, N],
zeros float16 [G, N] (asymmetric only). Scales are group-major so a kernel tile's scales are
one contiguous load along N.

Option `method` (how the range [lo, hi] / amax of each group is chosen; not stored, a layer
decodes the same way whatever it was):
  "rtn" (default): the group's min/max as above, DESIGN.md's rule.
  "mse": the range scaled by the factor in MSE_SHRINK (1, 0.975, ..., 0.5) that gives the group
         the least squared weight error; values outside the shrunk range clip. Zero points stay
         integers in [0, qmax], so every kernel runs unchanged. Factor 1 is tried first and only
         a strictly lower error replaces it, so no group gets worse than with "rtn". It pays at
         2-5 bits; at 6-8 bits nearly every group keeps its full range.
  "gptq": GPTQ (lowbit/formats/gptq.py) with the layer's input Hessian (`hessian=`, which
         lowbit.quantize collects from calibration batches): codes chosen column by column so
         the layer's output error on the calibration inputs shrinks; each group's range is
         "mse"'s search, run on the group as GPTQ's updates left it. Same layout and rules.
         Option act_order=True (not stored): columns by decreasing input energy, each
         group's range "mse"'s search on the weight as given (gptq.py).

Option `act="int8"` (W8A8 for int8, W4A8 for int4, ...): activations are quantized too,
dynamically, per token, to symmetric int8 (lowbit.formats.activations.quantize_activations_int8).
The torch reference emulates exactly that rounding.
Option `act="fp8"` (W4AFP8 for int4, as torchao's Float8DynamicActivationInt4WeightConfig and
compressed-tensors' W4AFP8): activations are quantized dynamically per token to E4M3
(lowbit.formats.activations.quantize_activations_fp8, fp8's act="fp8" rule), and the torch
reference multiplies those values with the weight in fp32.
On CUDA both options choose their kernel per M (`lowbit.kernels.quantized_act`): int8 tensor
cores from M = 32, else the weight-only kernel (act="fp8" runs weight-only on GPUs for now: its
FP8 GEMM is held back until it passes its GPU tests, see ACT_KINDS there).
The attribute is stored only when set, so weight-only layers keep the manifest entries lowbit
wrote before the option existed.

Attribute `permuted=True` (imports only: GPTQ's desc_act and compressed-tensors' actorder
"group" checkpoints, whose groups gather columns from all over K): field perm int32 [K], stored
column j is input feature perm[j]. The codes are stored in that order, so each group is
consecutive; the kernels gather x[:, perm] first, and dequantize() returns the weight in input
order. Stored only when set; lowbit's own quantizer never writes it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import FormatError, WeightError
from ..packed import MAX_DIM, PackedWeight
from . import bitpack, gptq, register_format
from .activations import dequantize_activations, quantize_activations_fp8, quantize_activations_int8
from .base import FieldSpec, Format, launch
from .division import divide

DEFAULT_GROUP_SIZE = 128
SCALE_DTYPE = torch.float16
_MIN_SCALE = 2.0**-24
_MAX_SCALE = torch.finfo(SCALE_DTYPE).max
#: act -> its dynamic per-token activation quantizer: x [M, K], kp -> (codes [M, kp], fp32 scales [M, 1])
_ACT_QUANTIZERS = {"int8": quantize_activations_int8, "fp8": quantize_activations_fp8}
_ACTS = (None, *_ACT_QUANTIZERS)
#: range factors method="mse" tries per group, largest first (1 = the "rtn" range)
MSE_SHRINK = tuple(1.0 - 0.025 * i for i in range(21))


def padded_k(k: int, group_size: int) -> int:
    """K rounded up to a whole number of groups and of 32 (group sizes are multiples of 32, or
    16: the bit planes hold whole int32 words)."""
    step = math.lcm(group_size, 32)
    return -(-k // step) * step


def _round_scale_up(scale: torch.Tensor) -> torch.Tensor:
    """fp32 positive scales -> float16 scales that are >= the input (next fp16 up if needed)."""
    s16 = scale.to(SCALE_DTYPE)
    low = s16.float() < scale
    # For positive finite halves, the next representable value is the next bit pattern.
    bumped = (s16.view(torch.int16) + 1).view(SCALE_DTYPE)
    return torch.where(low, bumped, s16)


def in_input_order(packed: PackedWeight, perm: torch.Tensor) -> PackedWeight:
    """An int layer whose columns are stored in the order `perm` (int32 [K]: stored column j is
    input feature perm[j]), as `packed` holds them, marked so (attr permuted, field perm): its
    kernels gather x by perm and dequantize() returns the weight in input order."""
    return PackedWeight(packed.format, packed.shape, packed.dtype, {**packed.attrs, "permuted": True},
                        {**packed.tensors, "perm": perm})


class IntFormat(Format):
    """`int{bits}`: group-wise integer weights, symmetric or asymmetric."""

    ATTRS = ("group_size", "symmetric", "act", "permuted")
    OPTIONAL_ATTRS = ("act", "permuted")
    QUANTIZER_OPTIONS = ("method", "act_order")
    METHODS = ("rtn", "mse", "gptq")
    #: bit-plane layout of qweight (see bitpack.py); the LUT formats use one-bit planes
    ONE_BIT_PLANES = False
    #: group sizes below 32 the kernels take (their K tiles then span several groups; GGUF's
    #: Q2_K / Q3_K / Q6_K blocks have groups of 16), besides the multiples of 32
    SMALL_GROUP_SIZES = (16,)

    def __init__(self, bits: int, prefix: str = "int"):
        self.bits = bits
        self.name = f"{prefix}{bits}"
        self.layout = bitpack.layout_version(bits, self.ONE_BIT_PLANES)

    # -- options / attributes -------------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> None:
        self.check_option_names(options)
        gs = options.get("group_size", DEFAULT_GROUP_SIZE)
        if gs != -1:
            self._check_group_size(gs, options.get("act"))
        sym = options.get("symmetric", False)
        if not isinstance(sym, bool) or (sym and self.bits == 1):
            raise FormatError(f"{self.name}: symmetric must be a bool (False for 1 bit), got {sym!r}")
        if options.get("act") not in _ACTS:
            raise FormatError(f"{self.name}: act must be one of {_ACTS}, got {options['act']!r}")
        if "permuted" in options:
            raise FormatError(f"{self.name}: permuted is not a quantizer option (imports of activation-ordered "
                              "checkpoints set it; see act_order for GPTQ's column order)")

    def _check_group_size(self, gs: Any, act: Any, stored: bool = False) -> None:
        """FormatError unless gs is a positive multiple of 32 (up to MAX_DIM when stored) or one of
        SMALL_GROUP_SIZES, and, with act set, at least 32 (the quantized-activation GEMM scales a
        whole K tile's code sums by one group's scale)."""
        if (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or (stored and gs > MAX_DIM)
                or (gs % 32 and gs not in self.SMALL_GROUP_SIZES)):
            per_channel = "" if stored else "-1 (per channel), "
            limit = f" up to {MAX_DIM}" if stored else ""
            small = "".join(f" or {size}" for size in self.SMALL_GROUP_SIZES)
            raise FormatError(f"{self.name}: group_size must be {per_channel}a positive multiple of 32{limit}{small}, "
                              f"got {gs!r}")
        if act is not None and gs < 32:
            raise FormatError(f"{self.name}: act={act!r} needs a group_size of at least 32, got {gs}")

    def resolve_attrs(self, shape: tuple[int, int], options: dict[str, Any]) -> dict[str, Any]:
        self.check_options(options)
        gs = options.get("group_size", DEFAULT_GROUP_SIZE)
        # -1 is one group per output channel, spanning K padded to a multiple of 32; so is any group
        # longer than that, stored as such: the row is not padded out to the group (group_size=2**20
        # would otherwise pack a 64-wide layer into 2**20 codes per row)
        if gs == -1 or gs > padded_k(shape[1], 32):
            gs = padded_k(shape[1], 32)
        attrs = {"group_size": gs, "symmetric": options.get("symmetric", False)}
        if options.get("act") is not None:
            attrs["act"] = options["act"]
        return attrs

    def check_attrs(self, shape: tuple[int, int], attrs: Any) -> dict[str, Any]:
        self.check_attr_keys(attrs)
        self._check_group_size(attrs["group_size"], attrs.get("act"), stored=True)
        if not isinstance(attrs["symmetric"], bool):
            raise FormatError(f"{self.name}: symmetric must be a bool, got {attrs['symmetric']!r}")
        if "act" in attrs and attrs["act"] not in _ACT_QUANTIZERS:  # stored only when set
            raise FormatError(f"{self.name}: act must be one of {sorted(_ACT_QUANTIZERS)} when present, "
                              f"got {attrs['act']!r}")
        if "permuted" in attrs and attrs["permuted"] is not True:  # stored only when set
            raise FormatError(f"{self.name}: permuted must be true when present, got {attrs['permuted']!r}")
        return attrs

    def field_specs(self, shape: tuple[int, int], attrs: dict[str, Any]) -> dict[str, FieldSpec]:
        n, k = shape
        kp = padded_k(k, attrs["group_size"])
        groups = kp // attrs["group_size"]
        specs = {
            "qweight": FieldSpec(torch.int32, (n, kp * self.bits // 32)),
            "scales": FieldSpec(SCALE_DTYPE, (groups, n)),
        }
        if not attrs["symmetric"]:
            specs["zeros"] = FieldSpec(SCALE_DTYPE, (groups, n))
        if attrs.get("permuted"):
            specs["perm"] = FieldSpec(torch.int32, (k,))
        return specs

    def check_data(self, packed: PackedWeight) -> None:
        """FormatError unless a permuted layer's perm holds every input index once (the kernels
        gather x by it: an index out of range would read past x). act="int8" layers: FormatError
        unless every zero point is an integer in [0, 2^b - 1], as
        the quantizer writes them. Their GEMM subtracts the zero point in int32 arithmetic, where a
        fraction would be cut off and a large value overflow (a silently wrong product); weight-only
        kernels decode any float16 zero point as the reference does."""
        if packed.attrs.get("permuted"):
            k = packed.shape[1]
            if not torch.equal(torch.sort(packed.perm.cpu().long()).values, torch.arange(k)):
                raise FormatError(f"{self.name}: perm is not a permutation of the {k} input features")
        if packed.attrs.get("act") != "int8" or "zeros" not in packed.tensors:
            return
        bad = self.first_non_code_zero_point(packed)
        if bad is not None:
            group, column = bad
            raise FormatError(f"{self.name}: zeros[{group}, {column}] = {float(packed.zeros[group, column])!r}: layers "
                              f"with act='int8' need integer zero points in [0, {2**self.bits - 1}]")

    def first_non_code_zero_point(self, packed: PackedWeight) -> tuple[int, int] | None:
        """(group, column) of the first zero point of an asymmetric layer that is not an integer
        code in [0, 2^b - 1] (NaN included), as the quantizer writes them; None when all are."""
        zeros = packed.zeros.float()
        bad = ~((zeros == zeros.round()) & (zeros >= 0) & (zeros <= 2**self.bits - 1))
        return tuple(int(i) for i in bad.nonzero()[0]) if bool(bad.any()) else None

    # -- the spec ---------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, *, name: str = "weight", hessian: torch.Tensor | None = None,
                 **options: Any) -> PackedWeight:
        """[N, K] float weight -> PackedWeight. hessian: fp32 [K, K] Gram matrix of the layer's
        inputs (X^T X / rows), needed by method="gptq" and only by it."""
        weight = self.check_weight(weight, name)
        n, k = weight.shape
        attrs = self.resolve_attrs((n, k), options)
        gs, symmetric = attrs["group_size"], attrs["symmetric"]
        method = options.get("method", "rtn")
        gptq.check_method(method, hessian, name)
        kp = padded_k(k, gs)
        w = torch.nn.functional.pad(weight.float(), (0, kp - k)).reshape(n, kp // gs, gs)

        lo, hi = self._group_range(w, symmetric)
        if bool((self._scale(lo, hi, symmetric) > _MAX_SCALE).any()):
            raise WeightError(f"{name}: values too large for float16 group scales (|w| up to {float(weight.abs().max()):.3g})")
        if method == "gptq":
            def group_params(group):  # (float16 scales, fp32 zero points, fp32 scales) [N] each
                scale16, zero = self._searched_group_params(group, symmetric)
                return scale16, zero, scale16.float()

            def round_column(column, params):
                _, zero, scale = params
                codes = self._codes(column, scale, zero, symmetric)
                return codes, (codes - zero) * scale

            codes, params = gptq.solve(w.reshape(n, kp), gptq.check_hessian(hessian, k, name), gs, group_params,
                                       round_column, name, options.get("act_order", False))
            scale16, zero = (torch.stack([p[i] for p in params], dim=1) for i in (0, 1))  # [N, G] each
            if not bool(torch.isfinite(scale16).all()):  # error feedback grew a group past float16 scales
                raise WeightError(f"{name}: gptq pushed a group's values past float16 scales; use method='rtn'")
        else:
            if method == "mse":
                factor = self._mse_factor(w, lo, hi, symmetric)
                lo, hi = lo * factor, hi * factor
            codes, scale16, zero = self._quantize_groups(w, lo, hi, symmetric)

        tensors = {"scales": scale16.t().contiguous()}
        if not symmetric:
            tensors["zeros"] = zero.reshape(n, -1).to(SCALE_DTYPE).t().contiguous()
        tensors["qweight"] = bitpack.pack(codes.reshape(n, kp).to(torch.int32), self.bits, self.ONE_BIT_PLANES)
        return PackedWeight(self.name, (n, k), weight.dtype, attrs, tensors)

    @staticmethod
    def _group_range(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 weights [..., gs] -> the rule's range (lo, hi) [...] of each group: [-amax, amax]
        when symmetric, else [min(w_min, 0), max(w_max, 0)]."""
        if symmetric:
            hi = w.abs().amax(dim=-1)
            return -hi, hi
        return w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)

    def _scale(self, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> torch.Tensor:
        """fp32 scales of groups with range [lo, hi] (symmetric: lo = -hi = -amax)."""
        return divide(hi, 2 ** (self.bits - 1) - 1) if symmetric else divide(hi - lo, 2**self.bits - 1)

    def _group_params(self, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranges lo / hi [...] -> (float16 scales [...], fp32 zero points [...]; symmetric: the
        constant 2^(b-1))."""
        scale16 = _round_scale_up(self._scale(lo, hi, symmetric).clamp(min=_MIN_SCALE))
        if symmetric:
            return scale16, torch.full_like(lo, 2 ** (self.bits - 1))
        return scale16, torch.round(-lo / scale16.float()).clamp(0, 2**self.bits - 1)

    def _codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool) -> torch.Tensor:
        """fp32 codes round(w / scale) + zero, clamped to [0, 2^b - 1] ([1, 2^b - 1] when symmetric:
        q in [-qmax, qmax]); scale / zero fp32, broadcast against w."""
        return (torch.round(w / scale) + zero).clamp(1 if symmetric else 0, 2**self.bits - 1)

    def _quantize_groups(self, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool):
        """w fp32 [N, G, gs], ranges lo / hi [N, G] -> (codes fp32 [N, G, gs] in [0, 2^b - 1],
        float16 scales [N, G], fp32 zero points [N, G, 1]); the weights decode as
        (codes - zero) * scale."""
        scale16, zero = self._group_params(lo, hi, symmetric)
        zero = zero.unsqueeze(-1)
        return self._codes(w, scale16.float().unsqueeze(-1), zero, symmetric), scale16, zero

    def _mse_factor(self, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool) -> torch.Tensor:
        """fp32 [N, G] factor from MSE_SHRINK per group: the one whose shrunk range [lo*f, hi*f]
        quantizes the group with the least squared error (the first such, so 1 on ties). The
        caller shrinks the range by exactly these fp32 products, so it gets the chosen codes."""
        best_err = best = None
        for value in MSE_SHRINK:
            factor = torch.full_like(lo, value)
            codes, scale16, zero = self._quantize_groups(w, lo * factor, hi * factor, symmetric)
            err = codes.sub_(zero).mul_(scale16.float().unsqueeze(-1)).sub_(w).square_().sum(dim=-1)
            if best is None:
                best_err, best = err, factor
                continue
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, factor, best)
        return best

    def _searched_group_params(self, group: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One group fp32 [N, gs] -> (float16 scales [N], fp32 zero points [N]) of its range shrunk
        by its `_mse_factor`: how method="gptq" sets each group's range when it reaches it."""
        lo, hi = self._group_range(group, symmetric)
        factor = self._mse_factor(group.unsqueeze(1), lo.unsqueeze(1), hi.unsqueeze(1), symmetric).squeeze(1)
        return self._group_params(lo * factor, hi * factor, symmetric)

    def _dequantize(self, packed: PackedWeight) -> torch.Tensor:
        n, k = packed.shape
        gs = packed.attrs["group_size"]
        kp = padded_k(k, gs)
        w = bitpack.unpack(packed.qweight, self.bits, kp, self.ONE_BIT_PLANES).float().reshape(n, kp // gs, gs)
        scale = packed.scales.t().float().unsqueeze(-1)
        if packed.attrs["symmetric"]:
            zero = float(2 ** (self.bits - 1))
        else:
            zero = packed.zeros.t().float().unsqueeze(-1)
        w = w.sub_(zero).mul_(scale).reshape(n, kp)[:, :k]  # (codes - zero) * scale, in place
        if packed.attrs.get("permuted"):  # stored column j is input feature perm[j]
            w = torch.empty_like(w).index_copy_(1, packed.perm.long(), w)
        return w.to(packed.dtype)

    def reference_linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """Weight-only: F.linear(x, dequantize(W)). act="int8" / "fp8": x is quantized per token
        first and the product is taken in fp32 — the W8A8 / W4AFP8 numerics."""
        if packed.attrs.get("act") is None:
            return super().reference_linear(x, packed, bias)
        k = packed.shape[1]
        x_hat = dequantize_activations(*_ACT_QUANTIZERS[packed.attrs["act"]](x.reshape(-1, k), k))
        return self.fp32_linear(x, x_hat, self.dequantize(packed).float(), bias)

    # -- kernels ------------------------------------------------------------------------------
    def triton_linear(self, x2d, packed, bias):
        zeros, group_size = packed.tensors.get("zeros"), packed.attrs["group_size"]
        if packed.attrs.get("permuted"):  # the kernels read K in stored order
            x2d = x2d.index_select(1, packed.perm)
        if packed.attrs.get("act") is not None:
            return launch("quantized_act_linear", x2d, packed.qweight, packed.scales, zeros, bias,
                          packed.attrs["act"], self.bits, group_size, packed.shape[1])
        return launch("dequant_linear", x2d, packed.qweight, packed.scales, zeros, None, bias, self.bits,
                      "int", group_size, 1, "float", packed.shape[1])


for _bits in range(2, 9):
    register_format(IntFormat(_bits))
