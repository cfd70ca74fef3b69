"""Parallel degrees and devices, validated before any process starts.

Ranks form a grid (replica, cfg, ulysses) with the Ulysses index fastest, so each Ulysses group
is a run of neighbouring ranks (neighbouring GPUs share the fastest links). FSDP shards the
weights over *all* ranks: every rank runs the same modules in the same order (the CFG halves
run the same expert on different text), so one all-gather per module serves the whole grid.

Nothing here touches torch.distributed; the node, the CLI and the worker group validate with
these before spawning anything, including which one-process options the ranks refuse
(`check_parallel_options`, the one rule for both the torchrun CLI and the worker group).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import A14B, ExpertOptions, is_finite_real, is_integer, is_real
from ..runtime import check_backend

A14B_HEADS = A14B.dit.num_heads
HEARTBEAT_S = 60.0  # seconds of silence from a rank before it counts as hung


def valid_ulysses_degrees(num_heads: int = A14B_HEADS) -> list[int]:
    """Ulysses scatters whole heads, so the degree must divide the head count (40 -> 1, 2, 4, 5, 8, 10, 20, 40)."""
    return [d for d in range(1, num_heads + 1) if num_heads % d == 0]


def _check_int(name: str, value, minimum: int) -> None:
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ParallelPlan:
    """How `world_size` ranks split one sampling run.

    ulysses: sequence-parallel degree (tokens and heads split across this many ranks).
    cfg_parallel: 2 runs the conditional and unconditional passes on two halves of the ranks.
    fsdp: shard both experts' weights across all ranks (each rank holds 1/world_size).
    reshard_after_forward: with fsdp, free gathered weights after each module (False keeps a
        full copy of each expert once used: faster, needs memory for both full experts).
    Ranks beyond ulysses x cfg_parallel are replicas that repeat the same work, which is only
    useful to spread the weights with fsdp (e.g. "FSDP only" on 2 GPUs).
    """

    world_size: int
    ulysses: int = 1
    cfg_parallel: int = 1
    fsdp: bool = False
    reshard_after_forward: bool = True
    num_heads: int = A14B_HEADS

    def __post_init__(self):
        _check_int("world_size", self.world_size, 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_int("ulysses", self.ulysses, 1)
        if self.cfg_parallel not in (1, 2):
            raise ValueError(f"cfg_parallel must be 1 or 2 (cond and uncond), got {self.cfg_parallel!r}")
        if self.num_heads % self.ulysses:
            raise ValueError(
                f"ulysses degree {self.ulysses} does not divide the {self.num_heads} attention heads; "
                f"valid degrees: {', '.join(map(str, valid_ulysses_degrees(self.num_heads)))}")
        used = self.ulysses * self.cfg_parallel
        if self.world_size % used:
            raise ValueError(
                f"{self.world_size} ranks cannot be split into groups of ulysses {self.ulysses} x "
                f"cfg_parallel {self.cfg_parallel} = {used}; use a rank count that is a multiple of {used}")
        if self.world_size > used and not self.fsdp:
            raise ValueError(
                f"{self.world_size} ranks but ulysses {self.ulysses} x cfg_parallel {self.cfg_parallel} = {used}: "
                f"the other ranks would repeat the same work; set ulysses to {self.world_size // self.cfg_parallel} "
                "(if it divides the heads) or enable fsdp to use them for weight sharding")

    @property
    def replicas(self) -> int:
        return self.world_size // (self.ulysses * self.cfg_parallel)

    @property
    def ulysses_enabled(self) -> bool:
        return self.ulysses > 1

    @property
    def cfg_parallel_enabled(self) -> bool:
        return self.cfg_parallel > 1

    def ulysses_groups(self) -> list[list[int]]:
        """Rank lists of the Ulysses groups: runs of `ulysses` consecutive ranks."""
        u = self.ulysses
        return [list(range(start, start + u)) for start in range(0, self.world_size, u)]

    def cfg_groups(self) -> list[list[int]]:
        """Rank lists of the CFG pairs: same Ulysses position, the two halves of one replica."""
        u, c = self.ulysses, self.cfg_parallel
        return [[base + i + k * u for k in range(c)]
                for base in range(0, self.world_size, u * c) for i in range(u)]


# ---------------------------------------------------------------------------------------------
# Devices: what the multi-GPU node's `gpus` string means


MAX_CPU_RANKS = 256  # a typo like cpu:20000 must not fork-bomb the machine


def parse_gpus(gpus: str) -> tuple[str, ...]:
    """"all", "0,1,2,3" (CUDA indices) or "cpu:N" (N CPU ranks on gloo) -> one device name per rank."""
    text = str(gpus).strip().lower()
    if text.startswith("cpu:"):
        count = text[4:]
        if not count.isdecimal() or not 1 <= int(count) <= MAX_CPU_RANKS:
            raise ValueError(f"gpus {gpus!r}: 'cpu:N' needs a whole number of ranks N >= 1 "
                             f"(at most {MAX_CPU_RANKS}), e.g. 'cpu:2'")
        return ("cpu",) * int(count)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "all":
        if available == 0:
            raise ValueError("gpus 'all': this machine has no CUDA GPU (or torch has no CUDA); "
                             "use 'cpu:N' to run N ranks on the CPU")
        return tuple(f"cuda:{i}" for i in range(available))
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdecimal() for item in items):  # isdigit takes '²', int() does not
        raise ValueError(f"gpus {gpus!r} is not 'all', a list of GPU indices like '0,1,2,3', or 'cpu:N'")
    indices = [int(item) for item in items]
    if len(set(indices)) != len(indices):
        raise ValueError(f"gpus {gpus!r} names a GPU twice; list each GPU once")
    missing = [i for i in indices if i >= available]
    if missing:
        raise ValueError(f"gpus {gpus!r}: GPU {missing[0]} does not exist; this machine has {available} "
                         f"CUDA GPU(s) (indices 0..{available - 1})" if available else
                         f"gpus {gpus!r}: this machine has no CUDA GPU; use 'cpu:N' to run N CPU ranks")
    return tuple(f"cuda:{i}" for i in indices)


@dataclass(frozen=True)
class ParallelConfig:
    """Everything a worker group is built from besides the model: devices, plan, fault bound."""

    devices: tuple[str, ...]
    plan: ParallelPlan
    heartbeat_timeout: float = HEARTBEAT_S

    @property
    def backend(self) -> str:
        return backend_for(self.devices)


def backend_for(devices: Sequence[str]) -> str:
    """torch.distributed backend of a group on `devices` (parse_gpus never mixes CUDA and CPU)."""
    return "nccl" if devices[0].startswith("cuda") else "gloo"


def parallel_config(gpus: str = "all", ulysses_degree: int = 0, fsdp: bool = True, cfg_parallel: bool = False,
                    *, num_heads: int = A14B_HEADS, reshard_after_forward: bool = True,
                    heartbeat_timeout: float = HEARTBEAT_S) -> ParallelConfig:
    """The multi-GPU node's inputs -> a validated ParallelConfig (ulysses_degree 0: all ranks of a CFG half)."""
    devices = parse_gpus(gpus)
    check_backend(backend_for(devices))  # e.g. a torch build without NCCL
    cfg = 2 if cfg_parallel else 1
    _check_int("ulysses_degree", ulysses_degree, 0)
    if cfg_parallel and len(devices) % 2:
        raise ValueError(f"cfg_parallel needs an even number of ranks (two halves); gpus {gpus!r} gives {len(devices)}")
    ulysses = ulysses_degree or len(devices) // cfg
    # inf is no bound; NaN, a bool or an int past the float range (2**1100) is no number of seconds
    if not (is_real(heartbeat_timeout) and heartbeat_timeout > 0
            and (is_finite_real(heartbeat_timeout) or heartbeat_timeout == math.inf)):
        raise ValueError(f"heartbeat_timeout must be a number of seconds > 0, got {heartbeat_timeout!r}")
    plan = ParallelPlan(world_size=len(devices), ulysses=ulysses, cfg_parallel=cfg, fsdp=fsdp,
                        reshard_after_forward=reshard_after_forward, num_heads=num_heads)
    return ParallelConfig(devices=devices, plan=plan, heartbeat_timeout=float(heartbeat_timeout))


