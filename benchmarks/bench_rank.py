"""One rank of a multi-GPU plan on one GPU: does it fit the card, and its step time eager vs compiled.

    python benchmarks/bench_rank.py --json out.json     # rank 0 of 2 GPUs, fp8, 1280x720x81, a 24 GiB card
    python benchmarks/bench_rank.py --dry-run           # the same path on the CPU, tiny sizes

The other ranks are torch's fake process group (`torch.testing._internal.distributed.fake_pg`,
as torchtitan estimates memory): this process is rank 0 of --gpus ranks, and every collective
is issued with its real shapes and buffers (FSDP's all-gathers, Ulysses' all-to-alls, the
head's all-gather) but moves nothing. So memory and compute are one rank's; communication time
is left out (docs/multigpu.md models it, benchmarks/bench_comm.py counts it). The experts are
built by the ranks' own loader (`parallel.loading.build_expert`) from a reader of zero rows
(`RowsOfZeros`): FSDP keeps this rank's 1/P of both experts, fp8 block Linears as uint8 rows.
The CUDA allocator is capped at the card minus what a rank needs outside it (CUDA context, NCCL
buffers: memory.CUDA_OVERHEAD + NCCL_OVERHEAD), with bench_small_card.py's cap.

Timed: --steps denoising steps of the high-noise expert (`pipeline.predict_velocity`: batched
cond + uncond unless --no-batch-cfg), eager, then with every block compiled (regional compile,
then FSDP: `parallel.parallelize`'s order; the first compiled step includes the compile, and
`torch.compiler.set_stance("force_eager")` runs the same module eager). Recorded: the allocator's
peak against `memory.rank_peak_bytes`, seconds per step each way, the card's name. The values
the fake collectives leave are garbage, so no latent is checked (the CPU tests check the
numbers on real gloo ranks).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from wan22_core.runtime import default_cuda_allocator  # noqa: E402

default_cuda_allocator()  # as the CLI and the ranks do, unless the caller chose one

import torch.distributed as dist  # noqa: E402

from wan22_core.config import FRAMES, HEIGHT, WIDTH, DiTConfig  # noqa: E402
from wan22_core.fp8 import FP8, block_linear_names, swap_to_fp8  # noqa: E402
from wan22_core.memory import CUDA_OVERHEAD, GIB, NCCL_OVERHEAD, WEIGHT_BYTES, rank_peak_bytes  # noqa: E402
from wan22_core.models.attention import BACKENDS, set_attention_backend  # noqa: E402
from wan22_core.models.transformer import WanModel  # noqa: E402
from wan22_core.optimize import compile_toolchain_problem  # noqa: E402
from wan22_core.parallel.loading import build_expert  # noqa: E402
from wan22_core.parallel.mesh import init_groups  # noqa: E402
from wan22_core.parallel.plan import ParallelPlan  # noqa: E402
from wan22_core.pipeline import make_noise, predict_velocity  # noqa: E402
from bench_gpu import machine  # noqa: E402  (this folder)
from bench_small_card import cap_allocator, fmt, peak_gib, run_cli, sizes  # noqa: E402

DTYPE = torch.bfloat16


class RowsOfZeros:
    """The reader members `build_expert` uses (`checkpoints.DitRowReader`'s), handing out zero
    rows of every parameter on the device; all block Linears in fp8 when weight_dtype is fp8."""

    def __init__(self, cfg: DiTConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        with torch.device("meta"):
            self.shapes = {name: p.shape for name, p in WanModel(cfg).named_parameters()}

    def check_names(self, names) -> None:
        missing = set(names) - set(self.shapes)
        assert not missing, missing

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(stop - start, *self.shapes[name][1:], dtype=dtype, device=self.device)

    def swap_quantized(self, model: WanModel, dtype: torch.dtype, weight_dtype: torch.dtype | None) -> None:
        if weight_dtype == FP8:
            swap_to_fp8(model, block_linear_names(model), bias_dtype=dtype)

    def quantized_rows(self, layer: str, start: int, stop: int, whole_amax) -> tuple[torch.Tensor, dict]:
        columns = self.shapes[f"{layer}.weight"][1]  # fp8: one byte per weight
        return torch.zeros(stop - start, columns, dtype=torch.uint8, device=self.device), {}


def fake_ranks(world: int) -> None:
    """This process as rank 0 of `world` ranks whose collectives move nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())


def rank_experts(cfg: DiTConfig, plan: ParallelPlan, device: torch.device, weights: str, compile: bool):
    """The high-noise expert as rank 0 of `plan` holds it, and the low-noise one beside it (both
    sharded, as `parallel.fsdp.ShardedExperts` keeps them)."""
    groups = init_groups(plan, device)
    reader = RowsOfZeros(cfg, device)
    dtype = torch.float32 if device.type == "cpu" else DTYPE
    weight_dtype = FP8 if weights == "fp8" else dtype
    return [build_expert(reader, groups, device, dtype, weight_dtype=weight_dtype, compile=compile)
            for _ in ("high", "low")]


