"""The ``raysd`` command line: argument parsing and exit codes; the commands are in
:mod:`raysd.commands`.

A user's mistake (RaysdError, argparse errors, one also raised inside a Ray task or actor)
prints one line and exits with status 2; a failure inside raysd prints one line saying so and
exits with status 3 (``-v`` keeps its traceback).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Callable

from raysd import commands as cmd
from raysd.errors import RaysdError, find_raysd_error

log = logging.getLogger("raysd")
DATASETS_HELP = "cifar10, cifar100, pathmnist, dermamnist, bloodmnist, retinamnist, digits, npz:PATH or folder:PATH"


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


def _int_flag(lo: int, hi: int = 2**63 - 1) -> Callable[[str], int]:
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


def _setting_flag(key: str, kind: type) -> Callable[[str], float]:
    """A flag that sets what config key ``key`` sets, checked by that key's rule (one table)."""
    from raysd.config import Config
    from raysd.config.validation import field_of, rule_text, satisfies

    rule, defaults = field_of(key).metadata["rule"], Config()

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole number' if kind is int else 'number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(v) and satisfies(rule, v, defaults)):
            raise argparse.ArgumentTypeError(f"must be {rule_text(rule, defaults)} (the rule of {key}); got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


POSITIVE = _int_flag(1)
SEED = _int_flag(0, 2**32 - 1)
SCALE = _int_flag(1, 1000)


# --------------------------------------------------------------------------------------------
# The parser, one function per command


def _add_config_flags(p: argparse.ArgumentParser, *, run_flag: str = "--run") -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", choices=["demo", "small", "paper", "official"], default=None,
                   help="settings preset (default: the run's saved config, else 'demo')")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one setting, e.g. --set encoder.epochs=3 (repeatable)")
    g.add_argument("--dataset", help=DATASETS_HELP)
    g.add_argument("--data-dir", help="directory holding the raw dataset files")
    g.add_argument("--base-model", help="diffusers hub id, local diffusers directory, or 'tiny'")
    g.add_argument("--seed", type=SEED)
    g.add_argument(run_flag, dest="run_dir", metavar="RUN_DIR", help="run directory (local path or s3://, gs:// URI)")


def _prepare_parser(sub) -> None:  # noqa: ANN001
    s = sub.add_parser("prepare", help="write a real dataset as canonical Parquet splits",
                       description="Load a dataset and write OUT/train, OUT/val and OUT/test as Parquet image sets.")
    s.add_argument("--dataset", required=True, help=DATASETS_HELP)
    s.add_argument("--data-dir", help="directory holding the raw files (default: torchvision ./data, "
                                      "medmnist ~/.medmnist)")
    s.add_argument("--out", required=True, help="output directory (local path or URI)")
    s.add_argument("--no-download", action="store_true", help="never download; fail if files are absent")
    s.set_defaults(func=cmd.cmd_prepare)


def _training_parsers(sub) -> None:  # noqa: ANN001
    s = sub.add_parser("train-encoder", help="step 1: train the Class-Encoder (Ray Train)",
                       description="Step 1: train only the Class-Encoder (UNet and VAE frozen); a checkpoint "
                                   "every epoch in RUN/checkpoints/encoder. Resumes after an interruption.")
    _add_config_flags(s)
    s.add_argument("--restart", action="store_true", help="discard existing encoder checkpoints first")
    s.set_defaults(func=cmd.cmd_train_encoder)
    s = sub.add_parser("finetune", help="step 3: fine-tune the UNet (Ray Train)",
                       description="Step 3: train only the UNet with the Class-Encoder frozen at --encoder-epoch; "
                                   "a checkpoint every epoch in RUN/checkpoints/unet. Resumes after an interruption.")
    _add_config_flags(s)
    s.add_argument("--encoder-epoch", type=POSITIVE, help="Class-Encoder checkpoint to freeze (default: search 1's "
                                                          "best, else the last epoch)")
    s.add_argument("--restart", action="store_true", help="discard existing UNet checkpoints first")
    s.set_defaults(func=cmd.cmd_finetune)


def _generate_parser(sub) -> None:  # noqa: ANN001
    s = sub.add_parser("generate", help="generate a synthetic dataset (Ray Data)",
                       description="Generate a synthetic set into RUN/synthetic/NAME with the run's generator "
                                   "(defaults: search 2's best, else search 1's, else the config). Resumable: "
                                   "a rerun finishes the missing shards.")
    _add_config_flags(s)
    size = s.add_mutually_exclusive_group()
    size.add_argument("--scale", type=SCALE, help="K times the real training-set size")
    size.add_argument("--num-images", type=POSITIVE, help="exactly N images")
    s.add_argument("--class-balance", choices=["real", "uniform"], help="class distribution (default: real)")
    s.add_argument("--num-inference-steps", type=_setting_flag("sampling.num_inference_steps", int), help="IS")
    s.add_argument("--guidance-scale", type=_setting_flag("sampling.guidance_scale", float), help="UGS")
    s.add_argument("--scheduler", choices=["ddim", "dpmpp", "unipc"])
    s.add_argument("--encoder-epoch", type=POSITIVE)
    s.add_argument("--unet-epoch", type=POSITIVE)
    s.add_argument("--name", help="output folder under RUN/synthetic (default xK or nN)")
    s.add_argument("--restart", action="store_true", help="replace a set made with other settings")
    s.set_defaults(func=cmd.cmd_generate)


