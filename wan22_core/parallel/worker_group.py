"""The persistent multi-process group that a sampler node drives (design.md §4).

    config = parallel_config(gpus="0,1,2,3", ulysses_degree=0, ring_degree=0, fsdp=True)
    group = WorkerGroup.get_or_create(ModelSpec(high, low), config)
    latent = group.run(Job(positive, negative, noise, settings), on_step=..., should_cancel=...)
    frames = group.decode(vae, raw_latent, on_frame=..., should_cancel=...)  # each rank a band of rows
    group.stage_line()  # "start 14.0 s (load 12.1 s), sampling 45.2 s, decode 3.1 s"
    latents = group.run_batch([job0, job1, ...])  # one video each, side by side on the replicas

One process per device, started as a fresh interpreter (what multiprocessing calls "spawn";
started with subprocess so the child does not re-run the host's `__main__`, which for ComfyUI
is the whole server). The ranks rendezvous on a FileStore in a private (0700) temporary folder
and talk to each other over the loopback interface only (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME,
unless the user set them), so nothing of the group listens on another interface and no port has
to be chosen. They load their shards and wait for jobs; the group lives across jobs and is
rebuilt only when the model spec or the parallel config changes, or after a fault. Multi-node
runs go through torchrun (cli/torchrun.py), not through this group.

Faults: a rank that raises, dies or stays silent for `heartbeat_timeout` seconds ends the run
with a WorkerGroupError naming the rank (with its traceback when it sent one); the group is
killed and the next `get_or_create` starts a fresh one.
"""
from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoints import check_expert_pair
from ..config import DiTConfig, ExpertOptions, SamplerSettings
from ..errors import Cancelled, NumericalError, Wan22Error
from ..experts import expert_dtypes
from ..lora import LoraReport, LoraSpec, file_key, lora_deltas
from ..memory import GIB
from ..models.attention import resolve_backend
from ..models.transformer import WanModel
from ..models.vae import WanVAE
from ..optimize import compile_allowed
from ..pipeline import StepInfo, latent_tokens, video_size
from ..runtime import DTYPES, default_cuda_allocator
from .loading import rank_load
from .plan import ParallelConfig, ParallelPlan, check_parallel_options, check_plan_fits, device_budget
from .replicas import idle_replicas_note
from .vae_decode import check_bands

PACK_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the wan22_core package
# The child imports wan22_core as a top-level package from the pack root, whatever our name is.
BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from wan22_core.parallel.worker import main; main(sys.argv[2])")
POLL_S = 0.1
RENDEZVOUS_S = 120.0  # interpreter start, imports and rendezvous: before a rank can send heartbeats
GRACE_S = 0.5  # after a fault, how long to wait for the other ranks' reports before killing them


