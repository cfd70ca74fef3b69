"""The stages of `generate` that one process and the torchrun ranks share, on plain values.

Encode, denoise, decode, write: each takes what it needs, never the argparse namespace, so the
torchrun path (`torchrun.py`) runs the same stages on each rank (rank 0 alone encodes and writes).
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..checkpoints import ModelFiles, load_text_encoder, load_vae
from ..config import SamplerSettings
from ..lora import LoraSpec
from ..memory import GIB
from ..models.attention import resolve_backend
from ..models.text_encoder import PromptEmbeds
from ..models.vae import WanVAE
from ..pipeline import Experts, StepInfo, decode_to_video, denoise
from ..sampling.step_cache import passes_summary
from ..video import write_mp4


@contextmanager
def stage(name: str, timings: dict):
    """Time one stage into `timings` (adding up repeats, e.g. one decode per video) and print it (stderr)."""
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start
    timings[name] = timings.get(name, 0.0) + took
    print(f"  {name:<14} {took:7.2f} s", file=sys.stderr)


def print_peak_memory(device: torch.device) -> None:
    """The CUDA allocator's peak over the run (what the card had to hold), on a GPU."""
    if device.type == "cuda":
        print(f"  {'peak memory':<14} {torch.cuda.max_memory_allocated(device) / GIB:7.2f} GiB", file=sys.stderr)


def check_model_options(attention: str, loras: Sequence[LoraSpec]) -> None:
    """Fail on the model flags now, not after the text encoder ran: attention package, LoRA files."""
    resolve_backend(attention)
    for lora in loras:
        if not lora.path.is_file():
            raise FileNotFoundError(f"LoRA file not found: {lora.path}")


def encode_prompt(files: ModelFiles, prompt: str, negative_prompt: str | None,
                  dtype: torch.dtype | None = None) -> PromptEmbeds:
    """The prompt and negative prompt through the text encoder in `dtype` (None: the file's), on
    the CPU (one process, or rank 0 under torchrun); the encoder (11 GB at full size in bf16) is
    dropped when this returns."""
    encoder = load_text_encoder(files.text_encoder, files.tokenizer, device="cpu", dtype=dtype)
    return encoder.encode_prompt(prompt, negative_prompt)


def denoise_video(experts: Experts, positive: torch.Tensor, negative: torch.Tensor, noise: torch.Tensor,
                  settings: SamplerSettings, *, batch_cfg: bool, progress: bool, report: bool) -> torch.Tensor:
    """The noise through the sampling loop, with a progress bar when `progress` (off with --quiet,
    and on torchrun ranks other than 0); with a step cache and `report` (rank 0), how many model
    passes ran."""
    bar = progress_bar(settings.steps) if progress else None
    ran: list[bool] = []

    def on_step(info: StepInfo) -> None:
        ran.append(info.model_ran)
        if bar is not None:
            bar.update(1)

    try:
        latent = denoise(experts, positive, negative, noise, settings, batch_cfg=batch_cfg, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    if report and settings.step_cache > 0:
        print(f"step cache: {passes_summary(sum(ran), len(ran))}", file=sys.stderr)
    return latent


def progress_bar(total: int) -> tqdm:
    return tqdm(total=total, desc="denoise", unit="step", file=sys.stderr)


@dataclass(frozen=True)
class Outputs:
    """Where a run's results go: the mp4, optionally the latents, and how the video is written."""

    video: Path | None  # None: no VAE decode, no mp4 (--no-video; the latents are the result)
    latents: Path | None = None  # safetensors, key "latents", [16, T, H/8, W/8] float32
    fps: int = 16
    vae_tile: int | None = None  # latent pixels per VAE tile; None decodes whole frames
    overwrite: bool = False
    videos: int = 1  # a batch of videos (seeds seed, seed + 1, ...) writes numbered files

    def numbered(self, index: int) -> "Outputs":
        """Video `index` of the batch: out.mp4 -> out_00001.mp4, and the latents likewise (one video: as given)."""
        if self.videos == 1:
            return self
        video, latents = (None if path is None else numbered_path(path, index) for path in (self.video, self.latents))
        return replace(self, video=video, latents=latents, videos=1)

    def check(self) -> None:
        """Fail on a bad count or an existing output before minutes of work (unless overwrite)."""
        if self.videos < 1:
            raise ValueError(f"--videos must be a whole number >= 1, got {self.videos!r}")
        for index in range(self.videos):
            numbered = self.numbered(index)
            for path in (numbered.video, numbered.latents):
                if path is not None and path.exists() and not self.overwrite:
                    raise FileExistsError(f"{path} exists; choose another name or pass --overwrite")


def numbered_path(path: Path, index: int) -> Path:
    """`path` with the 1-based video number appended as ComfyUI numbers its outputs: v.mp4 -> v_00001.mp4."""
    return path.with_name(f"{path.stem}_{index + 1:05d}{path.suffix}")


def save_latents(latent: torch.Tensor, outputs: Outputs) -> None:
    """--save-latents (key "latents", [16, T, H/8, W/8] float32, written atomically); with --no-video
    says that the latents are the result."""
    if outputs.latents is not None:
        outputs.latents.parent.mkdir(parents=True, exist_ok=True)
        tmp = outputs.latents.with_name(f".{outputs.latents.name}.partial")
        save_file({"latents": latent.float().cpu().contiguous()}, str(tmp))
        os.replace(tmp, outputs.latents)
    if outputs.video is None:
        print(f"wrote {outputs.latents} (latents {list(latent.shape)}; no video: --no-video)")


def load_decoder(vae_path: Path, device: torch.device, dtype: torch.dtype) -> WanVAE:
    """The VAE on `device` for decoding: fp32 on the CPU, the run's dtype on a GPU."""
    return load_vae(vae_path, torch.float32 if device.type == "cpu" else dtype).to(device)


def write_video(frames: torch.Tensor, outputs: Outputs, timings: dict) -> None:
    with stage("write mp4", timings):
        out = write_mp4(frames, outputs.video, fps=outputs.fps, overwrite=outputs.overwrite)
    print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {outputs.fps} fps)")


def save_outputs(latents: Sequence[torch.Tensor], vae_path: Path | None, device: torch.device, dtype: torch.dtype,
                 outputs: Outputs, timings: dict, *, writer: bool = True, loads_vae: bool = True,
                 decode: Callable | None = None, timed: Callable = stage) -> None:
    """Each video's latents (when asked), then its VAE decode and mp4 unless --no-video.

    One process takes the defaults. Under torchrun every rank calls it: `writer` (rank 0) saves
    and writes, `loads_vae` says whether this rank decodes, and `decode(vae, latent, tile)` gives
    the frames on the writer (None elsewhere); `timed` times on rank 0 only."""
    decode = decode or (lambda vae, latent, tile: decode_to_video(vae, latent, tile_size=tile))
    vae = None
    for index, latent in enumerate(latents):
        mine = outputs.numbered(index)
        if writer:
            save_latents(latent, mine)
        if mine.video is None:
            continue
        with timed("vae decode", timings):
            vae = vae or (load_decoder(vae_path, device, dtype) if loads_vae else None)
            frames = decode(vae, latent, mine.vae_tile)
        if writer:
            write_video(frames, mine, timings)
