"""Checkpoint layouts: official, ComfyUI (bare, prefixed, scaled fp8) and diffusers; wrong files,
broken files, memory-lean and shard-aware reading."""
import json
import math
from pathlib import Path

import pytest
import torch
from fakes import save_dit
from reference import rel_l2
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wan22_core import checkpoints
from wan22_core.checkpoints import (DIT, TEXT_ENCODER, Checkpoint, CheckpointError, ModelFiles, check_slot,
                                    load_dit, load_text_encoder, load_vae, read_state_dict)
from wan22_core.checkpoints.keymaps import COMFY_DIT_PREFIX, vae_diffusers_to_official, vae_official_to_diffusers
from wan22_core.cli import main
from wan22_core.config import TINY, DiTConfig, SamplerSettings, VAEConfig
from wan22_core.fp8 import FP8, FP8Linear, dequantize_fp8, set_fp8_compute
from wan22_core.models.transformer import WanModel
from wan22_core.models.vae import WanVAE
from wan22_core.pipeline import denoise, make_noise
from wan22_core.placement import ExpertPair
from wan22_core.tiny import COMFY_FILES, COMFY_VAE_FILE, FORMATS, make_tiny, seeded, tiny_config

import bench_loading  # the peak-RSS measurement, shared with the benchmark (conftest puts benchmarks/ on the path)

# fp16 holds every layout's numbers exactly (official fp32/bf16, comfy fp16), so loading all
# of them as fp16 must give the same bits.
COMMON = torch.float16
SETTINGS = SamplerSettings(steps=3)  # shift 12: timesteps 999, 923 (high), 857 (low): both experts run
PROMPT, NEGATIVE = "a red fox in snow", "blurry"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same seeded tiny model in every layout, plus ComfyUI's prefixed variant (rewritten here)."""
    root = tmp_path_factory.mktemp("formats")
    made = {fmt: make_tiny(root / fmt, fmt, TINY, seed=0) for fmt in FORMATS}
    prefixed = root / "comfy-prefixed"
    (prefixed / "diffusion_models").mkdir(parents=True)
    for sub in ("text_encoders", "vae"):
        (prefixed / sub).symlink_to(made["comfy"] / sub)
    for name in COMFY_FILES["comfy"][:2]:
        source = made["comfy"] / "diffusion_models" / name
        with safe_open(str(source), "pt") as f:
            metadata = f.metadata()
        save_file({COMFY_DIT_PREFIX + k: v for k, v in load_file(str(source)).items()},
                  str(prefixed / "diffusion_models" / name), metadata=metadata)
    made["comfy-prefixed"] = prefixed
    return made


def load_set(folder, dtype=COMMON):
    files = ModelFiles.from_model_dir(folder)
    files.check()
    encoder = load_text_encoder(files.text_encoder, files.tokenizer, dtype=dtype)
    high, low = (load_dit(path, dtype) for path in (files.high_noise, files.low_noise))
    return encoder, high, low, load_vae(files.vae, dtype)


def run(encoder, high, low, seed=5):
    embeds = encoder.encode_prompt(PROMPT, NEGATIVE)
    return denoise(ExpertPair(high, low, torch.device("cpu")), embeds.positive, embeds.negative,
                   make_noise(seed, 5, 16, 32), SETTINGS)


@pytest.fixture(scope="module")
def reference(sets):
    encoder, high, low, vae = load_set(sets["official"])
    return {"modules": (encoder.model, high, low, vae), "latents": run(encoder, high, low)}


@pytest.mark.parametrize("layout", ["comfy", "comfy-prefixed", "diffusers"])
def test_every_layout_loads_the_same_bits_and_latents(sets, reference, layout):
    encoder, high, low, vae = load_set(sets[layout])
    for ours, ref in zip((encoder.model, high, low, vae), reference["modules"]):
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == COMMON and torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert torch.equal(run(encoder, high, low), reference["latents"])
    assert high.load_report.layout == layout


