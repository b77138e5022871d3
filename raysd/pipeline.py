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

import hashlib
import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raysd import checkpoints as ck
from raysd import runs, storage
from raysd.config import Config
from raysd.errors import RaysdError

log = logging.getLogger("raysd")
MANIFEST = "manifest.json"


@dataclass
class Stage:
    name: str
    key: Callable[[Config, dict], Any]  # what the stage depends on (settings + upstream outputs)
    run: Callable[[Config, dict, bool], dict]  # (cfg, outputs so far, restart) -> this stage's outputs
    enabled: Callable[[Config], bool] = lambda cfg: True


# --------------------------------------------------------------------------------------------
# Stage bodies


def _prepare(cfg: Config, out: dict, restart: bool) -> dict:
    metas = runs.ensure_prepared(cfg)
    return {s: {"num_rows": m["num_rows"], "counts_per_class": m["counts_per_class"]} for s, m in metas.items()} | {
        "fingerprint": metas["train"]["provenance"]["fingerprint"], "class_names": metas["train"]["class_names"],
        "image_shape": metas["train"]["image_shape"]}


def _pretrain(cfg: Config, out: dict, restart: bool) -> dict:
    from raysd.training import export_base, train

    epochs = train(cfg, "pretrain", restart=restart)
    export_base(cfg, epochs[-1])
    meta = ck.read_meta(ck.epoch_dir(runs.ckpt_root(cfg, "pretrain"), epochs[-1]))
    return {"epochs": epochs[-1], "steps": meta["step"], "loss": meta["loss"], "base": runs.base_spec(cfg),
            "base_sha256": meta["files"][ck.MODEL_FILE]}


def _train_encoder(cfg: Config, out: dict, restart: bool) -> dict:
    from raysd.training import train

    epochs = train(cfg, "encoder", restart=restart)
    return {"epochs": epochs, "checkpoints": _shas(cfg, "encoder", epochs), "losses": _losses(cfg, "encoder", epochs)}


def _after(cfg: Config, spec, params: dict) -> dict:  # noqa: ANN001
    from raysd.evaluation import cas_of_generator

    res = cas_of_generator(cfg, spec, cfg.search.num_images)
    return {"params": params, "cas": {"top1": res["top1"], "top5": res["top5"]}, "num_images": res["num_images"],
            "generation_seconds": res["generation_seconds"], "images_per_second": res["images_per_second"],
            "per_class": {"per_class_accuracy": res["per_class_accuracy"], "confusion": res["confusion"]}}


def _after_1(cfg: Config, out: dict, restart: bool) -> dict:
    """Untuned defaults (the config's IS and UGS; the paper's 50 and 7.5), last encoder epoch."""
    from raysd.generation import resolve_spec

    e = out["train_encoder"]["epochs"][-1]
    spec = resolve_spec(cfg, num_inference_steps=cfg.sampling.num_inference_steps,
                        guidance_scale=cfg.sampling.guidance_scale, encoder_epoch=e, use_unet=False, best={})
    return _after(cfg, spec, {"num_inference_steps": spec.num_inference_steps, "guidance_scale": spec.guidance_scale,
                              "epoch": e})


def _search(phase: int) -> Callable[[Config, dict, bool], dict]:
    def run(cfg: Config, out: dict, restart: bool) -> dict:
        from raysd.search import search

        best = search(cfg, phase, restart=restart)
        imp = storage.read_json(storage.join(runs.search_dir(cfg, phase), "importance.json"))
        return {"best": {k: v for k, v in best.items() if k not in ("confusion", "per_class_accuracy", "space")},
                "per_class": {"per_class_accuracy": best["per_class_accuracy"], "confusion": best["confusion"]},
                "importance": imp["importances"], "importance_basis": imp}

    return run


def _finetune(cfg: Config, out: dict, restart: bool) -> dict:
    from raysd.training import train

    e = out["search_1"]["best"]["encoder_epoch"]
    epochs = train(cfg, "unet", encoder_epoch=e, restart=restart)
    return {"encoder_epoch": e, "epochs": epochs, "checkpoints": _shas(cfg, "unet", epochs),
            "losses": _losses(cfg, "unet", epochs)}


