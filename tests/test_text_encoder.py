"""Text encoding on the tiny config: tokenizer parity with HF, key mapping, trimming, cache."""
import io
import warnings

import pytest
import sentencepiece as spm
import torch
from reference import rel_l2
from transformers import T5Tokenizer

from wan22_core.config import DEFAULT_NEGATIVE_PROMPT, TINY
from wan22_core.models.text_encoder import (
    TextEncoder, build_umt5, config_from_state_dict, default_dtype, official_to_transformers)
from wan22_core.models.tokenizer import EOS_ID, Tokenizer, clean_text
from wan22_core.tiny import train_tiny_sentencepiece

PROMPTS = [
    "A red fox runs across a snowy forest. The camera pans left.",
    "  Two children   jump over\tthe green hills &amp;amp; laugh  ",
    DEFAULT_NEGATIVE_PROMPT,
    "",
    "An astronaut ü 日本 glides over a calm lake, 4K!",
]


@pytest.fixture(scope="module")
def spiece_bytes():
    return train_tiny_sentencepiece()


@pytest.fixture(scope="module")
def tokenizer(spiece_bytes):
    return Tokenizer.from_bytes(spiece_bytes)


@pytest.fixture(scope="module")
def umt5():
    torch.manual_seed(0)
    return build_umt5(TINY.text)


def reference_embeds(model, tokenizer, texts):
    """transformers' UMT5EncoderModel called directly on our padded ids, trimmed by the mask."""
    ids, mask = tokenizer(texts, max_len=TINY.text.text_len)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return [h[:n] for h, n in zip(hidden, mask.sum(1))]


def official_state_dict(model):
    """The model's weights under the official Wan T5 names, written out by hand from the table."""
    sd = model.state_dict()
    out = {"token_embedding.weight": sd["shared.weight"],
           "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(model.config.num_layers):
        attn, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        out[f"blocks.{i}.norm1.weight"] = sd[attn + "layer_norm.weight"]
        for name in "qkvo":
            out[f"blocks.{i}.attn.{name}.weight"] = sd[attn + f"SelfAttention.{name}.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = sd[
            attn + "SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{i}.norm2.weight"] = sd[ffn + "layer_norm.weight"]
        out[f"blocks.{i}.ffn.gate.0.weight"] = sd[ffn + "DenseReluDense.wi_0.weight"]
        out[f"blocks.{i}.ffn.fc1.weight"] = sd[ffn + "DenseReluDense.wi_1.weight"]
        out[f"blocks.{i}.ffn.fc2.weight"] = sd[ffn + "DenseReluDense.wo.weight"]
    return out


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# 1. Wrapper == transformers model, trimmed to the real length incl. EOS (bitwise).
def test_encode_equals_transformers_model_trimmed(umt5, tokenizer):
    encoder = TextEncoder(umt5, tokenizer)
    out = encoder.encode(PROMPTS)
    ref = reference_embeds(umt5, tokenizer, PROMPTS)
    for text, got, want in zip(PROMPTS, out, ref):
        assert got.shape == (len(tokenizer.ids(text)), TINY.text.dim)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert torch.equal(got, want)


# 2. Official naming loads and reproduces the source model bitwise.
def test_official_names_load_bitwise(umt5, tokenizer):
    official = official_state_dict(umt5)
    assert config_from_state_dict(official) == TINY.text
    assert config_from_state_dict(umt5.state_dict()) == TINY.text
    renamed = official_to_transformers(official)
    assert renamed.keys() == umt5.state_dict().keys()
    assert all(torch.equal(renamed[k], v) for k, v in umt5.state_dict().items())

    encoder = TextEncoder.from_state_dict(official, tokenizer)
    assert encoder.model.shared.weight is encoder.model.encoder.embed_tokens.weight
    assert encoder.dtype == torch.float32 and encoder.device.type == "cpu"
    for got, want in zip(encoder.encode(PROMPTS), reference_embeds(umt5, tokenizer, PROMPTS)):
        assert torch.equal(got, want)


def test_transformers_names_with_embedded_tokenizer_and_dtype(umt5, spiece_bytes):
    sd = {k: v for k, v in umt5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8)
    encoder = TextEncoder.from_state_dict(sd, None, dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    (out,) = encoder.encode([PROMPTS[0]])
    (want,) = reference_embeds(umt5, encoder.tokenizer, [PROMPTS[0]])
    assert out.dtype == torch.bfloat16
    # bf16 weights vs the fp32 model: loose bound, this only checks the weights went in right.
    rel = rel_l2(out, want)
    assert rel < 0.05, rel


def test_default_dtype_keeps_the_embedding_dtype_and_runs_fp8_in_bf16(umt5, tokenizer):
    f16, f32, bf16, e4m3 = torch.float16, torch.float32, torch.bfloat16, torch.float8_e4m3fn
    assert default_dtype({"token_embedding.weight": f32, "norm.weight": f16}) == f32
    assert default_dtype({"shared.weight": f16, "spiece_model": torch.uint8}) == f16
    assert default_dtype({"shared.weight": f16, "encoder.block.0.layer.0.SelfAttention.q.weight": e4m3}) == bf16
    assert default_dtype({"shared.weight": torch.float64}) == bf16
    half = {k: v.half() for k, v in official_state_dict(umt5).items()}
    assert TextEncoder.from_state_dict(half, tokenizer).dtype == f16


def test_unknown_official_key_is_named(umt5):
    official = official_state_dict(umt5)
    official["blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.extra\.weight"):
        official_to_transformers(official)


def test_incomplete_state_dict_names_the_missing_key(umt5, tokenizer):
    official = official_state_dict(umt5)
    del official["blocks.1.norm2.weight"]
    with pytest.raises(ValueError, match=r"missing \['encoder\.block\.1\.layer\.1\.layer_norm"):
        TextEncoder.from_state_dict(official, tokenizer)
    del official["blocks.0.ffn.gate.0.weight"]
    with pytest.raises(ValueError, match=r"no 'encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0"):
        config_from_state_dict(official)


# 3. Tokenizer: embedded tensor == folder == transformers' T5Tokenizer.
def test_tokenizer_sources_agree_with_hf(spiece_bytes, tmp_path):
    import google.protobuf  # noqa: F401  a dependency: without it T5Tokenizer silently has 4 pieces
    (tmp_path / "spiece.model").write_bytes(spiece_bytes)
    from_tensor = Tokenizer.from_state_dict_tensor(
        torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8))
    from_folder = Tokenizer.from_folder(tmp_path)
    hf = T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0)
    ids_tensor, mask_tensor = from_tensor(PROMPTS)
    ids_folder, mask_folder = from_folder(PROMPTS)
    want = hf([clean_text(p) for p in PROMPTS], padding="max_length", truncation=True,
              max_length=512, add_special_tokens=True, return_tensors="pt")
    assert torch.equal(ids_tensor, ids_folder) and torch.equal(mask_tensor, mask_folder)
    assert torch.equal(ids_tensor, want["input_ids"])
    assert torch.equal(mask_tensor, want["attention_mask"])
    negative = ids_tensor[2, :mask_tensor[2].sum()]
    assert (negative > 2).sum() > 10  # the Chinese prompt is real pieces, not all UNK


