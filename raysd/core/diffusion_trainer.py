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
from raysd.core.models.class_encoder import ClassEncoder
from raysd.core.models.diffusion import NoiseSchedule
from raysd.core.seeds import derive_seed
from raysd.errors import RaysdError

Kind = Literal["encoder", "unet", "pretrain"]
PCA_COMPONENTS = 8


@dataclass
class TrainData:
    """The training split as device tensors, rows ordered by sample_id."""

    labels: torch.Tensor  # (N,) int64
    mean: torch.Tensor  # (N, C, h, w) posterior mean (unscaled latents, or pixels in [-1, 1])
    logvar: torch.Tensor | None  # (N, C, h, w), None in pixel space
    captions: "CaptionContext | None" = None  # pretraining only: the label-free context per sample

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def steps_per_epoch(n: int, cfg: TrainStepConfig) -> int:
    """One pass over the data, the last batch partial as the released code keeps it (DermaMNIST's
    7,007 images at 64 give 109 full batches + 31 images), unless the config sets a step count."""
    return cfg.steps_per_epoch or max(1, math.ceil(n / cfg.global_batch_size))


def cosine_factor(total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: cosine decay from 1 at step 0 to 0 at ``total_steps``."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


@dataclass
class CaptionContext:
    """Pretraining's stand-in for captions: per-sample codes (N, k) and a fixed projection
    (k, L*D) to a (L, D) context."""

    codes: torch.Tensor
    proj: torch.Tensor
    seq_len: int
    dim: int

    def to(self, device: torch.device) -> "CaptionContext":
        return CaptionContext(self.codes.to(device), self.proj.to(device), self.seq_len, self.dim)

    def context(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.codes[idx] @ self.proj).view(len(idx), self.seq_len, self.dim)


@dataclass
class TrainerConfig:
    """What a :class:`DiffusionTrainer` needs besides its modules and data."""

    kind: Kind
    step: TrainStepConfig  # epochs, batch, lr, weight decay, clip, steps per epoch
    schedule: NoiseSchedule
    scaling_factor: float = 1.0  # VAE latent scaling (SD: 0.18215); 1 in pixel space
    seed: int = 0
    rank: int = 0  # data-parallel position (Ray Train world rank) and size
    world: int = 1
    label_dropout: float = 0.0  # null-class substitution probability (CFG training)
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast on CUDA; None: fp32
    adapter: bool = False  # the trained module carries an adapter (LoRA): only its weights train


def pca_context_projection(mean: torch.Tensor, seq_len: int, dim: int, seed: int) -> CaptionContext:
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
    return CaptionContext(codes.float(), proj.float(), seq_len, dim)


def make_optimizer(params: list[torch.nn.Parameter], step: TrainStepConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as the released SD_adapting.py (Adam with weight_decay=0.004, epsilon=1e-8: decoupled
    decay); fused on CUDA, or bitsandbytes' 8-bit AdamW to fit a UNet's moments on a smaller card."""
    kw = dict(lr=step.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=step.weight_decay)
    if step.optimizer == "adamw_8bit":
        if device.type != "cuda":
            raise RaysdError("optimizer adamw_8bit runs on CUDA only; use adamw on the CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RaysdError("optimizer adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)


class DiffusionTrainer:
    """One kind of diffusion training over in-memory data; one epoch per :meth:`run_epoch`.

    ``wrap`` wraps the trained module for data parallelism (Ray Train's DDP); the unwrapped one
    stays in ``.trainable`` (its state_dict is what checkpoints store)."""

    def __init__(self, cfg: TrainerConfig, *, unet: torch.nn.Module, encoder: ClassEncoder | None, data: TrainData,
                 device: torch.device, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        self.cfg, self.data, self.device = cfg, data, device
        self.acp = cfg.schedule.alphas_cumprod().float().to(device)
        self.T = cfg.schedule.num_train_timesteps
        self.unet, self.encoder = unet, encoder
        trainable = encoder if cfg.kind == "encoder" else unet
        for m in (unet, encoder):
            if m is not None and m is not trainable:
                m.requires_grad_(False)
                m.eval()
        if not cfg.adapter:  # with an adapter, the adapter alone requires gradients (raysd.core.lora)
            trainable.requires_grad_(True)
        trainable.train()
        self.trainable = trainable
        self.model = wrap(trainable) if wrap is not None else trainable
        if cfg.kind == "encoder":
            self.encoder_fn, self.unet_fn = self.model, unet
        else:
            self.encoder_fn, self.unet_fn = encoder, self.model
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        step = cfg.step
        self.opt = make_optimizer(self.params, step, device)
        self.steps_per_epoch = steps_per_epoch(len(data), step)
        self.total_steps = self.steps_per_epoch * step.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine_factor(self.total_steps))
        self.step = 0
        self.captions = data.captions.to(device) if data.captions is not None else None

    # -- one step ------------------------------------------------------------------------------

    def _context(self, idx: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """(B, L, D) context of samples ``idx``; ``drop`` marks those whose label becomes the null class."""
        if self.captions is not None:
            return self.captions.context(idx)
        assert self.encoder is not None
        labels = self.data.labels[idx]
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.encoder.num_classes), labels)
        onehot = self.encoder.one_hot(labels)
        if self.cfg.kind == "encoder":
            return self.encoder_fn(onehot)
        with torch.no_grad():
            return self.encoder_fn(onehot)

    def _draws(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor | None]:
        """The random draws of a step for the whole global batch, on the CPU, in a fixed order:
        every data-parallel rank draws the same and keeps its share, so N workers train exactly
        as one would (same noise per sample, gradients averaged over the same global batch)."""
        shape = (n, *self.data.mean.shape[1:])
        out: dict[str, torch.Tensor | None] = {
            "posterior": torch.randn(shape, generator=g, device="cpu") if self.data.logvar is not None else None}
        out["t"] = torch.randint(0, self.T, (n,), generator=g, device="cpu")
        out["eps"] = torch.randn(shape, generator=g, device="cpu")
        dropout = self.cfg.label_dropout if self.encoder is not None and self.encoder.null_class else 0.0
        out["drop"] = torch.rand((n,), generator=g, device="cpu") < dropout if dropout > 0 and self.captions is None \
            else None
        return out

    def step_terms(self, batch: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, float, int, float]:
        """This rank's part of one step on the global batch ``batch`` (sample indices): its share is
        ``batch[rank::world]``. Returns (what to backpropagate, the sum of its squared errors, how
        many terms that sum has, its mean). With several ranks the backpropagated term is the sum
        over the global batch's term count, times ``world``: data parallelism averages the ranks'
        gradients, so their mean is the gradient of the global batch's mean loss exactly, however
        the batch splits, also when a rank's share is empty (it then runs one sample weighted 0,
        so it still takes part). One process backpropagates the plain mean, bit for bit as ever."""
        c = self.cfg
        draws = self._draws(len(batch), g)
        mine = torch.arange(c.rank, len(batch), c.world)
        empty = len(mine) == 0
        if empty:
            mine = torch.zeros(1, dtype=torch.long)
        idx = batch[mine].to(self.device)
        share = {k: v[mine].to(self.device) if v is not None else None for k, v in draws.items()}
        x0 = self.data.mean[idx]
        if share["posterior"] is not None:
            x0 = (x0 + torch.exp(0.5 * self.data.logvar[idx].clamp(-30, 20)) * share["posterior"]) * c.scaling_factor
        t, eps = share["t"], share["eps"]
        a = self.acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
        target = c.schedule.target(x0, eps, a)
        with torch.autocast(self.device.type, dtype=c.autocast_dtype or torch.float32,
                            enabled=c.autocast_dtype is not None):
            ctx = self._context(idx, share["drop"])
            pred = self.unet_fn(x_t, t, encoder_hidden_states=ctx.to(x_t.dtype)).sample
        if c.world == 1:
            loss = F.mse_loss(pred.float(), target)
            mean = float(loss.detach())
            return loss, mean * target.numel(), int(target.numel()), mean
        squared = (pred.float() - target).pow(2).sum() * (0.0 if empty else 1.0)
        terms = 0 if empty else int(target.numel())
        per_sample = int(target[0].numel())
        local = float(squared.detach())
        return squared * (c.world / (len(batch) * per_sample)), local, terms, local / max(terms, 1)

    def train_step(self, batch: torch.Tensor, g: torch.Generator) -> tuple[float, int, float]:
        """One optimizer step on the global batch ``batch``; returns this rank's (sum of squared
        errors, terms, mean): the step's mean loss is the ranks' sums divided."""
        loss, squared, terms, mean = self.step_terms(batch, g)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.step.grad_clip_norm)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return squared, terms, mean

    # -- one epoch -----------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.cfg.kind, "order", epoch))
        return torch.randperm(len(self.data), generator=g)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train epoch ``epoch`` (1-based); returns this worker's mean of its step losses, its sum of
        squared errors and term count (across workers the epoch's loss is the sums divided: every
        term of the epoch weighs the same, a partial last batch included), images and seconds."""
        t0 = time.perf_counter()
        order = self.epoch_order(epoch)
        c = self.cfg
        g = torch.Generator().manual_seed(derive_seed(c.seed, c.kind, "steps", epoch))  # same on every rank
        b = c.step.global_batch_size
        squared, terms, images, means = 0.0, 0, 0, []
        cycle = c.step.steps_per_epoch is not None  # a set step count cycles the data; else one pass
        for s in range(self.steps_per_epoch):
            batch = order[torch.arange(s * b, (s + 1) * b) % len(order)] if cycle else order[s * b : (s + 1) * b]
            sq, n, mean = self.train_step(batch, g)
            squared, terms = squared + sq, terms + n
            means.append(mean)
            images += len(batch[c.rank :: c.world])
        return {"loss": float(np.mean(means)), "loss_sum": squared, "loss_terms": terms, "images": images,
                "seconds": time.perf_counter() - t0}

    # -- resume state --------------------------------------------------------------------------

    def resume_state(self) -> dict[str, Any]:
        return {"step": self.step, "lr_schedule": self.sched.state_dict()}

    def load_resume(self, optimizer_state: dict[str, Any], extra: dict[str, Any]) -> None:
        self.opt.load_state_dict(optimizer_state)
        self.sched.load_state_dict(extra["lr_schedule"])
        self.step = int(extra["step"])
