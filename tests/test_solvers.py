"""Schedules and solvers against the official timestep table, diffusers and float64 re-derivations.

Tolerances: schedules are compared exactly; solver trajectories to relative L2 <= 1e-6 after
every step (float32 latents, so ~1e-7 per step of rounding is expected on either side).
"""
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from reference import OfficialGridUniPC, rel_l2

from wan22_core.config import MAX_STEPS, MIN_SHIFT, SOLVERS, SamplerSettings
from wan22_core.sampling.schedule import (
    UNIPC_SIGMA_MAX,
    flow_schedule,
    partial_schedule,
    shift_sigmas,
)
from wan22_core.sampling.solvers import _SOLVER_TYPES, make_solver

OFFICIAL_40_STEPS_SHIFT_12 = [
    999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941,
    936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631,
    571, 492, 386, 235,
]
TOL = 1e-6
SHAPE = (1, 16, 2, 4, 4)  # [B, C, T, H, W]: diffusers' UniPC einsum wants a batch dim


def velocities(seed):
    """A realistic-ish model: v = W x (mixes channels) + fresh noise, same for every solver."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 16, generator=g) / 4

    def model(x):
        # Channel mixing W x as a broadcast sum: a BLAS matmul this small is slow on a busy CPU.
        mixed = (weight[:, :, None] * x.float().reshape(1, 16, -1)).sum(1).view(SHAPE)
        return mixed + torch.randn(SHAPE, generator=g)

    return model, torch.randn(SHAPE, generator=g)


# --- schedules ---------------------------------------------------------------------------


def test_official_timestep_table_and_expert_split():
    settings = SamplerSettings()
    schedule = flow_schedule(settings.steps, settings.shift, "unipc")
    assert schedule.timesteps.dtype == torch.int64 and schedule.sigmas.dtype == torch.float32
    assert schedule.timesteps.tolist() == OFFICIAL_40_STEPS_SHIFT_12
    assert schedule.sigmas.shape == (41,) and schedule.sigmas[-1].item() == 0.0
    boundary_t = settings.boundary * 1000
    assert int((schedule.timesteps >= boundary_t).sum()) == 26
    assert flow_schedule(8, 12.0, "unipc").timesteps.tolist() == [999, 988, 972, 952, 922, 877, 799, 631]

    dpm = flow_schedule(40, 12.0, "dpm++")
    assert dpm.timesteps[0].item() == 1000 and dpm.sigmas[0].item() == 1.0
    assert int((dpm.timesteps >= boundary_t).sum()) == 26
    assert torch.equal(flow_schedule(40, 12.0, "euler").sigmas, dpm.sigmas)


def test_schedule_matches_official_formula_bit_for_bit():
    # The official grid: float32 training sigma 0.999 as the start, numpy float64 math.
    assert UNIPC_SIGMA_MAX == 0.9990000128746033
    grid = np.linspace(UNIPC_SIGMA_MAX, 0, 17)[:-1]
    shifted = 5.0 * grid / (1 + 4.0 * grid)
    schedule = flow_schedule(16, 5.0, "unipc")
    assert np.array_equal(schedule.sigmas.numpy(), np.append(shifted, 0).astype(np.float32))
    assert np.array_equal(schedule.timesteps.numpy(), (shifted * 1000).astype(np.int64))
    assert shift_sigmas(0.5, 3.0) == pytest.approx(0.75, abs=0)
    # shift 1 is the identity; the DPM++/Euler grid is linspace(1, 0, N+1).
    euler = flow_schedule(7, 1.0, "euler")
    assert np.array_equal(euler.sigmas.numpy(), np.linspace(1, 0, 8).astype(np.float32))


def test_partial_schedule():
    full = flow_schedule(10, 12.0, "unipc")
    same = partial_schedule(10, 12.0, "unipc", 1.0)
    assert torch.equal(same.sigmas, full.sigmas) and torch.equal(same.timesteps, full.timesteps)

    long = flow_schedule(20, 12.0, "dpm++")
    half = partial_schedule(10, 12.0, "dpm++", 0.5)
    assert torch.equal(half.sigmas, long.sigmas[-11:]) and torch.equal(half.timesteps, long.timesteps[-10:])
    assert half.sigmas.shape == (11,) and half.sigmas[-1].item() == 0.0
    assert len(partial_schedule(3, 5.0, "euler", 0.7).timesteps) == 3  # int(3 / 0.7) = 4 total

    for bad in (0, 0.0, -0.5, 1.01, float("nan"), float("inf"), "0.5", None, True):
        with pytest.raises(ValueError, match="denoise"):
            partial_schedule(10, 12.0, "unipc", bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"solver": "ddim"}, "unipc, dpm\\+\\+, euler"),
        ({"shift": 0}, "shift"),
        ({"shift": -1.0}, "shift"),
        ({"shift": float("nan")}, "shift"),
        ({"shift": float("inf")}, "shift"),
    ],
)
def test_bad_settings_raise(kwargs, name):
    settings = {"steps": 8, "shift": 12.0, "solver": "unipc", **kwargs}
    with pytest.raises(ValueError, match=name):
        flow_schedule(**settings)
    with pytest.raises(ValueError, match=name):
        partial_schedule(**settings, denoise=0.5)


def test_numpy_scalars_are_numbers_and_numpy_bools_are_not():
    # A script computing its settings with numpy: the schedule and the settings accept the same.
    plain = flow_schedule(4, 12.0, "unipc")
    for steps, shift in ((np.int64(4), np.float32(12)), (np.uint8(4), np.float64(12.0)), (4, np.int32(12))):
        numpy_made = flow_schedule(steps, shift, "unipc")
        assert torch.equal(numpy_made.sigmas, plain.sigmas) and torch.equal(numpy_made.timesteps, plain.timesteps)
        SamplerSettings(steps=steps, shift=shift, boundary=np.float32(0.875), cfg_high=np.float64(4.0),
                        cfg_low=np.int64(3)).validate()
    half = partial_schedule(np.int64(10), np.float32(12), "dpm++", np.float32(0.5))
    assert torch.equal(half.timesteps, partial_schedule(10, 12.0, "dpm++", 0.5).timesteps)
    for bad in (dict(steps=np.bool_(True)), dict(shift=np.bool_(True)), dict(shift=np.float32("nan"))):
        args = {"steps": 4, "shift": 12.0, **bad}
        with pytest.raises(ValueError, match="steps|shift"):
            flow_schedule(args["steps"], args["shift"], "unipc")
        with pytest.raises(ValueError, match="steps|shift"):
            SamplerSettings(**args).validate()
    for bad in (dict(boundary=np.bool_(False)), dict(cfg_high=np.bool_(True)), dict(cfg_low=np.float64("inf"))):
        with pytest.raises(ValueError, match="boundary|cfg"):
            SamplerSettings(**bad).validate()


@pytest.mark.parametrize("shift, message", [
    (0, "shift must be a finite number >= 0.001, got 0 "), (0.0, "shift must be a finite number >= 0.001, got 0.0 "),
    (-1.0, "shift must be a finite number >= 0.001, got -1.0 "),
    (float("inf"), "shift must be a finite number >= 0.001, got inf "),
    ("12", "shift must be a finite number >= 0.001, got '12' "),
])
def test_one_shift_rule_for_settings_and_schedules(shift, message):
    for check in (lambda: SamplerSettings(shift=shift).validate(), lambda: flow_schedule(8, shift, "unipc")):
        with pytest.raises(ValueError, match=message + "\\(the Wan2.2 default is 12.0\\)"):
            check()
    assert SamplerSettings(shift=MIN_SHIFT).validate().shift == MIN_SHIFT  # the smallest shift runs
    assert torch.isfinite(flow_schedule(8, MIN_SHIFT, "unipc").sigmas).all()
    with pytest.raises(ValueError, match="got 1e-09"):  # below it the schedule would be NaN (1 + (s-1)*1 == 0)
        SamplerSettings(shift=1e-9).validate()


def test_steps_beyond_max_steps_are_refused_by_a_direct_schedule_call_too():
    assert len(flow_schedule(MAX_STEPS, 12.0, "euler").timesteps) == MAX_STEPS
    with pytest.raises(ValueError, match=f"steps must be at most {MAX_STEPS}, got {MAX_STEPS + 1}"):
        flow_schedule(MAX_STEPS + 1, 12.0, "euler")


def test_the_solver_table_is_the_list_of_solvers():
    assert tuple(_SOLVER_TYPES) == SOLVERS


# --- solvers -----------------------------------------------------------------------------


def diffusers_unipc(steps, shift):
    scheduler = OfficialGridUniPC(  # the official solver settings, spelled out (diffusers' defaults too)
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=2,
        solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
        num_train_timesteps=1000,
    )
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)  # no timestep lookup (shift 1 can repeat integer timesteps)
    return scheduler


@pytest.mark.parametrize("shift", [12.0, 5.0, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 40])
def test_unipc_matches_diffusers(steps, shift):
    schedule = flow_schedule(steps, shift, "unipc")
    reference = diffusers_unipc(steps, shift)
    assert torch.equal(reference.sigmas, schedule.sigmas)
    assert torch.equal(reference.timesteps, schedule.timesteps)

    # diffusers does its coefficients in float32, we in float64: at 40 steps the trajectories
    # drift apart by ~6e-7 (ours is ~2.5e-7 from a float64 run of diffusers).
    model, x = velocities(seed=steps * 100 + int(shift))
    ours, x_ref = make_solver("unipc", schedule.sigmas), x.clone()
    for i in range(steps):
        v = model(x_ref)  # both solvers get exactly the same model output
        x_ref = reference.step(v, schedule.timesteps[i], x_ref, return_dict=False)[0]
        x = ours.step(v, x)
        assert rel_l2(x, x_ref) <= TOL, f"step {i}"
    assert torch.isfinite(x).all()


def dpmpp_2m_float64(sigmas, model, x):
    """DPM-Solver++(2M) midpoint, written out from the paper's update in float64 numpy."""
    s = sigmas.double().numpy()
    with np.errstate(divide="ignore"):
        lam = np.log(1 - s) - np.log(s)  # -inf at sigma 1, +inf at sigma 0
    x = x.double()
    out, prev_d = [], None
    for i in range(len(s) - 1):
        d = x - s[i] * model(x).double()  # data prediction
        if s[i + 1] == 0:
            x = d
        else:
            h = lam[i + 1] - lam[i]
            if prev_d is None:
                big_d = d
            else:
                r = (lam[i] - lam[i - 1]) / h
                big_d = d + (d - prev_d) / (2 * r)
            x = (s[i + 1] / s[i]) * x - (1 - s[i + 1]) * math.expm1(-h) * big_d
        prev_d = d
        out.append(x)
    return out