def test_folder_without_spiece_model_names_folder_and_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"(?s)" + str(tmp_path.name) + r".*spiece\.model"):
        Tokenizer.from_folder(tmp_path)


# Prompts whose official cleaning (wan/modules/tokenizers.py: ftfy.fix_text, html.unescape twice,
# strip, `regex` \s+ -> " ") changes what the tokenizer sees, and what it makes of them.
OFFICIALLY_CLEANED = {
    "  a &amp;amp; b\n\n c\t ": "a & b c",  # double-escaped entity (ftfy unescapes once more), whitespace
    "x\x00y\x1bz\x7f": "xyz",  # control characters removed by ftfy, not turned into spaces
    "\u201ccurly\u201d it\u2019s": '"curly" it\'s',  # curly quotes straightened
    "caf\u00c3\u00a9 cr\u00c3\u00a8me": "caf\u00e9 cr\u00e8me",  # UTF-8 read as Latin-1 (mojibake) repaired
    "\x1b[31mred\x1b[0m fox": "red fox",  # terminal colour codes removed
    "\ufb01ne \uff26\uff4f\uff58": "fine Fox",  # ligature and full-width letters
    "a\r\nb\u2028c\x85d": "a b c\u2026d",  # line breaks; C1 control \x85 read as windows-1252
    "\ufeffbom": "bom",  # byte-order mark
    "a<b &amp;amp; c": "a<b & c",  # with a "<" ftfy leaves entities alone: html.unescape twice only
    "\ud83d\ude00 fox": "\U0001f600 fox",  # a surrogate pair is one character
    "a\x1cb &#27;x&#28;y&#9;z": "ab xy z",  # separators: not whitespace to the official `regex` \s
}


def official_cleaning(text: str) -> str:
    """wan/modules/tokenizers.py's whitespace_clean(basic_clean(text)), from its source."""
    import html

    import ftfy
    import regex  # a dependency of transformers; the official module uses it for \s

    return regex.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text))).strip()).strip()


@pytest.mark.parametrize("text", OFFICIALLY_CLEANED)
def test_clean_text_is_the_official_cleaning(text):
    assert clean_text(text) == official_cleaning(text) == OFFICIALLY_CLEANED[text]


def test_clean_text_without_ftfy_refuses_instead_of_cleaning_differently(monkeypatch, tokenizer):
    """Without ftfy, "caf\u00c3\u00a9" or curly quotes would reach the tokenizer unrepaired: different
    tokens for the same prompt, so no fallback, one line naming the fix."""
    from fakes import hide_package

    hide_package(monkeypatch, "ftfy")
    for call in (lambda: clean_text("a fox"), lambda: tokenizer(["a fox"])):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == ("cleaning a prompt as the official Wan2.2 code does needs the ftfy package, which "
                                  "is not installed (No module named 'ftfy'); install it: pip install ftfy")
    monkeypatch.undo()
    assert clean_text("a fox") == "a fox"


def test_clean_text_refuses_what_is_not_a_string():
    with pytest.raises(TypeError, match="text must be a str"):
        clean_text(None)


