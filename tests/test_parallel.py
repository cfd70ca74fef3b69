"""Plans, token sharding, and parallel runs on 2, 3, 4 and 6 CPU ranks (gloo) against one process.

The multi-rank runs are real processes: this file re-executes itself as each rank (see the
bottom), every rank loads its shards of a tiny official-layout model from disk (in one scenario
with LoRAs merged into the shards) and samples with each plan; the test process compares the
final latents with `denoise` on the full model (with `apply_loras` for the LoRA scenario).
Tolerance: 1e-5 relative L2 in fp32 (the parallel paths only reorder float sums; Ulysses and
FSDP alone are bit-exact here, the ring's merge of partial softmaxes is not), one bf16 ulp in
bf16 (see BF16_TOL). The ranks also run the sequence-parallel attention alone against a
float64 softmax, with padded keys, and record FSDP's forward prefetch order.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from procs import join_gloo_group, start_gloo_ranks, start_torchrun_generate, wait_ranks
from reference import float64_attention, rel_l2
from safetensors.torch import load_file

from wan22_core.checkpoints import load_dit
from wan22_core.config import TINY, SamplerSettings
from wan22_core.lora import LoraSpec, apply_loras
from wan22_core.models.transformer import WanModel
from wan22_core.parallel import ParallelPlan, parallel_config, parse_gpus, valid_ulysses_degrees
from wan22_core.parallel.sequence import shard_tokens
from wan22_core.pipeline import denoise, make_noise
from wan22_core.placement import ExpertPair, module_bytes
from wan22_core.tiny import write_tiny_lora

TOL = 1e-5
# bf16: each token sees the same weights and inputs as in one process, and the residual stream,
# modulation and solver stay fp32; only kernels that block differently for another batch or
# sequence split may round an element differently, by one bf16 ulp (2^-8) where they do.
# Measured: 1.6e-7 on 4 ranks; rounding the fp32 stream to bf16 anywhere would be ~1e-3.
BF16_TOL = 1e-5
# bf16 with a ring: each block's attention output comes back rounded to bf16 before the fp32 merge,
# one more rounding than one kernel over all keys. Measured 1.0e-3 (Ulysses 2 x Ring 2, 4 steps),
# while the one-process bf16 run is itself 1.6e-3 from fp32: below bf16's own noise.
BF16_RING_TOL = 3e-3
HEADS = TINY.dit.num_heads  # 4: allows 2- and 4-way Ulysses
SETTINGS = SamplerSettings(steps=4, shift=5.0)  # timesteps 999, 937 (high) | 833, 624 (low): both experts
# (frames, height, width); 16 tokens divide by 2 and 4, not by 3 or 6; 27 by 3, not by 2, 4 or 6
SHAPES = {"16 tokens": (5, 32, 64), "27 tokens": (9, 48, 48)}
SCENARIOS = {
    2: {"ulysses": dict(ulysses=2), "fsdp": dict(fsdp=True), "ulysses+fsdp": dict(ulysses=2, fsdp=True),
        "cfg": dict(cfg_parallel=2), "cfg+fsdp": dict(cfg_parallel=2, fsdp=True),
        "ulysses+fsdp bf16": dict(ulysses=2, fsdp=True, dtype=torch.bfloat16),
        "ulysses+fsdp loras": dict(ulysses=2, fsdp=True, loras=True),
        "ring": dict(ring=2), "ring+fsdp": dict(ring=2, fsdp=True)},
    3: {"ring": dict(ring=3), "ring+fsdp": dict(ring=3, fsdp=True)},
    4: {"ulysses": dict(ulysses=4), "fsdp": dict(fsdp=True), "ulysses+fsdp": dict(ulysses=4, fsdp=True),
        "cfg+ulysses": dict(cfg_parallel=2, ulysses=2),
        "cfg+ulysses+fsdp, kept gathered": dict(cfg_parallel=2, ulysses=2, fsdp=True, reshard_after_forward=False),
        "cfg+ulysses+fsdp bf16": dict(cfg_parallel=2, ulysses=2, fsdp=True, dtype=torch.bfloat16),
        "ring": dict(ring=4), "ring+fsdp": dict(ring=4, fsdp=True),
        "ulysses x ring": dict(ulysses=2, ring=2), "ulysses x ring+fsdp": dict(ulysses=2, ring=2, fsdp=True),
        "ulysses x ring+fsdp bf16": dict(ulysses=2, ring=2, fsdp=True, dtype=torch.bfloat16)},
    6: {"ulysses x ring": dict(ulysses=2, ring=3), "ulysses x ring+fsdp": dict(ulysses=2, ring=3, fsdp=True),
        "cfg x ring": dict(cfg_parallel=2, ring=3), "cfg x ring+fsdp": dict(cfg_parallel=2, ring=3, fsdp=True)},
}
# 4 ranks as 2 replicas of ulysses 2, FSDP over all 4: 3 videos, so replica 1 repeats one in round 2
REPLICA_VIDEOS = 3
REPLICA_SHAPE = "27 tokens"
SEED = 5
# sequence-parallel attention alone: tokens per video; 5 on 4 ranks and 7 on 6 leave a ring
# position with padding only, 12 divides every sequence degree here
ATTENTION_LENGTHS = (5, 7, 12)
ATTENTION_TOL = 1e-5  # fp32 kernels against a float64 softmax; measured <= 1.6e-7

# The step cache on 2 ranks: 12 steps (8 high-noise, 4 low-noise), so the high-noise expert can reuse
# after its 5 warm-up steps; measured in one process on the "16 tokens" shape: 10 of 12 passes run.
CACHED, CACHED_SHAPE = SamplerSettings(steps=12, step_cache=0.2), "16 tokens"
CACHED_SCENARIOS = ("ulysses+fsdp", "cfg")  # of the 2-rank ones
# The replicas' videos (seeds 5, 6, 7 on "27 tokens") with a threshold where their decisions differ:
# 0.175 gives three patterns; the nearest estimate is 0.68% from it (1e-7 rounding cannot flip it).
REPLICA_CACHED = SamplerSettings(steps=12, step_cache=0.175)


def job_inputs(shape_name, seed=SEED):
    g = torch.Generator().manual_seed(11)
    positive = torch.randn(7, TINY.dit.text_dim, generator=g)
    negative = torch.randn(3, TINY.dit.text_dim, generator=g)
    return positive, negative, make_noise(seed, *SHAPES[shape_name])


# ---------------------------------------------------------------------------------------------
# Plans and devices (no processes)


def test_plan_refuses_a_degree_that_does_not_divide_the_heads_and_lists_the_valid_ones():
    assert valid_ulysses_degrees(40) == [1, 2, 4, 5, 8, 10, 20, 40]
    with pytest.raises(ValueError, match=r"ulysses degree 3 does not divide the 40 attention heads; "
                                         r"valid degrees: 1, 2, 4, 5, 8, 10, 20, 40"):
        ParallelPlan(world_size=3, ulysses=3)
    with pytest.raises(ValueError, match="valid degrees: 1, 2, 4$"):
        ParallelPlan(world_size=8, ulysses=8, num_heads=HEADS)


def test_plan_degrees_must_fill_the_world_and_the_refusal_lists_what_fits():
    with pytest.raises(ValueError, match=r"^6 ranks cannot be split into cfg_parallel 1 x ulysses 1 x ring 4 = 4; "
                                         r"valid ring degrees with ulysses 1: 1, 2, 3, 6$"):
        ParallelPlan(world_size=6, ring=4)
    with pytest.raises(ValueError, match=r"ulysses 2 x ring 2 = 4; valid ring degrees with ulysses 2: 1, 3$"):
        ParallelPlan(world_size=6, ulysses=2, ring=2)
    with pytest.raises(ValueError, match=r"ulysses 4 x ring 3 = 12; valid ulysses degrees with ring 3: 1, 2$"):
        ParallelPlan(world_size=6, ulysses=4, ring=3)
    with pytest.raises(ValueError, match="cfg_parallel 2 needs an even number of ranks"):
        ParallelPlan(world_size=3, cfg_parallel=2)
    with pytest.raises(ValueError, match="cfg_parallel must be 1 or 2"):
        ParallelPlan(world_size=3, cfg_parallel=3)
    with pytest.raises(ValueError, match="ring must be an integer >= 1"):
        ParallelPlan(world_size=3, ring=0)
    assert ParallelPlan(world_size=4, fsdp=True).replicas == 4  # FSDP only: each rank its own videos
    assert ParallelPlan(world_size=4, ulysses=2).replicas == 2  # without FSDP too: two videos side by side
    plan = ParallelPlan(world_size=10, ulysses=5, cfg_parallel=2)  # 2 x 5: allowed, as design.md says
    assert plan.ulysses_enabled and plan.cfg_parallel_enabled and not plan.fsdp and not plan.ring_enabled
    for world, ring in ((3, 3), (7, 7), (6, 3), (12, 3), (24, 3)):  # no longer refused: ring takes the rest
        assert ParallelPlan(world_size=world, ulysses=world // ring, ring=ring).sequence_degree == world


def test_plan_groups_follow_the_rank_grid():
    """(replica, cfg, ring, ulysses) with Ulysses fastest: Ulysses groups are neighbours, a ring
    links the same Ulysses position of consecutive groups, a video's sequence group is a run."""
    plan = ParallelPlan(world_size=8, ulysses=2, cfg_parallel=2, fsdp=True)  # 2 replicas
    assert plan.ulysses_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.cfg_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert plan.replica_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]] and plan.replica_of(5) == 1
    plan = ParallelPlan(world_size=12, ulysses=2, ring=3, cfg_parallel=2)
    assert plan.ulysses_groups() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert plan.ring_groups() == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    assert plan.sequence_groups() == [list(range(6)), list(range(6, 12))]
    assert plan.cfg_groups() == [[i, i + 6] for i in range(6)]
    assert plan.replica_groups() == [list(range(12))]
    plan = ParallelPlan(world_size=8, ulysses=2, ring=2, fsdp=True)  # 2 replicas of 2 x 2
    assert plan.ring_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert plan.sequence_groups() == plan.replica_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for plan in (ParallelPlan(world_size=24, ulysses=4, ring=3, cfg_parallel=2),
                 ParallelPlan(world_size=16, ulysses=2, ring=2, fsdp=True)):  # each rank in exactly one group
        for groups in (plan.ulysses_groups(), plan.ring_groups(), plan.sequence_groups(), plan.cfg_groups(),
                       plan.replica_groups()):
            assert sorted(rank for group in groups for rank in group) == list(range(plan.world_size))


