"""Stage: steps 2 and 4 on Ray Tune: seeded multivariate TPE told each trial's outcome, and
synchronous HyperBand (or ASHA), over IS, UGS and the checkpoint epoch (:mod:`raysd.stages.tuning`).

Each trial is :func:`raysd.stages.search_trial.search_trial` with the resources of the config.
The checkpoints a search may use are listed once, from their records (their weights are verified
where a trial loads them). The results are read back from Tune's ResultGrid; each trial's state in
the sampler's own study (``optuna.db``) is written beside what Tune saw, and the outputs by
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
from raysd.run.locking import check_held
from raysd.run.rundir import Run, check_claim, claim
from raysd.run.scores import SearchBest
from raysd.run.search_outputs import write_outputs
from raysd.run import sizing
from raysd.stages.cluster import accelerator_capacity, accelerator_memory, connect, node_memory, worker_device
from raysd.stages.prepare import ensure_prepared
from raysd.stages.search_trial import STATE_FILE, TrialContext, search_trial
from raysd.stages.tuning import (INFORMED_BY, STUDY_AT_SUGGESTION, TRIAL_INDEX, TrialLogger, load_study,
                                 make_search, outcome, run_tuner)

log = logging.getLogger("raysd")


def search(cfg: Config, phase: int, *, restart: bool = False) -> SearchBest:
    """Run (or resume, or return the finished) search of ``phase``. A search made with other
    settings is refused in one line naming them (``restart`` replaces it), before anything is written."""
    if phase not in (1, 2):
        raise RaysdError(f"search: --phase must be 1 or 2; got {phase}")
    run = Run(cfg)
    run.check_preset()
    device = connect(cfg)
    out = run.search_dir(phase)
    space, fixed = _space(run, phase)  # refuses a run without checkpoints, before anything is written
    ensure_prepared(run)
    ident = _identity(run, phase, space, fixed)
    best_path = storage.join(out, "best.json")
    if storage.exists(best_path) and not restart:
        best = storage.read_json(best_path)
        if best.get("fingerprint") in (ident["fp"], *ident["aliases"]):
            log.info("search %d: already complete in %s", phase, out)
            return SearchBest.from_json(best)
    check_claim(out, **ident, what=f"search {phase}", restart=restart, record="search.json")
    run.save_config()
    claim(out, **ident, what=f"search {phase}", restart=restart, record="search.json")
    grid = _fit(trial_context(run, phase, fixed, device), space, out)
    trials = _with_study_states(sorted((_trial_report(r) for r in grid), key=lambda t: t.index or 0), out)
    if len(trials) != cfg.search.num_trials:
        raise RuntimeError(f"search {phase}: {len(trials)} trials, planned {cfg.search.num_trials}")
    return _summarize(run, phase, space, fixed, trials, grid, ident["fp"], device)


def _space(run: Run, phase: int) -> tuple[SearchSpace, dict[str, Any]]:
    """The search space and what a phase holds fixed, from the checkpoints' records (read once)."""
    enc = ck.recorded_epochs(run.ckpt_root("encoder"))
    if not enc:
        raise RaysdError(f"search: no Class-Encoder checkpoints in {run.ckpt_root('encoder')}; "
                         "run `raysd train-encoder` first")
    if phase == 1:
        if sorted(enc) != list(range(1, max(enc) + 1)):
            raise RaysdError(f"search 1: encoder checkpoints {sorted(enc)} have gaps (damaged epochs); retrain them")
        return phase1_space(run.cfg, max(enc)), {"module": "encoder"}
    p1 = storage.join(run.search_dir(1), "best.json")
    if not storage.exists(p1):
        raise RaysdError("search 2: needs search 1's result (search_1/best.json); run `raysd search --phase 1` first")
    best1 = storage.read_json(p1)
    unet = ck.recorded_epochs(run.ckpt_root("unet"))
    if not unet:
        raise RaysdError(f"search 2: no UNet checkpoints in {run.ckpt_root('unet')}; run `raysd finetune` first")
    made_with = {ck.read_meta(ck.epoch_dir(run.ckpt_root("unet"), e)).get("encoder_epoch") for e in unet}
    if made_with != {best1["encoder_epoch"]}:
        raise RaysdError(f"search 2: the UNet checkpoints were fine-tuned with encoder epoch(s) {sorted(made_with)}, "
                         f"search 1 chose {best1['encoder_epoch']}; run `raysd finetune --encoder-epoch "
                         f"{best1['encoder_epoch']} --restart`")
    if best1["encoder_epoch"] not in enc:
        raise RaysdError(f"search 2: search 1 chose encoder epoch {best1['encoder_epoch']}, which has no checkpoint")
    return phase2_space(run.cfg, best1, max(unet)), {"module": "unet", "encoder_epoch": best1["encoder_epoch"]}


