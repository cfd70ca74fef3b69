"""Multi-GPU communication model: bytes each rank sends per step, measured and projected.

    python benchmarks/bench_comm.py                    # print both tables
    python benchmarks/bench_comm.py --append-results   # also append them to benchmarks/RESULTS.md
    python benchmarks/bench_comm.py --chart scaling.png  # also draw the projected scaling (matplotlib)

1. Measured (CPU, gloo, 2, 3, 4 and 6 ranks, a small random model from disk): every collective
   the parallel code issues is counted per rank (all_to_all_single: the (P-1)/P of the input that
   leaves the rank; all_gather / all_gather_single: (P-1) copies of the local input;
   batch_isend_irecv: the tensors this rank sends, e.g. the ring's K/V blocks) over the
   steady-state steps, and compared with the closed form of docs/multigpu.md. They must agree to
   the byte. The same for the row-parallel VAE decode (parallel/vae_decode.py): halo rows, the
   attention's frame and the bands sent to rank 0, every rank's count against `vae_decode_bytes`.
2. Projected (A14B, 1280x720, 81 frames): the same formula at full size, communication time at
   NVLink-class (450 GB/s per direction per GPU) and PCIe-class (25 GB/s) bandwidth, next to the
   compute time from the FLOP count of design.md §5 at 790 TFLOP/s bf16 peak and an assumed MFU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' gloo rank launcher
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # wan22_core, from a checkout installed or not
from procs import join_gloo_group, start_gloo_ranks, wait_ranks  # noqa: E402
from record import append_results  # noqa: E402

from wan22_core.config import SamplerSettings  # noqa: E402

# --- the closed form (docs/multigpu.md, "Communication per step") ---------------------------------


def ulysses_bytes(tokens: int, dim: int, layers: int, batch: int, elem: int, degree: int, ring: int = 1) -> int:
    """Per rank per forward: q, k, v and the output (4 tensors of [B, L_p/P, dim]) per layer, of
    which (U-1)/U leaves the rank. P = U x R ranks share the sequence; L_p pads L to a multiple of P."""
    local = math.ceil(tokens / (degree * ring))
    return layers * 4 * batch * local * dim * elem * (degree - 1) // degree


def ring_bytes(tokens: int, dim: int, layers: int, batch: int, elem: int, ulysses: int, ring: int) -> int:
    """Per rank per forward: R - 1 ring steps per layer, each sending this rank's current K and V
    block. After the Ulysses all-to-all a block is U x L_p/P tokens of H/U heads, so K or V is
    [B, L_p/P, dim] worth of elements whatever U is."""
    local = math.ceil(tokens / (ulysses * ring))
    return layers * (ring - 1) * 2 * batch * local * dim * elem


def gather_bytes(tokens: int, head_out: int, batch: int, degree: int) -> int:
    """Per rank per forward: the fp32 head output [B, L_p/P, p*C] to each of the P-1 peers."""
    return batch * math.ceil(tokens / degree) * head_out * 4 * (degree - 1)


def fsdp_bytes(row_bytes_and_rows, ranks: int) -> int:
    """Per rank per forward with resharding: its padded shard of every gathered parameter
    (ceil(n/P) rows) to each of the P-1 peers; ~ (P-1)/P of the expert."""
    return (ranks - 1) * sum(math.ceil(rows / ranks) * row_bytes for row_bytes, rows in row_bytes_and_rows)


def cfg_bytes(latent_elems: int) -> int:
    """Per rank per step: its fp32 prediction [1, C, T, H, W] to the other half."""
    return latent_elems * 4


def vae_decode_bytes(vae_cfg, latent_frames: int, latent_height: int, latent_width: int, ranks: int, rank: int,
                     batch: int = 1, elem: int = 2) -> int:
    """Per rank per row-parallel VAE decode (parallel/vae_decode.py), with the layers and their halo
    rows read from the decoder (`row_exchanges`); `elem` is the VAE's dtype size:
    - each spatial convolution: its `rows` edge rows [B, C, frames, rows, w * scale] to each
      neighbouring band (1 or 2), for every latent frame (the first is 1 frame at every layer,
      the others `frames`);
    - the attention: the rank's band, padded to the tallest band, to the P-1 others (all_gather);
    - a rank other than 0: its band of the video [B, 3, F, 8 * rows, 8w] in fp32 to rank 0."""
    from wan22_core.models.vae import WanVAE
    from wan22_core.parallel.vae_decode import row_bands, row_exchanges

    with torch.device("meta"):
        decoder = WanVAE(vae_cfg).decoder
    bands = row_bands(latent_height, ranks)
    neighbours = (rank > 0) + (rank < ranks - 1)
    total = 0
    for e in row_exchanges(decoder):
        row = batch * e.channels * (1 + (latent_frames - 1) * e.frames) * latent_width * e.scale * elem
        total += neighbours * e.rows * row if e.kind == "halo" else (ranks - 1) * max(bands) * e.scale * row
    if rank:
        stride_t, stride_h, stride_w = vae_cfg.stride
        frames = stride_t * (latent_frames - 1) + 1
        total += batch * 3 * frames * bands[rank] * stride_h * latent_width * stride_w * 4
    return total


# --- measurement on CPU ranks ---------------------------------------------------------------------

SCENARIOS = {  # name -> plan degrees as a function of P (None: not on P ranks of this 8-head model)
    "ulysses": lambda p: dict(ulysses=p) if p in (2, 4) else None,
    "ulysses+fsdp": lambda p: dict(ulysses=p, fsdp=True) if p in (2, 4) else None,
    "cfg x ulysses+fsdp": lambda p: dict(cfg_parallel=2, ulysses=p // 2, fsdp=True) if p in (2, 4) else None,
    "fsdp only": lambda p: dict(fsdp=True),
    "ring": lambda p: dict(ring=p),
    "ulysses x ring+fsdp": lambda p: dict(ulysses=2, ring=p // 2, fsdp=True) if p in (4, 6) else None,
    "cfg x ring+fsdp": lambda p: dict(cfg_parallel=2, ring=p // 2, fsdp=True) if p in (4, 6) else None,
}
WORLDS = (2, 3, 4, 6)
FRAMES, HEIGHT, WIDTH = 9, 48, 80  # 3 x 3 x 5 = 45 tokens: padded for 2, 4 and 6 ranks, not for 3


def count_collectives(counts: dict) -> None:
    """Wrap the torch.distributed calls the parallel code and FSDP2 use; add bytes sent by this rank."""
    def wrap(name, sent):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            group = kwargs.get("group")
            counts[name] = counts.get(name, 0) + sent(args, dist.get_world_size(group))
            return original(*args, **kwargs)
        setattr(dist, name, counted)

    wrap("all_to_all_single", lambda a, p: a[1].nbytes * (p - 1) // p)
    wrap("all_gather", lambda a, p: a[1].nbytes * (p - 1))
    wrap("all_gather_single", lambda a, p: a[1].nbytes * (p - 1))
    wrap("batch_isend_irecv", lambda a, p: sum(op.tensor.nbytes for op in a[0] if op.op is dist.isend))
    wrap("send", lambda a, p: a[0].nbytes)


def rank_main(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    from wan22_core.config import SamplerSettings
    from wan22_core.parallel.loading import load_expert_pair
    from wan22_core.parallel.mesh import init_groups
    from wan22_core.parallel.plan import ParallelPlan
    from wan22_core.pipeline import denoise, make_noise

    join_gloo_group(rank, world, port)
    heads = json.loads((Path(model_dir) / "high_noise_model" / "config.json").read_text())["num_heads"]
    settings = SamplerSettings(steps=3, boundary=0.0)  # all steps on one expert: a steady state
    g = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    counts, results = {}, {}
    count_collectives(counts)
    for name, degrees in SCENARIOS.items():
        if degrees(world) is None:
            continue
        groups = init_groups(ParallelPlan(world_size=world, num_heads=heads, **degrees(world)), torch.device("cpu"))
        experts = load_expert_pair(Path(model_dir) / "high_noise_model", Path(model_dir) / "low_noise_model",
                                   groups, torch.device("cpu"), torch.float32)
        # step 1 gathers the head once (it stays gathered); count steps 2..3 only
        denoise(experts, positive, negative, make_noise(0, FRAMES, HEIGHT, WIDTH), settings,
                on_step=lambda info: counts.clear() if info.index == 0 else None)
        results[name] = {k: v // (settings.steps - 1) for k, v in counts.items()}
    results["vae decode"] = vae_decode_counts(counts, world)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


VAE_LATENT = (3, 7, 5)  # latent frames, rows, columns: 9 frames of 40x56 px; 7 rows split unevenly


def vae_decode_counts(counts: dict, world: int) -> dict:
    """{rank: bytes it sent} in one row-parallel decode of the tiny VAE (fp32), every rank's count."""
    from wan22_core.config import TINY
    from wan22_core.models.vae import WanVAE
    from wan22_core.parallel.vae_decode import decode_band, gather_bands

    vae = WanVAE(TINY.vae).eval()
    raw = torch.randn(1, 16, *VAE_LATENT, generator=torch.Generator().manual_seed(0))
    counts.clear()
    with torch.no_grad():
        gather_bands(*decode_band(vae, raw))
    mine = sum(counts.values())
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return dict(enumerate(everyone))