def test_load_report_says_what_was_loaded(sets):
    high = load_dit(sets["official"] / "high_noise_model", torch.bfloat16)
    report = high.load_report
    assert (report.kind, report.layout, report.file_dtypes, report.dtype) == (DIT, "official", "float32", "bfloat16")
    assert report.parameters == sum(p.numel() for p in WanModel(TINY.dit).parameters())
    assert report.bytes == 2 * report.parameters and report.unexpected == () and report.fp8_layers == 0
    assert "official layout, stored as float32" in str(report)


def test_unexpected_tensors_are_listed_missing_ones_are_errors(sets, tmp_path):
    sd = load_file(str(sets["comfy"] / "diffusion_models" / COMFY_FILES["comfy"][0]))
    extra = tmp_path / "extra.safetensors"
    save_file({**sd, "blocks.0.extra_norm.weight": torch.zeros(2), "mystery.weight": torch.zeros(2)}, str(extra),
              metadata={"num_heads": "4"})
    report = load_dit(extra).load_report
    assert report.unexpected == ("blocks.0.extra_norm.weight", "mystery.weight")
    assert "ignored 2 unexpected tensors: blocks.0.extra_norm.weight, mystery.weight" in str(report)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "blocks.1.cross_attn.k.weight"}, str(missing))
    with pytest.raises(CheckpointError, match="missing 1 tensors .*blocks.1.cross_attn.k.weight"):
        load_dit(missing)


# ---------------------------------------------------------------------------------------------
# fp8


@pytest.fixture(scope="module")
def fp8_set(sets):
    """comfy-fp8 experts and the official fp32 ones, with the official text embeddings (fp32)."""
    official = ModelFiles.from_model_dir(sets["official"])
    fp8 = ModelFiles.from_model_dir(sets["comfy-fp8"])
    embeds = load_text_encoder(official.text_encoder, official.tokenizer, dtype=torch.float32).encode_prompt(
        PROMPT, NEGATIVE)
    return {"embeds": embeds, "fp32": (load_dit(official.high_noise), load_dit(official.low_noise)),
            "fp8": (load_dit(fp8.high_noise), load_dit(fp8.low_noise)), "files": fp8}


def weight_error(fp8_model, full_model) -> float:
    """Largest relative (Frobenius) error of a dequantised fp8 weight against the fp32 original."""
    errors = [rel_l2(dequantize_fp8(m.weight, m.scale_weight, torch.float32), full_model.get_submodule(n).weight)
              for n, m in fp8_model.named_modules() if isinstance(m, FP8Linear)]
    return max(errors)


def test_comfy_fp8_latents_within_fp8_rounding(fp8_set):
    (high8, low8), (high, low), embeds = fp8_set["fp8"], fp8_set["fp32"], fp8_set["embeds"]
    assert high8.load_report.fp8_layers == 10 * TINY.dit.num_layers  # q, k, v, o x 2 attentions, ffn.0, ffn.2
    eps = max(weight_error(high8, high), weight_error(low8, low))
    # e4m3 keeps 3 mantissa bits: rounding moves a weight by up to 1/16 of itself, ~2.6% RMS here.
    assert 0.01 < eps < 0.04
    noise = make_noise(5, 5, 16, 32)
    reference = denoise(ExpertPair(high, low, torch.device("cpu")), embeds.positive, embeds.negative, noise, SETTINGS)
    latents = denoise(ExpertPair(high8, low8, torch.device("cpu")), embeds.positive, embeds.negative, noise, SETTINGS)
    # Each fp8 Linear's output is off by ~eps relative (its weight's error); the velocity adds
    # gated block outputs to an fp32 residual stream and the latents add sigma * velocity to the
    # fp32 noise, both of which shrink the relative error, so eps bounds the latent error.
    # Measured: 2.356e-3 (eps 2.6e-2). The rounding is deterministic (seeded weights, fp32 compute;
    # float reordering moves it by ~1e-4 of itself), so the band is +-6%: an fp8 path that also
    # rounds its activations to fp8 gives 5.4e-3, one that multiplies in bf16 2.59e-3, and fp16
    # rounding alone ~2e-4.
    assert 2.2e-3 < rel_l2(latents, reference) < 2.5e-3


