"""The text encode overlapped with the load on torchrun's ranks, measured on CPU ranks (gloo).

    python benchmarks/bench_stages.py                    # 2 ranks, 3 rounds of each order
    python benchmarks/bench_stages.py --append-results   # also append the table to benchmarks/RESULTS.md

Rank 0 encodes the prompt in a thread while every rank reads its shards (`parallel.launch.Rank0Task`
in the background, what the torchrun CLI does on GPU ranks) against the serial order (rank 0
encodes and broadcasts, then every rank loads: what it does on CPU ranks), with the CLI's own
stage functions, in the same rank processes, alternating, after one warm-up round (imports,
page cache). A mid-size random model set (`make_tiny` at larger sizes) makes both stages take
about a second on a CPU. The saving is at most min(encode, load), and only where the two do not
compete for the same cores: on CPU ranks they do, which is why the CLI overlaps on GPU ranks
only (whose load is disk reads and host-to-device copies).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' gloo rank launcher
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # wan22_core, from a checkout installed or not
from procs import join_gloo_group, start_gloo_ranks, wait_ranks  # noqa: E402
from record import append_results  # noqa: E402

from wan22_core.config import TINY, ModelConfig  # noqa: E402

PROMPT = "A red fox trots through fresh snow at sunrise, cinematic tracking shot"
# DiT ~0.13 B parameters per expert (1 GB of fp32 files for the pair), text encoder 24 layers of 256
MODEL = ModelConfig(dit=replace(TINY.dit, dim=1024, ffn_dim=4096, num_heads=8, num_layers=8, text_dim=256),
                    text=replace(TINY.text, dim=256, ffn_dim=1024, num_heads=4, num_layers=24), vae=TINY.vae)


def rank_main(rank: int, world: int, port: int, model_dir: str, rounds: int, out: str) -> None:
    from wan22_core.checkpoints import ModelFiles
    from wan22_core.cli.torchrun import encode_on_rank0
    from wan22_core.parallel.launch import Rank0Task, from_rank0
    from wan22_core.parallel.loading import load_expert_pair
    from wan22_core.parallel.mesh import init_groups
    from wan22_core.parallel.plan import ParallelPlan

    join_gloo_group(rank, world, port)
    cpu, files = torch.device("cpu"), ModelFiles.from_model_dir(model_dir)
    groups = init_groups(ParallelPlan(world_size=world, fsdp=True, num_heads=MODEL.dit.num_heads), cpu)

    def encode():
        return encode_on_rank0(files, PROMPT, None, None, cpu)

    def load():
        return load_expert_pair(files.high_noise, files.low_noise, groups, cpu, torch.float32)

    def serial() -> tuple:
        start = time.perf_counter()
        embeds = from_rank0(encode, groups)
        encoded = time.perf_counter()
        load()
        dist.barrier()
        end = time.perf_counter()
        return embeds, dict(encode=encoded - start, load=end - encoded, wall=end - start)

    def overlapped() -> tuple:
        start = time.perf_counter()
        task = Rank0Task(encode, groups, background=True)
        load()
        loaded = time.perf_counter()
        embeds = task.result()
        dist.barrier()
        end = time.perf_counter()
        return embeds, dict(encode=task.seconds, load=loaded - start, wall=end - start)

    reference, _ = serial()  # warm-up
    times = {"serial": [], "overlapped": []}
    for _ in range(rounds):
        for name, run in (("serial", serial), ("overlapped", overlapped)):
            embeds, took = run()
            assert torch.equal(embeds.positive, reference.positive), "the order changed the embeddings"
            times[name].append(took)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def measure(ranks: int, rounds: int) -> dict:
    from wan22_core.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / "model", "official", MODEL, seed=0)
        out = Path(tmp) / "times.json"
        _, procs = start_gloo_ranks([__file__, "--rank"], ranks, dict(model_dir=str(model_dir), rounds=rounds,
                                                                        out=str(out)))
        failures = wait_ranks(procs)
        if failures:
            raise SystemExit("\n".join(failures))
        return json.loads(out.read_text())


def report(times: dict, ranks: int) -> str:
    median = {name: {key: statistics.median(t[key] for t in runs) for key in runs[0]} for name, runs in times.items()}
    serial, overlapped = median["serial"], median["overlapped"]
    lines = [f"{ranks} CPU ranks (gloo, one thread each), medians of {len(times['serial'])} alternating rounds, "
             f"seconds:", "",
             "| order | text encode (rank 0) | load (shards) | both, wall |", "|---|---|---|---|"]
    for name, m in median.items():
        lines.append(f"| {name} | {m['encode']:.2f} | {m['load']:.2f} | {m['wall']:.2f} |")
    saved = serial["wall"] - overlapped["wall"]
    lines += ["", f"Overlap saves {saved:.2f} s of {serial['wall']:.2f} s ({saved / serial['wall']:.0%}); the most it "
              f"could save is the shorter stage, {min(serial['encode'], serial['load']):.2f} s."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--rank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(**json.loads(args.rank))
        return
    text = report(measure(args.ranks, args.rounds), args.ranks)
    print(text)
    if args.append_results:
        append_results("Text encode overlapped with the load (torchrun, CPU ranks)", "bench_stages.py",
                       ", 2-core CPU box", text)


if __name__ == "__main__":
    main()