def measure(world: int, model_dir: Path, workdir: Path) -> dict:
    out = workdir / f"counts{world}.json"
    store, procs = start_gloo_ranks([__file__, "--rank"], world, dict(model_dir=str(model_dir), out=str(out)))
    if wait_ranks(procs):
        raise SystemExit(f"a rank of the {world}-rank measurement failed")
    return json.loads(out.read_text())


def expected(name: str, world: int, cfg) -> dict:
    """The formula's per-rank bytes per step for one scenario on the measurement model (fp32)."""
    from wan22_core.memory import video_tokens
    from wan22_core.models.transformer import WanModel

    degrees = SCENARIOS[name](world)
    u, r, c = degrees.get("ulysses", 1), degrees.get("ring", 1), degrees.get("cfg_parallel", 1)
    tokens = video_tokens(cfg, FRAMES, HEIGHT, WIDTH)
    batch = 2 // c
    out = {}
    if u > 1:
        out["all_to_all_single"] = ulysses_bytes(tokens, cfg.dim, cfg.num_layers, batch, 4, u, ring=r)
    if r > 1:
        out["batch_isend_irecv"] = ring_bytes(tokens, cfg.dim, cfg.num_layers, batch, 4, u, r)
    if u * r > 1:  # the head output, gathered over the whole sequence group
        out["all_gather"] = gather_bytes(tokens, math.prod(cfg.patch_size) * cfg.out_dim, batch, u * r)
    if c > 1:
        out["all_gather"] = out.get("all_gather", 0) + cfg_bytes(16 * tokens * 4)
    if degrees.get("fsdp"):
        with torch.device("meta"):
            model = WanModel(cfg)
        head = {id(p) for p in model.head.parameters()}
        rows = [(p[0].nbytes if p.dim() > 1 else p.element_size(), p.shape[0])
                for p in model.parameters() if id(p) not in head]
        out["all_gather_single"] = fsdp_bytes(rows, world)
    return out


