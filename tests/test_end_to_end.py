"""make-tiny, checkpoint loading, `demo` and `generate` end to end on CPU."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from wan22_core.checkpoints import (CheckpointError, ModelFiles, load_dit, load_text_encoder, load_vae,
                                    read_state_dict)
from wan22_core.cli import main
from wan22_core.config import TINY, SamplerSettings
from wan22_core.models.transformer import WanModel
from wan22_core.pipeline import denoise, make_noise
from wan22_core.placement import ExpertPair
from wan22_core.tiny import make_tiny, seeded
from wan22_core.video import read_mp4_info


def test_official_layout_has_official_names(tiny_model_dir):
    for rel in ("high_noise_model/config.json", "high_noise_model/diffusion_pytorch_model.safetensors.index.json",
                "low_noise_model/config.json", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/spiece.model",
                "Wan2.1_VAE.pth"):
        assert (tiny_model_dir / rel).is_file(), rel
    t5 = read_state_dict(tiny_model_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    assert "token_embedding.weight" in t5 and "blocks.0.attn.q.weight" in t5
    assert t5["token_embedding.weight"].dtype == torch.bfloat16
    index = json.loads((tiny_model_dir / "high_noise_model/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2  # sharded, as the official folders are


def test_make_tiny_is_deterministic(tiny_model_dir, tmp_path):
    again = make_tiny(tmp_path / "again", "official", TINY, seed=0)
    for rel in ("high_noise_model", "low_noise_model", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        a, b = read_state_dict(tiny_model_dir / rel), read_state_dict(again / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    high = read_state_dict(tiny_model_dir / "high_noise_model")
    assert (tiny_model_dir / "google/umt5-xxl/spiece.model").read_bytes() == \
        (again / "google/umt5-xxl/spiece.model").read_bytes()
    different = read_state_dict(make_tiny(tmp_path / "seed1", "official", TINY, seed=1) / "high_noise_model")
    assert not torch.equal(different["blocks.0.self_attn.q.weight"], high["blocks.0.self_attn.q.weight"])


def test_loaders_roundtrip_weights(tiny_model_dir):
    expert = load_dit(tiny_model_dir / "high_noise_model")
    reference = seeded(0, lambda: WanModel(TINY.dit))
    assert expert.cfg == TINY.dit
    for k, v in reference.state_dict().items():
        assert torch.equal(expert.state_dict()[k], v), k
    bf16 = load_dit(tiny_model_dir / "low_noise_model", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    vae = load_vae(tiny_model_dir / "Wan2.1_VAE.pth")
    assert vae.cfg == TINY.vae
    encoder = load_text_encoder(tiny_model_dir / "models_t5_umt5-xxl-enc-bf16.pth", tiny_model_dir / "google/umt5-xxl")
    assert encoder.encode(["a fox"])[0].shape[-1] == TINY.text.dim


def test_model_dir_errors_name_the_missing_parts(tmp_path):
    (tmp_path / "high_noise_model").mkdir()
    with pytest.raises(CheckpointError, match="missing low_noise_model, models_t5_umt5-xxl-enc-bf16.pth"):
        ModelFiles.from_model_dir(tmp_path)


def test_pth_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "obj": SamplerSettings()}, path)
    with pytest.raises(CheckpointError, match="needs code to be unpickled and was refused"):
        read_state_dict(path)


def test_truncated_safetensors_is_reported(tiny_model_dir, tmp_path):
    shard = sorted((tiny_model_dir / "high_noise_model").glob("*.safetensors"))[0]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        read_state_dict(broken)


def test_generate_latents_equal_python_api(tiny_model_dir, tmp_path):
    out, latents = tmp_path / "v.mp4", tmp_path / "lat.safetensors"
    code = main(["generate", "--model-dir", str(tiny_model_dir), "--prompt", "a fox in snow", "--negative-prompt",
                 "blurry", "--width", "64", "--height", "48", "--frames", "9", "--steps", "4", "--seed", "11",
                 "--output", str(out), "--save-latents", str(latents), "--device", "cpu", "--quiet"])
    assert code == 0
    saved = load_file(str(latents))["latents"]
    assert saved.shape == (16, 3, 6, 8) and saved.dtype == torch.float32

    files = ModelFiles.from_model_dir(tiny_model_dir)
    embeds = load_text_encoder(files.text_encoder, files.tokenizer).encode_prompt("a fox in snow", "blurry")
    experts = ExpertPair(load_dit(files.high_noise), load_dit(files.low_noise), torch.device("cpu"))
    direct = denoise(experts, embeds.positive, embeds.negative, make_noise(11, 9, 48, 64), SamplerSettings(steps=4))
    assert torch.equal(saved, direct)
    assert read_mp4_info(out) == {"frames": 9, "width": 64, "height": 48, "fps": 16.0}
    # never overwrite: a second run fails before doing any work, and leaves the file alone
    before = out.read_bytes()
    assert main(["generate", "--model-dir", str(tiny_model_dir), "--output", str(out), "--device", "cpu",
                 "--width", "64", "--height", "48", "--frames", "9", "--steps", "1", "--quiet"]) == 2
    assert out.read_bytes() == before


def test_demo_command_writes_a_decodable_mp4(tmp_path):
    """The README's main-job command, as a user runs it (a fresh process, from another folder)."""
    out = tmp_path / "demo.mp4"
    proc = subprocess.run([sys.executable, "-m", "wan22_core", "demo", "--output", str(out), "--cache-dir",
                           str(tmp_path / "cache"), "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert read_mp4_info(out) == {"frames": 17, "width": 128, "height": 128, "fps": 16.0}
    for name in ("text encoder", "denoise", "vae decode", "write mp4"):
        assert name in proc.stderr  # per-stage timings


@pytest.mark.parametrize("argv,message", [
    (["generate", "--frames", "80"], "give --model-dir"),
    (["generate", "--model-dir", "/nonexistent/dir"], "is not a folder"),
    (["make-tiny", "/tmp", "--format", "official"], "is not empty"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
