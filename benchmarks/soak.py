"""Soak: many consecutive prompts in one process and through one worker group, watching for leaks.

The long version of tests/test_load.py: tiny models, fp32, 2 CPU ranks on gloo (Ulysses 2 +
FSDP), sizes, seeds and prompt lengths varied (the same workload: test_load imports it from here).
Every `--every` prompts (default: an eighth of them) it prints resident memory,
threads and open file descriptors of the controller and of each rank, and at the end the growth
since the first checkpoint and the largest difference between a group output and its in-process
twin.

    python benchmarks/soak.py --prompts 2000
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # reference.rel_l2, procs.status

from wan22_core.checkpoints import load_dit  # noqa: E402
from wan22_core.config import TINY, SamplerSettings  # noqa: E402
from wan22_core.parallel import Job, ModelSpec, WorkerGroup, parallel_config  # noqa: E402
from wan22_core.pipeline import denoise, make_noise  # noqa: E402
from wan22_core.placement import ExpertPair  # noqa: E402
from wan22_core.tiny import make_tiny  # noqa: E402
from procs import status  # noqa: E402
from reference import rel_l2  # noqa: E402

# The workload, shared with tests/test_load.py (which imports it from here).
# (frames, height, width): 1 to 3 latent frames, 1x1 to 2x3 tokens per frame (odd counts pad for 2 ranks)
SIZES = [(5, 32, 32), (1, 32, 32), (9, 32, 48), (5, 48, 32), (1, 16, 64)]
SETTINGS = SamplerSettings(steps=2, shift=5.0)  # timesteps 999 (high-noise expert), 833 (low)


def job(i: int) -> Job:
    """Prompt i: its own seed, size and prompt lengths (5 to 11 and 3 to 6 tokens)."""
    g = torch.Generator().manual_seed(1000 + i)
    positive = torch.randn(5 + i % 7, TINY.dit.text_dim, generator=g)
    negative = torch.randn(3 + i % 4, TINY.dit.text_dim, generator=g)
    return Job(positive, negative, make_noise(7 * i + 1, *SIZES[i % len(SIZES)]), SETTINGS)


def report(label: str, i: int, pids: list[int], seconds: float, rows: list) -> None:
    row = [status(pid) for pid in pids]
    rows.append(row)
    cells = "  ".join(f"{s['rss_kb'] // 1024:5d} MiB {s['threads']:2d} thr {s['fds']:3d} fd" for s in row)
    print(f"{label:10s} {i:6d} prompts {seconds:7.1f} s  {cells}", flush=True)


def growth(rows: list) -> str:
    first, last = rows[0], rows[-1]
    return ", ".join(f"{(b['rss_kb'] - a['rss_kb']) / a['rss_kb']:+.1%} RSS, {b['threads'] - a['threads']:+d} "
                     f"threads, {b['fds'] - a['fds']:+d} fds" for a, b in zip(first, last))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--every", type=int, default=None, help="prompts between checkpoints (default: "
                        "--prompts / 8, at least 1)")
    args = parser.parse_args()
    if args.prompts < 1:
        parser.error("--prompts must be at least 1")
    if args.every is None:
        args.every = max(1, args.prompts // 8)
    if not 1 <= args.every <= args.prompts:
        parser.error(f"--every must be between 1 and --prompts ({args.prompts}), got {args.every}")

    with tempfile.TemporaryDirectory() as tmp:  # nothing left behind
        soak(make_tiny(Path(tmp) / "official", "official", TINY), args.prompts, args.every)


def soak(model_dir: Path, prompts: int, every: int) -> None:
    """`prompts` prompts in this process, then through one cpu:2 worker group; a report every `every`."""
    experts = ExpertPair(load_dit(model_dir / "high_noise_model"), load_dit(model_dir / "low_noise_model"),
                         torch.device("cpu"))
    me, start, rows, twins = os.getpid(), time.perf_counter(), [], {}
    for i in range(prompts + 1):
        if i % every == 0 and i:
            report("in-process", i, [me], time.perf_counter() - start, rows)
        if i < prompts:
            j = job(i)
            latent = denoise(experts, j.positive, j.negative, j.noise, j.settings)
            if i % every == 0:
                twins[i] = latent  # a sample of twins: keeping all would itself grow memory
    print(f"in-process growth after the first checkpoint: {growth(rows)}")

    group = WorkerGroup.get_or_create(ModelSpec(model_dir / "high_noise_model", model_dir / "low_noise_model"),
                                      parallel_config("cpu:2", ulysses_degree=2, fsdp=True,
                                                      num_heads=TINY.dit.num_heads))
    pids, start, rows, worst = [me, *group.pids], time.perf_counter(), [], 0.0
    try:
        for i in range(prompts + 1):
            if i % every == 0 and i:
                report("group", i, pids, time.perf_counter() - start, rows)
            if i < prompts:
                latent = group.run(job(i))
                if i in twins:
                    worst = max(worst, rel_l2(latent, twins[i]))
    finally:
        group.shutdown()
    print(f"group growth after the first checkpoint (controller, rank 0, rank 1): {growth(rows)}")
    print(f"largest relative L2 difference to the in-process twin ({len(twins)} compared): {worst:.1e}")


if __name__ == "__main__":
    main()
