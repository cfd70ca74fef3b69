"""GGUF files: ComfyUI-GGUF's Wan experts and llama.cpp's UMT5 encoders, read through the `gguf` package.

`gguf.GGUFReader` parses the header: the metadata and, per tensor, its ggml type, shape and
absolute data offset. It memory-maps the file for that, but touches only the header's pages;
`reading.Checkpoint` then reads the tensor bytes with plain reads, one tensor at a time, as it
reads safetensors. Nothing here imports `reading` (it builds on this module).

What the files hold (notes from ComfyUI-GGUF's tools and llama.cpp's converter):
- shapes are stored in ggml order (fastest dimension first): reversed, they are torch's;
- a tensor whose last dimension is not a multiple of 256 may be stored flattened to
  `(n / 256, 256)`, its real shape in the INT32 array `comfy.gguf.orig_shape.<name>`; the blocks
  run through it in row-major order either way, so the bytes read the same;
- Wan experts: `general.architecture = "wan"`, official tensor names (`model.diffusion_model.`
  stripped, but accepted), block Linears quantised, everything else F32/F16/BF16;
- UMT5 encoders: architecture `t5encoder` (or `t5`), llama.cpp's T5 tensor names (mapped by
  `keymaps.t5_llamacpp_to_transformers`), the SentencePiece vocabulary in `tokenizer.ggml.*`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..quant import FLOAT_TYPES, QuantType, UnsupportedQuantType, quant_type

GGUF_MAGIC = b"GGUF"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
ARCHITECTURE_KEY = "general.architecture"
DIT_ARCHITECTURES = ("wan",)
TEXT_ARCHITECTURES = ("t5encoder", "t5")  # llama.cpp's converter names UMT5 encoders one of these


class GGUFFormatError(ValueError):
    """A GGUF file that cannot be read as it claims to be; the message says what and what to do."""


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic (content, not the file name)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the header describes it: torch shape (orig_shape honoured), type, bytes."""

    qtype: QuantType
    shape: tuple[int, ...]
    start: int  # absolute file offset of its first byte
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype its bytes read as: a float for F32/F16/BF16, uint8 block bytes otherwise."""
        return FLOAT_TYPES.get(self.qtype.name, torch.uint8)


class GGUFMetadata:
    """The key/value metadata of one GGUF file; values are decoded when asked for (the tokenizer's
    arrays hold 256k entries)."""

    def __init__(self, fields: dict):
        self._fields = fields

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    @property
    def has_tokenizer(self) -> bool:
        """llama.cpp's converter stores the SentencePiece vocabulary under tokenizer.ggml.*."""
        return TOKENIZER_KEY + "tokens" in self._fields

    @property
    def architecture(self) -> str | None:
        arch = self.get(ARCHITECTURE_KEY)
        return arch if isinstance(arch, str) else None

    def get(self, key: str, default: Any = None) -> Any:
        """A scalar as a Python value, a string as str, an array as a list (strings: list of str)."""
        field = self._fields.get(key)
        return default if field is None else _field_value(field)

    def array_type(self, key: str) -> str | None:
        """The element type name of an array field ("INT32", ...), None for scalars or missing keys."""
        field = self._fields.get(key)
        if field is None or field.types[0].name != "ARRAY" or len(field.types) < 2:
            return None
        return field.types[-1].name


def _field_value(field) -> Any:
    """A ReaderField's value (works on gguf 0.13, which has no `ReaderField.contents`)."""
    kind = field.types[0].name
    if kind == "STRING":
        return bytes(field.parts[-1]).decode("utf-8")
    if kind != "ARRAY":
        return field.parts[-1].tolist()[0]
    if len(field.types) < 2:  # an empty array
        return []
    if field.types[-1].name == "STRING":
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [value for i in field.data for value in field.parts[i].tolist()]


