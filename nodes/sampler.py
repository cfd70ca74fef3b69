"""Wan22MoESampler: text embeddings -> video latent, both experts in one node.

The node validates, converts ComfyUI's LATENT (raw VAE space) to the engine's normalised space
and back, and runs each video of the batch (a LATENT batch, or `videos` from noise) either here,
one after another (`wan22_core.pipeline.denoise`), or, with the `parallel` input connected, on
the multi-GPU worker group (`nodes/parallel.py`), side by side where its split leaves replicas. Progress,
previews and interrupts go through the ComfyUI adapter on both paths.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..wan22_core.config import (FRAMES, HEIGHT, MAX_FRAMES, MAX_SIDE, MAX_STEPS, MAX_VIDEOS, MIN_SHIFT, SIDE_STEP,
                                 SOLVERS, WIDTH, Z_DIM, SamplerSettings, VAEConfig)
from ..wan22_core.errors import Cancelled
from ..wan22_core.models.vae import denormalize_latent, normalize_latent
from ..wan22_core.parallel import ParallelConfig
from ..wan22_core.pipeline import check_video_size, latent_shape, make_noise, video_seed
from ..wan22_core.pipeline import denoise as run_denoise
from ..wan22_core.sampling.step_cache import passes_summary
from . import comfy_adapter
from .loaders import CATEGORY, MoEModel
from .parallel import release_gpu_group, sample_on_group
from .preview import latent_to_rgb

DEFAULTS = SamplerSettings()
SEED_MAX = 2**64 - 1  # make_noise takes any 64-bit seed, like ComfyUI's KSampler


def _int(default: int, lo: int, hi: int, step: int, tooltip: str) -> tuple:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def _float(default: float, lo: float, hi: float, step: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": 0.001, "tooltip": tooltip})


def start_latents(latent: dict | None, frames: int, height: int, width: int,
                  videos: int = 1) -> list[tuple[int, torch.Tensor | None]]:
    """(seed offset, normalised start latent [16, T, h, w] or None) for each video to sample.

    No latent: `videos` videos from pure noise, seeded seed, seed + 1, ... A LATENT batch: one
    video per item, seeded seed + batch_index (as ComfyUI numbers batch items), each checked
    against the size widgets.
    """
    if latent is None:
        return [(index, None) for index in range(videos)]
    if videos != 1:
        raise ValueError(f"videos={videos} is for sampling from noise; with a latent connected its batch decides "
                         "how many videos: set videos to 1")
    samples = latent["samples"]
    if "noise_mask" in latent:
        raise ValueError("the latent has a noise_mask (inpainting); Wan22MoESampler samples whole videos, "
                         "so connect a latent without a mask")
    if samples.ndim != 5 or samples.shape[1] != Z_DIM:
        raise ValueError(f"latent must be a Wan2.1 video latent [batch, 16, frames, height/8, width/8], got shape "
                         f"{list(samples.shape)}; use EmptyHunyuanLatentVideo or VAEEncode with wan_2.1_vae")
    t, h, w = samples.shape[2:]
    if (Z_DIM, t, h, w) != latent_shape(frames, height, width):
        stride_t, stride_s, _ = VAEConfig().stride  # frames / pixels per latent position
        raise ValueError(f"the latent holds {(t - 1) * stride_t + 1} frames of {w * stride_s}x{h * stride_s} but "
                         f"width/height/frames ask for {frames} frames of {width}x{height}; "
                         "set them to match the latent")
    offsets = latent.get("batch_index", list(range(samples.shape[0])))
    normalised = normalize_latent(samples.float().cpu())
    return [(int(offset), z) for offset, z in zip(offsets, normalised, strict=True)]


class _Progress:
    """Maps the engine's per-step callback onto one ComfyUI progress bar over the whole batch:
    `rounds` runs of `steps` (one video per round here, one per replica on a worker group), and
    counts the model passes that ran (the step cache's report; on a worker group, rank 0's videos)."""

    def __init__(self, runtime, steps: int, rounds: int):
        self.bar = runtime.progress_bar(steps * rounds)
        self.previews = runtime.previews_enabled()
        self.steps = steps
        self.passes_run = 0  # over the batch
        self.steps_done = 0

    def on_round_step(self, round_index: int, info) -> None:
        self.passes_run += info.model_ran
        self.steps_done += 1
        preview = latent_to_rgb(info.denoised) if self.previews else None
        self.bar.update(round_index * self.steps + info.index + 1, preview)


class Wan22MoESampler:
    DESCRIPTION = ("Samples a Wan2.2 A14B video: the high-noise expert runs the first steps (timestep >= boundary "
                   "x 1000) with cfg_high, the low-noise expert the rest with cfg_low. Outputs a LATENT in "
                   "ComfyUI's Wan convention, so native VAEDecode works on it too.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The video latent [batch, 16, (frames-1)/4+1, height/8, width/8] (raw VAE space).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        d = DEFAULTS
        return {
            "required": {
                "model": ("WAN22_MOE_MODEL", {"tooltip": "Both experts, from Wan22MoEModelLoader."}),
                "embeds": ("WAN22_EMBEDS", {"tooltip": "Positive and negative prompt, from Wan22TextEncode."}),
                "width": _int(WIDTH, SIDE_STEP, MAX_SIDE, SIDE_STEP,
                              f"Video width in pixels, a multiple of {SIDE_STEP}."),
                "height": _int(HEIGHT, SIDE_STEP, MAX_SIDE, SIDE_STEP,
                               f"Video height in pixels, a multiple of {SIDE_STEP}."),
                "frames": _int(FRAMES, 1, MAX_FRAMES, 4, "Number of frames, 4k+1 (81 = 5 s at 16 fps)."),
                "steps": _int(d.steps, 1, MAX_STEPS, 1, "Denoising steps in total, both experts together."),
                "cfg_high": _float(d.cfg_high, 0.0, 100.0, 0.1, "Guidance scale of the high-noise expert "
                                                               "(1.0 skips the negative prompt)."),
                "cfg_low": _float(d.cfg_low, 0.0, 100.0, 0.1, "Guidance scale of the low-noise expert."),
                "boundary": _float(d.boundary, 0.0, 1.0, 0.001, "Expert switch: steps whose timestep is >= "
                                                                "boundary x 1000 use the high-noise expert."),
                "shift": _float(d.shift, MIN_SHIFT, 100.0, 0.1, "Flow shift of the noise schedule; higher spends "
                                                            "more steps at high noise."),
                "solver": (list(SOLVERS), {"default": d.solver, "tooltip": "unipc is the official solver; "
                                                                         "dpm++ (2M) and euler also work."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed gives the same video on CPU and GPU."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Optional start latent (e.g. from VAEEncode); its size must "
                                                 "match width/height/frames. A batch gives one video per item."}),
                "denoise": _float(1.0, 0.01, 1.0, 0.01, "With a start latent: how much to change it (1.0 "
                                                        "samples from noise, lower keeps more of the latent)."),
                "parallel": ("WAN22_PARALLEL", {"tooltip": "Optional, from Wan22MultiGPUConfig: sample on several "
                                                           "GPUs (a worker group that stays up between prompts)."}),
                "videos": _int(1, 1, MAX_VIDEOS, 1, "Without a latent: how many videos, seeds seed, seed+1, ... "
                                                   "(one after another here; side by side on the replicas of a "
                                                   "multi-GPU split). Set Wan22SaveVideo's videos to match."),
                "step_cache": _float(d.step_cache, 0.0, 1.0, 0.01,
                                     "0 = off (exact). Above 0 the sampler reuses the model's last transformation "
                                     "while the estimated relative error stays below this: fewer model passes, not "
                                     "exact. Not the same scale as ComfyUI's EasyCache node."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},  # addresses the worker status line to this node
        }

    def sample(self, model: MoEModel, embeds, width: int, height: int, frames: int, steps: int, cfg_high: float,
               cfg_low: float, boundary: float, shift: float, solver: str, seed: int, latent: dict | None = None,
               denoise: float = 1.0, parallel: ParallelConfig | None = None, videos: int = 1,
               step_cache: float = 0.0, unique_id: str | None = None):
        settings = SamplerSettings(steps=steps, shift=shift, boundary=boundary, cfg_high=cfg_high,
                                   cfg_low=cfg_low, solver=solver, step_cache=step_cache).validate()
        check_video_size(frames, height, width)
        starts = start_latents(latent, frames, height, width, videos)
        jobs = [(make_noise(video_seed(seed, offset), frames, height, width), start) for offset, start in starts]
        runtime = comfy_adapter.runtime
        replicas = 1 if parallel is None else parallel.plan.replicas
        progress = _Progress(runtime, steps, math.ceil(len(jobs) / replicas))
        try:
            if parallel is None:
                outputs, reports = sample_here(model, embeds, jobs, settings, denoise, progress,
                                               video=(frames, height, width))
            else:
                outputs, reports = sample_on_group(parallel, model, embeds, jobs, settings, denoise, progress,
                                                   unique_id)
        except Cancelled:
            runtime.raise_if_interrupted()  # inside ComfyUI: its "interrupted", not an error
            raise
        ui = {"lora_report": [lora_line(expert, r) for expert, r in reports],
              "step_cache": [passes_summary(progress.passes_run, progress.steps_done)] if settings.step_cache > 0
              else []}
        if parallel is not None:  # e.g. "6 GPUs: CFG 2 x Ulysses 1 x Ring 3", for a line under the node
            ui["parallel_split"] = [parallel.describe()]
        return {"ui": ui, "result": ({"samples": denormalize_latent(torch.stack(outputs))},)}


def sample_here(model: MoEModel, embeds, jobs: list, settings: SamplerSettings, denoise: float,
                progress: _Progress, video: tuple[int, int, int]) -> tuple[list[torch.Tensor], tuple]:
    """Each (noise, start latent) job in this process; the final latents (normalised, CPU) and LoRA reports."""
    runtime = comfy_adapter.runtime
    device = runtime.compute_device()
    runtime.free_memory()
    release_gpu_group(device)
    experts, reports = model.experts(device, video)
    outputs = []
    try:
        for index, (noise, start) in enumerate(jobs):  # one video per round
            outputs.append(run_denoise(experts, embeds.positive, embeds.negative, noise, settings, latent=start,
                                       denoise_strength=denoise,
                                       on_step=lambda info, index=index: progress.on_round_step(index, info),
                                       should_cancel=runtime.interrupted).cpu())
    finally:  # our weights are not ComfyUI-managed: give the GPU back between prompts
        experts.offload_all()
    return outputs, reports


def lora_line(expert: str, report) -> str:
    """One LoraReport as a short line for the sampler node (the full report is in the log)."""
    line = f"{expert}: {Path(report.path).name} x{report.strength:g}, {report.parameters} parameters patched"
    return line + (f", {len(report.unmatched)} tensors unmatched (see the log)" if report.unmatched else "")
