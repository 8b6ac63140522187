import copy
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.api import tied_linears
from lowbit.errors import FormatError, InputError, WeightError

from .conftest import make_tiny_llama, nudge_norm_weights, requires_gpu
from .test_io import EVERY_FORMAT


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(64, 96)
        self.down_proj = nn.Linear(96, 64)
        self.gate = nn.Linear(64, 2)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x))) + self.gate(x).sum(-1, keepdim=True)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(64, 10))


def _formats(model):
    return {n: (m.format if isinstance(m, lowbit.QuantLinear) else "dense")
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, lowbit.QuantLinear))}


def test_quantize_in_place_returns_model():
    model = _model()
    assert lowbit.quantize(model, "int4", progress=False) is model
    assert set(_formats(model).values()) == {"int4"}


def test_skip_and_overrides_by_glob():
    model = lowbit.quantize(_model(), "int4", skip=["2", "*.gate"], overrides={"*.down_proj": "int8",
                            "1.up_proj": {"format": "int6", "group_size": 32}}, progress=False)
    f = _formats(model)
    assert f["2"] == "dense" and f["0.gate"] == "dense" and f["1.gate"] == "dense"
    assert f["0.down_proj"] == "int8" and f["1.down_proj"] == "int8"
    assert f["0.up_proj"] == "int4" and f["1.up_proj"] == "int6"
    assert model[1].up_proj.attrs["group_size"] == 32
    assert model[0].up_proj.attrs["group_size"] == 64  # the default 128 is longer than the 64-wide row


def test_quantize_needs_a_module():
    with pytest.raises(lowbit.LowbitError, match="model must be a torch.nn.Module, got dict"):
        lowbit.quantize({"0": nn.Linear(64, 8)}, "int4")


