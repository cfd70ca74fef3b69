"""Issue 8's gaps: bad inputs that earlier test files did not cover, out of memory, a full disk,
Ctrl-C in the controller, and the security rules (loopback-only sockets, no pickle from files,
nothing from a workflow reaches a shell or eval).

docs/errors.md lists every case of the issue with its message and the test that covers it; the
cases already tested elsewhere are cited there, not repeated here.
"""
from __future__ import annotations

import ast
import errno
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from fakes import ConstantExpert, dit_tensors, save_dit
from safetensors.torch import save_file

from wan22_core import video
from wan22_core.checkpoints import CheckpointError, check_expert_pair, load_dit, load_vae, read_state_dict
from wan22_core.config import TINY, SamplerSettings
from wan22_core.errors import NumericalError, OutOfMemory, Wan22Error
from wan22_core.models.tokenizer import Tokenizer, clean_text
from wan22_core.parallel import ModelSpec, WorkerGroup, parallel_config, parse_gpus
from wan22_core.pipeline import check_video_size, denoise, make_noise, release_cached_memory
from wan22_core.placement import ExpertPair
from wan22_core.runtime import check_backend, resolve_device
from wan22_core.sampling.schedule import partial_schedule
from wan22_core.tiny import train_tiny_sentencepiece
from procs import assert_all_gone, children_of, in_unprivileged_child

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SETTINGS = SamplerSettings(steps=3)  # shift 12: timesteps 999, 959 (high-noise expert), 856 (low)


def embeds(length=3, dim=4):
    return torch.ones(length, dim), torch.zeros(2, dim)


class RunsOutOfMemory(ConstantExpert):
    """Works for `good_calls` forwards, then allocates an activation and fails as `fail()` does.

    Keeps weak references to that activation and to the latent it was given, so a test can see
    whether they were freed.
    """

    def __init__(self, fail, good_calls=1):
        super().__init__(0.1)
        self.fail, self.good_calls, self.refs = fail, good_calls, []

    def forward(self, x, t, context):
        if self.good_calls:
            self.good_calls -= 1
            return super().forward(x, t, context)
        activation = torch.ones(256, 1024)  # 1 MiB that only this frame holds
        latent = x if x._base is None else x._base  # x is a view of the loop's latent
        self.refs += [weakref.ref(activation), weakref.ref(latent)]
        self.fail()


def cuda_out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                 "of 79.19 GiB of which 1.12 GiB is free.")


def cpu_out_of_memory():
    torch.empty(1 << 50)  # 4 PiB: more than any address space, so the CPU allocator really fails


# ---------------------------------------------------------------------------------------------
# Sampler inputs


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=True), "steps must be an integer >= 1, got True"),
    (dict(steps=10**6), "steps must be at most 10000, got 1000000"),
    (dict(cfg_high=float("inf")), "cfg_high must be a finite number >= 0, got inf"),
    (dict(cfg_low=True), "cfg_low must be a finite number >= 0, got True"),
    (dict(boundary=float("nan")), r"boundary must be in \[0, 1\], got nan"),
    (dict(boundary=True), r"boundary must be in \[0, 1\], got True"),
])
def test_sampler_settings_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings(**kwargs).validate()


def test_frames_beyond_the_rope_table_are_refused():
    check_video_size(4093, 16, 16)  # 1024 latent frames: the last row of the RoPE table
    with pytest.raises(ValueError, match="frames must be at most 4093, got 4097"):
        check_video_size(4097, 16, 16)


@pytest.mark.parametrize("strength", [0, -0.5, 1.5, float("nan"), float("inf")])
def test_denoise_strength_outside_zero_one_is_refused(strength):
    noise = make_noise(0, 5, 32, 32)
    pair = ExpertPair(ConstantExpert(0.0), ConstantExpert(0.0), CPU)
    with pytest.raises(ValueError, match=r"denoise must be a number in \(0, 1\]"):
        denoise(pair, *embeds(), noise, SETTINGS, latent=torch.zeros_like(noise), denoise_strength=strength)


