"""lowbit: low-precision quantized inference for PyTorch and Hugging Face models."""
from . import calibration  # calibration.tokenized_batches / builtin_sentences for method="gptq"
from .api import dequantize, quantize
from .block_decode import enable_block_decompression
from .config import QuantConfig
from .errors import LowbitError
from .formats import formats, get_format, register_format
from .integrations.ct_export import export_compressed_tensors
from .integrations.gguf_export import export_gguf
from .integrations.transformers import HfQuantConfig, register as _register_with_transformers
from .io import load, save
from .linear import QuantLinear
from .ops import linear
from .packed import PackedWeight

__version__ = "0.1.0"

_register_with_transformers()


def __getattr__(name: str):
    """`lowbit.lora_config` (lowbit/integrations/peft_lora.py) imports peft, an optional dependency,
    only when first used."""
    if name == "lora_config":
        try:
            from .integrations.peft_lora import lora_config
        except ImportError as error:
            raise LowbitError(f"lowbit.lora_config needs peft (pip install 'lowbit[lora]'): {error}") from error
        return lora_config
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")

__all__ = [
    "HfQuantConfig",
    "LowbitError",
    "PackedWeight",
    "QuantConfig",
    "QuantLinear",
    "calibration",
    "dequantize",
    "enable_block_decompression",
    "export_compressed_tensors",
    "export_gguf",
    "formats",
    "get_format",
    "linear",
    "load",
    "quantize",
    "register_format",
    "save",
]
