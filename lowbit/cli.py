"""The `lowbit` command: quantize a Hugging Face folder and save it; convert a GGUF file, a
dfloat11 package folder, a bitsandbytes (4-bit NF4 or 8-bit), a compressed-tensors (integer, FP8, NVFP4 or MX), a
GPTQ or an AWQ folder; export a quantized folder as compressed-tensors or as a GGUF file; inspect a saved folder."""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .errors import LowbitError

if TYPE_CHECKING:  # the importers load lazily, with the command that needs them
    from .integrations.importers import Importer

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


@dataclass(frozen=True)
class ForeignFolder:
    """A folder (or GGUF file) another library wrote, as `lowbit convert` / `lowbit export` read it."""

    kind: str  # who wrote it, for messages
    fmt: str  # the lowbit formats its layers import as, e.g. "int4" or "int4/int8"
    fidelity: str  # what the import keeps, for the summary line
    load: Callable[[], nn.Module]
    importer: Importer  # its settings files and inner files (see _companions)


def foreign_folder(source: Path, segment: int | None) -> ForeignFolder | None:
    """How to import `source` if another library wrote it (a GGUF file; a dfloat11 package,
    bitsandbytes, compressed-tensors or GPTQ / AWQ folder: integrations/importers.py), else None.
    segment: dfloat11's option (LowbitError for the others)."""
    from .formats import get_format
    from .integrations.importers import find_importer

    importer = find_importer(source)
    if importer is None:
        return None
    kind, fmt, fidelity = importer.describe(source)
    options = {} if segment is None else {"segment": segment}
    if options and "segment" not in importer.options:
        raise LowbitError(f"--segment is a dfloat11 option; a {kind} checkpoint converts to {fmt} as stored")
    if importer.options:
        get_format(fmt).check_options(options)
    return ForeignFolder(kind, fmt, fidelity, functools.partial(importer.load, source, **options), importer)


@contextlib.contextmanager
def _companions(source: Path, folder: ForeignFolder | None) -> Iterator[dict[str, Path]]:
    """The files to write beside the weights: a source folder's tokenizer etc.
    (io.companion_files) less its quantization settings; for a GGUF file, the tokenizer it holds,
    written into a scratch folder that lives until the with block ends."""
    from . import io

    if folder is not None and folder.importer.inner_files is not None:
        with tempfile.TemporaryDirectory(prefix="lowbit-inner-") as scratch:
            yield folder.importer.inner_files(source, Path(scratch))
        return
    if source.is_file():
        yield {}
        return
    settings_files = folder.importer.settings_files if folder is not None else ()
    yield {name: path for name, path in io.companion_files(source).items() if name not in settings_files}


