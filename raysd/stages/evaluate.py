"""Stage: the CAS of Parquet sets and of generators, each classifier in a Ray task (a GPU when the
cluster has one); several run at once. A generator's CAS (after_k) on CPUs runs on the driver.

A task reads only the Parquet shards of its :class:`SetSlice` (the x_k of a scaling study needs
the first k/K of the x_K set, no more), checks each against its SHA-256 as it reads it, puts the
rows in sample_id order (so the seeded training is reproducible), keeps a stratified prefix's
sample_ids, and ResNet20 trains with the paper's protocol against the real val split and is
scored on the real test split (:func:`raysd.core.cas.train_and_evaluate`). The driver never reads
a shard: on an object store each shard travels once, to the task that uses it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from raysd.config import CasConfig, Config
from raysd.core.cas import train_and_evaluate
from raysd.core.generator import GeneratorSpec, generated_cas
from raysd.core.plan import interleave, stratified_prefix
from raysd.core.seeds import derive_seed
from raysd.data import imageset, storage
from raysd.data.models import release_generators
from raysd.errors import RaysdError
from raysd.run.rundir import Run
from raysd.run.scores import Score, mean_over_seeds
from raysd.run import sizing
from raysd.stages.cluster import accelerator_memory, connect, worker_device

log = logging.getLogger("raysd")


@dataclass
class CasJob:
    """One classifier's settings (crosses Ray as it is); the data travel as object refs."""

    cas: CasConfig
    num_classes: int
    seed: int
    device: str
    threads: int
    precision: str = "auto"  # model.precision: auto (bf16 autocast on CUDA) or the released fp32


@dataclass(frozen=True)
class SetSlice:
    """What one CAS task reads of a set: shards (checked against their SHA-256 inside the task,
    never on the driver) and, for a stratified prefix, the sample_ids it keeps."""

    set_dir: str
    shards: tuple[tuple[str, str, int], ...]  # (name, sha256, rows), in sample_id order
    image_shape: tuple[int, int, int]
    # a stratified prefix: (the whole set's counts per class, the prefix's); None: every row
    prefix: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @classmethod
    def whole(cls, set_dir: str) -> "SetSlice":
        meta = imageset.read_meta(set_dir)
        shards = tuple((n, i["sha256"], i["rows"]) for n, i in sorted(meta["files"].items()))
        return cls(set_dir, shards, tuple(meta["image_shape"]))

    def keep(self) -> np.ndarray | None:
        """The prefix's sample_ids (a plan's labels are ``interleave(counts)`` over ids 0..N-1)."""
        if self.prefix is None:
            return None
        return stratified_prefix(interleave(list(self.prefix[0])), list(self.prefix[1]))


