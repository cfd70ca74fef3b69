"""The per-rank memory model (memory.rank_peak_bytes) and the refusal of plans that cannot fit.

Activations are checked as tests/test_memory.py checks one process: a TorchDispatchMode counts
every storage an op creates until it is freed, here during one forward of a tiny model as rank 0
of 2 under Ulysses and under CFG-parallel. The other rank is torch's fake process group (as in
benchmarks/bench_rank.py): collectives keep their real buffers and move nothing, so the count
is deterministic (on gloo a backend thread may keep a buffer a moment longer, which the model
does not count). Weights are parameter bytes (checked on real shards in test_fp8_shards.py).
The refusal runs with a fake device budget: a plan that cannot fit is refused before any
process starts, naming the cheapest change that fits; a plan that fits starts.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import children_of, start_torchrun_generate
from test_memory import ACTIVATION_TOLERANCE, CFG, TEXT_TOKENS, measured_activation_peak

from wan22_core.config import FRAMES, HEIGHT, TINY, WIDTH, DiTConfig
from wan22_core.memory import GIB, main as memory_main, multigpu_table, rank_peak_bytes
from wan22_core.parallel.plan import ParallelPlan, RankLoad, check_plan_fits

CASES = {  # name: (plan degrees, dtype, (frames, height, width)); |measured - model|: 0.005%, 0.014%, 0.3%,
    # ring 0.003%, 0.011%, Ulysses 2 x Ring 2 (rank 0 of 4) 0.005%
    "ulysses bf16": (dict(ulysses=2), torch.bfloat16, (17, 256, 384)),
    "ulysses fp32": (dict(ulysses=2), torch.float32, (9, 256, 256)),
    "cfg-parallel bf16": (dict(cfg_parallel=2), torch.bfloat16, (17, 256, 384)),
    "ring bf16": (dict(ring=2), torch.bfloat16, (17, 256, 384)),
    "ring fp32": (dict(ring=2), torch.float32, (9, 256, 256)),
    "ulysses x ring bf16": (dict(ulysses=2, ring=2), torch.bfloat16, (17, 256, 384)),
}
A14B = DiTConfig()  # the A14B transformer (config.A14B is the whole model set)


# ---------------------------------------------------------------------------------------------
# Activations of a rank, counted


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("rank_memory") / "peaks.json"
    run = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_rank_activations_match_accounting(measured, case):
    degrees, dtype, video = CASES[case]
    est = rank_peak_bytes(CFG, *video, world=world_of(degrees), fsdp=False, weight_bytes_per_param=4 if dtype == torch.float32 else 2,
                          text_tokens=TEXT_TOKENS, **degrees)
    assert est["activations"] == pytest.approx(measured[case], rel=ACTIVATION_TOLERANCE), (est, measured[case])


def world_of(degrees: dict) -> int:
    return degrees.get("ulysses", 1) * degrees.get("ring", 1) * degrees.get("cfg_parallel", 1)


def rank_main(out: str) -> None:
    """Rank 0 of each case's ranks (fake process group): the activation peak of one forward."""
    import torch.distributed as dist
    from bench_rank import fake_ranks

    from wan22_core.models.transformer import WanModel
    from wan22_core.parallel.mesh import init_groups
    from wan22_core.parallel.parallelize import parallelize

    torch.set_num_threads(1)
    peaks = {}
    for case, (degrees, dtype, video) in CASES.items():
        if dist.is_initialized() and dist.get_world_size() != world_of(degrees):
            dist.destroy_process_group()
        if not dist.is_initialized():
            fake_ranks(world_of(degrees))
        torch.manual_seed(0)
        plan = ParallelPlan(world_size=world_of(degrees), num_heads=CFG.num_heads, **degrees)
        runnable = parallelize(WanModel(CFG).eval().to(dtype), init_groups(plan, torch.device("cpu")))
        runnable.cfg = CFG  # what measured_activation_peak reads (CfgParallel wraps the model)
        peaks[case] = measured_activation_peak(runnable, *video, batch=2)  # CFG-parallel runs one row here
    Path(out).write_text(json.dumps(peaks))


