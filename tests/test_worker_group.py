"""The persistent worker group the sampler node drives, on CPU ranks (gpus="cpu:2", gloo).

Imported here the way ComfyUI imports the pack: under a mangled module name, so the workers
must bootstrap `wan22_core` on their own. Covers: parity with one process (<= 1e-5 relative,
fp32), progress and previews, reuse and rebuild, cancel at a common step, and faults (a rank
killed, raising, hanging; the controller killed) with no process left behind; the same for the
VAE decode on the group (each rank a band of the rows), and the seconds of each stage.
"""
import dataclasses
import importlib.machinery
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from procs import assert_all_gone, children_of, process_alive
from reference import rel_l2

from wan22_core.checkpoints import ModelFiles, load_dit, load_vae
from wan22_core.config import TINY, SamplerSettings
from wan22_core.lora import LoraSpec, apply_loras
from wan22_core.models.transformer import WanModel
from wan22_core.pipeline import decode_raw_to_video, denoise, make_noise
from wan22_core.placement import ExpertPair
from wan22_core.tiny import write_tiny_lora

PACK_ROOT = Path(__file__).resolve().parents[1]
MANGLED = str(PACK_ROOT).replace(".", "_x_")  # ComfyUI's sys.modules name for a pack: its path
TOL = 1e-5
HEARTBEAT_S = 4.0  # the fault bound under test (default 60 s); tiny steps beat every few ms
SETTINGS = SamplerSettings(steps=4, shift=5.0)  # 2 high-noise + 2 low-noise steps
# Imported by every worker at interpreter start (the tests put its folder on PYTHONPATH): makes
# rank `rank` raise inside its second prediction when the fault file exists. Production code
# carries no fault hooks.
FAULT_HOOK = """
import json, os
import torch.distributed as dist
import wan22_core.pipeline as pipeline

_predict, _calls = pipeline.predict_velocity, [0]

def predict_velocity(*args, **kwargs):
    if os.path.exists(os.environ["WAN22_TEST_FAULT_FILE"]):
        with open(os.environ["WAN22_TEST_FAULT_FILE"]) as f:
            fault = json.load(f)
        _calls[0] += 1
        if dist.get_rank() == fault["rank"] and _calls[0] == 2:
            raise RuntimeError("injected fault")
    return _predict(*args, **kwargs)

pipeline.predict_velocity = predict_velocity
"""


def import_mangled():
    """wan22_core as ComfyUI's pack loading leaves it: a sub-package of a module whose name is
    the pack's path with "." replaced by "_x_", which no child process could import."""
    if MANGLED not in sys.modules:
        spec = importlib.machinery.ModuleSpec(MANGLED, None, is_package=True)
        spec.submodule_search_locations = [str(PACK_ROOT)]
        sys.modules[MANGLED] = importlib.util.module_from_spec(spec)
    return (importlib.import_module(f"{MANGLED}.wan22_core.parallel"),
            importlib.import_module(f"{MANGLED}.wan22_core.errors"))


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """Model files, the mangled package, the fault hook, and the single-process reference."""
    root, model_dir = tmp_path_factory.mktemp("group"), tiny_model_dir
    hook_dir = root / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(FAULT_HOOK)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "WAN22_TEST_FAULT_FILE")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), saved["PYTHONPATH"]]))
    os.environ["WAN22_TEST_FAULT_FILE"] = str(root / "fault.json")

    g = torch.Generator().manual_seed(3)
    positive, negative = torch.randn(6, TINY.dit.text_dim, generator=g), torch.randn(4, TINY.dit.text_dim, generator=g)
    noise = make_noise(9, frames=9, height=48, width=48)  # 27 tokens: padded for 2 ranks
    experts = ExpertPair(load_dit(model_dir / "high_noise_model"), load_dit(model_dir / "low_noise_model"),
                         torch.device("cpu"))
    parallel, errors = import_mangled()
    vae_path = ModelFiles.from_model_dir(model_dir).vae
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(2, 16, 3, 7, 5, generator=g)  # 2 videos of 9 frames; 7 latent rows: bands of 4 and 3
    reference_vae = load_vae(vae_path)
    yield dict(parallel=parallel, errors=errors, fault_file=root / "fault.json", model_dir=model_dir, experts=experts,
               vae=importlib.import_module(f"{MANGLED}.wan22_core.checkpoints").load_vae(vae_path), raw=raw,
               frames=torch.cat([decode_raw_to_video(reference_vae, item) for item in raw]),
               spec=parallel.ModelSpec(model_dir / "high_noise_model", model_dir / "low_noise_model"),
               job=parallel.Job(positive, negative, noise, SETTINGS),
               reference=denoise(experts, positive, negative, noise, SETTINGS))
    group = parallel.WorkerGroup.current()
    if group is not None:
        group.shutdown()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def fsdp_shard_bytes(cfg, rank: int, world: int) -> int:
    """fp32 bytes of one expert that FSDP2 leaves on `rank`: rows [rank * ceil(n/world), ...) of
    every parameter (torch.chunk layout), counted from the model's shapes."""
    with torch.device("meta"):
        params = list(WanModel(cfg).parameters())
    per_rank = [math.ceil(p.shape[0] / world) for p in params]
    return sum(max(0, min(p.shape[0], (rank + 1) * n) - rank * n) * p[0].numel() * 4 for p, n in zip(params, per_rank))


