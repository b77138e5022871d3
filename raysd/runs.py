"""The run directory's layout and the small decisions every stage shares.

    RUN/config.json                 the resolved Config of the run
    RUN/data/{train,val,test}/      the real dataset as canonical Parquet sets
    RUN/base/                       demo only: the tiny base after unconditional pretraining
    RUN/cache/latents-KEY/          VAE posteriors of the train split (mean, logvar)
    RUN/checkpoints/{pretrain,encoder,unet}/epoch_NNN/
    RUN/search_1/, RUN/search_2/    Ray Tune experiments and their summaries
    RUN/synthetic/NAME/             generated sets
    RUN/manifest.json, results.json, report.md, report.html, figures/
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from raysd import storage
from raysd.config import Config
from raysd.errors import RaysdError

# The pipeline's stages in order (raysd.pipeline defines them; listed here so the CLI needs no torch)
PIPELINE_STAGES = ("prepare", "pretrain", "train_encoder", "after_1", "search_1", "finetune", "after_3", "search_2",
                   "generate", "scaling", "report")


def data_dir(cfg: Config) -> str:
    return storage.join(cfg.run_dir, "data")


def split_dir(cfg: Config, split: str) -> str:
    return storage.join(cfg.run_dir, "data", split)


def base_dir(cfg: Config) -> str:
    return storage.join(cfg.run_dir, "base")


def ckpt_root(cfg: Config, kind: str) -> str:
    return storage.join(cfg.run_dir, "checkpoints", kind)


def search_dir(cfg: Config, phase: int) -> str:
    return storage.join(cfg.run_dir, f"search_{phase}")


def synthetic_dir(cfg: Config, name: str) -> str:
    return storage.join(cfg.run_dir, "synthetic", name)


def base_spec(cfg: Config) -> str:
    """The base model the stages load: the pretrained demo base in the run, or the config's."""
    if cfg.model.pretrain_steps > 0:
        return storage.local_path(base_dir(cfg))
    return cfg.model.base_model


def stage_hash(cfg: Config, *sections: str, extra: Any = None) -> str:
    """Identity of a stage's inputs: named config sections, the seed and any extra value."""
    d = cfg.to_dict()
    body = {k: d[k] for k in sections}
    body["seed"] = cfg.seed
    body["extra"] = extra
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_hash(cfg: Config, kind: str, encoder_epoch: int | None = None) -> str:
    """What a training kind's checkpoints depend on (a change invalidates them)."""
    if kind == "pretrain":
        keys = {k: v for k, v in cfg.to_dict()["model"].items() if k.startswith("pretrain") or k in (
            "base_model", "resolution", "seq_len", "beta_start", "beta_end", "num_train_timesteps")}
        return stage_hash(cfg, "dataset", extra=keys)
    sections = ("dataset", "model", "encoder") + (("finetune",) if kind == "unet" else ())
    return stage_hash(cfg, *sections, extra=encoder_epoch)


def save_run_config(cfg: Config) -> None:
    """Write RUN/config.json (the resolved config), refusing a run made with another preset."""
    path = storage.join(cfg.run_dir, "config.json")
    if storage.exists(path):
        old = storage.read_json(path)
        if old.get("preset") != cfg.preset:
            raise RaysdError(f"run {cfg.run_dir} was made with preset {old.get('preset')!r}, not {cfg.preset!r}; "
                             "use another run directory")
    storage.makedirs(cfg.run_dir)
    storage.write_json_atomic(path, cfg.to_dict())


def ensure_prepared(cfg: Config) -> dict[str, Any]:
    """The run's real data (RUN/data), prepared on first use; {split: meta}."""
    from raysd import sets

    if all(sets.is_complete(split_dir(cfg, s)) for s in ("train", "val", "test")):
        return {s: sets.read_meta(split_dir(cfg, s)) for s in ("train", "val", "test")}
    from raysd.prepare import prepare_dataset

    return prepare_dataset(cfg.dataset.name, data_dir(cfg), data_dir=cfg.dataset.data_dir, download=cfg.dataset.download)


def resolve_device(cfg: Config) -> str:
    """'cuda' or 'cpu' for the cluster: auto uses CUDA when Ray reports GPUs."""
    if cfg.resources.device != "auto":
        return cfg.resources.device
    from raysd.raycluster import cluster_gpus

    return "cuda" if cluster_gpus() > 0 else "cpu"


def check_storage_for_cluster(cfg: Config) -> None:
    """A local run directory cannot be shared by workers on several nodes."""
    if storage.is_uri(cfg.run_dir) and not storage.is_local(cfg.run_dir):
        return
    from raysd.raycluster import num_nodes

    nodes = num_nodes()
    if nodes > 1 and not cfg.resources.shared_storage:
        raise RaysdError(
            f"run_dir {cfg.run_dir} is a local path but the Ray cluster has {nodes} nodes: workers on other nodes "
            "would write checkpoints and shards to their own disks. Use an s3:// or gs:// URI, or a shared "
            "filesystem mounted at the same path on every node and --set resources.shared_storage=true"
        )
