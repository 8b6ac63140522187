"""lowbit.save / lowbit.load: round trips, atomicity, and every damaged-checkpoint case."""
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.errors import CheckpointError, InputError, LowbitError
from lowbit.io import MANIFEST

from .conftest import make_tiny_llama
from .damage import replace_json_value


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 33, bias=False))


@pytest.fixture
def saved_mlp(tmp_path):
    model = lowbit.quantize(_mlp(), "int4", progress=False, overrides={"2": "int3"})
    lowbit.save(model, tmp_path / "ck")
    return model, tmp_path / "ck"


def test_plain_module_round_trip(saved_mlp):
    model, path = saved_mlp
    loaded = lowbit.load(path, model=_mlp())
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), model(x))
    assert loaded[2].format == "int3" and loaded[0].format == "int4"


def test_plain_module_needs_a_skeleton(saved_mlp):
    with pytest.raises(CheckpointError, match="model="):
        lowbit.load(saved_mlp[1])


def test_skeleton_must_match(saved_mlp):
    with pytest.raises(CheckpointError, match="layers.2"):
        lowbit.load(saved_mlp[1], model=nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 34)))


# Options beyond the defaults that change what is stored.
EXTRA_OPTIONS = {"int8": [{"act": "int8", "symmetric": True, "group_size": -1}],
                 "int4": [{"act": "int8"}, {"method": "mse"}, {"act": "fp8", "symmetric": True}],
                 "fp8": [{"block": 128, "act": "fp8"}, {"act": "fp8"}], "fp8_e5m2": [{"block": 32}],
                 "mxfp4": [{"act": "mxfp4", "rotate": "hadamard"}, {"act": "mxfp8", "act_amax_round": 1}],
                 "nvfp4": [{"act": "nvfp4"}, {"act": "nvfp4", "act_tensor_scale": 0.002}],
                 "nf4": [{"double_quant": True}]}
EVERY_FORMAT = [(f, {}) for f in lowbit.formats()] + [(f, o) for f, opts in EXTRA_OPTIONS.items() for o in opts]


@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_every_format_round_trips(tmp_path, fmt, options):
    model = lowbit.quantize(make_tiny_llama(dtype=torch.bfloat16), fmt, skip=["lm_head"], progress=False, **options)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    lowbit.save(model, tmp_path / "m")
    loaded = lowbit.load(tmp_path / "m")
    layer, original = loaded.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.up_proj
    assert layer.format == fmt and layer.attrs == original.attrs
    for name, tensor in original.packed.tensors.items():
        assert layer.packed.tensors[name].dtype == tensor.dtype and torch.equal(layer.packed.tensors[name], tensor)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_round_trip_identical_logits(tmp_path, dtype):
    model = lowbit.quantize(make_tiny_llama(dtype=dtype), "int4", group_size=32, skip=["lm_head"], progress=False)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    lowbit.save(model, tmp_path / "llama", max_shard_bytes=50_000)
    assert len(list((tmp_path / "llama").glob("model-*.safetensors"))) > 1
    loaded = lowbit.load(tmp_path / "llama")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    assert loaded.lm_head.weight.dtype == dtype