def config(env, heartbeat=HEARTBEAT_S):
    return env["parallel"].parallel_config("cpu:2", ulysses_degree=2, fsdp=True, num_heads=TINY.dit.num_heads,
                                           heartbeat_timeout=heartbeat)


def test_group_started_under_a_mangled_module_name_matches_single_process(env):
    statuses, steps = {}, []
    group = env["parallel"].WorkerGroup.get_or_create(env["spec"], config(env),
                                                      on_status=lambda rank, s: statuses.__setitem__(rank, s))
    assert statuses == {0: "ready", 1: "ready"}
    assert group.parameter_bytes == {rank: 2 * fsdp_shard_bytes(TINY.dit, rank, 2) for rank in (0, 1)}
    latent = group.run(env["job"], on_step=steps.append)
    assert rel_l2(latent, env["reference"]) <= TOL
    assert [(s.index, s.expert) for s in steps] == [(0, "high"), (1, "high"), (2, "low"), (3, "low")]
    assert steps[-1].latent.shape == env["reference"].shape and torch.equal(steps[-1].latent, latent)
    assert steps[0].denoised.shape == latent.shape  # the preview input
    assert env["parallel"].WorkerGroup.get_or_create(env["spec"], config(env)) is group  # kept across jobs
    # batch_cfg travels with each job: switching it keeps the ranks (and gives the same video)
    unbatched = dataclasses.replace(config(env), batch_cfg=False)
    assert env["parallel"].WorkerGroup.get_or_create(env["spec"], unbatched) is group
    assert group.config.batch_cfg is False and rel_l2(group.run(env["job"]), env["reference"]) <= TOL