def test_a_linear_whose_weight_is_shared_stays_dense():
    """The same weight under two names (a head tied to an embedding, or one module reached
    twice): replacing the Linear at one name would leave the dense weight stored as well."""
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.body, self.head = nn.Embedding(8, 64), nn.Linear(64, 64), nn.Linear(64, 8, bias=False)
            self.head.weight = self.embed.weight
            self.twice = nn.Sequential(self.body, nn.ReLU(), self.body)

    model = TiedHead()
    assert tied_linears(model) == {"head", "body"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tied layers are logged, not warned about as "nothing to quantize"
        lowbit.quantize(model, "int4", progress=False)
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert model.twice[0] is model.twice[2] is model.body and type(model.body) is nn.Linear


def test_a_model_without_linear_layers_gets_a_warning():
    with pytest.warns(UserWarning, match=r"Sequential has no nn.Linear \(or Conv1D\) layer or MoE expert weight "
                                         r"to quantize"):
        lowbit.quantize(nn.Sequential(nn.Conv1d(4, 4, 1)), "int4", progress=False)


def test_a_lone_skip_string_is_one_pattern():
    """skip="2" means the layer called 2, not one pattern per character."""
    assert _formats(lowbit.quantize(_model(), "int4", skip="*.gate", progress=False))["0.gate"] == "dense"
    assert lowbit.QuantConfig("int4", skip="lm_head").skip == ("lm_head",)
    assert lowbit.QuantConfig.from_dict({"format": "int4", "skip": "lm_head"}).skip == ("lm_head",)


@pytest.mark.parametrize("field,value,match", [
    ("options", ["group_size", 64], "options must be a mapping"),
    ("options", 0, "options must be a mapping"),
    ("overrides", "*.gate", "overrides must be a mapping"),
    ("overrides", [["*.gate", "int8"]], "overrides must be a mapping"),
    ("skip", 5, "skip must be a glob pattern or a list of them"),
    ("skip", {"lm_head": True}, "skip must be a glob pattern or a list of them"),
    ("skip", ["lm_head", 3], "skip must be a glob pattern or a list of them"),
])
def test_config_fields_of_the_wrong_type_are_format_errors(field, value, match):
    """What from_dict reads from JSON can have any type: each wrong one is named, never a TypeError."""
    with pytest.raises(FormatError, match=match):
        lowbit.QuantConfig.from_dict({"format": "int4", field: value})


def test_quant_config_object_and_round_trip():
    cfg = lowbit.QuantConfig("int4", options={"group_size": 64}, skip=("2",), overrides={"*.gate": "int8"})
    assert lowbit.QuantConfig.from_dict(cfg.to_dict()) == cfg
    model = lowbit.quantize(_model(), cfg, progress=False)
    assert model[0].up_proj.attrs["group_size"] == 64 and model[0].gate.format == "int8"
    with pytest.raises(FormatError):
        lowbit.quantize(_model(), cfg, skip=["x"])


@pytest.mark.parametrize("kwargs", [{"config": "int11"}, {"config": "int4", "group_size": 33},
                                    {"config": "int4", "overrides": {"*.gate": "nope"}},
                                    {"config": "int4", "overrides": {"*.gate": 4}}])
def test_bad_config_raises_lowbit_error(kwargs):
    with pytest.raises(lowbit.LowbitError):
        lowbit.quantize(_model(), kwargs.pop("config"), progress=False, **kwargs)


def test_config_version_is_checked():
    with pytest.raises(FormatError, match="version"):
        lowbit.QuantConfig.from_dict({"format": "int4", "version": 99})
    with pytest.raises(FormatError, match="version"):
        lowbit.QuantConfig.from_dict({"format": "int4", "version": True})
    # version 1 (before layers recorded their packed layout) has the same schema and still reads
    assert lowbit.QuantConfig.from_dict({"format": "int4", "version": 1}).version == 1
    assert lowbit.QuantConfig("int4").version == 2


def test_nan_weight_error_names_the_layer():
    model = _model()
    with torch.no_grad():
        model[1].down_proj.weight[3, 4] = float("nan")
    with pytest.raises(WeightError, match=r"'?1\.down_proj"):
        lowbit.quantize(model, "int4", progress=False)


def test_quantized_model_output_close_to_dense():
    model = _model()
    x = torch.randn(4, 64)
    ref = model(x)
    lowbit.quantize(model, "int8", progress=False)
    assert (model(x) - ref).abs().max() < 0.01 * ref.abs().max()


def test_progress_bar_is_shown(capsys):
    lowbit.quantize(_model(), "int4")
    assert "lowbit quantize (int4)" in capsys.readouterr().err


def test_summarize_counts_packed_bits_and_every_tensor():
    from lowbit.api import summarize

    model = _model()
    dense = summarize(model)
    assert dense.quantized_layers == 0 and dense.bits_per_weight == 0.0
    assert dense.total_bytes == 4 * sum(p.numel() for p in model.parameters())
    lowbit.quantize(model, "int4", symmetric=True, group_size=32, skip=["*.gate"], progress=False)
    summary = summarize(model)
    assert summary.quantized_layers == 5
    assert summary.quantized_weights == 2 * (64 * 96 + 96 * 64) + 64 * 10
    # symmetric int4, group 32: 4 bits + one fp16 scale per 32 weights; K=96 and 64 need no padding
    assert summary.bits_per_weight == pytest.approx(4 + 16 / 32)
    assert summary.total_bytes < dense.total_bytes / 4


def test_dequantize_restores_linear_layers_with_the_dequantized_weights():
    model = lowbit.quantize(_model(), "int4", skip="0.gate", progress=False)
    packed = {n: (lowbit.get_format(m.format).dequantize(m.packed), m.bias)
              for n, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}
    x = torch.randn(3, 64)
    expected = model(x)
    assert lowbit.dequantize(model) is model
    assert not any(isinstance(m, lowbit.QuantLinear) for m in model.modules())
    for name, (weight, bias) in packed.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_dequantize_dfloat11_gives_back_the_original_model_and_layer_kinds(tmp_path):
    """Lossless, so every tensor is the original's; GPT-2's Conv1D layers come back as Conv1D
    (stored [in, out]), so save_pretrained / from_pretrained of the result work as for the original."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    original = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)).to(torch.bfloat16).eval()
    model = lowbit.quantize(copy.deepcopy(original), "dfloat11", progress=False)
    lowbit.enable_block_decompression(model, min_tokens=1)
    model = model.dequantize()  # transformers' API
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert model.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    assert not any(m._forward_pre_hooks for m in model.modules())  # the block decompression hooks went too
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()(ids).logits,
                           original(ids).logits)


def test_dequantize_to_a_dtype_and_refuses_others():
    model = lowbit.quantize(_model(), "int8", progress=False)
    with pytest.raises(InputError, match="dtype must be one of"):
        lowbit.dequantize(model, torch.int8)
    lowbit.dequantize(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- quantizing a model that lives on the GPU -----------------------------------------------------

GPTQ_CASES = [("int4", {}), ("nvfp4", {}), ("mxfp4", {"rotate": "hadamard"}), ("nf4", {})]


def _packed_layers(model) -> dict:
    return {name: m.packed for name, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}


def check_quantizing_on_device_matches_the_cpu(device: str, fmt: str, options: dict, calibrate: bool = False,
                                               agreement: float | None = 1.0, make_model=None,
                                               quality: float | None = None) -> None:
    """Quantize the same model (default: a tiny bf16 Llama; make_model() builds another) on the
    CPU and on `device`; the packed tensors stay on `device` and match the CPU's bit for bit
    (agreement=1.0), or, where fp32 sums may round differently between devices, dequantize to the
    same values in at least `agreement` of the weights (None: not compared). calibrate:
    method="gptq" on calibration batches on each device. quality: on held-out tokens, run on the
    CPU, the device-quantized model's logits are at most `quality` times as far from the
    unquantized model's as the CPU-quantized model's (`held_out_error`)."""
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    make_model = make_model or (lambda: make_tiny_llama(dtype=torch.bfloat16))
    layers, errors = [], []
    for where in ("cpu", device):
        extra = {"method": "gptq", "calibration": [ids.to(where)]} if calibrate else {}
        model = lowbit.quantize(make_model().to(where), fmt, skip=["lm_head"], progress=False, **options, **extra)
        layers.append(_packed_layers(model))
        if quality is not None:
            errors.append(held_out_error(model.to("cpu"), make_model()))  # the packed layers above stay put
    on_cpu, on_device = layers
    assert on_cpu.keys() == on_device.keys() and on_cpu
    for name, packed in on_device.items():
        assert all(t.device.type == device for t in packed.tensors.values()), name
        expected = on_cpu[name]
        if agreement == 1.0:
            for field, tensor in expected.tensors.items():
                assert torch.equal(packed.tensors[field].cpu(), tensor), (name, field)
        elif agreement is not None:
            spec = lowbit.get_format(fmt)
            same = spec.dequantize(packed).cpu() == spec.dequantize(expected)
            assert same.float().mean() >= agreement, (name, float(same.float().mean()))
    if quality is not None:
        assert errors[1] <= quality * errors[0], errors


def held_out_error(quantized: nn.Module, original: nn.Module) -> float:
    """||logits(quantized) - logits(original)|| / ||logits(original)|| on 48 held-out tokens (both on the CPU)."""
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = original(ids).logits.float()
        return float((quantized(ids).logits.float() - reference).norm() / reference.norm())


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_gpu_quantizing_on_cuda_matches_the_cpu(fmt, options):
    """The quantizers are the spec on any device: a model on the GPU is quantized there, to the
    CPU's bits. Rotation (a matmul) and mse's range search (sums) may round differently."""
    exact = options.get("rotate") is None and options.get("method") is None
    check_quantizing_on_device_matches_the_cpu("cuda", fmt, options, agreement=1.0 if exact else 0.999)


#: how much worse than the CPU's GPTQ the GPU's may be, in held-out logits error: on the CPU, the
#: nudge of `test_gptq_quality_is_stable_where_its_codes_are_not` moves it by at most 3%
GPTQ_QUALITY = 1.1


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("fmt,options", GPTQ_CASES, ids=lambda v: str(v))
def test_gpu_gptq_on_cuda_matches_the_cpu(fmt, options):
    """Calibration and GPTQ run on the model's device. A rounding that flips between devices
    propagates to later columns, so codes agree nearly, not exactly: at least 97% of the values,
    except with a Hadamard rotation, under which GPTQ's codes follow small input changes several
    times more (the first H100 run: mxfp4 with rotation under 97%, the others above;
    `test_gptq_quality_is_stable_where_its_codes_are_not` shows the same on the CPU). Every case
    must match the CPU's quality on held-out tokens (GPTQ_QUALITY)."""
    check_quantizing_on_device_matches_the_cpu("cuda", fmt, options, calibrate=True,
                                               agreement=None if options.get("rotate") else 0.97,
                                               quality=GPTQ_QUALITY)


@pytest.mark.parametrize("fmt,options", GPTQ_CASES, ids=lambda v: str(v))
def test_gptq_quality_is_stable_where_its_codes_are_not(fmt, options):
    """Why the GPU GPTQ test holds rotated cases to quality, not code agreement: nudging a fifth
    of the norm weights by one ulp changes GPTQ's values far more with a Hadamard rotation
    (mxfp4: 13% of them on average, 29% in the worst layer; nvfp4 11%, measured) than without
    (int4, nvfp4, nf4, mxfp4: 1%, 4%, 3%, 2%), and not through mxfp4's power-of-two scales (0.2%
    of its blocks changed scale, holding 1.3% of its changed values), while the held-out error
    of every format moves by at most 3%, well inside GPTQ_QUALITY."""
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    gptq = {"method": "gptq", "calibration": [ids], "skip": ["lm_head"], "progress": False}
    errors, layers = [], []
    for build in (lambda: make_tiny_llama(dtype=torch.bfloat16),
                  lambda: nudge_norm_weights(make_tiny_llama(dtype=torch.bfloat16))):
        model = lowbit.quantize(build(), fmt, **options, **gptq)
        errors.append(held_out_error(model, build()))
        layers.append(_packed_layers(model))
    assert errors[1] <= GPTQ_QUALITY * errors[0] and errors[0] <= GPTQ_QUALITY * errors[1], errors
    spec = lowbit.get_format(fmt)
    changed = [float((spec.dequantize(layers[0][n]) != spec.dequantize(layers[1][n])).float().mean())
               for n in layers[0]]
    assert max(changed) > 0  # the nudge reaches GPTQ's decisions
    if options.get("rotate"):
        assert sum(changed) / len(changed) > 0.05, changed
    else:
        assert sum(changed) / len(changed) < 0.05, changed


def test_a_second_quantize_quantizes_only_what_the_first_skipped(tmp_path):
    from transformers import AutoModelForCausalLM

    model = lowbit.quantize(make_tiny_llama(), "int4", skip=["lm_head"], progress=False)
    first = {name: buffer.clone() for name, buffer in model.named_buffers()}
    lowbit.quantize(model, "int8", progress=False)
    assert all(torch.equal(buffer, first[name]) for name, buffer in model.named_buffers() if name in first)
    formats = {name: m.format for name, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}
    assert formats.pop("lm_head") == "int8" and len(formats) == 14 and set(formats.values()) == {"int4"}
    assert {e["format"] for e in model.config.quantization_config.layers.values()} == {"int4", "int8"}
    ids = torch.randint(0, 256, (1, 6))
    model.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)
