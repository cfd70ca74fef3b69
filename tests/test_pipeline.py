"""The MoE loop: parity with diffusers' WanPipeline, routing, CFG skip, denoise < 1, bad input."""
import pytest
import torch
from fakes import ConstantExpert
from reference import rel_l2, run_wan_pipeline, wan_pipeline

from wan22_core.config import TINY, SamplerSettings
from wan22_core.errors import Cancelled, NumericalError
from wan22_core.models.attention import AttentionKernel
from wan22_core.models.transformer import WanModel
from wan22_core.pipeline import check_video_size, denoise, latent_shape, make_noise
from wan22_core.placement import ExpertPair
from wan22_core.sampling.moe import select_expert
from wan22_core.sampling.schedule import flow_schedule

CFG = TINY.dit


def tiny_expert(seed):
    torch.manual_seed(seed)
    return WanModel(CFG).eval()


@pytest.mark.parametrize("steps", [8, 12])
def test_two_expert_loop_matches_diffusers_wanpipeline(steps):
    high, low = tiny_expert(1), tiny_expert(2)
    g = torch.Generator().manual_seed(3)
    positive, negative = torch.randn(9, CFG.text_dim, generator=g), torch.randn(4, CFG.text_dim, generator=g)
    noise = make_noise(7, frames=9, height=64, width=48)  # [16, 3, 8, 6]

    settings = SamplerSettings(steps=steps)  # shift 12, boundary 0.875, CFG 4.0 / 3.0, unipc
    ours = denoise(ExpertPair(high, low, torch.device("cpu")), positive, negative, noise, settings)

    pipe = wan_pipeline(CFG, high, low, settings)
    ref = run_wan_pipeline(pipe, positive, negative, noise, settings, frames=9, height=64, width=48)
    # both experts really ran (diffusers' timesteps cross the boundary at the same step as ours)
    timesteps = flow_schedule(steps, settings.shift, "unipc").timesteps
    assert torch.equal(pipe.scheduler.timesteps.to(torch.int64), timesteps)
    assert {select_expert(t, 0.875) for t in timesteps.tolist()} == {"high", "low"}
    assert rel_l2(ours, ref) <= 1e-5  # measured 4.1e-7 (8 steps), 4.3e-7 (12): fp32 op-order rounding


def test_default_schedule_splits_26_high_14_low():
    t = flow_schedule(40, 12.0, "unipc").timesteps.tolist()
    experts = [select_expert(x, 0.875) for x in t]
    assert experts == ["high"] * 26 + ["low"] * 14


class Recorder(ConstantExpert):
    """ConstantExpert that records its calls (batch, timesteps) and counts its moves."""

    def __init__(self, value):
        super().__init__(value)
        self.calls = []
        self.moves = 0

    def forward(self, x, t, context):
        self.calls.append((x.shape[0], t.tolist()))
        # + 0 * context: fails unless the text comes batched like the latents
        return super().forward(x, t, context) + context.sum(dim=(1, 2)).view(-1, 1, 1, 1, 1) * 0.0

    def _apply(self, fn, *args, **kwargs):
        self.moves += 1
        return super()._apply(fn, *args, **kwargs)


def run_fakes(settings, **kw):
    high, low = Recorder(1.0), Recorder(-1.0)
    pair = ExpertPair(high, low, torch.device("cpu"), keep_both=False)
    noise = make_noise(0, 5, 32, 32)
    out = denoise(pair, torch.ones(3, 4), torch.zeros(2, 4), noise, settings, **kw)
    return high, low, out


def test_a_step_exactly_at_the_boundary_runs_the_high_noise_expert():
    """Official Wan: high-noise iff t >= boundary * 1000. Unshifted Euler steps of 1/8 put a
    timestep at exactly 875 (0.875 is exact in binary), the default boundary."""
    settings = SamplerSettings(steps=8, shift=1.0, solver="euler")
    timesteps = flow_schedule(8, 1.0, "euler").timesteps.tolist()
    assert timesteps[:3] == [1000, 875, 750] and settings.boundary * 1000 == 875
    high, low, _ = run_fakes(settings)
    assert [t[0] for _, t in high.calls] == [1000, 875]  # the step at 875 itself is high
    assert [t[0] for _, t in low.calls] == timesteps[2:]


