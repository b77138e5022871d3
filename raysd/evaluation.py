"""Stage: the CAS of a Parquet set, streamed through Ray Data into the trainer's device buffer.

Each classifier runs in a Ray task (a GPU when the cluster has one); several run at once.
The train set's shards are read with ``read_parquet`` and stream through
``iter_torch_batches`` straight into a preallocated uint8 tensor on the task's device (no PNG
files on the way), are put in sample_id order (so the seeded training is reproducible),
optionally cut to a class-stratified prefix (the x_k of a scaling study), and ResNet20 trains
with the paper's protocol against the real val split and is scored on the real test split.
:func:`cas_of_generator` scores images generated in memory (the pipeline's after_k sets).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
import ray.data

from raysd import runs, sets
from raysd.config import CasConfig, Config
from raysd.errors import RaysdError
from raysd.raycluster import ensure_ray

log = logging.getLogger("raysd")


def stream_set(ds: "ray.data.Dataset", n: int, shape: tuple[int, ...], device: str) -> tuple[Any, Any]:
    """Rows of a Ray dataset -> (images uint8 (N, H, W, 3), labels) device tensors in sample_id order."""
    import torch

    images = torch.empty((n, *shape), dtype=torch.uint8, device=device)
    labels = torch.empty(n, dtype=torch.long, device=device)
    ids = torch.empty(n, dtype=torch.long, device=device)
    pos = 0
    for batch in ds.iter_torch_batches(batch_size=4096, device=device):
        k = len(batch["label"])
        if pos + k > n:
            raise RaysdError(f"image set: more rows than its meta.json's {n}")
        images[pos : pos + k] = batch["image"].to(torch.uint8)
        labels[pos : pos + k] = batch["label"]
        ids[pos : pos + k] = batch["sample_id"]
        pos += k
    if pos != n:
        raise RaysdError(f"image set: read {pos} rows, its meta.json says {n}")
    order = torch.argsort(ids)
    return images[order], labels[order]


def _threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _cas_task(ds, n: int, shape: tuple, val: tuple, test: tuple, num_classes: int, cas: dict, seed: int, device: str,
              prefix_counts: list[int] | None, threads: int) -> dict[str, Any]:
    import torch

    from raysd.cas import train_and_evaluate
    from raysd.plan import stratified_prefix

    if device == "cpu":
        _threads(threads)
    images, labels = stream_set(ds, n, shape, device)
    if prefix_counts is not None:
        keep = torch.as_tensor(stratified_prefix(labels.cpu().numpy(), prefix_counts), device=device)
        images, labels = images[keep], labels[keep]
    result = train_and_evaluate((images, labels), val, test, num_classes, cfg=CasConfig(**cas), seed=seed, device=device)
    out = result.to_dict()
    out.update(num_images=int(len(labels)), device=device)
    return out


def _generator_task(spec: dict, num_images: int, balance: str, real_counts: list[int], val: tuple, test: tuple,
                    num_classes: int, cas: dict, seed: int, device: str, batch_size: int, threads: int) -> dict[str, Any]:
    import time

    from raysd.cas import train_and_evaluate
    from raysd.generator import generate_images, spec_from_dict
    from raysd.plan import class_counts, make_plan

    if device == "cpu":
        _threads(threads)
    plan = make_plan(num_images, class_counts(num_images, num_classes, balance, real_counts), seed)
    t0 = time.perf_counter()
    images = generate_images(spec_from_dict(spec), plan.labels, plan.seeds, device, batch_size=batch_size)
    gen = time.perf_counter() - t0
    result = train_and_evaluate((images, plan.labels), val, test, num_classes, cfg=CasConfig(**cas), seed=seed,
                                device=device)
    out = result.to_dict()
    out.update(num_images=num_images, generation_seconds=gen, images_per_second=num_images / max(gen, 1e-9),
               device=device)
    return out


def _real(cfg: Config) -> tuple[tuple, tuple, int]:
    v, t = sets.read_set(runs.split_dir(cfg, "val")), sets.read_set(runs.split_dir(cfg, "test"))
    return (v.images, v.labels), (t.images, t.labels), v.num_classes


def _task_options(cfg: Config, device: str, parallel: int) -> tuple[dict, int]:
    r = cfg.resources
    opts = {"num_cpus": r.cpus_per_trial, "num_gpus": r.gpus_per_trial if device == "cuda" else 0}
    threads = int(r.cpus_per_trial) if parallel > 1 else (r.torch_threads or max(1, int(r.cpus_per_trial)))
    return opts, max(1, threads)


def cas_of_sets(cfg: Config, jobs: list[tuple[str, list[int] | None]], *, val: tuple | None = None,
                test: tuple | None = None, num_classes: int | None = None, variant: str | None = None) -> list[dict]:
    """CAS of several sets (``(set_dir, prefix_counts or None)``), as concurrent Ray tasks.

    Each set is read through Ray Data on the driver (materialised, so the tasks, which may hold
    every CPU of a small machine, need no further read tasks) and streamed into the task's
    device buffer. val/test default to the run's real splits.
    """
    ensure_ray()
    if val is None or test is None or num_classes is None:
        val, test, num_classes = _real(cfg)
    cas = dict(cfg.cas.__dict__, **({"variant": variant} if variant else {}))
    device = runs.resolve_device(cfg)
    opts, threads = _task_options(cfg, device, len(jobs))
    task = ray.remote(_cas_task).options(**opts)
    ray.data.DataContext.get_current().enable_progress_bars = False
    val_ref, test_ref = ray.put(val), ray.put(test)
    refs = []
    for set_dir, prefix in jobs:
        meta = sets.read_meta(set_dir)
        ds = ray.data.read_parquet(sets.verified_files(set_dir, meta),
                                   columns=["sample_id", "label", "image"]).materialize()
        refs.append(task.remote(ds, meta["num_rows"], tuple(meta["image_shape"]), val_ref, test_ref, num_classes, cas,
                                cfg.seed, device, prefix, threads))
    results: dict[int, dict] = {}
    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:  # a line as each set finishes, not all at the end
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        set_dir, prefix = jobs[i]
        res = results[i] = ray.get(ready[0])
        res["train"] = set_dir
        what = f"{set_dir} (stratified prefix)" if prefix is not None else set_dir
        log.info("cas: %s: top-1 %.4f, top-5 %.4f (best epoch %d of %d, %d images, %.1fs) [%d/%d]", what, res["top1"],
                 res["top5"], res["best_epoch"], res["epochs_run"], res["num_images"], res["seconds"],
                 len(results), len(jobs))
    out = [results[i] for i in range(len(jobs))]
    return out


def cas_of_set(cfg: Config, train_dir: str, *, val: tuple | None = None, test: tuple | None = None,
               num_classes: int | None = None, prefix_counts: list[int] | None = None,
               variant: str | None = None) -> dict[str, Any]:
    """CAS of the set in ``train_dir``; val/test default to the run's real splits."""
    return cas_of_sets(cfg, [(train_dir, prefix_counts)], val=val, test=test, num_classes=num_classes,
                       variant=variant)[0]


def cas_of_generator(cfg: Config, spec, num_images: int, balance: str = "uniform") -> dict[str, Any]:  # noqa: ANN001
    """Generate ``num_images`` in memory (no files) and score them: the pipeline's after_k CAS."""
    ensure_ray()
    val, test, num_classes = _real(cfg)
    real_counts = sets.read_meta(runs.split_dir(cfg, "train"))["counts_per_class"]
    device = runs.resolve_device(cfg)
    opts, threads = _task_options(cfg, device, 1)
    task = ray.remote(_generator_task).options(**opts)
    res = ray.get(task.remote(spec.to_dict(), num_images, balance, real_counts, val, test, num_classes,
                              dict(cfg.cas.__dict__), cfg.seed, device, cfg.sampling.batch_size, threads))
    log.info("cas: %d generated images (IS %d, UGS %.3g): top-1 %.4f, top-5 %.4f, %.1f img/s", num_images,
             spec.num_inference_steps, spec.guidance_scale, res["top1"], res["top5"], res["images_per_second"])
    return res


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
