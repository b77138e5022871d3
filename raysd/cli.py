"""The ``raysd`` command: a thin layer that builds a Config and calls the package.

A user's mistake (RaysdError, argparse errors) prints one line and exits with status 2; a
failure inside raysd keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from raysd.errors import RaysdError, find_raysd_error

log = logging.getLogger("raysd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2 (argparse's own convention)
        raise RaysdError(f"{self.prog}: {message}")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s raysd %(message)s", "%H:%M:%S"))
    root = logging.getLogger("raysd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if not verbose:  # Ray Data's per-dataset INFO lines drown ours; its progress bars stay
        logging.getLogger("ray.data").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# Checked numeric flags: out of range is an argparse error (one line, exit 2), before any work


def _int_flag(lo: int, hi: int = 2**63 - 1):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must lie in {lo}..{hi}; got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def _float_flag(lo: float, hi: float):
    import math

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be a finite number in [{lo:g}, {hi:g}]; got {text}")
        return v

    parse.__name__ = "number"
    return parse


POSITIVE = _int_flag(1)
SEED = _int_flag(0, 2**32 - 1)
STEPS = _int_flag(1, 1000)
SCALE = _int_flag(1, 1000)
UGS = _float_flag(0.0, 100.0)


# --------------------------------------------------------------------------------------------
# Config flags shared by the stage commands


def _add_config_flags(p: argparse.ArgumentParser, *, run_flag: str = "--run") -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", choices=["demo", "paper", "official"], default=None,
                   help="settings preset (default: the run's saved config, else 'demo')")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one setting, e.g. --set encoder.epochs=3 (repeatable)")
    g.add_argument("--dataset", help="cifar10, cifar100, pathmnist, dermamnist, bloodmnist, retinamnist, "
                                     "digits, npz:PATH or folder:PATH")
    g.add_argument("--data-dir", help="directory holding the raw dataset files")
    g.add_argument("--base-model", help="diffusers hub id, local diffusers directory, or 'tiny'")
    g.add_argument("--seed", type=SEED)
    g.add_argument(run_flag, dest="run_dir", metavar="RUN_DIR", help="run directory (local path or s3://, gs:// URI)")


def config_from_args(args: argparse.Namespace) -> Any:
    """Defaults < preset < saved run config < --config < named flags and --set."""
    from raysd import config as C
    from raysd import storage

    overrides = C.parse_set_flags(args.set)
    for flag, key in (("dataset", "dataset.name"), ("data_dir", "dataset.data_dir"),
                      ("base_model", "model.base_model"), ("seed", "seed"), ("run_dir", "run_dir")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    saved = None
    run_dir = overrides.get("run_dir")
    if run_dir and storage.exists(storage.join(run_dir, "config.json")):
        saved = storage.read_json(storage.join(run_dir, "config.json"))
    preset = args.preset or (saved or {}).get("preset") or "demo"
    cfg = C.load_config(preset, file=args.config, overrides={**C.flatten(_saved_settings(saved, preset)), **overrides})
    return cfg


def _require_run(cfg: Any, command: str) -> None:
    """Commands that continue a run (finetune, generate, search) need one: refuse before any work."""
    from raysd import storage

    if not storage.exists(storage.join(cfg.run_dir, "config.json")):
        raise RaysdError(f"{command}: {cfg.run_dir} holds no raysd run (no config.json); start one with "
                         "`raysd train-encoder --run DIR` or `raysd run --out DIR`")


def _saved_settings(saved: dict | None, preset: str) -> dict:
    if not saved or saved.get("preset") != preset:
        return {}
    return {k: v for k, v in saved.items() if k != "preset"}


# --------------------------------------------------------------------------------------------
# Commands


def cmd_prepare(args: argparse.Namespace) -> int:
    from raysd.prepare import prepare_dataset

    metas = prepare_dataset(args.dataset, args.out, data_dir=args.data_dir, download=not args.no_download)
    for split, m in metas.items():
        print(f"{split}: {m['num_rows']} images, {m['num_classes']} classes, counts {m['counts_per_class']}")
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from raysd.training import train

    cfg = config_from_args(args)
    epochs = train(cfg, "encoder", restart=args.restart)
    print(f"class-encoder checkpoints: epochs {epochs} in {cfg.run_dir}/checkpoints/encoder")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from raysd.training import train

    cfg = config_from_args(args)
    _require_run(cfg, "finetune")
    epochs = train(cfg, "unet", encoder_epoch=args.encoder_epoch, restart=args.restart)
    print(f"unet checkpoints: epochs {epochs} in {cfg.run_dir}/checkpoints/unet")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from raysd import runs, sets, storage
    from raysd.generation import generate_set, resolve_spec

    cfg = config_from_args(args)
    _require_run(cfg, "generate")
    if args.name is not None and (not args.name or "/" in args.name or "\\" in args.name or args.name.startswith(".")):
        raise RaysdError(f"generate: --name {args.name!r} must be a plain folder name (it goes under RUN/synthetic)")
    if args.scale is None and args.num_images is None:
        raise RaysdError("generate: give --scale K (K times the real training set) or --num-images N")
    runs.ensure_prepared(cfg)
    n_real = sets.read_meta(runs.split_dir(cfg, "train"))["num_rows"]
    n = args.num_images if args.num_images is not None else args.scale * n_real
    name = args.name or (f"x{args.scale}" if args.scale is not None else f"n{n}")
    spec = resolve_spec(cfg, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                        encoder_epoch=args.encoder_epoch, unet_epoch=args.unet_epoch, scheduler=args.scheduler)
    out = runs.synthetic_dir(cfg, name)
    meta = generate_set(cfg, out, num_images=n, class_balance=args.class_balance or cfg.scale.class_balance,
                        spec=spec, restart=args.restart)
    print(f"{storage.local_path(out)}: {meta['num_rows']} images, counts per class {meta['counts_per_class']}")
    return 0


def cmd_cas(args: argparse.Namespace) -> int:
    from raysd import runs, storage
    from raysd.evaluation import cas_of_set, check_compatible, real_splits_from_dataset, summarize

    cfg = config_from_args(args)
    if args.run_dir:
        runs.ensure_prepared(cfg)
        train_dir = runs.split_dir(cfg, "train") if args.train == "real" else args.train
        val = test = num_classes = None
        from raysd import sets

        m = sets.read_meta(runs.split_dir(cfg, "val"))
        check_compatible(train_dir, m["num_classes"], tuple(m["image_shape"]))
    else:
        if args.train == "real":
            raise RaysdError("cas: --train real needs --run RUN (the run's prepared real data)")
        val, test, num_classes = real_splits_from_dataset(cfg.dataset.name, cfg.dataset.data_dir, cfg.dataset.download)
        check_compatible(args.train, num_classes, tuple(val[0].shape[1:]))
        train_dir = args.train
    result = summarize(cas_of_set(cfg, train_dir, val=val, test=test, num_classes=num_classes, variant=args.variant))
    result["dataset"] = cfg.dataset.name
    result["variant"] = args.variant or cfg.cas.variant
    text = json.dumps(result, indent=2)
    if args.out:
        storage.write_bytes_atomic(args.out, (text + "\n").encode())
    print(json.dumps({k: v for k, v in result.items() if k not in ("confusion", "per_class_accuracy")}, indent=2))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from raysd.search import search

    for flag, key in (("num_trials", "search.num_trials"), ("scheduler", "search.scheduler"),
                      ("objective", "search.objective")):
        if getattr(args, flag) is not None:
            args.set.append(f"{key}={getattr(args, flag)}")
    cfg = config_from_args(args)
    _require_run(cfg, "search")
    best = search(cfg, args.phase, restart=args.restart)
    print(json.dumps({k: best[k] for k in ("phase", "num_inference_steps", "guidance_scale", "epoch", "encoder_epoch",
                                           "unet_epoch", "cas", "eval_split", "test_top1", "test_top5",
                                           "num_trials")}, indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raysd import pipeline, storage

    if args.run_dir is None:
        preset = args.preset or "demo"
        args.run_dir = f"runs/{preset}-{(args.dataset or ('digits' if preset == 'demo' else 'cifar10')).replace(':', '_')}"
    if args.resume and not storage.exists(storage.join(args.run_dir, "manifest.json")):
        raise RaysdError(f"run: --resume given but {args.run_dir} holds no run (no manifest.json)")
    cfg = config_from_args(args)
    results = pipeline.run(cfg, until=args.until)
    if results:
        sc = results["scaling"]
        line = ", ".join(f"{k} {100 * v['top1']:.1f}%" for k, v in sc.items())
        print(f"CAS top-1 on the real test split: {line}")
        print(f"report: {storage.join(cfg.run_dir, 'report.html')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from raysd.report import write_report

    out = write_report(args.run_path)
    print(out["report_html"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raysd.export import export_set

    out = export_set(args.set_dir, args.format, args.out)
    print(f"{out['out']}: {out['num_rows']} images as {out['format']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from raysd.config import reference_markdown

    if args.reference:
        print(reference_markdown())
        return 0
    cfg = config_from_args(args)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from raysd.verify import format_report, report_json, verify_run

    rep = verify_run(args.run_path)
    print(report_json(rep) if args.json else format_report(args.run_path, rep))
    return 0 if rep.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from raysd import __version__

    p = _Parser(prog="raysd", description="Class-conditional synthetic datasets from Stable Diffusion, on Ray.")
    p.add_argument("--version", action="version", version=f"raysd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("prepare", help="write a real dataset as canonical Parquet splits",
                       description="Load a dataset and write OUT/train, OUT/val and OUT/test as Parquet image sets.")
    s.add_argument("--dataset", required=True, help="cifar10, cifar100, pathmnist, dermamnist, bloodmnist, "
                                                    "retinamnist, digits, npz:PATH or folder:PATH")
    s.add_argument("--data-dir", help="directory holding the raw files (default: torchvision ./data, "
                                      "medmnist ~/.medmnist)")
    s.add_argument("--out", required=True, help="output directory (local path or URI)")
    s.add_argument("--no-download", action="store_true", help="never download; fail if files are absent")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train-encoder", help="step 1: train the Class-Encoder (Ray Train)",
                       description="Step 1: train only the Class-Encoder (UNet and VAE frozen); a checkpoint "
                                   "every epoch in RUN/checkpoints/encoder. Resumes after an interruption.")
    _add_config_flags(s)
    s.add_argument("--restart", action="store_true", help="discard existing encoder checkpoints first")
    s.set_defaults(func=cmd_train_encoder)

    s = sub.add_parser("finetune", help="step 3: fine-tune the UNet (Ray Train)",
                       description="Step 3: train only the UNet with the Class-Encoder frozen at --encoder-epoch; "
                                   "a checkpoint every epoch in RUN/checkpoints/unet. Resumes after an interruption.")
    _add_config_flags(s)
    s.add_argument("--encoder-epoch", type=POSITIVE, help="Class-Encoder checkpoint to freeze (default: search 1's "
                                                     "best, else the last epoch)")
    s.add_argument("--restart", action="store_true", help="discard existing UNet checkpoints first")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("generate", help="generate a synthetic dataset (Ray Data)",
                       description="Generate a synthetic set into RUN/synthetic/NAME with the run's generator "
                                   "(defaults: search 2's best, else search 1's, else the config). Resumable: "
                                   "a rerun finishes the missing shards.")
    _add_config_flags(s)
    size = s.add_mutually_exclusive_group()
    size.add_argument("--scale", type=SCALE, help="K times the real training-set size")
    size.add_argument("--num-images", type=POSITIVE, help="exactly N images")
    s.add_argument("--class-balance", choices=["real", "uniform"], help="class distribution (default: real)")
    s.add_argument("--num-inference-steps", type=STEPS, help="IS")
    s.add_argument("--guidance-scale", type=UGS, help="UGS")
    s.add_argument("--scheduler", choices=["ddim", "dpmpp", "unipc"])
    s.add_argument("--encoder-epoch", type=POSITIVE)
    s.add_argument("--unet-epoch", type=POSITIVE)
    s.add_argument("--name", help="output folder under RUN/synthetic (default xK or nN)")
    s.add_argument("--restart", action="store_true", help="replace a set made with other settings")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("cas", help="Classification Accuracy Score of a Parquet set",
                       description="Train ResNet20 on a Parquet image set (streamed through Ray Data) and score it "
                                   "on the real test split; early stopping on the real val split.")
    _add_config_flags(s)
    s.add_argument("--train", required=True, help="the set to train on (a directory), or 'real' with --run")
    s.add_argument("--variant", choices=["paper", "standard"], help="ResNet20 variant (default: cas.variant)")
    s.add_argument("--out", help="write the result as JSON here")
    s.set_defaults(func=cmd_cas)

    s = sub.add_parser("search", help="steps 2/4: search IS, UGS and the checkpoint epoch (Ray Tune)",
                       description="Search inference steps, guidance scale and checkpoint epoch for the best CAS "
                                   "(OptunaSearch + HyperBand). Phase 1 searches encoder epochs; phase 2 searches "
                                   "fine-tuned UNet epochs within phase 1's bounds. Resumes an interrupted search.")
    _add_config_flags(s)
    s.add_argument("--phase", type=int, choices=[1, 2], required=True)
    s.add_argument("--num-trials", type=POSITIVE, help="trials (default: search.num_trials)")
    s.add_argument("--scheduler", choices=["hyperband", "asha"])
    s.add_argument("--objective", choices=["val", "test"],
                   help="'val' (default) or 'test' (the paper's choice; it leaks the test set into the search)")
    s.add_argument("--restart", action="store_true", help="discard an existing search of this phase")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("export", help="export a set as ImageFolder PNGs, npz or a Hugging Face Parquet dataset",
                       description="Export an image set for other tools.")
    s.add_argument("set_dir", metavar="SET_DIR")
    s.add_argument("--format", required=True, choices=["imagefolder", "npz", "hf"])
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("run", help="the whole pipeline (default: the offline demo)",
                       description="Run the whole method: prepare, train the Class-Encoder, search, fine-tune the "
                                   "UNet, search again, generate x1..xK, score everything, write the report. A rerun "
                                   "continues after the last complete stage; changed settings redo only the stages "
                                   "that depend on them. With no arguments: the offline demo (digits, tiny model, CPU).")
    _add_config_flags(s, run_flag="--out")
    s.add_argument("--resume", action="store_true", help="require an existing run in --out and continue it")
    from raysd.runs import PIPELINE_STAGES

    s.add_argument("--until", choices=PIPELINE_STAGES, help="stop after this stage")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("report", help="write report.md and report.html for a run",
                       description="Write RUN/report.md and a self-contained RUN/report.html from results.json.")
    s.add_argument("run_path", metavar="RUN_DIR")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("config", help="print the resolved configuration (preset, file, flags) as JSON",
                       description="Resolve the configuration exactly as the other commands would (defaults < "
                                   "preset < a run's saved config < --config < flags and --set), validate it and "
                                   "print it as JSON; nothing runs.")
    _add_config_flags(s, run_flag="--run")
    s.add_argument("--reference", action="store_true", help="print the reference of every key (Markdown) instead")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("verify", help="check every file of a run against its recorded checksum",
                       description="Check every image set, checkpoint, base model and cached trial image of RUN_DIR "
                                   "against the SHA-256 recorded beside it; name each damaged file. Exit 1 when "
                                   "anything is damaged.")
    s.add_argument("run_path", metavar="RUN_DIR")
    s.add_argument("--json", action="store_true", help="print the findings as JSON")
    s.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _setup_logging(args.verbose)
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("raysd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        err = find_raysd_error(e)
        if err is None:
            if logging.getLogger("raysd").isEnabledFor(logging.DEBUG):
                raise
            first = " ".join(str(e).split())[:300]
            print(f"raysd: internal error: {type(e).__name__}: {first} (rerun with -v for the traceback, and "
                  "please report it)", file=sys.stderr)
            return 3
        msg = " ".join(str(err).split())  # one line, whatever the message held
        print(f"raysd: error: {msg}", file=sys.stderr)
        return 2


def _json_print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
