"""The real-data baseline of Table 2: ResNet20 trained on a dataset's real train split with the CAS
protocol (callbacks on val, scored on test), over several seeds; the paper's value beside it.

    python benchmarks/real_baseline.py --dataset retinamnist --data-dir ../shared/data --seeds 0 1 2

It imports whatever raysd is on the path, so running it from an older checkout (PYTHONPATH=that
checkout) measures that version's protocol on the same machine, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

PAPER_REAL = {"cifar10": 83.26, "cifar100": 60.55, "pathmnist": 88.70, "dermamnist": 75.71, "bloodmnist": 96.22,
              "retinamnist": 47.75}


def _api():
    """(load_dataset, train_and_evaluate, CasConfig) of the raysd on the path (new layout, else the flat one)."""
    try:
        from raysd.config import CasConfig
        from raysd.core.cas import train_and_evaluate
        from raysd.data.sources import load_dataset
    except ImportError:  # raysd before the core/data/run/stages layout
        from raysd.cas import train_and_evaluate  # type: ignore[no-redef]
        from raysd.config import CasConfig  # type: ignore[no-redef]
        from raysd.datasets import load_dataset  # type: ignore[no-redef]
    return load_dataset, train_and_evaluate, CasConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="retinamnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variant", default="paper", choices=["paper", "standard"])
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--precision", default="fp32", help="model.precision of the classifier (default: the released "
                    "fp32; older checkouts ran fp32 on the CPU and take no such argument)")
    args = ap.parse_args()
    load_dataset, train_and_evaluate, CasConfig = _api()
    ds = load_dataset(args.dataset, args.data_dir, download=False)
    sp = ds.splits
    cfg = CasConfig(variant=args.variant, max_epochs=args.max_epochs)
    rows, accs = [], []
    n_train = len(sp["train"].labels)
    for seed in args.seeds:
        t0 = time.perf_counter()

        def progress(epoch: int, loss: float, val_top1: float, seed: int = seed, t0: float = t0) -> None:
            sec = time.perf_counter() - t0
            print(f"[{args.label}] seed {seed} epoch {epoch}/{args.max_epochs} loss {loss:.4f} val {100 * val_top1:.2f} % "
                  f"{epoch * n_train / sec:.0f} img/s, {sec:.0f} s", flush=True)

        extra = {"precision": args.precision} if "precision" in inspect.signature(train_and_evaluate).parameters else {}
        res = train_and_evaluate(sp["train"], sp["val"], sp["test"], ds.num_classes, cfg=cfg, seed=seed,
                                 callback=progress, **extra)
        accs.append(100 * res.top1)
        rows.append([args.label, seed, f"{100 * res.top1:.2f}", res.best_epoch, res.epochs_run,
                     f"{100 * res.best_val_top1:.2f}", f"{time.perf_counter() - t0:.0f}"])
    mean, sd = statistics.mean(accs), statistics.pstdev(accs)
    rows.append([args.label, "mean ± sd", f"{mean:.2f} ± {sd:.2f}", "", "", "", ""])
    print(table(f"real-data baseline, {args.dataset}, ResNet20 {args.variant} (paper: "
                f"{PAPER_REAL.get(args.dataset, float('nan')):.2f} %)",
                ["raysd", "seed", "test top-1 %", "best epoch", "epochs", "val top-1 %", "seconds"], rows))


if __name__ == "__main__":
    main()
