"""Stage: generate a synthetic set with Ray Data, one generator replica per GPU (or CPU actor).

plan (sample_id, label, seed) -> one row per shard -> ``map_batches`` on an actor pool whose
actors load the generator once, make the shard's images at the classifier's resolution and
write the shard (``shard-NNNNNN.parquet``, a fixed range of sample_ids, written whole or not at
all). The driver records every shard that landed, with its SHA-256, in ``shards.json``; a rerun
has the actors check the recorded shards (read and hashed in the tasks, not on the driver) and
makes the rest again, so a file no record lists (a write cut short) is never used. ``meta.json``
(generator parameters, checkpoint checksums, seed, counts per class, every shard's SHA-256) is
written last. The shard is the unit of work and of resumption, so whatever
dies (driver, actor, node), a rerun ends with exactly N rows, each sample_id once, and a
sample_id's image does not depend on which actor or node made it.
"""

from __future__ import annotations

import json
import logging
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import ray
import ray.data

from raysd.config import Config, fingerprint
from raysd.core.generator import GeneratorSpec
from raysd.core.plan import Plan
from raysd.data import imageset, storage
from raysd.errors import RaysdError
from raysd.faults import maybe_fail
from raysd.config import flatten
from raysd.run import legacy
from raysd.run.generators import spec_identity, spec_provenance
from raysd.run.locking import check_held
from raysd.run.rundir import Run, claim
from raysd.run import sizing
from raysd.stages.cluster import accelerator_capacity, accelerator_memory, accelerators, connect, worker_device

log = logging.getLogger("raysd")

SPEC_FILE = "generation.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


@dataclass
class ShardJob:
    """What every generation actor needs (crosses Ray as it is)."""

    spec: GeneratorSpec
    out_dir: str
    device: str
    threads: int  # torch threads of a CPU actor
    batch_size: int
    keep_full: bool  # also store the images at the model's resolution


class ShardGenerator:
    """Actor: each call makes and writes one shard, or checks one a record lists (read and hashed
    here, not on the driver) and makes it again when it does not match. The generator is loaded
    once, when the first shard is to be made."""

    def __init__(self, job: ShardJob):
        import torch

        job = dataclasses.replace(job, device=worker_device(job.device))  # a custom accelerator holds no GPU
        if job.device == "cpu":
            torch.set_num_threads(max(1, job.threads))
        self.job = job
        self.generator = None

    def _generator(self):  # noqa: ANN202
        from raysd.data.models import load_generator

        if self.generator is None:
            self.generator = load_generator(self.job.spec, self.job.device)
        return self.generator

    def _recorded(self, name: str, sha: str, rows: int) -> dict | None:
        path = storage.join(self.job.out_dir, name)
        try:
            imageset.read_shard(path, {"sha256": sha, "rows": rows})
        except RaysdError as e:
            print(f"[raysd] {e}: making it again", flush=True)
            return None
        return {"rows": rows, "sha256": sha}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        job = self.job
        node = ray.get_runtime_context().get_node_id()
        out: dict[str, list] = {"shard": [], "rows": [], "sha256": [], "seconds": [], "node": [], "made": []}
        for i, lo, labels, seeds, expect in zip(batch["shard"], batch["lo"], batch["labels"], batch["seeds"],
                                                batch["expect"]):
            t0 = time.perf_counter()
            labels = np.asarray(labels, np.int64)
            info = self._recorded(shard_name(int(i)), str(expect), len(labels)) if str(expect) else None
            made = info is None
            if made:
                images = self._generator().images(labels, np.asarray(seeds, np.int64), batch_size=job.batch_size,
                                                  full_size=job.spec.resolution if job.keep_full else None)
                images, full = images if job.keep_full else (images, None)
                maybe_fail("generate_shard")  # fault tests: the actor dies mid-batch, its images not yet written
                ids = np.arange(int(lo), int(lo) + len(labels), dtype=np.int64)
                info = imageset.write_shard(job.out_dir, shard_name(int(i)), ids, labels, images,
                                            extra={"image_full": full} if full is not None else None)
            for k, v in (("shard", int(i)), ("rows", info["rows"]), ("sha256", info["sha256"]),
                         ("seconds", time.perf_counter() - t0), ("node", node), ("made", made)):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}


