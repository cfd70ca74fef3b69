"""CFG-parallel: the conditional and unconditional passes run on two halves of the ranks.

The loop asks for both predictions as one batch of two (`predict_velocity(batch_cfg=True)`);
this wrapper splits that batch over the CFG pair, so each rank runs one row and a single
all-gather per step returns both. Every rank then applies the same guidance and solver step to
the same numbers, which keeps the ranks in lockstep without further communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class CfgParallel(nn.Module):
    """Runs batch row `rank in the CFG group` of a (cond, uncond) batch; gathers both rows."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.model = model
        self.group = group

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        size, index = dist.get_world_size(self.group), dist.get_rank(self.group)
        if x.shape[0] != size:  # guidance 1.0: the loop sends one row, every rank runs it
            return self.model(x, t, context)
        row = slice(index, index + 1)
        mine = self.model(x[row], t[row], context[row])  # [1, C, F, H, W]
        both = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(both, mine.contiguous(), group=self.group)
        return torch.cat(both)  # [2, C, F, H, W], row order = batch order
