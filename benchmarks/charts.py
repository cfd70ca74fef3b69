"""The README's performance chart, from recorded results only: one PNG, two panels.

    python benchmarks/charts.py                  # writes benchmarks/results/performance.png
    python benchmarks/charts.py --out other.png  # elsewhere

(a) Seconds per denoising step at 720p x 81 frames (cond + uncond) on one GPU, per configuration,
    from the `bench_gpu.py` runs recorded in benchmarks/results/h100_*.json: 40 blocks x the
    median ms per block (720p, batch 2) + the measured non-block ms of one forward, next to the
    official single-H100 whole run / 40 steps.
(b) Projected seconds per step on 1, 2, 4 and 8 GPUs from `bench_comm.py`'s model (the same
    `projection_rows()` as its table), next to the official measured multi-GPU whole runs / 40.

The data functions (`step_rows`, `bench_comm.scaling_series`) need no matplotlib; drawing does
(`pip install '.[bench]'`). `hbars` is the bar-panel helper `bench_gpu.py --chart` uses too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_comm, when imported from elsewhere (tests)
sys.path.insert(1, str(HERE.parent))  # wan22_core, from a checkout installed or not

from wan22_core.config import A14B  # noqa: E402

RESULTS = HERE / "results"
OUT = RESULTS / "performance.png"
SHAPE = "720p b2"  # 75,600 tokens, cond + uncond in one forward: what the pipeline runs at 720p
BLOCKS = A14B.dit.num_layers  # DiT blocks per forward
# Display names for bench_gpu.py configuration names; anything else keeps its own name.
LABELS = {
    "diffusers WanTransformerBlock": "diffusers block, eager",
    "ours eager": "ours, eager",
    "ours eager sdpa": "ours, eager",  # the old transposed stream: starred, see CONTIGUOUS_THEN
    "ours compiled": "ours, torch.compile",
    "ours compiled + flash_attn4": "ours, torch.compile + FlashAttention 4",
    "ours flash_attn4": "ours, eager, FlashAttention 4",
    "ours sage": "ours, eager, SageAttention 1 (not exact)",
    "ours fp8 (auto: scaled_mm)": "ours, fp8 weights, scaled_mm",
    "ours fp8 (dequant: dequant)": "ours, fp8 weights, dequant",
    "ours block swap (2/2 streamed)": "ours, block swap (all streamed)",
    "ours fp8 + block swap": "ours, fp8 + block swap",
}
# Runs recorded before bench_gpu.py fed the engine's contiguous residual stream (their JSON has no
# "stream"): their "ours" rows other than these two measured a transposed stream (~4% slower).
CONTIGUOUS_THEN = ("ours eager, contiguous stream", "ours compiled")
SAME_AS = {"ours eager, contiguous stream": "ours eager"}  # old name -> bench_gpu.py's name now
FORCED_KERNEL = "ours sdpa["  # diagnostics (SDPA pinned to one kernel), left out of the chart


def pyplot():
    """matplotlib.pyplot on the Agg backend, or exit with how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("charts need matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install '.[bench]' from the repository root)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def hbars(ax, labels, values, colors, fmt: str = "{:.0f}", xlabel: str = "", title: str = "") -> None:
    """Horizontal bars, first label on top, each annotated with fmt.format(value) (or its own text
    when values come as (value, text) pairs)."""
    texts = [v[1] if isinstance(v, tuple) else fmt.format(v) for v in values]
    values = [v[0] if isinstance(v, tuple) else v for v in values]
    bars = ax.barh(labels, values, color=colors)
    ax.bar_label(bars, labels=texts, padding=3, fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values, default=0) * 1.32 or 1)  # room for the labels
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)


def load_runs(results: Path = RESULTS) -> list[dict]:
    """The recorded GPU runs (h100_*.json, in run order), or exit saying what is missing."""
    files = sorted(results.glob("h100_*.json"))
    if not files:
        raise SystemExit(f"no recorded GPU results: {results}/h100_*.json not found. Record them with "
                         "`python benchmarks/bench_gpu.py --json benchmarks/results/h100_<n>_<what>.json` "
                         "on an H100 first.")
    runs = []
    for f in files:
        data = json.loads(f.read_text())
        if data.get("dry_run"):
            raise SystemExit(f"{f} is a --dry-run (CPU, tiny sizes), not a GPU measurement")
        data["file"] = f.name
        runs.append(data)
    devices = {r["machine"]["device"] for r in runs}
    if len(devices) != 1:
        raise SystemExit(f"the recorded runs come from different devices ({sorted(devices)}); chart one at a time")
    return runs


def non_block_ms(runs: list[dict]) -> float:
    """The first run's measured non-block time of a 720p forward, for runs that measured none."""
    for run in runs:
        if "720p" in (run.get("non_block_ms") or {}):
            return run["non_block_ms"]["720p"]
    raise SystemExit("no run measured the non-block part of a forward at 720p (bench_gpu.py section 'overhead')")


