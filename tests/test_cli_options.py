"""`generate` options on one process: LoRAs, attention backend, compile, offload, batched CFG.

Each option is checked through the real CLI on the tiny official-layout model (a run takes
~0.3 s): the latents it saves are compared with the default run or with the Python API doing
the same thing. Offload and LoRA wiring must give identical latents (the same float ops in the
same order); sequential CFG reorders nothing either on CPU, but is held to 1e-5 relative as in
test_pipeline.py.
"""
import re

import pytest
import torch
from fakes import fake_kernels, hide_package
from procs import start_torchrun_generate
from reference import rel_l2
from safetensors.torch import load_file

from wan22_core.checkpoints import ModelFiles, load_dit, load_text_encoder
from wan22_core.cli import build_parser, main
from wan22_core.config import TINY, SamplerSettings
from wan22_core.lora import LoraSpec, apply_loras
from wan22_core.models.transformer import WanModel
from wan22_core.pipeline import denoise, make_noise
from wan22_core.placement import ExpertPair
from wan22_core.tiny import write_tiny_lora

PROMPT, NEGATIVE, SEED = "a fox in snow", "blurry", 11
SIZE = dict(frames=9, height=48, width=64)


@pytest.fixture
def generate(tiny_model_dir, tmp_path):
    """generate(*flags) -> (exit code, saved latents or None)."""
    runs = iter(range(100))

    def run(*flags):
        n = next(runs)
        latents = tmp_path / f"lat{n}.safetensors"
        code = main(["generate", "--model-dir", str(tiny_model_dir), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                     "--seed", str(SEED), "--steps", "4", "--device", "cpu", "--quiet",
                     *[f"--{k}={v}" for k, v in SIZE.items()],
                     "--output", str(tmp_path / f"v{n}.mp4"), "--save-latents", str(latents), *flags])
        return code, load_file(str(latents))["latents"] if code == 0 else None

    return run


@pytest.fixture(scope="module")
def default_latents(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "lat.safetensors"
    assert main(["generate", "--model-dir", str(tiny_model_dir), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                 "--seed", str(SEED), "--steps", "4", "--device", "cpu", "--quiet",
                 *[f"--{k}={v}" for k, v in SIZE.items()],
                 "--output", str(out.with_suffix(".mp4")), "--save-latents", str(out)]) == 0
    return load_file(str(out))["latents"]


def test_lora_flags_parse_file_and_strength_and_repeat():
    args = build_parser().parse_args(["generate", "--lora-high", "a.safetensors:0.5", "--lora-high", "b.safetensors",
                                      "--lora-low", "C:\\loras\\c.safetensors"])
    assert args.lora_high == [LoraSpec("a.safetensors", 0.5), LoraSpec("b.safetensors", 1.0)]
    assert args.lora_low == [LoraSpec("C:\\loras\\c.safetensors")]  # a drive colon is part of the path
    assert build_parser().parse_args(["generate"]).lora_high == []
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["generate", "--lora-low", "a.safetensors:nan"])
    assert exit_.value.code == 2


def test_lora_flags_equal_the_python_api_with_apply_loras(tiny_model_dir, generate, default_latents, tmp_path, capsys):
    model = WanModel(TINY.dit)
    comfy = write_tiny_lora(tmp_path / "comfy.safetensors", model, "comfy", seed=1).path
    lightx2v = write_tiny_lora(tmp_path / "lightx2v.safetensors", model, "lightx2v", seed=2).path
    code, latents = generate("--lora-high", f"{comfy}:0.8", "--lora-low", str(lightx2v), "--lora-low", f"{comfy}:-0.5")
    assert code == 0
    assert capsys.readouterr().err.count("parameters patched") == 3  # one report per LoRA

    files = ModelFiles.from_model_dir(tiny_model_dir)
    embeds = load_text_encoder(files.text_encoder, files.tokenizer).encode_prompt(PROMPT, NEGATIVE)
    high, low = load_dit(files.high_noise), load_dit(files.low_noise)
    apply_loras(high, [LoraSpec(comfy, 0.8)])
    apply_loras(low, [LoraSpec(lightx2v), LoraSpec(comfy, -0.5)])
    direct = denoise(ExpertPair(high, low, torch.device("cpu")), embeds.positive, embeds.negative,
                     make_noise(SEED, **SIZE), SamplerSettings(steps=4))
    assert torch.equal(latents, direct)
    assert rel_l2(latents, default_latents) > 1e-3  # the control: the LoRAs change the result