def loopback_interface() -> str:
    """The loopback interface's name: "lo" on Linux, "lo0" on macOS and the BSDs."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:  # no interface listing (e.g. Windows): gloo's own default is used then
        names = []
    return next((name for name in ("lo", "lo0") if name in names), "lo")


LOOPBACK = loopback_interface()
RENDEZVOUS_PREFIX = "wan22-rendezvous-"  # + the controller's pid + a random part, in the temp folder


def sweep_stale_rendezvous() -> None:
    """Remove the rendezvous folders of controllers that ended without cleaning up.

    A controller removes its folder when its group ends; one ended by a signal (SIGTERM, SIGKILL:
    Python runs no exit handlers then) cannot, and its workers die with it, so the next group
    started on this machine (by this user) does it.
    """
    temp = Path(tempfile.gettempdir())
    for folder in temp.glob(f"{RENDEZVOUS_PREFIX}*-*"):
        pid = folder.name[len(RENDEZVOUS_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)  # raises when no such process exists
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive under another user (PermissionError), or the folder just went away
            continue


# PR_SET_PDEATHSIG fires when the *thread* that started a child exits; start every worker from
# this one thread, which lives as long as the process, whichever thread asks for a group.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wan22-spawner")


def rank_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """The environment of a rank: the host's, with the ranks' sockets on loopback (unless the user
    chose an interface) and the allocator the CLI uses (runtime.default_cuda_allocator).
    `backend:cudaMallocAsync` is dropped first (ComfyUI sets it for its own process, and the ranks
    would inherit it): a peer pack reports out-of-memory errors under NCCL all-to-all with it
    (shared/reference/peers.md, B.7)."""
    env = {"GLOO_SOCKET_IFNAME": LOOPBACK, "NCCL_SOCKET_IFNAME": LOOPBACK, **parent}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if "cudaMallocAsync" in env.get(name, ""):
            del env[name]
    default_cuda_allocator(env)
    return env


class WorkerGroupError(Wan22Error):
    """A rank raised, died or hung; the group has been shut down."""

    def __init__(self, message: str, rank: int | None = None, traceback: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.traceback = traceback


@dataclass(frozen=True)
class ModelSpec:
    """What every rank loads: the two expert checkpoints (any layout `checkpoints.check_slot`
    recognises), the compute and weight dtypes, whether blocks are compiled, the LoRAs merged
    into each expert's shards, and the attention backend.

    Hashable. A live group whose spec differs only in `loras_*` or `attention` is updated in
    place (each rank re-merges its shards from the LoRA factors it keeps; the base checkpoints
    are not read again); any other change rebuilds the group.
    """

    high_noise: str
    low_noise: str
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or bf16 / fp16 / fp32
    loras_high: tuple[LoraSpec, ...] = ()  # merged in this order, each with its own strength
    loras_low: tuple[LoraSpec, ...] = ()
    attention: str = "auto"  # one of models.attention.BACKENDS, resolved on each rank's device
    weight_dtype: str = "auto"  # one of config.WEIGHT_DTYPES, as ExpertOptions.weight_dtype (fp8 shards stay fp8)
    compile: bool = False  # regional torch.compile of every block on every rank

    def __post_init__(self):  # paths travel to the ranks as JSON strings
        object.__setattr__(self, "high_noise", str(self.high_noise))
        object.__setattr__(self, "low_noise", str(self.low_noise))
        for field in ("loras_high", "loras_low"):
            loras = tuple(getattr(self, field))
            wrong = [lora for lora in loras if not isinstance(lora, LoraSpec)]
            if wrong:
                raise TypeError(f"ModelSpec.{field} takes wan22_core.lora.LoraSpec(path, strength) items, "
                                f"got {type(wrong[0]).__name__}")
            object.__setattr__(self, field, loras)

    @property
    def weights(self) -> tuple:
        """The part of the spec that needs a fresh load (and so a new group) when it changes."""
        return self.high_noise, self.low_noise, self.dtype, self.weight_dtype, self.compile

    @property
    def options(self) -> ExpertOptions:
        """The one-process options the ranks implement (`experts.expert_dtypes` reads the dtypes)."""
        return ExpertOptions(dtype=self.dtype, weight_dtype=self.weight_dtype, attention=self.attention,
                             compile=self.compile)

    def loras(self, expert: str) -> tuple[LoraSpec, ...]:
        return self.loras_high if expert == "high" else self.loras_low

    def to_message(self) -> dict:
        """Built-in types only, for the JSON setup and the pickled messages to the ranks."""
        message = asdict(self)
        for field in ("loras_high", "loras_low"):
            message[field] = [[str(lora.path), lora.strength] for lora in getattr(self, field)]
        return message

    @classmethod
    def from_options(cls, high_noise: str | Path, low_noise: str | Path, options: ExpertOptions,
                     loras_high: Sequence[LoraSpec] = (), loras_low: Sequence[LoraSpec] = ()) -> "ModelSpec":
        """What the ranks load for a one-process model spec; `options` are checked first
        (`plan.check_parallel_options`)."""
        return cls(high_noise, low_noise, dtype=options.dtype, loras_high=tuple(loras_high),
                   loras_low=tuple(loras_low), attention=options.attention, weight_dtype=options.weight_dtype,
                   compile=options.compile)

    @classmethod
    def from_message(cls, message: dict) -> "ModelSpec":
        loras = {field: tuple(LoraSpec(path, strength) for path, strength in message[field])
                 for field in ("loras_high", "loras_low")}
        return cls(**{**message, **loras})


@dataclass
class Job:
    """One sampling run: the inputs of `pipeline.denoise`."""

    positive: torch.Tensor  # [L, text_dim] text embeddings
    negative: torch.Tensor
    noise: torch.Tensor  # [16, T, h, w] (see pipeline.make_noise)
    settings: SamplerSettings = SamplerSettings()
    latent: torch.Tensor | None = None  # optional start latent (normalised space)
    denoise_strength: float = 1.0

    @property
    def video(self) -> tuple[int, int, int]:
        """(frames, height, width) of the video the noise makes."""
        return video_size(tuple(self.noise.shape))


def validate_spec(spec: ModelSpec, config: ParallelConfig) -> tuple[ParallelPlan, dict[str, tuple[LoraReport, ...]],
                                                                     DiTConfig]:
    """Check the dtypes, files, LoRAs and the plan against the model's real head count, before any
    process starts; returns the plan with that head count, what each LoRA patches and the
    experts' config."""
    if spec.dtype != "auto" and spec.dtype not in DTYPES:
        raise ValueError(f"multi-GPU compute dtype must be auto, {', '.join(DTYPES)}; got {spec.dtype!r} "
                         "(for fp8 shards set weight_dtype)")
    expert_dtypes(spec.options, torch.device(config.devices[0]))  # weight_dtype and its dtype combination
    resolve_backend(spec.attention)  # unknown names and missing packages fail here, not on every rank
    check_parallel_options(spec.options, cfg_parallel=config.plan.cfg_parallel_enabled, batch_cfg=config.batch_cfg,
                           ring=config.plan.ring)
    high, _ = check_expert_pair(spec.high_noise, spec.low_noise)  # headers only: one model's two experts
    reports = check_loras(spec, high.dit)
    return replace(config.plan, num_heads=high.dit.num_heads), reports, high.dit  # replace re-runs the plan's checks