def _cas_and_search_parsers(sub) -> None:  # noqa: ANN001
    s = sub.add_parser("cas", help="Classification Accuracy Score of a Parquet set",
                       description="Train ResNet20 on a Parquet image set (streamed through Ray Data) and score it "
                                   "on the real test split; early stopping on the real val split.")
    _add_config_flags(s)
    s.add_argument("--train", required=True, help="the set to train on (a directory), or 'real' with --run")
    s.add_argument("--variant", choices=["paper", "standard"], help="ResNet20 variant (default: cas.variant)")
    s.add_argument("--protocol", choices=["paper", "strong"], help="classifier recipe (default: cas.protocol)")
    s.add_argument("--out", help="write the result as JSON here")
    s.set_defaults(func=cmd.cmd_cas)
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
    s.set_defaults(func=cmd.cmd_search)


def _pretrain_base_parser(sub) -> None:  # noqa: ANN001
    s = sub.add_parser("pretrain-base", help="pretrain a tiny base without labels (the demo's shipped base)",
                       description="Pretrain the tiny pixel-space UNet on a dataset's train split with a label-free, "
                                   "caption-like context (a fixed random projection of each image's PCA "
                                   "coefficients), deterministically on the CPU, and write it as a base directory. "
                                   "`raysd pretrain-base --out raysd/data/bases/tiny-digits` rebuilds the shipped "
                                   "demo base byte for byte (same thread count).")
    s.add_argument("--out", required=True, help="the base directory to write")
    s.add_argument("--dataset", default="digits", help="dataset whose train split it sees (default: digits)")
    s.add_argument("--data-dir", help="directory holding the raw dataset files")
    s.add_argument("--steps", type=POSITIVE, default=2400, help="optimizer steps (default: 2400)")
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--threads", type=POSITIVE, default=1, help="CPU threads (the same count gives the same bytes)")
    s.set_defaults(func=cmd.cmd_pretrain_base)


def _run_parser(sub) -> None:  # noqa: ANN001
    from raysd.run.rundir import PIPELINE_STAGES

    s = sub.add_parser("run", help="the whole pipeline (default: the offline demo)",
                       description="Run the whole method: prepare, train the Class-Encoder, search, fine-tune the "
                                   "UNet, search again, generate x1..xK, score everything, write the report. A rerun "
                                   "continues after the last complete stage; settings that changed what a completed stage "
                                   "made stop the run (naming them and what would be redone) unless --redo is given, "
                                   "which redoes only the stages that depend on them. With no arguments: the offline demo (digits, tiny model, CPU).")
    _add_config_flags(s, run_flag="--out")
    s.add_argument("--resume", action="store_true", help="require an existing run in --out and continue it")
    s.add_argument("--redo", action="store_true", help="redo the stages whose settings changed since they ran "
                                                       "(without it such a run stops first, naming them)")
    s.add_argument("--until", choices=PIPELINE_STAGES, help="stop after this stage")
    s.set_defaults(func=cmd.cmd_run)


def _run_dir_parsers(sub) -> None:  # noqa: ANN001
    s = sub.add_parser("export", help="export a set as ImageFolder PNGs, npz or a Hugging Face Parquet dataset",
                       description="Export an image set for other tools.")
    s.add_argument("set_dir", metavar="SET_DIR")
    s.add_argument("--format", required=True, choices=["imagefolder", "npz", "hf"])
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd.cmd_export)
    s = sub.add_parser("report", help="write report.md and report.html for a run",
                       description="Write RUN/report.md and a self-contained RUN/report.html from results.json.")
    s.add_argument("run_path", metavar="RUN_DIR")
    s.set_defaults(func=cmd.cmd_report)
    s = sub.add_parser("config", help="print the resolved configuration (preset, file, flags) as JSON",
                       description="Resolve the configuration exactly as the other commands would (defaults < "
                                   "preset < a run's saved config < --config < flags and --set), validate it and "
                                   "print it as JSON; nothing runs.")
    _add_config_flags(s, run_flag="--run")
    s.add_argument("--reference", action="store_true", help="print the reference of every key (Markdown) instead")
    s.set_defaults(func=cmd.cmd_config)
    s = sub.add_parser("audit", help="privacy audit of a finished run's largest synthetic set (exit 1: flagged)",
                       description="Near-copies of training images (distance to the closest training image against "
                                   "held-out real images'), memorisation ratio, near-duplicates and membership "
                                   "inference for the largest synthetic set of a finished run; adds them to its "
                                   "results.json and report. Exit 0: passed, 1: flagged by the stated rule.")
    s.add_argument("run_path", metavar="RUN_DIR")
    s.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="an audit.* setting, e.g. --set audit.allowed_share=0.02 (repeatable)")
    s.set_defaults(func=cmd.cmd_audit)
    s = sub.add_parser("verify", help="check every file of a run against its recorded checksum",
                       description="Check every image set, checkpoint, base model and cached trial image of RUN_DIR "
                                   "against the SHA-256 recorded beside it; name each damaged file. Exit 1 when "
                                   "anything is damaged.")
    s.add_argument("run_path", metavar="RUN_DIR")
    s.add_argument("--json", action="store_true", help="print the findings as JSON")
    s.set_defaults(func=cmd.cmd_verify)


def build_parser() -> argparse.ArgumentParser:
    from raysd import __version__

    p = _Parser(prog="raysd", description="Class-conditional synthetic datasets from Stable Diffusion, on Ray.")
    p.add_argument("--version", action="version", version=f"raysd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_prepare_parser, _training_parsers, _generate_parser, _cas_and_search_parsers, _run_parser,
                _run_dir_parsers, _pretrain_base_parser):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
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
        print(f"raysd: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever it held
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