def read_header(path: Path) -> tuple[dict[str, GGUFTensor], GGUFMetadata]:
    """{name: GGUFTensor} and the metadata of the GGUF file `path`, from its header alone.

    GGUFFormatError when the file is truncated or damaged, holds a tensor type this engine cannot
    dequantise, or has `comfy.gguf.orig_shape` metadata that does not fit its tensor.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as err:  # how the reader meets a cut or bad header
        raise GGUFFormatError(f"{path.name} is a truncated or damaged GGUF file ({type(err).__name__}: {err}); "
                              "download it again") from err
    metadata = GGUFMetadata(dict(reader.fields))
    size = path.stat().st_size
    tensors = {}
    for tensor in reader.tensors:
        try:
            qtype = quant_type(tensor.tensor_type)
        except UnsupportedQuantType as err:
            raise GGUFFormatError(f"{path.name}: tensor {tensor.name}: {err}") from err
        stored = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        shape = _orig_shape(path, metadata, tensor.name, stored) if ORIG_SHAPE_KEY + tensor.name in metadata else stored
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFFormatError(f"{path.name} ends inside tensor {tensor.name} (a truncated GGUF file); "
                                  "download it again")
        tensors[tensor.name] = GGUFTensor(qtype, shape, int(tensor.data_offset), int(tensor.n_bytes))
    return tensors, metadata


def _orig_shape(path: Path, metadata: GGUFMetadata, name: str, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The real shape ComfyUI-GGUF's converter recorded for a tensor it stored flattened, checked."""
    key = ORIG_SHAPE_KEY + name
    shape = metadata.get(key)
    if metadata.array_type(key) != "INT32" or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise GGUFFormatError(f"{path.name}: its metadata {key} is {shape!r} ({metadata.array_type(key) or 'not an'} "
                              "array), not the INT32 array of positive sizes ComfyUI-GGUF writes; the file is "
                              "damaged or was edited: download it again or convert it with ComfyUI-GGUF's tools")
    if math.prod(shape) != math.prod(stored):
        raise GGUFFormatError(f"{path.name}: its metadata {key} says shape {shape} ({math.prod(shape)} weights) but "
                              f"the tensor holds {math.prod(stored)} ({list(stored)}); the file is damaged or was "
                              "edited: download it again or convert it with ComfyUI-GGUF's tools")
    return tuple(shape)


# ---------------------------------------------------------------------------------------------
# The tokenizer in the metadata: llama.cpp writes the SentencePiece vocabulary of a T5 model
# (`tokenizer.ggml.model = "t5"`) piece by piece; rebuilt, it tokenises exactly as spiece.model.

TOKENIZER_KEY = "tokenizer.ggml."
_BYTE_PIECE = 6  # SentencePiece's piece type BYTE (llama.cpp's token_type values are SentencePiece's)


def sentencepiece_model(metadata: GGUFMetadata, label: str) -> bytes | None:
    """The serialized SentencePiece model rebuilt from `tokenizer.ggml.*`, or None when the file has
    no vocabulary. label: the file, for messages."""
    if not metadata.has_tokenizer:
        return None
    kind = metadata.get(TOKENIZER_KEY + "model")
    if kind != "t5":
        raise GGUFFormatError(f"{label}: its tokenizer is llama.cpp's {kind!r}, not the SentencePiece (t5) vocabulary "
                              "of UMT5; pass the google/umt5-xxl tokenizer folder (spiece.model) instead")
    from sentencepiece import sentencepiece_model_pb2 as sp

    tokens = metadata.get(TOKENIZER_KEY + "tokens")
    scores = metadata.get(TOKENIZER_KEY + "scores") or [0.0] * len(tokens)
    types = metadata.get(TOKENIZER_KEY + "token_type") or [1] * len(tokens)  # 1: NORMAL
    if not len(tokens) == len(scores) == len(types):
        raise GGUFFormatError(f"{label}: its tokenizer has {len(tokens)} pieces but {len(scores)} scores and "
                              f"{len(types)} types; the file is damaged: download it again")
    model = sp.ModelProto()
    for piece, score, piece_type in zip(tokens, scores, types):
        model.pieces.add(piece=piece, score=score, type=piece_type)
    trainer = model.trainer_spec
    trainer.model_type = sp.TrainerSpec.UNIGRAM
    trainer.byte_fallback = _BYTE_PIECE in types
    for field, key in (("unk_id", "unknown_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id"),
                       ("bos_id", "bos_token_id")):
        setattr(trainer, field, metadata.get(TOKENIZER_KEY + key, -1))
    charsmap = metadata.get(TOKENIZER_KEY + "precompiled_charsmap")
    normalizer = model.normalizer_spec
    normalizer.name = "nmt_nfkc" if charsmap else "identity"  # the name is informational; the map is the rule
    if charsmap:  # UMT5's nmt_nfkc rules (full-width forms, ligatures, ...): without them ids differ
        normalizer.precompiled_charsmap = bytes(charsmap)
    normalizer.add_dummy_prefix = metadata.get(TOKENIZER_KEY + "add_space_prefix", True)
    normalizer.remove_extra_whitespaces = metadata.get(TOKENIZER_KEY + "remove_extra_whitespaces", True)
    normalizer.escape_whitespaces = True
    return model.SerializeToString()
