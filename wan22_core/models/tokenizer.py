"""UMT5 tokenizer: official Wan text cleaning plus SentencePiece ids, padded to a fixed length.

The official code calls the HF tokenizer of `google/umt5-xxl` with `padding='max_length'`,
`truncation=True`, `add_special_tokens=True`. For a SentencePiece model that is exactly
`sp.encode(text) + [EOS]`, right-padded with PAD; we call `sentencepiece` directly so the engine
needs no tokenizer folder layout, only the `spiece.model` bytes (which ComfyUI's umt5
safetensors also embed as a uint8 tensor named `spiece_model`).
"""
from __future__ import annotations

import html
import io
import re
import warnings
from pathlib import Path

import sentencepiece as spm
import torch

from ..config import DEFAULT_NEGATIVE_PROMPT

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


def _tiny_corpus() -> list[str]:
    """A few hundred deterministic video-prompt sentences, plus some Chinese from the negative prompt."""
    subjects = ["a red fox", "an old fisherman", "two children", "a white cat", "a small boat",
                "a young dancer", "a black horse", "a yellow city bus", "three birds", "a robot",
                "a woman in a blue dress", "a golden retriever", "an astronaut", "a paper kite"]
    actions = ["runs across", "walks slowly through", "jumps over", "drifts along", "spins in",
               "climbs up", "flies above", "rolls down", "wanders around", "races toward",
               "glides over", "sleeps quietly in"]
    places = ["a snowy forest", "the busy street", "a calm lake", "the golden desert",
              "a neon city at night", "the green hills", "an empty parking lot", "a rainy harbor",
              "the rocky mountain", "a sunflower field", "an ancient temple", "the crowded market"]
    cameras = ["The camera pans left.", "Slow motion, close-up shot.", "Wide aerial view.",
               "The camera tracks forward smoothly.", "Handheld shot, soft light.",
               "Cinematic lighting, shallow depth of field.", "Static camera, 4K, vivid colors.",
               "Dolly zoom at sunset.", "Time-lapse of moving clouds.", "Overhead drone footage."]
    moods = ["Morning fog, muted pastel tones.", "Heavy rain and thunder, dramatic storm.",
             "Warm evening glow with long shadows.", "Bright noon sunshine, sharp details.",
             "Falling snowflakes, quiet winter mood.", "Autumn leaves swirl in gentle wind.",
             "Realistic documentary style, natural grain.", "Dreamy watercolor animation style.",
             "Retro film look, flickering vintage texture.", "Underwater caustics, turquoise waves.",
             "Moonlit night, glowing lanterns.", "Spring blossoms, pink petals everywhere.",
             "Epic fantasy scene with dragons.", "Hyperrealistic macro photography."]
    # Strides coprime with each list length walk through every word; 400 distinct combinations.
    sentences = [f"{subjects[i % 14].capitalize()} {actions[(5 * i) % 12]} "
                 f"{places[(7 * i) % 12]}. {cameras[(3 * i) % 10]} {moods[(9 * i) % 14]}"
                 for i in range(400)]
    # The first phrases of the default negative prompt, so Chinese tokenises to real pieces;
    # the remaining characters stay unknown, which keeps UNK handling exercised in tests.
    chinese = "，".join(DEFAULT_NEGATIVE_PROMPT.split("，")[:5])
    return sentences + [chinese] * 20


def train_tiny_sentencepiece(vocab_size: int = 256) -> bytes:
    """Train a small real unigram SentencePiece model (UMT5 special ids) and return its bytes.

    Deterministic: one thread, no input shuffling, an in-memory corpus and writer.
    """
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()), model_writer=writer, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, pad_id=PAD_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, bos_id=-1, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return writer.getvalue()
