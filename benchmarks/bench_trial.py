"""One search trial as Ray Tune runs it (search_core.run_trial): generate N images, then the
paper ResNet20 protocol on them with the real-size val split, timed part by part.

    python benchmarks/bench_trial.py              # GPU: SD2-base architecture (random weights), 4000 images, 100 epochs
    python benchmarks/bench_trial.py --cpu-tiny   # CPU: tiny latent model, 400 images, 3 epochs

Target (issue 8, one H100): the whole trial <= 45 s, of which the classifier <= 25 s, with the
generator's weights loaded once per worker (the second trial on the same epoch loads nothing).
Random weights train a classifier on noise: the accuracy is meaningless, the time is not
(early stopping is disabled so every epoch runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sync, table  # noqa: E402

from raysd.config import load_config  # noqa: E402
from raysd.core.models import ClassEncoder  # noqa: E402
from raysd.core.models.diffusion import NoiseSchedule  # noqa: E402
from raysd.core.sampling import SamplerParams, generate  # noqa: E402
from raysd.core.search_space import run_trial  # noqa: E402
from raysd.data.models import load_base_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-tiny", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu_tiny
    dev = "cuda" if cuda else "cpu"
    spec, res, seq = ("random:sd2-base", 128, 77) if cuda else ("tiny-vae", 32, 4)
    n = args.images or (4000 if cuda else 400)
    epochs = args.epochs or (100 if cuda else 3)
    cfg = load_config("paper", overrides={"cas.max_epochs": epochs, "cas.early_stopping_patience": epochs + 1})

    t0 = time.perf_counter()
    base = load_base_model(spec, resolution=res, dtype=torch.float16 if cuda else torch.float32, device=dev)
    base.unet.eval().to(memory_format=torch.channels_last)
    enc = ClassEncoder(10, seq, base.cross_attention_dim).to(dev).eval()
    sync()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    val = (rng.integers(0, 256, (10_000 if cuda else 1000, 32, 32, 3), dtype=np.uint8), np.arange(10_000 if cuda
                                                                                                    else 1000) % 10)

    def images_fn(params):
        t = time.perf_counter()
        imgs = generate(base, enc, np.arange(n) % 10, np.arange(n), SamplerParams(args.steps, 2.0, "dpmpp"),
                        NoiseSchedule(), out_size=32, batch_size=512 if cuda else 64)
        sync()
        return imgs, np.arange(n) % 10, time.perf_counter() - t

    rows: list[dict] = []
    t = time.perf_counter()
    run_trial({}, images_fn=images_fn, eval_split=val, num_classes=10, cfg=cfg, device=dev,
              report=lambda m, s: rows.append(m))
    total = time.perf_counter() - t
    gen = rows[0]["generation_seconds"]
    clf = total - gen
    target = cuda and n == 4000 and epochs == 100
    out = [
        ["load generator weights (once per worker)", load_s, "-"],
        [f"generate {n} images, {args.steps} guided steps", gen, "-"],
        [f"paper ResNet20, {len(rows)} epochs + val each epoch", clf, f"{clf / 25:.2f} of 25 s" if target else "-"],
        ["trial (generate + classifier)", total, f"{total / 45:.2f} of 45 s" if target else "-"],
    ]
    print(table(f"one search trial: {spec}, {n} images, {epochs} epochs", ["part", "seconds", "vs target"], out))


if __name__ == "__main__":
    main()
