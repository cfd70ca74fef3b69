"""The step cache (sampling/step_cache.py) on fake experts: which passes run, what a reused step returns.

`sample` is the loop written out by hand (the real schedule, expert routing, guided prediction and
UniPC solver, one decision per step) with the cache optional; the last tests run the engine's loop
(`pipeline.denoise` with `SamplerSettings.step_cache`) against it.
"""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from fakes import ConstantExpert, NoiseExpert, ShiftExpert
from reference import rel_l2

from wan22_core.config import STEP_CACHE_WARMUP, SamplerSettings
from wan22_core.pipeline import denoise, predict_velocity
from wan22_core.placement import ExpertPair
from wan22_core.sampling.moe import HIGH, LOW, guidance_scale, select_expert
from wan22_core.sampling.schedule import flow_schedule
from wan22_core.sampling.solvers import make_solver
from wan22_core.sampling.step_cache import StepCache, passes_summary

SETTINGS = SamplerSettings()  # 40 steps: 26 high-noise, 14 low-noise
HIGH_STEPS, LOW_STEPS = 26, 14
COND, UNCOND = torch.ones(3, 4), torch.zeros(2, 4)  # context means 1 and 0: the fakes' cond and uncond differ


def sample(experts, cache=None, settings=SETTINGS, batch_cfg=True):
    """Final latent and, per step, (expert, x, v) with v the velocity the solver got."""
    schedule = flow_schedule(settings.steps, settings.shift, settings.solver)
    solver = make_solver(settings.solver, schedule.sigmas)
    x = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    trace = []
    for i, t in enumerate(schedule.timesteps.tolist()):
        expert = select_expert(t, settings.boundary)

        def compute():
            return predict_velocity(experts[expert], x, t, COND, UNCOND, guidance_scale(expert, settings), batch_cfg)

        v = compute() if cache is None else cache.velocity(expert, x, compute, last=i == settings.steps - 1)
        trace.append((expert, x, v))
        x = solver.step(v, x)
    return x, trace


def runs_of(high_skipped: bool, low_skipped: bool, warmup: int = STEP_CACHE_WARMUP) -> list[bool]:
    """The decisions when every step after warm-up is skipped (or none is), per expert."""
    high = [True] * warmup + [not high_skipped] * (HIGH_STEPS - warmup)
    low = [True] * warmup + [not low_skipped] * (LOW_STEPS - warmup - 1) + [True]  # the last step runs
    return high + low


def test_threshold_zero_is_the_exact_loop_bit_for_bit():
    experts = {HIGH: NoiseExpert(), LOW: NoiseExpert()}
    exact, _ = sample(experts)
    cache = StepCache(0.0)
    cached, _ = sample(experts, cache)
    assert torch.equal(cached, exact)  # NoiseExpert's values make x + (v - x) != v, so a detour would show
    assert cache.ran == [True] * SETTINGS.steps and cache.passes_run == 40


def test_constant_transformation_skips_every_step_after_warmup_and_reproduces_the_exact_output():
    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    exact, _ = sample(experts)
    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}  # fresh call counters
    cache = StepCache(0.05)
    cached, _ = sample(experts, cache)
    assert cache.ran == runs_of(high_skipped=True, low_skipped=True)
    assert experts[HIGH].calls + experts[LOW].calls == cache.passes_run == 2 * STEP_CACHE_WARMUP + 1
    # x + (v_tau - x_tau) vs the model's x + offset: float32 rounding only. Measured 2.8e-8.
    assert rel_l2(cached, exact) <= 2e-7


def test_transformation_changing_every_step_skips_none_and_changes_nothing():
    experts = {HIGH: NoiseExpert(), LOW: NoiseExpert()}
    exact, _ = sample(experts)
    cache = StepCache(0.05)
    cached, _ = sample(experts, cache)
    assert cache.ran == [True] * SETTINGS.steps
    assert torch.equal(cached, exact)  # a pass that runs returns the model's own tensor


def test_the_expert_switch_resets_the_cache():
    """Both transformations are constant, so without the reset the high-noise expert's one would
    pass for the low-noise expert's from its first step on (its estimate is ~0)."""
    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    cache = StepCache(0.05)
    _, trace = sample(experts, cache)
    low_transformation = -0.25 + 0.0 + guidance_scale(LOW, SETTINGS) * (1.0 - 0.0)  # uncond + g (cond - uncond)
    low_steps = [(x, v) for expert, x, v in trace if expert == LOW]
    assert len(low_steps) == LOW_STEPS
    for x, v in low_steps:
        assert torch.allclose(v - x, torch.full_like(x, low_transformation), atol=1e-5)
    assert cache.ran[HIGH_STEPS:HIGH_STEPS + STEP_CACHE_WARMUP] == [True] * STEP_CACHE_WARMUP  # the low expert warms up again


