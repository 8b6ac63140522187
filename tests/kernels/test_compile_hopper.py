"""Compile every kernel variant for Hopper (sm_90) without a GPU, and check the generated code.

Triton's interpreter accepts programs the real compiler rejects, and shows nothing of the code a
GPU would run. Triton ships ptxas, so the kernels are compiled ahead of time (in a subprocess
with the interpreter off) exactly as the JIT would on an H100, and the PTX is checked for the
properties speed depends on.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VARIANTS = [["gemv", b, s, a] for b in range(2, 9) for s, a in [(True, "bf16"), (False, "fp16"), (b % 2 == 0, "fp32")]]
VARIANTS += [["gemm", b, s, a] for b in range(2, 9) for s, a in [(True, "bf16"), (False, "fp16"), (b % 2 == 0, "fp32")]]
VARIANTS += [["gemm", 4, False, "bf16"], ["gemv", 4, True, "fp16"]]


@pytest.fixture(scope="module")
def hopper():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.hopper_codegen", json.dumps(VARIANTS)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"this triton install cannot compile for CUDA: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _ptx(hopper, path, bits, symmetric, act):
    result = hopper[f"{path}-{bits}-{symmetric}-{act}"]
    assert "error" not in result, result.get("error")
    assert result["cubin_bytes"] > 0
    return result["ptx"]


@pytest.mark.parametrize("path,bits,symmetric,act", VARIANTS)
def test_compiles_for_sm90(hopper, path, bits, symmetric, act):
    _ptx(hopper, path, bits, symmetric, act)


@pytest.mark.parametrize("act", ["bf16", "fp16"])
def test_gemm_uses_hopper_tensor_cores(hopper, act):
    assert "wgmma.mma_async" in _ptx(hopper, "gemm", 4, act == "bf16", act)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gemv_loads_each_packed_word_once_with_vector_loads(hopper, bits):
    """32 x 128 codes over 128 threads: each thread's words arrive in one 128-bit load, not one
    32-bit load per code (which is what a per-code word gather compiles to: 32 per thread)."""
    ptx = _ptx(hopper, "gemv", bits, True, "bf16")
    assert len(re.findall(r"ld\.global(?:\.nc)?\.b32", ptx)) == 0
    assert len(re.findall(r"ld\.global(?:\.nc)?\.v4\.b32", ptx)) >= 1


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_multi_plane_widths_never_gather_per_code(hopper, bits):
    ptx = _ptx(hopper, "gemv", bits, True, "bf16")
    assert len(re.findall(r"ld\.global(?:\.nc)?\.b32", ptx)) <= 3  # at most a small plane's word, never 32
