"""The CLI on P ranks: `torchrun --nproc_per_node P -m wan22_core generate --ulysses P --fsdp ...`.

torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (multi-node with its usual rendezvous flags). Every rank loads its shards and runs
the same loop; rank 0 encodes the prompt on the CPU (as the one-process CLI does) and
broadcasts the embeddings, and rank 0 alone decodes and writes the outputs. LoRAs are merged
into each rank's shards while it reads them; --attention applies on every rank.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .plan import ParallelPlan, backend_for


def parallel_requested(args) -> bool:
    """Parallel flags given, or started by torchrun with more than one process."""
    return args.ulysses > 1 or args.fsdp or args.cfg_parallel or int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(name: str) -> torch.device:
    """--device for this rank: CUDA ranks use GPU LOCAL_RANK, CPU ranks the CPU."""
    from ..runtime import resolve_device

    device = resolve_device(name)
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_parallel_options(args) -> None:
    """Refuse the one-process options the ranks do not implement, before anything starts."""
    refused = [flag for flag, given in (("--compile", args.compile), (f"--offload {args.offload}", args.offload != "auto"),
                                        (f"--swap-blocks {args.swap_blocks}", args.swap_blocks)) if given]
    if refused:
        raise ValueError(f"{', '.join(refused)}: one-process options, not supported with --ulysses/--fsdp/"
                         "--cfg-parallel (--fsdp already spreads both experts over the GPUs); drop them")
    if args.cfg_parallel and not args.batch_cfg:
        raise ValueError("--no-batch-cfg and --cfg-parallel do not combine: CFG-parallel splits the batched "
                         "cond/uncond pair over two halves of the ranks; drop one")


def plan_from_args(args, world_size: int, num_heads: int) -> ParallelPlan:
    return ParallelPlan(world_size=world_size, ulysses=args.ulysses, cfg_parallel=2 if args.cfg_parallel else 1,
                        fsdp=args.fsdp, reshard_after_forward=not args.keep_gathered, num_heads=num_heads)


def _encode_on_rank0(args, files, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 runs the text encoder (11 GB at full size: once, not once per rank) and broadcasts."""
    payload = [None]
    if dist.get_rank() == 0:
        from ..cli import encode_prompt

        embeds = encode_prompt(args, files)
        payload = [(embeds.positive, embeds.negative)]
    dist.broadcast_object_list(payload, src=0, device=device)
    return payload[0]


def run_distributed(args, files) -> dict:
    """This rank's part of `generate`; returns the stage timings (printed on rank 0 only)."""
    from ..cli import check_model_options, denoise_video, sampler_settings, save_outputs, stage
    from ..checkpoints import expert_config
    from ..runtime import check_backend, resolve_dtype
    from .loading import load_expert_pair
    from .mesh import init_groups

    check_parallel_options(args)  # refuses --compile, --offload and --swap-blocks: no expert_placement here
    check_model_options(args)  # attention package, LoRA files: once, not on every rank after loading
    if "RANK" not in os.environ:
        raise ValueError("--ulysses, --fsdp and --cfg-parallel run under torchrun: "
                         "torchrun --nproc_per_node N -m wan22_core generate ... (see docs/multigpu.md)")
    plan = plan_from_args(args, int(os.environ["WORLD_SIZE"]), expert_config(files.high_noise).num_heads)
    settings = sampler_settings(args)
    device = local_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the default for every allocation and for NCCL on this rank
    backend = backend_for([str(device)])
    check_backend(backend)  # a clear line, not a traceback, when this torch build lacks it
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        rank0 = dist.get_rank() == 0
        timings: dict[str, float] = {}
        timed = stage if rank0 else (lambda name, timings: nullcontext())
        groups = init_groups(plan, device)
        with timed("text encoder", timings):
            positive, negative = _encode_on_rank0(args, files, device)
        with timed("load experts", timings):
            experts = load_expert_pair(files.high_noise, files.low_noise, groups, device, dtype, args.lora_high,
                                       args.lora_low, attention=args.attention)  # LoRAs merged into the shards
        with timed("denoise", timings):
            latent = denoise_video(args, experts, positive, negative, settings, show_progress=rank0)
            del experts
        if rank0:
            save_outputs(args, files, latent, device, dtype, timings)
        # leave together: a rank that tears its process groups down while rank 0 still writes the
        # video can abort in gloo's threads ("terminate called without an active exception")
        dist.barrier()
        return timings
    finally:
        dist.destroy_process_group()
