"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, official key names, causality, tiling.

Two small configs: config.TINY.vae, and CONVERTIBLE, which has the real model's block layout
(dim_mult (1,2,4,4), two residual blocks per level) because diffusers' official->diffusers
converter hard-codes the real decoder's block indices. TINY.vae (one residual block per level)
goes through the same converter plus a generic renaming of `decoder.upsamples.N`.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from reference import rel_l2

from wan22_core.config import LATENT_MEAN, LATENT_STD, TINY, VAEConfig
from wan22_core.models.vae import (
    WanVAE,
    denormalize_latent,
    normalize_latent,
    to_images,
)

CONVERTIBLE = VAEConfig(base_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
CONFIGS = {"tiny": TINY.vae, "convertible": CONVERTIBLE}

PARITY_RTOL = 1e-5  # relative L2, fp32
TILE_ATOL = 2e-4  # max abs in [-1, 1] output units; measured 4.6e-5 (blending near-local tiles)


def randomise(vae: WanVAE, seed: int = 0, spatial_taper: float = 1.0) -> WanVAE:
    """Seeded random weights that keep activations O(1), so outputs are neither ~0 nor clamped.

    spatial_taper scales the off-centre taps of every 3x3 spatial kernel: below 1 it narrows
    the decoder's receptive field, the way a trained decoder is mostly local.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.ndim == 1:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
                if param.shape[-2:] == (3, 3):
                    taper = torch.full((3, 3), spatial_taper)
                    taper[1, 1] = 1.0
                    param.mul_(taper)
    return vae.eval()


def diffusers_vae(cfg: VAEConfig) -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
    ).eval()


_RESNET_NAMES = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
                 "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}


def to_diffusers(state_dict: dict, cfg: VAEConfig) -> dict:
    """Official names -> diffusers names for any num_res_blocks (diffusers' converter assumes 2)."""
    if cfg.num_res_blocks == 2:
        return convert_wan_vae_to_diffusers(state_dict)
    per_level = cfg.num_res_blocks + 2  # residual blocks, then one Resample
    rest, upsamples = {}, {}
    for key, value in state_dict.items():
        if not key.startswith("decoder.upsamples."):
            rest[key] = value
            continue
        index, tail = key.removeprefix("decoder.upsamples.").split(".", 1)
        level, j = divmod(int(index), per_level)
        if j == cfg.num_res_blocks + 1:
            upsamples[f"decoder.up_blocks.{level}.upsamplers.0.{tail}"] = value
        else:
            prefix = next(p for p in _RESNET_NAMES if tail.startswith(p))
            tail = _RESNET_NAMES[prefix] + tail.removeprefix(prefix)
            upsamples[f"decoder.up_blocks.{level}.resnets.{j}.{tail}"] = value
    return {**convert_wan_vae_to_diffusers(rest), **upsamples}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(ours, diffusers) with the same random weights."""
    cfg = CONFIGS[request.param]
    ours = randomise(WanVAE(cfg))
    theirs = diffusers_vae(cfg)
    theirs.load_state_dict(to_diffusers(ours.state_dict(), cfg), strict=True)
    return ours, theirs


# ---------------------------------------------------------------------------------------------
# Parity with diffusers


def diffusers_stats(theirs: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' own per-channel latent mean and std (its config), shaped [1, 16, 1, 1, 1]."""
    return tuple(torch.tensor(theirs.config[key]).view(1, -1, 1, 1, 1) for key in ("latents_mean", "latents_std"))


def test_latent_statistics_are_diffusers_all_32_values():
    """All 16 means and 16 standard deviations, against AutoencoderKLWan's config (an independent
    copy of the official Wan2_1_VAE values): one wrong channel shifts that channel of every video."""
    config = diffusers_vae(TINY.vae).config
    assert list(LATENT_MEAN) == list(config.latents_mean)
    assert list(LATENT_STD) == list(config.latents_std)


@pytest.mark.parametrize("latent_frames, video_frames", [(1, 1), (2, 5), (5, 17)])
def test_decode_matches_diffusers(pair, latent_frames, video_frames):
    ours, theirs = pair
    z = torch.randn(1, 16, latent_frames, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        video = ours.decode(z)
        # diffusers decodes raw latents; ours takes the engine's normalised ones (its stats, not ours)
        mean, std = diffusers_stats(theirs)
        expected = theirs.decode(z * std + mean).sample
    assert video.shape == (1, 3, video_frames, 32, 32)
    assert rel_l2(video, expected) <= PARITY_RTOL
    # Non-trivial output: spread out, and mostly not saturated by the final clamp.
    assert video.std() > 0.1
    assert (video.abs() >= 1.0).float().mean() < 0.2


def test_raw_latents_decode_as_diffusers_decodes_them(pair):
    """The raw entry (ComfyUI's LATENT space): both sides take the same raw latent, so no
    normalisation of ours is on either side of the comparison."""
    ours, theirs = pair
    raw = 2 * torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        video, expected = ours.decode_raw(raw), theirs.decode(raw).sample
    assert rel_l2(video, expected) <= PARITY_RTOL and video.std() > 0.1


@pytest.mark.parametrize("video_frames, latent_frames", [(1, 1), (5, 2), (17, 5)])
def test_encode_matches_diffusers_posterior_mean(pair, video_frames, latent_frames):
    ours, theirs = pair
    gen = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, video_frames, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        latent = ours.encode(video)
        mean, std = diffusers_stats(theirs)
        expected = (theirs.encode(video).latent_dist.mean - mean) / std
        round_trip = ours.decode(latent)
    assert latent.shape == (1, 16, latent_frames, 4, 4)
    assert rel_l2(latent, expected) <= PARITY_RTOL
    assert round_trip.shape == video.shape


# ---------------------------------------------------------------------------------------------
# Official key names


def test_state_dict_converts_strictly_into_diffusers():
    """diffusers' converter maps official names; a strict load proves ours are the official ones."""
    ours = WanVAE(CONVERTIBLE)
    theirs = diffusers_vae(CONVERTIBLE)
    result = theirs.load_state_dict(convert_wan_vae_to_diffusers(ours.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_full_size_keys_and_shapes_match_official():
    """The real VAEConfig(): every converted key and shape equals diffusers' default model."""
    with torch.device("meta"):
        ours = WanVAE(VAEConfig())
        theirs = AutoencoderKLWan()
    converted = convert_wan_vae_to_diffusers(ours.state_dict())
    converted = {k: tuple(v.shape) for k, v in converted.items()}
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert converted == expected
    keys = ours.state_dict().keys()
    for name in ("encoder.conv1.weight", "encoder.downsamples.5.time_conv.weight",
                 "encoder.head.2.weight", "conv1.weight", "conv2.weight",
                 "decoder.middle.1.to_qkv.weight", "decoder.upsamples.4.shortcut.weight",
                 "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.11.resample.1.weight",
                 "decoder.head.0.gamma"):
        assert name in keys


# ---------------------------------------------------------------------------------------------
# Causal chunking


def test_decode_is_causal_and_keeps_no_state_between_calls():
    vae = randomise(WanVAE(TINY.vae))
    z = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = vae.decode(z)
        prefix = vae.decode(z[:, :, :2])  # a fresh call: a leaked cache would change it
        again = vae.decode(z)
    # Latent frames 0..1 decode to video frames 0..4 whatever follows them.
    assert torch.allclose(prefix, full[:, :, :5], atol=1e-6)
    assert torch.equal(again, full)


def test_bf16_decode_and_encode_track_fp32():
    vae = randomise(WanVAE(TINY.vae))
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        video = vae.decode(z)
        latent = vae.encode(video)
        vae.to(torch.bfloat16)
        video_bf16 = vae.decode(z)
        latent_bf16 = vae.encode(video)
    assert video_bf16.dtype == latent_bf16.dtype == torch.float32
    assert rel_l2(video_bf16, video) < 5e-2  # bf16 has ~3 significant digits
    assert rel_l2(latent_bf16, latent) < 5e-2


def test_batch_items_are_independent():
    vae = randomise(WanVAE(TINY.vae))
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(2, 16, 2, 4, 4, generator=gen)
    video = torch.rand(2, 3, 5, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae.decode(z)[1:], vae.decode(z[1:]), atol=1e-5)
        assert torch.allclose(vae.encode(video)[1:], vae.encode(video[1:]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Tiled decode


def test_tiled_decode_matches_untiled():
    # Attention zeroed (its official initialisation) and a narrow receptive field: the decoder's
    # global attention and wide random kernels would make any tiling differ from the whole frame.
    vae = randomise(WanVAE(TINY.vae), spatial_taper=0.01)
    vae.decoder.middle[1].proj.weight.data.zero_()
    z = torch.randn(1, 16, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    passes = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape))
    with torch.no_grad():
        whole = vae.decode(z)
        passes.clear()
        tiled = vae.decode(z, tile_size=8, tile_overlap=4)
    hook.remove()
    assert len(passes) == 3 * 3 * 2  # 3x3 tiles, each with its own pass over the 2 latent frames
    assert all(shape[-2:] == (8, 8) for shape in passes)
    assert tiled.shape == whole.shape == (1, 3, 5, 128, 128)
    assert (tiled - whole).abs().max() <= TILE_ATOL


def test_one_tile_covering_the_frame_is_the_untiled_decode():
    vae = randomise(WanVAE(TINY.vae))
    z = torch.randn(1, 16, 2, 6, 6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tile_size=6, tile_overlap=2), vae.decode(z))


@pytest.mark.parametrize("tile_size, tile_overlap", [(8, 0), (8, 8), (4, 6)])
def test_bad_tiling_is_rejected(tile_size, tile_overlap):
    vae = WanVAE(TINY.vae)
    with pytest.raises(ValueError, match="tile_overlap"):
        vae.decode(torch.zeros(1, 16, 1, 16, 16), tile_size=tile_size, tile_overlap=tile_overlap)


# ---------------------------------------------------------------------------------------------
# Normalisation, images, validation


def test_latent_normalisation_round_trips_and_uses_the_official_stats():
    raw = torch.randn(2, 16, 3, 4, 5)
    assert torch.allclose(denormalize_latent(normalize_latent(raw)), raw, atol=1e-6)
    # Channel 0: mean -0.7571, std 2.8184 (official Wan2_1_VAE).
    one_std_above = torch.full((1, 16, 1, 1, 1), -0.7571 + 2.8184)
    assert math.isclose(normalize_latent(one_std_above)[0, 0].item(), 1.0, rel_tol=1e-6)


def test_decoded_frames_layout_and_range_in_both_latent_spaces():
    """pipeline.decode_to_video (normalised latents) and decode_raw_to_video (ComfyUI's raw ones)
    give ComfyUI's IMAGE layout; the raw entry decodes the raw latent as it is."""
    from wan22_core.pipeline import decode_raw_to_video, decode_to_video

    vae = randomise(WanVAE(TINY.vae))
    z = torch.randn(16, 2, 4, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        video = vae.decode(z[None])
    images = decode_to_video(vae, z)
    assert images.shape == (5, 32, 48, 3)  # [frames, H, W, RGB]
    assert images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert torch.equal(images, (video[0].permute(1, 2, 3, 0) + 1) / 2)
    assert torch.equal(to_images(video), images)
    raw = denormalize_latent(z[None])[0]
    torch.testing.assert_close(decode_raw_to_video(vae, raw), images, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="single decoded video"):
        to_images(torch.zeros(2, 3, 1, 8, 8))


@pytest.mark.parametrize("shape", [(1, 3, 6, 32, 32), (1, 3, 5, 30, 32), (1, 4, 5, 32, 32)])
def test_encode_rejects_bad_video_shapes(shape):
    with pytest.raises(ValueError, match="video"):
        WanVAE(TINY.vae).encode(torch.zeros(shape))


def test_decode_rejects_wrong_latent_channels():
    with pytest.raises(ValueError, match="latent must be"):
        WanVAE(TINY.vae).decode(torch.zeros(1, 48, 1, 4, 4))


def test_stride_is_derived_from_the_levels_and_matches_the_model():
    assert VAEConfig().stride == TINY.vae.stride == (4, 8, 8)  # Wan2.1: 2**2 frames, 2**3 pixels
    cfg = VAEConfig(base_dim=4, dim_mult=(1, 2, 2), temporal_downsample=(False, True))
    assert cfg.stride == (2, 4, 4)
    vae = WanVAE(cfg)  # the stride the shape checks use is the one the layers really have
    latent = vae.encode(torch.zeros(1, 3, 5, 16, 24))
    assert latent.shape == (1, 16, 3, 4, 6)
    assert vae.decode(latent).shape == (1, 3, 5, 16, 24)
    with pytest.raises(ValueError, match="frames must be 2k\\+1 and height/width multiples of 4/4"):
        vae.encode(torch.zeros(1, 3, 4, 16, 24))


def test_temporal_downsample_needs_one_entry_per_level():
    with pytest.raises(ValueError, match="one bool per level"):
        WanVAE(VAEConfig(dim_mult=(1, 2, 4), temporal_downsample=(False, True, True)))
