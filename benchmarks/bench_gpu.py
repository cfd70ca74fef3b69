"""Wan2.2 A14B blocks on one GPU: speed, memory and a projected full run, in one sitting.

    python benchmarks/bench_gpu.py --json out.json --chart out.png   # one H100/H200-class GPU, < 8 min
    python benchmarks/bench_gpu.py --dry-run                         # same code path on the CPU, tiny sizes

Random bf16 weights at real size (dim 5120, ffn 13824, 40 heads), but only `--blocks` transformer
blocks (2), not the model: a block is what runs 40 x 40 times per video. Token grids: 720p =
21 x 45 x 80 = 75,600 tokens, 480p = 21 x 30 x 52 = 32,760; batch 2 is cond+uncond in one
forward (the pipeline's batched CFG), batch 1 a single pass.

Configurations, in run order (a time budget skips the tail with a note; one failing
configuration is noted and the run goes on): ours eager with SDPA; diffusers'
`WanTransformerBlock` (the block of `WanTransformer3DModel`) with the same weights, plus an
output parity check; each SDPA kernel; the self-attention kernel alone and the block with each
installed attention backend (`available_backends()`: FlashAttention 2/3/4, SageAttention); fp8
block Linears (`wan22_core.fp8`, both compute modes); block swap (`wan22_core.offload.BlockSwap`, every block streamed from pinned host
memory); the non-block part of a forward and a 720p VAE decode, for the projection; last, ours
under torch.compile (`wan22_core.optimize.compile_blocks`, compile time reported apart), with
SDPA and with each installed exact backend.
Optional packages, each skipped with a note when absent: diffusers, triton (compile),
flash-attn / flash-attn-4 / sageattention, matplotlib (--chart). Predicted activation memory (wan22_core.memory)
is printed next to the measured one for the eager configurations.

FLOPs per block (a multiply-add is 2 FLOPs; L tokens, d = dim, f = ffn_dim, Lc = 512 text slots,
all times the batch), as in design.md §5:
    self-attn projections q, k, v, o     8 L d^2
    self-attention (QK^T and PV)         4 L^2 d
    cross-attn projections q, o          4 L d^2
    cross-attn k, v of the text          4 Lc d^2
    cross-attention (QK^T and PV)        4 L Lc d
    FFN (two Linears)                    4 L d f
Norms, RoPE, modulation and softmax are not counted. TFLOP/s = FLOPs / median block time; the
fraction is of the best bf16 torch.matmul measured in the same run (8192^3 and the FFN shape).

Projection: seconds for 40 steps = 40 x (40 x ms per block at batch 2 + non-block ms) + VAE
decode (measured at 720p, scaled by pixels for 480p); the text encoder (about a second) is left
out. Printed next to the official Wan2.2 single-H100 times (1041.5 s at 720p, 326.9 s at 480p).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from wan22_core.config import DiTConfig, VAEConfig  # noqa: E402
from wan22_core.memory import GIB, block_activation_peak, table_720p  # noqa: E402
from wan22_core.models.attention import AttentionKernel, available_backends, set_attention_backend  # noqa: E402
from wan22_core.models.transformer import RotaryEmbedding, WanBlock, WanModel  # noqa: E402
from bench_comm import OFFICIAL_H100_480P_S, OFFICIAL_H100_720P_S, STEPS, forward_flops  # noqa: E402
from reference import rel_l2  # noqa: E402  (tests/, which bench_comm puts on the path)

# Wan2.2 T2V-A14B, 1 x H100, 40 steps (the Wan2.2 README table; bench_comm.py says where from)
OFFICIAL_S = {"720p": OFFICIAL_H100_720P_S[1], "480p": OFFICIAL_H100_480P_S}
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    name: str  # "720p" / "480p"
    grid: tuple[int, int, int]  # token grid (frames, height/16, width/16)
    batch: int
    pixels: tuple[int, int]  # (height, width) of the video

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch}"


@dataclass
class Result:
    config: str
    shape: str
    tokens: int
    batch: int
    ms_per_block: float | None = None
    tflops: float | None = None
    frac_of_matmul_peak: float | None = None
    peak_gib: float | None = None  # max_memory_allocated while timing (weights + inputs + activations)
    activation_gib: float | None = None  # the same minus what was allocated before the first call
    predicted_activation_gib: float | None = None  # wan22_core.memory, eager configurations only
    compile_s: float | None = None
    note: str = ""


def block_flops(cfg: DiTConfig, tokens: int, batch: int) -> float:
    """Matmul FLOPs of one WanBlock forward (formula in the module docstring, bench_comm.forward_flops)."""
    return batch * forward_flops(tokens, cfg.dim, cfg.ffn_dim, 1, cfg.text_len)


class Stack(nn.Module):
    """A few blocks under the name `blocks`, so engine helpers written for WanModel apply."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