def test_clean_text_equals_the_official_module_when_a_checkout_is_given():
    """The same prompts through the official `HuggingfaceTokenizer._clean` of a Wan2.2 checkout."""
    import importlib.util
    import os
    from pathlib import Path
    from types import SimpleNamespace

    repo = os.environ.get("WAN22_OFFICIAL_REPO")
    if not repo:
        pytest.skip("WAN22_OFFICIAL_REPO is not set: no checkout of Wan-Video/Wan2.2 (the official recipe is "
                    "re-derived in test_clean_text_is_the_official_cleaning)")
    spec = importlib.util.spec_from_file_location("official_tokenizers", Path(repo) / "wan/modules/tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    official = SimpleNamespace(clean="whitespace")  # _clean reads only self.clean
    for text, expected in OFFICIALLY_CLEANED.items():
        assert clean_text(text) == module.HuggingfaceTokenizer._clean(official, text) == expected, repr(text)


# 4. Truncation keeps EOS last and says how many tokens were dropped.
def test_truncation_warns_and_keeps_eos(tokenizer):
    prompt = "A red fox runs across a snowy forest. " * 60
    full = tokenizer.ids(prompt)
    assert len(full) > 512
    with pytest.warns(UserWarning, match=rf"dropped the last {len(full) - 512} tokens") as record:
        ids, mask = tokenizer([prompt], max_len=512)
    assert "limit of 512" in str(record[0].message)
    assert ids.shape == (1, 512) and bool(mask.all())
    assert ids[0, -1].item() == EOS_ID
    assert ids[0, :511].tolist() == full[:511]


def test_short_prompt_does_not_warn(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tokenizer([PROMPTS[0]], max_len=512)
    assert mask.sum().item() == len(tokenizer.ids(PROMPTS[0]))


# 5. Empty prompt, default negative, cache.
def test_empty_prompt_is_just_eos(umt5, tokenizer):
    encoder = TextEncoder(umt5, tokenizer)
    embeds = encoder.encode_prompt("a cat", "")
    assert tokenizer.ids("") == [EOS_ID]
    assert embeds.negative.shape == (1, TINY.text.dim)
    assert torch.equal(embeds.negative, reference_embeds(umt5, tokenizer, [""])[0])


def test_none_negative_uses_default(umt5, tokenizer):
    encoder = TextEncoder(umt5, tokenizer)
    embeds = encoder.encode_prompt("a cat", None, device="meta")
    assert embeds.positive.device.type == "meta"  # outputs follow the sampler's device
    negative = encoder.encode([DEFAULT_NEGATIVE_PROMPT])[0]
    assert embeds.negative.shape == negative.shape == (
        len(tokenizer.ids(DEFAULT_NEGATIVE_PROMPT)), TINY.text.dim)
    assert torch.equal(negative, reference_embeds(umt5, tokenizer, [DEFAULT_NEGATIVE_PROMPT])[0])


def test_cache_hit_does_not_rerun_model(tokenizer):
    torch.manual_seed(1)
    model = build_umt5(TINY.text)
    calls = count_forwards(model)
    encoder = TextEncoder(model, tokenizer)
    first = encoder.encode_prompt("a cat on a boat")
    assert len(calls) == 1  # positive and default negative in one batch
    first.positive.add_(1.0)  # callers get copies; the cache must not see this
    again = encoder.encode_prompt("  a cat   on a boat ")  # same cleaned text
    assert len(calls) == 1
    assert encoder.cache_info() == (2, 2, 2)
    assert torch.equal(again.positive, reference_embeds(model, tokenizer, ["a cat on a boat"])[0])


def test_cache_evicts_least_recently_used(tokenizer):
    model = build_umt5(TINY.text)
    calls = count_forwards(model)
    encoder = TextEncoder(model, tokenizer, text_len=16, cache_size=2)
    encoder.encode(["one"])
    encoder.encode(["two"])
    encoder.encode(["one"])  # refreshes "one"
    encoder.encode(["three"])  # evicts "two"
    runs = len(calls)
    encoder.encode(["one"])
    assert len(calls) == runs
    encoder.encode(["two"])
    assert len(calls) == runs + 1
    assert encoder.cache_info().size == 2


# 6. Missing tokenizer; deterministic tiny SentencePiece.
def test_missing_tokenizer_is_a_clear_error(umt5):
    with pytest.raises(ValueError, match=r"no tokenizer.*spiece_model.*Tokenizer\.from_folder"):
        TextEncoder.from_state_dict(umt5.state_dict(), None)


def test_train_tiny_sentencepiece_is_deterministic(spiece_bytes):
    again = train_tiny_sentencepiece()
    assert again == spiece_bytes
    assert Tokenizer.from_bytes(again).vocab_size == 256



def test_sentencepiece_model_with_other_eos_is_refused():
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a cat on a boat"] * 20), model_writer=writer, vocab_size=20,
        model_type="char", eos_id=3, minloglevel=2)
    with pytest.raises(ValueError, match="eos id 3; UMT5 needs 1"):
        Tokenizer.from_bytes(writer.getvalue())
