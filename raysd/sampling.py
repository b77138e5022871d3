"""Batched classifier-free-guidance sampling with per-sample seeds.

One UNet call per step serves both guidance branches (unconditional and conditional contexts
stacked in one batch); ``eps = uncond + UGS * (cond - uncond)``. UGS == 1 is exactly the
conditional branch and UGS == 0 exactly the unconditional one, so those run one branch (half
the work). Schedulers:

* ``ddim`` (eta 0) with the released code's step list, :func:`ddim_timesteps`:
  ``range(1, 1000, 1000 // IS)`` descending, so IS is not always the number of steps
  (IS=31 -> 1000 // 31 = 32 -> 32 steps; IS=50 -> 50 steps);
* ``dpmpp`` (DPM-Solver++ 2M) and ``unipc`` (UniPC) from diffusers, with exactly IS steps.

Every sample's initial noise comes from its own seed (:func:`sample_seed` of the run seed and
its sample_id), drawn on the CPU, so an image depends on its sample_id, not on its batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import numpy as np
import torch

from raysd.errors import RaysdError
from raysd.imaging import model_to_uint8
from raysd.models.class_encoder import ClassEncoder
from raysd.models.diffusion import BaseModel, NoiseSchedule

log = logging.getLogger("raysd")

SchedulerName = Literal["ddim", "dpmpp", "unipc"]


@dataclass(frozen=True)
class SamplerParams:
    num_inference_steps: int  # IS
    guidance_scale: float  # UGS
    scheduler: SchedulerName = "ddim"


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The released code's DDIM steps, descending: ``range(1, T, T // IS)[::-1]``.

    IS=50 -> [981, 961, ..., 1] (50 steps); IS=31 -> [993, 961, ..., 1] (32 steps).
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise RaysdError(f"num_inference_steps must be in [1, {num_train_timesteps}]; got {num_inference_steps}")
    return list(range(1, num_train_timesteps, num_train_timesteps // num_inference_steps))[::-1]


def sample_seed(run_seed: int, sample_id: int) -> int:
    """A 63-bit seed for one sample, from (run seed, sample_id) through NumPy's SeedSequence."""
    state = np.random.SeedSequence([int(run_seed), int(sample_id)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def initial_noise(seeds: list[int] | np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) float32 standard normal on the CPU, row i from ``seeds[i]`` alone."""
    g = torch.Generator("cpu")
    rows = []
    for s in seeds:
        g.manual_seed(int(s))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows) if rows else torch.zeros((0, *shape))


# --------------------------------------------------------------------------------------------
# Schedulers: an iterator of timesteps plus a step function


class ReleasedDDIM:
    """DDIM (eta 0) exactly as the released (keras-cv) code: alpha_prev of the last step = 1."""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int):
        acp = schedule.alphas_cumprod()
        self.timesteps = ddim_timesteps(num_inference_steps, schedule.num_train_timesteps)
        alphas = [float(acp[t]) for t in self.timesteps]
        self._pairs = list(zip(alphas, alphas[1:] + [1.0]))

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        a_t, a_prev = self._pairs[i]
        pred_x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * pred_x0 + (1.0 - a_prev) ** 0.5 * eps


class DiffusersScheduler:
    """DPM-Solver++ or UniPC with exactly IS steps (one instance per sampling run: stateful)."""

    def __init__(self, name: str, schedule: NoiseSchedule, num_inference_steps: int):
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

        cfg = schedule.diffusers_config()
        if name == "dpmpp":
            self.s = DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                 timestep_spacing="linspace")
        else:
            self.s = UniPCMultistepScheduler(**cfg, solver_order=2, timestep_spacing="linspace")
        self.s.set_timesteps(num_inference_steps)
        self.timesteps = [int(t) for t in self.s.timesteps]

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.s.step(eps, self.s.timesteps[i], x).prev_sample


def make_scheduler(name: str, schedule: NoiseSchedule, num_inference_steps: int) -> ReleasedDDIM | DiffusersScheduler:
    if name == "ddim":
        return ReleasedDDIM(schedule, num_inference_steps)
    if name in ("dpmpp", "unipc"):
        if num_inference_steps < 1:
            raise RaysdError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
        return DiffusersScheduler(name, schedule, num_inference_steps)
    raise RaysdError(f"unknown scheduler {name!r}; choose ddim, dpmpp or unipc")


# --------------------------------------------------------------------------------------------
# The sampler


@torch.no_grad()
def sample_latents(base: BaseModel, encoder: ClassEncoder, labels: torch.Tensor, seeds: list[int] | np.ndarray,
                   params: SamplerParams, schedule: NoiseSchedule, *, shortcuts: bool = True) -> torch.Tensor:
    """One batch: labels (N,) and seeds (N,) -> final latents (N, C, h, w) float32 on the device.

    ``shortcuts=False`` always runs both guidance branches (the plain path the exact
    UGS == 0 / UGS == 1 shortcuts are tested against).
    """
    device, dtype = base.device, base.dtype
    ugs = float(params.guidance_scale)
    if ugs < 0:
        raise RaysdError(f"guidance_scale must be >= 0; got {ugs}")
    n = len(labels)
    x = initial_noise(seeds, base.latent_shape).to(device)
    labels = labels.to(device)
    enc_dtype = encoder.fc1.weight.dtype
    cond = encoder.encode(labels).to(dtype)
    uncond = encoder(encoder.uncond_input(n, device).to(enc_dtype)).to(dtype)
    if shortcuts and ugs == 1.0:  # exact: uncond + 1 * (cond - uncond) == cond
        context = cond
    elif shortcuts and ugs == 0.0:  # exact: the unconditional branch alone
        context = uncond
    else:
        context = torch.cat([uncond, cond])
    sched = make_scheduler(params.scheduler, schedule, params.num_inference_steps)
    fmt = (torch.channels_last if base.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
           and not base.unet.conv_in.weight.is_contiguous() else torch.contiguous_format)
    for i, t in enumerate(sched.timesteps):
        inp = (x if context.shape[0] == n else torch.cat([x, x])).contiguous(memory_format=fmt)
        tt = torch.full((inp.shape[0],), t, device=device, dtype=torch.long)
        eps = base.unet(inp.to(dtype), tt, encoder_hidden_states=context).sample.float()
        if eps.shape[0] != n:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + ugs * (eps_c - eps_u)
        x = sched.step(eps, i, x)
    return x


def generate(base: BaseModel, encoder: ClassEncoder, labels: np.ndarray | torch.Tensor, seeds: list[int] | np.ndarray,
             params: SamplerParams, schedule: NoiseSchedule, *, out_size: int | tuple[int, int],
             batch_size: int = 256, progress: Callable[[int], None] | None = None,
             full_size: int | None = None, pad_to: int | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Images for ``labels``: (N, H, W, 3) uint8 at the classifier's resolution ``out_size``.

    Work is split into batches of ``batch_size``; on CUDA out-of-memory the batch is halved
    and retried (the per-sample seeds make the result independent of the split). With
    ``full_size``, also returns the same images at that size (e.g. SD's 128 px), decoded once.
    ``pad_to`` pads a short batch (the last) to that many samples, repeating its last one, and
    drops the extra images: one shape for a compiled UNet, the other samples unchanged.
    """
    labels = torch.as_tensor(np.array(labels, dtype=np.int64))  # a copy: Ray hands out read-only arrays
    seeds = np.asarray(seeds, dtype=np.int64)
    if len(labels) != len(seeds):
        raise RaysdError(f"generate: {len(labels)} labels but {len(seeds)} seeds")
    if len(labels) and (labels.min() < 0 or labels.max() >= encoder.num_classes):
        raise RaysdError(f"generate: labels must lie in 0..{encoder.num_classes - 1}")
    sizes = [out_size] + ([full_size] if full_size else [])
    out: list[list[np.ndarray]] = [[] for _ in sizes]
    for lo, hi in _batches(len(labels), batch_size):
        lab, sds = labels[lo:hi], seeds[lo:hi]
        if pad_to and len(lab) < pad_to:
            extra = pad_to - len(lab)
            lab = torch.cat([lab, lab[-1:].repeat(extra)])
            sds = np.concatenate([sds, np.repeat(sds[-1:], extra)])
        for acc, imgs in zip(out, _generate_batch(base, encoder, lab, sds, params, schedule, sizes)):
            acc.append(imgs[: hi - lo])
        if progress is not None:
            progress(hi - lo)
    result = [np.concatenate(acc) if acc else np.zeros((0, *_pair(sz), 3), np.uint8) for acc, sz in zip(out, sizes)]
    return (result[0], result[1]) if full_size else result[0]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, max(1, batch_size)):
        yield lo, min(n, lo + batch_size)


def _generate_batch(base, encoder, labels, seeds, params, schedule, sizes) -> list[np.ndarray]:
    try:
        x = base.decode(sample_latents(base, encoder, labels, seeds, params, schedule))
        return [model_to_uint8(x, size).cpu().numpy() for size in sizes]
    except torch.cuda.OutOfMemoryError:
        if len(labels) <= 1:
            raise RaysdError("generate: CUDA out of memory with a batch of 1; use a smaller model or resolution") from None
        torch.cuda.empty_cache()
        half = len(labels) // 2
        log.warning("generate: CUDA out of memory at batch %d; splitting into %d + %d (set sampling.batch_size=%d)",
                    len(labels), half, len(labels) - half, half)
        a = _generate_batch(base, encoder, labels[:half], seeds[:half], params, schedule, sizes)
        b = _generate_batch(base, encoder, labels[half:], seeds[half:], params, schedule, sizes)
        return [np.concatenate([u, v]) for u, v in zip(a, b)]
