"""Ulysses: one all-to-all trades "my tokens, all heads" for "my heads, the group's tokens".

Around a block's attention kernel (`sequence.SequenceParallelAttention`): q, k and v go from
[B, L/U, H, D] on each of the U ranks of a Ulysses group to [B, L, H/U, D] (scatter heads,
gather the sequence, rank order = token order), and the output goes back the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Send chunk i of `scatter_dim` to rank i; concatenate what arrives along `gather_dim`."""
    world = dist.get_world_size(group)
    send = torch.stack(x.chunk(world, dim=scatter_dim))  # [P, ...]: block i goes to rank i
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)  # block j came from rank j


def heads_to_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L/U, H, D] each -> [B, L, H/U, D] each. One all-to-all for q, k and v together: the
    same bytes as three, a third of the calls."""
    return all_to_all(torch.stack([q, k, v]), scatter_dim=3, gather_dim=2, group=group).unbind(0)


def sequence_to_heads(out: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, L, H/U, D] -> [B, L/U, H, D]: the attention output back to this rank's tokens."""
    return all_to_all(out, scatter_dim=1, gather_dim=2, group=group)
