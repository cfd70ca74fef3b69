"""torchrun's processes as one group: this rank's device, the process group, values from rank 0.

torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (multi-node with its usual rendezvous flags). The CLI (`wan22_core.cli.torchrun`)
composes these with its stages; nothing here knows about flags.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

import torch
import torch.distributed as dist

from ..runtime import check_backend, device_memory, resolve_device
from .mesh import ParallelGroups, init_groups
from .plan import ParallelPlan, backend_for

T = TypeVar("T")


def under_torchrun() -> bool:
    return "RANK" in os.environ


def torchrun_world_size() -> int:
    """Processes torchrun started (1 when this process was not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(name: str) -> torch.device:
    """The device `name` for this rank: CUDA ranks use GPU LOCAL_RANK, CPU ranks the CPU."""
    device = resolve_device(name)
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextmanager
def torchrun_group(plan: ParallelPlan, device: torch.device) -> Iterator[ParallelGroups]:
    """The default process group of torchrun's ranks and `plan`'s groups on it, for one run."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the default for every allocation and for NCCL on this rank
    backend = backend_for([str(device)])
    check_backend(backend)  # a clear line, not a traceback, when this torch build lacks it
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield init_groups(plan, device)
        # leave together: a rank that tears its process groups down while rank 0 still writes the
        # video can abort in gloo's threads ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def cpu_threads_per_rank() -> int:
    """This node's CPU cores shared out among its ranks (LOCAL_WORLD_SIZE). torchrun starts every
    rank with OMP_NUM_THREADS=1, right for ranks that keep a GPU busy but not for CPU work one of
    them does while the others wait, like rank 0's text encode (UMT5-XXL, ~1e13 FLOP)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // ranks_per_node())


def ranks_per_node() -> int:
    """torchrun's ranks on this node (LOCAL_WORLD_SIZE; all of them when it is not set)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", torchrun_world_size()))


def from_rank0(make: Callable[[], T], groups: ParallelGroups) -> T:
    """`make()` on rank 0 alone (e.g. the text encoder: 11 GB, once, not once per rank), its
    value broadcast to every rank."""
    payload = [make() if groups.rank == 0 else None]
    dist.broadcast_object_list(payload, src=0, device=groups.device)
    return payload[0]


class Rank0Task(Generic[T]):
    """`make()` on rank 0 while every rank goes on, its value broadcast to every rank by `result()`.

    In the background (a thread) when `background`: e.g. the text encode on rank 0's CPU while GPU
    ranks read their shards, which is disk reads and host-to-device copies, so the two overlap
    instead of adding up. Else at once, before the caller goes on: CPU ranks, whose load competes
    for the same cores (benchmarks/bench_stages.py: no gain there). The thread runs no collective
    (only `result` does, on the calling thread); it is a daemon, so a rank that fails meanwhile
    exits without waiting for it.
    """

    def __init__(self, make: Callable[[], T], groups: ParallelGroups, background: bool):
        self.groups = groups
        self.background = background
        self.seconds = 0.0  # make()'s own duration, on rank 0
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = None
        if groups.rank == 0 and background:
            self._thread = threading.Thread(target=self._run, args=(make,), name="wan22-rank0-task", daemon=True)
            self._thread.start()
        elif groups.rank == 0:
            self._run(make)

    def _run(self, make: Callable[[], T]) -> None:
        start = time.perf_counter()
        try:
            self._value = make()
        except BaseException as err:  # re-raised by result() on the calling thread
            self._error = err
        self.seconds = time.perf_counter() - start

    def result(self) -> T:
        """The value on every rank (a collective: every rank calls it once)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return from_rank0(lambda: self._value, self.groups)


def smallest_device_memory(groups: ParallelGroups) -> int | None:
    """The least memory of any rank's device (one MIN all-reduce), or None on CPU ranks (no budget)."""
    own = device_memory(groups.device)
    if own is None:
        return None
    least = torch.tensor([own], dtype=torch.int64, device=groups.device)
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return int(least.item())
