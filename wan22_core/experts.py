"""The two experts of one process, assembled one way for the CLI and the loader node.

`load_experts`: load each expert (weights in the asked dtype, fp8 matmul mode, compiled blocks),
apply its LoRAs, set the attention backend, and place the pair (`placement.ExpertPair`). The
ranks of a multi-GPU run read their shards instead (`parallel/loading.py`) and use the same
LoRA merge and attention pieces.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoints import load_dit, stored_gguf_types, stores_fp8
from .config import WEIGHT_DTYPES, ExpertOptions
from .fp8 import FP8, set_fp8_compute
from .lora import LoraReport, LoraSpec, apply_loras
from .models.attention import set_attention_backend
from .models.transformer import WanModel
from .offload import expert_pair_options
from .optimize import compile_allowed, compile_blocks
from .placement import OFFICIAL_VIDEO, ExpertPair, Video, keeps_host_copies
from .runtime import DTYPES, resolve_dtype
from .sampling.moe import HIGH, LOW

Loader = Callable[[str, Path, ExpertOptions], torch.nn.Module]  # (HIGH or LOW, file, options) -> expert
Reports = tuple[tuple[str, LoraReport], ...]  # (HIGH or LOW, what one LoRA patched)


def expert_dtypes(options: ExpertOptions, device: torch.device) -> tuple[torch.dtype, torch.dtype | None, str | None]:
    """(compute dtype, stored weight dtype or None for the file's own, fp8 matmul mode or None).

    As ComfyUI's UNETLoader: fp8_e4m3fn stores the block weights in fp8 and multiplies in 16 bits;
    _fast also multiplies in fp8 where the card can (compute capability 8.9+).
    """
    weight = options.weight_dtype
    if weight not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {weight!r}")
    if weight in DTYPES:
        if options.dtype not in ("auto", weight):
            raise ValueError(f"weight_dtype {weight!r} computes in {weight}; it does not combine with dtype "
                             f"{options.dtype!r}: set dtype to auto or to {weight!r}")
        return DTYPES[weight], DTYPES[weight], None
    compute = resolve_dtype(options.dtype, device)
    if weight == "auto":
        return compute, None, None
    return compute, FP8, "auto" if weight.endswith("_fast") else "dequant"


def weight_bytes_per_param(options: ExpertOptions, device: torch.device, expert_file: Path) -> int:
    """Bytes per block-Linear weight the experts will hold (memory.weight_bytes' unit): 1 for fp8
    (asked for, or an fp8_scaled file kept as stored), else the compute dtype's."""
    compute, stored, _ = expert_dtypes(options, device)
    if stored == FP8 or (stored is None and stores_fp8(expert_file)):
        return 1
    return compute.itemsize


def gguf_block_types(options: ExpertOptions, device: torch.device, expert_file: Path) -> dict[str, str] | None:
    """The block Linears' GGUF types the experts will hold (memory.gguf_linear_types' form): a GGUF
    file's own with weight_dtype auto, else None (nothing held in GGUF blocks)."""
    _, stored, _ = expert_dtypes(options, device)
    return stored_gguf_types(expert_file) if stored is None else None


def load_expert(path: Path, options: ExpertOptions, device: torch.device) -> WanModel:
    """One expert as `options` say: its weights in their dtypes, the fp8 matmul mode set, and with
    `options.compile` each block compiled for `device` (the toolchain checked by `load_experts`)."""
    compute, stored, fp8_matmul = expert_dtypes(options, device)
    model = load_dit(path, compute, weight_dtype=stored)
    if fp8_matmul is not None:
        set_fp8_compute(model, fp8_matmul)
    if options.compile:
        compile_blocks(model, device)
    return model


def load_experts(high_noise: Path, low_noise: Path, options: ExpertOptions, device: torch.device, *,
                 loras: tuple[Sequence[LoraSpec], Sequence[LoraSpec]] = ((), ()),
                 offload_device: torch.device = torch.device("cpu"), video: Video = OFFICIAL_VIDEO,
                 load: Loader | None = None,
                 warn: Callable[[str], None] = warnings.warn) -> tuple[ExpertPair, Reports]:
    """Both experts ready to sample on `device`, and what each LoRA patched.

    load: how an expert is loaded (default `load_expert`; the loader node passes its cache, so a
    LoRA or backend change reuses the loaded weights). Each expert then gets exactly its `loras`
    (in `options.lora_mode`) and the attention backend. The pair is placed per `options.offload`
    (auto: `placement.experts_fit` for `video`); keep_host per `keeps_host_copies`, so the
    expert switch copies nothing back. `warn` gets one line when compile cannot work here.
    """
    load = load or (lambda slot, path, opts: load_expert(path, opts, device))
    loaded = replace(options, compile=compile_allowed(options.compile, device, warn))
    experts, reports = {}, []
    for slot, path, slot_loras in ((HIGH, high_noise, loras[0]), (LOW, low_noise, loras[1])):
        experts[slot] = expert = load(slot, path, loaded)
        reports += [(slot, report) for report in apply_loras(expert, slot_loras, options.lora_mode)]
        set_attention_backend(expert, options.attention, device)
    placement = expert_pair_options(options.offload, options.swap_blocks, options.compile,
                                    len(experts[HIGH].blocks))
    pair = ExpertPair(experts[HIGH], experts[LOW], device, **placement, offload_device=offload_device,
                      keep_host=keeps_host_copies(device, offload_device), video=video)
    return pair, tuple(reports)
