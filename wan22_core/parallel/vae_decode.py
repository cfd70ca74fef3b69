"""Row-parallel VAE decode: the Wan2.1 decoder split across a process group by rows (height).

Every rank holds the whole latent (small: 16 x 21 x 90 x 160 fp32 is 19 MB at 720p) and decodes
one band of its rows (`row_bands`: as even as possible, the first h % P ranks one row more), so
each rank holds about 1/P of the decoder's activations. The decoder reaches across a band's edge
in two places only, and `RowBand`, swapped into the model's row seam (`models.vae.WholeRows`),
supplies both:

- a spatial convolution of kernel height k reads k // 2 rows beyond the band on either side:
  `pad` brings those halo rows from the neighbouring ranks' input to the same layer (zeros at the
  frame's top and bottom, as in one process), so the convolution is the one-process convolution.
  The convolution after a 2x nearest upsampling gets ceil(k // 2 / 2) rows before it instead
  (each becomes two), half the bytes, and no padded copy of the upsampled frames;
- the mid-block attention attends over the whole frame: `whole` all-gathers the bands, and the
  rank keeps the queries of its own rows.

Nothing else looks at other rows: the norms are per pixel over channels, the 2x nearest
upsampling maps output rows 2i and 2i+1 to input row i (a band of h rows becomes one of 2h),
and the time convolutions stay in their pixel. The causal time cache is each rank's own: it
holds the band's rows (halo included) of the frames each layer saw last. Which layers exchange
how many rows is read from the modules (`row_exchanges`), never written down by hand.

Frames are assembled on one rank (`gather_bands`), on its CPU, band by band.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..models.vae import WHOLE_ROWS, AttentionBlock, CausalConv3d, Resample, WanVAE

Group = dist.ProcessGroup | None  # None: the default group


# ---------------------------------------------------------------------------------------------
# What crosses a band's edge, read from the decoder's modules


@dataclass(frozen=True)
class RowExchange:
    """One layer of the decoder that needs rows of other bands, in forward order.

    kind "halo": a spatial convolution, `rows` rows from each neighbour; "gather": an attention
    over the whole frame. `scale` is its rows per latent row (x2 per upsampling before it), and
    `frames` the frames it sees per latent frame after the first (x2 per temporal upsampling; the
    first latent frame stays one frame throughout, official "Rep").
    """

    name: str
    kind: str
    rows: int
    channels: int
    scale: int
    frames: int


def row_exchanges(decoder: nn.Module) -> list[RowExchange]:
    """Every layer of `decoder` that reaches across a band's edge, with how far, in forward order
    (module order is forward order here: an upsampling Resample comes before its children)."""
    found, scale, frames = [], 1, 1
    for name, module in decoder.named_modules():
        if isinstance(module, Resample) and module.mode.startswith("upsample"):
            frames *= 2 if module.mode == "upsample3d" else 1  # the time conv runs first
            # its halo rows are exchanged before the 2x upsampling, each covering two rows after it
            found.append(_halo(name, module.resample[1], module.halo_rows, 2, scale, frames))
            scale *= 2
        elif isinstance(module, CausalConv3d) and module.halo_rows:
            found.append(_halo(name, module, module.halo_rows, 1, scale, frames))
        elif isinstance(module, AttentionBlock):
            found.append(RowExchange(name, "gather", 0, module.to_qkv.in_channels, scale, frames))
    return found


def _halo(name: str, conv: nn.Module, rows: int, magnify: int, scale: int, frames: int) -> RowExchange:
    """The exchange of a convolution whose input rows are padded by `rows` rows, each of which
    becomes `magnify` rows before the convolution reads them."""
    kernel, stride, padding = conv.kernel_size[-2], conv.stride[-2], conv.padding[-2]
    if stride != 1 or kernel % 2 == 0 or padding or rows * magnify < kernel // 2:
        raise ValueError(f"decoder layer {name}: kernel height {kernel}, stride {stride}, row padding {padding} and "
                         f"{rows} halo row(s) do not keep the height, so a band of rows cannot map to a band")
    return RowExchange(name, "halo", rows, conv.in_channels, scale, frames)


def row_bands(height: int, ranks: int) -> list[int]:
    """Latent rows per rank: as even as possible, the first height % ranks one more."""
    return [height // ranks + (i < height % ranks) for i in range(ranks)]


def check_bands(decoder: nn.Module, height: int, ranks: int) -> list[int]:
    """row_bands, or a ValueError when a rank would get too few rows for some layer's halo (at least
    one latent row each: the Wan2.1 decoder's convolutions reach one row)."""
    bands = row_bands(height, ranks)
    need = max([1] + [math.ceil(e.rows / e.scale) for e in row_exchanges(decoder)])  # latent rows per rank
    if min(bands) < need:
        most = height // need
        raise ValueError(f"a latent {height} row{'s' if height != 1 else ''} high cannot be split over {ranks} ranks: "
                         f"each rank needs at least {need} latent row(s) ({8 * need} px); decode on at most "
                         f"{most} rank{'s' if most != 1 else ''}, or on one")
    return bands


