#!/usr/bin/env python3
"""Kernel microbenchmark: lowbit.linear per format vs bf16 F.linear, same process.

  python benchmarks/bench_gemm.py                       # GPU: every format, llama3-8b, all M
  python benchmarks/bench_gemm.py --formats int4 int8 fp8 fp8:act=fp8 fp8:block=128,act=fp8 \
      --sets llama3-8b llama3-70b --m 1 16
  TRITON_INTERPRET=1 python benchmarks/bench_gemm.py --smoke   # CPU, tiny shapes (CI)

A format spec is NAME[:OPTION=VALUE,...] (options as the format's quantize() takes them; for
int formats --group-size / --symmetric are the defaults). int formats also take permuted=true
(benchmarks only): the layer of an activation-ordered checkpoint (GPTQ desc_act), its columns in a
random order that x is gathered by before the kernel. Each row is gated on correctness first
(max relative error vs the torch reference of the path the kernel takes, in fp32), then timed
as GPU time (benchmarks/timing.py: CUDA graph replays with the L2 zeroed before every call, so
neither host launch overhead nor L2-resident weights count; median and 20/80% quantiles), next
to bf16 F.linear (timed once per shape and M) and, on a GPU, the same format in torchao /
gemlite / the dfloat11 package when importable (benchmarks/competitors.py; the fastest is the
row's "competitor"), all timed alike. A call that cannot be captured in a graph is timed eagerly
(the row's "timing" says which). On a GPU each row also has eager_us / bf16_eager_us: do_bench's
eager time, host overhead included.
Output in --out-dir: <device>-<date>.json (`{"env", "results", "targets"}`), a markdown table
with the issue-8 target check on top (benchmarks/targets.py) and a PNG plot. Both are rewritten
after every case and merged with an earlier run of the same device and day, so a long run can
be split over several commands (e.g. --formats halves) and a run cut short keeps its rows.
Numbers from --smoke are interpreter timings, meaningless as speed: only GPU runs are
committed to results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.timing import Timing, eager_time_us, time_us  # noqa: E402

# Peak HBM bandwidth (GB/s) by device-name substring, for the % of memory bandwidth column.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "RTX 4090": 1008.0}
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}
DEFAULT_FORMATS = ([f"int{b}" for b in range(2, 9)] + ["int8:act=int8,symmetric=true,group_size=-1", "int4:act=int8",
                                                        "int4:act=fp8,symmetric=true"]
                   + ["fp8", "fp8_e5m2", "fp8:act=fp8", "fp8:block=128,act=fp8"]
                   + ["mxint8", "mxfp8", "mxfp6", "mxfp4", "nvfp4"] + [f"lut{b}" for b in range(1, 5)] + ["nf4", "bnb_fp4", "dfloat11"])


def parse_format_spec(spec: str, args) -> tuple[str, dict]:
    """"fp8:block=128,act=fp8" -> ("fp8", {"block": 128, "act": "fp8"}); int formats get
    --group-size / --symmetric, lut formats --group-size, dfloat11 cast=True (lossless on the
    bf16 GPU weights; rounds the fp32 smoke weights), unless the spec sets them."""
    name, _, rest = spec.partition(":")
    options: dict = ({"group_size": args.group_size, "symmetric": args.symmetric} if name.startswith("int")
                     else {"group_size": args.group_size} if name.startswith("lut")
                     else {"cast": True} if name == "dfloat11" else {})  # smoke weights are fp32
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        lowered = value.lower()
        options[key] = (int(value) if value.lstrip("-").isdigit() else
                        {"true": True, "false": False, "none": None}.get(lowered, value))
    return name, options


def check_format_specs(specs: list[str], args, calibrated: bool = False, permuted: bool = False) -> list[str]:
    """One line per spec whose format or options lowbit refuses (empty when all are valid).
    method=gptq needs calibration batches, which only a benchmark with a model has (calibrated);
    permuted=true only a kernel benchmark (`permuted`) builds."""
    from lowbit.errors import LowbitError
    from lowbit.formats import get_format

    problems = []
    for spec in specs:
        name, options = parse_format_spec(spec, args)
        if permuted and options.pop("permuted", False) is not False and not name.startswith("int"):
            problems.append(f"--formats {spec}: permuted=true is an int format's layout")
            continue
        try:
            get_format(name).check_options(options)
        except LowbitError as exc:
            problems.append(f"--formats {spec}: {exc}")
            continue
        if options.get("method") == "gptq" and not calibrated:
            problems.append(f"--formats {spec}: method=gptq needs calibration data, which this benchmark has not "
                            "(its codes run through the same kernels as rtn's: time the spec without it)")
    return problems


def reference(fmt, packed, x):
    """fp32 reference of the path lowbit.linear takes for this M: the quantized-activation
    emulation where the fp8 act="fp8" kernel uses FP8 tensor cores or an integer format's
    act="int8" / "fp8" kernel int8 / FP8 ones, else F.linear(x, dequantize(W))."""
    import lowbit
    from lowbit.kernels.fp8_w8a8 import takes_w8a8_path
    from lowbit.kernels.quantized_act import ACT_KINDS, takes_quantized_act_path

    act = packed.attrs.get("act")
    if act == "fp8" and packed.format.startswith("fp8") and takes_w8a8_path(
            x.shape[0], packed.shape[0], x.device, packed.qweight.dtype, packed.attrs["block"]):
        return lowbit.linear(x.float(), packed, backend="torch"), "w8a8"
    if act in ACT_KINDS and packed.format.startswith("int") and takes_quantized_act_path(
            act, fmt.bits, x.shape[0], x.device):
        return lowbit.linear(x.float(), packed, backend="torch"), {"int8": "w8a8-int8", "fp8": "fp8-act"}[act]
    return F.linear(x.float(), fmt.dequantize(packed).float()), "weight-only"


def parse_args(argv=None):
    from benchmarks.shapes import M_VALUES, SMOKE_M_VALUES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--formats", nargs="+", default=None,
                   help="format specs NAME[:OPTION=VALUE,...]; default: " + " ".join(DEFAULT_FORMATS))
    p.add_argument("--sets", nargs="+", default=["llama3-8b"])
    p.add_argument("--m", nargs="+", type=int, default=None,
                   help=f"batch rows; default: {' '.join(map(str, M_VALUES))} (GPU), "
                        f"{' '.join(map(str, SMOKE_M_VALUES))} (--smoke)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results (GPU), a temp dir (smoke)")
    return p.parse_args(argv)


def env_info(device: torch.device) -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-triton-interpreter"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def peak_gbps(device_name: str) -> float | None:
    for key, value in PEAK_GBPS.items():
        if key in device_name:
            return value
    return None


_last_case: dict = {}  # the weight and its packing of the last (spec, shape): reused over the M values


def make_case(spec: str, n: int, k: int, m: int, args, device, dtype):
    """Seeded weight [N, K] and activations [M, K], and the weight packed per `spec`:
    (w, x, format name, options, Format, PackedWeight). The weight and packing of the previous
    call are reused when only M changed (benchmarks loop over M innermost)."""
    import lowbit

    fmt_name, options = parse_format_spec(spec, args)
    permuted = options.pop("permuted", False)  # a layout, not a quantizer option
    key = (spec, n, k, str(device), dtype, tuple(sorted(options.items())))
    if _last_case.get("key") != key:
        _last_case.clear()
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) * 0.02
        fmt = lowbit.get_format(fmt_name)
        _last_case.update(key=key, w=w, fmt=fmt, packed=packed_weight(fmt, w, options, permuted),
                          competitors={})
    gen = torch.Generator(device=device).manual_seed(m)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    return _last_case["w"], x, fmt_name, options, _last_case["fmt"], _last_case["packed"]


def packed_weight(fmt, w, options: dict, permuted: bool = False):
    """fmt.quantize(w, **options); permuted: the layer an activation-ordered import gives, its
    columns stored in a seeded random order that x is gathered by before the kernel."""
    from lowbit.formats.integer import in_input_order

    if not permuted:
        return fmt.quantize(w, **options)
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(1)).to(w.device, torch.int32)
    return in_input_order(fmt.quantize(w[:, perm.long()], **options), perm)


def bench_one(spec: str, shape: str, n: int, k: int, m: int, args, device, dtype, peak,
              bf16_cache: dict | None = None) -> dict:
    """One row: the correctness gate, then lowbit's time, bf16's (measured once per shape and M
    when `bf16_cache` is given) and, on a GPU, each competitor's."""
    import lowbit

    w, x, fmt_name, options, fmt, packed = make_case(spec, n, k, m, args, device, dtype)
    backend = "triton"
    ref, path = reference(fmt, packed, x)
    exact = F.linear(x.float(), w.float())
    start = time.perf_counter()
    y = lowbit.linear(x, packed, backend=backend)
    gate_us = (time.perf_counter() - start) * 1e6
    max_rel_err = relative_error(y, ref)
    row = {"format": spec, "shape": shape, "M": m, "N": n, "K": k, "path": path, "max_rel_err": max_rel_err,
           "max_rel_err_vs_exact": relative_error(y, exact)}
    if not max_rel_err <= REL_TOL[dtype]:
        row["error"] = f"correctness gate failed: max_rel_err {max_rel_err:.3g} > {REL_TOL[dtype]}"
        return row
    # smoke: interpreted calls check the machinery, their times mean nothing: the gate's call is the timing
    runs = 1 if args.smoke else 3
    call = lambda: lowbit.linear(x, packed, backend=backend)  # noqa: E731
    us, us_p20, us_p80, method = Timing(gate_us, gate_us, gate_us, "cpu") if args.smoke else time_us(call, device)
    bf16_cache = {} if bf16_cache is None else bf16_cache
    if (shape, m) not in bf16_cache:  # (time_us, and on a GPU the eager time, host overhead included)
        bf16_cache[(shape, m)] = (time_us(lambda: F.linear(x, w), device, cpu_runs=runs),
                                  eager_time_us(lambda: F.linear(x, w), rep_ms=25) if device.type == "cuda" else None)
    bf16, bf16_eager = bf16_cache[(shape, m)]
    row.update({"timing": method, "bf16_timing": bf16.method})
    if device.type == "cuda":
        # what an eager caller waits, host overhead included (us is the GPU time alone)
        row.update({"eager_us": eager_time_us(call, rep_ms=25).us, "bf16_eager_us": bf16_eager.us})
        entries = time_competitors(fmt_name, options, w, x, packed, exact, device, us, row["max_rel_err_vs_exact"])
        timed = [e for e in entries if "us" in e]
        row["competitors"] = entries
        row["competitor"] = min(timed, key=lambda e: e["us"]) if timed else None
    moved = packed.nbytes + x.numel() * x.element_size() + m * n * x.element_size()
    row.update({"us": us, "us_p20": us_p20, "us_p80": us_p80, "bf16_us": bf16.us, "speedup": bf16.us / us,
                **bandwidth(moved, us, peak)})
    return row


