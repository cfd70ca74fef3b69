"""Parameter-name mappings between the official Wan naming (ours) and other namings.

Also llama.cpp's T5 encoder names (umt5-xxl GGUF files) -> transformers' UMT5 names.

The DiT table is the checked official <-> diffusers equivalence from
shared/reference/mappings.md. ComfyUI's files use the official names, optionally under
`COMFY_DIT_PREFIX`. The VAE tables are written from the structure of diffusers'
`AutoencoderKLWan` (checked name by name in tests/test_formats.py).

Each table is a list of (official, diffusers) name fragments, read in both directions: literal
text, `^` / `$` anchors, and placeholders `{n}` (a number), `{qk}`, `{qkv}` (one of those
letters; `{qkvo}` also o) and `{side}` (encoder or decoder) that carry over to the other name.
"""
from __future__ import annotations

import re

COMFY_DIT_PREFIX = "model.diffusion_model."  # ComfyUI's full-checkpoint prefix for the DiT

_DIT_PAIRS = [
    ("^time_embedding.0.", "^condition_embedder.time_embedder.linear_1."),
    ("^time_embedding.2.", "^condition_embedder.time_embedder.linear_2."),
    ("^text_embedding.0.", "^condition_embedder.text_embedder.linear_1."),
    ("^text_embedding.2.", "^condition_embedder.text_embedder.linear_2."),
    ("^time_projection.1.", "^condition_embedder.time_proj."),
    ("^head.modulation$", "^scale_shift_table$"),
    ("^head.head.", "^proj_out."),
    (".self_attn.norm_{qk}.", ".attn1.norm_{qk}."),
    (".self_attn.{qkv}.", ".attn1.to_{qkv}."),
    (".self_attn.o.", ".attn1.to_out.0."),
    (".cross_attn.norm_{qk}.", ".attn2.norm_{qk}."),
    (".cross_attn.{qkv}.", ".attn2.to_{qkv}."),
    (".cross_attn.o.", ".attn2.to_out.0."),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    ("^blocks.{n}.modulation$", "^blocks.{n}.scale_shift_table$"),
    ("^blocks.{n}.norm3.", "^blocks.{n}.norm2."),  # official norm1/norm2 carry no weights
]

_PLACEHOLDER = re.compile(r"\{(n|qk|qkv|qkvo|side)\}")
_GROUPS = {"n": r"(\d+)", "qk": "([qk])", "qkv": "([qkv])", "qkvo": "([qkvo])", "side": "(encoder|decoder)"}


def _rule(source: str, target: str) -> tuple[str, str]:
    """A fragment pair -> (regex on the source name, replacement)."""
    parts = _PLACEHOLDER.split(source.strip("^$"))  # literal, placeholder, literal, ...
    pattern = "".join(_GROUPS[p] if i % 2 else re.escape(p) for i, p in enumerate(parts))
    pattern = ("^" if source.startswith("^") else "") + pattern + ("$" if source.endswith("$") else "")
    group = iter(range(1, len(parts)))
    return pattern, _PLACEHOLDER.sub(lambda m: f"\\{next(group)}", target.strip("^$"))


def _rules(pairs, inverse: bool = False) -> list[tuple[str, str]]:
    return [_rule(b, a) if inverse else _rule(a, b) for a, b in pairs]


_DIT_RULES, _DIT_RULES_INVERSE = _rules(_DIT_PAIRS), _rules(_DIT_PAIRS, inverse=True)


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

_VAE_BLOCK_PAIRS = [  # everything but decoder.upsamples
    ("^encoder.downsamples.", "^encoder.down_blocks."),
    ("^{side}.middle.0.", "^{side}.mid_block.resnets.0."),
    ("^{side}.middle.1.", "^{side}.mid_block.attentions.0."),
    ("^{side}.middle.2.", "^{side}.mid_block.resnets.1."),
    ("^{side}.head.0.", "^{side}.norm_out."),
    ("^{side}.head.2.", "^{side}.conv_out."),
    ("^{side}.conv1.", "^{side}.conv_in."),
    ("^conv1.", "^quant_conv."),
    ("^conv2.", "^post_quant_conv."),
]
_VAE_RESIDUAL_PAIRS = [  # inside a residual block: official nn.Sequential indices <-> diffusers names
    (".residual.0.", ".norm1."),
    (".residual.2.", ".conv1."),
    (".residual.3.", ".norm2."),
    (".residual.6.", ".conv2."),
    (".shortcut.", ".conv_shortcut."),
]
_VAE_BLOCK_RULES, _VAE_BLOCK_RULES_INVERSE = _rules(_VAE_BLOCK_PAIRS), _rules(_VAE_BLOCK_PAIRS, inverse=True)
_VAE_RESIDUAL_RULES, _VAE_RESIDUAL_RULES_INVERSE = (_rules(_VAE_RESIDUAL_PAIRS),
                                                    _rules(_VAE_RESIDUAL_PAIRS, inverse=True))


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


# ---------------------------------------------------------------------------------------------
# UMT5 encoder: llama.cpp's GGUF tensor names (gguf-py's TENSOR_NAMES for T5) <-> transformers'
# UMT5EncoderModel names (the ones ComfyUI-GGUF's loader maps them to).

_T5_PAIRS = [
    ("^token_embd.", "^shared."),
    ("^enc.output_norm.", "^encoder.final_layer_norm."),
    ("^enc.blk.{n}.attn_norm.", "^encoder.block.{n}.layer.0.layer_norm."),
    ("^enc.blk.{n}.attn_{qkvo}.", "^encoder.block.{n}.layer.0.SelfAttention.{qkvo}."),
    ("^enc.blk.{n}.attn_rel_b.", "^encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias."),
    ("^enc.blk.{n}.ffn_norm.", "^encoder.block.{n}.layer.1.layer_norm."),
    ("^enc.blk.{n}.ffn_gate.", "^encoder.block.{n}.layer.1.DenseReluDense.wi_0."),
    ("^enc.blk.{n}.ffn_up.", "^encoder.block.{n}.layer.1.DenseReluDense.wi_1."),
    ("^enc.blk.{n}.ffn_down.", "^encoder.block.{n}.layer.1.DenseReluDense.wo."),
]
_T5_RULES, _T5_RULES_INVERSE = _rules(_T5_PAIRS), _rules(_T5_PAIRS, inverse=True)


def t5_llamacpp_to_transformers(name: str) -> str | None:
    """A llama.cpp T5 encoder tensor name in transformers' UMT5 naming; None for names without one
    (a full T5 file's decoder `dec.*`, which an encoder does not use)."""
    renamed = _rename(name, _T5_RULES)
    return renamed if renamed != name else None


def t5_transformers_to_llamacpp(name: str) -> str:
    """The inverse of `t5_llamacpp_to_transformers` (for writing tiny GGUF encoders)."""
    return _rename(name, _T5_RULES_INVERSE)
