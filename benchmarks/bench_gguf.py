"""GGUF dequantisation speed per type, ours (torch) against the `gguf` package's numpy, in one run.

    python benchmarks/bench_gguf.py                          # CPU: every type, a 512 x 5120 weight
    python benchmarks/bench_gguf.py --device cuda --compile  # GPU: a 13824 x 5120 weight (A14B's FFN), compiled too
    python benchmarks/bench_gguf.py --device cuda --block --types Q8_0,Q4_K --json out.json  # + 720p blocks
    python benchmarks/bench_gguf.py --dry-run                # tiny sizes: checks the script

1. dequant: one weight of random valid blocks per type (random codes and packed scales, finite
   fp16 scales: tests/fakes.py), dequantised whole, as `GGUFLinear` does before each matmul.
   GB/s = bytes of output / mean seconds: ours to fp32 and to bf16 (the compute dtype) on
   --device; on the CPU also the gguf package's numpy to fp32 and the ratio ours / numpy ("view":
   the output is the stored bytes reinterpreted, no work). Each row checks ours against numpy:
   max |diff| (0 means bit-exact, as the tests require on the CPU; on a GPU it checks the CUDA
   kernels the same way).
2. compile (--compile): the same under `torch.compile` (compile seconds apart), with its
   max |diff| against eager; inductor may fuse a multiply and a subtract into one rounding.
3. linear: one Linear forward on --tokens rows, `nn.Linear` holding the dense weight against
   `GGUFLinear` holding Q8_0 and Q4_K bytes (dequantise + matmul), ms and ratio.
4. block (--block): seconds per transformer block at 720p (A14B sizes, 75,600 tokens, batch 2:
   batched CFG) in bf16 against the same block with its ten Linears quantised to Q8_0 and to Q4_K
   (our encoder, `quant.gguf_quantize`) and held so (`GGUFLinear`), all in one run, eager (and compiled with --compile); each eager GGUF block's output is checked against a
   bf16 block holding its dequantised weights (max |diff|, 0 expected), each compiled one against
   its eager self (rel. L2), and the weight bytes are printed. With
   --dry-run: a tiny block and token grid on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the random valid blocks

from wan22_core.config import DiTConfig  # noqa: E402
from wan22_core.fp8 import block_linears  # noqa: E402
from wan22_core.quant import TYPES, GGUFLinear, dequantize, swap_to_gguf  # noqa: E402
from wan22_core.quant.gguf_quantize import quantize  # noqa: E402
from bench_gpu import DTYPE, Shape, machine, ours_inputs, time_blocks  # noqa: E402  (this folder)
from fakes import random_gguf_blocks  # noqa: E402

LINEAR_TYPES = ("Q8_0", "Q4_K")
BLOCK_720P = Shape("720p", (21, 45, 80), 2, (720, 1280))  # batched CFG, as the pipeline runs


def seconds(fn, repeats: int) -> float:
    """Mean wall seconds of `fn()` over `repeats` calls after a warm-up (torch's Timer: it syncs
    the GPU around the timing; the thread count is ours, not its default of one)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(repeats).mean


def gbps(numel: int, dtype: torch.dtype, s: float) -> float:
    return numel * dtype.itemsize / s / 1e9


