"""Multi-GPU sampling: FSDP2 weight sharding, Ulysses x Ring sequence parallelism, CFG-parallel,
replicas sampling other videos, and the persistent worker group behind the sampler node
(torchrun runs the same code for the CLI).

The model code knows nothing of this package: sequence parallelism replaces the attention and sequence
seams of `models/transformer.py` from outside, FSDP wraps its blocks. Importing this package
is cheap (no torch.distributed.fsdp until a plan uses it).
"""
from .plan import (ParallelConfig, ParallelPlan, check_parallel_options, choose_split, parallel_config, parse_gpus,
                   valid_ulysses_degrees)
from .worker_group import Job, ModelSpec, WorkerGroup, WorkerGroupError

__all__ = ["ParallelConfig", "ParallelPlan", "check_parallel_options", "choose_split", "parallel_config", "parse_gpus",
           "valid_ulysses_degrees", "Job", "ModelSpec", "WorkerGroup", "WorkerGroupError"]
