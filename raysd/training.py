"""Stage: diffusion training on Ray Train (step 1 Class-Encoder, step 3 UNet, demo pretraining).

The driver prepares the data, caches the VAE posteriors of the train split once (Ray Data,
one encoder actor per GPU), then runs a ``TorchTrainer``. Each worker reads the whole cache
through ``get_dataset_shard(...).iter_torch_batches`` into device memory (the split across
workers is a seeded per-epoch permutation, so the order survives restarts), wraps the trained
module with ``prepare_model`` (DDP) and calls the Ray-free :class:`DiffusionTrainer` one epoch
at a time. After each epoch rank 0 writes a checkpoint that Ray persists to
``RUN/checkpoints/KIND/epoch_NNN/``; a rerun (or a restarted worker) resumes from the newest
complete one: ``ray.train.get_checkpoint()``, else a scan of the run directory.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import ray.data
import ray.train
import ray.train.torch
from ray.train import UserCallback

from raysd import checkpoints as ck
from raysd import runs, sets, storage
from raysd.config import Config, TrainStepConfig
from raysd.errors import RaysdError
from raysd.raycluster import ensure_ray

log = logging.getLogger("raysd")

KINDS = ("pretrain", "encoder", "unet")
PRETRAIN_STEPS_PER_EPOCH = 60  # a checkpoint every 60 steps of demo pretraining


# --------------------------------------------------------------------------------------------
# Driver side


def step_config(cfg: Config, kind: str, num_train: int) -> TrainStepConfig:
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
    """Run (or resume, or skip when complete) one training kind; returns its valid epochs."""
    if kind not in KINDS:
        raise RaysdError(f"training kind must be one of {KINDS}; got {kind!r}")
    ensure_ray()
    runs.check_storage_for_cluster(cfg)
    runs.save_run_config(cfg)
    metas = runs.ensure_prepared(cfg)
    if kind == "pretrain":
        if not cfg.model.base_model.startswith("tiny"):
            raise RaysdError("model.pretrain_steps > 0 pretrains a tiny base only; SD bases come pretrained")
        spec = cfg.model.base_model
    else:
        spec = ensure_base(cfg)
    if kind == "unet":
        encoder_epoch = _check_encoder_epoch(cfg, encoder_epoch)
    root = runs.ckpt_root(cfg, kind)
    chash = runs.training_hash(cfg, kind, encoder_epoch)
    _check_existing(root, chash, kind, restart)
    step_cfg = step_config(cfg, kind, metas["train"]["num_rows"])
    done = ck.valid_epochs(root)
    if done and done[-1] >= step_cfg.epochs:
        log.info("%s: all %d epochs already in %s", kind, step_cfg.epochs, root)
        return done
    cache = ensure_latent_cache(cfg, spec)
    _fit(cfg, kind, spec, cache, root, chash, step_cfg, encoder_epoch)
    done = ck.valid_epochs(root)
    if not done or done[-1] < step_cfg.epochs:
        raise RuntimeError(f"{kind}: training ended with epochs {done}, expected {step_cfg.epochs}")
    return done


def ensure_base(cfg: Config) -> str:
    """The base model spec; for the demo, pretrain the tiny base first (once)."""
    if cfg.model.pretrain_steps <= 0:
        return cfg.model.base_model
    target = runs.base_dir(cfg)
    if not storage.exists(storage.join(target, "raysd_base.json")):
        epochs = train(cfg, "pretrain")
        export_base(cfg, epochs[-1])
    return runs.base_spec(cfg)


def export_base(cfg: Config, epoch: int) -> None:
    """Write the pretrained tiny UNet as a diffusers directory RUN/base (temp name, renamed)."""
    from raysd.models.diffusion import build_tiny, save_base_model

    base = build_tiny(cfg.model.base_model, cfg.model.resolution, seed=cfg.seed)
    state, meta = ck.load_weights(ck.epoch_dir(runs.ckpt_root(cfg, "pretrain"), epoch))
    base.unet.load_state_dict(state)
    target = storage.local_path(runs.base_dir(cfg))
    tmp = f"{target}{storage.TMP_MARK}export"
    storage.remove(tmp)
    save_base_model(base, tmp, _schedule(cfg), extra={"pretrained_by": "raysd demo pretraining (unconditional, "
                                                      "PCA-code context)", "epoch": epoch, "loss": meta.get("loss")})
    storage.remove(target)
    storage.rename(tmp, target)


def _schedule(cfg: Config):
    from raysd.models.diffusion import NoiseSchedule

    m = cfg.model
    return NoiseSchedule(m.beta_start, m.beta_end, m.num_train_timesteps)


def _check_encoder_epoch(cfg: Config, encoder_epoch: int | None) -> int:
    valid = ck.valid_epochs(runs.ckpt_root(cfg, "encoder"))
    if not valid:
        raise RaysdError(f"finetune: no Class-Encoder checkpoints in {runs.ckpt_root(cfg, 'encoder')}; "
                         "run `raysd train-encoder` first")
    if encoder_epoch is None:
        best = storage.join(runs.search_dir(cfg, 1), "best.json")
        chosen = storage.read_json(best).get("encoder_epoch") if storage.exists(best) else None
        return chosen if chosen in valid else valid[-1]
    if encoder_epoch not in valid:
        raise RaysdError(f"finetune: --encoder-epoch {encoder_epoch} has no valid checkpoint; available: {valid}")
    return encoder_epoch


def _check_existing(root: str, chash: str, kind: str, restart: bool) -> None:
    epochs = ck.list_epochs(root)
    if not epochs:
        return
    stale = []
    for e in epochs:
        try:
            if ck.read_meta(ck.epoch_dir(root, e)).get("config_hash") != chash:
                stale.append(e)
        except RaysdError:
            stale.append(e)
    if stale and not restart:
        raise RaysdError(f"{kind}: checkpoints in {root} were made with other settings (epochs {stale}); "
                         "pass --restart to discard them, or use another run directory")
    if restart or stale:
        log.info("%s: discarding checkpoints in %s", kind, root)
        storage.remove(root)


def ensure_latent_cache(cfg: Config, spec: str) -> str:
    """RUN/cache/latents-KEY: posterior (mean, logvar) of every train image, computed once."""
    train_meta = sets.read_meta(runs.split_dir(cfg, "train"))
    key = runs.stage_hash(cfg, extra=[spec, _base_identity(spec), cfg.model.resolution,
                                      train_meta["provenance"].get("fingerprint")])
    cache = storage.join(cfg.run_dir, "cache", f"latents-{key}")
    if sets.is_complete(cache):
        return cache
    t0 = time.perf_counter()
    device = runs.resolve_device(cfg)
    tmp = f"{cache}{storage.TMP_MARK}write"
    storage.remove(tmp)
    n_gpu = 1 if device == "cuda" else 0
    ds = ray.data.read_parquet(_files(runs.split_dir(cfg, "train")))
    ds = ds.map_batches(
        _PosteriorEncoder, fn_constructor_kwargs={"spec": spec, "resolution": cfg.model.resolution, "device": device},
        batch_size=256, batch_format="numpy", num_gpus=n_gpu, num_cpus=0 if n_gpu else 1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(_gpus())) if n_gpu else 1))
    fs, path = storage.filesystem(tmp)
    ds.write_parquet(path, filesystem=fs)
    files = {}
    rows = 0
    for fn in storage.listdir(tmp):
        n = sets.read_shard(storage.join(tmp, fn)).num_rows
        files[fn] = {"rows": n, "sha256": storage.sha256_file(storage.join(tmp, fn))}
        rows += n
    if rows != train_meta["num_rows"]:
        raise RuntimeError(f"latent cache: {rows} rows for {train_meta['num_rows']} images")
    storage.write_json_atomic(storage.join(tmp, sets.META), {"format": "raysd.latents/1", "files": files,
                                                             "num_rows": rows, "base": spec})
    storage.rename(tmp, cache)
    log.info("latent cache: %d images encoded in %.1fs -> %s", rows, time.perf_counter() - t0, cache)
    return cache


def _files(set_dir: str) -> list[str]:
    return sets.verified_files(set_dir)


def _gpus() -> float:
    from raysd.raycluster import cluster_gpus

    return cluster_gpus()


def _base_identity(spec: str) -> str:
    """Content identity of a local base (its config/weights files change when it is re-exported)."""
    import os

    local = storage.local_path(spec)
    meta = os.path.join(local, "raysd_base.json")
    if os.path.isfile(meta):
        return storage.sha256_file(meta)
    return spec


class _PosteriorEncoder:
    """Ray Data actor: uint8 images -> VAE posterior at the model's resolution (model loaded once)."""

    def __init__(self, spec: str, resolution: int, device: str):
        import torch

        from raysd.models.diffusion import load_base_model

        self.device = torch.device(device)
        self.base = load_base_model(spec, resolution=resolution, dtype=torch.float32, device=self.device)
        self.resolution = resolution

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from raysd.imaging import uint8_to_model

        x = uint8_to_model(batch["image"], self.resolution, self.device)
        mean, logvar = self.base.encode_posterior(x)
        out = {"sample_id": batch["sample_id"], "label": batch["label"], "mean": mean.cpu().numpy()}
        if self.base.vae is not None:
            out["logvar"] = logvar.cpu().numpy()
        return out