def cmd_convert(args: argparse.Namespace) -> int:
    from . import api, io

    source, out_dir = Path(args.source), Path(args.out)
    folder = foreign_folder(source, args.segment)
    if folder is None:
        raise LowbitError(f"{source}: not a GGUF file, a dfloat11 package folder (config.json with dfloat11_config), "
                          "nor a bitsandbytes, compressed-tensors, GPTQ or AWQ one (config.json with "
                          "quantization_config.quant_method 'bitsandbytes', 'compressed-tensors', 'gptq' or 'awq')")
    start = time.perf_counter()
    io.check_save_target(out_dir)
    model = folder.load()
    with _companions(source, folder) as companions:
        io.save(model, out_dir, extra_files=companions)
    summary = api.summarize(model)
    print(f"converted:        {source} ({folder.kind}) -> {out_dir} (lowbit)")
    print(f"copied along:     {_listing(companions)}")
    print(f"{folder.fmt + ' layers:':<18}{summary.quantized_layers}, {summary.bits_per_weight:.3f} bits/weight, "
          f"{folder.fidelity}")
    print(f"time:             {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import api
    from .integrations.ct_export import check_export_target, export_compressed_tensors
    from .linear import QuantLinear

    source, out_dir = Path(args.source), Path(args.out)
    start = time.perf_counter()
    if out_dir.suffix == ".gguf":
        return _export_gguf(source, out_dir, start)
    check_export_target(out_dir)
    folder, kind, model = _export_source(source)
    with _companions(source, folder) as companions:
        export_compressed_tensors(model, out_dir, max_shard_bytes=args.max_shard_bytes, extra_files=companions)
    summary = api.summarize(model)
    formats = "/".join(sorted({m.format for m in model.modules() if isinstance(m, QuantLinear)}))
    print(f"exported:         {source} ({kind}) -> {out_dir} (compressed-tensors)")
    print(f"copied along:     {_listing(companions)}")
    written = json.loads((out_dir / "config.json").read_text())["quantization_config"]["format"]
    print(f"{formats + ' layers:':<18}{summary.quantized_layers}, {summary.bits_per_weight:.3f} bits/weight, "
          f"same codes, written as {written}")
    print(f"time:             {time.perf_counter() - start:.1f} s")
    return 0


def _export_source(source: Path) -> tuple[ForeignFolder | None, str, nn.Module]:
    """(how another library's folder imports or None, who wrote it, the model) of `lowbit export`'s SOURCE."""
    from . import io

    folder = foreign_folder(source, None)
    return (folder, folder.kind, folder.load()) if folder is not None else (None, "lowbit", io.load(source))


def _export_gguf(source: Path, out: Path, start: float) -> int:
    """`lowbit export SOURCE OUT.gguf`: the model and the tokenizer beside it as one GGUF file."""
    from transformers import AutoTokenizer

    from .integrations.gguf_export import export_gguf

    folder, kind, model = _export_source(source)
    with _companions(source, folder) as companions:
        files = [path for name, path in companions.items() if name in ("tokenizer.json", "tokenizer_config.json")]
        if not files:
            raise LowbitError(f"{source}: no tokenizer.json beside the model; a GGUF file holds its tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(files[0].parent))
        except Exception as exc:  # a damaged or foreign tokenizer folder: transformers' own errors vary
            raise LowbitError(f"{source}: transformers cannot load its tokenizer ({type(exc).__name__}: "
                              f"{str(exc)[:160]})") from None
        written = export_gguf(model, out, tokenizer)
    print(f"exported:         {source} ({kind}) -> {out} (GGUF)")
    print(f"tensors:          {', '.join(f'{n} {t}' for t, n in sorted(written.items()))}")
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
    from .integrations.gguf_import import is_gguf_file
    from .packed import parse_metadata

    folder = Path(args.path)
    if is_gguf_file(folder):
        return _inspect_gguf(folder, args.json)
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
    _print_table(("layer", "format", "shape", "bytes", "bits/weight"), rows)
    print(f"\n{len(layers)} quantized layer(s) in {folder} ({written_by})")
    if total_weights:
        print(f"packed: {total_bytes} bytes, {total_bytes * 8 / total_weights:.3f} bits/weight")
    if args.json:
        print(json.dumps(layers, indent=1))
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _inspect_gguf(path: Path, as_json: bool) -> int:
    """`lowbit inspect FILE.gguf`: one row per tensor (GGML type, shape, bytes, bits/weight, and
    what a Linear or expert weight of that type imports as), then totals."""
    from .integrations.gguf_import import tensor_table

    architecture, tensors = tensor_table(path)
    _print_table(("tensor", "type", "shape", "bytes", "bits/weight", "imports as"),
                 [(t["name"], t["type"], "x".join(map(str, t["shape"])), str(t["bytes"]),
                   f"{t['bytes'] * 8 / t['weights']:.3f}", t["imports_as"]) for t in tensors])
    quantized = [t for t in tensors if t["format"]]
    formats = sorted({t["format"] for t in quantized})
    print(f"\n{len(tensors)} tensor(s) in {path} (GGUF, architecture {architecture}); {len(quantized)} in types "
          f"lowbit imports as {'/'.join(formats) or 'nothing'} where they are Linear or expert weights")
    total_bytes, total_weights = sum(t["bytes"] for t in tensors), sum(t["weights"] for t in tensors)
    print(f"file tensors: {total_bytes} bytes, {total_bytes * 8 / max(total_weights, 1):.3f} bits/weight")
    if as_json:
        print(json.dumps({"architecture": architecture, "tensors": tensors}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .formats import formats

    parser = argparse.ArgumentParser(prog="lowbit", description="Low-precision quantization for PyTorch / Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a local Hugging Face folder and save it")
    q.add_argument("paths", nargs="+", metavar="[MODEL] OUT", help="model folder (default: embedded MiniLM) and output folder")
    q.add_argument("--format", required=True, choices=formats())
    q.add_argument("--group-size", type=int, default=None,
                   help="weights per scale along K: a multiple of 32, or 16 (int formats); -1: per channel")
    q.add_argument("--symmetric", action="store_true", help="symmetric integer quantization (no zero point)")
    q.add_argument("--method", default=None, choices=["rtn", "mse", "gptq"], help="how codes are chosen: 'rtn' "
                   "(default); int / lut formats: 'mse', the clipped group range with the least squared error "
                   "(iq4_nl: the searched block scale); int / lut / microscaling / nf4 / bnb_fp4 / iq4_nl formats: "
                   "'gptq', GPTQ on calibration text")
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
    c = sub.add_parser("convert", help="convert a GGUF file, a folder of the dfloat11 package, a bitsandbytes 4-bit NF4 or "
                       "8-bit folder, a compressed-tensors integer, FP8, NVFP4 or MX one, or a GPTQ or AWQ one, "
                       "into a lowbit folder")
    c.add_argument("source", help="GGUF file (llama.cpp's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K ... Q6_K / "
                   "IQ4_NL / IQ4_XS / MXFP4 / NVFP4 weights; the model in bfloat16), or folder written by the "
                   "dfloat11 package (config.json with dfloat11_config), "
                   "by transformers' save_pretrained of a bitsandbytes 4-bit NF4 or 8-bit (LLM.int8) model, or "
                   "by llm-compressor / compressed-tensors (W2A16 ... W8A16, W8A8 int8, FP8, NVFP4, "
                   "MXFP4 / MXFP6 / MXFP8), or by AutoGPTQ / GPTQModel / AutoAWQ (GPTQ 2/3/4/8-bit, AWQ GEMM)")
    c.add_argument("out", help="output folder (lowbit.save layout)")
    c.add_argument("--segment", type=int, default=None, help="dfloat11: weights per independently decodable segment")
    c.set_defaults(func=cmd_convert)
    e = sub.add_parser("export", help="write a lowbit folder (or any folder `convert` reads) as a compressed-tensors "
                       "folder, which vLLM and llm-compressor's tools load, or (OUT ending in .gguf) as a GGUF file "
                       "for llama.cpp")
    e.add_argument("source", help="lowbit.save or save_pretrained folder of a quantized transformers model "
                   "(int2 ... int8, fp8, nvfp4, mxfp4 / mxfp6 / mxfp8 layers), or a folder `lowbit convert` reads")
    e.add_argument("out", help="output folder (compressed-tensors layout), or a .gguf file: Llama / Mistral / "
                   "Qwen2 / Qwen3 / Phi-3 / Mixtral / Qwen2-MoE / Qwen3-MoE with int4 / int5 / int8 symmetric "
                   "group-32, int2 symmetric group-256, iq4_nl, mxfp4 or dfloat11 layers (Q4_0 / Q5_0 / Q8_0 / TQ2_0 / "
                   "IQ4_NL / MXFP4 / BF16, bit for bit) and a byte-level or SentencePiece BPE tokenizer")
    e.add_argument("--max-shard-bytes", type=int, default=4 * 2**30)
    e.set_defaults(func=cmd_export)
    i = sub.add_parser("inspect", help="per-layer table of a saved lowbit folder, or per-tensor table of a GGUF file")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="also print the per-layer manifest entries (a GGUF file: its tensor rows)")
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
