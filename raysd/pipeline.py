"""The whole method as resumable stages recorded in ``RUN/manifest.json``.

prepare -> [pretrain, demo only] -> train_encoder -> after_1 -> search_1 -> finetune -> after_3
-> search_2 -> generate -> scaling -> report. (after_2 and after_4 are the best trials of the
searches: the same 4000-image CAS, already measured.)

Each stage has a key: the settings it reads and the upstream outputs it uses. A stage whose
recorded key matches is skipped; one whose key changed reruns (its own artefacts restarted),
and so does everything downstream whose key changes with it; nothing else. A stage is marked
``running`` (with its key) before it starts and ``complete`` after, so a rerun after a crash
continues where it stopped: the stages themselves resume (checkpoints, shards, Tune trials).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from raysd.config import Config, fingerprint
from raysd.config.loading import absolutize_paths
from raysd.data import checkpoints as ck
from raysd.data import storage
from raysd.errors import RaysdError
from raysd.run.manifest import provenance, read_manifest, write_manifest
from raysd.run.preflight import oom_as_error, preflight
from raysd.run.rundir import PIPELINE_STAGES, Run
from raysd.core.plan import class_counts
from raysd.run.scores import Score

log = logging.getLogger("raysd")


@dataclass
class Stage:
    name: str
    key: Callable[[Config, dict], Any]  # what the stage depends on (settings + upstream outputs)
    run: Callable[[Run, dict, bool], dict]  # (run, outputs so far, restart) -> this stage's outputs (JSON)
    enabled: Callable[[Config], bool] = lambda cfg: True


# --------------------------------------------------------------------------------------------
# Stage bodies: each calls one stage module and returns its manifest outputs


def _prepare(run: Run, out: dict, restart: bool) -> dict:
    from raysd.stages.prepare import ensure_prepared

    ensure_prepared(run)
    m = {s: run.meta(s) for s in ("train", "val", "test")}
    return {s: {"num_rows": v["num_rows"], "counts_per_class": v["counts_per_class"]} for s, v in m.items()} | {
        "fingerprint": m["train"]["provenance"]["fingerprint"], "class_names": m["train"]["class_names"],
        "image_shape": m["train"]["image_shape"]}


def _pretrain(run: Run, out: dict, restart: bool) -> dict:
    from raysd.stages.train import export_base, train

    epochs = train(run.cfg, "pretrain", restart=restart)
    export_base(run, epochs[-1])
    meta = ck.read_meta(ck.epoch_dir(run.ckpt_root("pretrain"), epochs[-1]))
    return {"epochs": epochs[-1], "steps": meta["step"], "loss": meta["loss"], "base": run.base_spec(),
            "base_sha256": meta["files"][ck.MODEL_FILE]}


def _trained(run: Run, kind: str, epochs: list[int]) -> dict:
    root = run.ckpt_root(kind)
    metas = {e: ck.read_meta(ck.epoch_dir(root, e)) for e in epochs}
    return {"epochs": epochs, "checkpoints": {str(e): m["files"][ck.MODEL_FILE] for e, m in metas.items()},
            "losses": [float(m["loss"]) for m in metas.values()]}


def _train_encoder(run: Run, out: dict, restart: bool) -> dict:
    from raysd.stages.train import train

    return _trained(run, "encoder", train(run.cfg, "encoder", restart=restart))


def _after(run: Run, params: dict, **choice: Any) -> dict:
    """A Table 1 row: the CAS of ``search.num_images`` images generated in memory."""
    from raysd.run.generators import resolve_spec
    from raysd.stages.evaluate import cas_of_generator

    spec = resolve_spec(run, best={}, **choice)
    score: Score = cas_of_generator(run.cfg, spec, run.cfg.search.num_images)
    score.params = {"num_inference_steps": spec.num_inference_steps, "guidance_scale": spec.guidance_scale, **params}
    return score.step_json()


def _after_1(run: Run, out: dict, restart: bool) -> dict:
    """Untuned defaults (the config's IS and UGS; the paper's 50 and 7.5), last encoder epoch."""
    s, e = run.cfg.sampling, out["train_encoder"]["epochs"][-1]
    return _after(run, {"epoch": e}, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                  encoder_epoch=e, use_unet=False)


def _search(phase: int) -> Callable[[Run, dict, bool], dict]:
    def run_search(run: Run, out: dict, restart: bool) -> dict:
        from raysd.stages.search import search

        best = search(run.cfg, phase, restart=restart).to_json()
        imp = storage.read_json(storage.join(run.search_dir(phase), "importance.json"))
        return {"best": {k: v for k, v in best.items() if k not in ("confusion", "per_class_accuracy", "space")},
                "per_class": {"per_class_accuracy": best["per_class_accuracy"], "confusion": best["confusion"]},
                "importance": imp["importances"], "importance_basis": imp}

    return run_search


def _finetune(run: Run, out: dict, restart: bool) -> dict:
    from raysd.stages.train import train

    e = out["search_1"]["best"]["encoder_epoch"]
    return {"encoder_epoch": e, **_trained(run, "unet", train(run.cfg, "unet", encoder_epoch=e, restart=restart))}


def _after_3(run: Run, out: dict, restart: bool) -> dict:
    """Search 1's IS and UGS on the last UNet epoch."""
    b, f = out["search_1"]["best"], out["finetune"]["epochs"][-1]
    return _after(run, {"epoch": f}, num_inference_steps=b["num_inference_steps"], guidance_scale=b["guidance_scale"],
                  encoder_epoch=out["finetune"]["encoder_epoch"], unet_epoch=f)


