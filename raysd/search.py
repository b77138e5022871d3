"""Stage: steps 2 and 4 on Ray Tune: OptunaSearch (seeded multivariate TPE, its study in SQLite
in the run directory) + HyperBandScheduler (or ASHA) over IS, UGS and the checkpoint epoch.

A trial is a function trainable with the resources of the config: it generates its images with
the checkpoints of its epoch (models cached per worker process, images cached on disk by their
parameters), trains ResNet20 and reports the best CAS so far every classifier epoch, with a
checkpoint at every epoch where the scheduler may pause or stop it, so a paused trial resumes
where it stopped. The results are read back from Tune's ResultGrid (not from Optuna's study,
which misses trials stopped while paused), the study is rebuilt from them, and the outputs are
``best.json`` (written last), ``trials.csv``, ``importance.json`` and Optuna's plots.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import HyperBandScheduler

from raysd import checkpoints as ck
from raysd import runs, sets, storage
from raysd.config import Config
from raysd.errors import RaysdError
from raysd.raycluster import ensure_ray
from raysd.search_core import (PARAMS, SearchSpace, TrialReport, best_trial, importances, phase1_space, phase2_space,
                               rebuild_study, run_trial, trial_from_rows)

log = logging.getLogger("raysd")
STATE_FILE = "trial_state.pt"


# --------------------------------------------------------------------------------------------
# Driver


def search(cfg: Config, phase: int, *, restart: bool = False) -> dict[str, Any]:
    """Run (or resume, or return the finished) search of ``phase``; returns best.json's content."""
    if phase not in (1, 2):
        raise RaysdError(f"search: --phase must be 1 or 2; got {phase}")
    ensure_ray()
    runs.check_storage_for_cluster(cfg)
    runs.save_run_config(cfg)
    runs.ensure_prepared(cfg)
    out = runs.search_dir(cfg, phase)
    space, fixed = _space(cfg, phase)
    fingerprint = _fingerprint(cfg, phase, space, fixed)
    best_path = storage.join(out, "best.json")
    if storage.exists(best_path) and storage.read_json(best_path).get("fingerprint") == fingerprint and not restart:
        log.info("search %d: already complete in %s", phase, out)
        return storage.read_json(best_path)
    _claim(out, fingerprint, restart)
    grid = _fit(cfg, phase, space, fixed, out)
    trials = [_trial_report(r) for r in grid]
    if len(trials) != cfg.search.num_trials:
        raise RuntimeError(f"search {phase}: {len(trials)} trials, planned {cfg.search.num_trials}")
    return _summarize(cfg, phase, space, fixed, trials, grid, out, fingerprint)


def _space(cfg: Config, phase: int) -> tuple[SearchSpace, dict[str, Any]]:
    enc = ck.valid_epochs(runs.ckpt_root(cfg, "encoder"))
    if not enc:
        raise RaysdError(f"search: no Class-Encoder checkpoints in {runs.ckpt_root(cfg, 'encoder')}; "
                         "run `raysd train-encoder` first")
    if phase == 1:
        if enc != list(range(1, enc[-1] + 1)):
            raise RaysdError(f"search 1: encoder checkpoints {enc} have gaps (damaged epochs); retrain them")
        return phase1_space(cfg, enc[-1]), {"module": "encoder"}
    p1 = storage.join(runs.search_dir(cfg, 1), "best.json")
    if not storage.exists(p1):
        raise RaysdError("search 2: needs search 1's result (search_1/best.json); run `raysd search --phase 1` first")
    best1 = storage.read_json(p1)
    unet = ck.valid_epochs(runs.ckpt_root(cfg, "unet"))
    if not unet:
        raise RaysdError(f"search 2: no UNet checkpoints in {runs.ckpt_root(cfg, 'unet')}; run `raysd finetune` first")
    made_with = {ck.read_meta(ck.epoch_dir(runs.ckpt_root(cfg, "unet"), e)).get("encoder_epoch") for e in unet}
    if made_with != {best1["encoder_epoch"]}:
        raise RaysdError(f"search 2: the UNet checkpoints were fine-tuned with encoder epoch(s) {sorted(made_with)}, "
                         f"search 1 chose {best1['encoder_epoch']}; run `raysd finetune --encoder-epoch "
                         f"{best1['encoder_epoch']} --restart`")
    return phase2_space(cfg, best1, unet[-1]), {"module": "unet", "encoder_epoch": best1["encoder_epoch"]}