# ---------------------------------------------------------------------------------------------
# Inputs


STREAM = "contiguous"  # recorded in the JSON: runs before this layout fed a transposed stream


def ours_inputs(cfg: DiTConfig, shape: Shape, device):
    """(x, e0, context, rope) as WanModel.forward hands them to a block.

    x is the [B, L, dim] fp32 residual stream, contiguous as WanModel makes it once after the
    patch embedding (a transposed, channel-major stream made every block ~4% slower at 720p).
    """
    b, n, d = shape.batch, shape.tokens, cfg.dim
    x = torch.randn(b, n, d, device=device)
    e0 = 0.1 * torch.randn(b, 6, d, device=device)  # [B, 6, dim] fp32
    context = torch.randn(b, cfg.text_len, d, device=device, dtype=DTYPE)
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_max_positions)(shape.grid, torch.device(device))
    return x, e0, context, rope


def diffusers_inputs(cfg: DiTConfig, shape: Shape, device):
    """(hidden_states, encoder_hidden_states, temb, rotary_emb) as WanTransformer3DModel passes them."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    b, n, d = shape.batch, shape.tokens, cfg.dim
    rope = WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, cfg.rope_max_positions).to(device)
    f, h, w = shape.grid
    pt, ph, pw = cfg.patch_size
    cos, sin = rope(torch.empty(1, 1, f * pt, h * ph, w * pw, device="meta"))  # reads the shape only
    hidden = torch.randn(b, n, d, device=device, dtype=DTYPE)  # diffusers keeps the stream in bf16
    context = torch.randn(b, cfg.text_len, d, device=device, dtype=DTYPE)
    temb = 0.1 * torch.randn(b, 6, d, device=device, dtype=DTYPE)
    return hidden, context, temb, (cos.float(), sin.float())  # rope is in _keep_in_fp32_modules


# ---------------------------------------------------------------------------------------------
# Building the configurations


def make_blocks(cfg: DiTConfig, count: int, device) -> list[WanBlock]:
    torch.manual_seed(0)
    with torch.device(device):
        return [WanBlock(cfg).to(DTYPE).eval() for _ in range(count)]


def diffusers_twin(block: WanBlock, cfg: DiTConfig, device) -> nn.Module:
    """diffusers' WanTransformerBlock holding `block`'s weights (names via wan22_core.checkpoints.keymaps)."""
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock

    from wan22_core.checkpoints.keymaps import dit_official_to_diffusers

    with torch.device(device):
        twin = WanTransformerBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, "rms_norm_across_heads",
                                   cross_attn_norm=True, eps=cfg.eps)
    state = {dit_official_to_diffusers(f"blocks.0.{k}")[len("blocks.0."):]: v for k, v in block.state_dict().items()}
    twin.load_state_dict(state)
    twin.to(DTYPE).eval()
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)  # as from_pretrained(torch_dtype=bf16) leaves them
    for name, module in twin.named_modules():
        if name in keep:
            module.float()
    twin.scale_shift_table.data = twin.scale_shift_table.data.float()
    return twin


def fp8_blocks(blocks: list[WanBlock], compute: str) -> Stack:
    """Copies of `blocks` with scaled-fp8 Linears (as a comfy fp8 checkpoint loads); raises if the API differs."""
    from wan22_core import fp8

    stack = Stack(copy.deepcopy(blocks))
    fp8.quantize_block_linears(stack)
    fp8.set_fp8_compute(stack, compute)
    return stack


# ---------------------------------------------------------------------------------------------
# Timing


def _mark(cuda: bool):
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_ms(start, end) -> float:
    return start.elapsed_time(end) if hasattr(start, "elapsed_time") else (end - start) * 1e3


def time_blocks(blocks, args, warmup: int, repeats: int, cuda: bool) -> tuple[list[float], list[float]]:
    """(ms of each block's first call, ms of every call after the warm-up); outputs are dropped at once.

    The first of the `warmup` rounds also shows compile time under torch.compile.
    """
    rounds = []
    with torch.no_grad():
        for _ in range(warmup + repeats):
            marks = []
            for block in blocks:
                start = _mark(cuda)
                block(*args)
                marks.append((start, _mark(cuda)))
            rounds.append(marks)
        if cuda:
            torch.cuda.synchronize()
    first = [_elapsed_ms(a, b) for a, b in rounds[0]]
    return first, [_elapsed_ms(a, b) for marks in rounds[warmup:] for a, b in marks]


class Bench:
    def __init__(self, args, cfg: DiTConfig, device: torch.device):
        self.args, self.cfg, self.device = args, cfg, device
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.results: list[Result] = []
        self.notes: list[str] = []
        self.extra: dict = {}
        self.matmul_peak_tflops: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def has_time(self, needed_s: float, what: str) -> bool:
        if self.elapsed() + needed_s <= self.args.budget_s:
            return True
        self.note(f"skipped {what}: {self.elapsed():.0f} s used of the {self.args.budget_s:.0f} s budget")
        return False

    def note(self, text: str) -> None:
        print(f"# note: {text}", flush=True)
        self.notes.append(text)

    def section(self, fn, *args) -> None:
        """Run one section; an unexpected failure becomes a note, and the run goes on."""
        try:
            fn(*args)
        except Exception as err:  # one GPU sitting: keep every number the other sections can give
            traceback.print_exc()
            self.note(f"{fn.__name__} failed: {type(err).__name__}: {err}"[:400])
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self, config: str, blocks, make_inputs, shapes, predict: str | None = "bf16", context=nullcontext,
            compiled: bool = False) -> None:
        """Time `blocks` on each shape; predict: None, "bf16" or an fp8 compute mode."""
        for shape in shapes:
            if not self.has_time(20, f"{config} at {shape.label}"):
                return
            result = Result(config, shape.label, shape.tokens, shape.batch)
            try:
                self._measure(result, blocks, make_inputs, shape, predict, context, compiled)
            except torch.cuda.OutOfMemoryError:
                result.note = "out of memory"
            except Exception as err:  # one broken configuration must not cost the whole GPU run
                result.note = f"{type(err).__name__}: {err}"[:300]
                traceback.print_exc()
            self.results.append(result)
            self._print(result)
            if self.cuda:
                torch.cuda.empty_cache()
        self.save()

    def _measure(self, result, blocks, make_inputs, shape, predict, context, compiled) -> None:
        args = make_inputs(shape)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with context():
            first, later = time_blocks(blocks, args, self.args.warmup, self.args.repeats, self.cuda)
        ms = statistics.median(later)
        result.ms_per_block = ms
        result.tflops = block_flops(self.cfg, shape.tokens, shape.batch) / (ms * 1e-3) / 1e12
        if self.matmul_peak_tflops:
            result.frac_of_matmul_peak = result.tflops / self.matmul_peak_tflops
        if compiled:  # the first call of each block compiles (or hits the cache of the one before)
            result.compile_s = sum(max(0.0, f - ms) for f in first) / 1e3
        if self.cuda:
            result.peak_gib = torch.cuda.max_memory_allocated() / GIB
            result.activation_gib = (torch.cuda.max_memory_allocated() - before) / GIB
        if predict is not None:  # the block's fp32 input is allocated before the first call
            fp8 = None if predict == "bf16" else predict
            peak = block_activation_peak(self.cfg, shape.tokens, shape.batch, 2, fp8)[0]
            result.predicted_activation_gib = (peak - 4 * shape.batch * shape.tokens * self.cfg.dim) / GIB

    @staticmethod
    def _print(r: Result) -> None:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        print(f"{r.config:<34} {r.shape:<8} {f(r.ms_per_block, '10.2f')} {f(r.tflops, '8.3g')} "
              f"{f(None if r.frac_of_matmul_peak is None else 100 * r.frac_of_matmul_peak, '6.1f')} "
              f"{f(r.peak_gib, '7.2f')} {f(r.activation_gib, '7.2f')} {f(r.predicted_activation_gib, '7.2f')} "
              f"{f(r.compile_s, '8.1f')}  {r.note}", flush=True)

    def save(self) -> None:
        """Write the JSON after every configuration, so a run cut short still leaves its numbers."""
        if not self.args.json:
            return
        data = {"machine": self.extra.get("machine"), "dry_run": self.args.dry_run, "cfg": asdict(self.cfg),
                "blocks": self.args.blocks, "stream": STREAM, "matmul_peak_tflops": self.matmul_peak_tflops,
                "results": [asdict(r) for r in self.results], "notes": self.notes, "elapsed_s": self.elapsed(),
                **{k: v for k, v in self.extra.items() if k != "machine"}}
        Path(self.args.json).write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------
# The sections of a run


def matmul_peak(bench: Bench, shapes: list[Shape]) -> None:
    """Best bf16 torch.matmul TFLOP/s: a square 8192^3 and the FFN's [B*L, dim] x [dim, ffn]."""
    cfg, dev = bench.cfg, bench.device
    square = 256 if bench.args.dry_run else 8192
    big = max(shapes, key=lambda s: s.batch * s.tokens)
    sizes = [(square, square, square), (big.batch * big.tokens, cfg.dim, cfg.ffn_dim)]
    found = {}
    for m, k, n in sizes:
        a = torch.randn(m, k, device=dev, dtype=DTYPE)
        b = torch.randn(k, n, device=dev, dtype=DTYPE)
        _, ms = time_blocks([torch.matmul], (a, b), 3, 10, bench.cuda)
        found[f"{m}x{k}x{n}"] = 2 * m * k * n / (statistics.median(ms) * 1e-3) / 1e12
        del a, b
    bench.matmul_peak_tflops = max(found.values())
    bench.extra["matmul_tflops"] = found
    print("# bf16 matmul TFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in found.items()), flush=True)


def section_ours_and_diffusers(bench: Bench, blocks, shapes) -> None:
    cfg, dev = bench.cfg, bench.device
    bench.run("ours eager", blocks, lambda s: ours_inputs(cfg, s, dev), shapes)
    try:
        twins = [diffusers_twin(b, cfg, dev) for b in blocks]
    except ImportError as err:
        bench.note(f"diffusers comparison skipped: diffusers is not importable here ({err})")
    else:
        bench.extra["parity_vs_diffusers"] = parity(blocks[0], twins[0], cfg, min(shapes, key=lambda s: s.tokens), dev)
        bench.run("diffusers WanTransformerBlock", twins, lambda s: diffusers_inputs(cfg, s, dev), shapes, predict=None)
        del twins


def parity(ours: WanBlock, twin: nn.Module, cfg: DiTConfig, shape: Shape, dev) -> float:
    """Relative L2 difference of one block ours vs diffusers on the same inputs (bf16 rounding expected)."""
    hidden, context, temb, rope = diffusers_inputs(cfg, shape, dev)
    with torch.no_grad():
        ours_rope = RotaryEmbedding(cfg.head_dim, cfg.rope_max_positions)(shape.grid, torch.device(dev))
        a = ours(hidden.float(), temb.float(), context, ours_rope).float()
        b = twin(hidden, context, temb, rope).float()
    rel = rel_l2(a, b)
    print(f"# parity ours vs diffusers block at {shape.label}: relative L2 {rel:.2e}", flush=True)
    return rel


def section_sdpa(bench: Bench, blocks, b2) -> None:
    """The block with SDPA pinned to each of its kernels (GPU only)."""
    if not bench.cuda:
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs = lambda s: ours_inputs(bench.cfg, s, bench.device)  # noqa: E731
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        kernel = getattr(SDPBackend, name, None)
        if kernel is not None:
            bench.run(f"ours sdpa[{name.split('_')[0].lower()}]", blocks, inputs, b2[:1],
                      context=lambda k=kernel: sdpa_kernel(k))


def attention_flops(tokens: int, batch: int, cfg: DiTConfig) -> float:
    """QK^T and PV of the self-attention: 4 L^2 d per sample."""
    return batch * 4 * tokens * tokens * cfg.dim


def section_attention(bench: Bench, blocks, b2) -> None:
    """The self-attention kernel alone (SDPA and each installed backend: ms, TFLOP/s, difference to
    SDPA), then the block with each installed backend."""
    cfg, dev = bench.cfg, bench.device
    installed = [b for b in available_backends() if b != "sdpa"]
    bench.note(f"attention backends installed: {', '.join(['sdpa', *installed])}")
    kernels = bench.extra.setdefault("attention_kernel", [])
    for shape in b2:
        if not bench.has_time(20, f"attention kernels at {shape.label}"):
            break
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(shape.batch, shape.tokens, cfg.num_heads, cfg.head_dim, generator=g, device=dev,
                               dtype=DTYPE) for _ in range(3))
        reference = None
        for backend in ["sdpa", *installed]:
            row = {"backend": backend, "shape": shape.label}
            try:
                kernel = AttentionKernel(backend)
                first, ms = time_blocks([kernel], (q, k, v), bench.args.warmup, bench.args.repeats, bench.cuda)
                out = kernel(q, k, v).float()
                if reference is None:
                    reference = out
                row.update(ms=statistics.median(ms), first_ms=first[0],
                           tflops=attention_flops(shape.tokens, shape.batch, cfg) / (statistics.median(ms) * 1e-3) / 1e12,
                           rel_l2_vs_sdpa=rel_l2(out, reference))
                del out
            except Exception as err:  # e.g. a package built for another CUDA or GPU
                traceback.print_exc()
                row["note"] = f"{type(err).__name__}: {err}"[:300]
            kernels.append(row)
            print("# attention kernel " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items()), flush=True)
        del q, k, v, reference
    bench.save()
    stack = Stack(blocks)
    inputs = lambda s: ours_inputs(cfg, s, dev)  # noqa: E731
    for backend in installed:
        try:
            set_attention_backend(stack, backend, dev)
            bench.run(f"ours {backend}", blocks, inputs, b2)
        except ValueError as err:  # installed but not importable (e.g. built for another CUDA)
            bench.note(f"attention backend {backend} skipped: {err}")
        finally:
            set_attention_backend(stack, "sdpa", dev)


