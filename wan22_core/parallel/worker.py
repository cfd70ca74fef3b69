"""One rank of a WorkerGroup: rendezvous, load this rank's shards, then run jobs in lockstep.

Started by `worker_group.py` as a fresh interpreter whose bootstrap puts the pack root on
sys.path and imports `wan22_core` as a top-level package, so it works however the controller
imported us (ComfyUI loads the pack under a mangled module name the child could not import).

Messages are plain pickled dicts of built-in types and tensors, never our own classes, for
the same reason. Controller -> rank: job (sampling a batch of videos, one noise each, that the
replicas share out: `replicas.sample_videos`), decode (the VAE, a band of rows per rank), update
(new LoRAs / attention backend), proceed (rank 0, the cancel decision), shutdown.
Rank -> controller: beat, ready (after start-up and after an update), boundary, step and frame
(rank 0), done (with the rank's seconds for the job), error.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from ..checkpoints import load_vae
from ..config import SamplerSettings
from ..errors import Cancelled, NumericalError
from ..experts import expert_dtypes
from ..lora import file_key
from ..models.attention import set_attention_backend
from ..models.transformer import WanBlock
from ..models.vae import ResidualBlock, WanVAE, to_images
from ..pipeline import denoise
from ..runtime import resolve_dtype
from .fsdp import forget_forward_records
from .loading import load_expert_pair, local_parameter_bytes, set_expert_loras
from .mesh import init_groups
from .plan import ParallelPlan
from .replicas import sample_videos
from .vae_decode import decode_on_ranks
from .worker_group import ModelSpec, recv_message, send_message

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Channel:
    """The rank's socket to the controller: pickled dicts, plus two kinds of heartbeat.

    `beat` (main thread, at progress points) says the rank is getting somewhere; `alive`
    (watchdog thread, while busy) says the process still runs when the main thread is blocked.
    A rank silent on both is frozen; one that is alive but not progressing is usually waiting
    in a collective for a frozen peer, which is how the controller tells the two apart.
    """

    def __init__(self, conn: Connection, beat_interval: float):
        self.conn = conn
        self.beat_interval = beat_interval
        self.status = "starting"
        self.busy = True  # between a request and its answer (starting up, or running a job)
        self._last_beat = 0.0
        self._lock = threading.Lock()

    def send(self, **message) -> None:
        with self._lock:
            send_message(self.conn, message)
        self._last_beat = time.monotonic()

    def alive(self) -> None:
        """From the watchdog thread; skipped while the main thread is sending (that says enough)."""
        if self.busy and self._lock.acquire(blocking=False):
            try:
                send_message(self.conn, {"type": "alive"})
            finally:
                self._lock.release()

    def recv(self) -> dict:
        return recv_message(self.conn)

    def beat(self, status: str | None = None) -> None:
        """Called from the main thread at progress points: a silent rank is a stuck rank."""
        changed = status is not None and status != self.status
        self.status = status or self.status
        if changed or time.monotonic() - self._last_beat >= self.beat_interval:
            self.send(type="beat", status=self.status)


def start_watchdog(parent_pid: int, channel: Channel) -> None:
    """Die when the controller dies, however it dies (no orphans holding GPU memory), and send
    `alive` beats.

    PR_SET_PDEATHSIG makes the kernel SIGKILL us when the thread that started us exits (the
    controller starts workers from one long-lived thread for this reason); the watchdog also
    polls for re-parenting, which covers other platforms and the race before prctl.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            channel.alive()
            time.sleep(min(0.5, channel.beat_interval))
        os._exit(1)

    threading.Thread(target=watch, name="wan22-watchdog", daemon=True).start()


