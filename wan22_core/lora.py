"""LoRA files for the Wan DiT experts: read, match to a model, merge into the weights or run on the fly.

Formats are recognised by tensor names, never by file names:
- ComfyUI / kohya: `<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, with the module in
  official names (`diffusion_model.blocks.0.self_attn.q`) or kohya-flattened
  (`lora_unet_blocks_0_self_attn_q`);
- PEFT / diffusers: `<module>.lora_A[.adapter].weight`, `.lora_B[.adapter].weight` (and a
  `lora_B.bias` bias delta), with official or diffusers module names (`transformer.blocks.0.attn1.to_q`);
- full deltas (lightx2v's distill LoRAs carry them): `.diff` (weight), `.diff_b` (bias),
  `blocks.N.diff_m` (the block's `modulation` parameter).
Prefixes `model.diffusion_model.`, `diffusion_model.`, `base_model.model.`, `transformer.` are
ignored. A low-rank layer changes its weight by strength * (alpha / rank) * up @ down (alpha
defaults to the rank); a full delta by strength * diff.

Merged (default, no cost per step): W' = round(W + delta), computed in fp32. Changing only a
strength must not re-read the base checkpoint, and at 14B a pristine copy of the weights (28.6 GB
per bf16 expert) is unaffordable. So the model keeps the parsed LoRA factors (about the size of
the LoRA file: ~0.6 GB for a rank-64 A14B LoRA) and what is merged into each parameter; a change
re-merges only the parameters whose terms changed: subtract the merged delta in fp32, round back
to the stored grid (that recovers the base weight exactly wherever the merge did not move a value
across a power of two), then add the new delta and round once. fp8 weights are merged on their
own grid: dequantise with the layer scale, add in fp32, re-quantise with the same scale, which
keeps the grid (so the base stays recoverable) and `scale_input` calibrations valid; the scale
grows only where the merged weight would otherwise clip by more than fp8 rounding.

Unmerged: the low-rank terms of the block Linears run as a side branch of the layer
(strength * scale * (x @ down^T) @ up^T), so a strength change is a number change. Everything
else a LoRA touches (full deltas, embeddings, head: called outside `forward` or not Linears) is
merged in both modes.

GGUF experts: a block Linear held in GGUF blocks cannot take a merge without re-quantising (a
second rounding, and a slow K-quant search), so its low-rank terms always run as the side branch,
in both modes (the layer's output is then exactly F.linear with the dequantised weight plus the
branch); a full delta (`.diff`) of such a weight is refused. Its bias, the norms, modulations and
everything outside the blocks are plain floats and merge as usual.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import Checkpoint, identify
from .checkpoints.keymaps import dit_official_to_diffusers
from .errors import Wan22Error
from .fp8 import FP8, FP8Linear, abs_max, block_linears, dequantize_fp8, fp8_scale, to_fp8
from .quant import GGUFLinear, QuantizedLinear

log = logging.getLogger(__name__)

MODES = ("merge", "unmerged")
LOW_RANK, DIFF = "low_rank", "diff"
# Values below 464 round to 448 in e4m3fn (the next step would be 480), so clipping there is
# within fp8 rounding; beyond it a merged weight needs a larger layer scale.
_FP8_CLIP_LIMIT = 464.0
_STATE_ATTR = "lora_state"


class LoraError(Wan22Error):
    """A LoRA file is missing, unreadable, or does not fit the expert it is applied to."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the strength to apply it with (hashable: usable in cache keys)."""

    path: Path
    strength: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if not isinstance(self.strength, (int, float)) or not math.isfinite(self.strength):
            raise ValueError(f"LoRA strength for {self.path.name} must be a finite number, got {self.strength!r}")
        object.__setattr__(self, "strength", float(self.strength))

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """`FILE[:STRENGTH]` as on the command line; a colon inside the path (C:\\...) is fine."""
        path, sep, strength = text.rpartition(":")
        try:
            value = float(strength) if sep else None
        except ValueError:  # no strength: the colon belongs to the path
            value = None
        return cls(Path(text)) if value is None else cls(Path(path), value)


