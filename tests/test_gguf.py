"""GGUF experts and text encoders end to end: reading ComfyUI-GGUF's layout, refusing wrong files in
one line, weights held quantised, latents against the fp32 model and the dequantised model, block
swap, LoRA, compile, the tokenizer rebuilt from the metadata, make-tiny and generate."""
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fakes import dit_tensors, rewrite_gguf
from procs import start_torchrun_generate
from gguf import GGUFValueType
from reference import rel_l2
from safetensors.torch import save_file

from wan22_core.checkpoints import (DIT, TEXT_ENCODER, Checkpoint, CheckpointError, ModelFiles, check_slot, load_dit,
                                    load_text_encoder)
from wan22_core.cli import main
from wan22_core.config import TINY, DiTConfig, SamplerSettings
from wan22_core.lora import LoraError, LoraSpec, apply_loras
from wan22_core.models.tokenizer import Tokenizer
from wan22_core.models.transformer import WanModel
from wan22_core.pipeline import denoise, make_noise
from wan22_core.placement import ExpertPair
from wan22_core.quant import GGUFLinear, GGUFWeight, dequantize
from wan22_core.quant.gguf_quantize import quantize
from wan22_core.tiny import (GGUF_FILES, GGUF_FLATTENED, make_tiny, tiny_config, tiny_set, write_gguf_dit,
                             write_tiny_lora)

SETTINGS = SamplerSettings(steps=3)  # shift 12: timesteps 999, 923 (high), 857 (low): both experts run
PROMPT, NEGATIVE = "a red fox in snow", "blurry"
CPU = torch.device("cpu")
K_QUANT_CFG = tiny_config(dim=256, ffn_dim=256)  # K-quant rows are 256 weights


@pytest.fixture(scope="module")
def sets(tmp_path_factory, tiny_model_dir):
    """The seed-0 tiny model as GGUF Q8_0 (TINY) and Q4_K (dim 256), beside the official fp32 set."""
    root = tmp_path_factory.mktemp("gguf")
    return {"official": ModelFiles.from_model_dir(tiny_model_dir),
            "Q8_0": ModelFiles.from_model_dir(make_tiny(root / "q8", "gguf", TINY, seed=0, quant="Q8_0")),
            "Q4_K": ModelFiles.from_model_dir(make_tiny(root / "q4k", "gguf", K_QUANT_CFG, seed=0, quant="Q4_K"))}


@pytest.fixture(scope="module")
def embeds(sets):
    encoder = load_text_encoder(sets["official"].text_encoder, sets["official"].tokenizer, dtype=torch.float32)
    return encoder.encode_prompt(PROMPT, NEGATIVE)


def run(high, low, embeds, seed=5, **pair):
    return denoise(ExpertPair(high, low, CPU, **pair), embeds.positive, embeds.negative,
                   make_noise(seed, 5, 16, 32), SETTINGS)


def experts(files: ModelFiles, **kwargs):
    return [load_dit(path, torch.float32, **kwargs) for path in (files.high_noise, files.low_noise)]


def dequantised_safetensors(path: Path, out: Path) -> Path:
    """The GGUF expert's weights dequantised once to fp32, written as a plain safetensors file."""
    ckpt = Checkpoint(path)
    state = {name: (t.dequantize() if isinstance(t, GGUFWeight) else t.float()).contiguous()
             for name, t in ckpt.read(list(ckpt.entries))}
    save_file(state, str(out), metadata={"num_heads": str(ckpt.num_heads)})
    return out


# ---------------------------------------------------------------------------------------------
# Reading the converter's layout