class Worker:
    def __init__(self, setup: dict, channel: Channel):
        self.setup = setup
        self.channel = channel
        self.rank = setup["rank"]
        self.device = torch.device(setup["device"])
        self.plan = ParallelPlan(**setup["plan"])

    def start(self) -> None:
        """Join the process group, build the groups, load both experts' shards."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:  # N CPU ranks share the cores; oversubscribing them makes every rank slower
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.plan.world_size))
        self.channel.beat("rendezvous")
        store = dist.FileStore(self.setup["store_path"], self.plan.world_size)
        store.set_timeout(timedelta(seconds=self.setup["rendezvous_timeout"]))
        dist.init_process_group(self.setup["backend"], store=store, rank=self.rank,
                                world_size=self.plan.world_size,
                                device_id=self.device if self.device.type == "cuda" else None)
        self.groups = init_groups(self.plan, self.device)
        started = time.perf_counter()
        spec = ModelSpec.from_message(self.setup["spec"])
        dtype, weight_dtype, fp8_matmul = expert_dtypes(spec.options, self.device)
        self.experts = load_expert_pair(spec.high_noise, spec.low_noise, self.groups, self.device, dtype,
                                        spec.loras_high, spec.loras_low,
                                        on_tensor=lambda name: self.channel.beat(f"loading {name}-noise expert"),
                                        attention=spec.attention, weight_dtype=weight_dtype, fp8_matmul=fp8_matmul,
                                        compile=spec.compile)  # the group checked the toolchain
        for expert in self.experts.experts.values():
            for module in expert.modules():
                if isinstance(module, WanBlock):  # a heartbeat per block forward while sampling
                    module.register_forward_pre_hook(lambda *_: self.channel.beat())
        self.vae: tuple[tuple, WanVAE] | None = None  # (file key, model): loaded by the first decode
        self.channel.busy = False
        held = sum(local_parameter_bytes(expert) for expert in self.experts.experts.values())
        self.channel.send(type="ready", parameter_bytes=held, load_s=time.perf_counter() - started)
        self.channel.status = "ready"

    def serve(self) -> None:
        while True:
            message = self.channel.recv()
            if message["type"] == "shutdown":
                dist.destroy_process_group()
                return
            if message["type"] == "update":
                self.update(ModelSpec.from_message(message["spec"]))
            elif message["type"] == "job":
                self.run_job(message)
            elif message["type"] == "decode":
                self.run_decode(message)
            else:
                raise RuntimeError(f"protocol error: got {message['type']!r} while idle")

    def update(self, spec: ModelSpec) -> None:
        """Re-merge both experts' shards for the spec's LoRAs and set its attention backend.

        Any failure here ends the rank (and so the group): a half-merged expert must not sample.
        """
        self.channel.busy = True
        for name, expert in self.experts.experts.items():
            set_expert_loras(expert, spec.loras(name), on_tensor=lambda: self.channel.beat("merging LoRAs"))
            set_attention_backend(expert, spec.attention, self.device)
        self.channel.busy = False
        self.channel.send(type="ready")
        self.channel.status = "ready"

    def run_job(self, job: dict) -> None:
        """The lockstep loop over the job's videos; ends with one "done" message per rank (rank 0's
        carries every video's latent)."""
        self.channel.busy = True
        started = time.perf_counter()
        cancel = CollectiveCancel(self, job["id"])
        settings = SamplerSettings(**job["settings"])

        def sample(video: int, round_index: int) -> torch.Tensor:
            on_step = self._on_step_sender(job, round_index) if self.rank == 0 else (
                lambda info: self.channel.beat(f"step {info.index + 1}/{info.total}"))
            return denoise(self.experts, job["positive"], job["negative"], job["noises"][video], settings,
                           latent=job["latents"][video], denoise_strength=job["denoise_strength"],
                           batch_cfg=job["batch_cfg"], on_step=on_step, should_cancel=cancel)

        try:
            latents = sample_videos(sample, self.groups, len(job["noises"]))
            outcome = dict(status="ok", steps=cancel.checks,
                           latents=[latent.cpu() for latent in latents] if self.rank == 0 else None)
        # Raised by every rank of a replica at the same step: the group stays. (A NaN in one replica's
        # video alone would leave the others waiting in a collective: the heartbeat ends that run.)
        except (Cancelled, NumericalError) as err:
            outcome = dict(status=type(err).__name__, message=str(err), steps=cancel.checks - 1)
        forget_forward_records(self.experts)  # else FSDP2's per-forward records grow every job
        self._finish(job, outcome, started)

    def _finish(self, job: dict, outcome: dict, started: float) -> None:
        self.channel.busy = False
        self.channel.status = "ready"
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        self.channel.send(type="done", id=job["id"], seconds=time.perf_counter() - started, peak_bytes=peak,
                          **outcome)

    def run_decode(self, job: dict) -> None:
        """Every rank decodes a band of each video's rows (parallel.vae_decode); rank 0's "done"
        carries the frames [B*F, H, W, 3]. Cancel and progress once per latent frame, in lockstep."""
        self.channel.busy = True
        started = time.perf_counter()
        vae = self._load_vae(job["vae"])
        raw = job["raw"]
        frames = FrameProgress(self, job, total=raw.shape[0] * raw.shape[2])
        hook = vae.decoder.register_forward_pre_hook(lambda *_: frames.next())  # one call per latent frame
        try:
            videos = [decode_on_ranks(vae, item[None]) for item in raw]
            outcome = dict(status="ok", steps=frames.cancel.checks,
                           frames=torch.cat([to_images(v) for v in videos]) if self.rank == 0 else None)
        except Cancelled as err:  # raised by every rank before the same frame
            outcome = dict(status="Cancelled", message=str(err), steps=frames.cancel.checks - 1)
        finally:
            hook.remove()
        self._finish(job, outcome, started)

    def _load_vae(self, path: str) -> WanVAE:
        """This rank's VAE (about 250 MB in bf16), read once and kept while the file stays the same."""
        key = file_key(path)
        if self.vae is None or self.vae[0] != key:
            self.channel.beat("loading the VAE")
            vae = load_vae(path, resolve_dtype("auto", self.device), device=self.device)
            for module in vae.decoder.modules():
                if isinstance(module, ResidualBlock):  # heartbeats while decoding
                    module.register_forward_pre_hook(lambda *_: self.channel.beat())
            self.vae = (key, vae)
        return self.vae[1]

    def _on_step_sender(self, job: dict, round_index: int):
        def send(info) -> None:
            tensors = dict(latent=info.latent.cpu(), denoised=info.denoised.cpu()) if job["stream"] else {}
            self.channel.send(type="step", id=job["id"], round=round_index, index=info.index, total=info.total,
                              timestep=info.timestep, expert=info.expert, model_ran=info.model_ran, **tensors)
        return send