def test_routing_and_one_move_per_switch():
    high, low, _ = run_fakes(SamplerSettings(steps=40))
    assert len(high.calls) == 26 and len(low.calls) == 14
    assert all(t[0] >= 875 for _, t in high.calls) and all(t[0] < 875 for _, t in low.calls)
    # non-resident mode: high moved on at step 0 and off at the switch; low moved on once
    assert high.moves == 2 and low.moves == 1


def test_cfg_one_skips_unconditional_pass():
    high, low, _ = run_fakes(SamplerSettings(steps=6, cfg_high=1.0, cfg_low=1.0))
    assert all(batch == 1 for batch, _ in high.calls + low.calls)
    high, low, _ = run_fakes(SamplerSettings(steps=6, cfg_high=1.0, cfg_low=3.0))
    assert all(batch == 1 for batch, _ in high.calls) and all(batch == 2 for batch, _ in low.calls)


def test_batched_and_sequential_cfg_agree():
    high, low = tiny_expert(1), tiny_expert(2)
    pos, neg = torch.randn(5, CFG.text_dim), torch.randn(3, CFG.text_dim)
    noise = make_noise(1, 5, 32, 32)
    pair = ExpertPair(high, low, torch.device("cpu"))
    a = denoise(pair, pos, neg, noise, SamplerSettings(steps=4), batch_cfg=True)
    b = denoise(pair, pos, neg, noise, SamplerSettings(steps=4), batch_cfg=False)
    assert rel_l2(a, b) <= 1e-5


def test_denoise_below_one_starts_part_way_from_the_latent():
    settings = SamplerSettings(steps=5)
    high, low = Recorder(1.0), Recorder(-1.0)
    pair = ExpertPair(high, low, torch.device("cpu"))
    noise = make_noise(0, 5, 32, 32)
    latent = torch.randn_like(noise)
    out = denoise(pair, torch.ones(3, 4), torch.zeros(2, 4), noise, settings, latent=latent, denoise_strength=0.5)
    full = flow_schedule(10, settings.shift, settings.solver).timesteps.tolist()
    seen = [t[0] for _, t in high.calls + low.calls]
    assert seen == full[-5:]
    assert out.shape == noise.shape
    with pytest.raises(ValueError, match="needs an input latent"):
        denoise(pair, torch.ones(3, 4), torch.zeros(2, 4), noise, settings, denoise_strength=0.5)
    with pytest.raises(ValueError, match="input latent has shape"):
        denoise(pair, torch.ones(3, 4), torch.zeros(2, 4), noise, settings, latent=latent[:, :1])


def test_full_denoise_from_a_latent_with_strength_one_is_dominated_by_noise():
    """denoise=1 with a latent noises it to the first sigma (0.99992 at shift 12): the latent enters, a little."""
    high, low = tiny_expert(1), tiny_expert(2)
    pair = ExpertPair(high, low, torch.device("cpu"))
    pos, neg, noise = torch.randn(5, CFG.text_dim), torch.randn(3, CFG.text_dim), make_noise(1, 5, 32, 32)
    latent = make_noise(2, 5, 32, 32)
    a = denoise(pair, pos, neg, noise, SamplerSettings(steps=3))
    b = denoise(pair, pos, neg, noise, SamplerSettings(steps=3), latent=latent)
    # the same as starting from sigma0 noise + (1 - sigma0) latent: the first (shifted) sigma < 1
    sigma0 = float(flow_schedule(3, SamplerSettings().shift, "unipc").sigmas[0])
    start = denoise(pair, pos, neg, sigma0 * noise + (1 - sigma0) * latent, SamplerSettings(steps=3))
    assert 1e-6 < rel_l2(b, a) < 1e-2  # the latent did enter, and only a little
    assert rel_l2(b, start) <= 1e-6


