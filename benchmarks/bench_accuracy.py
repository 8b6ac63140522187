#!/usr/bin/env python3
"""Accuracy of every format on the embedded MiniLM (CPU; each format's torch reference).

  python benchmarks/bench_accuracy.py                              # every format + option variants
  python benchmarks/bench_accuracy.py --formats int4 int4:method=mse nf4
  python benchmarks/bench_accuracy.py --smoke                      # two formats (CI)

Per format spec (bench_gemm's syntax, "name:option=value,..."), on all-MiniLM-L6-v2 with its
Linear layers quantized:
- bits per weight of the quantized Linears, scales included;
- mean relative Frobenius error of the Linear weights, ||W_hat - W|| / ||W||;
- sentence-embedding agreement with the fp32 model over EVAL_SENTENCES: cosine per sentence
  (min / mean), and the change of the pairwise sentence similarities (what a retrieval ranks
  by; mean and largest over all pairs).
The numbers come from the torch reference of each format (the spec; the Triton kernels are tested
against it), so they hold on any device. Formats with `act=...` include their activation
quantization; method=gptq calibrates on lowbit's built-in sentences (lowbit/data, none of them
evaluated here). Output: JSON {"env", "results"} + markdown in --out-dir (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.bench_gemm import check_format_specs, env_info, parse_format_spec  # noqa: E402

#: option variants measured beside every registered format at its defaults
VARIANTS = ["int2:method=mse", "int3:method=mse", "int4:method=mse", "int5:method=mse", "int2:method=gptq",
            "int3:method=gptq", "int4:method=gptq", "int4:symmetric=true", "int4:symmetric=true,method=mse",
            "int4:symmetric=true,method=gptq", "int4:group_size=32", "lut2:method=mse", "lut2:method=gptq",
            "int8:act=int8,symmetric=true,group_size=-1", "int4:act=int8", "fp8:act=fp8", "fp8:block=128",
            "mxint8:act=mxint8", "mxint8:act=mxint8,rotate=hadamard", "mxfp8:act=mxfp8", "mxfp8:act=mxfp8,rotate=hadamard",
            "mxfp4:rotate=hadamard", "mxfp4:act=mxfp4", "mxfp4:act=mxfp4,rotate=hadamard", "nvfp4:act=nvfp4",
            "nvfp4:act=nvfp4,rotate=hadamard", "mxfp4:method=gptq", "mxfp4:rotate=hadamard,method=gptq",
            "mxfp4:act=mxfp4,rotate=hadamard,method=gptq", "nvfp4:method=gptq", "nvfp4:act=nvfp4,method=gptq",
            "nvfp4:act=nvfp4,rotate=hadamard,method=gptq", "mxfp6:method=gptq", "nf4:double_quant=true", "nf4:method=gptq",
            "bnb_fp4:method=gptq", "iq4_nl:method=mse", "iq4_nl:method=gptq", "int4:method=gptq,act_order=true",
            "int4:symmetric=true,method=gptq,act_order=true",
            "int3:method=gptq,act_order=true", "int2:method=gptq,act_order=true", "nf4:method=gptq,act_order=true",
            "nvfp4:method=gptq,act_order=true", "mxfp4:method=gptq,act_order=true",
            "mxfp4:rotate=hadamard,method=gptq,act_order=true"]
SMOKE_FORMATS = ["int4", "int4:method=mse"]

#: sentences of varied topic and length (DEMO_SENTENCES is added to them)
EVAL_SENTENCES = [
    "How do I reset my password if I no longer have access to my email?",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She scored twice in the second half and her team won the final.",
    "Preheat the oven to 200 degrees and bake the bread for forty minutes.",
    "The museum reopens next month after a two-year renovation.",
    "Memory bandwidth, not arithmetic, limits matrix-vector products at batch size one.",
    "Heavy rain is expected along the coast tonight, with winds up to 80 km/h.",
    "The novel follows three generations of a family of lighthouse keepers.",
    "Refunds are issued to the original payment method within five business days.",
    "A binary search halves the remaining interval at every step.",
    "The patient was advised to rest and drink plenty of fluids.",
    "Volcanic ash grounded flights across northern Europe for a week.",
    "He practised the violin every morning before school.",
    "Our quarterly revenue grew eight percent compared with last year.",
    "The treaty was signed by twelve countries in 1957.",
    "Is it safe to leave a lithium battery charging overnight?",
    "Wolves were reintroduced to the park and the elk population changed its grazing habits.",
    "The compiler inlines small functions to avoid call overhead.",
    "A gentle breeze carried the smell of cut grass across the field.",
    "Please submit the signed contract by Friday at noon.",
    "The telescope detected water vapour in the atmosphere of a distant exoplanet.",
    "Children learn languages faster when they hear them spoken at home.",
    "The bridge was closed after engineers found cracks in two of its supports.",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=None,
                   help="format specs (default: every registered format at its defaults, then VARIANTS)")
    p.add_argument("--smoke", action="store_true", help=f"only {SMOKE_FORMATS}, output to a temp dir (CI)")
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results (a temp dir with --smoke)")
    return p.parse_args(argv)


def linear_weight_error(original: torch.nn.Module, quantized: torch.nn.Module) -> float:
    """Mean over the quantized Linears of ||W_hat - W|| / ||W|| (W from `original`, same names)."""
    from lowbit.formats import get_format
    from lowbit.linear import QuantLinear

    errors = []
    for name, layer in quantized.named_modules():
        if isinstance(layer, QuantLinear):
            weight = original.get_submodule(name).weight.detach().float()
            w_hat = get_format(layer.format).dequantize(layer.packed).float()
            errors.append(float((w_hat - weight).norm() / weight.norm()))
    return sum(errors) / len(errors)


def measure(spec: str, model, tokenizer, sentences: list[str], reference: torch.Tensor) -> dict:
    """One result row: quantize a copy of `model` with `spec` and compare it with the fp32 one."""
    import lowbit
    from lowbit.api import summarize
    from lowbit.calibration import builtin_sentences, tokenized_batches
    from lowbit.default_model import sentence_embeddings

    name, options = parse_format_spec(spec, SimpleNamespace(group_size=128, symmetric=False))
    if options.get("method") == "gptq":  # calibrated on lowbit's built-in sentences, none of `sentences`
        options["calibration"] = tokenized_batches(tokenizer, builtin_sentences())
    quantized = lowbit.quantize(copy.deepcopy(model), name, progress=False, **options)
    embeddings = sentence_embeddings(quantized, tokenizer, sentences)
    cosine = (embeddings * reference).sum(dim=-1)
    pairs = torch.triu_indices(len(sentences), len(sentences), offset=1)
    change = (embeddings @ embeddings.t() - reference @ reference.t())[pairs[0], pairs[1]].abs()
    return {"format": spec, "bits_per_weight": summarize(quantized).bits_per_weight,
            "weight_rel_err": linear_weight_error(model, quantized), "cos_min": float(cosine.min()),
            "cos_mean": float(cosine.mean()), "similarity_change_mean": float(change.mean()),
            "similarity_change_max": float(change.max())}


def write_markdown(path: Path, env: dict, sentences: int, rows: list[dict]) -> None:
    lines = ["# Accuracy on all-MiniLM-L6-v2 (torch reference of each format, CPU)", "",
             f"torch {env['torch']}, commit {env['commit']}, {env['date']}; {sentences} sentences. Cosine: each "
             "sentence's embedding against the fp32 model's; similarity change: |change| of the cosine between "
             "two sentences, mean and largest over all pairs. Weight error: mean relative Frobenius error of the "
             "Linear weights. dfloat11 casts the fp32 weights to bf16 first (its only lossy step here).", "",
             "| format | bits/weight | weight rel err | cos min | cos mean | similarity change mean | max |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['bits_per_weight']:.3f} | {r['weight_rel_err']:.4f} | {r['cos_min']:.4f} | "
                     f"{r['cos_mean']:.4f} | {r['similarity_change_mean']:.4f} | {r['similarity_change_max']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import lowbit
    from lowbit.default_model import DEMO_SENTENCES, load_default_model, sentence_embeddings

    args = parse_args(argv)
    specs = SMOKE_FORMATS if args.smoke else args.formats or [*lowbit.formats(), *VARIANTS]
    problems = check_format_specs(specs, SimpleNamespace(group_size=128, symmetric=False), calibrated=True)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    model, tokenizer = load_default_model()
    sentences = [*DEMO_SENTENCES, *EVAL_SENTENCES]
    reference = sentence_embeddings(model, tokenizer, sentences)
    rows = [measure(spec, model, tokenizer, sentences, reference) for spec in tqdm(specs, desc="bench_accuracy")]
    env = {key: value for key, value in env_info(torch.device("cpu")).items() if key != "device"}
    report = {"env": env, "model": "all-MiniLM-L6-v2", "sentences": len(sentences), "results": rows}
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="lowbit-accuracy-")) if args.smoke
                               else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("smoke-" if args.smoke else "") + f"accuracy-minilm-{env['date'][:10]}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    write_markdown(out_dir / f"{stem}.md", env, len(sentences), rows)
    print((out_dir / f"{stem}.md").read_text())
    print(f"wrote {out_dir / stem}.json, .md")
    broken = [r["format"] for r in rows if not all(math.isfinite(v) for v in r.values() if isinstance(v, float))]
    if broken:
        print(f"non-finite results for {broken}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
