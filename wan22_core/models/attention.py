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
- `sage`: SageAttention, *not* exact (quantized), never picked by `auto`. On Blackwell, SageAttention 3
  (`sageattn3`, FP4 microscaling; built from the repository's sageattention3_blackwell/ folder) when
  it is there; otherwise SageAttention 2.x (`sageattention`), whose `sageattn` picks the kernel for
  the GPU: INT8 QK^T with FP8 PV on Ada, Hopper and RTX 50, FP16 PV on Ampere. 1.x is refused.
`auto` picks the fastest exact backend that is installed, by GPU generation (`AUTO_ORDER`).
The non-SDPA kernels run as one opaque custom op, so `torch.compile` keeps a block in one graph.

`AttentionKernel.forward_with_lse` also returns each query's log-sum-exp, which ring attention
(`wan22_core.parallel.ring`) needs to merge partial results over key blocks: on the CPU torch's
flash kernel for CPU, on CUDA SDPA's flash (fp16/bf16) or memory-efficient (fp32) kernel, or the
selected flash-attention package's own (FA2/FA3 `return_attn_probs`, FA4 `return_lse`).
SageAttention returns none; the parallel plan refuses it with a ring.
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
    "sage": "pip install sageattention==2.2.0 --no-build-isolation",
}
INEXACT_BACKENDS = frozenset({"sage"})  # a NaN/Inf with these is more likely the kernel than the weights
SAGE3_MODULE = "sageattn3"  # SageAttention 3: `sageattn3_blackwell(q, k, v)`, [B, heads, L, head_dim] only
BLACKWELL_MAJORS = (10, 12)  # compute capability: data-centre Blackwell (B200), RTX 50
SAGE2_ONLY = "sageattn_qk_int8_pv_fp8_cuda"  # exported by sageattention 2.x, not by the Triton-only 1.x
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
    return ["sdpa", *(name for name, module in _MODULES.items()
                      if _installed(module) or (name == "sage" and _installed(SAGE3_MODULE)))]


def sage_kernel(device: torch.device) -> str:
    """The package `sage` runs on `device`: SageAttention 3 on Blackwell when installed, else 2.x."""
    blackwell = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in BLACKWELL_MAJORS
    return SAGE3_MODULE if blackwell and _installed(SAGE3_MODULE) else _MODULES["sage"]


def _import_sage3():
    try:
        return importlib.import_module(SAGE3_MODULE)
    except ImportError as err:  # found but its CUDA extensions (fp4attn_cuda, fp4quant_cuda) do not load
        raise ValueError(f"attention backend 'sage' would run SageAttention 3, but {SAGE3_MODULE!r} does not import "
                         f"({err}); rebuild it (SageAttention's sageattention3_blackwell/ folder: python setup.py "
                         "install) or choose 'sdpa'") from err


def _check_sage(device: torch.device | None) -> None:
    """SageAttention 3 for a Blackwell `device` (or for any, before the device is known), else 2.x."""
    if _installed(SAGE3_MODULE) and (device is None or sage_kernel(device) == SAGE3_MODULE):
        _import_sage3()
        return
    if not hasattr(_import("sage"), SAGE2_ONLY):
        raise ValueError("attention backend 'sage' needs SageAttention 2.x (or 3 on Blackwell), but the installed "
                         f"sageattention is 1.x; install 2.x ({_INSTALL_HINT['sage']}) or choose 'sdpa'")


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """`auto` -> the fastest installed exact backend for `device`; other names are checked."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "sage":
        _check_sage(device)
    elif name not in ("auto", "sdpa"):
        _import(name)
    if name != "auto":
        return name
    if device is None or device.type != "cuda":
        return "sdpa"
    installed = available_backends()
    order = AUTO_ORDER.get(torch.cuda.get_device_capability(device)[0], ())
    return next((backend for backend in order if backend in installed), "sdpa")


def _external_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """An installed attention package's kernel on [B, L, heads, head_dim] half-precision tensors."""
    if backend == "sage":
        return _sage_attention(q, k, v)
    out = _import(backend).flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # FA3/FA4 return (out, lse)