def test_offload_and_attention_flags_reach_the_experts(generate, default_latents, monkeypatch):
    import wan22_core.placement as placement
    from wan22_core.models.attention import AttentionKernel

    made = []
    original = placement.ExpertPair.__init__

    def recording(self, high, low, *args, **kwargs):
        original(self, high, low, *args, **kwargs)
        backends = {m.backend for e in (high, low) for m in e.modules() if isinstance(m, AttentionKernel)}
        made.append((self.keep_both, self.swap_blocks, backends))

    monkeypatch.setattr(placement.ExpertPair, "__init__", recording)
    fake_kernels(monkeypatch, {"sage"})  # a stand-in sageattention: on CPU the kernel runs SDPA anyway
    for flags in [(), ("--offload", "none"), ("--offload", "swap_experts"),
                  ("--offload", "block_swap", "--swap-blocks", "1"), ("--attention", "sage")]:
        code, latents = generate(*flags)
        assert code == 0 and torch.equal(latents, default_latents), flags
    assert made == [(True, 0, {"sdpa"}), (True, 0, {"sdpa"}), (False, 0, {"sdpa"}),  # auto on CPU keeps both
                    (False, 1, {"sdpa"}), (True, 0, {"sage"})]


def test_step_cache_flag_reports_the_passes_and_equals_the_python_api(tiny_model_dir, generate, capsys):
    code, latents = generate("--steps", "12", "--step-cache", "0.2")
    assert code == 0
    err = capsys.readouterr().err
    passes = re.findall(r"^step cache: (\d+) of 12 model passes run$", err, re.MULTILINE)
    assert len(passes) == 1 and int(passes[0]) < 12, err  # measured: 10 of 12

    files = ModelFiles.from_model_dir(tiny_model_dir)
    embeds = load_text_encoder(files.text_encoder, files.tokenizer).encode_prompt(PROMPT, NEGATIVE)
    ran = []
    experts = ExpertPair(load_dit(files.high_noise), load_dit(files.low_noise), torch.device("cpu"))
    direct = denoise(experts, embeds.positive, embeds.negative, make_noise(SEED, **SIZE),
                     SamplerSettings(steps=12, step_cache=0.2), on_step=lambda info: ran.append(info.model_ran))
    assert torch.equal(latents, direct) and sum(ran) == int(passes[0])
    code, exact = generate("--steps", "12")  # off by default: every pass, no line
    assert code == 0 and "step cache" not in capsys.readouterr().err and rel_l2(latents, exact) > 0


def test_demo_prints_the_passes_run_with_a_step_cache(tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-official-seed0").symlink_to(tiny_model_dir)  # what `demo` makes on first use
    assert main(["demo", "--cache-dir", str(cache), "--output", str(tmp_path / "demo.mp4"), "--steps", "12",
                 "--frames", "5", "--width", "32", "--height", "32", "--step-cache", "0.2", "--quiet"]) == 0
    assert re.search(r"^step cache: \d+ of 12 model passes run$", capsys.readouterr().err, re.MULTILINE)


def test_sequential_cfg_matches_batched(generate, default_latents):
    code, latents = generate("--no-batch-cfg")
    assert code == 0 and rel_l2(latents, default_latents) <= 1e-5


def test_compile_without_toolchain_runs_eager_with_one_warning_line(generate, default_latents, monkeypatch, capsys):
    import wan22_core.optimize as optimize

    monkeypatch.setattr(optimize, "compile_toolchain_problem", lambda device: "no C++ compiler on PATH (install g++)")
    code, latents = generate("--compile")
    assert code == 0 and torch.equal(latents, default_latents)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: compile ignored: no C++ compiler on PATH (install g++); "
                        "running eager (same results, slower)"]


