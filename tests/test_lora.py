"""LoRA: every file format merges to W + strength * (alpha/rank) * up @ down, merged == on the fly,
fp8 merges stay within fp8 rounding, strength changes re-use the parsed factors, wrong LoRAs
say what they are."""
import collections
import copy
import math
import os

import pytest
import torch
from reference import rel_l2
from safetensors.torch import load_file, save_file

from wan22_core.checkpoints import DIT, NUM_HEADS_KEY, SCALE_SUFFIXES, Checkpoint, CheckpointError, check_slot, load_dit
from wan22_core.config import TINY, DiTConfig
from wan22_core.fp8 import FP8, FP8Linear, block_linear_names, fp8_scale, to_fp8
from wan22_core.lora import LoraError, LoraReport, LoraSpec, apply_loras, lora_deltas, remerge
from wan22_core.models.transformer import WanModel
from wan22_core.tiny import TINY_LORA_FORMATS, seeded, write_tiny_lora

RANK = 4
# Beyond the block Linears: a convolution, the fp32 head and an embedding Linear (merged in both modes).
EXTRA_TARGETS = ["patch_embedding", "head.head", "text_embedding.0"]


@pytest.fixture(scope="module")
def base() -> WanModel:
    return seeded(0, lambda: WanModel(TINY.dit))


@pytest.fixture(scope="module")
def base_file(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "expert.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path),
              metadata={NUM_HEADS_KEY: str(TINY.dit.num_heads)})
    return path


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([700.0]),
            torch.randn(1, 8, TINY.dit.text_dim, generator=g))


def expected_state(base, tiny, strength, dtype):
    """The formula, computed directly from the file's tensors, per parameter."""
    out = {}
    for name, w in base.state_dict().items():
        module = name.removesuffix(".weight")
        value = w.to(dtype).float()
        if name.endswith(".weight") and module in tiny.low_rank:
            up, down, alpha = tiny.low_rank[module]
            value = value + strength * (alpha / RANK) * (up.flatten(1) @ down.flatten(1)).view(w.shape)
        if name in tiny.diffs:
            value = value + strength * tiny.diffs[name]
        out[name] = value.to(dtype)
    return out


def count_reads(monkeypatch):
    """Counter of Checkpoint.read calls per file name (every tensor read goes through it)."""
    reads = collections.Counter()
    original = Checkpoint.read

    def counting(self, *args, **kwargs):
        reads[self.path.name] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", counting)
    return reads


# ---------------------------------------------------------------------------------------------
# Formats


