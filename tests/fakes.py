"""Stand-ins for parts of the environment a test must not depend on: packages, experts, checkpoints."""
import importlib
import importlib.util
import types

import torch
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


def fake_kernels(monkeypatch, installed) -> list[torch.dtype]:
    """Stand-in attention packages (float64 softmax attention) for the backends in `installed`,
    findable and importable as the real ones; everything else is missing. Returns the dtypes the
    kernel is called with, one per call."""
    calls = []

    def flash_attn_func(q, k, v):
        calls.append(q.dtype)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)
        return out, None  # (out, lse), as FA3/FA4 return

    modules = {attention._MODULES[name]: types.SimpleNamespace(flash_attn_func=flash_attn_func) for name in installed}
    real_import, real_find = importlib.import_module, importlib.util.find_spec
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a, **kw: modules[name] if name in modules else real_import(name, *a, **kw))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: object() if name in modules else
                        None if name in attention._MODULES.values() else real_find(name, *a, **kw))
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