def test_lora_changes_re_merge_the_live_shards_and_match_apply_loras(env, tmp_path):
    """A LoRA change on a live Ulysses+FSDP group re-merges every rank's shards in place (same
    processes, no checkpoint read); each state equals one process with `apply_loras`
    (<= 1e-5 relative, fp32). Merging while loading is covered by test_parallel.py."""
    parallel = env["parallel"]
    lora_spec = importlib.import_module(f"{MANGLED}.wan22_core.lora").LoraSpec  # the group's own class
    group = parallel.WorkerGroup.get_or_create(env["spec"], config(env))
    pids, statuses = group.pids, []
    model = load_dit(env["spec"].high_noise)
    # the head too: FSDP keeps it gathered after a forward, so a re-merge must release it first
    targets = [n for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]
    comfy = write_tiny_lora(tmp_path / "comfy.safetensors", model, "comfy", seed=1, targets=targets + ["head.head"]).path
    # lightx2v also patches biases, norm3 and the [1, 6, dim] modulation, of which rank 1 holds no rows
    lightx2v = write_tiny_lora(tmp_path / "lightx2v.safetensors", model, "lightx2v", seed=2).path
    states = [([(comfy, 0.8)], [(lightx2v, 1.0), (comfy, -0.5)]), ([(comfy, 0.3)], []), ([], [])]
    for high, low in states:
        spec = replace(env["spec"], loras_high=tuple(lora_spec(*x) for x in high),
                       loras_low=tuple(lora_spec(*x) for x in low))
        again = parallel.WorkerGroup.get_or_create(spec, config(env), lambda rank, s: statuses.append(s))
        assert again is group and group.spec == spec
        assert [r.strength for r in group.lora_reports["low"]] == [s for _, s in low]
        experts = []
        for path, loras in ((spec.high_noise, high), (spec.low_noise, low)):
            experts.append(load_dit(path))
            apply_loras(experts[-1], [LoraSpec(*x) for x in loras])
        job = env["job"]
        expected = denoise(ExpertPair(*experts, torch.device("cpu")), job.positive, job.negative, job.noise, SETTINGS)
        assert rel_l2(group.run(job), expected) <= TOL, (high, low)
    assert group.pids == pids and "merging LoRAs" in statuses
    assert not [s for s in statuses if s.startswith("loading")]


def test_the_step_cache_settings_reach_the_ranks_and_their_decisions_reach_on_step(env):
    """The job's settings carry the threshold, every rank decides as one process does, and rank 0's
    step messages carry model_ran."""
    cached = SamplerSettings(steps=12, step_cache=0.2)  # 8 high-noise steps: some reused after the warm-up
    group = env["parallel"].WorkerGroup.get_or_create(env["spec"], config(env))
    steps, expected_ran = [], []
    latent = group.run(replace(env["job"], settings=cached), on_step=steps.append)
    job = env["job"]
    expected = denoise(env["experts"], job.positive, job.negative, job.noise, cached,
                       on_step=lambda info: expected_ran.append(info.model_ran))
    assert not all(expected_ran)  # measured: 10 of 12 passes run
    assert [s.model_ran for s in steps] == expected_ran
    assert rel_l2(latent, expected) <= TOL


def test_cancel_stops_every_rank_at_the_same_step(env):
    group = env["parallel"].WorkerGroup.get_or_create(env["spec"], config(env))
    seen = []
    with pytest.raises(env["errors"].Cancelled, match="before step 3/4"):
        group.run(env["job"], on_step=seen.append, should_cancel=lambda: len(seen) >= 2)
    assert group.last_steps == {0: 2, 1: 2}
    assert rel_l2(group.run(env["job"]), env["reference"]) <= TOL  # the group survives a cancel


def test_decode_on_the_group_equals_one_process_and_reports_each_stage(env):
    group = env["parallel"].WorkerGroup.get_or_create(env["spec"], config(env))
    group.run(env["job"])
    seen = []
    frames = group.decode(env["vae"], env["raw"], on_frame=lambda index, total: seen.append((index, total)))
    assert frames.shape == env["frames"].shape and rel_l2(frames, env["frames"]) <= TOL  # measured 1.1e-7
    assert seen == [(index, 6) for index in range(6)]  # 2 videos x 3 latent frames, from rank 0
    assert set(group.stage_seconds) == {"start", "load", "sampling", "decode"}
    assert all(seconds > 0 for seconds in group.stage_seconds.values())
    assert re.fullmatch(r"start [\d.]+ s \(load [\d.]+ s\), sampling [\d.]+ s, decode [\d.]+ s", group.stage_line())


def test_decode_cancel_stops_every_rank_before_the_same_frame_and_refusals_keep_the_group(env):
    group = env["parallel"].WorkerGroup.get_or_create(env["spec"], config(env))
    pids, seen = group.pids, []
    with pytest.raises(env["errors"].Cancelled, match="before latent frame 3 of 6"):
        group.decode(env["vae"], env["raw"], on_frame=lambda index, total: seen.append(index),
                     should_cancel=lambda: len(seen) >= 2)
    assert group.last_steps == {0: 2, 1: 2}
    with pytest.raises(ValueError, match="a latent 1 row high cannot be split over 2 ranks"):
        group.decode(env["vae"], env["raw"][..., :1, :])  # refused before any rank is asked
    assert rel_l2(group.decode(env["vae"], env["raw"]), env["frames"]) <= TOL
    assert group.alive and group.pids == pids