def section_compile(bench: Bench, blocks, b2) -> None:
    """Regional torch.compile with SDPA, then with each installed exact attention backend."""
    from wan22_core.optimize import compile_blocks

    stack = Stack(copy.deepcopy(blocks))
    problem = compile_blocks(stack, bench.device)
    if problem is not None:
        bench.note(f"torch.compile skipped: {problem}")
        return
    shapes = b2[:1] if bench.args.dry_run else b2  # a CPU compile takes ~30 s per shape
    inputs = lambda s: ours_inputs(bench.cfg, s, bench.device)  # noqa: E731
    for backend in ["sdpa", *(b for b in available_backends() if b not in ("sdpa", "sage"))]:
        if not bench.has_time(60, f"torch.compile with {backend}"):
            return
        set_attention_backend(stack, backend, bench.device)  # a new backend recompiles
        bench.run("ours compiled" + ("" if backend == "sdpa" else f" + {backend}"), list(stack.blocks), inputs,
                  shapes, predict=None, compiled=True)


def section_fp8(bench: Bench, blocks, b2) -> None:
    for compute in ("auto", "dequant"):
        try:
            stack = fp8_blocks(blocks, compute)
        except (ImportError, AttributeError, TypeError) as err:
            bench.note(f"fp8 skipped: wan22_core.fp8 is missing or its API differs ({type(err).__name__}: {err})")
            return
        mode = compute
        if compute == "auto":
            mode = "scaled_mm" if bench.cuda and torch.cuda.get_device_capability() >= (8, 9) else "dequant"
        bench.run(f"ours fp8 ({compute}: {mode})", list(stack.blocks),
                  lambda s: ours_inputs(bench.cfg, s, bench.device), b2, predict=mode)
        del stack