# ---------------------------------------------------------------------------------------------
# The model at A14B sizes, and its command line


def test_a_rank_holds_its_share_of_the_weights_and_two_gathered_blocks():
    one = rank_peak_bytes(A14B, FRAMES, HEIGHT, WIDTH, world=1, fsdp=False, weight_bytes_per_param=1)
    two = rank_peak_bytes(A14B, FRAMES, HEIGHT, WIDTH, world=2, ulysses=2, weight_bytes_per_param=1)
    kept = rank_peak_bytes(A14B, FRAMES, HEIGHT, WIDTH, world=2, ulysses=2, weight_bytes_per_param=1,
                           reshard_after_forward=False)
    assert two["weights"] == one["weights"]  # both experts over 2 ranks = one expert
    assert two["local_tokens"] == 37800 and two["peak_at"] == "self_attn.recv"  # Ulysses' receive buffer
    assert kept["gathered"] == one["weights"]  # one whole expert stays gathered
    assert 1.0 * GIB < two["gathered"] < 1.2 * GIB  # root + head in bf16, two fp8 blocks


def test_two_24gb_cards_hold_720p_in_fp8_with_unbatched_cfg_only():
    """The README recipe's claim, and the refusal's advice for the batched plan."""
    plan, video = ParallelPlan(2, 2, fsdp=True), (FRAMES, HEIGHT, WIDTH)
    check_plan_fits(plan, RankLoad(A14B, video, 1, batch_cfg=False), 24 * GIB)
    with pytest.raises(ValueError) as batched:
        check_plan_fits(plan, RankLoad(A14B, video, 1), 24 * GIB, "cuda:1 (RTX 4090)")
    assert str(batched.value).startswith("2 GPUs (ulysses 2, fsdp) cannot hold 1280x720x81 with fp8 weights and "
                                         "batched CFG: each needs about 25.3 GiB")
    assert "cuda:1 (RTX 4090) has 24.0 GiB; cheapest change that fits: unbatched CFG" in str(batched.value)
    with pytest.raises(ValueError, match="cheapest change that fits: fp8 weights and unbatched CFG .*; also: 4 GPUs"):
        check_plan_fits(plan, RankLoad(A14B, video, 2), 24 * GIB)
    cfg_parallel = ParallelPlan(2, 1, cfg_parallel=2, fsdp=True)  # its batch is split already: no unbatched CFG to suggest
    with pytest.raises(ValueError, match=r"cheapest change that fits: 4 GPUs \(ulysses 2, cfg_parallel, fsdp\); also"):
        check_plan_fits(cfg_parallel, RankLoad(A14B, video, 1), 22 * GIB)
    with pytest.raises(ValueError, match="nothing tried fits"):
        check_plan_fits(plan, RankLoad(A14B, video, 2), 2 * GIB)
    assert check_plan_fits(plan, RankLoad(A14B, video, 2), None)["total"] > 24 * GIB  # CPU ranks: no budget


def test_the_docs_table_is_the_models_and_the_cli_prints_a_rank(capsys):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "multigpu.md").read_text()
    assert multigpu_table() in docs  # regenerate with: python -m wan22_core.memory --multigpu-table
    memory_main(["--gpus", "2", "--weights", "fp8", "--no-batch-cfg"])
    out = capsys.readouterr().out
    assert "1280x720x81 on 2 GPUs" in out and "a GPU needs 21.00 GiB" in out and "fits: 24, 32 GB" in out
    memory_main(["--gpus", "3", "--weights", "fp8", "--no-batch-cfg"])  # the engine's split: 40 heads, no Ulysses 3
    out = capsys.readouterr().out
    assert "on 3 GPUs (ulysses 1, ring 3, cfg_parallel 1" in out and "a GPU needs 17.22 GiB" in out