def test_missing_attention_package_exits_2_with_the_engines_message(generate, monkeypatch, capsys):
    hide_package(monkeypatch, "flash_attn")
    assert generate("--attention", "flash_attn")[0] == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: attention backend 'flash_attn' is selected but its module "
                          "'flash_attn.flash_attn_interface' is not installed") and "or choose 'sdpa'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags,message", [
    (("--swap-blocks", "2"), "swap_blocks=2 needs offload='block_swap' (got offload='auto')"),
    (("--offload", "block_swap"), "offload='block_swap' needs swap_blocks between 1 and 2"),
    (("--offload", "block_swap", "--swap-blocks", "3"), "swap_blocks must be an integer between 0 and 2 "
                                                         "(the blocks of one expert), got 3"),
    (("--compile", "--offload", "block_swap", "--swap-blocks", "1"), "compile and offload='block_swap' do not combine"),
    (("--lora-high", "missing.safetensors"), "LoRA file not found: missing.safetensors"),
    # the torchrun path checks the model options too (here it stops before asking for torchrun)
    (("--ulysses", "2", "--lora-low", "missing.safetensors"), "LoRA file not found: missing.safetensors"),
    # the multi-GPU path refuses with the rule the worker group uses (plan.check_parallel_options)
    (("--weight-dtype", "bf16", "--dtype", "fp16"), "weight_dtype 'bf16' computes in bf16; it does not combine "
                                                      "with dtype 'fp16'"),
    (("--weight-dtype", "fp32", "--dtype", "bf16", "--ulysses", "2"), "weight_dtype 'fp32' computes in fp32"),
    (("--fsdp", "--offload", "none", "--swap-blocks", "1"), "not on the multi-GPU path: offload='none' (the ranks "
                                                             "place the experts themselves"),
    (("--fsdp", "--swap-blocks", "1"), "not on the multi-GPU path: swap_blocks=1 (block swap is for one process"),
    (("--cfg-parallel", "--no-batch-cfg"), "not on the multi-GPU path: batch_cfg=False with cfg_parallel"),
    (("--step-cache", "-1"), "step_cache must be a finite number >= 0 (0 = off, every model pass runs; 0.05 skips "
                             "some), got -1.0"),
    (("--step-cache", "nan"), "step_cache must be a finite number >= 0 (0 = off"),
    (("--ring", "3", "--attention", "sage"), "not on the multi-GPU path: attention='sage' with ring 3"),
    (("--videos", "0"), "--videos must be a whole number >= 1, got 0"),
])
def test_option_errors_are_one_line_before_any_work(generate, flags, message, capsys, monkeypatch):
    from wan22_core.cli import stages

    monkeypatch.setattr(stages, "load_text_encoder", lambda *a, **k: pytest.fail("work started"))
    assert generate(*flags)[0] == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_block_swap_without_blocks_is_refused_with_the_engines_message(generate, capsys):
    """The loader node gets the same text (test_nodes.py): one rule, in wan22_core.offload."""
    from wan22_core.offload import expert_pair_options

    with pytest.raises(ValueError) as core:
        expert_pair_options("block_swap", 0, False, TINY.dit.num_layers)
    assert generate("--offload", "block_swap", "--swap-blocks", "0")[0] == 2
    assert capsys.readouterr().err.strip() == f"error: {core.value}"


