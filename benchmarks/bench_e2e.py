#!/usr/bin/env python3
"""End-to-end benchmark: a Llama-architecture model at real width, bf16 vs each lowbit format.

  python benchmarks/bench_e2e.py                      # GPU: the whole Llama-3-8B (32 layers), batch 1 and 16
  python benchmarks/bench_e2e.py --formats int4 fp8 dfloat11 --layers 8 --batch 1 --new 128
  python benchmarks/bench_e2e.py --formats int4 --compile   # decode step compiled (inductor), then graphed
  python benchmarks/bench_e2e.py --formats int8:act=int8,symmetric=true,group_size=-1 --batch 16   # W8A8 prefill
  python benchmarks/bench_e2e.py --width mixtral-8x7b --layers 4 --no-graphs   # MoE (quantized experts)
  python benchmarks/bench_e2e.py --smoke [--width qwen3-30b-a3b]   # tiny model on CPU (torch backend), CI

The model is built in the process with random weights (seeded; created on the GPU, nothing
fetched) at the width of --width (llama3-8b: hidden 4096, MLP 14336, 32 heads, 8 KV heads,
vocab 128256) with --layers decoder layers; every Linear but lm_head is quantized (with fewer
layers the bf16 lm_head is a larger share of the bytes, so the speedup bound drops). For each
batch size it times a prefill over --prompt tokens and --new greedy decode steps with a static
KV cache (median of --repeats); on a GPU one decode step is captured as a CUDA graph and
replayed (--no-graphs: eager), so decode tokens/s measure the kernels, not Python. Uncompiled,
transformers runs each norm, rotary embedding and residual add as several small kernels, the same
for bf16 and every format, which caps the speedup a faster GEMM can show; --compile compiles the
decode step first (bf16 too), fusing them as a serving stack would. The MoE widths
(Mixtral-8x7B, Qwen3-30B-A3B: every expert weight quantized, lowbit/experts.py) cannot be
captured once quantized (the expert loop reads the routing on the host), so compare them with
--no-graphs; the issue-8 target is checked on the Llama width only. Rows hold
tokens/s, the speedup over bf16 in the same run, the decode mode, peak GPU memory, the weight
bytes a decode step reads (every parameter and buffer but the embedding table; none for the MoE
widths, whose steps read only the routed experts) over the step's time as TB/s and % of the GPU's
peak bandwidth (a lower bound on what the step moves: the KV cache and activations are left
out), and the cosine of the last logits to bf16's (a sanity check, not an accuracy claim). dfloat11 runs with
per-block decompression enabled. Output: JSON {"env", "results", "targets"} + markdown (with
the issue-8 target check) in --out-dir (default benchmarks/results). --smoke numbers are CPU
reference timings, not speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.bench_gemm import check_format_specs, env_info, parse_format_spec, peak_gbps  # noqa: E402
from benchmarks.targets import e2e_summary  # noqa: E402

#: width name -> (transformers architecture, config fields); the smoke widths are the tests' stand-ins
WIDTHS = {
    "llama3-8b": ("Llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256)),
    "mixtral-8x7b": ("Mixtral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                     num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                                     num_experts_per_tok=2)),
    "qwen3-30b-a3b": ("Qwen3Moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                       num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                       vocab_size=151936, num_experts=128, num_experts_per_tok=8)),
    "smoke": ("Llama", dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=256)),
    "smoke-moe": ("Mixtral", dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=256, num_local_experts=4,
                                  num_experts_per_tok=2)),
    # wide enough for the launchers' GPU paths (GEMV, split-K): the CUDA-graph replay test's model
    "smoke-wide": ("Llama", dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                                 num_key_value_heads=2, vocab_size=1024)),
}
DEFAULT_FORMATS = ["int4", "int8", "fp8", "nvfp4", "mxfp4", "lut2", "dfloat11"]


def build_model(width: str, layers: int, device: torch.device, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    arch, fields = WIDTHS[width]
    config = getattr(transformers, f"{arch}Config")(num_hidden_layers=layers, max_position_embeddings=8192,
                                                     tie_word_embeddings=False, **fields)
    with torch.device(device):  # created in bf16 on the device (no fp32 copy of 8B weights)
        model = getattr(transformers, f"{arch}ForCausalLM")._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(fn, warmups: int = 3):
    """fn's kernels as a CUDA graph (after `warmups` eager calls on a side stream, which also
    allocate what fn allocates lazily); replay() re-runs them with no Python or launch cost."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def run_one(model, batch: int, prompt: int, new: int, repeats: int, device: torch.device, graphs: bool,
            compile_backend: str | None = None) -> dict:
    """Prefill + greedy decode with a static KV cache; medians of `repeats` runs. With `graphs`
    (CUDA), one decode step is captured as a CUDA graph and replayed, so decode tokens/s measure
    the GPU rather than Python and launch overhead (what a serving stack does); if capture fails
    the eager time is reported with the reason. compile_backend ("inductor"; the tests' cheap
    "eager"): the decode step runs `torch.compile(model.forward, fullgraph=True)` (transformers'
    fast-decode recipe: the norms, rotary embedding and residual adds fused into a few kernels;
    lowbit's layers stay one custom op each), captured as the graph; if it fails to compile, the
    uncompiled step is timed and the reason reported. The prefill runs uncompiled."""
    from transformers import StaticCache

    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device, generator=gen)
    cache = StaticCache(config=model.config, max_cache_len=prompt + new + 8)  # + the capture warm-ups
    prefill_pos = torch.arange(prompt, device=device)
    step_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    step_pos = torch.zeros(1, dtype=torch.long, device=device)

    def prefill() -> torch.Tensor:
        cache.reset()
        logits = model(input_ids=ids, past_key_values=cache, cache_position=prefill_pos, use_cache=True).logits
        step_ids.copy_(logits[:, -1:].argmax(-1))
        step_pos.fill_(prompt)
        return logits[:, -1].float()

    forward = model.forward

    def step() -> None:
        """One greedy step on static buffers: the next token and position are written in place."""
        logits = forward(input_ids=step_ids, past_key_values=cache, cache_position=step_pos, use_cache=True).logits
        step_ids.copy_(logits[:, -1:].argmax(-1))
        step_pos.add_(1)

    mode, errors, run_step = "eager", {}, step
    if compile_backend:
        # dynamic=False: each batch size gets kernels for its own static shapes, as a serving stack's would
        forward = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=compile_backend)
        prefill()  # the cache is initialized before tracing (else a second compile once it is)
        try:
            step()  # compiles
            mode = "compiled"
        except Exception as exc:  # e.g. a graph break: time the uncompiled step, say why
            forward, errors["compile_error"] = model.forward, f"{type(exc).__name__}: {exc}"[:300]
    if graphs:
        prefill()
        try:
            run_step, mode = capture_graph(step).replay, ("compiled " if mode == "compiled" else "") + "cuda-graph"
        except Exception as exc:  # e.g. a host sync inside the model: fall back to eager, say why
            errors["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    prefill_s, decode_s, tokens = [], [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        last_logits = prefill()
        _sync(device)
        prefill_s.append(time.perf_counter() - start)
        generated = [step_ids.clone()]
        start = time.perf_counter()
        for _ in range(new):
            run_step()
            generated.append(step_ids.clone())
        _sync(device)
        decode_s.append(time.perf_counter() - start)
        tokens = torch.cat(generated, dim=1)
    return {"prefill_tok_s": batch * prompt / statistics.median(prefill_s),
            "decode_tok_s": batch * new / statistics.median(decode_s), "decode_mode": mode, **errors,
            "last_logits": last_logits, "tokens": tokens}


def prepare_model(spec: str, args, device: torch.device):
    """build_model(args.width, args.layers) with every Linear but lm_head quantized to `spec` (a
    format spec as bench_gemm takes it, "fp8:act=fp8"; "bf16": left as built); dfloat11 with
    block decompression, as it is meant to run."""
    import lowbit

    model = build_model(args.width, args.layers, device)
    if spec != "bf16":
        name, options = parse_format_spec(spec, args)
        lowbit.quantize(model, name, skip=["lm_head"], progress=False, **options)
        if name == "dfloat11":
            lowbit.enable_block_decompression(model)
    return model


def decode_weight_bytes(model, model_bytes: int) -> int | None:
    """Bytes of the weights one decode step reads once each: the model's `model_bytes` less its
    embedding tables (a step reads only its tokens' rows); None for an MoE model, whose step
    reads only the experts its tokens are routed to."""
    if getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None):
        return None
    embeddings = {id(p): p for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return model_bytes - sum(p.numel() * p.element_size() for p in embeddings.values())


def bench(args, device: torch.device, peak: float | None) -> list[dict]:
    """The rows of every format (bf16 first) at every batch size; peak: the GPU's memory
    bandwidth in GB/s (None: unknown, or not a GPU)."""
    import lowbit

    rows, baseline = [], {}
    for fmt in ["bf16"] + args.formats:
        model = prepare_model(fmt, args, device)
        model_bytes = lowbit.api.summarize(model).total_bytes
        weight_bytes = decode_weight_bytes(model, model_bytes)
        with torch.no_grad():
            for batch in args.batch:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                result = run_one(model, batch, args.prompt, args.new, args.repeats, device, args.graphs,
                                 "inductor" if args.compile else None)
                logits = result.pop("last_logits")
                result.pop("tokens")
                if fmt == "bf16":
                    baseline[batch] = (result, logits)
                base, base_logits = baseline[batch]
                # weight bytes per step over the step's time (a step makes `batch` tokens)
                tb_s = None if weight_bytes is None else weight_bytes * result["decode_tok_s"] / batch / 1e12
                rows.append({
                    "format": fmt, "shape": f"{args.width}/{args.layers}-layers", "batch": batch,
                    "prompt": args.prompt, "new_tokens": args.new, **result,
                    "decode_speedup": result["decode_tok_s"] / base["decode_tok_s"],
                    "prefill_speedup": result["prefill_tok_s"] / base["prefill_tok_s"],
                    "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                    "model_gb": model_bytes / 1e9,
                    "decode_weight_gb": None if weight_bytes is None else weight_bytes / 1e9,
                    "decode_weight_tb_s": tb_s,
                    "decode_weight_bw_pct": None if tb_s is None or peak is None else 100 * tb_s * 1e3 / peak,
                    "logits_cos_vs_bf16": float(torch.nn.functional.cosine_similarity(logits, base_logits, dim=-1).min()),
                })
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_markdown(path: Path, env: dict, rows: list[dict], summary: list[dict]) -> None:
    lines = [f"# bench_e2e — {env['device']} ({env['date']}, commit {env['commit']})", "", "## Target", ""]
    if summary:
        lines += ["| format | batch | decode vs bf16 | target | verdict |", "|---|---|---|---|---|"]
    else:
        lines.append("None here: the issue-8 end-to-end target is for the Llama width.")
    for t in summary:
        value = "-" if t["decode_speedup"] is None else f"{t['decode_speedup']:.2f}x"
        lines.append(f"| {t['format']} | {t['batch']} | {value} | >= {t['target']}x | {t['verdict']} |")
    lines += ["", "## All rows", "",
              "| format | model | batch | prefill tok/s | decode tok/s | decode vs bf16 | decode mode | peak GB | model GB "
              "| weights TB/s (% peak) | logits cos |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        mode = r["decode_mode"] + "".join(f" ({r[key]})" for key in ("compile_error", "graph_error") if r.get(key))
        streamed = "-" if r["decode_weight_tb_s"] is None else f"{r['decode_weight_tb_s']:.3f}" + (
            "" if r["decode_weight_bw_pct"] is None else f" ({r['decode_weight_bw_pct']:.0f}%)")
        lines.append(f"| {r['format']} | {r['shape']} | {r['batch']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_speedup']:.2f}x | {mode} | {peak} | {r['model_gb']:.3f} | {streamed} | "
                     f"{r['logits_cos_vs_bf16']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (torch reference backend)")
    p.add_argument("--formats", nargs="+", default=None, help="format specs as bench_gemm takes them "
                   "(int8:act=int8,symmetric=true); default: " + " ".join(DEFAULT_FORMATS))
    p.add_argument("--group-size", type=int, default=128, help="int / lut formats, unless a spec sets it")
    p.add_argument("--symmetric", action="store_true", help="int formats, unless a spec sets it")
    p.add_argument("--width", default="llama3-8b", choices=[w for w in WIDTHS if not w.startswith("smoke")])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32: the whole Llama-3-8B)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="time decode eagerly (default on a GPU: one decode step replayed as a CUDA graph)")
    p.add_argument("--compile", action="store_true",
                   help="decode with torch.compile(model.forward, fullgraph=True) (inductor), bf16 and every format")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    args.formats = args.formats or DEFAULT_FORMATS
    problems = check_format_specs(args.formats, args)
    if problems:  # before the bf16 baseline is built and timed
        print("bench_e2e: " + "\n".join(problems), file=sys.stderr)
        return 2
    if args.smoke:
        device = torch.device("cpu")
        moe = WIDTHS[args.width][0] != "Llama"
        args.width, args.layers, args.prompt, args.new, args.repeats = "smoke-moe" if moe else "smoke", 2, 8, 4, 1
        args.batch, args.graphs = [1, 2], False
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="lowbit-e2e-smoke-"))
    else:
        if not torch.cuda.is_available():
            print("GPU numbers are only taken on a GPU: no CUDA device here (use --smoke on CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        out_dir = args.out_dir or REPO / "benchmarks" / "results"
    env = env_info(device)
    if args.smoke:
        env["device"] = "cpu-torch-reference"
    rows = bench(args, device, peak_gbps(env["device"]) if device.type == "cuda" else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = "" if WIDTHS[args.width][0] == "Llama" else f"{args.width}-"
    stem = (("smoke-" if args.smoke else "") + "e2e-" + ("compiled-" if args.compile else "") + width
            + f"{env['device'].replace(' ', '_')}-{env['date'][:10]}")
    # the target is the Llama model's
    summary = e2e_summary(rows, on_gpu=device.type == "cuda") if WIDTHS[args.width][0] == "Llama" else []
    (out_dir / f"{stem}.json").write_text(json.dumps({"env": env, "results": rows, "targets": summary}, indent=1))
    write_markdown(out_dir / f"{stem}.md", env, rows, summary)
    print((out_dir / f"{stem}.md").read_text())
    print(f"wrote {out_dir / stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
