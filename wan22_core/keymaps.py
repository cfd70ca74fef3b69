"""Parameter-name mappings between the official Wan naming (ours) and other namings.

The DiT table is the checked official <-> diffusers equivalence from
shared/reference/mappings.md. Each rule is a regex on the official name and its diffusers
replacement; rules are disjoint, so order only matters for readability. ComfyUI's files use the
official names, optionally under `COMFY_DIT_PREFIX`. The VAE tables are written from the
structure of diffusers' `AutoencoderKLWan` (checked name by name in tests/test_formats.py).
"""
from __future__ import annotations

import re

COMFY_DIT_PREFIX = "model.diffusion_model."  # ComfyUI's full-checkpoint prefix for the DiT

_DIT_RULES = [  # (official pattern, diffusers replacement)
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"\.self_attn\.norm_([qk])\.", r".attn1.norm_\1."),
    (r"\.self_attn\.([qkv])\.", r".attn1.to_\1."),
    (r"\.self_attn\.o\.", ".attn1.to_out.0."),
    (r"\.cross_attn\.norm_([qk])\.", r".attn2.norm_\1."),
    (r"\.cross_attn\.([qkv])\.", r".attn2.to_\1."),
    (r"\.cross_attn\.o\.", ".attn2.to_out.0."),
    (r"\.ffn\.0\.", ".ffn.net.0.proj."),
    (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),  # official norm1/norm2 carry no weights
]

# The inverse direction, written out as regexes on the diffusers name.
_DIT_RULES_INVERSE = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.attn1\.norm_([qk])\.", r".self_attn.norm_\1."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn2\.norm_([qk])\.", r".cross_attn.norm_\1."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
]


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def dit_official_to_diffusers(name: str) -> str:
    return _rename(name, _DIT_RULES)


def dit_diffusers_to_official(name: str) -> str:
    return _rename(name, _DIT_RULES_INVERSE)


# ---------------------------------------------------------------------------------------------
# Wan2.1 VAE: official (= ComfyUI) names <-> diffusers `AutoencoderKLWan` names.
#
# The encoder keeps one flat list (`encoder.downsamples.N` == `encoder.down_blocks.N`). The
# decoder's flat `decoder.upsamples.N` list is grouped by diffusers into levels: each level has
# `resnets_per_level` residual blocks (num_res_blocks + 1) and, except the last, one upsampler,
# so N = level * (resnets_per_level + 1) + position.

_VAE_BLOCK_RULES = [  # (official pattern, diffusers replacement), for everything but decoder.upsamples
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
]
_VAE_RESIDUAL_RULES = [  # inside a residual block: official nn.Sequential indices -> diffusers names
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
]

# The inverse directions, written out as regexes on the diffusers name.
_VAE_BLOCK_RULES_INVERSE = [
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
]
_VAE_RESIDUAL_RULES_INVERSE = [
    (r"\.norm1\.", ".residual.0."),
    (r"\.conv1\.", ".residual.2."),
    (r"\.norm2\.", ".residual.3."),
    (r"\.conv2\.", ".residual.6."),
    (r"\.conv_shortcut\.", ".shortcut."),
]


def _vae_resnets_per_level(names: list[str], diffusers: bool) -> int:
    """Residual blocks per decoder level, read from the names (2 + 1 for the real VAE)."""
    if diffusers:
        found = {int(m.group(1)) for n in names if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", n))}
        return len(found)
    first_resample = [int(m.group(1)) for n in names
                      if (m := re.match(r"decoder\.upsamples\.(\d+)\.(resample|time_conv)\.", n))]
    if not first_resample:
        raise ValueError("VAE state dict has no decoder.upsamples.N.resample keys; it is not a Wan2.1 VAE")
    return min(first_resample)


def vae_official_to_diffusers(names) -> dict[str, str]:
    """{official name: diffusers name} for a whole Wan2.1 VAE state dict's names."""
    names = list(names)
    per_level = _vae_resnets_per_level(names, diffusers=False)

    def rename(name: str) -> str:
        m = re.match(r"decoder\.upsamples\.(\d+)\.", name)
        if m:
            level, position = divmod(int(m.group(1)), per_level + 1)
            block = f"resnets.{position}" if position < per_level else "upsamplers.0"
            name = f"decoder.up_blocks.{level}.{block}." + name[m.end():]
        return _rename(_rename(name, _VAE_BLOCK_RULES), _VAE_RESIDUAL_RULES)

    return {name: rename(name) for name in names}


def vae_diffusers_to_official(names) -> dict[str, str]:
    """{diffusers name: official name}, the inverse of `vae_official_to_diffusers`."""
    names = list(names)
    per_level = _vae_resnets_per_level(names, diffusers=True)

    def rename(name: str) -> str:
        # residual parts first: the block rules create `encoder.conv1.`, which is not a residual conv
        name = _rename(name, _VAE_RESIDUAL_RULES_INVERSE)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.", name)
        if m:
            position = per_level if m.group(2) is None else int(m.group(2))
            name = f"decoder.upsamples.{int(m.group(1)) * (per_level + 1) + position}." + name[m.end():]
        return _rename(name, _VAE_BLOCK_RULES_INVERSE)

    return {name: rename(name) for name in names}