def section_block_swap(bench: Bench, blocks, b2) -> None:
    """Every block streamed from (pinned) host memory, the next one prefetched on a side stream."""
    from wan22_core.offload import BlockSwap

    inputs = lambda s: ours_inputs(bench.cfg, s, bench.device)  # noqa: E731
    stack = Stack(copy.deepcopy(blocks))
    swap = BlockSwap(stack.blocks, len(blocks), bench.device)
    bench.run(f"ours block swap ({len(blocks)}/{len(blocks)} streamed)", list(stack.blocks), inputs, b2, predict=None)
    swap.remove()
    del stack
    try:
        stack = fp8_blocks(blocks, "auto")
    except (ImportError, AttributeError, TypeError):
        return
    swap = BlockSwap(stack.blocks, len(blocks), bench.device)  # BlockSwap moves parameters, not buffers
    bench.run("ours fp8 + block swap", list(stack.blocks), inputs, b2[:1], predict=None)
    swap.remove()


def section_overhead(bench: Bench, b2) -> None:
    """The non-block part of one forward (embeddings, time projection, head) at each batch-2 shape."""
    cfg, dev = bench.cfg, bench.device
    torch.manual_seed(0)
    with torch.device(dev):
        model = WanModel(replace(cfg, num_layers=1))
    model.blocks = torch.nn.ModuleList()  # everything but the blocks
    model = model.to(DTYPE).eval()
    overhead = {}
    for shape in b2:
        f, h, w = shape.grid
        pt, ph, pw = cfg.patch_size
        x = torch.randn(shape.batch, cfg.in_dim, f * pt, h * ph, w * pw, device=dev)
        t = torch.full((shape.batch,), 900.0, device=dev)
        context = torch.randn(shape.batch, cfg.text_len, cfg.text_dim, device=dev, dtype=DTYPE)
        _, ms = time_blocks([model], (x, t, context), 2, 5, bench.cuda)
        overhead[shape.name] = statistics.median(ms)
        print(f"# non-block part of a forward at {shape.label}: {overhead[shape.name]:.1f} ms", flush=True)
    bench.extra["non_block_ms"] = overhead


