"""transformers integration: save_pretrained / from_pretrained for every format, quantize while
loading, generate, one on-disk format with lowbit.save/load, device_map, torch.compile, torch.export,
AOTInductor."""
import copy
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

import lowbit
from lowbit.api import summarize
from lowbit.cli import main as cli_main
from lowbit.errors import CheckpointError, FormatError, LowbitError, WeightError
from lowbit.integrations.transformers import LowbitHfQuantizer

from ..conftest import DYNAMIC_BATCH_AND_LENGTH, TORCH_BEFORE_2_13, kernel_devices, make_tiny_llama, requires_gpu
from ..damage import damaged_copy, loads_and_runs_or_refuses
from ..test_io import EVERY_FORMAT


def _options(fmt, options, dtype):
    """dfloat11 takes only bf16 weights: other dtypes are cast explicitly."""
    return {**options, "cast": True} if fmt == "dfloat11" and dtype != torch.bfloat16 else options


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A bf16 tiny Llama saved the plain transformers way."""
    path = tmp_path_factory.mktemp("llama-bf16")
    make_tiny_llama(dtype=torch.bfloat16).save_pretrained(path)
    return path


def _llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


IDS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_llama_save_pretrained_round_trip(llama_dir, tmp_path, fmt, options):
    model = lowbit.quantize(_llama(llama_dir), fmt, skip=["lm_head"], progress=False, **options)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowbit" and len(config["layers"]) == 14
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    layer = loaded.model.layers[1].self_attn.o_proj
    assert isinstance(layer, lowbit.QuantLinear) and layer.format == fmt
    for name, tensor in model.model.layers[1].self_attn.o_proj.packed.tensors.items():
        assert layer.packed.tensors[name].dtype == tensor.dtype and torch.equal(layer.packed.tensors[name], tensor)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    # and it saves again
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "dfloat11"])
def test_generate_gives_the_same_tokens(llama_dir, tmp_path, fmt):
    model = lowbit.quantize(_llama(llama_dir), fmt, progress=False)
    model.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(IDS[:1], **kwargs), model.generate(IDS[:1], **kwargs))


@pytest.mark.parametrize("fmt,options", [("int4", {"group_size": 32}), ("fp8", {}), ("nvfp4", {}), ("nf4", {})])
def test_quantize_while_loading_equals_lowbit_quantize(llama_dir, tmp_path, fmt, options):
    config = lowbit.HfQuantConfig(format=fmt, skip=["lm_head"], **options)
    on_load = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    reference = lowbit.quantize(_llama(llama_dir), fmt, skip=["lm_head"], progress=False, **options)
    assert isinstance(on_load.model.layers[0].mlp.down_proj, lowbit.QuantLinear)
    assert type(on_load.lm_head) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(on_load(IDS).logits, reference(IDS).logits)
    on_load.save_pretrained(tmp_path / "q")  # the layers it quantized are recorded
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(IDS).logits, reference(IDS).logits)


def test_quantize_while_loading_never_holds_the_bf16_weights(llama_dir, monkeypatch):
    """Each weight is quantized as it arrives: when a layer is quantized, no later layer holds a
    loaded full-precision weight yet."""
    from lowbit.integrations import transformers as integration

    seen = []
    original = integration._QuantizeOnLoad.convert

    def spy(self, input_dict, full_layer_name=None, model=None, **kwargs):
        loaded_linears = [n for n, m in model.named_modules()
                          if type(m) is torch.nn.Linear and n != "lm_head" and m.weight.device.type != "meta"]
        seen.append(loaded_linears)
        return original(self, input_dict, full_layer_name=full_layer_name, model=model, **kwargs)

    monkeypatch.setattr(integration._QuantizeOnLoad, "convert", spy)
    AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=lowbit.HfQuantConfig("int8", skip=["lm_head"]))
    assert len(seen) == 14 and all(not loaded for loaded in seen)


@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_minilm_every_format_round_trips(minilm, tmp_path, fmt, options):
    model, tokenizer = minilm
    batch = tokenizer(["one on-disk format", "for every lowbit format"], padding=True, return_tensors="pt")
    quantized = lowbit.quantize(copy.deepcopy(model), fmt, progress=False, **_options(fmt, options, torch.float32))
    quantized.save_pretrained(tmp_path / "q")
    loaded = AutoModel.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, quantized(**batch).last_hidden_state)


def test_minilm_quantize_while_loading(minilm):
    from lowbit.default_model import default_model_path

    model, tokenizer = minilm
    batch = tokenizer(["quantized while loading"], return_tensors="pt")
    on_load = AutoModel.from_pretrained(default_model_path(), quantization_config=lowbit.HfQuantConfig("int8"))
    reference = lowbit.quantize(copy.deepcopy(model), "int8", progress=False)
    with torch.no_grad():
        assert torch.equal(on_load(**batch).last_hidden_state, reference(**batch).last_hidden_state)


def test_lowbit_save_and_save_pretrained_read_each_other(llama_dir, tmp_path):
    model = lowbit.quantize(_llama(llama_dir), "int6", skip=["lm_head"], progress=False)
    with torch.no_grad():
        expected = model(IDS).logits
    lowbit.save(model, tmp_path / "lowbit", max_shard_bytes=200_000)  # sharded, with an index
    model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "lowbit")(IDS).logits, expected)
        assert torch.equal(lowbit.load(tmp_path / "hf")(IDS).logits, expected)
    # a lowbit.load-ed model saves through transformers too
    lowbit.load(tmp_path / "lowbit").save_pretrained(tmp_path / "hf2")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")(IDS).logits, expected)


def test_each_transformers_model_inside_a_wrapper_saves_its_own_quantization_config(llama_dir, tmp_path):
    """A wrapper (here a ModuleDict; sentence-transformers, see its test) holding transformers
    models: each one's save_pretrained writes its own layers, named from it, and reloads bit-equal;
    lowbit.dequantize takes the config off each again."""
    wrapper = torch.nn.ModuleDict({"first": _llama(llama_dir), "second": make_tiny_llama(seed=1)})
    lowbit.quantize(wrapper, "int4", skip=["*lm_head", "second.model.layers.1.*"], progress=False)
    for name, count in (("first", 14), ("second", 7)):
        model = wrapper[name]
        with torch.no_grad():
            expected = model(IDS).logits
        model.save_pretrained(tmp_path / name)
        layers = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]["layers"]
        assert len(layers) == count and all(layer.startswith("model.layers.") for layer in layers)
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / name)(IDS).logits, expected)
    lowbit.dequantize(wrapper)
    assert not any(hasattr(wrapper[name].config, "quantization_config") or wrapper[name].is_quantized
                   for name in wrapper)


def test_from_pretrained_of_a_lowbit_save_folder_keeps_dtype_and_reports_no_unexpected_keys(tmp_path):
    """A model built from a config has no config dtype: from_pretrained then took the first float
    tensor's (a float16 scale) and loaded the norms in float16. lowbit.save records the model's
    dtype as save_pretrained does, and keeps the non-persistent buffers (rotary inv_freq, which
    lowbit.load needs) out of the files from_pretrained reads, which it reported as unexpected."""
    model = lowbit.quantize(make_tiny_llama(), "int4", progress=False)
    assert model.config.dtype is None
    with torch.no_grad():
        expected = model(IDS).logits
    lowbit.save(model, tmp_path / "lowbit")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "lowbit", output_loading_info=True)
    assert loaded.model.norm.weight.dtype == torch.float32
    assert not info["unexpected_keys"] and not info["missing_keys"]
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)
        assert torch.equal(lowbit.load(tmp_path / "lowbit")(IDS).logits, expected)


def test_cli_output_loads_with_from_pretrained(tmp_path):
    assert cli_main(["quantize", str(tmp_path / "out"), "--format", "int8"]) == 0
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(model.encoder.layer[0].attention.self.query, lowbit.QuantLinear)


def test_a_tied_lm_head_stays_tied_through_every_path(tmp_path, caplog):
    """tie_word_embeddings=True (Llama-3.2, Qwen2.5 small models): lm_head shares the embedding.
    It is left tied in full precision by lowbit.quantize and by quantize-while-loading, so every
    save / load path gives the same logits (quantizing it broke from_pretrained, which re-ties by
    name, and stored the weight twice)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    with caplog.at_level("INFO", logger="lowbit.api"):
        model = lowbit.quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "int4", progress=False)
    assert "leaving ['lm_head'] in full precision: tied to another parameter" in caplog.text
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "hf")
    lowbit.save(model, tmp_path / "lb")
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=lowbit.HfQuantConfig("int4"))
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), lowbit.load(tmp_path / "hf"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "lb"), lowbit.load(tmp_path / "lb"), on_load):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert isinstance(loaded.model.layers[0].mlp.up_proj, lowbit.QuantLinear)
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, expected)