def euler_float64(sigmas, model, x):
    s = sigmas.double().tolist()
    x, out = x.double(), []
    for i in range(len(s) - 1):
        x = x + (s[i + 1] - s[i]) * model(x).double()
        out.append(x)
    return out


@pytest.mark.parametrize("name, reference", [("dpm++", dpmpp_2m_float64), ("euler", euler_float64)])
@pytest.mark.parametrize("steps, shift", [(1, 12.0), (2, 5.0), (8, 12.0), (40, 12.0), (40, 1.0)])
def test_dpmpp_and_euler_match_float64(name, reference, steps, shift):
    sigmas = flow_schedule(steps, shift, name).sigmas
    # The float64 reference drives its own model inputs; we replay the model outputs it saw.
    model, x = velocities(seed=steps)
    seen = []
    expected = reference(sigmas, lambda xi: seen.append(model(xi)) or seen[-1], x)
    solver = make_solver(name, sigmas)
    for i in range(steps):
        x = solver.step(seen[i], x)
        assert rel_l2(x, expected[i]) <= TOL, f"step {i}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers
@pytest.mark.parametrize("steps, shift", [(2, 5.0), (8, 12.0), (40, 12.0)])
def test_dpmpp_matches_diffusers(steps, shift):
    schedule = flow_schedule(steps, shift, "dpm++")
    reference = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, algorithm_type="dpmsolver++",
        solver_type="midpoint", solver_order=2, lower_order_final=True, final_sigmas_type="zero",
        num_train_timesteps=1000,
    )
    # diffusers' own flow grid starts at 0.999; the official DPM++ path starts at 1.0, so put
    # ours in (what the official FlowDPMSolverMultistepScheduler gets from `sigmas=`).
    reference.set_timesteps(steps)
    reference.sigmas, reference.timesteps = schedule.sigmas.clone(), schedule.timesteps.clone()
    reference.set_begin_index(0)
    model, x = velocities(seed=7)
    ours, x_ref = make_solver("dpm++", schedule.sigmas), x.clone()
    for i in range(steps):
        v = model(x_ref)
        x_ref = reference.step(v, schedule.timesteps[i], x_ref, return_dict=False)[0]
        x = ours.step(v, x)
        assert rel_l2(x, x_ref) <= TOL, f"step {i}"


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
def test_final_step_returns_x0_and_refuses_more(name):
    schedule = flow_schedule(5, 12.0, name)
    solver = make_solver(name, schedule.sigmas)
    model, x = velocities(seed=3)
    for _ in range(4):
        x = solver.step(model(x) * 100, x)  # wild history must not leak into the last step
    v = model(x)
    last = solver.step(v, x)
    assert torch.isfinite(last).all()
    expected = x.double() - schedule.sigmas[-2].double() * v.double()
    assert rel_l2(last, expected) <= TOL
    if name != "euler":  # euler's last step is x + (0 - sigma) v: x0 up to rounding
        assert torch.equal(last, torch.add(x, v, alpha=-schedule.sigmas[-2].item()))
    with pytest.raises(RuntimeError, match="already taken all 5 steps"):
        solver.step(v, last)


