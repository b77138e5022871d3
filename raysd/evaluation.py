"""Stage: the CAS of a Parquet set, streamed through Ray Data into the trainer's device buffer.

The classifier runs in one Ray task (a GPU when the cluster has one). Inside it, the train
set's shards stream through ``read_parquet -> iter_torch_batches`` straight into a
preallocated uint8 tensor on the device (no PNG files, no host copy of the whole set), are put
in sample_id order (so the seeded training is reproducible), optionally cut to a
class-stratified prefix (the x_k of a scaling study), and ResNet20 trains with the paper's
protocol against the real val split and is scored on the real test split.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from raysd import runs, sets, storage
from raysd.config import CasConfig, Config
from raysd.errors import RaysdError
from raysd.raycluster import ensure_ray

log = logging.getLogger("raysd")


def stream_set(set_dir: str, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """(images uint8 (N, H, W, 3), labels (N,)) as device tensors in sample_id order, and meta."""
    import torch

    meta = sets.read_meta(set_dir)
    n, shape = meta["num_rows"], tuple(meta["image_shape"])
    images = torch.empty((n, *shape), dtype=torch.uint8, device=device)
    labels = torch.empty(n, dtype=torch.long, device=device)
    ids = torch.empty(n, dtype=torch.long, device=device)
    files = [storage.join(set_dir, f) for f in sorted(meta["files"])]
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(files, columns=["sample_id", "label", "image"])
    pos = 0
    for batch in ds.iter_torch_batches(batch_size=4096, device=device):
        k = len(batch["label"])
        if pos + k > n:
            raise RaysdError(f"image set {set_dir}: more rows than meta.json's {n}")
        images[pos : pos + k] = batch["image"].to(torch.uint8)
        labels[pos : pos + k] = batch["label"]
        ids[pos : pos + k] = batch["sample_id"]
        pos += k
    if pos != n:
        raise RaysdError(f"image set {set_dir}: read {pos} rows, meta.json says {n}")
    order = torch.argsort(ids)
    return images[order], labels[order], meta


def _cas(train_dir: str, val: tuple, test: tuple, num_classes: int, cas: dict, seed: int, device: str,
         prefix_counts: list[int] | None, threads: int) -> dict[str, Any]:
    import torch

    from raysd.cas import train_and_evaluate
    from raysd.plan import stratified_prefix

    if device == "cpu":
        torch.set_num_threads(max(1, threads))
    if train_dir == "real":
        raise RaysdError("cas: pass the real train split as a directory")
    images, labels, _ = stream_set(train_dir, device)
    if prefix_counts is not None:
        keep = torch.as_tensor(stratified_prefix(labels.cpu().numpy(), prefix_counts), device=device)
        images, labels = images[keep], labels[keep]
    result = train_and_evaluate((images, labels), val, test, num_classes,
                                cfg=CasConfig(**cas), seed=seed, device=device)
    out = result.to_dict()
    out.update(num_images=int(len(labels)), device=device)
    return out


def cas_of_set(cfg: Config, train_dir: str, *, val: tuple | None = None, test: tuple | None = None,
               num_classes: int | None = None, prefix_counts: list[int] | None = None,
               variant: str | None = None) -> dict[str, Any]:
    """CAS of the set in ``train_dir``; val/test default to the run's real splits."""
    ensure_ray()
    if val is None or test is None:
        v, t = sets.read_set(runs.split_dir(cfg, "val")), sets.read_set(runs.split_dir(cfg, "test"))
        val, test, num_classes = (v.images, v.labels), (t.images, t.labels), v.num_classes
    assert num_classes is not None
    cas = dict(cfg.cas.__dict__)
    if variant:
        cas["variant"] = variant
    device = runs.resolve_device(cfg)
    gpus = cfg.resources.gpus_per_trial if device == "cuda" else 0
    threads = cfg.resources.torch_threads or max(1, int(cfg.resources.cpus_per_trial))
    task = ray.remote(_cas).options(num_cpus=cfg.resources.cpus_per_trial, num_gpus=gpus)
    ref = task.remote(train_dir, val, test, num_classes, cas, cfg.seed, device, prefix_counts, threads)
    out = ray.get(ref)
    out["train"] = train_dir
    log.info("cas: %s: top-1 %.4f, top-5 %.4f (best epoch %d of %d, %d images, %.1fs)", train_dir, out["top1"],
             out["top5"], out["best_epoch"], out["epochs_run"], out["num_images"], out["seconds"])
    return out


def real_splits_from_dataset(name: str, data_dir: str | None, download: bool) -> tuple[tuple, tuple, int]:
    """(val, test, num_classes) straight from a dataset loader (no run directory needed)."""
    from raysd.datasets import load_dataset

    ds = load_dataset(name, data_dir, download)
    v, t = ds.splits["val"], ds.splits["test"]
    return (v.images, v.labels), (t.images, t.labels), ds.num_classes


def check_compatible(set_dir: str, num_classes: int, image_shape: tuple[int, ...]) -> None:
    meta = sets.read_meta(set_dir)
    if meta["num_classes"] != num_classes or tuple(meta["image_shape"]) != tuple(image_shape):
        raise RaysdError(f"cas: {set_dir} has {meta['num_classes']} classes of {tuple(meta['image_shape'])} images; "
                         f"the real data has {num_classes} classes of {tuple(image_shape)}")


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("train", "num_images", "top1", "top5", "best_epoch", "epochs_run", "best_val_top1", "seconds", "device",
            "per_class_accuracy", "confusion")
    return {k: result[k] for k in keep if k in result}


def as_numpy_pair(x: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(x[0]), np.asarray(x[1])