def test_scaled_fp8_text_encoder_is_dequantized_at_load(sets, fp8_set):
    files = fp8_set["files"]
    encoder = load_text_encoder(files.text_encoder, dtype=torch.float32)
    stored = load_file(str(files.text_encoder))
    q = "encoder.block.0.layer.0.SelfAttention.q"
    assert torch.equal(encoder.model.state_dict()[f"{q}.weight"],
                       dequantize_fp8(stored[f"{q}.weight"], stored[f"{q}.scale_weight"], torch.float32))
    assert load_text_encoder(files.text_encoder).dtype == torch.bfloat16  # dtype=None: one dtype for all
    official = ModelFiles.from_model_dir(sets["official"])
    reference = load_text_encoder(official.text_encoder, official.tokenizer, dtype=torch.float32).model.state_dict()
    quantized = [k.removesuffix("scale_weight") + "weight" for k in stored if k.endswith(".scale_weight")]
    eps = max(rel_l2(encoder.model.state_dict()[n], reference[n]) for n in quantized)
    assert 0.01 < eps < 0.04  # e4m3 rounding, as for the DiT
    # Unlike the DiT's fp32 residual stream with small gated updates, every encoder sublayer
    # multiplies two or three fp8 matrices (q.k, v.o; wi_0 * wi_1, wo) into a residual of its own
    # size, so each adds up to ~3 eps. Measured: 4.3% with eps ~2.6%.
    positive = encoder.encode_prompt(PROMPT, NEGATIVE).positive
    assert 1e-3 < rel_l2(positive, fp8_set["embeds"].positive) < 3 * eps


def test_fp8_weights_take_half_the_bytes_of_bf16(sets):
    files = ModelFiles.from_model_dir(sets["comfy-fp8"])
    fp8, bf16 = load_dit(files.high_noise, torch.bfloat16), load_dit(files.high_noise, torch.bfloat16,
                                                                       weight_dtype=torch.bfloat16)

    def block_linear_bytes(model):
        return sum(t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]
                   if name.startswith("blocks.") and ".norm" not in name and "modulation" not in name)

    assert all(p.dtype == FP8 for n, p in fp8.named_parameters() if n.endswith(("attn.q.weight", "ffn.0.weight")))
    # weights halve; the biases stay bf16 and each layer adds a 4-byte scale
    assert block_linear_bytes(fp8) / block_linear_bytes(bf16) == pytest.approx(0.5, abs=0.05)
    # at A14B sizes blocks are >99% of the expert, so the whole expert halves too (tiny: head and
    # embeddings weigh more)
    assert fp8.load_report.bytes < 0.75 * bf16.load_report.bytes


def test_quantizing_at_load_equals_the_comfy_fp8_file(sets):
    quantized = load_dit(sets["official"] / "high_noise_model", COMMON, weight_dtype=FP8)
    stored = load_dit(sets["comfy-fp8"] / "diffusion_models" / COMFY_FILES["comfy-fp8"][0], COMMON)
    a, b = quantized.state_dict(), stored.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == FP8 else a[k],
                                                    b[k].view(torch.uint8) if b[k].dtype == FP8 else b[k]) for k in a)


def newer_comfy_fp8(source: Path, target: Path, metadata: dict[str, str]) -> Path:
    """`source` as newer ComfyUI writes it: `.weight_scale` plus a `.comfy_quant` tag per layer, no marker."""
    renamed = {}
    for name, tensor in load_file(str(source)).items():
        if name.endswith(".scale_weight"):
            layer = name.removesuffix(".scale_weight")
            renamed[layer + ".weight_scale"] = tensor
            renamed[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        elif name != "scaled_fp8":
            renamed[name] = tensor
    assert any(n.endswith(".weight_scale") for n in renamed)
    save_file(renamed, str(target), metadata=metadata)
    return target


def test_newer_comfy_fp8_names_load_the_same(sets, tmp_path):
    source = sets["comfy-fp8"] / "diffusion_models" / COMFY_FILES["comfy-fp8"][0]
    newer = newer_comfy_fp8(source, tmp_path / "newer.safetensors", {"num_heads": "4"})
    assert check_slot(newer, DIT)[1].scaled_fp8
    a, b = load_dit(source).state_dict(), load_dit(newer).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype == FP8
               else torch.equal(a[k], b[k]) for k in a)


