"""GGUF dequantisation speed per type, ours (torch) against the `gguf` package's numpy, in one run.

    python benchmarks/bench_gguf.py                          # CPU: every type, a 512 x 5120 weight
    python benchmarks/bench_gguf.py --device cuda --compile  # GPU: a 13824 x 5120 weight (A14B's FFN), compiled too
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
"""
from __future__ import annotations

import argparse
import json
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

from wan22_core.quant import TYPES, GGUFLinear, dequantize  # noqa: E402
from bench_gpu import machine  # noqa: E402  (this folder)
from fakes import random_gguf_blocks  # noqa: E402

LINEAR_TYPES = ("Q8_0", "Q4_K")


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
    p.add_argument("--compile", action="store_true", help="also time torch.compile of each dequantisation")
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
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run(parser().parse_args())
