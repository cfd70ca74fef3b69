"""Tiny random model sets (and LoRA files) in the layouts users have, for tests, the demo and benchmarks.

No weights can be downloaded here, so every format we load is also one we can write. The same
(seed, sizes) always writes the same tensors, and every layout holds the same weights: each
file is the seeded modules' tensors, cast to that layout's dtype (official: fp32 experts and
VAE, bf16 T5; comfy: fp16; comfy-fp8: scaled fp8 block Linears, fp16 elsewhere; diffusers:
official dtypes). Loaded with a common dtype that every layout holds exactly (fp16), all of
them give bit-identical parameters. gguf (ComfyUI-GGUF's layout, `--quant` Q8_0 ... Q2_K) rounds
the quantised tensors to their blocks, so its weights are those blocks' values instead.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from .checkpoints import ModelFiles
from .checkpoints.gguf import ORIG_SHAPE_KEY
from .checkpoints.keymaps import dit_official_to_diffusers, t5_transformers_to_llamacpp, vae_official_to_diffusers
from .checkpoints.layouts import (COMFY_DIRS, DIFFUSERS_DIRS, HIGH_NOISE_DIR, LOW_NOISE_DIR, NUM_HEADS_KEY, T5_FILE,
                                  T5_TOKENIZER_DIR, VAE_FILE)
from .config import (DEFAULT_NEGATIVE_PROMPT, LATENT_MEAN, LATENT_STD, TINY, DiTConfig, ModelConfig,
                     SamplerSettings)
from .fp8 import block_linears, quantize_fp8
from .models.text_encoder import SCALED_FP8_MARKER, SPIECE_KEY, build_umt5, official_to_transformers
from .models.tokenizer import EOS_ID, PAD_ID, UNK_ID
from .models.transformer import WanModel
from .models.vae import WanVAE
from .quant import TYPES
from .quant.gguf_quantize import quantize as quantize_gguf

FORMATS = ("official", "comfy", "comfy-fp8", "diffusers", "gguf")
SHARDS = 2  # the official and diffusers expert folders are sharded with an index json; exercise that path
# Comfy-Org's repackaged file names, per format: (high-noise, low-noise, text encoder).
COMFY_FILES = {
    "comfy": ("wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors",
              "umt5_xxl_fp16.safetensors"),
    "comfy-fp8": ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                  "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
}
COMFY_VAE_FILE = "wan_2.1_vae.safetensors"
# make-tiny --format gguf --quant: every block type we read and can write (K-quants: our encoder)
GGUF_QUANTS = tuple(name for name, kind in TYPES.items() if kind.block_size > 1)
DEFAULT_GGUF_QUANT = "Q8_0"
# QuantStack's and city96's file names for Wan2.2 T2V experts and the umt5-xxl encoder.
GGUF_FILES = ("Wan2.2-T2V-A14B-HighNoise-{quant}.gguf", "Wan2.2-T2V-A14B-LowNoise-{quant}.gguf",
              "umt5-xxl-encoder-{quant}.gguf")
# ComfyUI-GGUF stores Wan's tensors unflattened; the tiny set flattens this one as its converter does
# for SD models, so the `comfy.gguf.orig_shape` path is exercised.
GGUF_FLATTENED = "text_embedding.0.weight"
DIFFUSERS_VERSION = "0.35.0"  # written into configs, as diffusers does; nothing reads it back


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


@dataclass
class TinySet:
    """The seeded weights every layout is written from."""

    cfg: ModelConfig
    high: dict[str, torch.Tensor]  # official DiT names, fp32
    low: dict[str, torch.Tensor]
    t5: dict[str, torch.Tensor]  # transformers UMT5 names, bf16 (the official T5 file's dtype)
    vae: dict[str, torch.Tensor]  # official VAE names, fp32
    spiece: bytes  # the SentencePiece model (google/umt5-xxl's spiece.model stand-in)


def tiny_set(cfg: ModelConfig = TINY, seed: int = 0) -> TinySet:
    def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in module.state_dict().items()}

    t5 = seeded(seed + 2, lambda: build_umt5(cfg.text))
    t5_weights = {k: v.to(torch.bfloat16) for k, v in weights(t5).items()
                  if k != "encoder.embed_tokens.weight"}  # tied to shared.weight; files store it once
    return TinySet(cfg, weights(seeded(seed, lambda: WanModel(cfg.dit))),
                   weights(seeded(seed + 1, lambda: WanModel(cfg.dit))), t5_weights,
                   weights(seeded(seed + 3, lambda: WanVAE(cfg.vae))), train_tiny_sentencepiece(cfg.text.vocab_size))


def _tiny_corpus() -> list[str]:
    """A few hundred deterministic video-prompt sentences, plus some Chinese from the negative prompt."""
    subjects = ["a red fox", "an old fisherman", "two children", "a white cat", "a small boat",
                "a young dancer", "a black horse", "a yellow city bus", "three birds", "a robot",
                "a woman in a blue dress", "a golden retriever", "an astronaut", "a paper kite"]
    actions = ["runs across", "walks slowly through", "jumps over", "drifts along", "spins in",
               "climbs up", "flies above", "rolls down", "wanders around", "races toward",
               "glides over", "sleeps quietly in"]
    places = ["a snowy forest", "the busy street", "a calm lake", "the golden desert",
              "a neon city at night", "the green hills", "an empty parking lot", "a rainy harbor",
              "the rocky mountain", "a sunflower field", "an ancient temple", "the crowded market"]
    cameras = ["The camera pans left.", "Slow motion, close-up shot.", "Wide aerial view.",
               "The camera tracks forward smoothly.", "Handheld shot, soft light.",
               "Cinematic lighting, shallow depth of field.", "Static camera, 4K, vivid colors.",
               "Dolly zoom at sunset.", "Time-lapse of moving clouds.", "Overhead drone footage."]
    moods = ["Morning fog, muted pastel tones.", "Heavy rain and thunder, dramatic storm.",
             "Warm evening glow with long shadows.", "Bright noon sunshine, sharp details.",
             "Falling snowflakes, quiet winter mood.", "Autumn leaves swirl in gentle wind.",
             "Realistic documentary style, natural grain.", "Dreamy watercolor animation style.",
             "Retro film look, flickering vintage texture.", "Underwater caustics, turquoise waves.",
             "Moonlit night, glowing lanterns.", "Spring blossoms, pink petals everywhere.",
             "Epic fantasy scene with dragons.", "Hyperrealistic macro photography."]
    # Strides coprime with each list length walk through every word; 400 distinct combinations.
    sentences = [f"{subjects[i % 14].capitalize()} {actions[(5 * i) % 12]} "
                 f"{places[(7 * i) % 12]}. {cameras[(3 * i) % 10]} {moods[(9 * i) % 14]}"
                 for i in range(400)]
    # The first phrases of the default negative prompt, so Chinese tokenises to real pieces;
    # the remaining characters stay unknown, which keeps UNK handling exercised in tests.
    chinese = "，".join(DEFAULT_NEGATIVE_PROMPT.split("，")[:5])
    return sentences + [chinese] * 20


def train_tiny_sentencepiece(vocab_size: int = 256) -> bytes:
    """Train a small real unigram SentencePiece model (UMT5 special ids) and return its bytes.

    Deterministic: one thread, no input shuffling, an in-memory corpus and writer.
    """
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()), model_writer=writer, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, pad_id=PAD_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, bos_id=-1, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return writer.getvalue()


def _official_t5_names(hf_names) -> dict[str, str]:
    """{transformers name: official Wan T5 name}, inverting the loader's mapping."""
    per_block = ["norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight",
                 "ffn.fc2.weight"]
    layers = 1 + max(int(n.split(".")[2]) for n in hf_names if n.startswith("encoder.block."))
    official = ["token_embedding.weight", "norm.weight"] + [
        f"blocks.{i}.{n}" for i in range(layers) for n in per_block]
    return {hf: name for hf, name in official_to_transformers({n: n for n in official}).items()
            if hf != "encoder.embed_tokens.weight"}


