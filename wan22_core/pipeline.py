"""Noise, the MoE denoising loop, and (with text encoder and VAE) prompt -> video.

`denoise` is a pure function of its inputs: experts, embeddings, noise, settings. Progress,
previews and cancellation go through plain callbacks, so ComfyUI nodes, the CLI and the
multi-GPU workers wrap the same loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import (MAX_FRAMES, MAX_SIDE, SIDE_STEP, STRIDE_S, STRIDE_T, Z_DIM, DiTConfig, SamplerSettings,
                     is_integer)
from .errors import Cancelled, NumericalError, OutOfMemory, is_out_of_memory
from .models.attention import inexact_backend
from .models.vae import WanVAE, denormalize_latent, to_images
from .sampling.moe import apply_guidance, guidance_scale, select_expert
from .sampling.schedule import partial_schedule
from .sampling.solvers import make_solver
from .sampling.step_cache import StepCache


def check_video_size(frames: int, height: int, width: int) -> None:
    """Raise a ValueError naming the first bad size argument and the allowed values."""
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not is_integer(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    frames, height, width = int(frames), int(height), int(width)  # numpy too: no uint8 wrap-around below
    if frames < 1 or (frames - 1) % STRIDE_T:
        below = max(1, (frames - 1) // STRIDE_T * STRIDE_T + 1)
        raise ValueError(f"frames must be 4k+1 (1, 5, ..., 77, 81, ...), got {frames}; "
                         f"the nearest valid values are {below} and {below + STRIDE_T}")
    if frames > MAX_FRAMES:
        raise ValueError(f"frames must be at most {MAX_FRAMES}, got {frames}")
    for name, value in (("height", height), ("width", width)):
        if value < SIDE_STEP or value % SIDE_STEP or value > MAX_SIDE:
            raise ValueError(f"{name} must be a multiple of {SIDE_STEP} between {SIDE_STEP} and {MAX_SIDE}, "
                             f"got {value}")


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[16, T_lat, H/8, W/8] for a video of `frames` x `height` x `width` pixels."""
    check_video_size(frames, height, width)
    frames, height, width = int(frames), int(height), int(width)
    return (Z_DIM, (frames - 1) // STRIDE_T + 1, height // STRIDE_S, width // STRIDE_S)


def video_size(latent: tuple[int, ...]) -> tuple[int, int, int]:
    """(frames, height, width) of the video a latent [..., T, H/8, W/8] decodes to (latent_shape's inverse)."""
    t, h, w = latent[-3:]
    return (t - 1) * STRIDE_T + 1, h * STRIDE_S, w * STRIDE_S


def latent_tokens(shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> int:
    """Tokens the DiT makes of a latent [..., T, h, w]: one per (t, h, w) `patch_size` patch."""
    t, h, w = shape[-3:]
    pt, ph, pw = patch_size
    return (t // pt) * (h // ph) * (w // pw)


def make_noise(seed: int, frames: int, height: int, width: int) -> torch.Tensor:
    """The noise contract: a CPU generator, float32, shape (16, T_lat, H/8, W/8).

    Same seed -> same noise on every machine, so CPU, one GPU and N GPUs start identically.
    """
    if not (is_integer(seed) and 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(latent_shape(frames, height, width), generator=g, dtype=torch.float32)


def video_seed(seed: int, index: int) -> int:
    """The seed of video `index` of a batch: seed + index, as ComfyUI seeds batch items (wrapping at 2**64)."""
    return (seed + index) % 2**64


class Experts(Protocol):
    """What the loop needs of an expert holder: the expert for a step (placed where it computes),
    that device, and both experts by name as they are (for error messages; reading them moves
    nothing). One process: `placement.ExpertPair`; FSDP ranks: `parallel.fsdp.ShardedExperts`."""

    device: torch.device
    experts: dict[str, nn.Module]

    def get(self, name: str) -> nn.Module: ...

    def agree_to_reuse(self, reuse: bool) -> bool:
        """The step cache's vote: True iff every holder sharing this one's collectives would reuse
        the step (replicas under FSDP); a holder that samples alone returns `reuse`."""
        ...


@dataclass(frozen=True)
class StepInfo:
    """What a progress/preview callback sees after each step."""

    index: int  # 0-based step just finished
    total: int
    timestep: int
    expert: str  # "high" or "low"
    latent: torch.Tensor  # [16, T, h, w] after the step
    denoised: torch.Tensor  # [16, T, h, w] the model's clean-latent estimate at this step (previews)
    model_ran: bool = True  # False: no model pass, the step reused its expert's last transformation (step cache)


def stack_contexts(*contexts: torch.Tensor) -> torch.Tensor:
    """[L_i, D] tensors -> [n, max L_i, D], zero-padded (the model zero-pads to 512 anyway)."""
    longest = max(c.shape[0] for c in contexts)
    return torch.stack([F.pad(c, (0, 0, 0, longest - c.shape[0])) for c in contexts])


def predict_velocity(model, x, timestep, cond, uncond, scale: float, batch_cfg: bool) -> torch.Tensor:
    """Guided flow prediction for one latent x [16, T, h, w]; skips the uncond pass when g == 1."""
    t = torch.tensor([timestep], device=x.device)
    if scale == 1.0:  # distilled (e.g. 4-step LoRA) sampling: guidance is a no-op, save half
        return model(x[None], t, cond[None])[0]
    if batch_cfg:  # one batch-2 forward: fewer kernel launches and one pass over the weights
        both = model(x[None].expand(2, *x.shape), t.expand(2), stack_contexts(cond, uncond))
        return apply_guidance(both[0], both[1], scale)
    return apply_guidance(model(x[None], t, cond[None])[0], model(x[None], t, uncond[None])[0], scale)


def denoise(
    experts: Experts,
    positive: torch.Tensor,
    negative: torch.Tensor,
    noise: torch.Tensor,
    settings: SamplerSettings = SamplerSettings(),
    *,
    latent: torch.Tensor | None = None,
    denoise_strength: float = 1.0,
    batch_cfg: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run the two-expert flow-matching loop and return the final latent [16, T, h, w] float32.

    positive/negative: text embeddings [L, text_dim] (trimmed or zero-padded). noise: the
    initial noise (see `make_noise`). latent: an optional starting latent (normalised space,
    same shape as noise); with denoise_strength < 1 the loop starts part-way down the schedule
    from that latent noised to the first sigma, as ComfyUI's samplers do.

    Running out of memory raises OutOfMemory (after freeing this run's tensors) naming the
    settings that would make it fit.
    """
    settings.validate()
    _check_inputs(positive, negative, noise, latent, denoise_strength)
    schedule = partial_schedule(settings.steps, settings.shift, settings.solver, denoise_strength)
    position = _Position(total=len(schedule.timesteps))
    try:
        return _sample(experts, positive, negative, noise, latent, settings, schedule, batch_cfg, on_step,
                       should_cancel, position)
    except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(err):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300].rstrip(". ")
    # Raised outside the except block: its traceback held every frame of the failed step, and
    # with them the activations; now they are gone and the allocator can give the memory back.
    release_cached_memory(experts.device)
    raise OutOfMemory(_out_of_memory_message(position, noise, experts.device, batch_cfg, reason))


@dataclass
class _Position:
    """Where the loop is, for the out-of-memory message."""

    total: int
    step: int = 0  # 1-based step being computed; 0 before the first
    expert: str = ""


def _check_inputs(positive, negative, noise, latent, denoise_strength) -> None:
    for name, embeds in (("positive", positive), ("negative", negative)):
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2:
            shape = list(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must be text embeddings [tokens, dim] (from the text encoder), got {shape}")
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4 or noise.shape[0] != Z_DIM:
        shape = list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must have shape [{Z_DIM}, latent frames, height/8, width/8] (see make_noise), "
                         f"got {shape}")
    if latent is None and denoise_strength != 1.0:
        raise ValueError(f"denoise {denoise_strength} < 1 needs an input latent to start from; "
                         "connect a latent or set denoise to 1.0")
    if latent is not None and tuple(latent.shape) != tuple(noise.shape):
        raise ValueError(f"input latent has shape {tuple(latent.shape)}, expected {tuple(noise.shape)} "
                         f"([16 channels, latent frames, height/8, width/8]) to match the requested size")


def _sample(experts, positive, negative, noise, latent, settings, schedule, batch_cfg, on_step, should_cancel,
            position: _Position) -> torch.Tensor:
    """The step loop; every device tensor of the run lives in this frame or below it."""
    solver = make_solver(settings.solver, schedule.sigmas)
    device, dtype = experts.device, torch.float32

    x = noise.to(device, dtype)
    if latent is not None:
        sigma0 = float(schedule.sigmas[0])
        x = sigma0 * x + (1.0 - sigma0) * latent.to(device, dtype)
    cond, uncond = positive.to(device), negative.to(device)

    total = position.total
    # Every rank of a replica builds the same cache and decides alike from replicated values; the
    # replicas vote through the holder (sampling/step_cache.py's docstring).
    cache = StepCache(settings.step_cache, agree=experts.agree_to_reuse)
    for i, t in enumerate(schedule.timesteps.tolist()):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled before step {i + 1}/{total}")
        expert = select_expert(t, settings.boundary)
        position.step, position.expert = i + 1, expert
        scale = guidance_scale(expert, settings)
        with torch.no_grad():
            # called inside `velocity`, so x and t are this step's: a skipped step fetches no expert
            v = cache.velocity(expert, x, lambda: predict_velocity(experts.get(expert), x, t, cond, uncond, scale,
                                                                   batch_cfg), last=i == total - 1)
            denoised = x - float(schedule.sigmas[i]) * v
            x = solver.step(v, x)
        if not torch.isfinite(x).all():
            raise NumericalError(_non_finite_message(i, total, t, expert, experts.experts[expert]))
        if on_step is not None:
            on_step(StepInfo(i, total, t, expert, x, denoised, model_ran=cache.ran[-1]))
    return x


def _non_finite_message(index: int, total: int, timestep: int, expert: str, model: nn.Module) -> str:
    """The loop's NaN/Inf error; it names the attention backend when that one is not exact."""
    where = f"NaN/Inf in the latents after step {index + 1}/{total} (timestep {timestep}, {expert}-noise expert)"
    backend = inexact_backend(model)
    if backend is not None:
        return (f"{where}; the {backend!r} attention backend is not exact and can overflow: choose attention "
                "'sdpa' (CLI --attention sdpa)")
    return f"{where}; the weights or the dtype overflowed: try bf16 instead of fp16, or check the checkpoint"


def release_cached_memory(device: torch.device) -> None:
    """Hand the CUDA caching allocator's free blocks back to the driver (a no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _out_of_memory_message(position: _Position, noise: torch.Tensor, device, batch_cfg: bool, reason: str) -> str:
    frames, height, width = noise.shape[1:]
    tokens = latent_tokens(noise.shape, DiTConfig().patch_size)
    where = (f"at step {position.step}/{position.total} ({position.expert}-noise expert)" if position.step
             else "before the first step")
    knobs = ["fp8 weights (loader weight_dtype fp8_e4m3fn, or an fp8_scaled checkpoint)",
             "offloading (offload swap_experts, or block_swap with more swap_blocks; CLI --offload, --swap-blocks)",
             "a smaller width/height or fewer frames"]
    if batch_cfg:
        knobs.append("unbatched CFG (batch_cfg=False, CLI --no-batch-cfg: the two passes one after the other)")
    knobs.append("more GPUs (the multi-GPU sampler, or torchrun with --ulysses and --fsdp)")
    return (f"out of memory {where} on {device} with a {tokens}-token video (latent {[Z_DIM, frames, height, width]}): "
            f"{reason}. The run's tensors were freed. To fit, try: {'; '.join(knobs)}")


def decode_to_video(vae: WanVAE, latent: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
    """Normalised latent [16, T, h, w] (the engine's) -> frames [4(T-1)+1, 8h, 8w, 3] float in [0, 1] (CPU)."""
    # de-normalised in fp32, before the VAE's dtype (as WanVAE.decode does)
    return decode_raw_to_video(vae, denormalize_latent(latent[None].float())[0], tile_size)


def decode_raw_to_video(vae: WanVAE, raw: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
    """Raw VAE latent [16, T, h, w] (ComfyUI's LATENT space) -> frames, as `decode_to_video`."""
    with torch.no_grad():
        return to_images(vae.decode_raw(raw[None].to(next(vae.parameters()).device), tile_size=tile_size)).cpu()
