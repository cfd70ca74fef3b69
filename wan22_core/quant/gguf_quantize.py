"""Float weights -> GGUF block bytes, for writing tiny GGUF files (`make-tiny --format gguf`).

The `gguf` package quantises the legacy types (Q4_0 ... Q8_0) and BF16 but no K-quant, so the
K-quants are encoded here: a simple, correct encoder per type, the exact inverse of the bit
layout `gguf_dequant` reads (ggml's block_q*_K structs). It is not llama.cpp's error-minimising
search: each sub-block's scale (and min) spans its range, the scales are quantised to their
6- or 4-bit (Q6_K: int8) codes under fp16 super-block scales, and every weight is rounded to the
nearest code under the scales as the decoder will see them. The weights a file holds are what
its blocks decode to, whatever the encoder; the round-trip tests bound its error per type.

Signed-code types (Q3_K, Q6_K) give each sub-block the sign that maps its largest-magnitude
weight to the most negative code (-4 or -32), the one code with no positive twin, as ggml does.
"""
from __future__ import annotations

import numpy as np
import torch

from .gguf_dequant import QK_K, TYPES, QuantType, quant_type

_GGUF_PACKAGE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16")  # gguf.quants.quantize writes these


def quantize(values: torch.Tensor, qtype: QuantType | int | str) -> torch.Tensor:
    """A float tensor [rows, cols] -> its GGUF bytes, uint8 [rows, bytes per row] (cols whole blocks),
    on the tensor's device (the gguf package's types are encoded by numpy, on the CPU)."""
    kind = quant_type(qtype)
    rows, cols = values.shape
    kind.nbytes(cols)  # each row must be whole blocks: the error names the type and the count
    values = values.detach().to(torch.float32).contiguous()
    if kind.name == "F32":
        return values.view(torch.uint8)
    if kind.name == "F16":
        return values.half().view(torch.uint8)
    if kind.name in _GGUF_PACKAGE_TYPES:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize

        encoded = gguf_quantize(values.cpu().numpy(), GGMLQuantizationType[kind.name])
        return torch.from_numpy(np.ascontiguousarray(encoded)).to(values.device)
    blocks = values.reshape(-1, QK_K)
    return _ENCODE[kind.name](blocks).reshape(rows, -1)


# ---------------------------------------------------------------------------------------------
# Packing: the inverse of gguf_dequant's field readers.


def _f16_bytes(value: torch.Tensor) -> torch.Tensor:
    """fp32 [n] -> [n, 2] bytes of its fp16 rounding (little-endian, as on disk)."""
    return value.half().reshape(-1, 1).view(torch.uint8)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2, m] codes 0..15 (low nibbles, then high) -> [..., m] bytes."""
    return codes[..., 0, :] | (codes[..., 1, :] << 4)


def _pack_bits(fields: torch.Tensor, width: int = 1) -> torch.Tensor:
    """[..., count, m] fields of `width` bits -> [..., m] bytes: field k at bits [k*width, (k+1)*width)."""
    shifts = torch.arange(0, fields.shape[-2] * width, width, dtype=torch.uint8, device=fields.device).unsqueeze(-1)
    return (fields << shifts).sum(dim=-2, dtype=torch.uint8)


def _codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | float, low: int, high: int) -> torch.Tensor:
    """Nearest codes q in [low, high] with x ~ scale * q - offset (scale 0: code 0 ... clamped)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.where(scale == 0, torch.zeros_like(x), torch.round((x + offset) / safe))
    return q.clamp_(low, high)


