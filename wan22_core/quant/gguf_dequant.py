"""GGUF tensor types (ggml's block quantisations) and their dequantisation in torch.

A quantised GGUF tensor is a stream of fixed-size blocks along its last dimension. Each block
packs `block_size` weights into `type_size` bytes: small integer codes plus fp16 scales (and
mins). The "legacy" types (Q4_0 ... Q8_0) have blocks of 32 weights and one fp16 scale; the
K-quants (Q2_K ... Q6_K) have super-blocks of 256 weights split into sub-blocks of 16 or 32,
each with its own small integer scale (and min) under one or two fp16 super-block scales.
Layouts follow ggml (`ggml-common.h`, block_q*_K structs; the `gguf` package's `quants.py` is the
numpy reference the tests compare against).

Every function here is plain torch tensor ops on the whole tensor at once (no Python loop over
blocks), so the same code runs on CPU or CUDA and inside `torch.compile`. Arithmetic runs in
fp32 in the reference's order, so fp32 results equal the `gguf` package's bit for bit; other
dtypes are the fp32 result rounded once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class QuantType:
    """One ggml tensor type: `block_size` weights are stored in `type_size` bytes."""

    name: str
    id: int  # the type number stored in a GGUF tensor header (gguf.GGMLQuantizationType)
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def nbytes(self, numel: int) -> int:
        """Bytes that `numel` weights take; they must fill whole blocks."""
        if numel % self.block_size:
            raise ValueError(f"{self.name} stores weights in blocks of {self.block_size}; "
                             f"{numel} weights are not a whole number of blocks")
        return numel // self.block_size * self.type_size


# The types that ComfyUI-GGUF's Wan and UMT5 files use (block sizes: ggml's GGML_QUANT_SIZES).
TYPES = {t.name: t for t in (
    QuantType("F32", 0, 1, 4),
    QuantType("F16", 1, 1, 2),
    QuantType("BF16", 30, 1, 2),
    QuantType("Q4_0", 2, 32, 2 + 16),  # d, 32 x 4-bit
    QuantType("Q4_1", 3, 32, 2 + 2 + 16),  # d, m, 32 x 4-bit
    QuantType("Q5_0", 6, 32, 2 + 4 + 16),  # d, 32 high bits, 32 x 4-bit
    QuantType("Q5_1", 7, 32, 2 + 2 + 4 + 16),  # d, m, 32 high bits, 32 x 4-bit
    QuantType("Q8_0", 8, 32, 2 + 32),  # d, 32 x int8
    QuantType("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),  # 16 x (4-bit scale, 4-bit min), 2-bit codes, d, dmin
    QuantType("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),  # high bits, 2-bit low codes, 16 x 6-bit scale, d
    QuantType("Q4_K", 12, QK_K, 2 + 2 + 12 + QK_K // 2),  # d, dmin, 8 x (6-bit scale, 6-bit min), 4-bit codes
    QuantType("Q5_K", 13, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # as Q4_K plus one high bit per weight
    QuantType("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # low 4 bits, high 2 bits, 16 x int8 scale, d
)}
_BY_ID = {t.id: t for t in TYPES.values()}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # stored as plain floats


class UnsupportedQuantType(ValueError):
    """A GGUF tensor type this engine cannot dequantise (e.g. the IQ* importance-matrix types)."""


def quant_type(qtype: QuantType | int | str) -> QuantType:
    """The `QuantType` for a ggml type given as ours, its number (gguf.GGMLQuantizationType is an
    IntEnum, so the `gguf` package's values work as they are) or its name."""
    if isinstance(qtype, QuantType):
        return qtype
    found = TYPES.get(qtype) if isinstance(qtype, str) else _BY_ID.get(int(qtype))
    if found is None:
        label = qtype if isinstance(qtype, str) else f"{getattr(qtype, 'name', 'type')} ({int(qtype)})"
        raise UnsupportedQuantType(f"GGUF tensor type {label} is not supported (supported: {', '.join(TYPES)}); "
                                   "use a file quantised to one of those types")
    return found


def dequantize(data: torch.Tensor, qtype: QuantType | int | str, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGUF tensor bytes (uint8, any layout, C order) -> a `dtype` tensor of `shape`.

    The bytes are read as consecutive blocks in the tensor's row-major order, so a tensor stored
    flattened (ComfyUI-GGUF's `(n / 256, 256)` reshape) dequantises straight to its real shape.
    """
    kind = quant_type(qtype)
    expected = kind.nbytes(math.prod(shape))
    if data.dtype != torch.uint8 or data.numel() != expected:
        raise ValueError(f"{kind.name} tensor of shape {tuple(shape)} needs {expected} bytes (uint8); "
                         f"got {data.numel()} {str(data.dtype).removeprefix('torch.')} elements")
    blocks = data.reshape(-1, kind.type_size)  # [n_blocks, type_size]
    if kind.name in FLOAT_TYPES:  # stored as floats already: one exact view, one rounding to dtype
        return blocks.view(FLOAT_TYPES[kind.name]).reshape(shape).to(dtype)
    return _DEQUANTIZE[kind.name](blocks).reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# Field readers. `blocks` is [n, type_size] uint8; each returns one value per block or per weight.


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 number at byte `at` of every block, as fp32 [n, 1] (little-endian, as on disk)."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., m] bytes -> [..., 2, m]: all low nibbles, then all high nibbles (ggml's order)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def _bits(packed: torch.Tensor, count: int, width: int = 1) -> torch.Tensor:
    """[..., m] bytes -> [..., count, m]: field k holds bits [k*width, (k+1)*width) of each byte."""
    shifts = torch.arange(0, count * width, width, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-2) >> shifts.unsqueeze(-1)) & ((1 << width) - 1)


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, each [n, 8] uint8.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 keep
    their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the top 2 bits of
    bytes 0-3 (scales) and 4-7 (mins).
    """
    low_sc, low_m, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((low_sc & 0x3F, (rest & 0x0F) | ((low_sc >> 6) << 4)), dim=-1)
    mins = torch.cat((low_m & 0x3F, (rest >> 4) | ((low_m >> 6) << 4)), dim=-1)
    return scales, mins


# ---------------------------------------------------------------------------------------------
# One function per type: [n, type_size] uint8 -> [n, block_size] fp32.


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float().mul_(_f16(blocks, 0))


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    codes = _nibbles(blocks[:, 2:]).reshape(-1, 32).float().sub_(8)  # [n, 32] in -8..7
    return codes.mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    codes = _nibbles(blocks[:, 4:]).reshape(-1, 32).float()
    return codes.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _five_bit(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 codes [n, 32]: 16 bytes of nibbles plus 4 bytes of high bits (a little-endian
    uint32: bit i belongs to weight i)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=high.device)
    high_bits = ((high.unsqueeze(-1) >> shifts) & 1).reshape(-1, 32)  # byte j, bit k -> weight 8j + k
    return _nibbles(low).reshape(-1, 32) | (high_bits << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    codes = _five_bit(blocks[:, 6:], blocks[:, 2:6]).float().sub_(16)
    return codes.mul_(_f16(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    codes = _five_bit(blocks[:, 8:], blocks[:, 4:8]).float()
    return codes.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales [16] | 2-bit codes [64] | d | dmin; sub-block j (16 weights): d * (sc_j & 15) * q - dmin * (sc_j >> 4)
    packed = blocks[:, :16]
    scales = _f16(blocks, 80) * (packed & 0x0F).float()  # [n, 16]
    mins = _f16(blocks, 82) * (packed >> 4).float()
    codes = _bits(blocks[:, 16:80].reshape(-1, 2, 32), 4, width=2)  # [n, half, shift, 32]
    values = codes.reshape(-1, 16, 16).float().mul_(scales.unsqueeze(-1))
    return values.sub_(mins.unsqueeze(-1)).reshape(-1, QK_K)


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes -> 16 signed six-bit scales [n, 16] (fp32, -32..31). Low 4 bits: the low
    nibbles of bytes 0-7 (scales 0-7), then their high nibbles (8-15); top 2 bits: scale i's
    are bits 2*(i // 4) and 2*(i // 4) + 1 of byte 8 + i % 4."""
    low = _nibbles(packed[:, :8]).reshape(-1, 16)
    high = _bits(packed[:, 8:12], 4, width=2).reshape(-1, 16)
    return (low | (high << 4)).float() - 32


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # high-bit mask [32] | 2-bit low codes [64] | scales [12] | d. A weight's code is its 2 low
    # bits minus 4 where its mask bit is 0, i.e. (mask bit, low bits) as 3 bits minus 4 (-4..3);
    # mask bit j of byte l is weight 32 j + l.
    low = _bits(blocks[:, 32:96].reshape(-1, 2, 32), 4, width=2).reshape(-1, 16, 16)
    high = _bits(blocks[:, :32], 8).reshape(-1, 16, 16)
    codes = (low | (high << 2)).float().sub_(4)
    scales = _f16(blocks, 108) * _q3_k_scales(blocks[:, 96:108])  # [n, 16]
    return codes.mul_(scales.unsqueeze(-1)).reshape(-1, QK_K)


def _k_scaled(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: codes [n, 8, 32] -> d * scale_j * q - dmin * min_j, from the 16-byte head."""
    scales, mins = _scale_min_k4(blocks[:, 4:16])
    values = codes.float().mul_((_f16(blocks, 0) * scales.float()).unsqueeze(-1))
    return values.sub_((_f16(blocks, 2) * mins.float()).unsqueeze(-1)).reshape(-1, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales+mins [12] | codes [128]: each 32 bytes hold two sub-blocks (low, high nibbles)
    return _k_scaled(blocks, _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # as Q4_K with a high-bit array [32] before the nibbles: bit j of byte l is weight 32 j + l
    low = _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k_scaled(blocks, low | (_bits(blocks[:, 16:48], 8) << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # low 4 bits [128] | high 2 bits [64] | int8 scales [16] | d. Each half of 128 weights reads
    # 64 low bytes (nibbles of bytes 0-31, 32-63: four runs of 32) and 32 high bytes (2 bits each).
    packed = blocks[:, :128].reshape(-1, 2, 2, 32)  # [n, half, run of 32 bytes, 32]
    low = torch.stack((packed & 0x0F, packed >> 4), dim=-3).reshape(-1, 2, 4, 32)  # [n, half, nibble * 2 + run, 32]
    high = _bits(blocks[:, 128:192].reshape(-1, 2, 32), 4, width=2)  # [n, half, shift, 32]
    codes = (low | (high << 4)).reshape(-1, 16, 16).float().sub_(32)
    scales = _f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()  # [n, 16]
    return codes.mul_(scales.unsqueeze(-1)).reshape(-1, QK_K)


_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
