"""The one source of model sizes and sampling defaults.

Everything that names a dimension, a default step count, the MoE boundary, a CFG scale or the
default negative prompt reads it from here: nodes, the CLI and the tests included.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class DiTConfig:
    """One Wan2.2 diffusion-transformer expert (official `WanModel` hyper-parameters)."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40  # head dim 128; Ulysses degrees must divide this
    num_layers: int = 40
    in_dim: int = 16  # latent channels (Wan2.1 VAE z_dim)
    out_dim: int = 16
    text_dim: int = 4096  # UMT5-XXL d_model
    freq_dim: int = 256  # sinusoidal time-embedding width
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w): tokens are 2x2 latent pixels
    text_len: int = 512  # context is zero-padded to this many slots; cross-attn sees all of them
    eps: float = 1e-6
    rope_max_positions: int = 1024  # per axis; official RoPE tables have this many rows

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self):
        # every int field (the annotations are strings: `from __future__ import annotations`)
        sizes = {f.name: getattr(self, f.name) for f in fields(self) if f.type == "int"}
        sizes.update({f"patch_size[{i}]": p for i, p in enumerate(self.patch_size)})
        for name, value in sizes.items():  # sizes read from file headers arrive here unchecked
            if not is_integer(value) or value < 1:
                raise ValueError(f"DiT {name} must be an integer >= 1, got {value!r}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {self.patch_size!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")


@dataclass(frozen=True)
class TextEncoderConfig:
    """UMT5-XXL encoder as used by Wan (official `umt5_xxl(encoder_only=True)`)."""

    vocab_size: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240  # gated-GELU
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets, one table per layer (shared_pos=False)
    max_distance: int = 128
    text_len: int = 512


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE (z_dim 16); the A14B experts share it with Wan2.1."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def stride(self) -> tuple[int, int, int]:
        """(t, h, w) pixels per latent position, derived from the levels: (4, 8, 8) for Wan2.1.

        frames -> (frames - 1) // 4 + 1 latent frames, pixels / 8 per spatial axis.
        """
        spatial = 2 ** (len(self.dim_mult) - 1)
        return (2 ** sum(self.temporal_downsample), spatial, spatial)


# Per-channel latent statistics of the Wan2.1 VAE (official `Wan2_1_VAE.__init__`).
# The engine samples in normalised space z = (raw - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Official `sample_neg_prompt` (shared_config.py), used when the user gives no negative prompt.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

SOLVERS = ("unipc", "dpm++", "euler")
MAX_STEPS = 10000  # as ComfyUI's KSampler
MAX_VIDEOS = 64  # videos of one sampler batch in the nodes: more is a typo, not a plan
# Smallest flow shift: below ~1e-16, 1 + (shift - 1) * sigma rounds to 0 at sigma 1 and the schedule
# turns to NaN; nothing near this is useful (Wan2.2 uses 12, distilled LoRAs 5, shift 1 is no shift).
MIN_SHIFT = 0.001
NUM_TRAIN_TIMESTEPS = 1000
FPS = 16
# The official t2v-A14B 720p video: 81 frames (5 s at 16 fps) of 1280 x 720.
WIDTH, HEIGHT, FRAMES = 1280, 720, 81
WIDTH_480P, HEIGHT_480P = 832, 480  # the official 480p size (the memory tables, the multi-GPU node's line)
# Tiled VAE decode (the loader node's `tiled`): 64 latent pixels = 512 px tiles overlapping by 64 px,
# ComfyUI's tiled-decode defaults.
VAE_TILE = 64