# --- projection to A14B 720p ----------------------------------------------------------------------

PEAK_FLOPS = 790e12  # dense bf16, H100/H200 measured (design.md §5)
MFU = 0.6  # assumed; 80 forwards x 6.52e15 FLOP / (790e12 x 0.6) = 1100 s vs the official 1041.5 s on one H100
LINKS = {"NVLink 450 GB/s": 450e9, "PCIe 25 GB/s": 25e9}


def forward_flops(tokens: int, dim: int, ffn: int, layers: int, text: int = 512) -> float:
    """One sample, multiply-add = 2: self-attn projections 8Ld^2, attention 4L^2d, cross-attn
    projections 4Ld^2 plus its text K/V 4*512*d^2 and scores 4*L*512*d, FFN 4*L*d*ffn."""
    per_layer = (8 * tokens * dim**2 + 4 * tokens**2 * dim + 4 * tokens * dim**2 + 4 * text * dim**2
                 + 4 * tokens * text * dim + 4 * tokens * dim * ffn)
    return layers * per_layer


def projection_rows():
    from wan22_core import config
    from wan22_core.memory import video_tokens
    from wan22_core.pipeline import latent_shape

    d = config.A14B.dit
    tokens = video_tokens(d, config.FRAMES, config.HEIGHT, config.WIDTH)  # 720p, 81 frames: 75,600
    latent_elems = math.prod(latent_shape(config.FRAMES, config.HEIGHT, config.WIDTH))
    step_flops = 2 * forward_flops(tokens, d.dim, d.ffn_dim, d.num_layers)  # cond + uncond
    expert_bytes = 14.29e9 * 2  # bf16
    head_out = math.prod(d.patch_size) * d.out_dim
    t1 = step_flops / (PEAK_FLOPS * MFU)
    rows = []
    for gpus, cfg in ((1, 1), (2, 1), (4, 1), (8, 1), (8, 2)):
        u = gpus // cfg
        batch = 2 // cfg
        sp = ulysses_bytes(tokens, d.dim, d.num_layers, batch, 2, u)
        sp += (gather_bytes(tokens, head_out, batch, u) if u > 1 else 0) + (cfg_bytes(latent_elems) if cfg > 1 else 0)
        fsdp = expert_bytes * (gpus - 1) / gpus  # reshard after forward: one gather per step
        compute = t1 / gpus
        row = dict(gpus=gpus, layout=f"{cfg}x{u}" if cfg > 1 else f"U{u}", sp_gb=sp / 1e9, fsdp_gb=fsdp / 1e9,
                   compute_s=compute)
        for link, bandwidth in LINKS.items():
            # Ulysses all-to-alls sit between the projections and the attention: on the critical
            # path. FSDP gathers are prefetched under the previous block's compute: only the excess shows.
            step = compute + sp / bandwidth + max(0.0, fsdp / bandwidth - compute)
            row[link] = (step, t1 / (gpus * step))
        rows.append(row)
    return rows