def test_help_lists_the_model_sizes():
    from wan22_core.config import FRAMES, HEIGHT, WIDTH, DiTConfig
    from wan22_core.parallel import valid_ulysses_degrees

    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    actions = {a.dest: a for a in gen._actions}
    assert (actions["width"].default, actions["height"].default, actions["frames"].default) == (WIDTH, HEIGHT, FRAMES)
    assert actions["ulysses"].help.endswith("divides the 40 heads: " + ", ".join(map(str, valid_ulysses_degrees(40))))
    assert actions["swap_blocks"].help.endswith(f"(1 to {DiTConfig().num_layers})")


def test_dtype_and_format_choices_are_the_engines_names():
    from wan22_core.config import WEIGHT_DTYPES
    from wan22_core.runtime import DTYPES
    from wan22_core.tiny import FORMATS

    subparsers = build_parser()._subparsers._group_actions[0].choices
    for command in ("demo", "generate"):
        actions = {a.dest: a for a in subparsers[command]._actions}
        assert list(actions["dtype"].choices) == ["auto", *DTYPES], command
        # the loader node's weight_dtype choices are the same tuple (nodes/loaders.py)
        assert list(actions["weight_dtype"].choices) == list(WEIGHT_DTYPES) == [
            "auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_fast"], command
    generate = {a.dest: a for a in subparsers["generate"]._actions}
    assert list(generate["text_dtype"].choices) == ["auto", *DTYPES] and generate["text_dtype"].default == "auto"
    assert list({a.dest: a for a in subparsers["make-tiny"]._actions}["format"].choices) == list(FORMATS)


def test_denoise_video_shows_one_bar_and_the_passes_only_when_asked_and_closes_the_bar_on_errors(monkeypatch, capsys):
    """The denoise stage both the one-process CLI and the torchrun ranks run (rank 0 alone shows a bar
    and the step cache's line)."""
    from types import SimpleNamespace

    from wan22_core.cli import stages

    bars, calls = [], []

    class Bar:
        def __init__(self, total):
            self.total, self.steps, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.steps += n

        def close(self):
            self.closed = True

    def fake_denoise(experts, positive, negative, noise, settings, batch_cfg, on_step):
        calls.append((experts, positive, negative, noise, batch_cfg))
        for step in range(settings.steps):
            on_step(SimpleNamespace(model_ran=step != 1))  # the second step reused
        if experts == "broken":
            raise RuntimeError("step failed")
        return "latent"

    monkeypatch.setattr(stages, "progress_bar", Bar)
    monkeypatch.setattr(stages, "denoise", fake_denoise)
    exact, cached = SamplerSettings(steps=3), SamplerSettings(steps=3, step_cache=0.1)
    assert stages.denoise_video("experts", "pos", "neg", "noise", cached, batch_cfg=False, progress=True,
                                report=False) == "latent"
    assert [(b.total, b.steps, b.closed) for b in bars] == [(3, 3, True)]
    assert calls[0] == ("experts", "pos", "neg", "noise", False)
    assert capsys.readouterr().err == ""  # not rank 0
    assert stages.denoise_video("experts", "pos", "neg", "noise", cached, batch_cfg=True, progress=False,
                                report=True) == "latent"
    assert len(bars) == 1 and capsys.readouterr().err == "step cache: 2 of 3 model passes run\n"
    stages.denoise_video("experts", "pos", "neg", "noise", exact, batch_cfg=True, progress=False, report=True)
    assert capsys.readouterr().err == ""  # no cache, no line
    with pytest.raises(RuntimeError, match="step failed"):
        stages.denoise_video("broken", "pos", "neg", "noise", cached, batch_cfg=True, progress=True, report=True)
    assert [(b.total, b.steps, b.closed) for b in bars[1:]] == [(3, 3, True)]


def test_encode_prompt_equals_the_text_encoder(tiny_model_dir):
    from wan22_core.cli.stages import encode_prompt

    files = ModelFiles.from_model_dir(tiny_model_dir)
    embeds = encode_prompt(files, PROMPT, NEGATIVE)
    expected = load_text_encoder(files.text_encoder, files.tokenizer).encode_prompt(PROMPT, NEGATIVE)
    assert torch.equal(embeds.positive, expected.positive) and torch.equal(embeds.negative, expected.negative)



