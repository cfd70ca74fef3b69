"""What a checkpoint is, from its header alone: kind, layout, variant, sizes.

Layouts, recognised by tensor names and shapes (never by file names):
- official `Wan-AI/Wan2.2-T2V-A14B` folder: sharded expert folders, `.pth` T5 and VAE;
- ComfyUI single files: official DiT names, bare or under `model.diffusion_model.`; the UMT5
  encoder in transformers names with the tokenizer embedded as a uint8 `spiece_model` tensor;
- scaled fp8 (a root `scaled_fp8` marker, fp8 weights and per-Linear `.scale_weight`, or newer
  ComfyUI's `.weight_scale`): block Linears stay fp8 (see `fp8.py`), the rest is dequantised;
- diffusers `Wan-AI/Wan2.2-T2V-A14B-Diffusers`: `transformer/`, `transformer_2/`, `vae/`
  (renamed through `keymaps`), `text_encoder/` (transformers UMT5) and `tokenizer/`;
- GGUF (`gguf.py`): ComfyUI-GGUF's Wan experts (`general.architecture` wan, official names,
  block Linears quantised) and llama.cpp's UMT5 encoders (llama.cpp's T5 names, tokenizer in
  the metadata); any other architecture is named in the refusal.
`check_slot` tells a file in the wrong slot (a VAE as an expert, an I2V or TI2V-5B model, a
LoRA, ...) from its header alone; every loader calls it first, `ModelFiles.check` for a set.

The DiT head count is not in any tensor shape. Files we write carry it in the safetensors
metadata (`num_heads`), folders in config.json; other files get the Wan convention of 128-wide
heads (every released Wan DiT).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import DiTConfig, VAEConfig
from ..models.text_encoder import SCALED_FP8_MARKER, SPIECE_KEY
from ..models.transformer import WanModel
from .gguf import DIT_ARCHITECTURES, TEXT_ARCHITECTURES, TOKENIZER_KEY
from .keymaps import COMFY_DIT_PREFIX, dit_diffusers_to_official, t5_llamacpp_to_transformers, vae_diffusers_to_official
from .layouts import DIFFUSERS_DIRS, WAN_HEAD_DIM
from .reading import Checkpoint, CheckpointError

DIT, VAE, TEXT_ENCODER = "Wan DiT expert", "Wan2.1 VAE", "UMT5-XXL text encoder"
SLOT_NEEDS = {
    DIT: "a Wan2.2 T2V-A14B expert (wan2.2_t2v_{high,low}_noise_14B_*.safetensors, an official "
         "high_noise_model/low_noise_model folder, diffusers transformer/ transformer_2/, or a GGUF "
         "Wan2.2-T2V-A14B-{High,Low}Noise-<quant>.gguf)",
    VAE: "the Wan2.1 VAE (wan_2.1_vae.safetensors, Wan2.1_VAE.pth or a diffusers vae/ folder)",
    TEXT_ENCODER: "the UMT5-XXL encoder (umt5_xxl_fp16.safetensors, umt5_xxl_fp8_e4m3fn_scaled.safetensors, "
                  "models_t5_umt5-xxl-enc-bf16.pth, a diffusers text_encoder/ folder or a GGUF "
                  "umt5-xxl-encoder-<quant>.gguf)",
}
# Modules only other Wan variants have (the markers ComfyUI's model_detection looks for).
_VARIANT_PREFIXES = {
    "vace_": "Wan VACE (video editing)", "control_adapter.": "Wan camera-control",
    "casual_audio_encoder.": "Wan2.2 S2V (speech-to-video)", "audio_proj.": "Wan HuMo",
    "face_adapter.": "Wan2.2 Animate",
}
_LORA_NAME = re.compile(r"lora_(A|B|up|down)\b|\.lora\.(up|down)\.|\.(alpha|diff|diff_b)$")


@dataclass(frozen=True)
class Identity:
    """What a file is. `names` maps stored names to our (official) names for its kind."""

    kind: str  # DIT, VAE, TEXT_ENCODER, "LoRA" or "unknown"
    layout: str  # "official", "comfy", "comfy-prefixed", "diffusers", "gguf" or ""
    description: str  # for messages: "a Wan DiT expert (dim 5120, 40 layers, 14.3B parameters, float16)"
    names: dict[str, str]
    scaled_fp8: bool = False
    problem: str | None = None  # why this file of the right kind still cannot run here, and what to do
    dit: DiTConfig | None = None


def identify(ckpt: Checkpoint) -> Identity:
    """Recognise a checkpoint from its header (no tensor data is read)."""
    if ckpt.gguf is not None:
        return _identify_gguf(ckpt)
    names = list(ckpt.entries)
    if any(_LORA_NAME.search(n) for n in names):
        pairs = sum(bool(re.search(r"lora_(A|down)\b|\.lora\.down\.", n)) for n in names)
        return Identity("LoRA", "", f"a LoRA ({pairs} low-rank layer pairs, not a full model)", {},
                        problem="load the base expert in this slot; a LoRA only patches one")
    official = _dit_names(names)
    if "head.modulation" in official.values() or "patch_embedding.weight" in official.values():
        return _identify_dit(ckpt, official)
    if "decoder.middle.0.residual.0.gamma" in names or "decoder.mid_block.resnets.0.norm1.gamma" in names:
        return _identify_vae(ckpt)
    if "token_embedding.weight" in names or any(n.startswith("encoder.block.") for n in names):
        return _identify_text_encoder(ckpt)
    return Identity("unknown", "", f"not a Wan checkpoint (first tensors: {', '.join(names[:4]) or 'none'})", {})


# Per-tensor fp8 scales, as `FP8Linear` and Comfy-Org's scaled-fp8 files name them. Newer ComfyUI
# saves the same scales as `.weight_scale` / `.input_scale`, with a `.comfy_quant` format tag per
# layer (comfyui.md 4.7); `_fp8_names` turns those into ours for every kind of file.
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
_SCALE_ALIASES = ((".weight_scale", ".scale_weight"), (".input_scale", ".scale_input"))
_FORMAT_TAG = ".comfy_quant"
_STORED_SCALE_SUFFIXES = (*SCALE_SUFFIXES, *(alias for alias, _ in _SCALE_ALIASES), _FORMAT_TAG)


def _fp8_names(renamed: dict[str, str]) -> dict[str, str]:
    """{stored: our name} with newer ComfyUI scale names made ours; the scaled-fp8 marker and
    format tags (no tensor of any model) dropped."""
    ours = {}
    for stored, name in renamed.items():
        if name == SCALED_FP8_MARKER or name.endswith(_FORMAT_TAG):
            continue
        for alias, legacy in _SCALE_ALIASES:
            if name.endswith(alias):
                name = name.removesuffix(alias) + legacy
        ours[stored] = name
    return ours


def _is_scaled_fp8(ckpt: Checkpoint, names: dict[str, str]) -> bool:
    return SCALED_FP8_MARKER in ckpt.entries or any(n.endswith(".scale_weight") for n in names.values())


def _dit_names(names: list[str]) -> dict[str, str]:
    """{stored name: official name} for DiT files in any layout; drops fp8 markers and format tags."""
    if sum(n.startswith(COMFY_DIT_PREFIX) for n in names) > len(names) // 2:
        # ComfyUI full-checkpoint layout; tensors under other prefixes belong to other models
        renamed = {n: n[len(COMFY_DIT_PREFIX):] for n in names if n.startswith(COMFY_DIT_PREFIX)}
    elif any(n.startswith("condition_embedder.") for n in names):
        renamed = {n: dit_diffusers_to_official(n) for n in names}
    else:
        renamed = {n: n for n in names}
    return _fp8_names(renamed)


def dtype_summary(ckpt: Checkpoint, names) -> str:
    """Stored dtypes by share of elements, e.g. "float8_e4m3fn/float16", or GGUF types such as
    "Q8_0/F32" (tokenizer and fp8 scales left out)."""
    counts: dict[str, int] = {}
    for n in names:
        if n in (SPIECE_KEY, SCALED_FP8_MARKER) or n.endswith(_STORED_SCALE_SUFFIXES):
            continue
        entry = ckpt.entries[n]
        dtype = entry.qtype.name if entry.qtype is not None else str(entry.dtype).removeprefix("torch.")
        counts[dtype] = counts.get(dtype, 0) + math.prod(entry.shape)
    return "/".join(sorted(counts, key=counts.get, reverse=True))


def _layout(ckpt: Checkpoint, official_names: bool) -> str:
    """"official" (folder or .pth), "comfy" (one safetensors file, official or transformers names),
    "diffusers", "gguf"."""
    if ckpt.gguf is not None:
        return "gguf"
    if not official_names:
        return "diffusers" if ckpt.path.is_dir() else "comfy"
    return "comfy" if ckpt.path.suffix == ".safetensors" else "official"


def _params(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"


def _identify_dit(ckpt: Checkpoint, names: dict[str, str]) -> Identity:
    layout = ("comfy-prefixed" if ckpt.gguf is None and next(iter(names)).startswith(COMFY_DIT_PREFIX)
              else _layout(ckpt, not any(n.startswith("condition_embedder.") for n in names)))
    scaled = _is_scaled_fp8(ckpt, names)
    sd = ckpt.meta_tensors(names)
    cfg = dit_config_from_state_dict(sd, ckpt.num_heads)
    params = sum(t.numel() for n, t in sd.items() if not n.endswith(SCALE_SUFFIXES))
    what = (f"a {{}} (dim {cfg.dim}, {cfg.num_layers} layers, {_params(params)} parameters, "
            f"{dtype_summary(ckpt, names)}{', scaled fp8' if scaled else ''})")
    variant = next((label for prefix, label in _VARIANT_PREFIXES.items() if any(n.startswith(prefix) for n in sd)),
                   None)
    problem = None
    if variant:
        problem = f"{variant} models have extra inputs; this engine runs text-to-video: use the T2V-A14B experts"
    elif "img_emb.proj.0.weight" in sd or cfg.in_dim == 36:
        variant = f"Wan image-to-video expert (in_dim {cfg.in_dim}: noise + image-condition channels)"
        problem = "image-to-video experts need an image input; use the Wan2.2 T2V-A14B experts"
    elif cfg.in_dim == 48 or cfg.out_dim == 48:
        variant = "Wan2.2 TI2V-5B model (48 latent channels of the Wan2.2 VAE)"
        problem = ("TI2V-5B is a single model on the Wan2.2 VAE's 48-channel latents; "
                   "use the two Wan2.2 T2V-A14B experts (16 channels, Wan2.1 VAE)")
    elif cfg.in_dim != 16 or cfg.out_dim != 16:
        variant = f"Wan variant with {cfg.in_dim} input / {cfg.out_dim} output channels"
        problem = "text-to-video needs 16 latent channels in and out; use the Wan2.2 T2V-A14B experts"
    elif any(n.endswith(SCALE_SUFFIXES) and sd[n].numel() != 1 for n in sd):
        problem = ("its fp8 scales are per block, not per tensor, which this loader does not read; "
                   "use the fp8_scaled, fp16 or bf16 file")
    else:
        problem = _dit_shape_problem(sd, cfg)
    return Identity(DIT, layout, what.format(variant or DIT), names, scaled, problem, cfg)


_BLOCK_PREFIX = re.compile(r"^blocks\.(\d+)\.")


@functools.lru_cache(maxsize=8)
def _dit_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a DiT of `cfg`, with one block standing for all (they are alike)."""
    with torch.device("meta"):
        model = WanModel(replace(cfg, num_layers=1))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _dit_shape_problem(sd: dict[str, torch.Tensor], cfg: DiTConfig) -> str | None:
    """Why the stored shapes cannot be the DiT that `cfg` (read from a few tensors) describes, if they cannot.

    From the header alone, before anything is read: a valid-looking header whose other tensors
    disagree (a damaged or spliced file) must not load, nor read rows of the wrong size.
    """
    blocks = {int(m.group(1)) for name in sd if (m := _BLOCK_PREFIX.match(name))}
    if len(blocks) != cfg.num_layers:  # num_layers is the highest index + 1 (which may be huge)
        first = next(i for i in range(cfg.num_layers) if i not in blocks)
        return (f"its blocks go up to blocks.{cfg.num_layers - 1} but {cfg.num_layers - len(blocks)} are missing "
                f"(e.g. blocks.{first}); the file is incomplete, download it again")
    expected = _dit_shapes(cfg)
    for name, tensor in sd.items():
        if name.endswith(SCALE_SUFFIXES):
            continue  # fp8 scales: one number per tensor, checked above
        wanted = expected.get(_BLOCK_PREFIX.sub("blocks.0.", name))
        if wanted is not None and tuple(tensor.shape) != wanted:
            return (f"tensor {name} has shape {list(tensor.shape)} where a DiT of dim {cfg.dim} and ffn_dim "
                    f"{cfg.ffn_dim} has {list(wanted)}; the file is damaged or mixes models, download it again")
    return None


