"""Attention backends behind the seam, and regional torch.compile: same numbers as eager SDPA."""

import types
import warnings

import pytest
import torch
from fakes import fake_kernels, hide_package
from reference import float64_attention, rel_l2

from wan22_core.config import TINY
from wan22_core.models import attention
from wan22_core.models.attention import AttentionKernel, resolve_backend, set_attention_backend
from wan22_core.models.transformer import WanModel
from wan22_core.optimize import compile_blocks, compile_toolchain_problem

CFG = TINY.dit


def test_sdpa_kernel_equals_float64_softmax_attention():
    q, k, v = torch.randn(2, 13, 4, 16), torch.randn(2, 7, 4, 16), torch.randn(2, 7, 4, 16)
    out = AttentionKernel("sdpa")(q, k, v)
    expected, _ = float64_attention(q, k, v)
    assert out.shape == (2, 13, 4, 16)
    assert rel_l2(out, expected) <= 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])  # fp32 measured <= 1e-7; bf16 rounds once (2^-8)
def test_attention_with_lse_returns_the_log_sum_exp_of_the_scaled_logits(dtype, tol):
    q, k, v = (torch.randn(2, length, 4, 16).to(dtype) for length in (13, 7, 7))
    out, lse = AttentionKernel("sdpa").forward_with_lse(q, k, v)
    expected, expected_lse = float64_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (2, 4, 13) and lse.dtype == torch.float32
    assert rel_l2(out, expected) <= tol and rel_l2(lse, expected_lse) <= 1e-6  # the log-sum-exp is fp32 either way
    assert torch.equal(out, AttentionKernel("sdpa")(q, k, v))  # the same kernel as the plain call


def test_partials_over_key_blocks_merge_into_full_attention_with_the_padding_left_out():
    """The ring's rule alone: four blocks of 4 keys, the last 6 of them padding (huge values that
    would dominate the softmax if they leaked in), merged in a ring's arrival order; equals a
    float64 softmax over the 10 real keys."""
    from wan22_core.parallel.ring import merge_partials, valid_keys

    block, valid_len = 4, 10
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 16, 3, 8), torch.randn(2, 16, 3, 8)
    k[:, valid_len:], v[:, valid_len:] = 1e4, 1e4
    assert [valid_keys(position, block, valid_len) for position in range(4)] == [4, 4, 2, 0]
    out = lse = None
    for position in (2, 1, 0, 3):  # what rank 2 of a ring of 4 sees, step by step
        keys = valid_keys(position, block, valid_len)
        if keys:
            blocks = (t[:, position * block:position * block + keys] for t in (k, v))
            out, lse = merge_partials(out, lse, *AttentionKernel().forward_with_lse(q, *blocks))
    expected, expected_lse = float64_attention(q, k[:, :valid_len], v[:, :valid_len])
    assert out.dtype == torch.float32 and rel_l2(out, expected) <= 1e-6  # measured <= 1.6e-7 over 20 seeds
    assert rel_l2(lse.squeeze(-1).transpose(1, 2), expected_lse) <= 1e-6


def test_flash_packages_are_asked_for_their_log_sum_exp(monkeypatch):
    """The CUDA-only packages' own ways to return it (FA2/FA3: return_attn_probs, FA4: return_lse),
    through the op ring attention calls; run here with stand-in packages on CPU tensors."""
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    expected, expected_lse = float64_attention(q, k, v)
    answers = {"flash_attn": lambda out, lse: (out, lse, None), "flash_attn3": lambda out, lse: (out, lse),
               "flash_attn4": lambda out, lse: (out, lse)}
    keyword = {"flash_attn": "return_attn_probs", "flash_attn3": "return_attn_probs", "flash_attn4": "return_lse"}
    for backend, answer in answers.items():
        def flash_attn_func(q, k, v, **kwargs):
            assert kwargs == {keyword[backend]: True}, (backend, kwargs)
            out, lse = float64_attention(q, k, v)
            return answer(out.float(), lse.float())
        monkeypatch.setattr(attention, "_import", lambda name: types.SimpleNamespace(flash_attn_func=flash_attn_func))
        out, lse = attention.external_attention_lse(q, k, v, backend)
        assert rel_l2(out, expected) <= 1e-6 and rel_l2(lse, expected_lse) <= 1e-6, backend
    with pytest.raises(ValueError, match="'sage' returns no log-sum-exp"):
        attention.external_attention_lse(q, k, v, "sage")


