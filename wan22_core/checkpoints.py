"""Find, read and load checkpoint files into our modules.

Readers never execute code from a file: safetensors are memory-mapped, `.pth` files go through
`torch.load(weights_only=True)`. Tensors are cast to the target dtype one at a time into a
model built on the meta device, so loading a 57 GB fp32 expert as bf16 peaks at the bf16 model
plus one fp32 tensor, never a full fp32 copy.

Layouts: this module reads the official `Wan-AI/Wan2.2-T2V-A14B` folder (see `ModelFiles`).
"""
from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from .config import DiTConfig, TextEncoderConfig, VAEConfig
from .errors import Wan22Error
from .models.transformer import WanModel
from .models.vae import WanVAE

# Official Wan2.2-T2V-A14B folder names.
HIGH_NOISE_DIR, LOW_NOISE_DIR = "high_noise_model", "low_noise_model"
T5_FILE, T5_TOKENIZER_DIR = "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
WAN_HEAD_DIM = 128  # every released Wan DiT uses 128-wide heads; files without a config rely on it


class CheckpointError(Wan22Error):
    """A checkpoint is missing, unreadable, or not what its slot needs."""


# ---------------------------------------------------------------------------------------------
# Reading tensors


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors files that make up `path` (a file, a folder, or a sharded folder)."""
    if path.is_file():
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index[0]} lists shards that are not in the folder: {', '.join(missing)}; "
                                  "download the complete folder again")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{path} holds {len(files)} .safetensors files and no index json; "
                              "point at one file, or at a folder with one file or with an index")
    return files


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a checkpoint file or folder, read one tensor at a time."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        yield from _load_pickle_safely(path).items()
        return
    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {file}: {err}; the file is truncated or not a "
                                  "safetensors file, download it again") from err


def _load_pickle_safely(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} needs code to be unpickled and was refused (only plain tensors are "
                              "loaded from .pth files); convert it to .safetensors") from err
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; the file is truncated or corrupt") from err
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a flat dict of tensors")
    return sd


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole state dict; floating tensors cast to `dtype` one by one when given."""
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            for k, v in iter_tensors(path)}


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Strict load with a message that lists missing and unexpected names."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}); this file is not a {what} of the expected size")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# DiT experts


def dit_config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Sizes from tensor shapes; the head count is not in any shape, so it comes from a config
    (folder config.json) or the Wan convention of 128-wide heads."""
    try:
        patch = sd["patch_embedding.weight"]
        dim = patch.shape[0]
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        return DiTConfig(
            dim=dim, in_dim=patch.shape[1], patch_size=tuple(patch.shape[2:]),
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=layers,
            num_heads=num_heads or max(1, dim // WAN_HEAD_DIM),
            text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch.shape[2:]))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"not a Wan DiT expert state dict (missing or odd {err})") from err


def _num_heads_from_config(path: Path) -> int | None:
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.is_file():
        return json.loads(config.read_text()).get("num_heads")
    return None


def load_dit(path: str | Path, dtype: torch.dtype = torch.float32) -> WanModel:
    """An expert from an official sub-folder (config.json + sharded safetensors) or one file."""
    path = Path(path)
    sd = read_state_dict(path, dtype)
    cfg = dit_config_from_state_dict(sd, _num_heads_from_config(path))
    with torch.device("meta"):
        model = WanModel(cfg)
    return load_into(model, sd, f"Wan DiT expert ({path})")


# ---------------------------------------------------------------------------------------------
# VAE


def vae_config_from_state_dict(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Walk encoder.downsamples: residual blocks per level, the resamples between levels."""
    try:
        base = sd["encoder.conv1.weight"].shape[0]
        levels, temporal, i = [[]], [], 0
        while True:
            prefix = f"encoder.downsamples.{i}."
            if prefix + "residual.2.weight" in sd:
                levels[-1].append(sd[prefix + "residual.2.weight"].shape[0])
            elif prefix + "resample.1.weight" in sd:
                temporal.append(prefix + "time_conv.weight" in sd)
                levels.append([])
            else:
                break
            i += 1
        return VAEConfig(base_dim=base, z_dim=sd["conv2.weight"].shape[0],
                         dim_mult=tuple(level[-1] // base for level in levels),
                         num_res_blocks=len(levels[0]), temporal_downsample=tuple(temporal))
    except (KeyError, IndexError, ValueError) as err:
        raise CheckpointError(f"not a Wan2.1 VAE state dict (missing or odd {err})") from err


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> WanVAE:
    sd = read_state_dict(path, dtype)
    with torch.device("meta"):
        model = WanVAE(vae_config_from_state_dict(sd))
    return load_into(model, sd, f"Wan2.1 VAE ({path})")


# ---------------------------------------------------------------------------------------------
# Text encoder


def load_text_encoder(path: str | Path, tokenizer_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """UMT5 encoder from official (.pth) or transformers-named weights, plus its tokenizer:
    `tokenizer_dir` when given, else a `spiece_model` tensor inside the file."""
    from .models.text_encoder import TextEncoder
    from .models.tokenizer import Tokenizer

    sd = read_state_dict(path)
    tokenizer = Tokenizer.from_folder(tokenizer_dir) if tokenizer_dir is not None else None
    return TextEncoder.from_state_dict(sd, tokenizer, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# A complete model set


@dataclass(frozen=True)
class ModelFiles:
    """Where each part of a model set lives."""

    high_noise: Path
    low_noise: Path
    text_encoder: Path
    vae: Path
    tokenizer: Path | None = None  # None: the text encoder file embeds it (`spiece_model`)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelFiles":
        """The official Wan2.2-T2V-A14B folder layout."""
        root = Path(model_dir)
        if not root.is_dir():
            raise CheckpointError(f"--model-dir {root} is not a folder")
        files = cls(high_noise=root / HIGH_NOISE_DIR, low_noise=root / LOW_NOISE_DIR,
                    text_encoder=root / T5_FILE, vae=root / VAE_FILE, tokenizer=root / T5_TOKENIZER_DIR)
        missing = [str(p.relative_to(root)) for p in (files.high_noise, files.low_noise, files.text_encoder,
                                                     files.vae, files.tokenizer) if not p.exists()]
        if missing:
            raise CheckpointError(f"{root} is not a Wan2.2-T2V-A14B folder: missing {', '.join(missing)} "
                                  "(make one with `python -m wan22_core make-tiny DIR`)")
        return files
