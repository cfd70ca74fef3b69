"""The memory model (wan22_core.memory) against what tiny models really hold on the CPU.

Activations are checked by accounting (`live_bytes.LiveBytes`: the most tensor bytes alive at
once during the forward, as an allocator would see them). Weights are checked against the
parameters that each offload mode leaves on the compute device.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
from live_bytes import LiveBytes

from wan22_core.config import TINY, DiTConfig
from wan22_core.memory import (GIB, block_activation_peak, estimate_peak_bytes, param_counts, video_tokens,
                               weight_bytes)
from wan22_core.models.transformer import WanModel
from wan22_core.placement import ExpertPair
from wan22_core.sampling.moe import HIGH

CFG = DiTConfig(dim=64, ffn_dim=176, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)
TEXT_TOKENS = 77  # a prompt of 77 tokens (the model keeps them plus one slot for the padding)
ACTIVATION_TOLERANCE = 0.005  # relative; measured within 0.01% (fp32) and 0.3% (bf16: small temporaries)


def measured_activation_peak(model: WanModel, frames: int, height: int, width: int, batch: int) -> int:
    g = torch.Generator().manual_seed(0)
    _, t, h, w = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.randn(batch, 16, t, h, w, generator=g)
    ctx = torch.randn(batch, TEXT_TOKENS, model.cfg.text_dim, generator=g)
    timestep = torch.full((batch,), 900.0)
    preexisting = [*model.parameters(), *model.buffers(), x, ctx, timestep]
    with torch.no_grad(), LiveBytes(preexisting) as mode:
        model(x, timestep, ctx)
    return mode.peak


def tiny_model(dtype: torch.dtype, fp8_compute: str | None = None) -> WanModel:
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    if fp8_compute is not None:
        to_fp8(model)
        from wan22_core.fp8 import set_fp8_compute

        set_fp8_compute(model, fp8_compute)
    return model.to(dtype) if fp8_compute is None else model


def to_fp8(model: WanModel) -> None:
    """The block Linears as scaled fp8 (as a comfy fp8 checkpoint loads), the rest bf16."""
    from wan22_core.fp8 import quantize_block_linears

    quantize_block_linears(model.to(torch.bfloat16))


@pytest.mark.parametrize("frames, height, width, batch, dtype", [
    (9, 256, 256, 2, torch.bfloat16),  # 768 tokens
    (17, 256, 384, 2, torch.bfloat16),  # 1920 tokens
    (17, 384, 384, 1, torch.bfloat16),  # 2880 tokens, batch 1 (sequential CFG)
    (9, 256, 256, 2, torch.float32),  # fp32 weights: the .float()/.to() casts become no-ops
])
def test_activation_estimate_matches_accounting(frames, height, width, batch, dtype):
    model = tiny_model(dtype)
    measured = measured_activation_peak(model, frames, height, width, batch)
    est = estimate_peak_bytes(CFG, frames, height, width, weight_bytes_per_param=4 if dtype == torch.float32 else 2,
                              batch=batch, text_tokens=TEXT_TOKENS)
    assert est["activations"] == pytest.approx(measured, rel=ACTIVATION_TOLERANCE), (est, measured)


@pytest.mark.parametrize("fp8_compute", ["dequant", "scaled_mm"])
def test_activation_estimate_matches_accounting_fp8(fp8_compute):
    model = tiny_model(torch.bfloat16, fp8_compute)
    measured = measured_activation_peak(model, 17, 256, 384, 2)
    est = estimate_peak_bytes(CFG, 17, 256, 384, weight_bytes_per_param=1, batch=2, fp8_compute=fp8_compute,
                              text_tokens=TEXT_TOKENS)
    assert est["activations"] == pytest.approx(measured, rel=ACTIVATION_TOLERANCE), (est, measured)


def test_block_peak_is_in_the_cross_attention_norm_and_scales_with_tokens():
    """At real size the eager peak is the cross-attention q RMSNorm's fp32 temporaries: 20.0 bytes
    per [B, L, dim] element (the FFN's GELU runs in place: 17.4 there)."""
    cfg = DiTConfig()
    peak, where, live = block_activation_peak(cfg, 75_600, 2)
    elems = 2 * 75_600 * cfg.dim
    assert where == "cross_attn.q.rstd"
    assert peak == pytest.approx(20.0 * elems, rel=0.01)
    # the block's input stream (held by the caller's loop) and the new stream are both fp32; the
    # bf16 norm3 output and q projection, and RMSNorm's fp32 upcast and fp32 result
    assert live["x_in"] == live["x1"] == 4 * elems and live["norm3.c"] == live["cross_attn.q_lin"] == 2 * elems
    assert live["cross_attn.q.f32"] == live["cross_attn.q.norm"] == 4 * elems
    assert block_activation_peak(cfg, 75_600, 1)[0] == pytest.approx(peak / 2, rel=0.01)


def param_bytes_on(modules, device: torch.device) -> int:
    return sum(t.numel() * t.element_size() for m in modules
               for t in (*m.parameters(), *m.buffers()) if t.device == device)


@pytest.mark.parametrize("cfg", [CFG, DiTConfig(dim=96, ffn_dim=200, num_heads=2, num_layers=3, text_dim=48,
                                                freq_dim=64, in_dim=8, out_dim=12)])
@pytest.mark.parametrize("bytes_per_param", [4, 2, 1])
def test_weight_bytes_match_parameters(cfg, bytes_per_param):
    model = WanModel(cfg)
    if bytes_per_param == 1:
        to_fp8(model)
    else:
        model.to(torch.float32 if bytes_per_param == 4 else torch.bfloat16)
    block, expert = weight_bytes(cfg, bytes_per_param)
    assert param_bytes_on([model], torch.device("cpu")) == expert
    assert param_bytes_on([model.blocks[0]], torch.device("cpu")) == block


def test_a14b_parameter_count_is_exact():
    cfg = DiTConfig()
    with torch.device("meta"):
        model = WanModel(cfg)
    n = param_counts(cfg)
    per_block = n["block_linear_weights"] + n["block_other"]
    assert n["non_block"] + cfg.num_layers * per_block == sum(p.numel() for p in model.parameters())
    assert weight_bytes(DiTConfig(), 2)[1] == pytest.approx(28.6e9, rel=0.002)  # design.md: 28.6 GB bf16


def test_weights_per_offload_mode_match_what_stays_on_the_device():
    """Compute device cpu, offload device meta: whatever is on the cpu is device-resident."""
    cpu = torch.device("cpu")
    high = WanModel(CFG).to(torch.bfloat16)
    with torch.device("meta"):
        low = WanModel(CFG).to(torch.bfloat16)
    both = ExpertPair(high, WanModel(CFG).to(torch.bfloat16), cpu, keep_both=True)
    both.get(HIGH)
    assert param_bytes_on(both.experts.values(), cpu) == estimate_peak_bytes(CFG, 5, 64, 64, offload="none")["weights"]
    one = ExpertPair(high, low, cpu, keep_both=False, offload_device=torch.device("meta"))
    one.get(HIGH)
    assert param_bytes_on(one.experts.values(), cpu) == estimate_peak_bytes(
        CFG, 5, 64, 64, offload="swap_experts")["weights"]


@pytest.mark.parametrize("swap_blocks", [1, 2])
def test_weights_with_block_swap_count_blocks_in_flight(swap_blocks):
    cfg = replace(TINY.dit, num_layers=4)
    model = WanModel(cfg).to(torch.bfloat16)
    with torch.device("meta"):
        low = WanModel(cfg)
    pair = ExpertPair(model, low, torch.device("cpu"), offload_device=torch.device("meta"), swap_blocks=swap_blocks)
    pair.get(HIGH)
    swap = pair._swap
    fixed = [m for name, m in model.named_children() if name != "blocks"]
    fixed += [b for b in model.blocks if b not in swap.order]
    resident = []

    def count(block, args):  # runs after BlockSwap's pre-hook: the block and its prefetch are loaded
        resident.append(param_bytes_on(fixed, torch.device("cpu"))
                        + sum(param_bytes_on([b], torch.device("cpu")) for b in swap.ready))

    hooks = [b.register_forward_pre_hook(count) for b in model.blocks]
    x, t, ctx = torch.randn(1, 16, 1, 8, 8), torch.tensor([900.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        model(x, t, ctx)
    for h in hooks:
        h.remove()
    expected = estimate_peak_bytes(cfg, 1, 64, 64, offload="block_swap", swap_blocks=swap_blocks)["weights"]
    assert max(resident) == expected


def test_video_tokens_for_the_design_sizes():
    assert video_tokens(DiTConfig(), 81, 720, 1280) == 75_600  # 21 x 45 x 80
    assert video_tokens(DiTConfig(), 81, 480, 832) == 32_760  # 21 x 30 x 52


@pytest.mark.parametrize("kwargs, message", [
    (dict(offload="disk"), "offload must be one of"),
    (dict(offload="swap_experts", swap_blocks=3), "needs offload='block_swap'"),
    (dict(offload="block_swap", swap_blocks=41), "between 0 and 40"),
    (dict(offload="block_swap", swap_blocks=0), "needs swap_blocks between 1 and 40"),  # as the engine refuses it
    (dict(offload="auto"), "offload must be one of none, swap_experts, block_swap; got 'auto'"),
    (dict(weight_bytes_per_param=3), "weight_bytes_per_param must be 1"),
    (dict(batch=0), "batch must be an integer >= 1"),
    (dict(batch=True), "batch must be an integer >= 1"),
    (dict(fp8_compute="int8"), "fp8_compute must be one of"),
])
def test_bad_arguments_name_the_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_peak_bytes(DiTConfig(), 81, 720, 1280, **kwargs)


def test_numpy_integers_estimate_as_python_ints():
    numpy = estimate_peak_bytes(DiTConfig(), np.int64(81), np.int32(720), np.uint16(1280), offload="block_swap",
                                swap_blocks=np.int64(3), batch=np.int64(1))
    assert numpy == estimate_peak_bytes(DiTConfig(), 81, 720, 1280, offload="block_swap", swap_blocks=3, batch=1)


def test_min_swap_blocks_is_the_smallest_count_that_fits():
    from wan22_core.memory import CUDA_OVERHEAD, min_swap_blocks

    cfg, card = DiTConfig(), 24 * GIB
    need = min_swap_blocks(cfg, 81, 720, 1280, card, batch=1)
    total = lambda n: estimate_peak_bytes(cfg, 81, 720, 1280, offload="block_swap", swap_blocks=n, batch=1)["total"]
    assert need is not None and 0 < need < cfg.num_layers
    assert total(need) + CUDA_OVERHEAD <= card < total(need - 1) + CUDA_OVERHEAD


def test_the_720p_table_names_swap_experts_when_no_block_needs_swapping():
    """0 swapped blocks is what swap_experts does (block_swap with 0 is refused): say that."""
    from wan22_core.memory import CUDA_OVERHEAD, min_swap_blocks, table_720p

    cfg, card = DiTConfig(), 24 * GIB
    fp8_b1 = estimate_peak_bytes(cfg, 81, 720, 1280, weight_bytes_per_param=1, offload="swap_experts", batch=1)
    assert fp8_b1["total"] + CUDA_OVERHEAD <= card  # so the fp8 batch-1 row needs no block swap
    assert min_swap_blocks(cfg, 81, 720, 1280, card, weight_bytes_per_param=1, batch=1) == 0
    table = table_720p(cfg)
    assert "- fp8, batch 1: fits a 24 GiB card with swap_experts (no block swap)" in table
    assert "block_swap(0)" not in table and "block_swap >= 0" not in table


def test_fp8_compute_modes_are_the_engines_without_auto():
    from wan22_core.fp8 import COMPUTE_MODES
    from wan22_core.memory import FP8_COMPUTE

    assert sorted(FP8_COMPUTE) == ["dequant", "scaled_mm"] and set(FP8_COMPUTE) == set(COMPUTE_MODES) - {"auto"}
    with pytest.raises(ValueError, match="fp8_compute must be one of dequant, scaled_mm; got 'auto'"):
        estimate_peak_bytes(DiTConfig(), 81, 720, 1280, weight_bytes_per_param=1, fp8_compute="auto")


def test_text_slots_bound_the_context_in_both_estimates():
    """The prompt's tokens plus one padding slot, at most text_len; the block peak and the persistent
    context both follow it."""
    from wan22_core.memory import forward_persistent_bytes, text_slots

    cfg = DiTConfig()
    assert [text_slots(cfg, n) for n in (None, 0, 10, 511, 512, 4096)] == [512, 1, 11, 512, 512, 512]
    persistent = lambda n: forward_persistent_bytes(cfg, 1000, 2, 2, n)
    assert persistent(20) - persistent(10) == 2 * 10 * cfg.dim * 2 and persistent(None) == persistent(600)
    peak = lambda n: block_activation_peak(cfg, 1000, 2, 2, None, n)
    assert peak(None) == peak(600) == peak(512)
    # 4 video tokens: the peak is in the cross-attention k projection, [B, slots, dim] in bf16
    for n, slots in ((10, 11), (None, 512)):
        _, at, live = block_activation_peak(cfg, 4, 2, 2, None, n)
        assert at == "cross_attn.k.rstd" and live["cross_attn.k_lin"] == 2 * slots * cfg.dim * 2, n


# ---------------------------------------------------------------------------------------------
# GGUF experts: block Linears in their GGUF blocks (GGUFLinear), the rest in the compute dtype


def gguf_model(cfg: DiTConfig, file_type: str, dtype: torch.dtype) -> WanModel:
    """A WanModel held as `load_dit` holds a GGUF expert of `file_type`, random valid blocks."""
    from fakes import random_gguf_blocks

    from wan22_core.memory import gguf_linear_types
    from wan22_core.quant import GGUFLinear, swap_to_gguf

    torch.manual_seed(0)
    model = WanModel(cfg).eval().to(dtype)
    types = gguf_linear_types(file_type)
    swap_to_gguf(model, {f"blocks.{i}.{name}": types[name] for i in range(cfg.num_layers) for name in types},
                 bias_dtype=dtype)
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, GGUFLinear)):
        blocks = random_gguf_blocks(layer.qtype.name, layer.weight.numel() // layer.qtype.type_size, seed=i)
        layer.weight.data = torch.from_numpy(blocks).reshape(layer.weight.shape)
        layer.weight.data[:, :2] = 0  # small fp16 scales (Q8_0's d, K-quants' codes): finite activations
        layer.bias.data.zero_()
    return model


@pytest.mark.parametrize("file_type, dtype", [("Q8_0", torch.bfloat16), ("Q4_K_M", torch.float32),
                                              ("Q2_K", torch.bfloat16)])
def test_gguf_weight_bytes_match_parameters(file_type, dtype):
    cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)
    from wan22_core.memory import gguf_linear_types
    from wan22_core.quant import swap_to_gguf

    with torch.device("meta"):
        model = WanModel(cfg).to(dtype)
    types = gguf_linear_types(file_type)
    swap_to_gguf(model, {f"blocks.{i}.{n}": t for i in range(cfg.num_layers) for n, t in types.items()}, bias_dtype=dtype)
    block, expert = weight_bytes(cfg, dtype.itemsize, gguf=file_type)
    assert param_bytes_on([model], torch.device("meta")) == expert
    assert param_bytes_on([model.blocks[0]], torch.device("meta")) == block


# Published ComfyUI-GGUF Wan2.2 A14B expert files (bytes; gguf_facts.md lists the repos): the block
# Linears at each file type's mix plus the other 0.235e9 parameters in 16 bits predict them within 0.3%.
PUBLISHED_GGUF_BYTES = {"Q8_0": 15.4e9, "Q6_K": 12.0e9, "Q5_K_S": 10_137_514_496, "Q4_K_M": 9_651_728_896,
                        "Q4_K_S": 8.75e9, "Q4_1": 9.26e9, "Q4_0": 8.56e9, "Q3_K_M": 7.18e9,
                        "Q3_K_S": 6_513_373_696, "Q2_K": 5.3e9}


@pytest.mark.parametrize("file_type", PUBLISHED_GGUF_BYTES)
def test_gguf_expert_sizes_match_the_published_files(file_type):
    assert weight_bytes(DiTConfig(), 2, gguf=file_type)[1] == pytest.approx(PUBLISHED_GGUF_BYTES[file_type], rel=0.003)


def test_gguf_file_types_give_v_and_ffn2_their_bigger_types():
    from wan22_core.memory import gguf_linear_types

    q4_k_m = gguf_linear_types("Q4_K_M")
    assert {n for n, t in q4_k_m.items() if t == "Q6_K"} == {"self_attn.v", "cross_attn.v", "ffn.2"}
    assert set(q4_k_m.values()) == {"Q4_K", "Q6_K"} and set(gguf_linear_types("Q8_0").values()) == {"Q8_0"}
    with pytest.raises(ValueError, match="gguf must be one of Q8_0, .*Q2_K .*got 'Q4_K'"):
        estimate_peak_bytes(DiTConfig(), 81, 720, 1280, gguf="Q4_K")
    with pytest.raises(ValueError, match="with gguf, weight_bytes_per_param is the compute dtype's"):
        estimate_peak_bytes(DiTConfig(), 81, 720, 1280, gguf="Q8_0", weight_bytes_per_param=1)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dequant_peak_bytes_per_weight_are_measured(name):
    """The memory model's DEQUANT_PEAK_BYTES: what `dequantize` keeps alive at once per weight."""
    from fakes import random_gguf_blocks

    from wan22_core.memory import DEQUANT_PEAK_BYTES
    from wan22_core.quant import TYPES, dequantize

    rows, cols = 64, 512
    raw = torch.from_numpy(random_gguf_blocks(name, rows * cols // TYPES[name].block_size)).reshape(rows, -1)
    for dtype, expected in zip((torch.bfloat16, torch.float32), DEQUANT_PEAK_BYTES[name]):
        with LiveBytes([raw]) as mode:
            dequantize(raw, name, (rows, cols), dtype)
        assert mode.peak == rows * cols * expected, (dtype, mode.peak / (rows * cols))


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("frames, height, width, ffn_dim, peak_at", [
    (9, 256, 256, 512, "cross_attn.q.rstd"),  # 512 tokens: the activations peak, as with dense weights
    # 32 tokens and a wide FFN: ffn.2's dequantisation is the peak (Q6_K's in Q4_K_M), above the
    # fp32 time projection the forward makes before the blocks (which the block replay leaves out)
    (5, 64, 64, 2048, "ffn.2.dequant"),
])
def test_activation_estimate_matches_accounting_gguf(file_type, frames, height, width, ffn_dim, peak_at):
    cfg = DiTConfig(dim=256, ffn_dim=ffn_dim, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)
    model = gguf_model(cfg, file_type, torch.bfloat16)
    measured = measured_activation_peak(model, frames, height, width, 2)
    est = estimate_peak_bytes(cfg, frames, height, width, gguf=file_type, batch=2, text_tokens=TEXT_TOKENS)
    assert est["peak_at"] == peak_at
    assert est["activations"] == pytest.approx(measured, rel=ACTIVATION_TOLERANCE), (est, measured)


def test_the_small_card_table_is_the_memory_models():
    from wan22_core.memory import min_swap_blocks, small_card_table

    cfg = DiTConfig()
    table = small_card_table(cfg)
    need = min_swap_blocks(cfg, 81, 720, 1280, 16 * GIB, gguf="Q4_K_M", batch=1)
    row = next(line for line in table.splitlines() if line.startswith("| 16 GB | 720p | --no-batch-cfg |"))
    assert row.split(" | ")[6] == f"block_swap {need}" and 0 < need < cfg.num_layers
    assert "| (one expert) | | | 15.4 GB | 12.0 GB | 10.8 GB | 9.6 GB | 7.2 GB | 5.3 GB |" in table


def test_the_readmes_small_card_recipe_is_the_memory_models():
    """README "Small cards: which GGUF file": every cell is what small_card_advice says."""
    import re
    from pathlib import Path

    from wan22_core.memory import SMALL_CARD_QUANTS, small_card_advice

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Small cards: which GGUF file")[1].split("\n\n", 3)[2]
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ GB \|", line)]
    assert len(rows) == 4
    columns = [("480p", 2), ("480p", 1), ("720p", 2), ("720p", 1)]
    for row in rows:
        card, *cells = [c.strip() for c in row.strip("|").split("|")]
        gib = int(card.split()[0])
        for (video, batch), cell in zip(columns, cells):
            advice = lambda quant: small_card_advice(DiTConfig(), gib, video, batch, quant)  # noqa: E731
            if cell == "does not fit":
                assert all(advice(q) == "no" for q in SMALL_CARD_QUANTS), (gib, video, batch)
            elif cell == "every file with swap":
                assert all(advice(q) == "swap_experts" for q in SMALL_CARD_QUANTS), (gib, video, batch)
            else:
                for quant, how in re.findall(r"(Q\w+) (swap|bs \d+)", cell):
                    assert advice(quant) == ("swap_experts" if how == "swap" else f"block_swap {how[3:]}"), \
                        (gib, video, batch, quant)
