"""Property-based tests (hypothesis): the input validators and the checkpoint header reader.

For each validator: a value is accepted if and only if the documented rule (written again here)
calls it valid, and works downstream; any other value raises a ValueError naming it (never a
TypeError, OverflowError, MemoryError, ...). For the checkpoint reader: random
and adversarial safetensors headers and .pth bytes end in a CheckpointError (or ValueError),
never another exception, and a header that disagrees with the data or with the model is refused
rather than loaded as wrong weights. Bounded (`max_examples`) so the file runs in well under 30 s.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from fakes import ConstantExpert
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wan22_core.checkpoints import DIT, TEXT_ENCODER, VAE, Checkpoint, CheckpointError, check_slot, identify, load_dit
from wan22_core.config import (MAX_FRAMES, MAX_LATENT_POSITIONS, MAX_SIDE, MAX_STEPS, MIN_SHIFT, SOLVERS, TINY,
                               SamplerSettings)
from wan22_core.models.transformer import WanModel
from wan22_core.parallel import parallel_config
from wan22_core.parallel.plan import MAX_CPU_RANKS
from wan22_core.pipeline import check_video_size, denoise, latent_shape, make_noise
from wan22_core.placement import ExpertPair
from wan22_core.sampling.schedule import flow_schedule, partial_schedule

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=40)  # examples that build a model or write a file

# Anything a workflow, a CLI flag or a JSON file could hand over.
anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                     st.integers(min_value=-2, max_value=2**70), st.sampled_from([math.nan, math.inf, -math.inf]),
                     st.sampled_from([2**1100, -2**1100]))  # ints no float holds: float() raises OverflowError
# numpy scalars, as a script that computes its settings with numpy hands them over: sampler
# settings and schedules accept numpy integers / reals like Python ones, numpy bools like bools.
numpy_scalars = st.one_of(st.integers(-3, 60).map(np.int64), st.integers(0, 60).map(np.uint8),
                          st.floats(width=32).map(np.float32), st.floats().map(np.float64),
                          st.booleans().map(np.bool_))


def mostly(valid, other):
    """`valid` three draws in four, so that all of a test's inputs are often valid at once
    (`st.one_of` picks among the flattened branches of both, most of them `other`'s)."""
    return st.sampled_from([valid, valid, valid, other]).flatmap(lambda strategy: strategy)


# The documented rules, written here rather than read from the validators: each test asserts that
# an input is accepted if and only if these call it valid, and that a refusal names a bad input.


def is_whole(value) -> bool:
    """An integer as every validator takes it: Python or numpy, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def number(value) -> float:
    """The float a Python or numpy number stands for; NaN (which every rule refuses) for a bool,
    a non-number, or an int too large for a float."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.nan


def sampler_problems(steps, shift, boundary, cfg_high, cfg_low, solver, step_cache) -> list[str]:
    """The fields the documented rules refuse: steps a whole number 1..MAX_STEPS, shift a finite
    number >= MIN_SHIFT, boundary in [0, 1], CFG scales finite and >= 0, a listed solver, a step
    cache threshold finite and >= 0."""
    rules = {"steps": is_whole(steps) and 1 <= steps <= MAX_STEPS,
             "shift": MIN_SHIFT <= number(shift) < math.inf,
             "boundary": 0 <= number(boundary) <= 1,
             "cfg_high": 0 <= number(cfg_high) < math.inf,
             "cfg_low": 0 <= number(cfg_low) < math.inf,
             "solver": isinstance(solver, str) and solver in SOLVERS,
             "step_cache": 0 <= number(step_cache) < math.inf}
    return [name for name, valid in rules.items() if not valid]


other_values = st.one_of(anything, numpy_scalars)
valid_steps = st.one_of(st.integers(1, 50), st.integers(1, MAX_STEPS), st.integers(1, MAX_STEPS).map(np.int64),
                        st.integers(1, 255).map(np.uint8))
valid_shift = st.one_of(st.floats(MIN_SHIFT, 20), st.floats(MIN_SHIFT, allow_infinity=False), st.integers(1, 2**70),
                        st.floats(0.01, 1e30).map(np.float32))
valid_cfg = st.one_of(st.floats(0, 10), st.floats(0, allow_infinity=False), st.integers(0, 2**70),
                      st.floats(0, 10).map(np.float64))


@FAST
@given(steps=mostly(valid_steps, other_values), shift=mostly(valid_shift, st.one_of(other_values, st.floats(0, 0.01))),
       boundary=mostly(st.one_of(st.floats(0, 1), st.sampled_from([0, 1]), st.floats(0, 1).map(np.float32)),
                       other_values),
       cfg_high=mostly(valid_cfg, other_values), cfg_low=mostly(valid_cfg, other_values),
       solver=mostly(st.sampled_from(SOLVERS), st.text(max_size=6)), step_cache=mostly(valid_cfg, other_values))
def test_sampler_settings_are_accepted_iff_valid(steps, shift, boundary, cfg_high, cfg_low, solver, step_cache):
    problems = sampler_problems(steps, shift, boundary, cfg_high, cfg_low, solver, step_cache)
    settings_ = SamplerSettings(steps=steps, shift=shift, boundary=boundary, cfg_high=cfg_high, cfg_low=cfg_low,
                                solver=solver, step_cache=step_cache)
    try:
        settings_.validate()
    except ValueError as err:
        assert problems, f"valid settings refused: {err}"
        assert str(err).split()[0] in problems  # the message starts with the name of a bad field
        return
    assert not problems, f"accepted with bad {problems}"
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


def size_problems(frames, height, width) -> list[str]:
    """The arguments the documented rules refuse: frames 4k+1 and sides multiples of 16 px, within
    the 1024 RoPE rows per axis (a row is 4 frames after the first, or 16 px)."""
    frames_ok = is_whole(frames) and int(frames) >= 1 and int(frames) % 4 == 1 and (int(frames) - 1) // 4 < 1024
    return ([] if frames_ok else ["frames"]) + [
        name for name, side in (("height", height), ("width", width))
        if not (is_whole(side) and int(side) % 16 == 0 and 1 <= int(side) // 16 <= 1024)]


valid_frames = st.integers(0, 1023).map(lambda rows: 4 * rows + 1)
valid_side = st.integers(1, 1024).map(lambda rows: 16 * rows)
# numpy integers of the types a script's arithmetic may leave (uint8 wraps around below 0)
numpy_ints = st.one_of(st.integers(-3, 2**40).map(np.int64), st.integers(0, 255).map(np.uint8),
                       st.integers(0, 2**32 - 1).map(np.uint32))


@FAST
@given(frames=mostly(st.one_of(valid_frames, valid_frames.map(np.int64), valid_frames.map(np.uint16)),
                     st.one_of(anything, numpy_ints, st.integers(-3, 5000), st.sampled_from([MAX_FRAMES + 4, -3]))),
       height=mostly(st.one_of(valid_side, valid_side.map(np.int32)), st.one_of(anything, numpy_ints,
                                                                                st.integers(-16, 17000))),
       width=mostly(st.one_of(valid_side, valid_side.map(np.uint64)),
                    st.one_of(anything, numpy_ints, st.sampled_from([0, 8, 24, MAX_SIDE + 16]))))
def test_video_sizes_are_accepted_iff_valid(frames, height, width):
    problems = size_problems(frames, height, width)
    try:
        check_video_size(frames, height, width)
    except ValueError as err:
        assert problems, f"valid size refused: {err}"
        assert str(err).split()[0] in problems
        return
    assert not problems, f"accepted with bad {problems}"
    shape = latent_shape(frames, height, width)  # downstream: Python ints, whatever integers came in
    assert shape == (16, (int(frames) - 1) // 4 + 1, int(height) // 8, int(width) // 8)
    assert all(type(n) is int for n in shape)


@FAST
@given(seed=st.one_of(st.integers(0, 2**64 - 1), anything, st.integers(2**64, 2**65), st.integers(-3, -1),
                     st.integers(0, 2**64 - 1).map(np.uint64), st.integers(-2**63, 2**63 - 1).map(np.int64),
                     st.integers(0, 255).map(np.uint8), st.booleans().map(np.bool_)))
def test_seeds_are_accepted_iff_64_bit(seed):
    valid = is_whole(seed) and 0 <= int(seed) < 2**64
    try:
        noise = make_noise(seed, 1, 16, 16)
    except ValueError as err:
        assert not valid, f"valid seed refused: {err}"
        assert str(err).startswith("seed ")
        return
    assert valid
    assert noise.shape == (16, 1, 2, 2) and torch.equal(noise, make_noise(seed, 1, 16, 16))
    assert torch.equal(noise, make_noise(int(seed), 1, 16, 16))  # a numpy seed draws the Python int's noise


# Every size of DiTConfig, written out here: the check derives its list from the dataclass fields.
DIT_SIZES = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "text_len",
             "rope_max_positions")


@pytest.mark.parametrize("name", DIT_SIZES)
@pytest.mark.parametrize("bad", [0, -4, True, 2.0, "8", None])
def test_dit_sizes_are_integers_from_one(name, bad):
    with pytest.raises(ValueError, match=f"^DiT {name} must be an integer >= 1, got"):
        replace(TINY.dit, **{name: bad})


def test_dit_sizes_take_numpy_integers():
    cfg = replace(TINY.dit, num_layers=np.int64(3), text_len=np.uint16(16))
    assert (cfg.num_layers, cfg.text_len) == (3, 16)
    with pytest.raises(ValueError, match=r"^DiT patch_size\[1\] must be an integer >= 1, got 0"):
        replace(TINY.dit, patch_size=(1, 0, 2))


EXPERTS = ExpertPair(ConstantExpert(0.0), ConstantExpert(0.0), torch.device("cpu"))
LATENT = torch.zeros(16, 1, 2, 2)


@FAST
@given(strength=mostly(st.one_of(st.floats(0, 1, exclude_min=True), st.just(1), st.floats(0.001, 1).map(np.float32),
                                 st.floats(0, 1, exclude_min=True).map(np.float64)), other_values),
       steps=st.integers(1, 30))
def test_denoise_strength_is_accepted_iff_in_zero_one_and_the_schedule_fits(strength, steps):
    # denoise d runs the last `steps` steps of a steps / d schedule, which must fit MAX_STEPS
    valid = 0 < number(strength) <= 1 and steps / number(strength) <= MAX_STEPS
    try:
        out = denoise(EXPERTS, torch.ones(2, 4), torch.zeros(2, 4), make_noise(0, 1, 16, 16),
                      SamplerSettings(steps=steps, shift=5.0, solver="euler"), latent=LATENT, denoise_strength=strength)
    except ValueError as err:
        assert not valid, f"valid strength refused: {err}"
        assert str(err).startswith("denoise ")
        return
    assert valid
    assert out.shape == LATENT.shape and torch.isfinite(out).all()
    schedule = partial_schedule(steps, 5.0, "euler", strength)
    sigmas = schedule.sigmas.tolist()
    assert len(schedule.timesteps) == steps and sigmas[-1] == 0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


CUDA_GPUS = torch.cuda.device_count()
no_decimal_digit = st.text(max_size=6).filter(lambda text: not any(c.isdecimal() for c in text)
                                              and text.strip().lower() != "all")


@st.composite
def cpu_ranks(draw):
    """("cpu:N" as a user may type it, the N ranks it names or None when N is not 1..MAX_CPU_RANKS)."""
    n = draw(mostly(st.integers(1, 8), st.integers(-1, MAX_CPU_RANKS + 2)))
    text = draw(st.sampled_from(["cpu:{}", " CPU:{}", "Cpu:{}\t", "cpu:0{}"])).format(n)
    return text, n if 1 <= n <= MAX_CPU_RANKS else None


@st.composite
def cuda_ranks(draw):
    """("all" or a list of CUDA indices, its rank count or None when those GPUs are not all here)."""
    if draw(st.booleans()):
        return "all", CUDA_GPUS or None
    indices = draw(st.lists(st.integers(0, 9), max_size=4))
    valid = indices and len(set(indices)) == len(indices) and max(indices) < CUDA_GPUS
    return draw(st.sampled_from([",", ", "])).join(map(str, indices)), len(indices) if valid else None


bad_gpus = st.one_of(no_decimal_digit, st.sampled_from(  # '²' is a digit to str.isdigit, but not to int()
    ["²", "0,²", "cpu:²", "cpu:+2", "cpu:2,cpu:3", "cpu:1.0", "-1"]))
gpus_and_ranks = mostly(cpu_ranks(), st.one_of(cuda_ranks(), st.tuples(bad_gpus, st.none())))


def parallel_problems(ranks, ulysses, ring, cfg_parallel, heads, heartbeat) -> list[str]:
    """Words a refusal may name, one per README rule broken; [] for a valid config. `ranks`: how
    many the gpus string names (None: not a valid gpus string on this machine)."""
    problems = [] if number(heartbeat) > 0 else ["heartbeat_timeout"]  # seconds; inf is no bound
    for name, value in (("ulysses", ulysses), ("ring", ring)):
        if not (is_whole(value) and value >= 0):
            problems.append(name)
    if ranks is None:
        return problems + ["gpus"]
    if cfg_parallel and ranks % 2:  # cond and uncond on two halves of the ranks
        return problems + ["cfg_parallel"]
    if problems:
        return problems
    half = ranks // (2 if cfg_parallel else 1)
    if ulysses and heads % ulysses:  # Ulysses scatters whole heads
        return ["ulysses"]
    if half % ((ulysses or 1) * (ring or 1)):  # the set degrees must fit the ranks (0 = auto fills the rest)
        return ["ranks"]
    return []


@FAST
@given(gpus=gpus_and_ranks,
       ulysses=mostly(st.sampled_from([0, 1, 2, 4]), st.one_of(st.integers(-2, 64), st.booleans(), st.none(),
                                                                st.floats(0, 4), st.integers(1, 4).map(np.int64))),
       ring=mostly(st.sampled_from([0, 0, 1, 2, 3]), st.one_of(st.integers(-2, 9), st.booleans(), st.none(),
                                                               st.floats(0, 4))),
       fsdp=st.booleans(), cfg_parallel=st.booleans(), heads=mostly(st.just(40), st.integers(1, 64)),
       heartbeat=mostly(st.one_of(st.floats(0, exclude_min=True), st.integers(1, 100)), other_values))
def test_parallel_configs_are_accepted_iff_valid(gpus, ulysses, ring, fsdp, cfg_parallel, heads, heartbeat):
    text, ranks = gpus
    problems = parallel_problems(ranks, ulysses, ring, cfg_parallel, heads, heartbeat)
    try:
        config = parallel_config(text, ulysses, fsdp, cfg_parallel, ring_degree=ring, num_heads=heads,
                                 heartbeat_timeout=heartbeat)
    except ValueError as err:
        assert problems, f"valid config refused: {err}"
        assert any(word in str(err) for word in problems), (problems, str(err))
        return
    assert not problems, f"accepted with bad {problems}"
    plan = config.plan
    assert len(config.devices) == plan.world_size == ranks and plan.cfg_parallel == (2 if cfg_parallel else 1)
    half = ranks // plan.cfg_parallel
    assert plan.ulysses == (ulysses or max(d for d in range(1, heads + 1)
                                           if heads % d == 0 and (half // (ring or 1)) % d == 0))
    assert plan.ring == (ring or half // plan.ulysses)  # auto: the ring takes what Ulysses leaves
    assert plan.replicas * plan.sequence_degree == half
    assert plan.replicas == 1 or ring  # ranks are left over only when the ring degree is set
    assert config.heartbeat_timeout == number(heartbeat)
    for groups in (plan.ulysses_groups(), plan.ring_groups(), plan.sequence_groups(), plan.cfg_groups()):
        assert sorted(g for group in groups for g in group) == list(range(ranks))


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
