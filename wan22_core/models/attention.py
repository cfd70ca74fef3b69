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
- `flash_attn4`: FlashAttention 4 (`flash_attn.cute`, the `flash-attn-4` package: CuTe DSL kernels
  compiled on first use, Hopper and Blackwell). Exact; fp16/bf16 on CUDA.
- `sage`: SageAttention (`sageattention`): INT8 QK^T, so *not* exact; never picked by `auto`.
`auto` picks the fastest exact backend that is installed, by GPU generation (`AUTO_ORDER`).
The non-SDPA kernels run as one opaque custom op, so `torch.compile` keeps a block in one graph.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "sdpa", "flash_attn", "flash_attn3", "flash_attn4", "sage")
_MODULES = {"flash_attn": "flash_attn.flash_attn_interface", "flash_attn3": "flash_attn_interface",
            "flash_attn4": "flash_attn.cute", "sage": "sageattention"}
_INSTALL_HINT = {
    "flash_attn": "pip install flash-attn --no-build-isolation",
    "flash_attn3": "build flash-attention's hopper/ folder (FlashAttention 3)",
    "flash_attn4": "pip install flash-attn-4",
    "sage": "pip install sageattention",
}
# `auto` on CUDA: the exact backends to try, fastest first, per compute-capability major; SDPA
# when none is installed. Not FlashAttention 2 on Hopper: SDPA's cuDNN kernel is 1.38x faster
# there (benchmarks/RESULTS.md, H100). FlashAttention 3 before 4 on Hopper is not measured (no
# FA3 wheel); 10 = data-centre Blackwell, 12 = RTX 50.
AUTO_ORDER = {8: ("flash_attn",), 9: ("flash_attn3", "flash_attn4"), 10: ("flash_attn4",), 12: ("flash_attn",)}


def _import(backend: str):
    try:
        return importlib.import_module(_MODULES[backend])
    except ImportError as err:
        raise ValueError(f"attention backend {backend!r} is selected but its module {_MODULES[backend]!r} is not "
                         f"installed ({err}); install it ({_INSTALL_HINT[backend]}) or choose 'sdpa'") from err


def _installed(module: str) -> bool:
    try:  # a dotted name imports its parent package, which may be missing or broken
        return importlib.util.find_spec(module) is not None
    except Exception:  # e.g. a flash_attn built for another torch fails in its __init__: not usable
        return False


def available_backends() -> list[str]:
    """Backends whose package is installed here (sdpa always)."""
    return ["sdpa", *(name for name, module in _MODULES.items() if _installed(module))]


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
    order = AUTO_ORDER.get(torch.cuda.get_device_capability(device)[0], ())
    return next((backend for backend in order if backend in installed), "sdpa")


def _external_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """An installed attention package's kernel on [B, L, heads, head_dim] half-precision tensors."""
    if backend == "sage":
        return _import("sage").sageattn(q, k, v, tensor_layout="NHD")
    out = _import(backend).flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # FA3/FA4 return (out, lse)


def _opaque_op():
    """`_external_attention` as the custom op torch.ops.wan22.external_attention, defined once per
    process: this file can be imported twice under two package names (ComfyUI imports the pack by
    its folder, the engine as `wan22_core`), and a second definition would break the first."""
    try:
        return torch.ops.wan22.external_attention
    except AttributeError:
        op = torch.library.custom_op("wan22::external_attention", _external_attention, mutates_args=())
        op.register_fake(lambda q, k, v, backend: q.new_empty(*q.shape[:-1], v.shape[-1]))
        return torch.ops.wan22.external_attention


external_attention = _opaque_op()


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
        return external_attention(q, k, v, self.backend).to(dtype)


def set_attention_backend(model: nn.Module, backend: str, device: torch.device | None = None) -> str:
    """Point every attention kernel in `model` (wrapped ones included) at `backend`."""
    resolved = resolve_backend(backend, device)
    for module in model.modules():
        if isinstance(module, AttentionKernel):
            module.backend = resolved
    return resolved