def _fit(cfg: Config, kind: str, spec: str, cache: str, root: str, chash: str, step_cfg: TrainStepConfig,
         encoder_epoch: int | None) -> None:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    device = runs.resolve_device(cfg)
    r = cfg.resources
    use_gpu = device == "cuda"
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # a dataset keeps the context it was made in
    cached = ray.data.read_parquet(_files_cache(cache)).materialize()
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    fs, ckpt_parent = storage.filesystem(storage.join(cfg.run_dir, "checkpoints"))
    loop_config = {"cfg": cfg.to_dict(), "kind": kind, "spec": spec, "root": root, "config_hash": chash,
                   "step_cfg": step_cfg.__dict__, "encoder_epoch": encoder_epoch, "device": device}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=kind, storage_path=ckpt_parent, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1 if kind == "pretrain" else None),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=[EpochLogger(kind, step_cfg.epochs)],
            # raysd prints a line per epoch; Ray Train's per-report INFO lines go to its log files only
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        # Materialised before the workers take their CPUs: reading then needs no further tasks,
        # so workers that hold every CPU of a small machine cannot starve their own input.
        datasets={"train": cached},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker reads the whole cache
    )
    log.info("%s: training %d epoch(s) on %d %s worker(s) -> %s", kind, step_cfg.epochs, r.num_workers, device, root)
    try:
        trainer.fit()
    finally:
        ctx.enable_progress_bars = bars


