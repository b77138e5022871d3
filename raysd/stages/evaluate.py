"""Stage: the CAS of Parquet sets and of generators, each classifier in a Ray task (a GPU when the
cluster has one); several run at once.

A set's shards are read with ``read_parquet`` and stream through ``iter_torch_batches`` straight
into a preallocated uint8 tensor on the task's device (no PNG files on the way), are put in
sample_id order (so the seeded training is reproducible), optionally cut to a class-stratified
prefix (the x_k of a scaling study), and ResNet20 trains with the paper's protocol against the
real val split and is scored on the real test split (:func:`raysd.core.cas.train_and_evaluate`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
import torch

from raysd.config import CasConfig, Config
from raysd.core.cas import train_and_evaluate
from raysd.core.generator import GeneratorSpec
from raysd.core.plan import class_counts, make_plan, stratified_prefix
from raysd.data import imageset
from raysd.errors import RaysdError
from raysd.run.rundir import Run
from raysd.run.scores import Score
from raysd.stages.cluster import connect

log = logging.getLogger("raysd")


@dataclass
class CasJob:
    """One classifier's settings (crosses Ray as it is); the data travel as object refs."""

    cas: CasConfig
    num_classes: int
    seed: int
    device: str
    threads: int


def stream_set(ds: "ray.data.Dataset", n: int, shape: tuple[int, ...], device: str) -> tuple[Any, Any]:
    """Rows of a Ray dataset -> (images uint8 (N, H, W, 3), labels) device tensors in sample_id order."""
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


def _set_task(job: CasJob, ds, n: int, shape: tuple, val: tuple, test: tuple,  # noqa: ANN001
              prefix_counts: list[int] | None) -> Score:
    if job.device == "cpu":
        torch.set_num_threads(max(1, job.threads))
    images, labels = stream_set(ds, n, shape, job.device)
    if prefix_counts is not None:
        keep = torch.as_tensor(stratified_prefix(labels.cpu().numpy(), prefix_counts), device=job.device)
        images, labels = images[keep], labels[keep]
    result = train_and_evaluate((images, labels), val, test, job.num_classes, cfg=job.cas, seed=job.seed,
                                device=job.device)
    return Score.of(result, num_images=int(len(labels)), device=job.device)


def _generator_task(job: CasJob, spec: GeneratorSpec, num_images: int, balance: str, real_counts: list[int],
                    val: tuple, test: tuple, batch_size: int) -> Score:
    from raysd.data.models import load_generator

    if job.device == "cpu":
        torch.set_num_threads(max(1, job.threads))
    plan = make_plan(num_images, class_counts(num_images, job.num_classes, balance, real_counts), job.seed)
    t0 = time.perf_counter()
    images = load_generator(spec, job.device).images(plan.labels, plan.seeds, batch_size=batch_size)
    gen = time.perf_counter() - t0
    result = train_and_evaluate((images, plan.labels), val, test, job.num_classes, cfg=job.cas, seed=job.seed,
                                device=job.device)
    return Score.of(result, num_images=num_images, generation_seconds=gen,
                    images_per_second=num_images / max(gen, 1e-9), device=job.device)


def _real(run: Run) -> tuple[tuple, tuple, int]:
    v, t = run.read_split("val"), run.read_split("test")
    return (v.images, v.labels), (t.images, t.labels), v.num_classes


def _task(fn: Any, cfg: Config, device: str, parallel: int, num_classes: int, cas: CasConfig) -> tuple[Any, CasJob]:
    """The remote function with the trial resources, and the job its tasks run."""
    r = cfg.resources
    threads = int(r.cpus_per_trial) if parallel > 1 else (r.torch_threads or max(1, int(r.cpus_per_trial)))
    task = ray.remote(fn).options(num_cpus=r.cpus_per_trial, num_gpus=r.gpus_per_trial if device == "cuda" else 0)
    return task, CasJob(cas, num_classes, cfg.seed, device, max(1, threads))


