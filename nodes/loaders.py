"""Loader nodes: text encoder, the two MoE experts, the VAE.

The text encoder and the VAE load when their node runs (through the slot cache). The expert
loader only resolves files and options into a `MoEModel`; the sampler loads the experts on first
use, so a graph whose sampler output is cached never reads 57 GB, and the multi-GPU path can
load shards in its workers instead of in the ComfyUI process.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..wan22_core.checkpoints import check_expert_pair, load_text_encoder, load_vae
from ..wan22_core.config import A14B, DEFAULT_SWAP_BLOCKS, FRAMES, HEIGHT, WEIGHT_DTYPES, WIDTH, ExpertOptions
from ..wan22_core.experts import Reports, expert_dtypes, load_expert, load_experts
from ..wan22_core.lora import LoraError, LoraSpec, file_key
from ..wan22_core.memory import GIB, min_swap_blocks, small_card_advice
from ..wan22_core.models.attention import BACKENDS, resolve_backend
from ..wan22_core.offload import OFFLOAD_CHOICES, expert_pair_options
from ..wan22_core.placement import OFFICIAL_VIDEO, ExpertPair, Video
from ..wan22_core.runtime import DTYPES, resolve_dtype
from . import comfy_adapter
from .comfy_adapter import DIFFUSION_MODELS, TEXT_ENCODERS, VAE, file_options, model_path
from .model_cache import CACHE

CATEGORY = "Wan2.2 MoE"
DEVICES = ("auto", "cpu", "gpu")
MAX_SWAP_BLOCKS = A14B.dit.num_layers
# swapped blocks the memory model says 720p x 81 frames (bf16, batched CFG) needs, per card size
SWAP_BLOCKS_720P = {gib: min_swap_blocks(A14B.dit, FRAMES, HEIGHT, WIDTH, gib * GIB) for gib in (24, 32)}
# the same for GGUF experts (batched CFG, as the sampler runs): (card GiB, video, file type) -> advice
GGUF_ADVICE = {key: small_card_advice(A14B.dit, *key[:2], 2, key[2])
               for key in ((24, "720p", "Q8_0"), (24, "720p", "Q4_K_M"), (16, "480p", "Q8_0"), (16, "480p", "Q4_K_M"))}
EXPERT_NAMES = {"high": "high-noise", "low": "low-noise"}


@dataclass(frozen=True)
class TextEncoderOnDevice:
    """WAN22_TEXT_ENCODER: the encoder (weights wait on the CPU) and the device it encodes on."""

    encoder: object  # wan22_core.models.text_encoder.TextEncoder
    device: torch.device


@dataclass(frozen=True)
class MoEModel:
    """WAN22_MOE_MODEL: which expert files to use and how; `experts()` loads them (cached).

    The LoRAs are part of this spec, not of the cached weights: `experts()` makes exactly these
    LoRAs applied to the cached experts (re-merging only the layers whose terms changed), so a
    new LoRA or strength never re-reads a base checkpoint. The attention backend is set on each
    run too; only the files, weight_dtype and compile decide what is loaded.
    """

    high_noise: Path
    low_noise: Path
    options: ExpertOptions  # swap_blocks is 0 unless offload is block_swap (the widget counts only then)
    loras_high: tuple[LoraSpec, ...] = ()
    loras_low: tuple[LoraSpec, ...] = ()

    def experts(self, device: torch.device, video: Video = OFFICIAL_VIDEO) -> tuple[ExpertPair, Reports]:
        """Both experts ready to sample `video` on `device`, and (expert, report) for each LoRA applied."""
        def cached(slot: str, path: Path, options: ExpertOptions) -> torch.nn.Module:
            key = (file_key(path), expert_dtypes(options, device), options.compile)
            return CACHE.get(slot, key, lambda: load_expert(path, options, device))

        try:
            pair, reports = load_experts(self.high_noise, self.low_noise, self.options, device,
                                         loras=(self.loras_high, self.loras_low),
                                         offload_device=comfy_adapter.runtime.offload_device(), video=video,
                                         load=cached, warn=warnings.warn)
        except LoraError:
            raise  # a file that is missing or does not fit: found before any weight changed
        except BaseException:
            release_cached_experts()  # stopped part-way through a LoRA merge: reload on the next run
            raise
        return pair, tuple((EXPERT_NAMES[slot], report) for slot, report in reports)

    def check_placement(self, num_layers: int) -> None:
        """offload, swap_blocks and compile as one placement (ValueError on a bad combination)."""
        expert_pair_options(self.options.offload, self.options.swap_blocks, self.options.compile, num_layers)


def release_cached_experts() -> None:
    """Drop the experts this process keeps (up to 57 GB of host memory), e.g. while worker processes
    hold the model instead."""
    for slot in EXPERT_NAMES:
        CACHE.drop(slot)


def _advice(card_gib: int, video: str, file_type: str) -> str:
    """GGUF_ADVICE as the tooltip says it: a block count, or what instead."""
    advice = GGUF_ADVICE[card_gib, video, file_type]
    return advice.removeprefix("block_swap ") if advice.startswith("block_swap") else f"({advice})"


def _file_input(folder: str, tooltip: str) -> tuple:
    return (file_options(folder), {"tooltip": tooltip})


class Wan22TextEncoderLoader:
    DESCRIPTION = ("Loads the UMT5-XXL text encoder (e.g. umt5_xxl_fp16.safetensors or a GGUF such as "
                   "umt5-xxl-encoder-Q8_0.gguf from ComfyUI/models/text_encoders or models/clip; its tokenizer is "
                   "read from the same file).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WAN22_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The UMT5 encoder, for Wan22TextEncode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": _file_input(TEXT_ENCODERS, "UMT5-XXL encoder file in models/text_encoders (or clip), "
                                                       "e.g. umt5_xxl_fp16.safetensors or umt5-xxl-encoder-Q8_0.gguf "
                                                       "(GGUF: dequantised at load)."),
            "device": (list(DEVICES), {"default": "auto", "tooltip":
                       "Where prompts are encoded: gpu is ComfyUI's compute device, auto follows ComfyUI's "
                       "text-encoder placement. The weights wait on the CPU between encodes."}),
            "dtype": (["auto", *DTYPES], {"default": "auto", "tooltip":
                      "Compute dtype: auto is bf16 on a GPU and fp32 on the CPU."}),
        }}

    def load(self, text_encoder: str, device: str, dtype: str):
        path = model_path(TEXT_ENCODERS, text_encoder)
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        runtime = comfy_adapter.runtime
        target = {"auto": runtime.text_encoder_device, "gpu": runtime.compute_device,
                  "cpu": lambda: torch.device("cpu")}[device]()
        torch_dtype = resolve_dtype(dtype, target)
        encoder = CACHE.get("text_encoder", (file_key(path), torch_dtype),
                            lambda: load_text_encoder(path, dtype=torch_dtype))
        return (TextEncoderOnDevice(encoder, target),)


class Wan22MoEModelLoader:
    DESCRIPTION = ("Chooses the two Wan2.2 A14B experts (high-noise and low-noise) from ComfyUI/models/"
                   "diffusion_models or models/unet: safetensors, or GGUF files (kept quantised). The weights "
                   "load when the sampler first needs them and stay cached.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WAN22_MOE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("Both experts and how to load them, for Wan22MoESampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "high_noise_model": _file_input(DIFFUSION_MODELS, "The high-noise expert (runs the first, noisiest "
                                                              "steps), e.g. wan2.2_t2v_high_noise_14B_fp16 or "
                                                              "Wan2.2-T2V-A14B-HighNoise-Q8_0.gguf."),
            "low_noise_model": _file_input(DIFFUSION_MODELS, "The low-noise expert (runs the remaining steps), "
                                                             "e.g. wan2.2_t2v_low_noise_14B_fp16 or "
                                                             "Wan2.2-T2V-A14B-LowNoise-Q8_0.gguf."),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "auto", "tooltip":
                             "auto: the file's own weights (fp8_scaled files stay fp8, GGUF files stay in their "
                             "GGUF types), computed in bf16 on a GPU, fp32 on the CPU. bf16/fp16: convert (GGUF: "
                             "dequantise at load). fp8_e4m3fn: store the block weights in fp8 (half the memory; not "
                             "for GGUF); _fast also multiplies in fp8 on cards that can (Ada, Hopper)."}),
            "attention": (list(BACKENDS), {"default": "auto", "tooltip":
                          "Attention kernel. auto: the fastest exact one installed (Hopper: FlashAttention 3, "
                          "then 4; Blackwell: FlashAttention 4; Ampere/Ada: FlashAttention 2), else PyTorch SDPA. "
                          "flash_attn / flash_attn3 / flash_attn4 / sage need their package; sage (SageAttention) "
                          "is not exact."}),
            "offload": (list(OFFLOAD_CHOICES), {"default": "auto", "tooltip":
                        "none keeps both experts on the GPU; swap_experts keeps only the active one there "
                        "(one move at the switch); block_swap also keeps swap_blocks of its blocks in CPU memory "
                        "(for cards that cannot hold one expert); auto keeps both when both experts and the video's "
                        "activations fit the card (the memory model), else swaps them."}),
        }, "optional": {  # optional, so API prompts written before these inputs existed stay valid
            "swap_blocks": ("INT", {"default": DEFAULT_SWAP_BLOCKS, "min": 0, "max": MAX_SWAP_BLOCKS, "step": 1,
                                    "tooltip":
                            f"Used only with offload = block_swap: how many of the {MAX_SWAP_BLOCKS} blocks (at least "
                            "1) to keep on the CPU, each streamed to the GPU just before it runs. 720p x 81 frames in "
                            f"bf16 needs about {SWAP_BLOCKS_720P[24]} on a 24 GB card and {SWAP_BLOCKS_720P[32]} on a "
                            "32 GB card; GGUF experts need fewer: on 24 GB at 720p Q8_0 "
                            f"{_advice(24, '720p', 'Q8_0')} and Q4_K_M {_advice(24, '720p', 'Q4_K_M')}, on 16 GB at "
                            f"480p Q8_0 {_advice(16, '480p', 'Q8_0')} and Q4_K_M {_advice(16, '480p', 'Q4_K_M')} "
                            "(python -m wan22_core.memory prints the table)."}),
            "compile": ("BOOLEAN", {"default": False, "tooltip":
                        "torch.compile the transformer block (one compile reused by all blocks): faster steps "
                        "after a first slow one, same results. Needs triton on a GPU; without it this warns and "
                        "runs uncompiled. Changing it reloads the experts. Not with offload = block_swap."}),
        }}

    def load(self, high_noise_model: str, low_noise_model: str, weight_dtype: str, attention: str, offload: str,
             swap_blocks: int = DEFAULT_SWAP_BLOCKS, compile: bool = False):
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {weight_dtype!r}")
        resolve_backend(attention)  # an unknown name, or a backend whose package is missing, fails here
        high = model_path(DIFFUSION_MODELS, high_noise_model)
        low = model_path(DIFFUSION_MODELS, low_noise_model)
        identity, _ = check_expert_pair(high, low)  # headers only: wrong slots or two models fail here, in ms
        options = ExpertOptions(weight_dtype=weight_dtype, attention=attention, offload=offload,
                                swap_blocks=swap_blocks if offload == "block_swap" else 0, compile=compile)
        model = MoEModel(high_noise=high, low_noise=low, options=options)
        model.check_placement(identity.dit.num_layers)  # offload, swap_blocks, compile: fail now, not when sampling
        return (model,)


class Wan22VAELoader:
    DESCRIPTION = "Loads the Wan2.1 VAE (wan_2.1_vae.safetensors from ComfyUI/models/vae), which the A14B experts use."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WAN22_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The Wan2.1 VAE, for Wan22VAEDecode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": _file_input(VAE, "The Wan2.1 VAE file in models/vae (not the 48-channel Wan2.2 5B VAE)."),
        }}

    def load(self, vae_name: str):
        path = model_path(VAE, vae_name)
        dtype = resolve_dtype("auto", comfy_adapter.runtime.vae_device())
        return (CACHE.get("vae", (file_key(path), dtype), lambda: load_vae(path, dtype)),)
