"""The x10 plan: images, shards and expected wall time of the scaling stage per dataset and GPU count.

    python benchmarks/plan_x10.py                    # the anchors' single-GPU rate (DESIGN.md section 5)
    python benchmarks/plan_x10.py --rate 190 --gpus 1 2 4 8

The stage generates the largest scale once (x10 = 10 x the real training split) and takes every
smaller scale as a stratified prefix of it, so its cost is 10 x N_train images. Shards (the unit
of work and of resumption) are spread over one generation actor per GPU; throughput scales with
GPUs while shards outnumber actors. The rate is images/s on one GPU at the searched IS: measure
yours with benchmarks/bench_fastpaths.py (20 guided steps) and scale by 20 / IS.
"""

from __future__ import annotations

import argparse
import math

# Training-split sizes after raysd's splits (CIFAR: first 40,000 of the official 50,000)
TRAIN_SIZES = {"cifar10": 40_000, "cifar100": 40_000, "pathmnist": 89_996, "dermamnist": 7_007,
               "bloodmnist": 11_959, "retinamnist": 1_080}
ANCHOR_RATE = 131.0  # img/s, one H100, SD2-base fp16 eager, 20 guided steps, 128 px (DESIGN.md section 5)


def plan(n_train: int, scale: int, gpus: int, rate: float, shard_size: int) -> dict:
    images = scale * n_train
    shards = math.ceil(images / shard_size)
    waves = math.ceil(shards / gpus)  # shards per actor, the slowest actor bounds the stage
    seconds = waves * shard_size / rate
    return {"images": images, "shards": shards, "per_gpu": min(images, waves * shard_size), "hours": seconds / 3600}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=ANCHOR_RATE, help="images/s on one GPU")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=1024)
    args = ap.parse_args()
    print(f"x{args.scale} generation at {args.rate:g} img/s per GPU, shards of {args.shard_size}\n")
    print("| dataset | images | shards | " + " | ".join(f"{g} GPU h" for g in args.gpus) + " |")
    print("|---|---|---|" + "---|" * len(args.gpus))
    for name, n in TRAIN_SIZES.items():
        cells = [plan(n, args.scale, g, args.rate, args.shard_size) for g in args.gpus]
        print(f"| {name} | {cells[0]['images']:,} | {cells[0]['shards']} | "
              + " | ".join(f"{c['hours']:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