def test_t5_which_reads_its_linear_weight_dtype_round_trips(tmp_path):
    """T5's feed-forward casts its input to `wo.weight.dtype`: QuantLinear.weight is a meta
    stand-in with that dtype, so an encoder-decoder quantizes, saves and loads every way."""
    from transformers import AutoModelForSeq2SeqLM, T5Config

    torch.manual_seed(0)
    config = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "base")
    model = lowbit.quantize(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), "int4", progress=False)
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, lowbit.QuantLinear)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=IDS, decoder_input_ids=IDS[:, :3]).logits

    expected = logits(model)
    model.save_pretrained(tmp_path / "q")
    on_load = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base", quantization_config=lowbit.HfQuantConfig("int4"))
    for loaded in (AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "q"), lowbit.load(tmp_path / "q"), on_load):
        assert torch.equal(logits(loaded), expected)


def test_gpt2_conv1d_layers_quantize_and_round_trip(tmp_path):
    """GPT-2's projections are transformers' Conv1D (y = x @ W + b, W stored [in, out]): they are
    quantized from the transposed weight (int8 logits stay close to the dense ones, which a
    square c_proj quantized untransposed would not) and load back every way."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)).save_pretrained(tmp_path / "base")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = lowbit.quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "int8", progress=False)
    assert isinstance(model.transformer.h[0].attn.c_proj, lowbit.QuantLinear)  # lm_head stays tied to wte
    with torch.no_grad():
        expected, reference = model(IDS).logits, dense(IDS).logits
    assert (expected - reference).abs().max() < 0.02 * reference.abs().max()
    model.save_pretrained(tmp_path / "q")
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=lowbit.HfQuantConfig("int8"))
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "q"), lowbit.load(tmp_path / "q"), on_load):
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, expected)


def test_device_map_auto_with_offload(llama_dir, tmp_path):
    model = lowbit.quantize(_llama(llama_dir), "int4", skip=["lm_head"], progress=False)
    model.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        expected = model(IDS).logits
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="auto")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="auto", max_memory={"cpu": "120KB"},
                                                     offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(offloaded.hf_device_map.values())
    with torch.no_grad():
        assert torch.equal(auto(IDS).logits, expected)
        assert torch.equal(offloaded(IDS).logits, expected)


def test_an_offloaded_model_is_quantized_while_loading_not_after(llama_dir, tmp_path):
    """A device_map that offloads to disk leaves the weights on the meta device: lowbit.quantize
    says so and points to quantizing while loading, which works there (equal logits)."""
    offload = {"device_map": "auto", "max_memory": {"cpu": "120KB"}, "offload_folder": str(tmp_path / "offload")}
    with pytest.raises(WeightError, match=r"model\.layers\.0\.self_attn\.q_proj: weight is on the meta device .* "
                                          r"quantization_config=lowbit\.HfQuantConfig"):
        lowbit.quantize(AutoModelForCausalLM.from_pretrained(llama_dir, **offload), "int4", progress=False)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, **offload, quantization_config=lowbit.HfQuantConfig(
        format="int4", skip=["lm_head"]))
    assert "disk" in set(model.hf_device_map.values())
    assert sum(isinstance(m, lowbit.QuantLinear) for m in model.modules()) == 14
    with torch.no_grad():
        expected = lowbit.quantize(_llama(llama_dir), "int4", skip=["lm_head"], progress=False)(IDS).logits
        assert torch.equal(model(IDS).logits, expected)


@pytest.mark.parametrize("edit,match", [
    (lambda q: q.update(format="int99"), "unknown format 'int99'"),
    (lambda q: q.update(version=99), "version 99"),
    (lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(format="int99"), "layers.model.layers.0.mlp.up_proj"),
    (lambda q: q.update(options={"group_size": 7}), "group_size"),
    (lambda q: q.update(options="group_size=64"), "quantization_config.options must be a mapping"),
    (lambda q: q.update(skip=5), "quantization_config.skip must be a glob pattern"),
    (lambda q: q.update(overrides=[["*", "int8"]]), "quantization_config.overrides must be a mapping"),
    (lambda q: q.update(layers=list(q["layers"])), "quantization_config.layers must be a mapping"),
    # a field the file lacks: transformers would only warn and leave it uninitialized (torch.empty)
    (lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(bias=True),
     r"model\.layers\.0\.mlp\.up_proj: the checkpoint has no \['bias'\] for this layer"),
    # a field the entry does not declare: transformers would only warn and compute without it
    (lambda q: q["layers"]["model.layers.0.mlp.up_proj"]["attrs"].update(symmetric=True),
     r"model\.safetensors: model\.layers\.0\.mlp\.up_proj\.zeros: the checkpoint holds 'zeros' for layer "
     r"model\.layers\.0\.mlp\.up_proj, which quantization_config\.layers declares without it"),
    # fields of another shape than the entry declares: named with the entry, before anything loads
    (lambda q: q["layers"]["model.layers.0.mlp.up_proj"]["attrs"].update(group_size=32),
     r"model\.layers\.0\.mlp\.up_proj\.scales: holds float16 \[1, 160\], but quantization_config\.layers "
     r"declares float16 \[3, 160\]"),
])
def test_bad_quantization_config_raises_lowbit_error(llama_dir, tmp_path, edit, match):
    folder = _saved_int4_with_edited_config(llama_dir, tmp_path, edit)
    with pytest.raises(LowbitError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def _saved_int4_with_edited_config(llama_dir, tmp_path, edit):
    """save_pretrained of the int4 tiny Llama, then `edit(quantization_config)` in its config.json."""
    model = lowbit.quantize(_llama(llama_dir), "int4", skip=["lm_head"], progress=False)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    edit(config["quantization_config"])
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    return tmp_path / "q"


@pytest.mark.parametrize("edit,match", [
    (lambda q: q["layers"].pop("model.layers.0.mlp.up_proj"),
     r"missing keys: \['model\.layers\.0\.mlp\.up_proj\.weight'\]; unexpected keys: \['model\.layers\.0\.mlp\.up_proj\.qweight'"),
])
def test_lowbit_load_refuses_what_from_pretrained_only_warns_about(llama_dir, tmp_path, edit, match):
    """A save_pretrained folder whose config leaves out a layer the tensors quantize: transformers
    loads it with a warning (a plain Linear initialized at random), lowbit.load refuses."""
    folder = _saved_int4_with_edited_config(llama_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(folder)


@pytest.mark.parametrize("key", ["lm_head.weight", "model.norm.weight"])
def test_an_integer_tensor_in_a_float_parameter_is_refused(llama_dir, tmp_path, key):
    """transformers keeps integer tensors as they are stored (quantizers' codes), so an int8 norm
    weight loaded and computed garbage, an int8 lm_head failed in F.linear; lowbit's quantizer
    refuses, in from_pretrained and so in lowbit.load."""
    folder = _saved_int4_with_edited_config(llama_dir, tmp_path, lambda q: None)
    tensors = load_file(folder / "model.safetensors")
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = rf"{re.escape(key)}: stored as torch\.int8, where the model holds a floating-point parameter"
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(folder)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("edit,match", [
    # not lowbit's quantization_config: not a lowbit folder at all
    (lambda c: c.update(quantization_config="lowbit"), r"lowbit\.json: manifest missing"),
    (lambda c: c.update(architectures=1.5), r"config\.json: architectures: 1\.5 is not a transformers model class"),
    (lambda c: c.update(architectures=[]), r"config\.json: architectures: \[\] is not a transformers model class"),
])
def test_lowbit_load_and_inspect_of_a_damaged_config_json(llama_dir, tmp_path, capsys, edit, match):
    """config.json values of the wrong type are CheckpointErrors naming the field, in lowbit.load
    and `lowbit inspect` (were AttributeError / TypeError)."""
    folder = _saved_int4_with_edited_config(llama_dir, tmp_path, lambda q: None)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(folder)
    if "architectures" not in match:  # inspect reads the layers only, not the class
        assert cli_main(["inspect", str(folder)]) == 2
        assert "lowbit: error:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mixed_formats_dir(llama_dir, tmp_path_factory):
    """save_pretrained of the tiny bf16 Llama with a projection in each of seven formats."""
    overrides = {"*.k_proj": "fp8", "*.v_proj": "dfloat11", "*.o_proj": "int3", "*.gate_proj": "mxfp4",
                 "*.up_proj": "lut2", "*.down_proj": "nvfp4"}
    model = lowbit.quantize(_llama(llama_dir), "int4", skip=["lm_head"], progress=False, overrides=overrides)
    path = tmp_path_factory.mktemp("mixed") / "q"
    model.save_pretrained(path)
    return path


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_lowbit_load_of_a_damaged_save_pretrained_folder(mixed_formats_dir, tmp_path_factory, data):
    """Any value of config.json that lowbit reads (its quantization_config: each layer's format,
    shape, attrs) replaced by a JSON value of any type, or any tensor cut, cast, reshaped,
    overwritten in places or removed: CheckpointError or a model that runs."""
    folder = tmp_path_factory.mktemp("damaged") / "folder"
    damaged_copy(data, mixed_formats_dir, folder)
    loads_and_runs_or_refuses(folder, IDS)


@pytest.mark.parametrize("down_proj", ["int3", "int6"])
def test_config_version_1_loads_unless_a_layout_changed(llama_dir, tmp_path, down_proj):
    """A checkpoint saved before layouts were recorded (config version 1, no per-layer "layout")
    loads, except layers whose packed layout changed since (int6 here), which are refused; a
    loaded one saves again as version 2 with every layer's layout."""
    model = lowbit.quantize(_llama(llama_dir), "int4", skip=["lm_head"], overrides={"*.down_proj": down_proj},
                            progress=False)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    quant = config["quantization_config"]
    layouts = {name.rpartition(".")[2]: entry["layout"] for name, entry in quant["layers"].items()}
    assert quant["version"] == 2 and layouts["up_proj"] == 1 and layouts["down_proj"] == (2 if down_proj == "int6" else 1)
    quant["version"] = 1
    for entry in quant["layers"].values():
        del entry["layout"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    if down_proj == "int6":
        with pytest.raises(LowbitError, match=r"layers\.model\.layers\.0\.mlp\.down_proj: int6: packed layout 1 "
                                              r"is not the one this lowbit reads \(2\)"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        return
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["version"] == 2
    assert again["layers"] == {name: {**entry, "layout": 1} for name, entry in quant["layers"].items()}


def test_from_pretrained_refuses_dfloat11_codes_that_overrun_the_stream(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    lowbit.quantize(_llama(llama_dir), "dfloat11", progress=False).save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.down_proj.exponent_code"][:-1] = -1  # all ones: the longest code
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match=r"model\.layers\.1\.mlp\.down_proj: dfloat11 field 'exponent_code': "
                                          r"segment \d+ of row \d+ decodes past the end"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_the_after_load_check_skips_layers_whose_data_is_offloaded():
    """A layer offloaded by accelerate may still be on the meta device when loading ends: there
    is no data to check yet, and no crash."""
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(64, 8).bfloat16(), "dfloat11", segment=64)
    model = torch.nn.Sequential(lowbit.QuantLinear.from_metadata(layer.metadata()))  # buffers on meta
    quantizer = LowbitHfQuantizer(lowbit.HfQuantConfig("dfloat11"), pre_quantized=True)
    assert quantizer._process_model_after_weight_loading(model) is model
    assert quantizer.quantization_config.layers == {"0": layer.metadata()}


def test_quantize_while_loading_checks_the_load_dtype_first(llama_dir):
    with pytest.raises(WeightError, match="model.layers.0.*bfloat16 weights only"):
        AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32,
                                             quantization_config=lowbit.HfQuantConfig("dfloat11"))
    cast = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32,
                                                quantization_config=lowbit.HfQuantConfig("dfloat11", cast=True))
    assert cast.model.layers[0].mlp.up_proj.format == "dfloat11"


def test_hf_quant_config_validates_and_round_trips():
    config = lowbit.HfQuantConfig(format="nvfp4", skip=["lm_head"], overrides={"*.down_proj": "int8"}, act="nvfp4")
    again = lowbit.HfQuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict() and again.options == {"act": "nvfp4"}
    with pytest.raises(FormatError):
        lowbit.HfQuantConfig(format="int4", group_size=33)


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from lowbit.integrations.transformers import register

    register()
    register()
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is LowbitHfQuantizer


@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_compiled_layer_has_no_graph_break(fmt, options):
    torch._dynamo.reset()  # each format compiles QuantLinear.forward anew: stay under the recompile limit
    torch.manual_seed(0)
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40).bfloat16(), fmt, **options)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


