"""fp8 weight storage for the DiT's block Linears (ComfyUI's "fp8_scaled" convention).

A scaled-fp8 checkpoint stores each quantised Linear as a float8_e4m3fn `weight` plus a scalar
fp32 `scale_weight` (the real weight is `weight * scale_weight`), optionally a `scale_input`
calibrated for the activations, and marks the file with a root `scaled_fp8` tensor. Comfy-Org's
Wan files quantise only the Linears inside `blocks.*`; embeddings, time layers and the head stay
in 16 bits, so we swap exactly those modules and leave the transformer code untouched.

The weights stay fp8 in memory (half the bytes of bf16). Each forward dequantises one layer at
a time, so the whole bf16 model never exists. On CUDA GPUs with fp8 tensor cores (compute
capability 8.9+: Ada, Hopper) the matmul itself can run in fp8 through `torch._scaled_mm`,
with the activations quantised per tensor on the fly; that is faster but adds activation
rounding, so it can be switched off per model (`set_fp8_compute(model, "dequant")`).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .quant import GGUFLinear
from .quant.swap import replace_linears

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: the largest finite e4m3fn value
COMPUTE_MODES = ("auto", "dequant", "scaled_mm")
_CHUNK = 1 << 22  # elements quantised at a time: bounds the fp32 temporaries to 16 MB per tensor


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale that maps `amax` (fp32: the largest |value|) to 448, the largest e4m3fn value."""
    return torch.clamp(amax / FP8_MAX, min=torch.finfo(torch.float32).tiny)  # all-zero tensor: any scale


def to_fp8(values: torch.Tensor, scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """values / scale on the e4m3fn grid, clipped to +-448 (e4m3fn has no inf: casting a value
    past 464 may give NaN). The division runs in `values`' dtype; `inplace` divides `values` itself."""
    scale = scale.to(values.dtype)
    return (values.div_(scale) if inplace else values / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8(weight: torch.Tensor, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8: (fp8 weight, fp32 scalar scale) with weight ~= fp8 * scale.

    The scale maps the largest |w| to 448 (what Comfy-Org's files hold). The division runs in
    fp32 in chunks through `work` (fp32, any size; pass one buffer when quantising many
    tensors): a fresh temporary per tensor fragments the heap (+50% peak RSS, measured).
    """
    if weight.numel() == 0:
        return torch.empty(weight.shape, dtype=FP8, device=weight.device), torch.ones((), device=weight.device)
    low, high = torch.aminmax(weight)
    scale = fp8_scale(torch.maximum(-low, high).float())
    if work is None:
        work = torch.empty(min(_CHUNK, weight.numel()), dtype=torch.float32, device=weight.device)
    out = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    for src, dst in zip(weight.reshape(-1).split(work.numel()), out.view(-1).split(work.numel())):
        chunk = work[:src.numel()]
        # |w| <= amax, so |w / scale| <= 448 up to one rounding; no clamp needed (e4m3fn has no inf:
        # a cast above 464 would give NaN, but values up to 464 round to 448)
        if src.dtype == torch.float32:  # one pass fewer; a 16-bit source must be widened first
            torch.div(src, scale, out=chunk)
        else:
            chunk.copy_(src).div_(scale)
        dst.copy_(chunk)
    return out, scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight * scale in `dtype`: fp8 -> dtype is exact, the multiply rounds once.

    FP8Linear does exactly this per forward, so dequantising at load gives the same numbers.
    """
    return weight.to(dtype).mul_(scale.to(dtype))


@lru_cache(maxsize=None)
def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """A Linear whose weight is stored as scaled fp8; drop-in for `nn.Linear` in the blocks.

    State-dict names are ComfyUI's: `weight` (fp8), `bias`, `scale_weight` and, when the file
    has one, `scale_input`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale_input: bool = False,
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("scale_input",
                             torch.ones((), dtype=torch.float32, device=device) if scale_input else None)
        self.compute = "auto"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.compute}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_scaled_mm(x):
            return self._fp8_matmul(x)
        weight = dequantize_fp8(self.weight, self.scale_weight, x.dtype)  # just this layer, freed after
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        if self.compute == "dequant":
            return False
        if self.compute == "scaled_mm":
            return True
        return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and self.in_features % 16 == 0 and self.out_features % 16 == 0  # _scaled_mm's layout rule
                and _has_fp8_tensor_cores(x.device))

    def _fp8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] with both operands in fp8 (per-tensor activation scale)."""
        rows = x.reshape(-1, self.in_features)  # [N, in]
        if self.scale_input is not None:
            scale_in = self.scale_input.float()  # calibrated in the file: clip to it, as ComfyUI does
        else:
            scale_in = fp8_scale(rows.abs().max().float())
        rows8 = to_fp8(rows, scale_in)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch._scaled_mm(rows8, self.weight.t(), scale_a=scale_in, scale_b=self.scale_weight.float(),
                               bias=bias, out_dtype=x.dtype)  # weight.t(): column-major, as required
        return out.reshape(*x.shape[:-1], self.out_features)


def block_linears(model: nn.Module, under: str = "blocks.") -> dict[str, nn.Module]:
    """{qualified name: layer} for the Linears inside `under` (`nn.Linear`, or `FP8Linear` /
    `GGUFLinear` once swapped): the ones Comfy-Org's files store as fp8 and GGUF files quantise
    (a DiT's `blocks.`, UMT5's `encoder.block.`), and the ones a DiT's blocks call through `forward`."""
    return {name: module for name, module in model.named_modules()
            if name.startswith(under) and isinstance(module, (nn.Linear, FP8Linear, GGUFLinear))}


def block_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the Linears inside `blocks.*` (see `block_linears`)."""
    return list(block_linears(model))


def swap_to_fp8(model: nn.Module, names: list[str], with_scale_input: set[str] = frozenset(),
                bias_dtype: torch.dtype = torch.bfloat16) -> None:
    """Replace the named `nn.Linear`s by empty `FP8Linear`s on the same device (meta before loading)."""
    replace_linears(model, names, lambda name, linear: FP8Linear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, scale_input=name in with_scale_input,
        device=linear.weight.device, bias_dtype=bias_dtype), holds="fp8")


def quantize_block_linears(model: nn.Module) -> None:
    """Hold `model`'s block Linears as scaled fp8 in place, each weight quantised per tensor: the
    model a scaled-fp8 checkpoint (Comfy-Org's fp8_scaled files) loads as. Biases keep their values."""
    dense = block_linears(model)
    swap_to_fp8(model, list(dense))
    for name, linear in dense.items():
        layer = model.get_submodule(name)
        layer.weight.data, scale = quantize_fp8(linear.weight.data)
        layer.scale_weight.copy_(scale)
        layer.bias.data.copy_(linear.bias.data)


def set_fp8_compute(model: nn.Module, mode: str) -> int:
    """Choose how every FP8Linear in `model` multiplies; returns how many there are.

    "auto": `torch._scaled_mm` on CUDA with compute capability 8.9+ and a bf16/fp16 input,
    otherwise dequantise. "dequant": always dequantise the weight to the input's dtype (no
    activation rounding). "scaled_mm": always `torch._scaled_mm` (CPU too, for testing).
    """
    if mode not in COMPUTE_MODES:
        raise ValueError(f"fp8 compute mode must be one of {', '.join(COMPUTE_MODES)}; got {mode!r}")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.compute = mode
    return len(layers)
