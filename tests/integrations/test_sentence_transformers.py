"""sentence-transformers over lowbit: a SentenceTransformer holds its transformers model one level
down and saves it with save_pretrained, so lowbit must mark that inner model as quantized (else the
saved config lacks quantization_config and the reload gets freshly initialized weights, with only
transformers' load report to say so). The real MiniLM folder, which is a sentence-transformers one."""
import json
import warnings

import pytest
import torch

import lowbit
from lowbit.default_model import DEMO_SENTENCES, default_model_path

sentence_transformers = pytest.importorskip("sentence_transformers",
                                            reason="sentence-transformers: installed with the MiniLM test package")
from sentence_transformers import SentenceTransformer  # noqa: E402

MINILM_LINEARS = 37  # 6 layers x (query, key, value, attention output, intermediate, output) + the pooler


def _encoder(**kwargs):
    return SentenceTransformer(str(default_model_path()), device="cpu", **kwargs)


def _embed(model):
    return model.encode(DEMO_SENTENCES, convert_to_tensor=True)


def _quantized_layers(model):
    return sum(isinstance(m, lowbit.QuantLinear) for m in model.modules())


@pytest.fixture(scope="module")
def int8_encoder():
    return lowbit.quantize(_encoder(), "int8", progress=False)


def test_a_quantized_sentence_transformer_saves_and_reloads_bit_equal(int8_encoder, tmp_path):
    expected = _embed(int8_encoder)
    dense = _embed(_encoder())
    assert torch.nn.functional.cosine_similarity(expected, dense).min() > 0.999
    int8_encoder.save(str(tmp_path / "st"))
    saved = json.loads((tmp_path / "st" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lowbit" and len(saved["layers"]) == MINILM_LINEARS
    assert all(name.startswith(("encoder.", "pooler.")) for name in saved["layers"])  # the inner model's names
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert _quantized_layers(reloaded) == MINILM_LINEARS
    assert torch.equal(_embed(reloaded), expected)


def test_quantizing_while_loading_through_model_kwargs_equals_quantizing_after(int8_encoder):
    loaded = _encoder(model_kwargs={"quantization_config": lowbit.HfQuantConfig(format="int8")})
    assert _quantized_layers(loaded) == MINILM_LINEARS
    assert torch.equal(_embed(loaded), _embed(int8_encoder))


def test_a_dequantized_sentence_transformer_saves_as_a_plain_one(tmp_path):
    model = lowbit.dequantize(lowbit.quantize(_encoder(), "int4", group_size=32, progress=False))
    expected = _embed(model)
    model.save(str(tmp_path / "st"))
    assert "quantization_config" not in json.loads((tmp_path / "st" / "config.json").read_text())
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert _quantized_layers(reloaded) == 0
    torch.testing.assert_close(_embed(reloaded), expected, rtol=1e-5, atol=1e-6)


def _with_a_dense_head():
    """MiniLM with a sentence-transformers Dense head (384 -> 64), a Linear outside the transformer."""
    try:
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Dense
    torch.manual_seed(0)
    return SentenceTransformer(modules=[*_encoder(), Dense(in_features=384, out_features=64)], device="cpu")


def test_a_quantized_layer_outside_the_transformer_is_warned_about_and_can_be_skipped(tmp_path):
    """SentenceTransformer.save writes a Dense head as a plain state dict, which its loader reads into
    nn.Linear: a quantized head would save, then fail to load. Quantizing it warns; skipping it works."""
    with pytest.warns(UserWarning, match=r"quantized layers outside the transformers model\(s\) \['0\.\w+'\]: "
                                         r"\['3\.linear'\]; save_pretrained cannot record them"):
        lowbit.quantize(_with_a_dense_head(), "int8", progress=False)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="quantized layers outside")
        model = lowbit.quantize(_with_a_dense_head(), "int8", skip=["3.*"], progress=False)
    assert _quantized_layers(model) == MINILM_LINEARS
    expected = _embed(model)
    model.save(str(tmp_path / "st"))
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert _quantized_layers(reloaded) == MINILM_LINEARS and torch.equal(_embed(reloaded), expected)


def test_the_cli_output_of_a_sentence_transformers_folder_loads_as_one(int8_encoder, tmp_path):
    from lowbit.cli import main

    assert main(["quantize", str(default_model_path()), str(tmp_path / "q"), "--format", "int8"]) == 0
    reloaded = SentenceTransformer(str(tmp_path / "q"), device="cpu")
    assert _quantized_layers(reloaded) == MINILM_LINEARS
    assert torch.equal(_embed(reloaded), _embed(int8_encoder))