def _identify_vae(ckpt: Checkpoint) -> Identity:
    stored = list(ckpt.entries)
    diffusers = "decoder.mid_block.resnets.0.norm1.gamma" in ckpt.entries
    names = vae_diffusers_to_official(stored) if diffusers else {n: n for n in stored}
    sd = ckpt.meta_tensors(names)
    z_dim = sd["conv2.weight"].shape[0] if "conv2.weight" in sd and sd["conv2.weight"].ndim else None
    what = f"a {{}} (z_dim {z_dim}, {dtype_summary(ckpt, stored)})"
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd or z_dim != VAEConfig().z_dim:
        return Identity(VAE, _layout(ckpt, not diffusers), what.format("Wan2.2 VAE"), names,
                        problem="the A14B experts work on the Wan2.1 VAE's 16-channel latents; "
                                "choose wan_2.1_vae.safetensors")
    return Identity(VAE, _layout(ckpt, not diffusers), what.format(VAE), names)


def _identify_text_encoder(ckpt: Checkpoint, names: dict[str, str] | None = None) -> Identity:
    """names: {stored: transformers or official name} (default: the stored names, fp8 scales renamed)."""
    names = names if names is not None else _fp8_names({n: n for n in ckpt.entries})
    official = "token_embedding.weight" in names.values()
    scaled = _is_scaled_fp8(ckpt, names)
    stored_of = {name: stored for stored, name in names.items()}
    embedding = ckpt.entries.get(stored_of.get("token_embedding.weight" if official else "shared.weight", ""))
    size = f"vocab {embedding.shape[0]}, dim {embedding.shape[1]}, " if embedding and len(embedding.shape) == 2 else ""
    layout = _layout(ckpt, official)
    tokenizer = SPIECE_KEY in names or (ckpt.gguf is not None and ckpt.gguf.has_tokenizer)
    what = f"a {{}} ({size}{dtype_summary(ckpt, names)}" \
           f"{', scaled fp8' if scaled else ''}{', with tokenizer' if tokenizer else ''})"
    # UMT5 has a relative-position table in every block; T5 v1.1 (Flux's / SD3's t5xxl) only in block 0.
    bias = "blocks.1.pos_embedding.embedding.weight" if official else \
        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    has_second_block = any(n.startswith(("blocks.1.", "encoder.block.1.")) for n in names.values())
    if has_second_block and bias not in names.values():
        return Identity(TEXT_ENCODER, layout, what.format("T5 v1.1 encoder (one shared position table)"), names,
                        scaled, problem="that is the T5-XXL of Flux/SD3, not UMT5-XXL; "
                                        "choose umt5_xxl_fp16.safetensors")
    return Identity(TEXT_ENCODER, layout, what.format(TEXT_ENCODER), names, scaled)


