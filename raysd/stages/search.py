"""Stage: steps 2 and 4 on Ray Tune: OptunaSearch (seeded multivariate TPE, its study in SQLite
in the run directory) + HyperBandScheduler (or ASHA) over IS, UGS and the checkpoint epoch.

Each trial is :func:`raysd.stages.search_trial.search_trial` with the resources of the config.
The results are read back from Tune's ResultGrid (not from Optuna's study, which misses trials
stopped while paused), the study is rebuilt from them, and the outputs are written by
:mod:`raysd.run.search_outputs` (``best.json`` last).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray import tune

from raysd.config import Config, fingerprint
from raysd.core.cas import SplitScores, score_state
from raysd.core.search_space import (SearchSpace, TrialReport, best_trial, milestones, phase1_space, phase2_space,
                                     trial_from_rows)
from raysd.data import checkpoints as ck
from raysd.data import storage
from raysd.errors import RaysdError
from raysd.run.rundir import Run, claim
from raysd.run.scores import SearchBest
from raysd.run.search_outputs import write_outputs
from raysd.stages.cluster import connect
from raysd.stages.prepare import ensure_prepared
from raysd.stages.search_trial import STATE_FILE, TrialContext, search_trial
from raysd.stages.tuning import INFORMED_BY, TrialLogger, live_limit, make_scheduler, make_searcher, run_tuner

log = logging.getLogger("raysd")


def search(cfg: Config, phase: int, *, restart: bool = False) -> SearchBest:
    """Run (or resume, or return the finished) search of ``phase``."""
    if phase not in (1, 2):
        raise RaysdError(f"search: --phase must be 1 or 2; got {phase}")
    run = Run(cfg)
    device = connect(cfg)
    run.save_config()
    ensure_prepared(run)
    out = run.search_dir(phase)
    space, fixed = _space(run, phase)
    fp = _fingerprint(run, phase, space, fixed)
    best_path = storage.join(out, "best.json")
    if storage.exists(best_path) and storage.read_json(best_path).get("fingerprint") == fp and not restart:
        log.info("search %d: already complete in %s", phase, out)
        return SearchBest.from_json(storage.read_json(best_path))
    claim(out, fp, what=f"search {phase}", restart=restart, record="search.json")
    grid = _fit(trial_context(run, phase, fixed, device), space, out)
    trials = [_trial_report(r) for r in grid]
    if len(trials) != cfg.search.num_trials:
        raise RuntimeError(f"search {phase}: {len(trials)} trials, planned {cfg.search.num_trials}")
    return _summarize(run, phase, space, fixed, trials, grid, fp, device)


def _space(run: Run, phase: int) -> tuple[SearchSpace, dict[str, Any]]:
    enc = ck.valid_epochs(run.ckpt_root("encoder"))
    if not enc:
        raise RaysdError(f"search: no Class-Encoder checkpoints in {run.ckpt_root('encoder')}; "
                         "run `raysd train-encoder` first")
    if phase == 1:
        if enc != list(range(1, enc[-1] + 1)):
            raise RaysdError(f"search 1: encoder checkpoints {enc} have gaps (damaged epochs); retrain them")
        return phase1_space(run.cfg, enc[-1]), {"module": "encoder"}
    p1 = storage.join(run.search_dir(1), "best.json")
    if not storage.exists(p1):
        raise RaysdError("search 2: needs search 1's result (search_1/best.json); run `raysd search --phase 1` first")
    best1 = storage.read_json(p1)
    unet = ck.valid_epochs(run.ckpt_root("unet"))
    if not unet:
        raise RaysdError(f"search 2: no UNet checkpoints in {run.ckpt_root('unet')}; run `raysd finetune` first")
    made_with = {ck.read_meta(ck.epoch_dir(run.ckpt_root("unet"), e)).get("encoder_epoch") for e in unet}
    if made_with != {best1["encoder_epoch"]}:
        raise RaysdError(f"search 2: the UNet checkpoints were fine-tuned with encoder epoch(s) {sorted(made_with)}, "
                         f"search 1 chose {best1['encoder_epoch']}; run `raysd finetune --encoder-epoch "
                         f"{best1['encoder_epoch']} --restart`")
    return phase2_space(run.cfg, best1, unet[-1]), {"module": "unet", "encoder_epoch": best1["encoder_epoch"]}


def _fingerprint(run: Run, phase: int, space: SearchSpace, fixed: dict[str, Any]) -> str:
    cfg = run.cfg
    return fingerprint({"phase": phase, "space": space.to_dict(), "fixed": fixed, "search": cfg.search.__dict__,
                        "cas": cfg.cas.__dict__, "sampling": cfg.sampling.scheduler, "seed": cfg.seed,
                        "train": run.training_hash("unet" if phase == 2 else "encoder", fixed.get("encoder_epoch"))})


def max_concurrent(cfg: Config, device: str) -> int:
    """Trials the cluster's resources can run at once (or the configured limit)."""
    if cfg.search.max_concurrent_trials:
        return cfg.search.max_concurrent_trials
    res = ray.cluster_resources()
    r = cfg.resources
    if device == "cuda" and r.gpus_per_trial > 0:  # the capacity the cluster has or can grow to
        return max(1, int(max(res.get("GPU", 1), r.max_gpus or 0) / r.gpus_per_trial))
    return max(1, int(res.get("CPU", 1) / max(r.cpus_per_trial, 1e-3)))


