"""The attention seam: every attention call in the DiT goes through one `AttentionKernel`.

Layout at the seam is `[B, L, heads, head_dim]` (the flash-attention layout), so that a
sequence-parallel wrapper (Ulysses, in `wan22_core.parallel`) can replace a block's kernel
module without the block knowing: it all-to-alls heads <-> sequence around the inner kernel.
No torch.distributed in this file.

Backends (imported lazily, only when selected):
- `sdpa`: torch's scaled_dot_product_attention; PyTorch picks flash / cuDNN / memory-efficient
  kernels on GPU. Exact. Always available.
- `flash_attn`: FlashAttention 2 (`flash_attn` package). Exact; fp16/bf16 on CUDA.
- `flash_attn3`: FlashAttention 3 (`flash_attn_interface`, Hopper). Exact; fp16/bf16 on CUDA.
- `sage`: SageAttention (`sageattention`): INT8 QK^T, so *not* exact; never picked by `auto`.
`auto` picks the fastest exact backend that is installed and usable for the inputs.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "sdpa", "flash_attn", "flash_attn3", "sage")
_PACKAGES = {"flash_attn": "flash_attn", "flash_attn3": "flash_attn_interface", "sage": "sageattention"}
_INSTALL_HINT = {
    "flash_attn": "pip install flash-attn --no-build-isolation",
    "flash_attn3": "build flash-attention's hopper/ folder (FlashAttention 3)",
    "sage": "pip install sageattention",
}


def _import(backend: str):
    try:
        return importlib.import_module(_PACKAGES[backend])
    except ImportError as err:
        raise ValueError(f"attention backend {backend!r} is selected but the {_PACKAGES[backend]!r} package is "
                         f"not installed ({err}); install it ({_INSTALL_HINT[backend]}) or choose 'sdpa'") from err


def available_backends() -> list[str]:
    """Backends whose package imports here (sdpa always)."""
    found = ["sdpa"]
    for name, package in _PACKAGES.items():
        if importlib.util.find_spec(package) is not None:
            found.append(name)
    return found


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """`auto` -> the fastest installed exact backend for `device`; other names are checked."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name != "auto":
        if name != "sdpa":
            _import(name)
        return name
    if device is None or device.type != "cuda":
        return "sdpa"
    installed = available_backends()
    if "flash_attn3" in installed and torch.cuda.get_device_capability(device)[0] == 9:
        return "flash_attn3"  # Hopper-only kernels
    return "flash_attn" if "flash_attn" in installed else "sdpa"


class AttentionKernel(nn.Module):
    """softmax(q k^T / sqrt(d) + bias) v, no dropout. Holds no weights."""

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.backend = resolve_backend(backend)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, Lq, H, D], k/v [B, Lk, H, D], optional additive logit bias [Lk] -> [B, Lq, H, D]."""
        # flash kernels exist only on CUDA and take no bias (only the short cross-attention has one)
        if self.backend == "sdpa" or q.device.type != "cuda" or bias is not None:
            # SDPA wants [B, H, L, D]; the transposes are views and SDPA handles the strides.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=None if bias is None else bias.to(q.dtype).expand(q.shape[1], -1))
            return out.transpose(1, 2)
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # flash kernels take half precision only
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        if self.backend == "sage":
            out = _import("sage").sageattn(q, k, v, tensor_layout="NHD")
        else:
            out = _import(self.backend).flash_attn_func(q, k, v)
            out = out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
        return out.to(dtype)


def set_attention_backend(model: nn.Module, backend: str, device: torch.device | None = None) -> str:
    """Point every attention kernel in `model` (wrapped ones included) at `backend`."""
    resolved = resolve_backend(backend, device)
    for module in model.modules():
        if isinstance(module, AttentionKernel):
            module.backend = resolved
    return resolved
