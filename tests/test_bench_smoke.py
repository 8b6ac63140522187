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
