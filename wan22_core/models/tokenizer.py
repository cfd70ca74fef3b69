"""UMT5 tokenizer: official Wan text cleaning plus SentencePiece ids, padded to a fixed length.

The official code calls the HF tokenizer of `google/umt5-xxl` with `padding='max_length'`,
`truncation=True`, `add_special_tokens=True`. For a SentencePiece model that is exactly
`sp.encode(text) + [EOS]`, right-padded with PAD; we call `sentencepiece` directly so the engine
needs no tokenizer folder layout, only the `spiece.model` bytes (which ComfyUI's umt5
safetensors also embed as a uint8 tensor named `spiece_model`).
"""
from __future__ import annotations

import html
import importlib
import re
import warnings
from pathlib import Path

import sentencepiece as spm
import torch

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# The official pattern is `regex`'s \s (Unicode White_Space), which unlike `re`'s \s leaves out the
# separators \x1c-\x1f (ftfy removes them anyway; this keeps the rule exact without that argument).
_WHITESPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")
# Lone UTF-16 surrogates: what Python makes of bytes that are not UTF-8 (errors="surrogateescape"),
# or a JSON "\udcff" escape. They are no characters (ftfy would turn them into U+FFFD and the
# official pipeline would encode that); a surrogate pair is one character, which ftfy joins.
_LONE_SURROGATE = re.compile(r"[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")


def clean_text(text: str) -> str:
    """The official 'whitespace' cleaning (`wan/modules/tokenizers.py`): ftfy.fix_text, html-unescape
    twice, strip, collapse whitespace runs into one space. Unlike the official code, a prompt with
    lone surrogates (bytes that were not UTF-8) is refused instead of encoded as U+FFFD."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
    bad = _LONE_SURROGATE.search(text)
    if bad:
        raise ValueError(f"prompt {text[:60]!r} has {bad.group()!r} at character {bad.start()}, which is not text: "
                         "it was read from bytes that are not UTF-8; save the prompt as UTF-8 and enter it again")
    text = html.unescape(html.unescape(_ftfy().fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


def _ftfy():
    """ftfy, a dependency: the official cleaning starts with ftfy.fix_text, which repairs mojibake
    ("cafÃ©"), straightens curly quotes, removes control characters and terminal escapes, and more;
    without it the same prompt would tokenize differently, so its absence is an error, not a fallback."""
    try:
        return importlib.import_module("ftfy")
    except ImportError as err:
        raise ValueError("cleaning a prompt as the official Wan2.2 code does needs the ftfy package, which is "
                         f"not installed ({err}); install it: pip install ftfy") from err


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

