"""The Wan2.2 A14B expert: a diffusion transformer over video latents (official `WanModel`, t2v).

Reading order: norms, RoPE, attention, block, head, model. Module names are the official
parameter names (`blocks.N.self_attn.q`, `blocks.N.modulation`, `head.modulation`,
`time_projection.1`, ...), so official and ComfyUI checkpoints load without renaming.

Precision follows the official code: the residual stream, modulation, time embedding and head
run in fp32; every other matmul runs in the compute dtype (the dtype of the weights, bf16 on
GPU). Two deliberate departures, both exact up to rounding:
- For text-to-video the timestep is the same for every token, so the modulation is computed once
  per sample ([B, 6, dim]) instead of per token (the official [B, L, 6, dim] fp32 tensor is
  9.3 GB at 720p).
- RoPE angles are built in float64 once per grid shape and kept as a complex64 table; the
  rotation is one fp32 complex multiply (the official code makes float64 copies of q and k).

No torch.distributed here: sequence parallelism replaces `self_attn.kernel` (attention seam) and
`sequence_shard` (token split/gather) from outside, in `wan22_core.parallel`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DiTConfig
from .attention import AttentionKernel


# ---------------------------------------------------------------------------------------------
# 1. Norms and fp32 helpers


class RMSNorm(nn.Module):
    """RMS norm over the last dim, statistics in fp32 (official WanRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (official WanLayerNorm); output stays fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Run a Linear in fp32 whatever its storage dtype (the official code's fp32 autocast islands)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Official `sinusoidal_embedding_1d`: [B] -> [B, dim], cos first, angles in float64."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


# ---------------------------------------------------------------------------------------------
# 2. 3-axis rotary position embedding


class RotaryEmbedding(nn.Module):
    """Per-token rotation angles for a (frames, height, width) token grid.

    The head dim is split into frame/height/width parts: d - 4*(d//6), 2*(d//6), 2*(d//6)
    (44/42/42 for d=128). Each axis uses theta=10000 with *its own* dim in the exponent, and
    rotates interleaved pairs (x[2j], x[2j+1]), as the official complex-number code does.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        hw = 2 * (head_dim // 6)
        self.axis_dims = (head_dim - 2 * hw, hw, hw)
        self.max_positions = max_positions
        self.theta = theta
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def angles(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """[f*h*w, head_dim/2] float64 angles, token order frame-major then h then w."""
        per_axis = []
        for n, dim in zip(grid, self.axis_dims):
            inv_freq = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            per_axis.append(torch.outer(torch.arange(n, dtype=torch.float64), inv_freq))
        f, h, w = grid
        return torch.cat([
            per_axis[0][:, None, None, :].expand(f, h, w, -1),
            per_axis[1][None, :, None, :].expand(f, h, w, -1),
            per_axis[2][None, None, :, :].expand(f, h, w, -1),
        ], dim=-1).reshape(f * h * w, -1)

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Unit complex rotations e^(i*angle) [L, 1, head_dim/2] complex64, cached per grid and device."""
        if max(grid) > self.max_positions:
            raise ValueError(
                f"token grid {tuple(grid)} exceeds the {self.max_positions} RoPE positions per axis "
                f"(latent frames, height/16, width/16); use fewer frames or a smaller size")
        key = (tuple(grid), str(device))
        if key not in self._tables:
            if len(self._tables) >= 4:  # a handful of shapes per session; keep memory bounded
                self._tables.pop(next(iter(self._tables)))
            a = self.angles(grid)
            self._tables[key] = torch.polar(torch.ones_like(a), a).to(torch.complex64)[:, None].to(device)
        return self._tables[key]


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, L, H, D] by rope [L, 1, D/2]; fp32 math.

    One complex multiply: (x1 + i x2)(cos + i sin) = (x1 cos - x2 sin) + i (x1 sin + x2 cos).
    """
    if torch.compiler.is_compiling():  # inductor cannot generate complex code; the real form fuses
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rope.real, rope.imag
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, H, D/2] complex64
    return torch.view_as_real(pairs * rope).flatten(-2)


# ---------------------------------------------------------------------------------------------
# 3. Attention


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.head_dim = dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)  # over the full dim, before the split into heads
        self.norm_k = RMSNorm(dim, eps)
        self.kernel = AttentionKernel()  # the seam Ulysses wraps

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # -1 for heads: read shapes from tensors, never from config (parallel code may reshape).
        # One statement per tensor, so the fp32 RoPE temporaries of q are freed before k's exist.
        q = apply_rope(self.norm_q(self.q(x)).view(b, n, -1, self.head_dim), rope).type_as(x)  # [B, L, H, D]
        k = apply_rope(self.norm_k(self.k(x)).view(b, n, -1, self.head_dim), rope).type_as(x)
        v = self.v(x).view(b, n, -1, self.head_dim)
        return self.o(self.kernel(q, k, v).flatten(2))  # [B, L, dim]


class CrossAttention(SelfAttention):
    """Tokens attend to all 512 text slots, zero-padded ones included (official: no mask).

    The padded slots are identical keys and values, so `embed_text` keeps one of them and
    `pad_bias` adds log(count) to its logit: exp(s + log n) = n * exp(s), the same softmax as n
    copies. Cross-attention then costs the real text length + 1 keys instead of 512.
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor, pad_bias: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, -1, self.head_dim)  # [B, L, H, D]
        k = self.norm_k(self.k(context)).view(b, context.shape[1], -1, self.head_dim)  # [B, Lc, H, D]
        v = self.v(context).view(b, context.shape[1], -1, self.head_dim)
        return self.o(self.kernel(q, k, v, pad_bias).flatten(2))


