"""The ``raysd`` commands: each builds a Config from its flags (:func:`config_from_args`) and calls
one stage or run-directory function. Parsing and exit codes are in :mod:`raysd.cli`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from raysd.errors import RaysdError


def config_from_args(args: argparse.Namespace) -> Any:
    """Defaults < preset < saved run config < --config < named flags and --set."""
    from raysd import config as C
    from raysd.config.loading import read_config_file, saved_overrides
    from raysd.data import storage

    overrides = C.parse_set_flags(args.set)
    for flag, key in (("dataset", "dataset.name"), ("data_dir", "dataset.data_dir"),
                      ("base_model", "model.base_model"), ("seed", "seed"), ("run_dir", "run_dir")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    storage.configure_endpoint(overrides.get("storage_endpoint"))  # before the run's config.json is read
    saved = None
    run_dir = overrides.get("run_dir")
    if run_dir and storage.exists(storage.join(run_dir, "config.json")):
        saved = storage.read_json(storage.join(run_dir, "config.json"))
    from_file = C.flatten(read_config_file(args.config)) if args.config else {}
    preset = args.preset or from_file.pop("preset", None) or (saved or {}).get("preset") or "demo"
    kept = saved_overrides(saved) if saved and saved.get("preset") == preset else {}
    cfg = C.load_config(preset, overrides={**kept, **from_file, **overrides})
    storage.configure_endpoint(cfg.storage_endpoint)
    return cfg


def _preflight(cfg: Any) -> None:
    from raysd.run.preflight import preflight
    from raysd.run.rundir import Run

    preflight(cfg, prepared=Run(cfg).is_prepared())


def _locked(cfg: Any, command: str) -> Any:
    """The run lock ``raysd run`` takes, for a stage command on the run directory."""
    from raysd.run.locking import RunLock

    return RunLock(cfg.run_dir, cfg.resources.lock_expiry_seconds, command=f"raysd {command}")


def _require_run(cfg: Any, command: str) -> None:
    """Commands that continue a run (finetune, generate, search) need one: refuse before any work."""
    from raysd.data import storage

    if not storage.exists(storage.join(cfg.run_dir, "config.json")):
        raise RaysdError(f"{command}: {cfg.run_dir} holds no raysd run (no config.json); start one with "
                         "`raysd train-encoder --run DIR` or `raysd run --out DIR`")


def cmd_prepare(args: argparse.Namespace) -> int:
    from raysd.stages.prepare import prepare_dataset

    metas = prepare_dataset(args.dataset, args.out, data_dir=args.data_dir, download=not args.no_download)
    for split, m in metas.items():
        print(f"{split}: {m['num_rows']} images, {m['num_classes']} classes, counts {m['counts_per_class']}")
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from raysd.run.preflight import oom_as_error
    from raysd.stages.train import train

    cfg = config_from_args(args)
    _preflight(cfg)
    with _locked(cfg, "train-encoder"), oom_as_error("train_encoder", cfg):
        epochs = train(cfg, "encoder", restart=args.restart)
    print(f"class-encoder checkpoints: epochs {epochs} in {cfg.run_dir}/checkpoints/encoder")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from raysd.run.preflight import oom_as_error
    from raysd.stages.train import train

    cfg = config_from_args(args)
    _require_run(cfg, "finetune")
    _preflight(cfg)
    with _locked(cfg, "finetune"), oom_as_error("finetune", cfg):
        epochs = train(cfg, "unet", encoder_epoch=args.encoder_epoch, restart=args.restart)
    print(f"unet checkpoints: epochs {epochs} in {cfg.run_dir}/checkpoints/unet")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from raysd.data import storage
    from raysd.run.preflight import oom_as_error
    from raysd.run.generators import resolve_spec
    from raysd.run.rundir import Run
    from raysd.stages.generate import generate_set
    from raysd.stages.prepare import ensure_prepared

    cfg = config_from_args(args)
    _require_run(cfg, "generate")
    if args.name is not None and (not args.name or "/" in args.name or "\\" in args.name or args.name.startswith(".")):
        raise RaysdError(f"generate: --name {args.name!r} must be a plain folder name (it goes under RUN/synthetic)")
    if args.scale is None and args.num_images is None:
        raise RaysdError("generate: give --scale K (K times the real training set) or --num-images N")
    run = Run(cfg)
    ensure_prepared(run)
    n = args.num_images if args.num_images is not None else args.scale * run.num_train
    name = args.name or (f"x{args.scale}" if args.scale is not None else f"n{n}")
    spec = resolve_spec(run, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                        encoder_epoch=args.encoder_epoch, unet_epoch=args.unet_epoch, scheduler=args.scheduler)
    out = run.synthetic_dir(name)
    with _locked(cfg, "generate"), oom_as_error("generate", cfg):
        meta = generate_set(cfg, out, num_images=n, class_balance=args.class_balance or cfg.scale.class_balance,
                            spec=spec, restart=args.restart)
    print(f"{storage.local_path(out)}: {meta['num_rows']} images, counts per class {meta['counts_per_class']}")
    return 0


CAS_KEYS = ("train", "num_images", "top1", "top5", "best_epoch", "epochs_run", "best_val_top1", "seconds", "device",
            "per_class_accuracy", "confusion")


def cmd_cas(args: argparse.Namespace) -> int:
    import dataclasses

    from raysd.data import storage
    from raysd.run.rundir import Run
    from raysd.stages.evaluate import cas_of_set, check_compatible, real_splits_from_dataset
    from raysd.stages.prepare import ensure_prepared

    cfg = config_from_args(args)
    if args.run_dir:
        run = Run(cfg)
        ensure_prepared(run)
        train_dir = run.split_dir("train") if args.train == "real" else args.train
        val = test = num_classes = None
        check_compatible(train_dir, run.num_classes, tuple(run.meta("val")["image_shape"]))
    else:
        if args.train == "real":
            raise RaysdError("cas: --train real needs --run RUN (the run's prepared real data)")
        val, test, num_classes = real_splits_from_dataset(cfg.dataset.name, cfg.dataset.data_dir, cfg.dataset.download)
        check_compatible(args.train, num_classes, tuple(val[0].shape[1:]))
        train_dir = args.train
    protocol = args.protocol or cfg.cas.protocol
    score = cas_of_set(cfg, train_dir, val=val, test=test, num_classes=num_classes, variant=args.variant,
                       protocol=protocol)
    result = {k: v for k, v in dataclasses.asdict(score).items() if k in CAS_KEYS}
    result.update(score.metrics, dataset=cfg.dataset.name, protocol=protocol,
                  variant="standard" if protocol == "strong" else args.variant or cfg.cas.variant)
    if args.out:
        saved = {**result, "predictions": score.predictions}  # per test image: paired comparisons of two sets
        storage.write_bytes(args.out, (json.dumps(saved, indent=2) + "\n").encode())
    print(json.dumps({k: v for k, v in result.items() if k not in ("confusion", "per_class_accuracy")}, indent=2))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from raysd.run.preflight import oom_as_error
    from raysd.stages.search import search

    for flag, key in (("num_trials", "search.num_trials"), ("scheduler", "search.scheduler"),
                      ("objective", "search.objective")):
        if getattr(args, flag) is not None:
            args.set.append(f"{key}={getattr(args, flag)}")
    cfg = config_from_args(args)
    _require_run(cfg, "search")
    with _locked(cfg, "search"), oom_as_error(f"search_{args.phase}", cfg):
        best = search(cfg, args.phase, restart=args.restart).to_json()
    print(json.dumps({k: best[k] for k in ("phase", "num_inference_steps", "guidance_scale", "epoch", "encoder_epoch",
                                           "unet_epoch", "cas", "eval_split", "test_top1", "test_top5",
                                           "num_trials")}, indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raysd import pipeline
    from raysd.data import storage

    if args.run_dir is None:
        preset = args.preset or "demo"
        args.run_dir = f"runs/{preset}-{(args.dataset or ('digits' if preset == 'demo' else 'cifar10')).replace(':', '_')}"
    if args.resume and not storage.exists(storage.join(args.run_dir, "manifest.json")):
        raise RaysdError(f"run: --resume given but {args.run_dir} holds no run (no manifest.json)")
    cfg = config_from_args(args)
    _check_demo_base(cfg, args)
    results = pipeline.run(cfg, until=args.until, redo=args.redo)
    if results:
        line = ", ".join(f"{k} {100 * v['top1']:.1f}%" for k, v in results["scaling"].items())
        print(f"CAS top-1 on the real test split: {line}")
        print(f"report: {storage.join(cfg.run_dir, 'report.html')}")
    return 0


DEMO_BASE = "builtin:tiny-digits"


def _check_demo_base(cfg: Any, args: argparse.Namespace) -> None:
    """The demo's base has seen nothing but digits: on other data, a base must be chosen (refused before
    any work, naming the two paths) unless the user named one, the digits base included."""
    from raysd import config as C
    from raysd.config.loading import read_config_file

    if cfg.preset != "demo" or cfg.dataset.name == "digits" or cfg.model.base_model != DEMO_BASE:
        return
    named = set(C.parse_set_flags(args.set)) | (set(C.flatten(read_config_file(args.config))) if args.config else set())
    if args.base_model is not None or "model.base_model" in named:
        return
    raise RaysdError(
        f"the demo preset's base ({DEMO_BASE}) was pretrained on digits only and cannot draw {cfg.dataset.name}; "
        "choose a base: on a GPU the paper's path, `--preset paper --base-model stabilityai/stable-diffusion-2-base` "
        "(a hub id or a local diffusers directory), or on any machine `--preset small`, a small pixel-space base "
        "pretrained first on this dataset's train split without labels and kept for later runs (docs/datasets.md); "
        f"`--base-model {DEMO_BASE}` keeps the digits base anyway")


def cmd_report(args: argparse.Namespace) -> int:
    from raysd.run.report import write_report

    print(write_report(args.run_path)["report_html"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raysd.run.export import export_set

    out = export_set(args.set_dir, args.format, args.out)
    print(f"{out['out']}: {out['num_rows']} images as {out['format']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from raysd.config.reference import reference_markdown

    if args.reference:
        print(reference_markdown())
        return 0
    print(json.dumps(config_from_args(args).to_dict(), indent=2))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """The audit stage (and the report) on a finished run: its saved settings, audit.* from --set."""
    from raysd import config as C
    from raysd import pipeline
    from raysd.run.manifest import read_manifest

    bad = [k for k in C.parse_set_flags(args.set) if not k.startswith("audit.")]
    if bad:
        raise RaysdError(f"audit: only audit.* settings may be changed here; got {', '.join(bad)}")
    from raysd.run.rundir import Run

    ns = argparse.Namespace(set=[*args.set, "audit.enabled=true"], config=None, preset=None, run_dir=args.run_path)
    cfg = config_from_args(ns)
    _require_run(cfg, "audit")
    stages = read_manifest(cfg.run_dir)["stages"]
    if stages.get("scaling", {}).get("status") != "complete":
        raise RaysdError(f"audit: {args.run_path} is not finished (its scaling stage is not complete); finish it "
                         f"with `raysd run --out {args.run_path}` first")
    others = [s for s in pipeline.check_changes(Run(cfg), read_manifest(cfg.run_dir), redo=True)
              if s not in ("audit", "report")]
    if others:
        raise RaysdError(f"audit: {args.run_path} was made with settings this raysd reads differently ({', '.join(others)} "
                         "would be redone); rerun it with `raysd run` first")
    res = pipeline.run(cfg, redo=True)
    from raysd.run.privacy_report import privacy_lines

    print("\n".join(privacy_lines(res)))
    return 1 if res["privacy"]["verdict"]["flagged"] else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from raysd.run.verify import format_report, report_json, verify_run

    rep = verify_run(args.run_path)
    print(report_json(rep) if args.json else format_report(args.run_path, rep))
    return 0 if rep.ok else 1


# The CPU code paths pretrain-base runs on, whatever the CPU: ATen's and oneDNN's kernels capped
# at AVX2 and MKL's reproducible branch, so that the bytes do not depend on the machine's vector
# units (unpinned, two machines' builds differed from the first epoch on). They must be set before
# torch loads: the command re-executes itself with them when its process lacks them.
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}


def _pretrain_argv(args: argparse.Namespace) -> list[str]:
    argv = ["pretrain-base", "--out", str(args.out), "--dataset", args.dataset, "--steps", str(args.steps),
            "--seed", str(args.seed), "--threads", str(args.threads)]
    return argv + (["--data-dir", str(args.data_dir)] if args.data_dir else [])


def _rerun_pinned(args: argparse.Namespace) -> int:
    """Run this pretrain-base in a child process with PINNED_NUMERICS, relaying its output."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "raysd", *_pretrain_argv(args)], text=True,
                            env={**os.environ, **PINNED_NUMERICS}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def relay(src, dst) -> None:  # noqa: ANN001
        for line in src:
            dst.write(line)
            dst.flush()

    err = threading.Thread(target=relay, args=(proc.stderr, sys.stderr), daemon=True)
    err.start()
    relay(proc.stdout, sys.stdout)
    err.join()
    return proc.wait()


