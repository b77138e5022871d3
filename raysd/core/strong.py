"""The strong classifier protocol's parts (``cas.protocol=strong``; :mod:`raysd.core.cas` runs it):
batch, optimiser constants, the one-cycle schedule and the crop-and-flip augmentation, on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRONG_BATCH = 128
STRONG_MOMENTUM = 0.9
STRONG_WEIGHT_DECAY = 5e-4
STRONG_WARMUP = 0.2  # share of the steps


def one_cycle(step: int, total: int, peak: float) -> float:
    """The strong protocol's LR at ``step`` (0-based) of ``total``: a linear warm-up from peak/10 over
    the first 20 % of the steps, then a linear decay that reaches 0 after the last step."""
    warm = max(1, round(STRONG_WARMUP * total))
    if step < warm:
        return peak * (0.1 + 0.9 * step / warm)
    return peak * max(0.0, (total - step) / max(1, total - warm))


def crop_and_flip(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random crops of the reflect-padded batch (padding 1/8 of the side, at least 1 px) and, with
    ``flip``, random horizontal flips; the draws come from ``gen`` (a CPU generator) for any device."""
    b, c, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = xp[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
             rows, cols]
    if flip:
        mirror = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        out = torch.where(mirror, out.flip(3), out)
    return out.contiguous(memory_format=torch.channels_last)
