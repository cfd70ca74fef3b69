"""Wan22MultiGPUConfig and the multi-GPU paths of the sampler and the VAE decode (wan22_core.parallel's
worker group).

The config node validates devices and degrees (`parallel_config`, which also chooses the split
left at 0) when it runs, before any process starts. The sampler then runs its batch of videos on
the persistent worker group (side by side on the replicas, if the split leaves any): started on
the first run, kept across prompts, rebuilt when the model spec or the config changes or after
a fault. Each rank's status goes to the sampler's status line through the adapter, and the
split's one-line description to the sampler's `ui` output. The VAE decode with the same config
decodes on that group, each rank a band of the rows. The seconds of each stage (start, load,
sampling, decode) go to the log.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import torch

from ..wan22_core.config import A14B, SamplerSettings
from ..wan22_core.lora import LoraReport
from ..wan22_core.optimize import compile_allowed
from ..wan22_core.parallel import (Job, ModelSpec, ParallelConfig, WorkerGroup, check_parallel_options, parallel_config,
                                   valid_ulysses_degrees)
from ..wan22_core.parallel.vae_decode import can_split_rows
from ..wan22_core.parallel.plan import MAX_CPU_RANKS, memory_lines
from ..wan22_core.pipeline import latent_tokens, video_size
from . import comfy_adapter
from .loaders import CATEGORY, EXPERT_NAMES, MoEModel, release_cached_experts

log = logging.getLogger(__name__)


class Wan22MultiGPUConfig:
    DESCRIPTION = ("Runs Wan22MoESampler on several GPUs (connect to its parallel input): each GPU holds 1/N of "
                   "both experts (FSDP) and a share of the video tokens (Ulysses x Ring; any GPU count). The "
                   "worker processes start on the first run and stay up between prompts; a changed setting or "
                   "model restarts them. After a run the node shows the split and what one GPU needs at 720p and "
                   "480p in bf16 and fp8.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WAN22_PARALLEL",)
    RETURN_NAMES = ("parallel",)
    OUTPUT_TOOLTIPS = ("The validated devices and degrees, for Wan22MoESampler's parallel input.",)
    FUNCTION = "configure"

    @classmethod
    def INPUT_TYPES(cls):
        heads = A14B.dit.num_heads
        return {"required": {
            "gpus": ("STRING", {"default": "all", "tooltip":
                     "Which GPUs: all, a list of CUDA indices like 0,1,2,3, or cpu:N for N CPU processes "
                     "(no GPU needed; slow, for trying the setup)."}),
            "ulysses_degree": ("INT", {"default": 0, "min": 0, "max": heads, "step": 1, "tooltip":
                               "Ulysses degree (all-to-all over heads, the cheapest split); 0 = auto: the largest "
                               f"that fits. It must divide the {heads} attention heads: "
                               f"{', '.join(map(str, valid_ulysses_degrees(heads)))}."}),
            "ring_degree": ("INT", {"default": 0, "min": 0, "max": MAX_CPU_RANKS, "step": 1, "tooltip":
                            "Ring-attention degree (K/V blocks passed around a ring; any count, e.g. 3 GPUs); "
                            "0 = auto: the GPUs Ulysses leaves. With both set, GPUs left over sample other "
                            "videos of the sampler's batch side by side."}),
            "fsdp": ("BOOLEAN", {"default": True, "tooltip":
                     "Shard both experts' weights across the GPUs (each holds 1/N); off: every GPU holds whole "
                     "experts."}),
            "cfg_parallel": ("BOOLEAN", {"default": False, "tooltip":
                             "Run the positive and the negative pass on two halves of the GPUs (an even GPU "
                             "count; no gain when cfg is 1)."}),
        }, "optional": {  # optional, so API prompts written before it existed stay valid
            "batch_cfg": ("BOOLEAN", {"default": True, "tooltip":
                          "Run the positive and the negative pass as one batch (faster). Off: one after the "
                          "other, half the activation memory per GPU (e.g. 720p in fp8 on two 24 GB cards). "
                          "Not with cfg_parallel, which splits that batch."}),
        }}

    def configure(self, gpus: str, ulysses_degree: int, ring_degree: int, fsdp: bool, cfg_parallel: bool,
                  batch_cfg: bool = True):
        config = parallel_config(gpus, ulysses_degree, fsdp, cfg_parallel, ring_degree=ring_degree,
                                 batch_cfg=batch_cfg)
        return {"ui": {"memory": memory_lines(config)}, "result": (config,)}  # what one GPU needs, shown on the node


def model_spec(model: MoEModel, config: ParallelConfig) -> ModelSpec:
    """The worker group's view of the experts, after the one rule of what the ranks refuse
    (`check_parallel_options`, as under torchrun): nothing the loader asked for is ignored.
    compile without a toolchain warns once and runs eager, as on one GPU."""
    check_parallel_options(model.options, cfg_parallel=config.plan.cfg_parallel_enabled, ring=config.plan.ring)
    options = replace(model.options, compile=compile_allowed(model.options.compile, torch.device(config.devices[0]),
                                                             warnings.warn))
    return ModelSpec.from_options(model.high_noise, model.low_noise, options, model.loras_high, model.loras_low)


Reports = tuple[tuple[str, LoraReport], ...]  # (expert, what one LoRA patched)


def sample_on_group(config: ParallelConfig, model: MoEModel, embeds, jobs: list, settings: SamplerSettings,
                    denoise: float, progress, node_id: str | None) -> tuple[list[torch.Tensor], Reports]:
    """Run the (noise, start latent) jobs on the worker group, side by side on its replicas; the
    final latents (normalised, CPU) and the LoRA reports."""
    runtime = comfy_adapter.runtime
    spec = model_spec(model, config)
    ranks = config.plan.world_size

    def on_status(rank: int, status: str) -> None:
        runtime.send_status(node_id, rank, ranks, status)

    config.plan.check_tokens(latent_tokens(jobs[0][0].shape, A14B.dit.patch_size))  # before any process starts
    if config.backend == "nccl":
        runtime.free_memory()  # the workers allocate on GPUs where ComfyUI may hold models
    # validates the spec, and that the ranks can hold this video on these GPUs, before spawning
    group = WorkerGroup.get_or_create(spec, config, on_status, video=video_size(tuple(jobs[0][0].shape)))
    release_cached_experts()  # the workers hold the model now; an in-process copy would only take memory
    for rank in range(ranks):  # a kept group says nothing until it works: refresh the status line
        on_status(rank, "ready")
    batch = [Job(embeds.positive, embeds.negative, noise, settings, latent=start, denoise_strength=denoise)
             for noise, start in jobs]
    outputs = group.run_batch(batch, on_step=progress.on_round_step, should_cancel=runtime.interrupted)
    reports = tuple((EXPERT_NAMES[expert], report) for expert in ("high", "low")
                    for report in group.lora_reports[expert])
    log.info("wan22 worker group (%d ranks): %s", ranks, group.stage_line())
    return outputs, reports


def decode_on_group(config: ParallelConfig, vae, raw: torch.Tensor) -> torch.Tensor | None:
    """Frames [B*F, H, W, 3] decoded on the live worker group of `config`, each rank a band of the
    rows; None when there is no such group (the sampler starts it) or the latent is shorter than
    the rank count: then the caller decodes in this process, as without the input."""
    group, ranks = WorkerGroup.current(), config.plan.world_size
    if group is None or group.config != config or not group.alive:
        log.info("Wan22VAEDecode: no worker group runs for this parallel input (the sampler starts it); "
                 "decoding in this process")
        return None
    if not can_split_rows(vae, raw.shape[-2], ranks):
        log.info("Wan22VAEDecode: a latent %d rows high does not split over %d ranks; decoding in this process",
                 raw.shape[-2], ranks)
        return None
    runtime = comfy_adapter.runtime
    if config.backend == "nccl":
        runtime.free_memory()  # rank 0 decodes on a GPU where ComfyUI may hold models
    bar = runtime.progress_bar(raw.shape[0] * raw.shape[2])
    frames = group.decode(vae, raw, on_frame=lambda index, total: bar.update(index + 1),
                          should_cancel=runtime.interrupted)
    log.info("wan22 worker group (%d ranks): %s", ranks, group.stage_line())
    return frames


def release_gpu_group(device: torch.device) -> None:
    """Stop a worker group that holds GPU memory before this process computes on a GPU itself."""
    group = WorkerGroup.current()  # the one group this process drives, if any
    if group is not None and device.type == "cuda" and group.config.backend == "nccl":
        group.shutdown()
