"""Property-based tests (hypothesis): the input validators and the checkpoint header reader.

For each validator: any value either raises ValueError (never a TypeError, OverflowError,
MemoryError, ...), or is really valid and works downstream. For the checkpoint reader: random
and adversarial safetensors headers and .pth bytes end in a CheckpointError (or ValueError),
never another exception, and a header that disagrees with the data or with the model is refused
rather than loaded as wrong weights. Bounded (`max_examples`) so the file runs in well under 30 s.
"""
from __future__ import annotations

import json
import math
import numbers
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wan22_core.checkpoints import DIT, TEXT_ENCODER, VAE, Checkpoint, CheckpointError, check_slot, identify, load_dit
from wan22_core.config import MAX_STEPS, SOLVERS, TINY, SamplerSettings
from wan22_core.models.transformer import WanModel
from wan22_core.parallel import parallel_config
from wan22_core.pipeline import MAX_FRAMES, MAX_LATENT_POSITIONS, MAX_SIDE, check_video_size, denoise, make_noise
from wan22_core.sampling.moe import ExpertPair
from wan22_core.sampling.schedule import flow_schedule, partial_schedule

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=40)  # examples that build a model or write a file

# Anything a workflow, a CLI flag or a JSON file could hand over.
anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                     st.integers(min_value=-2, max_value=2**70), st.sampled_from([math.nan, math.inf, -math.inf]))
# numpy scalars, as a script that computes its settings with numpy hands them over: sampler
# settings and schedules accept numpy integers / reals like Python ones, numpy bools like bools.
numpy_scalars = st.one_of(st.integers(-3, 60).map(np.int64), st.integers(0, 60).map(np.uint8),
                          st.floats(width=32).map(np.float32), st.floats().map(np.float64),
                          st.booleans().map(np.bool_))


# ---------------------------------------------------------------------------------------------
# Validators


@FAST
@given(steps=st.one_of(anything, numpy_scalars, st.integers(1, 50)),
       shift=st.one_of(anything, numpy_scalars, st.floats(0.01, 20), st.floats(0, 0.01)),
       boundary=st.one_of(anything, numpy_scalars, st.floats(0, 1)),
       cfg_high=st.one_of(anything, numpy_scalars, st.floats(0, 10)),
       cfg_low=st.one_of(anything, numpy_scalars), solver=st.one_of(st.sampled_from(SOLVERS), st.text(max_size=6)))
def test_sampler_settings_accept_only_what_the_loop_can_run(steps, shift, boundary, cfg_high, cfg_low, solver):
    settings_ = SamplerSettings(steps=steps, shift=shift, boundary=boundary, cfg_high=cfg_high, cfg_low=cfg_low,
                                solver=solver)
    try:
        settings_.validate()
    except ValueError:
        return
    assert isinstance(steps, numbers.Integral) and not isinstance(steps, (bool, np.bool_))
    assert 1 <= steps <= MAX_STEPS
    assert all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)
               for v in (shift, boundary, cfg_high, cfg_low))
    assert shift > 0 and 0 <= boundary <= 1 and cfg_high >= 0 and cfg_low >= 0 and solver in SOLVERS
    if steps <= 1000:  # building a 10000-step schedule works too, but takes longer than this test may
        schedule = partial_schedule(steps, shift, solver, 1.0)
        assert len(schedule.timesteps) == steps and schedule.sigmas[-1] == 0
        assert torch.isfinite(schedule.sigmas).all() and (schedule.timesteps >= 0).all()  # an accepted shift works


@FAST
@given(steps=st.one_of(anything, numpy_scalars, st.integers(1, 50), st.integers(MAX_STEPS - 2, MAX_STEPS + 2)),
       shift=st.one_of(anything, numpy_scalars, st.floats(0.01, 20), st.floats(0, 0.01)),
       solver=st.one_of(st.sampled_from(SOLVERS), st.text(max_size=6)))
def test_settings_and_schedules_accept_the_same_steps_shift_and_solver(steps, shift, solver):
    """One checker: a direct `flow_schedule` call and `SamplerSettings.validate` agree, message included."""
    errors = []
    for check in (lambda: SamplerSettings(steps=steps, shift=shift, solver=solver).validate(),
                  lambda: flow_schedule(steps, shift, solver)):
        try:
            check()
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    assert errors[0] == errors[1]


def test_size_limits_are_those_of_the_rope_table():
    # 1024 RoPE rows per axis: latent frames are 4 video frames (after the first), tokens 16 px
    assert (MAX_LATENT_POSITIONS, MAX_FRAMES, MAX_SIDE) == (1024, 4 * 1023 + 1, 16 * 1024)


@FAST
@given(frames=st.one_of(anything, st.integers(-3, 5000)), height=st.one_of(anything, st.integers(-16, 17000)),
       width=st.one_of(anything, st.sampled_from([16, 32, 16384, 16400])))
