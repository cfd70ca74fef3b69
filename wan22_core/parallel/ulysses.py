"""Ulysses sequence parallelism through the model's two seams.

- `sequence_shard` (WanModel): after embedding, pad the tokens to a multiple of P, keep this
  rank's contiguous slice and the matching RoPE rows (so each rank rotates with its *global*
  positions); after the head, all-gather the slices and drop the padding.
- `self_attn.kernel` (each block): all-to-all q, k, v from [B, L/P, H, D] to [B, L, H/P, D]
  (scatter heads, gather sequence), attend over the whole sequence with the padded keys left
  out, all-to-all back. Cross-attention keeps its local kernel: the text is replicated.

Everything between the seams (norms, modulation, cross-attention, FFN, head) is per token and
runs on the local slice unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Rope = torch.Tensor  # [L, 1, head_dim/2] complex rotations (models/transformer.py)


class SequenceLayout:
    """What the last split did, shared by the shard module and the attention wrappers of one model."""

    def __init__(self):
        self.valid_len = 0  # unpadded global token count of the current forward


def shard_tokens(tokens: torch.Tensor, rope: Rope, index: int, degree: int) -> tuple[torch.Tensor, Rope]:
    """Rank `index`'s slice of tokens [B, L, dim] and RoPE rotations [L, 1, D/2], padded to P*ceil(L/P).

    Pad tokens are zeros and get the identity rotation (1 + 0i), as the official code pads its
    frequencies with ones; their keys are never attended to, their outputs are dropped.
    """
    length = tokens.shape[1]
    per_rank = math.ceil(length / degree)
    pad = per_rank * degree - length
    tokens = F.pad(tokens, (0, 0, 0, pad))  # [B, P*ceil(L/P), dim]
    rope = torch.cat([rope, rope.new_ones(pad, *rope.shape[1:])])
    rows = slice(index * per_rank, (index + 1) * per_rank)
    return tokens[:, rows], rope[rows]


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Send chunk i of `scatter_dim` to rank i; concatenate what arrives along `gather_dim`."""
    world = dist.get_world_size(group)
    send = torch.stack(x.chunk(world, dim=scatter_dim))  # [P, ...]: block i goes to rank i
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)  # block j came from rank j


class UlyssesAttention(nn.Module):
    """Wraps a block's attention kernel: heads <-> sequence all-to-all around the local kernel."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup, layout: SequenceLayout):
        super().__init__()
        self.inner = inner
        self.group = group
        self.layout = layout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # One all-to-all for q, k and v together: same bytes as three, a third of the calls.
        qkv = all_to_all(torch.stack([q, k, v]), scatter_dim=3, gather_dim=2, group=self.group)
        q, k, v = qkv.unbind(0)  # each [B, P*L/P, H/P, D]
        n = self.layout.valid_len  # leaving the padded keys out is the official key mask
        out = self.inner(q, k[:, :n], v[:, :n])
        return all_to_all(out, scatter_dim=1, gather_dim=2, group=self.group)  # [B, L/P, H, D]


class UlyssesShard(nn.Module):
    """The model's `sequence_shard` under Ulysses: split after embedding, gather after the head."""

    def __init__(self, group: dist.ProcessGroup, layout: SequenceLayout):
        super().__init__()
        self.group = group
        self.layout = layout

    def split(self, tokens: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, Rope]:
        self.layout.valid_len = tokens.shape[1]
        return shard_tokens(tokens, rope, dist.get_rank(self.group), dist.get_world_size(self.group))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :self.layout.valid_len]  # [B, L, C], padding dropped


def apply_ulysses(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Swap the sequence seam and every self-attention kernel of a WanModel (in place)."""
    heads = model.cfg.num_heads
    degree = dist.get_world_size(group)
    if heads % degree:
        raise ValueError(f"ulysses degree {degree} does not divide the model's {heads} heads")
    layout = SequenceLayout()
    model.sequence_shard = UlyssesShard(group, layout)
    for block in model.blocks:
        block.self_attn.kernel = UlyssesAttention(block.self_attn.kernel, group, layout)
    return model