def step_rows(runs: list[dict]) -> list[dict]:
    """Seconds per denoising step at 720p per configuration, official first.

    s/step = (40 x ms per block + non-block ms of one forward) / 1000, one forward of batch 2 per
    step. The value is the latest run's (the runs are in order; later runs measure the current
    code); `runs_s` keeps every run's value. The non-block time is the run's own, or else the one
    measured in another run on the same device."""
    import bench_comm

    shared = non_block_ms(runs)
    per_config: dict[str, list[tuple[float, str]]] = {}
    transposed: dict[str, set[str]] = {}  # config -> files whose "ours" row fed a transposed stream
    for run in runs:
        overhead = (run.get("non_block_ms") or {}).get("720p", shared)
        for r in run["results"]:
            if r["shape"] != SHAPE or r["ms_per_block"] is None or r["config"].startswith(FORCED_KERNEL):
                continue
            seconds = (BLOCKS * r["ms_per_block"] + overhead) / 1e3
            config = SAME_AS.get(r["config"], r["config"])
            per_config.setdefault(config, []).append((seconds, run["file"]))
            if config.startswith("ours") and "stream" not in run and r["config"] not in CONTIGUOUS_THEN:
                transposed.setdefault(config, set()).add(run["file"])
    if not per_config:
        raise SystemExit(f"the recorded runs have no {SHAPE} block times")
    official_s = bench_comm.OFFICIAL_H100_720P_S[1]
    rows = [{"config": "official", "label": "official Wan2.2, whole run / 40",
             "s_per_step": official_s / bench_comm.STEPS, "runs_s": [], "source": "Wan2.2 README"}]
    for config, values in per_config.items():
        label = LABELS.get(config, config) + ("*" if values[-1][1] in transposed.get(config, ()) else "")
        rows.append({"config": config, "label": label, "s_per_step": values[-1][0],
                     "runs_s": [v for v, _ in values], "source": ", ".join(f for _, f in values)})
    for row in rows:
        row["ratio_to_official"] = row["s_per_step"] / rows[0]["s_per_step"]
    return rows


def _color(config: str) -> str:
    if config == "official":
        return "0.55"
    if config.startswith("diffusers"):
        return "tab:orange"
    return "tab:green" if "compiled" in config else "tab:red" if "sage" in config else "tab:blue"


ORDER = ("official", "diffusers WanTransformerBlock", "ours eager", "ours flash_attn4", "ours compiled",
         "ours compiled + flash_attn4")


def draw(out: Path = OUT, results: Path = RESULTS) -> Path:
    import textwrap

    import bench_comm

    runs = load_runs(results)
    rows = step_rows(runs)
    rows.sort(key=lambda r: ORDER.index(r["config"]) if r["config"] in ORDER else len(ORDER))  # stable
    series = bench_comm.scaling_series()
    device = runs[0]["machine"]["device"]
    overhead = non_block_ms(runs)
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 6), gridspec_kw={"width_ratios": [1.2, 1]})
    values = []
    for r in rows:
        text = f"{r['s_per_step']:.2f}"
        if r["config"] != "official":
            text += f"  ({r['ratio_to_official']:.2f}x)"
        values.append((r["s_per_step"], text))
    hbars(a, [r["label"] for r in rows], values, [_color(r["config"]) for r in rows],
          xlabel="seconds per denoising step (lower is better)",
          title=f"(a) one {device}: measured blocks, 720p")
    a.tick_params(axis="y", labelsize=8.5)
    bench_comm.draw_scaling(b, series)
    b.set_title("(b) 1 to 8 GPUs, 720p: PROJECTED, not measured", fontsize=10)
    fig.suptitle("Wan2.2 T2V-A14B, 1280x720 x 81 frames, 40 steps: seconds per step", fontsize=12)
    notes = (
        f"(a) Block-projected: {BLOCKS} x median ms per block (real-size random bf16 blocks, cond + uncond "
        f"batched) + {overhead:.1f} ms non-block work per step, from benchmarks/results/h100_*.json "
        "(bench_gpu.py); VAE decode and text encoder excluded; (0.87x) = ratio to official. Where runs "
        "differ the latest is shown. * measured with the older transposed residual stream. "
        "Official: Wan2.2 README, T2V-A14B 720P on H100/H800 (1041.5 s on 1 GPU with offload, 288.7 s "
        "on 4, 155.1 s on 8): whole run incl. text encoder and VAE, divided by 40 steps. "
        "(b) PROJECTED, not measured (no multi-GPU machine was available): bench_comm.py, bytes per rank "
        "from its formula (checked to the byte on CPU ranks) over the link bandwidth, plus compute from "
        f"the FLOP count ({series['assumptions']}, assumed); fastest layout per GPU count "
        "(U4 = Ulysses 4, 2x4 = CFG 2 x Ulysses 4)."
    )
    fig.text(0.01, 0.01, textwrap.fill(notes, 180), fontsize=7.5, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"PNG path (default {OUT.relative_to(HERE.parent)})")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder with the recorded h100_*.json")
    args = parser.parse_args()
    out = draw(args.out, args.results)
    print(f"# chart written to {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
