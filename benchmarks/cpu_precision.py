"""fp32 against bf16 for the three kinds of work, on this machine's CPU (or GPU): the measurement
behind ``model.precision=auto`` (raysd/core/precision.py).

    python benchmarks/cpu_precision.py [--base builtin:tiny-digits] [--threads 2] [--repeats 3]

Rows: sampling (UNet forward with guidance-sized batches, fp32 weights vs bf16 weights), the CAS
classifier (ResNet20 training steps, fp32 vs bf16 autocast) and diffusion training (UNet forward
and backward with AdamW, fp32 vs bf16 autocast). Each row's ratio is bf16 over fp32, measured
alternately in the same process.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, timed  # noqa: E402


def sampling(unet: torch.nn.Module, batch: int, dtype: torch.dtype, repeats: int) -> float:
    """UNet evaluations per second with weights in ``dtype``."""
    m = copy.deepcopy(unet).to(dtype).to(memory_format=torch.channels_last).eval()
    cfg = m.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500)
    c = torch.randn(batch, 4, cfg.cross_attention_dim, dtype=dtype)
    with torch.inference_mode():
        return batch / timed(lambda: m(x, t, encoder_hidden_states=c), repeats)


def classifier(size: int, batch: int, dtype: torch.dtype | None, repeats: int) -> float:
    """ResNet20 (standard) training images per second at ``size`` px."""
    from raysd.core.models.resnet import resnet20

    torch.manual_seed(0)
    m = resnet20(10, "standard").to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return batch / timed(step, repeats * 4)


def training(unet: torch.nn.Module, batch: int, dtype: torch.dtype | None, repeats: int) -> float:
    """Diffusion training samples per second (forward, backward, AdamW)."""
    m = copy.deepcopy(unet).train()
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    cfg = m.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.randint(0, 1000, (batch,))
    c = torch.randn(batch, 4, cfg.cross_attention_dim)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = m(x, t, encoder_hidden_states=c).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    return batch / timed(step, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="builtin:tiny-digits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from raysd.core.precision import cpu_has_native_bf16
    from raysd.data.models import load_base_model

    unet = load_base_model(args.base, resolution=16).unet.float()
    bf = torch.bfloat16
    cases = [
        ("sampling, UNet evals/s (batch 1024 = 512 guided)", lambda d: sampling(unet, 1024, d or torch.float32,
                                                                                 args.repeats)),
        ("CAS classifier, train img/s (16 px, batch 128)", lambda d: classifier(16, 128, d, args.repeats)),
        ("CAS classifier, train img/s (32 px, batch 128)", lambda d: classifier(32, 128, d, args.repeats)),
        ("diffusion training, samples/s (batch 64)", lambda d: training(unet, 64, d, args.repeats)),
    ]
    rows = []
    for name, fn in cases:
        fp32 = [fn(None), fn(None)]
        half = [fn(bf), fn(bf)]  # two of each, interleaved by row: the better of two against noise
        rows.append([name, f"{max(fp32):.0f}", f"{max(half):.0f}", f"{max(half) / max(fp32):.2f}"])
        print(rows[-1], flush=True)
    print(table(f"fp32 vs bf16 ({args.base}; native bf16 on this CPU: {cpu_has_native_bf16()})",
                ["work", "fp32", "bf16", "bf16 / fp32"], rows))


if __name__ == "__main__":
    main()