@pytest.mark.parametrize("backend,module,hint", [
    ("flash_attn", "flash_attn.flash_attn_interface", "pip install flash-attn "),
    ("flash_attn3", "flash_attn_interface", "hopper/ folder"),
    ("flash_attn4", "flash_attn.cute", "pip install flash-attn-4"),
    ("sage", "sageattention", "pip install sageattention")])
def test_selecting_a_missing_backend_says_what_to_install(backend, module, hint, monkeypatch):
    hide_package(monkeypatch, module)
    with pytest.raises(ValueError, match=f"its module '{module}' is not installed.*{hint}.*or choose 'sdpa'"):
        resolve_backend(backend)


@pytest.mark.parametrize("major,installed,expected", [
    (9, {"flash_attn", "flash_attn3", "flash_attn4", "sage"}, "flash_attn3"),
    (9, {"flash_attn", "flash_attn4", "sage"}, "flash_attn4"),
    (9, {"flash_attn", "sage"}, "sdpa"),  # FA2 is slower than SDPA's cuDNN kernel on Hopper; sage is not exact
    (8, {"flash_attn", "flash_attn4"}, "flash_attn"),
    (10, {"flash_attn3", "flash_attn4"}, "flash_attn4"),
    (7, {"flash_attn", "flash_attn3", "flash_attn4"}, "sdpa")])