def prefix_slice(set_dir: str, shards: dict[int, tuple[str, str, int]], plan_counts: list[int], counts: list[int],
                 shard_size: int, image_shape: tuple[int, int, int]) -> SetSlice | None:
    """The x_k of a scaling study: the stratified prefix with ``counts`` of a generated set planned
    with ``plan_counts``, as the shards it needs; None while one of those shards is not written."""
    piece = SetSlice(set_dir, (), tuple(image_shape), (tuple(plan_counts), tuple(counts)))
    keep = piece.keep()
    needed = range(int(keep.max()) // shard_size + 1) if len(keep) else range(0)
    if any(i not in shards for i in needed):
        return None
    return SetSlice(set_dir, tuple(shards[i] for i in needed), piece.image_shape, piece.prefix)


def read_slice(piece: SetSlice) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), labels) in sample_id order; a damaged shard is refused by name."""
    parts = [imageset.table_to_arrays(imageset.read_shard(storage.join(piece.set_dir, name),
                                                          {"sha256": sha, "rows": rows}), piece.image_shape)
             for name, sha, rows in piece.shards]
    ids = np.concatenate([p[0] for p in parts])
    labels, images = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    order = np.argsort(ids, kind="stable")
    ids, labels, images = ids[order], labels[order], images[order]
    keep = piece.keep()
    if keep is not None:
        mask = np.isin(ids, keep)
        if int(mask.sum()) != len(keep):
            raise RaysdError(f"image set {piece.set_dir}: {int(mask.sum())} of the prefix's {len(keep)} "
                             "sample_ids are in its shards")
        labels, images = labels[mask], images[mask]
    return images, labels


def _on_this_worker(job: CasJob) -> CasJob:
    """The job as this task runs it (:func:`raysd.stages.cluster.worker_device`), with its thread
    count set on a CPU."""
    job = dataclasses.replace(job, device=worker_device(job.device))
    if job.device == "cpu":
        torch.set_num_threads(max(1, job.threads))
    return job


def _set_task(job: CasJob, piece: SetSlice, val: tuple, test: tuple) -> Score:
    job = _on_this_worker(job)
    images, labels = read_slice(piece)
    result = train_and_evaluate((images, labels), val, test, job.num_classes, cfg=job.cas, seed=job.seed,
                                device=job.device, precision=job.precision)
    return Score.of(result, num_images=int(len(labels)), device=job.device)


def _generator_task(job: CasJob, spec: GeneratorSpec, num_images: int, balance: str, real_counts: list[int],
                    val: tuple, test: tuple, batch_size: int) -> Score:
    from raysd.data.models import load_generator

    job = _on_this_worker(job)
    result, gen = generated_cas(load_generator(spec, job.device), num_images, balance, real_counts, val, test,
                                job.num_classes, cas=job.cas, seed=job.seed, device=job.device,
                                precision=job.precision, batch_size=batch_size)
    return Score.of(result, num_images=num_images, generation_seconds=gen,
                    images_per_second=num_images / max(gen, 1e-9), device=job.device)


def _real(run: Run) -> tuple[tuple, tuple, int]:
    v, t = run.read_split("val"), run.read_split("test")
    return (v.images, v.labels), (t.images, t.labels), v.num_classes


def _task(fn: Any, cfg: Config, device: str, parallel: int, num_classes: int, cas: CasConfig,
          max_calls: int = 0) -> tuple[Any, CasJob]:
    """The remote function with the trial CPUs, and the job its tasks run (each call then asks for
    its memory and GPU share: :func:`classifier_options`). ``max_calls=1`` makes its worker exit after one
    call (Ray takes it only at ``ray.remote``, not in ``.options``)."""
    r = cfg.resources
    threads = int(r.cpus_per_trial) if parallel > 1 else (r.torch_threads or max(1, int(r.cpus_per_trial)))
    remote = ray.remote(max_calls=max_calls)(fn) if max_calls else ray.remote(fn)
    return remote, CasJob(cas, num_classes, cfg.seed, device, max(1, threads), cfg.model.precision)


def classifier_options(task: Any, cfg: Config, device: str, need: sizing.WorkerNeed) -> Any:
    """A classifier's task with what it asks Ray for: CPUs, host memory (its estimate or
    resources.trial_memory_gb) and, on CUDA, the share of a GPU that its card memory allows."""
    r = cfg.resources
    gpus = sizing.gpus_per_worker(cfg, need, accelerator_memory(cfg)) if device == "cuda" else 0.0
    share = ({"num_gpus": gpus} if r.accelerator == "GPU" else {"resources": {r.accelerator: gpus}}) if gpus else {}
    return task.options(num_cpus=r.cpus_per_trial, memory=sizing.host_memory_request(cfg, need), **share)


class Scorer:
    """CAS tasks of set slices, started as soon as their shards exist (while generation goes on),
    collected in order. Tasks for identical slices are started once per process."""

    _started: dict[tuple, Any] = {}  # (slice, cas job) -> ObjectRef, shared by the stages of one driver

    def __init__(self, cfg: Config, parallel: int, *, val: tuple | None = None, test: tuple | None = None,
                 num_classes: int | None = None, variant: str | None = None, protocol: str | None = None):
        """``variant``, ``protocol``: instead of cas.variant, cas.protocol."""
        device = connect(cfg)
        if val is None or test is None or num_classes is None:
            val, test, num_classes = _real(Run(cfg))
        cas = dataclasses.replace(cfg.cas, **({"variant": variant} if variant else {}),
                                  **({"protocol": protocol} if protocol else {}))
        self.protocol = cas.protocol
        self.cfg, self.said, self.held_out = cfg, False, len(val[1]) + len(test[1])
        self.task, job = _task(_set_task, cfg, device, parallel * cas.seeds, num_classes, cas)
        # cas.seeds classifiers per set: the first with the run seed (one seed scores as before)
        self.seeds = [cfg.seed] + [derive_seed(cfg.seed, "cas", i) for i in range(1, cas.seeds)]
        self.jobs = [dataclasses.replace(job, seed=s) for s in self.seeds]
        self.job = job
        self.val_ref, self.test_ref = ray.put(val), ray.put(test)

    def start(self, piece: SetSlice) -> list[Any]:
        """The classifiers of ``piece``, one per seed (started once per process)."""
        refs = []
        for job in self.jobs:
            key = (piece, repr(job))
            if key not in Scorer._started:
                images = sum(rows for _, _, rows in piece.shards)
                need = sizing.classifier_task(self.cfg, job.device, images=images, side=max(piece.image_shape[:2]),
                                              held_out=self.held_out)
                if not self.said:
                    log.info("cas: %s for %d images (estimate, for the largest set it is asked for more); %d seed(s) "
                             "per set", need.describe(), images, len(self.jobs))
                    self.said = True
                Scorer._started[key] = classifier_options(self.task, self.cfg, job.device, need).remote(
                    job, piece, self.val_ref, self.test_ref)
            refs.append(Scorer._started[key])
        return refs

    def collect(self, pieces: list[SetSlice]) -> list[Score]:
        """Scores in the order of ``pieces`` (started now if not yet), each the mean over the seeds; a
        line as each classifier finishes."""
        pending = {ref: (i, j) for i, p in enumerate(pieces) for j, ref in enumerate(self.start(p))}
        results: dict[tuple[int, int], Score] = {}
        total = len(pending)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, j = pending.pop(ready[0])
            res = results[i, j] = ray.get(ready[0])
            res.train = pieces[i].set_dir
            what = f"{pieces[i].set_dir} (stratified prefix)" if pieces[i].prefix else pieces[i].set_dir
            seed = f", seed {j + 1} of {len(self.jobs)}" if len(self.jobs) > 1 else ""
            log.info("cas: %s: top-1 %.4f, top-5 %.4f (best epoch %d of %d, %d images, %.1fs%s, %s protocol) [%d/%d]",
                     what, res.top1, res.top5, res.best_epoch, res.epochs_run, res.num_images, res.seconds, seed,
                     self.protocol, len(results), total)
        for p in pieces:
            for job in self.jobs:
                Scorer._started.pop((p, repr(job)), None)
        return [mean_over_seeds([results[i, j] for j in range(len(self.jobs))], self.seeds)
                for i in range(len(pieces))]


def _two_sample_task(job: CasJob, real: SetSlice, synthetic: SetSlice, images: int, epochs: int) -> dict[str, Any]:
    from raysd.core.two_sample import two_sample_test

    job = _on_this_worker(job)
    return two_sample_test(read_slice(real)[0], read_slice(synthetic)[0], images=images, epochs=epochs, cas=job.cas,
                           seed=job.seed, device=job.device, precision=job.precision)


MIN_TWO_SAMPLE = 8  # images per kind: two for each of its quarters and more for its training half


class TwoSample:
    """The real-vs-synthetic two-sample test of one synthetic set, in a Ray task started at once
    (beside the CAS classifiers); ``result()`` waits for it (None when cas.two_sample_images is 0)."""

    def __init__(self, cfg: Config, real: SetSlice, synthetic: SetSlice, name: str):
        self.name, self.ref = name, None
        c = cfg.cas
        if not c.two_sample_images:
            return
        device = connect(cfg)
        task, job = _task(_two_sample_task, cfg, device, 2, 2, c)
        n = min(c.two_sample_images, sum(r for _, _, r in real.shards), sum(r for _, _, r in synthetic.shards))
        if n < MIN_TWO_SAMPLE:
            log.info("two-sample test: skipped, %d images per kind (it needs %d)", n, MIN_TWO_SAMPLE)
            return
        need = sizing.classifier_task(cfg, device, images=2 * n, side=max(real.image_shape[:2]), held_out=0)
        self.ref = classifier_options(task, cfg, device, need).remote(job, real, synthetic, c.two_sample_images,
                                                                      c.two_sample_epochs)

    def result(self) -> dict[str, Any] | None:
        if self.ref is None:
            return None
        res = {"set": self.name, **ray.get(self.ref)}
        log.info("two-sample test: real vs %s told apart with %.1f %% accuracy on %d held-out images (50 %%: "
                 "indistinguishable), AUC %.3f", self.name, 100 * res["accuracy"], res["test_images"], res["auc"])
        return res


def cas_of_set(cfg: Config, train_dir: str, **kwargs: Any) -> Score:
    """CAS of the whole set in ``train_dir`` (val/test default to the run's real splits)."""
    return Scorer(cfg, 1, **kwargs).collect([SetSlice.whole(train_dir)])[0]


def cas_of_generator(cfg: Config, spec: GeneratorSpec, num_images: int, balance: str = "uniform") -> Score:
    """Generate ``num_images`` in memory (no files) and score them: the pipeline's after_k CAS (on
    the driver on CPUs, in a Ray task on an accelerator)."""
    device = connect(cfg)
    run = Run(cfg)
    val, test, num_classes = _real(run)
    # max_calls=1: the worker exits after it, so an SD generator does not stay cached in an idle worker
    task, job = _task(_generator_task, cfg, device, 1, num_classes, cfg.cas, max_calls=1)
    args = (job, spec, num_images, balance, run.train_meta["counts_per_class"], val, test, cfg.sampling.batch_size)
    if device == "cpu":  # nothing else runs meanwhile; a task's fresh worker spent ~5 s importing torch and diffusers
        threads = torch.get_num_threads()
        try:
            res = _generator_task(*args)
        finally:
            torch.set_num_threads(threads)  # the task sets the driver's to the job's
            release_generators()  # the driver must not hold an SD model while the next stages' workers run
    else:
        need = sizing.generator_cas(cfg, run, 2 if spec.unet_dir else 1, device, images=num_images)
        res = ray.get(classifier_options(task, cfg, device, need).remote(*args))
    log.info("cas: %d generated images (IS %d, UGS %.3g): top-1 %.4f, top-5 %.4f, %.1f img/s", num_images,
             spec.num_inference_steps, spec.guidance_scale, res.top1, res.top5, res.images_per_second)
    return res


def early_room(cfg: Config, device: str) -> int | None:
    """How many classifiers may start while generation runs: on accelerators, those the generation
    pool leaves free (the pool grows to every accelerator the cluster has or can get, so usually
    none: a classifier started early would hold one the pool waits for); on CPUs, no limit."""
    if device == "cpu":
        return None
    from raysd.stages.cluster import accelerator_capacity, accelerators

    pool = cfg.resources.generation_actors or max(1, accelerator_capacity(cfg))
    return max(0, int(accelerators(cfg)) - pool)


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


def scaling_slices(run: Run, set_dir: str, prefix_counts: list[list[int]],
                   shards: dict[int, tuple[str, str, int]] | None = None) -> list[SetSlice | None]:
    """The real training split, then each stratified prefix of the generated set (from its
    committed meta.json, or the shards written so far)."""
    if shards is None:
        meta = imageset.read_meta(set_dir)
        shards = {int(n[6:12]): (n, i["sha256"], i["rows"]) for n, i in meta["files"].items()}
        plan_counts, shard_size = meta["counts_per_class"], meta["provenance"]["shard_size"]
    else:
        plan_counts, shard_size = prefix_counts[-1], run.cfg.scale.shard_size
    shape = (*run.image_size, 3)
    return [SetSlice.whole(run.split_dir("train")),
            *(prefix_slice(set_dir, shards, plan_counts, c, shard_size, shape) for c in prefix_counts)]


class PrefixStarter:
    """Hears of each shard the generation writes and starts the classifier of every scale whose
    prefix is complete (and the real data's at once): the scaling study overlaps generation.
    Generating on CPUs, whose actor pool takes every core, the real data's classifier is left to
    the scaling stage: started first, it held a core that the pool's second actor then waited for
    (the first shard took 45 s instead of ~30 s on the 2-core demo machine)."""

    def __init__(self, run: Run, set_dir: str, prefix_counts: list[list[int]]):
        self.run, self.set_dir, self.prefix_counts = run, set_dir, prefix_counts
        self.scorer: Scorer | None = None
        device = connect(run.cfg)
        self.started: set[int] = {0} if device == "cpu" else set()  # 0: the real training split
        self.room = early_room(run.cfg, device)
        if self.room == 0:
            log.info("cas: every accelerator generates: the classifiers start when the generation ends")

    def __call__(self, shards: dict[int, tuple[str, str, int]]) -> None:
        if self.room == 0:
            return
        self.scorer = self.scorer or Scorer(self.run.cfg, len(self.prefix_counts) + 1)
        for i, piece in enumerate(scaling_slices(self.run, self.set_dir, self.prefix_counts, shards)):
            if self.room is not None and len(self.started) >= self.room:
                return  # the rest wait for the scaling stage (on resume every prefix may be complete at once)
            if piece is not None and i not in self.started:
                self.scorer.start(piece)
                self.started.add(i)
                if i:
                    log.info("cas: prefix %d of %d is written: its classifier starts while generation continues", i,
                             len(self.prefix_counts))


def scaling_table(run: Run, set_dir: str, counts: dict[str, list[int]]) -> dict[str, Any]:
    """Table 2 as the scaling stage's outputs: the real training split and every x_k (its classifier
    perhaps started while generating), the two-sample test of the smallest scale and, with
    cas.both_protocols, Table 2 under the other protocol (its classifiers run beside the first's)."""
    from raysd.run.results import OTHER_PROTOCOL, TWO_SAMPLE

    names = ["real", *counts]
    pieces = scaling_slices(run, set_dir, list(counts.values()))
    two = TwoSample(run.cfg, pieces[0], pieces[1], next(iter(counts)))  # the smallest scale against the real data
    both = run.cfg.cas.both_protocols
    scorer = Scorer(run.cfg, len(pieces) * (2 if both else 1))
    other = Scorer(run.cfg, len(pieces) * 2, protocol=run.cfg.cas.other_protocol) if both else None
    for s in (scorer, other) if other else (scorer,):  # every classifier started before any is waited for
        for piece in pieces:
            s.start(piece)
    rows: dict[str, Any] = {name: score.scale_json() for name, score in zip(names, scorer.collect(pieces))}
    if other is not None:
        rows[OTHER_PROTOCOL] = {"protocol": other.protocol,
                                "rows": {n: sc.scale_json() for n, sc in zip(names, other.collect(pieces))}}
    return {**rows, **({TWO_SAMPLE: found} if (found := two.result()) else {})}
