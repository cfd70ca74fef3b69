"""GGUF weights kept quantised in memory: a tensor holder and the Linear that dequantises per forward.

`GGUFWeight` is one tensor as a GGUF file stores it (raw block bytes, ggml type, real shape).
`GGUFLinear` is the block-Linear seam, the GGUF twin of `fp8.FP8Linear`: its `weight` parameter
holds the quantised bytes as uint8 [out_features, bytes per row], and each forward dequantises
just that layer to the input's dtype, runs `F.linear` and lets the dense weight go. Held bytes
are the file's bytes (a Q4_K expert is about 0.28 of its bf16 size); moving a layer between
devices (expert offload, block swap) moves those bytes.

Blocks run along the last dimension, so when a row's weights fill whole blocks (every Wan block
Linear: 5120 and 13824 are multiples of 256) a range of rows is a range of whole blocks:
`GGUFWeight.rows` and dim-0 shards of the uint8 parameter stay quantised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .gguf_dequant import QuantType, dequantize, quant_type
from .swap import replace_linears


@dataclass(frozen=True)
class GGUFWeight:
    """One stored tensor: `data` holds its raw bytes (uint8, in the stored layout, which may be
    the flattened `(n / 256, 256)` form), `shape` its real shape."""

    data: torch.Tensor
    qtype: QuantType
    shape: torch.Size

    def __post_init__(self):
        object.__setattr__(self, "qtype", quant_type(self.qtype))
        object.__setattr__(self, "shape", torch.Size(self.shape))
        expected = self.qtype.nbytes(math.prod(self.shape))
        if self.data.dtype != torch.uint8 or self.data.numel() != expected:
            raise ValueError(f"{self.qtype.name} tensor of shape {tuple(self.shape)} needs {expected} bytes; "
                             f"got {self.data.numel()} {str(self.data.dtype).removeprefix('torch.')} elements")

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape, dtype)

    def by_rows(self) -> torch.Tensor:
        """The bytes as [shape[0], bytes per row] (uint8): `GGUFLinear.weight`'s layout. Needs each
        row to be whole blocks; a view where the stored layout allows."""
        row = math.prod(self.shape[1:])
        if not self.shape or row % self.qtype.block_size:
            raise ValueError(f"rows of a {self.qtype.name} tensor of shape {tuple(self.shape)} are not whole "
                             f"{self.qtype.block_size}-weight blocks, so it cannot be split by rows quantised")
        return self.data.reshape(self.shape[0], self.qtype.nbytes(row))

    def rows(self, start: int, stop: int) -> GGUFWeight:
        """Rows [start, stop) along dim 0, still quantised (a view of the same bytes)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) out of range for a tensor of {self.shape[0]} rows")
        return GGUFWeight(self.by_rows()[start:stop], self.qtype, (stop - start, *self.shape[1:]))


class GGUFLinear(nn.Module):
    """A Linear whose weight stays in a GGUF block type; drop-in for `nn.Linear` in the blocks.

    State-dict names are nn.Linear's: `weight` (uint8 [out_features, bytes per row]) and `bias`.
    The ggml type is a constructor argument, not state: a file may mix types layer by layer
    (Q4_K_M holds some Linears in Q6_K), so the loader builds each layer with its own.
    """

    def __init__(self, in_features: int, out_features: int, qtype: QuantType | int | str, bias: bool = True,
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qtype = quant_type(qtype)
        self.weight = nn.Parameter(torch.empty(out_features, self.qtype.nbytes(in_features), dtype=torch.uint8,
                                               device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.weight, self.qtype, (self.out_features, self.in_features), x.dtype)  # this layer only
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def swap_to_gguf(model: nn.Module, qtypes: Mapping[str, QuantType | int | str],
                 bias_dtype: torch.dtype = torch.bfloat16) -> None:
    """Replace each named `nn.Linear` by an empty `GGUFLinear` of its type, on the same device
    (meta before loading); the caller loads the bytes (`GGUFWeight.by_rows()`) into `weight`."""
    replace_linears(model, qtypes, lambda name, linear: GGUFLinear(
        linear.in_features, linear.out_features, qtypes[name], bias=linear.bias is not None,
        device=linear.weight.device, bias_dtype=bias_dtype), holds="GGUF blocks")
