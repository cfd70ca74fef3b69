"""Sequence parallelism (Ulysses x Ring) through the model's two seams.

A sequence group of ulysses x ring ranks holds one video's tokens, rank s of the group the s-th
contiguous slice (s = ring position x ulysses + Ulysses position).

- `sequence_shard` (WanModel): after embedding, pad the tokens to a multiple of the group size,
  keep this rank's slice and the matching RoPE rows (so each rank rotates with its *global*
  positions); after the head, all-gather the slices and drop the padding.
- `self_attn.kernel` (each block): Ulysses all-to-all (`ulysses.py`) inside the Ulysses group,
  so this rank holds its heads for the Ulysses group's block of tokens; then, with a ring,
  ring attention over the blocks of every ring position (`ring.py`), else the local kernel over
  the whole sequence; padded keys are left out either way. Then the all-to-all back.
  Cross-attention keeps its local kernel: the text is replicated.

Everything between the seams (norms, modulation, cross-attention, FFN, head) is per token and
runs on the local slice unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .ring import ring_attention
from .ulysses import heads_to_sequence, sequence_to_heads

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


class SequenceParallelAttention(nn.Module):
    """Wraps a block's attention kernel: Ulysses all-to-all and/or ring attention around it."""

    def __init__(self, inner: nn.Module, ulysses: dist.ProcessGroup | None, ring: dist.ProcessGroup | None,
                 layout: SequenceLayout):
        super().__init__()
        self.inner = inner
        self.ulysses = ulysses
        self.ring = ring
        self.layout = layout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.ulysses is not None:
            q, k, v = heads_to_sequence(q, k, v, self.ulysses)  # each [B, U*L/P, H/U, D]
        if self.ring is None:  # this block is the whole sequence
            n = self.layout.valid_len  # leaving the padded keys out is the official key mask
            out = self.inner(q, k[:, :n], v[:, :n])
        else:
            out = ring_attention(self.inner.forward_with_lse, q, k, v, self.ring, self.layout.valid_len)
        return out if self.ulysses is None else sequence_to_heads(out, self.ulysses)  # [B, L/P, H, D]


class ShardedSequence(nn.Module):
    """The model's `sequence_shard` over a sequence group: split after embedding, gather after the head."""

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


def apply_sequence_parallel(model: nn.Module, sequence: dist.ProcessGroup, ulysses: dist.ProcessGroup | None,
                            ring: dist.ProcessGroup | None) -> nn.Module:
    """Swap the sequence seam and every self-attention kernel of a WanModel (in place)."""
    heads = model.cfg.num_heads
    if ulysses is not None and heads % dist.get_world_size(ulysses):
        raise ValueError(f"ulysses degree {dist.get_world_size(ulysses)} does not divide the model's {heads} heads")
    layout = SequenceLayout()
    model.sequence_shard = ShardedSequence(sequence, layout)
    for block in model.blocks:
        block.self_attn.kernel = SequenceParallelAttention(block.self_attn.kernel, ulysses, ring, layout)
    return model