def _fingerprint(cfg: Config, phase: int, space: SearchSpace, fixed: dict[str, Any]) -> str:
    body = {"phase": phase, "space": space.to_dict(), "fixed": fixed, "search": cfg.search.__dict__,
            "cas": cfg.cas.__dict__, "sampling": cfg.sampling.scheduler, "seed": cfg.seed,
            "train": runs.training_hash(cfg, "unet" if phase == 2 else "encoder", fixed.get("encoder_epoch"))}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _claim(out: str, fingerprint: str, restart: bool) -> None:
    path = storage.join(out, "search.json")
    if storage.exists(path):
        if storage.read_json(path).get("fingerprint") != fingerprint or restart:
            if not restart:
                raise RaysdError(f"search: {out} holds a search with other settings; pass --restart to replace it")
            storage.remove(out)
    storage.makedirs(out)
    if not storage.exists(path):
        storage.write_json_atomic(path, {"fingerprint": fingerprint})


def max_concurrent(cfg: Config, device: str) -> int:
    if cfg.search.max_concurrent_trials:
        return cfg.search.max_concurrent_trials
    res = ray.cluster_resources()
    r = cfg.resources
    if device == "cuda" and r.gpus_per_trial > 0:
        return max(1, int(res.get("GPU", 1) / r.gpus_per_trial))
    return max(1, int(res.get("CPU", 1) / max(r.cpus_per_trial, 1e-3)))


def _fit(cfg: Config, phase: int, space: SearchSpace, fixed: dict[str, Any], out: str):
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    device = runs.resolve_device(cfg)
    ctx = trial_context(cfg, phase, fixed, device)
    r = cfg.resources
    running = min(max_concurrent(cfg, device), cfg.search.num_trials)
    # trials that share a small CPU machine get one thread per reserved CPU; a lone trial may use more
    ctx["threads"] = max(1, int(r.cpus_per_trial)) if running > 1 else (r.torch_threads or max(1, int(r.cpus_per_trial)))
    resources = {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial if device == "cuda" else 0}
    trainable = tune.with_resources(tune.with_parameters(search_trial, ctx=ctx), resources)
    fs, exp_parent = storage.filesystem(out)
    exp_path = storage.join(out, "tune")
    if tune.Tuner.can_restore(exp_path):
        log.info("search %d: resuming the interrupted search in %s", phase, exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    conc = min(max_concurrent(cfg, device), cfg.search.num_trials)
    # Tune counts PAUSED trials against max_concurrent_trials: a HyperBand bracket can only fill
    # (and prune) when that many trials may be alive at once. Resources still bound how many run.
    limit = max(conc, max(hyperband_brackets(cfg.cas.max_epochs, cfg.search.reduction_factor).values(), default=1)
                ) if cfg.search.scheduler == "hyperband" else conc
    limit = min(limit, cfg.search.num_trials)
    storage_url = f"sqlite:///{os.path.join(storage.local_path(out), 'optuna.db')}" if storage.is_local(out) else None
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, constant_liar=conc > 1)
    searcher = OptunaSearch(space=space.distributions(), metric="cas", mode="max", sampler=sampler,
                            study_name=f"raysd-search-{phase}",
                            storage=optuna.storages.RDBStorage(storage_url) if storage_url else None)
    s = cfg.search
    max_t = cfg.cas.max_epochs
    scheduler = (FixedHyperBand(time_attr="epoch", max_t=max_t, reduction_factor=s.reduction_factor)
                 if s.scheduler == "hyperband" else
                 ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=s.grace_period,
                               reduction_factor=s.reduction_factor))
    log.info("search %d: %d trials (%d at once, %s, objective %s) over %s", phase, s.num_trials, conc, s.scheduler,
             s.objective, space.to_dict())
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric="cas", mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=s.num_trials, max_concurrent_trials=limit, reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=exp_parent, storage_filesystem=fs,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=r.max_failures),
                                  callbacks=[TrialLogger()], verbose=1),
    )
    return tuner.fit()


