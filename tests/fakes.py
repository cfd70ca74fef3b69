"""Stand-ins for parts of the environment a test must not depend on: packages, experts, checkpoints."""
import importlib
import importlib.util
import types

import numpy as np
import torch
from reference import float64_attention
from safetensors.torch import save_file

from wan22_core.config import DiTConfig
from wan22_core.models import attention
from wan22_core.models.transformer import WanModel


def hide_package(monkeypatch, package: str) -> None:
    """Make `importlib.import_module(package)` fail as it does when the package is not installed
    (how the engine imports optional attention packages), whatever is installed here."""
    real = importlib.import_module

    def fake(name, *args):
        if name == package:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)


def _attend(q, k, v):
    """Softmax attention in float64 on [B, L, heads, head_dim], returned in q's dtype."""
    return float64_attention(q, k, v)[0].to(q.dtype).contiguous()


def _sage_packages(calls: list) -> dict[str, types.SimpleNamespace]:
    """Stand-ins for SageAttention 2.x ("sage"), 1.x ("sage1", Triton only) and 3 ("sage3"): the
    real call signatures and layouts, float64 attention inside; sageattn3 changes k in place as the
    real one does."""
    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False):
        calls.append(q.dtype)
        if tensor_layout == "HND":
            return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return _attend(q, k, v)

    def sageattn3_blackwell(q, k, v, attn_mask=None, is_causal=False, per_block_mean=True):
        calls.append(q.dtype)
        k -= k.mean(dim=-2, keepdim=True)  # softmax does not see it; the caller's k would
        return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).contiguous()

    return {"sage": types.SimpleNamespace(sageattn=sageattn, sageattn_qk_int8_pv_fp8_cuda=sageattn),
            "sage1": types.SimpleNamespace(sageattn=sageattn),
            "sage3": types.SimpleNamespace(sageattn3_blackwell=sageattn3_blackwell)}


def fake_kernels(monkeypatch, installed) -> list[torch.dtype]:
    """Stand-in attention packages (float64 softmax attention) for the backends in `installed`,
    findable and importable as the real ones; everything else is missing. "sage" is SageAttention 2.x,
    "sage1" the 1.x package, "sage3" SageAttention 3 (`sageattn3`). Returns the dtypes the kernel is
    called with, one per call."""
    calls = []

    def flash_attn_func(q, k, v):
        calls.append(q.dtype)
        return _attend(q, k, v), None  # (out, lse), as FA3/FA4 return

    sage = _sage_packages(calls)
    module_names = {**attention._MODULES, "sage1": attention._MODULES["sage"], "sage3": attention.SAGE3_MODULE}
    modules = {module_names[name]: sage.get(name, types.SimpleNamespace(flash_attn_func=flash_attn_func))
               for name in installed}
    real_import, real_find = importlib.import_module, importlib.util.find_spec
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a, **kw: modules[name] if name in modules else real_import(name, *a, **kw))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: object() if name in modules else
                        None if name in module_names.values() else real_find(name, *a, **kw))
    return calls


class ConstantExpert(torch.nn.Module):
    """A fake expert whose velocity is `value` everywhere (NaN and Inf included): the sampling loop
    runs in microseconds per step. One parameter, so it is placed and measured like a real expert."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, context):
        return torch.full_like(x, self.value)


class ShiftExpert(torch.nn.Module):
    """A fake expert whose transformation (output minus input) is constant: x + `offset` + the mean of
    its text context, so the guided transformation is constant too (cond and uncond differ)."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0  # forward calls (a batch-2 CFG pass is one)

    def forward(self, x, t, context):
        self.calls += 1
        return x + self.offset + context.mean(dim=(1, 2)).view(-1, *[1] * (x.ndim - 1))