def _head_metadata(cfg: DiTConfig) -> dict[str, str]:
    """The head count is in no tensor shape; our tiny heads are not Wan's 128 wide."""
    return {"format": "pt", NUM_HEADS_KEY: str(cfg.num_heads)}


def _write_sharded(folder: Path, sd: dict[str, torch.Tensor], stem: str, metadata: dict[str, str]) -> None:
    """`stem-0000i-of-0000n.safetensors` shards plus `stem.safetensors.index.json`."""
    folder.mkdir(parents=True)
    names = list(sd)
    per_shard = math.ceil(len(names) / SHARDS)
    weight_map = {}
    for i in range(SHARDS):
        shard = f"{stem}-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        chunk = names[i * per_shard:(i + 1) * per_shard]
        save_file({k: sd[k] for k in chunk}, str(folder / shard), metadata=metadata)
        weight_map.update({k: shard for k in chunk})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---------------------------------------------------------------------------------------------
# Writers, one per layout


def write_official(out_dir: Path, tiny: TinySet) -> None:
    """The Wan-AI/Wan2.2-T2V-A14B folder layout, with official file names and dtypes."""
    cfg = tiny.cfg.dit
    config = {"_class_name": "WanModel", "model_type": "t2v", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
              "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "eps": cfg.eps,
              "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "text_len": cfg.text_len,
              "text_dim": cfg.text_dim}
    for folder, sd in ((HIGH_NOISE_DIR, tiny.high), (LOW_NOISE_DIR, tiny.low)):
        _write_sharded(out_dir / folder, sd, "diffusion_pytorch_model", _head_metadata(cfg))
        (out_dir / folder / "config.json").write_text(json.dumps(config, indent=2))
    official_t5 = _official_t5_names(tiny.t5)
    torch.save({official_t5[k]: v for k, v in tiny.t5.items()}, out_dir / T5_FILE)
    tokenizer_dir = out_dir / T5_TOKENIZER_DIR
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "spiece.model").write_bytes(tiny.spiece)
    torch.save(tiny.vae, out_dir / VAE_FILE)