MIXED_FORMATS = {"*.down_proj": "dfloat11", "*.o_proj": {"format": "nvfp4", "act": "nvfp4"},
                 "*.k_proj": {"format": "fp8", "act": "fp8"}}  # the other layers int4


@pytest.mark.skipif(TORCH_BEFORE_2_13, reason="torch < 2.13's inductor does not give eager's bf16 logits on CPU, "
                    "even for the unquantized model (measured on 2.11: up to 0.004 apart)")
def test_inductor_compiled_generate_with_static_cache_matches_eager():
    """transformers' fast decode recipe, a static KV cache and its automatic compile of the decode
    steps (`generation_config.compile_config`: `torch.compile(fullgraph=True)` with inductor; on a
    GPU it is on by default, here asked for), on a model mixing formats (weight-only,
    activation-quantized, dfloat11's decoder op): greedy generate gives eager's logits bit for bit
    (with inductor emulating eager's bf16 casts, see `_aoti_packaged`)."""
    from transformers import CompileConfig

    model = lowbit.quantize(make_tiny_llama(dtype=torch.bfloat16), "int4", skip=["lm_head"], overrides=MIXED_FORMATS,
                            progress=False)
    assert {layer.format for layer in model.modules() if isinstance(layer, lowbit.QuantLinear)} == {
        "int4", "dfloat11", "nvfp4", "fp8"}
    options = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", return_dict_in_generate=True,
                   output_logits=True, attention_mask=torch.ones_like(IDS), pad_token_id=0)
    eager = model.generate(IDS, **options, disable_compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    with torch._inductor.config.patch(emulate_precision_casts=True):
        compiled = model.generate(IDS, **options, compile_config=compile_config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph: every decode step's
    assert torch.equal(compiled.sequences, eager.sequences)
    for step, (got, want) in enumerate(zip(compiled.logits, eager.logits, strict=True)):
        assert torch.equal(got, want), f"decode step {step}"


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_gpu_compiled_layer_runs_triton_without_graph_break(fmt, options):
    torch._dynamo.reset()
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(4096, 1024).bfloat16(), fmt, **options).cuda()
    x = torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=2e-2, atol=2e-2)


