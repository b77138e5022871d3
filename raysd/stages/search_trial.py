"""One search trial as Ray Tune runs it: its images (generated with the trial's IS, UGS and
checkpoint epoch, cached on disk by their parameters), then ResNet20 epochs with a report after
each (and a checkpoint where the scheduler may pause or stop it), via the Ray-free
:func:`raysd.core.search_space.run_trial`."""

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
from raysd.run.generators import resolve_spec
from raysd.run.rundir import Run

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


def search_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable: ``config`` holds the searched parameters."""
    cfg = ctx.run.cfg
    device = "cuda" if ctx.device == "cuda" and _has_gpu() else "cpu"
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
            with tempfile.TemporaryDirectory(prefix="raysd-trial-", dir=ck.tmp_root()) as local:
                torch.save(state, os.path.join(local, STATE_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(local))
        else:
            tune.report(metrics)

    run_trial(params, images_fn=lambda p: trial_images(ctx, p, device), val_split=ctx.val, num_classes=ctx.num_classes,
              cfg=cfg, device=device, report=report, restored=restored, test_split=ctx.test,
              precision=cfg.model.precision)


def _has_gpu() -> bool:
    return bool(ray.get_gpu_ids())


def trial_spec(run: Run, phase: int, fixed: dict[str, Any], params: dict[str, Any]) -> GeneratorSpec:
    """The generator of a trial: phase 1 searches encoder epochs (base UNet), phase 2 UNet epochs."""
    steps, ugs = int(params["num_inference_steps"]), float(params["guidance_scale"])
    if phase == 1:
        return resolve_spec(run, num_inference_steps=steps, guidance_scale=ugs, encoder_epoch=int(params["epoch"]),
                            use_unet=False)
    return resolve_spec(run, num_inference_steps=steps, guidance_scale=ugs, encoder_epoch=int(fixed["encoder_epoch"]),
                        unet_epoch=int(params["epoch"]))


def trial_images(ctx: TrialContext, params: dict[str, Any], device: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(images, labels, generation seconds) for a trial's parameters, cached on disk."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    cfg = ctx.run.cfg
    spec = trial_spec(ctx.run, ctx.phase, ctx.fixed, params)
    n = cfg.search.num_images
    key = fingerprint([spec.to_dict(), n])
    path = storage.join(ctx.run.search_dir(ctx.phase), "images", f"{key}.safetensors")
    info_path = path.replace(".safetensors", ".json")
    if storage.exists(info_path):
        info = storage.read_json(info_path)
        data = storage.read_bytes(path) if storage.exists(path) else b""
        if storage.sha256_bytes(data) == info.get("sha256"):
            t = st_load(data)
            return t["images"].numpy(), t["labels"].numpy(), float(info["seconds"])
        print(f"[raysd] trial images {path} are damaged or missing: generating them again", flush=True)
    plan = make_plan(n, class_counts(n, ctx.num_classes, "uniform"), cfg.seed)
    t0 = time.perf_counter()
    images = load_generator(spec, device).images(plan.labels, plan.seeds, batch_size=cfg.sampling.batch_size)
    seconds = time.perf_counter() - t0
    data = st_save({"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.from_numpy(plan.labels)})
    storage.write_bytes(path, data)
    storage.write_json(info_path, {"seconds": seconds, "params": params, "num_images": n,
                                          "sha256": storage.sha256_bytes(data)})  # last: marks the cache entry
    return images, plan.labels, seconds