def trial_context(run: Run, phase: int, fixed: dict[str, Any], device: str) -> TrialContext:
    """What every trial receives: the run and the real splits it may read (test: objective=test only)."""
    cfg = run.cfg
    val = run.read_split("val")
    test = run.read_split("test") if cfg.search.objective == "test" else None
    running = min(max_concurrent(cfg, device), cfg.search.num_trials)
    r = cfg.resources
    # trials that share a small CPU machine get one thread per reserved CPU; a lone trial may use more
    threads = max(1, int(r.cpus_per_trial)) if running > 1 else (r.torch_threads or max(1, int(r.cpus_per_trial)))
    return TrialContext(run=run, phase=phase, fixed=fixed, device=device, val=(val.images, val.labels),
                        num_classes=val.num_classes, test=(test.images, test.labels) if test is not None else None,
                        milestones=sorted(milestones(cfg)), threads=threads)


def _fit(ctx: TrialContext, space: SearchSpace, out: str) -> Any:
    cfg = ctx.run.cfg
    r, s = cfg.resources, cfg.search
    resources = {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial if ctx.device == "cuda" else 0}
    trainable = tune.with_resources(tune.with_parameters(search_trial, ctx=ctx), resources)
    running = min(max_concurrent(cfg, ctx.device), s.num_trials)
    sqlite = f"sqlite:///{os.path.join(storage.local_path(out), 'optuna.db')}" if storage.is_local(out) else None
    searcher = make_searcher(space.distributions(), seed=cfg.seed, concurrent=running, storage_url=sqlite,
                             study_name=f"raysd-search-{ctx.phase}")
    log.info("search %d: %d trials (%d at once, %s, objective %s) over %s", ctx.phase, s.num_trials, running,
             s.scheduler, s.objective, space.to_dict())
    return run_tuner(trainable, out, searcher=searcher, scheduler=make_scheduler(s, cfg.cas.max_epochs),
                     num_samples=s.num_trials, max_live=live_limit(s, cfg.cas.max_epochs, running),
                     max_failures=r.max_failures, callbacks=[TrialLogger()])


# --------------------------------------------------------------------------------------------
# Results


def _trial_report(result) -> TrialReport:  # noqa: ANN001 - ray.tune.Result
    df = result.metrics_dataframe
    rows = df.to_dict("records") if df is not None else []
    trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(str(result.path))
    status = "error" if result.error else ("full" if rows and rows[-1].get("finished") else "stopped early")
    return trial_from_rows(str(trial_id), result.config, rows, status,
                           error=str(result.error).splitlines()[0] if result.error else None,
                           informed_by=result.config.get(INFORMED_BY))


def _summarize(run: Run, phase: int, space: SearchSpace, fixed: dict[str, Any], trials: list[TrialReport], grid,
               fp: str, device: str) -> SearchBest:
    cfg = run.cfg
    best = best_trial(trials)
    test = _score_best(run, next(r for r in grid if _trial_report(r).trial_id == best.trial_id), device)
    p = best.params
    body = SearchBest(
        phase=phase, objective=cfg.search.objective, scheduler=cfg.search.scheduler,
        num_inference_steps=int(p["num_inference_steps"]), guidance_scale=float(p["guidance_scale"]),
        epoch=int(p["epoch"]), encoder_epoch=int(p["epoch"]) if phase == 1 else int(fixed["encoder_epoch"]),
        unet_epoch=int(p["epoch"]) if phase == 2 else None, cas=best.best_cas,  # type: ignore[arg-type]
        eval_split="test" if cfg.search.objective == "test" else "val", test_top1=test.top1, test_top5=test.top5,
        per_class_accuracy=test.per_class_accuracy, confusion=test.confusion, num_images=cfg.search.num_images,
        generation_seconds=best.generation_seconds, images_per_second=best.images_per_second,
        trial_id=best.trial_id, epochs_run=best.epochs_run, num_trials=len(trials),
        num_full_budget=sum(t.finished for t in trials), space=space.to_dict(), fingerprint=fp)
    imp = write_outputs(run.search_dir(phase), trials, space, cfg.seed, body)
    log.info("search %d: best IS=%d UGS=%.3f epoch=%d: CAS %.4f (%s), test top-1 %.4f; importances %s", phase,
             body.num_inference_steps, body.guidance_scale, body.epoch, body.cas, body.eval_split, body.test_top1,
             {k: round(v, 3) for k, v in imp["importances"].items()})
    return body


def _score_best(run: Run, result, device: str) -> SplitScores:  # noqa: ANN001
    """Test metrics of the best trial's classifier (its best-epoch weights): on the driver on
    CPUs, in a Ray task on the accelerator otherwise."""
    import torch

    if result.checkpoint is None:
        raise RuntimeError(f"search: the best trial {result.path} left no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), weights_only=True, map_location="cpu")
    test = run.read_split("test")
    args = (state, (test.images, test.labels), test.num_classes)
    kwargs = {"cfg": run.cfg.cas, "device": device, "precision": run.cfg.model.precision}
    if device == "cpu":  # one forward pass over the test split: a task's cold worker would cost more
        return score_state(*args, **kwargs)
    r = run.cfg.resources
    task = ray.remote(score_state).options(num_cpus=r.cpus_per_trial,
                                           num_gpus=r.gpus_per_trial if device == "cuda" else 0)
    return ray.get(task.remote(*args, **kwargs))
