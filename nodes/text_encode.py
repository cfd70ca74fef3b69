"""Wan22TextEncode: positive and negative prompt -> UMT5 embeddings for the sampler."""
from __future__ import annotations

from ..wan22_core.config import DEFAULT_NEGATIVE_PROMPT
from . import comfy_adapter
from .loaders import CATEGORY


class Wan22TextEncode:
    DESCRIPTION = ("Encodes the positive and the negative prompt with UMT5-XXL. The negative prompt defaults to "
                   "the official Wan2.2 one (Chinese); an empty negative prompt means no negative text.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WAN22_EMBEDS",)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Both prompts' embeddings, for Wan22MoESampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("WAN22_TEXT_ENCODER", {"tooltip": "From Wan22TextEncoderLoader."}),
            "positive": ("STRING", {"multiline": True, "default": "", "tooltip":
                         "What the video shows; Wan2.2 understands English and Chinese."}),
            "negative": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_PROMPT, "tooltip":
                         "What to steer away from (classifier-free guidance)."}),
        }}

    def encode(self, text_encoder, positive: str, negative: str):
        runtime = comfy_adapter.runtime
        encoder = text_encoder.encoder
        if text_encoder.device.type != "cpu":
            runtime.free_memory()
        encoder.to(text_encoder.device)
        try:
            embeds = encoder.encode_prompt(positive, negative)  # returned on the CPU
        finally:
            encoder.to(runtime.offload_device())
        return (embeds,)