# Official Wan2.2 T2V-A14B, 720P, H100/H800, total seconds for the whole run (81 frames, 40 steps,
# text encoder and VAE included; 1 GPU with --offload_model True): the Wan2.2 README table
# "Computational Efficiency on Different GPUs" (the image assets/comp_effic.png, Wan-Video/Wan2.2
# at commit 42bf4cfaa384bc21833865abc2f9e6c0e67233dc); 1 and 8 GPUs are the figures issue 7 compares.
OFFICIAL_H100_720P_S = {1: 1041.5, 4: 288.7, 8: 155.1}
OFFICIAL_H100_480P_S = 326.9  # the same table, 480P on 1 GPU
STEPS = SamplerSettings().steps  # 40, the official default


def scaling_series(rows: list[dict] | None = None) -> dict:
    """What the scaling chart draws, taken from projection_rows() (the table's rows): for each GPU
    count the fastest layout per link in s/step, ideal linear scaling of the 1-GPU projection, and
    the official measured whole-run times / 40 steps. No matplotlib needed."""
    rows = projection_rows() if rows is None else rows
    gpus = sorted({r["gpus"] for r in rows})
    links = {}
    for link in LINKS:
        best = [min((r for r in rows if r["gpus"] == g), key=lambda r: r[link][0]) for g in gpus]
        links[link] = {"s_per_step": [r[link][0] for r in best], "layout": [r["layout"] for r in best],
                       "efficiency": [r[link][1] for r in best]}
    one = next(r for r in rows if r["gpus"] == 1)["compute_s"]
    return {"gpus": gpus, "links": links, "ideal": [one / g for g in gpus],
            "official": {g: s / STEPS for g, s in OFFICIAL_H100_720P_S.items()},
            "assumptions": f"compute {PEAK_FLOPS / 1e12:.0f} TFLOP/s x MFU {MFU}"}


