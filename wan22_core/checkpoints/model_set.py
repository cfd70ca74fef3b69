"""A complete model set: where its four parts are (`ModelFiles`), and whether two experts belong together."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import DiTConfig
from .identify import DIT, TEXT_ENCODER, VAE, Identity, check_slot, identify, tokenizer_folder
from .layouts import (COMFY_DIRS, COMFY_LEGACY_DIRS, DIFFUSERS_DIRS, HIGH_NOISE_DIR, LOW_NOISE_DIR,
                      MODEL_FILE_SUFFIXES, T5_FILE, T5_TOKENIZER_DIR, VAE_FILE)
from .reading import Checkpoint, CheckpointError


@dataclass(frozen=True)
class ModelFiles:
    """Where each part of a model set lives."""

    high_noise: Path
    low_noise: Path
    text_encoder: Path
    vae: Path | None  # None: a run that decodes nothing (`generate --no-video`); `check(vae=False)` only
    tokenizer: Path | None = None  # None: the text encoder file embeds it (`spiece_model`)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelFiles":
        """An official Wan2.2-T2V-A14B folder, a diffusers -Diffusers folder, or a ComfyUI models
        folder (diffusion_models/ or unet/ with one file named *high* and one *low*, text_encoders/
        or clip/, vae/; safetensors or GGUF)."""
        root = Path(model_dir)
        if not root.is_dir():
            raise CheckpointError(f"--model-dir {root} is not a folder")
        if (root / "model_index.json").is_file():
            return cls._diffusers(root)
        if (root / COMFY_DIRS["experts"]).is_dir() or (root / COMFY_LEGACY_DIRS["experts"]).is_dir():
            return cls._comfy(root)
        return cls._official(root)

    @classmethod
    def _official(cls, root: Path) -> "ModelFiles":
        files = cls(high_noise=root / HIGH_NOISE_DIR, low_noise=root / LOW_NOISE_DIR,
                    text_encoder=root / T5_FILE, vae=root / VAE_FILE, tokenizer=root / T5_TOKENIZER_DIR)
        missing = [str(p.relative_to(root)) for p in (files.high_noise, files.low_noise, files.text_encoder,
                                                     files.vae, files.tokenizer) if not p.exists()]
        if missing:
            raise CheckpointError(
                f"{root} is not a Wan2.2-T2V-A14B folder: missing {', '.join(missing)} (an official folder; "
                f"diffusers folders have model_index.json, ComfyUI model folders {COMFY_DIRS['experts']}/; "
                "make one with `python -m wan22_core make-tiny DIR`)")
        return files

    @classmethod
    def _diffusers(cls, root: Path) -> "ModelFiles":
        parts = {slot: root / sub for slot, sub in DIFFUSERS_DIRS.items()}
        missing = [sub for slot, sub in DIFFUSERS_DIRS.items() if not parts[slot].is_dir()]
        if missing:
            raise CheckpointError(f"{root} has model_index.json but no {', '.join(missing)} folder; "
                                  "download the complete Wan2.2-T2V-A14B-Diffusers folder")
        return cls(**parts)

    @classmethod
    def _comfy(cls, root: Path) -> "ModelFiles":
        """Each folder's files are recognised from their headers (a real ComfyUI models folder holds
        other models too); which expert is which can only come from the name."""
        experts = [COMFY_DIRS["experts"], COMFY_LEGACY_DIRS["experts"]]
        encoders = [COMFY_DIRS["text_encoder"], COMFY_LEGACY_DIRS["text_encoder"]]
        return cls(high_noise=_only_usable(root, experts, DIT, "high"),
                   low_noise=_only_usable(root, experts, DIT, "low"),
                   text_encoder=_only_usable(root, encoders, TEXT_ENCODER),
                   vae=_only_usable(root, [COMFY_DIRS["vae"]], VAE))

    def check(self, vae: bool = True) -> dict[str, Identity]:
        """Recognise every file from its header and fail on the first that does not fit its slot,
        a missing tokenizer, or experts of different sizes, before any weights are read.

        `vae=False`: the run decodes nothing (`generate --no-video`), so the VAE is not read and
        may be None; otherwise a missing VAE is an error.
        """
        found = dict(zip(("high_noise", "low_noise"), check_expert_pair(self.high_noise, self.low_noise)))
        if vae:
            if self.vae is None:
                raise CheckpointError("no VAE given: pass --vae F (only --no-video runs without one)")
            found["vae"] = check_slot(self.vae, VAE)[1]
        text_ckpt, found["text_encoder"] = check_slot(self.text_encoder, TEXT_ENCODER)
        tokenizer_folder(text_ckpt, self.tokenizer)
        return found


def check_expert_pair(high_noise: str | Path, low_noise: str | Path) -> tuple[Identity, Identity]:
    """Both experts recognised from their headers and of one model (equal sizes), else CheckpointError.

    Experts of two different models would still run, each on its own steps, and make a worse
    video with no error; every path that takes a pair (CLI, nodes, worker group) checks it.
    """
    high = check_slot(high_noise, DIT, "high-noise expert")[1]
    low = check_slot(low_noise, DIT, "low-noise expert")[1]
    if high.dit != low.dit:
        def sizes(cfg: DiTConfig) -> str:
            return f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, {cfg.in_dim} latent channels"

        raise CheckpointError(
            f"the experts do not belong together: high-noise {Path(high_noise).name} is {sizes(high.dit)}; "
            f"low-noise {Path(low_noise).name} is {sizes(low.dit)}: choose the high- and low-noise experts of "
            "one model (wan2.2_t2v_*_noise_14B)")
    return high, low


def expert_config(path: str | Path) -> DiTConfig:
    """An expert's sizes from its headers alone (to validate a parallel plan before spawning workers)."""
    return check_slot(path, DIT)[1].dit


def _only_usable(root: Path, subs: list[str], slot: str, name_part: str = "") -> Path:
    """The one file in root/<each of subs> that fits `slot` (and has `name_part` in its name)."""
    def usable(path: Path) -> bool:
        try:
            found = identify(Checkpoint(path))
        except CheckpointError:
            return False
        return found.kind == slot and found.problem is None

    files = sorted(p for sub in subs for p in (root / sub).glob("*") if p.suffix in MODEL_FILE_SUFFIXES)
    candidates = [p for p in files if name_part in p.name.lower() and usable(p)]
    if len(candidates) != 1:
        what = f"{slot} named *{name_part}*" if name_part else slot
        listed = ", ".join(str(p.relative_to(root)) for p in candidates) or "none"
        raise CheckpointError(f"{root} as a ComfyUI models folder needs exactly one {what} in "
                              f"{' or '.join(s + '/' for s in subs)}, found {listed}; pass the files with "
                              "--high-noise --low-noise --text-encoder --vae instead")
    return candidates[0]