def reference(raw: np.ndarray, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as numpy_dequantize

    return numpy_dequantize(raw, GGMLQuantizationType[name])


def max_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return (ours.float().cpu() - torch.from_numpy(np.asarray(theirs, np.float32)).reshape(ours.shape)).abs().max().item()


def bench_type(name: str, args, device: torch.device) -> dict:
    shape = (args.rows, args.cols)
    raw = random_gguf_blocks(name, args.rows * args.cols // TYPES[name].block_size).reshape(args.rows, -1)
    data = torch.from_numpy(raw).to(device)
    numel = args.rows * args.cols
    row = {"type": name, "bits_per_weight": TYPES[name].bits_per_weight, "shape": list(shape)}
    theirs = reference(raw, name)
    row["max_diff_vs_numpy"] = max_diff(dequantize(data, name, shape), theirs)
    for dtype in (torch.float32, torch.bfloat16):  # None: the output is a view of the stored bytes (no work)
        view = dequantize(data, name, shape, dtype).data_ptr() == data.data_ptr()
        s = seconds(lambda: dequantize(data, name, shape, dtype), args.repeats)
        row[f"ours_{str(dtype)[6:]}_gbps"] = None if view else gbps(numel, dtype, s)
    if device.type == "cpu":  # on a GPU, numpy is the parity reference only
        row["numpy_float32_gbps"] = None if np.shares_memory(theirs, raw) else gbps(
            numel, torch.float32, seconds(lambda: reference(raw, name), args.repeats))
        if row["ours_float32_gbps"] and row["numpy_float32_gbps"]:
            row["ours_over_numpy"] = row["ours_float32_gbps"] / row["numpy_float32_gbps"]
    if args.compile:
        torch._dynamo.reset()  # one code object for every type: without a reset, dynamo stops recompiling after 8
        compiled = torch.compile(lambda d: dequantize(d, name, shape, torch.bfloat16), dynamic=False)
        start = time.perf_counter()
        out = compiled(data)
        row["compile_s"] = time.perf_counter() - start
        row["compiled_bfloat16_gbps"] = gbps(numel, torch.bfloat16, seconds(lambda: compiled(data), args.repeats))
        row["compiled_max_diff_vs_eager"] = (out.float() - dequantize(data, name, shape, torch.bfloat16).float()).abs().max().item()
    return row


def bench_linear(args, device: torch.device) -> list[dict]:
    """Dense Linear vs GGUFLinear forward on [tokens, cols] -> [tokens, rows], in the compute dtype."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(args.tokens, args.cols, device=device, dtype=dtype)
    rows = []
    with torch.no_grad():
        for name in LINEAR_TYPES:
            layer = GGUFLinear(args.cols, args.rows, name, device=device, bias_dtype=dtype)
            raw = random_gguf_blocks(name, args.rows * args.cols // TYPES[name].block_size)
            layer.weight.copy_(torch.from_numpy(raw).reshape(layer.weight.shape))
            layer.bias.zero_()
            dense = nn.Linear(args.cols, args.rows, device=device, dtype=dtype)
            dense.weight.copy_(dequantize(layer.weight, name, (args.rows, args.cols), dtype))
            dense.bias.zero_()
            ms_dense = 1e3 * seconds(lambda: dense(x), args.repeats)
            ms_gguf = 1e3 * seconds(lambda: layer(x), args.repeats)
            same = torch.equal(layer(x), F.linear(x, dense.weight, dense.bias))
            rows.append({"type": name, "tokens": args.tokens, "dtype": str(dtype)[6:], "dense_ms": ms_dense,
                         "gguf_ms": ms_gguf, "gguf_over_dense": ms_gguf / ms_dense, "same_output": same,
                         "weight_bytes_dense": dense.weight.numel() * dense.weight.element_size(),
                         "weight_bytes_gguf": layer.weight.numel()})
    return rows


def gguf_block(block: nn.Module, qtype: str) -> nn.Module:
    """A copy of `block` with every Linear's weight quantised to `qtype` (our encoder) and held so."""
    holder = nn.Module()
    holder.blocks = nn.ModuleList([copy.deepcopy(block)])
    linears = block_linears(holder)
    swap_to_gguf(holder, dict.fromkeys(linears, qtype), bias_dtype=DTYPE)
    for name, dense in linears.items():
        layer = holder.get_submodule(name)
        layer.weight.data = quantize(dense.weight.data, qtype).to(layer.weight.device)
        layer.bias.data.copy_(dense.bias.data)
    return holder.blocks[0]


def dequantised_twin(block: nn.Module) -> nn.Module:
    """A bf16 copy of a GGUF block holding its dequantised weights in plain Linears (the parity reference)."""
    twin = copy.deepcopy(block)
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, GGUFLinear):
            dense = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device, dtype=DTYPE)
            dense.weight.data = dequantize(layer.weight, layer.qtype, (layer.out_features, layer.in_features), DTYPE)
            dense.bias.data = layer.bias.data
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, dense)
    return twin