def _scaled_fp8(sd: dict[str, torch.Tensor], quantized: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Comfy-Org's scaled-fp8 layout: chosen Linear weights in fp8 with a `.scale_weight`, the rest fp16."""
    out = {SCALED_FP8_MARKER: torch.empty(0, dtype=torch.float8_e4m3fn)}
    for name, tensor in sd.items():
        if quantized(name):
            out[name], scale = quantize_fp8(tensor)
            out[name.removesuffix("weight") + "scale_weight"] = scale
        else:
            out[name] = tensor.to(torch.float16)
    return out


def _linear_weights(module: torch.nn.Module, under: str) -> set[str]:
    """`<name>.weight` of every Linear below `under` (Comfy-Org's files quantise these)."""
    return {f"{name}.weight" for name in block_linears(module, under)}


def write_comfy(out_dir: Path, tiny: TinySet, fp8: bool = False) -> None:
    """ComfyUI's models folders with Comfy-Org's file names (bare official DiT names)."""
    high_name, low_name, t5_name = COMFY_FILES["comfy-fp8" if fp8 else "comfy"]
    folders = {key: out_dir / sub for key, sub in COMFY_DIRS.items()}
    for folder in folders.values():
        folder.mkdir(parents=True)
    with torch.device("meta"):
        dit_linears = _linear_weights(WanModel(tiny.cfg.dit), "blocks.")
        t5_linears = _linear_weights(build_umt5(tiny.cfg.text), "encoder.block.")
    for name, sd in ((high_name, tiny.high), (low_name, tiny.low)):
        tensors = (_scaled_fp8(sd, dit_linears.__contains__) if fp8
                   else {k: v.to(torch.float16) for k, v in sd.items()})
        save_file(tensors, str(folders["experts"] / name), metadata=_head_metadata(tiny.cfg.dit))
    t5 = (_scaled_fp8(tiny.t5, t5_linears.__contains__) if fp8
          else {k: v.to(torch.float16) for k, v in tiny.t5.items()})
    t5[SPIECE_KEY] = torch.frombuffer(bytearray(tiny.spiece), dtype=torch.uint8)
    save_file(t5, str(folders["text_encoder"] / t5_name), metadata={"format": "pt"})
    save_file({k: v.to(torch.float16) for k, v in tiny.vae.items()}, str(folders["vae"] / COMFY_VAE_FILE),
              metadata={"format": "pt"})


def write_diffusers(out_dir: Path, tiny: TinySet) -> None:
    """The Wan-AI/Wan2.2-T2V-A14B-Diffusers layout: diffusers names and configs."""
    cfg = tiny.cfg
    transformer_config = {
        "_class_name": "WanTransformer3DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "patch_size": list(cfg.dit.patch_size), "num_attention_heads": cfg.dit.num_heads,
        "attention_head_dim": cfg.dit.head_dim, "in_channels": cfg.dit.in_dim, "out_channels": cfg.dit.out_dim,
        "text_dim": cfg.dit.text_dim, "freq_dim": cfg.dit.freq_dim, "ffn_dim": cfg.dit.ffn_dim,
        "num_layers": cfg.dit.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": cfg.dit.eps, "image_dim": None, "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.dit.rope_max_positions, "pos_embed_seq_len": None}
    for key, sd in (("high_noise", tiny.high), ("low_noise", tiny.low)):
        folder = out_dir / DIFFUSERS_DIRS[key]
        _write_sharded(folder, {dit_official_to_diffusers(k): v for k, v in sd.items()},
                       "diffusion_pytorch_model", _head_metadata(cfg.dit))
        (folder / "config.json").write_text(json.dumps(transformer_config, indent=2))

    vae_dir = out_dir / DIFFUSERS_DIRS["vae"]
    vae_dir.mkdir(parents=True)
    renamed = vae_official_to_diffusers(tiny.vae)
    save_file({renamed[k]: v for k, v in tiny.vae.items()}, str(vae_dir / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    (vae_dir / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKLWan", "_diffusers_version": DIFFUSERS_VERSION, "base_dim": cfg.vae.base_dim,
        "z_dim": cfg.vae.z_dim, "dim_mult": list(cfg.vae.dim_mult), "num_res_blocks": cfg.vae.num_res_blocks,
        "attn_scales": [], "temperal_downsample": list(cfg.vae.temporal_downsample), "dropout": 0.0,
        "latents_mean": list(LATENT_MEAN), "latents_std": list(LATENT_STD)}, indent=2))

    text_dir = out_dir / DIFFUSERS_DIRS["text_encoder"]
    text_dir.mkdir(parents=True)
    save_file(tiny.t5, str(text_dir / "model.safetensors"), metadata={"format": "pt"})
    with torch.device("meta"):  # only its config is written
        build_umt5(cfg.text).config.save_pretrained(text_dir)

    tokenizer_dir = out_dir / DIFFUSERS_DIRS["tokenizer"]
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "spiece.model").write_bytes(tiny.spiece)
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": cfg.text.text_len}, indent=2))

    scheduler_dir = out_dir / "scheduler"
    scheduler_dir.mkdir()
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "UniPCMultistepScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": SamplerSettings().shift,
        "num_train_timesteps": 1000}, indent=2))
    (out_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "boundary_ratio": SamplerSettings().boundary, "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]},
        indent=2))