def _export_with_dynamic_batch(module, x):
    return torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def _exported(module, x, path):
    """torch.export of module(x) with a dynamic batch, saved to path and loaded back."""
    torch.export.save(_export_with_dynamic_batch(module, x), path)
    return torch.export.load(path)


def _lowbit_ops(program):
    return [str(node.target) for node in program.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("lowbit.")]


@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_exported_layer_saves_reloads_and_takes_another_batch(fmt, options, tmp_path):
    torch.manual_seed(0)
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40).bfloat16(), fmt, **options)
    program = _exported(layer, torch.randn(3, 96, dtype=torch.bfloat16), tmp_path / "layer.pt2")
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    torch.testing.assert_close(program.module()(x), layer(x), rtol=0, atol=0)


class _TritonLayer(torch.nn.Module):
    """A QuantLinear forced onto the Triton backend (on a GPU it is the default)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, backend="triton")


@pytest.mark.skipif(not kernel_devices(), reason="Triton cannot run here (no CUDA, no interpreter)")
@pytest.mark.parametrize("fmt,options", [("int4", {}), ("fp8", {"act": "fp8"}), ("lut2", {}), ("dfloat11", {})],
                         ids=lambda v: str(v))
def test_exported_triton_layer_keeps_its_kernel_op(fmt, options, tmp_path):
    """Exported on the Triton backend, the program calls lowbit's op (the kernel), not a decomposition."""
    device = kernel_devices()[0]
    torch.manual_seed(0)
    layer = _TritonLayer(lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40).bfloat16(), fmt, **options).to(device))
    program = _exported(layer, torch.randn(3, 96, dtype=torch.bfloat16, device=device), tmp_path / "layer.pt2")
    assert len(_lowbit_ops(program)) == 1
    x = torch.randn(5, 96, dtype=torch.bfloat16, device=device)
    torch.testing.assert_close(program.module()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int4", "dfloat11"])
def test_exported_llama_saves_and_reloads(llama_dir, tmp_path, fmt):
    """A whole quantized model through torch.export (dynamic batch and length), .pt2 save and load:
    the same logits for another shape. dfloat11's reference decoder is one op per layer in the graph
    (traced, its step loop unrolled into thousands of nodes per layer: minutes to export a tiny model)."""
    model = lowbit.quantize(_llama(llama_dir), fmt, skip=["lm_head"], progress=False)
    program = torch.export.export(model, (), kwargs={"input_ids": IDS, "use_cache": False},
                                  dynamic_shapes=DYNAMIC_BATCH_AND_LENGTH)
    if fmt == "dfloat11":
        assert _lowbit_ops(program) == ["lowbit.dfloat11_decode.default"] * summarize(model).quantized_layers
    torch.export.save(program, tmp_path / "model.pt2")
    other = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))  # another batch and length
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "model.pt2").module()(input_ids=other, use_cache=False)
                                   .logits, model(other, use_cache=False).logits, rtol=0, atol=0)