def bench_block(args, device: torch.device) -> list[dict]:
    """Seconds per block at 720p (batch 2): bf16 against Q8_0 and Q4_K in one run, eager and compiled."""
    from wan22_core.models.transformer import WanBlock
    from wan22_core.optimize import compile_toolchain_problem

    cuda = device.type == "cuda"
    cfg = DiTConfig() if not args.dry_run else DiTConfig(dim=256, ffn_dim=512, num_heads=2, text_len=64)
    shape = BLOCK_720P if not args.dry_run else Shape("720p", (2, 4, 6), 2, (720, 1280))
    torch.manual_seed(0)
    with torch.device(device):
        dense = WanBlock(cfg).to(DTYPE).eval()
    inputs = ours_inputs(cfg, shape, device)
    configs = {"bf16": dense, **{q: gguf_block(dense, q) for q in LINEAR_TYPES}}
    compile_problem = compile_toolchain_problem(device) if args.compile else "not asked (--compile)"
    rows = []
    for compiled in (False, True):
        if compiled and compile_problem is not None:
            print(f"# block: compiled runs skipped: {compile_problem}")
            break
        for name, block in configs.items():
            run = torch.compile(block, dynamic=False) if compiled else block
            first, later = time_blocks([run], inputs, 1, args.repeats, cuda)
            s = statistics.median(later) / 1e3
            row = {"config": name, "compiled": compiled, "shape": shape.label, "tokens": shape.tokens,
                   "s_per_block": s, "weight_bytes": sum(p.nbytes for p in block.parameters())}
            if compiled:
                row["compile_s"] = max(0.0, first[0] / 1e3 - s)
            with torch.no_grad():
                out = run(*inputs)
                if compiled:  # inductor fuses elementwise work: a few ulps, as for dense blocks
                    eager = block(*inputs)
                    row["rel_l2_vs_eager"] = ((out - eager).float().norm() / eager.float().norm()).item()
                elif name != "bf16":  # the quantised path computes exactly what it stores
                    row["max_diff_vs_dequantised"] = (out - dequantised_twin(block)(*inputs)).abs().max().item()
            rows.append(row)
            if cuda:
                torch.cuda.empty_cache()
    base = {r["compiled"]: r["s_per_block"] for r in rows if r["config"] == "bf16"}
    for r in rows:
        r["over_bf16"] = r["s_per_block"] / base[r["compiled"]]
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--rows", type=int, help="weight rows (default 512 on CPU, 13824 on CUDA)")
    p.add_argument("--cols", type=int, default=5120, help="weight columns, a multiple of 256 (default 5120)")
    p.add_argument("--tokens", type=int, help="input rows for the linear section (default 1024 CPU, 75600 CUDA)")
    p.add_argument("--types", help=f"comma-separated subset of {','.join(TYPES)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads (numpy's dequantize is single-threaded; "
                                               "on a busy machine 1 is the steadier comparison)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of each dequantisation "
                                                          "(and of the blocks with --block)")
    p.add_argument("--block", action="store_true", help="also time one 720p transformer block: bf16 against Q8_0 "
                                                        "and Q4_K in the same run")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, one repeat: checks the script")
    return p


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gguf: no CUDA device visible; run on the CPU or with --dry-run")
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        args.rows, args.cols, args.tokens, args.repeats = 8, 512, 16, 1
    args.rows = args.rows or (13824 if cuda else 512)
    args.tokens = args.tokens or (75600 if cuda else 1024)
    if args.cols % 256:
        sys.exit(f"bench_gguf: --cols must be a multiple of 256 (K-quant blocks), got {args.cols}")
    names = args.types.split(",") if args.types else list(TYPES)
    result = {"machine": {**machine(device), "load_average": os.getloadavg()[0]}, "dry_run": args.dry_run,
              "dequant": [], "errors": {}}
    print("# " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()))
    print(f"# {args.rows} x {args.cols} weight, mean of {args.repeats}; GB/s of output")
    print(f"{'type':<6} {'bits':>5} {'ours f32':>9} {'ours bf16':>9} {'numpy f32':>9} {'ratio':>6} "
          f"{'max|diff|':>9}" + (f" {'compiled':>9} {'compile_s':>9} {'c.diff':>7}" if args.compile else ""))
    for name in names:
        try:
            row = bench_type(name, args, device)
        except Exception as err:  # one failing type is noted, the run goes on
            result["errors"][name] = traceback.format_exception_only(err)[-1].strip()
            print(f"{name:<6} failed: {result['errors'][name]}")
            continue
        result["dequant"].append(row)
        ratio = f"{row['ours_over_numpy']:6.2f}" if "ours_over_numpy" in row else f"{'-':>6}"
        speeds = " ".join(f"{'-':>9}" if k not in row else f"{'view':>9}" if row[k] is None else f"{row[k]:9.2f}"
                          for k in ("ours_float32_gbps", "ours_bfloat16_gbps", "numpy_float32_gbps"))
        line = f"{name:<6} {row['bits_per_weight']:5.2f} {speeds} {ratio} {row['max_diff_vs_numpy']:9.2g}"
        if args.compile:
            line += (f" {row['compiled_bfloat16_gbps']:9.2f} {row['compile_s']:9.1f} "
                     f"{row['compiled_max_diff_vs_eager']:7.2g}")
        print(line)
    result["linear"] = bench_linear(args, device)
    for r in result["linear"]:
        print(f"# linear [{r['tokens']}, {args.cols}] -> {args.rows} {r['dtype']}: dense {r['dense_ms']:.2f} ms, "
              f"GGUFLinear {r['type']} {r['gguf_ms']:.2f} ms ({r['gguf_over_dense']:.2f}x), "
              f"weight {r['weight_bytes_gguf'] / r['weight_bytes_dense']:.3f} of dense bytes, same output {r['same_output']}")
    if args.block:
        result["block"] = bench_block(args, device)
        for r in result["block"]:
            diff = (f", rel. L2 vs eager {r['rel_l2_vs_eager']:.2g}" if r["compiled"] else
                    f", max |diff| vs dequantised bf16 {r['max_diff_vs_dequantised']:.3g}" if r["config"] != "bf16" else "")
            print(f"# block {r['shape']} {'compiled' if r['compiled'] else 'eager'} {r['config']:<5}: "
                  f"{r['s_per_block']:.4f} s ({r['over_bf16']:.2f}x bf16), weights {r['weight_bytes'] / 2**20:.1f} MiB"
                  f"{diff}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run(parser().parse_args())
