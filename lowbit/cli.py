"""The `lowbit` command: quantize a Hugging Face folder and save it; convert a dfloat11 package
folder, a bitsandbytes (4-bit NF4 or 8-bit), a compressed-tensors (integer, FP8, NVFP4 or MX), a
GPTQ or an AWQ folder; inspect a saved folder."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from torch import nn

from .errors import LowbitError

logger = logging.getLogger(__name__)


def load_hf_folder(path: Path) -> nn.Module:
    """A local Hugging Face model folder -> model in its stored dtype (no hub access)."""
    import transformers

    if not (path / "config.json").is_file():
        raise LowbitError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = None
        for arch in getattr(config, "architectures", None) or []:
            candidate = getattr(transformers, str(arch), None)
            if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
                cls = candidate
                break
        cls = cls or transformers.AutoModel
        return cls.from_pretrained(path, dtype="auto", local_files_only=True).eval()
    except LowbitError:
        raise
    except Exception as exc:  # transformers' own errors for a folder it cannot read
        raise LowbitError(f"{path}: transformers could not load the model: {exc}") from None


#: CLI flags that become format options: valued ones when given, switches when set
_VALUE_OPTIONS = ("group_size", "block", "act", "rotate", "segment", "method")
_SWITCH_OPTIONS = ("symmetric", "double_quant", "cast", "act_order")


def _format_options(args: argparse.Namespace) -> dict:
    options = {name: getattr(args, name) for name in _VALUE_OPTIONS if getattr(args, name) is not None}
    options.update({name: True for name in _SWITCH_OPTIONS if getattr(args, name)})
    return options


def _calibration_batches(model_dir: Path, text_file: str | None) -> list[dict]:
    """--method gptq: the lines of `text_file` (or lowbit's built-in sentences), tokenized by the
    model folder's tokenizer, 16 to a batch. LowbitError naming the file when it cannot be read
    or has no text, or when the folder has no tokenizer."""
    from transformers import AutoTokenizer

    from .calibration import builtin_sentences, tokenized_batches

    if text_file is None:
        logger.info("lowbit: calibrating on the built-in sentences (pass --calibration FILE for text of your domain)")
        sentences = builtin_sentences()
    else:
        try:
            sentences = [line for line in Path(text_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise LowbitError(f"--calibration {text_file}: cannot read it: {exc}") from None
        if not sentences:
            raise LowbitError(f"--calibration {text_file}: no text (one calibration sample per line)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers' own errors for a folder without a tokenizer
        raise LowbitError(f"{model_dir}: --method gptq tokenizes calibration text, but the folder's tokenizer "
                          f"could not be loaded: {exc}") from None
    return tokenized_batches(tokenizer, sentences)


def _listing(files: dict, shown: int = 6) -> str:
    names = sorted(files)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) + more) if names else "nothing (no tokenizer or other files beside the weights)"


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import api, io
    from .default_model import default_model_path
    from .formats import get_format

    if len(args.paths) == 1:
        model_dir, out_dir = default_model_path(), Path(args.paths[0])
    elif len(args.paths) == 2:
        model_dir, out_dir = Path(args.paths[0]), Path(args.paths[1])
    else:
        raise LowbitError("usage: lowbit quantize [MODEL] OUT --format FORMAT (MODEL defaults to the embedded MiniLM)")
    start = time.perf_counter()
    options = _format_options(args)
    # what would fail only at the end, checked before the model loads (minutes to hours on big models)
    get_format(args.format).check_options(options)
    io.check_save_target(out_dir)
    if args.calibration is not None and options.get("method") != "gptq":
        raise LowbitError("--calibration is only used with --method gptq")
    calibration = _calibration_batches(model_dir, args.calibration) if options.get("method") == "gptq" else None
    model = load_hf_folder(model_dir)
    before = api.summarize(model).total_bytes
    api.quantize(model, args.format, skip=args.skip, calibration=calibration, **options)
    companions = io.companion_files(model_dir)  # the tokenizer etc., so the folder is a whole model
    io.save(model, out_dir, max_shard_bytes=args.max_shard_bytes, extra_files=companions)
    after = api.summarize(model)
    print(f"model:            {model_dir}")
    print(f"saved to:         {out_dir}")
    print(f"copied along:     {_listing(companions)}")
    print(f"quantized layers: {after.quantized_layers} ({args.format})")
    print(f"size before:      {before / 2**20:.2f} MiB")
    print(f"size after:       {after.total_bytes / 2**20:.2f} MiB ({after.total_bytes / before:.1%})")
    if after.quantized_layers:
        print(f"bits per weight:  {after.bits_per_weight:.3f} (quantized layers, scales included)")
    print(f"time:             {time.perf_counter() - start:.1f} s")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from . import api, io
    from .formats import get_format
    from .integrations import bnb_import, ct_import, gptq_awq_import
    from .integrations.dfloat11_import import is_dfloat11_folder, load_dfloat11

    source, out_dir = Path(args.source), Path(args.out)
    settings_files = ()  # the source's own quantization settings: not copied along (they describe its layout)
    if is_dfloat11_folder(source):
        kind, fmt, fidelity = "dfloat11 package", "dfloat11", "weights bit-identical"
        options = {} if args.segment is None else {"segment": args.segment}
        get_format("dfloat11").check_options(options)
        load = lambda: load_dfloat11(source, **options)  # noqa: E731
    elif bnb_import.is_bitsandbytes_folder(source):
        fmt = bnb_import.target_format(source)
        kind, fidelity = (("bitsandbytes 8-bit", "same codes, row scales rounded to float16") if fmt == "int8"
                          else ("bitsandbytes 4-bit", "weights bit-identical"))
        load = lambda: bnb_import.load_bitsandbytes(source)  # noqa: E731
    elif ct_import.is_compressed_tensors_folder(source):
        kind, fmt = "compressed-tensors", ct_import.target_format(source)
        fidelity = "same codes" + (", integer layers' scales in float16" if "int" in fmt else " and scales")
        load = lambda: ct_import.load_compressed_tensors(source)  # noqa: E731
    elif gptq_awq_import.is_gptq_awq_folder(source):
        kind, fmt = "GPTQ / AWQ", gptq_awq_import.target_format(source)
        fidelity = "same codes and zero points, scales in float16"
        settings_files = tuple(gptq_awq_import.SIDE_CONFIGS)
        load = lambda: gptq_awq_import.load_gptq_awq(source)  # noqa: E731
    else:
        raise LowbitError(f"{source}: not a dfloat11 package folder (config.json with dfloat11_config), nor a "
                          "bitsandbytes, compressed-tensors, GPTQ or AWQ one (config.json with "
                          "quantization_config.quant_method 'bitsandbytes', 'compressed-tensors', 'gptq' or 'awq')")
    if args.segment is not None and fmt != "dfloat11":
        raise LowbitError(f"--segment is a dfloat11 option; a {kind} folder converts to {fmt} as stored")
    start = time.perf_counter()
    io.check_save_target(out_dir)
    model = load()
    companions = {name: path for name, path in io.companion_files(source).items() if name not in settings_files}
    io.save(model, out_dir, extra_files=companions)
    summary = api.summarize(model)
    print(f"converted:        {source} ({kind}) -> {out_dir} (lowbit)")
    print(f"copied along:     {_listing(companions)}")
    print(f"{fmt + ' layers:':<18}{summary.quantized_layers}, {summary.bits_per_weight:.3f} bits/weight, {fidelity}")
    print(f"time:             {time.perf_counter() - start:.1f} s")
    return 0


def _saved_layers(folder: Path) -> tuple[str, dict, str]:
    """(where the entries are, {layer: entry}, what wrote the folder) of a lowbit.save folder
    (lowbit.json) or a save_pretrained one (config.json's quantization_config.layers)."""
    from .errors import CheckpointError
    from .io import MANIFEST, _read_manifest, architecture, saved_pretrained_config

    config = None if (folder / MANIFEST).is_file() else saved_pretrained_config(folder)
    if config is not None:
        layers = config["quantization_config"].get("layers")
        if not isinstance(layers, dict):
            raise CheckpointError(f"{folder / 'config.json'}: quantization_config.layers: missing or not an object")
        return f"{folder / 'config.json'}: quantization_config.layers", layers, f"save_pretrained: {architecture(config)}"
    manifest = _read_manifest(folder)
    model = manifest["model"]
    return f"{folder / MANIFEST}: layers", manifest["layers"], f"{model.get('kind')}: {model.get('class')}"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .errors import CheckpointError
    from .experts import parse_slot
    from .packed import parse_metadata

    folder = Path(args.path)
    where, layers, written_by = _saved_layers(folder)
    # one row per layer; the experts of a MoE weight (experts.slot_name) in one row per weight,
    # format and shape: [E experts, bytes summed]
    grouped: dict[tuple, list[int]] = {}  # row key -> [experts, bytes, weights]
    total_bytes = total_weights = 0
    for name, entry in layers.items():
        try:
            fmt, shape, _, attrs = parse_metadata(entry)
        except LowbitError as exc:
            raise CheckpointError(f"{where}.{name}: {exc}") from None
        nbytes = sum(spec.nbytes for spec in fmt.field_specs(shape, attrs).values())
        total_bytes += nbytes
        total_weights += shape[0] * shape[1]
        slot = parse_slot(name)
        row_name, fused = (name, False) if slot is None else (".".join(filter(None, slot[:2])), True)
        # formats that also quantize activations at run time say so (W8A8 is not weight-only), and
        # layers that gather x by an input permutation first (activation-ordered imports)
        shown = " ".join([fmt.name] + ([f"act={attrs['act']}"] if attrs.get("act") else [])
                         + (["permuted"] if attrs.get("permuted") else []))
        counts = grouped.setdefault((row_name, fused, shown, shape), [0, 0, 0])
        counts[0] += 1
        counts[1] += nbytes
        counts[2] += shape[0] * shape[1]
    rows = [(name if not fused else f"{name} [{experts} experts]", fmt_name,
             f"{experts}x{shape[0]}x{shape[1]}" if fused else f"{shape[0]}x{shape[1]}", str(nbytes),
             f"{nbytes * 8 / weights:.3f}")
            for (name, fused, fmt_name, shape), (experts, nbytes, weights) in grouped.items()]
    header = ("layer", "format", "shape", "bytes", "bits/weight")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join
    print(line(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print(line(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\n{len(layers)} quantized layer(s) in {folder} ({written_by})")
    if total_weights:
        print(f"packed: {total_bytes} bytes, {total_bytes * 8 / total_weights:.3f} bits/weight")
    if args.json:
        print(json.dumps(layers, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .formats import formats

    parser = argparse.ArgumentParser(prog="lowbit", description="Low-precision quantization for PyTorch / Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a local Hugging Face folder and save it")
    q.add_argument("paths", nargs="+", metavar="[MODEL] OUT", help="model folder (default: embedded MiniLM) and output folder")
    q.add_argument("--format", required=True, choices=formats())
    q.add_argument("--group-size", type=int, default=None, help="weights per scale along K (-1: per channel)")
    q.add_argument("--symmetric", action="store_true", help="symmetric integer quantization (no zero point)")
    q.add_argument("--method", default=None, choices=["rtn", "mse", "gptq"], help="how codes are chosen: 'rtn' "
                   "(default); int / lut formats: 'mse', the clipped group range with the least squared error; int / "
                   "lut / microscaling / nf4 / bnb_fp4 formats: 'gptq', GPTQ on calibration text")
    q.add_argument("--act-order", action="store_true", help="--method gptq: quantize the columns in order of "
                   "decreasing input energy (GPTQ's desc_act, static groups; same layout)")
    q.add_argument("--calibration", default=None, metavar="FILE", help="--method gptq: UTF-8 text, one calibration "
                   "sample per line (default: lowbit's built-in English sentences)")
    q.add_argument("--block", type=int, default=None, help="fp8: one scale per BLOCK x BLOCK tile (e.g. 128) "
                   "instead of per output channel")
    q.add_argument("--act", default=None, help="also quantize activations at run time (fp8 formats: 'fp8' = W8A8; "
                   "int formats: 'int8' = W8A8 / W4A8 on int8 tensor cores, 'fp8' = W4AFP8; microscaling formats: a microscaling "
                   "format name, fake-quantized)")
    q.add_argument("--rotate", default=None, choices=["hadamard"], help="microscaling formats: block Hadamard "
                   "rotation along K (weights offline, activations at run time)")
    q.add_argument("--double-quant", action="store_true", help="nf4 / bnb_fp4: also quantize the block absmax values (8 bits)")
    q.add_argument("--segment", type=int, default=None, help="dfloat11: weights per independently decodable segment")
    q.add_argument("--cast", action="store_true", help="dfloat11: round fp16/fp32 weights to bf16 first (lossy)")
    q.add_argument("--skip", nargs="*", default=[], metavar="PATTERN", help="glob patterns of layers to keep in full precision")
    q.add_argument("--max-shard-bytes", type=int, default=4 * 2**30)
    q.set_defaults(func=cmd_quantize)
    c = sub.add_parser("convert", help="convert a folder of the dfloat11 package, a bitsandbytes 4-bit NF4 or "
                       "8-bit folder, a compressed-tensors integer, FP8, NVFP4 or MX one, or a GPTQ or AWQ one, "
                       "into a lowbit folder")
    c.add_argument("source", help="folder written by the dfloat11 package (config.json with dfloat11_config), "
                   "by transformers' save_pretrained of a bitsandbytes 4-bit NF4 or 8-bit (LLM.int8) model, or "
                   "by llm-compressor / compressed-tensors (W2A16 ... W8A16, W8A8 int8, FP8, NVFP4, "
                   "MXFP4 / MXFP6 / MXFP8), or by AutoGPTQ / GPTQModel / AutoAWQ (GPTQ 2/3/4/8-bit, AWQ GEMM)")
    c.add_argument("out", help="output folder (lowbit.save layout)")
    c.add_argument("--segment", type=int, default=None, help="dfloat11: weights per independently decodable segment")
    c.set_defaults(func=cmd_convert)
    i = sub.add_parser("inspect", help="per-layer table of a saved lowbit folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="also print the per-layer manifest entries")
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
