"""Sampler throughput: raysd's batched guided sampler against a plain loop, same run, same card.

    python benchmarks/bench_sampler.py            # GPU: SD2-base architecture (random weights), 128 px
    python benchmarks/bench_sampler.py --cpu-tiny # CPU: the tiny model, small sizes

raysd: one UNet call per step for both guidance branches, 20 DDIM steps, UGS 2.0, fp16 (GPU),
large batch. Plain loop (the baseline, as the paper's code): fp32, batch 8, two UNet calls per
step, DDIM 50. Throughput does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed  # noqa: E402

from raysd.core.models import ClassEncoder  # noqa: E402
from raysd.core.models.diffusion import NoiseSchedule  # noqa: E402
from raysd.core.sampling import SamplerParams, generate, initial_noise  # noqa: E402
from raysd.core.schedulers import make_scheduler  # noqa: E402
from raysd.data.models import load_base_model  # noqa: E402


@torch.no_grad()
def plain_loop(base, enc, labels, steps: int, ugs: float, schedule: NoiseSchedule, batch: int) -> None:
    """The naive sampler: small batches, separate conditional and unconditional UNet calls."""
    for lo in range(0, len(labels), batch):
        lab = torch.as_tensor(labels[lo : lo + batch], device=base.device)
        x = initial_noise(range(lo, lo + len(lab)), base.latent_shape).to(base.device)
        cond, uncond = enc.encode(lab), enc(enc.uncond_input(len(lab)))
        sched = make_scheduler("ddim", schedule, steps)
        for t in sched.timesteps:
            tt = torch.full((len(lab),), t, device=base.device)
            e_u = base.unet(x, tt, encoder_hidden_states=uncond).sample
            e_c = base.unet(x, tt, encoder_hidden_states=cond).sample
            x = sched.step(e_u + ugs * (e_c - e_u), t, x).prev_sample
        base.decode(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny model on the CPU (default when no GPU)")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu_tiny
    dev = "cuda" if cuda else "cpu"
    spec, res = ("random:sd2-base", 128) if cuda else ("tiny", 16)
    n = args.images or (2048 if cuda else 64)
    batch = args.batch or (512 if cuda else 64)
    schedule = NoiseSchedule()
    fast_dtype = torch.float16 if cuda else torch.float32
    base = load_base_model(spec, resolution=res, dtype=fast_dtype, device=dev)
    base.unet.eval()
    enc = ClassEncoder(10, 77 if cuda else 4, base.cross_attention_dim).to(dev)
    labels = np.arange(n) % 10
    seeds = np.arange(n)
    t_fast = timed(lambda: generate(base, enc, labels, seeds, SamplerParams(20, 2.0), schedule, out_size=32,
                                    batch_size=batch))
    base32 = load_base_model(spec, resolution=res, dtype=torch.float32, device=dev)
    base32.unet.eval()
    n_plain = min(n, 64 if cuda else 16)
    t_plain = timed(lambda: plain_loop(base32, enc, labels[:n_plain], 50, 2.0, schedule, 8))
    rows = [
        ["raysd batched CFG, DDIM 20, " + str(fast_dtype).split(".")[-1] + f", batch {batch}", n, n / t_fast, 1.0],
        ["plain loop, DDIM 50, fp32, batch 8, 2 calls/step", n_plain, n_plain / t_plain, 0.0],
    ]
    rows[1][3] = rows[1][2] / rows[0][2]
    rows[0][3] = 1.0
    print(table(f"sampler, {spec} at {res} px", ["path", "images", "img/s", "ratio to raysd"], rows))
    print(f"\nraysd / plain = {rows[0][2] / rows[1][2]:.1f}x")


if __name__ == "__main__":
    main()
