"""How much of Table 1 is noise: each after_k row of a finished run scored again with other seeds
(other generation seeds and classifier initialisations, the same generator and settings), Ray-free.

    python benchmarks/table1_noise.py RUN [--seeds 0 1 2] [--images N]

Prints, per step, the CAS of every seed, their mean and standard deviation, and the difference to
the step before beside the noise of that difference (the two steps' standard deviations combined).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

# which checkpoint a step's "epoch" names: steps 1-2 the encoder (the base UNet), 3-4 the UNet
EPOCH_OF = {"after_1": "encoder", "after_2": "encoder", "after_3": "unet", "after_4": "unet"}


def score(run, spec, n: int, seed: int) -> float:
    """The CAS one stage would measure for this generator, with another seed (Ray-free)."""
    from raysd.core.generator import generated_cas
    from raysd.data.models import load_generator

    m = run.train_meta
    v, t = run.read_split("val"), run.read_split("test")
    result, _ = generated_cas(load_generator(spec, "cpu"), n, "uniform", m["counts_per_class"], (v.images, v.labels),
                              (t.images, t.labels), m["num_classes"], cas=run.cfg.cas, seed=seed, device="cpu",
                              precision=run.cfg.model.precision, batch_size=run.cfg.sampling.batch_size)
    return float(result.top1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=None, help="default: the run's search.num_images")
    args = ap.parse_args()
    from raysd.config import load_config
    from raysd.run.generators import resolve_spec
    from raysd.run.rundir import Run

    cfg = load_config(file=Path(args.run) / "config.json")
    run = Run(cfg)
    torch.set_num_threads(cfg.resources.torch_threads or 2)
    steps = json.loads((Path(args.run) / "results.json").read_text())["steps"]
    n = args.images or cfg.search.num_images
    rows, prev = [], None
    for name, step in steps.items():
        p = step["params"]
        which = {"encoder_epoch": p["epoch"], "use_unet": False} if EPOCH_OF[name] == "encoder" else {"unet_epoch": p["epoch"]}
        spec = resolve_spec(run, best={}, num_inference_steps=p["num_inference_steps"],
                            guidance_scale=p["guidance_scale"], **which)
        t0 = time.perf_counter()
        cas = np.array([score(run, spec, n, s) for s in args.seeds])
        mean, std = cas.mean(), cas.std(ddof=1) if len(cas) > 1 else 0.0
        diff = "" if prev is None else f"{mean - prev[0]:+.4f} (noise {np.hypot(std, prev[1]):.4f})"
        rows.append([name, f"IS {p['num_inference_steps']}, UGS {p['guidance_scale']:.3g}, epoch {p['epoch']}",
                     " ".join(f"{c:.4f}" for c in cas), f"{mean:.4f}", f"{std:.4f}", diff,
                     f"{time.perf_counter() - t0:.0f}"])
        prev = (mean, std)
        print(f"{name}: {rows[-1][2]}", flush=True)
    print(table(f"Table 1 noise: {n} generated images per CAS, seeds {args.seeds} ({args.run})",
                ["step", "generator", "CAS per seed", "mean", "std", "vs step before", "s"], rows))


if __name__ == "__main__":
    main()
