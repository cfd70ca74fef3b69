"""Does 720p run on a 24 GB card? The real sampler path under an emulated memory cap.

    python benchmarks/bench_small_card.py --json out.json      # one GPU with more memory than the cap
    python benchmarks/bench_small_card.py --dry-run            # the same code path on the CPU, tiny sizes

A bigger GPU (an H100) stands in for the small card: the CUDA caching allocator is capped with
`torch.cuda.set_per_process_memory_fraction` at the card's size minus the 1.5 GiB that
`wan22_core.memory` budgets for the CUDA context and workspaces (which the cap does not count),
so any allocation beyond what the small card could give raises an out-of-memory error here too.

What runs is what a user of that card runs: one full-size A14B expert (40 blocks, random bf16
weights) in an `ExpertPair` with `swap_blocks` set to the memory model's `min_swap_blocks` for
the card (or --swap; if the cap is hit anyway, 2 more blocks and again), then `pipeline.denoise`
for --steps steps at 1280x720x81 with batched CFG (cond + uncond in one forward), then the VAE
decode of the result, tiled (--vae-tile, default the decode node's tiled size). Printed: seconds per step, the allocator's peak for the
denoising and for the decode, and the memory model's prediction for the same settings. With
--switch-timing, first (uncapped): the time to move the whole expert to the GPU and back, what
an expert switch costs without block swap (ExpertPair moves through pageable host memory).
The text encoder (UMT5-XXL, 11.4 GB bf16, released after encoding) is not run.

The same script times the real loop with the whole expert on the GPU, to check bench_gpu.py's
block projections: `--card-gib 80 --swap 0 --compile --attention flash_attn4` (no cap when the
card is as big as the GPU; compile needs --swap 0, as in the engine). The allocator is set up as
the CLI sets it (expandable segments) unless PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF is set.

Host memory: the swapped blocks live in pinned host memory (about 0.7 GB per block).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from wan22_core.runtime import default_cuda_allocator  # noqa: E402

default_cuda_allocator()  # as the CLI does (runtime.ALLOC_CONF says why), unless the caller chose one

from wan22_core.config import (FRAMES, HEIGHT, TINY, VAE_TILE, WIDTH, DiTConfig, SamplerSettings,  # noqa: E402
                               VAEConfig)
from wan22_core.errors import OutOfMemory  # noqa: E402
from wan22_core.memory import CUDA_OVERHEAD, GIB, estimate_peak_bytes, min_swap_blocks, video_tokens  # noqa: E402
from wan22_core.models.attention import BACKENDS, set_attention_backend  # noqa: E402
from wan22_core.models.transformer import WanModel  # noqa: E402
from wan22_core.models.vae import WanVAE  # noqa: E402
from wan22_core.offload import expert_pair_options  # noqa: E402
from wan22_core.optimize import compile_blocks  # noqa: E402
from wan22_core.pipeline import decode_to_video, denoise, make_noise  # noqa: E402
from wan22_core.placement import ExpertPair  # noqa: E402
from bench_gpu import machine  # noqa: E402  (this folder)

DTYPE = torch.bfloat16


def random_weights(module: torch.nn.Module, device: torch.device, std: float = 0.02) -> torch.nn.Module:
    """Fill a module built on the meta device with random weights in host memory.

    The random numbers are drawn on `device` (fast on a GPU) and copied to the host tensor by
    tensor; norms' scales are 1 and biases 0, so activations keep a sane range.
    """
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            if name.endswith("bias"):
                tensor.zero_()
            elif "norm" in name or tensor.ndim == 1:
                tensor.fill_(1.0)
            else:
                tensor.copy_(torch.empty(tensor.shape, device=device, dtype=tensor.dtype).normal_(0, std))
    return module


def build_expert(cfg: DiTConfig, device: torch.device) -> WanModel:
    with torch.device("meta"):
        model = WanModel(cfg)
    return random_weights(model.to(DTYPE), device).eval()


def switch_timing(expert: torch.nn.Module, device: torch.device) -> dict:
    """Seconds to move a whole expert to the device and back, as ExpertPair does at a switch
    (`.to()` from pageable host memory), and the same from pinned memory for comparison."""
    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    out = {"gb": sum(t.numel() * t.element_size() for t in expert.parameters()) / 1e9}
    out["to_device_pageable_s"] = timed(lambda: expert.to(device))
    out["to_host_pageable_s"] = timed(lambda: expert.to("cpu"))
    if device.type == "cuda":
        params = list(expert.parameters())
        pinned = [p.data.pin_memory() for p in params]
        on_device = []
        out["to_device_pinned_s"] = timed(lambda: on_device.extend(t.to(device, non_blocking=True) for t in pinned))
        out["to_host_pinned_s"] = timed(lambda: [h.copy_(d, non_blocking=True) for h, d in zip(pinned, on_device)])
        del pinned, on_device
    print("# whole-expert move: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
    return out


def cap_allocator(usable: int, device: torch.device) -> None:
    """Cap the CUDA caching allocator at `usable` bytes (the emulated card minus what it needs
    outside the allocator) and reset the peak; no cap when the GPU is not bigger."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    if usable < total:
        torch.cuda.set_per_process_memory_fraction(usable / total, device)
    torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def sizes(args, tiny_layers: int, tiny_video: tuple[int, int, int]) -> tuple[torch.device, DiTConfig, tuple]:
    """(device, model config, (frames, height, width)): A14B and the flags' video on the GPU, or
    with --dry-run the tiny model with `tiny_layers` blocks and `tiny_video` on the CPU."""
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run to check the code path on the CPU")
    if args.dry_run:
        return torch.device("cpu"), replace(TINY.dit, num_layers=tiny_layers), tiny_video
    return torch.device("cuda"), DiTConfig(), (args.frames, args.height, args.width)