# P -> (cfg, ulysses, ring) chosen for A14B's 40 heads with guidance batched (CFG-parallel on even P),
# and without (cfg 1): Ulysses is the largest divisor of 40 that divides the rest, the ring takes the rest
AUTO_SPLITS = {
    1: ((1, 1, 1), (1, 1, 1)), 2: ((2, 1, 1), (1, 2, 1)), 3: ((1, 1, 3), (1, 1, 3)), 4: ((2, 2, 1), (1, 4, 1)),
    5: ((1, 5, 1), (1, 5, 1)), 6: ((2, 1, 3), (1, 2, 3)), 7: ((1, 1, 7), (1, 1, 7)), 8: ((2, 4, 1), (1, 8, 1)),
    9: ((1, 1, 9), (1, 1, 9)), 10: ((2, 5, 1), (1, 10, 1)), 11: ((1, 1, 11), (1, 1, 11)),
    12: ((2, 2, 3), (1, 4, 3)), 13: ((1, 1, 13), (1, 1, 13)), 14: ((2, 1, 7), (1, 2, 7)),
    15: ((1, 5, 3), (1, 5, 3)), 16: ((2, 8, 1), (1, 8, 2)), 24: ((2, 4, 3), (1, 8, 3)), 64: ((2, 8, 4), (1, 8, 8)),
}