def test_the_layout_is_read_as_comfyui_gguf_writes_it(sets):
    ckpt = Checkpoint(sets["Q8_0"].high_noise)
    entries = ckpt.entries
    assert ckpt.gguf.architecture == "wan" and ckpt.num_heads == TINY.dit.num_heads
    q = entries["blocks.0.self_attn.q.weight"]
    assert (q.qtype.name, q.dtype, q.shape, q.nbytes) == ("Q8_0", torch.uint8, (64, 64), 64 * 64 // 32 * 34)
    patch = entries["patch_embedding.weight"]  # 5-D, F32, as fix_5d_tensors.py writes it
    assert (patch.qtype.name, patch.shape) == ("F32", (64, 16, 1, 2, 2))
    assert entries["blocks.0.modulation"].qtype.name == "F32" and entries["head.head.weight"].qtype.name == "F16"
    flat = entries[GGUF_FLATTENED]  # stored (8, 256) with its real shape in comfy.gguf.orig_shape
    assert flat.shape == (64, 32) and ckpt.gguf.get("comfy.gguf.orig_shape." + GGUF_FLATTENED) == [64, 32]
    stored = {t.name: t for t in gguf.GGUFReader(ckpt.path).tensors}[GGUF_FLATTENED]
    assert stored.shape.tolist() == [256, 8]  # ggml order: (8, 256) in torch's
    (_, weight), = ckpt.read([GGUF_FLATTENED])  # the seeded weights the set was written from, in F16
    assert torch.equal(weight.float(), tiny_set(TINY, 0).high[GGUF_FLATTENED].half().float())


def test_names_with_the_comfyui_prefix_and_no_architecture_load_the_same(sets, tmp_path):
    """Files of other tools: `model.diffusion_model.` names, no general.architecture (names decide)."""
    path = rewrite_gguf(sets["Q8_0"].high_noise, tmp_path / "prefixed.gguf",
                        rename=lambda n: "model.diffusion_model." + n, arch=None)
    ours, plain = load_dit(path), load_dit(sets["Q8_0"].high_noise)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))


