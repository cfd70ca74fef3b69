"""The flags of every command, and the plain values the commands read back from them."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..checkpoints import ModelFiles
from ..config import FPS, FRAMES, HEIGHT, SOLVERS, WEIGHT_DTYPES, WIDTH, DiTConfig, ExpertOptions, SamplerSettings
from ..lora import LoraSpec
from ..models.attention import BACKENDS
from ..offload import OFFLOAD_CHOICES
from ..parallel.plan import A14B_HEADS, valid_ulysses_degrees
from ..pipeline import check_video_size
from ..runtime import DTYPES
from ..tiny import DEFAULT_GGUF_QUANT, FORMATS, GGUF_QUANTS
from .stages import Outputs

DEFAULTS = SamplerSettings()
DEMO_PROMPT = "A red fox trots through fresh snow at sunrise, cinematic tracking shot"


def _add_sampling_flags(p: argparse.ArgumentParser, steps: int, width: int, height: int, frames: int) -> None:
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
    p.add_argument("--step-cache", type=float, default=DEFAULTS.step_cache, metavar="THRESHOLD",
                   help="reuse the model's last transformation while the estimated relative velocity error stays "
                        "below THRESHOLD (0 = off, exact; e.g. 0.1: fewer passes, not exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos", type=int, default=1, metavar="N",
                   help="N videos with seeds seed, seed+1, ...: out.mp4 becomes out_00001.mp4, ... (and the "
                        "latents likewise); one after another on one GPU, side by side on replicas under torchrun")
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
    g = p.add_argument_group("multi-GPU (under torchrun --nproc_per_node N; see docs/multigpu.md)")
    g.add_argument("--sp", choices=("auto", "off"), default="auto",
                   help="sequence parallelism: auto (default) splits each video over every rank that --ulysses, "
                        "--ring and CFG-parallel leave (Ulysses first, the ring takes the rest); off: none, "
                        "every rank left over samples other --videos side by side")
    g.add_argument("--ulysses", type=int, default=None, metavar="U",
                   help=f"Ulysses degree (default: auto); divides the {A14B_HEADS} heads: "
                        f"{', '.join(map(str, valid_ulysses_degrees()))}")
    g.add_argument("--ring", type=int, default=None, metavar="R",
                   help="ring-attention degree (default: auto, the ranks Ulysses leaves); any count")
    g.add_argument("--fsdp", action="store_true", help="shard both experts' weights across all ranks")
    g.add_argument("--cfg-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="cond and uncond passes on two halves of the ranks (default: when cond and uncond run "
                        "batched, i.e. --batch-cfg and no guidance scale of 1, and the ranks divide by 2 x the set "
                        "--ulysses x --ring)")
    g.add_argument("--keep-gathered", action="store_true",
                   help="with --fsdp: keep gathered weights between steps (faster; one full expert per GPU)")


def _lora_arg(text: str) -> LoraSpec:
    """argparse type for FILE[:STRENGTH]; a bad strength is a usage error naming the value."""
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
    g = p.add_argument_group("speed and memory")
    g.add_argument("--attention", choices=BACKENDS, default="auto",
                   help="attention kernel; auto: the fastest installed exact one (sage is not exact)")
    g.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="auto",
                   help="how the experts' weights are held: auto as the file stores them (fp8_scaled files stay "
                        "fp8); bf16/fp16/fp32 converted and computed in that dtype; fp8_e4m3fn block Linears in fp8 "
                        "(half the memory; on the ranks too), _fast also multiplies in fp8 on Ada/Hopper")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (one process or every rank; eager with a warning if "
                        "the toolchain is missing)")
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
    parser = argparse.ArgumentParser(prog="python -m wan22_core", description="Wan2.2 T2V-A14B (two-expert MoE)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="tiny random model set -> a short mp4 on CPU, in seconds")
    demo.add_argument("--output", type=Path, default=Path("out/demo.mp4"))
    demo.add_argument("--cache-dir", type=Path,
                      default=Path(os.environ.get("WAN22_CACHE", Path.home() / ".cache" / "wan22-moe")))
    _add_sampling_flags(demo, steps=4, width=128, height=128, frames=17)
    _add_speed_flags(demo)
    demo.set_defaults(device="cpu", lora_high=[], lora_low=[], no_video=False, text_dtype="auto")

    gen = sub.add_parser("generate", help="text -> video from checkpoint files")
    gen.add_argument("--model-dir", type=Path, help="an official Wan2.2-T2V-A14B folder, a diffusers "
                     "Wan2.2-T2V-A14B-Diffusers folder, or a ComfyUI models folder (diffusion_models/ or unet/ "
                     "with one *high* and one *low* file, text_encoders/ or clip/, vae/; safetensors or GGUF)")
    gen.add_argument("--high-noise", type=Path, help="expert file or folder: safetensors, .pth, or GGUF (.gguf)")
    gen.add_argument("--low-noise", type=Path)
    gen.add_argument("--text-encoder", type=Path, help="UMT5 file or folder: safetensors, .pth, or GGUF (.gguf)")
    gen.add_argument("--tokenizer", type=Path, help="folder with spiece.model (if the encoder file has none)")
    gen.add_argument("--vae", type=Path)
    gen.add_argument("--output", type=Path, default=Path("out/video.mp4"))
    gen.add_argument("--no-video", action="store_true",
                     help="stop after the sampling loop and write only --save-latents: no VAE (--vae not needed), "
                          "no decode, no mp4")
    gen.add_argument("--text-dtype", default="auto", choices=("auto", *DTYPES),
                     help="the text encoder's compute dtype (it runs on the CPU). auto: the file's dtype (bf16 "
                          "for the official .pth, fp16 for umt5_xxl_fp16, bf16 for fp8 files), unlike the text "
                          "encoder node, whose auto is bf16 on a GPU and fp32 on the CPU. fp32 gives the official "
                          "fp32 results (docs/fidelity.md) but holds the 5.7B-parameter encoder in 23 GB of RAM, "
                          "twice the 11 GB of bf16/fp16")
    _add_sampling_flags(gen, steps=DEFAULTS.steps, width=WIDTH, height=HEIGHT, frames=FRAMES)
    _add_lora_flags(gen)
    _add_speed_flags(gen)
    _add_parallel_flags(gen)

    tiny = sub.add_parser("make-tiny", help="write a tiny random model set in a real checkpoint layout")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--format", default="official", choices=FORMATS)
    tiny.add_argument("--quant", choices=GGUF_QUANTS,
                      help=f"with --format gguf: the GGUF type of the quantised tensors (default {DEFAULT_GGUF_QUANT}; "
                           "K-quants need --dim and --ffn-dim multiples of 256)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dim", type=int)
    tiny.add_argument("--layers", type=int)
    tiny.add_argument("--heads", type=int)
    tiny.add_argument("--ffn-dim", type=int)
    tiny.add_argument("--text-layers", type=int)
    return parser


# ---------------------------------------------------------------------------------------------
# Reading the flags back as plain values (the stages never see the namespace)


def model_files(args: argparse.Namespace) -> ModelFiles:
    """--model-dir, or the four file flags (all of them; --vae not with --no-video)."""
    if args.model_dir is not None:
        return ModelFiles.from_model_dir(args.model_dir)
    parts = {"--high-noise": args.high_noise, "--low-noise": args.low_noise,
             "--text-encoder": args.text_encoder, **({} if args.no_video else {"--vae": args.vae})}
    missing = [flag for flag, value in parts.items() if value is None]
    if missing:
        raise ValueError(f"give --model-dir, or all of {' '.join(parts)} (missing {' '.join(missing)})")
    return ModelFiles(high_noise=args.high_noise, low_noise=args.low_noise, text_encoder=args.text_encoder,
                      vae=args.vae, tokenizer=args.tokenizer)


def sampler_settings(args: argparse.Namespace) -> SamplerSettings:
    """Validated settings and video size; also fails on existing outputs before minutes of work."""
    settings = SamplerSettings(steps=args.steps, shift=args.shift, boundary=args.boundary,
                               cfg_high=args.cfg_high, cfg_low=args.cfg_low, solver=args.solver,
                               step_cache=args.step_cache).validate()
    check_video_size(args.frames, args.height, args.width)
    outputs(args).check()
    return settings


def outputs(args: argparse.Namespace) -> Outputs:
    """--output, --save-latents and how the video is written; with --no-video, the latents alone."""
    if args.no_video and args.save_latents is None:
        raise ValueError("--no-video writes only the latents, and no --save-latents was given: "
                         "add --save-latents F.safetensors, or drop --no-video")
    return Outputs(video=None if args.no_video else args.output, latents=args.save_latents, fps=args.fps,
                   vae_tile=args.vae_tile, overwrite=args.overwrite, videos=args.videos)


def text_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """--text-dtype; None (auto) runs the encoder in its file's dtype."""
    return None if args.text_dtype == "auto" else DTYPES[args.text_dtype]


def expert_options(args: argparse.Namespace) -> ExpertOptions:
    """--dtype (compute), --weight-dtype, --attention, --offload, --swap-blocks, --compile; LoRAs are merged."""
    return ExpertOptions(dtype=args.dtype, weight_dtype=args.weight_dtype, attention=args.attention,
                         offload=args.offload, swap_blocks=args.swap_blocks, compile=args.compile)