def _gguf_writer(arch: str, quant: str):
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    writer = GGUFWriter(path=None, arch=arch)  # adds general.architecture
    writer.add_quantization_version(GGML_QUANT_VERSION)
    file_type = getattr(LlamaFileType, f"MOSTLY_{quant}", None) or getattr(LlamaFileType, f"MOSTLY_{quant}_M")
    writer.add_file_type(file_type)
    return writer


def _add_gguf_tensor(writer, name: str, tensor: torch.Tensor, qtype: str) -> None:
    """One tensor as ggml stores it: F32/F16 as plain numbers, block types as [rows, bytes per row]."""
    from gguf import GGMLQuantizationType

    values = tensor.float()
    if qtype in ("F32", "F16"):  # the writer takes numpy floats as they are (any rank)
        writer.add_tensor(name, values.numpy() if qtype == "F32" else values.half().numpy())
        return
    data = quantize_gguf(values.reshape(-1, values.shape[-1]), qtype).numpy()
    writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype])


def _flattens(shape: torch.Size) -> bool:
    """ComfyUI-GGUF convert.py's rule for storing a tensor as (n / 256, 256) with its orig_shape."""
    n = math.prod(shape)
    return len(shape) > 1 and n >= 512 and n % 256 == 0 and shape[-1] % 256 != 0


