"""The Ray Train worker of the training stage: read the latent cache (straight from the run's
storage) into device memory, build the models, wrap the trained one with ``prepare_model`` (DDP)
and run the Ray-free :class:`~raysd.core.diffusion_trainer.DiffusionTrainer` one epoch at a
time, reporting a checkpoint per epoch (rank 0 writes it; Ray persists it under
RUN/checkpoints/KIND/epoch_NNN/).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch

from raysd.core.diffusion_trainer import DiffusionTrainer, TrainData, TrainerConfig, pca_context_projection
from raysd.config import Config, TrainStepConfig
from raysd.core.lora import LoraSpec, adapter_state, add_lora, load_adapter
from raysd.core.models.class_encoder import ClassEncoder
from raysd.core.models.diffusion import NoiseSchedule
from raysd.core.precision import training_autocast
from raysd.data import checkpoints as ck
from raysd.data import latents
from raysd.errors import RaysdError
from raysd.faults import maybe_fail
from raysd.run.rundir import Run


@dataclass
class TrainJob:
    """Everything a training worker needs (crosses Ray as it is)."""

    run: Run
    kind: str
    base: str  # base model spec the workers load
    step: TrainStepConfig
    config_hash: str  # what the checkpoints were made with (refused on resume when it differs)
    encoder_epoch: int | None  # step 3: the frozen Class-Encoder's epoch
    device: str
    cache: str  # the latent cache (raysd.data.latents) every worker reads whole
    accepted_hashes: tuple[str, ...] = ()  # the same settings as an earlier raysd hashed them (resumable too)
    lora: LoraSpec | None = None  # step 3 through a LoRA adapter (finetune.method=lora)
    base_identity: str = ""  # the base's identity (an adapter's checkpoint records it)


def schedule_of(cfg: Config) -> NoiseSchedule:
    m = cfg.model
    return NoiseSchedule(m.beta_start, m.beta_end, m.num_train_timesteps, m.prediction_type)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job: TrainJob = config["job"]
    cfg = job.run.cfg
    ck.sweep_tmpdirs()  # what a worker killed here before left behind
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(worker_threads(cfg.resources.torch_threads, cfg.resources.cpus_per_worker,
                                             ctx.get_local_world_size()))
    data = _load_cache(job.cache, device)
    base, encoder = _build_models(job, device)
    frozen = base.unet if job.kind == "encoder" else encoder
    digest_start = ck.module_digest(frozen) if frozen is not None and rank == 0 else ""
    if job.kind == "pretrain":
        data.captions = pca_context_projection(data.mean.cpu(), cfg.model.seq_len, base.cross_attention_dim, cfg.seed)
    tcfg = TrainerConfig(kind=job.kind, step=job.step, schedule=schedule_of(cfg),  # type: ignore[arg-type]
                         scaling_factor=base.scaling_factor, seed=cfg.seed, rank=rank, world=world,
                         label_dropout=cfg.model.label_dropout if cfg.model.null_class else 0.0,
                         autocast_dtype=training_autocast(cfg.model.precision, device), adapter=job.lora is not None)
    base.vae = None  # the posteriors are cached: the VAE is not needed while training
    if job.step.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    if job.kind == "encoder" and cfg.model.frozen_dtype == "bf16" and tcfg.autocast_dtype is not None:
        base.unet.to(torch.bfloat16)  # frozen: only read (its gradients flow to the context, not kept)
    trainer = DiffusionTrainer(tcfg, unet=base.unet, encoder=encoder, data=data, device=device,
                               wrap=ray.train.torch.prepare_model if world > 1 else None)
    start = _resume(trainer, job)
    for epoch in range(start + 1, job.step.epochs + 1):
        stats = trainer.run_epoch(epoch)
        maybe_fail(f"train_epoch_{epoch}")  # fault tests: the worker dies with this epoch trained, not saved
        metrics = {"epoch": epoch, "loss": stats["loss"] if world == 1 else _global_mean(stats["loss_sum"],
                                                                                        stats["loss_terms"], device),
                   "images": stats["images"], "seconds": stats["seconds"], "step": trainer.step}
        if epoch == job.step.epochs and rank == 0 and frozen is not None:
            metrics.update(frozen_digest_start=digest_start, frozen_digest_end=ck.module_digest(frozen))
        _report_epoch(trainer, job, epoch, metrics, rank, encoder)


def worker_threads(torch_threads: int | None, cpus_per_worker: float, local_workers: int) -> int:
    """CPU threads of one training worker: ``torch_threads`` (else its CPU reservation), never more
    than this node's cores shared among the workers on it (more would oversubscribe them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = torch_threads or max(1, int(cpus_per_worker))
    return max(1, min(want, cores // max(1, local_workers)))


def _load_cache(cache: str, device: torch.device) -> TrainData:
    labels, mean, logvar = latents.read_cache(cache)
    return TrainData(labels=torch.from_numpy(labels).to(device), mean=torch.from_numpy(mean).to(device),
                     logvar=torch.from_numpy(logvar).to(device) if logvar is not None else None)


def _build_models(job: TrainJob, device: torch.device):
    from raysd.data.models import load_base_model

    cfg = job.run.cfg
    base = load_base_model(job.base, resolution=cfg.model.resolution, dtype=torch.float32, device=device, seed=cfg.seed,
                           schedule=schedule_of(cfg))
    if job.kind == "pretrain":
        return base, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = ClassEncoder(job.run.num_classes, cfg.model.seq_len, base.cross_attention_dim, cfg.model.hidden_dim,
                               cfg.model.null_class)
    if job.kind == "unet":
        state, _ = ck.load_weights(ck.epoch_dir(job.run.ckpt_root("encoder"), job.encoder_epoch))
        encoder.load_state_dict(state)
        if job.lora is not None:
            add_lora(base.unet, job.lora, seed=cfg.seed)
    return base, encoder.to(device)


def _resume(trainer: DiffusionTrainer, job: TrainJob) -> int:
    """Load the newest complete checkpoint into ``trainer``; returns its epoch (0: none).

    Ray's record of the latest reported checkpoint comes first (a restarted worker, or a rerun
    of the same run); a scan of the run directory covers a record lost in a crash.
    """
    root = job.run.ckpt_root(job.kind)
    epoch = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        m = re.match(r"epoch_(\d+)$", ckpt.path.rstrip("/").rsplit("/", 1)[-1])
        epoch = int(m.group(1)) if m else None
    if epoch is None or not ck.is_resumable(root, epoch):
        epoch = ck.latest_resumable(root)
    if epoch is None:
        return 0
    directory = ck.epoch_dir(root, epoch)
    state, meta = ck.load_weights(directory)
    if meta.get("config_hash") not in (job.config_hash, *job.accepted_hashes):
        raise RaysdError(f"checkpoint {directory} was made with other settings; use --restart")
    if job.lora is not None:
        load_adapter(trainer.trainable, state)
    else:
        trainer.trainable.load_state_dict(state)
    opt_state, extra = ck.load_resume_state(root, epoch)
    trainer.load_resume(opt_state, extra)
    print(f"[raysd] resuming {meta.get('kind')} after epoch {meta['epoch']} from {directory}", flush=True)
    return int(meta["epoch"])


def _global_mean(squared: float, terms: int, device: torch.device) -> float:
    """The epoch's loss over every worker's terms (each worker's share may differ, or be empty)."""
    import torch.distributed as dist

    t = torch.tensor([squared, float(terms)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0].item()) / max(float(t[1].item()), 1.0)


def _checkpoint_meta(trainer: DiffusionTrainer, job: TrainJob, epoch: int, metrics: dict,
                     encoder: ClassEncoder | None) -> dict[str, Any]:
    meta = {"kind": job.kind, "epoch": epoch, "loss": metrics["loss"], "step": trainer.step,
            "config_hash": job.config_hash, "encoder_epoch": job.encoder_epoch,
            "module": "class_encoder" if job.kind == "encoder" else "unet",
            **{k: v for k, v in metrics.items() if k.startswith("frozen_digest")}}
    if encoder is not None:
        meta["class_encoder"] = {"num_classes": encoder.num_classes, "seq_len": encoder.seq_len, "dim": encoder.dim,
                                 "hidden_dim": encoder.fc1.out_features, "null_class": encoder.null_class}
    if job.lora is not None:  # an adapter: the base it belongs to is recorded, and checked where it is loaded
        meta["adapter"] = job.lora.to_json()
        meta["base_identity"] = job.base_identity
    return meta


def _report_epoch(trainer: DiffusionTrainer, job: TrainJob, epoch: int, metrics: dict, rank: int,
                  encoder: ClassEncoder | None) -> None:
    """Rank 0 writes the resume state straight to the run directory and the epoch's weights into a
    local directory that Ray uploads in the background and then deletes; nothing registered is
    ever edited afterwards, and nothing of it stays on the worker's disk."""
    from ray.train import Checkpoint, CheckpointUploadMode

    cfg, root = job.run.cfg, job.run.ckpt_root(job.kind)
    checkpoint = None
    if rank == 0:
        local = ck.local_tmpdir()
        state = adapter_state(trainer.trainable) if job.lora is not None else trainer.trainable.state_dict()
        sha = ck.write_checkpoint(local, model_state=state,
                                  meta=_checkpoint_meta(trainer, job, epoch, metrics, encoder),
                                  dtype=cfg.encoder.checkpoint_dtype if job.kind == "encoder" else
                                  cfg.finetune.checkpoint_dtype)
        maybe_fail(f"checkpoint_staged_{epoch}")  # fault tests: killed before Ray took the staged copy
        ck.write_resume(root, epoch, optimizer_state=trainer.opt.state_dict(), extra=trainer.resume_state(),
                        weights_sha=sha)
        checkpoint = Checkpoint.from_directory(local)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:03d}",
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True)