def _identify_gguf(ckpt: Checkpoint) -> Identity:
    """A GGUF file by its architecture: a Wan DiT (files of other tools may have none, then the
    names decide), a UMT5/T5 encoder, or another model, named."""
    arch = ckpt.gguf.architecture
    if arch in TEXT_ARCHITECTURES:
        names = {stored: name for stored in ckpt.entries if (name := t5_llamacpp_to_transformers(stored))}
        return _identify_text_encoder(ckpt, names)
    official = _dit_names(list(ckpt.entries))
    if arch in DIT_ARCHITECTURES and "patch_embedding.weight" not in official.values():
        return Identity(DIT, "gguf", f"an unfinished GGUF conversion of a Wan DiT ({dtype_summary(ckpt, official)}, "
                                     "no patch_embedding.weight)", official,
                        problem="ComfyUI-GGUF's convert.py leaves the 5-D patch embedding out and its "
                                "tools/fix_5d_tensors.py adds it back: run that, or download a finished file")
    if arch in (None, *DIT_ARCHITECTURES) and "patch_embedding.weight" in official.values():
        return _identify_dit(ckpt, official)
    what = f"GGUF {arch} model (general.architecture {arch!r})" if arch else "GGUF file of no known model"
    return Identity("unknown", "gguf", f"a {what}, not Wan (first tensors: {', '.join(list(ckpt.entries)[:3])})", {})


