"""Stage: generate a synthetic set with Ray Data, one generator replica per GPU (or CPU actor).

plan (sample_id, label, seed) -> one row per shard -> ``map_batches`` on an actor pool whose
actors load the base model and checkpoints once, generate the shard's images at the
classifier's resolution and write the shard (``shard-NNNNNN.parquet``, a fixed range of
sample_ids) under a temporary name, renamed when complete. A rerun skips complete shards;
``meta.json`` (generator parameters, checkpoint checksums, seed, counts per class, every
shard's SHA-256) is written last. The shard is the unit of work and of resumption, so
whatever dies (driver, actor, node), a rerun ends with exactly N rows, each sample_id once,
and a sample_id's image does not depend on which actor or node made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

import numpy as np
import ray.data

from raysd import checkpoints as ck
from raysd import runs, sets, storage
from raysd.config import Config
from raysd.errors import RaysdError
from raysd.generator import GeneratorSpec, spec_from_dict
from raysd.plan import Plan, class_counts, make_plan
from raysd.raycluster import ensure_ray

log = logging.getLogger("raysd")

SPEC_FILE = "generation.json"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.parquet$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


# --------------------------------------------------------------------------------------------
# Parameters: explicit flags > search 2's best > search 1's best > config defaults


def best_params(cfg: Config) -> dict[str, Any]:
    """The newest search result of the run (phase 2, else 1), or {}."""
    for phase in (2, 1):
        path = storage.join(runs.search_dir(cfg, phase), "best.json")
        if storage.exists(path):
            best = storage.read_json(path)
            return {k: best[k] for k in ("num_inference_steps", "guidance_scale", "encoder_epoch", "unet_epoch")
                    if k in best}
    return {}


def resolve_spec(cfg: Config, *, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 encoder_epoch: int | None = None, unet_epoch: int | None = None, scheduler: str | None = None,
                 use_unet: bool | None = None, best: dict[str, Any] | None = None) -> GeneratorSpec:
    """The generator for this run: checkpoints and sampler settings, validated.

    Unset values come from ``best`` (default: the run's newest search result), then the config.
    """
    best = best_params(cfg) if best is None else best
    enc_root, unet_root = runs.ckpt_root(cfg, "encoder"), runs.ckpt_root(cfg, "unet")
    enc_valid = ck.valid_epochs(enc_root)
    if not enc_valid:
        raise RaysdError(f"generate: no Class-Encoder checkpoints in {enc_root}; run `raysd train-encoder` first")
    e = encoder_epoch or best.get("encoder_epoch") or enc_valid[-1]
    if e not in enc_valid:
        raise RaysdError(f"generate: encoder epoch {e} has no valid checkpoint in {enc_root}; available: {enc_valid}")
    unet_valid = ck.valid_epochs(unet_root)
    f = unet_epoch or best.get("unet_epoch")
    if f is None and use_unet is not False and unet_valid:
        f = unet_valid[-1]
    if use_unet is False:
        f = None
    if f is not None:
        if f not in unet_valid:
            raise RaysdError(f"generate: unet epoch {f} has no valid checkpoint in {unet_root}; available: {unet_valid}")
        if ck.read_meta(ck.epoch_dir(unet_root, f)).get("encoder_epoch") != e:
            e = ck.read_meta(ck.epoch_dir(unet_root, f))["encoder_epoch"]  # a fine-tuned UNet pairs with its encoder
    steps = num_inference_steps or best.get("num_inference_steps") or cfg.sampling.num_inference_steps
    ugs = guidance_scale if guidance_scale is not None else best.get("guidance_scale", cfg.sampling.guidance_scale)
    if not 1 <= steps <= cfg.model.num_train_timesteps:
        raise RaysdError(f"generate: --num-inference-steps must be in [1, {cfg.model.num_train_timesteps}]; got {steps}")
    if ugs < 0:
        raise RaysdError(f"generate: --guidance-scale must be >= 0; got {ugs}")
    shape = sets.read_meta(runs.split_dir(cfg, "train"))["image_shape"]
    m = cfg.model
    return GeneratorSpec(
        base=runs.base_spec(cfg), resolution=m.resolution, encoder_dir=ck.epoch_dir(enc_root, e),
        unet_dir=ck.epoch_dir(unet_root, f) if f else None, out_size=(shape[0], shape[1]),
        num_inference_steps=int(steps), guidance_scale=float(ugs), scheduler=scheduler or cfg.sampling.scheduler,
        precision=m.precision, beta_start=m.beta_start, beta_end=m.beta_end, num_train_timesteps=m.num_train_timesteps,
        seed=cfg.seed, compile=cfg.sampling.compile, fuse_qkv=cfg.sampling.fuse_qkv, tiny_decoder=m.tiny_decoder)


def plan_for(cfg: Config, num_images: int, class_balance: str) -> Plan:
    meta = sets.read_meta(runs.split_dir(cfg, "train"))
    counts = class_counts(num_images, meta["num_classes"], class_balance, meta["counts_per_class"])
    return make_plan(num_images, counts, cfg.seed)


# --------------------------------------------------------------------------------------------
# The Ray Data pipeline


class ShardGenerator:
    """Actor: loads the generator once; each call makes and writes one shard."""

    def __init__(self, spec: dict[str, Any], out_dir: str, device: str, threads: int, batch_size: int,
                 keep_full: bool):
        import torch

        from raysd.generator import load_generator

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.spec, self.out_dir, self.device = spec_from_dict(spec), out_dir, device
        self.batch_size, self.keep_full = batch_size, keep_full
        self.base, self.encoder = load_generator(self.spec, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raysd.faults import maybe_fail

        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
        out: dict[str, list] = {"shard": [], "rows": [], "sha256": [], "seconds": [], "node": []}
        for i, lo, labels, seeds in zip(batch["shard"], batch["lo"], batch["labels"], batch["seeds"]):
            t0 = time.perf_counter()
            images, full = self._images(np.asarray(labels, np.int64), np.asarray(seeds, np.int64))
            maybe_fail("generate_shard")  # fault tests: the actor dies mid-batch, its images not yet written
            ids = np.arange(int(lo), int(lo) + len(labels), dtype=np.int64)
            info = sets.write_shard(self.out_dir, shard_name(int(i)), ids, np.asarray(labels, np.int64), images,
                                    extra={"image_full": full} if full is not None else None)
            out["shard"].append(int(i))
            out["rows"].append(info["rows"])
            out["sha256"].append(info["sha256"])
            out["seconds"].append(time.perf_counter() - t0)
            out["node"].append(node)
        return {k: np.asarray(v) for k, v in out.items()}

    def _images(self, labels: np.ndarray, seeds: np.ndarray):
        from raysd.sampling import generate

        s = self.spec
        out = generate(self.base, self.encoder, labels, seeds, s.params(), s.schedule(), out_size=s.out_size,
                       batch_size=self.batch_size, full_size=s.resolution if self.keep_full else None)
        return out if self.keep_full else (out, None)


def generate_set(cfg: Config, out_dir: str, *, num_images: int, class_balance: str, spec: GeneratorSpec,
                 restart: bool = False) -> dict[str, Any]:
    """Generate (or finish, or find complete) the set in ``out_dir``; returns its meta."""
    if num_images < 1:
        raise RaysdError(f"generate: the number of images must be >= 1; got {num_images}")
    ensure_ray()
    runs.check_storage_for_cluster(cfg)
    plan = plan_for(cfg, num_images, class_balance)
    shard_size = cfg.scale.shard_size
    train_meta = sets.read_meta(runs.split_dir(cfg, "train"))
    provenance = {"generator": spec.provenance(), "num_images": num_images, "class_balance": class_balance,
                  "shard_size": shard_size, "keep_full_resolution": cfg.scale.keep_full_resolution}
    fingerprint = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    if not _claim(out_dir, fingerprint, provenance, restart):
        log.info("generate: %s is complete (%d images), skipped", out_dir, num_images)
        return sets.read_meta(out_dir)
    n_shards = plan.num_shards(shard_size)
    done = _complete_shards(out_dir)
    todo = [i for i in range(n_shards) if i not in done]
    log.info("generate: %d images in %d shard(s) of %d -> %s (%d done, %d to make); counts per class %s",
             num_images, n_shards, shard_size, out_dir, len(done), len(todo), plan.counts)
    hashes = _run_pipeline(cfg, spec, plan, todo, out_dir, shard_size) if todo else {}
    files = {}
    for i in range(n_shards):
        name = shard_name(i)
        sha = hashes.get(i) or storage.sha256_file(storage.join(out_dir, name))
        files[name] = {"rows": len(range(*plan.shard(i, shard_size).indices(len(plan)))), "sha256": sha}
    meta = sets.set_meta(dataset=train_meta["dataset"], split="synthetic", class_names=train_meta["class_names"],
                         labels=plan.labels, image_shape=(*spec.out_size, 3), files=files,
                         provenance={**provenance, "fingerprint": fingerprint})
    sets.write_meta(out_dir, meta)
    return sets.read_meta(out_dir)


def _claim(out_dir: str, fingerprint: str, provenance: dict, restart: bool) -> bool:
    """Record what this directory is for; False when it is already complete for it."""
    spec_path = storage.join(out_dir, SPEC_FILE)
    if storage.exists(spec_path):
        old = storage.read_json(spec_path)
        if old.get("fingerprint") != fingerprint:
            if not restart:
                raise RaysdError(f"generate: {out_dir} holds a set made with other settings; pass --restart to "
                                 "replace it, or choose another --name")
            storage.remove(out_dir)
        elif sets.is_complete(out_dir):
            return False
    elif storage.exists(out_dir) and storage.listdir(out_dir):
        raise RaysdError(f"generate: {out_dir} exists and is not a raysd generation directory")
    storage.makedirs(out_dir)
    storage.write_json_atomic(spec_path, {"fingerprint": fingerprint, **provenance})
    return True


def _complete_shards(out_dir: str) -> set[int]:
    return {int(m.group(1)) for n in storage.listdir(out_dir) if (m := _SHARD_RE.match(n))}


def _actor_pool(cfg: Config, device: str) -> tuple[int, float, float, int]:
    """(pool size, GPUs per actor, CPUs per actor, torch threads)."""
    import ray

    res = ray.cluster_resources()
    if device == "cuda":
        n = cfg.resources.generation_actors or max(1, int(res.get("GPU", 1)))
        return n, 1.0, 0.0, 1
    threads = cfg.resources.torch_threads or 1
    n = cfg.resources.generation_actors or max(1, int(res.get("CPU", 1)) // threads)
    return n, 0.0, 1.0, threads


def _run_pipeline(cfg: Config, spec: GeneratorSpec, plan: Plan, todo: list[int], out_dir: str,
                  shard_size: int) -> dict[int, str]:
    device = runs.resolve_device(cfg)
    pool, gpus, cpus, threads = _actor_pool(cfg, device)
    rows = []
    for i in todo:
        sl = plan.shard(i, shard_size)
        rows.append({"shard": i, "lo": sl.start, "labels": plan.labels[sl].tolist(), "seeds": plan.seeds[sl].tolist()})
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardGenerator,
        fn_constructor_kwargs={"spec": spec.to_dict(), "out_dir": out_dir, "device": device, "threads": threads,
                               "batch_size": cfg.sampling.batch_size,
                               "keep_full": cfg.scale.keep_full_resolution},
        batch_size=1, batch_format="numpy", num_gpus=gpus, num_cpus=cpus,
        compute=ray.data.ActorPoolStrategy(size=min(pool, len(rows))),  # one replica per GPU, all up front
    )
    t0 = time.perf_counter()
    total = sum(len(range(*plan.shard(i, shard_size).indices(len(plan)))) for i in todo)
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