class CollectiveCancel:
    """denoise's should_cancel on every rank: rank 0 asks the controller, all ranks agree.

    One round trip (rank 0) and one broadcast per step, so every rank stops before the same
    step, or none does.
    """

    def __init__(self, worker: Worker, job_id: int):
        self.worker = worker
        self.job_id = job_id
        self.checks = 0  # how many step boundaries were reached

    def __call__(self) -> bool:
        self.checks += 1
        cancel = False
        if self.worker.rank == 0:
            channel = self.worker.channel
            channel.send(type="boundary", id=self.job_id, index=self.checks - 1)
            reply = channel.recv()
            if reply["type"] != "proceed":
                raise RuntimeError(f"protocol error: got {reply['type']!r} while waiting to proceed")
            cancel = reply["cancel"]
        flag = torch.tensor([int(cancel)], device=self.worker.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


class FrameProgress:
    """Before each latent frame a decode job decodes: the collective cancel check, then progress
    (rank 0 tells the controller, the others beat)."""

    def __init__(self, worker: Worker, job: dict, total: int):
        self.worker, self.job, self.total = worker, job, total
        self.cancel = CollectiveCancel(worker, job["id"])

    def next(self) -> None:
        if self.cancel():
            raise Cancelled(f"decode cancelled before latent frame {self.cancel.checks} of {self.total}")
        index, channel = self.cancel.checks - 1, self.worker.channel
        if self.worker.rank == 0:
            channel.send(type="frame", id=self.job["id"], index=index, total=self.total)
        else:
            channel.beat(f"decoding {index + 1}/{self.total}")


def main(setup_json: str) -> None:
    setup = json.loads(setup_json)
    channel = Channel(Connection(setup["fd"]), setup["beat_interval"])
    start_watchdog(setup["parent_pid"], channel)
    try:
        worker = Worker(setup, channel)
        worker.start()
        worker.serve()
    except BaseException as err:  # report, then exit hard: peers may be stuck in a collective with us
        try:
            channel.send(type="error", message=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        finally:
            os._exit(1)
