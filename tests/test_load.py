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
from pathlib import Path

import pytest
import torch

from wan22_core.checkpoints import load_dit
from wan22_core.config import TINY, SamplerSettings
from wan22_core.parallel import Job, ModelSpec, WorkerGroup, parallel_config
from wan22_core.pipeline import denoise, make_noise
from wan22_core.sampling.moe import ExpertPair
from procs import children_of
from reference import rel_l2

PROMPTS = 50
WARM_UP = 10  # two rounds of SIZES: every shape has been through every cache once
# (frames, height, width): 1 to 3 latent frames, 1x1 to 2x3 tokens per frame (odd counts pad for 2 ranks)
SIZES = [(5, 32, 32), (1, 32, 32), (9, 32, 48), (5, 48, 32), (1, 16, 64)]
SETTINGS = SamplerSettings(steps=2, shift=5.0)  # timesteps 999 (high-noise expert), 833 (low)
TOL = 1e-5
RSS_GROWTH = 0.10


def job(i: int) -> Job:
    """Prompt i: its own seed, size and prompt lengths (5 to 11 and 3 to 6 tokens)."""
    g = torch.Generator().manual_seed(1000 + i)
    positive = torch.randn(5 + i % 7, TINY.dit.text_dim, generator=g)
    negative = torch.randn(3 + i % 4, TINY.dit.text_dim, generator=g)
    return Job(positive, negative, make_noise(7 * i + 1, *SIZES[i % len(SIZES)]), SETTINGS)


def status(pid: int) -> dict[str, int]:
    """Resident memory (kB), threads, open file descriptors and child processes of `pid`."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "children": len(children_of(pid))}


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
def model_dir(tmp_path_factory):
    from wan22_core.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("load") / "official", "official", TINY, seed=0)


@pytest.fixture(scope="module")
def twins(model_dir):
    """The in-process path: 50 prompts through `denoise`, measured; their latents are the twins."""
    experts = ExpertPair(load_dit(model_dir / "high_noise_model"), load_dit(model_dir / "low_noise_model"),
                         torch.device("cpu"))
    latents, me = [], os.getpid()
    for i in range(PROMPTS):
        if i == WARM_UP:
            before, tensors_before = {me: status(me)}, live_tensors()
        j = job(i)
        latents.append(denoise(experts, j.positive, j.negative, j.noise, j.settings))
    # the 40 kept latents are the only tensors allowed to have appeared since the warm-up
    return {"latents": latents, "before": before, "after": {me: status(me)},
            "tensor_growth": live_tensors() - tensors_before - (PROMPTS - WARM_UP)}


def test_fifty_prompts_in_process_leak_nothing(twins):
    assert_nothing_grew(twins["before"], twins["after"])
    assert twins["tensor_growth"] == 0
    assert all(torch.isfinite(z).all() for z in twins["latents"])
    assert len({tuple(z.shape) for z in twins["latents"]}) == len(SIZES)


def test_fifty_prompts_through_one_worker_group_match_and_leak_nothing(model_dir, twins):
    spec = ModelSpec(model_dir / "high_noise_model", model_dir / "low_noise_model")
    config = parallel_config("cpu:2", ulysses_degree=2, fsdp=True, num_heads=TINY.dit.num_heads)
    group = WorkerGroup.get_or_create(spec, config)
    try:
        pids, me, errors, steps = group.pids, os.getpid(), [], []
        for i in range(PROMPTS):
            if i == WARM_UP:
                before = {pid: status(pid) for pid in [me, *pids]}
                tensors_before = live_tensors()
            errors.append(rel_l2(group.run(job(i), on_step=lambda s: steps.append(s.index)), twins["latents"][i]))
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