def test_tiny_lora_files_use_each_formats_names(base, tmp_path):
    q = "blocks.0.self_attn.q"
    expected = {  # format -> keys its files must hold for blocks.0.self_attn.q
        "comfy": [f"diffusion_model.{q}.lora_down.weight", f"diffusion_model.{q}.lora_up.weight",
                  f"diffusion_model.{q}.alpha"],
        "kohya": ["lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.alpha"],
        "peft": [f"base_model.model.{q}.lora_A.weight", f"base_model.model.{q}.lora_B.weight"],
        "diffusers": ["transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.0.attn1.to_q.lora_B.weight"],
        "lightx2v": [f"diffusion_model.{q}.lora_down.weight", f"diffusion_model.{q}.diff_b",
                     "diffusion_model.blocks.0.diff_m", "diffusion_model.blocks.0.norm3.diff"],
    }
    assert set(expected) == set(TINY_LORA_FORMATS)
    for fmt, keys in expected.items():
        path = tmp_path / f"{fmt}.safetensors"
        write_tiny_lora(path, base, fmt, rank=RANK)
        stored = set(load_file(str(path)))
        assert set(keys) <= stored, (fmt, sorted(stored)[:6])
        assert any(k.endswith(".alpha") for k in stored) == (fmt in ("comfy", "kohya", "lightx2v"))
        with pytest.raises(CheckpointError, match="LoRA"):  # the expert slot recognises it too
            check_slot(path, DIT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", TINY_LORA_FORMATS)
def test_each_format_merges_to_the_formula(base, tmp_path, fmt, dtype):
    """Bit-exact (tolerance 0) per parameter against a direct fp32 computation cast to `dtype`."""
    tiny = write_tiny_lora(tmp_path / "lora.safetensors", base, fmt, rank=RANK, seed=1,
                           targets=block_linear_names(base) + EXTRA_TARGETS)
    model = copy.deepcopy(base).to(dtype)
    (report,) = apply_loras(model, [LoraSpec(tiny.path, 0.7)])

    expected = expected_state(base, tiny, 0.7, dtype)
    changed = [n for n, w in model.state_dict().items() if not torch.equal(w, base.state_dict()[n].to(dtype))]
    for name, w in model.state_dict().items():
        assert torch.equal(w, expected[name]), name
    patched = {f"{m}.weight" for m in tiny.low_rank} | set(tiny.diffs)
    assert set(changed) == patched and report.parameters == len(patched)
    assert report.unmatched == ()


# ---------------------------------------------------------------------------------------------
# Merged vs on the fly


def test_merged_output_equals_unmerged_on_the_fly(base, tmp_path):
    """Two LoRAs (one with full deltas), merged vs unmerged: outputs within 1e-5 relative (fp32)."""
    first = write_tiny_lora(tmp_path / "a.safetensors", base, "lightx2v", rank=RANK, seed=1,
                            targets=block_linear_names(base) + ["head.head"])
    second = write_tiny_lora(tmp_path / "b.safetensors", base, "diffusers", rank=2, seed=2)
    specs = [LoraSpec(first.path, 0.8), LoraSpec(second.path, -0.5)]
    merged, unmerged = copy.deepcopy(base), copy.deepcopy(base)
    apply_loras(merged, specs, mode="merge")
    apply_loras(unmerged, specs, mode="unmerged")
    with torch.no_grad():
        out_merged, out_unmerged = merged(*inputs()), unmerged(*inputs())
    assert rel_l2(out_unmerged, out_merged) <= 1e-5

    # on the fly: block Linear weights untouched, state dict names unchanged (branches hold no state)
    for name in block_linear_names(base):
        assert torch.equal(unmerged.get_submodule(name).weight, base.get_submodule(name).weight)
    assert unmerged.state_dict().keys() == base.state_dict().keys()

    # a strength change in unmerged mode still matches a merge at the new strengths
    specs = [LoraSpec(first.path, 0.3), LoraSpec(second.path, 1.0)]
    apply_loras(merged, specs)
    apply_loras(unmerged, specs, mode="unmerged")
    with torch.no_grad():
        out_changed = merged(*inputs())
        assert rel_l2(unmerged(*inputs()), out_changed) <= 1e-5
    assert rel_l2(out_changed, out_merged) > 1e-2  # the strengths matter, so the comparisons mean something


# ---------------------------------------------------------------------------------------------
# Strength changes: no file reads, same weights as a fresh merge


def test_strength_change_reads_nothing_and_ends_at_a_fresh_merge(base, base_file, tmp_path, monkeypatch):
    """Re-merging subtracts and re-adds the delta: every element within 2 * eps * (largest |value| it
    held) of a fresh merge, and unchanged by a round trip through unmerged mode; no reads at all."""
    lora = write_tiny_lora(tmp_path / "style.safetensors", base, "comfy", rank=RANK, seed=3).path
    reads = count_reads(monkeypatch)
    model = load_dit(base_file)
    base_reads = reads[base_file.name]
    apply_loras(model, [LoraSpec(lora, 1.0)])
    assert reads[lora.name] == 1

    held = {n: w.abs() for n, w in model.state_dict().items()}
    for strength in (0.3, -0.5, 2.0, 0.8):
        apply_loras(model, [LoraSpec(lora, strength)])
        fresh = load_dit(base_file)
        apply_loras(fresh, [LoraSpec(lora, strength)])
        held = {n: torch.maximum(held[n], w.abs()) for n, w in fresh.state_dict().items()}
    apply_loras(model, [LoraSpec(lora, 0.8)], mode="unmerged")
    apply_loras(model, [LoraSpec(lora, 0.8)], mode="merge")

    eps = torch.finfo(torch.float32).eps
    for name, w in model.state_dict().items():
        assert ((w - fresh.state_dict()[name]).abs() <= 2 * eps * held[name]).all(), name
    # only the fresh loads read the base; the changing model read each file once
    assert reads[base_file.name] == base_reads * 5 and reads[lora.name] == 5

    apply_loras(model, [])  # back to the base weights, within the same bound
    for name, w in model.state_dict().items():
        assert ((w - base.state_dict()[name]).abs() <= 2 * eps * held[name]).all(), name
    assert not any(hasattr(m, "lora_branch") for m in model.modules())


def test_a_replaced_lora_file_is_read_again(base, tmp_path, monkeypatch):
    path = tmp_path / "style.safetensors"
    write_tiny_lora(path, base, "comfy", rank=RANK, seed=3)
    reads = count_reads(monkeypatch)
    model = copy.deepcopy(base)
    apply_loras(model, [LoraSpec(path, 1.0)])
    apply_loras(model, [LoraSpec(path, 0.5)])
    assert reads[path.name] == 1
    tiny = write_tiny_lora(path, base, "comfy", rank=RANK, seed=4)  # same size: the mtime tells
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    apply_loras(model, [LoraSpec(path, 0.5)])
    assert reads[path.name] == 2
    fresh = copy.deepcopy(base)
    apply_loras(fresh, [LoraSpec(path, 0.5)])
    q = "blocks.0.self_attn.q"
    assert torch.allclose(model.get_submodule(q).weight, expected_state(base, tiny, 0.5, torch.float32)[f"{q}.weight"],
                          rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# fp8


def fp8_ulp(units: torch.Tensor) -> torch.Tensor:
    """Spacing of float8_e4m3fn numbers at |units| (3 mantissa bits; subnormal spacing 2^-9)."""
    return 2.0 ** (torch.floor(torch.log2(units.abs().clamp_min(2.0**-6))) - 3)


def test_fp8_scale_and_rounding_helpers(base, base_file):
    """fp8_scale maps the largest |value| to 448; to_fp8 rounds value / scale to e4m3fn (3 mantissa
    bits: relative error <= 2^-4) and clips at +-448; in place it gives the same bits. The block
    Linears are the same layers before and after the fp8 swap."""
    values = torch.tensor([-3.0, -1.0, 0.0, 0.01, 0.5, 2.0, 2.9])
    scale = fp8_scale(values.abs().max())
    assert torch.equal(scale, torch.tensor(3.0) / 448)
    assert fp8_scale(torch.tensor(0.0)) > 0  # all zeros: any positive scale
    stored = to_fp8(values, scale)
    assert stored.dtype == FP8 and stored[0].item() == -448.0
    assert ((stored.float() * scale - values).abs() <= 2.0**-4 * values.abs()).all()
    assert to_fp8(torch.tensor([1000.0, -500.0, 96.0]), torch.tensor(0.5)).float().tolist() == [448.0, -448.0, 192.0]
    work = values.clone()
    assert torch.equal(to_fp8(work, scale, inplace=True).view(torch.uint8), stored.view(torch.uint8))
    assert torch.equal(work, values / scale)  # `work` held the division
    half = to_fp8(values.bfloat16(), scale)  # divides in bf16, the activations' dtype
    expected = (values.bfloat16() / scale.bfloat16()).clamp(-448, 448).to(FP8)
    assert torch.equal(half.view(torch.uint8), expected.view(torch.uint8))

    fp8 = load_dit(base_file, torch.bfloat16, weight_dtype=FP8)
    names = block_linear_names(fp8)
    assert names == block_linear_names(base) and len(names) > 0
    assert all(isinstance(fp8.get_submodule(n), FP8Linear) for n in names)


def test_fp8_merge_is_within_fp8_rounding_of_the_bf16_merge(base, base_file, tmp_path):
    """Per element: |fp8 merged - bf16 merged| <= half an fp8 step at the base value (old scale) + half
    a step at the merged value (new scale) + bf16 rounding of both; outputs no further apart than
    1.5x the fp8-vs-bf16 gap of the base models."""
    lora = write_tiny_lora(tmp_path / "l.safetensors", base, "lightx2v", rank=RANK, seed=1, alpha=0.2).path
    fp8 = load_dit(base_file, torch.bfloat16, weight_dtype=FP8)
    bf16 = load_dit(base_file, torch.bfloat16)
    layers = {n: m for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    before = {n: (m.fp8_weight.float() * m.scale_weight, m.scale_weight.clone(), m.fp8_weight.clone())
              for n, m in layers.items()}
    with torch.no_grad():
        gap_base = rel_l2(fp8(*inputs()), bf16(*inputs()))
    apply_loras(fp8, [LoraSpec(lora, 1.0)])
    apply_loras(bf16, [LoraSpec(lora, 1.0)])

    kept = []
    for name, layer in layers.items():
        old_value, old_scale, _ = before[name]
        scale = layer.scale_weight
        assert layer.weight.dtype == torch.uint8  # still held as fp8 bytes
        value, ref = layer.fp8_weight.float() * scale, bf16.get_submodule(name).weight.float()
        tol = (fp8_ulp(old_value / old_scale) * old_scale / 2 + fp8_ulp(torch.maximum(ref.abs(), value.abs()) / scale)
               * scale / 2 + 2.0**-8 * (ref.abs() + old_value.abs()))
        assert ((value - ref).abs() <= tol).all(), name
        if torch.equal(scale, old_scale):
            kept.append(name)
    assert len(kept) >= 0.8 * len(layers)  # the scale grows only where clipping would exceed fp8 rounding
    with torch.no_grad():
        assert rel_l2(fp8(*inputs()), bf16(*inputs())) <= 1.5 * gap_base

    # removing the LoRA gives back the stored fp8 bits wherever the layer kept its scale
    apply_loras(fp8, [LoraSpec(lora, 0.4)])
    apply_loras(fp8, [])
    same = sum((layers[n].weight == before[n][2].view(torch.uint8)).float().mean().item() for n in kept)
    assert same / len(kept) >= 0.98

    # unmerged on fp8: the fp8 weights stay as they are, the output is as close to bf16 as merged
    stored = {n: m.fp8_weight.clone() for n, m in layers.items()}
    apply_loras(fp8, [LoraSpec(lora, 1.0)], mode="unmerged")
    assert all(torch.equal(m.fp8_weight.view(torch.uint8), stored[n].view(torch.uint8)) for n, m in layers.items())
    with torch.no_grad():
        assert rel_l2(fp8(*inputs()), bf16(*inputs())) <= 1.5 * gap_base


def test_fp8_scale_grows_instead_of_clipping(base, base_file, tmp_path):
    """A LoRA that widens a layer's range (alpha/rank = 4: deltas near the weights' size): the layer
    scale grows, and the merged weight keeps its largest values (within one fp8 step of bf16)."""
    q = "blocks.0.self_attn.q"
    lora = write_tiny_lora(tmp_path / "l.safetensors", base, "comfy", rank=RANK, seed=1, alpha=4 * RANK,
                           targets=[q]).path
    fp8, bf16 = load_dit(base_file, torch.bfloat16, weight_dtype=FP8), load_dit(base_file, torch.bfloat16)
    old_scale = fp8.get_submodule(q).scale_weight.clone()
    apply_loras(fp8, [LoraSpec(lora, 1.0)])
    apply_loras(bf16, [LoraSpec(lora, 1.0)])
    layer, ref = fp8.get_submodule(q), bf16.get_submodule(q).weight.float()
    assert ref.abs().max() > 1.1 * 448 * old_scale  # the old scale could not hold the merged range
    assert layer.scale_weight > old_scale
    value = layer.fp8_weight.float() * layer.scale_weight
    assert ((value - ref).abs() <= fp8_ulp(ref.abs().max() / layer.scale_weight) * layer.scale_weight).all()


# ---------------------------------------------------------------------------------------------
# Loaders: state dicts and row ranges (FSDP shards)


def merge_into_state_dict(state_dict: dict[str, torch.Tensor], specs: list[LoraSpec]) -> tuple[LoraReport, ...]:
    """Merge `specs` into a state dict in official names, in place (scaled fp8 entries with their
    `.scale_weight` included), with the pieces the ranks merge their rows with (lora_deltas, remerge)."""
    shapes = {n: t.shape for n, t in state_dict.items() if not n.endswith(SCALE_SUFFIXES)}
    deltas, reports = lora_deltas(specs, shapes)
    for name in deltas.names:
        scale_name = f"{name.rpartition('.')[0]}.scale_weight"
        scale = state_dict.get(scale_name) if state_dict[name].dtype == FP8 else None
        state_dict[name], scale = remerge(state_dict[name], name, None, deltas, scale)
        if scale is not None:
            state_dict[scale_name] = scale
    return reports


def test_state_dict_and_row_merges_equal_the_model_merge(base, base_file, tmp_path):
    lora = write_tiny_lora(tmp_path / "l.safetensors", base, "lightx2v", rank=RANK, seed=1).path
    model = copy.deepcopy(base)
    apply_loras(model, [LoraSpec(lora, 0.6)])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    merge_into_state_dict(state, [LoraSpec(lora, 0.6)])
    for name, w in model.state_dict().items():
        assert torch.equal(state[name], w), name

    # row ranges as FSDP ranks hold them (ceil split over 3 ranks): same delta as the whole tensor
    deltas, _ = lora_deltas([LoraSpec(lora, 0.6)], {n: p.shape for n, p in base.named_parameters()})
    for name in deltas.names:
        whole = deltas.add_to(torch.zeros(base.get_parameter(name).shape), name)
        per_rank = math.ceil(whole.shape[0] / 3)
        rows = [deltas.add_to(torch.zeros_like(whole[s:s + per_rank]), name, start=s)
                for s in range(0, whole.shape[0], per_rank)]
        torch.testing.assert_close(torch.cat(rows), whole, rtol=1e-6, atol=1e-7)

    # a scaled-fp8 state dict merges as the fp8 model does
    fp8 = load_dit(base_file, torch.bfloat16, weight_dtype=FP8)
    fp8_state = {k: v.clone() for k, v in fp8.state_dict().items()}
    apply_loras(fp8, [LoraSpec(lora, 0.6)])
    merge_into_state_dict(fp8_state, [LoraSpec(lora, 0.6)])
    for name, w in fp8.state_dict().items():
        assert torch.equal(fp8_state[name].view(torch.uint8) if w.dtype == FP8 else fp8_state[name],
                           w.view(torch.uint8) if w.dtype == FP8 else w), name


# ---------------------------------------------------------------------------------------------
# Reports and errors


def with_extra(path, extra):
    tensors = load_file(str(path))
    tensors.update(extra)
    save_file(tensors, str(path))
    return path


def test_unknown_and_unmatched_keys_are_reported(base, tmp_path, caplog):
    path = write_tiny_lora(tmp_path / "i2v.safetensors", base, "comfy", rank=RANK).path
    extra = {
        "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(RANK, 64),
        "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(64, RANK),
        "diffusion_model.blocks.0.cross_attn.norm_k_img.diff": torch.zeros(64),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 8),
        "diffusion_model.blocks.0.something_else": torch.zeros(2),
    }
    with_extra(path, extra)
    model = copy.deepcopy(base)
    with caplog.at_level("WARNING", logger="wan22_core.lora"):
        (report,) = apply_loras(model, [LoraSpec(path, 1.0)])
    assert sorted(report.unmatched) == sorted(extra)
    assert report.parameters == len(block_linear_names(base))
    assert "image-to-video" in report.hint
    assert f"{len(extra)} tensors unmatched" in str(report) and "k_img" in str(report)
    assert any("unmatched" in r.getMessage() for r in caplog.records)


def i2v_only(path, base):
    save_file({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(RANK, 64),
               "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(64, RANK),
               "diffusion_model.img_emb.proj.1.lora_down.weight": torch.zeros(RANK, 64),
               "diffusion_model.img_emb.proj.1.lora_up.weight": torch.zeros(64, RANK)}, str(path))


def flux(path, base):
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(RANK, 64),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(192, RANK)}, str(path))