class NoiseExpert(torch.nn.Module):
    """A fake expert whose transformation changes completely every step: x + noise seeded by the timestep."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x, t, context):
        self.calls += 1
        g = torch.Generator().manual_seed(int(t[0]))
        return x + torch.randn(x.shape[1:], generator=g) + context.mean(dim=(1, 2)).view(-1, *[1] * (x.ndim - 1))


def dit_tensors(cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Zeros under every name and shape of a DiT of `cfg` (official names)."""
    with torch.device("meta"):
        shapes = WanModel(cfg).state_dict()
    return {name: torch.zeros(t.shape) for name, t in shapes.items()}


def save_dit(path, cfg: DiTConfig, extra: dict[str, torch.Tensor] | None = None):
    """A single-file DiT checkpoint of `cfg` (zeros; `extra` adds or replaces tensors), with the
    head count in its metadata as our writer records it. Returns `path`."""
    save_file({**dit_tensors(cfg), **(extra or {})}, str(path), metadata={"num_heads": str(cfg.num_heads)})
    return path


# Where each GGUF block type keeps its fp16 scales (byte offsets in ggml's block structs): random
# bytes there could spell NaN or Inf, which no real file holds.
_GGUF_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
                    "F16": (0,)}
_INF_NAN_EXPONENT = {"F16": 0x7C00, "BF16": 0x7F80}  # all exponent bits set: Inf or NaN


def random_gguf_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """`n_blocks` random but valid blocks of a GGUF type, [n_blocks, type_size] uint8.

    Every code, packed sub-block scale, min and mask bit is a random byte, so any packing mistake
    shows; the fp16 fields are random finite halves (signs, subnormals and zero included); float
    types hold random finite values.
    """
    from wan22_core.quant import TYPES

    rng = np.random.default_rng(seed)
    kind = TYPES[qtype]
    if qtype == "F32":
        return rng.standard_normal(n_blocks, dtype=np.float32).view(np.uint8).reshape(n_blocks, 4)
    raw = rng.integers(0, 256, (n_blocks, kind.type_size), dtype=np.uint8)
    for at in _GGUF_F16_FIELDS.get(qtype, (0,)):  # BF16's one field is handled the same way
        bits = raw[:, at:at + 2].copy().view(np.uint16)
        exponent = _INF_NAN_EXPONENT.get(qtype, _INF_NAN_EXPONENT["F16"])
        bits[(bits & exponent) == exponent] &= ~np.uint16(0x4000)  # clear the top exponent bit: finite
        raw[:, at:at + 2] = bits.view(np.uint8)
    return raw


def rewrite_gguf(src, dst, rename=lambda name: name, arch: str | None = "wan", drop=(), metadata=None, tensors=None):
    """Copy the GGUF file `src` to `dst` with tensors (and their orig_shape keys) renamed, another
    (or no) architecture, the metadata keys in `drop` left out and `metadata` ({key: (value,
    GGUFValueType, element type)}) added or replaced; tensor bytes copied as stored, except those in
    `tensors` ({name: (block bytes, GGMLQuantizationType)}). Returns `dst`."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    writer = GGUFWriter(path=None, arch=arch or "none")
    if arch is None:  # the writer always adds one; files of other tools may have none
        del writer.kv_data[0]["general.architecture"]
    metadata = metadata or {}
    orig_shape = "comfy.gguf.orig_shape."
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in metadata:
            continue
        array = field.types[0] == GGUFValueType.ARRAY
        renamed = orig_shape + rename(key.removeprefix(orig_shape)) if key.startswith(orig_shape) else key
        writer.add_key_value(renamed, field.contents(), field.types[0], field.types[-1] if array else None)
    for key, (value, kind, element) in metadata.items():
        writer.add_key_value(key, value, kind, element)
    for tensor in reader.tensors:
        plain = tensor.data.dtype in (np.float32, np.float16)
        data, qtype = (tensors or {}).get(tensor.name, (np.array(tensor.data), None if plain else tensor.tensor_type))
        writer.add_tensor(rename(tensor.name), data, raw_dtype=qtype)
    writer.write_header_to_file(path=dst)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
