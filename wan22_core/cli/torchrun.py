"""`generate` on P ranks: `torchrun --nproc_per_node P -m wan22_core generate --fsdp ...`.

The split of the ranks comes from --ulysses / --ring / --cfg-parallel / --sp (what is not set is
chosen: `parallel.plan.choose_split`) and is printed in one line before any work. Every rank
loads its shards and runs the same loop. Rank 0 encodes the prompt on its CPU (in --text-dtype)
and broadcasts the embeddings; with GPU ranks it does so in a thread while the ranks read their
shards (the two overlap instead of adding up). With --videos N the replicas sample the videos
side by side (`parallel.replicas`). Every rank then decodes a band of each video's rows
(parallel.vae_decode; rank 0 alone with --vae-tile, or when the latent has fewer rows than there
are ranks), and rank 0 writes the outputs (only the latents with --no-video). LoRAs are merged
into each rank's shards while it reads them; --attention, --weight-dtype (fp8 and GGUF shards
stay quantised: FSDP moves their bytes) and --compile apply on every rank. A plan whose ranks
cannot hold the video on the smallest GPU stops before any work (`plan.check_plan_fits`). The process
group is `parallel.launch`'s; this module only reads the flags.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext

import torch

from ..checkpoints import ModelFiles, expert_config
from ..config import DiTConfig
from ..experts import expert_dtypes
from ..memory import video_tokens
from ..models.vae import WanVAE, denormalize_latent, to_images
from ..optimize import compile_allowed
from ..parallel.launch import (Rank0Task, cpu_threads_per_rank, local_device, ranks_per_node, smallest_device_memory,
                               torchrun_group, torchrun_world_size, under_torchrun)
from ..parallel.loading import load_expert_pair, rank_load
from ..parallel.plan import ParallelPlan, check_parallel_options, check_plan_fits, choose_split
from ..parallel.replicas import idle_replicas_note, sample_videos
from ..parallel.vae_decode import can_split_rows, decode_on_ranks
from ..pipeline import decode_to_video, make_noise, video_seed
from . import parser as flags
from .stages import check_model_options, denoise_video, encode_prompt, print_peak_memory, save_outputs, stage


def parallel_plan(args: argparse.Namespace, world_size: int, num_heads: int,
                  ranks_per_node: int | None = None) -> ParallelPlan:
    """--sp / --ulysses / --ring / --cfg-parallel / --fsdp / --keep-gathered on `world_size` ranks."""
    if args.sp == "off" and (args.ulysses or 1) * (args.ring or 1) > 1:
        raise ValueError(f"--sp off splits no sequence but --ulysses {args.ulysses or 1} --ring {args.ring or 1} "
                         "ask for one; drop one or the other")
    ulysses, ring = (1, 1) if args.sp == "off" else (args.ulysses or 0, args.ring or 0)
    guidance_batched = args.batch_cfg and args.cfg_high != 1.0 and args.cfg_low != 1.0
    cfg, ulysses, ring = choose_split(world_size, num_heads, ulysses=ulysses, ring=ring,
                                      cfg_parallel=args.cfg_parallel, guidance_batched=guidance_batched,
                                      ranks_per_node=ranks_per_node)
    return ParallelPlan(world_size=world_size, ulysses=ulysses, ring=ring, cfg_parallel=cfg, fsdp=args.fsdp,
                        reshard_after_forward=not args.keep_gathered, num_heads=num_heads)


def checked_plan(args: argparse.Namespace, dit: DiTConfig) -> ParallelPlan:
    """The plan for torchrun's ranks, refused now (before loading anything) when it cannot run."""
    plan = parallel_plan(args, torchrun_world_size(), dit.num_heads,
                         ranks_per_node())
    check_parallel_options(flags.expert_options(args), cfg_parallel=plan.cfg_parallel_enabled,
                           batch_cfg=args.batch_cfg, ring=plan.ring)
    plan.check_tokens(video_tokens(dit, args.frames, args.height, args.width))
    return plan