def test_mixed_types_per_tensor_each_layer_its_own(sets, tmp_path):
    """A Q4_K_M file holds Q4_K and Q6_K Linears: each GGUFLinear takes its tensor's type."""
    src = Checkpoint(sets["Q4_K"].high_noise)
    v_weight = "blocks.0.self_attn.v.weight"
    (_, weight), = src.read([v_weight])
    q6 = quantize(weight.dequantize(), "Q6_K").numpy()
    path = rewrite_gguf(src.path, tmp_path / "mixed.gguf", tensors={v_weight: (q6, gguf.GGMLQuantizationType.Q6_K)})
    model = load_dit(path)
    types = {name: m.qtype.name for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert types.pop("blocks.0.self_attn.v") == "Q6_K" and set(types.values()) == {"Q4_K"}
    assert "Q4_K/Q6_K" in str(model.load_report)
    expected = dequantize(torch.from_numpy(q6), "Q6_K", (256, 256))
    x = torch.randn(3, 256)
    layer = model.blocks[0].self_attn.v
    assert torch.equal(layer(x), torch.nn.functional.linear(x, expected, layer.bias))


# ---------------------------------------------------------------------------------------------
# Wrong files: one line, what the file is and what to use, before any tensor is read


def write(path: Path, arch: str, tensors: dict) -> Path:
    writer = gguf.GGUFWriter(path=None, arch=arch)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def flux(tmp: Path) -> Path:
    q8 = gguf.quants.quantize(np.ones((64, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    return write(tmp / "flux1-dev-Q8_0.gguf", "flux", {"double_blocks.0.img_attn.qkv.weight":
                                                       (q8, gguf.GGMLQuantizationType.Q8_0)})


def i2v(tmp: Path) -> Path:
    cfg = DiTConfig(in_dim=36, dim=64, ffn_dim=128, num_heads=4, num_layers=1, text_dim=32, freq_dim=32)
    path = tmp / "Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf"
    write_gguf_dit(path, dit_tensors(cfg), cfg, "Q8_0")
    return path


def truncated(tmp: Path, src: Path) -> Path:
    data = src.read_bytes()
    (tmp / "cut.gguf").write_bytes(data[:len(data) // 2])
    return tmp / "cut.gguf"


def orig_shape(tmp: Path, src: Path, value, kind) -> Path:
    key = "comfy.gguf.orig_shape." + GGUF_FLATTENED
    return rewrite_gguf(src, tmp / "edited.gguf", metadata={key: (value, GGUFValueType.ARRAY, kind)})


def unsupported(tmp: Path) -> Path:
    return write(tmp / "iq.gguf", "wan", {"blocks.0.ffn.0.weight": (np.zeros((4, 136), np.uint8),
                                                                    gguf.GGMLQuantizationType.IQ4_XS)})


def unfinished(tmp: Path, src: Path) -> Path:
    return rewrite_gguf(src, tmp / "unfinished.gguf", rename=lambda n: "_" + n if n.startswith("patch_") else n)


WRONG = {  # case -> (file, slot, what the message must say)
    "expert in the text encoder slot": (lambda t, s: s["Q8_0"].high_noise, TEXT_ENCODER,
                                        r"is a Wan DiT expert \(dim 64.*Q8_0/F16/F32\), but the UMT5-XXL text encoder "
                                        r"slot needs .*umt5-xxl-encoder-<quant>.gguf\): that file belongs in the Wan"),
    "encoder in the expert slot": (lambda t, s: s["Q8_0"].text_encoder, DIT,
                                   r"is a UMT5-XXL text encoder \(vocab 256, dim 32, Q8_0/F32, with tokenizer\), but "
                                   r"the Wan DiT expert slot needs .*: that file belongs in the UMT5-XXL"),
    "truncated": (lambda t, s: truncated(t, s["Q8_0"].high_noise), DIT,
                  r"^cut.gguf is a truncated or damaged GGUF file \(ValueError: .*\); download it again$"),
    "not a GGUF": (lambda t, s: t / "x.gguf" if (t / "x.gguf").write_bytes(b"<html>404</html>") else None, DIT,
                   r"x.gguf is not a GGUF file \(it does not start with the GGUF magic\).*download it again"),
    "Flux": (lambda t, s: flux(t), DIT, r"flux1-dev-Q8_0.gguf is a GGUF flux model \(general.architecture 'flux'\), "
                                        r"not Wan .* needs a Wan2.2 T2V-A14B expert"),
    "I2V expert": (lambda t, s: i2v(t), DIT, r"is a Wan image-to-video expert \(in_dim 36.*Q8_0/F16/F32\).*"
                                             r"use the Wan2.2 T2V-A14B experts"),
    "orig_shape of another size": (lambda t, s: orig_shape(t, s["Q8_0"].high_noise, [64, 33], GGUFValueType.INT32),
                                   DIT, r"edited.gguf: its metadata comfy.gguf.orig_shape.text_embedding.0.weight says "
                                        r"shape \[64, 33\] \(2112 weights\) but the tensor holds 2048 .*convert it"),
    "orig_shape not INT32": (lambda t, s: orig_shape(t, s["Q8_0"].high_noise, [64.0, 32.0], GGUFValueType.FLOAT32),
                             DIT, r"is \[64.0, 32.0\] \(FLOAT32 array\), not the INT32 array .* download it again"),
    "unsupported type": (lambda t, s: unsupported(t), DIT, r"iq.gguf: tensor blocks.0.ffn.0.weight: GGUF tensor type "
                                                           r"IQ4_XS \(23\) is not supported .*use a file quantised"),
    "unfinished conversion": (lambda t, s: unfinished(t, s["Q8_0"].high_noise), DIT,
                              r"is an unfinished GGUF conversion of a Wan DiT .*fix_5d_tensors.py adds it back"),
}


@pytest.mark.parametrize("case", WRONG)
def test_wrong_gguf_files_fail_in_one_line_naming_the_file_and_the_fix(case, sets, tmp_path, monkeypatch):
    make, slot, message = WRONG[case]
    path = make(tmp_path, sets)
    read = []
    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: read.append(a) or iter(()))  # nothing heavy loads
    with pytest.raises(CheckpointError, match=message) as err:
        check_slot(path, slot)
    assert "\n" not in str(err.value) and not read


def test_a_gguf_encoder_without_a_tokenizer_asks_for_one_and_takes_a_folder(sets, tmp_path, tiny_model_dir):
    path = rewrite_gguf(sets["Q8_0"].text_encoder, tmp_path / "no-tokenizer.gguf", arch="t5encoder",
                        drop=[k for k in gguf.GGUFReader(sets["Q8_0"].text_encoder).fields if k.startswith("tokenizer.")])
    with pytest.raises(CheckpointError, match="without a tokenizer in its metadata .*folder holding spiece.model"):
        load_text_encoder(path)
    encoder = load_text_encoder(path, tokenizer_dir=sets["official"].tokenizer)
    assert encoder.tokenizer.ids(PROMPT) == Tokenizer.from_folder(sets["official"].tokenizer).ids(PROMPT)


def test_weight_dtype_fp8_is_refused_for_gguf_and_the_compute_dtype_dequantises(sets):
    with pytest.raises(ValueError, match=r"is a GGUF expert: its block weights stay in their GGUF types \(Q8_0/F16/"
                                         r"F32\); weight_dtype fp8 does not apply, choose auto"):
        load_dit(sets["Q8_0"].high_noise, torch.bfloat16, weight_dtype=torch.float8_e4m3fn)
    dense = load_dit(sets["Q8_0"].high_noise, torch.bfloat16, weight_dtype=torch.bfloat16)
    assert not any(isinstance(m, GGUFLinear) for m in dense.modules()) and dense.blocks[0].ffn[0].weight.dtype == \
        torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Held quantised, computing exactly what is stored


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K"])
def test_held_expert_bytes_are_the_quantised_bytes(sets, quant):
    path = sets[quant].high_noise
    model, entries = load_dit(path), Checkpoint(path).entries
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert len(layers) == 10 * model.cfg.num_layers  # every block Linear
    for name, layer in layers.items():
        entry = entries[f"{name}.weight"]
        assert layer.weight.dtype == torch.uint8 and layer.qtype.name == quant
        assert layer.weight.nbytes == entry.nbytes == layer.qtype.nbytes(layer.in_features * layer.out_features)
    held = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    block_weights = sum(layer.weight.nbytes for layer in layers.values())
    dense = sum(t.nbytes for t in (*WanModel(model.cfg).parameters(), *WanModel(model.cfg).buffers()))
    linear_numbers = sum(layer.in_features * layer.out_features for layer in layers.values())
    assert held == dense - 4 * linear_numbers + block_weights  # only the block Linears shrank, to their file bytes
    report = model.load_report
    assert report.bytes == held and report.gguf_layers == len(layers) and report.gguf_types == quant
    assert report.parameters == sum(p.numel() for p in WanModel(model.cfg).parameters())
    assert f"{len(layers)} Linears held as GGUF {quant}" in str(report)
    pair = ExpertPair(model, load_dit(sets[quant].low_noise), CPU, keep_both=False)
    pair.get("high")  # placed on the compute device: still the bytes
    assert all(layer.weight.dtype == torch.uint8 for layer in layers.values())


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K"])
def test_gguf_latents_equal_the_model_dequantised_once_as_safetensors(sets, embeds, quant, tmp_path):
    """The quantised path computes exactly what it stores: GGUFLinear's per-forward dequantisation
    gives the weights a plain fp32 model loaded from those values holds. Measured max |diff| 0.0."""
    files = sets[quant]
    dense = [load_dit(dequantised_safetensors(p, tmp_path / f"{p.stem}.safetensors"))
             for p in (files.high_noise, files.low_noise)]
    assert not any(isinstance(m, GGUFLinear) for m in dense[0].modules())
    ours = run(*experts(files), embeds)
    assert (ours - run(*dense, embeds)).abs().max() <= 1e-6


def test_q8_0_latents_are_within_one_q8_0_rounding_of_the_fp32_models(sets, embeds):
    """Tolerance: what Q8_0 rounding does to the fp32 model's latents themselves (blocks of 32, one
    fp16 scale each: rel. L2 5.3e-3 here). Each block Linear's weights carry that same relative
    rounding (measured 3.8e-3; the F16 tensors 2.2e-4), and the 3-step run does not amplify it:
    measured rel. L2 3.7e-4 between the Q8_0 and fp32 latents, 14x inside the bound. A wrong
    dequantisation or a missed orig_shape is O(1)."""
    fp32 = run(*experts(sets["official"]), embeds)
    q8_0 = run(*experts(sets["Q8_0"]), embeds)
    flat = fp32.reshape(-1, 32)
    tolerance = rel_l2(dequantize(quantize(flat, "Q8_0"), "Q8_0", flat.shape).reshape(fp32.shape), fp32)
    assert 0 < rel_l2(q8_0, fp32) <= tolerance, (rel_l2(q8_0, fp32), tolerance)


def test_the_gguf_text_encoder_tokenises_identically_and_embeds_within_q8_0(sets, embeds):
    """The SentencePiece model rebuilt from tokenizer.ggml.* (precompiled_charsmap included) gives
    the spiece.model's ids on plain, full-width, ligature and Chinese text and extra spaces. The Q8_0
    encoder (every 2-D weight, the embedding table too, in rows of one 32-weight block) embeds
    within 0.05 rel. L2 of the bf16 file's: measured 0.012 (positive) and 0.016 (negative) on the
    2-layer tiny encoder; a wrong name map or dequantisation is O(1)."""
    original = Tokenizer.from_folder(sets["official"].tokenizer)
    encoder = load_text_encoder(sets["Q8_0"].text_encoder, dtype=torch.float32)
    for text in (PROMPT, "Ｆｕｌｌ－ｗｉｄｔｈ ＦＯＸ ①②", "a ﬁne ﬂuffy cat", "色调艳丽，过曝", "  two   spaces\tand tab "):
        assert encoder.tokenizer.ids(text) == original.ids(text), text
    assert original.ids("Ｆｕｌｌ") == original.ids("Full")  # the charsmap matters: it folds full-width forms
    gguf_embeds = encoder.encode_prompt(PROMPT, NEGATIVE)
    assert rel_l2(gguf_embeds.positive, embeds.positive) < 0.05
    assert rel_l2(gguf_embeds.negative, embeds.negative) < 0.05
    report = encoder.load_report
    assert (report.layout, report.file_dtypes) == ("gguf", "Q8_0/F32") and "with tokenizer" not in report.path


# ---------------------------------------------------------------------------------------------
# Offload, LoRA, compile


def test_block_swap_moves_the_quantised_bytes_and_samples_the_same(sets, embeds):
    high, low = experts(sets["Q8_0"])
    whole = run(high, low, embeds, keep_both=True)
    pair = ExpertPair(high, low, CPU, swap_blocks=1)
    pair.get("high")
    host = pair._swap.host[pair._swap.swapped[0]]
    moved = {t.dtype for _, t in host}
    assert torch.uint8 in moved  # the streamed block's masters are the GGUF bytes
    pair.offload_all()
    swapped = run(high, low, embeds, swap_blocks=1)
    assert torch.equal(swapped, whole)


def test_lora_on_gguf_experts_runs_unmerged_in_both_modes_and_a_strength_change_reads_nothing(
        sets, embeds, tmp_path, monkeypatch):
    """Reference: the same weights dequantised (plain fp32 Linears) with the LoRA's low-rank branch
    (unmerged): identical math, so equal within 1e-6 (measured 0.0). The lightx2v layout also has
    bias, norm and modulation deltas: plain floats, merged."""
    with torch.device("meta"):
        meta = WanModel(TINY.dit)
    lora = write_tiny_lora(tmp_path / "lightx2v.safetensors", meta, "lightx2v", seed=1).path
    files = sets["Q8_0"]
    dense = [load_dit(p, torch.float32, weight_dtype=torch.float32) for p in (files.high_noise, files.low_noise)]
    for model in dense:
        apply_loras(model, [LoraSpec(lora, 0.7)], "unmerged")
    expected = run(*dense, embeds)
    for mode in ("merge", "unmerged"):
        high, low = experts(files)
        for model in (high, low):
            apply_loras(model, [LoraSpec(lora, 0.7)], mode)
            assert all(layer.weight.dtype == torch.uint8 and hasattr(layer, "lora_branch")
                       for layer in model.modules() if isinstance(layer, GGUFLinear))
        assert (run(high, low, embeds) - expected).abs().max() <= 1e-6, mode
    reads = []
    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: reads.append(a[0].path) or iter(()))
    for model in (high, low):
        apply_loras(model, [LoraSpec(lora, 0.3)], "merge")  # the bound LoRA is reused: no file is read
    assert reads == []
    monkeypatch.undo()
    for model in dense:
        apply_loras(model, [LoraSpec(lora, 0.3)], "unmerged")
    assert (run(high, low, embeds) - run(*dense, embeds)).abs().max() <= 1e-6


def test_a_full_delta_for_a_gguf_weight_is_refused_before_anything_changes(sets, tmp_path):
    model = load_dit(sets["Q8_0"].high_noise)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.0.diff": torch.ones(128, 64),
               "diffusion_model.blocks.0.ffn.0.diff_b": torch.ones(128)}, str(path))
    with pytest.raises(LoraError, match=r"diff.safetensors has a full delta \(.diff\) for blocks.0.ffn.0.weight, which "
                                        r"this expert holds as GGUF Q8_0 blocks.*use a low-rank LoRA"):
        apply_loras(model, [LoraSpec(path)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compile_puts_the_dequantisation_inside_the_compiled_block(sets, embeds):
    """torch.compile of a GGUF block on the CPU: no graph break (the dequantisation is part of the
    compiled graph) and the same numbers as eager (measured rel. L2 ~1e-7, as for dense blocks)."""
    from torch._dynamo.utils import counters

    from wan22_core.optimize import compile_blocks

    model = load_dit(sets["Q8_0"].high_noise)
    x, t = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0])
    context = embeds.positive[None]
    with torch.no_grad():
        eager = model(x, t, context)
        torch._dynamo.reset()
        counters.clear()
        assert compile_blocks(model, CPU) is None
        compiled = model(x, t, context)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert rel_l2(compiled, eager) <= 1e-5


def test_a_lora_added_to_compiled_gguf_blocks_after_they_ran_is_applied(sets, embeds, tmp_path):
    """GGUF layers run LoRAs on the fly, as forward hooks. A hook added (or changed) after a block
    was compiled and ran must reach the compiled block: without hook guards dynamo kept the old
    graph and the output ignored the LoRA (measured: 2.7e-2 from eager here; 1.6e-2 on the final
    latents of a 4-step run that the LoRA moves by 1.2e-1). Compiled equals eager before, with and
    after a strength change (measured ~3e-7)."""
    from wan22_core.optimize import compile_blocks

    with torch.device("meta"):
        meta = WanModel(TINY.dit)
    lora = write_tiny_lora(tmp_path / "lightx2v.safetensors", meta, "lightx2v", seed=1).path
    x, t = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0])
    context = embeds.positive[None]
    eager, compiled = (load_dit(sets["Q8_0"].high_noise) for _ in range(2))
    assert compile_blocks(compiled, CPU) is None
    with torch.no_grad():
        before = compiled(x, t, context)  # compiled and run without a LoRA
        assert rel_l2(before, eager(x, t, context)) <= 1e-5
        for strength in (0.8, -1.5):
            for model in (eager, compiled):
                apply_loras(model, [LoraSpec(lora, strength)])
            expected = eager(x, t, context)
            assert rel_l2(expected, before) > 1e-2  # the LoRA moves the output
            assert rel_l2(compiled(x, t, context), expected) <= 1e-5