def cas_of_sets(cfg: Config, jobs: list[tuple[str, list[int] | None]], *, val: tuple | None = None,
                test: tuple | None = None, num_classes: int | None = None, variant: str | None = None) -> list[Score]:
    """CAS of several sets (``(set_dir, prefix_counts or None)``), as concurrent Ray tasks.

    Each set is read through Ray Data on the driver (materialised, so the tasks, which may hold
    every CPU of a small machine, need no further read tasks) and streamed into the task's
    device buffer. val/test default to the run's real splits.
    """
    device = connect(cfg)
    if val is None or test is None or num_classes is None:
        val, test, num_classes = _real(Run(cfg))
    cas = CasConfig(**{**cfg.cas.__dict__, **({"variant": variant} if variant else {})})
    task, job = _task(_set_task, cfg, device, len(jobs), num_classes, cas)
    ray.data.DataContext.get_current().enable_progress_bars = False
    val_ref, test_ref = ray.put(val), ray.put(test)
    pending = {}
    for i, (set_dir, prefix) in enumerate(jobs):
        meta = imageset.read_meta(set_dir)
        ds = ray.data.read_parquet(imageset.verified_files(set_dir, meta),
                                   columns=["sample_id", "label", "image"]).materialize()
        ref = task.remote(job, ds, meta["num_rows"], tuple(meta["image_shape"]), val_ref, test_ref, prefix)
        pending[ref] = i
    results: dict[int, Score] = {}
    while pending:  # a line as each set finishes, not all at the end
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        set_dir, prefix = jobs[i]
        res = results[i] = ray.get(ready[0])
        res.train = set_dir
        what = f"{set_dir} (stratified prefix)" if prefix is not None else set_dir
        log.info("cas: %s: top-1 %.4f, top-5 %.4f (best epoch %d of %d, %d images, %.1fs) [%d/%d]", what, res.top1,
                 res.top5, res.best_epoch, res.epochs_run, res.num_images, res.seconds, len(results), len(jobs))
    return [results[i] for i in range(len(jobs))]


def cas_of_set(cfg: Config, train_dir: str, **kwargs: Any) -> Score:
    """CAS of the set in ``train_dir`` (keywords as :func:`cas_of_sets`)."""
    prefix = kwargs.pop("prefix_counts", None)
    return cas_of_sets(cfg, [(train_dir, prefix)], **kwargs)[0]


def cas_of_generator(cfg: Config, spec: GeneratorSpec, num_images: int, balance: str = "uniform") -> Score:
    """Generate ``num_images`` in memory (no files) and score them: the pipeline's after_k CAS."""
    device = connect(cfg)
    run = Run(cfg)
    val, test, num_classes = _real(run)
    task, job = _task(_generator_task, cfg, device, 1, num_classes, cfg.cas)
    res = ray.get(task.remote(job, spec, num_images, balance, run.train_meta["counts_per_class"], val, test,
                              cfg.sampling.batch_size))
    log.info("cas: %d generated images (IS %d, UGS %.3g): top-1 %.4f, top-5 %.4f, %.1f img/s", num_images,
             spec.num_inference_steps, spec.guidance_scale, res.top1, res.top5, res.images_per_second)
    return res


def real_splits_from_dataset(name: str, data_dir: str | None, download: bool) -> tuple[tuple, tuple, int]:
    """(val, test, num_classes) straight from a dataset loader (no run directory needed)."""
    from raysd.data.sources import load_dataset

    ds = load_dataset(name, data_dir, download)
    v, t = ds.splits["val"], ds.splits["test"]
    return (v.images, v.labels), (t.images, t.labels), ds.num_classes


def check_compatible(set_dir: str, num_classes: int, image_shape: tuple[int, ...]) -> None:
    meta = imageset.read_meta(set_dir)
    if meta["num_classes"] != num_classes or tuple(meta["image_shape"]) != tuple(image_shape):
        raise RaysdError(f"cas: {set_dir} has {meta['num_classes']} classes of {tuple(meta['image_shape'])} images; "
                         f"the real data has {num_classes} classes of {tuple(image_shape)}")