class _EveryLayer(torch.nn.Module):
    """Runs one input through several layers: one AOTInductor compile covers them all."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def _aoti_packaged(module, x, path):
    """module(x) exported with a dynamic batch, compiled ahead of time by AOTInductor into the
    package `path`, and loaded back. Inductor keeps fused intermediates in fp32 where eager rounds
    them to bf16 (the activation quantizers differ by a bf16 ulp); emulating eager's casts makes
    the package's result comparable bit for bit."""
    with torch._inductor.config.patch(emulate_precision_casts=True):
        package = torch._inductor.aoti_compile_and_package(_export_with_dynamic_batch(module, x),
                                                           package_path=str(path))
    return torch._inductor.aoti_load_package(package)


#: a layer of each format family (odd and even bit widths), with each activation option
FORMAT_FAMILIES = [("int3", {}), ("int4", {"act": "int8"}), ("int8", {"act": "int8", "symmetric": True, "group_size": -1}),
                   ("fp8", {"block": 128, "act": "fp8"}), ("fp8_e5m2", {}), ("mxint8", {}),
                   ("mxfp4", {"act": "mxfp4", "rotate": "hadamard"}), ("nvfp4", {"act": "nvfp4"}), ("lut3", {}),
                   ("nf4", {"double_quant": True}), ("dfloat11", {})]


