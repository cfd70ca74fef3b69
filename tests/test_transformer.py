"""DiT parity with diffusers' WanTransformer3DModel and float64 re-derivations of the shortcuts."""
import math

import pytest
import torch
from reference import diffusers_twin, rel_l2

from wan22_core.config import TINY, DiTConfig
from wan22_core.models.transformer import RotaryEmbedding, WanModel, apply_rope

CONFIGS = [
    # (config, latent shape F, H, W): several frames, odd token grids
    (TINY.dit, (3, 6, 10)),
    (DiTConfig(dim=96, ffn_dim=160, num_heads=3, num_layers=3, text_dim=48, freq_dim=64), (5, 10, 14)),
]


def randomize_(model: torch.nn.Module, seed: int):
    """Random weights everywhere (norm weights too), so every parameter matters in the test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # 1-D parameters (norm weights, biases) around 1, matrices ~ 0.5/sqrt(fan_in)
            noise = torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(p.shape[-1]))
            p.copy_(noise + (1.0 if p.ndim == 1 else 0.0))


@pytest.mark.parametrize("cfg,shape", CONFIGS)
def test_dit_matches_diffusers(cfg, shape):
    torch.manual_seed(0)
    ours = WanModel(cfg).eval()
    randomize_(ours, seed=1)
    ref = diffusers_twin(cfg, ours)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_dim, *shape, generator=g)
    t = torch.tensor([999, 631])
    context = torch.randn(2, 11, cfg.text_dim, generator=g)  # 11 real tokens
    with torch.no_grad():
        out = ours(x, t, context)
        # diffusers does not pad: hand it the 512-slot zero-padded context the pipeline builds
        padded = torch.nn.functional.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        expected = ref(x, t, padded, return_dict=False)[0]
    assert out.shape == expected.shape == x.shape
    assert out.dtype == torch.float32
    assert expected.std() > 0.1  # a non-trivial output, not a vanishing one
    assert rel_l2(out, expected) <= 1e-5


def test_text_padding_is_zero_before_embedding():
    """Trimmed context and explicitly zero-padded context give the same output (official semantics)."""
    cfg = CONFIGS[0][0]
    model = WanModel(cfg).eval()
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([500])
    ctx = torch.randn(1, 5, cfg.text_dim)
    with torch.no_grad():
        a = model(x, t, ctx)
        b = model(x, t, torch.nn.functional.pad(ctx, (0, 0, 0, 20)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 11, 511])
def test_one_slot_stands_for_every_padded_position(tokens):
    """embed_text keeps one zero-padding slot with a log(512 - n) logit bias; cross-attention with
    it equals attention over all 512 slots (float64, to rounding). The count itself is checked too:
    one copy more or less moves the padding's softmax weight by a factor (m +- 1) / m."""
    cfg = CONFIGS[0][0]
    model = WanModel(cfg).double().eval()
    randomize_(model, seed=4)
    g = torch.Generator().manual_seed(5)
    padded_copies = cfg.text_len - tokens
    with torch.no_grad():
        context, pad_bias = model.embed_text(torch.randn(1, tokens, cfg.text_dim, generator=g, dtype=torch.float64))
        assert context.shape == (1, tokens + 1, cfg.dim) and torch.equal(pad_bias[:tokens], torch.zeros(tokens))
        assert math.isclose(math.exp(pad_bias[-1].item()), padded_copies, rel_tol=1e-12)
        every_slot = torch.cat([context[:, :tokens], context[:, tokens:].expand(1, padded_copies, -1)], dim=1)
        x = torch.randn(1, 6, cfg.dim, generator=g, dtype=torch.float64)
        attention = model.blocks[0].cross_attn
        # measured <= 3.1e-15; a count one too high gives 1.7e-7 (1 token) to 1.1e-5 (511 tokens)
        assert rel_l2(attention(x, context, pad_bias), attention(x, every_slot, None)) <= 1e-12


def official_rope_float64(x: torch.Tensor, grid, head_dim: int) -> torch.Tensor:
    """The official rope_params/rope_apply, written out in float64 complex numbers."""
    def rope_params(max_len, dim, theta=10000):
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float64),
                            1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return torch.polar(torch.ones_like(freqs), freqs)

    d = head_dim
    freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                       rope_params(1024, 2 * (d // 6))], dim=1)
    c = d // 2
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    table = torch.cat([
        parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * table).flatten(-2)


@pytest.mark.parametrize("head_dim,grid", [(128, (21, 9, 16)), (16, (3, 5, 7)), (96, (2, 3, 4))])
def test_rope_equals_float64_official(head_dim, grid):
    rope = RotaryEmbedding(head_dim, 1024)
    x = torch.randn(1, math.prod(grid), 2, head_dim)
    ours = apply_rope(x, rope(grid, torch.device("cpu")))
    assert rel_l2(ours, official_rope_float64(x, grid, head_dim)) <= 1e-6


def test_rope_split_is_44_42_42_for_a14b():
    assert RotaryEmbedding(128, 1024).axis_dims == (44, 42, 42)


def test_rope_refuses_grids_beyond_1024_positions():
    with pytest.raises(ValueError, match="1024 RoPE positions"):
        RotaryEmbedding(16, 1024)((1, 1025, 2), torch.device("cpu"))


def test_per_sample_modulation_equals_official_per_token_float64():
    """Our [B, 6, dim] modulation == the official per-token [B, L, 6, dim] one, rederived in float64."""
    cfg = CONFIGS[0][0]
    model = WanModel(cfg).double()
    t = torch.tensor([999.0, 877.0, 235.0])
    L = 7
    with torch.no_grad():
        e, e0 = model.float().embed_time(t)
        model.double()
        # official: t expanded per token, sinusoid in float64, MLPs, unflatten to [B, L, 6, dim]
        tt = t[:, None].expand(-1, L).reshape(-1).double()
        half = cfg.freq_dim // 2
        sinus = torch.outer(tt, torch.pow(10000, -torch.arange(half).double() / half))
        emb = torch.cat([sinus.cos(), sinus.sin()], 1)
        e_ref = model.time_embedding(emb)
        e0_ref = model.time_projection(e_ref).view(3, L, 6, cfg.dim)
        block = model.blocks[0]
        mod_ref = block.modulation.unsqueeze(0) + e0_ref  # [B, L, 6, dim]
        mod_ours = (block.modulation.float() + e0).unsqueeze(1).expand(-1, L, -1, -1)
    assert rel_l2(e.unsqueeze(1).expand(-1, L, -1), e_ref.view(3, L, -1)) <= 1e-6
    assert rel_l2(mod_ours, mod_ref) <= 1e-6


def test_feed_forward_gelu_in_place_keeps_the_official_names_and_numbers():
    """FeedForward overwrites ffn.0's output with its GELU when no autograd is recording; the
    result is bit for bit Linear -> GELU(tanh) -> Linear, in fp32 and bf16, and the state dict
    keeps the official ffn.0 / ffn.2 names."""
    from wan22_core.models.transformer import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(32, 80)
    assert list(ffn.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for dtype in (torch.float32, torch.bfloat16):
        layer, x = ffn.to(dtype), torch.randn(2, 9, 32, dtype=dtype)
        with torch.no_grad():
            expected = layer[2](torch.nn.functional.gelu(layer[0](x), approximate="tanh"))
            assert torch.equal(layer(x), expected)
    ffn = ffn.float()
    x = torch.randn(2, 9, 32)
    out = ffn(x)  # grad mode: the GELU input is kept for backward
    out.square().sum().backward()
    with torch.no_grad():
        assert torch.equal(out.detach(), ffn(x))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ffn.parameters())