def check_slot(path: str | Path, slot: str, label: str | None = None) -> tuple[Checkpoint, Identity]:
    """Open `path`, recognise it and fail unless it fits `slot` (DIT, VAE or TEXT_ENCODER).

    Only headers are read, so a wrong file fails in milliseconds, before any heavy work.
    """
    ckpt = Checkpoint(path)
    found = identify(ckpt)
    label = label or slot
    if found.kind == slot and found.problem is None:
        return ckpt, found
    if found.kind == slot or found.kind not in SLOT_NEEDS:
        fix = found.problem or "choose the right file for this slot"
    else:
        fix = f"that file belongs in the {found.kind} slot" + (f" ({found.problem})" if found.problem else "")
    raise CheckpointError(f"{Path(path).name} is {found.description}, but the {label} slot needs "
                          f"{SLOT_NEEDS[slot]}: {fix}")



def dit_config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Sizes from tensor shapes (official names; meta tensors are fine); the head count is not
    in any shape, so it comes from a config, metadata, or the Wan convention of 128-wide heads."""
    try:
        patch = sd["patch_embedding.weight"]
        dim = patch.shape[0]
        layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_PREFIX.match(k)))
        return DiTConfig(
            dim=dim, in_dim=patch.shape[1], patch_size=tuple(patch.shape[2:]),
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=layers,
            num_heads=num_heads or max(1, dim // WAN_HEAD_DIM),
            text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch.shape[2:]))
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as err:  # missing names, too few dims
        raise CheckpointError(f"not a complete Wan DiT expert state dict (missing or odd {err})") from err


def tokenizer_folder(ckpt: Checkpoint, tokenizer_dir: str | Path | None) -> Path | None:
    """The tokenizer folder to use, or None when the file embeds `spiece_model` (a GGUF: its
    `tokenizer.ggml.*` vocabulary); fails early otherwise."""
    if tokenizer_dir is not None:
        folder = Path(tokenizer_dir)
        if not (folder / "spiece.model").is_file():
            raise CheckpointError(f"tokenizer folder {folder} has no spiece.model; point at the google/umt5-xxl "
                                  "folder or a diffusers tokenizer/ folder")
        return folder
    if SPIECE_KEY in ckpt.entries or (ckpt.gguf is not None and ckpt.gguf.has_tokenizer):
        return None
    sibling = ckpt.path.parent / DIFFUSERS_DIRS["tokenizer"]  # a diffusers text_encoder/ has one next to it
    if ckpt.path.is_dir() and (sibling / "spiece.model").is_file():
        return sibling
    if ckpt.gguf is not None:
        raise CheckpointError(f"{ckpt.path.name} is a UMT5 GGUF encoder without a tokenizer in its metadata (no "
                              f"{TOKENIZER_KEY}tokens): pass --tokenizer / tokenizer_dir with a folder holding "
                              "spiece.model (google/umt5-xxl), or use a GGUF made by llama.cpp's converter")
    raise CheckpointError(f"{ckpt.path.name} is a UMT5 text encoder without a tokenizer (no '{SPIECE_KEY}' tensor "
                          f"inside): pass --tokenizer / tokenizer_dir with a folder holding spiece.model "
                          f"(google/umt5-xxl), or use Comfy-Org's umt5_xxl_fp16.safetensors, which embeds it")
