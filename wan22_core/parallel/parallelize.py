"""`parallelize(model, groups)`: apply a plan's parallelisms to one expert, in a fixed order."""
from __future__ import annotations

from torch import nn

from ..optimize import compile_blocks
from .mesh import ParallelGroups


def parallelize(model: nn.Module, groups: ParallelGroups, *, compile: bool = False) -> nn.Module:
    """Sequence parallelism (Ulysses x Ring), then compile, then FSDP, then the CFG split; returns
    the module the sampling loop calls.

    Sequence parallelism first: it only swaps parameter-free seam modules, so the compiler and
    FSDP then see blocks that already hold their final kernels. Compile before FSDP, as
    torchtitan does: each block's forward is compiled (regional, one graph reused by all blocks)
    and FSDP's all-gather hooks run around it, outside the graph, so the graph sees plain
    gathered parameters (for quantised Linears the uint8 rows it dequantises). The CFG split
    wraps the root last because it decides which batch row this rank feeds into the whole
    (sharded, sequence-parallel) model. Each parallelism is imported when a plan uses it:
    torch.distributed.fsdp alone adds 0.6 to 1.2 s to every start (the CLI's, a ComfyUI
    node's), measured with python -X importtime.
    """
    plan = groups.plan
    if plan.sequence_enabled:
        from .sequence import apply_sequence_parallel

        apply_sequence_parallel(model, groups.sequence, groups.ulysses, groups.ring)
    if compile:
        compile_blocks(model, groups.device)  # the caller checked the toolchain (compile_toolchain_problem)
    if plan.fsdp:
        from .fsdp import apply_fsdp

        apply_fsdp(model, groups.fsdp_mesh, plan.reshard_after_forward)
    if plan.cfg_parallel_enabled:
        from .cfg_parallel import CfgParallel

        model = CfgParallel(model, groups.cfg)
    return model