ShardsDone = Callable[[dict[int, tuple[str, str, int]]], None]  # {index: (name, sha256, rows)} written so far


def generate_set(cfg: Config, out_dir: str, *, num_images: int, class_balance: str, spec: GeneratorSpec,
                 restart: bool = False, on_shards: ShardsDone | None = None) -> dict[str, Any]:
    """Generate (or finish, or find complete) the set in ``out_dir``; returns its meta.

    Shards are made in sample_id order (so the prefixes of a scaling study complete early) and
    ``on_shards`` hears of every shard as it is written, e.g. to start classifiers on them."""
    if num_images < 1:
        raise RaysdError(f"generate: the number of images must be >= 1; got {num_images}")
    run = Run(cfg)
    device = connect(cfg)
    plan = run.plan(num_images, class_balance)
    shard_size = cfg.scale.shard_size
    provenance = {"generator": spec_provenance(spec), "num_images": num_images, "class_balance": class_balance,
                  "shard_size": shard_size, "keep_full_resolution": cfg.scale.keep_full_resolution}
    identity = {"generator": spec_identity(spec), **{k: v for k, v in provenance.items() if k != "generator"}}
    fp = fingerprint(identity)
    shas = (provenance["generator"]["encoder_sha256"], provenance["generator"]["unet_sha256"])
    legacy_fp = legacy.set_fingerprint(spec, shas, num_images, class_balance, shard_size, cfg.scale.keep_full_resolution)
    claim(out_dir, fp, what="generate", restart=restart, record=SPEC_FILE, body=provenance, aliases=(legacy_fp,),
          identity=flatten(identity))
    if imageset.is_complete(out_dir):
        log.info("generate: %s is complete (%d images), skipped", out_dir, num_images)
        return imageset.read_meta(out_dir)
    n_shards = plan.num_shards(shard_size)
    # an interrupted run's shards count only as its record lists them; the generation tasks check
    # each (read and hashed there) before it counts, and make again what does not match
    recorded = {i: sha for i, sha in _recorded_shards(out_dir).items() if i < n_shards}
    log.info("generate: %d images in %d shard(s) of %d -> %s (%d recorded, to be checked; %d to make); counts per "
             "class %s", num_images, n_shards, shard_size, out_dir, len(recorded), n_shards - len(recorded),
             plan.counts)
    written: dict[int, tuple[str, str, int]] = {}
    if on_shards is not None:
        on_shards(dict(written))
    _run_pipeline(cfg, spec, out_dir, device, plan, list(range(n_shards)), shard_size, written, on_shards, recorded)
    files = {name: {"rows": n, "sha256": sha} for name, sha, n in (written[i] for i in range(n_shards))}
    meta = imageset.set_meta(dataset=run.train_meta["dataset"], split="synthetic", class_names=run.train_meta[
        "class_names"], labels=plan.labels, image_shape=(*spec.out_size, 3), files=files,
        provenance={**provenance, "fingerprint": fp})
    check_held(run.root)  # meta.json commits the set: not by a driver whose run lock was taken over
    imageset.write_meta(out_dir, meta)
    storage.remove(storage.join(out_dir, SHARDS_RECORD))  # meta.json lists them now
    return imageset.read_meta(out_dir)


SHARDS_RECORD = "shards.json"  # the shards written so far (by the driver, after each one landed)


def _recorded_shards(out_dir: str) -> dict[int, str]:
    path = storage.join(out_dir, SHARDS_RECORD)
    if not storage.exists(path):
        return {}
    try:
        return {int(i): str(sha) for i, sha in storage.read_json(path).items()}
    except (ValueError, AttributeError, TypeError):
        log.warning("generate: %s is damaged; its shards are made again", path)
        return {}