@pytest.mark.parametrize("world", sorted(AUTO_SPLITS))
def test_auto_split_puts_ulysses_first_and_the_ring_on_the_rest(world):
    from wan22_core.parallel import choose_split

    with_cfg, without_cfg = AUTO_SPLITS[world]
    assert choose_split(world, 40, guidance_batched=True) == with_cfg
    assert choose_split(world, 40, guidance_batched=False) == without_cfg
    for cfg, ulysses, ring in (with_cfg, without_cfg):  # every rank used, and a valid plan
        plan = ParallelPlan(world_size=world, ulysses=ulysses, ring=ring, cfg_parallel=cfg)
        assert plan.replicas == 1
        assert ulysses == max(d for d in valid_ulysses_degrees(40) if (world // cfg) % d == 0)


def test_auto_split_keeps_set_degrees_and_ulysses_inside_a_node():
    from wan22_core.parallel import choose_split

    assert choose_split(16, 40, guidance_batched=False, ranks_per_node=8) == (1, 8, 2)  # two nodes of 8
    assert choose_split(16, 40, guidance_batched=False, ranks_per_node=4) == (1, 4, 4)  # Ulysses never spans nodes
    assert choose_split(6, 40, ulysses=1) == (2, 1, 3)  # a set Ulysses: the ring takes the rest
    assert choose_split(6, 40, ring=2, cfg_parallel=False) == (1, 1, 2)  # set ring, 3 left: 40 has no 3 -> 3 replicas
    assert choose_split(8, 40, ring=2, cfg_parallel=False) == (1, 4, 2)
    assert choose_split(4, 40, ulysses=1, ring=1) == (2, 1, 1)  # both set: CFG if it fits, then replicas
    assert choose_split(4, 40, ulysses=4) == (1, 4, 1)  # CFG-parallel only where the set degrees fit a half
    assert choose_split(6, 40, ring=4) == (1, 1, 4)  # does not fit: left for the plan to refuse with the choices
    assert choose_split(6, 4, guidance_batched=False) == (1, 2, 3)  # the tiny model's 4 heads


def test_replicas_without_a_video_of_their_own_are_named_in_one_line():
    from wan22_core.parallel.replicas import idle_replicas_note, videos_of_replica

    assert idle_replicas_note(4, 4) is None and idle_replicas_note(5, 4) is None
    assert idle_replicas_note(1, 4) == ("4 replicas but 1 video: 3 replica(s) repeat a video and their work is "
                                        "dropped; ask for 4 videos to use them")
    assert [videos_of_replica(1, 4, r) for r in range(4)] == [[0]] * 4  # the repeats the line warns about


def test_the_split_is_described_in_one_line():
    assert ParallelPlan(world_size=6, ring=3, cfg_parallel=2).describe() == "6 GPUs: CFG 2 x Ulysses 1 x Ring 3"
    assert ParallelPlan(world_size=1).describe("CPU rank") == "1 CPU rank: CFG 1 x Ulysses 1 x Ring 1"
    assert (ParallelPlan(world_size=8, ulysses=2, ring=2, fsdp=True).describe()
            == "8 GPUs: CFG 1 x Ulysses 2 x Ring 2 x 2 replicas, one video each")
    assert parallel_config("cpu:3", num_heads=HEADS).describe() == "3 CPU ranks: CFG 1 x Ulysses 1 x Ring 3"


def test_more_sequence_ranks_than_tokens_are_refused_with_the_degrees_that_fit():
    from wan22_core.memory import video_tokens

    plan = ParallelPlan(world_size=6, ulysses=2, ring=3)
    plan.check_tokens(6)
    tokens = video_tokens(TINY.dit, 5, 32, 16)  # 2 latent frames of 2 x 1 tokens: 4
    with pytest.raises(ValueError, match=r"^ulysses 2 x ring 3 = 6 sequence ranks but the video has only 4 tokens "
                                         r".*or use a sequence degree \(ulysses x ring\) of 1, 2, 3$"):
        plan.check_tokens(tokens)


def test_parse_gpus_and_node_config():
    assert parse_gpus("cpu:2") == ("cpu", "cpu")
    for bad, message in [("cpu:0", "N >= 1"), ("cpu:x", "N >= 1"), ("0,0", "twice"), ("gpu", "not 'all'")]:
        with pytest.raises(ValueError, match=message):
            parse_gpus(bad)
    config = parallel_config("cpu:4", ulysses_degree=0, cfg_parallel=True, num_heads=HEADS)
    assert (config.plan.ulysses, config.plan.ring, config.plan.cfg_parallel, config.backend) == (2, 1, 2, "gloo")
    assert parallel_config("cpu:4", fsdp=False).plan.ulysses == 4  # 0 = auto: Ulysses first
    plan = parallel_config("cpu:6", ring_degree=0, num_heads=HEADS).plan
    assert (plan.ulysses, plan.ring) == (2, 3)
    plan = parallel_config("cpu:4", ulysses_degree=1, ring_degree=2).plan
    assert (plan.ulysses, plan.ring, plan.replicas) == (1, 2, 2)
    with pytest.raises(ValueError, match="even number of ranks"):
        parallel_config("cpu:3", cfg_parallel=True)
    with pytest.raises(ValueError, match="valid degrees"):
        parallel_config("cpu:3", ulysses_degree=3)
    with pytest.raises(ValueError, match="valid ring degrees with ulysses 1: 1, 3"):
        parallel_config("cpu:3", ring_degree=2)
    with pytest.raises(ValueError, match="ring_degree must be an integer >= 0"):
        parallel_config("cpu:3", ring_degree=-1)


def test_shard_tokens_pads_with_identity_rotation_and_reassembles():
    tokens = torch.randn(2, 5, 8)
    rope = torch.polar(torch.ones(5, 1, 4), torch.rand(5, 1, 4))  # [L, 1, D/2] unit rotations
    parts = [shard_tokens(tokens, rope, rank, 2) for rank in range(2)]
    assert [p[0].shape[1] for p in parts] == [3, 3]  # 5 tokens -> 6 = 2 x 3
    assert torch.equal(torch.cat([p[0] for p in parts], dim=1)[:, :5], tokens)
    assert torch.equal(torch.cat([p[1] for p in parts])[:5], rope)  # each rank keeps its global positions
    pad_token, pad_rope = parts[1][0][:, -1], parts[1][1][-1]
    assert torch.equal(pad_token, torch.zeros_like(pad_token))
    assert torch.equal(pad_rope, torch.ones_like(pad_rope))  # identity rotation 1 + 0i


# ---------------------------------------------------------------------------------------------
# Multi-rank runs


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """{expert: [(file, strength)]}: a block-Linear LoRA on the high-noise expert; on the low-noise
    one a lightx2v-style file (biases, norm3 and the [1, 6, dim] modulation too, so one rank holds
    none of some rows) under a second LoRA at a negative strength."""
    model, folder = WanModel(TINY.dit), tmp_path_factory.mktemp("loras")
    comfy = write_tiny_lora(folder / "comfy.safetensors", model, "comfy", seed=1).path
    lightx2v = write_tiny_lora(folder / "lightx2v.safetensors", model, "lightx2v", seed=2).path
    return {"high": [(str(comfy), 0.8)], "low": [(str(lightx2v), 1.0), (str(comfy), -0.5)]}


def lora_specs(pairs):
    return [LoraSpec(path, strength) for path, strength in pairs]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, loras):
    """{dtype, or "loras": {shape: latent}} from one process on the full experts."""
    out = {}
    for key in (torch.float32, torch.bfloat16, "loras"):
        dtype = torch.float32 if key == "loras" else key
        high = load_dit(tiny_model_dir / "high_noise_model", dtype)
        low = load_dit(tiny_model_dir / "low_noise_model", dtype)
        if key == "loras":
            apply_loras(high, lora_specs(loras["high"]))
            apply_loras(low, lora_specs(loras["low"]))
        experts = ExpertPair(high, low, torch.device("cpu"))
        out[key] = {name: denoise(experts, *job_inputs(name), SETTINGS) for name in SHAPES}
        if key == torch.float32:
            out["cached"] = cached_run(experts)
            out["videos"] = [denoise(experts, *job_inputs(REPLICA_SHAPE, SEED + video), SETTINGS)
                             for video in range(REPLICA_VIDEOS)]
            out["cached videos"] = [cached_run(experts, REPLICA_SHAPE, SEED + video, REPLICA_CACHED)
                                  for video in range(REPLICA_VIDEOS)]
    return out


def cached_run(experts, shape_name=CACHED_SHAPE, seed=SEED, settings=CACHED) -> tuple[torch.Tensor, list[bool]]:
    """The final latent and StepInfo.model_ran per step of a run with the step cache."""
    ran = []
    latent = denoise(experts, *job_inputs(shape_name, seed), settings, on_step=lambda info: ran.append(info.model_ran))
    return latent, ran


def start_ranks(world, model_dir, out_dir, loras):
    """Start `world` copies of this file as the ranks of one gloo group."""
    setup = dict(model_dir=str(model_dir), out_dir=str(out_dir), loras=loras)
    return start_gloo_ranks([__file__], world, setup, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def collect_ranks(procs, out_dir):
    failures = wait_ranks(procs, timeout=240)
    assert not failures, "\n".join(failures)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt") for rank in range(len(procs))]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, loras, tmp_path_factory):
    """{world size: [per-rank results]}: one launch per world size (run side by side), each
    running every scenario, because starting a process costs far more than a tiny run."""
    out = {world: tmp_path_factory.mktemp(f"ranks{world}") for world in SCENARIOS}
    started = {world: start_ranks(world, tiny_model_dir, out[world], loras) for world in SCENARIOS}
    return {world: collect_ranks(procs, out[world]) for world, (_, procs) in started.items()}


CASES = [(world, scenario, shape) for world in SCENARIOS for scenario in SCENARIOS[world] for shape in SHAPES]


@pytest.mark.parametrize("world,scenario,shape", CASES, ids=[f"{w}ranks-{s}-{t}".replace(" ", "") for w, s, t in CASES])
def test_parallel_latents_equal_single_process(runs, reference, world, scenario, shape):
    per_rank = [results[scenario]["latents"][shape] for results in runs[world]]
    degrees = SCENARIOS[world][scenario]
    dtype = degrees.get("dtype", torch.float32)
    expected = reference["loras" if degrees.get("loras") else dtype][shape]
    bf16_tol = BF16_RING_TOL if degrees.get("ring", 1) > 1 else BF16_TOL
    assert rel_l2(per_rank[0], expected) <= (TOL if dtype == torch.float32 else bf16_tol)
    for rank, latent in enumerate(per_rank[1:], start=1):  # every rank ends with the same latent
        assert torch.equal(latent, per_rank[0]), f"rank {rank} differs from rank 0"


def test_a_ring_in_bf16_stays_as_close_to_fp32_as_one_process_in_bf16(runs, reference):
    """The ring's extra bf16 rounding is noise, not drift: its distance to the fp32 result is about
    the one-process bf16 run's (measured 1.56e-3 and 1.70e-3 against 1.59e-3 and 1.68e-3)."""
    for shape in SHAPES:
        ring = runs[4][0]["ulysses x ring+fsdp bf16"]["latents"][shape]
        one = reference[torch.bfloat16][shape]
        assert rel_l2(ring, reference[torch.float32][shape]) <= 1.5 * rel_l2(one, reference[torch.float32][shape])


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_rank_holds_its_share_of_the_parameters(runs, world):
    model = WanModel(TINY.dit)
    total, block = module_bytes(model), module_bytes(model.blocks[0])
    for scenario in ("fsdp", "ulysses+fsdp", "ring+fsdp"):
        per_rank = [results[scenario]["param_bytes"] for results in runs[world]]
        assert sum(per_rank) == 2 * total  # both experts, each byte on exactly one rank
        for held in per_rank:
            assert abs(held - 2 * total / world) <= 2 * block  # each expert within one block of total/P
    unsharded = [results["ulysses"]["param_bytes"] for results in runs[world]]
    assert unsharded == [2 * total] * world  # the control: without FSDP every rank holds everything


def attention_inputs(length):
    g = torch.Generator().manual_seed(length)
    return [torch.randn(2, length, HEADS, 8, generator=g) for _ in range(3)]  # q, k, v [B, L, H, D]


SEQUENCE_CASES = [(world, scenario) for world in SCENARIOS for scenario, degrees in SCENARIOS[world].items()
                  if degrees.get("ulysses", 1) * degrees.get("ring", 1) > 1 and not degrees.get("fsdp")]


@pytest.mark.parametrize("world,scenario", SEQUENCE_CASES, ids=[f"{w}ranks-{s}".replace(" ", "")
                                                                 for w, s in SEQUENCE_CASES])
def test_sequence_parallel_attention_equals_full_attention_with_padding_masked(runs, world, scenario):
    """The attention seam alone (Ulysses all-to-all and/or ring, padded keys left out) on the ranks
    against a float64 softmax over the real tokens; every rank's gathered output is the same."""
    for length in ATTENTION_LENGTHS:
        expected, _ = float64_attention(*attention_inputs(length))
        outputs = [results[scenario]["attention"][length] for results in runs[world]]
        assert rel_l2(outputs[0], expected) <= ATTENTION_TOL, (length, rel_l2(outputs[0], expected))
        degrees = SCENARIOS[world][scenario]
        group = degrees.get("ulysses", 1) * degrees.get("ring", 1)
        for rank in range(1, world):  # the ranks of one sequence group gather the same tokens
            if rank // group == 0:
                assert torch.equal(outputs[rank], outputs[0])


def test_replicas_sample_other_videos_side_by_side(runs, reference):
    """2 replicas (ulysses 2 each) with FSDP over all 4 ranks: video i is seed + i, as one process
    gives it; the third video leaves replica 1 a repeat (dropped) so the all-gathers stay aligned."""
    for results in runs[4]:
        videos = results["replicas"]["videos"]
        assert len(videos) == REPLICA_VIDEOS
        for got, expected in zip(videos, reference["videos"]):
            assert rel_l2(got, expected) <= TOL
    assert not torch.equal(reference["videos"][0], reference["videos"][1])  # the seeds differ


def test_replicas_with_the_step_cache_agree_per_step_and_keep_each_video_exact(runs, reference):
    """The replicas' videos decide differently (asserted on the one-process runs), yet FSDP's
    all-gathers span every rank: a replica that would reuse still runs the forward while another
    runs (sampling/step_cache.py), so no rank waits forever and each video equals its own
    one-process cached run."""
    expected = reference["cached videos"]
    assert len({tuple(ran) for _latent, ran in expected}) > 1  # the decisions differ between the seeds
    for results in runs[4]:
        for got, (latent, _ran) in zip(results["replicas"]["cached_videos"], expected, strict=True):
            assert rel_l2(got, latent) <= TOL


RING_CASES = [(world, scenario) for world in SCENARIOS for scenario, degrees in SCENARIOS[world].items()
              if degrees.get("ring", 1) > 1 and "dtype" not in degrees]


@pytest.mark.parametrize("world,scenario", RING_CASES, ids=[f"{w}ranks-{s}".replace(" ", "") for w, s in RING_CASES])
def test_ring_bytes_are_what_the_communication_model_says(runs, world, scenario):
    """Bytes each rank's ring sends while sampling both shapes (4 steps, cond + uncond batched) equal
    benchmarks/bench_comm.py's ring_bytes, which projects them to A14B."""
    from bench_comm import ring_bytes

    from wan22_core.memory import video_tokens

    degrees = SCENARIOS[world][scenario]
    u, r, c = (degrees.get(name, 1) for name in ("ulysses", "ring", "cfg_parallel"))
    per_step = sum(ring_bytes(video_tokens(TINY.dit, *SHAPES[shape]), TINY.dit.dim, TINY.dit.num_layers, 2 // c, 4,
                              u, r) for shape in SHAPES)
    for results in runs[world]:
        assert results[scenario]["sent"]["batch_isend_irecv"] == SETTINGS.steps * per_step


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_gathers_the_next_block_before_the_current_one_runs(runs, world):
    """Explicit forward prefetch: in a steady-state forward, the root gathers its own weights and
    block 0's, and block 0 starts block 1's gather before it computes; nothing is gathered between
    the blocks. (FSDP2's implicit order would be gather, gather, block 0, gather, block 1.)"""
    for results in runs[world]:
        assert results["ulysses+fsdp"]["forward_order"] == ["gather", "gather", "gather", "block 0", "block 1"]


@pytest.mark.parametrize("world", sorted(SCENARIOS))
def test_fsdp_forward_records_are_forgotten_after_a_job(runs, world):
    """FSDP2 records each forward for a backward; after a job they are cleared (the worker calls
    forget_forward_records; the "fsdp" scenario checks the by-hand route for older torch), and
    the next job gives the same latent."""
    first = next(iter(SHAPES))
    for scenario, degrees in SCENARIOS[world].items():
        if not degrees.get("fsdp"):
            continue
        for results in runs[world]:
            before, after = results[scenario]["records"]
            assert before > 0 and after == 0, (scenario, before, after)
            assert torch.equal(results[scenario]["after_forgetting"], results[scenario]["latents"][first])


@pytest.mark.parametrize("scenario", CACHED_SCENARIOS)
def test_step_cache_on_two_ranks_takes_the_single_process_decisions(runs, reference, scenario):
    """Every rank decides from its replicated latent and velocity, with no communication: the same
    passes as one process, on every rank, and the same final latent."""
    expected, expected_ran = reference["cached"]
    assert not all(expected_ran)  # some passes are reused, so a different decision would show
    per_rank = [results[scenario]["cached"] for results in runs[2]]
    for rank, (latent, ran) in enumerate(per_rank):
        assert ran == expected_ran, f"rank {rank}"
        assert torch.equal(latent, per_rank[0][0]), f"rank {rank} differs from rank 0"
    assert rel_l2(per_rank[0][0], expected) <= TOL


def test_cli_parallel_flags_make_the_plan():
    from wan22_core.cli import build_parser
    from wan22_core.cli.commands import parallel_requested
    from wan22_core.cli.torchrun import parallel_plan

    def plan(*flags, world=4):
        return parallel_plan(build_parser().parse_args(["generate", *flags]), world_size=world, num_heads=40)

    made = plan("--ulysses", "2", "--cfg-parallel", "--fsdp", "--keep-gathered")
    assert (made.ulysses, made.ring, made.cfg_parallel, made.fsdp, made.reshard_after_forward) == (2, 1, 2, True, False)
    assert parallel_requested(build_parser().parse_args(["generate", "--ring", "2"]))
    assert not parallel_requested(build_parser().parse_args(["generate"]))
    # --sp auto (the default): every rank, Ulysses first, CFG-parallel where guidance is batched
    assert plan(world=6).describe() == "6 GPUs: CFG 2 x Ulysses 1 x Ring 3"
    assert plan("--no-batch-cfg", world=6).describe() == "6 GPUs: CFG 1 x Ulysses 2 x Ring 3"
    assert plan("--cfg-high", "1", world=6).cfg_parallel == 1  # a guidance of 1 runs no uncond pass to split
    assert plan("--ulysses", "2", "--ring", "3", "--fsdp", world=6).describe() == "6 GPUs: CFG 1 x Ulysses 2 x Ring 3"
    assert plan("--sp", "off", "--no-cfg-parallel", "--fsdp").describe() == (
        "4 GPUs: CFG 1 x Ulysses 1 x Ring 1 x 4 replicas, one video each")
    with pytest.raises(ValueError, match="--sp off splits no sequence but --ulysses 2"):
        plan("--sp", "off", "--ulysses", "2")
    with pytest.raises(ValueError, match="valid degrees: 1, 2, 4, 5, 8, 10, 20, 40"):
        plan("--ulysses", "3", world=3)
    with pytest.raises(ValueError, match="valid ring degrees with ulysses 1: 1, 2, 3, 6"):
        plan("--ring", "4", "--no-cfg-parallel", world=6)


def test_one_rule_says_what_the_ranks_refuse_and_accepts_the_rest():
    """plan.check_parallel_options: the torchrun CLI and the worker group (the node) refuse the
    same options with the same reasons; everything else is honoured on the ranks."""
    from wan22_core.config import ExpertOptions
    from wan22_core.parallel.plan import check_parallel_options, parallel_refusals

    accepted = [ExpertOptions(), ExpertOptions(dtype="bf16", attention="sdpa"), ExpertOptions(weight_dtype="fp16"),
                ExpertOptions(lora_mode="unmerged"), ExpertOptions(weight_dtype="fp8_e4m3fn_fast", compile=True)]
    for options in accepted:
        check_parallel_options(options, cfg_parallel=True)
    assert parallel_refusals(ExpertOptions(), cfg_parallel=False, batch_cfg=False) == []  # unbatched, no CFG split
    assert parallel_refusals(ExpertOptions(attention="sage"), cfg_parallel=False, ring=1) == []
    everything = ExpertOptions(weight_dtype="fp8_e4m3fn_fast", offload="block_swap", swap_blocks=3, compile=True,
                               attention="sage")
    reasons = parallel_refusals(everything, cfg_parallel=True, batch_cfg=False, ring=3)
    assert [reason.split(" (")[0] for reason in reasons] == [
        "offload='block_swap'", "swap_blocks=3", "batch_cfg=False with cfg_parallel",
        "attention='sage' with ring 3"]
    with pytest.raises(ValueError) as refused:
        check_parallel_options(everything, cfg_parallel=True, batch_cfg=False, ring=3)
    assert str(refused.value) == "not on the multi-GPU path: " + "; ".join(reasons) and "\n" not in str(refused.value)


def test_torchrun_cli_with_loras_and_a_step_cache_matches_single_process(tiny_model_dir, loras, tmp_path, capsys):
    """Both paths merge the same --lora-high/--lora-low: the one process into whole tensors, the
    ranks into their FSDP shards while reading them. Both take the same --step-cache decisions, and
    rank 0 alone reports them."""
    from wan22_core.cli import main

    lora_flags = [arg for expert, pairs in loras.items() for path, strength in pairs
                  for arg in (f"--lora-{expert}", f"{path}:{strength}")]
    common = ["generate", "--model-dir", str(tiny_model_dir), "--frames", "9", "--height", "48", "--width", "48",
              "--steps", "12", "--step-cache", "0.2", "--quiet", *lora_flags]
    torchrun = start_torchrun_generate([*common, "--ulysses", "2", "--fsdp", "--output", str(tmp_path / "two.mp4"),
                                        "--save-latents", str(tmp_path / "two.st")], cwd=tmp_path)
    assert main(common + ["--output", str(tmp_path / "one.mp4"), "--save-latents", str(tmp_path / "one.st")]) == 0
    output = torchrun.communicate(timeout=300)[0]
    assert torchrun.returncode == 0, output
    assert output.count("wrote ") == 1  # rank 0 alone writes
    passes = re.findall(r"^step cache: \d+ of 12 model passes run$", output, re.MULTILINE)
    assert passes == re.findall(r"^step cache: \d+ of 12 model passes run$", capsys.readouterr().err, re.MULTILINE)
    assert len(passes) == 1 and passes[0] != "step cache: 12 of 12 model passes run"
    two, one = load_file(tmp_path / "two.st")["latents"], load_file(tmp_path / "one.st")["latents"]
    assert rel_l2(two, one) <= TOL
    assert (tmp_path / "two.mp4").stat().st_size > 0


def test_torchrun_cli_splits_any_rank_count_and_replicas_write_other_videos(tiny_model_dir, tmp_path):
    """3 ranks with no degree flags: the ring takes all three (27 tokens, padded); 4 ranks as two
    replicas of ring 2 with --videos 2: v_00001 and v_00002 are seeds s and s + 1, as two
    one-process runs give them."""
    from wan22_core.cli import main

    common = ["generate", "--model-dir", str(tiny_model_dir), "--frames", "9", "--height", "48", "--width", "48",
              "--steps", "4", "--shift", "5", "--quiet", "--seed", "3"]
    three = start_torchrun_generate([*common, "--fsdp", "--output", str(tmp_path / "three.mp4"),
                                     "--save-latents", str(tmp_path / "three.st")], tmp_path, world=3)
    four = start_torchrun_generate([*common, "--fsdp", "--ulysses", "1", "--ring", "2", "--no-cfg-parallel",
                                    "--videos", "2", "--output", str(tmp_path / "four.mp4"),
                                    "--save-latents", str(tmp_path / "four.st")], tmp_path, world=4)
    assert main([*common, "--videos", "2", "--output", str(tmp_path / "one.mp4"),
                 "--save-latents", str(tmp_path / "one.st")]) == 0  # one after another
    second = [*common[:-1], "4"]
    assert main([*second, "--output", str(tmp_path / "seed4.mp4"), "--save-latents", str(tmp_path / "seed4.st")]) == 0
    one = [load_file(tmp_path / f"one_{i:05d}.st")["latents"] for i in (1, 2)]
    assert torch.equal(one[1], load_file(tmp_path / "seed4.st")["latents"])  # batch item 2 is the seed + 1 run
    for proc, line in ((three, "3 CPU ranks: CFG 1 x Ulysses 1 x Ring 3"),
                       (four, "4 CPU ranks: CFG 1 x Ulysses 1 x Ring 2 x 2 replicas, one video each")):
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output
        assert line in output.splitlines()
    assert rel_l2(load_file(tmp_path / "three.st")["latents"], one[0]) <= TOL
    for i in (1, 2):
        assert rel_l2(load_file(tmp_path / f"four_{i:05d}.st")["latents"], one[i - 1]) <= TOL
        assert (tmp_path / f"four_{i:05d}.mp4").stat().st_size > 0
    assert not (tmp_path / "four.mp4").exists()


# ---------------------------------------------------------------------------------------------
# What each rank process runs (this file executed as a script)


def forward_records(experts) -> int:
    """How many per-forward entries FSDP2 holds for the backward that inference never runs."""
    from torch.distributed.fsdp import FSDPModule

    from wan22_core.parallel.fsdp import fsdp_root

    count = 0
    for expert in map(fsdp_root, experts.experts.values()):
        count += len(expert._get_fsdp_state()._comm_ctx.post_forward_order)
        count += sum(len(group._post_forward_indices) for m in expert.modules() if isinstance(m, FSDPModule)
                     for group in m._get_fsdp_state()._fsdp_param_groups)
    return count


def sequence_attention(groups, length):
    """The ranks' SequenceParallelAttention on attention_inputs(length), gathered and unpadded."""
    from wan22_core.models.attention import AttentionKernel
    from wan22_core.parallel.sequence import SequenceLayout, SequenceParallelAttention, shard_tokens

    layout = SequenceLayout()
    layout.valid_len = length
    wrapper = SequenceParallelAttention(AttentionKernel(), groups.ulysses, groups.ring, layout)
    size, index = dist.get_world_size(groups.sequence), dist.get_rank(groups.sequence)
    no_rope = torch.ones(length, 1, 1)
    q, k, v = (shard_tokens(t.flatten(2), no_rope, index, size)[0].unflatten(2, (HEADS, -1))
               for t in attention_inputs(length))
    out = wrapper(q, k, v).contiguous()
    parts = [torch.empty_like(out) for _ in range(size)]
    dist.all_gather(parts, out, group=groups.sequence)
    return torch.cat(parts, dim=1)[:, :length]


def forward_order(experts):
    """What a steady-state forward of the high-noise expert does, in order: FSDP all-gathers and
    block starts (the hooks run after FSDP's own pre-forward, which issues the prefetches)."""
    model = experts.get("high")
    blocks = next(m for m in model.modules() if isinstance(m, WanModel)).blocks
    x, t = make_noise(0, *SHAPES["16 tokens"])[None], torch.tensor([999.0])
    context = torch.randn(1, 7, TINY.dit.text_dim)
    model(x, t, context)  # the first forward also gathers the head once
    order, gather = [], dist.all_gather_single
    hooks = [block.register_forward_pre_hook(lambda *_, i=i: order.append(f"block {i}"))
             for i, block in enumerate(blocks)]

    def counted(*args, **kwargs):
        order.append("gather")
        return gather(*args, **kwargs)
    dist.all_gather_single = counted
    try:
        model(x, t, context)
    finally:
        dist.all_gather_single = gather
        for hook in hooks:
            hook.remove()
    return order


def run_scenario(world, scenario, degrees, model_dir, loras, sent):
    from wan22_core.parallel.fsdp import forget_by_hand, forget_forward_records, fsdp_root
    from wan22_core.parallel.loading import load_expert_pair, local_parameter_bytes
    from wan22_core.parallel.mesh import init_groups
    from wan22_core.parallel.replicas import sample_videos

    cpu, degrees = torch.device("cpu"), dict(degrees)
    dtype = degrees.pop("dtype", torch.float32)
    with_loras = degrees.pop("loras", False)
    videos = degrees.pop("videos", 0)
    merged = {expert: lora_specs(pairs) if with_loras else [] for expert, pairs in loras.items()}
    groups = init_groups(ParallelPlan(world_size=world, num_heads=HEADS, **degrees), cpu)
    experts = load_expert_pair(model_dir / "high_noise_model", model_dir / "low_noise_model", groups, cpu, dtype,
                               merged["high"], merged["low"])
    if videos:  # the replicas' batch alone, exact and with the step cache
        return dict(videos=sample_videos(
            lambda video, _round: denoise(experts, *job_inputs(REPLICA_SHAPE, SEED + video), SETTINGS), groups, videos),
            cached_videos=sample_videos(
                lambda video, _round: cached_run(experts, REPLICA_SHAPE, SEED + video, REPLICA_CACHED)[0], groups,
                videos))
    sent.clear()
    result = dict(param_bytes=sum(local_parameter_bytes(e) for e in experts.experts.values()),
                  latents={name: denoise(experts, *job_inputs(name), SETTINGS) for name in SHAPES},
                  sent=dict(sent))  # bytes this rank sent, per kind of collective
    if world == 2 and scenario in CACHED_SCENARIOS:
        result["cached"] = cached_run(experts)
    if groups.plan.sequence_enabled and not degrees.get("fsdp"):
        result["attention"] = {length: sequence_attention(groups, length) for length in ATTENTION_LENGTHS}
    if scenario == "ulysses+fsdp":
        result["forward_order"] = forward_order(experts)
    if degrees.get("fsdp"):  # what the worker does after each job, by both routes
        result["records"] = [forward_records(experts)]
        if scenario == "fsdp":  # the route for a torch without reset_iter_state
            for expert in experts.experts.values():
                forget_by_hand(fsdp_root(expert))
        else:
            forget_forward_records(experts)
        result["records"].append(forward_records(experts))
        first = next(iter(SHAPES))
        result["after_forgetting"] = denoise(experts, *job_inputs(first), SETTINGS)
    return result


def rank_main(rank, world, port, model_dir, out_dir, loras):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_comm import count_collectives  # the communication model's own counter

    join_gloo_group(rank, world, port)
    sent = {}
    count_collectives(sent)
    scenarios = dict(SCENARIOS[world])
    if world == 4:
        scenarios["replicas"] = dict(ulysses=2, fsdp=True, videos=REPLICA_VIDEOS)
    results = {scenario: run_scenario(world, scenario, degrees, Path(model_dir), loras, sent)
               for scenario, degrees in scenarios.items()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(**json.loads(sys.argv[1]))