def test_a_denoise_strength_that_needs_a_huge_schedule_is_refused():
    noise = make_noise(0, 5, 32, 32)
    pair = ExpertPair(ConstantExpert(0.0), ConstantExpert(0.0), CPU)
    with pytest.raises(ValueError, match=r"denoise 1e-09 with 3 steps needs a schedule of steps / denoise = "
                                         r"3000000000 steps, more than 10000; use denoise >= 0.0003"):
        denoise(pair, *embeds(), noise, SETTINGS, latent=torch.zeros_like(noise), denoise_strength=1e-9)


def test_partial_schedule_refuses_a_denoise_so_small_the_schedule_overflows():
    with pytest.raises(ValueError, match="denoise"):
        partial_schedule(1, 5.0, "euler", 5e-324)  # 1 / 5e-324 is inf: once an OverflowError


def test_latent_noise_and_embeddings_of_the_wrong_shape_are_refused():
    noise = make_noise(0, 5, 32, 32)  # [16, 2, 4, 4]
    pair = ExpertPair(ConstantExpert(0.0), ConstantExpert(0.0), CPU)
    with pytest.raises(ValueError, match=r"input latent has shape \(48, 2, 4, 4\), expected \(16, 2, 4, 4\)"):
        denoise(pair, *embeds(), noise, SETTINGS, latent=torch.zeros(48, 2, 4, 4))
    with pytest.raises(ValueError, match=r"noise must have shape \[16, latent frames, height/8, width/8\].*"
                                         r"got \[48, 2, 4, 4\]"):
        denoise(pair, *embeds(), torch.zeros(48, 2, 4, 4), SETTINGS)
    with pytest.raises(ValueError, match=r"positive must be text embeddings \[tokens, dim\].*got \[1, 3, 4\]"):
        denoise(pair, torch.ones(1, 3, 4), torch.zeros(2, 4), noise, SETTINGS)


# ---------------------------------------------------------------------------------------------
# Text


def test_prompt_bytes_that_are_not_utf8_are_refused_with_the_fix():
    text = b"a fox \xff in snow".decode("utf-8", errors="surrogateescape")  # what Python makes of bad bytes
    with pytest.raises(ValueError, match=r"has '\\udcff' at character 6, which is not text.*save the prompt as UTF-8"):
        clean_text(text)
    tokenizer = Tokenizer.from_bytes(train_tiny_sentencepiece())
    with pytest.raises(ValueError, match="not UTF-8"):  # not SentencePiece's "Unable to cast" RuntimeError
        tokenizer([text])
    assert tokenizer(["a fox \ufffd in snow"])[1].sum() > 1  # a real replacement character is fine


