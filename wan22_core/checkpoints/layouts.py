"""Where each part of a model set lives in each layout, and the conventions its files rely on."""
from __future__ import annotations


# Official Wan2.2-T2V-A14B folder names.
HIGH_NOISE_DIR, LOW_NOISE_DIR = "high_noise_model", "low_noise_model"
T5_FILE, T5_TOKENIZER_DIR = "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
# Wan-AI/Wan2.2-T2V-A14B-Diffusers folder names (transformer = high-noise expert).
DIFFUSERS_DIRS = {"high_noise": "transformer", "low_noise": "transformer_2", "text_encoder": "text_encoder",
                  "tokenizer": "tokenizer", "vae": "vae"}
# ComfyUI's model folders (`DIR` can be ComfyUI's `models/`), and the legacy names ComfyUI still
# reads (where ComfyUI-GGUF users often keep their .gguf files).
COMFY_DIRS = {"experts": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
COMFY_LEGACY_DIRS = {"experts": "unet", "text_encoder": "clip"}
MODEL_FILE_SUFFIXES = (".safetensors", ".gguf")  # single-file checkpoints a models folder may hold
WAN_HEAD_DIM = 128  # every released Wan DiT uses 128-wide heads; files without a config rely on it
NUM_HEADS_KEY = "num_heads"  # safetensors metadata key for the head count in files we write
