#!/usr/bin/env python3
"""Tune the dequant kernel family per GPU: path and tiles per kernel variant, shape and M bucket.

  python benchmarks/tune.py                          # GPU: DEFAULT formats, llama3-8b, every M bucket
  python benchmarks/tune.py --formats int4 nvfp4 --sets llama3-8b qwen2.5-7b
  TRITON_INTERPRET=1 python benchmarks/tune.py --smoke --out /tmp/t.json   # CPU check of the machinery

For every (format, shape, M bucket) each candidate — split-K GEMV tiles for small M, tensor-core
GEMM tiles for all M, so the GEMV/GEMM choice per M is measured, not assumed — runs through
lowbit.linear under `tuning.force(candidate)`. Candidates whose output misses the correctness
gate (max relative error vs the fp32 reference, as in bench_gemm) or that fail to launch are
dropped; the fastest survivor (triton.testing.do_bench median) is written with its time and the
default config's time into lowbit/kernels/tuned/<gpu>.json, which the launchers read, but only
when it beats the default config (otherwise the entry is removed and the defaults apply). Formats
that do not go through the dequant kernel (dfloat11, the LUT lookup GEMV, W8A8) have nothing to tune here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_gemm import REL_TOL, env_info, make_case, time_us  # noqa: E402
from benchmarks.shapes import shapes  # noqa: E402

DEFAULT_FORMATS = ["int4", "int8", "int6", "int2", "fp8", "mxfp4", "nvfp4", "mxint8", "nf4", "lut2"]
GEMV_CANDIDATES = [{"path": "gemv", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}
                   for bm in (1, 4) for bn in (16, 32, 64) for bk in (64, 128, 256) for sk in (1, 4, 8, 16, 32)]
GEMM_CANDIDATES = [{"path": "gemm", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                   for bm in (16, 32, 64, 128) for bn in (64, 128) for bk in (32, 64, 128)]
SMOKE_CANDIDATES = [{"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2},
                    {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}]


def candidates_for(m: int, smoke: bool) -> list[dict]:
    if smoke:
        return [c for c in SMOKE_CANDIDATES if c["path"] == "gemm" or m <= 4]
    return [c for c in GEMV_CANDIDATES if m <= 16 and c["BLOCK_M"] >= min(m, 4)] + GEMM_CANDIDATES


def tune_case(spec: str, n: int, k: int, m: int, args, device, dtype):
    """(config key, best entry or None, measurement record) for one case; (None, None, None)
    when the format's launch reads no config."""
    import lowbit
    from lowbit.kernels import tuning

    _, x, _, _, fmt, packed = make_case(spec, n, k, m, args, device, dtype)
    ref = F.linear(x.float(), fmt.dequantize(packed).float())
    tuning._last_key.set(None)
    default_us, _, _ = time_us(lambda: lowbit.linear(x, packed, backend="triton"), device)
    key = tuning.last_key()
    if key is None:
        return None, None, None
    best, kept, pruned = None, 0, 0
    for candidate in candidates_for(m, args.smoke):
        try:
            with tuning.force(candidate):
                y = lowbit.linear(x, packed, backend="triton")
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                if not err <= REL_TOL[dtype]:
                    pruned += 1
                    continue
                us, _, _ = time_us(lambda: lowbit.linear(x, packed, backend="triton"), device)
        except Exception:  # a tile this variant cannot take (BLOCK_K vs group, resources): pruned
            pruned += 1
            continue
        kept += 1
        if best is None or us < best["us"]:
            best = {**candidate, "us": us, "default_us": default_us, "max_rel_err": err}
    return key, best, {"key": key, "format": spec, "M": m, "N": n, "K": k, "default_us": default_us,
                       "best": best, "candidates_kept": kept, "candidates_pruned": pruned}


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from benchmarks.shapes import SMOKE_M_VALUES
    from lowbit.kernels.tuning import M_BUCKETS, TUNED_DIR, device_key

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and candidates in the Triton interpreter")
    p.add_argument("--formats", nargs="+", default=None)
    p.add_argument("--sets", nargs="+", default=["llama3-8b"])
    p.add_argument("--m", nargs="+", type=int, default=list(M_BUCKETS))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="default: lowbit/kernels/tuned/<gpu>.json (merged)")
    args = p.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device, dtype, cases, m_values = torch.device("cpu"), torch.float32, shapes(["smoke"]), SMOKE_M_VALUES
        formats = args.formats or ["int4"]
    else:
        if not torch.cuda.is_available():
            print("tuning measures a GPU: no CUDA device here (use --smoke on CPU)", file=sys.stderr)
            return 2
        device, dtype, cases, m_values = torch.device("cuda"), torch.bfloat16, shapes(args.sets), args.m
        formats = args.formats or DEFAULT_FORMATS
    out = args.out or TUNED_DIR / f"{device_key(device)}.json"
    table = json.loads(out.read_text()) if out.is_file() else {}
    configs = table.get("configs", {})
    jobs = [(f, s, n, k, m) for f in formats for (s, n, k) in cases for m in m_values]
    measured = []
    for spec, shape, n, k, m in tqdm(jobs, desc="tune", unit="case"):
        key, best, record = tune_case(spec, n, k, m, args, device, dtype)
        if key is None:
            continue
        measured.append({**record, "shape": shape})
        if best is not None and best["us"] < best["default_us"]:
            configs[key] = {**best, "format": spec, "shape": shape}
        else:  # the defaults are as fast: no entry (drops a stale one)
            configs.pop(key, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env_info(device), "configs": configs, "measured": measured}, indent=1,
                              sort_keys=True))
    gains = [c["default_us"] / c["us"] for c in configs.values()]
    print(f"wrote {len(configs)} tuned configs to {out}"
          + (f"; tuned/default speedup median {sorted(gains)[len(gains) // 2]:.2f}x" if gains else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
