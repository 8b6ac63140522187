"""Which library wrote a checkpoint, and the lowbit import that reads it: one ordered table that
`lowbit.load` and the CLI (`lowbit convert`, `lowbit export`) both consult."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import bnb_import, ct_import, dfloat11_import, gguf_blocks, gguf_import, gptq_awq_import


@dataclass(frozen=True)
class Importer:
    """One library's checkpoints. detects(path): whether it wrote `path`; load(path, *, model=None,
    device="cpu", **options): the import; describe(path) -> (who wrote it, the lowbit formats its
    layers import as, what the import keeps), for the CLI's summary."""

    detects: Callable[[Path], bool]
    load: Callable[..., nn.Module]
    describe: Callable[[Path], tuple[str, str, str]]
    options: tuple[str, ...] = ()  # the load options it takes (the CLI's --segment for dfloat11)
    settings_files: tuple[str, ...] = ()  # its own quantization settings: not copied along (they describe its layout)
    #: (path, scratch folder) -> {name: file}: files a converted copy needs that the checkpoint holds
    #: inside itself (a GGUF file's tokenizer), written into the scratch folder
    inner_files: Callable[[Path, Path], dict[str, Path]] | None = None


def _bitsandbytes(path: Path) -> tuple[str, str, str]:
    found = bnb_import.target_format(path)
    if found == "int8":
        return "bitsandbytes 8-bit", found, "same codes, row scales rounded to float16"
    return "bitsandbytes 4-bit", found, "weights bit-identical"


def _compressed_tensors(path: Path) -> tuple[str, str, str]:
    found = ct_import.target_format(path)
    return "compressed-tensors", found, "same codes" + (", integer layers' scales in float16" if "int" in found
                                                        else " and scales")


IMPORTERS = (
    Importer(gguf_import.is_gguf_file, gguf_import.load_gguf,  # llama.cpp's single-file format
             lambda path: ("GGUF", gguf_import.target_format(path),
                           f"same codes; {' / '.join(gguf_blocks.EXACT_TYPES)} weights bit-identical, others' "
                           "scales in float16"),
             inner_files=gguf_import.write_tokenizer),
    Importer(dfloat11_import.is_dfloat11_folder, dfloat11_import.load_dfloat11,
             lambda path: ("dfloat11 package", "dfloat11", "weights bit-identical"), options=("segment",)),
    Importer(bnb_import.is_bitsandbytes_folder, bnb_import.load_bitsandbytes, _bitsandbytes),
    Importer(ct_import.is_compressed_tensors_folder, ct_import.load_compressed_tensors, _compressed_tensors),
    Importer(gptq_awq_import.is_gptq_awq_folder, gptq_awq_import.load_gptq_awq,  # AutoGPTQ / GPTQModel / AutoAWQ
             lambda path: ("GPTQ / AWQ", gptq_awq_import.target_format(path),
                           "same codes and zero points, scales in float16"),
             settings_files=tuple(gptq_awq_import.SIDE_CONFIGS)),
)


def find_importer(path: Path) -> Importer | None:
    """The first importer that detects `path`, or None (a lowbit or save_pretrained folder)."""
    return next((importer for importer in IMPORTERS if importer.detects(path)), None)