def test_the_last_step_always_runs():
    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    cache = StepCache(1e9, warmup=2)  # everything that may be skipped is
    sample(experts, cache)
    assert cache.ran == runs_of(high_skipped=True, low_skipped=True, warmup=2)
    assert cache.ran[-2:] == [False, True]


@pytest.mark.parametrize("batch_cfg, cfg, forwards_per_pass", [(True, 4.0, 1), (False, 4.0, 2), (True, 1.0, 1)])
def test_cond_and_uncond_share_one_decision(batch_cfg, cfg, forwards_per_pass):
    """Batched CFG (one forward), two forwards, and CFG 1 (one pass, no uncond): same decisions, and a
    skipped step runs neither the conditional nor the unconditional pass."""
    settings = SamplerSettings(cfg_high=cfg, cfg_low=cfg)
    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    exact, _ = sample(experts, settings=settings, batch_cfg=batch_cfg)
    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    cache = StepCache(0.05)
    cached, _ = sample(experts, cache, settings=settings, batch_cfg=batch_cfg)
    assert cache.ran == runs_of(high_skipped=True, low_skipped=True)
    assert experts[HIGH].calls + experts[LOW].calls == forwards_per_pass * cache.passes_run
    assert passes_summary(cache.passes_run, len(cache.ran)) == f"{2 * STEP_CACHE_WARMUP + 1} of 40 model passes run"
    assert rel_l2(cached, exact) <= 2e-7  # float32 rounding; measured 2.2e-8 (CFG 4), 4.3e-8 (CFG 1)


def test_a_replica_that_would_reuse_runs_the_forward_while_another_runs_and_keeps_its_own_result():
    """Replicas vote (`agree`): at every vote here another replica runs, so this one runs the
    forward too (FSDP's all-gathers need every rank) but returns its reuse, as alone."""
    alone_experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    alone = StepCache(0.05)
    expected, _ = sample(alone_experts, alone)
    votes = []

    def another_replica_runs(reuse: bool) -> bool:
        votes.append(reuse)
        return False

    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    joint = StepCache(0.05, agree=another_replica_runs)
    got, _ = sample(experts, joint)
    assert torch.equal(got, expected)  # the video as alone
    assert experts[HIGH].calls + experts[LOW].calls == SETTINGS.steps  # but every step ran a forward,
    assert joint.ran == [True] * SETTINGS.steps and not all(alone.ran)  # and the report says so
    may_reuse = SETTINGS.steps - 2 * STEP_CACHE_WARMUP - 1  # one vote per step that may reuse, on every rank
    assert votes == [True] * may_reuse  # (every such step is reused here)

    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    everyone = StepCache(0.05, agree=lambda reuse: reuse)  # all replicas reuse: the pass is saved
    assert torch.equal(sample(experts, everyone)[0], expected)
    assert experts[HIGH].calls + experts[LOW].calls == alone.passes_run


def test_reused_velocities_stay_within_the_threshold_of_the_model():
    """A constant velocity: its transformation v - x moves exactly as fast as x (rate 1), so reuse
    drifts by x_n - x_tau. The estimate sees that (the authors' output-change rate would be 0 and
    skip every step), and each reused velocity stays within the threshold of the model's own."""
    experts = {HIGH: ConstantExpert(0.7), LOW: ConstantExpert(-0.4)}
    threshold = 0.05
    cache = StepCache(threshold)
    _, trace = sample(experts, cache)
    reused = [(expert, x, v) for (expert, x, v), ran in zip(trace, cache.ran) if not ran]
    high_after_warmup = cache.ran[STEP_CACHE_WARMUP:HIGH_STEPS]
    assert reused and any(high_after_warmup) and not all(high_after_warmup)
    for expert, x, v in reused:
        truth = predict_velocity(experts[expert], x, 0, COND, UNCOND, guidance_scale(expert, SETTINGS), True)
        error = (v - truth).abs().mean() / truth.abs().mean()
        assert 0 < error < threshold


def reference_decisions(xs, vs, threshold, warmup, last):
    """The rule of the module docstring in float64 numpy, written out step by step: one expert."""
    ran, reused = [], {}
    anchor_x = anchor_d = rate = None
    scale = error = 0.0
    for n, (x, v) in enumerate(zip(xs, vs)):
        if n >= warmup and n != last and rate is not None:
            error += rate * np.abs(x - xs[n - 1]).mean() / scale
            if error < threshold:
                ran.append(False)
                reused[n] = x + anchor_d
                continue
        ran.append(True)
        d = v - x
        if anchor_d is not None:
            rate = np.abs(d - anchor_d).mean() / np.abs(x - anchor_x).mean()
        anchor_x, anchor_d, scale, error = x, d, np.abs(v).mean(), 0.0
    return ran, reused


