"""benchmarks/bench_gemm.py --smoke stays green on CPU (through the Triton interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode is the CPU interpreter run")
def test_bench_gemm_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gemm.py"), "--smoke", "--formats",
                           "int3", "lut3", "fp8:block=32,act=fp8", "nvfp4", "dfloat11", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert set(data["env"]) == {"device", "torch", "triton", "commit", "date"}
    rows = data["results"]
    assert len(rows) == 5 * 2 * 2  # formats x smoke shapes x M
    assert {r["format"] for r in rows} == {"int3", "lut3", "fp8:block=32,act=fp8", "nvfp4", "dfloat11"}
    for row in rows:
        assert "error" not in row
        assert row["shape"].startswith("smoke/") and row["max_rel_err"] < 1e-4
        assert row["us"] > 0 and row["bf16_us"] > 0 and row["speedup"] > 0
    assert list(tmp_path.glob("*.md"))


def test_bench_gemm_refuses_gpu_mode_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gemm.py"), "--formats", "int4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "only taken on a GPU" in proc.stderr


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


def test_bench_e2e_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--smoke", "--formats", "int4",
                           "dfloat11", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # torch reference
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert set(data["env"]) == {"device", "torch", "triton", "commit", "date"}
    rows = data["results"]
    assert [(r["format"], r["batch"]) for r in rows] == [(f, b) for f in ("bf16", "int4", "dfloat11") for b in (1, 2)]
    for row in rows:
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["decode_speedup"] > 0
    lossless = [r for r in rows if r["format"] == "dfloat11"]
    assert all(r["logits_cos_vs_bf16"] > 0.99999 for r in lossless)  # lossless weights, same reference math
    assert all(0.9 < r["logits_cos_vs_bf16"] < 1 for r in rows if r["format"] == "int4")
    assert list(tmp_path.glob("*.md"))


def test_bench_e2e_refuses_gpu_mode_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_e2e.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "only taken on a GPU" in proc.stderr


def test_competitors_compute_the_same_product():
    """The competitor wiring (timed only on a GPU) computes x @ w^T; torchao's int8 / fp8
    weight-only kernels also run on CPU, so the wiring is checked here."""
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.bench_gemm import time_competitor
    from benchmarks.competitors import competitor

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 256, generator=gen) * 0.02).bfloat16()
    x = torch.randn(3, 256, generator=gen).bfloat16()
    ref = torch.nn.functional.linear(x.float(), w.float())
    for name, bound in (("int8", 0.02), ("fp8", 0.06)):
        label, fn = competitor(name, {}, w, x)
        assert label.startswith("torchao")
        assert float((fn().float() - ref).abs().max() / ref.abs().max()) < bound
    assert competitor("mxfp4", {}, w, x) is None
    row = time_competitor("fp8", {"act": "fp8"}, w, x, ref, torch.device("cpu"), 1.0)  # needs sm89+: recorded
    assert row is not None and ("error" in row or row["us"] > 0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke mode is the CPU interpreter run")
def test_tune_smoke_writes_configs_the_launcher_reads(tmp_path, monkeypatch):
    """The tuner measures candidates through lowbit.linear and files the winners under the keys
    the launcher looks up; with the table in place the launcher takes them (still correct)."""
    import torch

    import lowbit
    from lowbit.kernels import tuning
    from lowbit.kernels.dequant_gemm import pick_config

    out = tmp_path / "tuned.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tune.py"), "--smoke", "--formats", "int4",
                           "dfloat11", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert set(table["env"]) == {"device", "torch", "triton", "commit", "date"}
    measured = table["measured"]  # every int4 case measured; dfloat11 has no dequant-kernel config
    assert sorted((r["shape"], r["M"]) for r in measured) == [(s, m) for s in ("smoke/odd", "smoke/square")
                                                              for m in (1, 17)]
    assert all(r["candidates_kept"] >= 1 and r["default_us"] > 0 for r in measured)
    for key, entry in table["configs"].items():
        assert key.startswith("int4-asym-g128-float-torch.float32/") and entry["us"] < entry["default_us"]
        assert entry["max_rel_err"] < 1e-4 and entry["path"] in ("gemv", "gemm")
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