@pytest.mark.parametrize("preset", [None, "backend:cudaMallocAsync", "newer:garbage_collection_threshold:0.8"])
def test_the_cli_sets_expandable_segments_unless_the_user_chose_an_allocator(preset, monkeypatch):
    """Set before the command runs (so before any CUDA work, when the allocator reads it); a user's
    own setting wins."""
    import argparse
    import os
    import types

    from wan22_core.cli import commands
    from wan22_core.runtime import ALLOC_CONF

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    if preset is not None and preset.startswith("newer:"):  # torch's newer name for the same setting
        monkeypatch.setenv("PYTORCH_ALLOC_CONF", preset.removeprefix("newer:"))
    elif preset is not None:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", preset)
    seen = []
    monkeypatch.setitem(commands.COMMANDS, "demo", lambda args: seen.append(
        (os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), os.environ.get("PYTORCH_ALLOC_CONF"))) or 0)
    command = argparse.Namespace(debug=False, command="demo")
    monkeypatch.setattr(commands, "build_parser", lambda: types.SimpleNamespace(parse_args=lambda argv: command))
    assert commands.main([]) == 0
    assert seen == [(ALLOC_CONF, None) if preset is None else
                    (None, "garbage_collection_threshold:0.8") if preset.startswith("newer:") else (preset, None)]


# ---------------------------------------------------------------------------------------------
# --no-video and --text-dtype


@pytest.fixture
def vae_never_loaded(monkeypatch):
    from wan22_core.cli import stages

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE was loaded")  # not caught by main: it would fail the run loudly

    monkeypatch.setattr(stages, "load_vae", refuse)


@pytest.fixture
def encoded(monkeypatch):
    """The PromptEmbeds each one-process `generate` run encoded, in order."""
    from wan22_core.cli import commands

    seen = []

    def recording(*args, real=commands.encode_prompt):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(commands, "encode_prompt", recording)
    return seen


def test_no_video_writes_the_latents_of_a_normal_run_and_nothing_else(generate, default_latents, tmp_path,
                                                                        vae_never_loaded, capsys):
    existing = tmp_path / "existing.mp4"
    existing.write_bytes(b"keep")
    code, latents = generate("--no-video", "--output", str(existing))  # --output's existing-file check is skipped
    assert code == 0 and torch.equal(latents, default_latents)  # the normal run's --save-latents, bit for bit
    assert existing.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.mp4", "lat0.safetensors"]  # no mp4, no .partial
    out, err = capsys.readouterr()
    assert out.strip() == f"wrote {tmp_path / 'lat0.safetensors'} (latents [16, 3, 6, 8]; no video: --no-video)"
    stages = [line.rsplit(None, 2)[0].strip() for line in err.splitlines() if line.rstrip().endswith(" s")]
    assert stages == ["text encoder", "load experts", "denoise"]  # as a normal run, minus vae decode and write mp4
    assert generate("--output", str(existing))[0] == 2  # the control: without --no-video the check applies


def test_no_video_without_save_latents_exits_2_before_reading_any_file(tmp_path, capsys):
    assert main(["generate", "--model-dir", str(tmp_path / "nowhere"), "--no-video"]) == 2
    assert capsys.readouterr().err == ("error: --no-video writes only the latents, and no --save-latents was given: "
                                       "add --save-latents F.safetensors, or drop --no-video\n")