def _scale_counts(run: Run, out: dict) -> dict[str, list[int]]:
    """{"x1": counts per class, ...}: each x_k's classes, in the real training split's proportions."""
    cfg, real = run.cfg, out["prepare"]["train"]
    return {f"x{k}": class_counts(k * real["num_rows"], len(real["counts_per_class"]), cfg.scale.class_balance,
                                  real["counts_per_class"]) for k in sorted(cfg.scale.scales)}


def _generate(run: Run, out: dict, restart: bool) -> dict:
    """The largest scale once (real class distribution); smaller x_k are its stratified prefixes,
    and each x_k's classifier starts as soon as its prefix's shards are written."""
    from raysd.run.generators import resolve_spec
    from raysd.stages.evaluate import PrefixStarter
    from raysd.stages.generate import generate_set

    cfg, b = run.cfg, out["search_2"]["best"]
    k = max(cfg.scale.scales)
    n = k * out["prepare"]["train"]["num_rows"]
    spec = resolve_spec(run, num_inference_steps=b["num_inference_steps"], guidance_scale=b["guidance_scale"],
                        encoder_epoch=b["encoder_epoch"], unet_epoch=b["unet_epoch"], best={})
    set_dir = run.synthetic_dir(f"x{k}")
    counts = _scale_counts(run, out)
    early = PrefixStarter(run, set_dir, list(counts.values()))
    t0 = time.perf_counter()
    meta = generate_set(cfg, set_dir, num_images=n, class_balance=cfg.scale.class_balance, spec=spec, restart=restart,
                        on_shards=early)
    seconds = time.perf_counter() - t0
    return {"set": set_dir, "scale": k, "num_images": meta["num_rows"], "fingerprint": meta["provenance"]["fingerprint"],
            "params": {"num_inference_steps": spec.num_inference_steps, "guidance_scale": spec.guidance_scale,
                       "encoder_epoch": b["encoder_epoch"], "unet_epoch": b["unet_epoch"]},
            "seconds": seconds, "images_per_second": n / max(seconds, 1e-9)}


def _scaling(run: Run, out: dict, restart: bool) -> dict:
    """Table 2: the real training split and every x_k (its classifier perhaps started while generating)."""
    from raysd.stages.evaluate import Scorer, scaling_slices

    counts = _scale_counts(run, out)
    pieces = scaling_slices(run, out["generate"]["set"], list(counts.values()))
    scores = Scorer(run.cfg, len(pieces)).collect(pieces)
    return {name: score.scale_json() for name, score in zip(["real", *counts], scores)}


def _report(run: Run, out: dict, restart: bool) -> dict:
    from raysd.run.report import write_report
    from raysd.run.results import build_results

    build_results(run.cfg, read_manifest(run.root))
    return write_report(run.root)


def _sec(cfg: Config, *names: str) -> dict:
    d = cfg.to_dict()
    return {n: d[n] for n in names}


def _pretrain_key(cfg: Config, out: dict) -> Any:
    m = cfg.to_dict()["model"]
    return [{k: v for k, v in m.items() if k.startswith("pretrain") or k in ("base_model", "resolution", "seq_len")},
            out["prepare"]["fingerprint"], cfg.seed]


def _base_key(cfg: Config, out: dict) -> Any:
    return out.get("pretrain", {}).get("base_sha256") or cfg.model.base_model


