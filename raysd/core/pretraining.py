"""Pretraining a tiny base without labels, the stand-in for Stable Diffusion's own pretraining.

Stable Diffusion's cross-attention learned to read a context from captions; a base pretrained
with a constant context never does (those weights get no gradient), and step 1 (the
Class-Encoder) then has nothing to steer. Here each image gets a label-free, caption-like context:
a fixed random projection of its first PCA coefficients (DESIGN.md section 5b). Ray-free and
deterministic on the CPU for a given thread count: ``raysd pretrain-base`` rebuilds the demo's
shipped base byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from raysd.config import TrainStepConfig
from raysd.core.diffusion_trainer import DiffusionTrainer, TrainData, TrainerConfig, pca_context_projection
from raysd.core.imaging import uint8_to_model
from raysd.core.models.diffusion import BaseModel, NoiseSchedule, build_tiny


@dataclass(frozen=True)
class PretrainSettings:
    """How the shipped tiny base is made (recorded in its provenance)."""

    steps: int = 2400
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    resolution: int = 16  # px the tiny pixel-space UNet sees (digits are 8x8 upsampled to 32x32)
    seq_len: int = 4  # context length, as the demo's Class-Encoder emits
    steps_per_epoch: int = 200  # a loss line every this many steps
    threads: int = 1  # CPU threads; the same count reproduces the same bytes


def pretrain_tiny_base(images: np.ndarray, settings: PretrainSettings,
                       progress: Callable[[int, float], None] | None = None) -> tuple[BaseModel, list[float]]:
    """Pretrain the ``tiny`` UNet on uint8 images (N, H, W, 3); returns it and the loss per epoch."""
    torch.set_num_threads(settings.threads)
    s = settings
    base = build_tiny("tiny", s.resolution, seed=s.seed)
    mean = uint8_to_model(images, s.resolution)  # pixel space: the "posterior" is the image itself
    data = TrainData(labels=torch.zeros(len(mean), dtype=torch.long), mean=mean, logvar=None,
                     captions=pca_context_projection(mean, s.seq_len, base.cross_attention_dim, s.seed))
    per_epoch = max(d for d in range(1, min(s.steps_per_epoch, s.steps) + 1) if s.steps % d == 0)
    epochs = s.steps // per_epoch  # exactly s.steps optimizer steps
    step = TrainStepConfig(epochs=epochs, global_batch_size=s.batch_size, lr=s.lr, weight_decay=0.0,
                           grad_clip_norm=1.0, steps_per_epoch=per_epoch)
    trainer = DiffusionTrainer(TrainerConfig(kind="pretrain", step=step, schedule=NoiseSchedule(), seed=s.seed),
                               unet=base.unet, encoder=None, data=data, device=torch.device("cpu"))
    losses = []
    for epoch in range(1, epochs + 1):
        losses.append(trainer.run_epoch(epoch)["loss"])
        if progress is not None:
            progress(epoch * per_epoch, losses[-1])
    base.unet.eval()
    return base, losses
