"""One search trial as Ray Tune runs it: its images (generated with the trial's IS, UGS and
checkpoint epoch, cached on disk by what decides them), then ResNet20 epochs with a report after
each (and a checkpoint where the scheduler may pause or stop it), via the Ray-free
:func:`raysd.core.search_space.run_trial`. A trial restored from a checkpoint reports that
checkpoint's result again before anything else (the scheduler's protocol, :mod:`raysd.stages.tuning`).
A trial reads no checkpoint record: the context carries the checksums the search read once; a
trial whose images are cached reads no checkpoint at all."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from raysd.config import fingerprint
from raysd.core.generator import GeneratorSpec
from raysd.core.plan import class_counts, make_plan
from raysd.core.search_space import PARAMS, run_trial
from raysd.data import checkpoints as ck
from raysd.data import storage
from raysd.data.models import load_generator
from raysd.faults import maybe_fail
from raysd.run import legacy
from raysd.run.generators import spec_for, spec_identity
from raysd.run.rundir import Run
from raysd.stages.cluster import worker_device

STATE_FILE = "trial_state.pt"


@dataclass
class TrialContext:
    """What every trial of a search receives: the run and the real splits it may read (val for the
    callbacks; test only for the paper's objective, scored with the best-val weights)."""

    run: Run
    phase: int
    fixed: dict[str, Any]  # phase 1: {"module": "encoder"}; phase 2: also the frozen encoder_epoch
    device: str
    val: tuple[np.ndarray, np.ndarray]
    num_classes: int
    test: tuple[np.ndarray, np.ndarray] | None = None  # objective=test only
    milestones: list[int] = field(default_factory=list)  # epochs with a checkpoint (the schedulers' rungs)
    threads: int = 1  # torch threads of a CPU trial
    checkpoints: dict[str, dict[int, str]] = field(default_factory=dict)  # kind -> {epoch: weights SHA-256}
    base_identity: str = ""  # the base model's identity (by content), for the image cache's key
    resources: dict[str, float] = field(default_factory=dict)  # what each trial asks Ray for (cpu, gpu, memory)
    at_once: int = 1  # trials that run at once


def search_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable: ``config`` holds the searched parameters."""
    cfg = ctx.run.cfg
    ck.sweep_tmpdirs()  # what a trial killed here before left behind
    device = worker_device(ctx.device)
    if device == "cpu":
        torch.set_num_threads(ctx.threads)
    params = {k: config[k] for k in PARAMS}
    restored = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = torch.load(os.path.join(d, STATE_FILE), weights_only=True, map_location="cpu")
    miles = set(ctx.milestones)

    node = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        maybe_fail(f"trial_epoch_{metrics['epoch']}")  # fault tests: the trial process dies mid-trial
        metrics = {**metrics, "node": node}
        if metrics["epoch"] in miles or metrics["finished"]:
            # Tune copies the checkpoint to the run directory inside report(); then the local copy goes
            with tempfile.TemporaryDirectory(prefix=f"raysd-trial-{ck.owner_tag()}-", dir=ck.tmp_root()) as local:
                torch.save({**state, "metrics": metrics}, os.path.join(local, STATE_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(local))
        else:
            tune.report(metrics)

    if restored is not None and restored.get("metrics"):
        report({**restored["metrics"], "resumed": True}, restored)  # where it stands: wait, go on or stop

    run_trial(params, images_fn=lambda p: trial_images(ctx, p, device), val_split=ctx.val, num_classes=ctx.num_classes,
              cfg=cfg, device=device, report=report, restored=restored, test_split=ctx.test,
              precision=cfg.model.precision)


def trial_spec(ctx: TrialContext, params: dict[str, Any]) -> GeneratorSpec:
    """The generator of a trial (phase 1 searches encoder epochs with the base UNet, phase 2 UNet
    epochs with the frozen encoder), from the context alone: no checkpoint or record is read."""
    steps, ugs = int(params["num_inference_steps"]), float(params["guidance_scale"])
    if ctx.phase == 1:
        return spec_for(ctx.run, encoder_epoch=int(params["epoch"]), unet_epoch=None, num_inference_steps=steps,
                        guidance_scale=ugs)
    return spec_for(ctx.run, encoder_epoch=int(ctx.fixed["encoder_epoch"]), unet_epoch=int(params["epoch"]),
                    num_inference_steps=steps, guidance_scale=ugs)


def _shas(ctx: TrialContext, params: dict[str, Any]) -> tuple[str, str | None]:
    """The trial's checkpoints' weights checksums, as the search read them from their records."""
    if ctx.phase == 1:
        return ctx.checkpoints["encoder"][int(params["epoch"])], None
    return ctx.checkpoints["encoder"][int(ctx.fixed["encoder_epoch"])], ctx.checkpoints["unet"][int(params["epoch"])]


def trial_images(ctx: TrialContext, params: dict[str, Any], device: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(images, labels, generation seconds) for a trial's parameters, cached on disk."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    cfg = ctx.run.cfg
    spec = trial_spec(ctx, params)
    n = cfg.search.num_images
    folder = storage.join(ctx.run.search_dir(ctx.phase), "images")
    identity = spec_identity(spec, shas=_shas(ctx, params), base=ctx.base_identity)
    path = storage.join(folder, f"{fingerprint([identity, n])}.safetensors")
    # images an earlier raysd cached for the same trial (keyed by the whole spec) are used too
    for cached in (path, storage.join(folder, f"{legacy.trial_images_key(spec, n)}.safetensors")):
        info_path = cached.replace(".safetensors", ".json")
        if not storage.exists(info_path):
            continue
        info = storage.read_json(info_path)
        data = storage.read_bytes(cached) if storage.exists(cached) else b""
        if storage.sha256_bytes(data) == info.get("sha256"):
            t = st_load(data)
            return t["images"].numpy(), t["labels"].numpy(), float(info["seconds"])
        print(f"[raysd] trial images {cached} are damaged or missing: generating them again", flush=True)
    plan = make_plan(n, class_counts(n, ctx.num_classes, "uniform"), cfg.seed)
    t0 = time.perf_counter()
    images = load_generator(spec, device).images(plan.labels, plan.seeds, batch_size=cfg.sampling.batch_size)
    seconds = time.perf_counter() - t0
    data = st_save({"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.from_numpy(plan.labels)})
    storage.write_bytes(path, data)
    storage.write_json(path.replace(".safetensors", ".json"), {"seconds": seconds, "params": params, "num_images": n,
                                          "sha256": storage.sha256_bytes(data)})  # last: marks the cache entry
    return images, plan.labels, seconds