def can_split_rows(vae: WanVAE, height: int, ranks: int) -> bool:
    """Whether a latent `height` rows high decodes on `ranks` ranks (check_bands passes)."""
    try:
        check_bands(vae.decoder, height, ranks)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The seam on one rank


class RowBand:
    """The decoder's row seam on one rank of a row-parallel decode (see models.vae.WholeRows)."""

    def __init__(self, group: Group, bands: list[int]):
        self.group = group
        self.bands = bands
        self.index = dist.get_rank(group)
        self.neighbours = [i for i in (self.index - 1, self.index + 1) if 0 <= i < len(bands)]

    def pad(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x [..., h, W] with the `rows` rows above and below it: the neighbours' edge rows, zeros
        at the frame's top and bottom."""
        edge = {self.index - 1: x[..., :rows, :], self.index + 1: x[..., -rows:, :]}  # what each neighbour needs
        halo = {i: x.new_zeros(*x.shape[:-2], rows, x.shape[-1]) for i in (self.index - 1, self.index + 1)}
        ops = [op for i in self.neighbours for op in (
            dist.P2POp(dist.isend, edge[i].contiguous(), group=self.group, group_peer=i),
            dist.P2POp(dist.irecv, halo[i], group=self.group, group_peer=i))]
        for work in dist.batch_isend_irecv(ops) if ops else ():
            work.wait()
        return torch.cat([halo[self.index - 1], x, halo[self.index + 1]], dim=-2)

    def whole(self, x: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """(the whole frame [..., H, W] that x [..., h, W] is this rank's band of, x's rows in it)."""
        scale = x.shape[-2] // self.bands[self.index]
        tallest = max(self.bands) * scale  # all_gather takes equal sizes: pad every band to the tallest
        padded = F.pad(x, (0, 0, 0, tallest - x.shape[-2])).contiguous()
        parts = [torch.empty_like(padded) for _ in self.bands]
        dist.all_gather(parts, padded, group=self.group)
        frame = torch.cat([part[..., :rows * scale, :] for part, rows in zip(parts, self.bands)], dim=-2)
        start = sum(self.bands[:self.index]) * scale
        return frame, slice(start, start + x.shape[-2])


@contextmanager
def row_parallel(vae: WanVAE, group: Group, bands: list[int]) -> Iterator[None]:
    """Swap a RowBand into every row seam of `vae`'s decoder for the block, then put the one-process
    seam back (the model is unchanged afterwards)."""
    layers = [module for module in vae.decoder.modules() if getattr(module, "rows", None) is WHOLE_ROWS]
    seam = RowBand(group, bands)
    for module in layers:
        module.rows = seam
    try:
        yield
    finally:
        for module in layers:
            module.rows = WHOLE_ROWS


# ---------------------------------------------------------------------------------------------
# Decode and assemble


def decode_band(vae: WanVAE, raw: torch.Tensor, group: Group = None) -> tuple[torch.Tensor, list[int]]:
    """This rank's band of `vae.decode_raw(raw)` and the latent rows of every band.

    raw: the whole raw latent [B, 16, T, h, w] on every rank of `group` (each decodes its rows).
    Returns video rows [B, 3, 4(T-1)+1, 8 * rows, 8w] fp32, equal to those rows of the one-process
    decode. Every rank of `group` must call this with the same latent (the bands exchange rows).
    """
    bands = check_bands(vae.decoder, raw.shape[-2], dist.get_world_size(group))
    index = dist.get_rank(group)
    start = sum(bands[:index])
    with row_parallel(vae, group, bands):
        return vae.decode_raw(raw[..., start:start + bands[index], :]), bands


def gather_bands(band: torch.Tensor, bands: list[int], group: Group = None, dst: int = 0) -> torch.Tensor | None:
    """The bands of all ranks -> the whole video on rank `dst` of `group`, on its CPU (None elsewhere).

    Band by band through one buffer of the band's size on `dst`'s device, so `dst` never holds
    the whole video on the GPU (the official decode's rank-0 out-of-memory reports).
    """
    index = dist.get_rank(group)
    if index != dst:
        dist.send(band.contiguous(), group=group, group_dst=dst)
        return None
    scale = band.shape[-2] // bands[index]
    video = torch.empty(*band.shape[:-2], sum(bands) * scale, band.shape[-1], dtype=band.dtype)
    start = 0
    for src, rows in enumerate(bands):
        part = band
        if src != index:
            part = band.new_empty(*band.shape[:-2], rows * scale, band.shape[-1])
            dist.recv(part, group=group, group_src=src)
        video[..., start:start + rows * scale, :].copy_(part)
        start += rows * scale
    return video


def decode_on_ranks(vae: WanVAE, raw: torch.Tensor, group: Group = None, dst: int = 0) -> torch.Tensor | None:
    """Row-parallel `WanVAE.decode_raw` over `group`: the video [B, 3, F, H, W] fp32 in [-1, 1] on the CPU
    of rank `dst`, None on the others. raw: the whole raw latent, the same on every rank."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        band, bands = decode_band(vae, raw.to(device), group)
        return gather_bands(band, bands, group, dst)