def test_newer_comfy_fp8_text_encoder_loads_the_same(sets, tmp_path):
    source = sets["comfy-fp8"] / "text_encoders" / COMFY_FILES["comfy-fp8"][2]
    newer = newer_comfy_fp8(source, tmp_path / "newer_umt5.safetensors", {"format": "pt"})
    found = check_slot(newer, TEXT_ENCODER)[1]
    assert found.scaled_fp8 and "scaled fp8" in found.description
    a, b = load_text_encoder(source), load_text_encoder(newer)
    assert a.dtype == b.dtype == torch.bfloat16
    a, b = a.model.state_dict(), b.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dequantizing_at_load_equals_fp8_compute(fp8_set):
    high8 = fp8_set["fp8"][0]
    dequantized = load_dit(fp8_set["files"].high_noise, torch.float32, weight_dtype=torch.float32)
    assert not any(isinstance(m, FP8Linear) for m in dequantized.modules())
    x, t, context = make_noise(1, 5, 16, 32)[None], torch.tensor([900]), fp8_set["embeds"].positive[None]
    with torch.no_grad():
        assert torch.equal(dequantized(x, t, context), high8(x, t, context))


def test_scaled_mm_path_computes_what_it_should():
    """torch._scaled_mm (the sm_89+ GPU path; torch also runs it on CPU) against fp32 math on the
    same fp8 operands: only the bf16 output rounding may differ."""
    layer = FP8Linear(64, 32, bias=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=g).clamp(-40, 40).to(FP8))
        layer.scale_weight.fill_(0.01)
        layer.bias.copy_(torch.randn(32, generator=g))
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    assert set_fp8_compute(torch.nn.Sequential(layer), "scaled_mm") == 1
    out = layer(x)
    scale_in = x.float().abs().max() / 448
    x8 = (x / scale_in.to(x.dtype)).clamp(-448, 448).to(FP8)  # the per-tensor activation quantisation
    expected = (x8.float() * scale_in) @ (layer.weight.float() * 0.01).T + layer.bias.float()
    assert out.shape == (3, 5, 32) and out.dtype == torch.bfloat16
    assert rel_l2(out, expected) < 4e-3  # bf16 output rounding: 2^-9 relative per element
    layer.compute = "dequant"  # no activation rounding: fp32 math on the bf16 input and dequantised weight
    exact = x.float() @ (layer.weight.float() * 0.01).T + layer.bias.float()
    assert rel_l2(layer(x), exact) < 4e-3
    with pytest.raises(ValueError, match="fp8 compute mode must be one of"):
        set_fp8_compute(layer, "fast")


# ---------------------------------------------------------------------------------------------
# diffusers


@pytest.fixture
def diffusers_loadable(monkeypatch):
    """diffusers' from_pretrained needs `accelerate` to honour _keep_in_fp32_modules, which only
    matters for half-precision loads; we load fp32, so switch the list off instead."""
    from diffusers import WanTransformer3DModel

    monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)


def test_transformer_equals_diffusers_from_pretrained(sets, diffusers_loadable):
    from diffusers import WanTransformer3DModel

    folder = sets["diffusers"] / "transformer"
    reference, info = WanTransformer3DModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_dit(folder)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 16, 3, 6, 10, generator=g), torch.tensor([999, 631])
    context = torch.randn(2, 7, TINY.dit.text_dim, generator=g)
    with torch.no_grad():
        out = ours(x, t, context)
        padded = torch.nn.functional.pad(context, (0, 0, 0, TINY.dit.text_len - 7))  # diffusers does not pad
        expected = reference.eval()(x, t, padded, return_dict=False)[0]
    assert rel_l2(out, expected) <= 1e-5


