"""The Wan2.1 video VAE (z_dim 16) that the A14B experts share (official `wan/modules/vae2_1.py`).

Reading order: latent normalisation, the row seam and the convolutions, norm / residual /
attention / resample blocks, encoder and decoder, the `WanVAE` wrapper, tiled decode, `to_images`.

Module names are the official parameter names (`encoder.downsamples.N.residual.2.weight`,
`decoder.upsamples.N.time_conv.weight`, `conv1`, `conv2`, `*.gamma`, `middle.1.to_qkv`, ...), so
`Wan2.1_VAE.pth` and ComfyUI's `wan_2.1_vae.safetensors` load with `load_state_dict(strict=True)`.

Time is causal: every temporal convolution pads only in front, and a video is processed in
chunks (encode: 1, 4, 4, ... frames; decode: one latent frame at a time) with a per-call
`CausalCache` holding the frames each layer saw last. A cache lives for one encode or decode
call, so nothing leaks between calls. The official code keeps the same state in a list indexed
by a call counter (`feat_cache`, `feat_idx`); a dict keyed by layer gives the same numbers
without the counting.

Rows: every layer that looks at other rows of a frame (the spatial convolutions, the mid-block
attention) reaches them through a row seam, `WholeRows` here (zero padding, the whole frame).
`wan22_core.parallel.vae_decode` swaps in one that exchanges halo rows with other ranks, so the
decode can be split by rows across a process group; this file has no torch.distributed.

Precision: everything runs in the parameter dtype except the 2x nearest upsampling, which the
official code does in fp32. `encode` returns and `decode` takes/returns fp32 tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LATENT_MEAN, LATENT_STD, VAEConfig

# Layer -> its last input frames (None marks "has seen the first chunk", see Resample).
CausalCache = dict[nn.Module, "torch.Tensor | None"]


# ---------------------------------------------------------------------------------------------
# 1. Latent normalisation: the only place LATENT_MEAN / LATENT_STD are applied


def _latent_stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if like.ndim != 5 or like.shape[1] != len(LATENT_MEAN):
        raise ValueError(
            f"latent must be [B, {len(LATENT_MEAN)}, T, h, w], got shape {tuple(like.shape)}; "
            "pass a 5-D video latent with the channels on dim 1"
        )
    shape = (1, len(LATENT_MEAN), 1, 1, 1)
    mean = torch.tensor(LATENT_MEAN, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(LATENT_STD, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def normalize_latent(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent (ComfyUI's LATENT space) -> the engine's space: (raw - mean) / std."""
    mean, std = _latent_stats(raw)
    return (raw - mean) / std


def denormalize_latent(z: torch.Tensor) -> torch.Tensor:
    """The engine's normalised latent -> raw VAE latent: z * std + mean."""
    mean, std = _latent_stats(z)
    return z * std + mean


# ---------------------------------------------------------------------------------------------
# 2. The row seam and the convolutions


