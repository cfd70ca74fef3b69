"""UMT5-XXL text encoder: transformers' `UMT5EncoderModel` loaded from official or HF weights.

Official Wan (`wan/modules/t5.py`) pads every prompt to 512 tokens, runs the encoder with the
padding mask, then trims each output to its real token count including EOS. `TextEncoder.encode`
does the same, so its outputs are what the DiT's `context` expects: a list of [L_i, dim].
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..config import DEFAULT_NEGATIVE_PROMPT, TextEncoderConfig
from .tokenizer import Tokenizer, clean_text

if TYPE_CHECKING:
    from transformers import UMT5EncoderModel

# Official Wan T5 name -> transformers UMT5EncoderModel name (shared_pos=False: one relative
# position table per block). Applied with re.fullmatch, so every official key must match one.
_OFFICIAL_TO_TRANSFORMERS = [
    (r"token_embedding\.weight", r"shared.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"norm\.weight", r"encoder.final_layer_norm.weight"),
]
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # tied in UMT5EncoderModel
SPIECE_KEY = "spiece_model"  # ComfyUI's umt5 safetensors embed spiece.model as this uint8 tensor
SCALED_FP8_MARKER = "scaled_fp8"  # the root tensor that marks Comfy-Org's scaled-fp8 files


def build_umt5(cfg: TextEncoderConfig) -> UMT5EncoderModel:
    """A randomly initialised UMT5 encoder of `cfg`'s size, in eval mode (Wan's dropout is off)."""
    # Imported here: transformers takes seconds to import, and `checkpoints` (imported by the
    # ComfyUI nodes and every rank process) needs only this module's names and rules.
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim // cfg.num_heads,
        d_ff=cfg.ffn_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        feed_forward_proj="gated-gelu",  # tanh GELU, as the official T5FeedForward
        layer_norm_epsilon=1e-6, dropout_rate=0.0)
    return UMT5EncoderModel(config).eval()


def official_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official Wan T5 encoder state dict (`blocks.i.attn.q.weight`, ...) to HF names."""
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _OFFICIAL_TO_TRANSFORMERS:
            if re.fullmatch(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            raise ValueError(
                f"state dict key {key!r} is not an official Wan T5 encoder name "
                f"(expected token_embedding.*, blocks.<i>.{{norm1,attn,pos_embedding,norm2,ffn}}.*, "
                f"norm.weight)")
    if "shared.weight" in renamed:
        renamed["encoder.embed_tokens.weight"] = renamed["shared.weight"]
    return renamed


def _to_transformers_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either naming -> transformers names with both tied embedding keys, `spiece_model` dropped."""
    weights = {k: v for k, v in state_dict.items() if k != SPIECE_KEY}
    scaled = [k for k in weights if k == SCALED_FP8_MARKER or k.endswith(".scale_weight")]
    if scaled:
        raise ValueError(
            f"text encoder state dict is a scaled-fp8 checkpoint ({scaled[0]!r}); it is not "
            f"supported: use the bf16 or fp16 umt5-xxl file instead")
    if "token_embedding.weight" in weights:
        return official_to_transformers(weights)
    embedding = next((weights[k] for k in _EMBEDDING_KEYS if k in weights), None)
    if embedding is None:
        raise ValueError(
            f"text encoder state dict has no token embedding (looked for token_embedding.weight, "
            f"{', '.join(_EMBEDDING_KEYS)}); is it a UMT5 encoder? First keys: {list(weights)[:5]}")
    return {**weights, **{k: embedding for k in _EMBEDDING_KEYS}}


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> TextEncoderConfig:
    """Encoder sizes read from tensor shapes (official or transformers naming)."""
    return _config(_to_transformers_names(state_dict))


def _config(sd: dict[str, torch.Tensor]) -> TextEncoderConfig:
    """`config_from_state_dict` of a state dict already in transformers names."""
    vocab_size, dim = sd["shared.weight"].shape
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    if not block_ids:
        raise ValueError("text encoder state dict has no encoder blocks (blocks.<i>.* keys)")
    attention = "encoder.block.0.layer.0.SelfAttention"
    num_buckets, num_heads = _shape(sd, f"{attention}.relative_attention_bias.weight")
    inner_dim = _shape(sd, f"{attention}.q.weight")[0]
    if inner_dim != dim or dim % num_heads:
        raise ValueError(
            f"text encoder attention width {inner_dim} with {num_heads} heads does not fit the "
            f"model width {dim}; only UMT5 encoders whose attention width equals d_model are supported")
    return TextEncoderConfig(
        vocab_size=vocab_size, dim=dim, num_heads=num_heads, num_buckets=num_buckets,
        ffn_dim=_shape(sd, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0],
        num_layers=max(block_ids) + 1)


def _shape(sd: dict[str, torch.Tensor], key: str) -> torch.Size:
    if key not in sd:
        raise ValueError(f"text encoder state dict has no {key!r} (in transformers naming); "
                         f"it is not a complete UMT5 encoder")
    return sd[key].shape


@dataclass
class PromptEmbeds:
    """One prompt pair for CFG: per-token embeddings, trimmed to the real length incl. EOS."""

    positive: torch.Tensor  # [L_p, dim]
    negative: torch.Tensor  # [L_n, dim]


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int


class TextEncoder:
    """Tokenizer + UMT5 encoder, with a small per-instance LRU cache of embeddings by cleaned text.

    Outputs are in the model's dtype (bf16 for the official weights, as the official encoder
    returns). The encoder may stay on the CPU; `encode_prompt(device=...)` moves only the outputs.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: Tokenizer,
                 text_len: int = TextEncoderConfig.text_len, cache_size: int = 32):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} pieces but the encoder embeds only "
                f"{model.config.vocab_size}; they do not belong together")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # cleaned text -> CPU [L, dim]
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer | None = None,
                        device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None) -> "TextEncoder":
        """Load official or transformers-named weights; `dtype=None` keeps the checkpoint's dtype.

        An explicit `tokenizer` wins over a `spiece_model` entry in the state dict.
        """
        if tokenizer is None:
            if SPIECE_KEY not in state_dict:
                raise ValueError(
                    "the text encoder has no tokenizer: the state dict has no 'spiece_model' entry, "
                    "so pass tokenizer=Tokenizer.from_folder(<folder with spiece.model>)")
            tokenizer = Tokenizer.from_state_dict_tensor(state_dict[SPIECE_KEY])
        weights = _to_transformers_names(state_dict)
        cfg = _config(weights)
        dtype = dtype or default_dtype({k: v.dtype for k, v in weights.items()})
        with torch.device("meta"):  # no 22 GB random init for the real model
            model = build_umt5(cfg)
        expected = set(model.state_dict())
        if expected != set(weights):
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(f"text encoder state dict does not fit a UMT5 encoder of {cfg}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        converted = {}  # by tensor id: the tied embedding is cast once, not twice
        for key, tensor in weights.items():
            if id(tensor) not in converted:
                converted[id(tensor)] = tensor.to(dtype)
            weights[key] = converted[id(tensor)]
        model.load_state_dict(weights, assign=True)
        model.set_input_embeddings(model.shared)  # assign=True untied them; one copy, not two
        return cls(model.to(device), tokenizer, text_len=cfg.text_len)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def to(self, device: torch.device | str) -> "TextEncoder":
        """Move the encoder (e.g. to the GPU for encoding, back to the CPU to free memory)."""
        self.model.to(device)
        return self

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, len(self._cache))

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """Embeddings [L_i, dim] on the CPU, one per text; cached texts do not rerun the model."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        cleaned = [clean_text(text) for text in texts]
        found = {}
        to_run = {}  # cleaned -> one raw text; the tokenizer cleans it (cleaning twice differs)
        for key, text in zip(cleaned, texts):
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
                self._hits += 1
            elif key not in to_run:
                to_run[key] = text
                self._misses += 1
        if to_run:
            found.update(zip(to_run, self._run(list(to_run.values()))))
            for key in to_run:
                self._remember(key, found[key])
        # Clones, so a caller editing its tensor in place cannot corrupt the cache.
        return [found[key].clone() for key in cleaned]

    def encode_prompt(self, positive: str, negative: str | None = None,
                      device: torch.device | str | None = None) -> PromptEmbeds:
        """Positive and negative embeddings; negative None -> the official default, "" -> just EOS."""
        if negative is None:
            negative = DEFAULT_NEGATIVE_PROMPT
        for name, text in (("positive", positive), ("negative", negative)):
            if not isinstance(text, str):
                raise TypeError(f"{name} prompt must be a str, got {type(text).__name__}")
        pos, neg = self.encode([positive, negative])
        if device is not None:
            pos, neg = pos.to(device), neg.to(device)
        return PromptEmbeds(positive=pos, negative=neg)

    def _run(self, texts: list[str]) -> list[torch.Tensor]:
        """Run the encoder on padded ids, as official: masked padding, outputs trimmed incl. EOS."""
        ids, mask = self.tokenizer(texts, max_len=self.text_len)  # [B, text_len] each
        # no_grad rather than inference_mode: inference tensors could not later be saved for
        # backward by whoever consumes the embeddings.
        with torch.no_grad():
            hidden = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).last_hidden_state  # [B, L, dim]
        lengths = mask.sum(dim=1).tolist()
        # copy=True: a view would keep the whole padded [B, text_len, dim] batch alive in the cache.
        return [h[:n].to("cpu", copy=True) for h, n in zip(hidden, lengths)]

    def _remember(self, key: str, embeds: torch.Tensor) -> None:
        self._cache[key] = embeds
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def default_dtype(stored: dict[str, torch.dtype]) -> torch.dtype:
    """The dtype to run an encoder stored as {name: dtype} (either naming) when none is asked for.

    The token embedding's dtype when it is a 16- or 32-bit float; bf16 when any weight is fp8
    (fp8 storage cannot run matmuls on every device, and dequantised and 16-bit weights need one
    dtype) or the embedding is missing or of another dtype.
    """
    if any(d.is_floating_point and d.itemsize == 1 for d in stored.values()):
        return torch.bfloat16
    embedding = next((stored[k] for k in ("token_embedding.weight", *_EMBEDDING_KEYS) if k in stored), None)
    return embedding if embedding in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
