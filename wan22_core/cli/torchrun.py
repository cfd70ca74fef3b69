"""`generate` on P ranks: `torchrun --nproc_per_node P -m wan22_core generate --ulysses P --fsdp ...`.

Every rank loads its shards and runs the same loop; rank 0 encodes the prompt on the CPU (as
the one-process CLI does, in --text-dtype) and broadcasts the embeddings, and rank 0 alone
decodes and writes the outputs (only the latents with --no-video). LoRAs are merged into each
rank's shards while it reads them; --attention applies on every rank. The process group is
`parallel.launch`'s; this module only reads the flags.
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext

from ..checkpoints import ModelFiles, expert_config
from ..parallel.launch import from_rank0, local_device, torchrun_group, torchrun_world_size, under_torchrun
from ..parallel.loading import load_expert_pair
from ..parallel.plan import ParallelPlan, check_parallel_options
from ..pipeline import make_noise
from ..runtime import resolve_dtype
from . import parser as flags
from .stages import check_model_options, denoise_video, encode_prompt, save_outputs, stage


def parallel_plan(args: argparse.Namespace, world_size: int, num_heads: int) -> ParallelPlan:
    """--ulysses / --cfg-parallel / --fsdp / --keep-gathered on `world_size` ranks."""
    return ParallelPlan(world_size=world_size, ulysses=args.ulysses, cfg_parallel=2 if args.cfg_parallel else 1,
                        fsdp=args.fsdp, reshard_after_forward=not args.keep_gathered, num_heads=num_heads)


def run_on_ranks(args: argparse.Namespace, files: ModelFiles) -> dict:
    """This rank's part of `generate`; returns the stage timings (printed on rank 0 only)."""
    check_parallel_options(flags.expert_options(args), cfg_parallel=args.cfg_parallel, batch_cfg=args.batch_cfg)
    check_model_options(args.attention, [*args.lora_high, *args.lora_low])  # once, not on every rank after loading
    if not under_torchrun():
        raise ValueError("--ulysses, --fsdp and --cfg-parallel run under torchrun: "
                         "torchrun --nproc_per_node N -m wan22_core generate ... (see docs/multigpu.md)")
    plan = parallel_plan(args, torchrun_world_size(), expert_config(files.high_noise).num_heads)
    settings = flags.sampler_settings(args)
    device = local_device(args.device)
    dtype, text_dtype = resolve_dtype(args.dtype, device), flags.text_dtype(args)
    with torchrun_group(plan, device) as groups:
        rank0 = groups.rank == 0
        timings: dict[str, float] = {}
        timed = stage if rank0 else (lambda name, timings: nullcontext())
        with timed("text encoder", timings):
            embeds = from_rank0(lambda: encode_prompt(files, args.prompt, args.negative_prompt, text_dtype), groups)
        with timed("load experts", timings):
            experts = load_expert_pair(files.high_noise, files.low_noise, groups, device, dtype, args.lora_high,
                                       args.lora_low, attention=args.attention)  # LoRAs merged into the shards
        with timed("denoise", timings):
            noise = make_noise(args.seed, args.frames, args.height, args.width)
            latent = denoise_video(experts, embeds.positive, embeds.negative, noise, settings,
                                   batch_cfg=args.batch_cfg, progress=rank0 and not args.quiet)
            del experts
        if rank0:
            save_outputs(latent, files.vae, device, dtype, flags.outputs(args), timings)
    return timings
