"""Batched classifier-free-guidance sampling with per-sample seeds.

One UNet call per step serves both guidance branches (unconditional and conditional contexts
stacked in one batch); ``eps = uncond + UGS * (cond - uncond)``. UGS == 1 is exactly the
conditional branch and UGS == 0 exactly the unconditional one, so those run one branch (half
the work). Schedulers: :mod:`raysd.core.schedulers` (the released DDIM, DPM-Solver++, UniPC).

Every sample's initial noise comes from its own seed (:func:`raysd.core.seeds.derive_seed` of
the run seed and its sample_id), drawn on the CPU, so an image depends on its sample_id, not on
its batch. Arguments are trusted: settings are validated once, at the edge (config, CLI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from raysd.core.imaging import model_to_uint8
from raysd.core.models.class_encoder import ClassEncoder
from raysd.core.models.diffusion import BaseModel, NoiseSchedule
from raysd.core.schedulers import SchedulerName, make_scheduler
from raysd.errors import RaysdError

log = logging.getLogger("raysd")


@dataclass(frozen=True)
class SamplerParams:
    num_inference_steps: int  # IS
    guidance_scale: float  # UGS
    scheduler: SchedulerName = "ddim"


def initial_noise(seeds: list[int] | np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) float32 standard normal on the CPU, row i from ``seeds[i]`` alone."""
    g = torch.Generator("cpu")
    rows = []
    for s in seeds:
        g.manual_seed(int(s))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows) if rows else torch.zeros((0, *shape))


def _contexts(encoder: ClassEncoder, labels: torch.Tensor, ugs: float, dtype: torch.dtype,
              shortcuts: bool) -> torch.Tensor:
    """(N or 2N, L, D): [uncond; cond], or one branch when UGS makes the other irrelevant."""
    n, device = len(labels), labels.device
    cond = encoder.encode(labels).to(dtype)
    uncond = encoder(encoder.uncond_input(n, device).to(encoder.fc1.weight.dtype)).to(dtype)
    if shortcuts and ugs == 1.0:  # exact: uncond + 1 * (cond - uncond) == cond
        return cond
    if shortcuts and ugs == 0.0:  # exact: the unconditional branch alone
        return uncond
    return torch.cat([uncond, cond])


@torch.no_grad()
def sample_latents(base: BaseModel, encoder: ClassEncoder, labels: torch.Tensor, seeds: list[int] | np.ndarray,
                   params: SamplerParams, schedule: NoiseSchedule, *, shortcuts: bool = True) -> torch.Tensor:
    """One batch: labels (N,) and seeds (N,) -> final latents (N, C, h, w) float32 on the device.

    ``shortcuts=False`` always runs both guidance branches (the plain path the exact
    UGS == 0 / UGS == 1 shortcuts are tested against).
    """
    device, dtype = base.device, base.dtype
    ugs = float(params.guidance_scale)
    n = len(labels)
    x = initial_noise(seeds, base.latent_shape).to(device)
    context = _contexts(encoder, labels.to(device), ugs, dtype, shortcuts)
    sched = make_scheduler(params.scheduler, schedule, params.num_inference_steps)
    weight = base.unet.conv_in.weight
    fmt = (torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last)
           and not weight.is_contiguous() else torch.contiguous_format)
    for t in sched.timesteps:
        inp = (x if context.shape[0] == n else torch.cat([x, x])).contiguous(memory_format=fmt)
        tt = torch.full((inp.shape[0],), int(t), device=device, dtype=torch.long)
        eps = base.unet(inp.to(dtype), tt, encoder_hidden_states=context).sample.float()
        if eps.shape[0] != n:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + ugs * (eps_c - eps_u)
        x = sched.step(eps, t, x).prev_sample
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
        raise ValueError(f"generate: {len(labels)} labels but {len(seeds)} seeds")
    if len(labels) and (labels.min() < 0 or labels.max() >= encoder.num_classes):
        raise ValueError(f"generate: labels must lie in 0..{encoder.num_classes - 1}")
    sizes = [out_size] + ([full_size] if full_size else [])
    out: list[list[np.ndarray]] = [[] for _ in sizes]
    # a batch that ran out of CUDA memory was split: later batches (also later calls on this
    # model, e.g. the next shard of a generation actor) start at the size that fitted
    bs = min(batch_size, base.batch_limit or batch_size)
    lo = 0
    while lo < len(labels):
        hi = min(len(labels), lo + bs)
        lab, sds = labels[lo:hi], seeds[lo:hi]
        if pad_to and len(lab) < pad_to:
            extra = pad_to - len(lab)
            lab = torch.cat([lab, lab[-1:].repeat(extra)])
            sds = np.concatenate([sds, np.repeat(sds[-1:], extra)])
        images, fitted = _generate_batch(base, encoder, lab, sds, params, schedule, sizes)
        if fitted < len(lab):
            bs = base.batch_limit = fitted
            log.warning("generate: batches of %d from now on (CUDA out of memory at %d); set sampling.batch_size=%d",
                        fitted, len(lab), fitted)
        for acc, imgs in zip(out, images):
            acc.append(imgs[: hi - lo])
        if progress is not None:
            progress(hi - lo)
        lo = hi
    result = [np.concatenate(acc) if acc else np.zeros((0, *_pair(sz), 3), np.uint8) for acc, sz in zip(out, sizes)]
    return (result[0], result[1]) if full_size else result[0]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _generate_batch(base, encoder, labels, seeds, params, schedule, sizes) -> tuple[list[np.ndarray], int]:
    """The batch's images, and the largest part that ran at once (smaller than the batch when CUDA
    ran out of memory and the batch was split in halves)."""
    try:
        x = base.decode(sample_latents(base, encoder, labels, seeds, params, schedule))
        return [model_to_uint8(x, size).cpu().numpy() for size in sizes], len(labels)
    except torch.cuda.OutOfMemoryError:
        if len(labels) <= 1:
            raise RaysdError("generate: CUDA out of memory with a batch of 1; use a smaller model or resolution") from None
        torch.cuda.empty_cache()
        half = len(labels) // 2
        a, fa = _generate_batch(base, encoder, labels[:half], seeds[:half], params, schedule, sizes)
        b, fb = _generate_batch(base, encoder, labels[half:], seeds[half:], params, schedule, sizes)
        return [np.concatenate([u, v]) for u, v in zip(a, b)], min(fa, fb)
