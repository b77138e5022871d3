"""Diffusion training steps, plain PyTorch (the Ray Train stage wraps this).

Three kinds share one loop, differing in which module trains and where the context comes from:

* ``encoder`` (step 1): only the Class-Encoder trains; gradients flow through the frozen UNet;
* ``unet`` (step 3): only the UNet trains; the Class-Encoder is frozen at the chosen epoch;
* ``pretrain`` (offline demo only): the tiny UNet learns to denoise with a label-free,
  caption-like context (a fixed random projection of each image's PCA coefficients), standing
  in for SD's caption pretraining, which taught its cross-attention to read a context.

Objective (DESIGN.md section 1): epsilon-prediction MSE; t ~ U{0..T-1}; x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps; x0 drawn from the cached VAE posterior times the scaling factor.
AdamW, global grad-norm clip, cosine decay per step from lr to 0.

Determinism: the data order of epoch e is a permutation seeded by (seed, kind, e); every
random draw of a step comes from a generator seeded by (seed, kind, epoch, rank). So a run
resumed at an epoch boundary continues exactly as if it had not stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from raysd.config import TrainStepConfig
from raysd.models.class_encoder import ClassEncoder
from raysd.models.diffusion import NoiseSchedule

Kind = Literal["encoder", "unet", "pretrain"]
PCA_COMPONENTS = 8


@dataclass
class TrainData:
    """The training split as device tensors, rows ordered by sample_id."""

    labels: torch.Tensor  # (N,) int64
    mean: torch.Tensor  # (N, C, h, w) posterior mean (unscaled latents, or pixels in [-1, 1])
    logvar: torch.Tensor | None  # (N, C, h, w), None in pixel space

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any mix of ints and strings (stable across processes)."""
    ints = [p if isinstance(p, int) else int.from_bytes(str(p).encode()[:8].ljust(8, b"\0"), "little") for p in parts]
    state = np.random.SeedSequence(ints).generate_state(2, np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def steps_per_epoch(n: int, cfg: TrainStepConfig) -> int:
    """One pass over the data (full batches), unless the config sets a step count."""
    return cfg.steps_per_epoch or max(1, n // cfg.global_batch_size)


def cosine_factor(total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: cosine decay from 1 at step 0 to 0 at ``total_steps``."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def pca_context_projection(mean: torch.Tensor, seq_len: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample caption-like codes: the first PCA coefficients (unit variance) of each
    image, and a fixed random projection to a (seq_len, dim) context. Label-free."""
    x = mean.reshape(len(mean), -1).double()
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x / max(1, len(x) - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    k = min(PCA_COMPONENTS, x.shape[1])
    top = evecs[:, -k:].flip(1)
    top = top * torch.sign(top[top.abs().argmax(0), torch.arange(k)])  # fixed sign per component
    codes = (x @ top) / evals[-k:].flip(0).clamp_min(1e-12).sqrt()
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(k, seq_len * dim, generator=g, dtype=torch.float64) / math.sqrt(k)
    return codes.float(), proj.float()


class DiffusionTrainer:
    """One kind of diffusion training over in-memory data; one epoch per :meth:`run_epoch`."""

    def __init__(self, kind: Kind, cfg: TrainStepConfig, *, unet: torch.nn.Module, encoder: ClassEncoder | None,
                 data: TrainData, schedule: NoiseSchedule, scaling_factor: float, seed: int, device: torch.device,
                 rank: int = 0, world: int = 1, label_dropout: float = 0.0,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                 autocast_dtype: torch.dtype | None = None, pretrain_context: tuple[torch.Tensor, torch.Tensor] | None = None,
                 seq_len: int = 1, dim: int = 1):
        self.kind, self.cfg, self.data, self.device = kind, cfg, data, device
        self.seed, self.rank, self.world = seed, rank, world
        self.scaling_factor, self.label_dropout = scaling_factor, label_dropout
        self.autocast_dtype = autocast_dtype
        self.acp = schedule.alphas_cumprod().float().to(device)
        self.T = schedule.num_train_timesteps
        self.unet, self.encoder = unet, encoder
        trainable = encoder if kind == "encoder" else unet
        frozen = [m for m in (unet, encoder) if m is not None and m is not trainable]
        for m in frozen:
            m.requires_grad_(False)
            m.eval()
        trainable.requires_grad_(True)
        trainable.train()
        self.trainable = trainable
        self.model = wrap(trainable)  # DDP under Ray Train; the unwrapped module stays in .trainable
        if kind == "encoder":
            self.encoder_fn, self.unet_fn = self.model, unet
        else:
            self.encoder_fn, self.unet_fn = encoder, self.model
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-7, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = steps_per_epoch(len(data), cfg)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine_factor(self.total_steps))
        self.step = 0
        self.pretrain = None
        if pretrain_context is not None:
            codes, proj = pretrain_context
            self.pretrain = (codes.to(device), proj.to(device), seq_len, dim)

    # -- one step ------------------------------------------------------------------------------

    def _context(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.pretrain is not None:
            codes, proj, seq_len, dim = self.pretrain
            return (codes[idx] @ proj).view(len(idx), seq_len, dim)
        labels = self.data.labels[idx]
        assert self.encoder is not None
        onehot = self.encoder.training_input(labels, self.label_dropout, g)
        if self.kind == "encoder":
            return self.encoder_fn(onehot)
        with torch.no_grad():
            return self.encoder_fn(onehot)

    def _x0(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        mean = self.data.mean[idx]
        if self.data.logvar is None:
            return mean
        noise = torch.randn(mean.shape, generator=g, device="cpu").to(self.device)
        return (mean + torch.exp(0.5 * self.data.logvar[idx].clamp(-30, 20)) * noise) * self.scaling_factor

    def train_step(self, idx: torch.Tensor, g: torch.Generator) -> float:
        x0 = self._x0(idx, g)
        t = torch.randint(0, self.T, (len(idx),), generator=g, device="cpu").to(self.device)
        eps = torch.randn(x0.shape, generator=g, device="cpu").to(self.device)
        a = self.acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            ctx = self._context(idx, g)
            pred = self.unet_fn(x_t, t, encoder_hidden_states=ctx.to(x_t.dtype)).sample
        loss = F.mse_loss(pred.float(), eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip_norm)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return float(loss.detach())

    # -- one epoch -----------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.kind, "order", epoch))
        return torch.randperm(len(self.data), generator=g)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train epoch ``epoch`` (1-based); returns this worker's mean loss, images and seconds."""
        t0 = time.perf_counter()
        order = self.epoch_order(epoch)
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.kind, "steps", epoch, self.rank))
        b = self.cfg.global_batch_size
        losses = []
        images = 0
        for s in range(self.steps_per_epoch):
            idx_range = torch.arange(s * b, (s + 1) * b) % len(order)  # steps beyond one pass cycle the data
            batch = order[idx_range]
            idx = batch[self.rank :: self.world].to(self.device)
            losses.append(self.train_step(idx, g))
            images += len(idx)
        return {"loss": float(np.mean(losses)), "images": images, "seconds": time.perf_counter() - t0}

    # -- resume state --------------------------------------------------------------------------

    def resume_state(self) -> dict[str, Any]:
        return {"step": self.step, "lr_schedule": self.sched.state_dict()}

    def load_resume(self, optimizer_state: dict[str, Any], extra: dict[str, Any]) -> None:
        self.opt.load_state_dict(optimizer_state)
        self.sched.load_state_dict(extra["lr_schedule"])
        self.step = int(extra["step"])