def _external_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`_external_attention` plus the log-sum-exp [B, heads, Lq] fp32 of each query's scaled logits."""
    if backend == "sage":
        raise ValueError("attention backend 'sage' returns no log-sum-exp, which ring attention needs; "
                         "choose another backend or ring degree 1")
    if backend == "flash_attn4":
        out, lse = _import(backend).flash_attn_func(q, k, v, return_lse=True)
    else:  # FlashAttention 2 returns (out, lse, probabilities), 3 (out, lse)
        out, lse = _import(backend).flash_attn_func(q, k, v, return_attn_probs=True)[:2]
    return out, lse


def _sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if sage_kernel(q.device) == SAGE3_MODULE:
        # it takes [B, heads, L, head_dim] only and subtracts the key mean in place: k goes as a copy
        out = _import_sage3().sageattn3_blackwell(
            q.transpose(1, 2), k.transpose(1, 2).clone(), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous()  # the layout the op's fake promises
    return _import("sage").sageattn(q, k, v, tensor_layout="NHD")


def _opaque_op(name: str, kernel, fake):
    """`kernel` as the custom op torch.ops.wan22.<name>, defined once per process: this file can
    be imported twice under two package names (ComfyUI imports the pack by its folder, the engine
    as `wan22_core`), and a second definition would break the first."""
    try:
        return getattr(torch.ops.wan22, name)
    except AttributeError:
        op = torch.library.custom_op(f"wan22::{name}", kernel, mutates_args=())
        op.register_fake(fake)
        return getattr(torch.ops.wan22, name)


external_attention = _opaque_op("external_attention", _external_attention,
                                lambda q, k, v, backend: q.new_empty(*q.shape[:-1], v.shape[-1]))
external_attention_lse = _opaque_op(
    "external_attention_lse", _external_attention_lse,
    lambda q, k, v, backend: (q.new_empty(*q.shape[:-1], v.shape[-1]),
                              q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)))


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's own kernels on [B, L, heads, head_dim], with the log-sum-exp [B, heads, Lq] fp32.

    The public SDPA drops the log-sum-exp, so this calls the kernels it dispatches to: flash
    for CPU (any float dtype); on CUDA flash for fp16/bf16 on Ampere and Hopper (the GPUs torch's
    FlashAttention-2 build is documented for), memory-efficient otherwise (its log-sum-exp is
    padded to a multiple of 32 queries). Not run on a GPU here yet (no CUDA machine in CI).
    """
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, head_dim] views
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
    elif (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
          and torch.cuda.get_device_capability(q.device)[0] in (8, 9)):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        lse = lse[..., :q.shape[1]]
    return out.transpose(1, 2), lse


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

    def forward_with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` without bias, plus the log-sum-exp [B, H, Lq] fp32 of each query's scaled logits.

        Two results over disjoint key sets merge into the result over both (ring attention).
        """
        if self.backend == "sdpa" or q.device.type != "cuda":
            return sdpa_with_lse(q, k, v)
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # flash kernels take half precision only
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        out, lse = external_attention_lse(q, k, v, self.backend)
        return out.to(dtype), lse


def inexact_backend(model: nn.Module) -> str | None:
    """The inexact backend (`INEXACT_BACKENDS`) `model`'s attention runs, if any: for error messages."""
    return next((m.backend for m in model.modules()
                 if isinstance(m, AttentionKernel) and m.backend in INEXACT_BACKENDS), None)


def set_attention_backend(model: nn.Module, backend: str, device: torch.device | None = None) -> str:
    """Point every attention kernel in `model` (wrapped ones included) at `backend`."""
    resolved = resolve_backend(backend, device)
    for module in model.modules():
        if isinstance(module, AttentionKernel):
            module.backend = resolved
    return resolved