@pytest.mark.skipif(shutil.which("g++") is None, reason="AOTInductor on CPU needs a C++ compiler")
@pytest.mark.skipif(TORCH_BEFORE_2_13, reason="torch < 2.13's AOTInductor CPU wrapper does not declare "
                    "at::Float8_e5m2 / Float8_e4m3fn: the fp8 layers' package fails to compile (measured on 2.11)")
def test_aoti_package_of_each_format_family_matches_eager(tmp_path):
    """AOTInductor (torch.export, then inductor's C++ code in a .pt2 package) runs a layer of each
    format family and each activation option (every format exports, above; the C++ compile time
    grows with the layers), and, through the interpreter, two layers on the Triton
    backend (an op opaque to inductor, which the package calls back): the outputs of another batch
    size equal eager's bit for bit."""
    torch.manual_seed(0)
    layers = [lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40).bfloat16(), fmt, **options)
              for fmt, options in FORMAT_FAMILIES]
    names = [f"{fmt} {options}" for fmt, options in FORMAT_FAMILIES]
    if kernel_devices() == ["cpu"]:
        layers += [_TritonLayer(lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40).bfloat16(), fmt))
                   for fmt in ("int4", "dfloat11")]
        names += ["int4 on triton", "dfloat11 on triton"]
    module = _EveryLayer(layers)
    package = _aoti_packaged(module, torch.randn(3, 96, dtype=torch.bfloat16), tmp_path / "layers.pt2")
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    for name, got, want in zip(names, package(x), module(x), strict=True):
        assert torch.equal(got, want), name


