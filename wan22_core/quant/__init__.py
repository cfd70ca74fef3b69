"""Weights held quantised in memory and dequantised per layer: the seam and GGUF's ggml block types.

`linear` is the seam every quantised Linear shares (`QuantizedLinear`: uint8 bytes by rows, one
dequantisation rule per subclass; FSDP shards and gathers the rows as plain bytes). `gguf_dequant`
reads the block formats (pure torch, any device, compilable); `gguf_linear` holds them
(`GGUFWeight`, `GGUFLinear`, `swap_to_gguf`). Reading GGUF files (headers, metadata,
memory-mapped tensor bytes) is the `gguf` package's job; the checkpoint loader calls it.
"""
from .gguf_dequant import FLOAT_TYPES, TYPES, QuantType, UnsupportedQuantType, dequantize, quant_type
from .gguf_linear import GGUFLinear, GGUFWeight, swap_to_gguf
from .linear import QuantizedLinear

__all__ = ["FLOAT_TYPES", "TYPES", "QuantType", "UnsupportedQuantType", "dequantize", "quant_type",
           "GGUFLinear", "GGUFWeight", "swap_to_gguf", "QuantizedLinear"]
