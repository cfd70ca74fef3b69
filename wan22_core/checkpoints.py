"""Find, recognise, read and load checkpoint files into our modules.

Layouts, recognised by tensor names and shapes (never by file names):
- official `Wan-AI/Wan2.2-T2V-A14B` folder: sharded expert folders, `.pth` T5 and VAE;
- ComfyUI single files: official DiT names, bare or under `model.diffusion_model.`; the UMT5
  encoder in transformers names with the tokenizer embedded as a uint8 `spiece_model` tensor;
- scaled fp8 (a root `scaled_fp8` marker, fp8 weights and per-Linear `.scale_weight`, or newer
  ComfyUI's `.weight_scale`): block Linears stay fp8 (see `fp8.py`), the rest is dequantised;
- diffusers `Wan-AI/Wan2.2-T2V-A14B-Diffusers`: `transformer/`, `transformer_2/`, `vae/`
  (renamed through `keymaps`), `text_encoder/` (transformers UMT5) and `tokenizer/`.
`check_slot` tells a file in the wrong slot (a VAE as an expert, an I2V or TI2V-5B model, a
LoRA, ...) from its header alone; every loader calls it first, `ModelFiles.check` for a set.

Reading never executes code from a file: `.pth` goes through `torch.load(weights_only=True)`,
safetensors headers are validated by the safetensors library and the tensor bytes are then
read with plain file reads, one tensor at a time, cast to the target dtype and moved to the
target device before the next is read. So loading a 57 GB fp32 expert as bf16 peaks at the bf16
model plus one fp32 tensor: no full fp32 copy, and no memory-mapped pages counted against the
process (reading through an mmap keeps every touched page of the file resident: 3x the bf16
size at peak for an fp32 file, measured). `Checkpoint.read_rows` reads a row range of one tensor,
so each rank of a sharded model reads just its part from disk (`parallel/loading.py`).

The DiT head count is not in any tensor shape. Files we write carry it in the safetensors
metadata (`num_heads`), folders in config.json; other files get the Wan convention of 128-wide
heads (every released Wan DiT).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from .config import DiTConfig, VAEConfig
from .errors import Wan22Error
from .fp8 import FP8, FP8Linear, block_linear_names, dequantize_fp8, quantize_fp8, swap_to_fp8
from .keymaps import COMFY_DIT_PREFIX, dit_diffusers_to_official, vae_diffusers_to_official
from .models.text_encoder import SCALED_FP8_MARKER, SPIECE_KEY, default_dtype
from .models.transformer import WanModel
from .models.vae import WanVAE

log = logging.getLogger(__name__)

# Official Wan2.2-T2V-A14B folder names.
HIGH_NOISE_DIR, LOW_NOISE_DIR = "high_noise_model", "low_noise_model"
T5_FILE, T5_TOKENIZER_DIR = "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
# Wan-AI/Wan2.2-T2V-A14B-Diffusers folder names (transformer = high-noise expert).
DIFFUSERS_DIRS = {"high_noise": "transformer", "low_noise": "transformer_2", "text_encoder": "text_encoder",
                  "tokenizer": "tokenizer", "vae": "vae"}
# ComfyUI's model folders (`DIR` can be ComfyUI's `models/`).
COMFY_DIRS = {"experts": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
WAN_HEAD_DIM = 128  # every released Wan DiT uses 128-wide heads; files without a config rely on it
NUM_HEADS_KEY = "num_heads"  # safetensors metadata key for the head count in files we write


class CheckpointError(Wan22Error):
    """A checkpoint is missing, unreadable, or not what its slot needs."""


# ---------------------------------------------------------------------------------------------
# 1. Reading: headers first, then tensor bytes one at a time

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are (`start` is the absolute file offset; -1 for `.pth`)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int


class Checkpoint:
    """Names, dtypes and shapes of a checkpoint file or folder, read from headers only.

    Opening one is cheap at any size; `read` then reads the tensors you ask for.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        config = self.path / "config.json"
        self.config: dict = _read_json(config) if self.path.is_dir() and config.is_file() else {}
        if self.path.is_file() and self.path.suffix in _PICKLE_SUFFIXES:
            self._pickled = _load_pickle_safely(self.path)
            self.entries = {k: TensorEntry(v.dtype, tuple(v.shape), self.path, -1, v.nbytes)
                            for k, v in self._pickled.items()}
        else:
            for file in _safetensors_files(self.path):
                self._add_safetensors(file)

    def _add_safetensors(self, file: Path) -> None:
        _check_readable(file)  # safe_open reports "permission denied" as "no such file"
        try:  # the library validates the header: JSON, dtypes, shapes, offsets, file length
            with safe_open(str(file), framework="pt") as f:
                self.metadata.update(f.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {file}: {err}; the file is truncated or not a "
                                  "safetensors file, download it again") from err
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which this loader "
                                      f"does not read (known: {', '.join(_SAFETENSORS_DTYPES)})")
            begin, end = info["data_offsets"]
            self.entries[name] = TensorEntry(_SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), file,
                                             data_start + begin, end - begin)

    @property
    def num_heads(self) -> int | None:
        """The DiT head count from config.json (official or diffusers) or our metadata, if any."""
        heads = (self.config.get("num_heads") or self.config.get("num_attention_heads")
                 or self.metadata.get(NUM_HEADS_KEY))
        if heads is None:
            return None
        if isinstance(heads, bool) or not isinstance(heads, (int, str)) or not str(heads).isdecimal() \
                or int(heads) < 1:
            raise CheckpointError(f"{self.path}: the head count in its config or metadata is {heads!r}, not a whole "
                                  "number >= 1; the file is damaged, download it again")
        return int(heads)

    def meta_tensors(self, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """{new name: meta tensor of the right dtype and shape}, for configs and checks without I/O."""
        names = names if names is not None else {k: k for k in self.entries}
        return {new: torch.empty(self.entries[old].shape, dtype=self.entries[old].dtype, device="meta")
                for old, new in names.items()}

    def read(self, names, device: torch.device | str = "cpu",
             dtype: torch.dtype | dict[str, torch.dtype] | None = None,
             transient: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order, each on `device` before the next is read.

        dtype: floating tensors are cast to it (one dtype, or {name: dtype}; names not in the
        dict keep their stored dtype). fp8 tensors are never cast: their value needs a scale.
        A tensor that is cast or moved anyway is read into one reused scratch buffer, so the
        process never holds more than one stored-dtype tensor besides what it returns (and a
        fresh allocation per read would fragment the heap: +50% peak RSS, measured).
        transient: every tensor may be a view of that buffer, valid until the next one is read,
        for callers that convert each tensor themselves (quantising to fp8).
        """
        ordered = sorted(names, key=lambda n: (str(self.entries[n].file), self.entries[n].start))
        targets = {n: self._target_dtype(n, dtype) for n in ordered}
        moved = torch.device(device).type != "cpu"
        converted = (set(ordered) if transient or moved
                     else {n for n in ordered if targets[n] != self.entries[n].dtype})
        scratch = torch.empty(max((self.entries[n].nbytes for n in converted), default=0), dtype=torch.uint8)
        handles = {}
        try:
            for name in ordered:
                entry = self.entries[name]
                if entry.start < 0:
                    tensor = self._pickled[name]
                else:
                    buffer = scratch[:entry.nbytes] if name in converted else None
                    tensor = _read_bytes(_handle(handles, entry.file), entry, name, buffer)
                yield name, tensor.to(device, targets[name])
        finally:
            for handle in handles.values():
                handle.close()

    def _target_dtype(self, name: str, dtype: torch.dtype | dict[str, torch.dtype] | None) -> torch.dtype:
        stored = self.entries[name].dtype
        wanted = dtype.get(name) if isinstance(dtype, dict) else dtype
        if wanted is None or not stored.is_floating_point or stored in _FP8_DTYPES:
            return stored
        return wanted

    def read_rows(self, name: str, start: int, stop: int, handles: dict[Path, object],
                  label: str | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (dim 0) as stored, reading only their bytes.

        A row range of a C-contiguous tensor is one contiguous byte range of a safetensors
        file; a `.pth` file is memory-mapped, so slicing it touches only those rows. handles:
        {file: open binary file} kept by the caller across calls (opened here when missing, closed
        by the caller). label: the tensor's name in messages (default `name`).
        """
        entry = self.entries[name]
        if not entry.shape or not 0 <= start <= stop <= entry.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of {name} with shape {list(entry.shape)}")
        if entry.start < 0:
            return self._pickled[name][start:stop]
        return _read_bytes(_handle(handles, entry.file), entry, label or name, None, (start, stop))


def _handle(handles: dict[Path, object], file: Path):
    """The open binary handle of `file` in `handles`, opened on first use (the caller closes them)."""
    if file not in handles:
        handles[file] = open(file, "rb")
    return handles[file]


def _read_bytes(handle, entry: TensorEntry, name: str, buffer: torch.Tensor | None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor's bytes, or rows [start, stop) of dim 0 only, read into `buffer` (uint8, reused
    by the caller) or a fresh one."""
    shape, offset, nbytes = entry.shape, 0, entry.nbytes
    if rows is not None:
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        shape, offset = (rows[1] - rows[0], *entry.shape[1:]), rows[0] * row_bytes
        nbytes = shape[0] * row_bytes
    buffer = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
    handle.seek(entry.start + offset)
    if nbytes and handle.readinto(memoryview(buffer.numpy())) != nbytes:
        raise CheckpointError(f"{entry.file} ended inside tensor {name!r}; the file is truncated, download it again")
    return buffer.view(entry.dtype).reshape(shape)


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors files that make up `path` (a file, a folder, or a sharded folder)."""
    if path.is_file():
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        weight_map = _read_json(index[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise CheckpointError(f"{index[0]} has no weight_map of tensor names to shard files; "
                                  "download the complete folder again")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index[0]} lists shards that are not in the folder: {', '.join(missing)}; "
                                  "download the complete folder again")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        whole_set = any((path / n).exists() for n in (HIGH_NOISE_DIR, "model_index.json", COMFY_DIRS["experts"]))
        hint = ("it is a whole model set: pass it as --model-dir (ModelFiles.from_model_dir)" if whole_set else
                "point at one file, or at a folder with one file or with an index")
        raise CheckpointError(f"{path} holds {len(files)} .safetensors files and no index json; {hint}")
    return files


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        fix = ("make it readable by the user running this process" if isinstance(err, PermissionError)
               else "check the path and the disk")
        raise CheckpointError(f"cannot open {path}: {err.strerror or err}; {fix}") from err


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"cannot read {path}: {err}; the file is damaged, download it again") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object; download it again")
    return value


def _load_pickle_safely(path: Path) -> dict[str, torch.Tensor]:
    _check_readable(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # torch's refusal to import what the pickle names
            raise CheckpointError(f"{path} needs code to be unpickled and was refused (only plain tensors are "
                                  "loaded from .pth files); convert it to .safetensors") from err
        raise CheckpointError(f"cannot read {path}: its pickle is corrupt; download it again") from err
    except Exception as err:  # a damaged archive fails in many ways (zip, pickle, storage checks)
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}; the file is truncated or "
                              "corrupt, download it again") from err
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a flat dict of tensors")
    return sd


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict as stored, in file order; floating tensors cast to `dtype` one by one when given.

    fp8 tensors are returned as stored: their value needs the layer's `.scale_weight`.
    """
    ckpt = Checkpoint(path)
    return dict(ckpt.read(ckpt.entries, device, dtype))


# ---------------------------------------------------------------------------------------------
# 2. What a checkpoint is: kind, layout and variant from names and shapes

DIT, VAE, TEXT_ENCODER = "Wan DiT expert", "Wan2.1 VAE", "UMT5-XXL text encoder"
SLOT_NEEDS = {
    DIT: "a Wan2.2 T2V-A14B expert (wan2.2_t2v_{high,low}_noise_14B_*.safetensors, an official "
         "high_noise_model/low_noise_model folder, or diffusers transformer/ transformer_2/)",
    VAE: "the Wan2.1 VAE (wan_2.1_vae.safetensors, Wan2.1_VAE.pth or a diffusers vae/ folder)",
    TEXT_ENCODER: "the UMT5-XXL encoder (umt5_xxl_fp16.safetensors, umt5_xxl_fp8_e4m3fn_scaled.safetensors, "
                  "models_t5_umt5-xxl-enc-bf16.pth or a diffusers text_encoder/ folder)",
}
# Modules only other Wan variants have (the markers ComfyUI's model_detection looks for).
_VARIANT_PREFIXES = {
    "vace_": "Wan VACE (video editing)", "control_adapter.": "Wan camera-control",
    "casual_audio_encoder.": "Wan2.2 S2V (speech-to-video)", "audio_proj.": "Wan HuMo",
    "face_adapter.": "Wan2.2 Animate",
}
_LORA_NAME = re.compile(r"lora_(A|B|up|down)\b|\.lora\.(up|down)\.|\.(alpha|diff|diff_b)$")


@dataclass(frozen=True)
class Identity:
    """What a file is. `names` maps stored names to our (official) names for its kind."""

    kind: str  # DIT, VAE, TEXT_ENCODER, "LoRA" or "unknown"
    layout: str  # "official", "comfy", "comfy-prefixed", "diffusers" or ""
    description: str  # for messages: "a Wan DiT expert (dim 5120, 40 layers, 14.3B parameters, float16)"
    names: dict[str, str]
    scaled_fp8: bool = False
    problem: str | None = None  # why this file of the right kind still cannot run here, and what to do
    dit: DiTConfig | None = None


def identify(ckpt: Checkpoint) -> Identity:
    """Recognise a checkpoint from its header (no tensor data is read)."""
    names = list(ckpt.entries)
    if any(_LORA_NAME.search(n) for n in names):
        pairs = sum(bool(re.search(r"lora_(A|down)\b|\.lora\.down\.", n)) for n in names)
        return Identity("LoRA", "", f"a LoRA ({pairs} low-rank layer pairs, not a full model)", {},
                        problem="load the base expert in this slot; a LoRA only patches one")
    official = _dit_names(names)
    if "head.modulation" in official.values() or "patch_embedding.weight" in official.values():
        return _identify_dit(ckpt, official)
    if "decoder.middle.0.residual.0.gamma" in names or "decoder.mid_block.resnets.0.norm1.gamma" in names:
        return _identify_vae(ckpt)
    if "token_embedding.weight" in names or any(n.startswith("encoder.block.") for n in names):
        return _identify_text_encoder(ckpt)
    return Identity("unknown", "", f"not a Wan checkpoint (first tensors: {', '.join(names[:4]) or 'none'})", {})


# Per-tensor fp8 scales, as `FP8Linear` and Comfy-Org's scaled-fp8 files name them. Newer ComfyUI
# saves the same scales as `.weight_scale` / `.input_scale`, with a `.comfy_quant` format tag per
# layer (comfyui.md 4.7); `_fp8_names` turns those into ours for every kind of file.
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
_SCALE_ALIASES = ((".weight_scale", ".scale_weight"), (".input_scale", ".scale_input"))
_FORMAT_TAG = ".comfy_quant"
_STORED_SCALE_SUFFIXES = (*SCALE_SUFFIXES, *(alias for alias, _ in _SCALE_ALIASES), _FORMAT_TAG)


def _fp8_names(renamed: dict[str, str]) -> dict[str, str]:
    """{stored: our name} with newer ComfyUI scale names made ours; the scaled-fp8 marker and
    format tags (no tensor of any model) dropped."""
    ours = {}
    for stored, name in renamed.items():
        if name == SCALED_FP8_MARKER or name.endswith(_FORMAT_TAG):
            continue
        for alias, legacy in _SCALE_ALIASES:
            if name.endswith(alias):
                name = name.removesuffix(alias) + legacy
        ours[stored] = name
    return ours


def _is_scaled_fp8(ckpt: Checkpoint, names: dict[str, str]) -> bool:
    return SCALED_FP8_MARKER in ckpt.entries or any(n.endswith(".scale_weight") for n in names.values())


def _dit_names(names: list[str]) -> dict[str, str]:
    """{stored name: official name} for DiT files in any layout; drops fp8 markers and format tags."""
    if sum(n.startswith(COMFY_DIT_PREFIX) for n in names) > len(names) // 2:
        # ComfyUI full-checkpoint layout; tensors under other prefixes belong to other models
        renamed = {n: n[len(COMFY_DIT_PREFIX):] for n in names if n.startswith(COMFY_DIT_PREFIX)}
    elif any(n.startswith("condition_embedder.") for n in names):
        renamed = {n: dit_diffusers_to_official(n) for n in names}
    else:
        renamed = {n: n for n in names}
    return _fp8_names(renamed)


def _dtype_summary(ckpt: Checkpoint, names) -> str:
    """Stored dtypes by share of elements, e.g. "float8_e4m3fn/float16" (tokenizer and fp8 scales left out)."""
    counts: dict[str, int] = {}
    for n in names:
        if n in (SPIECE_KEY, SCALED_FP8_MARKER) or n.endswith(_STORED_SCALE_SUFFIXES):
            continue
        entry = ckpt.entries[n]
        dtype = str(entry.dtype).removeprefix("torch.")
        counts[dtype] = counts.get(dtype, 0) + math.prod(entry.shape)
    return "/".join(sorted(counts, key=counts.get, reverse=True))


def _layout(ckpt: Checkpoint, official_names: bool) -> str:
    """"official" (folder or .pth), "comfy" (one safetensors file, official or transformers names), "diffusers"."""
    if not official_names:
        return "diffusers" if ckpt.path.is_dir() else "comfy"
    return "comfy" if ckpt.path.suffix == ".safetensors" else "official"


def _params(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"


def _identify_dit(ckpt: Checkpoint, names: dict[str, str]) -> Identity:
    layout = ("comfy-prefixed" if next(iter(names)).startswith(COMFY_DIT_PREFIX)
              else _layout(ckpt, not any(n.startswith("condition_embedder.") for n in names)))
    scaled = _is_scaled_fp8(ckpt, names)
    sd = ckpt.meta_tensors(names)
    cfg = dit_config_from_state_dict(sd, ckpt.num_heads)
    params = sum(t.numel() for n, t in sd.items() if not n.endswith(SCALE_SUFFIXES))
    what = (f"a {{}} (dim {cfg.dim}, {cfg.num_layers} layers, {_params(params)} parameters, "
            f"{_dtype_summary(ckpt, names)}{', scaled fp8' if scaled else ''})")
    variant = next((label for prefix, label in _VARIANT_PREFIXES.items() if any(n.startswith(prefix) for n in sd)),
                   None)
    problem = None
    if variant:
        problem = f"{variant} models have extra inputs; this engine runs text-to-video: use the T2V-A14B experts"
    elif "img_emb.proj.0.weight" in sd or cfg.in_dim == 36:
        variant = f"Wan image-to-video expert (in_dim {cfg.in_dim}: noise + image-condition channels)"
        problem = "image-to-video experts need an image input; use the Wan2.2 T2V-A14B experts"
    elif cfg.in_dim == 48 or cfg.out_dim == 48:
        variant = "Wan2.2 TI2V-5B model (48 latent channels of the Wan2.2 VAE)"
        problem = ("TI2V-5B is a single model on the Wan2.2 VAE's 48-channel latents; "
                   "use the two Wan2.2 T2V-A14B experts (16 channels, Wan2.1 VAE)")
    elif cfg.in_dim != 16 or cfg.out_dim != 16:
        variant = f"Wan variant with {cfg.in_dim} input / {cfg.out_dim} output channels"
        problem = "text-to-video needs 16 latent channels in and out; use the Wan2.2 T2V-A14B experts"
    elif any(n.endswith(SCALE_SUFFIXES) and sd[n].numel() != 1 for n in sd):
        problem = ("its fp8 scales are per block, not per tensor, which this loader does not read; "
                   "use the fp8_scaled, fp16 or bf16 file")
    else:
        problem = _dit_shape_problem(sd, cfg)
    return Identity(DIT, layout, what.format(variant or DIT), names, scaled, problem, cfg)


_BLOCK_PREFIX = re.compile(r"^blocks\.(\d+)\.")


@functools.lru_cache(maxsize=8)
def _dit_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a DiT of `cfg`, with one block standing for all (they are alike)."""
    with torch.device("meta"):
        model = WanModel(replace(cfg, num_layers=1))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _dit_shape_problem(sd: dict[str, torch.Tensor], cfg: DiTConfig) -> str | None:
    """Why the stored shapes cannot be the DiT that `cfg` (read from a few tensors) describes, if they cannot.

    From the header alone, before anything is read: a valid-looking header whose other tensors
    disagree (a damaged or spliced file) must not load, nor read rows of the wrong size.
    """
    blocks = {int(m.group(1)) for name in sd if (m := _BLOCK_PREFIX.match(name))}
    if len(blocks) != cfg.num_layers:  # num_layers is the highest index + 1 (which may be huge)
        first = next(i for i in range(cfg.num_layers) if i not in blocks)
        return (f"its blocks go up to blocks.{cfg.num_layers - 1} but {cfg.num_layers - len(blocks)} are missing "
                f"(e.g. blocks.{first}); the file is incomplete, download it again")
    expected = _dit_shapes(cfg)
    for name, tensor in sd.items():
        if name.endswith(SCALE_SUFFIXES):
            continue  # fp8 scales: one number per tensor, checked above
        wanted = expected.get(_BLOCK_PREFIX.sub("blocks.0.", name))
        if wanted is not None and tuple(tensor.shape) != wanted:
            return (f"tensor {name} has shape {list(tensor.shape)} where a DiT of dim {cfg.dim} and ffn_dim "
                    f"{cfg.ffn_dim} has {list(wanted)}; the file is damaged or mixes models, download it again")
    return None