# ---------------------------------------------------------------------------------------------
# Files


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path / 'nope.safetensors'}"):
        load_dit(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_an_unreadable_checkpoint_says_permission_denied(world_readable_dir, suffix):
    path = world_readable_dir / f"vae{suffix}"
    if suffix == ".pth":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        save_file({"w": torch.zeros(2)}, str(path))
    path.chmod(0)
    error = in_unprivileged_child(lambda: read_state_dict(path))
    # safetensors alone says "No such file or directory" here
    assert error == (f"CheckpointError: cannot open {path}: Permission denied; make it readable by the user "
                     "running this process")


@pytest.mark.parametrize("damage", ["random bytes", "flipped bytes", "empty"])
def test_a_corrupt_pth_is_refused_without_a_traceback_from_torch(tmp_path, damage):
    path = tmp_path / "vae.pth"
    torch.save({"conv2.weight": torch.zeros(4, 4), "x": torch.ones(3)}, path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    if damage == "random bytes":
        data = bytearray(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif damage == "flipped bytes":
        for i in rng.integers(0, len(data), 40):
            data[i] ^= 0x5A
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"cannot read .*vae\.pth: .*(corrupt|truncated)"):
        load_vae(path)


def test_damaged_folder_json_is_a_checkpoint_error(tmp_path):
    folder = tmp_path / "high_noise_model"
    folder.mkdir()
    save_dit(folder / "model-00001-of-00001.safetensors", TINY.dit)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')  # cut off while downloading
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: .*download it again"):
        load_dit(folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="has no weight_map"):
        load_dit(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "config.json").write_text("[4]")
    with pytest.raises(CheckpointError, match="config.json holds a JSON list, not an object"):
        load_dit(folder)


def test_a_header_whose_shapes_disagree_with_the_model_is_refused_before_reading(tmp_path, monkeypatch):
    # Same byte count, transposed: safetensors' own checks pass; the weights would be garbage.
    transposed = {"blocks.1.ffn.0.weight": torch.zeros(TINY.dit.dim, TINY.dit.ffn_dim)}
    spliced = save_dit(tmp_path / "spliced.safetensors", TINY.dit, transposed)
    monkeypatch.setattr("wan22_core.checkpoints.reading._read_bytes", lambda *a: pytest.fail("read tensor data"))
    with pytest.raises(CheckpointError, match=r"tensor blocks.1.ffn.0.weight has shape \[64, 128\] where a DiT "
                                              r"of dim 64 and ffn_dim 128 has \[128, 64\]"):
        load_dit(spliced)
    tensors = {**dit_tensors(TINY.dit), **transposed}
    save_dit(spliced, TINY.dit, {f"blocks.7.{k[9:]}": v for k, v in tensors.items() if k.startswith("blocks.1.")})
    with pytest.raises(CheckpointError, match=r"blocks go up to blocks.7 but 5 are missing \(e.g. blocks.2\)"):
        load_dit(spliced)


def test_experts_of_different_sizes_are_refused_as_a_pair(tmp_path):
    high = save_dit(tmp_path / "high.safetensors", TINY.dit)
    low = save_dit(tmp_path / "low.safetensors", replace(TINY.dit, num_layers=3))
    with pytest.raises(CheckpointError, match=r"experts do not belong together: high-noise high.safetensors is dim "
                                              r"64, 2 layers.*low-noise low.safetensors is dim 64, 3 layers"):
        check_expert_pair(high, low)


def test_the_worker_group_refuses_mismatched_experts_before_starting(tmp_path):
    high = save_dit(tmp_path / "high.safetensors", TINY.dit)
    low = save_dit(tmp_path / "low.safetensors", replace(TINY.dit, num_layers=3))
    before = set(children_of(os.getpid()))
    with pytest.raises(CheckpointError, match="experts do not belong together"):
        WorkerGroup.get_or_create(ModelSpec(high, low), parallel_config("cpu:2", ulysses_degree=2, fsdp=True))
    assert set(children_of(os.getpid())) == before


# ---------------------------------------------------------------------------------------------
# Parallel and devices


def fake_cuda(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_more_gpus_than_exist_are_refused(monkeypatch):
    fake_cuda(monkeypatch, 2)
    assert parse_gpus("1,0") == ("cuda:1", "cuda:0")
    with pytest.raises(ValueError, match=r"gpus '0,1,2': GPU 2 does not exist; this machine has 2 CUDA GPU\(s\) "
                                         r"\(indices 0..1\)"):
        parse_gpus("0,1,2")
    with pytest.raises(ValueError, match=r"device 'cuda:2': only 2 CUDA GPU\(s\) exist"):
        resolve_device("cuda:2")


def test_cuda_requested_without_cuda_is_refused(monkeypatch):
    fake_cuda(monkeypatch, 0)
    with pytest.raises(ValueError, match="device 'cuda' asked for CUDA but this machine has no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="gpus 'all': this machine has no CUDA GPU.*use 'cpu:N'"):
        parse_gpus("all")
    with pytest.raises(ValueError, match="gpus '0,1': this machine has no CUDA GPU; use 'cpu:N'"):
        parse_gpus("0,1")


def test_a_torch_without_nccl_or_distributed_is_refused(monkeypatch):
    check_backend("gloo")
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(ValueError, match=r"multi-GPU on CUDA needs the nccl backend, which this torch build .* "
                                         r"lacks; install a CUDA build of torch for Linux"):
        check_backend("nccl")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs torch.distributed, which this torch build"):
        check_backend("gloo")


def test_parallel_config_refuses_cuda_ranks_without_nccl(monkeypatch):
    fake_cuda(monkeypatch, 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(ValueError, match="needs the nccl backend"):
        parallel_config("0,1", fsdp=True)


def test_an_absurd_cpu_rank_count_is_a_value_error():
    with pytest.raises(ValueError, match="cpu:N"):
        parse_gpus("cpu:100000000000000000000")  # was an OverflowError building that many device names


# ---------------------------------------------------------------------------------------------
# Numerics and memory


def test_inf_from_the_low_noise_expert_names_it_and_the_step():
    pair = ExpertPair(ConstantExpert(0.1), ConstantExpert(float("inf")), CPU)
    with pytest.raises(NumericalError, match=r"after step 3/3 \(timestep 856, low-noise expert\)"):
        denoise(pair, *embeds(), make_noise(0, 5, 32, 32), SETTINGS)


@pytest.mark.parametrize("fail", [cuda_out_of_memory, cpu_out_of_memory], ids=["torch.OutOfMemoryError", "cpu"])
def test_out_of_memory_frees_the_run_and_names_what_helps(fail):
    expert = RunsOutOfMemory(fail)  # step 1 works, step 2 fails
    with pytest.raises(OutOfMemory) as err:
        denoise(ExpertPair(expert, expert, CPU), *embeds(), make_noise(0, 5, 32, 32), SETTINGS)
    message = str(err.value)
    assert message.startswith("out of memory at step 2/3 (high-noise expert) on cpu with a 8-token video "
                              "(latent [16, 2, 4, 4]): ")
    for knob in ("fp8 weights (loader weight_dtype fp8_e4m3fn", "offload swap_experts, or block_swap",
                 "a smaller width/height or fewer frames", "--no-batch-cfg", "more GPUs"):
        assert knob in message, knob
    assert "\n" not in message  # the CLI prints it as one line
    assert err.value.__context__ is None and err.value.__cause__ is None  # holds no frame of the failed step
    assert [ref() for ref in expert.refs] == [None, None]  # the activation and the step-1 latent are gone
    assert isinstance(err.value, Wan22Error)


def test_out_of_memory_without_batched_cfg_does_not_suggest_it():
    expert = RunsOutOfMemory(cuda_out_of_memory, good_calls=0)
    with pytest.raises(OutOfMemory, match=r"at step 1/3 \(high-noise expert\)") as err:
        denoise(ExpertPair(expert, expert, CPU), *embeds(), make_noise(0, 5, 32, 32), SETTINGS, batch_cfg=False)
    assert "batch_cfg" not in str(err.value) and "fp8 weights" in str(err.value)


def test_other_runtime_errors_pass_through_unchanged():
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    def fail():
        raise error

    with pytest.raises(RuntimeError) as err:
        denoise(ExpertPair(RunsOutOfMemory(fail), ConstantExpert(0.0), CPU), *embeds(), make_noise(0, 5, 32, 32),
                SETTINGS)
    assert err.value is error


def test_released_memory_goes_back_to_the_driver_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    release_cached_memory(torch.device("cpu"))
    assert calls == []
    release_cached_memory(torch.device("cuda", 0))
    assert calls == [1]


# ---------------------------------------------------------------------------------------------
# A full disk while saving


def frames(count=30, size=64):
    return np.random.default_rng(0).random((count, size, size, 3), dtype=np.float32)  # noise: big to encode


def test_ffmpeg_hitting_a_full_disk_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    real = video._ffmpeg_command
    # /dev/full fails every write with ENOSPC: ffmpeg meets a really full disk
    monkeypatch.setattr(video, "_ffmpeg_command", lambda *args: real(*args)[:-1] + ["/dev/full"])
    with pytest.raises(OSError) as err:
        video.write_mp4(frames(5), tmp_path / "clip.mp4")
    assert err.value.errno == errno.ENOSPC
    assert str(err.value) == (f"[Errno 28] could not save {str(tmp_path / 'clip.mp4')!r}: No space left on device; "
                              "nothing was written under that name (the partial file was removed); the disk is "
                              "full: free some space or choose an output folder on another disk")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_fsync_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):  # network and delayed-allocation file systems report a full disk only here
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(video.os, "fsync", full)
    with pytest.raises(OSError, match="nothing was written under that name.*the disk is full"):
        video.write_mp4(frames(5), tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


def test_a_really_full_file_system_leaves_nothing(tmp_path):
    """A 64 KiB tmpfs in a private mount namespace (needs root or user namespaces)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from wan22_core.video import write_mp4
        frames = np.random.default_rng(0).random((30, 64, 64, 3), dtype=np.float32)
        try:
            write_mp4(frames, {str(disk / 'clip.mp4')!r})
            error = None
        except OSError as err:
            error = [err.errno, str(err)]
        print(json.dumps({{"error": error, "left": os.listdir({str(disk)!r})}}))
    """)
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here")
    mount = f"mount -t tmpfs -o size=64k tmpfs {disk} || exit 97; exec {sys.executable} -c \"$0\""
    for flags in (["--mount"], ["--map-root-user", "--mount"]):  # as root; else in a user namespace
        proc = subprocess.run(["unshare", *flags, "sh", "-c", mount, script], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 97 and not proc.stderr.startswith("unshare:"):
            break
    else:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["error"][0] == errno.ENOSPC and "nothing was written under that name" in result["error"][1]
    assert result["left"] == []
    assert list(disk.iterdir()) == []  # and the real folder never saw the private mount


# ---------------------------------------------------------------------------------------------
# The worker group: Ctrl-C in the controller, and its sockets


def listening_sockets(pid: int) -> list[str]:
    """Addresses of the TCP sockets process `pid` listens on, from /proc (IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.fixture(scope="module")
def group(tiny_model_dir):
    before = listening_sockets(os.getpid())
    spec = ModelSpec(tiny_model_dir / "high_noise_model", tiny_model_dir / "low_noise_model")
    group = WorkerGroup.get_or_create(spec, parallel_config("cpu:2", ulysses_degree=2, fsdp=True,
                                                            num_heads=TINY.dit.num_heads))
    yield {"group": group, "controller_sockets_before": before}
    group.shutdown()


def test_the_group_listens_on_loopback_only(group):
    controller = listening_sockets(os.getpid())
    new_in_controller = [a for a in controller if a not in group["controller_sockets_before"]]
    in_workers = [a for pid in group["group"].pids for a in listening_sockets(pid)]
    assert in_workers, "the gloo ranks should listen for their peers"
    outside = [a for a in new_in_controller + in_workers if not is_loopback(a)]
    assert outside == [], f"listening on non-loopback addresses {outside} "


def test_the_tests_rank_store_listens_on_loopback_only():
    """tests/procs.py's rendezvous (the gloo tests and bench_comm): 127.0.0.1, as the product binds."""
    from procs import loopback_store

    before = listening_sockets(os.getpid())
    store = loopback_store()
    new = [a for a in listening_sockets(os.getpid()) if a not in before]
    assert new == ["127.0.0.1"], new
    store.set("ready", "1")  # and it serves
    assert dist.TCPStore("127.0.0.1", store.port, is_master=False).get("ready") == b"1"


def test_ctrl_c_in_the_controller_mid_step_stops_every_rank(group):
    """KeyboardInterrupt from a progress callback (as Ctrl-C lands in the controller's thread)."""
    group = group["group"]
    pids = group.pids
    noise = make_noise(1, 5, 32, 32)
    g = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(5, TINY.dit.text_dim, generator=g), torch.randn(3, TINY.dit.text_dim, generator=g)
    from wan22_core.parallel import Job

    def interrupt(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        group.run(Job(positive, negative, noise, SamplerSettings(steps=4, shift=5.0)), on_step=interrupt)
    assert not group.alive and WorkerGroup.current() is None
    assert_all_gone(pids, message="a rank outlived the interrupted run")
    with pytest.raises(Wan22Error, match="shut down"):
        group.run(Job(positive, negative, noise))


# ---------------------------------------------------------------------------------------------
# Nothing from a file or a workflow is executed


def engine_and_node_sources() -> list[Path]:
    return sorted([*ROOT.glob("wan22_core/**/*.py"), *ROOT.glob("nodes/**/*.py"), ROOT / "__init__.py"])


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else "not a constant"
    return None


# pickle.loads on bytes our own worker processes sent over a socketpair (never a file).
PICKLE_IPC = {"wan22_core/parallel/worker_group.py"}  # recv_message, used by both ends


def test_no_pickle_is_read_from_files():
    found = []
    for path in engine_and_node_sources():
        rel = path.relative_to(ROOT).as_posix()
        for call, name in calls(path):
            if name == "torch.load" and keyword(call, "weights_only") is not True:
                found.append(f"{rel}:{call.lineno} torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.Unpickler", "marshal.load", "marshal.loads", "shelve.open") or \
                    name.startswith(("dill.", "cloudpickle.", "joblib.")):
                found.append(f"{rel}:{call.lineno} {name}")
            if name == "pickle.loads" and rel not in PICKLE_IPC:
                found.append(f"{rel}:{call.lineno} pickle.loads outside the worker IPC")
            if name in ("np.load", "numpy.load") and keyword(call, "allow_pickle") not in (None, False):
                found.append(f"{rel}:{call.lineno} numpy load with allow_pickle")
    assert found == []


def test_workflow_inputs_never_reach_a_shell_or_eval():
    found = []
    for path in engine_and_node_sources():
        rel = path.relative_to(ROOT).as_posix()
        for call, name in calls(path):
            if name in ("eval", "exec", "compile", "os.system", "os.popen", "__import__"):
                found.append(f"{rel}:{call.lineno} {name}")
            if keyword(call, "shell") not in (None, False):
                found.append(f"{rel}:{call.lineno} {name} with shell=True")
            command = call.args[0] if call.args else None
            if name.startswith("subprocess.") and (isinstance(command, (ast.JoinedStr, ast.BinOp)) or
                                                   isinstance(command, ast.Constant) and isinstance(command.value, str)):
                found.append(f"{rel}:{call.lineno} {name} with a command string")
    for path in sorted(ROOT.glob("web/js/**/*.js")):
        text = path.read_text()
        for pattern in (r"\beval\s*\(", r"new\s+Function\s*\(", r"\.innerHTML\s*=", r"insertAdjacentHTML"):
            found += [f"{path.relative_to(ROOT)}: {m.group()}" for m in re.finditer(pattern, text)]
    assert found == []


def test_the_scan_would_notice(tmp_path):
    """The two scans above see these (they only pass because the pack has none)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, subprocess, torch\npickle.load(open('x', 'rb'))\ntorch.load('m.pth')\n"
                   "eval(user_text)\nsubprocess.run(cmd, shell=True)\n")
    names = [name for _, name in calls(bad)]
    assert {"pickle.load", "torch.load", "eval", "subprocess.run"} <= set(names)
    shell = [call for call, name in calls(bad) if name == "subprocess.run"][0]
    assert keyword(shell, "shell") is True
    torch_load = [call for call, name in calls(bad) if name == "torch.load"][0]
    assert keyword(torch_load, "weights_only") is None
