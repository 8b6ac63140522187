"""lowbit: low-precision quantized inference for PyTorch and Hugging Face models."""
from . import calibration  # calibration.tokenized_batches / builtin_sentences for method="gptq"
from .api import dequantize, quantize
from .block_decode import enable_block_decompression
from .config import QuantConfig
from .errors import LowbitError
from .formats import formats, get_format, register_format
from .integrations.transformers import HfQuantConfig, register as _register_with_transformers
from .io import load, save
from .linear import QuantLinear
from .ops import linear
from .packed import PackedWeight

__version__ = "0.1.0"

_register_with_transformers()

__all__ = [
    "HfQuantConfig",
    "LowbitError",
    "PackedWeight",
    "QuantConfig",
    "QuantLinear",
    "calibration",
    "dequantize",
    "enable_block_decompression",
    "formats",
    "get_format",
    "linear",
    "load",
    "quantize",
    "register_format",
    "save",
]