def trial_context(cfg: Config, phase: int, fixed: dict[str, Any], device: str) -> dict[str, Any]:
    """What every trial receives: the config and the one evaluation split it may read."""
    eval_split = "test" if cfg.search.objective == "test" else "val"
    ev = sets.read_set(runs.split_dir(cfg, eval_split))
    return {"cfg": cfg.to_dict(), "phase": phase, "fixed": fixed, "device": device, "eval_split": eval_split,
            "eval_images": ev.images, "eval_labels": ev.labels, "num_classes": ev.num_classes,
            "milestones": sorted(milestones(cfg))}


def hyperband_brackets(max_t: int, eta: int) -> dict[int, int]:
    """{s: trials} of the brackets Ray's HyperBandScheduler builds (its own formulas)."""
    s_max_1 = int(round(math.log(max_t) / math.log(eta))) + 1
    return {s: int(math.ceil(s_max_1 / (s + 1) * eta**s)) for s in range(s_max_1) if int(max_t * eta ** (-s)) > 0}


def milestones(cfg: Config) -> set[int]:
    """Epochs where HyperBand or ASHA may pause or stop a trial (checkpoint there), every 10th, the last."""
    eta, max_t, grace = cfg.search.reduction_factor, cfg.cas.max_epochs, cfg.search.grace_period
    out = {max_t, *range(10, max_t + 1, 10)}
    for s in hyperband_brackets(max_t, eta):  # HyperBand: r0 = int(max_t eta^-s), then r *= eta
        r = int(max_t * eta ** (-s))
        while r < max_t:
            out.add(r)
            r = int(min(r * eta, max_t))
    g = grace  # ASHA rungs: grace * eta^k
    while g < max_t:
        out.add(int(g))
        g *= eta
    return {m for m in out if 1 <= m <= max_t}


class FixedHyperBand(HyperBandScheduler):
    """Ray 2.60's HyperBandScheduler, with one fix: when a trial ends (early stopping) and its
    bracket is thereby finished, the bracket's PAUSED trials are stopped. Ray skips this, and a
    trial paused at the end of its budget then waits forever (seen with 6 trials, max_t 3)."""

    def on_trial_remove(self, tune_controller, trial):  # noqa: ANN001
        bracket, _ = self._trial_info[trial]
        bracket.cleanup_trial(trial)
        if bracket.finished():
            bracket.cleanup_full(tune_controller)
        elif not bracket.is_being_processed:
            self._process_bracket(tune_controller, bracket)


