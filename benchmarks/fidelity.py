"""Fidelity: our Wan2.2 pipeline against the official code, diffusers' WanPipeline and ComfyUI's Wan model.

    python benchmarks/fidelity.py --official-repo PATH [--comfyui PATH] [--cases defaults,dpm++,...]
    python benchmarks/fidelity.py --official-repo PATH --device cuda   # bf16 at real size (needs a GPU)
    python benchmarks/fidelity.py                                      # no checkout: against diffusers only

CPU (default), fp32, like for like: a tiny random model set is written in the official layout
(`wan22_core.tiny`), and every case runs
- the official loop: the checkout's T5 encoder + tokenizer, `WanModel` x2 with the boundary switch
  and per-expert guidance, `FlowUniPCMultistepScheduler` / `FlowDPMSolverMultistepScheduler` with
  their own sigma and timestep handling (`official_loop` follows `wan/text2video.py` line by line,
  minus offloading and the distributed wrappers), and the official VAE decode;
- ours through the public API (`load_*`, `denoise`, `decode_to_video`; the worker group for the
  multi-rank layouts), and through our CLI as a subprocess (`generate --dtype fp32 --text-dtype
  fp32 --no-video --save-latents`; under torchrun on 2 ranks in the ranks case; and with the
  default --text-dtype, whose bf16 text encoder is reported apart with its cause);
- diffusers' `WanPipeline` over the official models' weights with the official sigma grid, as our
  tests drive it (`tests/reference.py`), fed the official embeddings (it has no text encoder here);
- with `--comfyui PATH`, one forward per expert of ComfyUI's `comfy.ldm.wan.model.WanModel` on the
  comfy-layout (fp16) files, next to the official model and ours on the same files,
on the same files, prompts and noise tensor (`make_noise`: the official code draws its noise on a
CUDA generator, so both are handed the same tensor instead). Differences are relative L2 and
max |diff| against the official result (against diffusers when no checkout is given), PSNR for
the decoded frames. A cell over its bound makes the exit status 1.

The checkout is imported from PATH, never copied. `wan/__init__.py` imports every task (and their
packages), so bare `wan`, `wan.modules`, `wan.utils` packages are registered and only the modules
needed are imported. Two things are written here for a CPU: a stand-in for the official attention
call, which is FlashAttention-only (`flash_attention` asserts a CUDA tensor; `attention.py` only
tries the flash_attn imports, so the stand-in replaces the name `wan.modules.model` calls), and the
default `device=torch.cuda.current_device()` of `T5EncoderModel`, evaluated when `t5.py` is
imported. The stand-in computes in the inputs' dtype (fp32 here) where FlashAttention would round
q, k, v to bf16; that is the one change to the official numerics, and it is what "like for like" means.

--device cuda: random bf16 A14B blocks (`--blocks` of 40 per expert) at 480p x 81 frames, 2 steps,
ours / official (its bf16 autocast) / diffusers in bf16, each next to the bf16 noise floor: our
model against itself in another op order (cond alone vs as row 0 of the batched cond+uncond
forward). `--dry-run` runs that section on the CPU at tiny size (what the tests do).

Exit status: 0 within bounds, 1 a bound exceeded, 2 bad input or missing packages.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import math
import re
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # diffusers set up as the tests do
from reference import diffusers_twin, pad_text, rel_l2, run_wan_pipeline, wan_pipeline  # noqa: E402

from wan22_core.checkpoints import ModelFiles, load_dit, load_text_encoder, load_vae  # noqa: E402
from wan22_core.config import DEFAULT_NEGATIVE_PROMPT, DiTConfig, SamplerSettings  # noqa: E402
from wan22_core.pipeline import decode_to_video, denoise, make_noise  # noqa: E402
from wan22_core.placement import ExpertPair  # noqa: E402


NUM_TRAIN_TIMESTEPS = 1000  # official num_train_timesteps (shared_config.py)
TOKENIZER_CONFIG = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0}  # what AutoTokenizer needs beside spiece.model
OFFICIAL_PACKAGES = ("ftfy", "regex", "einops", "diffusers")  # what wan/modules and wan/utils import
COMFY_PACKAGES = ("psutil", "einops")  # what comfy.ldm.wan.model's imports need beyond torch

# Bounds (fp32, CPU). Ours vs official on final latents is the published claim (<= 1e-6, measured
# 4.6e-7 - 6.3e-7 when the issue was filed). The others are set from the first full run with a
# margin of about 10x (measured values are in docs/fidelity.md); None = reported, not bounded.
BOUNDS = {
    ("ours", "text"): 1e-6,
    ("ours", "forward"): 1e-6,
    ("ours", "latents"): 1e-6,
    ("ours", "frames"): 2e-6,
    ("diffusers", "forward"): 1e-5,
    ("diffusers", "latents"): 1e-5,
    ("ComfyUI", "forward"): 1e-5,
}
# bf16 section: our bf16 result may be at most this much further from the fp32 result than the
# reference's bf16 result is (both implementations round to bf16 at different places).
BF16_ERROR_RATIO = 1.5


# ---------------------------------------------------------------------------------------------
# 1. Cases


@dataclass(frozen=True)
class Case:
    name: str
    settings: SamplerSettings = SamplerSettings()  # official t2v-A14B defaults: 40 steps, UniPC, shift 12, CFG 4/3
    frames: int = 9
    height: int = 48
    width: int = 64
    prompt: str = "A red fox trots through fresh snow at dawn. The camera tracks forward smoothly."
    negative: str = DEFAULT_NEGATIVE_PROMPT
    lora: bool = False  # a LoRA on both experts (ours: apply_loras; official: merged by hand here)
    seed: int = 42


CASES = {
    "defaults": Case("defaults"),
    "dpm++": Case("dpm++", SamplerSettings(solver="dpm++")),
    "odd": Case("odd", SamplerSettings(shift=5.0, boundary=0.9), frames=13, height=48, width=80,
                prompt="A cat &amp;amp; a dog &lt;3 play   in the\tsnow &quot;together&quot; by a \u201ccaf\u00c3\u00a9\u201d"
                       "\x1b[0m", seed=7),  # entities, whitespace, curly quotes, mojibake, a terminal escape
    "lora": Case("lora", lora=True),
    "ranks": Case("ranks"),  # the defaults case on 2 and 4 gloo ranks
}
# (label, parallel_config kwargs): the layouts the multi-GPU guide lists for 2 and 4 GPUs
RANK_LAYOUTS = (
    ("2 ranks: Ulysses 2 + FSDP", dict(gpus="cpu:2", ulysses_degree=2, fsdp=True)),
    ("2 ranks: CFG-parallel + FSDP", dict(gpus="cpu:2", ulysses_degree=1, fsdp=True, cfg_parallel=True)),
    ("4 ranks: Ulysses 4 + FSDP", dict(gpus="cpu:4", ulysses_degree=4, fsdp=True)),
    ("4 ranks: CFG-parallel x Ulysses 2 + FSDP", dict(gpus="cpu:4", ulysses_degree=2, fsdp=True, cfg_parallel=True)),
)
# The CLI rows: `python -m wan22_core generate` in fp32 like for like, latents only (+ the case's
# settings, LoRAs and model set); in the ranks case under torchrun --nproc_per_node 2 with these flags
CLI_FP32 = ("generate", "--dtype", "fp32", "--text-dtype", "fp32", "--no-video", "--save-latents")
CLI_TEXT_AUTO = ("generate", "--dtype", "fp32", "--no-video", "--save-latents")  # the default --text-dtype
CLI_CASES = tuple(CASES)  # the cases with CLI rows (each run starts a process: seconds of imports)
TORCHRUN_FLAGS = ("--ulysses", "2", "--fsdp")
LORA_RANK, LORA_ALPHA, LORA_STRENGTHS = 4, 2.0, {"high": 0.8, "low": 0.6}


# ---------------------------------------------------------------------------------------------
# 2. Measurements and the table


@dataclass
class Cell:
    rel: float | None  # relative L2 against the reference
    max_abs: float | None
    bound: float | None = None
    psnr: float | None = None
    note: str = ""

    @property
    def exceeded(self) -> bool:
        return self.bound is not None and not (self.rel is not None and self.rel <= self.bound)

    def __str__(self) -> str:
        if self.rel is None:
            return self.note
        text = f"{self.rel:.1e} ({self.max_abs:.1e})"
        if self.psnr is not None:
            text += f", {self.psnr:.0f} dB" if math.isfinite(self.psnr) else ", identical"
        if self.exceeded:
            text += f" **> {self.bound:.0e}**"
        return text + (f" {self.note}" if self.note else "")


@dataclass
class Row:
    case: str
    quantity: str
    cells: dict[str, Cell] = field(default_factory=dict)  # column -> difference against the reference


def compare(a: torch.Tensor, b: torch.Tensor, bound: float | None = None, frames: bool = False) -> Cell:
    """a against the reference b: relative L2, max |a - b|, and PSNR (peak 1) for frames in [0, 1]."""
    if a.shape != b.shape:
        return Cell(None, None, bound, note=f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a.double() - b.double())
    psnr = -10 * math.log10(diff.pow(2).mean().item()) if frames and diff.abs().max() > 0 else (
        math.inf if frames else None)
    return Cell(rel_l2(a, b), diff.abs().max().item(), bound, psnr)


IMPLEMENTATIONS = ("ours", "diffusers", "ComfyUI")  # columns that are differences against the reference


def table(rows: list[Row], reference: str) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row.cells))
    heads = [f"{c} vs {reference}" if c in IMPLEMENTATIONS else c for c in columns]
    lines = [f"| case | quantity | {' | '.join(heads)} |",
             "|" + "---|" * (2 + len(columns))]
    for row in rows:
        cells = [str(row.cells[c]) if c in row.cells else "" for c in columns]
        lines.append(f"| {row.case} | {row.quantity} | {' | '.join(cells)} |")
    return "\n".join(lines)


def failures(rows: list[Row]) -> list[str]:
    return [f"{row.case} / {row.quantity} / {column}: {cell}" for row in rows
            for column, cell in row.cells.items() if cell.exceeded]


# ---------------------------------------------------------------------------------------------
# 3. The model set and the LoRA


def write_model_set(root: Path, comfy: bool) -> dict[str, Path]:
    """Our tiny random set in the official layout (and comfy layout), the same seeded weights."""
    from wan22_core.tiny import make_tiny

    sets = {"official": make_tiny(root / "official", "official")}
    # The official tokenizer is transformers' AutoTokenizer, which needs a config beside spiece.model
    # (google/umt5-xxl ships one); our tokenizer reads spiece.model alone.
    (sets["official"] / "google" / "umt5-xxl" / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    if comfy:
        sets["comfy"] = make_tiny(root / "comfy", "comfy")
    return sets


_LORA_TARGET = re.compile(r"blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])\.weight")


def write_lora(path: Path, state: dict[str, torch.Tensor], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random rank-4 LoRA over every block Linear, ComfyUI/kohya layout; returns {weight: (up, down)}."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    for name, weight in state.items():
        if _LORA_TARGET.fullmatch(name):
            up = torch.randn(weight.shape[0], LORA_RANK, generator=g) * 0.1
            down = torch.randn(LORA_RANK, weight.shape[1], generator=g) * 0.1
            module = "diffusion_model." + name.removesuffix(".weight")
            tensors.update({f"{module}.lora_up.weight": up, f"{module}.lora_down.weight": down,
                            f"{module}.alpha": torch.tensor(LORA_ALPHA)})
            factors[name] = (up, down)
    save_file(tensors, str(path))
    return factors


def merge_by_hand(state: dict[str, torch.Tensor], factors, strength: float) -> dict[str, torch.Tensor]:
    """W + strength * up @ down * alpha / rank, in fp32: the LoRA definition, not our lora.py."""
    merged = dict(state)
    for name, (up, down) in factors.items():
        merged[name] = state[name] + strength * (up @ down) * (LORA_ALPHA / LORA_RANK)
    return merged


# ---------------------------------------------------------------------------------------------
# 4. The official code, imported from a checkout


def missing_packages(names) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def official_attention_stand_in(compute_dtype: torch.dtype | None):
    """`wan.modules.attention.flash_attention` for any device: SDPA with the padded keys masked.

    Official: q, k, v cast to bf16 (FlashAttention), softmax scale 1/sqrt(head dim), keys beyond
    k_lens masked, every query computed. compute_dtype None keeps the inputs' dtype (fp32).
    """
    def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                        causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
        if q_lens is not None or q_scale is not None or causal or dropout_p or tuple(window_size) != (-1, -1):
            raise NotImplementedError("the stand-in covers what t2v calls: k_lens and the default scale only")
        out_dtype = q.dtype
        q, k, v = (x.to(compute_dtype or v.dtype).transpose(1, 2) for x in (q, k, v))  # [B, heads, L, dim]
        mask = None
        if k_lens is not None:  # [B, 1, 1, Lk]: True where the key is real
            mask = (torch.arange(k.shape[2], device=k.device)[None] < k_lens.to(k.device)[:, None])[:, None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
        return out.transpose(1, 2).to(out_dtype)

    return flash_attention


def import_official(repo: Path, attention_dtype: torch.dtype | None) -> types.SimpleNamespace:
    """wan.modules.{t5, tokenizers, model, vae2_1} and wan.utils.fm_solvers{,_unipc} from `repo`."""
    if not (repo / "wan" / "modules" / "model.py").is_file():
        raise SystemExit(f"--official-repo {repo}: no wan/modules/model.py; pass a checkout of Wan-Video/Wan2.2")
    for name in [n for n in sys.modules if n == "wan" or n.startswith("wan.")]:
        del sys.modules[name]  # a second checkout in the same process (tests) must not reuse the first
    for name in ("wan", "wan.modules", "wan.utils"):  # bare packages: skip wan/__init__.py's imports
        package = types.ModuleType(name)
        package.__path__ = [str(repo / name.replace(".", "/"))]
        sys.modules[name] = package
    real_current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # T5EncoderModel's default argument, evaluated at import
    try:
        mods = {name: importlib.import_module(f"wan.{name}") for name in (
            "modules.t5", "modules.tokenizers", "modules.model", "modules.vae2_1", "utils.fm_solvers",
            "utils.fm_solvers_unipc")}
    finally:
        torch.cuda.current_device = real_current_device
    mods["modules.model"].flash_attention = official_attention_stand_in(attention_dtype)
    return types.SimpleNamespace(t5=mods["modules.t5"], model=mods["modules.model"], vae=mods["modules.vae2_1"],
                                 dpm=mods["utils.fm_solvers"], unipc=mods["utils.fm_solvers_unipc"])


def read_dit_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


class Official:
    """The official pipeline pieces on one model set: text encoder, two experts, VAE, and the loop."""

    name = "official"

    def __init__(self, mods, model_dir: Path, device: torch.device, expert_states: dict | None = None):
        self.mods, self.dir, self.device = mods, model_dir, device
        self.tiny = json.loads((model_dir / "tiny_config.json").read_text())
        config = json.loads((model_dir / "high_noise_model" / "config.json").read_text())
        self.patch_size = (1, 2, 2)  # WanModel's default; t2v-A14B's config.json does not set it
        self.experts = {}
        for expert in ("high", "low"):
            # WanModel(**config.json) + the shards: from_pretrained would drop text_dim (in the
            # model's ignore_for_config), which only the real 4096-wide model survives.
            model = mods.model.WanModel(**{k: v for k, v in config.items() if not k.startswith("_")})
            state = (expert_states or {}).get(expert) or read_dit_state(model_dir / f"{expert}_noise_model")
            model.load_state_dict(state, strict=True)
            self.experts[expert] = model.eval().requires_grad_(False).to(device)

    def encode(self, prompt: str, negative: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """T5EncoderModel as WanT2V builds it (umt5_xxl given the tiny sizes), two batch-1 calls."""
        t = self.tiny["text"]
        sizes = dict(vocab_size=t["vocab_size"], dim=t["dim"], dim_attn=t["dim"], dim_ffn=t["ffn_dim"],
                     num_heads=t["num_heads"], encoder_layers=t["num_layers"], num_buckets=t["num_buckets"])
        t5 = self.mods.t5
        real = t5.umt5_xxl
        t5.umt5_xxl = functools.partial(real, **sizes)
        try:
            encoder = t5.T5EncoderModel(text_len=t["text_len"], dtype=dtype, device="cpu",
                                        checkpoint_path=str(self.dir / "models_t5_umt5-xxl-enc-bf16.pth"),
                                        tokenizer_path=str(self.dir / "google" / "umt5-xxl"))
        finally:
            t5.umt5_xxl = real
        with torch.no_grad():
            return encoder([prompt], torch.device("cpu"))[0], encoder([negative], torch.device("cpu"))[0]

    def forward(self, expert: str, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.experts[expert]([x.to(self.device)], t=torch.tensor([t], device=self.device),
                                        context=[context.to(self.device)], seq_len=self._seq_len(x.shape))[0]

    def _seq_len(self, shape) -> int:
        _, lat_t, lat_h, lat_w = shape
        sp_size = 1  # no sequence parallelism
        return math.ceil((lat_h * lat_w) / (self.patch_size[1] * self.patch_size[2]) * lat_t / sp_size) * sp_size

    def _autocast(self):
        """text2video.py's `torch.amp.autocast('cuda', dtype=param_dtype)`: bf16 on a GPU, a no-op on the CPU."""
        return torch.amp.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _scheduler(self, settings: SamplerSettings):
        if settings.solver == "unipc":
            scheduler = self.mods.unipc.FlowUniPCMultistepScheduler(
                num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1, use_dynamic_shifting=False)
            scheduler.set_timesteps(settings.steps, device=self.device, shift=settings.shift)
            return scheduler, scheduler.timesteps
        if settings.solver == "dpm++":
            scheduler = self.mods.dpm.FlowDPMSolverMultistepScheduler(
                num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1, use_dynamic_shifting=False)
            sigmas = self.mods.dpm.get_sampling_sigmas(settings.steps, settings.shift)
            timesteps, _ = self.mods.dpm.retrieve_timesteps(scheduler, device=self.device, sigmas=sigmas)
            return scheduler, timesteps
        raise SystemExit(f"the official code has no solver {settings.solver!r} (only unipc and dpm++)")

    def loop(self, positive, negative, noise, settings: SamplerSettings) -> torch.Tensor:
        """WanT2V.generate's sampling loop (wan/text2video.py), minus offloading, FSDP and SP."""
        guide_scale = (settings.cfg_low, settings.cfg_high)  # official order: (low-noise, high-noise)
        seed_g = torch.Generator(device=self.device).manual_seed(0)  # passed to step; UniPC/DPM++ draw nothing
        with self._autocast(), torch.no_grad():
            boundary = settings.boundary * NUM_TRAIN_TIMESTEPS
            scheduler, timesteps = self._scheduler(settings)
            latents = [noise.to(self.device)]
            seq_len = self._seq_len(noise.shape)
            arg_c = {"context": [positive.to(self.device)], "seq_len": seq_len}
            arg_null = {"context": [negative.to(self.device)], "seq_len": seq_len}
            for t in timesteps:
                timestep = torch.stack([t])
                model = self.experts["high" if t.item() >= boundary else "low"]
                sample_guide_scale = guide_scale[1] if t.item() >= boundary else guide_scale[0]
                noise_pred_cond = model(latents, t=timestep, **arg_c)[0]
                noise_pred_uncond = model(latents, t=timestep, **arg_null)[0]
                noise_pred = noise_pred_uncond + sample_guide_scale * (noise_pred_cond - noise_pred_uncond)
                temp_x0 = scheduler.step(noise_pred.unsqueeze(0), t, latents[0].unsqueeze(0), return_dict=False,
                                         generator=seed_g)[0]
                latents = [temp_x0.squeeze(0)]
        return latents[0].float().cpu()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Wan2_1_VAE(...).decode([z]) -> frames [F, H, W, 3] in [0, 1] (official: [3, F, H, W] in [-1, 1])."""
        v = self.tiny["vae"]
        real = self.mods.vae._video_vae
        self.mods.vae._video_vae = functools.partial(real, dim=v["base_dim"], dim_mult=list(v["dim_mult"]),
                                                     num_res_blocks=v["num_res_blocks"],
                                                     temperal_downsample=list(v["temporal_downsample"]))
        try:
            vae = self.mods.vae.Wan2_1_VAE(z_dim=v["z_dim"], vae_pth=str(self.dir / "Wan2.1_VAE.pth"),
                                           device=self.device)
        finally:
            self.mods.vae._video_vae = real
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.cuda.amp.autocast is deprecated / CUDA absent
            video = vae.decode([latent.to(self.device)])[0]
        return ((video.float().cpu().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# 5. Ours (public API) and diffusers


class Ours:
    name = "ours"

    def __init__(self, files: ModelFiles, device: torch.device, dtype: torch.dtype = torch.float32,
                 lora_paths: dict[str, Path] | None = None):
        self.files, self.device = files, device
        self.experts = {"high": load_dit(files.high_noise, dtype), "low": load_dit(files.low_noise, dtype)}
        if lora_paths:
            from wan22_core.lora import LoraSpec, apply_loras

            for expert, path in lora_paths.items():
                apply_loras(self.experts[expert], [LoraSpec(path, LORA_STRENGTHS[expert])])
        self.pair = ExpertPair(self.experts["high"], self.experts["low"], device)

    def encode(self, prompt: str, negative: str, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        return our_embeddings(self.files, prompt, negative, dtype)

    def forward(self, expert: str, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        model = self.pair.get(expert)
        with torch.no_grad():
            return model(x[None].to(self.device), torch.tensor([t], device=self.device),
                         context[None].to(self.device, next(model.parameters()).dtype))[0].float()

    def loop(self, positive, negative, noise, settings, batch_cfg: bool = True) -> torch.Tensor:
        return denoise(self.pair, positive, negative, noise, settings, batch_cfg=batch_cfg).cpu()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return decode_to_video(load_vae(self.files.vae).to(self.device), latent.to(self.device))


def our_embeddings(files: ModelFiles, prompt: str, negative: str, dtype: torch.dtype | None):
    """(positive, negative) from our text encoder; dtype None runs it in the file's dtype (bf16), as the CLI does."""
    embeds = load_text_encoder(files.text_encoder, files.tokenizer, dtype=dtype).encode_prompt(prompt, negative)
    return embeds.positive, embeds.negative


