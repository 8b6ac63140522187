#!/usr/bin/env python3
"""`make demo`: quantize the embedded MiniLM to int8, fp8, mxfp8, int4 (round-to-nearest, method="mse", and
method="gptq" calibrated on lowbit's built-in sentences), nvfp4 and mxfp4, compare sentence embeddings with the
unquantized model, save, reload, and check the reloaded model gives the same embeddings."""
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit.api import summarize  # noqa: E402
from lowbit.calibration import builtin_sentences, tokenized_batches  # noqa: E402
from lowbit.default_model import DEMO_SENTENCES, load_default_model, sentence_embeddings  # noqa: E402


#: (row label, format, options) of the demo table
ROWS = [("int8", "int8", {}), ("fp8", "fp8", {}), ("mxfp8", "mxfp8", {}), ("int4", "int4", {}),
        ("int4 mse", "int4", {"method": "mse"}), ("int4 gptq", "int4", {"method": "gptq"}), ("nvfp4", "nvfp4", {}),
        ("mxfp4", "mxfp4", {})]


def main() -> int:
    dense, tokenizer = load_default_model()
    reference = sentence_embeddings(dense, tokenizer, DEMO_SENTENCES)
    dense_bytes = summarize(dense).total_bytes
    print(f"all-MiniLM-L6-v2 (fp32): {dense_bytes / 2**20:.2f} MiB, {len(DEMO_SENTENCES)} sentences\n")
    print(f"{'format':<9} {'size MiB':>9} {'of fp32':>8} {'bits/w':>7} {'min cos':>8} {'mean cos':>9} {'reload':>8}")
    ok = True
    for label, fmt, options in ROWS:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        if options.get("method") == "gptq":  # none of the built-in sentences is a demo sentence
            options = {**options, "calibration": tokenized_batches(tokenizer, builtin_sentences())}
        lowbit.quantize(model, fmt, progress=False, **options)
        summary = summarize(model)
        emb = sentence_embeddings(model, tokenizer, DEMO_SENTENCES)
        cos = (emb * reference).sum(dim=-1)
        with tempfile.TemporaryDirectory() as tmp:
            lowbit.save(model, Path(tmp) / fmt)
            reloaded = lowbit.load(Path(tmp) / fmt)
            same = torch.equal(sentence_embeddings(reloaded, tokenizer, DEMO_SENTENCES), emb)
        ok &= same
        size = summary.total_bytes
        print(f"{label:<9} {size / 2**20:>9.2f} {size / dense_bytes:>8.1%} {summary.bits_per_weight:>7.3f} {cos.min():>8.4f} "
              f"{cos.mean():>9.4f} {'same' if same else 'DIFFERS':>8}   ({time.perf_counter() - t0:.1f} s)")
    print("\n'of fp32' counts every tensor (embeddings and LayerNorms stay fp32); bits/w counts the quantized Linears.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