def test_single_step_returns_x0():
    for name in ("unipc", "dpm++"):
        schedule = flow_schedule(1, 12.0, name)
        x, v = torch.randn(SHAPE), torch.randn(SHAPE)
        out = make_solver(name, schedule.sigmas).step(v, x)
        assert torch.isfinite(out).all()
        assert rel_l2(out, x.double() - schedule.sigmas[0].double() * v.double()) <= TOL


def test_solver_input_checks():
    sigmas = flow_schedule(4, 12.0, "unipc").sigmas
    for name in ("ddim", None, ["unipc"]):
        with pytest.raises(ValueError, match="solver must be one of unipc, dpm\\+\\+, euler"):
            make_solver(name, sigmas)
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_solver("euler", torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        make_solver("euler", torch.tensor([0.5]))
    with pytest.raises(ValueError, match="sigmas\\[0\\] < 1"):
        make_solver("unipc", flow_schedule(4, 12.0, "dpm++").sigmas)
    with pytest.raises(ValueError, match="shape"):
        make_solver("euler", sigmas).step(torch.zeros(2, 3), torch.zeros(3, 2))


def test_bf16_velocity_is_promoted_to_float32():
    sigmas = flow_schedule(3, 12.0, "unipc").sigmas
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out = make_solver("unipc", sigmas).step(v.bfloat16(), x)
    ref = make_solver("unipc", sigmas).step(v.bfloat16().float(), x)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