def test_callbacks_progress_and_cancel():
    seen = []
    run_fakes(SamplerSettings(steps=4), on_step=lambda s: seen.append((s.index, s.total, s.expert)))
    assert [s[:2] for s in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    calls = iter([False, False, True])
    with pytest.raises(Cancelled, match="before step 3/4"):
        run_fakes(SamplerSettings(steps=4), should_cancel=lambda: next(calls))


def test_nan_stops_with_step_and_expert():
    high, low = Recorder(float("nan")), Recorder(0.0)
    with pytest.raises(NumericalError, match=r"step 1/3 .*high-noise expert"):
        denoise(ExpertPair(high, low, torch.device("cpu")), torch.ones(2, 4), torch.zeros(2, 4),
                make_noise(0, 5, 32, 32), SamplerSettings(steps=3))


class SageExpert(ConstantExpert):
    """A constant-velocity fake whose attention kernel is set to the inexact 'sage' backend (as
    set_attention_backend leaves a model; the kernel never runs here, so no package is needed)."""

    def __init__(self, value):
        super().__init__(value)
        self.attention = AttentionKernel("sdpa")
        self.attention.backend = "sage"


def test_nan_with_an_inexact_attention_backend_names_it_and_suggests_sdpa():
    pair = ExpertPair(ConstantExpert(0.1), SageExpert(float("nan")), torch.device("cpu"))
    with pytest.raises(NumericalError) as err:
        denoise(pair, torch.ones(2, 4), torch.zeros(2, 4), make_noise(0, 5, 32, 32), SamplerSettings(steps=3))
    message = str(err.value)
    assert message.startswith("NaN/Inf in the latents after step 3/3 (timestep 856, low-noise expert); the 'sage' "
                              "attention backend is not exact and can overflow: choose attention 'sdpa'")
    assert "\n" not in message and "weights or the dtype" not in message
    # the same NaN from an exact backend blames the weights or the dtype
    with pytest.raises(NumericalError, match="the weights or the dtype overflowed") as err:
        denoise(ExpertPair(ConstantExpert(0.1), ConstantExpert(float("nan")), torch.device("cpu")), torch.ones(2, 4),
                torch.zeros(2, 4), make_noise(0, 5, 32, 32), SamplerSettings(steps=3))
    assert "sage" not in str(err.value)


def test_noise_contract():
    a = make_noise(42, 17, 128, 96)
    assert a.shape == (16, 5, 16, 12) and a.dtype == torch.float32 and a.device.type == "cpu"
    expected = torch.randn((16, 5, 16, 12), generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(a, expected)
    assert latent_shape(81, 720, 1280) == (16, 21, 90, 160)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(boundary=1.5), r"boundary must be in \[0, 1\]"),
    (dict(boundary=-0.1), r"boundary must be in \[0, 1\]"),
    (dict(solver="ddim"), "solver must be one of unipc, dpm\\+\\+, euler"),
    (dict(cfg_high=float("nan")), "cfg_high must be a finite number"),
    (dict(cfg_low=-1.0), "cfg_low must be a finite number >= 0"),
    (dict(shift=0.0), "shift must be a finite number >= 0.001"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_fakes(SamplerSettings(**kwargs))


@pytest.mark.parametrize("frames,height,width,match", [
    (80, 64, 64, "frames must be 4k\\+1.*77 and 81"),
    (0, 64, 64, "frames must be 4k\\+1"),
    (5, 72, 64, "height must be a multiple of 16"),
    (5, 64, 8, "width must be a multiple of 16"),
    (5, 64, 16 * 1025, "width must be a multiple of 16 between 16 and 16384"),
])
def test_bad_sizes_are_named(frames, height, width, match):
    with pytest.raises(ValueError, match=match):
        check_video_size(frames, height, width)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        make_noise(seed, 5, 32, 32)
