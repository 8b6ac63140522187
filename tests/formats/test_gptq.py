"""method="gptq" for the integer and LUT formats: the solver against a direct implementation of
the paper's update, its limits (identity Hessian), its errors, and lowbit.quantize's calibration
passes on real models."""
import copy
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit import calibration
from lowbit.errors import FormatError, InputError, WeightError
from lowbit.formats import get_format
from lowbit.formats import gptq as gptq_module
from lowbit.formats.microscaling import GPTQ_WITHOUT_ROTATION_WARNING

# the solver tests use unrotated mxfp4 on purpose; test_mxfp4_gptq_without_rotation_warns checks the warning
pytestmark = pytest.mark.filterwarnings("ignore:mxfp4 with method='gptq'")

WIDTH_CASES = [("int4", {}), ("int3", {"group_size": 32}), ("int4", {"symmetric": True}), ("int2", {"group_size": 64}),
               ("int8", {"group_size": -1}), ("lut2", {}), ("int6", {"group_size": 96})]
MICROSCALING_CASES = [("mxfp4", {}), ("nvfp4", {}), ("mxfp4", {"rotate": "hadamard"}), ("mxfp6", {}),
                      ("mxint8", {"act": "mxint8"}), ("nf4", {}), ("iq4_nl", {})]


def _correlated_inputs(k: int, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """[rows, K] inputs with shared low-rank structure and one large channel (as LLM activations)."""
    mixing = torch.randn(32, k, generator=torch.Generator().manual_seed(1234))  # the distribution
    gen = torch.Generator().manual_seed(seed)  # the sample
    x = torch.randn(rows, 32, generator=gen) @ mixing + 0.3 * torch.randn(rows, k, generator=gen)
    x[:, 3] *= 20
    return x


def _weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def _output_error(x, w, w_hat) -> float:
    return float((x @ (w - w_hat).t()).square().sum() / (x @ w.t()).square().sum())


def _unpacked_element_codes(fmt, packed, bits=None, multiple=32) -> torch.Tensor:
    """fp64 element codes [N, Kp] of a packed microscaling (or codebook: bits=4, multiple=its block) weight."""
    from lowbit.formats import bitpack

    kp = -(-packed.shape[1] // multiple) * multiple
    return bitpack.unpack(packed.qweight, bits or fmt.codec.bits, kp).double()


def _unpacked_codes(fmt, packed) -> torch.Tensor:
    """fp64 codes [N, Kp] of a packed int / lut weight."""
    from lowbit.formats import bitpack
    from lowbit.formats.integer import padded_k

    k = packed.shape[1]
    return bitpack.unpack(packed.qweight, fmt.bits, padded_k(k, packed.attrs["group_size"]), fmt.ONE_BIT_PLANES).double()


def _direct_gptq(w, hessian, group_size, group_params, round_column, act_order=False):
    """The paper's update written out in fp64, column by column, with the explicit inverse
    Hessian of the remaining columns (no Cholesky, no blocks): quantize column j, push
    err / Hinv[j, j] times row j of Hinv onto the later columns, remove j from Hinv. w fp32
    [N, Kp] (padded); returns the codes [N, Kp] as fp64. act_order: the columns by decreasing
    Hessian diagonal (padding last), every group's parameters from w as given."""
    n, kp = w.shape
    k = hessian.shape[0]
    h = torch.zeros(kp, kp, dtype=torch.float64)
    h[:k, :k] = hessian.double()
    order = torch.argsort(h.diagonal().clone(), descending=True, stable=True) if act_order else torch.arange(kp)
    static = [group_params(w[:, g:g + group_size]) for g in range(0, kp, group_size)]
    h = h[order][:, order]
    diagonal = h.diagonal()
    diagonal[diagonal <= 0] = 1.0
    diagonal += gptq_module.DAMPING * diagonal.mean()
    h_inv = torch.linalg.inv(h)
    work = w.double()[:, order]
    codes = torch.empty(n, kp, dtype=torch.float64)
    for j in range(kp):
        column = int(order[j])
        if act_order:
            params = static[column // group_size]
        elif j % group_size == 0:
            params = group_params(work[:, j:j + group_size].float())
        code, value = round_column(work[:, j].float(), params)
        codes[:, column] = code.double()
        err = (work[:, j] - value.double()) / h_inv[j, j]
        work[:, j:] -= err[:, None] * h_inv[j, j:][None, :]
        h_inv = h_inv - h_inv[:, j:j + 1] @ h_inv[j:j + 1, :] / h_inv[j, j]
    return codes


def _int_direct(fmt, w, hessian, packed, act_order=False):
    """_direct_gptq with the integer formats' rules (mse-searched group ranges)."""
    gs, symmetric = packed.attrs["group_size"], packed.attrs["symmetric"]
    kp = -(-w.shape[1] // gs) * gs

    def round_column(column, params):
        scale, zero = params[0].float(), params[1]
        codes = fmt._codes(column, scale, zero, symmetric)
        return codes, (codes - zero) * scale

    return _direct_gptq(torch.nn.functional.pad(w, (0, kp - w.shape[1])), hessian, gs,
                        lambda group: fmt._searched_group_params(group, symmetric), round_column, act_order)


def _nf4_direct(w, hessian, act_order=False):
    """_direct_gptq with NF4's rules (absmax per block of 64, nearest code value)."""
    codebook, nearest_code = get_format("nf4").codebook, get_format("nf4").nearest_code
    kp = -(-w.shape[1] // 64) * 64

    def round_column(column, absmax):
        codes = nearest_code((column / absmax).clamp(-1, 1))
        return codes, codebook()[codes.long()] * absmax

    def block_absmax(block):
        absmax = block.abs().amax(dim=-1)
        return torch.where(absmax > 0, absmax, torch.ones_like(absmax))

    return _direct_gptq(torch.nn.functional.pad(w, (0, kp - w.shape[1])), hessian, 64, block_absmax, round_column,
                        act_order)


def _microscaling_direct(fmt, w, hessian, packed, act_order=False):
    """_direct_gptq with the microscaling rules (scale per block by the spec, elements encoded)."""
    from lowbit.formats.microscaling import rotate_blocks

    kp = -(-w.shape[1] // 32) * 32
    w = torch.nn.functional.pad(w, (0, kp - w.shape[1]))
    tensor_scale = packed.tensors.get("tensor_scale")
    if packed.attrs["rotate"] == "hadamard":
        w = rotate_blocks(w, fmt.block)
        hessian = torch.nn.functional.pad(hessian, (0, kp - hessian.shape[0], 0, kp - hessian.shape[0]))
        r = rotate_blocks(torch.eye(kp), fmt.block)  # the block-diagonal rotation, explicitly
        hessian = r.t() @ hessian @ r

    def round_column(column, scales):
        codes = fmt.encode_elements(column.reshape(-1, 1, 1), scales, tensor_scale).flatten()
        return codes, fmt.codec.decode(codes) * fmt.scale_values(scales, tensor_scale).flatten()

    return _direct_gptq(w, hessian, fmt.block,
                        lambda block: fmt.block_scales(block.abs().amax(dim=-1, keepdim=True), tensor_scale)[0],
                        round_column, act_order)


@pytest.mark.parametrize("name,options", [("int4", {}), ("int3", {"group_size": 32}), ("int4", {"symmetric": True}),
                                          ("lut2", {"group_size": 64}), ("mxfp4", {}), ("nvfp4", {}),
                                          ("mxint8", {"rotate": "hadamard"}), ("nf4", {})])
@pytest.mark.parametrize("act_order", [False, True])
def test_solver_matches_the_direct_update(name, options, act_order):
    """Cholesky factor + blocks + lazy updates give the paper's codes (fp32 vs fp64: a few codes
    may round the other way, so nearly all must agree, and the output error must drop); with
    act_order, in the permuted order with static groups."""
    fmt = get_format(name)
    n, k = 48, 200  # K not a multiple of the group: padding columns
    w, x = _weight(n, k), _correlated_inputs(k)
    x *= torch.logspace(-1, 1, k)[torch.randperm(k, generator=torch.Generator().manual_seed(7))]  # uneven energies
    hessian = x.t() @ x / x.shape[0]
    packed = fmt.quantize(w, method="gptq", hessian=hessian, act_order=act_order, **options)
    if name.startswith(("int", "lut")):
        codes, direct = _unpacked_codes(fmt, packed), _int_direct(fmt, w, hessian, packed, act_order)
    elif name == "nf4":
        codes, direct = _unpacked_element_codes(fmt, packed, bits=4, multiple=64), _nf4_direct(w, hessian, act_order)
    else:
        codes, direct = (_unpacked_element_codes(fmt, packed),
                         _microscaling_direct(fmt, w, hessian, packed, act_order))
    agree = float((codes == direct).double().mean())
    assert agree >= 0.99, agree
    rtn_error = _output_error(x, w, fmt.dequantize(fmt.quantize(w, **options)))
    assert _output_error(x, w, fmt.dequantize(packed)) < 0.5 * rtn_error


@pytest.mark.parametrize("name,options", [("mxfp4", {}), ("nvfp4", {}), ("mxint8", {"rotate": "hadamard"}),
                                          ("mxfp6", {"act": "mxfp6"}), ("nf4", {}), ("iq4_nl", {})])
def test_identity_hessian_is_round_to_nearest_for_microscaling_and_codebooks(name, options):
    """Microscaling and codebook (nf4, iq4_nl) scales follow the spec rule (no range search): with an identity
    Hessian (rotated: still the identity) GPTQ's layer equals the plain quantizer's, byte for byte."""
    fmt = get_format(name)
    w = _weight(40, 320)
    gptq = fmt.quantize(w, method="gptq", hessian=torch.eye(320), **options)
    plain = fmt.quantize(w, **options)
    assert gptq.attrs == plain.attrs and set(gptq.tensors) == set(plain.tensors)
    for field, tensor in plain.tensors.items():
        assert torch.equal(gptq.tensors[field].view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn
                           else gptq.tensors[field], tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn
                           else tensor), field


@pytest.mark.parametrize("name,options", WIDTH_CASES)
def test_identity_hessian_is_the_mse_method(name, options):
    """With uncorrelated unit inputs no error has anywhere to go: GPTQ's codes, scales and zero
    points are exactly method="mse"'s."""
    fmt = get_format(name)
    w = _weight(40, 320)
    gptq = fmt.quantize(w, method="gptq", hessian=torch.eye(320), **options)
    mse = fmt.quantize(w, method="mse", **options)
    assert gptq.attrs == mse.attrs and set(gptq.tensors) == set(mse.tensors)
    for field, tensor in mse.tensors.items():
        assert torch.equal(gptq.tensors[field], tensor), field


@pytest.mark.parametrize("name,options", WIDTH_CASES + MICROSCALING_CASES)
def test_output_error_on_correlated_inputs(name, options):
    """On inputs with shared structure GPTQ cuts the layer's output error well below rtn's (and
    mse's, where the format has it), on held-out inputs of the same distribution too; zero
    points stay integers in range."""
    fmt = get_format(name)
    n, k = 64, 384
    w = _weight(n, k)
    calib, held_out = _correlated_inputs(k, seed=0), _correlated_inputs(k, seed=5)
    packed = fmt.quantize(w, method="gptq", hessian=calib.t() @ calib / calib.shape[0], **options)
    methods = ("rtn", "mse") if name.startswith(("int", "lut")) else ("rtn",)
    errors = {method: _output_error(held_out, w, fmt.dequantize(fmt.quantize(w, method=method, **options)))
              for method in methods}
    gptq_error = _output_error(held_out, w, fmt.dequantize(packed))
    assert gptq_error < 0.5 * min(errors.values()), (gptq_error, errors)
    if "zeros" in packed.tensors:
        zeros = packed.zeros.float()
        assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 2**fmt.bits - 1


def _uneven_inputs(k: int, seed: int) -> torch.Tensor:
    """_correlated_inputs with channel energies spread over two decades (a fixed spread: the same
    distribution for every seed), so the order GPTQ takes the columns in matters."""
    spread = torch.logspace(-1, 1, k)[torch.randperm(k, generator=torch.Generator().manual_seed(99))]
    return _correlated_inputs(k, seed=seed) * spread


def test_activation_order_is_by_decreasing_energy_with_padding_last():
    hessian = torch.diag(torch.tensor([1.0, 5.0, 0.0, 5.0, 3.0]))
    assert gptq_module.activation_order(hessian, 8).tolist() == [1, 3, 4, 0, 2, 5, 6, 7]


@pytest.mark.parametrize("name,options", WIDTH_CASES + MICROSCALING_CASES)
def test_act_order_groups_are_static(name, options):
    """act_order sets every group's scale (and zero point) from the weight as given: the stored
    scales equal the plain quantizer's (method="mse"'s range search for int / lut, the spec rule
    otherwise), and the column taken first, which no error has reached, has its codes too."""
    fmt = get_format(name)
    n, k = 40, 320
    w, x = _weight(n, k), _uneven_inputs(k, seed=0)
    hessian = x.t() @ x / x.shape[0]
    packed = fmt.quantize(w, method="gptq", hessian=hessian, act_order=True, **options)
    plain = fmt.quantize(w, **({"method": "mse"} if name.startswith(("int", "lut")) else {}), **options)
    for field, tensor in plain.tensors.items():
        if field != "qweight":
            assert torch.equal(packed.tensors[field].view(torch.uint8), tensor.view(torch.uint8)), field
    if options.get("rotate") == "hadamard":  # GPTQ runs on the rotated weight, with the Hessian rotated too
        from lowbit.formats.microscaling import rotate_blocks

        r = rotate_blocks(torch.eye(k), fmt.block)
        hessian = r.t() @ hessian @ r
    first = int(gptq_module.activation_order(hessian, k)[0])
    if name.startswith(("int", "lut")):
        codes, plain_codes = _unpacked_codes(fmt, packed), _unpacked_codes(fmt, plain)
    else:
        bits, multiple = (4, 64) if name == "nf4" else (4, 32) if name == "iq4_nl" else (None, 32)
        codes = _unpacked_element_codes(fmt, packed, bits, multiple)
        plain_codes = _unpacked_element_codes(fmt, plain, bits, multiple)
    assert torch.equal(codes[:, first], plain_codes[:, first])
    assert not torch.equal(codes, plain_codes)


@pytest.mark.parametrize("name,options", WIDTH_CASES + MICROSCALING_CASES)
def test_act_order_lowers_the_output_error_on_uneven_inputs(name, options):
    """Where input channels differ in energy (as in LLM activations), taking the strong ones first
    lowers GPTQ's output error on held-out inputs of the same distribution. Measured ratio (act_order
    / K order): 0.42-0.66 from 3 bits up; 0.95 for int2 and 0.98 for lut2 (two bits leave little
    to move), 0.93 for Hadamard-rotated mxfp4 (the rotation evens the energies out)."""
    fmt = get_format(name)
    n, k = 64, 384
    w = _weight(n, k)
    calib, held_out = _uneven_inputs(k, seed=0), _uneven_inputs(k, seed=5)
    hessian = calib.t() @ calib / calib.shape[0]
    errors = {act_order: _output_error(held_out, w, fmt.dequantize(
        fmt.quantize(w, method="gptq", hessian=hessian, act_order=act_order, **options))) for act_order in (False, True)}
    bound = 0.995 if name in ("int2", "lut2") or options.get("rotate") else 0.75
    assert errors[True] < bound * errors[False], errors


def test_act_order_errors():
    w = _weight(8, 64)
    with pytest.raises(FormatError, match="int4: act_order=True orders GPTQ's columns: it needs method='gptq', got "
                                          "method='mse'"):
        get_format("int4").quantize(w, method="mse", act_order=True)
    with pytest.raises(FormatError, match="nf4: act_order=True .* got method='rtn'"):
        get_format("nf4").quantize(w, act_order=True)
    with pytest.raises(FormatError, match="mxfp4: act_order must be a bool, got 'yes'"):
        get_format("mxfp4").quantize(w, method="gptq", hessian=torch.eye(64), act_order="yes")
    with pytest.raises(FormatError, match="unknown option"):
        get_format("fp8").quantize(w, act_order=True)
    assert "act_order" not in get_format("int4").quantize(w, act_order=False).attrs  # never stored


def test_dead_inputs_and_padding_take_no_error():
    """Inputs that never fire (zero Hessian rows) neither receive nor pass on error: a weight
    whose inputs are all dead quantizes exactly as method="mse"."""
    fmt = get_format("int4")
    w = _weight(16, 256)
    x = _correlated_inputs(256)
    x[:, 128:] = 0.0  # the second group's inputs never fire
    packed = fmt.quantize(w, method="gptq", hessian=x.t() @ x / x.shape[0], group_size=128)
    mse = fmt.quantize(w, method="mse", group_size=128)
    w_gptq, w_mse = fmt.dequantize(packed), fmt.dequantize(mse)
    assert not torch.equal(w_gptq[:, :128], w_mse[:, :128])  # live group: GPTQ's own codes
    assert torch.equal(w_gptq[:, 128:], w_mse[:, 128:])  # dead group: nothing reached it
    assert torch.equal(fmt.quantize(w, method="gptq", hessian=torch.zeros(256, 256)).qweight, mse.qweight)


def test_hessian_and_method_errors():
    fmt = get_format("int4")
    w = _weight(8, 64)
    with pytest.raises(FormatError, match="layer.0: method='gptq' needs the layer's input Hessian"):
        fmt.quantize(w, name="layer.0", method="gptq")
    with pytest.raises(FormatError, match="only used by method='gptq', not 'mse'"):
        fmt.quantize(w, method="mse", hessian=torch.eye(64))
    with pytest.raises(WeightError, match=r"layer.0: hessian must be a \[64, 64\] tensor.*\(32, 32\)"):
        fmt.quantize(w, name="layer.0", method="gptq", hessian=torch.eye(32))
    bad = torch.eye(64)
    bad[3, 5] = float("nan")
    with pytest.raises(WeightError, match="non-finite"):
        fmt.quantize(w, method="gptq", hessian=bad)
    indefinite = torch.eye(64)
    indefinite[0, 1] = indefinite[1, 0] = 5.0
    with pytest.raises(WeightError, match="not positive semi-definite"):
        fmt.quantize(w, method="gptq", hessian=indefinite)
    with pytest.raises(FormatError, match="unknown option"):
        get_format("fp8").quantize(w, method="gptq")
    with pytest.raises(FormatError, match="nf4: method='gptq' does not combine with double_quant"):
        get_format("nf4").quantize(w, method="gptq", double_quant=True, hessian=torch.eye(64))
    with pytest.raises(FormatError, match="nvfp4: method must be one of"):
        get_format("nvfp4").quantize(w, method="mse")
    with pytest.raises(FormatError, match="layer.1: method='gptq' needs the layer's input Hessian"):
        get_format("mxfp4").quantize(w, name="layer.1", method="gptq")
    with pytest.raises(WeightError, match=r"hessian must be a \[64, 64\] tensor"):
        get_format("mxfp4").quantize(w, method="gptq", hessian=torch.eye(65))
    assert "method" not in get_format("mxfp4").quantize(w, method="rtn").attrs


def test_hessian_chunks_respect_the_budget():
    """(name, K, Hessians): a fused expert weight ("experts") holds one Hessian per expert."""
    layers = [("a", 64, 1), ("b", 64, 1), ("c", 128, 1), ("d", 512, 1), ("e", 64, 1), ("experts", 64, 5), ("f", 64, 1)]
    budget = 4 * (64 * 64 * 2 + 128 * 128)
    assert calibration.hessian_chunks(layers, budget) == [["a", "b", "c"], ["d"], ["e", "experts"], ["f"]]
    assert calibration.hessian_chunks(layers, 1) == [[name] for name, _, _ in layers]


# --- lowbit.quantize with calibration, on the real MiniLM ---------------------------------------

# measured min cosine over the demo sentences, calibrated on lowbit's built-in sentences (disjoint):
# int4 rtn 0.9421 / mse 0.9576 / gptq 0.9764; int2 g64 rtn 0.3454 / mse 0.6112 / gptq 0.6875
@pytest.mark.parametrize("name,options,bound", [("int4", {}, 0.97), ("int2", {"group_size": 64}, 0.65)])
def test_minilm_gptq_beats_rtn_and_mse(minilm, name, options, bound):
    from lowbit.default_model import DEMO_SENTENCES, sentence_embeddings

    model, tok = minilm
    ref = sentence_embeddings(model, tok, DEMO_SENTENCES)
    batches = calibration.tokenized_batches(tok, calibration.builtin_sentences())
    assert not set(calibration.builtin_sentences()) & set(DEMO_SENTENCES)
    cosines = {}
    for method in ("rtn", "mse", "gptq"):
        extra = {"calibration": batches} if method == "gptq" else {}
        quantized = lowbit.quantize(copy.deepcopy(model), name, progress=False, method=method, **options, **extra)
        cosines[method] = float((sentence_embeddings(quantized, tok, DEMO_SENTENCES) * ref).sum(-1).min())
    assert cosines["gptq"] >= bound > max(cosines["rtn"], cosines["mse"]), cosines


def test_minilm_gptq_makes_hadamard_rotation_pay_for_mxfp4(minilm):
    """Rotation alone hurts mxfp4 on MiniLM (min cosine 0.9574 -> 0.9221 over the demo
    sentences); with GPTQ on top it gives 0.9690. (Without rotation GPTQ hurts mxfp4 here:
    0.9269, see the README.)"""
    from lowbit.default_model import DEMO_SENTENCES, sentence_embeddings

    model, tok = minilm
    ref = sentence_embeddings(model, tok, DEMO_SENTENCES)
    batches = calibration.tokenized_batches(tok, calibration.builtin_sentences())
    cosines = {}
    for method in ("rtn", "gptq"):
        extra = {"calibration": batches} if method == "gptq" else {}
        quantized = lowbit.quantize(copy.deepcopy(model), "mxfp4", rotate="hadamard", method=method, progress=False,
                                    **extra)
        cosines[method] = float((sentence_embeddings(quantized, tok, DEMO_SENTENCES) * ref).sum(-1).min())
    assert cosines["gptq"] >= 0.96 > cosines["rtn"], cosines


def test_mxfp4_gptq_without_rotation_warns():
    """The one combination measured to lose accuracy on MiniLM warns; the rotated one and the
    other block formats do not."""
    import warnings

    w, hessian = _weight(16, 64), torch.eye(64)
    with pytest.warns(UserWarning) as caught:
        get_format("mxfp4").quantize(w, method="gptq", hessian=hessian)
    assert [str(c.message) for c in caught] == [GPTQ_WITHOUT_ROTATION_WARNING]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_format("mxfp4").quantize(w, method="gptq", hessian=hessian, rotate="hadamard")
        get_format("nvfp4").quantize(w, method="gptq", hessian=hessian)
        get_format("mxfp4").quantize(w)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.unused = nn.Linear(64, 96), nn.Linear(96, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_calibration_passes_run_on_the_partly_quantized_model(monkeypatch):
    """With a budget of one Hessian per pass, each layer is calibrated in its own pass, after the
    layers before it are quantized: the second layer's Hessian comes from the quantized first."""
    torch.manual_seed(0)
    model = _TwoLayers()
    batches = [torch.randn(16, 64) for _ in range(3)]
    seen = []
    real_collect = calibration.collect_hessians

    def collect(model_, layers, batches_, progress):
        seen.append((sorted(layers), type(model_.first).__name__))
        return real_collect(model_, layers, batches_, progress)

    monkeypatch.setattr("lowbit.api.collect_hessians", collect)
    monkeypatch.setattr("lowbit.api.hessian_chunks",
                        lambda layers: calibration.hessian_chunks(layers, budget=4 * 96 * 96))
    reference = copy.deepcopy(model)
    lowbit.quantize(model, "int4", method="gptq", calibration=batches, skip=["unused"], group_size=32,
                    progress=False)
    assert seen == [(["first"], "Linear"), (["second"], "QuantLinear")]
    # the second layer was solved with the Hessian of the quantized first layer's outputs
    after = real_collect(model, {"second": model.second}, batches, False)["second"]
    before = real_collect(reference, {"second": reference.second}, batches, False)["second"]
    assert not torch.allclose(after, before)
    fmt = lowbit.get_format("int4")
    weight = reference.second.weight.detach()
    assert torch.equal(model.second.qweight, fmt.quantize(weight, method="gptq", group_size=32, hessian=after).qweight)
    assert not torch.equal(model.second.qweight, fmt.quantize(weight, method="gptq", group_size=32, hessian=before).qweight)


def test_quantize_calibration_errors():
    model = _TwoLayers()
    batches = [torch.randn(4, 64)]
    with pytest.raises(InputError, match="layer 'first': method='gptq' needs calibration"):
        lowbit.quantize(copy.deepcopy(model), "int4", method="gptq", group_size=32, progress=False)
    with pytest.raises(InputError, match="only used by method='gptq'"):
        lowbit.quantize(copy.deepcopy(model), "int4", calibration=batches, progress=False)
    with pytest.raises(InputError, match="calibration must be a non-empty list"):
        lowbit.quantize(copy.deepcopy(model), "int4", method="gptq", calibration="some text", progress=False)
    with pytest.raises(InputError, match=r"calibration\[1\]: expected a tensor or a dict"):
        lowbit.quantize(copy.deepcopy(model), "int4", method="gptq", calibration=[batches[0], [1, 2]], progress=False)
    with pytest.raises(InputError, match=r"calibration\[0\]: the model's forward failed: RuntimeError"):
        lowbit.quantize(copy.deepcopy(model), "int4", method="gptq", calibration=[torch.randn(4, 63)], progress=False)
    untouched = copy.deepcopy(model)
    with pytest.raises(InputError, match="layer 'unused' received no input"):
        lowbit.quantize(untouched, "int4", method="gptq", calibration=batches, group_size=32, progress=False)
    assert all(isinstance(m, nn.Linear) for m in (untouched.first, untouched.second, untouched.unused))
    assert untouched.training  # the calibration pass restored the mode it found


def test_gptq_is_refused_for_quantize_while_loading(tmp_path):
    """Loading cannot run calibration batches (fused MoE experts calibrate with lowbit.quantize:
    tests/integrations/test_moe.py)."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(FormatError, match="quantizing while loading cannot run"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=lowbit.HfQuantConfig(
            format="int4", method="gptq", skip=["*.experts.*"]))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_model_saves_and_loads_like_any_other(tiny_llama_dir, tmp_path, act_order):
    """The config records method='gptq' (an option, not an attribute), and act_order; loading the
    saved folder needs no calibration and gives the same logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    lowbit.quantize(model, "int4", method="gptq", calibration=[ids, {"input_ids": ids[:1]}], group_size=32,
                    skip=["lm_head"], progress=False, act_order=act_order)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "hf")
    lowbit.save(model, tmp_path / "lowbit")
    for folder in ("hf", "lowbit"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config["quantization_config"]["options"]["method"] == "gptq"
        assert config["quantization_config"]["options"]["act_order"] is act_order
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, logits), folder