def test_auto_picks_the_fastest_installed_exact_backend_for_the_gpu(major, installed, expected, monkeypatch):
    fake_kernels(monkeypatch, installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert set(attention.available_backends()) == {"sdpa", *installed}
    assert resolve_backend("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("major", [7, 8, 9, 10, 12])
def test_auto_never_picks_an_inexact_backend(major, monkeypatch):
    fake_kernels(monkeypatch, {"sage", "sage3"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert resolve_backend("auto", torch.device("cuda")) == "sdpa"
    assert attention.INEXACT_BACKENDS == {"sage"}


@pytest.mark.parametrize("major,installed,kernel", [
    (12, {"sage", "sage3"}, "sageattn3"),  # RTX 50: FP4 when SageAttention 3 is built
    (10, {"sage3"}, "sageattn3"),  # B200: SageAttention 3 alone is enough
    (9, {"sage", "sage3"}, "sageattention"),  # Hopper: 2.x (its sageattn takes the FP8-PV kernel)
    (8, {"sage", "sage3"}, "sageattention"),
    (12, {"sage"}, "sageattention")])
def test_sage_takes_sageattention_3_on_blackwell_and_2x_elsewhere(major, installed, kernel, monkeypatch):
    fake_kernels(monkeypatch, installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert "sage" in attention.available_backends()
    assert resolve_backend("sage", torch.device("cuda")) == "sage"
    assert attention.sage_kernel(torch.device("cuda")) == kernel


def test_sage_refuses_sageattention_1x(monkeypatch):
    fake_kernels(monkeypatch, {"sage1"})
    with pytest.raises(ValueError, match=r"the installed sageattention is 1.x; install 2.x \(pip install "
                                         r"sageattention==2.2.0 --no-build-isolation\) or choose 'sdpa'"):
        resolve_backend("sage")


def test_sageattention_3_alone_serves_blackwell_only(monkeypatch):
    """Before the device is known it is accepted; on a Hopper GPU 2.x is missing."""
    fake_kernels(monkeypatch, {"sage3"})
    assert resolve_backend("sage") == "sage"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match="its module 'sageattention' is not installed"):
        resolve_backend("sage", torch.device("cuda"))


def test_a_sageattention_3_that_does_not_import_is_named(monkeypatch):
    fake_kernels(monkeypatch, {"sage3"})
    hide_package(monkeypatch, "sageattn3")  # found on the path, its extension fails to load
    with pytest.raises(ValueError, match="would run SageAttention 3, but 'sageattn3' does not import.*rebuild it"):
        resolve_backend("sage")


@pytest.mark.parametrize("kernel", ["sageattention", "sageattn3"])
def test_sage_kernels_get_their_layout_through_the_op(kernel, monkeypatch):
    """2.x takes the seam's [B, L, heads, dim] (tensor_layout NHD); 3 takes [B, heads, L, dim] and
    changes k in place, so it gets a copy. Same numbers as SDPA either way."""
    calls = fake_kernels(monkeypatch, {"sage", "sage3"})
    monkeypatch.setattr(attention, "sage_kernel", lambda device: kernel)  # CPU tensors, the CUDA choice
    q, k, v = (torch.randn(2, n, 3, 16).bfloat16() for n in (9, 5, 5))
    k_before = k.clone()
    out = attention.external_attention(q, k, v, "sage")
    assert out.shape == (2, 9, 3, 16) and out.is_contiguous() and calls == [torch.bfloat16]
    assert torch.equal(k, k_before)
    assert rel_l2(out, AttentionKernel("sdpa")(q.float(), k.float(), v.float())) <= 2 ** -7  # bf16 in and out


def test_inexact_backend_is_read_from_the_model(monkeypatch):
    fake_kernels(monkeypatch, {"sage"})
    model = WanModel(CFG)
    assert attention.inexact_backend(model) is None
    set_attention_backend(model, "sage")
    assert attention.inexact_backend(model) == "sage"


def test_external_kernels_are_one_opaque_op_under_compile(monkeypatch):
    """The package kernel runs in half precision inside a compiled graph without breaking it."""
    calls = fake_kernels(monkeypatch, {"flash_attn4"})
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 5, 4, 16), torch.randn(2, 5, 4, 16)

    def attend(q, k, v):
        return attention.external_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "flash_attn4").float() * 2

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = attend(q, k, v)
    compiled = torch.compile(attend, fullgraph=True, backend=recording_backend)(q, k, v)  # fullgraph: a break fails
    expected = 2 * AttentionKernel("sdpa")(q, k, v)
    targets = [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert torch.ops.wan22.external_attention in targets  # the op itself, not traced into
    assert calls == [torch.bfloat16, torch.bfloat16]
    assert torch.equal(compiled, eager)
    assert rel_l2(eager, expected) <= 2 ** -7  # bf16 inputs and output


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
    assert rel_l2(compiled, eager) <= 1e-5


def test_compile_falls_back_with_a_message_without_toolchain(monkeypatch):
    import wan22_core.optimize as optimize

    monkeypatch.setattr(optimize.shutil, "which", lambda name: None)
    model = WanModel(CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller reports the problem its own way: no warning here
        assert compile_blocks(model, torch.device("cpu")) == "no C++ compiler on PATH (install g++)"
    assert not any(getattr(block, "_compiled_call_impl", None) for block in model.blocks)


def test_load_expert_pair_sets_the_attention_backend_on_both_experts(tiny_model_dir, monkeypatch):
    """One rank (no process group needed): `attention` reaches every kernel; None leaves the default."""
    from wan22_core.parallel.loading import load_expert_pair
    from wan22_core.parallel.mesh import ParallelGroups
    from wan22_core.parallel.plan import ParallelPlan

    fake_kernels(monkeypatch, {"sage"})  # resolve_backend only imports it; on CPU the kernel runs SDPA
    cpu = torch.device("cpu")
    groups = ParallelGroups(plan=ParallelPlan(world_size=1, num_heads=CFG.num_heads), rank=0, device=cpu,
                            ulysses=None, cfg=None, fsdp_mesh=None)

    def backends(attention):
        experts = load_expert_pair(tiny_model_dir / "high_noise_model", tiny_model_dir / "low_noise_model", groups,
                                   cpu, torch.float32, attention=attention)
        return {name: {m.backend for m in e.modules() if isinstance(m, AttentionKernel)}
                for name, e in experts.experts.items()}

    assert backends("sage") == {"high": {"sage"}, "low": {"sage"}}
    assert backends(None) == {"high": {"sdpa"}, "low": {"sdpa"}}


def test_a_second_import_of_the_seam_reuses_the_one_custom_op(monkeypatch):
    """ComfyUI imports the pack by its folder while the engine is also `wan22_core`: the file runs
    twice in one process, and a second definition of the op would break the first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("another_package_name.attention", attention.__file__)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)
    assert again.external_attention is attention.external_attention
    fake_kernels(monkeypatch, {"flash_attn4"})
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    out = again.external_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "flash_attn4")
    assert rel_l2(out, AttentionKernel("sdpa")(q, k, v)) <= 2 ** -7  # still the right kernel; bf16 inputs and output