def check_memory(spec: ModelSpec, config: ParallelConfig, video: tuple[int, int, int]) -> None:
    """ValueError, naming the cheapest change that fits, when a rank of `config`'s plan cannot
    hold `video` on the smallest of its GPUs (memory.rank_peak_bytes; plan.check_plan_fits)."""
    budget = device_budget(config.devices)
    if budget is None:
        return
    load = rank_load(Path(spec.high_noise), video, spec.options, torch.device(config.devices[0]), config.batch_cfg)
    check_plan_fits(config.plan, load, *budget)



# (expert config, LoRA file key) -> report at strength 1: a file is read here once while unchanged
_checked_loras: dict[tuple, LoraReport] = {}


def check_loras(spec: ModelSpec, cfg: DiTConfig) -> dict[str, tuple[LoraReport, ...]]:
    """{"high"/"low": reports}: every LoRA read and matched against the parameter shapes of the
    experts' config `cfg` (from the checkpoint headers; both experts have it, check_expert_pair),
    so a wrong file fails here with the LoRA's own message."""
    reports = {}
    for expert in ("high", "low"):
        for lora in spec.loras(expert):
            key = (cfg, file_key(lora.path)) if lora.path.is_file() else None
            if key not in _checked_loras:
                with torch.device("meta"):
                    shapes = {n: p.shape for n, p in WanModel(cfg).named_parameters()}
                _, (report,) = lora_deltas([LoraSpec(lora.path)], shapes)  # raises LoraError on a bad file
                _checked_loras[key] = report
        reports[expert] = tuple(replace(_checked_loras[(cfg, file_key(lora.path))], strength=lora.strength)
                                for lora in spec.loras(expert))
    return reports