def draw_scaling(ax, series: dict) -> None:
    """Projected s/step vs GPUs on log-log axes (ideal scaling is a straight line)."""
    gpus = series["gpus"]
    ax.plot(gpus, series["ideal"], color="0.6", linestyle=":", label="ideal linear (1-GPU projection / N)")
    styles = {"NVLink": ("tab:green", "o", (-5, -11), "right"), "PCIe": ("tab:red", "s", (5, 4), "left")}
    for link, data in series["links"].items():
        color, marker, offset, ha = next(v for k, v in styles.items() if link.startswith(k))
        ax.plot(gpus, data["s_per_step"], color=color, marker=marker, label=f"projected, {link}")
        for g, s, layout in zip(gpus, data["s_per_step"], data["layout"]):
            if g > 1:
                ax.annotate(f"{s:.2f} {layout}", (g, s), textcoords="offset points", xytext=offset,
                            ha=ha, fontsize=7.5, color=color)
    official = series["official"]
    ax.scatter(list(official), list(official.values()), marker="*", s=140, color="black", zorder=5,
               label="official, measured whole run / 40 steps")
    for g, s in official.items():
        ax.annotate(f"{s:.2f}", (g, s), textcoords="offset points", xytext=(-7, 3), ha="right", fontsize=7.5)
    ax.annotate(f"{series['ideal'][0]:.2f} projected", (1, series["ideal"][0]), textcoords="offset points",
                xytext=(-4, 7), fontsize=7.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set_xlim(0.8, 13)
    ticks = [3, 4, 6, 8, 12, 16, 24, 32]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("GPUs")
    ax.set_ylabel("seconds per denoising step")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")


def report(measured: dict, cfg) -> str:
    from wan22_core.memory import video_tokens

    tokens = video_tokens(cfg, FRAMES, HEIGHT, WIDTH)
    lines = ["### Measured on CPU ranks (gloo) vs the formula, bytes per rank per step (fp32, "
             f"{FRAMES} frames {WIDTH}x{HEIGHT}, {tokens} tokens; dim {cfg.dim}, {cfg.num_layers} layers)", "",
             "| ranks | plan | collective | measured | formula | match |", "|---|---|---|---|---|---|"]
    for world, per_scenario in measured.items():
        for name, counts in per_scenario.items():
            if name == "vae decode":
                continue
            want = expected(name, world, cfg)
            for kind in sorted(set(counts) | set(want)):
                got, formula = counts.get(kind, 0), want.get(kind, 0)
                match = "yes" if got == formula else "NO"
                lines.append(f"| {world} | {name} | {kind} | {got:,} | {formula:,} | {match} |")
    lines += vae_report(measured)
    lines += ["", "### Projected: A14B, 1280x720x81 (75,600 tokens), bf16, 40 steps x (cond + uncond)", "",
              f"Compute from the FLOP count at {PEAK_FLOPS / 1e12:.0f} TFLOP/s x MFU {MFU}; Ulysses traffic on the "
              "critical path; FSDP all-gathers (reshard after forward) overlapped with compute, only the "
              "excess counted.",
              "", "| GPUs | layout | SP+CFG GB/step/rank | FSDP GB/step/rank | compute s/step | "
              + " | ".join(f"{link}: s/step (efficiency)" for link in LINKS) + " |",
              "|---|---|---|---|---|" + "---|" * len(LINKS)]
    for r in projection_rows():
        cells = " | ".join(f"{r[link][0]:.2f} ({r[link][1]:.0%})" for link in LINKS)
        lines.append(f"| {r['gpus']} | {r['layout']} | {r['sp_gb']:.1f} | {r['fsdp_gb']:.1f} | "
                     f"{r['compute_s']:.2f} | {cells} |")
    return "\n".join(lines)


def vae_report(measured: dict) -> list[str]:
    """The row-parallel VAE decode's measured bytes per rank against `vae_decode_bytes`."""
    from wan22_core.config import TINY

    lines = ["", f"### Row-parallel VAE decode, measured vs the formula, bytes each rank sends per decode (fp32, tiny "
             f"VAE, latent {VAE_LATENT[0]} frames x {VAE_LATENT[1]} x {VAE_LATENT[2]})", "",
             "| ranks | rank | measured | formula | match |", "|---|---|---|---|---|"]
    for world, per_scenario in measured.items():
        for rank, got in sorted(per_scenario["vae decode"].items(), key=lambda item: int(item[0])):
            want = vae_decode_bytes(TINY.vae, *VAE_LATENT, world, int(rank), batch=1, elem=4)
            lines.append(f"| {world} | {rank} | {got:,} | {want:,} | {'yes' if got == want else 'NO'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--chart", metavar="PATH", help="also write a PNG of the projected s/step vs GPUs "
                        "(needs matplotlib: pip install '.[bench]')")
    parser.add_argument("--rank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(**json.loads(args.rank))
        return
    if args.chart:  # drawn first: it needs only the projection, not the CPU measurement
        from charts import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4.5))
        draw_scaling(ax, scaling_series())
        ax.set_title("A14B 720p x 81 frames: projected multi-GPU scaling (not measured)", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.chart, dpi=100)
        print(f"# chart written to {args.chart}")
    from wan22_core.tiny import make_tiny, tiny_config

    cfg = tiny_config(dim=128, heads=8, layers=2, ffn_dim=256)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / "model", "official", cfg, seed=0)
        measured = {world: measure(world, model_dir, Path(tmp)) for world in WORLDS}
    text = report(measured, cfg.dit)
    print(text)
    if "NO |" in text:
        raise SystemExit("measured bytes differ from the formula")
    if args.append_results:
        append_results("Multi-GPU communication model (CPU-measured bytes)", "bench_comm.py", ", CPU", text)


if __name__ == "__main__":
    main()