# ---------------------------------------------------------------------------------------------
# The refusal, with a fake device budget


def tiny_need(**changes) -> int:
    load = RankLoad(TINY.dit, (9, 48, 48), 4, **changes)  # fp32 weights on CPU ranks
    return load.need(ParallelPlan(2, 2, fsdp=True, num_heads=TINY.dit.num_heads))


def test_the_worker_group_refuses_a_plan_that_cannot_fit_before_starting_and_starts_one_that_fits(
        tiny_model_dir, monkeypatch):
    from wan22_core.parallel import ModelSpec, WorkerGroup, parallel_config
    from wan22_core.parallel import worker_group

    spec = ModelSpec(tiny_model_dir / "high_noise_model", tiny_model_dir / "low_noise_model")
    config = parallel_config("cpu:2", ulysses_degree=2, fsdp=True, num_heads=TINY.dit.num_heads)
    with pytest.raises(ValueError, match=r"not on the multi-GPU path: batch_cfg=False with cfg_parallel \(CFG-parallel splits the batched"):
        parallel_config("cpu:2", cfg_parallel=True, batch_cfg=False)
    budget = (tiny_need() + tiny_need(batch_cfg=False)) // 2  # unbatched fits, batched does not
    monkeypatch.setattr(worker_group, "device_budget", lambda devices: (budget, "cpu (fake small card)"))
    before = children_of(os.getpid())
    with pytest.raises(ValueError, match=r"2 GPUs \(ulysses 2, fsdp\) cannot hold 48x48x9 with fp32 weights and "
                                         r"batched CFG: .* cpu \(fake small card\) has .*; cheapest change that "
                                         r"fits: unbatched CFG"):
        WorkerGroup.get_or_create(spec, config, video=(9, 48, 48))
    assert children_of(os.getpid()) == before and WorkerGroup.current() is None  # nothing started
    unbatched = parallel_config("cpu:2", ulysses_degree=2, fsdp=True, num_heads=TINY.dit.num_heads, batch_cfg=False)
    group = WorkerGroup.get_or_create(spec, unbatched, video=(9, 48, 48))
    try:
        assert len(children_of(os.getpid()) - before) == 2 and group.alive
    finally:
        group.shutdown()


BUDGET_HOOK = """
import os, wan22_core.runtime as runtime
runtime.device_memory = lambda device: int(os.environ["WAN22_TEST_DEVICE_BYTES"])
"""


def test_torchrun_refuses_a_plan_that_cannot_fit_before_any_work(tiny_model_dir, tmp_path):
    """Every rank gets the smallest budget of all (an all-reduce), so all stop with the same line."""
    (tmp_path / "sitecustomize.py").write_text(BUDGET_HOOK)  # the fake budget, imported at interpreter start
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
               WAN22_TEST_DEVICE_BYTES=str(tiny_need(batch_cfg=False)))  # fits only unbatched
    run = start_torchrun_generate(
        ["generate", "--model-dir", str(tiny_model_dir), "--frames", "9", "--height", "48", "--width", "48",
         "--steps", "2", "--quiet", "--ulysses", "2", "--fsdp", "--output", str(tmp_path / "v.mp4")],
        tmp_path, stderr=subprocess.PIPE, env=env)
    stderr = run.communicate(timeout=300)[1]
    assert run.returncode != 0
    # one line per rank, the same (two processes writing at once may join them on one line)
    refusals = [part.splitlines()[0] for part in stderr.split("error: ")[1:]]
    assert len(refusals) == 2 and refusals[0] == refusals[1], stderr
    assert "cannot hold 48x48x9" in refusals[0] and "cheapest change that fits: unbatched CFG" in refusals[0]
    assert "text encoder" not in stderr and not (tmp_path / "v.mp4").exists()  # no work was done


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # bench_rank's fake ranks
    rank_main(sys.argv[1])
