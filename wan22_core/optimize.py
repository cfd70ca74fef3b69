"""Opt-in speed-ups that leave the numbers alone: regional torch.compile.

Regional compilation compiles `WanBlock.forward` once and reuses it for all 40 blocks (the
parameters are graph inputs, so identical blocks share one graph): compile time is one block's,
not the whole model's, and the compiler fuses the modulation, norm and gating elementwise ops
around the matmuls.
"""
from __future__ import annotations

import importlib.util
import shutil
from typing import Callable

import torch

from .models.transformer import WanModel


def compile_toolchain_problem(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot work on `device` here, or None if it can."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler on PATH (install g++)"
    return None


def compile_allowed(requested: bool, device: torch.device, warn: Callable[[str], None]) -> bool:
    """Whether to compile on `device`: as `requested`, unless the toolchain is missing, which `warn`
    hears once (the run goes on eager: the same results, slower)."""
    problem = compile_toolchain_problem(device) if requested else None
    if problem is not None:
        warn(f"compile ignored: {problem}; running eager (same results, slower)")
    return requested and problem is None


def compile_blocks(model: WanModel, device: torch.device) -> str | None:
    """Compile each transformer block in place; returns None, or (compiling nothing) why it cannot
    (`compile_toolchain_problem`) for the caller to report."""
    problem = compile_toolchain_problem(device)
    if problem is not None:
        return problem
    # LoRAs that run on the fly (unmerged, and always on GGUF layers) are forward hooks on block
    # Linears, added or removed when the LoRA changes, possibly after a block was compiled.
    # Dynamo does not guard on module hooks by default, so a compiled block would go on running
    # without a hook added later: with these guards it recompiles instead (process-wide; they only
    # make guards stricter).
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    for block in model.blocks:
        block.compile(dynamic=False)
    return None