def _write_gguf_file(writer, path: Path) -> None:
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_dit(path: Path, sd: dict[str, torch.Tensor], cfg: DiTConfig, quant: str) -> None:
    """A Wan expert as ComfyUI-GGUF's tools write it: block Linears in `quant` (K-quant rows of
    256), the 5-D patch embedding F32 (fix_5d_tensors), 1-D, small (<= 1024) and modulation
    tensors F32 (convert.py from an fp32 source), other tensors F16, no name prefix."""
    with torch.device("meta"):
        quantised = _linear_weights(WanModel(cfg), "blocks.")
    writer = _gguf_writer("wan", quant)
    writer.add_uint32("wan.attention.head_count", cfg.num_heads)  # tiny heads are not Wan's 128 wide
    for name, tensor in sd.items():
        if name in quantised:
            qtype = quant
        elif name == "patch_embedding.weight" or tensor.ndim == 1 or tensor.numel() <= 1024 or ".modulation" in name:
            qtype = "F32"
        else:
            qtype = "F16"
        if name == GGUF_FLATTENED and _flattens(tensor.shape):
            writer.add_array(ORIG_SHAPE_KEY + name, list(tensor.shape))  # INT32, as the converter writes it
            tensor = tensor.reshape(-1, 256)
        _add_gguf_tensor(writer, name, tensor, qtype)
    _write_gguf_file(writer, path)


