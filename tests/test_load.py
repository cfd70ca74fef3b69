"""Load: 50 consecutive prompts in one process, then the same 50 through one worker group.

Tiny models, fp32, gloo, 2 CPU ranks, varied seeds, sizes and prompt lengths. Every group
output must equal its in-process twin (relative L2 <= 1e-5, as test_worker_group), and after a
warm-up that has seen every size once, nothing may grow: resident memory of the controller and
of each rank by less than 10%, and not at all the open file descriptors, the threads, the
processes, or the tensors the controller keeps alive. A longer soak: benchmarks/soak.py.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from wan22_core.checkpoints import load_dit
from wan22_core.config import TINY
from wan22_core.parallel import ModelSpec, WorkerGroup, parallel_config
from wan22_core.pipeline import denoise
from wan22_core.placement import ExpertPair
from procs import children_of
from procs import status as proc_status
from reference import rel_l2
import soak  # from benchmarks/: the workload (SIZES, job: 2 steps, timesteps 999 high-noise, 833 low)

PROMPTS = 50
WARM_UP = 10  # two rounds of soak.SIZES: every shape has been through every cache once
TOL = 1e-5
RSS_GROWTH = 0.10


def status(pid: int) -> dict[str, int]:
    """Resident memory (kB), threads, open file descriptors and child processes of `pid`."""
    return {**proc_status(pid), "children": len(children_of(pid))}


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))  # type(): no __class__ hooks


def assert_nothing_grew(before: dict[int, dict], after: dict[int, dict]) -> None:
    for pid in before:
        grown = after[pid]["rss_kb"] / before[pid]["rss_kb"] - 1
        assert grown < RSS_GROWTH, f"process {pid}: resident memory grew {grown:.1%} ({before[pid]} -> {after[pid]})"
        for key in ("threads", "fds", "children"):
            assert after[pid][key] == before[pid][key], f"process {pid}: {key} {before[pid]} -> {after[pid]}"


@pytest.fixture(scope="module")
def twins(tiny_model_dir):
    """The in-process path: 50 prompts through `denoise`, measured; their latents are the twins."""
    experts = ExpertPair(load_dit(tiny_model_dir / "high_noise_model"),
                         load_dit(tiny_model_dir / "low_noise_model"), torch.device("cpu"))
    latents, me = [], os.getpid()
    for i in range(PROMPTS):
        if i == WARM_UP:
            before, tensors_before = {me: status(me)}, live_tensors()
        j = soak.job(i)
        latents.append(denoise(experts, j.positive, j.negative, j.noise, j.settings))
    # the 40 kept latents are the only tensors allowed to have appeared since the warm-up
    return {"latents": latents, "before": before, "after": {me: status(me)},
            "tensor_growth": live_tensors() - tensors_before - (PROMPTS - WARM_UP)}


def test_fifty_prompts_in_process_leak_nothing(twins):
    assert_nothing_grew(twins["before"], twins["after"])
    assert twins["tensor_growth"] == 0
    assert all(torch.isfinite(z).all() for z in twins["latents"])
    assert len({tuple(z.shape) for z in twins["latents"]}) == len(soak.SIZES)


def test_fifty_prompts_through_one_worker_group_match_and_leak_nothing(tiny_model_dir, twins):
    spec = ModelSpec(tiny_model_dir / "high_noise_model", tiny_model_dir / "low_noise_model")
    config = parallel_config("cpu:2", ulysses_degree=2, fsdp=True, num_heads=TINY.dit.num_heads)
    group = WorkerGroup.get_or_create(spec, config)
    try:
        pids, me, errors, steps = group.pids, os.getpid(), [], []
        for i in range(PROMPTS):
            if i == WARM_UP:
                before = {pid: status(pid) for pid in [me, *pids]}
                tensors_before = live_tensors()
            errors.append(rel_l2(group.run(soak.job(i), on_step=lambda s: steps.append(s.index)), twins["latents"][i]))
            assert WorkerGroup.get_or_create(spec, config) is group  # one group all along
        after = {pid: status(pid) for pid in [me, *pids]}
        tensor_growth = live_tensors() - tensors_before
        assert steps == [0, 1] * PROMPTS  # every step of every prompt reported, in order
        assert max(errors) <= TOL, [f"{e:.1e}" for e in errors]
        assert group.pids == pids and children_of(me) >= set(pids)
        assert all(children_of(pid) == set() for pid in pids)  # the ranks start nothing
        assert_nothing_grew(before, after)
        assert tensor_growth == 0
    finally:
        group.shutdown()