class TrialLogger(tune.Callback):
    """One line per finished trial: parameters, CAS, epochs, seconds."""

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        r = trial.last_result or {}
        p = {k: trial.config.get(k) for k in PARAMS}
        print(f"[raysd] trial {trial.trial_id}: IS={p['num_inference_steps']} UGS={p['guidance_scale']:.3f} "
              f"epoch={p['epoch']}: CAS {r.get('cas', float('nan')):.4f} after {r.get('epoch', 0)} epochs "
              f"({'full' if r.get('finished') else 'stopped early'}), {r.get('time_total_s', 0):.1f}s", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
        print(f"[raysd] trial {trial.trial_id} failed: {trial.error_file}", flush=True)


# --------------------------------------------------------------------------------------------
# The trial (runs in a Tune worker)


def search_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    import torch

    from raysd.config import flatten, load_config

    cfg = load_config(ctx["cfg"]["preset"], overrides={k: v for k, v in flatten(ctx["cfg"]).items() if k != "preset"})
    device = "cuda" if ctx["device"] == "cuda" and ray.get_gpu_ids() else "cpu"
    if device == "cpu":
        torch.set_num_threads(ctx["threads"])
    params = {k: config[k] for k in PARAMS}
    restored = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = torch.load(os.path.join(d, STATE_FILE), weights_only=True, map_location="cpu")
    miles = set(ctx["milestones"])

    from raysd.faults import maybe_fail

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        maybe_fail(f"trial_epoch_{metrics['epoch']}")  # fault tests: the trial process dies mid-trial
        if metrics["epoch"] in miles or metrics["finished"]:
            local = ck.local_tmpdir("raysd-trial-")
            torch.save(state, os.path.join(local, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(local))
        else:
            tune.report(metrics)

    run_trial(params, images_fn=lambda p: trial_images(cfg, ctx, p, device), eval_split=(ctx["eval_images"],
              ctx["eval_labels"]), num_classes=ctx["num_classes"], cfg=cfg, device=device, report=report,
              restored=restored)


def trial_images(cfg: Config, ctx: dict[str, Any], params: dict[str, Any], device: str):
    """(images, labels, generation seconds) for a trial's parameters, cached on disk."""
    import time

    import numpy as np
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from raysd.generator import generate_images
    from raysd.plan import class_counts, make_plan

    spec = trial_spec(cfg, ctx["phase"], ctx["fixed"], params)
    n = cfg.search.num_images
    key = hashlib.sha256(json.dumps([spec.to_dict(), n], sort_keys=True).encode()).hexdigest()[:20]
    path = storage.join(runs.search_dir(cfg, ctx["phase"]), "images", f"{key}.safetensors")
    info_path = path.replace(".safetensors", ".json")
    if storage.exists(info_path):
        info = storage.read_json(info_path)
        data = storage.read_bytes(path) if storage.exists(path) else b""
        if storage.sha256_bytes(data) == info.get("sha256"):
            t = st_load(data)
            return t["images"].numpy(), t["labels"].numpy(), float(info["seconds"])
        print(f"[raysd] trial images {path} are damaged or missing: generating them again", flush=True)
    plan = make_plan(n, class_counts(n, ctx["num_classes"], "uniform"), cfg.seed)
    t0 = time.perf_counter()
    images = generate_images(spec, plan.labels, plan.seeds, device, batch_size=cfg.sampling.batch_size)
    seconds = time.perf_counter() - t0
    data = st_save({"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.from_numpy(plan.labels)})
    storage.write_bytes_atomic(path, data)
    storage.write_json_atomic(info_path, {"seconds": seconds, "params": params, "num_images": n,
                                          "sha256": storage.sha256_bytes(data)})  # last: marks the cache entry
    return images, plan.labels, seconds


def trial_spec(cfg: Config, phase: int, fixed: dict[str, Any], params: dict[str, Any]):
    from raysd.generation import resolve_spec

    if phase == 1:
        return resolve_spec(cfg, num_inference_steps=int(params["num_inference_steps"]),
                            guidance_scale=float(params["guidance_scale"]), encoder_epoch=int(params["epoch"]),
                            use_unet=False)
    return resolve_spec(cfg, num_inference_steps=int(params["num_inference_steps"]),
                        guidance_scale=float(params["guidance_scale"]), encoder_epoch=int(fixed["encoder_epoch"]),
                        unet_epoch=int(params["epoch"]))


# --------------------------------------------------------------------------------------------
# Results


def _trial_report(result) -> TrialReport:  # noqa: ANN001 - ray.tune.Result
    df = result.metrics_dataframe
    rows = df.to_dict("records") if df is not None else []
    trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(str(result.path))
    status = "error" if result.error else ("full" if rows and rows[-1].get("finished") else "stopped early")
    return trial_from_rows(str(trial_id), result.config, rows, status,
                           error=str(result.error).splitlines()[0] if result.error else None)


def _summarize(cfg: Config, phase: int, space: SearchSpace, fixed: dict[str, Any], trials: list[TrialReport], grid,
               out: str, fingerprint: str) -> dict[str, Any]:
    best = best_trial(trials)
    result = next(r for r in grid if _trial_report(r).trial_id == best.trial_id)
    test = _score_best(cfg, result)
    imp = importances(trials, space, cfg.seed)
    _write_trials_csv(trials, storage.join(out, "trials.csv"))
    storage.write_json_atomic(storage.join(out, "importance.json"), imp)
    _plots(rebuild_study(trials, space, cfg.seed), imp, out)
    p = best.params
    body = {
        "phase": phase, "objective": cfg.search.objective, "scheduler": cfg.search.scheduler,
        "num_inference_steps": int(p["num_inference_steps"]), "guidance_scale": float(p["guidance_scale"]),
        "epoch": int(p["epoch"]),
        "encoder_epoch": int(p["epoch"]) if phase == 1 else int(fixed["encoder_epoch"]),
        "unet_epoch": int(p["epoch"]) if phase == 2 else None,
        "cas": best.best_cas, "eval_split": "test" if cfg.search.objective == "test" else "val",
        "test_top1": test["top1"], "test_top5": test["top5"], "per_class_accuracy": test["per_class_accuracy"],
        "confusion": test["confusion"], "num_images": cfg.search.num_images,
        "generation_seconds": best.generation_seconds, "images_per_second": best.images_per_second,
        "trial_id": best.trial_id, "epochs_run": best.epochs_run, "num_trials": len(trials),
        "num_full_budget": sum(t.finished for t in trials), "space": space.to_dict(), "fingerprint": fingerprint,
    }
    storage.write_json_atomic(storage.join(out, "best.json"), body)  # last: marks the search complete
    log.info("search %d: best IS=%d UGS=%.3f epoch=%d: CAS %.4f (%s), test top-1 %.4f; importances %s", phase,
             body["num_inference_steps"], body["guidance_scale"], body["epoch"], body["cas"], body["eval_split"],
             body["test_top1"], {k: round(v, 3) for k, v in imp["importances"].items()})
    return body


def _score_best(cfg: Config, result) -> dict[str, Any]:  # noqa: ANN001
    """Test metrics of the best trial's classifier (its best-epoch weights), in a Ray task."""
    import torch

    if result.checkpoint is None:
        raise RuntimeError(f"search: the best trial {result.path} left no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), weights_only=True, map_location="cpu")
    test = sets.read_set(runs.split_dir(cfg, "test"))
    device = runs.resolve_device(cfg)
    task = ray.remote(_score_task).options(num_cpus=cfg.resources.cpus_per_trial,
                                           num_gpus=cfg.resources.gpus_per_trial if device == "cuda" else 0)
    return ray.get(task.remote(state, (test.images, test.labels), test.num_classes, cfg.cas.__dict__, device))


def _score_task(state, test, num_classes, cas, device):  # noqa: ANN001
    from raysd.cas import score_state
    from raysd.config import CasConfig

    return score_state(state, test, num_classes, cfg=CasConfig(**cas), device=device)


def _write_trials_csv(trials: list[TrialReport], path: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", *PARAMS, "status", "epochs_run", "last_cas", "best_cas", "seconds", "generation_seconds",
                "images_per_second", "error"])
    for t in trials:
        w.writerow([t.trial_id, *(t.params[k] for k in PARAMS), t.status, t.epochs_run, t.last_cas, t.best_cas,
                    round(t.seconds, 3), t.generation_seconds, t.images_per_second, t.error or ""])
    storage.write_bytes_atomic(path, buf.getvalue().encode())


def _plots(study, imp: dict[str, Any], out: str) -> None:
    """Optuna's standard plots (matplotlib backend) as PNG; a plot that cannot be drawn is skipped."""
    import itertools
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    jobs = {"optimization_history": lambda: ovm.plot_optimization_history(study),
            "slice": lambda: ovm.plot_slice(study),
            "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study)}
    for a, b in itertools.combinations(PARAMS, 2):
        jobs[f"contour_{a}_{b}"] = lambda a=a, b=b: ovm.plot_contour(study, params=[a, b])
    for name, draw in jobs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
            _save_fig(fig, storage.join(out, f"{name}.png"))
        except Exception as e:  # noqa: BLE001 - too few trials for a plot is not an error
            log.info("search: plot %s skipped (%s)", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        plt.close("all")
    fig, ax = plt.subplots(figsize=(5, 2.5))
    names = list(imp["importances"])
    ax.barh(names, [imp["importances"][n] for n in names], color="#4C72B0")
    ax.set_xlabel("fANOVA importance")
    ax.set_title(f"importance ({imp['num_trials']} {imp['basis']})", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, storage.join(out, "importance.png"))
    plt.close("all")


def _save_fig(fig, path: str) -> None:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    storage.write_bytes_atomic(path, buf.getvalue())