class WholeRows:
    """The row seam of one process, which holds every row of a frame.

    A spatial convolution asks `pad` for the `rows` rows above and below its input that its
    kernel reaches (zeros, as the convolution's own padding would give); the mid-block attention
    asks `whole` for the frame it attends over. `wan22_core.parallel.vae_decode.RowBand` answers
    the same two calls for one band of rows of a frame split across ranks.
    """

    def pad(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x [..., H, W] with `rows` zero rows above and below."""
        return F.pad(x, (0, 0, rows, rows))

    def whole(self, x: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """(the frame [..., H, W] that x's rows belong to, x's rows in it)."""
        return x, slice(None)


WHOLE_ROWS = WholeRows()  # stateless, shared by every layer until a row-parallel decode swaps its own in


class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space and only in front in time.

    With a cache, the front padding is the previous chunk's last frames instead of zeros, so
    processing a video chunk by chunk gives the same result as processing it whole. Rows are
    padded through the row seam (`self.rows`), columns by the convolution itself.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        kernel_size = _triple(kernel_size)
        pad_t, pad_h, pad_w = _triple(padding)
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=(0, 0, pad_w))
        # Official pads 2 * pad_t frames in front and none behind (CACHE_T = 2 for every
        # temporal conv in this VAE, all of which have pad_t = 1).
        self.history = 2 * pad_t
        self.halo_rows = pad_h
        self.rows = WHOLE_ROWS

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.halo_rows:  # before the time history, so the cache keeps the padded rows of past frames
            x = self.rows.pad(x, self.halo_rows)
        if self.history:
            past = cache.get(self) if cache is not None else None
            if past is None:  # start of the video
                b, c, _, h, w = x.shape
                past = x.new_zeros(b, c, self.history, h, w)
            x = torch.cat([past, x], dim=2)  # [B, C, history + T, H, W]
            if cache is not None:
                cache[self] = x[:, :, -self.history:].clone()
        return super().forward(x)


def _triple(value) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value, value)


# ---------------------------------------------------------------------------------------------
# 3. Blocks


class RMSNorm(nn.Module):
    """RMS norm over channels (dim 1): F.normalize(x) * sqrt(C) * gamma (official RMS_norm)."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.scale = dim**0.5
        # gamma is [C, 1, 1, 1] for video tensors and [C, 1, 1] for per-frame images, as stored.
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _apply(layers: nn.Module, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """Run `layers` in order, handing the cache to the layers that look back in time."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, _CAUSAL_LAYERS) else layer(x)
    return x


class ResidualBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1x1 shortcut conv when the channel count changes."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Index 5 was Dropout(0.0) in training; Identity keeps the second conv at `residual.6`.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, spatial_dims=3),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, spatial_dims=3),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.shortcut(x) + _apply(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no time mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.rows = WHOLE_ROWS  # keys and values come from the whole frame, queries from x's rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape  # h: x's rows (a band of the frame in a row-parallel decode)
        frame, mine = self.rows.whole(x)  # [B, C, T, H, W]
        frames = frame.transpose(1, 2).reshape(b * t, c, frame.shape[-2], w)  # [B*T, C, H, W]
        qkv = self.to_qkv(self.norm(frames))  # [B*T, 3C, H, W]
        q, k, v = (part.flatten(2).transpose(1, 2) for part in (qkv[:, :c, mine], qkv[:, c:2 * c], qkv[:, 2 * c:]))
        out = F.scaled_dot_product_attention(q, k, v)  # [B*T, h*W, C]
        out = self.proj(out.transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.view(b, t, c, h, w).transpose(1, 2)


class UpsampleFP32(nn.Upsample):
    """2x nearest-exact upsampling done in fp32, as the official code does, then cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """Per-frame 2x spatial up/down sampling; the `3d` modes also double/halve time.

    upsample*: channels halve (dim -> dim // 2). downsample*: channels stay.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            # The conv's rows are padded through the row seam before the upsampling (forward).
            conv = nn.Conv2d(dim, dim // 2, 3, padding=(0, 1))
            self.resample = nn.Sequential(UpsampleFP32(scale_factor=(2.0, 2.0), mode="nearest-exact"), conv)
            # nearest 2x copies every row twice: ceil(reach / 2) rows here cover the conv's reach there
            self.halo_rows = -(-(conv.kernel_size[0] // 2) // 2)
            self.rows = WHOLE_ROWS
        else:
            # Pad right/bottom only, so a stride-2 conv maps 2N pixels to exactly N.
            self.resample = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2)
            )
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        x = self._upsample(frames) if self.mode.startswith("upsample") else self.resample(frames)  # [B*T, C', H', W']
        x = x.view(b, t, *x.shape[1:]).transpose(1, 2)  # [B, C', T, H', W']
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _upsample(self, frames: torch.Tensor) -> torch.Tensor:
        """2x nearest upsampling, then the conv. Its halo rows are added before the upsampling, so
        the 4x larger upsampled frames are never copied just to pad them; rows the conv does not
        reach are cropped (a view)."""
        upsample, conv = self.resample
        x = upsample(self.rows.pad(frames, self.halo_rows))  # [B*T, C, 2(H + 2 halo), 2W]
        crop = 2 * self.halo_rows - conv.kernel_size[0] // 2
        return conv(x[..., crop:x.shape[-2] - crop, :])

    def _double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # The first chunk (latent frame 0) is passed through, so it becomes 1 video frame, not
        # 2: that is why T latents decode to 4(T-1)+1 frames. The time conv's causal history
        # therefore starts at the second chunk, with zeros in front (official "Rep" marker).
        if self not in cache:
            cache[self] = None
            return x
        b, c, t, h, w = x.shape
        x = self.time_conv(x, cache).view(b, 2, c, t, h, w)  # two output frames per input frame
        return x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, t * 2, h, w)  # interleave in time

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # The first chunk (1 frame) passes through; later chunks (even length) are prefixed
        # with the previous chunk's last frame and convolved with stride 2: 2k frames -> k.
        past = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if past is None:
            return x
        return self.time_conv(torch.cat([past, x], dim=2))


_CAUSAL_LAYERS = (CausalConv3d, ResidualBlock, Resample)


# ---------------------------------------------------------------------------------------------
# 4. Encoder and decoder


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        RMSNorm(in_dim, spatial_dims=3), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1)
    )


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8] (mean and log-variance)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[level] else "downsample2d"
                layers.append(Resample(out_dim, mode))
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _apply(self.downsamples, x, cache)
        x = _apply(self.middle, x, cache)
        return _apply(self.head, x, cache)


class Decoder3d(nn.Module):
    """Latent [B, z_dim, 1, h, w] chunk -> video frames [B, 3, 1 or 4, 8h, 8w]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # the previous level's upsampling conv halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
                layers.append(Resample(out_dim, mode))
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _apply(self.middle, x, cache)
        x = _apply(self.upsamples, x, cache)
        return _apply(self.head, x, cache)


# ---------------------------------------------------------------------------------------------
# 5. The VAE


def _check_config(cfg: VAEConfig) -> None:
    levels = len(cfg.dim_mult) - 1
    if len(cfg.temporal_downsample) != levels:
        raise ValueError(
            f"VAEConfig.temporal_downsample has {len(cfg.temporal_downsample)} entries but "
            f"dim_mult {cfg.dim_mult} has {levels} downsampling levels; give one bool per level"
        )
    if cfg.z_dim != len(LATENT_MEAN):
        raise ValueError(
            f"VAEConfig.z_dim must be {len(LATENT_MEAN)} (one LATENT_MEAN entry per channel), "
            f"got {cfg.z_dim}"
        )


class WanVAE(nn.Module):
    """Wan2.1 VAE: `encode` video -> normalised latent, `decode` normalised latent -> video.

    Latents are in the engine's normalised space; `normalize_latent` / `denormalize_latent`
    convert from / to raw VAE (and ComfyUI LATENT) space, and `decode_raw` takes a raw latent
    as it is. Callers wrap calls in torch.no_grad().
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, 4k+1, H, W] in [-1, 1] -> normalised mean latent [B, 16, k+1, H/8, W/8].

        Returns fp32: the posterior mean (the log-variance is dropped, as official does).
        """
        st, sh, sw = self.cfg.stride
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got shape {tuple(video.shape)}")
        frames, height, width = video.shape[2:]
        if (frames - 1) % st or height % sh or width % sw:
            raise ValueError(
                f"video of {frames} frames at {height}x{width} cannot be encoded: frames must be "
                f"{st}k+1 and height/width multiples of {sh}/{sw}; trim it, e.g. to "
                f"{(frames - 1) // st * st + 1} frames at {height // sh * sh}x{width // sw * sw}"
            )
        x = video.to(self.dtype)
        cache: CausalCache = {}
        # One frame first (it becomes latent frame 0 on its own), then st frames per latent.
        chunks = [x[:, :, :1]] + [x[:, :, i : i + st] for i in range(1, frames, st)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mean = self.conv1(out)[:, : self.cfg.z_dim]  # the other half is the log-variance
        return normalize_latent(mean.float())

    def decode(
        self, z: torch.Tensor, tile_size: int | None = None, tile_overlap: int = 8
    ) -> torch.Tensor:
        """Normalised latent [B, 16, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] fp32 in [-1, 1].

        tile_size (latent pixels, None = whole frame) decodes overlapping square tiles of that
        size, each with its own full causal pass over time, and cross-fades them linearly where
        they overlap (by at least `tile_overlap` latent pixels). Peak memory then scales with
        the tile, not the frame (e.g. tile_size=32, i.e. 256 px, for small GPUs). The result is
        close to, not equal to, the untiled decode: the decoder's mid-block attention and its
        receptive field stop at the tile edge.
        """
        return self.decode_raw(denormalize_latent(z.float()), tile_size, tile_overlap)

    def decode_raw(self, raw: torch.Tensor, tile_size: int | None = None, tile_overlap: int = 8) -> torch.Tensor:
        """Raw VAE latent [B, 16, T, h, w] (ComfyUI's LATENT space) -> video, as `decode`."""
        raw = raw.to(self.dtype)
        if tile_size is None:
            video = self._decode_frames(raw)
        else:
            video = self._decode_tiled(raw, tile_size, tile_overlap)
        return video.float().clamp_(-1.0, 1.0)

    def _decode_frames(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latent -> unclamped video, one latent frame at a time through one cache."""
        cache: CausalCache = {}
        x = self.conv2(raw)
        frames = [self.decoder(x[:, :, i : i + 1], cache) for i in range(x.shape[2])]
        return torch.cat(frames, dim=2)

    def _decode_tiled(self, raw: torch.Tensor, tile_size: int, tile_overlap: int) -> torch.Tensor:
        if not 1 <= tile_overlap < tile_size:
            raise ValueError(
                f"tile_overlap must be >= 1 and smaller than tile_size, got tile_overlap "
                f"{tile_overlap} with tile_size {tile_size}; e.g. tile_size=32, tile_overlap=8"
            )
        b, _, t, h, w = raw.shape
        _, sh, sw = self.cfg.stride
        rows = _tile_spans(h, tile_size, tile_overlap)
        cols = _tile_spans(w, tile_size, tile_overlap)
        row_weights = _blend_weights(rows, sh, raw.device)
        col_weights = _blend_weights(cols, sw, raw.device)
        frames = self.cfg.stride[0] * (t - 1) + 1
        video = torch.zeros(b, 3, frames, h * sh, w * sw, device=raw.device)
        total = torch.zeros(h * sh, w * sw, device=raw.device)
        for (y0, y1), wy in zip(rows, row_weights):
            for (x0, x1), wx in zip(cols, col_weights):
                tile = self._decode_frames(raw[..., y0:y1, x0:x1]).float()
                weight = wy[:, None] * wx[None, :]  # [tile H, tile W]
                video[..., y0 * sh : y1 * sh, x0 * sw : x1 * sw] += tile * weight
                total[y0 * sh : y1 * sh, x0 * sw : x1 * sw] += weight
        return video / total


def _tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of the fewest `tile`-long tiles covering `length`, spread evenly so that
    neighbours overlap by at least `overlap`."""
    if length <= tile:
        return [(0, length)]
    count = 1 + math.ceil((length - tile) / (tile - overlap))
    starts = [i * (length - tile) // (count - 1) for i in range(count)]
    return [(start, start + tile) for start in starts]


def _blend_weights(spans: list[tuple[int, int]], scale: int, device) -> list[torch.Tensor]:
    """Per-tile pixel weights along one axis: 1 inside, linear cross-fades at the overlaps.

    A tile's outermost pixels are its least accurate (the decoder zero-pads there instead of
    seeing the neighbour's content), so each cross-fade spans only the middle half of the
    overlap: the outer quarter on either side comes entirely from the other tile. The two
    ramps of a seam add up to 1.
    """
    weights = []
    for i, (start, end) in enumerate(spans):
        centres = torch.arange(start * scale, end * scale, device=device) + 0.5
        weight = torch.ones_like(centres)
        if i > 0:
            lo, hi = _cross_fade(start, spans[i - 1][1], scale)
            weight *= ((centres - lo) / (hi - lo)).clamp(0.0, 1.0)
        if i < len(spans) - 1:
            lo, hi = _cross_fade(spans[i + 1][0], end, scale)
            weight *= ((hi - centres) / (hi - lo)).clamp(0.0, 1.0)
        weights.append(weight)
    return weights


def _cross_fade(overlap_start: int, overlap_end: int, scale: int) -> tuple[float, float]:
    """Pixel interval of the middle half of a latent-space overlap."""
    quarter = (overlap_end - overlap_start) * scale / 4
    return overlap_start * scale + quarter, overlap_end * scale - quarter


def to_images(video: torch.Tensor) -> torch.Tensor:
    """One decoded video [1, 3, F, H, W] in [-1, 1] -> frames [F, H, W, 3] in [0, 1].

    That is ComfyUI's IMAGE layout; the tensor stays on the video's device.
    """
    if video.ndim != 5 or video.shape[:2] != (1, 3):
        raise ValueError(f"to_images takes a single decoded video [1, 3, F, H, W], got {tuple(video.shape)}; "
                         "decode batches with WanVAE.decode and convert each video")
    return ((video[0] + 1.0) / 2.0).permute(1, 2, 3, 0).contiguous()
