"""Ulysses: one all-to-all trades "my tokens, all heads" for "my heads, the group's tokens".

Around a block's attention kernel (`sequence.SequenceParallelAttention`): q, k and v go from
[B, L/U, H, D] on each of the U ranks of a Ulysses group to [B, L, H/U, D] (scatter heads,
gather the sequence, rank order = token order), and the output goes back the same way.
Each exchange lays its result out in its spent send buffer, so besides its input only two
buffers of the message's size are alive (memory.rank_peak_bytes replays this).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def heads_to_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """q, k, v [B, L/U, H, D] -> [3, B, L, H/U, D]: this rank's heads of the group's sequence.

    One all-to-all for all three (the same bytes as three, a third of the calls). Block i of the
    send buffer (head group i) goes to rank i; block j of the receive buffer is rank j's tokens.
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
    """[B, L, H/U, D] -> [B, L/U, H, D]: the attention output back to this rank's tokens, all heads."""
    world = dist.get_world_size(group)
    b, length, heads, d = out.shape
    n = length // world
    send = out.view(b, world, n, heads, d).transpose(0, 1).contiguous()  # block i: rank i's tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    mine = send.view(b, n, world, heads, d)
    mine.copy_(recv.permute(1, 2, 0, 3, 4))  # block j: head group j
    return mine.view(b, n, world * heads, d)