def _identify_vae(ckpt: Checkpoint) -> Identity:
    stored = list(ckpt.entries)
    diffusers = "decoder.mid_block.resnets.0.norm1.gamma" in ckpt.entries
    names = vae_diffusers_to_official(stored) if diffusers else {n: n for n in stored}
    sd = ckpt.meta_tensors(names)
    z_dim = sd["conv2.weight"].shape[0] if "conv2.weight" in sd and sd["conv2.weight"].ndim else None
    what = f"a {{}} (z_dim {z_dim}, {_dtype_summary(ckpt, stored)})"
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd or z_dim != VAEConfig().z_dim:
        return Identity(VAE, _layout(ckpt, not diffusers), what.format("Wan2.2 VAE"), names,
                        problem="the A14B experts work on the Wan2.1 VAE's 16-channel latents; "
                                "choose wan_2.1_vae.safetensors")
    return Identity(VAE, _layout(ckpt, not diffusers), what.format(VAE), names)


def _identify_text_encoder(ckpt: Checkpoint) -> Identity:
    names = _fp8_names({n: n for n in ckpt.entries})
    official = "token_embedding.weight" in names
    scaled = _is_scaled_fp8(ckpt, names)
    embedding = ckpt.entries.get("token_embedding.weight" if official else "shared.weight")
    size = f"vocab {embedding.shape[0]}, dim {embedding.shape[1]}, " if embedding and len(embedding.shape) == 2 else ""
    layout = _layout(ckpt, official)
    what = f"a {{}} ({size}{_dtype_summary(ckpt, names)}" \
           f"{', scaled fp8' if scaled else ''}{', with tokenizer' if SPIECE_KEY in names else ''})"
    # UMT5 has a relative-position table in every block; T5 v1.1 (Flux's / SD3's t5xxl) only in block 0.
    bias = "blocks.1.pos_embedding.embedding.weight" if official else \
        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    has_second_block = any(n.startswith(("blocks.1.", "encoder.block.1.")) for n in names)
    if has_second_block and bias not in names:
        return Identity(TEXT_ENCODER, layout, what.format("T5 v1.1 encoder (one shared position table)"), names,
                        scaled, problem="that is the T5-XXL of Flux/SD3, not UMT5-XXL; "
                                        "choose umt5_xxl_fp16.safetensors")
    return Identity(TEXT_ENCODER, layout, what.format(TEXT_ENCODER), names, scaled)


