"""Shifted flow-matching noise schedules, bit-compatible with the official Wan2.2 schedulers.

A schedule is N+1 float32 sigmas (the solver math uses these, the last is 0) and N int64
timesteps (what the DiT sees and what the expert switch compares with the MoE boundary).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import MAX_STEPS, NUM_TRAIN_TIMESTEPS, check_schedule_args, is_real

# The official UniPC scheduler starts its grid at its first *training* sigma, 1 - 1/1000, which
# it stores in float32 and reads back with `.item()`: 0.9990000128746033, not 0.999. The extra
# digits matter, because they decide where some timesteps truncate.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


@dataclass(frozen=True)
class Schedule:
    sigmas: torch.Tensor  # float32 [N+1], shifted, descending, last is 0.0 (the solver math uses these)
    timesteps: torch.Tensor  # int64 [N], int(sigma' * 1000) truncated (model input + expert test)


def shift_sigmas(sigmas, shift: float):
    """Flow shift s*sigma / (1 + (s-1)*sigma): s > 1 spends more of the steps at high noise.

    Works on floats, numpy arrays and tensors. The operation order is the official one, so
    float64 inputs give bit-identical results.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_schedule(steps: int, shift: float, solver: str) -> Schedule:
    """The official sampling schedule of `steps` steps for `solver` ("unipc", "dpm++", "euler")."""
    check_schedule_args(steps, shift, solver)
    steps, shift = int(steps), float(shift)  # numpy scalars too: Python math below
    if solver == "unipc":
        # FlowUniPCMultistepScheduler.set_timesteps: linspace(sigma_max, 0, N+1)[:-1].
        unshifted = np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1]
    else:
        # get_sampling_sigmas (DPM++ path; Euler shares it): starts at exactly 1.0.
        unshifted = np.linspace(1.0, 0.0, steps + 1)[:steps]
    shifted = shift_sigmas(unshifted, shift)  # float64 [N]
    # Truncate (not round) from the float64 values, as `.to(torch.int64)` does officially.
    timesteps = torch.from_numpy((shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64))
    sigmas = torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))
    return Schedule(sigmas=sigmas, timesteps=timesteps)


def partial_schedule(steps: int, shift: float, solver: str, denoise: float) -> Schedule:
    """The last `steps` steps of a longer schedule, ComfyUI's meaning of `denoise`.

    denoise=0.5 with 10 steps builds the 20-step schedule and keeps its last (least noisy) 10,
    so sampling starts from a partly noised latent instead of pure noise.
    """
    if not (is_real(denoise) and 0.0 < denoise <= 1.0):
        raise ValueError(f"denoise must be a number in (0, 1], got {denoise!r}; use 1.0 for a full run")
    check_schedule_args(steps, shift, solver)  # before the steps / denoise arithmetic; flow_schedule checks again
    steps, denoise = int(steps), float(denoise)  # numpy scalars too: Python float math below
    if steps / denoise > MAX_STEPS:  # denoise d runs the last `steps` of a steps/d schedule, built in memory
        raise ValueError(f"denoise {denoise} with {steps} steps needs a schedule of steps / denoise = "
                         f"{steps / denoise:.0f} steps, more than {MAX_STEPS}; use denoise >= {steps / MAX_STEPS:g}")
    total = max(steps, int(steps / denoise))
    full = flow_schedule(total, shift, solver)
    if total == steps:
        return full
    return Schedule(sigmas=full.sigmas[-(steps + 1):].clone(), timesteps=full.timesteps[-steps:].clone())

