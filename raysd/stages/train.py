"""Stage: diffusion training on Ray Train (step 1 Class-Encoder, step 3 UNet, demo pretraining).

The driver prepares the data, caches the VAE posteriors of the train split once (Ray Data,
one encoder actor per GPU; for a pixel-space base the resized images, on the driver), then
runs a ``TorchTrainer`` whose workers run
:func:`~raysd.stages.train_worker.train_loop_per_worker` with one ``TrainJob``. After each
epoch rank 0 writes a checkpoint that Ray persists to ``RUN/checkpoints/KIND/epoch_NNN/``; a
rerun (or a restarted worker) resumes from the newest complete one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import numpy as np

import ray.data
import ray.train
from ray.train import UserCallback

from raysd.config import Config, TrainStepConfig
from raysd.core.lora import LoraSpec
from raysd.data import checkpoints as ck
from raysd.data import imageset, latents, storage
from raysd.data.models import BASE_META, base_identity, is_pixel_space
from raysd.errors import RaysdError
from raysd.run import sizing
from raysd.run.rundir import CLAIM, Run, check_claim, claim
from raysd.stages.cluster import cluster_gpus, connect
from raysd.stages.prepare import ensure_prepared, write_parquet_set
from raysd.stages.train_worker import TrainJob, schedule_of, train_loop_per_worker

log = logging.getLogger("raysd")

KINDS = ("pretrain", "encoder", "unet")
PRETRAIN_STEPS_PER_EPOCH = 60  # a checkpoint every 60 steps of demo pretraining
HEALTH_CHECK_INTERVAL_S = "0.5"  # Ray Train's worker poll (its default 2 s; the environment overrides)


def step_config(cfg: Config, kind: str) -> TrainStepConfig:
    """The TrainStepConfig of a kind; pretraining's epochs come from model.pretrain_steps."""
    if kind == "encoder":
        return cfg.encoder
    if kind == "unet":
        return cfg.finetune
    m = cfg.model
    per_epoch = min(PRETRAIN_STEPS_PER_EPOCH, m.pretrain_steps)
    return TrainStepConfig(epochs=max(1, math.ceil(m.pretrain_steps / per_epoch)), global_batch_size=m.pretrain_batch_size,
                           lr=m.pretrain_lr, weight_decay=0.0, grad_clip_norm=1.0, steps_per_epoch=per_epoch)


def train(cfg: Config, kind: str, *, encoder_epoch: int | None = None, restart: bool = False) -> list[int]:
    """Run (or resume, or skip when complete) one training kind; returns its valid epochs.

    Checkpoints made with other settings are refused in one line naming them (``restart``
    replaces them); that check comes before anything is written to the run directory."""
    if kind not in KINDS:
        raise RaysdError(f"training kind must be one of {KINDS}; got {kind!r}")
    if kind == "pretrain" and not cfg.model.base_model.startswith("tiny"):
        raise RaysdError("model.pretrain_steps > 0 pretrains a tiny base only; SD bases come pretrained")
    run = Run(cfg)
    run.check_preset()
    device = connect(cfg)
    root = run.ckpt_root(kind)
    if _identity_known(run, kind):
        e = _check_encoder_epoch(run, encoder_epoch) if kind == "unet" else None
        check_claim(root, **_identity(run, kind, e), what=kind, restart=restart)
    run.save_config()
    ensure_prepared(run)
    base = cfg.model.base_model if kind == "pretrain" else ensure_base(run)
    if kind == "unet":
        encoder_epoch = _check_encoder_epoch(run, encoder_epoch)
    ident = _identity(run, kind, encoder_epoch)
    claim(root, **ident, what=kind, restart=restart)
    step = step_config(cfg, kind)
    done = ck.valid_epochs(root)
    if done and done[-1] >= step.epochs:
        log.info("%s: all %d epochs already in %s", kind, step.epochs, root)
        return done
    cache = ensure_latent_cache(run, base, device)
    _fit(TrainJob(run, kind, base, step, ident["fp"], encoder_epoch, device, cache, accepted_hashes=ident["aliases"],
                  lora=lora_spec(cfg) if kind == "unet" else None, base_identity=run.base_identity()))
    done = ck.valid_epochs(root)
    if not done or done[-1] < step.epochs:
        raise RuntimeError(f"{kind}: training ended with epochs {done}, expected {step.epochs}")
    return done