def test_diffusers_folder_is_a_real_wan_pipeline(sets, diffusers_loadable):
    from diffusers import AutoencoderKLWan, WanPipeline

    pipe = WanPipeline.from_pretrained(sets["diffusers"])
    assert pipe.config.boundary_ratio == SamplerSettings().boundary == 0.875
    ours = load_text_encoder(sets["diffusers"] / "text_encoder")
    assert pipe.tokenizer(PROMPT).input_ids == ours.tokenizer.ids(PROMPT)
    _, info = AutoencoderKLWan.from_pretrained(sets["diffusers"] / "vae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_vae_names_match_diffusers_conversion():
    """Our table against diffusers' own official->diffusers converter, at the real VAE size."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        names = list(WanVAE(VAEConfig()).state_dict())
    theirs = convert_wan_vae_to_diffusers({n: n for n in names})  # {diffusers name: official name}
    ours = vae_official_to_diffusers(names)
    assert {v: k for k, v in ours.items()} == theirs
    assert vae_diffusers_to_official(theirs) == theirs


# ---------------------------------------------------------------------------------------------
# Wrong files in a slot: each fails from the header alone, with what it is, what the slot needs,
# and what to do


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fails the test if any tensor data is read: wrong files must be caught from headers."""
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read before the slot check")
    monkeypatch.setattr(checkpoints.reading, "_read_bytes", refuse)


def wrong_files(sets, tmp_path):
    comfy = sets["comfy"]
    small = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=1, text_dim=32, freq_dim=32)
    no_tokenizer = tmp_path / "umt5_no_tokenizer.safetensors"
    save_file({k: v for k, v in load_file(str(comfy / "text_encoders" / COMFY_FILES["comfy"][2])).items()
               if k != "spiece_model"}, str(no_tokenizer))
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4)}, str(lora))
    wan22_vae = tmp_path / "wan2.2_vae.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1),
               "conv2.weight": torch.zeros(48, 48, 1, 1, 1),  # z_dim 48
               "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(4, 4, 3, 3, 3)}, str(wan22_vae))
    blockwise = tmp_path / "blockwise_fp8.safetensors"
    fp8_file = load_file(str(sets["comfy-fp8"] / "diffusion_models" / COMFY_FILES["comfy-fp8"][0]))
    save_file({**fp8_file, "blocks.0.self_attn.q.scale_weight": torch.ones(64, 1)}, str(blockwise),
              metadata={"num_heads": "4"})
    return {  # case: (loader call, message parts)
        "VAE as expert": (lambda: load_dit(comfy / "vae" / COMFY_VAE_FILE),
                          ["is a Wan2.1 VAE", "needs a Wan2.2 T2V-A14B expert", "belongs in the Wan2.1 VAE slot"]),
        "expert as VAE": (lambda: load_vae(comfy / "diffusion_models" / COMFY_FILES["comfy"][0]),
                          ["is a Wan DiT expert (dim 64", "slot needs the Wan2.1 VAE", "belongs in the Wan DiT"]),
        "text encoder as expert": (lambda: load_dit(no_tokenizer), ["is a UMT5-XXL text encoder", "belongs in"]),
        "Wan2.1 I2V": (lambda: load_dit(save_dit(tmp_path / "i2v.safetensors", DiTConfig(in_dim=36, **small),
                                                 {"img_emb.proj.0.weight": torch.zeros(4)})),
                       ["image-to-video expert (in_dim 36", "use the Wan2.2 T2V-A14B experts"]),
        "TI2V-5B": (lambda: load_dit(save_dit(tmp_path / "ti2v.safetensors",
                                              DiTConfig(in_dim=48, out_dim=48, **small))),
                    ["Wan2.2 TI2V-5B model", "48-channel latents", "use the two Wan2.2 T2V-A14B experts"]),
        "LoRA": (lambda: load_dit(lora), ["is a LoRA (1 low-rank layer pairs", "load the base expert in this slot"]),
        "text encoder without tokenizer": (lambda: load_text_encoder(no_tokenizer),
                                           ["without a tokenizer", "pass --tokenizer", "spiece.model"]),
        "Wan2.2 VAE": (lambda: load_vae(wan22_vae), ["is a Wan2.2 VAE (z_dim 48", "choose wan_2.1_vae.safetensors"]),
        "block-wise fp8": (lambda: load_dit(blockwise), ["scales are per block, not per tensor",
                                                          "use the fp8_scaled, fp16 or bf16 file"]),
        "mismatched experts": (lambda: ModelFiles(
            high_noise=comfy / "diffusion_models" / COMFY_FILES["comfy"][0],
            low_noise=save_dit(tmp_path / "low.safetensors", DiTConfig(**{**small, "dim": 128, "num_heads": 2})),
            text_encoder=comfy / "text_encoders" / COMFY_FILES["comfy"][2],
            vae=comfy / "vae" / COMFY_VAE_FILE).check(),
            ["do not belong together", "high-noise", "is dim 64", "is dim 128", "choose the high- and low-noise"]),
    }


