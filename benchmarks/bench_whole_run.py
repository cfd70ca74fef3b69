"""Projected seconds of a whole A14B run on P GPUs, stage by stage: load, text encode, sampling,
VAE decode, write. PROJECTED, not measured: no multi-GPU machine was available.

    python benchmarks/bench_whole_run.py                   # measures the mp4 write on this CPU, prints the tables
    python benchmarks/bench_whole_run.py --append-results  # also appends them to benchmarks/RESULTS.md

81 frames, 40 steps, bf16, at 480p (832x480, 32,760 tokens) and 720p (1280x720, 75,600), for
P = 1, 2, 3, 4, 6, 8 on one node and 16 on two nodes of 8, on NVLink-class and PCIe-class links.
Every constant below says where it comes from; the stages:

- load + text encode: the ranks of a node read their shards of both experts (57.2 GB in all,
  FSDP) from the node's one disk, and rank 0 reads the text encoder (11.4 GB) from the same disk
  and encodes on its CPU at the same time (torchrun on GPU ranks, `parallel.launch.Rank0Task`):
  max(disk time of all those bytes, host-to-device copy of a rank's shards, encoder read +
  encode). P = 1 is the one-process CLI, which encodes first, then loads.
- sampling: 40 x (the measured one-GPU step / P + the communication of bench_comm.py's model:
  Ulysses all-to-alls on the critical path; ring K/V transfers overlapped with the attention of
  the blocks they bring, only the excess counted; the CFG exchange; FSDP all-gathers prefetched
  under the compute, only the excess counted), with the split the engine chooses on its own
  (`auto_split`, the engine's `parallel.plan.choose_split`: CFG 2 when P is even, then the largest
  Ulysses degree that divides the heads
  and fits a node, ring the rest). On two nodes the CFG halves sit one per node, and FSDP
  gathers over both. Ring attention's own compute overhead (blockwise kernels, the merge) is not
  modelled.
- decode: the one-GPU decode / P (each rank decodes a band of rows) plus the row-parallel decode's
  bytes per rank (bench_comm.vae_decode_bytes: halo rows, the attention's frame, the bands sent
  to rank 0) over the link, plus a latency per exchange.
- write: the mp4 (H.264, crf 10, ffmpeg) on rank 0's CPU, measured here in CPU seconds: the
  Python side (float -> uint8, piping) single-threaded, ffmpeg's spread over ENCODE_CORES.
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_comm import (LINKS, OFFICIAL_H100_480P_S, OFFICIAL_H100_720P_S, STEPS, cfg_bytes,  # noqa: E402
                        forward_flops, gather_bytes, ring_bytes, ulysses_bytes, vae_decode_bytes)
from record import append_results  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from wan22_core.config import A14B, FRAMES, HEIGHT, HEIGHT_480P, WIDTH, WIDTH_480P  # noqa: E402
from wan22_core.memory import video_tokens  # noqa: E402
from wan22_core.models.vae import WanVAE  # noqa: E402
from wan22_core.parallel.plan import choose_split  # noqa: E402
from wan22_core.parallel.vae_decode import row_exchanges  # noqa: E402
from wan22_core.pipeline import latent_shape  # noqa: E402

SIZES = {"480p": (HEIGHT_480P, WIDTH_480P), "720p": (HEIGHT, WIDTH)}  # (height, width)
GPU_COUNTS = (1, 2, 3, 4, 6, 8, 16)
GPUS_PER_NODE = 8
EXPERT_BYTES = 14.29e9 * 2  # one expert in bf16 (design.md §5)
TEXT_ENCODER_BYTES = 11.4e9  # UMT5-XXL encoder, bf16 file
DISK_BPS = 3e9  # assumed: one NVMe per node, cold page cache (a warm one reads several times faster)
H2D_BPS = 25e9  # assumed: host-to-device per GPU, PCIe 4.0 x16 in practice
# UMT5-XXL encoder: 24 layers of 4 d^2 (attention, d = 4096) + 3 d x 10240 (gated FFN) = 4.63e9
# multiply-adds per token, x 2 FLOP, x 2 prompts padded to 512 tokens (the official padding)
ENCODE_FLOP = 2 * 4.63e9 * 2 * 512
CPU_FLOPS_PER_CORE = 184e9  # measured: a bf16 [1024, 4096] x [4096, 10240] matmul on one core of this box (EPYC)
ENCODE_CORES = 16  # rank 0's cores (parallel.launch.cpu_threads_per_rank); the lent device machine has 16
DECODE_720P_S = 4.1  # one H100, bf16, untiled (benchmarks/RESULTS.md, bench_gpu.py); other sizes by pixels
# One H100, our eager block with SDPA (cuDNN), 40 steps x (40 blocks + non-block work), batch 2:
# 978 s at 720p and 262 s at 480p (benchmarks/RESULTS.md, run 5; compiled with FlashAttention 4:
# 803 and 212 s). Per step:
STEP_1GPU_S = {"480p": 262 / 40, "720p": 978 / 40}
LATENCY_S = 20e-6  # assumed per exchange (the decode makes 34 per latent frame, 714 per video)
# Between the two nodes, per GPU: NVLink-class clusters have a 400 Gb/s NIC per GPU; a PCIe-class
# pair of nodes one 100 Gb/s NIC per node shared by its 8 GPUs (assumed).
INTER_NODE_BPS = {"NVLink 450 GB/s": 50e9, "PCIe 25 GB/s": 12.5e9 / GPUS_PER_NODE}
# TensorRT-LLM VisualGen, Wan2.2 14B, 40 steps, GB200 (peers.md §H.2; resolution not stated there)
TRT_LLM_GB200_S = {1: 348.4, 2: 174.0, 4: 95.9, 8: 48.1}
OFFICIAL = {"480p": dict(zip((1, 4, 8), (OFFICIAL_H100_480P_S, 91.7, 51.5))), "720p": OFFICIAL_H100_720P_S}


def auto_split(gpus: int) -> tuple[int, int, int]:
    """(cfg, ulysses, ring): the split the engine chooses on its own (`parallel.plan.choose_split`)
    with guidance batched, 8 GPUs per node."""
    return choose_split(gpus, A14B.dit.num_heads, guidance_batched=True, ranks_per_node=GPUS_PER_NODE)


def step_seconds(size: str, cfg: int, ulysses: int, ring: int, link: str, fsdp: bool = True) -> float:
    """One denoising step (cond + uncond) on cfg x ulysses x ring GPUs."""
    d, gpus = A14B.dit, cfg * ulysses * ring
    height, width = SIZES[size]
    tokens = video_tokens(d, FRAMES, height, width)
    fast, inter = LINKS[link], INTER_NODE_BPS[link]
    two_nodes = gpus > GPUS_PER_NODE
    sequence_link = inter if ulysses * ring > GPUS_PER_NODE else fast  # a CFG half per node otherwise
    batch = 2 // cfg
    compute = STEP_1GPU_S[size] / gpus
    attention = compute * 4 * tokens**2 * d.dim / forward_flops(tokens, d.dim, d.ffn_dim, 1)  # its FLOP share
    traffic = 0.0
    if ulysses > 1:
        traffic += ulysses_bytes(tokens, d.dim, d.num_layers, batch, 2, ulysses, ring=ring) / sequence_link
    if ulysses * ring > 1:
        traffic += gather_bytes(tokens, math.prod(d.patch_size) * d.out_dim, batch, ulysses * ring) / sequence_link
    if ring > 1:  # overlapped with the attention of the blocks it brings
        ring_s = ring_bytes(tokens, d.dim, d.num_layers, batch, 2, ulysses, ring) / sequence_link
        traffic += max(0.0, ring_s - attention)
    if cfg > 1:
        traffic += cfg_bytes(math.prod(latent_shape(FRAMES, height, width))) / (inter if two_nodes else fast)
    fsdp_s = EXPERT_BYTES * (gpus - 1) / gpus / (inter if two_nodes else fast) if fsdp else 0.0
    return compute + traffic + max(0.0, fsdp_s - compute)


def decode_seconds(height: int, width: int, gpus: int, link: str) -> float:
    frames, latent_h, latent_w = latent_shape(FRAMES, height, width)[1:]
    one_gpu = DECODE_720P_S * height * width / (720 * 1280)
    if gpus == 1:
        return one_gpu
    bandwidth = INTER_NODE_BPS[link] if gpus > GPUS_PER_NODE else LINKS[link]
    sent = max(vae_decode_bytes(A14B.vae, frames, latent_h, latent_w, gpus, rank) for rank in range(gpus))
    with torch.device("meta"):
        exchanges = len(row_exchanges(WanVAE(A14B.vae).decoder)) * frames  # 33 halo + 1 gather per latent frame
    return one_gpu / gpus + sent / bandwidth + exchanges * LATENCY_S


def load_seconds(gpus: int) -> tuple[float, float]:
    """(load + text encode, of which the text encode alone)."""
    encode = TEXT_ENCODER_BYTES / DISK_BPS + ENCODE_FLOP / (CPU_FLOPS_PER_CORE * ENCODE_CORES)
    if gpus == 1:  # one process: encode, then load
        return encode + max(2 * EXPERT_BYTES / DISK_BPS, 2 * EXPERT_BYTES / H2D_BPS), encode
    nodes = math.ceil(gpus / GPUS_PER_NODE)
    node_bytes = 2 * EXPERT_BYTES / nodes + TEXT_ENCODER_BYTES  # node 0: its ranks' shards and the encoder
    return max(node_bytes / DISK_BPS, 2 * EXPERT_BYTES / gpus / H2D_BPS, encode), encode


def measure_write(height: int, width: int) -> float:
    """Projected seconds of write_mp4 for 81 frames: its Python CPU seconds here (single-threaded) plus
    ffmpeg's CPU seconds spread over ENCODE_CORES. Frames: smooth moving noise, roughly video-like."""
    from wan22_core.video import write_mp4

    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, height // 16, width // 16, generator=g)
    still = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear").permute(0, 2, 3, 1)
    frames = (still + torch.linspace(0, 1, FRAMES)[:, None, None, None]) % 1.0
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    with tempfile.TemporaryDirectory() as tmp:
        write_mp4(frames, Path(tmp) / "v.mp4")
    python, ffmpeg = [(after.ru_utime + after.ru_stime) - (b.ru_utime + b.ru_stime)
                      for b, after in zip(before, [resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                                                    resource.RUSAGE_CHILDREN)])]
    return python + ffmpeg / ENCODE_CORES


