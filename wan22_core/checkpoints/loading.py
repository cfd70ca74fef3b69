"""Loading our modules from checkpoints: the DiT experts (whole, or row ranges of them), the VAE
and the text encoder, each with a `LoadReport` of what was read."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..config import DiTConfig, VAEConfig
from ..fp8 import FP8, FP8Linear, block_linear_names, block_linears, dequantize_fp8, quantize_fp8, swap_to_fp8
from ..models.text_encoder import TextEncoder, default_dtype
from ..models.tokenizer import Tokenizer
from ..models.transformer import WanModel
from ..models.vae import WanVAE
from ..quant import GGUFLinear, GGUFWeight, QuantType, swap_to_gguf
from .gguf import GGUFFormatError, sentencepiece_model
from .identify import DIT, TEXT_ENCODER, VAE, SCALE_SUFFIXES, Identity, check_slot, dtype_summary, tokenizer_folder
from .reading import FP8_DTYPES, Checkpoint, CheckpointError, TensorEntry

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# 1. Load reports


@dataclass(frozen=True)
class LoadReport:
    """What a loader read; attached to the returned model as `.load_report` and logged."""

    path: str
    kind: str
    layout: str
    file_dtypes: str  # by share of elements, e.g. "float16" or "float8_e4m3fn/float16"
    dtype: str  # compute dtype
    fp8_layers: int  # Linears held as fp8 (dequantised per layer in forward)
    parameters: int  # weights, counted as numbers (a GGUF layer's, not its bytes)
    bytes: int  # parameters + buffers, as held in memory (a GGUF layer's quantised bytes)
    unexpected: tuple[str, ...]  # stored names the model has no place for (not loaded)
    gguf_layers: int = 0  # Linears held in GGUF blocks (dequantised per layer in forward)
    gguf_types: str = ""  # their types by share of weights, e.g. "Q4_K/Q6_K"

    def __str__(self) -> str:
        fp8 = f", {self.fp8_layers} Linears in fp8" if self.fp8_layers else ""
        gguf = f", {self.gguf_layers} Linears held as GGUF {self.gguf_types}" if self.gguf_layers else ""
        extra = f"; ignored {len(self.unexpected)} unexpected tensors: {', '.join(self.unexpected[:5])}" \
            if self.unexpected else ""
        return (f"loaded {self.kind} from {self.path} ({self.layout} layout, stored as {self.file_dtypes}): "
                f"{self.parameters / 1e6:.1f}M parameters in {self.dtype}{fp8}{gguf}, "
                f"{self.bytes / 2**20:.1f} MiB{extra}")


def _report(model: torch.nn.Module, ckpt: Checkpoint, found: Identity, dtype: torch.dtype,
            unexpected: list[str]) -> LoadReport:
    tensors = [*model.parameters(), *model.buffers()]
    gguf = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    weights = {}
    for layer in gguf:
        weights[layer.qtype.name] = weights.get(layer.qtype.name, 0) + layer.in_features * layer.out_features
    report = LoadReport(
        path=str(ckpt.path), kind=found.kind, layout=found.layout,
        file_dtypes=dtype_summary(ckpt, found.names),
        dtype=str(dtype).removeprefix("torch."), fp8_layers=sum(isinstance(m, FP8Linear) for m in model.modules()),
        parameters=sum(p.numel() for p in model.parameters()) + sum(weights.values())
        - sum(layer.weight.numel() for layer in gguf),  # a GGUF weight's numel counts bytes
        bytes=sum(t.numel() * t.element_size() for t in tensors), unexpected=tuple(sorted(unexpected)),
        gguf_layers=len(gguf), gguf_types="/".join(sorted(weights, key=weights.get, reverse=True)))
    (log.warning if unexpected else log.info)("%s", report)
    return report


def _check_missing(what: str, path: Path, expected, provided) -> None:
    missing = sorted(set(expected) - set(provided))
    if missing:
        raise CheckpointError(f"{path} is missing {len(missing)} tensors of a {what} "
                              f"(e.g. {', '.join(missing[:3])}); the file is incomplete or a different model size")



# ---------------------------------------------------------------------------------------------
# 2. DiT experts


def _fp8_modules(model: WanModel, found: Identity, ckpt: Checkpoint, dtype: torch.dtype,
                 weight_dtype: torch.dtype | None) -> list[str]:
    """Which block Linears to hold in fp8: as stored (None), all (fp8), or none (`dtype`)."""
    blocks = block_linear_names(model)
    if weight_dtype is None:
        stored = {official for stored_name, official in found.names.items()
                  if ckpt.entries[stored_name].dtype in FP8_DTYPES}
        return [name for name in blocks if f"{name}.weight" in stored]
    if weight_dtype == FP8:
        return blocks
    if weight_dtype == dtype:
        return []
    raise ValueError(f"weight_dtype must be None (as stored), torch.float8_e4m3fn or the compute dtype "
                     f"{dtype}; got {weight_dtype}")


def _gguf_modules(model: WanModel, found: Identity, ckpt: Checkpoint, dtype: torch.dtype,
                  weight_dtype: torch.dtype | None) -> dict[str, QuantType]:
    """{block Linear: its GGUF type} for the layers to hold in GGUF blocks: those stored quantised
    whose rows are whole blocks (every A14B block Linear; llama-quantize keeps the others in F16),
    unless `weight_dtype` is the compute dtype (dequantise all at load)."""
    if ckpt.gguf is None:
        return {}
    if weight_dtype == FP8:
        raise ValueError(f"{ckpt.path.name} is a GGUF expert: its block weights stay in their GGUF types "
                         f"({dtype_summary(ckpt, found.names)}); weight_dtype fp8 does not apply, choose auto")
    if weight_dtype == dtype:
        return {}
    stored_of = {official: stored for stored, official in found.names.items()}
    kept = {}
    for name, linear in block_linears(model).items():
        entry = ckpt.entries.get(stored_of.get(f"{name}.weight", ""))
        if entry is not None and entry.quantized and linear.in_features % entry.qtype.block_size == 0:
            kept[name] = entry.qtype
    return kept


def _read_weight_scales(ckpt: Checkpoint, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{module: fp32 scalar} from every `.scale_weight` of `names` ({stored: our name}); a few
    hundred scalars, read before the weights they scale."""
    stored = [s for s, name in names.items() if name.endswith(".scale_weight")]
    return {names[s].rpartition(".")[0]: t.float().reshape(()) for s, t in ckpt.read(stored)}


