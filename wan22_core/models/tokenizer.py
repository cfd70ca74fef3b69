"""UMT5 tokenizer: official Wan text cleaning plus SentencePiece ids, padded to a fixed length.

The official code calls the HF tokenizer of `google/umt5-xxl` with `padding='max_length'`,
`truncation=True`, `add_special_tokens=True`. For a SentencePiece model that is exactly
`sp.encode(text) + [EOS]`, right-padded with PAD; we call `sentencepiece` directly so the engine
needs no tokenizer folder layout, only the `spiece.model` bytes (which ComfyUI's umt5
safetensors also embed as a uint8 tensor named `spiece_model`).
"""
from __future__ import annotations

import html
import re
import warnings
from pathlib import Path

import sentencepiece as spm
import torch

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# C0 controls except \t \n \r, plus DEL. A NUL or escape code in a prompt (pasted from a terminal
# or a binary file) would otherwise become UNK tokens; a space keeps word boundaries instead.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WHITESPACE_RUN = re.compile(r"\s+")
# Lone UTF-16 surrogates: what Python makes of bytes that are not UTF-8 (errors="surrogateescape"),
# or a JSON "\udcff" escape. They are no characters, and SentencePiece cannot take them.
_SURROGATE = re.compile(r"[\ud800-\udfff]")

try:  # The official cleaning starts with ftfy.fix_text; ftfy is optional here, not a dependency.
    import ftfy
except ImportError:
    ftfy = None


def clean_text(text: str) -> str:
    """Official 'whitespace' cleaning (ftfy if installed, html-unescape twice, collapse spaces)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
    bad = _SURROGATE.search(text)
    if bad:
        raise ValueError(f"prompt {text[:60]!r} has {bad.group()!r} at character {bad.start()}, which is not text: "
                         "it was read from bytes that are not UTF-8; save the prompt as UTF-8 and enter it again")
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = _CONTROL_CHARS.sub(" ", text)  # after unescape, which can produce control chars
    return _WHITESPACE_RUN.sub(" ", text).strip()


class Tokenizer:
    """Turns prompts into UMT5 ids: cleaned text -> SentencePiece ids + EOS, right-padded.

    One deliberate difference from the HF tokenizer: a literal "</s>" or "<pad>" typed in a
    prompt is encoded as text, not as the special id, so a prompt cannot end itself early.
    """

    def __init__(self, processor: spm.SentencePieceProcessor):
        # Our ids end with EOS_ID and the encoder was trained so; a model whose EOS differs would
        # silently give wrong embeddings. (PAD is masked out, so only EOS needs checking.)
        if processor.eos_id() != EOS_ID:
            raise ValueError(
                f"SentencePiece model has eos id {processor.eos_id()}; UMT5 needs {EOS_ID}. "
                f"Use the spiece.model of google/umt5-xxl.")
        self.processor = processor

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> "Tokenizer":
        """From the serialized SentencePiece model (the content of `spiece.model`)."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(bytes(model_bytes))
        except RuntimeError as err:
            raise ValueError(
                f"model_bytes ({len(model_bytes)} bytes) is not a SentencePiece model: {err}") from err
        return cls(processor)

    @classmethod
    def from_state_dict_tensor(cls, tensor: torch.Tensor) -> "Tokenizer":
        """From the uint8 `spiece_model` tensor that ComfyUI's umt5 safetensors embed."""
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
            described = (f"{tensor.dtype} tensor of shape {tuple(tensor.shape)}"
                         if isinstance(tensor, torch.Tensor) else type(tensor).__name__)
            raise ValueError(f"spiece_model must be a 1-D uint8 tensor, got a {described}")
        return cls.from_bytes(tensor.cpu().numpy().tobytes())

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """From a `google/umt5-xxl` folder or diffusers' `tokenizer/` folder (both hold spiece.model)."""
        folder = Path(path)
        model_file = folder / "spiece.model"
        if not model_file.is_file():
            raise FileNotFoundError(
                f"tokenizer folder {str(folder)!r} has no spiece.model; it needs the SentencePiece "
                f"file spiece.model from google/umt5-xxl (tokenizer.json alone is not enough)")
        return cls.from_bytes(model_file.read_bytes())

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def ids(self, text: str) -> list[int]:
        """Cleaned text -> SentencePiece ids + EOS, not truncated."""
        return self.processor.encode(clean_text(text)) + [EOS_ID]

    def __call__(self, texts: list[str], max_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask, both LongTensor[B, max_len]; truncated prompts keep EOS last and warn."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 to hold EOS, got {max_len}")
        ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)  # [B, max_len]
        mask = torch.zeros((len(texts), max_len), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.ids(text)
            if len(tokens) > max_len:
                warnings.warn(
                    f"prompt has {len(tokens)} tokens incl. EOS, over the limit of {max_len}; "
                    f"dropped the last {len(tokens) - max_len} tokens: {text[:60]!r}...",
                    UserWarning, stacklevel=2)
                tokens = tokens[:max_len - 1] + [EOS_ID]  # as HF truncation=True: EOS survives
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        return ids, mask