class WorkerGroup:
    _current: "WorkerGroup | None" = None
    _lock = threading.Lock()

    @classmethod
    def current(cls) -> "WorkerGroup | None":
        """The live group of this process, if any (there is at most one)."""
        return cls._current

    @classmethod
    def get_or_create(cls, spec: ModelSpec, config: ParallelConfig,
                      on_status: Callable[[int, str], None] | None = None,
                      video: tuple[int, int, int] | None = None) -> "WorkerGroup":
        """The live group for (spec, config); replaces a group built for anything else or broken.

        A live group for the same files, dtype and config (batch_cfg aside: each job carries it) is
        kept: if only the LoRAs or the attention backend changed, its ranks re-merge their shards in place (seconds, no
        checkpoint read) instead of a rebuild. With `video` (frames, height, width), a plan whose
        ranks cannot hold it on the smallest of the GPUs is refused first (`check_memory`).
        """
        spec = replace(spec, compile=compile_allowed(spec.compile, torch.device(config.devices[0]), warnings.warn))
        checked = validate_spec(spec, config)  # a bad request must not cost the working group
        if video is not None:
            check_memory(spec, replace(config, plan=checked[0]), video)
        with cls._lock:
            current = cls._current
            # batch_cfg travels with each job, so changing it keeps the group
            if (current is not None and current.spec.weights == spec.weights and current.alive
                    and replace(current.config, batch_cfg=config.batch_cfg) == config):
                current.on_status, current.config = on_status, config
                if current.spec != spec:
                    current._update(spec, checked[1])
                return current
            if current is not None:
                current.shutdown()
            cls._current = cls(spec, config, on_status, *checked)
            return cls._current

    def __init__(self, spec: ModelSpec, config: ParallelConfig, on_status: Callable[[int, str], None] | None,
                 plan: ParallelPlan, lora_reports: dict[str, tuple[LoraReport, ...]], dit: DiTConfig):
        """Start the ranks; `plan`, `lora_reports` and `dit` are validate_spec's result (get_or_create)."""
        self.spec, self.config, self.on_status = spec, config, on_status
        self.plan, self.dit = plan, dit
        self.lora_reports = lora_reports  # for the caller to show
        self._procs: dict[int, subprocess.Popen] = {}
        self._conns: dict[int, Connection] = {}
        self._status: dict[int, str] = {}
        self._closed = False
        self._job_id = 0
        self.last_steps: dict[int, int] = {}  # steps each rank completed in the last job
        self.parameter_bytes: dict[int, int] = {}  # expert parameter bytes each rank holds (its FSDP shards)
        # seconds of each stage: start (processes to ready, this controller's clock), load (the
        # slowest rank's own), then the last sampling and decode jobs (rank 0's own)
        self.stage_seconds: dict[str, float] = {}
        self.peak_bytes: dict[int, int] = {}  # CUDA ranks: the allocator's peak so far (since the start)
        started = time.perf_counter()
        sweep_stale_rendezvous()
        self._rendezvous_dir = tempfile.mkdtemp(prefix=f"{RENDEZVOUS_PREFIX}{os.getpid()}-")  # 0700: ours alone
        try:
            for rank in range(plan.world_size):
                self._spawn(rank, plan)
            ready = self._exchange(lambda rank, message: message["type"] == "ready", "starting up")
            self.parameter_bytes = {rank: message["parameter_bytes"] for rank, message in sorted(ready.items())}
            self.stage_seconds = dict(start=time.perf_counter() - started,
                                      load=max(message["load_s"] for message in ready.values()))
        except BaseException:
            self._kill()
            raise

    # -- public ---------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        return [self._procs[r].pid for r in sorted(self._procs)]

    @property
    def alive(self) -> bool:
        return not self._closed and all(p.poll() is None for p in self._procs.values())

    def run(self, job: Job, on_step: Callable[[StepInfo], None] | None = None,
            should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run one job on every rank; returns the final latent [16, T, h, w] float32 (CPU).

        on_step gets rank 0's StepInfo after each step (latent and preview included); a True
        from should_cancel stops every rank before the same step and raises Cancelled.
        """
        return self.run_batch([job], on_step and (lambda round_index, info: on_step(info)), should_cancel)[0]

    def run_batch(self, jobs: Sequence[Job], on_step: Callable[[int, StepInfo], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> list[torch.Tensor]:
        """Run a batch of videos that differ only in noise and start latent; their final latents.

        The plan's replicas sample them side by side, ceil(len(jobs) / replicas) rounds;
        on_step(round, info) follows rank 0, which samples one video per round.
        """
        if self._closed:
            raise WorkerGroupError("this worker group was shut down; call WorkerGroup.get_or_create again")
        first = jobs[0]
        first.settings.validate()
        self.plan.check_tokens(latent_tokens(first.noise.shape, self.dit.patch_size))
        if any(not (torch.equal(job.positive, first.positive) and torch.equal(job.negative, first.negative)
                    and job.settings == first.settings and job.denoise_strength == first.denoise_strength)
               for job in jobs[1:]):
            raise ValueError("the videos of one batch share their prompt embeddings, settings and denoise strength; "
                             "run a separate batch for each")
        check_memory(self.spec, replace(self.config, plan=self.plan), first.video)  # before the ranks see it
        idle = idle_replicas_note(len(jobs), self.plan.replicas)
        if idle:
            warnings.warn(idle)
        self._job_id += 1
        message = dict(type="job", id=self._job_id, positive=first.positive.cpu(), negative=first.negative.cpu(),
                       noises=[job.noise.cpu() for job in jobs],
                       latents=[None if job.latent is None else job.latent.cpu() for job in jobs],
                       denoise_strength=first.denoise_strength, settings=asdict(first.settings),
                       batch_cfg=self.config.batch_cfg, stream=on_step is not None)

        def progress(step: dict) -> None:
            if on_step is not None:
                on_step(step["round"], StepInfo(step["index"], step["total"], step["timestep"], step["expert"],
                                                step.get("latent"), step.get("denoised"), model_ran=step["model_ran"]))

        return self._run_job(message, progress, should_cancel, "sampling", "latents")

    def decode(self, vae: WanVAE, raw: torch.Tensor, on_frame: Callable[[int, int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Decode raw VAE latents [B, 16, T, h, w] (ComfyUI's LATENT space) on every rank, each a band
        of the rows (parallel.vae_decode); returns frames [B * F, H, W, 3] float32 in [0, 1] (CPU),
        what `pipeline.decode_raw_to_video` gives for each item, concatenated.

        `vae` is this process's loaded VAE: each rank loads its file (`vae.load_report.path`) once, in
        its own device's dtype, and keeps it. on_frame(index, total) follows the latent frames; a
        True from should_cancel stops every rank before the same frame and raises Cancelled.
        """
        if self._closed:
            raise WorkerGroupError("this worker group was shut down; call WorkerGroup.get_or_create again")
        check_bands(vae.decoder, raw.shape[-2], self.config.plan.world_size)  # before any rank is asked
        self._job_id += 1
        message = dict(type="decode", id=self._job_id, raw=raw.float().cpu(), vae=str(vae.load_report.path))

        def progress(frame: dict) -> None:
            if on_frame is not None:
                on_frame(frame["index"], frame["total"])

        return self._run_job(message, progress, should_cancel, "decode", "frames")

    def stage_line(self) -> str:
        """The seconds of each stage so far, for the log: "start 14.0 s (load 12.1 s), sampling 45.2 s", and on
        GPUs the allocator peak of the fullest one."""
        s = self.stage_seconds
        parts = [f"start {s['start']:.1f} s (load {s['load']:.1f} s)"] if "start" in s else []
        parts += [f"{name} {s[name]:.1f} s" for name in ("sampling", "decode") if name in s]
        if self.peak_bytes:  # CUDA ranks
            parts.append(f"peak {max(self.peak_bytes.values()) / GIB:.1f} GiB on the fullest GPU")
        return ", ".join(parts)

    def _run_job(self, message: dict, progress: Callable[[dict], None], should_cancel, stage: str, result: str):
        """Send one job to every rank and pump its messages until every rank is done; returns rank 0's
        `result` and records rank 0's seconds as `stage`."""
        for conn in self._conns.values():
            send_message(conn, message)
        job_run = _JobRun(self, progress, should_cancel, stage)
        done = self._exchange(job_run.handle, {"sampling": "sampling", "decode": "decoding"}[stage])
        if job_run.error is not None:
            raise job_run.error
        value = self._job_result(done, result)
        self.stage_seconds[stage] = done[0]["seconds"]
        self.peak_bytes = {rank: m["peak_bytes"] for rank, m in sorted(done.items()) if m["peak_bytes"] is not None}
        return value

    def _update(self, spec: ModelSpec, lora_reports: dict[str, tuple[LoraReport, ...]]) -> None:
        """Make the live ranks hold `spec`'s LoRAs and attention backend (same files and dtype)."""
        self.lora_reports = lora_reports
        for conn in self._conns.values():
            send_message(conn, dict(type="update", spec=spec.to_message()))
        self._exchange(lambda rank, message: message["type"] == "ready", "applying LoRAs")
        self.spec = spec

    def shutdown(self) -> None:
        """Stop the workers (politely, then by force) and free their devices."""
        if self._closed:
            return
        for conn in self._conns.values():
            try:
                send_message(conn, dict(type="shutdown"))
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, rank: int, plan: ParallelPlan) -> None:
        ours, theirs = socket.socketpair()  # EOF on either side when the other process dies
        setup = dict(rank=rank, device=self.config.devices[rank], backend=self.config.backend,
                     store_path=os.path.join(self._rendezvous_dir, "store"), rendezvous_timeout=RENDEZVOUS_S,
                     plan=asdict(plan), spec=self.spec.to_message(), parent_pid=os.getpid(), fd=theirs.fileno(),
                     beat_interval=min(1.0, self.config.heartbeat_timeout / 4))
        command = [sys.executable, "-c", BOOTSTRAP, str(PACK_ROOT), json.dumps(setup)]
        # A new session: a Ctrl-C in the host's terminal reaches the host, which then stops us.
        self._procs[rank] = _spawner.submit(subprocess.Popen, command, pass_fds=(theirs.fileno(),),
                                            env=rank_environment(os.environ),
                                            start_new_session=True).result()
        theirs.close()
        self._conns[rank] = Connection(ours.detach())
        self._status[rank] = "starting"

    def _kill(self) -> None:
        """SIGKILL every rank (a rank blocked in a collective cannot stop politely) and reap them."""
        self._closed = True
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # stuck in the kernel (e.g. a wedged driver): nothing more to do
                pass
        for conn in self._conns.values():
            conn.close()
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
        if WorkerGroup._current is self:
            WorkerGroup._current = None

    # -- the message pump --------------------------------------------------------------------

    def _exchange(self, handle: Callable[[int, dict], bool], phase: str) -> dict[int, dict]:
        """Receive until `handle(rank, message)` was True once per rank; returns those messages.

        Silence is counted only while this thread waits (not while a callback runs), so a slow
        progress callback is never mistaken for a hung rank; finished ranks are idle, not silent.
        Anything else that stops the exchange (e.g. KeyboardInterrupt, a callback raising) leaves the
        ranks mid-phase, their state unknown: the group is killed before it propagates.
        """
        try:
            return self._receive_until(handle, phase)
        except WorkerGroupError:
            raise  # _fail killed the group already
        except BaseException:
            self._kill()
            raise

    def _receive_until(self, handle: Callable[[int, dict], bool], phase: str) -> dict[int, dict]:
        finished: dict[int, dict] = {}
        silent = {rank: 0.0 for rank in self._procs}  # seconds without progress
        frozen = dict(silent)  # seconds without any sign of life
        while len(finished) < len(self._procs):
            by_conn = {conn: rank for rank, conn in self._conns.items()}
            started = time.monotonic()
            ready = wait(list(by_conn), timeout=POLL_S)
            waited = time.monotonic() - started
            lively, progressing = {by_conn[conn] for conn in ready}, set()
            for rank in sorted(lively):
                message = self._receive(rank, phase)
                if message["type"] == "alive":
                    continue
                progressing.add(rank)
                if message["type"] != "beat" and handle(rank, message):
                    finished[rank] = message
            for rank in silent:
                idle = rank in finished
                silent[rank] = 0.0 if idle or rank in progressing else silent[rank] + waited
                frozen[rank] = 0.0 if idle or rank in lively else frozen[rank] + waited
            self._check_health(silent, frozen, phase)
        return finished

    def _receive(self, rank: int, phase: str) -> dict:
        """One message from `rank`; deaths and errors end the group here, statuses are passed on."""
        try:
            message = recv_message(self._conns[rank])
        except (EOFError, OSError):
            self._fail([(rank, f"died ({self._exit_reason(rank)})", None)], phase)
        if message["type"] == "error":
            self._fail([(rank, f"raised {message['message']}", message["traceback"])], phase)
        index, total = message.get("index", 0) + 1, message.get("total")
        status = {"beat": message.get("status"), "step": f"step {index}/{total}", "frame": f"decoding {index}/{total}",
                  "done": "ready"}.get(message["type"], message["type"])
        if message["type"] not in ("alive", "boundary") and status != self._status.get(rank):
            self._status[rank] = status
            if self.on_status is not None:
                self.on_status(rank, status)
        return message

    def _check_health(self, silent: dict[int, float], frozen: dict[int, float], phase: str) -> None:
        for rank, proc in self._procs.items():
            if proc.poll() is not None and not self._conns[rank].poll():
                self._fail([(rank, f"died ({self._exit_reason(rank)})", None)], phase)
        limits = {rank: RENDEZVOUS_S if self._status[rank] in ("starting", "rendezvous") else
                  self.config.heartbeat_timeout for rank in silent}
        hung = [r for r in silent if silent[r] > limits[r]]
        if hung:
            # Peers past half the bound are most likely waiting for the hung rank in a collective:
            # name them too (they went quiet a moment after it, so they are not past the bound yet).
            hung += [r for r in silent if r not in hung and silent[r] > limits[r] / 2]
            # The watchdog beats every <= 0.5 s: several missed beats mean the whole process is stuck.
            stuck = [r for r in hung if frozen[r] > min(2.0, limits[r] / 2)]
            self._fail([(r, f"sent no heartbeat for {silent[r]:.1f} s, not even from its watchdog thread "
                            "(the process is frozen: stopped, or stuck holding the interpreter lock)", None)
                        for r in stuck] +
                       [(r, f"is alive but made no progress for {silent[r]:.1f} s (deadlocked, or waiting "
                            "in a collective for a stuck peer)", None) for r in hung if r not in stuck], phase)

    def _exit_reason(self, rank: int) -> str:
        try:
            code = self._procs[rank].wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "closed its connection"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def _fail(self, reports: list[tuple[int, str, str | None]], phase: str):
        """Collect the other ranks' reports for a moment, kill the group, raise one clear error."""
        reported = {rank for rank, _, _ in reports}
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and len(reported) < len(self._procs):
            by_conn = {c: r for r, c in self._conns.items() if r not in reported}
            for conn in wait(list(by_conn), timeout=max(0.0, deadline - time.monotonic())):
                rank = by_conn[conn]
                try:
                    message = recv_message(conn)
                except (EOFError, OSError):
                    reports.append((rank, f"died ({self._exit_reason(rank)})", None))
                    reported.add(rank)
                    continue
                if message["type"] == "error":
                    reports.append((rank, f"raised {message['message']}", message["traceback"]))
                    reported.add(rank)
        self._kill()
        # A rank that died without a word is the likeliest cause; peers then fail in collectives.
        reports.sort(key=lambda report: report[2] is not None)
        rank, what, trace = reports[0]
        others = "; ".join(f"rank {r} {w.splitlines()[0]}" for r, w, _ in reports[1:])
        message = (f"multi-GPU worker group failed while {phase}: rank {rank} {what}"
                   f"{f' (then: {others})' if others else ''}. The group was shut down; "
                   "the next run starts a fresh one.")
        if trace:
            message += f"\n\nTraceback from rank {rank}:\n{trace}"
        if self.on_status is not None:
            self.on_status(rank, "error")
        raise WorkerGroupError(message, rank=rank, traceback=trace)

    # -- jobs ----------------------------------------------------------------------------------

    def _job_result(self, done: dict[int, dict], result: str) -> torch.Tensor:
        self.last_steps = {rank: message["steps"] for rank, message in sorted(done.items())}
        outcomes = {(message["status"], message["steps"]) for message in done.values()}
        if len(outcomes) != 1:  # cannot happen while the ranks agree through the cancel broadcast
            self._kill()
            endings = {rank: (message["status"], message["steps"]) for rank, message in done.items()}
            raise WorkerGroupError(f"ranks ended the job differently (status, steps): {endings}; "
                                   "the group was shut down")
        status = done[0]["status"]
        if status == "Cancelled":
            raise Cancelled(f"{done[0]['message']} (all {len(done)} ranks stopped there)")
        if status == "NumericalError":
            raise NumericalError(done[0]["message"])
        return done[0][result]


