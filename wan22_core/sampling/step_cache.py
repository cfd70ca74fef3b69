"""Runtime-adaptive step caching in the EasyCache manner: skip a model pass while reusing the last
transformation is estimated to stay accurate. Opt-in and inexact; threshold 0 is the exact loop.

The transformation of a step is what the model adds to its input: Delta_n = v_n - x_n (the guided
velocity minus the latent). A skipped step n returns x_n + Delta_tau, tau being the expert's last
step that ran, so its error is exactly Delta_n - Delta_tau. From the expert's last two passes that
ran we know how fast Delta moves with the latent,

    rate  = mean|Delta_tau - Delta_tau'| / mean|x_tau - x_tau'|,

and each later step adds its share of the relative velocity error that reuse would make,

    eps_n = rate * mean|x_n - x_{n-1}| / mean|v_tau|,     E_n = eps_{tau+1} + ... + eps_n.

The step reuses Delta_tau iff E_n < threshold; otherwise the model runs and E starts again from 0.
This is the EasyCache skeleton (arXiv 2507.02860, H-EmbodVis/EasyCache, ComfyUI's EasyCache node)
with one change: they measure the rate from the *output* change mean|v_tau - v_tau'|, which judges a
constant-output model perfectly stable although reusing its Delta is off by x_n - x_tau, and a
constant-Delta model (where reuse is exact) as changing. Thresholds are therefore not
interchangeable with theirs (their defaults: 0.05-0.06 authors, 0.2 ComfyUI).

Rules: state per expert, dropped at the expert switch (the low-noise expert never reuses a
high-noise value); each expert's first `warmup` steps run; the last step of the run runs; the
conditional and unconditional passes are one decision, because the cache wraps the loop's
guided prediction (one Delta for both equals two Deltas combined by the expert's constant
guidance scale, at half the memory); CFG 1 is the same call with one pass inside.

Multi-GPU: the decision reads only x (the loop's latent) and the guided velocity, which every rank
holds in full and bit-identical (Ulysses gathers the model output after the head, CFG-parallel
all-gathers both rows, guidance and the solver are the same arithmetic on every rank). Equal
inputs give equal reductions on equal GPUs, so all ranks decide alike with no communication. A
group mixing GPU models could round a reduction differently; there rank 0 would have to decide and
broadcast one flag per step (the cancel check's protocol).

Replicas (rank groups that sample different videos while FSDP's all-gathers span every rank)
see different latents and decide differently, and a replica that skipped would leave the others
waiting in an all-gather. So they agree per step through `agree` (the holder's
`agree_to_reuse`: one all-reduce of a flag over all ranks): a replica that would reuse still runs
the forward, and discards it, whenever any replica runs, so each video equals its own
one-process cached run; the pass is saved only when every replica reuses.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import STEP_CACHE_WARMUP, check_step_cache, is_integer


def _mean_abs(t: torch.Tensor) -> float:
    return torch.mean(t.abs(), dtype=torch.float64).item()


class _ExpertState:
    """What one expert's run so far tells about its next step."""

    def __init__(self, expert: str):
        self.expert = expert
        self.steps = 0  # steps of this expert so far, run or reused
        self.previous_input: torch.Tensor | None = None  # x of the previous step
        self.anchor_input: torch.Tensor | None = None  # x of the last step that ran
        self.transformation: torch.Tensor | None = None  # v - x of the last step that ran
        self.velocity_scale = 0.0  # mean|v| of the last step that ran
        self.rate: float | None = None  # how fast the transformation moves with x (module docstring)
        self.error = 0.0  # E: estimated relative velocity error accumulated since the last pass

    def accumulate(self, x: torch.Tensor) -> float:
        """Add this step's estimate; E since the last pass, or inf while it cannot be estimated."""
        if self.rate is None or not self.velocity_scale > 0:
            return math.inf
        self.error += self.rate * _mean_abs(x - self.previous_input) / self.velocity_scale
        return self.error

    def record(self, x: torch.Tensor, v: torch.Tensor) -> None:
        """The model ran on x and returned v: new anchor, new rate, E back to 0."""
        transformation = v - x
        if self.transformation is not None:
            moved = _mean_abs(x - self.anchor_input)
            # no input change, no rate: the next steps run until there is one
            self.rate = _mean_abs(transformation - self.transformation) / moved if moved > 0 else None
        self.anchor_input, self.transformation = x, transformation
        self.velocity_scale = _mean_abs(v)
        self.error = 0.0


class StepCache:
    """Decides per step whether the model runs; `ran` records whether each step ran a model pass
    (with replicas, a reused step whose forward still ran for another replica counts as run).

    Use one per sampling run, calling `velocity` once per step in order.
    """

    def __init__(self, threshold: float, warmup: int = STEP_CACHE_WARMUP,
                 agree: Callable[[bool], bool] | None = None):
        self.threshold = check_step_cache(threshold)
        if not is_integer(warmup) or warmup < 2:
            raise ValueError(f"step cache warmup must be an integer >= 2 (the rate needs two passes), got {warmup!r}")
        self.warmup = int(warmup)
        self.agree = agree  # this rank would reuse -> every replica reuses (None: one video at a time)
        self.ran: list[bool] = []
        self._state: _ExpertState | None = None

    def velocity(self, expert: str, x: torch.Tensor, compute: Callable[[], torch.Tensor], last: bool) -> torch.Tensor:
        """The velocity at latent x: `compute()` (the model pass: guided, cond+uncond) or x + the
        expert's last transformation. `last`: the run's final step, which always runs. x must not be
        changed in place afterwards (the loop's solvers return new tensors)."""
        if self.threshold == 0:  # off: exactly the loop without a cache, no statistics
            self.ran.append(True)
            return compute()
        if self._state is None or self._state.expert != expert:
            self._state = _ExpertState(expert)  # the switch: nothing of the other expert survives
        state = self._state
        may_reuse = not last and state.steps >= self.warmup  # the same steps on every rank
        reuse = may_reuse and state.accumulate(x) < self.threshold
        every_replica_reuses = self.agree(reuse) if may_reuse and self.agree is not None else reuse
        if reuse:
            if not every_replica_reuses:
                compute()  # another replica runs: join its collectives, keep this video's decision
            v, ran = x + state.transformation, not every_replica_reuses  # `ran`: the pass cost its time
        else:
            v, ran = compute(), True
            state.record(x, v)
        self.ran.append(ran)
        state.previous_input = x
        state.steps += 1
        return v

    @property
    def passes_run(self) -> int:
        return sum(self.ran)


def passes_summary(run: int, total: int) -> str:
    """The line the CLI and the sampler node show after a run (from `StepInfo.model_ran` counts)."""
    return f"{run} of {total} model passes run"