def _files_cache(cache: str) -> list[str]:
    return sets.verified_files(cache, storage.read_json(storage.join(cache, sets.META)))


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


# --------------------------------------------------------------------------------------------
# Worker side


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import torch

    from raysd.config import load_config
    from raysd.train_core import DiffusionTrainer, pca_context_projection

    cfg = load_config(config["cfg"]["preset"], overrides=_flat(config["cfg"]))
    kind, root, device_kind = config["kind"], config["root"], config["device"]
    step_cfg = TrainStepConfig(**config["step_cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.resources.torch_threads or max(1, int(cfg.resources.cpus_per_worker)))
    data = _load_cache(device)
    base, encoder = _build_models(cfg, kind, config["spec"], config["encoder_epoch"], device)
    scaling_factor = base.scaling_factor
    base.vae = None  # the posteriors are cached: the VAE is not needed while training
    frozen = base.unet if kind == "encoder" else encoder
    digest_start = ck.module_digest(frozen) if frozen is not None and rank == 0 else ""
    pretrain_ctx = None
    if kind == "pretrain":
        pretrain_ctx = pca_context_projection(data.mean.cpu(), cfg.model.seq_len, base.cross_attention_dim, cfg.seed)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.model.precision) if device.type == "cuda" else None
    if device.type == "cuda" and cfg.model.precision == "auto":
        autocast = torch.bfloat16
    trainer = DiffusionTrainer(
        kind, step_cfg, unet=base.unet, encoder=encoder, data=data, schedule=_schedule(cfg),
        scaling_factor=scaling_factor, seed=cfg.seed, device=device, rank=rank, world=world,
        label_dropout=cfg.model.label_dropout if cfg.model.null_class else 0.0,
        wrap=ray.train.torch.prepare_model if world > 1 else (lambda m: m), autocast_dtype=autocast,
        pretrain_context=pretrain_ctx, seq_len=cfg.model.seq_len, dim=base.cross_attention_dim)
    start = _resume(trainer, root, config["config_hash"])
    from raysd.faults import maybe_fail

    for epoch in range(start + 1, step_cfg.epochs + 1):
        stats = trainer.run_epoch(epoch)
        maybe_fail(f"train_epoch_{epoch}")  # fault tests: the worker dies with this epoch trained, not saved
        loss = _mean_across_workers(stats["loss"], world, device)
        metrics = {"epoch": epoch, "loss": loss, "images": stats["images"], "seconds": stats["seconds"],
                   "step": trainer.step}
        if epoch == step_cfg.epochs and rank == 0 and frozen is not None:
            metrics.update(frozen_digest_start=digest_start, frozen_digest_end=ck.module_digest(frozen))
        _report_epoch(trainer, cfg, kind, config, epoch, metrics, rank, base, encoder)


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    from raysd.config import flatten

    return {k: v for k, v in flatten(d).items() if k != "preset"}


def _load_cache(device):
    import torch

    from raysd.train_core import TrainData

    ray.data.DataContext.get_current().enable_progress_bars = False  # bars belong to the driver
    cols: dict[str, list] = {"sample_id": [], "label": [], "mean": [], "logvar": []}
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=4096, device="cpu"):
        for k in cols:
            if k in batch:
                cols[k].append(batch[k])
    order = torch.argsort(torch.cat(cols["sample_id"]))
    labels = torch.cat(cols["label"])[order].long().to(device)
    mean = torch.cat(cols["mean"])[order].float().to(device)
    logvar = torch.cat(cols["logvar"])[order].float().to(device) if cols["logvar"] else None
    return TrainData(labels=labels, mean=mean, logvar=logvar)