def section_vae(bench: Bench, shape: Shape) -> None:
    """One decode of an 81-frame latent (untiled, as the pipeline's default) with random weights."""
    from wan22_core.models.vae import WanVAE

    if not bench.has_time(120, "VAE decode"):
        return
    vae_cfg = VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1) if bench.args.dry_run else VAEConfig()
    with torch.device(bench.device):
        vae = WanVAE(vae_cfg).to(DTYPE).eval()
    f, h, w = shape.grid
    z = torch.randn(1, vae_cfg.z_dim, f, 2 * h, 2 * w, device=bench.device)
    try:
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats()
        first, _ = time_blocks([vae.decode], (z,), 1, 0, bench.cuda)
    except torch.cuda.OutOfMemoryError:
        bench.note(f"VAE decode at {shape.name} ran out of memory")
        return
    bench.extra["vae_decode_s"] = {shape.name: first[0] / 1e3}
    if bench.cuda:
        bench.extra["vae_decode_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    print(f"# VAE decode at {shape.name}: {first[0] / 1e3:.1f} s (one cold run)", flush=True)


# ---------------------------------------------------------------------------------------------
# Summary: ratios, projection, chart


def ratios(bench: Bench) -> list[dict]:
    """ours / diffusers, compiled / eager, fp8 / bf16 ... per shape, where both were measured."""
    by = {(r.config, r.shape): r.ms_per_block for r in bench.results if r.ms_per_block}
    base = "ours eager"
    out = []
    for (config, shape), ms in by.items():
        if config == base:
            continue
        ref = by.get((base, shape))
        if ref:
            out.append({"shape": shape, "ratio": f"{base} / {config}", "value": ref / ms}
                       if config.startswith("diffusers") else
                       {"shape": shape, "ratio": f"{config} / {base}", "value": ms / ref})
    print("\n# time ratios (< 1: the first is faster)")
    for r in out:
        print(f"{r['shape']:<8} {r['ratio']:<60} {r['value']:.3f}")
    return out


def projection(bench: Bench, b2: list[Shape]) -> list[dict]:
    """Full 40-step run on one GPU per configuration, next to the official single-H100 time."""
    overhead = bench.extra.get("non_block_ms", {})
    vae = bench.extra.get("vae_decode_s", {})
    vae_720 = vae.get(b2[0].name)
    rows = []
    for r in bench.results:
        shape = next((s for s in b2 if s.label == r.shape), None)
        if shape is None or r.ms_per_block is None:
            continue
        if shape.name in vae:
            vae_s = vae[shape.name]
        elif vae_720 is not None:  # decode time scales with pixels
            vae_s = vae_720 * (shape.pixels[0] * shape.pixels[1]) / (b2[0].pixels[0] * b2[0].pixels[1])
        else:
            vae_s = 0.0
        dit_s = STEPS * (DiTConfig().num_layers * r.ms_per_block + overhead.get(shape.name, 0.0)) / 1e3
        rows.append({"config": r.config, "resolution": shape.name, "dit_s": dit_s, "vae_s": vae_s,
                     "total_s": dit_s + vae_s, "official_s": OFFICIAL_S[shape.name],
                     "ratio_to_official": (dit_s + vae_s) / OFFICIAL_S[shape.name]})
    print("\n# projected full run on this GPU (40 steps x 40 blocks, batched CFG) vs official 1 x H100")
    print(f"{'configuration':<34} {'res':<5} {'DiT s':>8} {'VAE s':>7} {'total s':>8} {'official':>9} {'ratio':>6}")
    for p in rows:
        print(f"{p['config']:<34} {p['resolution']:<5} {p['dit_s']:8.1f} {p['vae_s']:7.1f} {p['total_s']:8.1f} "
              f"{p['official_s']:9.1f} {p['ratio_to_official']:6.3f}")
    return rows


def chart(bench: Bench, path: str, b2: list[Shape], rows: list[dict]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from charts import hbars, pyplot  # benchmarks/charts.py: the README chart's helpers

    try:
        plt = pyplot()
    except SystemExit as err:  # a GPU run keeps its numbers without the chart
        bench.note(f"chart skipped: {err}")
        return
    fig, axes = plt.subplots(1, len(b2) + 1, figsize=(6 * (len(b2) + 1), 5))
    for ax, shape in zip(axes, b2):
        measured = [r for r in bench.results if r.shape == shape.label and r.ms_per_block]
        hbars(ax, [r.config for r in measured], [r.ms_per_block for r in measured], "tab:blue",
              xlabel="ms per block (median)", title=f"{shape.label}: {shape.tokens:,} tokens")
    top = [p for p in rows if p["resolution"] == b2[0].name]
    hbars(axes[-1], [p["config"] for p in top] + ["official (1 x H100)"],
          [p["total_s"] for p in top] + [OFFICIAL_S[b2[0].name]], ["tab:green"] * len(top) + ["tab:gray"],
          fmt="{:.0f} s", xlabel="seconds for 81 frames, 40 steps", title=f"{b2[0].name}: projected full run on one GPU")
    fig.suptitle(f"Wan2.2 A14B block, {bench.extra.get('machine', {}).get('device', '?')}"
                 + (" (DRY RUN: CPU, tiny sizes)" if bench.args.dry_run else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"# chart written to {path}")


# ---------------------------------------------------------------------------------------------


def setup(args) -> tuple[DiTConfig, torch.device, list[Shape]]:
    if args.dry_run:  # head dim 128 as real; everything else small enough for a laptop CPU in bf16
        cfg = DiTConfig(dim=128, ffn_dim=352, num_heads=1, text_len=64)
        return cfg, torch.device("cpu"), [Shape("720p", (2, 4, 6), 2, (720, 1280)), Shape("720p", (2, 4, 6), 1, (720, 1280)),
                                          Shape("480p", (2, 3, 4), 2, (480, 832)), Shape("480p", (2, 3, 4), 1, (480, 832))]
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device visible; run with --dry-run to check the script on the CPU")
    return DiTConfig(), torch.device("cuda"), [
        Shape("720p", (21, 45, 80), 2, (720, 1280)), Shape("720p", (21, 45, 80), 1, (720, 1280)),
        Shape("480p", (21, 30, 52), 2, (480, 832)), Shape("480p", (21, 30, 52), 1, (480, 832))]


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


SECTIONS = ("ours", "sdpa", "attention", "fp8", "swap", "compile", "overhead", "vae")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write all numbers here (rewritten after every configuration)")
    p.add_argument("--chart", help="PNG of per-block time by configuration and the projection (needs matplotlib)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, not the GPU")
    p.add_argument("--blocks", type=int, default=2, help="blocks per configuration (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (>= 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median over rounds and blocks is kept")
    p.add_argument("--budget-s", type=float, default=380.0,
                   help="start nothing new after this many seconds (default 380: the longest single item, a "
                        "recompile or the VAE decode, then still ends before 8 minutes)")
    p.add_argument("--only", help=f"comma-separated sections to run (default all): {','.join(SECTIONS)}")
    args = p.parse_args()
    if args.warmup < 1 or args.repeats < 1 or args.blocks < 1:
        p.error(f"--warmup, --repeats and --blocks must be >= 1, got {args.warmup}, {args.repeats}, {args.blocks}")
    if args.dry_run:
        args.warmup, args.repeats = 1, 2

    cfg, device, shapes = setup(args)
    b2 = [s for s in shapes if s.batch == 2]
    bench = Bench(args, cfg, device)
    bench.extra["machine"] = machine(device)
    bench.extra["memory_model_720p"] = table_720p()
    print("# " + ", ".join(f"{k} {v}" for k, v in bench.extra["machine"].items()))
    print(f"# DiT dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads; {args.blocks} blocks; "
          + "; ".join(f"{s.label} = {s.tokens:,} tokens" for s in shapes))
    matmul_peak(bench, shapes)
    print(f"\n{'configuration':<34} {'shape':<8} {'ms/block':>10} {'TFLOP/s':>8} {'%peak':>6} {'peakGiB':>7} "
          f"{'actGiB':>7} {'predGiB':>7} {'compile_s':>8}  note")
    blocks = make_blocks(cfg, args.blocks, device)
    run = set(args.only.split(",")) if args.only else set(SECTIONS)
    if "ours" in run:
        bench.section(section_ours_and_diffusers, bench, blocks, shapes)
    for name, section in (("sdpa", section_sdpa), ("attention", section_attention), ("fp8", section_fp8),
                          ("swap", section_block_swap)):
        if name in run:
            bench.section(section, bench, blocks, b2)
    if "overhead" in run:  # the projection's other inputs before compile, which the budget may cut
        bench.section(section_overhead, bench, b2)
    if "vae" in run:
        bench.section(section_vae, bench, b2[0])
    if "compile" in run:
        bench.section(section_compile, bench, blocks, b2)  # compiling may take minutes
    del blocks
    bench.extra["ratios"] = ratios(bench)
    rows = projection(bench, b2)
    bench.extra["projection"] = rows
    print("\n# memory model, 720p (wan22_core.memory)\n" + bench.extra["memory_model_720p"])
    if args.chart:
        chart(bench, args.chart, b2, rows)
    bench.save()
    print(f"\n# done in {bench.elapsed():.0f} s")


if __name__ == "__main__":
    main()
