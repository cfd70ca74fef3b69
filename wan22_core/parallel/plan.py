"""Parallel degrees and devices, validated before any process starts.

Ranks form a grid (replica, cfg, ring, ulysses) with the Ulysses index fastest, so each Ulysses
group is a run of neighbouring ranks (neighbouring GPUs share the fastest links: the all-to-alls
stay inside a node) and the ring, which passes one K/V block to one neighbour at a time, spans
the slower links. A sequence group (ulysses x ring ranks, consecutive) holds one video's tokens;
a replica (cfg x ring x ulysses ranks, consecutive) samples one video at a time, and the replicas
sample different videos side by side. FSDP shards the weights over *all* ranks: every rank runs
the same modules in the same order (the CFG halves run the same expert on different text, the
replicas on different noise), so one all-gather per module serves the whole grid.

Nothing here touches torch.distributed; the node, the CLI and the worker group validate with
these before spawning anything, including which one-process options the ranks refuse
(`check_parallel_options`, the one rule for both the torchrun CLI and the worker group).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..config import (A14B, FRAMES, HEIGHT, HEIGHT_480P, WIDTH, WIDTH_480P, DiTConfig, ExpertOptions, is_finite_real,
                      is_integer, is_real)
from ..memory import GIB, rank_budget_need, rank_peak_bytes
from ..runtime import check_backend, device_memory
from ..split import A14B_HEADS, choose_split, divisors, valid_ulysses_degrees  # noqa: F401 (the split lives there)

HEARTBEAT_S = 60.0  # seconds of silence from a rank before it counts as hung


def _check_int(name: str, value, minimum: int) -> None:
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _listed(values: Sequence[int]) -> str:
    return ", ".join(map(str, values)) or "none"


@dataclass(frozen=True)
class ParallelPlan:
    """How `world_size` ranks split the sampling.

    ulysses: Ulysses degree (all-to-all heads <-> sequence inside a group of this many ranks).
    ring: ring-attention degree (the Ulysses groups of one video pass K/V blocks around a ring).
        ulysses x ring ranks share one video's tokens (the sequence degree).
    cfg_parallel: 2 runs the conditional and unconditional passes on two halves of a replica.
    fsdp: shard both experts' weights across all ranks (each rank holds 1/world_size).
    reshard_after_forward: with fsdp, free gathered weights after each module (False keeps a
        full copy of each expert once used: faster, needs memory for both full experts).
    Ranks beyond cfg x ulysses x ring form replicas: each samples other videos (seeds seed + i).
    """

    world_size: int
    ulysses: int = 1
    ring: int = 1
    cfg_parallel: int = 1
    fsdp: bool = False
    reshard_after_forward: bool = True
    num_heads: int = A14B_HEADS

    def __post_init__(self):
        _check_int("world_size", self.world_size, 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_int("ulysses", self.ulysses, 1)
        _check_int("ring", self.ring, 1)
        if self.cfg_parallel not in (1, 2):
            raise ValueError(f"cfg_parallel must be 1 or 2 (cond and uncond), got {self.cfg_parallel!r}")
        if self.num_heads % self.ulysses:
            raise ValueError(
                f"ulysses degree {self.ulysses} does not divide the {self.num_heads} attention heads; "
                f"valid degrees: {_listed(valid_ulysses_degrees(self.num_heads))}")
        if self.world_size % (self.cfg_parallel * self.sequence_degree):
            raise ValueError(self._misfit())

    def _misfit(self) -> str:
        """Why the degrees do not fill the ranks, with the degrees that would."""
        c, u, r, world = self.cfg_parallel, self.ulysses, self.ring, self.world_size
        used = f"{world} ranks cannot be split into cfg_parallel {c} x ulysses {u} x ring {r} = {c * u * r}"
        if world % c:
            return f"{used}: cfg_parallel 2 needs an even number of ranks"
        if world % (c * u):
            fitting = [d for d in valid_ulysses_degrees(self.num_heads) if (world // c) % (d * r) == 0]
            return f"{used}; valid ulysses degrees with ring {r}: {_listed(fitting)}"
        return f"{used}; valid ring degrees with ulysses {u}: {_listed(divisors(world // (c * u)))}"

    @property
    def sequence_degree(self) -> int:
        """Ranks that share one video's tokens (ulysses x ring)."""
        return self.ulysses * self.ring

    @property
    def replica_size(self) -> int:
        return self.cfg_parallel * self.sequence_degree

    @property
    def replicas(self) -> int:
        return self.world_size // self.replica_size

    @property
    def ulysses_enabled(self) -> bool:
        return self.ulysses > 1

    @property
    def ring_enabled(self) -> bool:
        return self.ring > 1

    @property
    def sequence_enabled(self) -> bool:
        return self.sequence_degree > 1

    @property
    def cfg_parallel_enabled(self) -> bool:
        return self.cfg_parallel > 1

    def ulysses_groups(self) -> list[list[int]]:
        """Rank lists of the Ulysses groups: runs of `ulysses` consecutive ranks."""
        return _runs(self.world_size, self.ulysses)

    def ring_groups(self) -> list[list[int]]:
        """Rank lists of the rings, in ring order: the same Ulysses position in each Ulysses group
        of one sequence group."""
        u, s = self.ulysses, self.sequence_degree
        return [[start + i + k * u for k in range(self.ring)] for start in range(0, self.world_size, s) for i in range(u)]

    def sequence_groups(self) -> list[list[int]]:
        """Rank lists of the sequence groups (one video's tokens): runs of ulysses x ring ranks,
        rank order = token order (ring position major, Ulysses position minor)."""
        return _runs(self.world_size, self.sequence_degree)

    def cfg_groups(self) -> list[list[int]]:
        """Rank lists of the CFG pairs: same sequence position, the two halves of one replica."""
        s, c = self.sequence_degree, self.cfg_parallel
        return [[base + i + k * s for k in range(c)] for base in range(0, self.world_size, s * c) for i in range(s)]

    def replica_groups(self) -> list[list[int]]:
        """Rank lists of the replicas (each samples its own videos): runs of cfg x ulysses x ring ranks."""
        return _runs(self.world_size, self.replica_size)

    def replica_of(self, rank: int) -> int:
        return rank // self.replica_size

    def check_tokens(self, tokens: int) -> None:
        """Refuse a sequence split finer than the video: every sequence rank needs a token."""
        if self.sequence_degree > tokens:
            fitting = [d for d in divisors(self.world_size // self.cfg_parallel) if d <= tokens]
            raise ValueError(
                f"ulysses {self.ulysses} x ring {self.ring} = {self.sequence_degree} sequence ranks but the video "
                f"has only {tokens} tokens (latent frames x height/16 x width/16); make the video larger or use a "
                f"sequence degree (ulysses x ring) of {_listed(fitting)}")

    def describe(self, unit: str = "GPU") -> str:
        """One line, e.g. "6 GPUs: CFG 2 x Ulysses 1 x Ring 3" (+ " x 2 replicas, one video each")."""
        line = (f"{self.world_size} {unit}{'s' if self.world_size != 1 else ''}: CFG {self.cfg_parallel} x "
                f"Ulysses {self.ulysses} x Ring {self.ring}")
        return line + (f" x {self.replicas} replicas, one video each" if self.replicas > 1 else "")


def _runs(world_size: int, size: int) -> list[list[int]]:
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


# ---------------------------------------------------------------------------------------------
# Devices: what the multi-GPU node's `gpus` string means


MAX_CPU_RANKS = 256  # a typo like cpu:20000 must not fork-bomb the machine


def parse_gpus(gpus: str) -> tuple[str, ...]:
    """"all", "0,1,2,3" (CUDA indices) or "cpu:N" (N CPU ranks on gloo) -> one device name per rank."""
    text = str(gpus).strip().lower()
    if text.startswith("cpu:"):
        count = text[4:]
        if not count.isdecimal() or not 1 <= int(count) <= MAX_CPU_RANKS:
            raise ValueError(f"gpus {gpus!r}: 'cpu:N' needs a whole number of ranks N >= 1 "
                             f"(at most {MAX_CPU_RANKS}), e.g. 'cpu:2'")
        return ("cpu",) * int(count)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "all":
        if available == 0:
            raise ValueError("gpus 'all': this machine has no CUDA GPU (or torch has no CUDA); "
                             "use 'cpu:N' to run N ranks on the CPU")
        return tuple(f"cuda:{i}" for i in range(available))
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdecimal() for item in items):  # isdigit takes '²', int() does not
        raise ValueError(f"gpus {gpus!r} is not 'all', a list of GPU indices like '0,1,2,3', or 'cpu:N'")
    indices = [int(item) for item in items]
    if len(set(indices)) != len(indices):
        raise ValueError(f"gpus {gpus!r} names a GPU twice; list each GPU once")
    missing = [i for i in indices if i >= available]
    if missing:
        raise ValueError(f"gpus {gpus!r}: GPU {missing[0]} does not exist; this machine has {available} "
                         f"CUDA GPU(s) (indices 0..{available - 1})" if available else
                         f"gpus {gpus!r}: this machine has no CUDA GPU; use 'cpu:N' to run N CPU ranks")
    return tuple(f"cuda:{i}" for i in indices)


@dataclass(frozen=True)
class ParallelConfig:
    """Everything a worker group is built from besides the model: devices, plan, whether each
    forward batches cond and uncond (two forwards of batch 1 halve the activations), fault bound."""

    devices: tuple[str, ...]
    plan: ParallelPlan
    heartbeat_timeout: float = HEARTBEAT_S
    batch_cfg: bool = True

    @property
    def backend(self) -> str:
        return backend_for(self.devices)

    def describe(self) -> str:
        """The split in one line, e.g. "6 GPUs: CFG 2 x Ulysses 1 x Ring 3" (the node shows it)."""
        return self.plan.describe("GPU" if self.backend == "nccl" else "CPU rank")


def device_budget(devices: Sequence[str]) -> tuple[int, str] | None:
    """(bytes, name) of the smallest GPU in `devices`, or None for CPU ranks (no budget)."""
    sizes = [(device_memory(device), device) for device in devices]
    if any(size is None for size, _ in sizes):
        return None
    size, device = min(sizes)
    return size, f"{device} ({torch.cuda.get_device_name(device)})"


def backend_for(devices: Sequence[str]) -> str:
    """torch.distributed backend of a group on `devices` (parse_gpus never mixes CUDA and CPU)."""
    return "nccl" if devices[0].startswith("cuda") else "gloo"


def parallel_config(gpus: str = "all", ulysses_degree: int = 0, fsdp: bool = True, cfg_parallel: bool = False,
                    *, ring_degree: int = 0, num_heads: int = A14B_HEADS, reshard_after_forward: bool = True,
                    heartbeat_timeout: float = HEARTBEAT_S, batch_cfg: bool = True) -> ParallelConfig:
    """The multi-GPU node's inputs -> a validated ParallelConfig.

    ulysses_degree and ring_degree 0 choose automatically (`choose_split`: Ulysses first, the
    ring takes the rest of each CFG half); both set leaves any ranks over as replicas.
    """
    check_parallel_options(ExpertOptions(), cfg_parallel=bool(cfg_parallel), batch_cfg=bool(batch_cfg))
    devices = parse_gpus(gpus)
    check_backend(backend_for(devices))  # e.g. a torch build without NCCL
    _check_int("ulysses_degree", ulysses_degree, 0)
    _check_int("ring_degree", ring_degree, 0)
    if cfg_parallel and len(devices) % 2:
        raise ValueError(f"cfg_parallel needs an even number of ranks (two halves); gpus {gpus!r} gives {len(devices)}")
    # inf is no bound; NaN, a bool or an int past the float range (2**1100) is no number of seconds
    if not (is_real(heartbeat_timeout) and heartbeat_timeout > 0
            and (is_finite_real(heartbeat_timeout) or heartbeat_timeout == math.inf)):
        raise ValueError(f"heartbeat_timeout must be a number of seconds > 0, got {heartbeat_timeout!r}")
    cfg, ulysses, ring = choose_split(len(devices), num_heads, ulysses=ulysses_degree, ring=ring_degree,
                                      cfg_parallel=bool(cfg_parallel))
    plan = ParallelPlan(world_size=len(devices), ulysses=ulysses, ring=ring, cfg_parallel=cfg, fsdp=fsdp,
                        reshard_after_forward=reshard_after_forward, num_heads=num_heads)
    return ParallelConfig(devices=devices, plan=plan, heartbeat_timeout=float(heartbeat_timeout),
                          batch_cfg=bool(batch_cfg))


# ---------------------------------------------------------------------------------------------
# Options: what the ranks do not implement of the one-process options


def parallel_refusals(options: ExpertOptions, *, cfg_parallel: bool, batch_cfg: bool = True,
                      ring: int = 1) -> list[str]:
    """Why each of `options` cannot run on the ranks of a multi-GPU run, with the fix ([]: all can).

    Accepted as they are: dtype, weight_dtype (fp8 shards stay fp8: FSDP moves their bytes),
    compile (each block on every rank), attention (set on every rank), and lora_mode: the ranks
    merge LoRAs into their shards (GGUF blocks: run on the fly, as on one GPU), and a strength
    change re-merges from the factors they keep (the LoRA node says so).
    """
    refused = []
    if options.offload != "auto":
        refused.append(f"offload={options.offload!r} (the ranks place the experts themselves: FSDP spreads both over "
                       "the GPUs, and without FSDP each rank keeps both when they fit: use auto)")
    if options.swap_blocks:
        refused.append(f"swap_blocks={options.swap_blocks} (block swap is for one process: use 0)")
    if cfg_parallel and not batch_cfg:
        refused.append("batch_cfg=False with cfg_parallel (CFG-parallel splits the batched cond/uncond pair over two "
                       "halves of the ranks: turn one of them off)")
    if ring > 1 and options.attention == "sage":
        refused.append(f"attention='sage' with ring {ring} (ring attention merges partial results by their "
                       "log-sum-exp, which SageAttention does not return: choose another attention, or ring 1)")
    return refused


def check_parallel_options(options: ExpertOptions, *, cfg_parallel: bool, batch_cfg: bool = True,
                           ring: int = 1) -> None:
    """ValueError naming every option the ranks refuse (`parallel_refusals`), before anything starts."""
    refused = parallel_refusals(options, cfg_parallel=cfg_parallel, batch_cfg=batch_cfg, ring=ring)
    if refused:
        raise ValueError(f"not on the multi-GPU path: {'; '.join(refused)}")


# ---------------------------------------------------------------------------------------------
# Memory: does a plan fit the smallest GPU it was given (memory.rank_peak_bytes)


@dataclass(frozen=True)
class RankLoad:
    """What one rank of a plan is asked to hold, besides the plan: the model, the video, how the
    weights are held and whether cond and uncond are batched."""

    cfg: DiTConfig
    video: tuple[int, int, int]  # frames, height, width
    weight_bytes: int  # per block-Linear weight: 1 (fp8), 2 or 4 (memory.weight_bytes); GGUF: the compute dtype's
    batch_cfg: bool = True
    fp8_compute: str = "dequant"  # or "scaled_mm" (weight_dtype fp8_e4m3fn_fast on fp8 tensor cores)
    gguf: tuple[tuple[str, str], ...] | None = None  # GGUF experts: (block Linear, type) pairs (memory.gguf_linear_types)

    @classmethod
    def of(cls, cfg: DiTConfig, video: tuple[int, int, int], options: ExpertOptions, weight_bytes: int,
           batch_cfg: bool, gguf: dict[str, str] | None = None) -> "RankLoad":
        """The load of the experts `options` ask for (weight_bytes: experts.weight_bytes_per_param;
        gguf: the block Linears' GGUF types of a GGUF expert kept quantised)."""
        fp8_compute = "scaled_mm" if options.weight_dtype.endswith("_fast") else "dequant"
        return cls(cfg, tuple(video), weight_bytes, batch_cfg, fp8_compute,
                   gguf=None if gguf is None else tuple(sorted(gguf.items())))

    def estimate(self, plan: ParallelPlan) -> dict:
        return rank_peak_bytes(self.cfg, *self.video, world=plan.world_size, ulysses=plan.ulysses, ring=plan.ring,
                               cfg_parallel=plan.cfg_parallel, fsdp=plan.fsdp,
                               reshard_after_forward=plan.reshard_after_forward,
                               weight_bytes_per_param=self.weight_bytes, batch_cfg=self.batch_cfg,
                               fp8_compute=self.fp8_compute,
                               gguf=None if self.gguf is None else dict(self.gguf))

    def need(self, plan: ParallelPlan) -> int:
        """Bytes a GPU must have for one rank (peak, CUDA context, NCCL buffers)."""
        return rank_budget_need(self.estimate(plan), plan.world_size)

    def describe_weights(self) -> str:
        return "GGUF" if self.gguf is not None else {1: "fp8", 2: "16-bit", 4: "fp32"}[self.weight_bytes]


MAX_SUGGESTED_RANKS = 64  # how far "more GPUs" looks


def _more_gpus(plan: ParallelPlan, load: RankLoad, budget: int) -> str | None:
    """The fewest GPUs (more than now) whose plan of the same kind (the automatic split with the
    same CFG-parallel choice, weights sharded) fits, e.g. "4 GPUs (ulysses 4, fsdp)"."""
    for world in range(plan.world_size + 1, MAX_SUGGESTED_RANKS + 1):
        if world % plan.cfg_parallel:
            continue
        cfg, ulysses, ring = choose_split(world, plan.num_heads, cfg_parallel=plan.cfg_parallel_enabled)
        bigger = ParallelPlan(world, ulysses, ring, cfg, fsdp=True, num_heads=plan.num_heads)
        if load.need(bigger) <= budget:
            return f"{world} GPUs ({describe_plan(bigger)})"
    return None


def _smaller_video(plan: ParallelPlan, load: RankLoad, budget: int) -> str | None:
    """The largest size of the same aspect ratio and frame count that fits (multiples of 16 px)."""
    frames, height, width = load.video
    for h in range(height - 16, 15, -16):
        w = max(16, round(width * h / height / 16) * 16)
        if replace(load, video=(frames, h, w)).need(plan) <= budget:
            return f"{w}x{h} (same {frames} frames)"
    return None


def fitting_changes(plan: ParallelPlan, load: RankLoad, budget: int) -> list[str]:
    """Single changes that make `plan` fit `budget` bytes per GPU, cheapest first: unbatched CFG
    (same video, two forwards per step; not with CFG-parallel), fp8 weights (half their bytes,
    within fp8 rounding), both, more GPUs, a smaller video."""
    tries = []
    unbatch = load.batch_cfg and not plan.cfg_parallel_enabled
    if unbatch:
        tries.append(("unbatched CFG (batch_cfg off, --no-batch-cfg)", replace(load, batch_cfg=False)))
    if load.weight_bytes > 1 and load.gguf is None:  # a GGUF file keeps its own types
        tries.append(("fp8 weights (weight_dtype fp8_e4m3fn)", replace(load, weight_bytes=1)))
        if unbatch:
            tries.append(("fp8 weights and unbatched CFG", replace(load, weight_bytes=1, batch_cfg=False)))
    found = [f"{what} ({size(changed.need(plan))})" for what, changed in tries if changed.need(plan) <= budget]
    found += [change for change in (_more_gpus(plan, load, budget), _smaller_video(plan, load, budget)) if change]
    return found


def size(nbytes: int) -> str:
    """Bytes for a message: GiB with one decimal, MiB below a tenth of a GiB."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def describe_plan(plan: ParallelPlan) -> str:
    parts = [f"ulysses {plan.ulysses}"] + ([f"ring {plan.ring}"] if plan.ring_enabled else [])
    parts += (["cfg_parallel"] if plan.cfg_parallel_enabled else []) + (
        [f"{plan.replicas} replicas"] if plan.replicas > 1 else [])
    parts += (["fsdp"] if plan.fsdp else []) + ([] if plan.reshard_after_forward else ["kept gathered"])
    return ", ".join(parts)


def check_plan_fits(plan: ParallelPlan, load: RankLoad, budget: int | None, where: str = "the smallest GPU") -> dict:
    """memory.rank_peak_bytes for one rank of `plan`; ValueError naming the cheapest change that
    fits when the GPU (`budget` bytes; None: no budget, e.g. CPU ranks) cannot hold it."""
    estimate = load.estimate(plan)
    need = rank_budget_need(estimate, plan.world_size)
    if budget is None or need <= budget:
        return estimate
    frames, height, width = load.video
    weights = load.describe_weights()
    changes = fitting_changes(plan, load, budget)
    advice = (f"cheapest change that fits: {changes[0]}" + (f"; also: {'; '.join(changes[1:])}" if changes[1:] else "")
              if changes else
              f"nothing tried fits (fp8, unbatched CFG, up to {MAX_SUGGESTED_RANKS} GPUs, a smaller size)")
    raise ValueError(
        f"{plan.world_size} GPUs ({describe_plan(plan)}) cannot hold {width}x{height}x{frames} with {weights} weights"
        f"{' and batched CFG' if estimate['batch'] == 2 else ''}: each needs about {size(need)} "
        f"({size(estimate['weights'])} weights, {size(estimate['gathered'])} gathered, "
        f"{size(estimate['activations'])} activations at {estimate['peak_at']}, "
        f"{size(need - estimate['total'])} CUDA/NCCL), {where} has {size(budget)}; {advice}")


def memory_lines(config: ParallelConfig, cfg: DiTConfig = A14B.dit, frames: int = FRAMES) -> list[str]:
    """The split, what one GPU of `config`'s plan needs for the model at 720p and 480p with bf16
    and fp8 weights (`RankLoad.need`), and the smallest GPU given: the multi-GPU node's memory line."""
    lines = [config.describe()]
    for label, (height, width) in (("720p", (HEIGHT, WIDTH)), ("480p", (HEIGHT_480P, WIDTH_480P))):
        loads = {name: RankLoad(cfg, (frames, height, width), weight_bytes, config.batch_cfg)
                 for name, weight_bytes in (("bf16", 2), ("fp8", 1))}
        needs = [f"{name} {size(load.need(config.plan))}" for name, load in loads.items()]
        lines.append(f"{label} x {frames} per GPU: {', '.join(needs)}")
    budget = device_budget(config.devices)
    return lines + ([f"smallest GPU: {size(budget[0])}, {budget[1]}"] if budget else [])