def _add_gguf_tokenizer(writer, spiece: bytes) -> None:
    """The SentencePiece vocabulary as llama.cpp's T5 converter writes it (`tokenizer.ggml.*`)."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    model = sp.ModelProto()
    model.ParseFromString(spiece)
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece for p in model.pieces])
    writer.add_token_scores([p.score for p in model.pieces])
    writer.add_token_types([int(p.type) for p in model.pieces])
    writer.add_add_space_prefix(model.normalizer_spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(model.normalizer_spec.remove_extra_whitespaces)
    writer.add_precompiled_charsmap(model.normalizer_spec.precompiled_charsmap)
    writer.add_unk_token_id(model.trainer_spec.unk_id)
    writer.add_eos_token_id(model.trainer_spec.eos_id)
    writer.add_pad_token_id(model.trainer_spec.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)


def write_gguf_text_encoder(path: Path, t5: dict[str, torch.Tensor], spiece: bytes, quant: str) -> None:
    """A UMT5 encoder as llama.cpp's converter and llama-quantize write it: llama.cpp's T5 names,
    2-D weights in `quant` (Q8_0 where a row is not whole blocks of it, as llama-quantize falls
    back), relative-position tables and norms F32, the vocabulary in the metadata."""
    writer = _gguf_writer("t5encoder", quant)
    for name, tensor in t5.items():
        rows_fit = tensor.ndim == 2 and tensor.shape[1] % TYPES[quant].block_size == 0
        qtype = "F32" if tensor.ndim == 1 or "relative_attention_bias" in name else quant if rows_fit else "Q8_0"
        _add_gguf_tensor(writer, t5_transformers_to_llamacpp(name), tensor, qtype)
    _add_gguf_tokenizer(writer, spiece)
    _write_gguf_file(writer, path)


def write_gguf(out_dir: Path, tiny: TinySet, quant: str = DEFAULT_GGUF_QUANT) -> None:
    """ComfyUI's models folders with GGUF experts and encoder (QuantStack's and city96's names) and
    the Comfy-Org VAE (there are no GGUF VAEs)."""
    cfg = tiny.cfg.dit
    if quant not in GGUF_QUANTS:
        raise ValueError(f"--quant must be one of {', '.join(GGUF_QUANTS)}; got {quant!r}")
    block = TYPES[quant].block_size
    if cfg.dim % block or cfg.ffn_dim % block:
        raise ValueError(f"{quant} stores each row in blocks of {block} weights: --dim and --ffn-dim must be "
                         f"multiples of {block} (got {cfg.dim} and {cfg.ffn_dim}); e.g. --dim 256 --ffn-dim 512")
    folders = {key: out_dir / sub for key, sub in COMFY_DIRS.items()}
    for folder in folders.values():
        folder.mkdir(parents=True)
    high_name, low_name, t5_name = (name.format(quant=quant) for name in GGUF_FILES)
    write_gguf_dit(folders["experts"] / high_name, tiny.high, cfg, quant)
    write_gguf_dit(folders["experts"] / low_name, tiny.low, cfg, quant)
    write_gguf_text_encoder(folders["text_encoder"] / t5_name, tiny.t5, tiny.spiece, quant)
    save_file({k: v.to(torch.float16) for k, v in tiny.vae.items()}, str(folders["vae"] / COMFY_VAE_FILE),
              metadata={"format": "pt"})


WRITERS = {"official": write_official, "comfy": write_comfy,
           "comfy-fp8": lambda out, tiny: write_comfy(out, tiny, fp8=True), "diffusers": write_diffusers}


def make_tiny(out_dir: str | Path, fmt: str = "official", cfg: ModelConfig = TINY, seed: int = 0,
              quant: str | None = None) -> Path:
    """Write a complete tiny model set to `out_dir` (must not exist or be empty).

    quant: the GGUF type of the quantised tensors (format "gguf" only; default Q8_0).
    Written into a temporary sibling folder and renamed at the end, so an interrupted run
    never leaves a half-written model set under `out_dir`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if quant is not None and fmt != "gguf":
        raise ValueError(f"--quant {quant} applies to --format gguf only (got --format {fmt})")
    if fmt == "gguf":
        quant = quant or DEFAULT_GGUF_QUANT
    writer = (lambda out, tiny: write_gguf(out, tiny, quant)) if fmt == "gguf" else WRITERS[fmt]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        writer(staging, tiny_set(cfg, seed))
        quant_field = {"quant": quant} if fmt == "gguf" else {}
        (staging / "tiny_config.json").write_text(json.dumps({"seed": seed, "format": fmt, **quant_field,
                                                              **asdict(cfg)}, indent=2))
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


# ---------------------------------------------------------------------------------------------
# Tiny LoRA files, in the formats lora.py reads

TINY_LORA_FORMATS = ("comfy", "kohya", "peft", "diffusers", "lightx2v")
_ALPHA_FORMATS = ("comfy", "kohya", "lightx2v")  # the others store no alpha (scale 1)


@dataclass(frozen=True)
class TinyLora:
    """What `write_tiny_lora` wrote, in official names, as the file holds it (upcast to fp32)."""

    path: Path
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (up, down, alpha)
    diffs: dict[str, torch.Tensor]  # parameter -> full delta


