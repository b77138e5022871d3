"""CAS trainer speed: seconds per epoch for both ResNet20 variants on the same data, same run.

    python benchmarks/bench_cas.py               # GPU: 50,000 32x32 images, batch 256
    python benchmarks/bench_cas.py --images 2000 # CPU-sized

DESIGN.md section 5 (one H100): standard 2.55 s/epoch fp32; paper 3.53 s fp32, 2.34 s bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

from raysd.core.cas import CasTrainer  # noqa: E402
from raysd.config import CasConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    n = args.images or (50_000 if cuda else 2000)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    val = (x[:1000], y[:1000])
    rows = []
    for variant in ("standard", "paper"):
        tr = CasTrainer((x, y), val, 10, cfg=CasConfig(variant=variant), device="cuda" if cuda else "cpu")
        tr.train_epoch()  # warm-up (allocator, cuDNN autotune)
        secs = [tr.train_epoch()["seconds"] for _ in range(args.epochs)]
        rows.append([variant, n, float(np.median(secs)), n / float(np.median(secs))])
    base = rows[0][2]
    for r in rows:
        r.append(r[2] / base)
    print(table("CAS trainer, 32x32, batch 256 (+1000 val images per epoch)",
                ["variant", "images", "s/epoch", "img/s", "time vs standard"], rows))


if __name__ == "__main__":
    main()
