"""Mixture-of-experts routing and per-expert guidance: which expert runs a step, and its CFG.

Wan2.2 A14B has two full experts: the high-noise one lays out motion and composition, the
low-noise one refines detail. Which one runs depends only on the timestep. Where the experts
live (one GPU, host memory, shards) is `placement.py`'s business, not this module's.
"""
from __future__ import annotations

import torch

from ..config import NUM_TRAIN_TIMESTEPS, SamplerSettings

HIGH, LOW = "high", "low"


def select_expert(timestep: int, boundary: float) -> str:
    """High-noise expert iff timestep >= boundary * 1000 (official: int timestep >= 875.0)."""
    return HIGH if timestep >= boundary * NUM_TRAIN_TIMESTEPS else LOW


def guidance_scale(expert: str, settings: SamplerSettings) -> float:
    return settings.cfg_high if expert == HIGH else settings.cfg_low


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + g * (cond - uncond)."""
    return uncond + scale * (cond - uncond)