def _check_pretrain_out(path: str):  # noqa: ANN202 - a pathlib.Path
    from pathlib import Path

    from raysd.data import storage
    from raysd.data.models import BASE_META

    if storage.is_uri(path):
        raise RaysdError(f"pretrain-base: --out {path} must be a local directory (a run can then load it, or "
                         "copy it to the object store and give its URI as model.base_model)")
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not (out / BASE_META).is_file():
        raise RaysdError(f"pretrain-base: {out} exists and is not a raysd base directory; choose another --out")
    return out


def cmd_pretrain_base(args: argparse.Namespace) -> int:
    """Pretrain a tiny base without labels (caption-like PCA context) on a dataset's train split."""
    import dataclasses
    import logging
    import shutil
    import sys

    pinned = "torch" not in sys.modules and all(os.environ.get(k) == v for k, v in PINNED_NUMERICS.items())
    out = _check_pretrain_out(args.out)  # bad input answered here, before a child starts
    if not pinned:
        return _rerun_pinned(args)

    import torch

    from raysd.core.models.diffusion import NoiseSchedule
    from raysd.core.pretraining import PretrainSettings, pretrain_tiny_base
    from raysd.data.models import BASE_META, save_base_model
    from raysd.data.sources import load_dataset

    ds = load_dataset(args.dataset, args.data_dir, download=False)
    train = ds.splits["train"]  # the train split only: never val or test
    settings = PretrainSettings(steps=args.steps, seed=args.seed, threads=args.threads)
    log = logging.getLogger("raysd")
    base, losses = pretrain_tiny_base(train.images, settings, progress=lambda step, loss: log.info(
        "pretrain-base: step %d/%d, loss %.4f", step, settings.steps, loss))
    provenance = {"command": f"raysd pretrain-base --dataset {args.dataset} --steps {args.steps} --seed {args.seed} "
                             f"--threads {args.threads}", "settings": dataclasses.asdict(settings),
                  "data": {"dataset": args.dataset, "split": "train", "num_images": int(len(train.labels)),
                           "fingerprint": ds.fingerprint(), "split_rule": ds.provenance.get("split_rule")},
                  "losses": [round(x, 6) for x in losses], "torch": torch.__version__,
                  "numerics": {**PINNED_NUMERICS, "cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    tmp = out.with_name(out.name + ".tmp-pretrain")
    shutil.rmtree(tmp, ignore_errors=True)
    save_base_model(base, tmp, NoiseSchedule(), weights_dtype=torch.float16, extra={
        "pretrained_by": "raysd pretrain-base: no labels, a caption-like context (fixed random projection of each "
                         "image's PCA coefficients)", "provenance": provenance})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    weights = json.loads((out / BASE_META).read_text())["files"]["unet/diffusion_pytorch_model.safetensors"]
    print(f"{out}: tiny base pretrained for {args.steps} steps (final loss {losses[-1]:.4f}); weights SHA-256 "
          f"{weights}")
    return 0
