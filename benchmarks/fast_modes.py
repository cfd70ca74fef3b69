"""Step caching on the tiny model, CPU: model passes saved against deviation from the exact run.

    python benchmarks/fast_modes.py                        # thresholds 0 0.02 0.05 0.1 0.2, 40 steps
    python benchmarks/fast_modes.py --json out.json --chart out.png   (--chart needs matplotlib)
    python benchmarks/fast_modes.py --dry-run              # seconds: checks the script

For each threshold: model passes run (of the steps), wall seconds of the sampling loop (median of
--repeats, thresholds interleaved so machine noise hits all alike), relative L2 of the final latents
and PSNR of the decoded frames against the threshold-0 run (the exact loop: the cache is off there).
The tiny model has random weights: these numbers show the mechanism (passes saved, deviation that
grows with the threshold), not how a video looks at a threshold on the real model; the published
EasyCache quality figures are quoted next to them in the README.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # charts, bench_gpu
sys.path.insert(1, str(HERE.parent))  # wan22_core, from a checkout installed or not

from bench_gpu import machine  # noqa: E402  (puts tests/ on the path for reference.rel_l2)
from reference import rel_l2  # noqa: E402

from wan22_core.config import TINY, SamplerSettings  # noqa: E402
from wan22_core.models.transformer import WanModel  # noqa: E402
from wan22_core.models.vae import WanVAE  # noqa: E402
from wan22_core.pipeline import decode_to_video, denoise, make_noise  # noqa: E402
from wan22_core.placement import ExpertPair  # noqa: E402
from wan22_core.tiny import seeded  # noqa: E402

THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.2)
CPU = torch.device("cpu")


@dataclass
class Setup:
    """One tiny text-to-video problem: both experts, embeddings, noise, sampler settings, VAE."""

    experts: ExpertPair
    positive: torch.Tensor
    negative: torch.Tensor
    noise: torch.Tensor
    settings: SamplerSettings
    vae: WanVAE


def build(steps: int, frames: int, size: int, seed: int = 0) -> Setup:
    """The tiny model set's shapes with seeded random weights (no files), random text embeddings."""
    high, low = (seeded(seed + i, lambda: WanModel(TINY.dit)) for i in (1, 2))
    g = torch.Generator().manual_seed(seed)
    positive, negative = torch.randn(40, TINY.dit.text_dim, generator=g), torch.randn(60, TINY.dit.text_dim, generator=g)
    return Setup(ExpertPair(high, low, CPU), positive, negative, make_noise(seed, frames, size, size),
                 SamplerSettings(steps=steps), seeded(seed + 3, lambda: WanVAE(TINY.vae)))


def sample(setup: Setup, threshold: float) -> tuple[torch.Tensor, int]:
    """The engine's loop with the step cache at `threshold`: the final latent and how many model passes ran."""
    ran: list[bool] = []
    latent = denoise(setup.experts, setup.positive, setup.negative, setup.noise,
                     replace(setup.settings, step_cache=threshold), on_step=lambda info: ran.append(info.model_ran))
    return latent, sum(ran)


def psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of frames in [0, 1] against `reference` (inf when equal)."""
    mse = torch.mean((frames.double() - reference.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def measure(setup: Setup, thresholds, repeats: int) -> list[dict]:
    """One row per threshold; the first threshold must be 0, the exact run the others are compared with."""
    if thresholds[0] != 0:
        raise ValueError(f"the first threshold must be 0 (the exact reference), got {thresholds[0]}")
    seconds = {t: [] for t in thresholds}
    results = {}
    sample(setup, 0.0)  # untimed: first-call allocations and kernel choices
    for _ in range(repeats):
        for t in thresholds:
            start = time.perf_counter()
            results[t] = sample(setup, t)
            seconds[t].append(time.perf_counter() - start)
    exact_latent = results[0][0]
    exact_frames = decode_to_video(setup.vae, exact_latent)
    rows = []
    for t in thresholds:
        latent, passes = results[t]
        rows.append(dict(threshold=t, passes_run=passes, steps=setup.settings.steps,
                         seconds=statistics.median(seconds[t]), rel_l2=rel_l2(latent, exact_latent),
                         psnr_db=psnr(decode_to_video(setup.vae, latent), exact_frames)))
    for row in rows:
        row["time_ratio"] = row["seconds"] / rows[0]["seconds"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| threshold | model passes run | wall s (ratio to exact) | rel. L2 final latents | PSNR frames (dB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threshold']:g} | {r['passes_run']} of {r['steps']} | {r['seconds']:.2f} "
                     f"({r['time_ratio']:.2f}) | {r['rel_l2']:.2e} | {r['psnr_db']:.1f} |")
    return "\n".join(lines)


def chart_rows(rows: list[dict]) -> tuple[list[dict], list[float]]:
    """The rows the chart plots, those that saved passes, and the thresholds that saved none: their
    run is the exact one (relative L2 0, PSNR inf), which log and dB axes cannot show."""
    saved = [r for r in rows if r["passes_run"] < r["steps"]]
    return saved, [r["threshold"] for r in rows if r["threshold"] > 0 and r["passes_run"] == r["steps"]]


def draw(rows: list[dict], path: Path, title: str) -> None:
    """Passes saved (x) against the deviation: relative L2 (left) and PSNR (right)."""
    from charts import pyplot

    plt = pyplot()
    cached, exact = chart_rows(rows)
    saved = [100 * (1 - r["passes_run"] / r["steps"]) for r in cached]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "rel_l2", "relative L2 of the final latents"),
                           (axes[1], "psnr_db", "PSNR of the decoded frames (dB)")):
        values = [r[key] for r in cached]
        ax.plot(saved, values, "o-", color="tab:blue")
        for x, y, r in zip(saved, values, cached):
            ax.annotate(f"{r['threshold']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("model passes saved (%)")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    if exact:
        fig.text(0.5, 0.01, f"thresholds {', '.join(f'{t:g}' for t in exact)}: no pass saved, the exact result",
                 ha="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS), help="the first must be 0")
    p.add_argument("--steps", type=int, default=SamplerSettings().steps)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128, help="width = height, pixels")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per threshold; the median is kept")
    p.add_argument("--json", type=Path, help="write the rows and the machine here")
    p.add_argument("--chart", type=Path, help="PNG of passes saved vs deviation (needs matplotlib)")
    p.add_argument("--dry-run", action="store_true", help="12 steps, a 5-frame 32x32 video, one repeat")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.frames, args.size, args.repeats = 12, 5, 32, 1
    torch.manual_seed(0)
    setup = build(args.steps, args.frames, args.size)
    rows = measure(setup, args.thresholds, args.repeats)
    where = machine(CPU)["device"]
    title = f"Step cache on the tiny random model, {args.steps} steps, {args.frames}x{args.size}x{args.size}, {where}"
    print(f"# {title}" + (" (DRY RUN)" if args.dry_run else ""))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine(CPU), dry_run=args.dry_run, steps=args.steps,
                                             frames=args.frames, size=args.size, rows=rows), indent=2))
    if args.chart:
        draw(rows, args.chart, title)
        print(f"# chart written to {args.chart}")
    return rows


if __name__ == "__main__":
    main()
