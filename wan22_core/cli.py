"""`python -m wan22_core {demo,generate,make-tiny}` (the command-line contract, design.md §4).

Reads like nanoGPT's sample.py: settings at the top, then load, encode, denoise, decode, save,
each stage timed. Errors exit non-zero with one line (no traceback unless --debug).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .config import FPS, FRAMES, HEIGHT, SOLVERS, WIDTH, DiTConfig, SamplerSettings

DEFAULTS = SamplerSettings()
DEMO_PROMPT = "A red fox trots through fresh snow at sunrise, cinematic tracking shot"


def _add_sampling_flags(p: argparse.ArgumentParser, steps: int, width: int, height: int, frames: int) -> None:
    from .runtime import DTYPES

    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--negative-prompt", default=None,
                   help="default: the official Chinese negative prompt; '' means none")
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--height", type=int, default=height)
    p.add_argument("--frames", type=int, default=frames, help="4k+1")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--shift", type=float, default=DEFAULTS.shift)
    p.add_argument("--boundary", type=float, default=DEFAULTS.boundary)
    p.add_argument("--cfg-high", type=float, default=DEFAULTS.cfg_high)
    p.add_argument("--cfg-low", type=float, default=DEFAULTS.cfg_low)
    p.add_argument("--solver", choices=SOLVERS, default=DEFAULTS.solver)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=FPS)
    p.add_argument("--save-latents", type=Path, default=None,
                   help="also write the final latents (safetensors, key 'latents', [16,T,H/8,W/8] float32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--vae-tile", type=int, default=None, metavar="LATENT_PIXELS",
                   help="decode the VAE in spatial tiles of this many latent pixels (saves memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    from .parallel.plan import A14B_HEADS, valid_ulysses_degrees

    g = p.add_argument_group("multi-GPU (under torchrun --nproc_per_node N; see docs/multigpu.md)")
    g.add_argument("--ulysses", type=int, default=1, metavar="N",
                   help=f"sequence-parallel degree; divides the {A14B_HEADS} heads: "
                        f"{', '.join(map(str, valid_ulysses_degrees()))}")
    g.add_argument("--fsdp", action="store_true", help="shard both experts' weights across all ranks")
    g.add_argument("--cfg-parallel", action="store_true", help="cond and uncond passes on two halves of the ranks")
    g.add_argument("--keep-gathered", action="store_true",
                   help="with --fsdp: keep gathered weights between steps (faster; one full expert per GPU)")


def _lora_arg(text: str):
    """argparse type for FILE[:STRENGTH]; a bad strength is a usage error naming the value."""
    from .lora import LoraSpec

    try:
        return LoraSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _add_lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (merged into the weights at load; repeatable, applied in order)")
    for expert in ("high", "low"):
        g.add_argument(f"--lora-{expert}", type=_lora_arg, action="append", default=[], metavar="FILE[:STRENGTH]",
                       help=f"a LoRA for the {expert}-noise expert, strength 1.0 unless given (e.g. lightx2v.safetensors:1)")


def _add_speed_flags(p: argparse.ArgumentParser) -> None:
    from .models.attention import BACKENDS
    from .offload import OFFLOAD_CHOICES

    g = p.add_argument_group("speed and memory")
    g.add_argument("--attention", choices=BACKENDS, default="auto",
                   help="attention kernel; auto: the fastest installed exact one (sage is not exact)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (one process; eager with a warning if the "
                        "toolchain is missing)")
    g.add_argument("--offload", choices=OFFLOAD_CHOICES, default="auto",
                   help="one process: none keeps both experts on the GPU, swap_experts only the active one, "
                        "block_swap also streams --swap-blocks of its blocks from CPU memory; auto: from the card's memory")
    g.add_argument("--swap-blocks", type=int, default=0, metavar="N",
                   help=f"with --offload block_swap: blocks per expert kept in CPU memory "
                        f"(1 to {DiTConfig().num_layers})")
    g.add_argument("--batch-cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="cond and uncond passes as one batch of 2 (faster); --no-batch-cfg runs them one by one, "
                        "halving activation memory")


def build_parser() -> argparse.ArgumentParser:
    from .tiny import FORMATS

    parser = argparse.ArgumentParser(prog="python -m wan22_core", description="Wan2.2 T2V-A14B (two-expert MoE)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="tiny random model set -> a short mp4 on CPU, in seconds")
    demo.add_argument("--output", type=Path, default=Path("out/demo.mp4"))
    demo.add_argument("--cache-dir", type=Path,
                      default=Path(os.environ.get("WAN22_CACHE", Path.home() / ".cache" / "wan22-moe")))
    _add_sampling_flags(demo, steps=4, width=128, height=128, frames=17)
    _add_speed_flags(demo)
    demo.set_defaults(func=cmd_demo, device="cpu", lora_high=[], lora_low=[])

    gen = sub.add_parser("generate", help="text -> video from checkpoint files")
    gen.add_argument("--model-dir", type=Path, help="an official Wan2.2-T2V-A14B folder, a diffusers "
                     "Wan2.2-T2V-A14B-Diffusers folder, or a ComfyUI models folder (diffusion_models/ "
                     "with one *high* and one *low* file, text_encoders/, vae/)")
    gen.add_argument("--high-noise", type=Path)
    gen.add_argument("--low-noise", type=Path)
    gen.add_argument("--text-encoder", type=Path)
    gen.add_argument("--tokenizer", type=Path, help="folder with spiece.model (if the encoder file has none)")
    gen.add_argument("--vae", type=Path)
    gen.add_argument("--output", type=Path, default=Path("out/video.mp4"))
    _add_sampling_flags(gen, steps=DEFAULTS.steps, width=WIDTH, height=HEIGHT, frames=FRAMES)
    _add_lora_flags(gen)
    _add_speed_flags(gen)
    _add_parallel_flags(gen)
    gen.set_defaults(func=cmd_generate)

    tiny = sub.add_parser("make-tiny", help="write a tiny random model set in a real checkpoint layout")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--format", default="official", choices=FORMATS)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dim", type=int)
    tiny.add_argument("--layers", type=int)
    tiny.add_argument("--heads", type=int)
    tiny.add_argument("--ffn-dim", type=int)
    tiny.add_argument("--text-layers", type=int)
    tiny.set_defaults(func=cmd_make_tiny)
    return parser


@contextmanager
def stage(name: str, timings: dict):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"  {name:<14} {timings[name]:7.2f} s", file=sys.stderr)


def _model_files(args):
    from .checkpoints import ModelFiles

    if args.model_dir is not None:
        return ModelFiles.from_model_dir(args.model_dir)
    parts = {"--high-noise": args.high_noise, "--low-noise": args.low_noise,
             "--text-encoder": args.text_encoder, "--vae": args.vae}
    missing = [flag for flag, value in parts.items() if value is None]
    if missing:
        raise ValueError(f"give --model-dir, or all of --high-noise --low-noise --text-encoder --vae "
                         f"(missing {' '.join(missing)})")
    return ModelFiles(high_noise=args.high_noise, low_noise=args.low_noise, text_encoder=args.text_encoder,
                      vae=args.vae, tokenizer=args.tokenizer)


def run(args, files) -> dict:
    """Load, encode, denoise, decode and save; returns the stage timings."""
    from .runtime import resolve_device, resolve_dtype
    from .sampling.moe import ExpertPair, keeps_host_copies

    settings = sampler_settings(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_model_options(args)
    placement = expert_placement(args, files)
    timings: dict[str, float] = {}

    with stage("text encoder", timings):
        embeds = encode_prompt(args, files)
    with stage("load experts", timings):
        experts = ExpertPair(load_expert(args, files.high_noise, args.lora_high, dtype, device),
                             load_expert(args, files.low_noise, args.lora_low, dtype, device), device, **placement,
                             keep_host=keeps_host_copies(device))  # the switch then copies nothing back
        if args.compile:
            compile_experts(experts.experts.values(), device)
    with stage("denoise", timings):  # includes the compile on the first step with --compile
        latent = denoise_video(args, experts, embeds.positive, embeds.negative, settings)
        del experts
    save_outputs(args, files, latent, device, dtype, timings)
    return timings


def encode_prompt(args, files):
    """The prompt and negative prompt through the text encoder, on the CPU (one process, or rank 0
    under torchrun); the encoder (11 GB at full size) is dropped when this returns."""
    from .checkpoints import load_text_encoder

    encoder = load_text_encoder(files.text_encoder, files.tokenizer, device="cpu")
    return encoder.encode_prompt(args.prompt, args.negative_prompt)


def denoise_video(args, experts, positive, negative, settings: SamplerSettings, show_progress: bool = True):
    """The seeded noise through the sampling loop; a progress bar unless --quiet or not `show_progress`
    (torchrun ranks other than 0)."""
    from .pipeline import denoise, make_noise

    noise = make_noise(args.seed, args.frames, args.height, args.width)
    progress = _progress_bar(settings.steps) if show_progress and not args.quiet else None
    try:
        return denoise(experts, positive, negative, noise, settings, batch_cfg=args.batch_cfg,
                       on_step=progress and (lambda s: progress.update(1)))
    finally:
        if progress is not None:
            progress.close()


def check_model_options(args) -> None:
    """Fail on the model flags now, not after the text encoder ran: attention package, LoRA files.
    (One process and torchrun ranks alike; the offload flags are checked by `expert_placement`.)"""
    from .models.attention import resolve_backend

    resolve_backend(args.attention)
    for lora in args.lora_high + args.lora_low:
        if not lora.path.is_file():
            raise FileNotFoundError(f"LoRA file not found: {lora.path}")


def expert_placement(args, files) -> dict:
    """--offload / --swap-blocks / --compile -> ExpertPair keyword arguments (auto: both experts stay
    on the device when they fit in 60% of it, else one at a time)."""
    from .checkpoints import expert_config
    from .offload import expert_pair_options

    layers = expert_config(files.high_noise).num_layers  # headers only
    return expert_pair_options(args.offload, args.swap_blocks, args.compile, layers)


def load_expert(args, path, loras, dtype, device):
    """One expert with its LoRAs merged and the attention backend set."""
    from .checkpoints import load_dit
    from .lora import apply_loras
    from .models.attention import set_attention_backend

    expert = load_dit(path, dtype)
    for report in apply_loras(expert, loras):
        if not report.unmatched:  # a report with unmatched keys is already logged as a warning
            print(f"  {report}", file=sys.stderr)
    set_attention_backend(expert, args.attention, device)
    return expert


def compile_experts(experts, device) -> None:
    """--compile: regional torch.compile of both experts; without the toolchain, one line and eager."""
    from .optimize import compile_blocks

    for expert in experts:  # both on one device: the first call finds a missing toolchain
        problem = compile_blocks(expert, device)
        if problem is not None:
            print(f"warning: --compile ignored: {problem}; running eager (same results, slower)", file=sys.stderr)
            return


def sampler_settings(args) -> SamplerSettings:
    """Validated settings from the flags; also fails on existing outputs before minutes of work."""
    from .pipeline import check_video_size

    settings = SamplerSettings(steps=args.steps, shift=args.shift, boundary=args.boundary,
                               cfg_high=args.cfg_high, cfg_low=args.cfg_low, solver=args.solver).validate()
    check_video_size(args.frames, args.height, args.width)
    for path in (args.output, args.save_latents):
        if path is not None and path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists; choose another name or pass --overwrite")
    return settings


def save_outputs(args, files, latent, device, dtype, timings: dict) -> None:
    """--save-latents, then VAE decode and the mp4 (rank 0 only under torchrun)."""
    import torch
    from safetensors.torch import save_file

    from .checkpoints import load_vae
    from .pipeline import decode_to_video
    from .video import write_mp4

    if args.save_latents is not None:
        args.save_latents.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.save_latents.with_name(f".{args.save_latents.name}.partial")
        save_file({"latents": latent.float().cpu().contiguous()}, str(tmp))
        os.replace(tmp, args.save_latents)
    with stage("vae decode", timings):
        vae = load_vae(files.vae, torch.float32 if device.type == "cpu" else dtype).to(device)
        frames = decode_to_video(vae, latent, tile_size=args.vae_tile)
    with stage("write mp4", timings):
        out = write_mp4(frames, args.output, fps=args.fps, overwrite=args.overwrite)
    print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {args.fps} fps)")


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="denoise", unit="step", file=sys.stderr)


def cmd_demo(args) -> int:
    from .tiny import cached_tiny

    timings: dict[str, float] = {}
    with stage("tiny models", timings):
        files = cached_tiny(args.cache_dir)
    timings.update(run(args, files))
    print(f"total {sum(timings.values()):.1f} s", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    files = _model_files(args)
    files.check()  # every file in its slot, read from headers: fail in seconds, not after loading
    from .parallel.launch import parallel_requested, run_distributed

    if parallel_requested(args):
        run_distributed(args, files)
    else:
        run(args, files)
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny, tiny_config

    cfg = tiny_config(dim=args.dim, layers=args.layers, heads=args.heads, ffn_dim=args.ffn_dim,
                      text_layers=args.text_layers)
    out = make_tiny(args.dir, args.format, cfg, args.seed)
    print(f"wrote a tiny {args.format} model set to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import Wan22Error
    from .runtime import default_cuda_allocator

    default_cuda_allocator()  # before any CUDA work; torchrun ranks run this main too

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (Wan22Error, ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