WRONG_CASES = ["VAE as expert", "expert as VAE", "text encoder as expert", "Wan2.1 I2V", "TI2V-5B", "LoRA",
               "text encoder without tokenizer", "Wan2.2 VAE", "block-wise fp8", "mismatched experts"]


@pytest.mark.parametrize("case", WRONG_CASES)
def test_wrong_file_in_a_slot_says_what_it_is_and_what_to_do(sets, tmp_path, case, request):
    call, parts = wrong_files(sets, tmp_path)[case]
    request.getfixturevalue("no_tensor_reads")
    with pytest.raises(CheckpointError) as err:
        call()
    for part in parts:
        assert part in str(err.value), (part, str(err.value))


def test_generate_refuses_a_wrong_file_before_loading_anything(sets, capsys):
    comfy = sets["comfy"]
    code = main(["generate", "--high-noise", str(comfy / "vae" / COMFY_VAE_FILE),
                 "--low-noise", str(comfy / "diffusion_models" / COMFY_FILES["comfy"][1]),
                 "--text-encoder", str(comfy / "text_encoders" / COMFY_FILES["comfy"][2]),
                 "--vae", str(comfy / "vae" / COMFY_VAE_FILE), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "wan_2.1_vae.safetensors is a Wan2.1 VAE" in err and "the high-noise expert slot needs" in err


# ---------------------------------------------------------------------------------------------
# Broken and unsafe files are refused without crashing


def safetensors_with_header(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header,data", [
    ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),  # unknown dtype
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),  # shape needs 12 bytes
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),  # negative size
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)),  # data cut short
])
def test_bad_safetensors_headers_are_refused(tmp_path, header, data):
    path = safetensors_with_header(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        read_state_dict(path)


def test_truncated_safetensors_is_refused(sets, tmp_path):
    source = sets["comfy"] / "diffusion_models" / COMFY_FILES["comfy"][0]
    for cut in (5, 2000, source.stat().st_size - 10):  # inside the length, the header, the data
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(source.read_bytes()[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_dit(broken)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, "w"): the file appears if code ran
        return open, (self.marker, "w")


def test_pickle_carrying_code_is_refused_and_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": RunsCode(str(tmp_path / "code-ran"))}, path)
    with pytest.raises(CheckpointError, match="needs code to be unpickled and was refused"):
        load_vae(path)
    assert not (tmp_path / "code-ran").exists()


# ---------------------------------------------------------------------------------------------
# Shard-aware and memory-lean reading


def test_tensors_are_read_in_file_order_whatever_order_they_are_asked_in(sets, monkeypatch):
    """One forward pass over each shard file: sequential disk reads, never seeking back."""
    ckpt = Checkpoint(sets["official"] / "high_noise_model")
    file_order = sorted(ckpt.entries, key=lambda n: (str(ckpt.entries[n].file), ckpt.entries[n].start))
    assert len({entry.file for entry in ckpt.entries.values()}) == 2  # the order spans both shards
    read = []
    original = checkpoints.reading._read_bytes
    monkeypatch.setattr(checkpoints.reading, "_read_bytes",
                        lambda handle, entry, name, buffer: read.append(name) or original(handle, entry, name, buffer))
    yielded = [name for name, _ in ckpt.read(reversed(file_order), dtype=torch.bfloat16)]
    assert read == yielded == file_order


def test_loading_fp32_into_bf16_and_fp8_needs_no_fp32_copy(tmp_path):
    """A 100 MB fp32 expert: peak RSS stays near what is kept, never near the fp32 size."""
    cfg = tiny_config(dim=512, layers=6, ffn_dim=2048, heads=4).dit
    expert = tmp_path / "expert.safetensors"
    weights = seeded(0, lambda: WanModel(cfg)).state_dict()
    save_file(weights, str(expert), metadata={"num_heads": "4"})
    fp32_bytes = expert.stat().st_size
    largest = max(t.nbytes for t in weights.values())  # the read buffer (fp8 adds an fp32 work buffer)
    for mode, slack in (("bf16", largest), ("fp8", 2 * largest)):
        measured = bench_loading.measure("load_dit", expert, mode, timeout=120)  # in a fresh process
        # mmap-based reading peaks at kept + fp32 size (3x for bf16); we allow 1.15x + buffers + 8 MiB
        assert measured["peak"] <= 1.15 * measured["kept"] + slack + 8 * 2**20, (mode, measured, fp32_bytes)
        assert measured["kept"] < (0.55 if mode == "bf16" else 0.3) * fp32_bytes


# ---------------------------------------------------------------------------------------------
# CLI


def test_make_tiny_cli_writes_a_comfy_fp8_set(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "c"), "--format", "comfy-fp8"]) == 0
    assert "wrote a tiny comfy-fp8 model set" in capsys.readouterr().out
    files = ModelFiles.from_model_dir(tmp_path / "c")
    assert files.high_noise.name == COMFY_FILES["comfy-fp8"][0] and files.tokenizer is None


