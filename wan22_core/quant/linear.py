"""The one seam for Linears whose weight stays quantised in memory: bytes by rows, dequantised per forward.

`QuantizedLinear` holds its weight as a uint8 parameter [out_features, bytes per row] and
everything else that describes it per tensor (an fp8 scale, a GGUF type) as buffers or plain
attributes. A subclass is one dequantisation rule: `dequantize_weight(dtype)` turns the rows it
holds into the dense [rows, in_features] weight. `fp8.FP8Linear` (scaled e4m3 bytes, one byte per
weight) and `quant.GGUFLinear` (ggml blocks) are the two rules.

Why bytes by rows: a row range of such a weight is a range of whole quantised rows, so FSDP2
shards it on dim 0 like any other parameter, and its all-gather moves plain uint8 (half of
bf16's bytes for fp8; gloo and NCCL never see an fp8 dtype). FSDP2 gathers a unit's parameters
of mixed dtypes as one uint8 buffer and hands each back in its own dtype; its mixed-precision
policy must not cast (`parallel.fsdp.mixed_precision` sets no param_dtype), so the gathered
rows are the stored bytes and the forward dequantises exactly what one process would.

State dicts keep the file's form (`stored_weight`: fp8 for FP8Linear) in and out, so checkpoints,
LoRA merges and tests see the weight as a file stores it; only the parameter is raw bytes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantizedLinear(nn.Module):
    """A Linear whose weight is held as uint8 bytes by rows; a subclass says how to dequantise them."""

    def __init__(self, in_features: int, out_features: int, row_bytes: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantize_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The held rows as a dense [rows, in_features] weight in `dtype` (a fresh tensor)."""
        raise NotImplementedError

    @staticmethod
    def as_stored(rows: torch.Tensor) -> torch.Tensor:
        """uint8 rows of this layer's weight as files and state dicts hold them (default: the bytes)."""
        return rows

    @staticmethod
    def byte_rows(stored: torch.Tensor) -> torch.Tensor:
        """The inverse of `as_stored`: a stored weight (or rows of it) as this layer's uint8 rows."""
        return stored

    def stored_weight(self) -> torch.Tensor:
        """The held weight as files and state dicts hold it (a view of the parameter)."""
        return self.as_stored(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize_weight(x.dtype)  # just this layer, freed after the matmul
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.stored_weight() if keep_vars else self.stored_weight().detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dtype != torch.uint8:
            state_dict[key] = self.byte_rows(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