def test_video_sizes_are_valid_when_accepted(frames, height, width):
    try:
        check_video_size(frames, height, width)
    except ValueError:
        return
    assert type(frames) is int and frames % 4 == 1 and (frames - 1) // 4 + 1 <= MAX_LATENT_POSITIONS
    for side in (height, width):  # tokens are 2x2 latent pixels of 8x8 pixels: one RoPE row per 16 px
        assert type(side) is int and side % 16 == 0 and 1 <= side // 16 <= MAX_LATENT_POSITIONS


@FAST
@given(seed=st.one_of(anything, st.integers(0, 2**64 - 1), st.integers(2**64, 2**65)))
def test_seeds_are_64_bit_when_accepted(seed):
    try:
        noise = make_noise(seed, 1, 16, 16)
    except ValueError:
        return
    assert type(seed) is int and 0 <= seed < 2**64 and noise.shape == (16, 1, 2, 2)
    assert torch.equal(noise, make_noise(seed, 1, 16, 16))


class Still(torch.nn.Module):
    """A fake expert predicting zero velocity: the loop runs, in microseconds per step."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, context):
        return torch.zeros_like(x)


EXPERTS = ExpertPair(Still(), Still(), torch.device("cpu"))
LATENT = torch.zeros(16, 1, 2, 2)


@FAST
@given(strength=st.one_of(anything, st.floats(0, 1)), steps=st.integers(1, 30))
def test_denoise_strength_is_in_zero_one_and_the_schedule_fits_when_accepted(strength, steps):
    try:
        out = denoise(EXPERTS, torch.ones(2, 4), torch.zeros(2, 4), make_noise(0, 1, 16, 16),
                      SamplerSettings(steps=steps, shift=5.0, solver="euler"), latent=LATENT, denoise_strength=strength)
    except ValueError:
        return
    assert type(strength) in (int, float) and 0 < strength <= 1 and steps / strength <= MAX_STEPS
    assert out.shape == LATENT.shape and torch.isfinite(out).all()
    schedule = partial_schedule(steps, 5.0, "euler", strength)
    sigmas = schedule.sigmas.tolist()
    assert len(schedule.timesteps) == steps and sigmas[-1] == 0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


@FAST
@given(ranks=st.one_of(st.integers(-1, 48).map(lambda n: f"cpu:{n}"), st.text(max_size=6),
                       st.sampled_from(["all", "0", "0,1", "cpu:", "cpu:x", "cpu:2,cpu:3"])),
       ulysses=st.one_of(st.integers(-2, 64), st.booleans(), st.none(), st.floats(0, 4)),
       fsdp=st.booleans(), cfg_parallel=st.booleans(), heads=st.integers(1, 64),
       heartbeat=st.one_of(st.floats(allow_nan=True), st.integers(-1, 100)))
def test_parallel_degrees_are_consistent_when_accepted(ranks, ulysses, fsdp, cfg_parallel, heads, heartbeat):
    try:
        config = parallel_config(ranks, ulysses, fsdp, cfg_parallel, num_heads=heads, heartbeat_timeout=heartbeat)
    except ValueError:
        return
    plan = config.plan
    world = len(config.devices)
    assert world == plan.world_size >= 1 and heads % plan.ulysses == 0
    assert world % (plan.ulysses * plan.cfg_parallel) == 0 and plan.cfg_parallel == (2 if cfg_parallel else 1)
    assert plan.replicas == 1 or plan.fsdp
    assert config.heartbeat_timeout > 0
    assert sorted(g for group in plan.ulysses_groups() for g in group) == list(range(world))


# ---------------------------------------------------------------------------------------------
# The checkpoint header reader

NAMES = ["patch_embedding.weight", "blocks.0.ffn.0.weight", "blocks.1.self_attn.q.weight", "text_embedding.0.weight",
         "time_embedding.0.weight", "head.head.weight", "head.modulation", "conv2.weight",
         "decoder.middle.0.residual.0.gamma", "token_embedding.weight", "shared.weight",
         "encoder.block.0.layer.0.SelfAttention.q.weight", "spiece_model", "scaled_fp8", "img_emb.proj.0.weight",
         "x.lora_A.weight", "model.diffusion_model.patch_embedding.weight", "condition_embedder.time_proj.weight",
         "blocks.0.self_attn.q.scale_weight", "blocks.99999999999.x", "__metadata__"]
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "U8": 1,
          "BOOL": 1, "C64": 8, "U16": 2, "F8_E8M0": 1, "F4": 1, "Q4": 1}
shapes = st.lists(st.one_of(st.integers(0, 70), st.sampled_from([-1, 2**31, 2**62])), max_size=5)


@st.composite
def headers(draw):
    """(header dict, data length): consistent offsets, or offsets and lengths that lie."""
    header, offset = {}, 0
    for name in draw(st.lists(st.one_of(st.sampled_from(NAMES), st.text(max_size=12)), max_size=7, unique=True)):
        if name == "__metadata__":
            header[name] = draw(st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=4),
                                                                                st.sampled_from(["4", "0", "-3", "x"]))))
            continue
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(shapes)
        size = DTYPES[dtype] * math.prod(max(0, s) for s in shape)
        lie = draw(st.sampled_from([0, 0, 0, 1, -1, 8, None]))
        begin, end = offset, offset + (size if lie is None else max(0, size + lie))
        if draw(st.booleans()) and draw(st.booleans()):
            begin, end = draw(st.integers(-4, 2**40)), draw(st.integers(-4, 2**40))  # overlapping, reversed, huge
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        offset = max(offset, end)
    extra = draw(st.sampled_from([0, 0, 1, -1]))
    return header, max(0, min(offset + extra, 1 << 16))


def refused_or_read(path) -> None:
    """Open, recognise and slot-check `path`; only CheckpointError or ValueError may escape."""
    try:
        found = identify(Checkpoint(path))
    except (CheckpointError, ValueError):
        return
    assert found.kind in (DIT, VAE, TEXT_ENCODER, "LoRA", "unknown")
    for slot in (DIT, VAE, TEXT_ENCODER):
        try:
            check_slot(path, slot)
        except (CheckpointError, ValueError):
            pass


@FAST
@given(case=headers())
def test_random_safetensors_headers_are_refused_cleanly(tmp_path, case):
    header, data_length = case
    raw = json.dumps(header).encode()
    path = tmp_path / "random.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_length))
    refused_or_read(path)


@FAST
@given(prefix=st.binary(max_size=16), header=st.binary(max_size=64), length=st.one_of(
    st.integers(0, 200), st.sampled_from([2**63, 2**64 - 1, 100_000_001])))
def test_garbage_bytes_and_lying_header_lengths_are_refused_cleanly(tmp_path, prefix, header, length):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", length) + header + prefix)
    refused_or_read(path)


@SLOW
@given(data=st.binary(min_size=0, max_size=3000), flips=st.lists(st.integers(0, 10**6), max_size=30))
def test_damaged_pth_files_are_refused_cleanly(tmp_path, data, flips):
    good = tmp_path / "good.pth"
    if not good.exists():
        torch.save({"conv2.weight": torch.zeros(4, 4), "bias": torch.ones(3)}, good)
    damaged = bytearray(data or good.read_bytes())  # random bytes, or the good file with flipped bytes
    for i in flips:
        damaged[i % len(damaged)] ^= 0xA5
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(damaged))
    refused_or_read(path)


# ---------------------------------------------------------------------------------------------
# Never silently wrong weights: a valid tiny expert whose header is edited


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory):
    with torch.device("meta"):
        names = WanModel(TINY.dit).state_dict()
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) for k, v in names.items()}
    path = tmp_path_factory.mktemp("expert") / "expert.safetensors"
    save_file(tensors, str(path), metadata={"num_heads": str(TINY.dit.num_heads)})
    return path, tensors


def split(path):
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join(path, header, data):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@SLOW
@given(pick=st.integers(0, 10**6), edit=st.sampled_from(["reverse", "flatten", "unsqueeze", "other"]),
       other=st.lists(st.integers(1, 256), min_size=1, max_size=4))
def test_a_tensor_whose_shape_changed_is_refused(expert_file, tmp_path, pick, edit, other):
    path, tensors = expert_file
    header, data = split(path)
    name = sorted(n for n in header if n != "__metadata__")[pick % len(tensors)]
    old = header[name]["shape"]
    # The first three keep the byte count, so safetensors' own checks cannot notice them.
    new = {"reverse": old[::-1], "flatten": [math.prod(old)], "unsqueeze": [1, *old], "other": other}[edit]
    assume(new != old)
    header[name]["shape"] = new
    edited = tmp_path / "edited.safetensors"
    join(edited, header, data)
    with pytest.raises(CheckpointError):
        load_dit(edited)


@SLOW
@given(pick=st.integers(0, 10**6), which=st.sampled_from([0, 1]), delta=st.integers(-64, 64).filter(bool))
def test_a_tensor_whose_byte_range_moved_is_refused(expert_file, tmp_path, pick, which, delta):
    path, tensors = expert_file
    header, data = split(path)
    name = sorted(n for n in header if n != "__metadata__")[pick % len(tensors)]
    header[name]["data_offsets"][which] += delta  # overlaps a neighbour, leaves a gap, or runs past the end
    edited = tmp_path / "edited.safetensors"
    join(edited, header, data)
    with pytest.raises(CheckpointError):
        load_dit(edited)


def test_the_unedited_expert_loads_its_own_weights(expert_file):
    """The baseline the two properties above edit: untouched, it loads bit for bit."""
    path, tensors = expert_file
    state = load_dit(path).state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())
