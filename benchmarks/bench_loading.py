"""Checkpoint loading: peak RSS and time, ours vs plain safetensors (not a test; prints a table).

    python benchmarks/bench_loading.py                 # ~1.6 GB fp32 expert-shaped checkpoint
    python benchmarks/bench_loading.py --dim 1024 --layers 4 --keep

Writes a synthetic DiT expert (official sharded layout, fp32, like Wan-AI's folders) once, then
loads it in a fresh process per method, so every peak is that method's alone:
- baseline: `safetensors.torch.load_file` per shard, then `.to(dtype)` per tensor (the usual
  two-liner); the fp8 baseline casts with `.to(torch.float8_e4m3fn)` (no scale).
- ours: `read_state_dict(folder, dtype)` (raw dict) and `load_dit(folder, dtype[, weight_dtype])`.
Each method runs `--repeats` times, alternating, and medians are printed. Peak RSS is measured
from just before the load (high-water mark reset via /proc/self/clear_refs, after importing
torch and building one model on the meta device: one-time costs) and divided by the bytes the
load keeps. The file is read once beforehand, so every method reads from the page cache and
times compare the loaders, not the disk.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, re, sys, time, torch
from wan22_core.config import TINY
from wan22_core.models.transformer import WanModel

def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

method, folder, dtype_name = sys.argv[1], sys.argv[2], sys.argv[3]
dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[dtype_name]
with torch.device("meta"):
    WanModel(TINY.dit)  # one-time import cost of meta kernels (~70 MB), not part of loading
from pathlib import Path
from safetensors.torch import load_file
from wan22_core.checkpoints import load_dit, read_state_dict
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start_rss, start = status("VmRSS"), time.perf_counter()
if method == "baseline":
    kept = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        kept.update({k: v.to(dtype) for k, v in load_file(str(shard)).items()})
    nbytes = sum(t.nbytes for t in kept.values())
elif method == "read_state_dict":
    kept = read_state_dict(folder, dtype)  # fp8 is not a cast: only bf16 is measured here
    nbytes = sum(t.nbytes for t in kept.values())
else:
    kept = load_dit(folder, torch.bfloat16, weight_dtype=None if dtype_name == "bf16" else dtype)
    nbytes = kept.load_report.bytes
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak": status("VmHWM") - start_rss, "kept": nbytes}))
"""


def write_expert(folder: Path, dim: int, layers: int, ffn_dim: int, shards: int) -> int:
    """A random fp32 expert in the official layout (sharded safetensors + index + config.json)."""
    from safetensors.torch import save_file

    from wan22_core.checkpoints import NUM_HEADS_KEY
    from wan22_core.config import DiTConfig
    from wan22_core.models.transformer import WanModel

    cfg = DiTConfig(dim=dim, ffn_dim=ffn_dim, num_heads=dim // 128, num_layers=layers, text_dim=4096, freq_dim=256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(cfg).state_dict().items()}
    folder.mkdir(parents=True)
    names, per_shard, weight_map = list(shapes), math.ceil(len(shapes) / shards), {}
    g = torch.Generator().manual_seed(0)
    for i in range(shards):  # one shard in memory at a time
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in names[i * per_shard:(i + 1) * per_shard]}
        save_file(chunk, str(folder / shard), metadata={NUM_HEADS_KEY: str(cfg.num_heads)})
        weight_map.update({k: shard for k in chunk})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"num_heads": cfg.num_heads}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def measure(method: str, folder: Path, dtype: str, timeout: float | None = None) -> dict:
    """One load in a fresh process: {"seconds", "peak" (bytes of RSS above the start), "kept" (bytes)}.

    method: "baseline", "read_state_dict" or "load_dit"; folder: the checkpoint folder (the last
    two also take a single .safetensors file); dtype: "bf16" or "fp8" (load_dit: fp8 weights,
    bf16 compute). tests/test_formats.py checks its peak-RSS bound with it."""
    proc = subprocess.run([sys.executable, "-c", CHILD, method, str(folder), dtype], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{method} {dtype} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--ffn-dim", type=int, default=8192)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per method; medians are printed")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-loading-"))
    folder = root / "expert"
    try:
        size = write_expert(folder, args.dim, args.layers, args.ffn_dim, args.shards)
        for shard in folder.glob("*.safetensors"):  # warm the page cache: compare loaders, not the disk
            shard.read_bytes()
        print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}; checkpoint: {size / 2**30:.2f} GiB fp32, {args.shards} shards "
              f"(dim {args.dim}, {args.layers} layers, ffn {args.ffn_dim})")
        print(f"{'method':<34} {'load s':>7} {'peak RSS MiB':>13} {'kept MiB':>9} {'peak/kept':>10}")
        rows = [("baseline", "bf16", "load_file + .to(bf16)"),
                ("read_state_dict", "bf16", "ours: read_state_dict(bf16)"),
                ("load_dit", "bf16", "ours: load_dit(bf16)"),
                ("baseline", "fp8", "load_file + .to(fp8) (unscaled)"),
                ("load_dit", "fp8", "ours: load_dit(weight_dtype=fp8)")]
        runs = {label: [] for _, _, label in rows}
        for _ in range(args.repeats):  # methods alternate, so machine noise hits all of them
            for method, dtype, label in rows:
                runs[label].append(measure(method, folder, dtype))
        for _, _, label in rows:
            seconds = statistics.median(r["seconds"] for r in runs[label])
            peak, kept = statistics.median(r["peak"] for r in runs[label]), runs[label][0]["kept"]
            print(f"{label:<34} {seconds:7.2f} {peak / 2**20:13.0f} {kept / 2**20:9.0f} {peak / kept:10.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root if args.dir is None else folder, ignore_errors=True)


if __name__ == "__main__":
    main()