def timed_steps(model, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
                batch_cfg: bool, device: torch.device) -> list[float]:
    """Seconds of each of `steps` denoising-step predictions (guidance 4, timestep 900)."""
    seconds = []
    with torch.no_grad():
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            predict_velocity(model, x, 900, cond, uncond, 4.0, batch_cfg)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
            print(f"  step {len(seconds)}: {seconds[-1]:.3f} s", flush=True)
    return seconds


def run(args) -> dict:
    cuda = not args.dry_run
    device, cfg, (frames, height, width) = sizes(args, 2, (9, 64, 96))
    cfg_parallel = 2 if args.cfg_parallel else 1
    if args.cfg_parallel and not args.batch_cfg:
        raise SystemExit("--cfg-parallel splits the batched cond/uncond pair: drop --no-batch-cfg")
    plan = ParallelPlan(args.gpus, args.ulysses or args.gpus // cfg_parallel, cfg_parallel, fsdp=True,
                        num_heads=cfg.num_heads)
    compile = args.compile and compile_toolchain_problem(device) is None
    predicted = rank_peak_bytes(cfg, frames, height, width, world=plan.world_size, ulysses=plan.ulysses,
                                cfg_parallel=cfg_parallel, weight_bytes_per_param=WEIGHT_BYTES[args.weights],
                                batch_cfg=args.batch_cfg, text_tokens=args.text_tokens)
    usable = int(args.card_gib * GIB) - CUDA_OVERHEAD - NCCL_OVERHEAD
    result = dict(machine=machine(device), plan=dict(gpus=plan.world_size, ulysses=plan.ulysses,
                  cfg_parallel=cfg_parallel, fsdp=True), weights=args.weights, batch_cfg=args.batch_cfg,
                  card_gib=args.card_gib, video=[frames, height, width], tokens=predicted["tokens"],
                  predicted_gib=predicted["total"] / GIB, predicted_peak_at=predicted["peak_at"], compile=compile)
    print(f"# {result['machine']}\n# rank 0 of {plan.world_size} ({plan.ulysses}-way Ulysses"
          f"{', CFG-parallel' if cfg_parallel == 2 else ''}, FSDP), {args.weights} weights, {width}x{height}x{frames}, "
          f"allocator cap {usable / GIB:.2f} GiB; predicted peak {result['predicted_gib']:.2f} GiB", flush=True)

    fake_ranks(plan.world_size)
    try:
        high, low = rank_experts(cfg, plan, device, args.weights, compile)  # low: held, as on a rank, not run
        set_attention_backend(high, args.attention, device)
        if cuda:
            cap_allocator(usable, device)
        g = torch.Generator().manual_seed(0)
        cond, uncond = (torch.randn(args.text_tokens, cfg.text_dim, generator=g).to(device) for _ in range(2))
        x = make_noise(0, frames, height, width).to(device)
        try:
            with torch.compiler.set_stance("force_eager"):  # the compiled blocks, run eager
                result["eager_step_s"] = timed_steps(high, x, cond, uncond, args.steps, args.batch_cfg, device)
            if compile:
                result["compiled_step_s"] = timed_steps(high, x, cond, uncond, args.steps, args.batch_cfg, device)
            result["out_of_memory"] = False
        except torch.cuda.OutOfMemoryError as err:
            print(f"# out of memory under the cap: {str(err).splitlines()[0]}", flush=True)
            result["out_of_memory"] = True
        result["peak_gib"] = peak_gib(device)
    finally:
        dist.destroy_process_group()
    eager = min(result.get("eager_step_s") or [float("nan")])
    compiled = min(result.get("compiled_step_s") or [float("nan")])
    print(f"# peak {fmt(result['peak_gib'])} GiB (predicted {result['predicted_gib']:.2f}); step eager {eager:.3f} s, "
          f"compiled {compiled:.3f} s ({eager / compiled:.2f}x)" if compile else
          f"# peak {fmt(result['peak_gib'])} GiB (predicted {result['predicted_gib']:.2f}); step eager {eager:.3f} s")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2, help="ranks of the plan this process is rank 0 of (default 2)")
    p.add_argument("--ulysses", type=int, default=0, help="Ulysses degree (0: all ranks of a CFG half)")
    p.add_argument("--cfg-parallel", action="store_true")
    p.add_argument("--weights", choices=("fp8", "bf16"), default="fp8", help="how the experts are held (default fp8)")
    p.add_argument("--no-batch-cfg", dest="batch_cfg", action="store_false",
                   help="cond and uncond one after the other (half the activations)")
    p.add_argument("--card-gib", type=float, default=24.0, help="the card to emulate, GiB (default 24)")
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--height", type=int, default=HEIGHT)
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--steps", type=int, default=3, help="steps timed each way (default 3; the first warms up)")
    p.add_argument("--text-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--attention", choices=BACKENDS, default="auto")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="time eager only")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the code path")
    p.add_argument("--json", help="write the results here")
    return p


if __name__ == "__main__":
    run_cli(parser, run)
