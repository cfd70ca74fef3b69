"""Multi-GPU sampling: FSDP2 weight sharding, Ulysses sequence parallelism, CFG-parallel, and
the persistent worker group behind the sampler node (torchrun runs the same code for the CLI).

The model code knows nothing of this package: Ulysses replaces the attention and sequence
seams of `models/transformer.py` from outside, FSDP wraps its blocks. Importing this package
is cheap (no torch.distributed.fsdp until a plan uses it).
"""
from .plan import (ParallelConfig, ParallelPlan, check_parallel_options, parallel_config, parse_gpus,
                   valid_ulysses_degrees)
from .worker_group import Job, ModelSpec, WorkerGroup, WorkerGroupError

__all__ = ["ParallelConfig", "ParallelPlan", "check_parallel_options", "parallel_config", "parse_gpus",
           "valid_ulysses_degrees", "Job", "ModelSpec", "WorkerGroup", "WorkerGroupError"]
