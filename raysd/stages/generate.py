"""Stage: generate a synthetic set with Ray Data, one generator replica per GPU (or CPU actor).

plan (sample_id, label, seed) -> one row per shard -> ``map_batches`` on an actor pool whose
actors load the generator once, make the shard's images at the classifier's resolution and
write the shard (``shard-NNNNNN.parquet``, a fixed range of sample_ids). A rerun skips complete
shards; ``meta.json`` (generator parameters, checkpoint checksums, seed, counts per class, every
shard's SHA-256) is written last. The shard is the unit of work and of resumption, so whatever
dies (driver, actor, node), a rerun ends with exactly N rows, each sample_id once, and a
sample_id's image does not depend on which actor or node made it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data

from raysd.config import Config, fingerprint
from raysd.core.generator import GeneratorSpec
from raysd.core.plan import Plan
from raysd.data import imageset, storage
from raysd.errors import RaysdError
from raysd.faults import maybe_fail
from raysd.run.generators import spec_provenance
from raysd.run.rundir import Run, claim
from raysd.stages.cluster import connect

log = logging.getLogger("raysd")

SPEC_FILE = "generation.json"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.parquet$")


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
    """Actor: loads the generator once; each call makes and writes one shard."""

    def __init__(self, job: ShardJob):
        import torch

        from raysd.data.models import load_generator

        if job.device == "cpu":
            torch.set_num_threads(max(1, job.threads))
        self.job = job
        self.generator = load_generator(job.spec, job.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        job = self.job
        node = ray.get_runtime_context().get_node_id()[:8]
        out: dict[str, list] = {"shard": [], "rows": [], "sha256": [], "seconds": [], "node": []}
        for i, lo, labels, seeds in zip(batch["shard"], batch["lo"], batch["labels"], batch["seeds"]):
            t0 = time.perf_counter()
            labels = np.asarray(labels, np.int64)
            made = self.generator.images(labels, np.asarray(seeds, np.int64), batch_size=job.batch_size,
                                         full_size=job.spec.resolution if job.keep_full else None)
            images, full = made if job.keep_full else (made, None)
            maybe_fail("generate_shard")  # fault tests: the actor dies mid-batch, its images not yet written
            ids = np.arange(int(lo), int(lo) + len(labels), dtype=np.int64)
            info = imageset.write_shard(job.out_dir, shard_name(int(i)), ids, labels, images,
                                        extra={"image_full": full} if full is not None else None)
            for k, v in (("shard", int(i)), ("rows", info["rows"]), ("sha256", info["sha256"]),
                         ("seconds", time.perf_counter() - t0), ("node", node)):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}


def generate_set(cfg: Config, out_dir: str, *, num_images: int, class_balance: str, spec: GeneratorSpec,
                 restart: bool = False) -> dict[str, Any]:
    """Generate (or finish, or find complete) the set in ``out_dir``; returns its meta."""
    if num_images < 1:
        raise RaysdError(f"generate: the number of images must be >= 1; got {num_images}")
    run = Run(cfg)
    device = connect(cfg)
    plan = run.plan(num_images, class_balance)
    shard_size = cfg.scale.shard_size
    provenance = {"generator": spec_provenance(spec), "num_images": num_images, "class_balance": class_balance,
                  "shard_size": shard_size, "keep_full_resolution": cfg.scale.keep_full_resolution}
    fp = fingerprint(provenance)
    claim(out_dir, fp, what="generate", restart=restart, record=SPEC_FILE, body=provenance)
    if imageset.is_complete(out_dir):
        log.info("generate: %s is complete (%d images), skipped", out_dir, num_images)
        return imageset.read_meta(out_dir)
    n_shards = plan.num_shards(shard_size)
    done = _complete_shards(out_dir)
    todo = [i for i in range(n_shards) if i not in done]
    log.info("generate: %d images in %d shard(s) of %d -> %s (%d done, %d to make); counts per class %s",
             num_images, n_shards, shard_size, out_dir, len(done), len(todo), plan.counts)
    job = ShardJob(spec, out_dir, device, cfg.resources.torch_threads or 1, cfg.sampling.batch_size,
                   cfg.scale.keep_full_resolution)
    hashes = _run_pipeline(cfg, job, plan, todo, shard_size) if todo else {}
    files = {}
    for i in range(n_shards):
        name = shard_name(i)
        sha = hashes.get(i) or storage.sha256_file(storage.join(out_dir, name))
        files[name] = {"rows": len(range(*plan.shard(i, shard_size).indices(len(plan)))), "sha256": sha}
    meta = imageset.set_meta(dataset=run.train_meta["dataset"], split="synthetic", class_names=run.train_meta[
        "class_names"], labels=plan.labels, image_shape=(*spec.out_size, 3), files=files,
        provenance={**provenance, "fingerprint": fp})
    imageset.write_meta(out_dir, meta)
    return imageset.read_meta(out_dir)


def _complete_shards(out_dir: str) -> set[int]:
    return {int(m.group(1)) for n in storage.listdir(out_dir) if (m := _SHARD_RE.match(n))}


def _actor_pool(cfg: Config, device: str) -> tuple[int, float, float]:
    """(pool size, GPUs per actor, CPUs per actor)."""
    res = ray.cluster_resources()
    if device == "cuda":
        return cfg.resources.generation_actors or max(1, int(res.get("GPU", 1))), 1.0, 0.0
    threads = cfg.resources.torch_threads or 1
    return cfg.resources.generation_actors or max(1, int(res.get("CPU", 1)) // threads), 0.0, 1.0


def _run_pipeline(cfg: Config, job: ShardJob, plan: Plan, todo: list[int], shard_size: int) -> dict[int, str]:
    pool, gpus, cpus = _actor_pool(cfg, job.device)
    rows = []
    for i in todo:
        sl = plan.shard(i, shard_size)
        rows.append({"shard": i, "lo": sl.start, "labels": plan.labels[sl].tolist(), "seeds": plan.seeds[sl].tolist()})
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardGenerator, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="numpy", num_gpus=gpus,
        num_cpus=cpus, compute=ray.data.ActorPoolStrategy(size=min(pool, len(rows))),  # one replica per GPU, all up front
    )
    t0 = time.perf_counter()
    total = sum(len(r["labels"]) for r in rows)
    made, hashes, nodes = 0, {}, {}
    for k, row in enumerate(ds.iter_rows(), 1):
        made += int(row["rows"])
        hashes[int(row["shard"])] = str(row["sha256"])
        nodes[row["node"]] = nodes.get(row["node"], 0) + 1
        rate = made / max(time.perf_counter() - t0, 1e-9)
        log.info("generate: shard %d done (%d/%d shards, %d/%d images, %.1f img/s, ETA %.0fs)", row["shard"], k,
                 len(todo), made, total, rate, (total - made) / max(rate, 1e-9))
    log.info("generate: %d images in %.1fs (%.1f img/s) on %d actor(s); shards per node %s", made,
             time.perf_counter() - t0, made / max(time.perf_counter() - t0, 1e-9), pool, json.dumps(nodes))
    return hashes