def test_comfy_models_folder_picks_files_by_content(sets, tmp_path):
    """A real ComfyUI models folder holds other models too: they are recognised and skipped."""
    root = tmp_path / "models"
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir(parents=True)
        for file in (sets["comfy"] / sub).iterdir():
            (root / sub / file.name).symlink_to(file)
    small = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=1, text_dim=32, freq_dim=32)
    save_dit(root / "diffusion_models" / "wan2.2_i2v_high_noise_14B_fp16.safetensors", DiTConfig(in_dim=36, **small))
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)},
              str(root / "text_encoders" / "clip_l.safetensors"))
    files = ModelFiles.from_model_dir(root)
    assert (files.high_noise.name, files.text_encoder.name) == (COMFY_FILES["comfy"][0], COMFY_FILES["comfy"][2])
    (root / "diffusion_models" / "copy_high_noise.safetensors").symlink_to(files.high_noise)
    with pytest.raises(CheckpointError, match="needs exactly one Wan DiT expert named \\*high\\* in "
                       "diffusion_models/ or unet/, found diffusion_models/copy_high_noise.safetensors, "
                       "diffusion_models/wan2.2_t2v_high_noise_14B_fp16"):
        ModelFiles.from_model_dir(root)


@pytest.mark.parametrize("layout", ["comfy-fp8", "diffusers"])
def test_generate_takes_comfy_and_diffusers_model_dirs(sets, tmp_path, layout):
    latents = tmp_path / "latents.safetensors"
    assert main(["generate", "--model-dir", str(sets[layout]), "--width", "32", "--height", "16", "--frames", "5",
                 "--steps", "2", "--output", str(tmp_path / "v.mp4"), "--save-latents", str(latents),
                 "--device", "cpu", "--quiet"]) == 0
    assert load_file(str(latents))["latents"].shape == (16, 2, 2, 4)
    assert math.isfinite(load_file(str(latents))["latents"].abs().max().item())


def test_check_slot_reports_layouts(sets):
    _, found = check_slot(sets["comfy-prefixed"] / "diffusion_models" / COMFY_FILES["comfy"][0], DIT)
    assert found.layout == "comfy-prefixed" and found.dit == TINY.dit
    _, found = check_slot(sets["comfy-fp8"] / "diffusion_models" / COMFY_FILES["comfy-fp8"][0], DIT)
    assert found.scaled_fp8 and "scaled fp8" in found.description
