"""Attention backends behind the seam, and regional torch.compile: same numbers as eager SDPA."""

import warnings

import pytest
import torch
from fakes import hide_package

from wan22_core.config import TINY
from wan22_core.models.attention import AttentionKernel, resolve_backend, set_attention_backend
from wan22_core.models.transformer import WanModel
from wan22_core.optimize import compile_blocks, compile_toolchain_problem

CFG = TINY.dit


def test_sdpa_kernel_equals_float64_softmax_attention():
    q, k, v = torch.randn(2, 13, 4, 16), torch.randn(2, 7, 4, 16), torch.randn(2, 7, 4, 16)
    out = AttentionKernel("sdpa")(q, k, v)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 16**0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    assert out.shape == (2, 13, 4, 16)
    assert ((out.double() - expected).norm() / expected.norm()).item() <= 1e-6


@pytest.mark.parametrize("backend,package", [("flash_attn", "flash_attn"), ("flash_attn3", "flash_attn_interface"),
                                             ("sage", "sageattention")])
def test_selecting_a_missing_backend_says_what_to_install(backend, package, monkeypatch):
    hide_package(monkeypatch, package)
    with pytest.raises(ValueError, match=f"'{package}' package is not installed.*or choose 'sdpa'"):
        resolve_backend(backend)


def test_auto_is_sdpa_without_cuda_and_unknown_names_fail():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="attention backend must be one of auto, sdpa"):
        resolve_backend("xformers")


def test_set_backend_reaches_every_kernel():
    model = WanModel(CFG)
    assert set_attention_backend(model, "auto", torch.device("cpu")) == "sdpa"
    kernels = [m for m in model.modules() if isinstance(m, AttentionKernel)]
    assert len(kernels) == 2 * CFG.num_layers and all(k.backend == "sdpa" for k in kernels)


@pytest.mark.skipif(compile_toolchain_problem(torch.device("cpu")) is not None, reason="no C++ compiler")
def test_regional_compile_matches_eager():
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([900]), torch.randn(1, 5, 32)
    with torch.no_grad():
        eager = model(x, t, ctx)
        assert compile_blocks(model, torch.device("cpu")) is None
        compiled = model(x, t, ctx)
    assert ((compiled - eager).norm() / eager.norm()).item() <= 1e-5


def test_compile_falls_back_with_a_message_without_toolchain(monkeypatch):
    import wan22_core.optimize as optimize

    monkeypatch.setattr(optimize.shutil, "which", lambda name: None)
    model = WanModel(CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller reports the problem its own way: no warning here
        assert compile_blocks(model, torch.device("cpu")) == "no C++ compiler on PATH (install g++)"
    assert not any(getattr(block, "_compiled_call_impl", None) for block in model.blocks)


def test_load_expert_pair_sets_the_attention_backend_on_both_experts(tmp_path, monkeypatch):
    """One rank (no process group needed): `attention` reaches every kernel; None leaves the default."""
    import importlib
    import types

    from wan22_core.parallel.loading import load_expert_pair
    from wan22_core.parallel.mesh import ParallelGroups
    from wan22_core.parallel.plan import ParallelPlan
    from wan22_core.tiny import make_tiny

    real = importlib.import_module  # a stand-in sageattention: resolve_backend only imports it
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: types.ModuleType(name) if name == "sageattention" else real(name, *a))
    model_dir = make_tiny(tmp_path / "official", "official", TINY, seed=0)
    cpu = torch.device("cpu")
    groups = ParallelGroups(plan=ParallelPlan(world_size=1, num_heads=CFG.num_heads), rank=0, device=cpu,
                            ulysses=None, cfg=None, fsdp_mesh=None)

    def backends(attention):
        experts = load_expert_pair(model_dir / "high_noise_model", model_dir / "low_noise_model", groups, cpu,
                                   torch.float32, attention=attention)
        return {name: {m.backend for m in e.modules() if isinstance(m, AttentionKernel)}
                for name, e in experts.experts.items()}

    assert backends("sage") == {"high": {"sage"}, "low": {"sage"}}
    assert backends(None) == {"high": {"sdpa"}, "low": {"sdpa"}}