# ---------------------------------------------------------------------------------------------
# 1. Reading: group a file's tensors by the module they patch

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
             "lora_unet_", "lora_transformer_")
_KINDS = [  # (suffix, kind, family for reports); PEFT may put an adapter name before `.weight`
    (re.compile(r"\.(?:lora_down|lora\.down)\.weight$"), "down", "lora_down/lora_up"),
    (re.compile(r"\.(?:lora_up|lora\.up)\.weight$"), "up", "lora_down/lora_up"),
    (re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$"), "down", "lora_A/lora_B"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.weight$"), "up", "lora_A/lora_B"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.bias$"), "diff_b", "lora_B.bias"),  # diffusers' lora_bias: a bias delta
    (re.compile(r"\.alpha$"), "alpha", "alpha"),
    (re.compile(r"\.diff$"), "diff", ".diff"),
    (re.compile(r"\.diff_b$"), "diff_b", ".diff_b"),
    (re.compile(r"\.diff_m$"), "diff_m", ".diff_m"),  # lightx2v: delta of `blocks.N.modulation`
]


def file_key(path: Path) -> tuple:
    """A file's identity: resolved path, size and mtime, so a replaced file is read again."""
    stat = os.stat(path)
    return (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA file, independent of any model."""

    path: Path
    key: tuple
    layout: str  # for messages: "lora_down/lora_up, alpha, .diff_b under 'diffusion_model.'"
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]]  # module as written -> {kind: (stored key, tensor)}
    unrecognised: tuple[str, ...]  # keys that are no LoRA tensor kind we know


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """stored key -> (module path without prefixes, kind, family, prefix), None when no kind matches."""
    for pattern, kind, family in _KINDS:
        match = pattern.search(key)
        if match:
            module, prefix = key[:match.start()], ""
            stripped = True
            while stripped:  # prefixes may stack (`base_model.model.transformer.`)
                stripped = False
                for p in _PREFIXES:
                    if module.startswith(p):  # lstrip: Wan-Fun files write `lora_unet__blocks_0_...`
                        module, prefix, stripped = module[len(p):].lstrip("_"), prefix + p, True
            return module, kind, family, prefix
    return None


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file (safetensors or a plain-tensor .pt/.pth) into memory, grouped by module."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    ckpt = Checkpoint(path)  # headers only: a wrong file fails before any tensor is read
    parts: dict[str, dict[str, str]] = {}
    unrecognised, families, prefixes = [], set(), set()
    for key in ckpt.entries:
        split = _split_key(key)
        if split is None:
            unrecognised.append(key)
            continue
        module, kind, family, prefix = split
        parts.setdefault(module, {})[kind] = key
        families.add(family)
        prefixes.add(prefix)
    _refuse_unsupported(path, ckpt, parts, unrecognised)
    tensors = dict(ckpt.read([key for kinds in parts.values() for key in kinds.values()]))
    modules = {module: {kind: (key, tensors[key]) for kind, key in kinds.items()} for module, kinds in parts.items()}
    layout = ", ".join(f for f in dict.fromkeys(family for *_, family in _KINDS) if f in families)
    if any("." not in module and "_" in module for module in parts):
        layout += ", kohya-flattened names"
    layout += "".join(f" under '{p}'" for p in sorted(prefixes) if p)
    return LoraFile(path, file_key(path), layout, modules, tuple(unrecognised))


def _refuse_unsupported(path: Path, ckpt: Checkpoint, parts: dict, unrecognised: list[str]) -> None:
    """Fail with what the file is when it is not a LoRA we can apply."""
    if any(k.endswith(".dora_scale") for k in unrecognised):
        raise LoraError(f"{path.name} is a DoRA (it has .dora_scale tensors); applying only its low-rank part "
                        "would give a different model: use a plain LoRA")
    if any(kind in ("down", "up", "diff", "diff_b", "diff_m") for kinds in parts.values() for kind in kinds):
        return
    if any(re.search(r"\.(hada|lokr)_", k) for k in unrecognised):
        raise LoraError(f"{path.name} is a LyCORIS LoHa/LoKr file; only LoRA (lora_up/lora_down, lora_A/lora_B) "
                        "and .diff files are supported: use a plain LoRA")
    found = identify(ckpt)
    what = "a full model" if found.kind not in ("LoRA", "unknown") else "not a LoRA"
    raise LoraError(f"{path.name} is {what}: {found.description}; the LoRA slot needs a LoRA file "
                    "(tensors named *.lora_down/lora_up or *.lora_A/lora_B)")


# ---------------------------------------------------------------------------------------------
# 2. Matching a LoRA to a model's parameters


@dataclass(frozen=True, eq=False)
class BoundLora:
    """A LoRA matched to one model's parameters (official names), shapes checked."""

    file: LoraFile
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # param -> (up [out, r], down [r, in], alpha/rank)
    diffs: dict[str, torch.Tensor]  # param -> full delta of the parameter's shape
    unmatched: tuple[str, ...]  # stored keys with no place in the model
    hint: str | None  # what the unmatched keys suggest ("made for an image-to-video model")


def _name_index(shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """{every spelling of a module or bare parameter a LoRA may use: its official path}.

    Built from the model's own names (official, diffusers, each also kohya-flattened with `_`),
    so flattened names need no guessing about which underscores were dots.
    """
    index: dict[str, str] = {}
    for name in shapes:
        module, _, leaf = name.rpartition(".")
        diffusers = dit_official_to_diffusers(name)
        spellings = {name: name, diffusers: name}  # bare parameters (`blocks.0.modulation.diff`)
        if module:
            spellings[module] = module
            if diffusers.endswith("." + leaf):
                spellings[diffusers.rpartition(".")[0]] = module
        for spelled, official in spellings.items():
            index.setdefault(spelled, official)
            index.setdefault(spelled.replace(".", "_"), official)
    return index


def _target(module: str, kind: str, shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The parameter a (module, kind) patches, or None when the model has no such parameter."""
    if kind in ("down", "up", "alpha", "diff"):
        candidates = [f"{module}.weight"] + ([module] if kind == "diff" else [])
    else:
        candidates = [f"{module}.bias" if kind == "diff_b" else f"{module}.modulation"]
    return next((c for c in candidates if c in shapes), None)


def bind_lora(lora: LoraFile, shapes: Mapping[str, Sequence[int]]) -> BoundLora:
    """Match `lora` to parameters {official name: shape}; raises LoraError on a wrong-size LoRA
    or one that matches nothing, reports keys without a place."""
    index = _name_index(shapes)
    low_rank, diffs, unmatched = {}, {}, list(lora.unrecognised)
    for module, kinds in lora.modules.items():
        official = index.get(module)
        if official is None:
            unmatched.extend(key for key, _ in kinds.values())
            continue
        if "up" in kinds and "down" in kinds and (param := _target(official, "up", shapes)):
            if param in low_rank:
                raise LoraError(f"{lora.path.name} patches {param} twice (under two spellings of its name); "
                                "the file is broken")
            low_rank[param] = _low_rank_term(lora, param, shapes[param], kinds)
        else:
            unmatched.extend(kinds[k][0] for k in ("up", "down", "alpha") if k in kinds)
        for kind in ("diff", "diff_b", "diff_m"):
            if kind not in kinds:
                continue
            key, tensor = kinds[kind]
            param = _target(official, kind, shapes)
            if param is None:
                unmatched.append(key)
                continue
            if tuple(tensor.shape) != tuple(shapes[param]):
                raise LoraError(_shape_message(lora, param, shapes[param], f"a {list(tensor.shape)} delta ({key})"))
            diffs[param] = tensor
    hint = _hint(unmatched)
    if not low_rank and not diffs:
        examples = ", ".join(unmatched[:3])
        raise LoraError(f"{lora.path.name} matches nothing in this Wan2.2 T2V expert: none of its "
                        f"{len(unmatched)} tensors has a target (e.g. {examples}); "
                        f"{hint or 'it is not a LoRA for the Wan DiT'}")
    return BoundLora(lora, low_rank, diffs, tuple(unmatched), hint)


def _low_rank_term(lora: LoraFile, param: str, shape: Sequence[int], kinds) -> tuple[torch.Tensor, torch.Tensor, float]:
    (up_key, up), (down_key, down) = kinds["up"], kinds["down"]
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoraError(f"{lora.path.name}: {up_key} has rank {up.shape[1]} but {down_key} has rank {rank}; "
                        "the file is broken")
    if up.shape[0] != shape[0] or math.prod(down.shape[1:]) != math.prod(shape[1:]):
        raise LoraError(_shape_message(lora, param, shape, f"a {up.shape[0]} x {math.prod(down.shape[1:])} "
                                                            f"update (rank {rank})"))
    alpha = float(kinds["alpha"][1].item()) if "alpha" in kinds else float(rank)
    return up, down, alpha / rank


# Wan DiT widths, to name the model a wrong-size LoRA was made for.
_MODEL_BY_DIM = {1536: "Wan2.1 T2V-1.3B", 3072: "Wan2.2 TI2V-5B", 5120: "a Wan 14B model"}


def _shape_message(lora: LoraFile, param: str, shape: Sequence[int], got: str) -> str:
    sizes = {d for kinds in lora.modules.values() for _, t in kinds.values() for d in t.shape}
    guess = next((f" It looks like a LoRA for {name} (dim {dim})." for dim, name in _MODEL_BY_DIM.items()
                  if dim in sizes and dim not in shape), "")
    return (f"{lora.path.name} does not fit this expert: {param} is {list(shape)} here, the LoRA has {got}."
            f"{guess} Choose a LoRA made for Wan2.2 T2V-A14B (or Wan2.1 T2V-14B).")


def _hint(unmatched: Sequence[str]) -> str | None:
    if any(re.search(r"k_img|v_img|img_emb|add_[kv]_proj|image_embedder", k) for k in unmatched):
        return ("it was made for a Wan image-to-video model (it patches the image cross-attention "
                "k_img/v_img or img_emb, which text-to-video experts do not have)")
    if unmatched and all(re.match(r"(lora_te|text_encoder|te\d?\.)", k) for k in unmatched):
        return "its tensors belong to a text encoder; this engine applies LoRAs to the DiT experts only"
    family = next((m.group(0) for k in unmatched if (m := re.search(
        r"double_blocks|single_blocks|input_blocks|down_blocks|joint_blocks|transformer_blocks", k))), None)
    if family:
        return f"names like '{family}' belong to another model family (Flux, SD, ...), not to Wan"
    return None


@dataclass(frozen=True)
class LoraReport:
    """What applying one LoRA did; returned by `apply_loras` and logged."""

    path: str
    strength: float
    layout: str
    parameters: int  # parameters changed
    unmatched: tuple[str, ...]
    hint: str | None

    def __str__(self) -> str:
        text = (f"LoRA {Path(self.path).name} at strength {self.strength:g} ({self.layout}): "
                f"{self.parameters} parameters patched")
        if self.unmatched:
            text += (f"; {len(self.unmatched)} tensors unmatched and ignored (e.g. {', '.join(self.unmatched[:5])})"
                     + (f": {self.hint}" if self.hint else ""))
        return text


def _report(bound: BoundLora, strength: float) -> LoraReport:
    report = LoraReport(str(bound.file.path), strength, bound.file.layout,
                        len(set(bound.low_rank) | set(bound.diffs)), bound.unmatched, bound.hint)
    (log.warning if report.unmatched else log.info)("%s", report)
    return report


# ---------------------------------------------------------------------------------------------
# 3. Deltas: what a list of (LoRA, strength) adds to each parameter, computed on demand

Term = tuple[tuple, str, float]  # (file key, LOW_RANK or DIFF, strength)


class LoraDeltas:
    """The fp32 change that bound LoRAs at given strengths make to each parameter.

    Nothing is precomputed: `add_to` builds one parameter's (or a row range's) delta when asked,
    so memory stays at one layer's fp32 delta. Terms are added one at a time in list order.
    """

    def __init__(self, bound: Mapping[tuple, BoundLora], terms: Mapping[str, tuple[Term, ...]]):
        self.bound = dict(bound)
        self.terms = dict(terms)

    @property
    def names(self) -> set[str]:
        return set(self.terms)

    def add_to(self, values: torch.Tensor, name: str, start: int = 0, sign: float = 1.0) -> torch.Tensor:
        """values (fp32, rows [start, start + len) of parameter `name`) += sign * delta, in place."""
        stop = start + values.shape[0]
        for key, kind, strength in self.terms.get(name, ()):
            if kind == LOW_RANK:
                up, down, scale = self.bound[key].low_rank[name]
                delta = up.flatten(1)[start:stop].to(values.device, torch.float32) @ \
                    down.flatten(1).to(values.device, torch.float32)
                delta = delta.mul_(strength * scale).view(values.shape)
            else:
                delta = self.bound[key].diffs[name][start:stop].to(values.device, torch.float32) * strength
            values.add_(delta, alpha=sign)
        return values


def parameter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """{name: shape} of the weights a LoRA is matched against: a quantised layer's weight is
    [out_features, in_features] numbers, not its parameter's [out_features, bytes per row]."""
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            shapes[f"{name}.weight"] = torch.Size((module.out_features, module.in_features))
    return shapes


def _terms(bound: Sequence[tuple[BoundLora, float]]) -> dict[str, tuple[Term, ...]]:
    """{parameter: its terms in list order}; zero strengths contribute nothing and are left out."""
    terms: dict[str, list[Term]] = {}
    for lora, strength in bound:
        if strength == 0.0:
            continue
        for name in lora.low_rank:
            terms.setdefault(name, []).append((lora.file.key, LOW_RANK, strength))
        for name in lora.diffs:
            terms.setdefault(name, []).append((lora.file.key, DIFF, strength))
    return {name: tuple(t) for name, t in terms.items()}


def lora_deltas(specs: Sequence[LoraSpec], shapes: Mapping[str, Sequence[int]],
                reuse: LoraDeltas | None = None) -> tuple[LoraDeltas, tuple[LoraReport, ...]]:
    """Read and bind `specs` for a model with these parameter shapes (official names; a meta model
    is fine). For loaders that merge while reading, e.g. each FSDP rank adding the delta rows of
    its shard: `deltas.add_to(rows_fp32, name, start)`. Files already bound in `reuse` (the
    deltas merged now, same file key) are not read again, so a strength change reads nothing."""
    known = reuse.bound if reuse is not None else {}
    bound = []
    for spec in specs:
        lora = known.get(file_key(spec.path)) if spec.path.is_file() else None
        bound.append((lora if lora is not None else bind_lora(read_lora(spec.path), shapes), spec.strength))
    return (LoraDeltas({b.file.key: b for b, _ in bound}, _terms(bound)),
            tuple(_report(b, s) for b, s in bound))


# ---------------------------------------------------------------------------------------------
# 4. Merging into stored weights (16/32-bit or scaled fp8)


def _dequantize(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A fresh fp32 copy of the weight's value."""
    if stored.dtype == FP8:
        return dequantize_fp8(stored, scale, torch.float32)
    return stored.to(torch.float32, copy=True)


def _round(values: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 values -> the stored grid (fp8 with `scale`, or `dtype`); may reuse `values`."""
    if dtype == FP8:
        return to_fp8(values, scale, inplace=True)
    return values.to(dtype)


def remerge(stored: torch.Tensor, name: str, old: LoraDeltas | None, new: LoraDeltas | None,
            scale: torch.Tensor | None = None, start: int = 0,
            whole_amax: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, fp8 scale) after replacing the merged delta `old` by `new` (None: nothing).

    stored: the parameter as held, fp8 with its `scale` or any float dtype, or a row range of it
    from `start` (an FSDP shard). The fp8 scale is per tensor: for a row range, `whole_amax`
    maps its amax to the whole tensor's (see `fp8.quantize_fp8`; called once when `new` has
    terms for `name`, on every rank). fp32 math, one rounding per step: with `old`, the delta is subtracted
    and the result rounded to the stored grid first, which recovers the base weight exactly
    except where the merge crossed a power of two (there within one unit of the last place).
    """
    if stored.dtype != FP8 and (not stored.dtype.is_floating_point or stored.dtype.itemsize == 1):
        raise LoraError(f"{name} is stored as {stored.dtype}; LoRAs merge into float or float8_e4m3fn weights")
    values = _dequantize(stored, scale)
    if old is not None and name in old.terms:
        stored = _round(old.add_to(values, name, start, sign=-1.0), stored.dtype, scale)
        if new is None or name not in new.terms:
            return stored, scale
        values = _dequantize(stored, scale)
    if new is None or name not in new.terms:
        return stored, scale
    new.add_to(values, name, start)
    if stored.dtype == FP8:
        amax = abs_max(values) if whole_amax is None else whole_amax(abs_max(values))
        if amax > _FP8_CLIP_LIMIT * scale:  # clipping would exceed fp8 rounding: widen this layer's range
            scale = fp8_scale(amax).to(scale.dtype).reshape(scale.shape)
    return _round(values, stored.dtype, scale), scale


# ---------------------------------------------------------------------------------------------
# 5. Unmerged: a low-rank side branch on the block Linears


class LowRankBranch(nn.Module):
    """sum_i c_i * (x @ down_i^T) @ up_i^T for one Linear, added to its output by a forward hook.

    Factors are non-persistent buffers in the layer's compute dtype: they follow the layer across
    devices (expert offload) and stay out of state dicts. `coeffs` (strength * alpha/rank) may be
    changed in place: that is the whole cost of a strength change in this mode.
    """

    def __init__(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coeffs: Sequence[float],
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        for i, (up, down) in enumerate(factors):
            self.register_buffer(f"up_{i}", up.to(device, dtype), persistent=False)
            self.register_buffer(f"down_{i}", down.to(device, dtype), persistent=False)
        self.coeffs = list(coeffs)
        self.handle = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for i, c in enumerate(self.coeffs):
            up, down = getattr(self, f"up_{i}"), getattr(self, f"down_{i}")
            out = out + F.linear(F.linear(x, down.to(x.dtype)) * c, up.to(x.dtype))  # [..., rank] -> [..., out]
        return out


def _add_branch(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora_branch(args[0])


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    if isinstance(layer, QuantizedLinear):
        return layer.bias.dtype if layer.bias is not None else torch.bfloat16
    return layer.weight.dtype


def set_branches(layers: Mapping[str, nn.Module], old: Mapping[str, tuple], new: Mapping[str, tuple],
                 bound: Mapping[tuple, BoundLora]) -> None:
    """Make each layer's branch hold `new[name]` = ((file key, coeff), ...); reuse it when only coeffs changed."""
    for name in set(old) | set(new):
        layer = layers[name]
        keys = [k for k, _ in new.get(name, ())]
        if name in old and [k for k, _ in old[name]] == keys:
            layer.lora_branch.coeffs = [c for _, c in new[name]]
            continue
        if name in old:
            layer.lora_branch.handle.remove()
            del layer.lora_branch
        if name in new:
            factors = [bound[k].low_rank[name][:2] for k in keys]
            layer.lora_branch = LowRankBranch(factors, [c for _, c in new[name]], _compute_dtype(layer),
                                              layer.weight.device)
            layer.lora_branch.handle = layer.register_forward_hook(_add_branch)


# ---------------------------------------------------------------------------------------------
# 6. Applying to a model


@dataclass(frozen=True)
class _LoraState:
    """What is applied to a model now (kept on the model as `lora_state`)."""

    merged: LoraDeltas  # its `bound`: every LoRA in use (merged or on the fly), reused while the file is unchanged
    branches: dict[str, tuple]  # weight name -> ((file key, coeff), ...) running on the fly
    complete: bool = True


def apply_loras(model: nn.Module, specs: Sequence[LoraSpec], mode: str = "merge") -> tuple[LoraReport, ...]:
    """Make exactly `specs` applied to `model` (one expert), in place; `[]` removes all LoRAs.

    mode "merge" merges them into the weights (no cost per step); "unmerged" runs the block
    Linears' low-rank terms on the fly (strength changes cost nothing); GGUF block Linears run
    theirs on the fly in both modes (see the module notes). Files already applied are
    not read again, the base checkpoint never is; only parameters whose terms changed are touched.
    Every file is read and checked before any weight changes. Needs whole tensors (no FSDP shards:
    there, merge while loading with `lora_deltas`).
    """
    if mode not in MODES:
        raise ValueError(f"LoRA mode must be one of {', '.join(MODES)}; got {mode!r}")
    state = getattr(model, _STATE_ATTR, None) or _LoraState(LoraDeltas({}, {}), {})
    if not state.complete:
        raise LoraError("an earlier LoRA change to this expert failed part-way, so its weights are unknown; "
                        "reload the expert")
    for spec in specs:
        if not isinstance(spec, LoraSpec):
            raise TypeError(f"apply_loras takes LoraSpec items, got {type(spec).__name__}")
    parameters = dict(model.named_parameters())
    wanted, reports = lora_deltas(specs, parameter_shapes(model), reuse=state.merged)
    layers = {f"{name}.weight": layer for name, layer in block_linears(model).items()}
    merged, branches = split_on_the_fly(wanted, layers, unmerged=mode == "unmerged")

    setattr(model, _STATE_ATTR, _LoraState(state.merged, state.branches, complete=False))
    with torch.no_grad():
        for name in state.merged.names | merged.names:
            if state.merged.terms.get(name) != merged.terms.get(name):
                _remerge_parameter(model, parameters[name], name, state.merged, merged)
        set_branches(layers, state.branches, branches, merged.bound)
    setattr(model, _STATE_ATTR, _LoraState(merged, branches))
    return reports


def split_on_the_fly(wanted: LoraDeltas, layers: Mapping[str, nn.Module],
                     unmerged: bool = False) -> tuple[LoraDeltas, dict[str, tuple]]:
    """(the terms to merge, {weight name: ((file key, coeff), ...)} to run on the fly as branches).

    `layers` are the block Linears by weight name; GGUF ones always run their low-rank terms on the
    fly (a merge would re-quantise them), all of them with `unmerged`. LoraError when a full delta
    targets a GGUF layer, before anything changes.
    """
    quantised = {name for name, layer in layers.items() if isinstance(layer, GGUFLinear)}
    on_the_fly = set(layers) if unmerged else quantised
    merged_terms, branches = {}, {}
    for name, terms in wanted.terms.items():
        kept = tuple(t for t in terms if t[1] != LOW_RANK or name not in on_the_fly)
        branch = tuple((key, strength * wanted.bound[key].low_rank[name][2])
                       for key, kind, strength in terms if kind == LOW_RANK and name in on_the_fly)
        if kept:
            merged_terms[name] = kept
        if branch:
            branches[name] = branch
    merged = LoraDeltas(wanted.bound, merged_terms)
    _refuse_quantised_diffs(merged, quantised, layers)
    return merged, branches


def _refuse_quantised_diffs(merged: LoraDeltas, quantised: set[str], layers: Mapping[str, nn.Module]) -> None:
    """LoraError (before any weight changes) when a full delta targets a weight held in GGUF blocks."""
    for name in sorted(quantised & merged.names):
        key = next(key for key, kind, _ in merged.terms[name] if kind == DIFF)
        raise LoraError(f"{merged.bound[key].file.path.name} has a full delta (.diff) for {name}, which this expert "
                        f"holds as GGUF {layers[name].qtype.name} blocks; adding it would re-quantise the layer: use "
                        "a low-rank LoRA, or load the expert dequantised (weight_dtype bf16/fp16) or from safetensors")


def _remerge_parameter(model: nn.Module, param: nn.Parameter, name: str, old: LoraDeltas, new: LoraDeltas) -> None:
    layer = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    fp8 = isinstance(layer, FP8Linear) and name.endswith(".weight")
    stored = layer.fp8_weight if fp8 else param.data  # FP8Linear holds its fp8 bytes as uint8
    scale = layer.scale_weight if fp8 else None
    weight, new_scale = remerge(stored, name, old, new, scale)
    stored.copy_(weight)
    if scale is not None:
        scale.copy_(new_scale)
