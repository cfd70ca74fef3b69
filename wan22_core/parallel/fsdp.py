"""FSDP2 weight sharding for the experts: `fully_shard` per block, then the head, then the root.

Each rank stores 1/P of every parameter (rows of dim 0) as the one process holds it: 16/32-bit
parameters in the compute dtype, quantised Linears (`quant.QuantizedLinear`: fp8, GGUF) as
uint8 bytes by rows with their per-tensor scales replicated as buffers. So the gathered weights
are exactly what a single GPU would hold and the numerics match a one-GPU run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..placement import ExpertPair
from ..sampling.moe import HIGH, LOW


def mixed_precision() -> MixedPrecisionPolicy:
    """The one policy every FSDP unit uses: gather what is stored, cast nothing.

    No param_dtype: parameters are stored in the compute dtype already, except quantised
    Linears' rows, and those must arrive as stored. They are uint8 (torch 2.13 leaves
    non-float parameters uncast under any param_dtype; an fp8-typed parameter would be cast to
    it as numbers, without its scale). A unit with mixed dtypes is gathered as one uint8 buffer
    and each parameter handed back in its own dtype, so fp8 rows travel as bytes. Forward inputs are not
    cast: blocks take the fp32 residual stream and fp32 modulation on purpose (casting them to
    bf16, FSDP's default, would change the numerics against a single GPU).
    """
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)


def apply_fsdp(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard a WanModel over `mesh` (in place): one unit per block, the head, and the root.

    Per-block units bound the gathered memory to about one block at a time. The head is tiny
    (dim x 64) and runs once per forward at the very end, so it stays gathered and saves an
    all-gather per forward. The root unit holds the embeddings and the time projection.
    """
    policy = mixed_precision()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model.head, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    # Explicit bool on the root: left at None, FSDP2 keeps the root gathered after forward
    # (training wants it for backward at once), which inference never needs.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    prefetch_next_blocks(model)
    return model


def prefetch_next_blocks(model: nn.Module) -> None:
    """Issue each block's all-gather when the unit before it starts, not when the block itself does.

    Left alone, FSDP2 issues a unit's all-gather in that unit's own pre-forward: it overlaps the
    previous block only while the CPU runs ahead of the GPU, so anything that makes the CPU wait
    (a host sync, a CPU collective such as gloo's) issues it late. Explicitly, the root starts
    block 0's gather before the embeddings and block i starts block i + 1's: at most two blocks
    are gathered at once, as with the implicit prefetch.
    """
    blocks = list(model.blocks)
    model.set_modules_to_forward_prefetch(blocks[:1])
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])


class ShardedExperts:
    """Both experts stay sharded on this rank's device for the whole run: a switch moves nothing.

    With reshard_after_forward=False an expert keeps its gathered weights once it has run; at
    the switch they are released, so at most one expert is ever held in full. The sampling loop
    takes it as it takes a one-process `ExpertPair` (`pipeline.Experts`).
    """

    def __init__(self, high: nn.Module, low: nn.Module, device: torch.device, replicas: int = 1):
        self.experts = {HIGH: high, LOW: low}
        self.device = torch.device(device)
        self.active: str | None = None
        self.replicas = replicas  # replicas sample other videos but share every all-gather

    def agree_to_reuse(self, reuse: bool) -> bool:
        """The step cache's vote over all ranks: a step is reused only if every replica reuses it,
        since a replica that skipped its forward would leave the others in an all-gather."""
        if self.replicas == 1:
            return reuse  # every rank decided alike from the same values
        flag = torch.tensor([int(reuse)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def get(self, name: str) -> nn.Module:
        if self.active is not None and name != self.active:
            reshard_all(self.experts[self.active])
        self.active = name
        return self.experts[name]


def forget_forward_records(experts: ShardedExperts | ExpertPair) -> None:
    """Clear what FSDP2 records per forward; call after each job (the worker does).

    FSDP2 appends every forward to the root's `post_forward_order` (and each unit's
    `_post_forward_indices`) for the backward pass to use and clears them only after a
    backward, which inference never runs: a rank would grow by ~80 KiB per 40-step A14B prompt.
    The reset also reshards, so an expert kept gathered is released between jobs.
    """
    sharded = [root for root in map(fsdp_root, experts.experts.values()) if root is not None]
    for expert in sharded:
        if expert._get_fsdp_state()._is_root is None:  # never ran a forward (e.g. a job on one expert only):
            continue  # nothing recorded, and reset_iter_state would fail on its uninitialised state
        if hasattr(expert, "reset_iter_state"):  # torch >= 2.12
            expert.reset_iter_state()
        else:
            forget_by_hand(expert)
    if sharded:
        experts.active = None  # every expert is resharded now


def reshard_all(module: nn.Module) -> None:
    """Free the gathered weights of every FSDP unit in `module` (each rank keeps its shard)."""
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def fsdp_root(module: nn.Module) -> FSDPModule | None:
    """The outermost FSDP unit in `module` (itself, or the model inside a wrapper such as CfgParallel)."""
    return next((m for m in module.modules() if isinstance(m, FSDPModule)), None)


def forget_by_hand(root: FSDPModule) -> None:
    """forget_forward_records for a torch without `reset_iter_state` (2.11 on our GPU machine)."""
    root._get_fsdp_state()._comm_ctx.post_forward_order.clear()
    for module in root.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group._post_forward_indices.clear()
    reshard_all(root)