def bandwidth(moved: int, us: float, peak: float | None) -> dict:
    """{"gbps", "bw_pct"} of `moved` bytes in `us` microseconds (bw_pct None without a known peak)."""
    gbps = moved / (us * 1e-6) / 1e9
    return {"gbps": gbps, "bw_pct": None if peak is None else 100 * gbps / peak}


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


def time_competitors(fmt_name: str, options: dict, w, x, packed, exact, device, lowbit_us: float,
                     lowbit_err: float) -> list[dict]:
    """The same format in other libraries (benchmarks/competitors.py): one entry per library,
    {"name", "us", "max_rel_err_vs_exact", "lowbit_speedup"} or {"name", "error"}. Their
    quantizers differ from lowbit's, so their error is taken against the unquantized product
    (as lowbit's max_rel_err_vs_exact is), and an entry whose error is far above lowbit's
    (> 4x + 1e-3) is recorded as an error instead of a time. Each library's layer is built once
    per weight (make_case's cache) and reused over the M values."""
    from benchmarks.competitors import competitors

    built = _last_case.setdefault("competitors", {}) if _last_case.get("w") is w else {}
    entries = []
    for name, build in competitors(fmt_name):
        try:
            if name not in built:
                try:
                    built[name] = build(options, w, packed)
                except Exception as exc:  # remembered: a library that cannot build this weight fails once
                    built[name] = exc
            if isinstance(built[name], Exception):
                raise built[name]
            run = built[name]
            if run is None:
                continue
            err = relative_error(run(x), exact)
            if not err <= 4 * lowbit_err + 1e-3:
                entries.append({"name": name, "error": f"wrong result: max_rel_err_vs_exact {err:.3g} "
                                                       f"(lowbit: {lowbit_err:.3g})"})
                continue
            timing = time_us(lambda: run(x), device)
        except Exception as exc:  # not installed, or that library cannot run this case
            entries.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        entries.append({"name": name, "us": timing.us, "timing": timing.method, "max_rel_err_vs_exact": err,
                        "lowbit_speedup": timing.us / lowbit_us})
    return entries