def _stored_key(fmt: str, module: str, kind: str) -> str:
    """The key `fmt` uses for `kind` ("down", "up", "alpha", "diff", "diff_b", "diff_m") of a module."""
    if fmt == "kohya":
        return f"lora_unet_{module.replace('.', '_')}.lora_{kind}.weight" if kind in ("down", "up") \
            else f"lora_unet_{module.replace('.', '_')}.{kind}"
    if fmt in ("peft", "diffusers"):
        if fmt == "diffusers":
            module = dit_official_to_diffusers(module + ".weight").removesuffix(".weight")
        prefix = "transformer." if fmt == "diffusers" else "base_model.model."
        return f"{prefix}{module}.lora_{'A' if kind == 'down' else 'B'}.weight"
    return f"diffusion_model.{module}." + (f"lora_{kind}.weight" if kind in ("down", "up") else kind)


def write_tiny_lora(path: str | Path, model: torch.nn.Module, fmt: str = "comfy", rank: int = 4, seed: int = 0,
                    targets: Sequence[str] | None = None, alpha: float | None = None,
                    dtype: torch.dtype = torch.float32) -> TinyLora:
    """Write a random LoRA for `model` (any WanModel, meta is fine) in format `fmt` and return its tensors.

    targets: module names (default: every Linear in the blocks; convolutions such as
    `patch_embedding` work too). alpha: defaults to rank / 2 in formats that store one, so
    alpha/rank is not 1. "lightx2v" also writes `.diff_b` for each target's bias and, per block,
    `norm3.diff`/`.diff_b` and `diff_m` (modulation).
    """
    if fmt not in TINY_LORA_FORMATS:
        raise ValueError(f"LoRA format must be one of {', '.join(TINY_LORA_FORMATS)}; got {fmt!r}")
    if alpha is not None and fmt not in _ALPHA_FORMATS:
        raise ValueError(f"format {fmt!r} stores no alpha (it is the rank); pass alpha=None or use "
                         f"one of {', '.join(_ALPHA_FORMATS)}")
    targets = list(targets) if targets is not None else list(block_linears(model))
    alpha = (rank / 2 if fmt in _ALPHA_FORMATS else float(rank)) if alpha is None else float(alpha)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):  # ~0.1 per factor: deltas of 10-20% of the tiny weights, visible in outputs
        return (torch.randn(shape, generator=g) * 0.1).to(dtype)

    tensors, low_rank, diffs = {}, {}, {}
    for module in targets:
        shape = model.get_submodule(module).weight.shape
        up, down = rand(shape[0], rank, *[1] * (len(shape) - 2)), rand(rank, *shape[1:])
        tensors[_stored_key(fmt, module, "up")], tensors[_stored_key(fmt, module, "down")] = up, down
        if fmt in _ALPHA_FORMATS:
            tensors[_stored_key(fmt, module, "alpha")] = torch.tensor(alpha)
        low_rank[module] = (up.float(), down.float(), alpha)
    if fmt == "lightx2v":
        params = dict(model.named_parameters())
        full = {f"{m}.bias": (m, "diff_b") for m in targets}  # parameter -> (module, kind) of its delta
        for i in sorted({int(n.split(".")[1]) for n in params if n.startswith("blocks.")}):
            full.update({f"blocks.{i}.norm3.weight": (f"blocks.{i}.norm3", "diff"),
                         f"blocks.{i}.norm3.bias": (f"blocks.{i}.norm3", "diff_b"),
                         f"blocks.{i}.modulation": (f"blocks.{i}", "diff_m")})
        for name, (module, kind) in full.items():
            if name in params:
                tensors[_stored_key(fmt, module, kind)] = delta = rand(*params[name].shape)
                diffs[name] = delta.float()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return TinyLora(Path(path), low_rank, diffs)