def _actor_pool(cfg: Config, device: str, shards: int) -> tuple[Any, dict[str, Any], int]:
    """(Ray Data compute strategy, per-actor resources, torch threads of a CPU actor). On
    accelerators the pool starts with an actor per accelerator already in the cluster and grows to
    the cluster's capacity as accelerator nodes join (the autoscaler adds them for the pool's
    pending actors); every actor holds one accelerator, so none runs on a head without one. On
    CPUs: a fixed pool of CPU actors. An actor takes one shard at a time (a shard is minutes of
    work): a queue of shards on the first actor up would leave later actors idle at the end."""
    r = cfg.resources
    need = sizing.generation_actor(cfg, device)
    card = accelerator_memory(cfg) if device == "cuda" else None
    if card and need.gpu > card:
        raise RaysdError(f"generate: {need.describe()}, more than its {card / sizing.GB:.0f} GB card holds; lower it "
                         f"with {need.lower}")
    log.info("generate: %s (estimate)", need.describe())
    memory = {"memory": need.host}  # asked for by a CPU actor (an accelerator's actor is bounded by its accelerator)
    if device == "cuda" or r.accelerator != "GPU":  # a custom accelerator resource is always asked for
        size = min(shards, r.generation_actors or max(1, accelerator_capacity(cfg)))
        initial = max(1, min(size, int(accelerators(cfg))))  # the accelerators already up start at once
        res = {"num_gpus": 1.0, "num_cpus": 0.0} if r.accelerator == "GPU" and device == "cuda" else {
            "num_cpus": 1.0 if device == "cpu" else 0.0, "resources": {r.accelerator: 1.0}}
        return (ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=initial,
                                           max_tasks_in_flight_per_actor=1), res, r.torch_threads or 1)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = min(shards, r.generation_actors or r.cpu_generation_actors or max(1, cpus // (r.torch_threads or 1)))
    return (ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1), {"num_cpus": 1.0, **memory},
            cpu_actor_threads(r.torch_threads, cpus, size))


def cpu_actor_threads(torch_threads: int | None, cpus: int, actors: int) -> int:
    """Torch threads of one CPU generation actor: ``torch_threads`` (else 1), never more than the
    cluster's cores divided by the pool's actors."""
    return max(1, min(torch_threads or 1, cpus // max(1, actors)))


def _run_pipeline(cfg: Config, spec: GeneratorSpec, out_dir: str, device: str, plan: Plan, todo: list[int],
                  shard_size: int, written: dict[int, tuple[str, str, int]], on_shards: ShardsDone | None,
                  recorded: dict[int, str]) -> None:
    """Make (or check, when ``recorded`` lists them) the shards of ``todo``, recording each in
    ``written`` and in the set's shards record as it lands."""
    compute, resources, threads = _actor_pool(cfg, device, len(todo))
    job = ShardJob(spec, out_dir, device, threads, cfg.sampling.batch_size, cfg.scale.keep_full_resolution)
    rows = []
    for i in sorted(todo, key=lambda i: (i not in recorded, i)):  # the cheap checks first, then in sample_id order
        sl = plan.shard(i, shard_size)
        rows.append({"shard": i, "lo": sl.start, "labels": plan.labels[sl].tolist(), "seeds": plan.seeds[sl].tolist(),
                     "expect": recorded.get(i, "")})
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardGenerator, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="numpy", compute=compute,
        **resources)
    t0 = time.perf_counter()
    total = sum(len(r["labels"]) for r in rows if not r["expect"])
    made, nodes, checked = 0, {}, 0
    for k, row in enumerate(ds.iter_rows(), 1):
        i = int(row["shard"])
        written[i] = (shard_name(i), str(row["sha256"]), int(row["rows"]))
        storage.write_json(storage.join(out_dir, SHARDS_RECORD), {str(j): w[1] for j, w in sorted(written.items())})
        nodes[row["node"]] = nodes.get(row["node"], 0) + 1
        if on_shards is not None:
            on_shards(dict(written))
        if not bool(row["made"]):
            checked += 1
            continue
        made += int(row["rows"])
        rate = made / max(time.perf_counter() - t0, 1e-9)
        log.info("generate: shard %d done (%d/%d shards, %d/%d images, %.1f img/s, ETA %.0fs)", i, k, len(todo), made,
                 total, rate, (total - made) / max(rate, 1e-9))
    log.info("generate: %d images in %.1fs (%.1f img/s), %d recorded shard(s) checked; shards per node %s", made,
             time.perf_counter() - t0, made / max(time.perf_counter() - t0, 1e-9), checked, json.dumps(nodes))
