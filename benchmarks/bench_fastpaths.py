"""Sampler fast paths against the eager batched sampler and the compute limit, in one run.

    python benchmarks/bench_fastpaths.py            # GPU: SD2-base architecture (random weights), 128 px
    python benchmarks/bench_fastpaths.py --cpu-tiny # CPU: the tiny latent model, small sizes

Measured in the same process on the same device:
- the matmul rate (bf16 on a GPU, fp32 on the CPU) and the FLOPs of one UNet forward (torch's
  FlopCounterMode), hence the compute limit in images/s for IS guided steps
  (2 * IS UNet forwards per image);
- images/s of the eager batched sampler (the baseline), fused Q/K/V, torch.compile, and both,
  with each variant's share of the compute limit and the relative error of its final latents
  against the eager ones (same seeds);
- the share of generation time spent in the VAE decode and the resize to the classifier size.
Targets (issue 8): compiled >= 1.4x eager and >= 50 % of the compute limit on a GPU; decode +
resize <= 10 % of generation time; latent relative error < 1e-2 in fp16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sync, table, timed  # noqa: E402

from raysd.core.generator import apply_fast_paths  # noqa: E402
from raysd.core.imaging import model_to_uint8  # noqa: E402
from raysd.core.models import ClassEncoder  # noqa: E402
from raysd.core.models.diffusion import NoiseSchedule  # noqa: E402
from raysd.core.sampling import SamplerParams, sample_latents  # noqa: E402
from raysd.data.models import load_base_model  # noqa: E402


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul (the device's practical ceiling)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device == "cuda" else 3
    t = timed(lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / t


def unet_flops(base, context_len: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    c, h, w = base.latent_shape
    x = torch.randn(1, c, h, w, device=base.device, dtype=base.dtype)
    ctx = torch.randn(1, context_len, base.cross_attention_dim, device=base.device, dtype=base.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        base.unet(x, torch.tensor([500], device=base.device), encoder_hidden_states=ctx)
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny model on the CPU (default when no GPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-compile", action="store_true", help="eager variants only")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu_tiny
    dev = "cuda" if cuda else "cpu"
    spec, res, seq = ("random:sd2-base", 128, 77) if cuda else ("tiny-vae", 32, 4)
    batch = args.batch or (512 if cuda else 32)
    dtype = torch.float16 if cuda else torch.float32
    schedule, params = NoiseSchedule(), SamplerParams(args.steps, 2.0, "dpmpp")

    rate = matmul_rate(dev, torch.bfloat16 if cuda else torch.float32)
    probe = load_base_model(spec, resolution=res, dtype=dtype, device=dev)
    flops = unet_flops(probe, seq)
    limit = rate / (flops * 2 * args.steps)  # images/s if every UNet FLOP ran at the matmul rate
    del probe

    labels = torch.arange(batch) % 10
    seeds = np.arange(batch)
    variants = [("eager batched (baseline)", False, False), ("fused QKV", False, True)]
    if not args.skip_compile:
        variants += [("torch.compile", True, False), ("torch.compile + fused QKV", True, True)]
    rows, ref = [], None
    base_ips = None
    for name, comp, fuse in variants:
        base = load_base_model(spec, resolution=res, dtype=dtype, device=dev)
        base.unet.eval().to(memory_format=torch.channels_last)
        torch.manual_seed(0)
        enc = ClassEncoder(10, seq, base.cross_attention_dim).to(dev).eval()
        apply_fast_paths(base, compile=comp, fuse_qkv=fuse)
        t0 = time.perf_counter()
        lat = sample_latents(base, enc, labels, seeds, params, schedule)  # warm-up (compiles)
        sync()
        warm = time.perf_counter() - t0
        t = timed(lambda: sample_latents(base, enc, labels, seeds, params, schedule))
        ips = batch / t
        if ref is None:
            ref, base_ips = lat.float(), ips
            err = 0.0
            dec = timed(lambda: [model_to_uint8(base.decode(lat), 32) for _ in range(1)])
            decode_share = dec / (t + dec)
        else:
            err = float((lat.float() - ref).norm() / ref.norm())
        rows.append([name, ips, ips / base_ips, 100 * ips / limit, err, warm])
        base = None  # free it before the next variant
    print(table(f"sampler fast paths: {spec} at {res} px, DPM++ {args.steps} steps, UGS 2.0, "
                f"{str(dtype).split('.')[-1]}, batch {batch}",
                ["path", "img/s", "x eager", "% of compute limit", "latent rel. err", "first call s"], rows))
    print(f"\nmatmul rate {rate / 1e12:.3g} TFLOP/s; UNet forward {flops / 1e9:.3g} GFLOP; compute limit "
          f"{limit:.3g} img/s at {args.steps} guided steps")
    print(f"VAE decode + resize to 32 px: {100 * decode_share:.1f} % of generation time (eager)")


if __name__ == "__main__":
    main()