def check_slot(path: str | Path, slot: str, label: str | None = None) -> tuple[Checkpoint, Identity]:
    """Open `path`, recognise it and fail unless it fits `slot` (DIT, VAE or TEXT_ENCODER).

    Only headers are read, so a wrong file fails in milliseconds, before any heavy work.
    """
    ckpt = Checkpoint(path)
    found = identify(ckpt)
    label = label or slot
    if found.kind == slot and found.problem is None:
        return ckpt, found
    if found.kind == slot or found.kind not in SLOT_NEEDS:
        fix = found.problem or "choose the right file for this slot"
    else:
        fix = f"that file belongs in the {found.kind} slot" + (f" ({found.problem})" if found.problem else "")
    raise CheckpointError(f"{Path(path).name} is {found.description}, but the {label} slot needs "
                          f"{SLOT_NEEDS[slot]}: {fix}")


# ---------------------------------------------------------------------------------------------
# 3. Load reports


@dataclass(frozen=True)
class LoadReport:
    """What a loader read; attached to the returned model as `.load_report` and logged."""

    path: str
    kind: str
    layout: str
    file_dtypes: str  # by share of elements, e.g. "float16" or "float8_e4m3fn/float16"
    dtype: str  # compute dtype
    fp8_layers: int  # Linears held as fp8 (dequantised per layer in forward)
    parameters: int
    bytes: int  # parameters + buffers, as held in memory
    unexpected: tuple[str, ...]  # stored names the model has no place for (not loaded)

    def __str__(self) -> str:
        fp8 = f", {self.fp8_layers} Linears in fp8" if self.fp8_layers else ""
        extra = f"; ignored {len(self.unexpected)} unexpected tensors: {', '.join(self.unexpected[:5])}" \
            if self.unexpected else ""
        return (f"loaded {self.kind} from {self.path} ({self.layout} layout, stored as {self.file_dtypes}): "
                f"{self.parameters / 1e6:.1f}M parameters in {self.dtype}{fp8}, "
                f"{self.bytes / 2**20:.1f} MiB{extra}")


