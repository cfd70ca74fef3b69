"""Tiny random model sets in the layouts users have, for tests, the demo and benchmarks.

No weights can be downloaded here, so every format we load is also one we can write. The same
(seed, sizes) always writes the same tensors.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .checkpoints import HIGH_NOISE_DIR, LOW_NOISE_DIR, T5_FILE, T5_TOKENIZER_DIR, VAE_FILE, ModelFiles
from .config import TINY, DiTConfig, ModelConfig
from .models.text_encoder import build_umt5, official_to_transformers
from .models.tokenizer import train_tiny_sentencepiece
from .models.transformer import WanModel
from .models.vae import WanVAE

FORMATS = ("official",)
SHARDS = 2  # the official expert folders are sharded with an index json; exercise that path


def seeded(seed: int, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with PyTorch's default init under a fixed seed, leaving global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def tiny_config(dim: int | None = None, layers: int | None = None, heads: int | None = None,
                ffn_dim: int | None = None, text_layers: int | None = None) -> ModelConfig:
    """TINY with optional size overrides (for benchmarks on larger synthetic models)."""
    dit_fields = {k: v for k, v in dict(dim=dim, num_layers=layers, num_heads=heads, ffn_dim=ffn_dim).items()
                  if v is not None}
    cfg = replace(TINY, dit=replace(TINY.dit, **dit_fields))
    if text_layers is not None:
        cfg = replace(cfg, text=replace(cfg.text, num_layers=text_layers))
    return cfg


def _official_t5_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers UMT5 weights -> official Wan T5 names (the inverse of the loader's mapping)."""
    cfg = model.config
    per_block = ["norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight",
                 "ffn.fc2.weight"]
    names = ["token_embedding.weight", "norm.weight"] + [
        f"blocks.{i}.{n}" for i in range(cfg.num_layers) for n in per_block]
    hf_name_of = {official: hf for hf, official in official_to_transformers({n: n for n in names}).items()
                  if hf != "encoder.embed_tokens.weight"}
    hf_sd = model.state_dict()
    return {official: hf_sd[hf].contiguous() for official, hf in hf_name_of.items()}


def _write_expert_folder(folder: Path, model: WanModel, cfg: DiTConfig) -> None:
    folder.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(sd)
    per_shard = math.ceil(len(names) / SHARDS)
    weight_map = {}
    for i in range(SHARDS):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        chunk = names[i * per_shard:(i + 1) * per_shard]
        save_file({k: sd[k] for k in chunk}, str(folder / shard))
        weight_map.update({k: shard for k in chunk})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"_class_name": "WanModel", "model_type": "t2v", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
              "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "eps": cfg.eps,
              "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "text_len": cfg.text_len,
              "text_dim": cfg.text_dim}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_official(out_dir: Path, cfg: ModelConfig, seed: int) -> None:
    """The Wan-AI/Wan2.2-T2V-A14B folder layout, with official file names and dtypes."""
    _write_expert_folder(out_dir / HIGH_NOISE_DIR, seeded(seed, lambda: WanModel(cfg.dit)), cfg.dit)
    _write_expert_folder(out_dir / LOW_NOISE_DIR, seeded(seed + 1, lambda: WanModel(cfg.dit)), cfg.dit)
    t5 = seeded(seed + 2, lambda: build_umt5(cfg.text))
    torch.save({k: v.to(torch.bfloat16) for k, v in _official_t5_state_dict(t5).items()}, out_dir / T5_FILE)
    tokenizer_dir = out_dir / T5_TOKENIZER_DIR
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "spiece.model").write_bytes(train_tiny_sentencepiece(cfg.text.vocab_size))
    torch.save(seeded(seed + 3, lambda: WanVAE(cfg.vae)).state_dict(), out_dir / VAE_FILE)
    (out_dir / "tiny_config.json").write_text(json.dumps({"seed": seed, **asdict(cfg)}, indent=2))


def make_tiny(out_dir: str | Path, fmt: str = "official", cfg: ModelConfig = TINY, seed: int = 0) -> Path:
    """Write a complete tiny model set to `out_dir` (must not exist or be empty).

    Written into a temporary sibling folder and renamed at the end, so an interrupted run
    never leaves a half-written model set under `out_dir`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_official(staging, cfg, seed)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def cached_tiny(cache_dir: str | Path, cfg: ModelConfig = TINY, seed: int = 0) -> ModelFiles:
    """The tiny official model set under `cache_dir`, made on first use."""
    folder = Path(cache_dir) / f"tiny-official-seed{seed}"
    if not folder.exists():
        make_tiny(folder, "official", cfg, seed)
    return ModelFiles.from_model_dir(folder)