@dataclass(frozen=True)
class SamplerSettings:
    """What the MoE loop needs besides models, embeddings and noise (official t2v-A14B defaults)."""

    steps: int = 40
    # Flow shift: sigma' = s*sigma / (1 + (s-1)*sigma). 12 keeps most steps at high noise, where
    # the A14B high-noise expert was trained to lay out the motion.
    shift: float = 12.0
    # The expert switch: high-noise expert iff timestep >= boundary * 1000. 0.875 is the
    # official t2v value (half the minimum SNR, per the Wan2.2 paper); 26 of 40 steps go high.
    boundary: float = 0.875
    cfg_high: float = 4.0  # official sample_guide_scale is (low, high) = (3.0, 4.0)
    cfg_low: float = 3.0
    solver: str = "unipc"
    # Step cache threshold (sampling/step_cache.py): 0 = off, every model pass runs (exact). Above 0
    # a step may reuse its expert's last transformation while the estimated relative error of the
    # velocity stays below it: fewer passes, not exact.
    step_cache: float = 0.0

    def validate(self) -> "SamplerSettings":
        check_schedule_args(self.steps, self.shift, self.solver)
        if not (is_real(self.boundary) and 0.0 <= self.boundary <= 1.0):
            raise ValueError(f"boundary must be in [0, 1], got {self.boundary!r}")
        for name in ("cfg_high", "cfg_low"):
            value = getattr(self, name)
            if not (is_finite_real(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        check_step_cache(self.step_cache)
        return self


# Steps each expert always runs first with a step cache. The authors run the first 5 (HunyuanVideo,
# 50 steps), 7 (Wan2.2 A14B, 40 steps, one state for both experts) or 10 (Wan2.1, 50 steps); two are
# the least that can work (the rate needs two passes of the same expert).
STEP_CACHE_WARMUP = 5


def check_step_cache(value) -> float:
    """The step-cache threshold as a float, or a ValueError naming the allowed values."""
    if not (is_finite_real(value) and value >= 0):
        raise ValueError(f"step_cache must be a finite number >= 0 (0 = off, every model pass runs; "
                         f"0.05 skips some), got {value!r}")
    return float(value)


# Blocks per expert the loader node keeps in CPU memory with offload block_swap unless told: half of
# A14B's 40, enough for 720p on a 32 GB card (its tooltip gives the memory model's count per card).
DEFAULT_SWAP_BLOCKS = 20

# How the loader node's weight_dtype (and ExpertOptions.weight_dtype) holds the expert weights.
WEIGHT_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_fast")


@dataclass(frozen=True)
class ExpertOptions:
    """How the two experts are loaded, patched and placed: the CLI's flags, the loader node's inputs.

    Each value is checked where it is used (`experts.expert_dtypes`, `models.attention`,
    `offload.expert_pair_options`, `lora.apply_loras`); the multi-GPU path refuses the ones its
    ranks do not implement (`parallel.plan.check_parallel_options`).
    """

    dtype: str = "auto"  # compute dtype: auto (bf16 on a GPU, fp32 on the CPU), bf16, fp16, fp32
    # auto: as the file stores them (scaled-fp8 Linears stay fp8); bf16/fp16/fp32: converted, and
    # computed in that dtype; fp8_e4m3fn: block Linears quantised at load (_fast also multiplies in fp8)
    weight_dtype: str = "auto"
    attention: str = "auto"  # one of models.attention.BACKENDS
    offload: str = "auto"  # one of offload.OFFLOAD_CHOICES
    swap_blocks: int = 0  # blocks per expert kept in host memory; only with offload="block_swap"
    compile: bool = False  # regional torch.compile of each block
    lora_mode: str = "merge"  # one of lora.MODES


def is_real(value) -> bool:
    """A real number (Python or numpy scalar); bool is an int to Python, but True is no scale."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """An integer (Python or numpy scalar), not a bool: what sizes, seeds, steps and block counts take."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    """`is_real` and finite as the float the math turns it into: not NaN, inf or an int like 2**1100."""
    try:
        return is_real(value) and math.isfinite(value)
    except OverflowError:  # math.isfinite converts an int to a float first
        return False


def check_schedule_args(steps, shift, solver) -> None:
    """The one check of steps, shift and solver: `SamplerSettings.validate` and the schedules use it.

    Integers and reals include numpy scalars (`np.int64(4)`, `np.float32(12)`); bools are refused.
    """
    if not is_integer(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > MAX_STEPS:  # the schedule is built in memory; a typo like 4000000 must not exhaust it
        raise ValueError(f"steps must be at most {MAX_STEPS}, got {steps} (Wan2.2 uses 40)")
    if not (is_finite_real(shift) and shift >= MIN_SHIFT):
        raise ValueError(f"shift must be a finite number >= {MIN_SHIFT}, got {shift!r} (the Wan2.2 default is 12.0)")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A complete model set: two experts of one size, the text encoder and the VAE."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)


A14B = ModelConfig()

# Tiny sizes for tests and the CPU demo: same structure, random weights, seconds on a laptop.
TINY = ModelConfig(
    dit=DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32),
    text=TextEncoderConfig(vocab_size=256, dim=32, ffn_dim=64, num_heads=4, num_layers=2),
    vae=VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
)

# Video sizes the models take; the size checks (pipeline.check_video_size) and the sampler node's
# widgets read these.
Z_DIM = A14B.vae.z_dim  # latent channels
STRIDE_T, STRIDE_S, _ = A14B.vae.stride  # frames / pixels per latent position
MAX_LATENT_POSITIONS = A14B.dit.rope_max_positions  # RoPE table rows per axis
# The largest video the RoPE table covers (official sizes are far below).
MAX_FRAMES = STRIDE_T * (MAX_LATENT_POSITIONS * A14B.dit.patch_size[0] - 1) + 1
SIDE_STEP = STRIDE_S * A14B.dit.patch_size[1]  # pixels per token side: sizes are multiples of this
MAX_SIDE = SIDE_STEP * MAX_LATENT_POSITIONS