def test_no_video_takes_separate_files_without_a_vae(tiny_model_dir, default_latents, tmp_path, vae_never_loaded,
                                                      capsys):
    from wan22_core.checkpoints import CheckpointError

    files = ModelFiles.from_model_dir(tiny_model_dir)
    run = without_vae(tiny_model_dir, tmp_path / "lat.safetensors")
    assert main([*run, "--no-video"]) == 0
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], default_latents)
    capsys.readouterr()
    assert main([*run, "--output", str(tmp_path / "v.mp4"), "--overwrite"]) == 2  # a video needs the VAE
    assert capsys.readouterr().err == ("error: give --model-dir, or all of --high-noise --low-noise --text-encoder "
                                       "--vae (missing --vae)\n")
    no_vae = ModelFiles(files.high_noise, files.low_noise, files.text_encoder, None, files.tokenizer)
    assert "high_noise" in no_vae.check(vae=False) and "vae" not in no_vae.check(vae=False)
    with pytest.raises(CheckpointError, match=r"no VAE given: pass --vae F \(only --no-video runs without one\)"):
        no_vae.check()


def test_text_dtype_fp32_embeds_as_load_text_encoder_fp32_and_auto_keeps_the_files_dtype(
        tiny_model_dir, generate, default_latents, encoded):
    files = ModelFiles.from_model_dir(tiny_model_dir)
    code, latents = generate("--text-dtype", "fp32", "--no-video")
    assert code == 0 and generate("--no-video")[0] == 0  # the default: --text-dtype auto
    fp32, auto = encoded
    expected = {dtype: load_text_encoder(files.text_encoder, files.tokenizer, dtype=dtype).encode_prompt(PROMPT, NEGATIVE)
                for dtype in (torch.float32, None)}  # None: the file's dtype (bf16 here, as the official .pth)
    for got, want, dtype in ((fp32, expected[torch.float32], torch.float32), (auto, expected[None], torch.bfloat16)):
        assert got.positive.dtype == got.negative.dtype == dtype
        assert torch.equal(got.positive, want.positive) and torch.equal(got.negative, want.negative)
    # fp32 text reaches the loop: the bf16 rounding of the embeddings moves the latents by 1.8e-5 here
    # (4 steps of the tiny model; the same embeddings give identical latents, 0)
    assert rel_l2(latents, default_latents) > 1e-6


def test_torchrun_encodes_in_text_dtype_on_rank_0_and_writes_only_the_latents(tiny_model_dir, generate, tmp_path):
    """`torchrun --nproc_per_node 1 ... --fsdp` (the ranks' path, run_on_ranks) from separate files
    without a VAE, next to the one-process runs with and without --text-dtype fp32."""
    ranks = tmp_path / "ranks.safetensors"
    torchrun = start_torchrun_generate(  # started first: it runs while this process makes the references
        [*without_vae(tiny_model_dir, ranks), "--fsdp", "--no-video", "--text-dtype", "fp32"], tmp_path, world=1)
    (code_fp32, fp32), (code_auto, auto) = generate("--no-video", "--text-dtype", "fp32"), generate("--no-video")
    output = torchrun.communicate(timeout=300)[0]
    assert torchrun.returncode == code_fp32 == code_auto == 0, output
    latents = load_file(str(ranks))["latents"]
    # FSDP on one CPU rank is the one-process computation, bit for bit; rank 0 encoded in fp32
    assert torch.equal(latents, fp32) and not torch.equal(latents, auto)
    assert output.count(f"wrote {ranks} (latents [16, 3, 6, 8]; no video: --no-video)") == 1
    assert not list(tmp_path.glob("*.mp4"))


def without_vae(model_dir, latents) -> list[str]:
    """`generate` of the tiny set from separate files, without --vae, writing `latents`."""
    files = ModelFiles.from_model_dir(model_dir)
    return ["generate", "--high-noise", str(files.high_noise), "--low-noise", str(files.low_noise),
            "--text-encoder", str(files.text_encoder), "--tokenizer", str(files.tokenizer),
            "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", str(SEED), "--steps", "4", "--quiet",
            *[f"--{k}={v}" for k, v in SIZE.items()], "--save-latents", str(latents)]
