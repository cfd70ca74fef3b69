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
    per_rank = math.ceil(tokens.shape[1] / degree)
    rows = slice(index * per_rank, (index + 1) * per_rank)
    # Slice, then pad just this slice into a fresh tensor: no padded copy of the whole sequence,
    # and nothing here keeps the caller's full [B, L, dim] stream alive (it is freed as soon as
    # the caller rebinds it, before the first block; memory.rank_peak_bytes counts it so).
    mine, mine_rope = tokens[:, rows], rope[rows]
    pad = per_rank - mine.shape[1]
    return (torch.cat([mine, mine.new_zeros(mine.shape[0], pad, mine.shape[2])], dim=1),  # [B, ceil(L/P), dim]
            torch.cat([mine_rope, mine_rope.new_ones(pad, *mine_rope.shape[1:])]))


def heads_to_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """q, k, v [B, L/P, H, D] -> [3, B, L, H/P, D]: this rank's heads of the whole sequence.

    One all-to-all for all three (the same bytes as three, a third of the calls). Block i of the
    send buffer (head group i) goes to rank i; block j of the receive buffer is rank j's tokens.
    Besides q, k and v (held by the caller) two 3 x q buffers are alive: the result is laid out
    in the spent send buffer (memory.rank_peak_bytes replays this).
    """
    world = dist.get_world_size(group)
    b, n, h, d = q.shape
    send = q.new_empty(world, 3, b, n, h // world, d)
    for i, t in enumerate((q, k, v)):
        send[:, i].copy_(t.view(b, n, world, h // world, d).permute(2, 0, 1, 3, 4))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    qkv = send.view(3, b, world, n, h // world, d)
    qkv.copy_(recv.permute(1, 2, 0, 3, 4, 5))
    return qkv.view(3, b, world * n, h // world, d)


def sequence_to_heads(out: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, L, H/P, D] -> [B, L/P, H, D]: the attention output back to this rank's tokens, all heads
    (laid out in the spent send buffer, as `heads_to_sequence`)."""
    world = dist.get_world_size(group)
    b, length, heads, d = out.shape
    n = length // world
    send = out.view(b, world, n, heads, d).transpose(0, 1).contiguous()  # block i: rank i's tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    mine = send.view(b, n, world, heads, d)
    mine.copy_(recv.permute(1, 2, 0, 3, 4))  # block j: head group j
    return mine.view(b, n, world * heads, d)


class UlyssesAttention(nn.Module):
    """Wraps a block's attention kernel: heads <-> sequence all-to-all around the local kernel."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup, layout: SequenceLayout):
        super().__init__()
        self.inner = inner
        self.group = group
        self.layout = layout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = heads_to_sequence(q, k, v, self.group).unbind(0)  # each [B, P*L/P, H/P, D]
        n = self.layout.valid_len  # leaving the padded keys out is the official key mask
        out = self.inner(q, k[:, :n], v[:, :n])
        del q, k, v  # the whole sequence's q, k, v: gone before the exchange back
        return sequence_to_heads(out, self.group)  # [B, L/P, H, D]


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