class Diffusers:
    """WanPipeline / WanTransformer3DModel over given official-named weights (tests/reference.py's setup)."""

    name = "diffusers"

    def __init__(self, cfg: DiTConfig, experts: dict[str, torch.nn.Module], device: torch.device,
                 dtype: torch.dtype = torch.float32):
        from diffusers.utils import logging

        logging.set_verbosity_error()  # its "cast with to()" advice: `place` does what from_pretrained does
        self.cfg, self.experts, self.device, self.dtype = cfg, experts, device, dtype

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """To the device and dtype, keeping `_keep_in_fp32_modules` in fp32 as from_pretrained(torch_dtype=...) does."""
        model.to(self.device, self.dtype)
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, param in model.named_parameters():
            if any(part in keep for part in name.split(".")):
                param.data = param.data.float()
        return model

    def forward(self, expert: str, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        twin = self.place(diffusers_twin(self.cfg, self.experts[expert]))
        with torch.no_grad():
            return twin(hidden_states=x[None].to(self.device, self.dtype),
                        timestep=torch.tensor([t], device=self.device),
                        encoder_hidden_states=pad_text(context, self.cfg.text_len).to(self.device, self.dtype),
                        return_dict=False)[0][0].float().cpu()

    def loop(self, positive, negative, noise, settings: SamplerSettings) -> tuple[torch.Tensor, str]:
        """Final latents, and a note when diffusers cannot take the official grid."""
        pipe = wan_pipeline(self.cfg, self.experts["high"], self.experts["low"], settings)
        note = ""
        if settings.solver == "dpm++":  # DPMSolverMultistepScheduler.set_timesteps takes no sigma grid
            from diffusers import DPMSolverMultistepScheduler

            pipe.scheduler = DPMSolverMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=settings.shift,
                num_train_timesteps=NUM_TRAIN_TIMESTEPS, solver_order=2, algorithm_type="dpmsolver++",
                solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")
            note = "(its own grid: starts at 0.999, official 1.0)"
        for model in (pipe.transformer, pipe.transformer_2):
            self.place(model)
        frames = 4 * (noise.shape[1] - 1) + 1
        latents = run_wan_pipeline(pipe, positive.to(self.device), negative.to(self.device), noise.to(self.device),
                                   settings, frames, noise.shape[2] * 8, noise.shape[3] * 8, self.cfg.text_len)
        return latents.float().cpu(), note


def dit_config(model_dir: Path) -> DiTConfig:
    config = json.loads((model_dir / "high_noise_model" / "config.json").read_text())
    return DiTConfig(**{k: config[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim",
                                                "text_dim", "freq_dim", "text_len", "eps")})


def state_holder(state: dict[str, torch.Tensor]) -> types.SimpleNamespace:
    """What `diffusers_twin` reads from a model (its official-named state dict), for plain state dicts."""
    return types.SimpleNamespace(state_dict=lambda: state)


# ---------------------------------------------------------------------------------------------
# 6. ComfyUI's native model


def import_comfy(repo: Path, device: torch.device):
    """comfy.ldm.wan.model and comfy.ops from a ComfyUI checkout, on `device`, with PyTorch SDPA attention."""
    if not (repo / "comfy" / "ldm" / "wan" / "model.py").is_file():
        raise SystemExit(f"--comfyui {repo}: no comfy/ldm/wan/model.py; pass a ComfyUI checkout")
    sys.path.insert(0, str(repo))
    import comfy.cli_args  # parses no argv unless comfy.options.args_parsing is set

    comfy.cli_args.args.cpu = device.type == "cpu"  # read when comfy.model_management is imported
    comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA, what ComfyUI picks on most GPUs
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy


def comfy_forward(comfy, cfg: DiTConfig, state: dict[str, torch.Tensor], x, t: int, context) -> torch.Tensor:
    """One forward of ComfyUI's WanModel; its text context comes zero-padded to 512 as WAN21.extra_conds pads it."""
    model = comfy.ldm.wan.model.WanModel(
        model_type="t2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim, dim=cfg.dim,
        ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
        num_heads=cfg.num_heads, num_layers=cfg.num_layers, eps=cfg.eps, dtype=torch.float32,
        operations=comfy.ops.disable_weight_init)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(x[None], torch.tensor([float(t)]), pad_text(context, cfg.text_len))[0]


def comfy_rows(case: Case, sets: dict[str, Path], comfy, mods, noise, context, device) -> list[Row]:
    """The DiT forward on the comfy-layout (fp16) files, upcast to fp32 for every implementation."""
    from safetensors.torch import load_file

    files = ModelFiles.from_model_dir(sets["comfy"])
    states = {"high": load_file(files.high_noise), "low": load_file(files.low_noise)}
    states = {e: {k: v.float() for k, v in s.items()} for e, s in states.items()}
    cfg = dit_config(sets["official"])
    ours = Ours(files, device)
    diffusers = Diffusers(cfg, {e: state_holder(s) for e, s in states.items()}, device)
    reference = Official(mods, sets["official"], device, states) if mods else diffusers
    rows = []
    for expert, t in forward_timesteps(case.settings):
        ref = reference.forward(expert, noise, t, context).cpu()
        row = Row(case.name, f"DiT forward, {expert}-noise expert, comfy-layout fp16 file (t={t})")
        row.cells["ours"] = compare(ours.forward(expert, noise, t, context).cpu(), ref, BOUNDS[("ours", "forward")])
        if mods:
            row.cells["diffusers"] = compare(diffusers.forward(expert, noise, t, context), ref,
                                             BOUNDS[("diffusers", "forward")])
        row.cells["ComfyUI"] = compare(comfy_forward(comfy, cfg, states[expert], noise, t, context), ref,
                                       BOUNDS[("ComfyUI", "forward")])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# 7. The fp32 cases


@dataclass
class Run:
    """What every case shares: the model sets, the official and ComfyUI imports, the device."""

    sets: dict[str, Path]
    workdir: Path
    device: torch.device
    mods: types.SimpleNamespace | None = None  # the official modules; None: diffusers is the reference
    comfy: types.ModuleType | None = None
    reference_latents: dict = field(default_factory=dict)  # case -> reference (latents, (pos, neg))

    @property
    def reference_name(self) -> str:
        return "official" if self.mods else "diffusers"


def forward_timesteps(settings: SamplerSettings) -> list[tuple[str, int]]:
    """One timestep per expert: the schedule's first (high noise) and the first below the boundary."""
    low = int(settings.boundary * NUM_TRAIN_TIMESTEPS) - 1
    return [("high", NUM_TRAIN_TIMESTEPS - 1), ("low", low)]


def expert_states(run: Run, case: Case) -> tuple[dict, dict | None]:
    """The experts' official-named fp32 weights (hand-merged with the case's LoRA) and our LoRA files."""
    states = {e: read_dit_state(run.sets["official"] / f"{e}_noise_model") for e in ("high", "low")}
    if not case.lora:
        return states, None
    paths = {}
    for i, expert in enumerate(("high", "low")):
        paths[expert] = run.workdir / f"lora_{expert}.safetensors"
        factors = write_lora(paths[expert], states[expert], seed=100 + i)
        states[expert] = merge_by_hand(states[expert], factors, LORA_STRENGTHS[expert])
    return states, paths


def run_case(case: Case, run: Run) -> list[Row]:
    files = ModelFiles.from_model_dir(run.sets["official"])
    states, lora_paths = expert_states(run, case)
    ours = Ours(files, run.device, lora_paths=lora_paths)
    diffusers = Diffusers(dit_config(run.sets["official"]), {e: state_holder(s) for e, s in states.items()},
                          run.device)
    official = Official(run.mods, run.sets["official"], run.device, states) if run.mods else None
    noise = make_noise(case.seed, case.frames, case.height, case.width)
    rows, positive, negative = [], *ours.encode(case.prompt, case.negative, torch.float32)
    ref_pos, ref_neg = positive, negative
    if official:
        ref_pos, ref_neg = official.encode(case.prompt, case.negative, torch.float32)
        rows.append(Row(case.name, "text embeddings, prompt (fp32)",
                        {"ours": compare(positive, ref_pos, BOUNDS[("ours", "text")])}))
        if case.name == "defaults":  # every case uses the default negative prompt
            rows.append(Row(case.name, "text embeddings, default negative prompt (fp32)",
                            {"ours": compare(negative, ref_neg, BOUNDS[("ours", "text")])}))

    reference = official or diffusers
    for expert, t in forward_timesteps(case.settings):
        ref = reference.forward(expert, noise, t, ref_pos).cpu()
        row = Row(case.name, f"DiT forward, {expert}-noise expert (t={t})",
                  {"ours": compare(ours.forward(expert, noise, t, ref_pos).cpu(), ref, BOUNDS[("ours", "forward")])})
        if official:
            row.cells["diffusers"] = compare(diffusers.forward(expert, noise, t, ref_pos), ref,
                                             BOUNDS[("diffusers", "forward")])
        rows.append(row)

    ours_latents = ours.loop(positive, negative, noise, case.settings)
    rows.append(latent_row(case, run, reference, ref_pos, ref_neg, noise, ours_latents, diffusers))
    ref_latents = run.reference_latents[case.name][0]
    if case.name in CLI_CASES:
        rows.append(Row(case.name, f"final latents, CLI `{' '.join(CLI_FP32)}`", {"ours": compare(
            cli_latents(case, run, CLI_FP32, lora_paths), ref_latents, rows[-1].cells["ours"].bound)}))
    if official:
        rows.append(Row(case.name, "decoded frames (each its own latents)", {"ours": compare(
            ours.decode(ours_latents), official.decode(ref_latents), BOUNDS[("ours", "frames")], frames=True)}))
    if official and case.name == "defaults":
        rows += text_precision_rows(case, run, ours, official, ref_latents)
    if run.comfy is not None and case.name == "defaults":
        rows += comfy_rows(case, run.sets, run.comfy, run.mods, noise, ref_pos, run.device)
    return rows


def latent_row(case, run, reference, ref_pos, ref_neg, noise, ours_latents, diffusers) -> Row:
    """Final latents: ours (own fp32 text encoder) and diffusers (reference embeddings) against the reference."""
    if isinstance(reference, Diffusers):
        ref_latents, note = reference.loop(ref_pos, ref_neg, noise, case.settings)
    else:
        ref_latents, note = reference.loop(ref_pos, ref_neg, noise, case.settings), ""
    run.reference_latents[case.name] = (ref_latents, (ref_pos, ref_neg))
    # diffusers' DPM++ runs on its own grid: a difference by design, reported without a bound
    ours_bound = None if note else BOUNDS[("ours", "latents")]
    row = Row(case.name, f"final latents ({case.settings.steps} steps, {case.settings.solver})",
              {"ours": compare(ours_latents, ref_latents, ours_bound)})
    if note:
        row.cells["ours"].note = f"(reference is diffusers on {note[1:]}"
    if run.mods:
        latents, note = diffusers.loop(ref_pos, ref_neg, noise, case.settings)
        row.cells["diffusers"] = compare(latents, ref_latents, None if note else BOUNDS[("diffusers", "latents")])
        row.cells["diffusers"].note = note
    return row


def text_precision_rows(case, run: Run, ours: Ours, official: Official, ref_latents) -> list[Row]:
    """The CLI's default text-encoder precision (--text-dtype auto: the file's bf16) and what it costs."""
    positive, negative = ours.encode(case.prompt, case.negative, None)  # None: the file's dtype
    both = torch.cat([positive, negative]).float()
    bf16_pos, bf16_neg = official.encode(case.prompt, case.negative, torch.bfloat16)
    fp32_pos, fp32_neg = official.encode(case.prompt, case.negative, torch.float32)
    return [
        Row(case.name, f"text embeddings, both in bf16 (file precision; ours {positive.dtype})",
            {"ours": compare(both, torch.cat([bf16_pos, bf16_neg]).float())}),
        Row(case.name, "text embeddings, ours bf16 vs official fp32",
            {"ours": compare(both, torch.cat([fp32_pos, fp32_neg]))}),
        Row(case.name, f"final latents, CLI `{' '.join(CLI_TEXT_AUTO)}` (--text-dtype auto: bf16) vs official fp32",
            {"ours": compare(cli_latents(case, run, CLI_TEXT_AUTO), ref_latents)}),
    ]


def cli_latents(case: Case, run: Run, command, lora_paths: dict | None = None, ranks: int = 1,
                parallel: tuple[str, ...] = ()) -> torch.Tensor:
    """The final latents of our CLI (`command`, ending in --save-latents) run as a subprocess on the
    official-layout set with the case's settings; on `ranks` torchrun processes with `parallel` flags."""
    import subprocess

    from safetensors.torch import load_file

    out = run.workdir / f"cli_{len(list(run.workdir.glob('cli_*')))}.safetensors"
    s = case.settings
    args = [*command, str(out), "--model-dir", str(run.sets["official"]), "--prompt", case.prompt,
            "--negative-prompt", case.negative, "--frames", str(case.frames), "--height", str(case.height),
            "--width", str(case.width), "--seed", str(case.seed), "--steps", str(s.steps), "--shift", str(s.shift),
            "--boundary", str(s.boundary), "--cfg-high", str(s.cfg_high), "--cfg-low", str(s.cfg_low),
            "--solver", s.solver, "--device", run.device.type, "--quiet", *parallel]
    for expert, path in (lora_paths or {}).items():
        args += [f"--lora-{expert}", f"{path}:{LORA_STRENGTHS[expert]}"]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    found = subprocess.run([sys.executable, *launcher, "-m", "wan22_core", *args], capture_output=True, text=True,
                           cwd=run.workdir)
    if found.returncode != 0:
        raise SystemExit(f"our CLI failed ({' '.join(command)} ...): {found.stderr.strip()[-2000:]}")
    return load_file(str(out))["latents"]


def rank_rows(case: Case, run: Run) -> list[Row]:
    """Our worker group on gloo ranks against the defaults case's reference latents."""
    from wan22_core.parallel import Job, ModelSpec, WorkerGroup, parallel_config

    if "defaults" not in run.reference_latents:
        run_case(replace(CASES["defaults"], settings=case.settings), run)
    ref_latents, _ = run.reference_latents["defaults"]
    files = ModelFiles.from_model_dir(run.sets["official"])
    defaults = replace(CASES["defaults"], settings=case.settings)
    positive, negative = our_embeddings(files, defaults.prompt, defaults.negative, torch.float32)
    noise = make_noise(defaults.seed, defaults.frames, defaults.height, defaults.width)
    spec = ModelSpec(files.high_noise, files.low_noise, dtype="fp32")
    heads = dit_config(run.sets["official"]).num_heads
    rows = []
    for label, layout in RANK_LAYOUTS:
        group = WorkerGroup.get_or_create(spec, parallel_config(**layout, num_heads=heads))
        try:
            latents = group.run(Job(positive, negative, noise, case.settings))
        finally:
            group.shutdown()
        rows.append(Row(case.name, f"final latents, {label}",
                        {"ours": compare(latents, ref_latents, BOUNDS[("ours", "latents")])}))
    if case.name in CLI_CASES:
        cli = cli_latents(defaults, run, CLI_FP32, ranks=2, parallel=TORCHRUN_FLAGS)
        rows.append(Row(case.name, f"final latents, CLI under torchrun, 2 ranks: `{' '.join(TORCHRUN_FLAGS)}`",
                        {"ours": compare(cli, ref_latents, BOUNDS[("ours", "latents")])}))
    return rows


def run_cases(cases: list[Case], run: Run) -> list[Row]:
    rows = []
    for case in cases:
        print(f"case {case.name} ...", flush=True)
        rows += rank_rows(case, run) if case.name == "ranks" else run_case(case, run)
    return rows


# ---------------------------------------------------------------------------------------------
# 8. bf16 at real size (GPU), next to the bf16 noise floor


def bf16_section(run: Run, blocks: int, dry_run: bool) -> list[Row]:
    """Random A14B-sized experts (`blocks` blocks each) at 480p x 81 frames, 2 steps, all in bf16.

    Every implementation is compared with the reference (official when given: bf16 weights as
    --convert_model_dtype makes them, under its bf16 autocast), next to the noise floor: our
    model against itself in another op order (cond alone vs row 0 of the cond+uncond batch; the
    loop with batched vs sequential CFG). Two bf16 implementations that round at different places
    differ by about their bf16 errors, so each is also compared with the fp32 result; the bound
    is that ours is not less accurate than the reference.
    """
    from wan22_core.config import A14B
    from wan22_core.tiny import make_tiny, tiny_config

    a14b = A14B.dit
    cfg = None if dry_run else tiny_config(dim=a14b.dim, layers=blocks, heads=a14b.num_heads, ffn_dim=a14b.ffn_dim)
    model_dir = make_tiny(run.workdir / "bf16", "official", *([cfg] if cfg else []))
    frames, height, width = (9, 48, 64) if dry_run else (81, 480, 832)
    settings = SamplerSettings(steps=2, boundary=0.95)  # 2 UniPC steps at shift 12: t = 999 (high), 922 (low)
    files = ModelFiles.from_model_dir(model_dir)
    ours, ours_fp32 = Ours(files, run.device, dtype=torch.bfloat16), Ours(files, run.device)
    states = {e: read_dit_state(model_dir / f"{e}_noise_model") for e in ("high", "low")}
    diffusers = Diffusers(dit_config(model_dir), {e: state_holder(s) for e, s in states.items()}, run.device,
                          torch.bfloat16)
    official = None
    if run.mods and run.device.type == "cuda":  # its fp32 islands are CUDA autocast regions
        official = Official(run.mods, model_dir, run.device)
        official.experts = {e: m.to(torch.bfloat16) for e, m in official.experts.items()}
    reference = official or diffusers
    positive, negative = ours.encode("A red fox trots through fresh snow at dawn.", DEFAULT_NEGATIVE_PROMPT,
                                     torch.float32)
    noise = make_noise(0, frames, height, width)
    rows = []
    for expert, t in (("high", 999), ("low", 922)):
        exact = ours_fp32.forward(expert, noise, t, positive).cpu()
        ref, mine = reference.forward(expert, noise, t, positive).cpu(), ours.forward(expert, noise, t, positive).cpu()
        row = Row("bf16 480p", f"DiT forward, {expert}-noise expert (t={t})", {"ours": compare(mine, ref)})
        if official:
            row.cells["diffusers"] = compare(diffusers.forward(expert, noise, t, positive), ref)
        row.cells[FLOOR] = forward_floor(ours, expert, noise, t, positive, negative)
        rows.append(bf16_errors(row, mine, ref, exact, reference.name))
    exact = ours_fp32.loop(positive, negative, noise, settings)
    mine = ours.loop(positive, negative, noise, settings)
    ref = (official.loop(positive, negative, noise, settings) if official
           else diffusers.loop(positive, negative, noise, settings)[0])
    row = Row("bf16 480p", "final latents (2 steps)", {"ours": compare(mine, ref)})
    if official:
        row.cells["diffusers"] = compare(diffusers.loop(positive, negative, noise, settings)[0], ref)
    row.cells[FLOOR] = compare(ours.loop(positive, negative, noise, settings, batch_cfg=False), mine)
    rows.append(bf16_errors(row, mine, ref, exact, reference.name))
    return rows


FLOOR = "noise floor: ours vs ours, other op order"


def bf16_errors(row: Row, mine, ref, exact, reference: str) -> Row:
    """Each bf16 result against the fp32 one (ours in fp32: the fp32 cases show it equals the
    reference's to ~1e-6); ours must be no further from it than BF16_ERROR_RATIO x the reference."""
    theirs = compare(ref, exact)
    row.cells[f"{reference} bf16 vs fp32"] = theirs
    row.cells["ours bf16 vs fp32"] = compare(mine, exact, BF16_ERROR_RATIO * theirs.rel)
    return row


def forward_floor(ours: Ours, expert: str, x, t: int, positive, negative) -> Cell:
    """Our cond prediction alone vs as row 0 of the batched (cond, uncond) forward: bf16 op-order noise."""
    from wan22_core.pipeline import stack_contexts

    model = ours.pair.get(expert)
    with torch.no_grad():
        both = model(x[None].expand(2, *x.shape).to(ours.device), torch.tensor([t, t], device=ours.device),
                     stack_contexts(positive, negative).to(ours.device, torch.bfloat16))[0].float().cpu()
    return compare(ours.forward(expert, x, t, positive).cpu(), both)


# ---------------------------------------------------------------------------------------------
# 9. Command line


def versions(args) -> str:
    import diffusers
    import transformers

    def commit(path: Path | None) -> str:
        if path is None:
            return "not given"
        import subprocess

        found = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
        return f"{path} at {found.stdout.strip()}" if found.returncode == 0 else f"{path} (not a git work tree)"

    return (f"official: {commit(args.official_repo)}; ComfyUI: {commit(args.comfyui)}; torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, transformers {transformers.__version__}; device {args.device}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-repo", type=Path, help="a checkout of Wan-Video/Wan2.2 (without: diffusers only)")
    p.add_argument("--comfyui", type=Path, help="a ComfyUI checkout: adds its native Wan model's forward")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the fp32 cases; cuda: the bf16 section at real size")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, help="override every case's step count (quick checks)")
    p.add_argument("--blocks", type=int, default=2, help="bf16 section: transformer blocks per expert (of 40)")
    p.add_argument("--dry-run", action="store_true", help="the bf16 section on the CPU at tiny size")
    return p


def check_packages(args) -> str | None:
    """A one-line message naming the missing packages and the pip line, or None."""
    needed = (OFFICIAL_PACKAGES if args.official_repo else ()) + (COMFY_PACKAGES if args.comfyui else ())
    missing = missing_packages(dict.fromkeys(needed))
    if missing:
        return (f"missing packages to import the official code / ComfyUI: {', '.join(missing)}; "
                f"install them with: pip install {' '.join(missing)}")
    return None


def selected_cases(args) -> list[Case]:
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise SystemExit(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    return [replace(CASES[n], settings=replace(CASES[n].settings, steps=args.steps)) if args.steps else CASES[n]
            for n in names]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    problem = check_packages(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        cases = selected_cases(args)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    bf16 = args.device == "cuda" or args.dry_run
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; run the bf16 section on a GPU, or --dry-run on the CPU",
              file=sys.stderr)
        return 2
    # the official code's CUDA autocast regions, on a CPU: disabled, as they should be; one warning each
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    with tempfile.TemporaryDirectory(prefix="wan22-fidelity-") as tmp:
        attention_dtype = torch.bfloat16 if bf16 else None  # FlashAttention's bf16 inputs; fp32 like for like
        run = Run(sets={}, workdir=Path(tmp), device=device,
                  mods=import_official(args.official_repo, attention_dtype) if args.official_repo else None,
                  comfy=import_comfy(args.comfyui, device) if args.comfyui and not bf16 else None)
        if bf16:
            rows = bf16_section(run, args.blocks, args.dry_run)
        else:
            run.sets = write_model_set(Path(tmp) / "models", comfy=run.comfy is not None)
            rows = run_cases(cases, run)
    print(versions(args))
    print(table(rows, run.reference_name))
    bad = failures(rows)
    for line in bad:
        print(f"over its bound: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
