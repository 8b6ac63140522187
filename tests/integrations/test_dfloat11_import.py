"""Import of folders written by the `dfloat11` package, encoded by that package's own code."""
import json
import re
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import lowbit
from lowbit.cli import main as cli_main
from lowbit.errors import CheckpointError
from lowbit.integrations.dfloat11_import import decode_stream

from ..conftest import make_tiny_llama
from ..damage import damaged_copy, loads_and_runs_or_refuses
from .df11_package import BYTES_PER_THREAD, THREADS_PER_BLOCK, package_encode, write_df11_folder

LAYER_PATTERN = {r"model\.layers\.\d+": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
PATTERNS = {**LAYER_PATTERN, r"lm_head": [], r"model\.embed_tokens": []}


@pytest.fixture(scope="module")
def original():
    return make_tiny_llama(dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def df11_dir(original, tmp_path_factory):
    folder = tmp_path_factory.mktemp("df11") / "tiny-llama-df11"
    write_df11_folder(original, folder, PATTERNS)
    return folder


def _bits(t):
    return t.view(torch.int16)


def test_decoder_reads_the_package_stream_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    # enough weights for several 512-thread blocks, with a heavy tail of rare exponents
    weights = [(torch.randn(300_000, generator=gen) * torch.rand(300_000, generator=gen) ** 4).bfloat16(),
               (torch.randn(5_001, generator=gen) * 3).bfloat16()]
    fields = package_encode(weights)
    flat = decode_stream(fields, BYTES_PER_THREAD, THREADS_PER_BLOCK)
    assert torch.equal(_bits(flat), _bits(torch.cat(weights)))


def test_load_gives_identical_weights_and_logits(original, df11_dir):
    loaded = lowbit.load(df11_dir)
    fmt = lowbit.get_format("dfloat11")
    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, lowbit.QuantLinear)}
    assert len(quantized) == 15  # 7 per block x 2 blocks + lm_head
    for name, layer in quantized.items():
        assert torch.equal(_bits(fmt.dequantize(layer.packed)), _bits(original.get_submodule(name).weight)), name
    embedding = loaded.model.embed_tokens
    assert isinstance(embedding, torch.nn.Embedding)
    assert torch.equal(_bits(embedding.weight), _bits(original.model.embed_tokens.weight))
    # the same weights loaded the plain transformers way
    plain = LlamaForCausalLM.from_pretrained(None, config=original.config, state_dict=original.state_dict(),
                                             dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, plain(ids).logits)


def test_import_then_lowbit_save_round_trips(df11_dir, tmp_path):
    loaded = lowbit.load(df11_dir)
    lowbit.save(loaded, tmp_path / "lowbit")
    again = lowbit.load(tmp_path / "lowbit")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, loaded(ids).logits)


def test_cli_convert(df11_dir, tmp_path, capsys):
    assert cli_main(["convert", str(df11_dir), str(tmp_path / "out"), "--segment", "128"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    layer = lowbit.load(tmp_path / "out").model.layers[1].mlp.down_proj
    assert layer.format == "dfloat11" and layer.attrs["segment"] == 128


def test_skeleton_for_a_config_without_model_fields(original, tmp_path):
    folder = tmp_path / "single"
    write_df11_folder(original, folder, LAYER_PATTERN)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"dfloat11_config": config["dfloat11_config"]}))
    with pytest.raises(CheckpointError, match="architectures.*skeleton"):
        lowbit.load(folder)
    skeleton = make_tiny_llama(seed=5, dtype=torch.bfloat16)
    loaded = lowbit.load(folder, model=skeleton)
    assert torch.equal(_bits(lowbit.get_format("dfloat11").dequantize(loaded.model.layers[0].self_attn.q_proj.packed)),
                       _bits(original.model.layers[0].self_attn.q_proj.weight))


def _damage(folder, key, edit):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state[key] = edit(state[key])
    save_file(state, str(path))


