"""Ring attention: this rank's queries against every ring position's keys, exact.

A ring of R ranks holds R consecutive blocks of one video's tokens. Each rank keeps its queries
and passes its K/V block to the next rank, R - 1 times, so every block visits every rank. Each
visit gives a partial result over that block's keys, with the log-sum-exp of each query's
logits; partials over disjoint key sets merge exactly (the online-softmax rule, in fp32):

    lse = log(exp(lse_a) + exp(lse_b))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

which is softmax over the union of the keys, whatever order the blocks arrive in. Attention
here is not causal, so every block counts for every query and no zig-zag reordering is needed.
The next transfer runs while the current block is computed (isend/irecv one step ahead).
Padded keys (the video's tail when its tokens do not divide by the sequence degree) are left out
of each block, as Ulysses leaves them out of the whole sequence.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

AttendWithLse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def merge_partials(out: torch.Tensor | None, lse: torch.Tensor | None, part: torch.Tensor,
                   part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running (out [B, L, H, D] fp32, lse [B, L, H, 1] fp32) merged with one more partial
    (part [B, L, H, D] in any dtype, part_lse [B, H, L] as the kernels return it)."""
    part, part_lse = part.float(), part_lse.float().transpose(1, 2).unsqueeze(-1)
    if out is None:
        return part, part_lse
    merged = torch.logaddexp(lse, part_lse)  # = max + log(exp(a - max) + exp(b - max)): never overflows
    return out * torch.exp(lse - merged) + part * torch.exp(part_lse - merged), merged


def _pass_on(current: torch.Tensor, into: torch.Tensor, group: dist.ProcessGroup, index: int, size: int) -> list:
    """Send `current` to the next ring position and receive the previous one's block `into`."""
    return dist.batch_isend_irecv([
        dist.P2POp(dist.isend, current, group=group, group_peer=(index + 1) % size),
        dist.P2POp(dist.irecv, into, group=group, group_peer=(index - 1) % size),
    ])


def valid_keys(position: int, block: int, valid_len: int) -> int:
    """How many of ring position `position`'s `block` keys are real tokens (not padding)."""
    return min(max(valid_len - position * block, 0), block)


def ring_attention(attend: AttendWithLse, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   group: dist.ProcessGroup, valid_len: int) -> torch.Tensor:
    """Attention of this rank's q [B, Lb, H, D] over the K/V blocks [B, Lb, H, D] of every rank
    of `group` (block i = tokens [i * Lb, (i + 1) * Lb) of the sequence, the first `valid_len`
    of which are real). `attend` returns (out, lse) for one block (AttentionKernel.forward_with_lse).
    """
    size, index, block = dist.get_world_size(group), dist.get_rank(group), k.shape[1]
    current = torch.stack([k, v])  # [2, B, Lb, H, D]: K and V travel as one message
    spare = torch.empty_like(current)  # receives the next block while `current` is read
    out = lse = None
    for step in range(size):
        transfers = _pass_on(current, spare, group, index, size) if step + 1 < size else []
        keys = valid_keys((index - step) % size, block, valid_len)  # block `current` came from there
        if keys:  # a block of padding only adds nothing (the last positions of a short video)
            out, lse = merge_partials(out, lse, *attend(q, current[0, :, :keys], current[1, :, :keys]))
        for transfer in transfers:
            transfer.wait()
        current, spare = spare, current  # the block just sent is free to receive the next one
    return out.to(q.dtype)
