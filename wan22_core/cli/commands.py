"""`main` and the commands: demo, generate (one process here, or on torchrun's ranks), make-tiny.

`generate` reads like nanoGPT's sample.py: settings first, then load, encode, denoise, decode,
save, each stage timed. Errors exit non-zero with one line (no traceback unless --debug).
"""
from __future__ import annotations

import argparse
import sys

from ..checkpoints import ModelFiles, expert_config
from ..errors import Wan22Error
from ..experts import expert_dtypes, load_experts
from ..offload import expert_pair_options
from ..parallel.launch import torchrun_world_size
from ..pipeline import make_noise, video_seed
from ..runtime import default_cuda_allocator, resolve_device, resolve_dtype
from ..tiny import cached_tiny, make_tiny, tiny_config
from . import parser as flags
from .parser import build_parser
from .stages import check_model_options, denoise_video, encode_prompt, print_peak_memory, save_outputs, stage
from .torchrun import run_on_ranks


def run_here(args: argparse.Namespace, files: ModelFiles) -> dict:
    """`generate` in this process: load, encode, denoise, decode and save; returns the stage timings."""
    settings = flags.sampler_settings(args)
    device = resolve_device(args.device)
    options = flags.expert_options(args)
    check_model_options(args.attention, [*args.lora_high, *args.lora_low])
    expert_dtypes(options, device)  # --weight-dtype with --dtype
    expert_pair_options(options.offload, options.swap_blocks, options.compile,
                        expert_config(files.high_noise).num_layers)  # headers only: fail before any work
    timings: dict[str, float] = {}

    with stage("text encoder", timings):
        embeds = encode_prompt(files, args.prompt, args.negative_prompt, flags.text_dtype(args))
    with stage("load experts", timings):
        experts, reports = load_experts(files.high_noise, files.low_noise, options, device,
                                        loras=(args.lora_high, args.lora_low),
                                        video=(args.frames, args.height, args.width), warn=print_warning)
        for _, report in reports:
            if not report.unmatched:  # a report with unmatched keys is already logged as a warning
                print(f"  {report}", file=sys.stderr)
    with stage("denoise", timings):  # includes the compile on the first step with --compile
        latents = [denoise_video(experts, embeds.positive, embeds.negative,
                                 make_noise(video_seed(args.seed, index), args.frames, args.height, args.width),
                                 settings, batch_cfg=args.batch_cfg, progress=not args.quiet, report=True)
                   for index in range(args.videos)]  # one after another
        del experts
    save_outputs(latents, files.vae, device, resolve_dtype(args.dtype, device), flags.outputs(args), timings)
    print_peak_memory(device)
    return timings


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def parallel_requested(args: argparse.Namespace) -> bool:
    """Parallel flags given, or started by torchrun with more than one process."""
    return ((args.ulysses or 1) > 1 or (args.ring or 1) > 1 or args.fsdp or bool(args.cfg_parallel)
            or torchrun_world_size() > 1)


def cmd_demo(args: argparse.Namespace) -> int:
    timings: dict[str, float] = {}
    with stage("tiny models", timings):
        files = cached_tiny(args.cache_dir)
    timings.update(run_here(args, files))
    print(f"total {sum(timings.values()):.1f} s", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    flags.outputs(args)  # --no-video without --save-latents: before reading any file
    files = flags.model_files(args)
    files.check(vae=not args.no_video)  # every file in its slot, from headers: fail in seconds, not after loading
    if parallel_requested(args):
        run_on_ranks(args, files)
    else:
        run_here(args, files)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    cfg = tiny_config(dim=args.dim, layers=args.layers, heads=args.heads, ffn_dim=args.ffn_dim,
                      text_layers=args.text_layers)
    out = make_tiny(args.dir, args.format, cfg, args.seed, quant=args.quant)
    print(f"wrote a tiny {args.format}{f' {args.quant}' if args.quant else ''} model set to {out}")
    return 0


COMMANDS = {"demo": cmd_demo, "generate": cmd_generate, "make-tiny": cmd_make_tiny}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_cuda_allocator()  # before any CUDA work; torchrun ranks run this main too
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (Wan22Error, ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
