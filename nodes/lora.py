"""Wan22LoRA: LoRAs for the high-noise and/or the low-noise expert, chainable.

The node only adds (file, strength) to the WAN22_MOE_MODEL spec; the sampler applies them to
the cached experts (`MoEModel.experts`), so changing a LoRA or a strength re-merges the LoRA's
layers and never re-reads the 28 GB base checkpoints.
"""
from __future__ import annotations

from dataclasses import replace

from ..wan22_core.lora import MODES, LoraSpec
from . import comfy_adapter
from .comfy_adapter import LORAS, model_path
from .loaders import CATEGORY, MoEModel

NONE = "None"  # the combo option for "no LoRA for this expert"
MAX_STRENGTH = 100.0  # ComfyUI's LoraLoader range


def lora_options() -> list[str]:
    return [NONE, *comfy_adapter.runtime.filename_list(LORAS)]


def _added(name: str, strength: float) -> tuple[LoraSpec, ...]:
    return () if name == NONE else (LoraSpec(model_path(LORAS, name), strength),)


def _strength(tooltip: str) -> tuple:
    return ("FLOAT", {"default": 1.0, "min": -MAX_STRENGTH, "max": MAX_STRENGTH, "step": 0.01, "round": 0.001,
                      "tooltip": tooltip})


class Wan22LoRA:
    DESCRIPTION = ("Adds a LoRA to the high-noise and/or the low-noise expert, e.g. the lightx2v 4-step LoRAs "
                   "(then sample 4 steps, cfg 1, shift 5, euler). Chain several. Changing a LoRA or a strength "
                   "re-merges only the LoRA's layers; the experts are not read from disk again.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WAN22_MOE_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same experts with these LoRAs added, for Wan22MoESampler or another Wan22LoRA.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        options = lora_options()
        return {"required": {
            "model": ("WAN22_MOE_MODEL", {"tooltip": "From Wan22MoEModelLoader or another Wan22LoRA."}),
            "lora_high": (options, {"default": NONE, "tooltip":
                          "LoRA for the high-noise expert (models/loras), e.g. "
                          "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise; None: no LoRA for it here."}),
            "lora_low": (options, {"default": NONE, "tooltip":
                         "LoRA for the low-noise expert (models/loras), e.g. "
                         "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise; None: no LoRA for it here."}),
            "strength_high": _strength("How strongly lora_high changes the high-noise expert (1.0: as trained)."),
            "strength_low": _strength("How strongly lora_low changes the low-noise expert (1.0: as trained)."),
            "lora_mode": (list(MODES), {"default": MODES[0], "tooltip":
                          "merge: add the LoRA into the weights (no cost per step). unmerged: run it beside the "
                          "layers (a little slower per step; a strength change costs nothing). Chained Wan22LoRA "
                          "nodes must agree. With the sampler's parallel input LoRAs are always merged."}),
        }}

    def add(self, model: MoEModel, lora_high: str, lora_low: str, strength_high: float, strength_low: float,
            lora_mode: str):
        if lora_mode not in MODES:
            raise ValueError(f"lora_mode must be one of {', '.join(MODES)}; got {lora_mode!r}")
        high, low = _added(lora_high, strength_high), _added(lora_low, strength_low)
        if not high and not low:
            return (model,)
        if (model.loras_high or model.loras_low) and model.options.lora_mode != lora_mode:
            raise ValueError(f"lora_mode {lora_mode!r} differs from the {model.options.lora_mode!r} of an earlier "
                             "Wan22LoRA in the chain; all chained Wan22LoRA nodes must use the same lora_mode")
        return (replace(model, loras_high=model.loras_high + high, loras_low=model.loras_low + low,
                        options=replace(model.options, lora_mode=lora_mode)),)