def test_loaded_cpu_tensors_are_aligned_so_logits_match_bit_for_bit(tmp_path):
    """A CPU load maps safetensors data in place at 8-byte offsets; Mixtral's grouped expert
    matmul (experts left in full precision here) then took another code path and its fp32 logits
    came back 7e-8 off. load copies every misaligned tensor into an aligned allocation."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = lowbit.quantize(MixtralForCausalLM(config).eval(), "int4", skip="*.experts.*", progress=False)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    lowbit.save(model, tmp_path / "moe")
    loaded = lowbit.load(tmp_path / "moe")
    assert all(t.data_ptr() % 64 == 0 for t in list(loaded.parameters()) + list(loaded.buffers()) if t.numel())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_tied_weights_stay_tied(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = lowbit.quantize(LlamaForCausalLM(cfg).eval(), "int8", skip=["lm_head"], progress=False)
    lowbit.save(model, tmp_path / "tied")
    manifest = json.loads((tmp_path / "tied" / MANIFEST).read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = lowbit.load(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_minilm_round_trip_identical_embeddings(minilm, tmp_path):
    import copy

    from lowbit.default_model import DEMO_SENTENCES, sentence_embeddings

    model, tok = minilm
    q = lowbit.quantize(copy.deepcopy(model), "int8", progress=False)
    lowbit.save(q, tmp_path / "minilm")
    loaded = lowbit.load(tmp_path / "minilm")
    assert torch.equal(sentence_embeddings(loaded, tok, DEMO_SENTENCES), sentence_embeddings(q, tok, DEMO_SENTENCES))


# -- atomicity ------------------------------------------------------------------------------
def test_overwrite_existing_checkpoint(saved_mlp):
    _, path = saved_mlp
    lowbit.save(lowbit.quantize(_mlp(), "int8", progress=False), path)
    assert lowbit.load(path, model=_mlp())[0].format == "int8"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck"]  # no temp folders left


def test_refuses_to_overwrite_a_regular_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="not a directory"):
        lowbit.save(_mlp(), target)
    assert target.read_bytes() == b"precious"


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        lowbit.save(_mlp(), tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_failed_save_leaves_previous_checkpoint_untouched(saved_mlp, monkeypatch):
    model, path = saved_mlp
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        from safetensors.torch import save_file
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr("lowbit.io.save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        lowbit.save(lowbit.quantize(_mlp(), "int8", progress=False), path, max_shard_bytes=1000)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck"]


# -- damaged checkpoints ----------------------------------------------------------------------
def _edit_json(file: Path, edit):
    document = json.loads(file.read_text())
    edit(document)
    file.write_text(json.dumps(document))


def _edit_manifest(path: Path, edit):
    _edit_json(path / MANIFEST, edit)


def _rewrite_tensor(path: Path, key: str, value: torch.Tensor):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, str(path / "model.safetensors"))


DAMAGE = {
    "missing manifest": (lambda p: (p / MANIFEST).unlink(), r"lowbit\.json: manifest missing"),
    "garbled manifest": (lambda p: (p / MANIFEST).write_text("{not json"), r"lowbit\.json: <file>: not valid JSON"),
    "manifest not an object": (lambda p: (p / MANIFEST).write_text("[]"), r"lowbit\.json: <root>"),
    "manifest lacks layers": (lambda p: _edit_manifest(p, lambda m: m.pop("layers")), r"lowbit\.json: layers"),
    "unknown version": (lambda p: _edit_manifest(p, lambda m: m["lowbit"].update(format_version=7)),
                        r"format_version: 7 is not supported"),
    "unknown format": (lambda p: _edit_manifest(p, lambda m: m["layers"]["0"].update(format="int17")),
                       r"layers\.0: unknown format 'int17'"),
    "bad attrs": (lambda p: _edit_manifest(p, lambda m: m["layers"]["0"]["attrs"].update(group_size=48)),
                  r"layers\.0: int4: group_size"),
    "bad layer shape": (lambda p: _edit_manifest(p, lambda m: m["layers"]["0"].update(shape=[96])),
                        r"layers\.0: int4: shape must be"),
    "layer shape beyond int32": (lambda p: _edit_manifest(p, lambda m: m["layers"]["0"].update(shape=[2**70, 64])),
                                 r"layers\.0: int4: shape must be \[out_features, in_features\], ints in 1\.\.2147483647"),
    "group size beyond int32": (lambda p: _edit_manifest(p, lambda m: m["layers"]["0"]["attrs"].update(group_size=2**70)),
                                r"layers\.0: int4: group_size must be a positive multiple of 32 up to 2147483647"),
    "tensor dtype not a string": (lambda p: _edit_manifest(p, lambda m: m["tensors"]["0.bias"].update(dtype=[])),
                                  r"tensors\.0\.bias: malformed entry"),
    "no such layer": (lambda p: _edit_manifest(p, lambda m: m["layers"].update({"7": m["layers"]["0"]})),
                      r"layers\.7: no such module"),
    "path in file name": (lambda p: _edit_manifest(p, lambda m: m["tensors"]["0.bias"].update(file="../x")),
                          r"tensors\.0\.bias\.file"),
    "missing shard": (lambda p: (p / "model.safetensors").unlink(), r"model\.safetensors: <file>: missing"),
    "truncated shard": (lambda p: os.truncate(p / "model.safetensors", os.path.getsize(p / "model.safetensors") - 10),
                        r"model\.safetensors: <header>"),
    "garbled header": (lambda p: _garble_header(p / "model.safetensors"), r"model\.safetensors: <header>"),
    "tensor missing from file": (lambda p: _rewrite_tensor(p, "0.scales", None), r"0\.scales: tensor missing"),
    "wrong dtype in file": (lambda p: _rewrite_tensor(p, "0.scales", torch.zeros(1, 96, dtype=torch.float32)),
                            r"0\.scales: file holds F32"),
    "wrong shape in file": (lambda p: _rewrite_tensor(p, "0.qweight", torch.zeros(96, 7, dtype=torch.int32)),
                            r"0\.qweight: file holds I32 \[96, 7\]"),
    "wrong field dtype in manifest and file": (
        lambda p: (_rewrite_tensor(p, "0.scales", torch.zeros(1, 96, dtype=torch.float32)),
                   _edit_manifest(p, lambda m: m["tensors"]["0.scales"].update(dtype="float32"))),
        r"0\.scales: dtype float32 does not fit"),
    "wrong field shape in manifest and file": (
        lambda p: (_rewrite_tensor(p, "0.qweight", torch.zeros(96, 7, dtype=torch.int32)),
                   _edit_manifest(p, lambda m: m["tensors"]["0.qweight"].update(shape=[96, 7]))),
        r"0\.qweight: shape \[96, 7\] does not fit"),
    "fractional zero point of an int8-activation layer": (
        lambda p: (_edit_manifest(p, lambda m: m["layers"]["0"]["attrs"].update(act="int8")),
                   _rewrite_tensor(p, "0.zeros", torch.full((1, 96), 2.5, dtype=torch.float16))),
        r"model\.safetensors: 0: int4: zeros\[0, 0\] = 2\.5: layers with act='int8' need integer zero points"),
    "extra tensor": (lambda p: _edit_manifest(p, lambda m: m["tensors"].update(
        {"9.weight": {"dtype": "float32", "shape": [1], "file": "model.safetensors"}})), r"does not have: \['9\.weight'\]"),
    "missing tensor": (lambda p: _edit_manifest(p, lambda m: m["tensors"].pop("0.bias")), r"missing tensor.*0\.bias"),
}


def _garble_header(path: Path):
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + min(n, 40)] = b"\x00garbage" * 5
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_raises_checkpoint_error(saved_mlp, case):
    damage, message = DAMAGE[case]
    damage(saved_mlp[1])
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(saved_mlp[1], model=_mlp())


def _as_format_version_1(manifest):
    """What lowbit wrote before format version 2: no per-layer packed layout."""
    manifest["lowbit"]["format_version"] = 1
    for entry in manifest["layers"].values():
        del entry["layout"]


@pytest.mark.parametrize("second", ["int3", "int6", "int7", "mxfp6"])
def test_format_version_1_loads_unless_a_layout_changed(tmp_path, second):
    """Version-1 folders still load, except layers whose packed layout changed since (int6, int7
    and mxfp6 moved to a nibble-aligned 2-bit plane): those are refused, never misread."""
    model = lowbit.quantize(_mlp(), "int4", progress=False, overrides={"2": second})
    lowbit.save(model, tmp_path / "ck")
    _edit_manifest(tmp_path / "ck", _as_format_version_1)
    if second == "int3":
        x = torch.randn(5, 64)
        assert torch.equal(lowbit.load(tmp_path / "ck", model=_mlp())(x), model(x))
    else:
        with pytest.raises(CheckpointError, match=rf"layers\.2: {second}: packed layout 1 is not the one this "
                                                  r"lowbit reads \(2\); it was written by an older lowbit"):
            lowbit.load(tmp_path / "ck", model=_mlp())


def test_extra_files_are_copied_in_the_same_atomic_write(saved_mlp, tmp_path):
    model, path = saved_mlp
    (tmp_path / "tok.json").write_text('{"vocab": 3}')
    (tmp_path / "pool.json").write_text("{}")
    lowbit.save(model, path, extra_files={"tokenizer.json": tmp_path / "tok.json", "1_Pooling/config.json":
                                          str(tmp_path / "pool.json")})
    assert (path / "tokenizer.json").read_text() == '{"vocab": 3}' and (path / "1_Pooling" / "config.json").is_file()
    assert lowbit.load(path, model=_mlp())[0].format == "int4"  # the loader ignores files the manifest does not list

    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    for extra, match in [({"model.safetensors": tmp_path / "tok.json"}, r"\['model.safetensors'\]: save writes"),
                         ({"../outside.json": tmp_path / "tok.json"}, "'../outside.json' is not a relative path"),
                         ({str(tmp_path / "abs.json"): tmp_path / "tok.json"}, "is not a relative path"),
                         ({"./lowbit.json": tmp_path / "tok.json"}, r"\['lowbit.json'\]: save writes lowbit.json itself"),
                         ({"vocab.txt": tmp_path / "missing.txt"}, r"\['vocab.txt'\]: .*missing.txt is not a file")]:
        with pytest.raises(CheckpointError, match=match):
            lowbit.save(lowbit.quantize(_mlp(), "int8", progress=False), path, extra_files=extra)
        assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "pool.json", "tok.json"]  # no temp folders left


def test_companion_files_of_a_hugging_face_folder(tmp_path, caplog):
    """What a quantized copy of a folder takes along: not the weights in any format, their index,
    config.json (save writes its own) or exports of the weights; the sentence-transformers module
    folders that modules.json names, whole."""
    from lowbit.io import companion_files

    names = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "tf_model.h5", "flax_model.msgpack", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
             "chat_template.jinja", "README.md", "LICENSE", ".gitattributes", "onnx/model.onnx", "onnx/config.json",
             "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 0, "path": ""}, {"idx": 1, "path": "1_Pooling"},
                                                        {"idx": 2, "path": "2_Dense"}, {"idx": 3, "path": "3_Normalize"}]))
    with caplog.at_level("INFO", logger="lowbit.io"):
        files = companion_files(tmp_path)
    assert sorted(files) == ["1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors", "LICENSE",
                             "README.md", "chat_template.jinja", "generation_config.json", "modules.json",
                             "tokenizer.json", "tokenizer_config.json"]
    assert all(files[name] == tmp_path / name for name in files)
    assert "not copied: ['onnx/']" in caplog.text

    (tmp_path / "modules.json").write_text("[{")
    with caplog.at_level("WARNING", logger="lowbit.io"):
        assert "1_Pooling/config.json" not in companion_files(tmp_path)
    assert "modules.json is unreadable" in caplog.text


def test_bad_arguments_are_input_errors_before_anything_is_written_or_read(saved_mlp, tmp_path):
    model, folder = saved_mlp
    with pytest.raises(InputError, match="model must be a torch.nn.Module, got str"):
        lowbit.save("model", tmp_path / "out")
    with pytest.raises(CheckpointError, match="max_shard_bytes must be a positive int, got '1GB'"):
        lowbit.save(model, tmp_path / "out", max_shard_bytes="1GB")
    with pytest.raises(InputError, match=r"save\(\.\.\., out_dir\) must be a str or os\.PathLike, got int"):
        lowbit.save(model, 3)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=r"load\(path\) must be a str or os\.PathLike, got NoneType"):
        lowbit.load(None)
    with pytest.raises(InputError, match="device 'gpu0' is not a torch device"):
        lowbit.load(folder, device="gpu0")
    with pytest.raises(InputError, match=r"load\(\.\.\., model=\) must be a torch.nn.Module"):
        lowbit.load(folder, model={"0": None})
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available here"):
            lowbit.load(folder, device="cuda")


def test_load_of_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        lowbit.load(tmp_path / "nope")


def test_unknown_transformers_class_is_refused(tmp_path):
    model = lowbit.quantize(make_tiny_llama(), "int8", progress=False)
    lowbit.save(model, tmp_path / "m")
    _edit_manifest(tmp_path / "m", lambda m: m["model"].update({"class": "os.system"}))
    with pytest.raises(CheckpointError, match="model.class"):
        lowbit.load(tmp_path / "m")


def _saved_dfloat11_mlp(path: Path) -> Path:
    lowbit.save(lowbit.quantize(_mlp().bfloat16(), "dfloat11", progress=False), path)
    return path


def test_dfloat11_checkpoint_whose_codes_overrun_the_stream_is_refused(tmp_path):
    from safetensors.torch import load_file

    path = _saved_dfloat11_mlp(tmp_path / "ck")
    words = load_file(str(path / "model.safetensors"))["0.exponent_code"]
    words[:-1] = -1  # all-ones bits: the longest code, so the last rows' segments run past the end
    _rewrite_tensor(path, "0.exponent_code", words)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 0: dfloat11 field 'exponent_code': segment \d+ of "
                                              r"row \d+ decodes past the end"):
        lowbit.load(path, model=_mlp().bfloat16())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_dfloat11_loader_against_corrupt_field_values(tmp_path_factory, data):
    """Up to 4 bytes of a dfloat11 layer's stream, segment offsets or decode table changed: the
    load raises LowbitError or gives a model whose forward pass runs (the checks the loader
    makes are what keep the decoders inside the stream)."""
    from safetensors.torch import load_file, save_file

    path = _saved_dfloat11_mlp(tmp_path_factory.mktemp("fuzz") / "ck")
    tensors = load_file(str(path / "model.safetensors"))
    key = data.draw(st.sampled_from([f"{layer}.{field}" for layer in (0, 2)
                                     for field in ("exponent_code", "segment_offsets", "decode_table")]))
    raw = tensors[key].flatten().view(torch.uint8)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, raw.numel() - 1))] = data.draw(st.integers(0, 255))
    tensors[key] = raw.view(tensors[key].dtype).reshape(tensors[key].shape)
    save_file(tensors, str(path / "model.safetensors"))
    try:
        model = lowbit.load(path, model=_mlp().bfloat16())
    except LowbitError:
        return
    assert model(torch.randn(3, 64).bfloat16()).shape == (3, 33)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_loader_against_manifest_values_of_any_type(tmp_path_factory, data):
    """Any value of the manifest (a layer's shape, an attr, a tensor's dtype, ...) replaced by a
    JSON value of any type or size gives LowbitError or a successful load, never another
    exception (this found a list as a tensor dtype -> TypeError, shapes and group sizes past
    int64 -> an overflow in torch.empty)."""
    path = tmp_path_factory.mktemp("fuzz") / "ck"
    lowbit.save(lowbit.quantize(_mlp(), "int4", progress=False, overrides={"2": "nvfp4"}), path)
    manifest = json.loads((path / MANIFEST).read_text())
    replace_json_value(data, manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    try:
        lowbit.load(path, model=_mlp())
    except LowbitError:
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_loader_against_random_corruption(tmp_path_factory, data):
    """Any truncation or byte flip in the manifest or a shard header gives LowbitError or a
    successful load, never another exception."""
    path = tmp_path_factory.mktemp("fuzz") / "ck"
    lowbit.save(lowbit.quantize(_mlp(), "int4", progress=False), path)
    target = data.draw(st.sampled_from([MANIFEST, "model.safetensors"]))
    blob = bytearray((path / target).read_bytes())
    header_end = len(blob) if target == MANIFEST else 8 + struct.unpack("<Q", blob[:8])[0]
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    (path / target).write_bytes(bytes(blob))
    try:
        lowbit.load(path, model=_mlp())
    except LowbitError:
        pass


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4))


@pytest.mark.parametrize("case", ["lowbit.save", "save_pretrained", "gpt2 n_layer"])
def test_a_damaged_layer_count_is_refused_before_transformers_builds_the_layers(tmp_path, case):
    """A layer count of millions in a saved config (transformers would build the layers for hours)
    is refused naming the file and key; GPT-2's n_layer is one under another name."""
    model = lowbit.quantize(_tiny_gpt2() if case == "gpt2 n_layer" else make_tiny_llama(), "int8", progress=False)
    key = "n_layer" if case == "gpt2 n_layer" else "num_hidden_layers"
    if case == "save_pretrained":
        model.save_pretrained(tmp_path / "m")
        config_path, field = tmp_path / "m" / "config.json", key
        config = json.loads(config_path.read_text())
        config[key] = 3_000_000
        config_path.write_text(json.dumps(config))
    else:
        lowbit.save(model, tmp_path / "m")
        config_path, field = tmp_path / "m" / MANIFEST, f"model.config.{key}"
        _edit_manifest(tmp_path / "m", lambda m: m["model"]["config"].update({key: 3_000_000}))
    with pytest.raises(CheckpointError, match=rf"{config_path.name}: {field}: 3000000, but the tensors number only "
                       r"2 modules"):
        lowbit.load(tmp_path / "m")


