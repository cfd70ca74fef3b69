"""diffusers' Wan2.2 as our independent reference, set up one way for every test and benchmark.

`diffusers_twin` is WanTransformer3DModel holding our model's weights (official -> diffusers
names); `wan_pipeline` is WanPipeline with the two experts (transformer, transformer_2,
boundary_ratio) and diffusers' UniPC given the official sampling grid; `run_wan_pipeline` calls it
the way our `denoise` is called (embeddings zero-padded to 512 slots, our noise as its latents).

diffusers is imported only by what uses it: test_parallel's rank processes import this module
for `rel_l2` alone.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from wan22_core.checkpoints.keymaps import dit_official_to_diffusers
from wan22_core.config import DiTConfig, SamplerSettings
from wan22_core.sampling.schedule import UNIPC_SIGMA_MAX

if TYPE_CHECKING:
    from diffusers import WanPipeline, WanTransformer3DModel


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64: the measure every parity tolerance in the tests is stated in."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def float64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D)) v in float64 on [B, L, heads, D], and the log-sum-exp of the scaled
    logits [B, heads, Lq]; key_lens[b] keys of batch item b are attended (None: all)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if key_lens is not None:
        masked = torch.arange(k.shape[1])[None, :] >= key_lens[:, None]  # [B, Lk]
        scores = scores.masked_fill(masked[:, None, None, :], -float("inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()), scores.logsumexp(-1)


def diffusers_twin(cfg: DiTConfig, model: torch.nn.Module) -> WanTransformer3DModel:
    """diffusers' model of the same configuration, loaded (strictly) with `model`'s weights."""
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg.eps)
    ref.load_state_dict({dit_official_to_diffusers(k): v for k, v in model.state_dict().items()}, strict=True)
    return ref.eval()


@functools.cache
def _official_grid_unipc() -> type:
    from diffusers import UniPCMultistepScheduler

    class OfficialGridUniPC(UniPCMultistepScheduler):
        """diffusers' UniPC handed the official unshifted grid (its own default starts at 1.0)."""

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
            grid = np.linspace(UNIPC_SIGMA_MAX, 0, num_inference_steps + 1)[:-1]
            super().set_timesteps(device=device, sigmas=grid)

    return OfficialGridUniPC


def __getattr__(name: str):
    """`OfficialGridUniPC`, a diffusers subclass, is defined on first use (see the module docstring)."""
    if name == "OfficialGridUniPC":
        return _official_grid_unipc()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def wan_pipeline(cfg: DiTConfig, high: torch.nn.Module, low: torch.nn.Module,
                 settings: SamplerSettings) -> WanPipeline:
    """WanPipeline over twins of our two experts, switching at settings.boundary."""
    from diffusers import WanPipeline

    scheduler = _official_grid_unipc()(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=settings.shift, num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                       transformer=diffusers_twin(cfg, high), transformer_2=diffusers_twin(cfg, low),
                       boundary_ratio=settings.boundary)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pad_text(embeds: torch.Tensor, text_len: int = 512) -> torch.Tensor:
    """[L, dim] text embeddings -> [1, text_len, dim] zero-padded, as diffusers takes them."""
    return torch.nn.functional.pad(embeds, (0, 0, 0, text_len - embeds.shape[0]))[None]


def run_wan_pipeline(pipe: WanPipeline, positive: torch.Tensor, negative: torch.Tensor, noise: torch.Tensor,
                     settings: SamplerSettings, frames: int, height: int, width: int,
                     text_len: int = 512) -> torch.Tensor:
    """The final latent [16, T, h, w] of `pipe` for the inputs `denoise` takes."""
    pad = lambda c: pad_text(c, text_len)  # noqa: E731
    return pipe(prompt_embeds=pad(positive), negative_prompt_embeds=pad(negative), height=height, width=width,
                num_frames=frames, num_inference_steps=settings.steps, guidance_scale=settings.cfg_high,
                guidance_scale_2=settings.cfg_low, latents=noise[None].clone(), output_type="latent",
                return_dict=False)[0][0]
