"""Plans, token sharding, and parallel runs on 2 and 4 CPU ranks (gloo) against one process.

The multi-rank runs are real processes: this file re-executes itself as each rank (see the
bottom), every rank loads its shards of a tiny official-layout model from disk (in one scenario
with LoRAs merged into the shards) and samples with each plan; the test process compares the
final latents with `denoise` on the full model (with `apply_loras` for the LoRA scenario).
Tolerance: 1e-5 relative L2 in fp32 (the parallel paths only reorder float sums; Ulysses and
FSDP alone are bit-exact here), one bf16 ulp in bf16 (see BF16_TOL).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from procs import join_gloo_group, start_gloo_ranks, wait_ranks
from reference import rel_l2
from safetensors.torch import load_file

from wan22_core.checkpoints import load_dit
from wan22_core.config import TINY, SamplerSettings
from wan22_core.lora import LoraSpec, apply_loras
from wan22_core.models.transformer import WanModel
from wan22_core.parallel import ParallelPlan, parallel_config, parse_gpus, valid_ulysses_degrees
from wan22_core.parallel.ulysses import shard_tokens
from wan22_core.pipeline import denoise, make_noise
from wan22_core.placement import ExpertPair, module_bytes
from wan22_core.tiny import write_tiny_lora

TOL = 1e-5
# bf16: each token sees the same weights and inputs as in one process, and the residual stream,
# modulation and solver stay fp32; only kernels that block differently for another batch or
# sequence split may round an element differently, by one bf16 ulp (2^-8) where they do.
# Measured: 1.6e-7 on 4 ranks; rounding the fp32 stream to bf16 anywhere would be ~1e-3.
BF16_TOL = 1e-5
HEADS = TINY.dit.num_heads  # 4: allows 2- and 4-way Ulysses
SETTINGS = SamplerSettings(steps=4, shift=5.0)  # timesteps 999, 937 (high) | 833, 624 (low): both experts
SHAPES = {"16 tokens": (5, 32, 64), "27 tokens": (9, 48, 48)}  # (frames, height, width); 27 divides by neither P
SCENARIOS = {
    2: {"ulysses": dict(ulysses=2), "fsdp": dict(fsdp=True), "ulysses+fsdp": dict(ulysses=2, fsdp=True),
        "cfg": dict(cfg_parallel=2), "cfg+fsdp": dict(cfg_parallel=2, fsdp=True),
        "ulysses+fsdp bf16": dict(ulysses=2, fsdp=True, dtype=torch.bfloat16),
        "ulysses+fsdp loras": dict(ulysses=2, fsdp=True, loras=True)},
    4: {"ulysses": dict(ulysses=4), "fsdp": dict(fsdp=True), "ulysses+fsdp": dict(ulysses=4, fsdp=True),
        "cfg+ulysses": dict(cfg_parallel=2, ulysses=2),
        "cfg+ulysses+fsdp, kept gathered": dict(cfg_parallel=2, ulysses=2, fsdp=True, reshard_after_forward=False),
        "cfg+ulysses+fsdp bf16": dict(cfg_parallel=2, ulysses=2, fsdp=True, dtype=torch.bfloat16)},
}

# The step cache on 2 ranks: 12 steps (8 high-noise, 4 low-noise), so the high-noise expert can reuse
# after its 5 warm-up steps; measured in one process on the "16 tokens" shape: 10 of 12 passes run.
CACHED, CACHED_SHAPE = SamplerSettings(steps=12, step_cache=0.2), "16 tokens"
CACHED_SCENARIOS = ("ulysses+fsdp", "cfg")  # of the 2-rank ones


def job_inputs(shape_name):
    g = torch.Generator().manual_seed(11)
    positive = torch.randn(7, TINY.dit.text_dim, generator=g)
    negative = torch.randn(3, TINY.dit.text_dim, generator=g)
    return positive, negative, make_noise(5, *SHAPES[shape_name])


# ---------------------------------------------------------------------------------------------
# Plans and devices (no processes)


def test_plan_refuses_a_degree_that_does_not_divide_the_heads_and_lists_the_valid_ones():
    assert valid_ulysses_degrees(40) == [1, 2, 4, 5, 8, 10, 20, 40]
    with pytest.raises(ValueError, match=r"ulysses degree 3 does not divide the 40 attention heads; "
                                         r"valid degrees: 1, 2, 4, 5, 8, 10, 20, 40"):
        ParallelPlan(world_size=3, ulysses=3)
    with pytest.raises(ValueError, match="valid degrees: 1, 2, 4$"):
        ParallelPlan(world_size=8, ulysses=8, num_heads=HEADS)


def test_plan_degrees_must_fill_the_world():
    with pytest.raises(ValueError, match="multiple of 4"):
        ParallelPlan(world_size=6, ulysses=2, cfg_parallel=2)
    with pytest.raises(ValueError, match="repeat the same work.*enable fsdp"):
        ParallelPlan(world_size=4, ulysses=2)
    with pytest.raises(ValueError, match="cfg_parallel must be 1 or 2"):
        ParallelPlan(world_size=3, cfg_parallel=3)
    assert ParallelPlan(world_size=4, fsdp=True).replicas == 4  # FSDP only: every rank runs everything
    plan = ParallelPlan(world_size=10, ulysses=5, cfg_parallel=2)  # 2 x 5: allowed, as design.md says
    assert plan.ulysses_enabled and plan.cfg_parallel_enabled and not plan.fsdp


def test_plan_groups_keep_ulysses_ranks_adjacent():
    plan = ParallelPlan(world_size=8, ulysses=2, cfg_parallel=2, fsdp=True)  # 2 replicas
    assert plan.ulysses_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.cfg_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_parse_gpus_and_node_config():
    assert parse_gpus("cpu:2") == ("cpu", "cpu")
    for bad, message in [("cpu:0", "N >= 1"), ("cpu:x", "N >= 1"), ("0,0", "twice"), ("gpu", "not 'all'")]:
        with pytest.raises(ValueError, match=message):
            parse_gpus(bad)
    config = parallel_config("cpu:4", ulysses_degree=0, cfg_parallel=True, num_heads=HEADS)
    assert (config.plan.ulysses, config.plan.cfg_parallel, config.backend) == (2, 2, "gloo")
    assert parallel_config("cpu:4", fsdp=False).plan.ulysses == 4  # 0 = all ranks
    with pytest.raises(ValueError, match="even number of ranks"):
        parallel_config("cpu:3", cfg_parallel=True)
    with pytest.raises(ValueError, match="valid degrees"):
        parallel_config("cpu:3", ulysses_degree=3)


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
    return out


def cached_run(experts) -> tuple[torch.Tensor, list[bool]]:
    """The final latent and StepInfo.model_ran per step of a run with the step cache."""
    ran = []
    latent = denoise(experts, *job_inputs(CACHED_SHAPE), CACHED, on_step=lambda info: ran.append(info.model_ran))
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
    assert rel_l2(per_rank[0], expected) <= (TOL if dtype == torch.float32 else BF16_TOL)
    for rank, latent in enumerate(per_rank[1:], start=1):  # every rank ends with the same latent
        assert torch.equal(latent, per_rank[0]), f"rank {rank} differs from rank 0"


@pytest.mark.parametrize("world", sorted(SCENARIOS))
def test_fsdp_rank_holds_its_share_of_the_parameters(runs, world):
    model = WanModel(TINY.dit)
    total, block = module_bytes(model), module_bytes(model.blocks[0])
    for scenario in ("fsdp", "ulysses+fsdp"):
        per_rank = [results[scenario]["param_bytes"] for results in runs[world]]
        assert sum(per_rank) == 2 * total  # both experts, each byte on exactly one rank
        for held in per_rank:
            assert abs(held - 2 * total / world) <= 2 * block  # each expert within one block of total/P
    unsharded = [results["ulysses"]["param_bytes"] for results in runs[world]]
    assert unsharded == [2 * total] * world  # the control: without FSDP every rank holds everything


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

    args = build_parser().parse_args(["generate", "--ulysses", "2", "--cfg-parallel", "--fsdp", "--keep-gathered"])
    plan = parallel_plan(args, world_size=4, num_heads=40)
    assert (plan.ulysses, plan.cfg_parallel, plan.fsdp, plan.reshard_after_forward) == (2, 2, True, False)
    assert parallel_requested(args) and not parallel_requested(build_parser().parse_args(["generate"]))
    with pytest.raises(ValueError, match="valid degrees: 1, 2, 4, 5, 8, 10, 20, 40"):
        parallel_plan(build_parser().parse_args(["generate", "--ulysses", "3"]), world_size=3, num_heads=40)


def test_one_rule_says_what_the_ranks_refuse_and_accepts_the_rest():
    """plan.check_parallel_options: the torchrun CLI and the worker group (the node) refuse the
    same options with the same reasons; everything else is honoured on the ranks."""
    from wan22_core.config import ExpertOptions
    from wan22_core.parallel.plan import check_parallel_options, parallel_refusals

    accepted = [ExpertOptions(), ExpertOptions(dtype="bf16", attention="sdpa"), ExpertOptions(weight_dtype="fp16"),
                ExpertOptions(lora_mode="unmerged")]
    for options in accepted:
        check_parallel_options(options, cfg_parallel=True)
    assert parallel_refusals(ExpertOptions(), cfg_parallel=False, batch_cfg=False) == []  # unbatched, no CFG split
    everything = ExpertOptions(weight_dtype="fp8_e4m3fn_fast", offload="block_swap", swap_blocks=3, compile=True)
    reasons = parallel_refusals(everything, cfg_parallel=True, batch_cfg=False)
    assert [reason.split(" (")[0] for reason in reasons] == [
        "weight_dtype='fp8_e4m3fn_fast'", "compile=True", "offload='block_swap'", "swap_blocks=3",
        "batch_cfg=False with cfg_parallel"]
    with pytest.raises(ValueError) as refused:
        check_parallel_options(everything, cfg_parallel=True, batch_cfg=False)
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
    torchrun = subprocess.Popen(  # started first: it runs while this process makes the reference
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "wan22_core", *common, "--ulysses", "2", "--fsdp",
         "--output", str(tmp_path / "two.mp4"), "--save-latents", str(tmp_path / "two.st")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
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


def rank_main(rank, world, port, model_dir, out_dir, loras):
    from wan22_core.parallel.fsdp import forget_by_hand, forget_forward_records, fsdp_root
    from wan22_core.parallel.loading import load_expert_pair, local_parameter_bytes
    from wan22_core.parallel.mesh import init_groups

    join_gloo_group(rank, world, port)
    cpu, model_dir, results = torch.device("cpu"), Path(model_dir), {}
    for scenario, degrees in SCENARIOS[world].items():
        degrees = dict(degrees)
        dtype = degrees.pop("dtype", torch.float32)
        with_loras = degrees.pop("loras", False)
        merged = {expert: lora_specs(pairs) if with_loras else [] for expert, pairs in loras.items()}
        groups = init_groups(ParallelPlan(world_size=world, num_heads=HEADS, **degrees), cpu)
        experts = load_expert_pair(model_dir / "high_noise_model", model_dir / "low_noise_model", groups, cpu, dtype,
                                   merged["high"], merged["low"])
        results[scenario] = dict(
            param_bytes=sum(local_parameter_bytes(e) for e in experts.experts.values()),
            latents={name: denoise(experts, *job_inputs(name), SETTINGS) for name in SHAPES})
        if world == 2 and scenario in CACHED_SCENARIOS:
            results[scenario]["cached"] = cached_run(experts)
        if degrees.get("fsdp"):  # what the worker does after each job, by both routes
            results[scenario]["records"] = [forward_records(experts)]
            if scenario == "fsdp":  # the route for a torch without reset_iter_state
                for expert in experts.experts.values():
                    forget_by_hand(fsdp_root(expert))
            else:
                forget_forward_records(experts)
            results[scenario]["records"].append(forward_records(experts))
            first = next(iter(SHAPES))
            results[scenario]["after_forgetting"] = denoise(experts, *job_inputs(first), SETTINGS)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(**json.loads(sys.argv[1]))