def _report(model: torch.nn.Module, ckpt: Checkpoint, found: Identity, dtype: torch.dtype,
            unexpected: list[str]) -> LoadReport:
    tensors = [*model.parameters(), *model.buffers()]
    report = LoadReport(
        path=str(ckpt.path), kind=found.kind, layout=found.layout,
        file_dtypes=_dtype_summary(ckpt, found.names),
        dtype=str(dtype).removeprefix("torch."), fp8_layers=sum(isinstance(m, FP8Linear) for m in model.modules()),
        parameters=sum(p.numel() for p in model.parameters()),
        bytes=sum(t.numel() * t.element_size() for t in tensors), unexpected=tuple(sorted(unexpected)))
    (log.warning if unexpected else log.info)("%s", report)
    return report


def _check_missing(what: str, path: Path, expected, provided) -> None:
    missing = sorted(set(expected) - set(provided))
    if missing:
        raise CheckpointError(f"{path} is missing {len(missing)} tensors of a {what} "
                              f"(e.g. {', '.join(missing[:3])}); the file is incomplete or a different model size")


# ---------------------------------------------------------------------------------------------
# 4. DiT experts


def dit_config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Sizes from tensor shapes (official names; meta tensors are fine); the head count is not
    in any shape, so it comes from a config, metadata, or the Wan convention of 128-wide heads."""
    try:
        patch = sd["patch_embedding.weight"]
        dim = patch.shape[0]
        layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_PREFIX.match(k)))
        return DiTConfig(
            dim=dim, in_dim=patch.shape[1], patch_size=tuple(patch.shape[2:]),
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=layers,
            num_heads=num_heads or max(1, dim // WAN_HEAD_DIM),
            text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch.shape[2:]))
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as err:  # missing names, too few dims
        raise CheckpointError(f"not a complete Wan DiT expert state dict (missing or odd {err})") from err


def _fp8_modules(model: WanModel, found: Identity, ckpt: Checkpoint, dtype: torch.dtype,
                 weight_dtype: torch.dtype | None) -> list[str]:
    """Which block Linears to hold in fp8: as stored (None), all (fp8), or none (`dtype`)."""
    blocks = block_linear_names(model)
    if weight_dtype is None:
        stored = {official for stored_name, official in found.names.items()
                  if ckpt.entries[stored_name].dtype in _FP8_DTYPES}
        return [name for name in blocks if f"{name}.weight" in stored]
    if weight_dtype == FP8:
        return blocks
    if weight_dtype == dtype:
        return []
    raise ValueError(f"weight_dtype must be None (as stored), torch.float8_e4m3fn or the compute dtype "
                     f"{dtype}; got {weight_dtype}")


def _read_weight_scales(ckpt: Checkpoint, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{module: fp32 scalar} from every `.scale_weight` of `names` ({stored: our name}); a few
    hundred scalars, read before the weights they scale."""
    stored = [s for s, name in names.items() if name.endswith(".scale_weight")]
    return {names[s].rpartition(".")[0]: t.float().reshape(()) for s, t in ckpt.read(stored)}