def write_markdown(path: Path, env: dict, rows: list[dict], summary: list[dict], other: list[dict]) -> None:
    from benchmarks.targets import gemm_markdown

    lines = [f"# bench_gemm on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}", "",
             *gemm_markdown(summary, other), "", "## All rows", "",
             "| format | shape | M | N | K | path | us | bf16 us | speedup | GB/s | % BW | max rel err | competitor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['format']} | {r['shape']} | {r['M']} | {r['N']} | {r['K']} | {r['path']} | "
                         f"{r['error']} ||||||| ")
            continue
        bw = "-" if r["bw_pct"] is None else f"{r['bw_pct']:.0f}"
        comp = r.get("competitor")
        comp_text = "-" if not comp else f"{comp['name']} {comp['us']:.1f} us (lowbit {comp['lowbit_speedup']:.2f}x)"
        lines.append(f"| {r['format']} | {r['shape']} | {r['M']} | {r['N']} | {r['K']} | {r['path']} | {r['us']:.1f} | "
                     f"{r['bf16_us']:.1f} | {r['speedup']:.2f}x | {r['gbps']:.0f} | {bw} | {r['max_rel_err']:.1e} | "
                     f"{comp_text} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, env: dict, rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if "error" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for fmt in sorted({r["format"] for r in ok}):
        by_m: dict[int, list[float]] = {}
        for r in ok:
            if r["format"] == fmt:
                by_m.setdefault(r["M"], []).append(r["speedup"])
        ms = sorted(by_m)
        ax1.plot(ms, [sorted(by_m[m])[len(by_m[m]) // 2] for m in ms], marker="o", label=fmt)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set(xscale="log", xlabel="M (tokens)", ylabel="speedup vs bf16 F.linear (median over shapes)",
            title="speedup vs M")
    ax1.legend()
    m1 = [r for r in ok if r["M"] == min(r2["M"] for r2 in ok)]
    labels = [f"{r['format']}\n{r['shape'].split('/')[-1]}" for r in m1]
    values = [r["bw_pct"] if r["bw_pct"] is not None else r["gbps"] for r in m1]
    ax2.bar(range(len(m1)), values)
    ax2.set_xticks(range(len(m1)), labels, rotation=90, fontsize=7)
    ax2.set(ylabel="% of peak memory bandwidth" if m1 and m1[0]["bw_pct"] is not None else "GB/s",
            title=f"memory bandwidth at M={m1[0]['M'] if m1 else '-'}")
    fig.suptitle(f"lowbit bench_gemm — {env['device']} — {env['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def row_key(row: dict) -> tuple:
    return row["format"], row["shape"], row["M"]


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of an earlier run into the same file (same device and day: a long benchmark
    split over several commands), with this run's rows replacing those of the same format,
    shape and M."""
    if not path.is_file():
        return rows
    mine = {row_key(r) for r in rows}
    return [r for r in json.loads(path.read_text())["results"] if row_key(r) not in mine] + rows


def write_outputs(out_dir: Path, stem: str, env: dict, rows: list[dict], on_gpu: bool) -> dict:
    """JSON, markdown and plot of `rows` merged into out_dir/stem.*; returns the JSON document.
    Called after every case, so a run cut short keeps what it measured."""
    from benchmarks.targets import gemm_summary, other_summary

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    merged = merge_rows(json_path, rows)
    summary, other = gemm_summary(merged, on_gpu), other_summary(merged, on_gpu)
    doc = {"env": env, "results": merged, "targets": summary, "other_targets": other}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(json_path)
    write_markdown(out_dir / f"{stem}.md", env, merged, summary, other)
    return doc


def main(argv=None) -> int:
    from benchmarks.shapes import M_VALUES, SMOKE_M_VALUES, shapes

    args = parse_args(argv)
    formats = args.formats or DEFAULT_FORMATS
    problems = check_format_specs(formats, args, permuted=True)
    problems += [f"--m {m}: not a positive number of rows" for m in args.m or () if m < 1]
    for problem in problems:
        print(f"bench_gemm: {problem}", file=sys.stderr)
    if problems:
        return 2  # before any case runs: a typo must not cost GPU time case by case
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device, dtype = torch.device("cpu"), torch.float32
        shape_list, m_values = shapes(["smoke"]), args.m or SMOKE_M_VALUES
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="lowbit-bench-smoke-"))
    else:
        if not torch.cuda.is_available():
            print("GPU numbers are only taken on a GPU: no CUDA device here (use --smoke on CPU)", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        shape_list, m_values = shapes(args.sets), args.m or M_VALUES
        out_dir = args.out_dir or REPO / "benchmarks" / "results"
    env = env_info(device)
    peak = peak_gbps(env["device"])
    stem = ("smoke-" if args.smoke else "") + f"{env['device'].replace(' ', '_')}-{env['date'][:10]}"
    rows, bf16_cache = [], {}
    from tqdm.auto import tqdm

    jobs = [(f, s, n, k, m) for f in formats for (s, n, k) in shape_list for m in m_values]
    for fmt, shape, n, k, m in tqdm(jobs, desc="bench_gemm", unit="case"):
        try:
            rows.append(bench_one(fmt, shape, n, k, m, args, device, dtype, peak, bf16_cache))
        except Exception as exc:  # one broken case must not lose the rest of a GPU run
            rows.append({"format": fmt, "shape": shape, "M": m, "N": n, "K": k, "path": "-",
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
        doc = write_outputs(out_dir, stem, env, rows, device.type == "cuda")
    plotted = write_plot(out_dir / f"{stem}.png", env, doc["results"])
    print((out_dir / f"{stem}.md").read_text())
    print(f"wrote {out_dir / stem}.json, .md{', .png' if plotted else ''}")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"FAILED {r['format']} {r['shape']} M={r['M']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
