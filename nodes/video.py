"""Wan22VAEDecode (LATENT -> IMAGE) and Wan22SaveVideo (IMAGE -> mp4 in ComfyUI's output folder)."""
from __future__ import annotations

import os

import torch

from ..wan22_core.config import FPS, MAX_VIDEOS, VAE_TILE, Z_DIM
from ..wan22_core.errors import Cancelled
from ..wan22_core.parallel import ParallelConfig
from ..wan22_core.pipeline import decode_raw_to_video
from ..wan22_core.video import unique_path, write_mp4
from . import comfy_adapter
from .loaders import CATEGORY
from .parallel import decode_on_group

SAVE_ATTEMPTS = 3  # another saver may take our file name between choosing and writing it


class Wan22VAEDecode:
    DESCRIPTION = ("Decodes a Wan2.1 video LATENT (ours or native, e.g. from KSampler) into frames. A batch of "
                   "videos becomes one frame sequence, as with native VAEDecode. With the parallel input, the "
                   "sampler's multi-GPU worker group decodes it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The frames [frames, height, width, 3], RGB in 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("WAN22_VAE", {"tooltip": "From Wan22VAELoader."}),
            "samples": ("LATENT", {"tooltip": "A Wan2.1 video latent [batch, 16, T, height/8, width/8]."}),
            "tiled": ("BOOLEAN", {"default": False, "tooltip": "Decode in 512 px tiles: much less memory at "
                                                                "720p, with blended seams (in this process)."}),
        }, "optional": {
            "parallel": ("WAN22_PARALLEL", {"tooltip": "Optional, the sampler's Wan22MultiGPUConfig: decode on its "
                                                       "worker group, each GPU a band of the rows (exact, 1/N of the "
                                                       "memory each)."}),
        }}

    def decode(self, vae, samples: dict, tiled: bool, parallel: ParallelConfig | None = None):
        raw = samples["samples"]
        if raw.ndim != 5 or raw.shape[1] != Z_DIM:
            raise ValueError(f"samples must be a Wan2.1 video latent [batch, 16, frames, height/8, width/8], got "
                             f"shape {list(raw.shape)}; image latents and 48-channel Wan2.2 5B latents do not fit")
        runtime = comfy_adapter.runtime
        if parallel is not None:
            try:
                frames = decode_on_group(parallel, vae, raw)
            except Cancelled:
                runtime.raise_if_interrupted()  # inside ComfyUI: its "interrupted", not an error
                raise
            if frames is not None:
                return (frames,)
        device = runtime.vae_device()
        runtime.free_memory()
        vae.to(device)
        try:
            videos = [decode_raw_to_video(vae, raw[i].float(), tile_size=VAE_TILE if tiled else None)
                      for i in range(raw.shape[0])]
        finally:
            vae.to(runtime.offload_device())
        return (torch.cat(videos),)


class Wan22SaveVideo:
    DESCRIPTION = ("Saves frames as an H.264 mp4 in ComfyUI's output folder (never overwriting) and shows it "
                   "on the node; a batch of videos (videos > 1) as one mp4 each.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The frames, e.g. from Wan22VAEDecode or native VAEDecode."}),
            "fps": ("FLOAT", {"default": float(FPS), "min": 1.0, "max": 120.0, "step": 1.0, "round": 0.001,
                              "tooltip": "Frames per second; Wan2.2 A14B is trained at 16."}),
            "filename_prefix": ("STRING", {"default": "wan22/video", "tooltip":
                                "File name inside the output folder; subfolders allowed. A counter is added: "
                                "wan22/video_00001.mp4."}),
        }, "optional": {
            "videos": ("INT", {"default": 1, "min": 1, "max": MAX_VIDEOS, "step": 1, "tooltip":
                       "How many videos the frames hold (the sampler's batch, decoded one after another): each "
                       "is saved to its own file."}),
        }}

    def save(self, images: torch.Tensor, fps: float, filename_prefix: str, videos: int = 1):
        if images.shape[0] % videos:
            raise ValueError(f"{images.shape[0]} frames do not split into videos={videos} videos of equal length; "
                             "set videos to the sampler's batch size")
        output = comfy_adapter.runtime.output_directory()
        results = [self._save_one(frames, fps, filename_prefix, output) for frames in images.chunk(videos)]
        return {"ui": {"images": results, "animated": (True,)}, "result": ()}

    @staticmethod
    def _save_one(images: torch.Tensor, fps: float, filename_prefix: str, output) -> dict:
        for attempt in range(SAVE_ATTEMPTS):
            path = unique_path(output, filename_prefix)
            try:
                write_mp4(images, path, fps=fps)
                break
            except FileExistsError:
                if attempt == SAVE_ATTEMPTS - 1:
                    raise
        subfolder = os.path.relpath(path.parent, output.resolve())
        return {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}