def test_layer_counts_are_checked_in_nested_configs_and_may_exceed_the_tensors_up_to_1024():
    """check_layer_counts reads nested configs (a text_config) and every alias of the count; a count
    the tensors do not number is legal up to 1024 (ALBERT shares one numbered layer among 12)."""
    from lowbit.io import check_layer_counts

    names = ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "lm_head.weight"]
    for config, key in [({"text_config": {"num_hidden_layers": 5000}}, "text_config.num_hidden_layers"),
                        ({"decoder_layers": 2000}, "decoder_layers"), ({"n_layers": 1025}, "n_layers"),
                        ({"vision_config": {"num_layers": 10 ** 9}}, "vision_config.num_layers")]:
        with pytest.raises(CheckpointError, match=rf"c\.json: {key}: \d+, but the tensors number only 2 modules"):
            check_layer_counts(Path("c.json"), "<root>", config, names)
    with pytest.raises(CheckpointError, match=r"c\.json: model\.config\.num_hidden_layers: 1025"):
        check_layer_counts(Path("c.json"), "model.config", {"num_hidden_layers": 1025}, names)
    # legal: up to 1024 unbacked layers, any count the tensors number, and keys that are not counts
    check_layer_counts(Path("c.json"), "<root>", {"num_hidden_layers": 1024, "vocab_size": 10 ** 6,
                                                  "global_attn_every_n_layers": 3, "use_cache": True}, names)
    check_layer_counts(Path("c.json"), "<root>", {"num_hidden_layers": 3000}, [f"blk.{i}.w" for i in range(3000)])
    deep = {"num_hidden_layers": 2}
    for _ in range(900):  # a damaged file may nest objects to json's limit: read 4 deep, no RecursionError
        deep = {"text_config": deep}
    check_layer_counts(Path("c.json"), "<root>", deep, names)


