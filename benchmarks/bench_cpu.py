"""Ours vs diffusers, side by side on the CPU (not a test; prints ratios).

    python benchmarks/bench_cpu.py            # loop + forward + peak RSS, default small config
    python benchmarks/bench_cpu.py --repeats 7 --dim 256 --layers 4 --heads 8

1. loop: our `denoise` vs diffusers `WanPipeline(transformer, transformer_2, boundary_ratio)` on
   the same random experts, embeddings, noise and official UniPC grid (output_type="latent").
   Runs alternate (ours, diffusers, ours, ...) so machine noise hits both; the median of the
   per-pair ratios is reported. Final latents are compared too, so a fast wrong answer shows.
2. forward: one DiT forward (cond+uncond, i.e. batch 2) ours vs diffusers.
3. rss: in a fresh process that builds both sides' models, how far one loop raises the peak
   resident memory (the activations and temporaries of the loop, not the shared weights).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # diffusers set up as the tests do
from reference import pad_text, rel_l2, run_wan_pipeline, wan_pipeline  # noqa: E402  (imports no diffusers yet)


def build(args):
    from wan22_core.config import DiTConfig, SamplerSettings
    from wan22_core.models.transformer import WanModel
    from wan22_core.pipeline import make_noise
    from wan22_core.placement import ExpertPair
    from wan22_core.tiny import seeded

    cfg = DiTConfig(dim=args.dim, ffn_dim=args.dim * 3, num_heads=args.heads, num_layers=args.layers,
                    text_dim=args.text_dim, freq_dim=256)
    ours = [seeded(i, lambda: WanModel(cfg)) for i in (1, 2)]
    settings = SamplerSettings(steps=args.steps)
    pipe = wan_pipeline(cfg, ours[0], ours[1], settings)
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(40, cfg.text_dim, generator=g), torch.randn(60, cfg.text_dim, generator=g)
    noise = make_noise(0, args.frames, args.size, args.size)

    def run_ours():
        from wan22_core.pipeline import denoise
        return denoise(ExpertPair(ours[0], ours[1], torch.device("cpu")), pos, neg, noise, settings)

    def run_diffusers():
        return run_wan_pipeline(pipe, pos, neg, noise, settings, args.frames, args.size, args.size)

    def forward_ours():  # what the loop does: cond + uncond in one batch, trimmed contexts
        from wan22_core.pipeline import stack_contexts
        with torch.no_grad():
            x = noise[None].expand(2, *noise.shape)
            return ours[0](x, torch.tensor([999, 999]), stack_contexts(pos, neg))

    def forward_diffusers():
        with torch.no_grad():
            return [pipe.transformer(noise[None], torch.tensor([999]), c, return_dict=False)[0]
                    for c in (pad_text(pos), pad_text(neg))]

    return cfg, run_ours, run_diffusers, forward_ours, forward_diffusers


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def side_by_side(a, b, repeats):
    timed(a), timed(b)  # warm-up: first-call allocations, SDPA kernel selection
    pairs = []
    for _ in range(repeats):
        ta, out_a = timed(a)
        tb, out_b = timed(b)
        pairs.append((ta, tb))
    return pairs, out_a, out_b


def report(name, pairs):
    ours, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
    ratio = statistics.median(a / b for a, b in pairs)
    print(f"{name:<8} ours {statistics.median(ours):8.3f} s   diffusers {statistics.median(theirs):8.3f} s   "
          f"median ratio ours/diffusers {ratio:.3f}  (n={len(pairs)})")
    return ratio


def child_rss(args, which):
    """MiB by which one loop raises the peak RSS of a fresh process (see the module docstring)."""
    out = subprocess.run([sys.executable, __file__, "--child", which, *argv_of(args)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def argv_of(args):
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "repeats")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--text-dim", type=int, default=256)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", choices=("ours", "diffusers"), default=None)
    args = p.parse_args()

    cfg, run_ours, run_diffusers, fwd_ours, fwd_diffusers = build(args)
    if args.child:  # the peak during one loop above what building both sides' models left
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (run_ours if args.child == "ours" else run_diffusers)()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({"rss_mib": grown / 1024}))
        return

    from wan22_core.memory import video_tokens

    tokens = video_tokens(cfg, args.frames, args.size, args.size)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# DiT dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, ffn {cfg.ffn_dim}; "
          f"{args.frames} frames at {args.size}x{args.size} = {tokens} tokens; {args.steps} steps UniPC, CFG 4/3")
    pairs, a, b = side_by_side(run_ours, run_diffusers, args.repeats)
    report("loop", pairs)
    print(f"         final latents rel. L2 ours vs diffusers: {rel_l2(a, b):.2e}")
    pairs, _, _ = side_by_side(fwd_ours, fwd_diffusers, args.repeats)
    report("forward", pairs)
    ours_rss, theirs_rss = child_rss(args, "ours"), child_rss(args, "diffusers")
    print(f"peak RSS growth during one loop: ours {ours_rss:.1f} MiB   diffusers {theirs_rss:.1f} MiB")


if __name__ == "__main__":
    main()