# ---------------------------------------------------------------------------------------------
# make-tiny and generate


def test_make_tiny_writes_gguf_sets_and_generate_runs_them_by_content(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "g"), "--format", "gguf", "--quant", "Q5_K", "--dim", "256",
                 "--ffn-dim", "256"]) == 0
    assert "wrote a tiny gguf Q5_K model set" in capsys.readouterr().out
    root = tmp_path / "g"
    (root / "unet").mkdir()  # ComfyUI's legacy folders, where ComfyUI-GGUF users keep .gguf files
    shutil.move(root / "text_encoders", root / "clip")
    for name in GGUF_FILES[:2]:
        shutil.move(root / "diffusion_models" / name.format(quant="Q5_K"), root / "unet")
    files = ModelFiles.from_model_dir(root)
    assert (files.high_noise.parent.name, files.text_encoder.parent.name) == ("unet", "clip")
    assert {m.qtype.name for m in load_dit(files.low_noise).modules() if isinstance(m, GGUFLinear)} == {"Q5_K"}
    video = tmp_path / "v.mp4"
    assert main(["generate", "--model-dir", str(root), "--width", "32", "--height", "16", "--frames", "5",
                 "--steps", "2", "--output", str(video), "--device", "cpu", "--quiet"]) == 0
    assert video.is_file()  # --high-noise x.gguf etc. take the same path: ModelFiles.check, then load_dit


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf", "--quant", "Q4_K"], r"Q4_K stores each row in blocks of 256 weights: --dim and --ffn-dim "
                                              r"must be multiples of 256 \(got 64 and 128\)"),
    (["--format", "comfy", "--quant", "Q8_0"], r"--quant Q8_0 applies to --format gguf only"),
])
def test_make_tiny_refuses_quants_that_cannot_be_written(tmp_path, capsys, args, message):
    assert main(["make-tiny", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()  # nothing half-written


# ---------------------------------------------------------------------------------------------
# torchrun: 2 gloo ranks with GGUF experts


def test_torchrun_with_gguf_experts_matches_single_process(sets, tmp_path):
    """`generate --model-dir <GGUF ComfyUI folder>` under torchrun (2 ranks, Ulysses 2, FSDP) against
    the one-process CLI on the same files; tolerance as for every parallel path (1e-5 rel. L2, fp32)."""
    from safetensors.torch import load_file

    root = sets["Q8_0"].high_noise.parents[1]
    common = ["generate", "--model-dir", str(root), "--frames", "9", "--height", "48", "--width", "48",
              "--steps", "4", "--shift", "5", "--quiet", "--device", "cpu"]
    torchrun = start_torchrun_generate([*common, "--ulysses", "2", "--fsdp", "--output", str(tmp_path / "two.mp4"),
                                        "--save-latents", str(tmp_path / "two.st")], cwd=tmp_path)
    assert main(common + ["--output", str(tmp_path / "one.mp4"), "--save-latents", str(tmp_path / "one.st")]) == 0
    output = torchrun.communicate(timeout=300)[0]
    assert torchrun.returncode == 0, output
    two, one = load_file(tmp_path / "two.st")["latents"], load_file(tmp_path / "one.st")["latents"]
    assert rel_l2(two, one) <= 1e-5
