"""Memory of one training step of steps 1 and 3 (full, and through a LoRA adapter) on the SD2-base
architecture (random weights), at 128 px (16x16 latents), measured as the process's peak RSS on
the CPU, against raysd's estimate (raysd.core.memory), and the GPU memory the estimate gives for
the paper's batch sizes.

    python benchmarks/memory.py                    # measures batch 1 and 4, fp32, on the CPU
    python benchmarks/memory.py --one KIND BATCH   # one measurement (what the table runs per row;
                                                   # KIND: encoder, unet or lora)
    python benchmarks/memory.py --classifier       # the CAS classifier's constants (core/memory.py)

Each measurement runs in a fresh process (the peak RSS of a process never goes down). The
activation bytes per sample are the slope between the two batch sizes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

GB = 1024**3


def one(kind: str, batch: int, checkpointing: bool) -> dict:
    """Peak RSS (bytes) after two training steps of ``kind`` (encoder, unet, or lora: step 3 through a
    rank-8 adapter on the attention projections) at ``batch``."""
    import torch

    from raysd.config import TrainStepConfig
    from raysd.core.diffusion_trainer import DiffusionTrainer, TrainData, TrainerConfig
    from raysd.core.lora import LoraSpec, add_lora
    from raysd.core.models import ClassEncoder
    from raysd.core.models.diffusion import NoiseSchedule, build_random

    torch.set_num_threads(2)
    base = build_random("random:sd2-base", 128)
    base.vae = None
    if checkpointing:
        base.unet.enable_gradient_checkpointing()
    if kind == "lora":
        add_lora(base.unet, LoraSpec(8, 8.0))
    enc = ClassEncoder(10, 77, 1024)
    n = 2 * batch
    data = TrainData(labels=torch.arange(n) % 10, mean=torch.randn(n, 4, 16, 16), logvar=torch.zeros(n, 4, 16, 16))
    step = TrainStepConfig(epochs=1, global_batch_size=batch, lr=1e-5, steps_per_epoch=2)
    trainer = DiffusionTrainer(TrainerConfig(kind="unet" if kind == "lora" else kind, step=step,
                                             schedule=NoiseSchedule(), scaling_factor=0.18215, adapter=kind == "lora"),
                               unet=base.unet, encoder=enc, data=data, device=torch.device("cpu"))
    trainer.run_epoch(1)
    params = {"unet": sum(p.numel() for n, p in base.unet.named_parameters() if "lora_" not in n),
              "encoder": sum(p.numel() for p in enc.parameters()),
              "adapter": sum(p.numel() for n, p in base.unet.named_parameters() if "lora_" in n)}
    return {"kind": kind, "batch": batch, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **params}


def one_classifier(variant: str, side: int, batch: int) -> dict:
    """Growth of the peak RSS (bytes) over one CAS epoch of ``variant`` on ``side`` px images at
    ``batch``, fp32 on the CPU: model, optimizer, best-weights copy and one batch's activations
    (the images are allocated before the baseline: they are counted apart)."""
    import numpy as np
    import torch

    from raysd.config import CasConfig
    from raysd.core.cas import CasTrainer

    def status(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    torch.set_num_threads(2)
    n = max(batch, 512)
    x = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = status("VmRSS:")
    CasTrainer((x, y), (x[:64], y[:64]), 10, cfg=CasConfig(variant=variant, batch_size=batch, max_epochs=1),
               device="cpu", precision="fp32").train_epoch()
    return {"variant": variant, "side": side, "batch": batch, "peak": status("VmHWM:") - base}


def classifier_table() -> None:
    from raysd.core import memory

    rows = []
    for variant in ("paper", "standard"):
        for side, batch in ((32, 32), (32, 128), (64, 128)):
            out = subprocess.run([sys.executable, __file__, "--one-classifier", variant, str(side), str(batch)],
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            est = memory.classifier_need(variant, side=side, batch=batch, images=0, half=False)
            rows.append([variant, side, batch, f"{m['peak'] / 2**20:.0f}", f"{est / 2**20:.0f}"])
    print(table("CAS classifier, one epoch, fp32, CPU: growth of the peak RSS (the images apart)",
                ["variant", "px", "batch", "measured MB", "estimate MB"], rows))


def measure(kind: str, batch: int, checkpointing: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", kind, str(batch)] + (["--ckpt"] if checkpointing else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "BATCH"))
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--classifier", action="store_true", help="measure the CAS classifier instead")
    ap.add_argument("--one-classifier", nargs=3, metavar=("VARIANT", "SIDE", "BATCH"))
    ap.add_argument("--batches", type=int, nargs=2, default=[1, 4])
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.ckpt)))
        return
    if args.one_classifier:
        print(json.dumps(one_classifier(args.one_classifier[0], *map(int, args.one_classifier[1:]))))
        return
    if args.classifier:
        classifier_table()
        return
    from raysd.core import memory

    rows = []
    for kind in ("encoder", "unet", "lora"):
        lo, hi = (measure(kind, b) for b in args.batches)
        per_sample = (hi["peak"] - lo["peak"]) / (hi["batch"] - lo["batch"])
        est = {b["batch"]: memory.PROCESS_BYTES + memory.training_need(
            "unet" if kind == "lora" else kind, unet_params=b["unet"], encoder_params=b["encoder"], latent_side=16,
            batch=b["batch"], bf16=False, adapter_params=b["adapter"]).bytes for b in (lo, hi)}
        for b in (lo, hi):
            rows.append([kind, b["batch"], f"{b['peak'] / GB:.2f}", f"{est[b['batch']] / GB:.2f}",
                         f"{per_sample / 2**20:.0f}", f"{per_sample / (b['unet'] * 256):.2e}"])
    print(table("peak host memory of a training step, SD2-base at 16x16 latents, fp32, CPU (estimate: the worker's, "
                "with its process)", ["step", "batch", "measured GB", "estimate GB", "activations MB/sample",
                                      "bytes/param/pixel"], rows))
    gpu = []
    for kind, batch in (("encoder", 64), ("unet", 16), ("lora", 16)):
        for opts in ({}, {"checkpointing": True}, {"optimizer": "adamw_8bit"}, {"frozen_bf16": True}):
            if (kind != "unet" and "optimizer" in opts) or (kind != "encoder" and "frozen_bf16" in opts):
                continue
            need = memory.training_need("unet" if kind == "lora" else kind, unet_params=lo["unet"],
                                        encoder_params=lo["encoder"], latent_side=16, batch=batch, bf16=True,
                                        adapter_params=lo["adapter"] if kind == "lora" else 0, **opts)
            gpu.append([kind, batch, ", ".join(f"{k}" for k in opts) or "paper settings (bf16 autocast)",
                        f"{need.gb():.1f}"])
    print()
    print(table("GPU memory per worker at the paper's batch sizes (estimate from the measured constants)",
                ["step", "batch", "settings", "GB"], gpu))


if __name__ == "__main__":
    main()
