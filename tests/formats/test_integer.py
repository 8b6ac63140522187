import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.errors import FormatError, LowbitError, WeightError
from lowbit.formats import bitpack, get_format
from lowbit.formats import integer
from lowbit.formats.integer import padded_k
from lowbit.packed import PackedWeight

INT_FORMATS = [f"int{b}" for b in range(2, 9)]


def test_registry_lists_every_int_width():
    assert set(INT_FORMATS) <= set(lowbit.formats())
    assert lowbit.formats() == sorted(lowbit.formats())
    with pytest.raises(FormatError, match="unknown format 'int9'"):
        lowbit.get_format("int9")


def test_golden_int4_symmetric_ties_to_even():
    # amax 0.875 -> s = 0.875/7 = 0.125 exactly; w/s hits the ties 2.5, 3.5, -2.5, 0.5, 1.5.
    row = [0.875, 0.3125, 0.4375, -0.3125, -0.875, 0.0, 0.0625, 0.1875] + [0.0] * 24
    p = get_format("int4").quantize(torch.tensor([row]), group_size=32, symmetric=True)
    # q = [7, 2, 4, -2, -7, 0, 0, 2]; stored u = q + 8 = [F, A, C, 6, 1, 8, 8, A], LSB first
    assert p.qweight.tolist() == [[0xA8816CAF - 2**32, 0x88888888 - 2**32, 0x88888888 - 2**32, 0x88888888 - 2**32]]
    assert p.scales.dtype == torch.float16 and p.scales.tolist() == [[0.125]]
    assert "zeros" not in p.tensors


def test_golden_int2_asymmetric():
    row = [-1.0, 0.0, 1.0, 2.0] + [0.0] * 28  # lo=-1, hi=2 -> s = 1, z = 1, u = w + 1
    p = get_format("int2").quantize(torch.tensor([row]), group_size=32, symmetric=False)
    assert p.qweight.tolist() == [[0x555555E4, 0x55555555]]
    assert p.scales.tolist() == [[1.0]] and p.zeros.tolist() == [[1.0]]
    assert get_format("int2").dequantize(p).tolist() == [row]


@pytest.mark.parametrize("name", INT_FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shrink", [None, 0.75])
def test_quantizer_matches_spec_formula(name, symmetric, shrink, monkeypatch):
    """Codes, scales and zeros equal an independent fp64 evaluation of the DESIGN.md rules; with
    shrink, of the same rules on the group range scaled by that factor (method="mse" with a
    one-factor search grid)."""
    bits = int(name[3:])
    w = torch.randn(5, 200, generator=torch.Generator().manual_seed(bits)) * 0.05
    if shrink is not None:
        monkeypatch.setattr(integer, "MSE_SHRINK", (shrink,))
    p = get_format(name).quantize(w, group_size=64, symmetric=symmetric, method="rtn" if shrink is None else "mse")
    factor = 1.0 if shrink is None else shrink
    kp = padded_k(200, 64)
    groups = torch.nn.functional.pad(w.double(), (0, kp - 200)).reshape(5, -1, 64)
    s = p.scales.t().double().unsqueeze(-1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        raw = groups.abs().amax(-1, keepdim=True) * factor / qmax
        expected = torch.round(groups / s).clamp(-qmax, qmax) + 2 ** (bits - 1)
    else:
        qmax = 2**bits - 1
        lo, hi = groups.amin(-1, keepdim=True).clamp(max=0), groups.amax(-1, keepdim=True).clamp(min=0)
        lo, hi = lo * factor, hi * factor
        raw = (hi - lo) / qmax
        z = torch.round(-lo / s).clamp(0, qmax)
        assert torch.equal(p.zeros.t().double().unsqueeze(-1), z)
        expected = (torch.round(groups / s) + z).clamp(0, qmax)
    # stored scale is the fp16 value just at or above the exact scale
    assert bool((s >= raw).all()) and bool((s.half().double() == s).all())
    assert bool(((s - raw) <= raw * 2**-10).all())
    codes = bitpack.unpack(p.qweight, bits, kp).reshape(5, -1, 64).double()
    assert torch.equal(codes, expected)


@pytest.mark.parametrize("name", INT_FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step(name, symmetric):
    w = torch.randn(7, 300, generator=torch.Generator().manual_seed(1))
    p = get_format(name).quantize(w, symmetric=symmetric)
    err = (get_format(name).dequantize(p) - w).abs().reshape(7, -1)
    step = p.scales.t().float().repeat_interleave(128, dim=1)[:, :300]
    assert bool((err <= step / 2 * (1 + 1e-5)).all())


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 9), k=st.integers(1, 300), symmetric=st.booleans(),
       group=st.sampled_from([16, 32, 64, 128, -1]), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**31 - 1))