def test_decisions_match_a_float64_rederivation_of_the_rule():
    rng = np.random.default_rng(7)
    steps, warmup, threshold = 30, 3, 0.08
    xs = np.cumsum(rng.normal(size=(steps, 64)) * np.linspace(0.01, 0.1, steps)[:, None], axis=0) + rng.normal(size=64)
    drift = np.cumsum(rng.uniform(0.0, 1.0, size=steps) ** 3)  # how far the transformation has moved
    direction = rng.normal(size=64)
    vs = xs + 2.0 + drift[:, None] * direction  # v = x + a transformation that moves unevenly
    expected, expected_reused = reference_decisions(xs, vs, threshold, warmup, last=steps - 1)
    # 17 reused, 13 run; the closest call has E 9% away from the threshold, far above any rounding.
    assert 5 <= expected.count(False) <= steps - 10, expected

    cache = StepCache(threshold, warmup=warmup)
    for n in range(steps):
        v = cache.velocity(LOW, torch.from_numpy(xs[n]), lambda: torch.from_numpy(vs[n]), last=n == steps - 1)
        if n in expected_reused:
            assert np.allclose(v.numpy(), expected_reused[n], rtol=0, atol=1e-12)
    assert cache.ran == expected


def test_a_zero_velocity_never_divides_by_zero():
    """No velocity to be relative to (mean|v| = 0): nothing is estimated, every pass runs."""
    cache = StepCache(0.05)
    sample({HIGH: ConstantExpert(0.0), LOW: ConstantExpert(0.0)}, cache)
    assert cache.ran == [True] * SETTINGS.steps


@pytest.mark.parametrize("threshold", [-0.01, math.nan, math.inf, True, "0.05", None])
def test_a_bad_threshold_is_named(threshold):
    with pytest.raises(ValueError, match=r"step_cache must be a finite number >= 0 \(0 = off"):
        StepCache(threshold)


@pytest.mark.parametrize("warmup", [1, 0, 2.5])
def test_a_warmup_below_two_is_refused(warmup):
    with pytest.raises(ValueError, match="warmup must be an integer >= 2"):
        StepCache(0.05, warmup=warmup)


# ---------------------------------------------------------------------------------------------
# Through the engine's loop (pipeline.denoise with SamplerSettings.step_cache)


class CountingPair(ExpertPair):
    """An ExpertPair that records which expert the loop asked for at each model pass."""

    def __init__(self, high, low):
        super().__init__(high, low, torch.device("cpu"))
        self.asked: list[str] = []

    def get(self, name):
        self.asked.append(name)
        return super().get(name)


def loop(experts: dict, threshold: float) -> tuple[torch.Tensor, list[bool], CountingPair]:
    """`denoise` on `sample`'s inputs: the final latent, StepInfo.model_ran per step, the holder."""
    pair, ran = CountingPair(experts[HIGH], experts[LOW]), []
    x = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    latent = denoise(pair, COND, UNCOND, x, replace(SETTINGS, step_cache=threshold),
                     on_step=lambda info: ran.append(info.model_ran))
    return latent, ran, pair


def test_the_loop_with_threshold_zero_is_the_hand_written_exact_loop_bit_for_bit():
    exact, _ = sample({HIGH: NoiseExpert(), LOW: NoiseExpert()})
    latent, ran, _ = loop({HIGH: NoiseExpert(), LOW: NoiseExpert()}, 0.0)
    assert SamplerSettings().step_cache == 0.0  # the default is off
    assert torch.equal(latent, exact) and ran == [True] * SETTINGS.steps


def test_the_loop_reuses_a_constant_transformation_and_asks_for_no_expert_on_a_reused_step():
    exact, _ = sample({HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)})
    experts = {HIGH: ShiftExpert(0.5), LOW: ShiftExpert(-0.25)}
    latent, ran, pair = loop(experts, 0.05)
    assert ran == runs_of(high_skipped=True, low_skipped=True)
    assert pair.asked == [HIGH] * STEP_CACHE_WARMUP + [LOW] * (STEP_CACHE_WARMUP + 1)  # placement only on passes
    assert experts[HIGH].calls + experts[LOW].calls == sum(ran) == 2 * STEP_CACHE_WARMUP + 1
    assert rel_l2(latent, exact) <= 2e-7  # as through `sample`: float32 rounding only, measured 2.8e-8


def test_the_loop_runs_every_pass_of_a_transformation_that_changes_every_step():
    exact, _ = sample({HIGH: NoiseExpert(), LOW: NoiseExpert()})
    latent, ran, _ = loop({HIGH: NoiseExpert(), LOW: NoiseExpert()}, 0.05)
    assert ran == [True] * SETTINGS.steps and torch.equal(latent, exact)


@pytest.mark.parametrize("threshold", [-0.01, math.nan, "0.05"])
def test_settings_refuse_a_bad_threshold_before_the_loop(threshold):
    with pytest.raises(ValueError, match=r"step_cache must be a finite number >= 0 \(0 = off"):
        SamplerSettings(step_cache=threshold).validate()