@pytest.mark.parametrize("key,edit,message", [
    ("model.layers.0.gaps", lambda t: t[:3], "gaps"),
    ("model.layers.0.output_positions", lambda t: torch.zeros_like(t), "output_positions"),
    ("model.layers.1.luts", lambda t: t[:, :100].contiguous(), "luts"),
    ("model.layers.1.split_positions", lambda t: t[:2], "split_positions"),
    ("model.layers.0.sign_mantissa", lambda t: torch.cat([t, t]), "decodes to"),
    # each was an error from numpy or torch: bf16 tables, tables pointing past the last one, an
    # empty stream, float split positions
    ("model.layers.1.luts", lambda t: t.bfloat16(), "luts: expected uint8 [T+1, 256]"),
    ("model.layers.1.luts", lambda t: torch.cat([t[:1], t[-1:]]), "luts: an entry points past the last of its 1 tables"),
    ("model.layers.0.encoded_exponent", lambda t: t[:0], "encoded_exponent: decodes to 0 weights"),
    ("model.layers.0.split_positions", lambda t: t.float(), "split_positions: expected a 1-D integer tensor"),
])
def test_damaged_folders_raise_checkpoint_errors(original, tmp_path, key, edit, message):
    folder = tmp_path / "damaged"
    write_df11_folder(original, folder, LAYER_PATTERN)
    _damage(folder, key, edit)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        lowbit.load(folder)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_import_against_random_damage(df11_dir, tmp_path_factory, data):
    """Any config.json value replaced by a JSON value of any type, or any tensor cut, cast,
    reshaped, overwritten in places or removed: CheckpointError or a model that runs (this found
    the four cases above that numpy or torch refused first)."""
    folder = tmp_path_factory.mktemp("damaged") / "folder"
    damaged_copy(data, df11_dir, folder)
    loads_and_runs_or_refuses(folder, torch.randint(0, 100, (2, 5)))


def test_missing_field_and_bad_config(original, tmp_path):
    folder = tmp_path / "broken"
    write_df11_folder(original, folder, LAYER_PATTERN)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.0.gaps"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.0.*lacks \['gaps'\]"):
        lowbit.load(folder)
    config = json.loads((folder / "config.json").read_text())
    config["dfloat11_config"]["bytes_per_thread"] = "eight"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="bytes_per_thread"):
        lowbit.load(folder)
    config["dfloat11_config"].update(bytes_per_thread=BYTES_PER_THREAD, pattern_dict={r"model\.layers\.(\d+": []})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"dfloat11_config\.pattern_dict: .* is not a regular expression"):
        lowbit.load(folder)


def test_a_pattern_that_backtracks_without_end_is_refused(df11_dir, tmp_path, monkeypatch):
    """pattern_dict's regexes are matched under foreign_folder's time limit (shortened here): one
    that backtracks without end is refused rather than left to hang the load."""
    from lowbit.integrations import foreign_folder

    folder = tmp_path / "copy"
    shutil.copytree(df11_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["dfloat11_config"]["pattern_dict"] = {r"(.*?)*(?=x)\1": [], **PATTERNS}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(foreign_folder, "MATCH_TIMEOUT_S", 0.2)
    with pytest.raises(CheckpointError, match=r"dfloat11_config\.pattern_dict: .* took over 0\.2 s to match"):
        lowbit.load(folder)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(architectures=1.5),
     r"config\.json: architectures: 1\.5 is not a transformers model class; pass load\(\.\.\., model=skeleton\)"),
    # transformers' own errors building the model (a negative size, an unknown rope type) were not wrapped
    (lambda c: c.update(vocab_size=-1), r"config\.json: <model config>: transformers could not build LlamaForCausalLM"),
    (lambda c: c["rope_parameters"].update(rope_type=None),
     r"config\.json: <model config>: transformers could not build LlamaForCausalLM"),
])
def test_a_model_config_transformers_cannot_build_is_a_checkpoint_error(original, tmp_path, edit, match):
    folder = tmp_path / "bad-config"
    write_df11_folder(original, folder, LAYER_PATTERN)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(folder)