# ---------------------------------------------------------------------------------------------
# 4. Transformer block


class FeedForward(nn.Sequential):
    """ffn.0 -> GELU (tanh approximation, official) -> ffn.2, with the official module names.

    Without autograd the GELU overwrites ffn.0's output, a temporary of this call, so one
    [B, L, ffn_dim] tensor is alive at the FFN's peak instead of two (4.2 GB less at 720p).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self[0](x)
        if torch.is_grad_enabled():  # backward needs the GELU's input
            return self[2](self[1](hidden))
        return self[2](torch.ops.aten.gelu_(hidden, approximate="tanh"))


class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)  # cross-attn norm
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e0, context, rope, pad_bias=None):
        """x [B, L, dim] fp32 residual stream; e0 [B, 6, dim] fp32; context [B, Lc, dim] and
        pad_bias [Lc] from `WanModel.embed_text`; rope [L, 1, D/2] from `RotaryEmbedding`."""
        dtype = context.dtype  # the compute dtype; the residual stream stays fp32
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            (self.modulation.float() + e0).unsqueeze(2).unbind(1))  # 6 x [B, 1, dim]

        # The fp32 modulated input is never bound to a name: only its compute-dtype copy lives
        # through the attention / FFN call (4 bytes per element less at the peak).
        # addcmul(a, b, c) = a + b * c in one pass: the modulation and the gated residual add.
        # self-attention, adaLN-modulated and gated
        x = torch.addcmul(x, self.self_attn(torch.addcmul(shift_sa, self.norm1(x), 1 + scale_sa).to(dtype), rope),
                          gate_sa)
        # cross-attention to the text, no modulation
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, pad_bias)
        # feed-forward, adaLN-modulated and gated
        return torch.addcmul(x, self.ffn(torch.addcmul(shift_ff, self.norm2(x), 1 + scale_ff).to(dtype)), gate_ff)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] fp32, e [B, dim] (time_embedding output, not e0) -> [B, L, p*out] fp32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).unsqueeze(2).unbind(1)
        return linear_fp32(self.head, self.norm(x) * (1 + scale) + shift)  # official: head in fp32


class SequenceShard(nn.Module):
    """Where the token axis may be split across ranks (identity here).

    `wan22_core.parallel` swaps this for a sequence-parallel version that pads and splits the
    tokens and the RoPE tables after embedding and gathers them before unpatchify.
    """

    def split(self, x, rope):
        return x, rope

    def gather(self, x):
        return x


# ---------------------------------------------------------------------------------------------
# 5. The model


class WanModel(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_max_positions)
        self.sequence_shard = SequenceShard()

    @property
    def dtype(self) -> torch.dtype:
        return self.text_embedding[0].weight.dtype

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] timesteps -> e [B, dim] and e0 [B, 6, dim], both fp32 (one per sample, not per token)."""
        e = sinusoidal_embedding(t, self.cfg.freq_dim)
        e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], e)))
        e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, -1))
        return e, e0

    def embed_text(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, Lc <= 512, text_dim] -> ([B, Lc + 1, dim], pad_bias [Lc + 1]).

        Official: zero-pad to 512 slots *before* the MLP and attend to all of them. The 512 - Lc
        padded slots embed to the same vector, so one slot stands for all of them with a
        log(512 - Lc) logit bias (see CrossAttention). With Lc == 512 nothing is added.
        """
        text_len, n = self.cfg.text_len, context.shape[1]
        if n > text_len:
            raise ValueError(f"context has {n} tokens; at most {text_len} are supported")
        if n == text_len:
            return self.text_embedding(context.to(self.dtype)), None
        context = self.text_embedding(F.pad(context.to(self.dtype), (0, 0, 0, 1)))
        pad_bias = torch.zeros(n + 1, device=context.device, dtype=context.dtype)
        pad_bias[-1] = math.log(text_len - n)
        return context, pad_bias

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pt*ph*pw*C] -> [B, C, f*pt, h*ph, w*pw]; channels innermost in each patch."""
        (pt, ph, pw), (f, h, w) = self.cfg.patch_size, grid
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Velocity prediction.

        x: [B, in_dim, F, H, W] latents; t: [B] timesteps (0..1000); context: [B, Lc, text_dim]
        text embeddings (Lc <= 512, zero-padded). Returns [B, out_dim, F, H, W] fp32.
        """
        # 1. Patch, time, text and position embeddings
        tokens = self.patch_embedding(x.to(self.dtype))  # [B, dim, f, h, w]
        grid = tuple(tokens.shape[2:])
        e, e0 = self.embed_time(t)
        context, pad_bias = self.embed_text(context)
        rope = self.rope(grid, x.device)

        # 2. Blocks (on this rank's share of the tokens under sequence parallelism). The share is
        # taken in the compute dtype, so a rank never holds the whole video's fp32 stream; the
        # [B, L, dim] fp32 residual stream is then made contiguous once (a transposed stream
        # would make every LayerNorm copy it and every elementwise op mix layouts).
        tokens, rope = self.sequence_shard.split(tokens.flatten(2).transpose(1, 2), rope)
        tokens = tokens.float().contiguous()
        for block in self.blocks:
            tokens = block(tokens, e0, context, rope, pad_bias)

        # 3. Output norm, projection and unpatchify
        tokens = self.sequence_shard.gather(self.head(tokens, e))
        return self.unpatchify(tokens, grid)