# ---------------------------------------------------------------------------------------------
# Options: what the ranks do not implement of the one-process options


def parallel_refusals(options: ExpertOptions, *, cfg_parallel: bool, batch_cfg: bool = True) -> list[str]:
    """Why each of `options` cannot run on the ranks of a multi-GPU run, with the fix ([]: all can).

    Accepted as they are: dtype, weight_dtype (fp8 shards stay fp8: FSDP moves their bytes),
    compile (each block on every rank), attention (set on every rank), and lora_mode: the ranks
    always merge LoRAs into their shards, and a strength change re-merges from the factors they
    keep (the LoRA node says so).
    """
    refused = []
    if options.offload != "auto":
        refused.append(f"offload={options.offload!r} (the ranks place the experts themselves: FSDP spreads both over "
                       "the GPUs, and without FSDP each rank keeps both when they fit: use auto)")
    if options.swap_blocks:
        refused.append(f"swap_blocks={options.swap_blocks} (block swap is for one process: use 0)")
    if cfg_parallel and not batch_cfg:
        refused.append("batch_cfg=False with cfg_parallel (CFG-parallel splits the batched cond/uncond pair over two "
                       "halves of the ranks: turn one of them off)")
    return refused


def check_parallel_options(options: ExpertOptions, *, cfg_parallel: bool, batch_cfg: bool = True) -> None:
    """ValueError naming every option the ranks refuse (`parallel_refusals`), before anything starts."""
    refused = parallel_refusals(options, cfg_parallel=cfg_parallel, batch_cfg=batch_cfg)
    if refused:
        raise ValueError(f"not on the multi-GPU path: {'; '.join(refused)}")