def test_round_trip_property(bits, n, k, symmetric, group, scale, seed):
    """Any shape (K padded, never refused): dequantize(quantize(w)) is within half a step."""
    fmt = get_format(f"int{bits}")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    p = fmt.quantize(w, group_size=group, symmetric=symmetric)
    back = fmt.dequantize(p)
    assert back.shape == w.shape and back.dtype == w.dtype
    gs = p.attrs["group_size"]
    step = p.scales.t().float().repeat_interleave(gs, dim=1)[:, :k]
    assert bool(((back - w).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all())


def test_all_zero_group_gets_a_safe_scale_and_exact_zeros():
    w = torch.zeros(3, 256)
    w[1, 128:] = torch.linspace(-1, 1, 128)
    for symmetric in (True, False):
        p = get_format("int4").quantize(w, symmetric=symmetric)
        assert bool((p.scales.float() > 0).all())
        back = get_format("int4").dequantize(p)
        assert torch.equal(back[0], torch.zeros(256)) and torch.equal(back[1, :128], torch.zeros(128))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_returns_original_dtype(dtype):
    w = torch.randn(4, 64).to(dtype)
    fmt = get_format("int8")
    assert fmt.dequantize(fmt.quantize(w)).dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_raises_naming_the_layer(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(WeightError, match=r"blocks\.3\.up.*\[2, 5\]"):
        get_format("int4").quantize(w, name="blocks.3.up")


@pytest.mark.parametrize("options", [{"group_size": 48}, {"group_size": 8}, {"group_size": 0}, {"group_size": "128"},
                                     {"symmetric": 1}, {"bits": 4}])
def test_bad_options_raise(options):
    with pytest.raises(FormatError):
        get_format("int4").quantize(torch.randn(4, 64), **options)


@pytest.mark.parametrize("weight", [torch.randn(4), torch.randn(2, 3, 4), torch.randn(4, 8).to(torch.int32),
                                    torch.randn(0, 8), "w"])
def test_bad_weights_raise(weight):
    with pytest.raises(LowbitError):
        get_format("int4").quantize(weight)


def test_huge_weights_raise_instead_of_overflowing_fp16_scales():
    with pytest.raises(WeightError, match="too large"):
        get_format("int8").quantize(torch.full((2, 32), 1e9))


def test_groups_of_16_pad_k_to_whole_words():
    """Groups of 16 (GGUF's Q2_K / Q3_K / Q6_K): K is padded to a multiple of 32, so the bit planes
    hold whole words, and a row may end in a group of padding (K = 40: groups 0..1 hold data,
    group 2 holds 8 weights, group 3 none)."""
    w = torch.randn(5, 40)
    for symmetric in (True, False):
        p = get_format("int3").quantize(w, group_size=16, symmetric=symmetric)
        assert p.attrs == {"group_size": 16, "symmetric": symmetric}
        assert p.qweight.shape == (5, 64 * 3 // 32) and p.scales.shape == (4, 5)
        step = p.scales.t().float().repeat_interleave(16, dim=1)[:, :40]
        assert bool(((get_format("int3").dequantize(p) - w).abs() <= step / 2 * (1 + 1e-5)).all())
        get_format("int3").check_attrs((5, 40), p.attrs)


def test_groups_of_16_are_refused_where_no_kernel_takes_them():
    """The LUT formats' lookup kernel and the quantized-activation GEMM scale a whole K tile (>= 32)
    by one group: groups of 16 are a FormatError there, quantizing or loading."""
    with pytest.raises(FormatError, match="lut2: group_size must be .*multiple of 32, got 16"):
        get_format("lut2").quantize(torch.randn(4, 64), group_size=16)
    with pytest.raises(FormatError, match="act='int8' needs a group_size of at least 32, got 16"):
        get_format("int4").quantize(torch.randn(4, 64), group_size=16, act="int8")
    with pytest.raises(FormatError, match="act='fp8' needs a group_size of at least 32"):
        get_format("int4").check_attrs((4, 64), {"group_size": 16, "symmetric": True, "act": "fp8"})


def test_per_channel_group_spans_padded_k():
    p = get_format("int4").quantize(torch.randn(6, 100), group_size=-1)
    assert p.attrs["group_size"] == 128 and p.scales.shape == (1, 6)


@pytest.mark.parametrize("group_size", [256, 4096, 2**40])
def test_a_group_longer_than_the_row_is_one_group_per_row(group_size):
    """Stored as per channel (the group spans K padded to 32), not padded out to the group: the
    same one group per row without the wasted codes (2**40 would not fit in memory)."""
    w = torch.randn(6, 100)
    p = get_format("int3").quantize(w, group_size=group_size)
    per_channel = get_format("int3").quantize(w, group_size=-1)
    assert p.attrs == per_channel.attrs == {"group_size": 128, "symmetric": False}
    assert p.qweight.shape == (6, 128 * 3 // 32)
    assert all(torch.equal(p.tensors[f], per_channel.tensors[f]) for f in p.tensors)


@pytest.mark.parametrize("bits,mean_bound", [(2, 0.53), (3, 0.23), (4, 0.108), (5, 0.052), (6, 0.026),
                                             (7, 0.013), (8, 0.0064)])
def test_minilm_weight_error(minilm_weights, bits, mean_bound):
    """Mean relative Frobenius error on the 37 real MiniLM Linear weights (asym, group 128)."""
    fmt = get_format(f"int{bits}")
    errs = [float((fmt.dequantize(fmt.quantize(w)) - w).norm() / w.norm()) for w in minilm_weights.values()]
    assert sum(errs) / len(errs) <= mean_bound


def test_minilm_error_halves_per_bit(minilm_weights):
    """Uniform quantization: one more bit halves the step, so the error ratio is about 2."""
    w = minilm_weights["encoder.layer.0.intermediate.dense.weight"]
    errs = []
    for bits in range(2, 9):
        fmt = get_format(f"int{bits}")
        errs.append(float((fmt.dequantize(fmt.quantize(w)) - w).norm() / w.norm()))
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(1.8 < r < 2.6 for r in ratios), ratios
    assert math.isclose(errs[-1] * 2**6, errs[0], rel_tol=0.6)


def test_act_is_stored_only_when_set():
    """Weight-only layers keep the attrs lowbit wrote before `act` existed (their manifests are
    unchanged and older files load); act="int8" / "fp8" is stored and validated."""
    w = torch.randn(8, 256)
    assert get_format("int4").quantize(w).attrs == {"group_size": 128, "symmetric": False}
    fmt = get_format("int4")
    for act in ("int8", "fp8"):
        p = fmt.quantize(w, act=act)
        assert p.attrs == {"group_size": 128, "symmetric": False, "act": act}
        assert fmt.check_attrs((8, 256), dict(p.attrs)) == p.attrs
    assert fmt.check_attrs((8, 256), {"group_size": 128, "symmetric": False}) == {"group_size": 128, "symmetric": False}
    for bad in ({"group_size": 128, "symmetric": False, "act": "mxfp8"},
                {"group_size": 128, "symmetric": False, "act": None},
                {"group_size": 128, "symmetric": False, "act": "int8", "x": 1}, {"group_size": 128}):
        with pytest.raises(FormatError, match="act|keys"):
            fmt.check_attrs((8, 256), bad)
    with pytest.raises(FormatError, match="act must be one of"):
        fmt.quantize(w, act="e4m3")
    with pytest.raises(FormatError, match="unknown option.*act"):
        get_format("lut2").quantize(w, act="int8")


def test_permuted_is_an_imported_attribute_not_a_quantizer_option():
    """`permuted` (imports of activation-ordered checkpoints) is stored only as true, with its perm
    field; the quantizer refuses it, and the LUT formats do not take it."""
    fmt, w = get_format("int4"), torch.randn(8, 256)
    attrs = {"group_size": 128, "symmetric": False, "permuted": True}
    assert fmt.check_attrs((8, 256), dict(attrs)) == attrs
    assert fmt.field_specs((8, 256), attrs)["perm"].shape == (256,)
    with pytest.raises(FormatError, match="permuted must be true when present, got False"):
        fmt.check_attrs((8, 256), {**attrs, "permuted": False})
    with pytest.raises(FormatError, match="permuted is not a quantizer option"):
        fmt.quantize(w, permuted=True)
    with pytest.raises(FormatError, match="keys"):
        get_format("lut4").check_attrs((8, 256), attrs)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_act_int8_layers_refuse_zero_points_their_gemm_cannot_take(bits):
    """The int8 GEMM applies zero points in int32: loaded data must hold integers in [0, 2^b - 1]
    (what the quantizer writes, method="mse" included); weight-only layers take any value."""
    fmt = get_format(f"int{bits}")
    w = _outlier_weights(8, 96, seed=bits)
    for method in ("rtn", "mse"):
        fmt.check_data(fmt.quantize(w, act="int8", group_size=32, method=method))
    for value, column in ((0.5, 3), (-1.0, 0), (2.0**bits, 7), (float("nan"), 5)):
        p = fmt.quantize(w, act="int8", group_size=32)
        p.zeros[1, column] = value
        with pytest.raises(FormatError, match=rf"zeros\[1, {column}\] = .*need integer zero points in \[0, {2**bits - 1}\]"):
            fmt.check_data(p)
        weight_only = PackedWeight(p.format, p.shape, p.dtype, {"group_size": 32, "symmetric": False}, p.tensors)
        fmt.check_data(weight_only)  # decoded in float by every weight-only kernel, as by the reference


def test_act_int8_reference_quantizes_each_token():
    """The W8A8 reference: each token to int8 with its own scale amax/127, then the fp32 product
    with the dequantized weight (bias added in fp32)."""
    gen = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(6, 64, generator=gen), torch.randn(3, 2, 64, generator=gen), torch.randn(6, generator=gen)
    p = get_format("int6").quantize(w, act="int8", group_size=32)
    flat = x.reshape(-1, 64)
    scale = flat.abs().amax(dim=1, keepdim=True) / 127
    x_hat = torch.round(flat / scale).clamp(-127, 127) * scale
    expected = (x_hat @ get_format("int6").dequantize(p).t() + b).reshape(3, 2, 6)
    y = lowbit.linear(x, p, b, backend="torch")
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert (y - lowbit.linear(x, get_format("int6").quantize(w, group_size=32), b, backend="torch")).abs().max() > 1e-3


def test_act_fp8_reference_quantizes_each_token_to_e4m3():
    """W4AFP8 (torchao's Float8DynamicActivationInt4WeightConfig, compressed-tensors' W4AFP8): each
    token to E4M3 with its own scale amax/448, then the fp32 product with the dequantized weight.
    (The FP8 tensor-core GEMM is tested against this reference in
    tests/kernels/test_quantized_act.py.)"""
    gen = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(6, 64, generator=gen), torch.randn(3, 2, 64, generator=gen), torch.randn(6, generator=gen)
    fmt = get_format("int4")
    p = fmt.quantize(w, act="fp8", group_size=32, symmetric=True)
    flat = x.reshape(-1, 64)
    scale = flat.abs().amax(dim=1, keepdim=True) / 448
    x_hat = (flat / scale).to(torch.float8_e4m3fn).float() * scale
    expected = (x_hat @ fmt.dequantize(p).t() + b).reshape(3, 2, 6)
    y = lowbit.linear(x, p, b, backend="torch")
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    weight_only = lowbit.linear(x, fmt.quantize(w, group_size=32, symmetric=True), b, backend="torch")
    assert 1e-3 < (y - weight_only).abs().max() < 0.1 * weight_only.abs().max()


# measured min cosine over the demo sentences: int8 act="int8" 0.9963 (asym, group 128), 0.9971 (symmetric
# per channel, torchao's int8 dynamic-activation recipe); weight-only int8 0.9998
@pytest.mark.parametrize("options", [{"act": "int8"}, {"act": "int8", "symmetric": True, "group_size": -1}])
def test_minilm_int8_activations_stay_close(minilm, options):
    import copy

    from lowbit.default_model import DEMO_SENTENCES, sentence_embeddings

    model, tok = minilm
    ref = sentence_embeddings(model, tok, DEMO_SENTENCES)
    quantized = lowbit.quantize(copy.deepcopy(model), "int8", progress=False, **options)
    cos = (sentence_embeddings(quantized, tok, DEMO_SENTENCES) * ref).sum(-1)
    assert float(cos.min()) >= 0.995, cos


# -- method="mse": the clipping range with the least squared error per group --------------------------
def _group_sq_errors(name: str, packed, w: torch.Tensor) -> torch.Tensor:
    """Squared weight error per group [N, G] of `packed` against w [N, K]."""
    gs, (n, k) = packed.attrs["group_size"], w.shape
    diff = get_format(name).dequantize(packed).double() - w.double()
    return torch.nn.functional.pad(diff, (0, padded_k(k, gs) - k)).reshape(n, -1, gs).square().sum(-1)


def _outlier_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian weights with log-normal magnitudes: a few outliers per group, as in trained layers."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * torch.randn(n, k, generator=gen).exp() * 0.02


@pytest.mark.parametrize("name,symmetric", [(f, s) for f in INT_FORMATS for s in (True, False)]
                         + [("lut1", False), ("lut3", False)])
def test_mse_method_is_never_worse_per_group_and_stores_the_same_layout(name, symmetric):
    w = _outlier_weights(16, 300, seed=len(name))
    fmt = get_format(name)
    rtn = fmt.quantize(w, group_size=64, symmetric=symmetric)
    mse = fmt.quantize(w, group_size=64, symmetric=symmetric, method="mse")
    assert mse.attrs == rtn.attrs  # the method is not stored: the layer decodes the same way
    assert {f: (t.dtype, t.shape) for f, t in mse.tensors.items()} == {f: (t.dtype, t.shape) for f, t in rtn.tensors.items()}
    e_rtn, e_mse = _group_sq_errors(name, rtn, w), _group_sq_errors(name, mse, w)
    assert bool((e_mse <= e_rtn).all())
    # measured total error ratio mse / rtn: 0.69 (lut1), 0.74-0.96 (2-4 bits), 0.97-0.99 (5), ~1 (6-8: a
    # range cut by 2.5% clips more than the finer step saves, so the rtn range stays)
    if fmt.bits <= 4:
        assert float(e_mse.sum()) < 0.97 * float(e_rtn.sum()), (float(e_mse.sum()), float(e_rtn.sum()))
    if not symmetric:  # integer zero points in [0, qmax]: every kernel takes them unchanged
        zeros = mse.zeros.float()
        assert torch.equal(zeros, zeros.round()) and bool(((zeros >= 0) & (zeros <= 2**fmt.bits - 1)).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_method_picks_the_least_error_factor_of_its_grid(symmetric, monkeypatch):
    """Per group, the error equals the least over the grid's factors, each quantized alone (a
    one-factor grid): the selection, checked apart from the quantization at each factor."""
    w = _outlier_weights(12, 256, seed=3)
    grid = integer.MSE_SHRINK
    per_factor = []
    for factor in grid:
        monkeypatch.setattr(integer, "MSE_SHRINK", (factor,))
        per_factor.append(_group_sq_errors("int3", get_format("int3").quantize(w, group_size=32, symmetric=symmetric,
                                                                                method="mse"), w))
    monkeypatch.setattr(integer, "MSE_SHRINK", grid)
    best = _group_sq_errors("int3", get_format("int3").quantize(w, group_size=32, symmetric=symmetric, method="mse"), w)
    assert torch.equal(best, torch.stack(per_factor).amin(0))
    chosen = torch.stack(per_factor).argmin(0)  # index of the first factor with the least error
    assert len(set(chosen.flatten().tolist())) > 3, "outlier groups should pick different factors"


def test_mse_method_option_is_checked_and_limited_to_integer_formats():
    w = torch.randn(4, 64)
    with pytest.raises(FormatError, match="method must be one of"):
        get_format("int4").quantize(w, method="awq")
    with pytest.raises(FormatError, match="unknown option.*method"):
        get_format("fp8").quantize(w, method="mse")
    config = lowbit.QuantConfig("lut2", options={"method": "mse", "group_size": 32})
    assert lowbit.QuantConfig.from_dict(config.to_dict()) == config


# measured min cosine over the demo sentences (asym): int4 g128 rtn 0.9421 -> mse 0.9576;
# int2 g64 rtn 0.3454 -> mse 0.6112
@pytest.mark.parametrize("name,options,bound", [("int4", {}, 0.955), ("int2", {"group_size": 64}, 0.59)])
def test_minilm_mse_method_keeps_embeddings_closer(minilm, name, options, bound):
    import copy

    from lowbit.default_model import DEMO_SENTENCES, sentence_embeddings

    model, tok = minilm
    ref = sentence_embeddings(model, tok, DEMO_SENTENCES)
    cosines = {}
    for method in ("rtn", "mse"):
        quantized = lowbit.quantize(copy.deepcopy(model), name, progress=False, method=method, **options)
        cosines[method] = float((sentence_embeddings(quantized, tok, DEMO_SENTENCES) * ref).sum(-1).min())
    assert cosines["mse"] >= bound > cosines["rtn"], cosines