def _super_scale(sub: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block scales [n, k] (>= 0) -> (their integer codes 0..top [n, k] uint8, the fp16 super-block
    scale as fp32 [n, 1]), the codes chosen under the rounded super-block scale."""
    d = (sub.amax(dim=-1, keepdim=True) / top).half().float()
    return _codes(sub, d, 0.0, 0, top).to(torch.uint8), d


def _signed_super_scale(sub: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block scales [n, k] -> (integer codes in [low, high] [n, k], fp16 super-block scale
    [n, 1], negative where that maps the largest-magnitude scale to `low`)."""
    d = _extreme_over(sub, low).half().float().unsqueeze(-1)
    return _codes(sub, d, 0.0, low, high), d


def _min_max_scales(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last dim) scale and min for x ~ scale * q - min, q in 0..levels, min >= 0."""
    mins = (-x.amin(dim=-1)).clamp_(min=0)
    return (x.amax(dim=-1) + mins).clamp_(min=0) / levels, mins


def _extreme_over(x: torch.Tensor, code: int) -> torch.Tensor:
    """Per sub-block (last dim) the scale that maps its largest-magnitude weight to `code` (negative)."""
    at = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, at).squeeze(-1) / code


# ---------------------------------------------------------------------------------------------
# One encoder per K-quant: [n, 256] fp32 -> [n, type_size] uint8.


def _q2_k(x: torch.Tensor) -> torch.Tensor:
    # scales [16] (4-bit scale | 4-bit min << 4) | 2-bit codes [64] | d | dmin
    sub = x.reshape(-1, 16, 16)
    scales, mins = _min_max_scales(sub, 3)
    sc, d = _super_scale(scales, 15)
    m, dmin = _super_scale(mins, 15)
    q = _codes(sub, (d * sc).unsqueeze(-1), (dmin * m).unsqueeze(-1), 0, 3).to(torch.uint8)
    codes = _pack_bits(q.reshape(-1, 2, 4, 32), width=2)  # weight 32 * (4 half + shift) + l
    return torch.cat((sc | (m << 4), codes.reshape(-1, 64), _f16_bytes(d), _f16_bytes(dmin)), dim=-1)


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    # high-bit mask [32] | 2-bit low codes [64] | 16 six-bit signed scales [12] | d
    sub = x.reshape(-1, 16, 16)
    sc, d = _signed_super_scale(_extreme_over(sub, -4), -32, 31)
    q = (_codes(sub, (d * sc).unsqueeze(-1), 0.0, -4, 3) + 4).to(torch.uint8).reshape(-1, 8, 32)  # 0..7
    low = _pack_bits((q & 3).reshape(-1, 2, 4, 32), width=2).reshape(-1, 64)
    mask = _pack_bits(q >> 2)  # bit j of byte l: weight 32 j + l
    stored = (sc + 32).to(torch.uint8)  # 0..63: low 4 bits in nibbles of bytes 0-7, top 2 bits in bytes 8-11
    nibbles = _pack_nibbles((stored & 0x0F).reshape(-1, 2, 8))
    tops = _pack_bits((stored >> 4).reshape(-1, 4, 4), width=2)
    return torch.cat((mask, low, nibbles, tops, _f16_bytes(d)), dim=-1)


def _scale_min_k4_bytes(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins [n, 8] -> Q4_K/Q5_K's 12 bytes (gguf_dequant._scale_min_k4 inverted)."""
    head_sc = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    head_m = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    return torch.cat((head_sc, head_m, (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)), dim=-1)


def _k_scaled(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: (16-byte head: d, dmin, scales and mins; codes [n, 8, 32] in 0..levels)."""
    sub = x.reshape(-1, 8, 32)
    scales, mins = _min_max_scales(sub, levels)
    sc, d = _super_scale(scales, 63)
    m, dmin = _super_scale(mins, 63)
    q = _codes(sub, (d * sc).unsqueeze(-1), (dmin * m).unsqueeze(-1), 0, levels).to(torch.uint8)
    return torch.cat((_f16_bytes(d), _f16_bytes(dmin), _scale_min_k4_bytes(sc, m)), dim=-1), q


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    head, q = _k_scaled(x, 15)
    return torch.cat((head, _pack_nibbles(q.reshape(-1, 4, 2, 32)).reshape(-1, 128)), dim=-1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    head, q = _k_scaled(x, 31)
    low = _pack_nibbles((q & 0x0F).reshape(-1, 4, 2, 32)).reshape(-1, 128)
    return torch.cat((head, _pack_bits(q >> 4), low), dim=-1)  # high bit j of byte l: weight 32 j + l


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    # low 4 bits [128] | high 2 bits [64] | int8 scales [16] | d
    sub = x.reshape(-1, 16, 16)
    sc, d = _signed_super_scale(_extreme_over(sub, -32), -128, 127)
    q = (_codes(sub, (d * sc).unsqueeze(-1), 0.0, -32, 31) + 32).to(torch.uint8)  # 0..63
    q = q.reshape(-1, 2, 2, 2, 32)  # [n, half, nibble, run, 32]: weight 128 half + 32 (2 nibble + run) + l
    low = _pack_nibbles((q & 0x0F).transpose(-3, -2)).reshape(-1, 128)  # byte 64 half + 32 run + l
    high = _pack_bits((q >> 4).reshape(-1, 2, 4, 32), width=2).reshape(-1, 64)  # byte 32 half + l, 2 bits per group
    return torch.cat((low, high, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)), dim=-1)


_ENCODE = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
QUANTISABLE = tuple(name for name in TYPES if name in _ENCODE or name in _GGUF_PACKAGE_TYPES or name in ("F32", "F16"))