class _JobRun:
    """The controller's side of one job: progress callbacks and the cancel decision.

    Rank 0 asks before every step (every latent frame of a decode) with "boundary" and waits for
    the answer, so should_cancel is consulted exactly once per step, after that step's progress:
    a cancel seen after step i stops every rank before step i + 1, deterministically.
    """

    def __init__(self, group: WorkerGroup, progress: Callable[[dict], None], should_cancel, phase: str):
        self.group, self.progress, self.should_cancel, self.phase = group, progress, should_cancel, phase
        self.error: BaseException | None = None  # from a caller's callback, re-raised once the ranks stop

    def handle(self, rank: int, message: dict) -> bool:
        if message.get("id") != self.group._job_id:
            self.group._fail([(rank, f"answered job {message.get('id')} during job {self.group._job_id} "
                                     "(protocol error)", None)], self.phase)
        if message["type"] == "boundary":
            send_message(self.group._conns[0], dict(type="proceed", cancel=self.wants_cancel()))
        if message["type"] in ("step", "frame") and self.error is None:
            try:
                self.progress(message)
            except Exception as err:
                self.error = err
        return message["type"] == "done"

    def wants_cancel(self) -> bool:
        if self.error is None and self.should_cancel is not None:
            try:
                return bool(self.should_cancel())
            except Exception as err:
                self.error = err
        return self.error is not None



def send_message(conn: Connection, message: dict) -> None:
    """The one framing on the controller <-> rank sockets (our own processes only): a pickled dict."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv_message(conn: Connection) -> dict:
    return pickle.loads(conn.recv_bytes())


@atexit.register
def _stop_current_group() -> None:
    if WorkerGroup._current is not None:
        WorkerGroup._current._kill()