def rows(size: str, write_s: float) -> list[dict]:
    height, width = SIZES[size]
    out = []
    for gpus in GPU_COUNTS:
        load, encode = load_seconds(gpus)
        split = auto_split(gpus)
        row = dict(gpus=gpus, split="x".join(map(str, split)), load=load, encode=encode, write=write_s)
        for link in LINKS:
            sampling = STEPS * step_seconds(size, *split, link)
            decode = decode_seconds(height, width, gpus, link)
            row[link] = dict(sampling=sampling, decode=decode, total=load + sampling + decode + write_s)
        out.append(row)
    return out


def table(size: str, write_s: float) -> str:
    official, links = OFFICIAL[size], list(LINKS)
    head = ["GPUs", "split c x u x r", "load + text encode (encode alone)"]
    for link in links:
        head += [f"{link.split()[0]}: sampling", "decode", "**total**"]
    head += ["write", "official H100 (their total)"] + (["TensorRT-LLM GB200"] if size == "720p" else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows(size, write_s):
        cells = [f"{r['gpus']}" + (" (2 nodes)" if r["gpus"] > GPUS_PER_NODE else ""), r["split"],
                 f"{r['load']:.0f} ({r['encode']:.0f})"]
        for link in links:
            x = r[link]
            cells += [f"{x['sampling']:.0f}", f"{x['decode']:.1f}", f"**{x['total']:.0f}**"]
        cells += [f"{r['write']:.1f}", f"{official.get(r['gpus'], '')}"]
        cells += [f"{TRT_LLM_GB200_S.get(r['gpus'], '')}"] if size == "720p" else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def two_node_pcie_without_fsdp(size: str) -> float:
    """Sampling seconds on two PCIe-class nodes when every GPU holds both experts (no FSDP gathers
    between the nodes; 57.2 GB of weights per GPU, so 80 GB cards)."""
    return STEPS * step_seconds(size, *auto_split(16), "PCIe 25 GB/s", fsdp=False)


def report() -> str:
    parts = []
    for size, (height, width) in SIZES.items():
        tokens = video_tokens(A14B.dit, FRAMES, height, width)
        write_s = measure_write(height, width)
        parts += [f"### {size} ({width}x{height}, {FRAMES} frames, {tokens:,} tokens), seconds", "", table(size, write_s),
                  "", f"Two PCIe-class nodes without FSDP (each GPU holds both experts): sampling "
                  f"{two_node_pcie_without_fsdp(size):.0f} s.", ""]
    parts.append(f"One-GPU step {STEP_1GPU_S['480p']:.2f} / {STEP_1GPU_S['720p']:.2f} s (480p / 720p, measured, eager "
                 f"SDPA, H100); disk {DISK_BPS / 1e9:.0f} GB/s per node (cold); text encode "
                 f"{ENCODE_FLOP / 1e12:.1f} TFLOP on {ENCODE_CORES} cores at {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s "
                 f"each; one-GPU decode {DECODE_720P_S} s at 720p; between nodes "
                 f"{INTER_NODE_BPS['NVLink 450 GB/s'] / 1e9:.0f} / {INTER_NODE_BPS['PCIe 25 GB/s'] / 1e9:.2f} GB/s "
                 f"per GPU; ring bytes from bench_comm.ring_bytes (checked against CPU ranks). TensorRT-LLM's "
                 "figures: their settings, resolution not stated.")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    text = report()
    print(text)
    print(f"# {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.append_results:
        append_results("Whole run on P GPUs, projected (all stages)", "bench_whole_run.py",
                       "; the write measured on this 2-core CPU box", text)


if __name__ == "__main__":
    main()