def run(args) -> dict:
    cuda = not args.dry_run
    device, cfg, (frames, height, width) = sizes(args, 4, (9, 128, 192))
    card = int(args.card_gib * GIB)
    swap = args.swap if args.swap is not None else (min_swap_blocks(cfg, frames, height, width, card) if cuda else 2)
    if swap is None:
        raise SystemExit(f"the memory model says {frames}x{height}x{width} does not fit {args.card_gib} GiB "
                         "even with every block swapped")
    alloc = {name: os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    result = dict(machine=machine(device), alloc_conf=alloc, card_gib=args.card_gib, frames=frames,
                  height=height, width=width, steps=args.steps, vae_tile=args.vae_tile)
    print(f"# {result['machine']}")
    print(f"# card {args.card_gib} GiB: allocator cap {(card - CUDA_OVERHEAD) / GIB:.2f} GiB "
          f"(minus {CUDA_OVERHEAD / GIB:.1f} GiB CUDA context budget); {frames}x{height}x{width}, "
          f"{video_tokens(cfg, frames, height, width)} tokens, swap_blocks {swap}/{cfg.num_layers}", flush=True)

    t0 = time.perf_counter()
    expert = build_expert(cfg, device)
    result["build_s"] = time.perf_counter() - t0
    print(f"# built a random bf16 expert ({sum(p.numel() for p in expert.parameters()) / 1e9:.2f} B params) "
          f"in {result['build_s']:.0f} s", flush=True)
    if args.switch_timing:
        result["switch"] = switch_timing(expert, device)
    result["attention"] = set_attention_backend(expert, args.attention, device)
    if args.compile:  # the engine refuses compile with block swap (offload.expert_pair_options)
        expert_pair_options("block_swap" if swap else "swap_experts", swap, True, cfg.num_layers)
        problem = compile_blocks(expert, device)
        if problem:
            raise SystemExit(f"--compile: {problem}")
    result["compile"] = args.compile
    if cuda:
        cap_allocator(card - CUDA_OVERHEAD, device)

    g = torch.Generator().manual_seed(0)
    positive = torch.randn(args.text_tokens, cfg.text_dim, generator=g).to(DTYPE)
    negative = torch.randn(args.text_tokens, cfg.text_dim, generator=g).to(DTYPE)
    noise = make_noise(0, frames, height, width)
    result["out_of_memory_at_swap"] = []
    while True:  # the memory model's count first; if the cap is hit, 2 more blocks (one GPU sitting)
        experts = ExpertPair(expert, expert, device, swap_blocks=swap)  # boundary 0: only "high" runs
        marks = [time.perf_counter()]

        def on_step(info) -> None:
            if cuda:
                torch.cuda.synchronize(device)
            marks.append(time.perf_counter())
            print(f"step {info.index + 1}/{info.total}: {marks[-1] - marks[-2]:.2f} s", flush=True)

        try:
            latent = denoise(experts, positive, negative, noise, SamplerSettings(steps=args.steps, boundary=0.0),
                             on_step=on_step)
            break
        except (torch.cuda.OutOfMemoryError, OutOfMemory) as err:  # the engine names its own
            print(f"# out of memory with swap_blocks {swap}: {str(err).splitlines()[0]}", flush=True)
            result["out_of_memory_at_swap"].append(swap)
        experts.offload_all()  # outside the except block: the traceback no longer holds GPU tensors
        del experts
        if swap >= cfg.num_layers or args.compile:  # the engine refuses compile with block swap
            raise SystemExit(f"out of memory under the {args.card_gib} GiB cap with swap_blocks {swap}"
                             + (" and --compile" if args.compile else ", every block swapped"))
        swap = min(cfg.num_layers, swap + 2)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    result["swap_blocks"] = swap
    result["predicted_denoise_gib"] = estimate_peak_bytes(  # 0 swapped blocks is swap_experts (min_swap_blocks)
        cfg, frames, height, width, offload="block_swap" if swap else "swap_experts", swap_blocks=swap,
        text_tokens=args.text_tokens)["total"] / GIB
    steps_s = [b - a for a, b in zip(marks, marks[1:])]
    result.update(step_s=steps_s, denoise_peak_gib=peak_gib(device))
    experts.offload_all()
    del experts, expert
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    with torch.device("meta"):
        vae = WanVAE(VAEConfig() if cuda else TINY.vae)
    vae = random_weights(vae.to(DTYPE if cuda else torch.float32), device).to(device).eval()
    t0 = time.perf_counter()
    video = decode_to_video(vae, latent, tile_size=args.vae_tile if cuda else 16)
    result.update(decode_s=time.perf_counter() - t0, decode_peak_gib=peak_gib(device),
                  video_shape=list(video.shape), finite=bool(torch.isfinite(latent).all()))
    print(f"# swap_blocks {swap}; steady step {min(steps_s[1:] or steps_s):.2f} s; denoise peak "
          f"{fmt(result['denoise_peak_gib'])} GiB (predicted {result['predicted_denoise_gib']:.2f}); "
          f"decode {result['decode_s']:.1f} s, peak {fmt(result['decode_peak_gib'])} GiB; video {video.shape}")
    steps = SamplerSettings().steps
    print(f"# projected {steps}-step run on this card: {steps} x {min(steps_s[1:] or steps_s):.1f} s + decode "
          f"= {steps * min(steps_s[1:] or steps_s) + result['decode_s']:.0f} s" if cuda else "# dry run: OK")
    return result


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--card-gib", type=float, default=24.0, help="the card to emulate, GiB (default 24)")
    p.add_argument("--swap", type=int, default=None, help="swapped blocks (default: the memory model's minimum)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps to time (default 3; the first warms up)")
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--height", type=int, default=HEIGHT)
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--text-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--vae-tile", type=int, default=VAE_TILE,
                   help=f"VAE decode tile in latent pixels (default {VAE_TILE}, the decode node's tiled size)")
    p.add_argument("--attention", choices=BACKENDS, default="auto", help="attention backend (default auto)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (needs --swap 0)")
    p.add_argument("--switch-timing", action="store_true",
                   help="also time moving the whole expert to the GPU and back (pageable and pinned)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the code path")
    p.add_argument("--json", help="write the results here")
    return p


def run_cli(make_parser, bench) -> None:
    """Parse the flags, run, write --json: this script's main and bench_rank.py's."""
    args = make_parser().parse_args()
    result = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def main() -> None:
    run_cli(parser, run)


if __name__ == "__main__":
    main()