def _identity_known(run: Run, kind: str) -> bool:
    """Whether what the checkpoints' identity depends on (data, base, encoder) exists already."""
    if not run.is_prepared():
        return False
    if kind == "unet" and not ck.list_epochs(run.ckpt_root("encoder")):
        return False
    return kind == "pretrain" or run.cfg.model.pretrain_steps <= 0 or storage.exists(storage.join(run.base_dir,
                                                                                                  BASE_META))


def _identity(run: Run, kind: str, encoder_epoch: int | None) -> dict:
    """claim()'s identity arguments for a training kind: its hash, the hash an earlier raysd gave the
    same checkpoints, and the settings behind it (named when they differ)."""
    stage = {"pretrain": "pretrain", "encoder": "train_encoder", "unet": "finetune"}[kind]
    return {"fp": run.training_hash(kind, encoder_epoch), "aliases": (run.legacy_training_hash(kind, encoder_epoch),),
            "identity": run.settings_identity(stage)}


def lora_spec(cfg: Config) -> LoraSpec | None:
    """The LoRA adapter step 3 trains (finetune.method=lora), or None (the whole UNet)."""
    f = cfg.finetune
    if f.method != "lora":
        return None
    return LoraSpec(f.lora_rank, float(f.lora_alpha or f.lora_rank), tuple(f.lora_targets))


def ensure_base(run: Run) -> str:
    """The base model spec; for the demo, pretrain the tiny base first (once)."""
    if run.cfg.model.pretrain_steps <= 0:
        return run.cfg.model.base_model
    if not storage.exists(storage.join(run.base_dir, BASE_META)):
        epochs = train(run.cfg, "pretrain")
        export_base(run, epochs[-1])
    return run.base_spec()


def pretrain_base(run: Run, key: str, restart: bool) -> dict[str, Any]:
    """The pretrain stage's outputs: the base a run with the same pretrain stage key kept in
    model.base_cache (:mod:`raysd.run.base_cache`), copied; else pretrained here, then kept."""
    from raysd.run import base_cache

    found = base_cache.take(run, key)
    if found is not None:
        return found
    epochs = train(run.cfg, "pretrain", restart=restart)
    export_base(run, epochs[-1])
    meta = ck.read_meta(ck.epoch_dir(run.ckpt_root("pretrain"), epochs[-1]))
    result = {"epochs": epochs[-1], "steps": meta["step"], "loss": meta["loss"], "base": run.base_spec(),
              "base_sha256": meta["files"][ck.MODEL_FILE]}
    base_cache.keep(run, key, result)
    return result


def export_base(run: Run, epoch: int) -> None:
    """Write the pretrained tiny UNet as a diffusers directory RUN/base (on any storage), its
    record ``raysd_base.json`` last."""
    import tempfile

    from raysd.core.models.diffusion import build_tiny
    from raysd.data.models import publish_base, save_base_model

    cfg = run.cfg
    base = build_tiny(cfg.model.base_model, cfg.model.resolution, seed=cfg.seed)
    state, meta = ck.load_weights(ck.epoch_dir(run.ckpt_root("pretrain"), epoch))
    base.unet.load_state_dict(state)
    with tempfile.TemporaryDirectory(prefix="raysd-base-") as tmp:
        save_base_model(base, tmp, schedule_of(cfg), extra={
            "pretrained_by": "raysd pretraining (no labels, PCA-code context)", "epoch": epoch, "loss": meta.get("loss")})
        publish_base(tmp, run.base_dir)


def _check_encoder_epoch(run: Run, encoder_epoch: int | None) -> int:
    valid = ck.valid_epochs(run.ckpt_root("encoder"))
    if not valid:
        raise RaysdError(f"finetune: no Class-Encoder checkpoints in {run.ckpt_root('encoder')}; "
                         "run `raysd train-encoder` first")
    if encoder_epoch is None:
        best = storage.join(run.search_dir(1), "best.json")
        chosen = storage.read_json(best).get("encoder_epoch") if storage.exists(best) else None
        return chosen if chosen in valid else valid[-1]
    if encoder_epoch not in valid:
        raise RaysdError(f"finetune: --encoder-epoch {encoder_epoch} has no valid checkpoint; available: {valid}")
    return encoder_epoch


# --------------------------------------------------------------------------------------------
# The latent cache: VAE posteriors of the train split, computed once per base model