def _identity(run: Run, phase: int, space: SearchSpace, fixed: dict[str, Any]) -> dict[str, Any]:
    """claim()'s identity arguments for a search: its fingerprint (the settings that determine the
    search, its space, the checkpoints it searches by their weights' checksums, the data and the
    base), the fingerprint an earlier raysd gave the same search, and the settings behind it."""
    from raysd.run import legacy

    settings = run.settings_identity(f"search_{phase}")
    module = run.ckpt_root("unet" if phase == 2 else "encoder")
    searched = {str(e): ck.weights_sha(ck.epoch_dir(module, e)) for e in range(space.min_epoch, space.max_epoch + 1)}
    body = {"phase": phase, "space": space.to_dict(), "fixed": fixed, "settings": settings, "checkpoints": searched,
            "data": run.train_meta["provenance"].get("fingerprint"), "base": run.base_identity()}
    if phase == 2:
        body["encoder_sha256"] = ck.weights_sha(ck.epoch_dir(run.ckpt_root("encoder"), int(fixed["encoder_epoch"])))
    return {"fp": fingerprint(body), "aliases": (legacy.search_fingerprint(run.cfg, phase, space.to_dict(), fixed),),
            "identity": settings}


def max_concurrent(cfg: Config, device: str, gpus: float = 1.0) -> int:
    """Trials the cluster's processors can run at once (or the configured limit), ``gpus`` each on CUDA."""
    if cfg.search.max_concurrent_trials:
        return cfg.search.max_concurrent_trials
    r = cfg.resources
    if device == "cuda" and gpus > 0:  # the capacity the cluster has or can grow to
        return max(1, int(max(1, accelerator_capacity(cfg)) / gpus + 1e-9))
    return max(1, int(ray.cluster_resources().get("CPU", 1) / max(r.cpus_per_trial, 1e-3)))


def trial_resources(run: Run, phase: int, device: str) -> tuple[dict[str, float], int]:
    """(what each trial asks Ray for, how many run at once): CPUs, a GPU share chosen from the card's
    memory, and the host memory its estimate needs; at once, no more than the processors and every
    node's memory hold. Refused in one line when one trial fits no node."""
    cfg = run.cfg
    need = sizing.trial(cfg, run, phase, device)
    host = sizing.host_memory_request(cfg, need)
    gpus = sizing.gpus_per_worker(cfg, need, accelerator_memory(cfg)) if device == "cuda" else 0.0
    nodes = node_memory()
    fit = sizing.fit_on_nodes(host, nodes)
    if fit < 1:
        raise RaysdError(f"search {phase}: {need.describe()}, more than any node's {max(nodes) / sizing.GB:.1f} GB; "
                         f"lower it with {need.lower}")
    at_once = min(max_concurrent(cfg, device, gpus or 1.0), cfg.search.num_trials)
    if not cfg.search.max_concurrent_trials:
        at_once = min(at_once, fit)
    log.info("search %d: %s (%s): %d at once%s", phase, need.describe(),
             "resources.trial_memory_gb" if host != need.host else "estimate", at_once,
             f", {gpus:g} GPU each" if device == "cuda" else "")
    r = cfg.resources
    share = {("gpu" if r.accelerator == "GPU" else r.accelerator): gpus} if device == "cuda" else {}
    return {"cpu": r.cpus_per_trial, **share, "memory": host}, at_once