_RUN_PACKAGE_WITHOUT_LOWBIT = """
import sys, torch
package = torch._inductor.aoti_load_package(sys.argv[1])
x, want = torch.load(sys.argv[2])
assert "lowbit" not in sys.modules
print(torch.equal(package(x), want))
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="AOTInductor on CPU needs a C++ compiler")
def test_aoti_package_of_a_torch_backend_layer_runs_without_lowbit(tmp_path):
    """On the torch backend a weight-only layer is plain aten ops (unpack, scale, matmul): its
    AOTInductor package runs in a process that never imports lowbit. (dfloat11's decoder and the
    Triton kernels are Python custom ops: their packages need `import lowbit`.)"""
    torch.manual_seed(0)
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40).bfloat16(), "int4")
    _aoti_packaged(layer, torch.randn(3, 96, dtype=torch.bfloat16), tmp_path / "int4.pt2")
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    torch.save((x, layer(x)), tmp_path / "io.pt")
    run = subprocess.run([sys.executable, "-c", _RUN_PACKAGE_WITHOUT_LOWBIT, str(tmp_path / "int4.pt2"),
                          str(tmp_path / "io.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True"]


@requires_gpu
@pytest.mark.gpu
def test_gpu_aoti_package_of_each_format_family_matches_eager(tmp_path):
    torch.manual_seed(0)
    module = _EveryLayer([lowbit.QuantLinear.from_linear(torch.nn.Linear(4096, 1024).bfloat16(), fmt, **options)
                          for fmt, options in FORMAT_FAMILIES]).cuda()
    package = _aoti_packaged(module, torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda"),
                             tmp_path / "layers.pt2")
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    for (fmt, options), got, want in zip(FORMAT_FAMILIES, package(x), module(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{fmt} {options}: {m}")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_gpu_exported_layer_calls_lowbit_kernels(fmt, options, tmp_path):
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(4096, 1024).bfloat16(), fmt, **options).cuda()
    program = _exported(layer, torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda"), tmp_path / "layer.pt2")
    assert _lowbit_ops(program)
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(program.module()(x), layer(x), rtol=0, atol=0)


@requires_gpu
@pytest.mark.gpu
def test_gpu_device_map_auto(llama_dir, tmp_path):
    model = lowbit.quantize(_llama(llama_dir), "int4", skip=["lm_head"], progress=False)
    model.save_pretrained(tmp_path / "q")
    on_gpu = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="auto")
    assert isinstance(on_gpu.model.layers[0].mlp.up_proj, lowbit.QuantLinear)
    assert on_gpu.model.layers[0].mlp.up_proj.qweight.is_cuda
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(IDS.cuda()).logits.float().cpu(), model(IDS).logits.float(),
                                   rtol=5e-2, atol=5e-2)


def test_an_older_transformers_is_reported_at_import(monkeypatch):
    """With a transformers older than the tested minimum (5.19 routes MoE experts another way and
    its MoE results were wrong), lowbit says so instead of misbehaving quietly; the tested one
    registers without a warning."""
    import warnings

    import transformers

    from lowbit.integrations.transformers import MIN_TRANSFORMERS, register

    monkeypatch.setattr(transformers, "__version__", "5.19.0")
    with pytest.warns(UserWarning, match=rf"lowbit needs transformers >= {MIN_TRANSFORMERS}, found 5\.19\.0"):
        register()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register()