def full_model(path, base):
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path),
              metadata={NUM_HEADS_KEY: str(TINY.dit.num_heads)})


def dora(path, base):
    write_tiny_lora(path, base, "comfy", rank=RANK)
    with_extra(path, {"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(64, 1)})


def loha(path, base):
    save_file({"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(64, RANK),
               "lora_unet_blocks_0_self_attn_q.hada_w1_b": torch.zeros(RANK, 64)}, str(path))


@pytest.mark.parametrize("make, message", [
    (i2v_only, r"i2v\.safetensors matches nothing .*image-to-video"),
    (flux, r"matches nothing .*'double_blocks' belong to another model family"),
    (full_model, r"is a full model: a Wan DiT expert"),
    (dora, r"is a DoRA"),
    (loha, r"LoHa/LoKr"),
], ids=["i2v", "flux", "full-model", "dora", "loha"])
def test_a_lora_that_cannot_apply_says_what_it_is(base, tmp_path, make, message):
    path = tmp_path / ("i2v.safetensors" if make is i2v_only else "x.safetensors")
    make(path, base)
    good = write_tiny_lora(tmp_path / "good.safetensors", base, "comfy", rank=RANK).path
    model = copy.deepcopy(base)
    with pytest.raises(LoraError, match=message):
        apply_loras(model, [LoraSpec(good, 1.0), LoraSpec(path, 1.0)])
    for name, w in model.state_dict().items():  # every file is checked before any weight changes
        assert torch.equal(w, base.state_dict()[name]), name


@pytest.mark.parametrize("dim, heads, guess", [(96, 4, ""), (3072, 24, "Wan2.2 TI2V-5B")])
def test_a_lora_for_another_model_size_is_a_shape_error(base, tmp_path, dim, heads, guess):
    with torch.device("meta"):
        other = WanModel(DiTConfig(dim=dim, ffn_dim=2 * dim, num_heads=heads, num_layers=1, text_dim=32, freq_dim=32))
    path = write_tiny_lora(tmp_path / "other.safetensors", other, "comfy", rank=1,
                           targets=["blocks.0.self_attn.q"]).path
    with pytest.raises(LoraError, match=rf"blocks\.0\.self_attn\.q\.weight is \[64, 64\] here, the LoRA has a "
                                        rf"{dim} x {dim} update.*{guess}"):
        apply_loras(copy.deepcopy(base), [LoraSpec(path, 1.0)])


def test_missing_file_and_bad_mode_are_clear_errors(base, tmp_path):
    with pytest.raises(LoraError, match="LoRA file not found: .*nope.safetensors"):
        apply_loras(copy.deepcopy(base), [LoraSpec(tmp_path / "nope.safetensors")])
    with pytest.raises(ValueError, match="mode must be one of merge, unmerged; got 'fused'"):
        apply_loras(copy.deepcopy(base), [], mode="fused")
    with pytest.raises(TypeError, match="apply_loras takes LoraSpec items, got str"):
        apply_loras(copy.deepcopy(base), ["style.safetensors"])


def test_lora_spec_parses_file_and_strength():
    assert LoraSpec.parse("loras/high.safetensors") == LoraSpec("loras/high.safetensors", 1.0)
    assert LoraSpec.parse("loras/high.safetensors:0.5") == LoraSpec("loras/high.safetensors", 0.5)
    assert LoraSpec.parse(r"C:\loras\high.safetensors").path.name.endswith("high.safetensors")
    assert LoraSpec.parse(r"C:\loras\high.safetensors:-1").strength == -1.0
    with pytest.raises(ValueError, match="strength for high.safetensors must be a finite number"):
        LoraSpec.parse("high.safetensors:nan")