def _after_3(cfg: Config, out: dict, restart: bool) -> dict:
    """Search 1's IS and UGS on the last UNet epoch."""
    from raysd.generation import resolve_spec

    b = out["search_1"]["best"]
    f = out["finetune"]["epochs"][-1]
    spec = resolve_spec(cfg, num_inference_steps=b["num_inference_steps"], guidance_scale=b["guidance_scale"],
                        encoder_epoch=out["finetune"]["encoder_epoch"], unet_epoch=f, best={})
    return _after(cfg, spec, {"num_inference_steps": b["num_inference_steps"], "guidance_scale": b["guidance_scale"],
                              "epoch": f})


def _generate(cfg: Config, out: dict, restart: bool) -> dict:
    """The largest scale once (real class distribution); smaller x_k are its stratified prefixes."""
    from raysd.generation import generate_set, resolve_spec

    b = out["search_2"]["best"]
    k = max(cfg.scale.scales)
    n = k * out["prepare"]["train"]["num_rows"]
    spec = resolve_spec(cfg, num_inference_steps=b["num_inference_steps"], guidance_scale=b["guidance_scale"],
                        encoder_epoch=b["encoder_epoch"], unet_epoch=b["unet_epoch"], best={})
    set_dir = runs.synthetic_dir(cfg, f"x{k}")
    t0 = time.perf_counter()
    meta = generate_set(cfg, set_dir, num_images=n, class_balance=cfg.scale.class_balance, spec=spec, restart=restart)
    seconds = time.perf_counter() - t0
    return {"set": set_dir, "scale": k, "num_images": meta["num_rows"], "fingerprint": meta["provenance"]["fingerprint"],
            "params": {"num_inference_steps": spec.num_inference_steps, "guidance_scale": spec.guidance_scale,
                       "encoder_epoch": b["encoder_epoch"], "unet_epoch": b["unet_epoch"]},
            "seconds": seconds, "images_per_second": n / max(seconds, 1e-9)}


def _scaling(cfg: Config, out: dict, restart: bool) -> dict:
    from raysd.evaluation import cas_of_sets
    from raysd.plan import class_counts

    real = out["prepare"]["train"]
    jobs: list[tuple[str, list[int] | None]] = [(runs.split_dir(cfg, "train"), None)]
    names = ["real"]
    for k in sorted(cfg.scale.scales):
        jobs.append((out["generate"]["set"], class_counts(k * real["num_rows"], len(real["counts_per_class"]),
                                                          cfg.scale.class_balance, real["counts_per_class"])))
        names.append(f"x{k}")
    order = sorted(range(len(jobs)), key=lambda i: -(sum(jobs[i][1]) if jobs[i][1] else real["num_rows"]))
    done = cas_of_sets(cfg, [jobs[i] for i in order])  # largest first: the long ones start at once
    results = [done[order.index(i)] for i in range(len(jobs))]
    return {name: {"top1": r["top1"], "top5": r["top5"], "num_images": r["num_images"], "best_epoch": r["best_epoch"],
                   "seconds": r["seconds"], "per_class": {"per_class_accuracy": r["per_class_accuracy"],
                                                         "confusion": r["confusion"]}}
            for name, r in zip(names, results)}


def _report(cfg: Config, out: dict, restart: bool) -> dict:
    from raysd.report import write_report
    from raysd.results import build_results

    build_results(cfg, read_manifest(cfg.run_dir))
    return write_report(cfg.run_dir)


def _shas(cfg: Config, kind: str, epochs: list[int]) -> dict[str, str]:
    root = runs.ckpt_root(cfg, kind)
    return {str(e): ck.read_meta(ck.epoch_dir(root, e))["files"][ck.MODEL_FILE] for e in epochs}