def _convert_dit_tensor(name: str, tensor: torch.Tensor, fp8_modules: set[str], scales: dict[str, torch.Tensor],
                        dtype: torch.dtype, work: torch.Tensor) -> dict[str, torch.Tensor]:
    """One stored tensor (official name, already cast unless it becomes fp8) -> our state-dict entries."""
    module, _, leaf = name.rpartition(".")
    keep_fp8 = module in fp8_modules and leaf == "weight"
    if tensor.dtype in _FP8_DTYPES:  # stored value * scale is the real weight (scale 1 for unscaled fp8)
        scale = scales.get(module, torch.ones(())).to(tensor.device)
        if keep_fp8 and tensor.dtype == FP8:
            return {name: tensor, f"{module}.scale_weight": scale}
        # dequantise as FP8Linear would (fp8 not wanted here), or to fp32 to re-quantise e5m2
        tensor = dequantize_fp8(tensor, scale, torch.float32 if keep_fp8 else dtype)
    if keep_fp8:
        weight, scale = quantize_fp8(tensor, work)
        return {name: weight, f"{module}.scale_weight": scale}
    if leaf == "scale_input":
        return {name: tensor.float().reshape(())}
    return {name: tensor.to(dtype)}


def load_dit(path: str | Path, dtype: torch.dtype = torch.float32, *, weight_dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> WanModel:
    """One expert from any supported layout, with `.load_report` attached.

    dtype: the compute dtype (all non-fp8 tensors). weight_dtype: None keeps the file's choice
    (scaled-fp8 block Linears stay fp8, dequantised per layer in forward); torch.float8_e4m3fn
    quantises the block Linears at load (per-tensor scale); `dtype` dequantises an fp8 file.
    """
    ckpt, found = check_slot(path, DIT)
    with torch.device("meta"):
        model = WanModel(found.dit)
    fp8_modules = _fp8_modules(model, found, ckpt, dtype, weight_dtype)
    with_scale_input = {m for m in fp8_modules if f"{m}.scale_input" in found.names.values()}
    swap_to_fp8(model, fp8_modules, with_scale_input, bias_dtype=dtype)
    fp8_modules = set(fp8_modules)
    expected = set(model.state_dict())

    scales = _read_weight_scales(ckpt, found.names)
    stored_of = {official: stored for stored, official in found.names.items()}
    to_read = [stored_of[n] for n in expected if n in stored_of and not n.endswith(".scale_weight")]
    # Quantised from full precision, each fp8 weight is read into the reused buffer; everything
    # else is cast to `dtype` while read (fp32 scales excepted).
    to_quantize = {s for s in to_read if found.names[s].rpartition(".")[0] in fp8_modules
                   and found.names[s].endswith(".weight") and ckpt.entries[s].dtype != FP8}
    cast = {s: dtype for s in to_read if not found.names[s].endswith(".scale_input")}
    work = torch.empty(max((math.prod(ckpt.entries[s].shape) for s in to_quantize), default=0), device=device)
    state = {}
    for names, transient in (([s for s in to_read if s not in to_quantize], False), (to_quantize, True)):
        for stored, tensor in ckpt.read(names, device, None if transient else cast, transient):
            converted = _convert_dit_tensor(found.names[stored], tensor, fp8_modules, scales, dtype, work)
            for name, value in converted.items():
                if name in expected:
                    state[name] = value
    _check_missing(DIT, ckpt.path, expected, state)
    model.load_state_dict(state, strict=False, assign=True)
    # scales of layers we dequantised were used up, not unexpected
    unexpected = [stored for stored, official in found.names.items()
                  if official not in expected and not official.endswith(SCALE_SUFFIXES)]
    model.load_report = _report(model, ckpt, found, dtype, unexpected)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# 5. VAE


def vae_config_from_state_dict(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Walk encoder.downsamples: residual blocks per level, the resamples between levels."""
    try:
        base = sd["encoder.conv1.weight"].shape[0]
        levels, temporal, i = [[]], [], 0
        while True:
            prefix = f"encoder.downsamples.{i}."
            if prefix + "residual.2.weight" in sd:
                levels[-1].append(sd[prefix + "residual.2.weight"].shape[0])
            elif prefix + "resample.1.weight" in sd:
                temporal.append(prefix + "time_conv.weight" in sd)
                levels.append([])
            else:
                break
            i += 1
        return VAEConfig(base_dim=base, z_dim=sd["conv2.weight"].shape[0],
                         dim_mult=tuple(level[-1] // base for level in levels),
                         num_res_blocks=len(levels[0]), temporal_downsample=tuple(temporal))
    except (KeyError, IndexError, ValueError) as err:
        raise CheckpointError(f"not a complete Wan2.1 VAE state dict (missing or odd {err})") from err


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, *,
             device: torch.device | str = "cpu") -> WanVAE:
    """The Wan2.1 VAE from official, ComfyUI or diffusers files, with `.load_report` attached."""
    ckpt, found = check_slot(path, VAE)
    try:
        with torch.device("meta"):
            model = WanVAE(vae_config_from_state_dict(ckpt.meta_tensors(found.names)))
    except ValueError as err:
        raise CheckpointError(f"{ckpt.path}: its tensors do not make a Wan2.1 VAE ({err}); the file is damaged "
                              "or another model, download it again") from err
    expected = set(model.state_dict())
    state = {found.names[stored]: t for stored, t in
             ckpt.read([s for s, official in found.names.items() if official in expected], device, dtype)}
    _check_missing(VAE, ckpt.path, expected, state)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # "size mismatch for ...": a damaged or spliced file
        raise CheckpointError(f"{ckpt.path}: tensor shapes do not fit a Wan2.1 VAE of the sizes its other tensors "
                              f"give ({str(err).strip().splitlines()[-1].strip()}); download it again") from err
    unexpected = [stored for stored, official in found.names.items() if official not in expected]
    model.load_report = _report(model, ckpt, found, dtype, unexpected)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# 6. Text encoder


def _text_encoder_state(ckpt: Checkpoint, found: Identity, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors, floating ones cast to `dtype`; scaled-fp8 weights dequantised to `dtype` (the
    encoder runs once per prompt, so its fp8 file only saves disk and download, not compute)."""
    scales = _read_weight_scales(ckpt, found.names)
    state = {}
    for name, tensor in ckpt.read([stored for stored, name in found.names.items() if not name.endswith(SCALE_SUFFIXES)],
                                  dtype=dtype):
        if tensor.dtype in _FP8_DTYPES:
            tensor = dequantize_fp8(tensor, scales.get(name.rpartition(".")[0], torch.ones(())), dtype)
        state[name] = tensor
    return state


def _tokenizer_for(ckpt: Checkpoint, tokenizer_dir: str | Path | None) -> Path | None:
    """The tokenizer folder to use, or None when the file embeds `spiece_model`; fails early otherwise."""
    if tokenizer_dir is not None:
        folder = Path(tokenizer_dir)
        if not (folder / "spiece.model").is_file():
            raise CheckpointError(f"tokenizer folder {folder} has no spiece.model; point at the google/umt5-xxl "
                                  "folder or a diffusers tokenizer/ folder")
        return folder
    if SPIECE_KEY in ckpt.entries:
        return None
    sibling = ckpt.path.parent / DIFFUSERS_DIRS["tokenizer"]  # a diffusers text_encoder/ has one next to it
    if ckpt.path.is_dir() and (sibling / "spiece.model").is_file():
        return sibling
    raise CheckpointError(f"{ckpt.path.name} is a UMT5 text encoder without a tokenizer (no '{SPIECE_KEY}' tensor "
                          f"inside): pass --tokenizer / tokenizer_dir with a folder holding spiece.model "
                          f"(google/umt5-xxl), or use Comfy-Org's umt5_xxl_fp16.safetensors, which embeds it")


def load_text_encoder(path: str | Path, tokenizer_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """UMT5 encoder (official `.pth`, ComfyUI/transformers safetensors incl. scaled fp8, or a
    diffusers text_encoder/ folder) plus its tokenizer: `tokenizer_dir` when given, else the
    file's `spiece_model`, else a diffusers `tokenizer/` folder next to it. `dtype=None` keeps the
    stored dtype (bf16 for fp8 files). The result has `.load_report`."""
    from .models.text_encoder import TextEncoder
    from .models.tokenizer import Tokenizer

    ckpt, found = check_slot(path, TEXT_ENCODER)
    dtype = dtype or default_dtype({n: e.dtype for n, e in ckpt.entries.items()})
    tokenizer_folder = _tokenizer_for(ckpt, tokenizer_dir)
    tokenizer = Tokenizer.from_folder(tokenizer_folder) if tokenizer_folder is not None else None
    state = _text_encoder_state(ckpt, found, dtype)
    try:
        encoder = TextEncoder.from_state_dict(state, tokenizer, device=device, dtype=dtype)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.path}: {err}") from err
    encoder.load_report = _report(encoder.model, ckpt, found, encoder.dtype, [])
    return encoder


# ---------------------------------------------------------------------------------------------
# 7. A complete model set


@dataclass(frozen=True)
class ModelFiles:
    """Where each part of a model set lives."""

    high_noise: Path
    low_noise: Path
    text_encoder: Path
    vae: Path
    tokenizer: Path | None = None  # None: the text encoder file embeds it (`spiece_model`)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelFiles":
        """An official Wan2.2-T2V-A14B folder, a diffusers -Diffusers folder, or a ComfyUI models
        folder (diffusion_models/ with one file named *high* and one *low*, text_encoders/, vae/)."""
        root = Path(model_dir)
        if not root.is_dir():
            raise CheckpointError(f"--model-dir {root} is not a folder")
        if (root / "model_index.json").is_file():
            return cls._diffusers(root)
        if (root / COMFY_DIRS["experts"]).is_dir():
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
        return cls(high_noise=_only_usable(root, COMFY_DIRS["experts"], DIT, "high"),
                   low_noise=_only_usable(root, COMFY_DIRS["experts"], DIT, "low"),
                   text_encoder=_only_usable(root, COMFY_DIRS["text_encoder"], TEXT_ENCODER),
                   vae=_only_usable(root, COMFY_DIRS["vae"], VAE))

    def check(self) -> dict[str, Identity]:
        """Recognise every file from its header and fail on the first that does not fit its slot,
        a missing tokenizer, or experts of different sizes, before any weights are read."""
        found = dict(zip(("high_noise", "low_noise"), check_expert_pair(self.high_noise, self.low_noise)))
        found["vae"] = check_slot(self.vae, VAE)[1]
        text_ckpt, found["text_encoder"] = check_slot(self.text_encoder, TEXT_ENCODER)
        _tokenizer_for(text_ckpt, self.tokenizer)
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


def _only_usable(root: Path, sub: str, slot: str, name_part: str = "") -> Path:
    """The one file in root/sub that fits `slot` (and has `name_part` in its name)."""
    def usable(path: Path) -> bool:
        try:
            found = identify(Checkpoint(path))
        except CheckpointError:
            return False
        return found.kind == slot and found.problem is None

    candidates = [p for p in sorted((root / sub).glob("*.safetensors")) if name_part in p.name.lower() and usable(p)]
    if len(candidates) != 1:
        what = f"{slot} named *{name_part}*" if name_part else slot
        listed = ", ".join(p.name for p in candidates) or "none"
        raise CheckpointError(f"{root} as a ComfyUI models folder needs exactly one {what} in {sub}/, found "
                              f"{listed}; pass the files with --high-noise --low-noise --text-encoder --vae instead")
    return candidates[0]