def _build_models(cfg: Config, kind: str, spec: str, encoder_epoch: int | None, device):
    import torch

    from raysd.models import ClassEncoder
    from raysd.models.diffusion import load_base_model

    base = load_base_model(spec, resolution=cfg.model.resolution, dtype=torch.float32, device=device, seed=cfg.seed)
    if kind == "pretrain":
        return base, None
    num_classes = len(sets.read_meta(runs.split_dir(cfg, "train"))["class_names"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = ClassEncoder(num_classes, cfg.model.seq_len, base.cross_attention_dim, cfg.model.hidden_dim,
                               cfg.model.null_class)
    if kind == "unet":
        state, _ = ck.load_weights(ck.epoch_dir(runs.ckpt_root(cfg, "encoder"), encoder_epoch))
        encoder.load_state_dict(state)
    return base, encoder.to(device)


def _resume(trainer, root: str, config_hash: str) -> int:
    """Load the newest complete checkpoint into ``trainer``; returns its epoch (0: none).

    Ray's record of the latest reported checkpoint comes first (a restarted worker, or a rerun
    of the same run); a scan of the run directory covers a record lost in a crash.
    """
    directory = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        directory = storage.join(root, ckpt.path.rstrip("/").rsplit("/", 1)[-1])
    if directory is None or not ck.is_valid(directory, resumable=True):
        epoch = ck.latest_resumable(root)
        directory = ck.epoch_dir(root, epoch) if epoch else None
    if directory is None:
        return 0
    state, meta = ck.load_weights(directory)
    if meta.get("config_hash") != config_hash:
        raise RaysdError(f"checkpoint {directory} was made with other settings; use --restart")
    trainer.trainable.load_state_dict(state)
    opt_state, extra = ck.load_resume_state(directory)
    trainer.load_resume(opt_state, extra)
    print(f"[raysd] resuming {meta.get('kind')} after epoch {meta['epoch']} from {directory}", flush=True)
    return int(meta["epoch"])


def _mean_across_workers(value: float, world: int, device) -> float:
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


def _report_epoch(trainer, cfg: Config, kind: str, config: dict, epoch: int, metrics: dict, rank: int, base,
                  encoder) -> None:
    from ray.train import Checkpoint

    root = config["root"]
    checkpoint = None
    if rank == 0:
        local = ck.local_tmpdir()
        meta = {"kind": kind, "epoch": epoch, "loss": metrics["loss"], "step": trainer.step,
                "config_hash": config["config_hash"], "encoder_epoch": config["encoder_epoch"],
                "module": "class_encoder" if kind == "encoder" else "unet",
                **{k: v for k, v in metrics.items() if k.startswith("frozen_digest")}}
        if encoder is not None:
            meta["class_encoder"] = {"num_classes": encoder.num_classes, "seq_len": encoder.seq_len, "dim": encoder.dim,
                                     "hidden_dim": encoder.fc1.out_features, "null_class": encoder.null_class}
        ck.write_checkpoint(local, model_state=trainer.trainable.state_dict(), meta=meta,
                            optimizer_state=trainer.opt.state_dict(), resume=trainer.resume_state(),
                            dtype=cfg.encoder.checkpoint_dtype if kind == "encoder" else cfg.finetune.checkpoint_dtype)
        checkpoint = Checkpoint.from_directory(local)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:03d}")
    if rank == 0 and epoch > 1 and kind != "pretrain":
        previous = ck.epoch_dir(root, epoch - 1)
        if ck.is_valid(storage.join(root, f"epoch_{epoch:03d}"), resumable=True) and storage.exists(previous):
            ck.drop_resume_files(previous)
