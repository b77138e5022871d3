"""The ``raysd`` command: a thin layer that builds a Config and calls the package.

A user's mistake (RaysdError, argparse errors) prints one line and exits with status 2; a
failure inside raysd keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

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
    g.add_argument("--seed", type=int)
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
    epochs = train(cfg, "unet", encoder_epoch=args.encoder_epoch, restart=args.restart)
    print(f"unet checkpoints: epochs {epochs} in {cfg.run_dir}/checkpoints/unet")
    return 0


def _not_yet(name: str, issue: int) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise RaysdError(f"raysd {name}: not implemented yet (planned in issue {issue})")

    return run


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
    s.add_argument("--encoder-epoch", type=int, help="Class-Encoder checkpoint to freeze (default: search 1's "
                                                     "best, else the last epoch)")
    s.add_argument("--restart", action="store_true", help="discard existing UNet checkpoints first")
    s.set_defaults(func=cmd_finetune)

    for name, issue, helptext in (
        ("run", 7, "the whole pipeline (default: the offline demo)"),
        ("search", 6, "steps 2/4: search IS, UGS and the checkpoint epoch (Ray Tune)"),
        ("generate", 5, "generate a synthetic dataset (Ray Data)"),
        ("cas", 5, "Classification Accuracy Score of a Parquet set"),
        ("report", 7, "write report.md and report.html for a run"),
    ):
        s = sub.add_parser(name, help=helptext, description=helptext)
        _add_config_flags(s, run_flag="--out" if name == "run" else "--run")
        s.set_defaults(func=_not_yet(name, issue))
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
            raise
        msg = " ".join(str(err).split())  # one line, whatever the message held
        print(f"raysd: error: {msg}", file=sys.stderr)
        return 2


def _json_print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
