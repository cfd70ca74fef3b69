"""The process groups of one plan: Ulysses groups, rings, sequence groups, CFG pairs and the FSDP mesh
over all ranks (the plan's rank lists say which ranks form each; plan.py explains the grid)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .plan import ParallelPlan


@dataclass
class ParallelGroups:
    """This rank's groups; a dimension of size 1 has no group (None). Every rank of the run is the
    default group (`torch.distributed.group.WORLD`)."""

    plan: ParallelPlan
    rank: int
    device: torch.device
    ulysses: dist.ProcessGroup | None
    cfg: dist.ProcessGroup | None
    fsdp_mesh: object | None  # torch.distributed.device_mesh.DeviceMesh over all ranks
    ring: dist.ProcessGroup | None = None
    sequence: dist.ProcessGroup | None = None  # ulysses x ring: the ranks that share this rank's video

    @property
    def replica(self) -> int:
        """Which replica this rank belongs to (each samples its own videos)."""
        return self.plan.replica_of(self.rank)


def _member_group(all_rank_lists: list[list[int]], rank: int) -> dist.ProcessGroup:
    # Every rank must create every group, member or not, in the same order (new_group is collective).
    mine = None
    for ranks in all_rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def init_groups(plan: ParallelPlan, device: torch.device) -> ParallelGroups:
    """Create the groups `plan` needs on the already initialised default process group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != plan.world_size:
        raise ValueError(f"the plan is for {plan.world_size} ranks but the process group has {world}; "
                         f"launch {plan.world_size} processes (torchrun --nproc_per_node {plan.world_size})")
    ulysses = _member_group(plan.ulysses_groups(), rank) if plan.ulysses_enabled else None
    ring = _member_group(plan.ring_groups(), rank) if plan.ring_enabled else None
    # with one of the two, the sequence group is that one's group: no second communicator
    sequence = _member_group(plan.sequence_groups(), rank) if plan.ulysses_enabled and plan.ring_enabled else (
        ulysses or ring)
    cfg = _member_group(plan.cfg_groups(), rank) if plan.cfg_parallel_enabled else None
    fsdp_mesh = None
    if plan.fsdp:
        from torch.distributed.device_mesh import DeviceMesh

        fsdp_mesh = DeviceMesh(device.type, list(range(world)))  # the whole world: reuses the default group
    return ParallelGroups(plan=plan, rank=rank, device=device, ulysses=ulysses, cfg=cfg, fsdp_mesh=fsdp_mesh,
                          ring=ring, sequence=sequence)