def _losses(cfg: Config, kind: str, epochs: list[int]) -> list[float]:
    root = runs.ckpt_root(cfg, kind)
    return [float(ck.read_meta(ck.epoch_dir(root, e))["loss"]) for e in epochs]


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
    Stage("report", lambda c, o: [_key_hash(o)], _report),
]
STAGE_NAMES = [s.name for s in STAGES]
assert tuple(STAGE_NAMES) == runs.PIPELINE_STAGES, "keep runs.PIPELINE_STAGES in step with STAGES"


# --------------------------------------------------------------------------------------------
# Manifest


def _key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(run_dir: str) -> dict[str, Any]:
    path = storage.join(run_dir, MANIFEST)
    if not storage.exists(path):
        return {"stages": {}}
    try:
        m = storage.read_json(path)
    except ValueError:
        raise RaysdError(f"run {run_dir}: {MANIFEST} is damaged (not valid JSON)") from None
    return m if isinstance(m, dict) and "stages" in m else {"stages": {}}


def _write_manifest(run_dir: str, manifest: dict[str, Any]) -> None:
    storage.write_json_atomic(storage.join(run_dir, MANIFEST), manifest)


def provenance(cfg: Config) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("raysd", "ray", "torch", "diffusers", "optuna", "pyarrow", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        sha = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        sha = None
    return {"config_hash": cfg.hash(), "git_sha": sha, "versions": versions, "python": platform.python_version(),
            "host": platform.node()}


# --------------------------------------------------------------------------------------------
# The driver


def run(config: Config, *, until: str | None = None) -> dict[str, Any]:
    """Run every stage of the method (or up to ``until``); returns results.json's content.

    Resumable: completed stages whose inputs did not change are skipped.
    """
    from raysd.raycluster import ensure_ray

    import copy

    from raysd.config import absolutize_paths

    cfg = absolutize_paths(copy.deepcopy(config))  # Ray's workers do not share this working directory
    if until is not None and until not in STAGE_NAMES:
        raise RaysdError(f"run: --until must be one of {STAGE_NAMES}; got {until!r}")
    ensure_ray()
    runs.save_run_config(cfg)
    from raysd.locking import RunLock

    with RunLock(cfg.run_dir):
        manifest = read_manifest(cfg.run_dir)
        manifest["provenance"] = provenance(cfg)
        outputs: dict[str, Any] = {}
        for stage in STAGES:
            if not stage.enabled(cfg):
                continue
            _run_stage(cfg, stage, manifest, outputs)
            if stage.name == until:
                log.info("run: stopped after %s (--until)", until)
                break
        path = storage.join(cfg.run_dir, "results.json")
        results = storage.read_json(path) if "report" in outputs and storage.exists(path) else None
    log.info("run: done; %s", storage.join(cfg.run_dir, "report.html") if "report" in outputs else cfg.run_dir)
    return results or {}


def _run_stage(cfg: Config, stage: Stage, manifest: dict[str, Any], outputs: dict[str, Any]) -> None:
    key = _key_hash(stage.key(cfg, outputs))
    rec = manifest["stages"].get(stage.name, {})
    if rec.get("status") == "complete" and rec.get("key") == key:
        log.info("run: %s complete, skipped", stage.name)
        outputs[stage.name] = rec["outputs"]
        return
    restart = bool(rec) and rec.get("key") != key  # its settings or inputs changed: redo, not resume
    log.info("run: %s %s", stage.name, "rerun (settings or inputs changed)" if restart else
             ("resumed" if rec else "started"))
    manifest["stages"][stage.name] = {"status": "running", "key": key, "started_at": time.time()}
    _write_manifest(cfg.run_dir, manifest)
    t0 = time.perf_counter()
    result = stage.run(cfg, outputs, restart)
    seconds = time.perf_counter() - t0
    manifest["stages"][stage.name] = {"status": "complete", "key": key, "outputs": result, "seconds": seconds,
                                      "finished_at": time.time()}
    _write_manifest(cfg.run_dir, manifest)
    outputs[stage.name] = result
    log.info("run: %s complete in %.1fs", stage.name, seconds)
