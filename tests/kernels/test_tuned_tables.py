"""The tuned-config tables committed under lowbit/kernels/tuned/: every entry is one its launcher
still takes. A kernel change that makes an entry invalid (a renamed tile, a narrowed range) would
otherwise go unnoticed: the launcher ignores an entry it cannot take and falls back to its
defaults, silently losing the tuned speed on that GPU."""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.formats.dfloat11 import default_segment
from lowbit.kernels import tuning
from lowbit.packed import PackedWeight

from ..conftest import LaunchStopped, kernel_devices, record_launches

DEVICES = kernel_devices()
REPO = Path(__file__).resolve().parents[2]
TABLES = sorted(tuning.TUNED_DIR.glob("*.json"))
ENTRIES = [(path, key) for path in TABLES for key in json.loads(path.read_text())["configs"]]
#: the kernel each path launches
KERNELS = {"gemv": "_gemv_kernel", "gemm": "_gemm_kernel", "lut": "_lut_gemv_kernel", "fused": "_decode_gemv_kernel"}
#: config keys that reach the launch under another name (the GEMV's tile-loop stages)
LAUNCH_NAMES = {"gemv": {"num_stages": "STAGES"}}


def _packed_of_size(spec: str, n: int, k: int) -> PackedWeight:
    """A packed [n, k] weight of format spec "name[:opt=value,...]", with the options the tuner
    gave it (benchmarks/bench_gemm.py `parse_format_spec` at tune.py's default --group-size and
    --symmetric), all-zero fields and the attrs of 8 quantized rows of the same width: the
    launch path without quantizing n rows."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_gemm import parse_format_spec

    name, options = parse_format_spec(spec, argparse.Namespace(group_size=128, symmetric=False))
    if name == "dfloat11":  # its default segment depends on the row count: the full weight's
        options.setdefault("segment", default_segment(n, k))
    fmt = lowbit.get_format(name)
    small = fmt.quantize(torch.randn(8, k, generator=torch.Generator().manual_seed(0)) * 0.02, **options)
    tensors = {field: torch.zeros(spec.shape, dtype=spec.dtype)
               for field, spec in fmt.field_specs((n, k), small.attrs).items()}
    return PackedWeight(name, (n, k), small.dtype, small.attrs, tensors)


def test_the_tables_are_found():
    """The H100 table of the second GPU run is committed; a test over no entries would pass for nothing."""
    assert "NVIDIA_H100_80GB_HBM3" in {path.stem for path in TABLES} and ENTRIES


@pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
@pytest.mark.parametrize("path,key", ENTRIES, ids=[f"{p.stem}:{k}" for p, k in ENTRIES])
def test_every_committed_entry_is_taken_by_its_launcher(path, key, monkeypatch):
    """The launch the entry was measured on (its format, x dtype, shape and M bucket, from its key
    and record), looked up in the committed table, launches the entry's kernel with its tiles and
    warps; the entry was faster than the defaults when measured and passed the correctness gate."""
    entry = json.loads(path.read_text())["configs"][key]
    assert entry["us"] < entry["default_us"] and entry["max_rel_err"] < 2e-2
    variant, size, bucket = key.split("/")
    n, k = map(int, size.split("x"))
    m = int(bucket.removeprefix("m"))
    dtype = getattr(torch, variant.rsplit("torch.", 1)[1])
    packed = _packed_of_size(entry["format"], n, k)
    x = torch.zeros(m, k, dtype=dtype, device=DEVICES[0])
    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    tuning._read_table.cache_clear()
    launches = record_launches(monkeypatch, stop=True)  # checked at full size: no kernel runs
    try:
        with pytest.raises(LaunchStopped):
            lowbit.linear(x, packed.to(x.device), None, backend="triton")
    finally:
        tuning._read_table.cache_clear()
    assert tuning.last_key() == key  # the launch looked up this very entry
    kernel, kwargs = launches[-1]
    assert kernel == KERNELS[entry["path"]]
    renamed = LAUNCH_NAMES.get(entry["path"], {})
    launch_keys = [k for k in entry if k.isupper() and k != "SPLIT_K" or k in tuning.LAUNCH_KEYS]
    assert "BLOCK_N" in launch_keys
    for name in launch_keys:  # SPLIT_K shapes the grid, not a keyword
        assert kwargs.get(renamed.get(name, name)) == entry[name], name