def run_on_ranks(args: argparse.Namespace, files: ModelFiles) -> dict:
    """This rank's part of `generate`; returns the stage timings (printed on rank 0 only)."""
    options = flags.expert_options(args)
    # the flags as given, so a wrong option is named even outside torchrun; checked_plan checks
    # again against the split it chooses (an automatic ring, CFG-parallel)
    check_parallel_options(options, cfg_parallel=bool(args.cfg_parallel), batch_cfg=args.batch_cfg,
                           ring=args.ring or 1)
    check_model_options(args.attention, [*args.lora_high, *args.lora_low])  # once, not on every rank after loading
    device = local_device(args.device)
    dtype, weight_dtype, fp8_matmul = expert_dtypes(options, device)
    if not under_torchrun():
        raise ValueError("--ulysses, --ring, --fsdp and --cfg-parallel run under torchrun: "
                         "torchrun --nproc_per_node N -m wan22_core generate ... (see docs/multigpu.md)")
    settings = flags.sampler_settings(args)
    plan = checked_plan(args, expert_config(files.high_noise))
    text_dtype = flags.text_dtype(args)
    outputs = flags.outputs(args)
    started = time.perf_counter()
    with torchrun_group(plan, device) as groups:
        rank0 = groups.rank == 0
        if rank0:
            print(plan.describe("GPU" if device.type == "cuda" else "CPU rank"), file=sys.stderr)
            idle = idle_replicas_note(args.videos, plan.replicas)
            if idle:
                print(f"warning: {idle}", file=sys.stderr)
        # before any work: every rank checks against the smallest GPU of all
        load = rank_load(files.high_noise, (args.frames, args.height, args.width), options, device, args.batch_cfg)
        check_plan_fits(plan, load, smallest_device_memory(groups))
        timings: dict[str, float] = {}
        timed = stage if rank0 else (lambda name, timings: nullcontext())
        compiling = compile_allowed(options.compile, device,
                                    lambda line: rank0 and print(f"warning: {line}", file=sys.stderr))
        encoding = Rank0Task(lambda: encode_on_rank0(files, args.prompt, args.negative_prompt, text_dtype, device),
                             groups, background=device.type == "cuda")
        with timed("load experts", timings):
            experts = load_expert_pair(files.high_noise, files.low_noise, groups, device, dtype, args.lora_high,
                                       args.lora_low, attention=args.attention,  # LoRAs merged into the shards
                                       weight_dtype=weight_dtype, fp8_matmul=fp8_matmul,
                                       compile=compiling)
        with timed("wait for text", timings):
            embeds = encoding.result()
        timings["text encoder"] = encoding.seconds
        if rank0:
            when = "while loading" if encoding.background else "before loading"
            print(f"  {'text encoder':<14} {encoding.seconds:7.2f} s  (rank 0's CPU, {when})", file=sys.stderr)
        with timed("denoise", timings):
            def sample(video: int, _round: int):
                noise = make_noise(video_seed(args.seed, video), args.frames, args.height, args.width)
                return denoise_video(experts, embeds.positive, embeds.negative, noise, settings,
                                     batch_cfg=args.batch_cfg, progress=rank0 and not args.quiet, report=rank0)

            latents = sample_videos(sample, groups, args.videos)
            del experts
        save_outputs(latents, files.vae, device, dtype, outputs, timings, writer=rank0,
                     loads_vae=rank0 or outputs.vae_tile is None, timed=timed,
                     decode=lambda vae, latent, tile: decode_on_ranks_stage(latent, vae, tile, rank0))
        if rank0:
            print_peak_memory(device)
            print(f"  {'total':<14} {time.perf_counter() - started:7.2f} s  ({plan.world_size} rank"
                  f"{'s' if plan.world_size > 1 else ''})", file=sys.stderr)
    return timings


def encode_on_rank0(files: ModelFiles, prompt: str, negative_prompt: str | None, dtype: torch.dtype | None,
                    device: torch.device):
    """The text encode on rank 0's CPU. With GPU ranks it gets the node's cores per rank instead of
    torchrun's one thread (the other ranks meanwhile read shards, and their GPUs compute); CPU
    ranks keep their share, they compute on the same cores."""
    if device.type == "cuda":
        torch.set_num_threads(cpu_threads_per_rank())  # this thread's OpenMP team: the encode's
    return encode_prompt(files, prompt, negative_prompt, dtype)


def decode_on_ranks_stage(latent: torch.Tensor, vae: WanVAE | None, vae_tile: int | None,
                          rank0: bool) -> torch.Tensor | None:
    """Frames on rank 0 (None elsewhere): every rank decodes a band of the rows, or, with --vae-tile
    (the user asked for rank 0's tiled decode) or a latent with fewer rows than ranks, rank 0 alone.
    `vae` is loaded once for all videos, on every rank that decodes (None on the others)."""
    ranks = torchrun_world_size()
    if vae_tile is None and can_split_rows(vae, latent.shape[-2], ranks):
        if rank0 and ranks > 1:
            print(f"  vae decode on {ranks} ranks, a band of rows each", file=sys.stderr)
        video = decode_on_ranks(vae, denormalize_latent(latent[None].float()))
        return None if video is None else to_images(video)
    if rank0 and vae_tile is None:
        print(f"  (a latent {latent.shape[-2]} rows high does not split over {ranks} ranks: rank 0 decodes it)",
              file=sys.stderr)
    return decode_to_video(vae, latent, tile_size=vae_tile) if rank0 else None