def trial_context(run: Run, phase: int, fixed: dict[str, Any], device: str) -> TrialContext:
    """What every trial receives: the run, the real splits it may read (test: objective=test only)
    and the checkpoints it may use with their recorded checksums (no trial reads another record)."""
    cfg = run.cfg
    val = run.read_split("val")
    test = run.read_split("test") if cfg.search.objective == "test" else None
    resources, running = trial_resources(run, phase, device)
    r = cfg.resources
    # trials that share a small CPU machine get one thread per reserved CPU; a lone trial may use more
    threads = max(1, int(r.cpus_per_trial)) if running > 1 else (r.torch_threads or max(1, int(r.cpus_per_trial)))
    checkpoints = {"encoder": ck.recorded_epochs(run.ckpt_root("encoder"))}
    if phase == 2:
        checkpoints["unet"] = ck.recorded_epochs(run.ckpt_root("unet"))
    return TrialContext(run=run, phase=phase, fixed=fixed, device=device, val=(val.images, val.labels),
                        num_classes=val.num_classes, test=(test.images, test.labels) if test is not None else None,
                        milestones=sorted(milestones(cfg)), threads=threads, checkpoints=checkpoints,
                        base_identity=run.base_identity(), resources=resources, at_once=running)


def _fit(ctx: TrialContext, space: SearchSpace, out: str) -> Any:
    cfg = ctx.run.cfg
    r, s = cfg.resources, cfg.search
    resources, running = ctx.resources, ctx.at_once
    trainable = tune.with_resources(tune.with_parameters(search_trial, ctx=ctx), resources)
    searcher, scheduler = make_search(space.distributions(), s, max_t=cfg.cas.epoch_limit, seed=cfg.seed,
                                      capacity=running, study_name=study_name(ctx.phase),
                                      export_to=storage.join(out, STUDY_FILE))
    log.info("search %d: %d trials (%d at once, %s, objective %s) over %s; the sampler's study: %s", ctx.phase,
             s.num_trials, running, s.scheduler, s.objective, space.to_dict(), storage.join(out, STUDY_FILE))
    return run_tuner(trainable, out, searcher=searcher, scheduler=scheduler, num_samples=s.num_trials,
                     max_failures=r.max_failures, callbacks=[TrialLogger()])


STUDY_FILE = "optuna.db"


def study_name(phase: int) -> str:
    return f"raysd-search-{phase}"


# --------------------------------------------------------------------------------------------
# Results


def _trial_report(result) -> TrialReport:  # noqa: ANN001 - ray.tune.Result
    df = result.metrics_dataframe
    rows = df.to_dict("records") if df is not None else []
    trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(str(result.path))
    return trial_from_rows(str(trial_id), result.config, rows, outcome(rows[-1] if rows else None, bool(result.error)),
                           error=str(result.error).splitlines()[0] if result.error else None,
                           informed_by=result.config.get(INFORMED_BY), index=result.config.get(TRIAL_INDEX),
                           study_at_suggestion=result.config.get(STUDY_AT_SUGGESTION))


def _with_study_states(trials: list[TrialReport], out: str) -> list[TrialReport]:
    """Each trial's state and value in the study the sampler suggested from (``optuna.db``)."""
    path = storage.join(out, STUDY_FILE)
    if not storage.exists(path):
        log.warning("search: %s is missing (the search was interrupted after its last trial); trials.csv leaves "
                    "the study's states out", path)
        return trials
    phase = int(os.path.basename(out.rstrip("/")).rsplit("_", 1)[-1])
    by_id = {t.user_attrs.get("tune_trial_id"): t for t in load_study(path, study_name(phase)).trials}
    for t in trials:
        st = by_id.get(t.trial_id)
        t.study_state = st.state.name.lower() if st is not None else "missing"
        t.study_value = st.value if st is not None else None
    return trials


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
        num_full_budget=sum(t.finished for t in trials), space=space.to_dict(), fingerprint=fp,
        metrics=test.metrics, predictions=test.predictions)
    check_held(run.root)  # best.json commits the search: not by a driver whose run lock was taken over
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
    from raysd.stages.evaluate import classifier_options

    need = sizing.classifier_task(run.cfg, device, images=0, side=max(run.image_size), held_out=len(test.labels))
    task = classifier_options(ray.remote(_score_on_worker), run.cfg, device, need)
    return ray.get(task.remote(*args, **kwargs))


def _score_on_worker(*args: Any, device: str, **kwargs: Any) -> SplitScores:
    """score_state in a task, on the device this task holds (:func:`worker_device`)."""
    return score_state(*args, device=worker_device(device), **kwargs)