def test_albert_whose_12_layers_share_one_set_of_weights_round_trips(tmp_path):
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    model = AlbertModel(AlbertConfig(vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=12,
                                     num_attention_heads=4, intermediate_size=96)).eval()
    lowbit.quantize(model, "int8", progress=False)
    lowbit.save(model, tmp_path / "albert")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "albert")(ids).last_hidden_state, model(ids).last_hidden_state)


@pytest.mark.parametrize("key, value", [("rms_norm_eps", -1e-6), ("rms_norm_eps", float("nan")),
                                        ("rope_parameters.rope_theta", 0.0), ("rope_parameters.rope_theta", -1e4)])
def test_a_config_value_that_breaks_the_model_is_refused(tmp_path, key, value):
    """A negative norm epsilon gives NaN logits and a rope_theta <= 0 wrong ones, silently (transformers
    builds both): refused naming the attribute, from a lowbit folder and a save_pretrained one."""
    model = lowbit.quantize(make_tiny_llama(), "int8", progress=False)
    lowbit.save(model, tmp_path / "lowbit")
    model.save_pretrained(tmp_path / "pretrained")

    def damage(config):
        *parents, leaf = key.split(".")
        for parent in parents:
            config = config[parent]
        config[leaf] = value

    _edit_manifest(tmp_path / "lowbit", lambda m: damage(m["model"]["config"]))
    _edit_json(tmp_path / "pretrained" / "config.json", damage)
    for folder, where in (("lowbit", r"lowbit\.json: model\.config"), ("pretrained", r"config\.json: <model config>")):
        with pytest.raises(CheckpointError, match=rf"{where}: {re.escape(key)} {value} is not a finite number"):
            lowbit.load(tmp_path / folder)


