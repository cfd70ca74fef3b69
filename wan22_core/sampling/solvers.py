"""The three flow-matching solvers: UniPC (official default), DPM++ 2M and Euler.

Conventions (rectified flow): x_sigma = (1 - sigma) * x0 + sigma * noise and the model predicts
the velocity v = noise - x0, so the data prediction is x0 = x - sigma * v. The multistep solvers
work in log-SNR time lambda = log(alpha / sigma) with alpha = 1 - sigma.

A solver is one trajectory: `step(v, x)` takes the model output at sigmas[i] and the sample at
sigmas[i] and returns the sample at sigmas[i+1]. Scalar coefficients are Python float64 computed
from the float32 sigmas (no device syncs); tensor math is a few fused float32 ops per step.
"""
from __future__ import annotations

import math

import torch


class Solver:
    """Base of the three solvers: owns the sigmas, the step index and the input checks."""

    def __init__(self, sigmas: torch.Tensor):
        values = torch.as_tensor(sigmas).detach().flatten().tolist()
        if len(values) < 2:
            raise ValueError(f"sigmas must hold at least 2 values (one step), got {len(values)}")
        if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in values):
            raise ValueError(f"sigmas must be finite and in [0, 1], got {values}")
        if any(a <= b for a, b in zip(values, values[1:])):
            raise ValueError(f"sigmas must be strictly decreasing, got {values}")
        self.sigmas = values  # Python floats: coefficients never touch the device
        self.num_steps = len(values) - 1
        self.index = 0  # how many steps have been taken

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance from sigmas[index] to sigmas[index + 1]; returns a new float32 tensor.

        The solver keeps references to tensors it made and to `sample`, so callers must not
        modify `sample` in place afterwards.
        """
        if self.index >= self.num_steps:
            raise RuntimeError(
                f"{type(self).__name__} has already taken all {self.num_steps} steps of its schedule; "
                "make a new solver for each trajectory"
            )
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
        out = self._update(self.index, velocity, sample.to(torch.float32))
        self.index += 1
        return out

    def _update(self, i: int, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _log_snr(sigma: float) -> float:
    """lambda = log((1 - sigma) / sigma), with its limits: +inf at sigma 0, -inf at sigma 1."""
    if sigma == 0.0:
        return math.inf
    if sigma == 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)  # 1 - sigma is exact in float64


class EulerSolver(Solver):
    """x_next = x + (sigma_next - sigma) * v: the first-order flow ODE step."""

    def _update(self, i, v, x):
        return torch.add(x, v, alpha=self.sigmas[i + 1] - self.sigmas[i])


class DPMPP2MSolver(Solver):
    """DPM-Solver++(2M), midpoint variant, data prediction (official `dpm++`, order 2).

    First order at the first step (no history) and at the last, where sigma_next = 0 makes the
    update collapse to x0. A grid that starts at sigma = 1 (lambda = -inf) needs no special
    case: the first step reduces to x_next = sigma_next * x + alpha_next * x0, and the second
    step's history term gets weight 0.
    """

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self._lambdas = [_log_snr(s) for s in self.sigmas]
        self._prev_x0 = None  # data prediction of the previous step

    def _update(self, i, v, x):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = torch.add(x, v, alpha=-sigma)
        prev_x0, self._prev_x0 = self._prev_x0, x0
        if sigma_next == 0.0:
            return x0
        h = self._lambdas[i + 1] - self._lambdas[i]
        gain = (1.0 - sigma_next) * -math.expm1(-h)  # alpha_next * (1 - e^-h), weight of D
        out = torch.mul(x, sigma_next / sigma)
        if prev_x0 is None:
            return out.add_(x0, alpha=gain)
        # Midpoint: D = x0 + (x0 - prev_x0) / (2 r), r = h_prev / h.
        k = 0.5 * h / (self._lambdas[i] - self._lambdas[i - 1])
        return out.add_(x0, alpha=gain * (1.0 + k)).add_(prev_x0, alpha=-gain * k)


class UniPCSolver(Solver):
    """UniPC, bh2, order 2, data prediction: the official Wan2.2 default.

    Each step first applies the corrector UniC to the previous predictor's result, using this
    step's model output (free: no extra model call), then the predictor UniP. The predictor order
    is min(2, steps left, steps taken + 1), i.e. 1 at the first and last step; the corrector
    reuses the order of the predictor it corrects. With bh2, B(h) = expm1(-h) = h*phi_1(-h), so
    one `phi` serves both roles below.
    """

    def __init__(self, sigmas):
        super().__init__(sigmas)
        if self.sigmas[0] >= 1.0:
            raise ValueError(
                f"UniPC needs sigmas[0] < 1 (finite log-SNR), got {self.sigmas[0]}; build the schedule "
                "with flow_schedule(steps, shift, 'unipc'), which starts at 0.999"
            )
        self._lambdas = [_log_snr(s) for s in self.sigmas]
        self._x0s = []  # data predictions of the last two steps, newest last
        self._last_sample = None  # the (corrected) sample the previous predictor started from
        self._last_order = 0

    def _update(self, i, v, x):
        x0 = torch.add(x, v, alpha=-self.sigmas[i])
        if self.sigmas[i + 1] == 0.0:
            # lambda_next = inf: the order-1 predictor multiplies the sample by sigma_next = 0 and
            # returns x0 exactly, so the corrected sample would be discarded; skip computing it.
            return x0
        if i > 0:
            x = self._correct(i, x, x0)
        order = min(2, self.num_steps - i, i + 1)
        out = self._predict(i, x, x0, order)
        self._x0s = self._x0s[-1:] + [x0]
        self._last_sample, self._last_order = x, order
        return out

    def _coefficients(self, s: int, t: int) -> tuple[float, float, float]:
        """h, sample weight and x0 weight of the exponential-integrator step from s to t."""
        h = self._lambdas[t] - self._lambdas[s]
        phi = math.expm1(-h)
        return h, self.sigmas[t] / self.sigmas[s], (1.0 - self.sigmas[t]) * phi

    def _predict(self, i, x, x0, order):
        """UniP from sigmas[i] to sigmas[i+1]: x' = a x - g (x0 + rho D1), rho = 1/2 for order 2."""
        h, a, g = self._coefficients(i, i + 1)
        out = torch.mul(x, a)
        if order == 1:
            return out.add_(x0, alpha=-g)
        # D1 = (x0_prev - x0) / r with r = (lambda_prev - lambda_i) / h.
        k = 0.5 * h / (self._lambdas[i - 1] - self._lambdas[i])
        return out.add_(x0, alpha=-g * (1.0 - k)).add_(self._x0s[-1], alpha=-g * k)

    def _correct(self, i, x, x0):
        """UniC: redo the step sigmas[i-1] -> sigmas[i] with the model output now known at i."""
        h, a, g = self._coefficients(i - 1, i)
        m0 = self._x0s[-1]  # x0 at i-1
        out = torch.mul(self._last_sample, a)
        if self._last_order == 1:
            # x_c = a x_last - g (m0 + (x0 - m0) / 2)
            return out.add_(m0, alpha=-0.5 * g).add_(x0, alpha=-0.5 * g)
        # Order 2: solve [[1, 1], [r, 1]] rho = b for the weights of D1 = (m1 - m0) / r and of
        # (x0 - m0), where r = (lambda_{i-2} - lambda_{i-1}) / h and b matches the phi-function
        # Taylor terms of the bh2 scheme.
        m1 = self._x0s[-2]
        r = (self._lambdas[i - 2] - self._lambdas[i - 1]) / h
        phi = math.expm1(-h)
        k1 = phi / -h - 1.0
        b1 = k1 / phi
        b2 = 2.0 * (k1 / -h - 0.5) / phi
        rho_d = (b1 - b2) / (1.0 - r)
        rho_t = b1 - rho_d
        w1 = rho_d / r
        out.add_(m0, alpha=-g * (1.0 - w1 - rho_t))
        return out.add_(m1, alpha=-g * w1).add_(x0, alpha=-g * rho_t)


_SOLVER_TYPES = {"unipc": UniPCSolver, "dpm++": DPMPP2MSolver, "euler": EulerSolver}


def make_solver(name: str, sigmas: torch.Tensor) -> Solver:
    """A fresh solver for one trajectory over `sigmas` (from `flow_schedule` for the same name)."""
    if not isinstance(name, str) or name not in _SOLVER_TYPES:  # config.SOLVERS names the same keys (tests/test_solvers.py checks)
        raise ValueError(f"solver must be one of {', '.join(_SOLVER_TYPES)}; got {name!r}")
    return _SOLVER_TYPES[name](sigmas)