def ensure_latent_cache(run: Run, base: str, device: str) -> str:
    """RUN/cache/latents-KEY: posterior (mean, logvar) of every train image, computed once."""
    cfg = run.cfg
    key = run.stage_hash(extra=[base, base_identity(base), cfg.model.resolution,
                                run.train_meta["provenance"].get("fingerprint")])
    cache = run.cache_dir(key)
    if imageset.is_complete(cache):
        return cache
    claim(cache, key, what="latent cache")
    t0 = time.perf_counter()
    if is_pixel_space(base):  # the "posterior" is the resized image: no model, no actor to start
        _pixel_cache(run, base, cache)
    else:
        n_gpu = 1 if device == "cuda" else 0
        ds = ray.data.read_parquet(imageset.verified_files(run.split_dir("train")))
        ds = ds.map_batches(
            PosteriorEncoder,
            fn_constructor_kwargs={"spec": base, "resolution": cfg.model.resolution, "device": device},
            batch_size=256, batch_format="numpy", num_gpus=n_gpu, num_cpus=0 if n_gpu else 1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cluster_gpus())) if n_gpu else 1))
        write_parquet_set(ds, cache, functools.partial(latents.describe, expected_rows=run.num_train, base=base))
    log.info("latent cache: %d images encoded in %.1fs -> %s", run.num_train, time.perf_counter() - t0, cache)
    return cache


def _pixel_cache(run: Run, base: str, cache: str) -> None:
    import torch

    from raysd.core.imaging import uint8_to_model

    train = run.read_split("train")
    with torch.inference_mode():
        mean = np.concatenate([uint8_to_model(train.images[i : i + 1024], run.cfg.model.resolution).numpy()
                               for i in range(0, len(train), 1024)])
    latents.write_cache(cache, train.sample_ids, train.labels, mean, None, base=base, keep={CLAIM})


class PosteriorEncoder:
    """Ray Data actor: uint8 images -> VAE posterior at the model's resolution (model loaded once)."""

    def __init__(self, spec: str, resolution: int, device: str):
        import torch

        from raysd.data.models import load_base_model

        self.device = torch.device(device)
        self.base = load_base_model(spec, resolution=resolution, dtype=torch.float32, device=self.device)
        self.resolution = resolution

    def __call__(self, batch: dict) -> dict:
        from raysd.core.imaging import uint8_to_model

        x = uint8_to_model(batch["image"], self.resolution, self.device)
        mean, logvar = self.base.encode_posterior(x)
        out = {"sample_id": batch["sample_id"], "label": batch["label"], "mean": mean.cpu().numpy()}
        if self.base.vae is not None:
            out["logvar"] = logvar.cpu().numpy()
        return out


# --------------------------------------------------------------------------------------------
# The TorchTrainer


def _fit(job: TrainJob) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = job.run.cfg.resources
    use_gpu = job.device == "cuda"
    workers = r.train_workers(job.kind, job.device)
    need = sizing.training_worker(job.run.cfg, job.run, job.kind, job.device, workers)
    log.info("%s: %s (estimate)", job.kind, need.describe())
    fs, ckpt_parent = storage.filesystem(job.run.path("checkpoints"))
    # Ray Train polls its workers every 2 s by default, so each run ended up to 2 s after its
    # last epoch, and twice more in teardown; a poll is one small call per worker.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={
            "CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {"memory": need.host})}),
        run_config=RunConfig(
            name=job.kind, storage_path=ckpt_parent, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1 if job.kind == "pretrain" else None),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=[EpochLogger(job.kind, job.step.epochs)],
            # raysd prints a line per epoch; Ray Train's per-report INFO lines go to its log files only
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        # No Ray Dataset: every worker reads the whole cache (TrainJob.cache) itself, straight from
        # the run's storage, so no dataset actor starts and nothing is materialised on the driver.
    )
    log.info("%s: training %d epoch(s) on %d %s worker(s) -> %s", job.kind, job.step.epochs, workers, job.device,
             job.run.ckpt_root(job.kind))
    trainer.fit()


class EpochLogger(UserCallback):
    """One line per epoch (loss, images/s, ETA), printed by the Train controller."""

    def __init__(self, kind: str, epochs: int):
        self.kind, self.epochs = kind, epochs
        self.t0 = time.perf_counter()
        self.first_epoch: int | None = None

    def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ANN001
        m = metrics[0]
        epoch = int(m["epoch"])
        if self.first_epoch is None:
            self.first_epoch, self.t0 = epoch - 1, time.perf_counter() - m["seconds"]
        rate = sum(x["images"] for x in metrics) / max(m["seconds"], 1e-9)
        per_epoch = (time.perf_counter() - self.t0) / max(1, epoch - self.first_epoch)
        eta = per_epoch * (self.epochs - epoch)
        print(f"[raysd] {self.kind} epoch {epoch}/{self.epochs}: loss {m['loss']:.4f}, {rate:.0f} img/s, "
              f"{m['seconds']:.1f}s, ETA {eta:.0f}s", flush=True)