def test_a_job_on_one_expert_only_keeps_the_group(env):
    """boundary 0: every step on the high-noise expert, the low-noise one never runs a forward (as
    with few steps, or a start latent at low denoise). Clearing FSDP2's records after the job used
    to fail on the unused expert and end the group."""
    group = env["parallel"].WorkerGroup.get_or_create(env["spec"], config(env))
    pids, settings = group.pids, SamplerSettings(steps=2, boundary=0.0)
    job = replace(env["job"], settings=settings)
    experts = ExpertPair(load_dit(env["model_dir"] / "high_noise_model"), load_dit(env["model_dir"] / "low_noise_model"),
                         torch.device("cpu"))
    expected = denoise(experts, job.positive, job.negative, job.noise, settings)
    assert rel_l2(group.run(job), expected) <= TOL
    assert group.alive and group.pids == pids


def test_sigkill_of_a_rank_mid_sampling_is_a_clear_error_and_tears_down(env):
    parallel = env["parallel"]
    group = parallel.WorkerGroup.get_or_create(env["spec"], config(env))
    pids = group.pids

    def kill_rank_1(step):
        if step.index == 1:
            os.kill(pids[1], signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(parallel.WorkerGroupError, match=r"rank 1 died \(killed by signal SIGKILL\)") as err:
        group.run(env["job"], on_step=kill_rank_1)
    assert time.monotonic() - start < HEARTBEAT_S  # noticed at once, not by the heartbeat bound
    assert err.value.rank == 1 and "next run starts a fresh one" in str(err.value)
    assert not group.alive and parallel.WorkerGroup.current() is None
    assert_all_gone(pids)


def test_sigkill_of_a_rank_mid_decode_is_a_clear_error_and_tears_down(env):
    parallel = env["parallel"]
    group = parallel.WorkerGroup.get_or_create(env["spec"], config(env))  # fresh after the kill above
    pids = group.pids

    def kill_rank_1(index, total):
        if index == 1:
            os.kill(pids[1], signal.SIGKILL)

    with pytest.raises(parallel.WorkerGroupError, match=r"failed while decoding: rank 1 died \(killed by signal "
                                                        r"SIGKILL\)"):
        group.decode(env["vae"], env["raw"], on_frame=kill_rank_1)
    assert not group.alive and parallel.WorkerGroup.current() is None
    assert_all_gone(pids)


def test_a_rank_that_raises_reports_its_traceback_and_the_next_group_works(env):
    parallel = env["parallel"]
    group = parallel.WorkerGroup.get_or_create(env["spec"], config(env))  # fresh after the kill above
    assert rel_l2(group.run(env["job"]), env["reference"]) <= TOL
    env["fault_file"].write_text(json.dumps({"rank": 1}))
    try:
        with pytest.raises(parallel.WorkerGroupError, match="rank 1 raised RuntimeError: injected fault") as err:
            group.run(env["job"])
    finally:
        env["fault_file"].unlink()
    assert err.value.rank == 1 and "Traceback" in err.value.traceback and "predict_velocity" in err.value.traceback
    assert "Traceback from rank 1" in str(err.value)
    assert_all_gone(group.pids)


def test_a_hung_rank_is_detected_within_the_heartbeat_bound(env):
    parallel = env["parallel"]
    old = parallel.WorkerGroup.current()
    group = parallel.WorkerGroup.get_or_create(env["spec"], config(env, heartbeat=HEARTBEAT_S + 0.5))
    assert group is not old  # a changed config rebuilds the group
    assert rel_l2(group.run(env["job"]), env["reference"]) <= TOL
    pids, stopped_at = group.pids, []

    def freeze_rank_1(step):
        if step.index == 0:
            os.kill(pids[1], signal.SIGSTOP)  # alive but makes no progress, like a deadlock
            stopped_at.append(time.monotonic())

    with pytest.raises(parallel.WorkerGroupError, match=r"rank 1 sent no heartbeat for .* s, not even from its "
                                                        r"watchdog thread \(the process is frozen") as err:
        group.run(env["job"], on_step=freeze_rank_1)
    assert "rank 0 is alive but made no progress" in str(err.value)  # told apart from the frozen rank
    waited = time.monotonic() - stopped_at[0]
    assert HEARTBEAT_S < waited < HEARTBEAT_S + 5, waited
    assert err.value.rank == 1
    assert_all_gone(pids)  # SIGKILL ends stopped processes too


def test_workers_exit_when_the_controller_is_killed(env):
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(PACK_ROOT)!r})
        from wan22_core.parallel import ModelSpec, WorkerGroup, parallel_config
        group = WorkerGroup.get_or_create(ModelSpec({env['spec'].high_noise!r}, {env['spec'].low_noise!r}),
                                          parallel_config("cpu:2", fsdp=True, num_heads={TINY.dit.num_heads}))
        print(json.dumps(group.pids), flush=True)
        time.sleep(600)
    """)
    controller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(controller.stdout.readline())
        assert all(process_alive(p) for p in pids)
    finally:
        controller.kill()
        controller.wait()
    assert_all_gone(pids, within=5.0)
    # The killed controller could not remove its rendezvous folder; the next group start does.
    from wan22_core.parallel.worker_group import RENDEZVOUS_PREFIX, sweep_stale_rendezvous

    def rendezvous_of(pid):
        return list(Path(tempfile.gettempdir()).glob(f"{RENDEZVOUS_PREFIX}{pid}-*"))

    assert len(rendezvous_of(controller.pid)) == 1
    live = tempfile.mkdtemp(prefix=f"{RENDEZVOUS_PREFIX}{os.getpid()}-")  # a live controller's: kept
    try:
        sweep_stale_rendezvous()
        assert rendezvous_of(controller.pid) == [] and os.path.isdir(live)
    finally:
        shutil.rmtree(live)


def test_invalid_degrees_fail_before_any_process_starts(env):
    parallel = env["parallel"]
    before = set(children_of(os.getpid()))
    with pytest.raises(ValueError, match="valid degrees: 1, 2, 4, 5, 8, 10, 20, 40"):
        parallel.parallel_config("cpu:3", ulysses_degree=3)
    # valid for A14B's 40 heads, but this model has 4: refused from the checkpoint headers
    eight_way = parallel.parallel_config("cpu:8", ulysses_degree=8, fsdp=True)
    with pytest.raises(ValueError, match="ulysses degree 8 does not divide the 4 attention heads"):
        parallel.WorkerGroup.get_or_create(env["spec"], eight_way)
    assert set(children_of(os.getpid())) == before


@pytest.mark.parametrize("parent,expected", [
    ({}, "expandable_segments:True"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}, "expandable_segments:True"),  # ComfyUI's
    ({"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.8"}, "garbage_collection_threshold:0.8"),
])
def test_ranks_run_the_native_allocator_unless_the_user_chose_one(parent, expected):
    from wan22_core.parallel.worker_group import LOOPBACK, rank_environment
    from wan22_core.runtime import ALLOC_CONF

    env = rank_environment({"PATH": "/bin", **parent})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == expected and ALLOC_CONF == "expandable_segments:True"
    assert env["PATH"] == "/bin" and env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == LOOPBACK
    assert rank_environment({"GLOO_SOCKET_IFNAME": "eth1"})["GLOO_SOCKET_IFNAME"] == "eth1"  # the user's wins


def test_ranks_keep_the_newer_allocator_variable_unless_it_names_cuda_malloc_async():
    from wan22_core.parallel.worker_group import rank_environment

    env = rank_environment({"PYTORCH_ALLOC_CONF": "expandable_segments:False"})
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:False" and "PYTORCH_CUDA_ALLOC_CONF" not in env
    env = rank_environment({"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"})
    assert "PYTORCH_ALLOC_CONF" not in env and env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