STAGES: list[Stage] = [
    Stage("prepare", lambda c, o: [c.dataset.name, c.dataset.data_dir], _prepare),
    Stage("pretrain", _pretrain_key, _pretrain, enabled=lambda c: c.model.pretrain_steps > 0),
    Stage("train_encoder", lambda c, o: [_sec(c, "model", "encoder"), o["prepare"]["fingerprint"], _base_key(c, o),
                                         c.seed], _train_encoder),
    Stage("after_1", lambda c, o: [_sec(c, "sampling", "cas"), c.search.num_images, o["train_encoder"]["checkpoints"],
                                   c.seed], _after_1),
    Stage("search_1", lambda c, o: [_sec(c, "search", "cas"), c.sampling.scheduler, o["train_encoder"]["checkpoints"],
                                    c.seed], _search(1)),
    Stage("finetune", lambda c, o: [_sec(c, "model", "encoder", "finetune"), o["search_1"]["best"]["encoder_epoch"],
                                    o["train_encoder"]["checkpoints"], _base_key(c, o), c.seed], _finetune),
    Stage("after_3", lambda c, o: [_sec(c, "cas"), c.sampling.scheduler, c.search.num_images,
                                   {k: o["search_1"]["best"][k] for k in ("num_inference_steps", "guidance_scale")},
                                   o["finetune"]["checkpoints"], c.seed], _after_3),
    Stage("search_2", lambda c, o: [_sec(c, "search", "cas"), c.sampling.scheduler, o["search_1"]["best"],
                                    o["finetune"]["checkpoints"], c.seed], _search(2)),
    Stage("generate", lambda c, o: [max(c.scale.scales), c.scale.class_balance, c.scale.shard_size,
                                    c.scale.keep_full_resolution, c.sampling.scheduler, c.sampling.batch_size,
                                    o["search_2"]["best"], o["finetune"]["checkpoints"], c.seed], _generate),
    Stage("scaling", lambda c, o: [_sec(c, "cas"), sorted(c.scale.scales), c.scale.class_balance,
                                   o["generate"]["fingerprint"], o["prepare"]["fingerprint"], c.seed], _scaling),
    Stage("report", lambda c, o: [fingerprint(o)], _report),
]
STAGE_NAMES = [s.name for s in STAGES]
assert tuple(STAGE_NAMES) == PIPELINE_STAGES, "keep raysd.run.rundir.PIPELINE_STAGES in step with STAGES"


# --------------------------------------------------------------------------------------------
# The driver


def run(config: Config, *, until: str | None = None) -> dict[str, Any]:
    """Run every stage of the method (or up to ``until``); returns results.json's content.

    Resumable: completed stages whose inputs did not change are skipped.
    """
    from raysd.run.locking import RunLock
    from raysd.stages.cluster import ensure_ray

    cfg = absolutize_paths(copy.deepcopy(config))  # Ray's workers do not share this working directory
    if until is not None and until not in STAGE_NAMES:
        raise RaysdError(f"run: --until must be one of {STAGE_NAMES}; got {until!r}")
    storage.configure_endpoint(cfg.storage_endpoint)
    the_run = Run(cfg)
    preflight(cfg, prepared=the_run.is_prepared())  # before any Ray work: base, data, run dir, disk, GPU
    ensure_ray()
    the_run.save_config()
    with RunLock(cfg.run_dir, cfg.resources.lock_expiry_seconds):
        manifest = read_manifest(cfg.run_dir)
        manifest["provenance"] = provenance(cfg)
        outputs: dict[str, Any] = {}
        for stage in STAGES:
            if not stage.enabled(cfg):
                continue
            _run_stage(the_run, stage, manifest, outputs)
            if stage.name == until:
                log.info("run: stopped after %s (--until)", until)
                break
        path = storage.join(cfg.run_dir, "results.json")
        results = storage.read_json(path) if "report" in outputs and storage.exists(path) else None
    log.info("run: done; %s", storage.join(cfg.run_dir, "report.html") if "report" in outputs else cfg.run_dir)
    return results or {}


def _run_stage(run: Run, stage: Stage, manifest: dict[str, Any], outputs: dict[str, Any]) -> None:
    key = fingerprint(stage.key(run.cfg, outputs))
    rec = manifest["stages"].get(stage.name, {})
    if rec.get("status") == "complete" and rec.get("key") == key:
        log.info("run: %s complete, skipped", stage.name)
        outputs[stage.name] = rec["outputs"]
        return
    restart = bool(rec) and rec.get("key") != key  # its settings or inputs changed: redo, not resume
    log.info("run: %s %s", stage.name, "rerun (settings or inputs changed)" if restart else
             ("resumed" if rec else "started"))
    manifest["stages"][stage.name] = {"status": "running", "key": key, "started_at": time.time()}
    write_manifest(run.root, manifest)
    t0 = time.perf_counter()
    with oom_as_error(stage.name, run.cfg):
        result = stage.run(run, outputs, restart)
    seconds = time.perf_counter() - t0
    manifest["stages"][stage.name] = {"status": "complete", "key": key, "outputs": result, "seconds": seconds,
                                      "finished_at": time.time()}
    write_manifest(run.root, manifest)
    outputs[stage.name] = result
    log.info("run: %s complete in %.1fs", stage.name, seconds)
