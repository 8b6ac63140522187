#!/usr/bin/env python3
"""Tune the dequant / LUT / dfloat11 GEMV kernels per GPU: path, tiles and warps per kernel variant,
shape and M bucket.

  python benchmarks/tune.py                          # GPU: DEFAULT formats, llama3-8b, every M bucket
  python benchmarks/tune.py --formats int4 nvfp4 --sets llama3-8b qwen2.5-7b --budget-s 300
  TRITON_INTERPRET=1 python benchmarks/tune.py --smoke --out /tmp/t.json   # CPU check of the machinery

For every (format, shape, M bucket) a coordinate descent runs from a start point near the
launcher's default over each path's search space (SPACES: for small M the split-K GEMV's rows
per program, column length, split count, warps and L2 prefetch of its next K tile, and for the
LUT formats also the table-lookup kernel's tiles; tensor-core GEMM tiles, K splits, warps and
pipeline stages for every M), so the GEMV /
lookup / GEMM choice per M is measured, not assumed. A path whose start point measures more than ABANDON_RATIO (2x) slower
than the best config of an earlier path is not descended (the record's paths_abandoned; each
record also has the case's seconds). Each candidate runs through lowbit.linear
under `tuning.force`; one whose output misses the correctness gate (max relative error vs the
fp32 reference of the path the launch takes, as in bench_gemm) or fails to launch is pruned. The fastest survivor
(median GPU time, benchmarks/timing.py) is written with its time and the default's into
lowbit/kernels/tuned/<gpu>.json, which the launchers read, but only when it beats the default
(otherwise the entry is removed and the defaults apply). Cases run M=1 first (the issue's
targets), then larger M; the table is rewritten after every case and no case starts after
--budget-s, so a run cut short keeps what it measured.
Compiling a candidate costs far more than timing it (seconds against tens of milliseconds), so
with --jobs N (default on a GPU: up to 8) N worker processes compile each coordinate's candidates
side by side before they are measured one by one (`Precompiler`): a worker launches the case once
under the candidate's config, which leaves the kernel in Triton's on-disk cache, and the measuring
process loads it from there instead of compiling. Workers never run while a candidate is timed.
The integer formats' act="int8" / "fp8" specs are tuned from M = 32 up, where their GEMM on
quantized activations runs (below, they launch the weight-only variant, tuned under the
weight-only spec). dfloat11 is tuned where its fused decode + GEMV runs (M <= 4, path "fused":
rows per program, sign-byte chunk, segment-column splits, warps and stages); its bf16 decoder
(larger M) and the fp8 formats' W8A8 path (torch._scaled_mm) have no entry here (their launchers
read none).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.bench_gemm import (REL_TOL, env_info, make_case, parse_format_spec, reference,  # noqa: E402
                                   relative_error)
from benchmarks.shapes import shapes  # noqa: E402
from benchmarks.timing import time_us  # noqa: E402
from lowbit.kernels.dequant_gemm import GEMV_COLUMN_K, GEMV_MAX_ROWS_PER_THREAD, gemv_block_n  # noqa: E402
from lowbit.kernels.dfloat11 import FUSED_CHUNKS, STAGES, valid_fused_config  # noqa: E402
from lowbit.kernels.dfloat11 import GEMV_BLOCK_N as FUSED_BLOCK_N  # noqa: E402
from lowbit.kernels.dfloat11 import GEMV_CHUNK as FUSED_CHUNK  # noqa: E402
from lowbit.kernels.dfloat11 import GEMV_STAGE as FUSED_STAGE  # noqa: E402
from lowbit.kernels.fp8_w8a8 import W8A8_MIN_M  # noqa: E402
from lowbit.kernels.quantized_act import ACT_KINDS  # noqa: E402
from lowbit.kernels.lut_gemm import LUT_MAX_M  # noqa: E402

# the formats with speed targets, most important first (a --budget-s cut drops the last ones)
DEFAULT_FORMATS = ["int4", "int8", "fp8", "nvfp4", "mxfp4", "int6", "lut2", "mxint8", "int4:act=fp8,symmetric=true",
                   "int4:act=int8", "dfloat11"]
#: path -> parameter -> values tried by the descent (GEMV only for M <= GEMV_MAX_TUNED_M, the
#: LUT formats' lookup kernel for M <= LUT_MAX_M; "fused": dfloat11's decode + GEMV, its only path)
SPACES = {
    "gemv": {"BLOCK_N": (2, 4, 8, 16, 32), "COLUMN_K": (4, 8, 16, 32, 64), "SPLIT_K": (1, 2, 4, 8, 16, 32),
             "num_warps": (1, 2, 4, 8), "PREFETCH": (0, 1), "num_stages": (1, 2, 3), "maxnreg": (None, 168, 128)},
    "lut": {"BLOCK_N": (8, 16, 32, 64), "BLOCK_K": (64, 128, 256, 512), "SPLIT_K": (1, 2, 4, 8, 16, 32),
            "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3, 4)},
    "gemm": {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (32, 64, 128, 256), "BLOCK_K": (32, 64, 128),
             "SPLIT_K": (1, 2, 4, 8, 16), "num_warps": (4, 8), "num_stages": (2, 3, 4, 5)},
    "fused": {"BLOCK_N": (32, 64, 128, 256, 512), "CHUNK": FUSED_CHUNKS, "STAGE": STAGES,
              "SPLIT_K": (1, 2, 4, 8, 16, 32, 64),
              "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3)},
}
SMOKE_SPACES = {"gemv": {"BLOCK_N": (8, 16), "SPLIT_K": (1, 2)}, "lut": {"BLOCK_N": (16, 32), "SPLIT_K": (1, 2)},
                "gemm": {"BLOCK_M": (16, 32), "SPLIT_K": (1, 2)}, "fused": {"BLOCK_N": (32, 64), "SPLIT_K": (1, 2)}}
GEMV_MAX_TUNED_M = 16


def start_points(m: int, smoke: bool, lut: bool = False, fused: bool = False) -> list[dict]:
    """Where the descent starts on each path (close to the launchers' defaults); lut: a LUT
    format, which also has the table-lookup kernel (path "lut") for M <= LUT_MAX_M; fused:
    dfloat11, whose launch at these M has only its fused decode + GEMV (path "fused"; the split
    count starts at 16, the default's for a 4096-wide row of 256-weight segments)."""
    if fused:
        return [{"path": "fused", "BLOCK_N": 32 if smoke else FUSED_BLOCK_N, "CHUNK": FUSED_CHUNK, "STAGE": FUSED_STAGE,
                 "SPLIT_K": 1 if smoke else 16, "num_warps": 1 if smoke else 4}]
    m_pow2 = 1 << (m - 1).bit_length()
    block_m = min(m_pow2, 4)
    # (GEMV_COLUMN_K = 32 suits the LUT formats too: one whole word of each one-bit plane)
    gemv = {"path": "gemv", "BLOCK_M": block_m, "BLOCK_N": gemv_block_n(block_m), "COLUMN_K": GEMV_COLUMN_K,
            "SPLIT_K": 2, "num_warps": 4}
    lookup = {"path": "lut", "BLOCK_M": min(m_pow2, LUT_MAX_M), "BLOCK_N": 32, "BLOCK_K": 128,
              "SPLIT_K": 8, "num_warps": 4, "num_stages": 2}
    gemm = {"path": "gemm", "BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64, "BLOCK_K": 64,
            "SPLIT_K": 4 if m <= 64 else 1, "num_warps": 4, "num_stages": 3}
    if smoke:
        gemv.update(BLOCK_N=16, SPLIT_K=1, COLUMN_K=32 if lut else 8, num_warps=1)
        lookup.update(BLOCK_N=16, SPLIT_K=1, BLOCK_K=64)
        gemm.update(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1)
    return (([gemv] if m <= GEMV_MAX_TUNED_M else []) + ([lookup] if lut and m <= LUT_MAX_M else []) + [gemm])


def space_for(m: int) -> dict:
    """SPACES without GEMM row tiles far taller than M (they only multiply padding), nor GEMM K
    splits above M=256, where the output tiles fill the GPU and a split's fp32 partials
    (splits x M x N) would cost more than it saves."""
    gemm = {**SPACES["gemm"], "BLOCK_M": tuple(b for b in SPACES["gemm"]["BLOCK_M"] if b <= max(16, 2 * m))}
    if m > 256:
        gemm["SPLIT_K"] = (1,)
    return {**SPACES, "gemm": gemm}


def descend(measure, start: dict, space: dict, rounds: int = 2, prepare=None) -> tuple[dict | None, float | None]:
    """Coordinate descent: change one parameter at a time to each of its values, keep the best,
    repeat up to `rounds` times or until nothing improves. measure(cfg) -> us or None (pruned).
    prepare(candidates), when given, gets each coordinate's candidates before any is measured
    (they differ from the best only in that coordinate, so a better value found among them
    leaves the others unchanged)."""
    best, best_us = start, measure(start)
    for _ in range(rounds):
        improved = False
        for key, values in space.items():
            candidates = [{**best, key: value} for value in values if value != best.get(key)]
            if prepare is not None:
                prepare(candidates)
            for candidate in candidates:
                us = measure(candidate)
                if us is not None and (best_us is None or us < best_us):
                    best, best_us, improved = candidate, us, True
        if not improved:
            break
    return (best, best_us) if best_us is not None else (None, None)


#: a path whose start point is this many times slower than the best config already found on an
#: earlier path is not descended. The second H100 run tuned ~45 s per int4 M=1 case (47-68
#: candidates), up to ~26 of them the tensor-core GEMM's descent, which the GEMV beats at M=1.
ABANDON_RATIO = 2.0


def search_paths(measure, starts: list, spaces: dict, rounds: int, prepare=None):
    """(best config, its us, paths abandoned): `descend` from each start point in turn (the
    launch's paths, GEMV first), skipping the descent of a path whose start measures more than
    ABANDON_RATIO times the best so far (or fails to measure)."""
    best, best_us, abandoned = None, None, []
    for start in starts:
        if best_us is not None:
            start_us = measure(start)
            if start_us is None or start_us > ABANDON_RATIO * best_us:
                abandoned.append(start["path"])
                continue
        cfg, us = descend(measure, start, spaces[start["path"]], rounds=rounds, prepare=prepare)
        if us is not None and (best_us is None or us < best_us):
            best, best_us = cfg, us
    return best, best_us, abandoned


_worker_args = None  # a Precompiler worker's copy of the tuner's arguments (make_case reads them)


def _start_worker(args: dict) -> None:
    global _worker_args
    _worker_args = argparse.Namespace(**args)


def _compile_candidate(case: tuple, cfg: dict | None) -> bool:
    """In a Precompiler worker: launch `case` (spec, N, K, M, device, dtype) once under `cfg`
    (None: the defaults); whether it launched."""
    import lowbit
    from lowbit.kernels import tuning

    spec, n, k, m, device, dtype = case
    try:
        _, x, _, _, _, packed = make_case(spec, n, k, m, _worker_args, torch.device(device), dtype)
        with tuning.force(cfg):
            lowbit.linear(x, packed, backend="triton")
        if device == "cuda":
            torch.cuda.synchronize()
        return True
    except Exception:  # the measuring process compiles (or prunes) it itself
        return False


class Precompiler:
    """Compiles candidates in `jobs` worker processes (spawned: a forked CUDA context is unusable)
    ahead of their measurement, leaving them in Triton's on-disk cache (see the module docstring).
    Counts what it compiled and what failed."""

    def __init__(self, jobs: int, args):
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker, initargs=(vars(args),))
        self.compiled = self.failed = 0

    def compile(self, case: tuple, configs: list) -> None:
        """Launch `case` under each config in the workers; returns once all have finished. If a
        worker process dies, the tuner goes on without workers (compiling as it measures)."""
        if self.pool is None:
            return
        try:
            for launched in self.pool.map(_compile_candidate, [case] * len(configs), configs):
                self.compiled += launched
                self.failed += not launched
        except BrokenProcessPool as exc:
            warnings.warn(f"tune.py: a compiling worker died ({exc}); going on without workers", stacklevel=2)
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def tune_case(spec: str, n: int, k: int, m: int, args, device, dtype, precompiler: Precompiler | None = None):
    """(config key, best entry or None, measurement record) for one case; (None, None, None)
    when the format's launch reads no config. precompiler: compiles each batch of candidates
    before they are measured."""
    import lowbit
    from lowbit.kernels import tuning

    started = time.monotonic()
    _, x, _, _, fmt, packed = make_case(spec, n, k, m, args, device, dtype)
    ref, _ = reference(fmt, packed, x)
    case = (spec, n, k, m, device.type, dtype)
    if precompiler is not None:
        precompiler.compile(case, [None])  # the defaults: the baseline below
    # smoke: one interpreted call per timing (it checks the machinery; CPU times are not the point)
    timing = {"cpu_runs": 1} if args.smoke else {}
    tuning._last_key.set(None)
    with tuning.force(None):  # the baseline is the launcher's defaults, not an earlier table's entry
        default_us = time_us(lambda: lowbit.linear(x, packed, backend="triton"), device, **timing).us
    key = tuning.last_key()
    if key is None:
        return None, None, None
    seen: dict[str, float | None] = {}
    errors: dict[str, float] = {}

    lut = key.startswith("lut")  # a LUT format: the lookup kernel is a candidate too
    fused = key.startswith("dfloat11")  # dfloat11's fused decode + GEMV: its own search space

    def pruned_unmeasured(cfg: dict) -> bool:
        # this many sums per thread spill registers; a fused config the launcher would not take
        return ((cfg["path"] == "gemv" and cfg["BLOCK_M"] * cfg["BLOCK_N"] > GEMV_MAX_ROWS_PER_THREAD)
                or (cfg["path"] == "fused" and not valid_fused_config(cfg)))

    def prepare(candidates: list) -> None:
        fresh = [c for c in candidates if json.dumps(c, sort_keys=True) not in seen and not pruned_unmeasured(c)]
        if fresh:
            precompiler.compile(case, fresh)

    def measure(cfg: dict) -> float | None:
        tag = json.dumps(cfg, sort_keys=True)
        if pruned_unmeasured(cfg):
            seen[tag] = None
        if tag not in seen:
            seen[tag] = None
            try:
                with tuning.force(cfg):
                    start = time.perf_counter()
                    err = relative_error(lowbit.linear(x, packed, backend="triton"), ref)
                    gate_us = (time.perf_counter() - start) * 1e6
                    if err <= REL_TOL[dtype]:
                        # smoke: the gate's own interpreted call is the timing (half the interpreter time)
                        seen[tag] = gate_us if args.smoke else time_us(
                            lambda: lowbit.linear(x, packed, backend="triton"), device, **timing).us
                        errors[tag] = err
            except Exception:  # a tile this variant cannot take (BLOCK_K vs group, resources): pruned
                pass
        return seen[tag]

    spaces = SMOKE_SPACES if args.smoke else space_for(m)
    starts = start_points(m, args.smoke, lut, fused)
    if precompiler is not None:
        prepare(starts)
    best, best_us, abandoned = search_paths(measure, starts, spaces, rounds=1 if args.smoke else 2,
                                            prepare=None if precompiler is None else prepare)
    kept = sum(v is not None for v in seen.values())
    entry = None if best is None else {**best, "us": best_us, "default_us": default_us,
                                       "max_rel_err": errors[json.dumps(best, sort_keys=True)]}
    return key, entry, {"key": key, "format": spec, "M": m, "N": n, "K": k, "default_us": default_us,
                        "best": entry, "candidates_kept": kept, "candidates_pruned": len(seen) - kept,
                        "paths_abandoned": abandoned, "seconds": round(time.monotonic() - started, 1)}


def quantizes_activations(spec: str, args) -> bool:
    """An integer format spec with act="int8" / "fp8": below W8A8_MIN_M it launches the
    weight-only variant, so tune.py measures it from W8A8_MIN_M up only."""
    name, options = parse_format_spec(spec, args)
    return name.startswith("int") and options.get("act") in ACT_KINDS


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from benchmarks.shapes import SMOKE_M_VALUES
    from lowbit.kernels.tuning import M_BUCKETS, TUNED_DIR, device_key

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and search spaces in the Triton interpreter")
    p.add_argument("--formats", nargs="+", default=None)
    p.add_argument("--sets", nargs="+", default=["llama3-8b"])
    p.add_argument("--m", nargs="+", type=int, default=None,
                   help=f"batch rows; default: {' '.join(map(str, M_BUCKETS))} (GPU), "
                        f"{' '.join(map(str, SMOKE_M_VALUES))} (--smoke)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no case after this many seconds")
    p.add_argument("--out", type=Path, default=None, help="default: lowbit/kernels/tuned/<gpu>.json (merged)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes compiling candidates ahead of their measurement (0: none); "
                        "default: up to 8 on a GPU, 0 under --smoke (the interpreter compiles nothing)")
    args = p.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device, dtype, cases, m_values = torch.device("cpu"), torch.float32, shapes(["smoke"]), args.m or SMOKE_M_VALUES
        formats = args.formats or ["int4"]
    else:
        if not torch.cuda.is_available():
            print("tuning measures a GPU: no CUDA device here (use --smoke on CPU)", file=sys.stderr)
            return 2
        device, dtype, cases, m_values = torch.device("cuda"), torch.bfloat16, shapes(args.sets), args.m or M_BUCKETS
        formats = args.formats or DEFAULT_FORMATS
    out = args.out or TUNED_DIR / f"{device_key(device)}.json"
    table = json.loads(out.read_text()) if out.is_file() else {}
    configs, measured = table.get("configs", {}), table.get("measured", [])
    # M=1 first: the targets are at M=1, and a budget cut should cost the large-M cases
    jobs = [(f, s, n, k, m) for m in sorted(m_values) for f in formats for (s, n, k) in cases
            if m >= W8A8_MIN_M or not quantizes_activations(f, args)]
    workers = args.jobs if args.jobs is not None else 0 if args.smoke else min(8, (os.cpu_count() or 2) - 1)
    precompiler = Precompiler(workers, args) if workers > 0 else None
    started, skipped = time.monotonic(), 0
    for spec, shape, n, k, m in tqdm(jobs, desc="tune", unit="case"):
        if time.monotonic() - started > args.budget_s:
            skipped += 1
            continue
        key, best, record = tune_case(spec, n, k, m, args, device, dtype, precompiler)
        if key is None:
            continue
        measured = [r for r in measured if r["key"] != key] + [{**record, "shape": shape}]
        if best is not None and best["us"] < best["default_us"]:
            configs[key] = {**best, "format": spec, "shape": shape}
        else:  # the defaults are as fast: no entry (drops a stale one)
            configs.pop(key, None)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"env": env_info(device), "configs": configs, "measured": measured}, indent=1,
                                  sort_keys=True))
    if precompiler is not None:
        precompiler.close()
        print(f"{workers} workers compiled {precompiler.compiled} candidates ahead of their measurement"
              f" ({precompiler.failed} failed to launch there)")
    gains = [c["default_us"] / c["us"] for c in configs.values()]
    print(f"wrote {len(configs)} tuned configs to {out}"
          + (f"; tuned/default speedup median {sorted(gains)[len(gains) // 2]:.2f}x" if gains else "")
          + (f"; {skipped} cases skipped (over --budget-s {args.budget_s:g})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