def _convert_dit_tensor(name: str, tensor: torch.Tensor | GGUFWeight, fp8_modules: set[str],
                        scales: dict[str, torch.Tensor], dtype: torch.dtype, work: torch.Tensor,
                        gguf_modules: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """One stored tensor (official name, already cast unless it becomes fp8 or is GGUF blocks) ->
    our state-dict entries. GGUF blocks stay blocks in `gguf_modules`' weights, else are
    dequantised to `dtype` (as GGUFLinear's forward would: fp32, rounded once)."""
    module, _, leaf = name.rpartition(".")
    if isinstance(tensor, GGUFWeight):
        if module in gguf_modules and leaf == "weight":
            return {name: tensor.by_rows()}
        return {name: tensor.dequantize(dtype)}
    keep_fp8 = module in fp8_modules and leaf == "weight"
    if tensor.dtype in FP8_DTYPES:  # stored value * scale is the real weight (scale 1 for unscaled fp8)
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

    dtype: the compute dtype (all non-fp8, non-GGUF tensors). weight_dtype: None keeps the file's
    choice (scaled-fp8 block Linears stay fp8, GGUF block Linears stay in their GGUF types, each
    dequantised per layer in forward); torch.float8_e4m3fn quantises the block Linears at load
    (per-tensor scale; not for GGUF files); `dtype` dequantises an fp8 or GGUF file at load.
    """
    ckpt, found = check_slot(path, DIT)
    with torch.device("meta"):
        model = WanModel(found.dit)
    gguf_modules = _gguf_modules(model, found, ckpt, dtype, weight_dtype)
    swap_to_gguf(model, gguf_modules, bias_dtype=dtype)
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
            converted = _convert_dit_tensor(found.names[stored], tensor, fp8_modules, scales, dtype, work,
                                            gguf_modules)
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


class DitRowReader:
    """Row ranges of one expert checkpoint's parameters, by our (official) parameter name.

    For processes that hold only some rows of each parameter (an FSDP shard: `parallel/loading.py`):
    `rows` reads just those rows' bytes (`Checkpoint.read_rows`) and converts them with the
    function `load_dit` converts whole tensors with, so they equal the same rows of
    `load_dit(path, dtype, weight_dtype=dtype)` bit for bit (fp8 rows times their scale). Any
    layout `check_slot` recognises works. A reader that keeps rows in their stored form (fp8
    with its scale, or another quantised format) fits behind the same members: `cfg`,
    `check_names`, `entry` (how a parameter is stored) and `rows`.
    """

    def __init__(self, path: str | Path):
        self.ckpt, found = check_slot(path, DIT)
        self.cfg: DiTConfig = found.dit
        self._stored = {official: stored for stored, official in found.names.items()}
        self._scales = _read_weight_scales(self.ckpt, found.names)  # as load_dit reads them
        self._handles: dict[Path, object] = {}
        self._no_work = torch.empty(0)  # _convert_dit_tensor's quantising buffer: nothing is kept in fp8 here

    def __enter__(self) -> "DitRowReader":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles.values():
            handle.close()

    def check_names(self, names: Iterable[str]) -> None:
        """CheckpointError unless the file holds every parameter in `names` (a model's, in our names)."""
        _check_missing(DIT, self.ckpt.path, names, self._stored)

    def entry(self, name: str) -> TensorEntry:
        """How parameter `name` is stored (dtype, shape, where its bytes are)."""
        return self.ckpt.entries[self._stored[name]]

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of parameter `name` in `dtype` (fp8 rows times their scale, GGUF rows
        dequantised)."""
        entry = self.entry(name)
        if entry.quantized and math.prod(entry.shape[1:]) % entry.qtype.block_size:  # rows split blocks
            (_, whole), = self.ckpt.read([self._stored[name]])
            return whole.dequantize(dtype)[start:stop]
        tensor = self.ckpt.read_rows(self._stored[name], start, stop, self._handles, label=name)
        return _convert_dit_tensor(name, tensor, set(), self._scales, dtype, self._no_work)[name]


# ---------------------------------------------------------------------------------------------
# 3. VAE


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
# 4. Text encoder


def _text_encoder_state(ckpt: Checkpoint, found: Identity, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors in found.names' naming, floating ones cast to `dtype`; scaled-fp8 and GGUF
    weights dequantised to `dtype` (the encoder runs once per prompt, so a quantised file only
    saves disk and download, not compute)."""
    scales = _read_weight_scales(ckpt, found.names)
    state = {}
    for stored, tensor in ckpt.read([stored for stored, name in found.names.items()
                                     if not name.endswith(SCALE_SUFFIXES)], dtype=dtype):
        name = found.names[stored]
        if isinstance(tensor, GGUFWeight):
            tensor = tensor.dequantize(dtype)
        elif tensor.dtype in FP8_DTYPES:
            tensor = dequantize_fp8(tensor, scales.get(name.rpartition(".")[0], torch.ones(())), dtype)
        state[name] = tensor
    return state


def _embedded_tokenizer(ckpt: Checkpoint) -> Tokenizer | None:
    """The tokenizer a GGUF encoder's metadata holds (a safetensors file's `spiece_model` tensor is
    read with the weights instead: None)."""
    if ckpt.gguf is None:
        return None
    try:
        return Tokenizer.from_bytes(sentencepiece_model(ckpt.gguf, ckpt.path.name))
    except GGUFFormatError as err:
        raise CheckpointError(str(err)) from err


def load_text_encoder(path: str | Path, tokenizer_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """UMT5 encoder (official `.pth`, ComfyUI/transformers safetensors incl. scaled fp8, a
    diffusers text_encoder/ folder, or a llama.cpp GGUF) plus its tokenizer: `tokenizer_dir` when
    given, else the file's `spiece_model` (a GGUF's `tokenizer.ggml.*` vocabulary), else a
    diffusers `tokenizer/` folder next to it. `dtype=None` keeps the stored dtype (bf16 for fp8
    and quantised GGUF files). The result has `.load_report`."""
    ckpt, found = check_slot(path, TEXT_ENCODER)
    dtype = dtype or default_dtype({found.names[n]: ckpt.entries[n].dtype for n in found.names})
    folder = tokenizer_folder(ckpt, tokenizer_dir)
    tokenizer = Tokenizer.from_folder(folder) if folder is not None else _embedded_tokenizer(ckpt)
    state = _text_encoder_state(ckpt, found, dtype)
    try:
        encoder = TextEncoder.from_state_dict(state, tokenizer, device=device, dtype=dtype)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.path}: {err}") from err
    encoder.load_report = _report(encoder.model, ckpt, found, encoder.dtype, [])
    return encoder
