"""The real-data baseline of Table 2 under each classifier protocol: ResNet20 trained on a dataset's
real train split (best weights on val, scored on test) over several seeds, with top-1, balanced
accuracy, macro-F1, AUC, the 95 % bootstrap interval over the test split, the seeds' sd, and the
test split's majority-class and chance rows beside them.

    python benchmarks/real_baseline.py --dataset retinamnist --data-dir ../shared/data --preset paper
    python benchmarks/real_baseline.py --dataset digits --preset demo

The CAS settings are the preset's (the demo's for digits: 16 px, standard ResNet20, 10 epochs
under the paper protocol); each protocol runs at its full epochs (cas.max_epochs with early
stopping, cas.strong_epochs), never shortened. ``--protocols paper`` alone and ``--precision``
reproduce the older benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

PAPER_REAL = {"cifar10": 83.26, "cifar100": 60.55, "pathmnist": 88.70, "dermamnist": 75.71, "bloodmnist": 96.22,
              "retinamnist": 47.75}
METRICS = ("top1", "balanced_accuracy", "macro_f1", "auc")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def main() -> None:
    from raysd.config import load_config
    from raysd.core.cas import train_and_evaluate
    from raysd.core.metrics import baselines
    from raysd.data.sources import load_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="retinamnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--preset", default="paper", help="whose cas.* settings (demo for digits)")
    ap.add_argument("--protocols", nargs="+", default=["paper", "strong"], choices=["paper", "strong"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precision", default="auto", help="model.precision of the classifier (fp32: the released code's)")
    args = ap.parse_args()
    cfg = load_config(args.preset, overrides={"dataset.name": args.dataset})
    ds = load_dataset(args.dataset, args.data_dir, download=False)
    sp = ds.splits
    n_train = len(sp["train"].labels)
    rows, summary = [], []
    for protocol in args.protocols:
        cas = dataclasses.replace(cfg.cas, protocol=protocol)
        limit = cas.epoch_limit
        per_seed = []
        for seed in args.seeds:
            t0 = time.perf_counter()

            def progress(epoch: int, loss: float, val: float, seed: int = seed, t0: float = t0) -> None:
                sec = time.perf_counter() - t0
                print(f"[{protocol}] seed {seed} epoch {epoch}/{limit} loss {loss:.4f} val {100 * val:.2f} % "
                      f"{epoch * n_train / sec:.0f} img/s, {sec:.0f} s", flush=True)

            res = train_and_evaluate(sp["train"], sp["val"], sp["test"], ds.num_classes, cfg=cas, seed=seed,
                                     callback=progress, precision=args.precision)
            m = {"top1": res.top1, **{k: res.metrics[k] for k in METRICS[1:]}}
            per_seed.append((m, res.metrics["interval"]))
            rows.append([protocol, seed, *(_pct(m[k]) for k in METRICS[:3]), f"{m['auc']:.3f}",
                         "{:.1f}–{:.1f}".format(*(100 * x for x in res.metrics["interval"]["top1"])),
                         res.best_epoch, res.epochs_run, f"{time.perf_counter() - t0:.0f}"])
        cells = []
        for k in METRICS:
            vals = [m[k] for m, _ in per_seed]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}" if k == "auc" else
                         f"{100 * statistics.mean(vals):.2f} ± {100 * sd:.2f}")
        iv = [statistics.mean(i["top1"][j] for _, i in per_seed) for j in (0, 1)]
        ivb = [statistics.mean(i["balanced_accuracy"][j] for _, i in per_seed) for j in (0, 1)]
        summary.append([protocol, *cells, f"{100 * iv[0]:.1f}–{100 * iv[1]:.1f}",
                        f"{100 * ivb[0]:.1f}–{100 * ivb[1]:.1f}"])
    for name, b in baselines([int((sp["test"].labels == c).sum()) for c in range(ds.num_classes)]).items():
        summary.append([name, _pct(b["top1"]), _pct(b["balanced_accuracy"]), _pct(b.get("macro_f1")),
                        f"{b['auc']:.3f}" if b.get("auc") is not None else "–", "", ""])
    print(table(f"real-data baseline per seed, {args.dataset} ({args.preset} preset's CAS settings)",
                ["protocol", "seed", "top-1 %", "balanced %", "macro-F1 %", "AUC", "top-1 95 % interval",
                 "best epoch", "epochs", "seconds"], rows))
    print()
    print(table(f"real-data baseline, {args.dataset}: mean ± sd over seeds {args.seeds}; intervals: the seeds' mean "
                f"95 % bootstrap over the {len(sp['test'].labels)} test images (paper's real top-1: "
                f"{PAPER_REAL.get(args.dataset, float('nan')):.2f} %)",
                ["protocol", "top-1 %", "balanced %", "macro-F1 %", "AUC", "top-1 interval", "balanced interval"],
                summary))


if __name__ == "__main__":
    main()
