"""The whole method as resumable stages recorded in ``RUN/manifest.json``.

prepare -> [pretrain: the small preset] -> train_encoder -> after_1 -> search_1 -> finetune -> after_3
-> search_2 -> generate -> scaling -> audit -> report. (after_2 and after_4 are the best trials of the
searches: the same 4000-image CAS, already measured.)

Each stage has a key: the settings that determine its output (the schema says which,
:mod:`raysd.config.identity`) and the upstream outputs it uses. A stage whose recorded key
matches is skipped. One whose key changed is redone (its own artefacts restarted), and so is
everything downstream whose key changes with it, nothing else; but only when asked (``redo``):
otherwise the run stops before writing anything, naming the changed settings and the stages,
with their time, that redoing would discard. A stage is marked ``running`` (with its key and
settings) before it starts and ``complete`` after, so a rerun after a crash continues where it
stopped: the stages themselves resume (checkpoints, shards, Tune trials).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from raysd.config import Config, fingerprint
from raysd.config.identity import changed_settings
from raysd.config.loading import absolutize_paths
from raysd.data import checkpoints as ck
from raysd.data import storage
from raysd.errors import RaysdError
from raysd.run.locking import check_held
from raysd.run.manifest import provenance, read_manifest, write_manifest
from raysd.run.preflight import oom_as_error, preflight
from raysd.run.rundir import PIPELINE_STAGES, Run, stage_settings
from raysd.core.plan import class_counts
from raysd.run.scores import Score

log = logging.getLogger("raysd")


@dataclass
class Stage:
    """A stage: what it runs, the upstream stages whose outputs it uses and which of those outputs
    make its identity (with the settings the schema says determine it)."""

    name: str
    run: Callable[[Run, dict, bool], dict]  # (run, outputs so far, restart) -> this stage's outputs (JSON)
    uses: tuple[str, ...] = ()
    inputs: Callable[[dict], dict] = lambda outputs: {}
    enabled: Callable[[Config], bool] = lambda cfg: True

    def identity(self, cfg: Config) -> dict[str, Any]:
        return stage_settings(cfg, self.name)

    def key(self, cfg: Config, outputs: dict[str, Any]) -> str:
        """The stage's key: its settings and the upstream outputs it uses."""
        return fingerprint({"settings": self.identity(cfg), "inputs": self.inputs(outputs)})


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
    """The base pretrained on the run's train split, or kept by a run with the same data and settings."""
    from raysd.stages.train import pretrain_base

    return pretrain_base(run, next(s for s in STAGES if s.name == "pretrain").key(run.cfg, out), restart)


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
        return {"best": {k: v for k, v in best.items() if k not in ("confusion", "per_class_accuracy", "space",
                                                                      "predictions")},
                "per_class": {"per_class_accuracy": best["per_class_accuracy"], "confusion": best["confusion"],
                              **({"predictions": best["predictions"]} if best.get("predictions") else {})},
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
    """Table 2: the real training split and every x_k (:func:`raysd.stages.evaluate.scaling_table`)."""
    from raysd.stages.evaluate import scaling_table

    return scaling_table(run, out["generate"]["set"], _scale_counts(run, out))


def _audit(run: Run, out: dict, restart: bool) -> dict:
    """The privacy audit of the largest synthetic set (:func:`raysd.stages.audit.audit_run`)."""
    from raysd.stages.audit import audit_run

    return audit_run(run, out["generate"]["set"], _scale_counts(run, out))


def _report(run: Run, out: dict, restart: bool) -> dict:
    from raysd.run.report import write_report
    from raysd.run.results import build_results

    build_results(run.cfg, read_manifest(run.root))
    return write_report(run.root)


def _fp(o: dict) -> dict:
    return {"data": o["prepare"]["fingerprint"]}


def _base(o: dict) -> dict:
    """The base the stage trains or samples from: the run's pretrained one (by its weights' checksum)
    or the configured one (its ``model.base_model`` identity is among the settings)."""
    return {"base": o.get("pretrain", {}).get("base_sha256")}


def _best(o: dict, search: str, *keys: str) -> dict:
    return {search: {k: o[search]["best"][k] for k in keys}}


STAGES: list[Stage] = [
    Stage("prepare", _prepare),
    Stage("pretrain", _pretrain, uses=("prepare",), inputs=lambda o: _fp(o),
          enabled=lambda c: c.model.pretrain_steps > 0),
    Stage("train_encoder", _train_encoder, uses=("prepare", "pretrain"), inputs=lambda o: {**_fp(o), **_base(o)}),
    Stage("after_1", _after_1, uses=("prepare", "pretrain", "train_encoder"),
          inputs=lambda o: {**_fp(o), **_base(o), "encoder": o["train_encoder"]["checkpoints"]}),
    Stage("search_1", _search(1), uses=("prepare", "pretrain", "train_encoder"),
          inputs=lambda o: {**_fp(o), **_base(o), "encoder": o["train_encoder"]["checkpoints"]}),
    Stage("finetune", _finetune, uses=("prepare", "pretrain", "train_encoder", "search_1"),
          inputs=lambda o: {**_fp(o), **_base(o), **_best(o, "search_1", "encoder_epoch"),
                            "encoder": o["train_encoder"]["checkpoints"]}),
    Stage("after_3", _after_3, uses=("prepare", "pretrain", "train_encoder", "search_1", "finetune"),
          inputs=lambda o: {**_fp(o), **_base(o),
                            **_best(o, "search_1", "num_inference_steps", "guidance_scale", "encoder_epoch"),
                            "encoder": o["train_encoder"]["checkpoints"], "unet": o["finetune"]["checkpoints"]}),
    Stage("search_2", _search(2), uses=("prepare", "pretrain", "train_encoder", "search_1", "finetune"),
          inputs=lambda o: {**_fp(o), **_base(o),
                            **_best(o, "search_1", "num_inference_steps", "guidance_scale", "encoder_epoch"),
                            "encoder": o["train_encoder"]["checkpoints"], "unet": o["finetune"]["checkpoints"]}),
    Stage("generate", _generate, uses=("prepare", "pretrain", "train_encoder", "finetune", "search_2"),
          inputs=lambda o: {**_fp(o), **_base(o), **_best(o, "search_2", "num_inference_steps",
                                                                "guidance_scale", "encoder_epoch", "unet_epoch"),
                            "encoder": o["train_encoder"]["checkpoints"], "unet": o["finetune"]["checkpoints"]}),
    Stage("scaling", _scaling, uses=("prepare", "generate"),
          inputs=lambda o: {**_fp(o), "set": o["generate"]["fingerprint"]}),
    Stage("audit", _audit, uses=("prepare", "generate"), enabled=lambda c: c.audit.enabled,
          inputs=lambda o: {**_fp(o), "set": o["generate"]["fingerprint"]}),
    Stage("report", _report, uses=tuple(n for n in PIPELINE_STAGES if n != "report"),
          inputs=lambda o: {"outputs": fingerprint(o)}),
]
STAGE_NAMES = [s.name for s in STAGES]
assert tuple(STAGE_NAMES) == PIPELINE_STAGES, "keep raysd.run.rundir.PIPELINE_STAGES in step with STAGES"


# --------------------------------------------------------------------------------------------
# The driver

KEY_SCHEME = 2  # manifests written before it (no "key_scheme") hold the keys of raysd.run.legacy


def run(config: Config, *, until: str | None = None, redo: bool = False) -> dict[str, Any]:
    """Run every stage of the method (or up to ``until``); returns results.json's content.

    Resumable: completed stages whose inputs did not change are skipped. A completed (or started)
    stage whose settings changed is redone only with ``redo``; without it the run stops before
    writing anything, naming the settings and the stages (and their time) it would discard.
    """
    from raysd.run.locking import RunLock
    from raysd.stages.cluster import ensure_ray

    cfg = absolutize_paths(copy.deepcopy(config))  # Ray's workers do not share this working directory
    if until is not None and until not in STAGE_NAMES:
        raise RaysdError(f"run: --until must be one of {STAGE_NAMES}; got {until!r}")
    storage.configure_endpoint(cfg.storage_endpoint)
    the_run = Run(cfg)
    the_run.check_preset()
    check_changes(the_run, read_manifest(cfg.run_dir), until=until, redo=redo)  # read only: nothing written yet
    preflight(cfg, prepared=the_run.is_prepared())  # before any Ray work: base, data, run dir, disk, GPU
    ensure_ray()
    with RunLock(cfg.run_dir, cfg.resources.lock_expiry_seconds, command="raysd run"):
        manifest = read_manifest(cfg.run_dir)
        check_changes(the_run, manifest, until=until, redo=redo)  # again, now that no one else can change it
        the_run.save_config()
        manifest["provenance"] = provenance(cfg)
        if manifest.get("key_scheme") != KEY_SCHEME:  # records of an earlier raysd, now with current keys
            manifest["key_scheme"] = KEY_SCHEME
            if manifest["stages"]:
                check_held(cfg.run_dir)
                write_manifest(cfg.run_dir, manifest)
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


def _stages_until(cfg: Config, until: str | None) -> list[Stage]:
    out = []
    for stage in STAGES:
        if stage.enabled(cfg):
            out.append(stage)
        if stage.name == until:
            break
    return out


def migrate(run: Run, manifest: dict[str, Any]) -> None:
    """Give the records of a manifest written before KEY_SCHEME the current keys (in memory).

    A record whose old key is what the old scheme computes for the run's saved config (or the
    current one) was made with those settings: it gets their key and identity now. One that
    matches neither keeps its old key and is reported as changed."""
    if manifest.get("key_scheme", 1) >= KEY_SCHEME or manifest.get("migrated_from_scheme") or not manifest["stages"]:
        return
    from raysd.config import config_from_dict
    from raysd.run import legacy

    candidates = [run.cfg]
    saved = run.path("config.json")
    if storage.exists(saved):
        try:
            candidates.insert(0, absolutize_paths(config_from_dict(storage.read_json(saved))))
        except RaysdError:
            pass
    outputs: dict[str, Any] = {}
    for stage in STAGES:
        rec = manifest["stages"].get(stage.name)
        if rec is None or not stage.enabled(run.cfg):
            continue
        for cfg in candidates:
            if rec.get("key") == legacy.stage_key(stage.name, cfg, outputs):
                rec["key"], rec["identity"] = stage.key(cfg, outputs), stage.identity(cfg)
                break
        if rec.get("status") == "complete":
            outputs[stage.name] = rec["outputs"]
    manifest["migrated_from_scheme"] = 1


def check_changes(run: Run, manifest: dict[str, Any], *, until: str | None = None, redo: bool = False) -> list[str]:
    """The recorded stages (complete or started) that this run would redo because what they depend
    on changed; raises RaysdError naming them and the settings, unless ``redo``."""
    migrate(run, manifest)
    outputs: dict[str, Any] = {}
    changed: dict[str, list[str]] = {}
    for stage in _stages_until(run.cfg, until):
        rec = manifest["stages"].get(stage.name)
        if rec is None:
            break
        upstream = [u for u in stage.uses if u in changed]
        if upstream:
            changed[stage.name] = [f"uses {upstream[0]}"]
        elif rec.get("key") != stage.key(run.cfg, outputs):
            diff = changed_settings(rec.get("identity") or {}, stage.identity(run.cfg)) if "identity" in rec else []
            changed[stage.name] = diff or ["settings recorded by an earlier raysd" if "identity" not in rec
                                           else "its inputs (base model or data) changed"]
        if rec.get("status") != "complete":
            break
        outputs[stage.name] = rec["outputs"]
    if changed and not redo:
        settings = sorted({d for ds in changed.values() for d in ds if not d.startswith("uses ")})
        lost = ", ".join(f"{n} ({_took(manifest['stages'][n])})" for n in changed)
        raise RaysdError(f"run: {run.root} was made with other settings ({'; '.join(settings)}); rerunning would redo "
                         f"{lost}: pass --redo to redo them, or use another --out")
    return list(changed)


def _took(rec: dict[str, Any]) -> str:
    if rec.get("status") != "complete":
        return "started, partly done"
    s = float(rec.get("seconds") or 0.0)
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _run_stage(run: Run, stage: Stage, manifest: dict[str, Any], outputs: dict[str, Any]) -> None:
    key = stage.key(run.cfg, outputs)
    rec = manifest["stages"].get(stage.name, {})
    if rec.get("status") == "complete" and rec.get("key") == key:
        log.info("run: %s complete, skipped", stage.name)
        outputs[stage.name] = rec["outputs"]
        return
    restart = bool(rec) and rec.get("key") != key  # its settings or inputs changed (and --redo): redo, not resume
    log.info("run: %s %s", stage.name, "redone (settings or inputs changed)" if restart else
             ("resumed" if rec else "started"))
    identity = stage.identity(run.cfg)
    manifest["stages"][stage.name] = {"status": "running", "key": key, "identity": identity, "started_at": time.time()}
    check_held(run.root)  # a driver whose run lock was taken over stops before its next record
    write_manifest(run.root, manifest)
    t0 = time.perf_counter()
    with oom_as_error(stage.name, run.cfg):
        result = stage.run(run, outputs, restart)
    seconds = time.perf_counter() - t0
    manifest["stages"][stage.name] = {"status": "complete", "key": key, "identity": identity, "outputs": result,
                                      "seconds": seconds, "finished_at": time.time()}
    check_held(run.root)
    write_manifest(run.root, manifest)
    outputs[stage.name] = result
    log.info("run: %s complete in %.1fs", stage.name, seconds)