def test_a_moe_config_routing_to_more_experts_than_it_has_is_refused(tmp_path):
    """num_experts_per_tok above the experts of a layer (or 0) builds, then fails in the first
    forward's torch.topk: refused at load, naming the field."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    lowbit.save(lowbit.quantize(MixtralForCausalLM(config), "int8", progress=False), tmp_path / "moe")
    for per_token in (8, 0):
        _edit_manifest(tmp_path / "moe", lambda m: m["model"]["config"].update(num_experts_per_tok=per_token))
        with pytest.raises(CheckpointError, match=rf"lowbit\.json: model\.config: num_experts_per_tok {per_token} is "
                           r"not in 1 \.\.\. 4"):
            lowbit.load(tmp_path / "moe")
    _edit_manifest(tmp_path / "moe", lambda m: m["model"]["config"].update(num_experts_per_tok=4))
    with torch.no_grad():
        assert lowbit.load(tmp_path / "moe")(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    # the same model saved the transformers way: its config.json is read by from_pretrained
    lowbit.load(tmp_path / "moe").save_pretrained(tmp_path / "pretrained")
    for per_token in (8, -1, 0):
        _edit_json(tmp_path / "pretrained" / "config.json", lambda c: c.update(num_experts_per_tok=per_token))
        with pytest.raises(CheckpointError, match=rf"config\.json: <model config>: num_experts_per_tok {per_token} "
                           r"is not in 1 \.\.\. 4"):
            lowbit.load(tmp_path / "pretrained")
