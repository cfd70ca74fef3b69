"""The attention seam: every attention call in the DiT goes through one `AttentionKernel`.

Layout at the seam is `[B, L, heads, head_dim]` (the flash-attention layout), so that a
sequence-parallel wrapper (Ulysses, in `wan22_core.parallel`) can replace a block's kernel
module without the block knowing: it all-to-alls heads <-> sequence around the inner kernel.
Backends beyond SDPA plug in here too. No torch.distributed in this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa",)


class AttentionKernel(nn.Module):
    """softmax(q k^T / sqrt(d)) v, no mask, no dropout. Holds no weights."""

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [B, L, H, D] -> SDPA wants [B, H, L, D]; the transposes are views, SDPA handles strides.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)  # [B, Lq, H, D]
