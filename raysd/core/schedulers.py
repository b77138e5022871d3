"""Sampling schedulers with diffusers' contract: ``set_timesteps(n)``, ``timesteps``,
``step(model_output, timestep, sample).prev_sample``.

* ``ddim`` (eta 0) with the released code's step list, :func:`ddim_timesteps`:
  ``range(1, 1000, 1000 // IS)`` descending, so IS is not always the number of steps
  (IS=31 -> 1000 // 31 = 32 -> 32 steps; IS=50 -> 50 steps);
* ``dpmpp`` (DPM-Solver++ 2M) and ``unipc`` (UniPC) from diffusers, with exactly IS steps.

Schedulers hold state (multistep solvers remember earlier outputs): one per sampling run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from raysd.core.models.diffusion import NoiseSchedule

SchedulerName = Literal["ddim", "dpmpp", "unipc"]


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The released code's DDIM steps, descending: ``range(1, T, T // IS)[::-1]``.

    IS=50 -> [981, 961, ..., 1] (50 steps); IS=31 -> [993, 961, ..., 1] (32 steps).
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}]; got {num_inference_steps}")
    return list(range(1, num_train_timesteps, num_train_timesteps // num_inference_steps))[::-1]


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor


class ReleasedDDIM:
    """DDIM (eta 0) exactly as the released (keras-cv) code: alpha_prev of the last step = 1."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.timesteps: list[int] = []
        self._alphas: dict[int, tuple[float, float]] = {}

    def set_timesteps(self, num_inference_steps: int) -> None:
        acp = self.schedule.alphas_cumprod()
        self.timesteps = ddim_timesteps(num_inference_steps, self.schedule.num_train_timesteps)
        alphas = [float(acp[t]) for t in self.timesteps]
        self._alphas = dict(zip(self.timesteps, zip(alphas, alphas[1:] + [1.0])))  # t -> (abar_t, abar_prev)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor) -> SchedulerOutput:
        a_t, a_prev = self._alphas[int(timestep)]
        x = sample
        eps = self.schedule.to_epsilon(model_output, x, a_t)
        pred_x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
        return SchedulerOutput(a_prev**0.5 * pred_x0 + (1.0 - a_prev) ** 0.5 * eps)


def make_scheduler(name: str, schedule: NoiseSchedule, num_inference_steps: int) -> Any:
    """A fresh scheduler with its timesteps set (names: ddim, dpmpp, unipc)."""
    if name == "ddim":
        sched: Any = ReleasedDDIM(schedule)
    elif name in ("dpmpp", "unipc"):
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

        cfg = schedule.diffusers_config()
        sched = (DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2,
                                             timestep_spacing="linspace") if name == "dpmpp" else
                 UniPCMultistepScheduler(**cfg, solver_order=2, timestep_spacing="linspace"))
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose ddim, dpmpp or unipc")
    sched.set_timesteps(num_inference_steps)
    return sched
