"""Which numeric precision each kind of work runs in, from ``model.precision`` and the device.

One rule for the three kinds of work (DESIGN section 5; the released code ran everything in fp32):

- ``fp32``: fp32 everywhere (the released numerics).
- ``auto`` / ``bf16``: bf16 on CUDA for generation (bf16 weights), the classifier and diffusion
  training (autocast). On a CPU with native bf16 arithmetic (AVX512-BF16 or AMX, as oneDNN
  reports it) bf16 for generation and the classifier, where it measured 1.8x and 1.25x faster on
  a 2-core EPYC (``benchmarks/cpu_precision.py``), and fp32 for diffusion training, where it
  measured 1.07x only. Other CPUs: fp32, since bf16 is emulated there, slower and less exact.
- ``fp16``: as bf16 but fp16 on CUDA; fp32 on any CPU.

``RAYSD_CPU_BF16=0`` (or ``1``) overrides the CPU detection, e.g. to compare the two paths.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def _detected_cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (``RAYSD_CPU_BF16`` overrides)."""
    forced = os.environ.get("RAYSD_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _detected_cpu_bf16()


def _half(precision: str, device: torch.device | str, *, cpu_ok: bool) -> torch.dtype | None:
    dev = torch.device(device)
    if precision == "fp32":
        return None
    if dev.type == "cuda":
        return torch.float16 if precision == "fp16" else torch.bfloat16
    if cpu_ok and precision in ("auto", "bf16") and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def weights_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype generation's models (UNet, VAE, Class-Encoder) are cast to."""
    return _half(precision, device, cpu_ok=True) or torch.float32


def classifier_autocast(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The CAS classifier's autocast dtype; None: fp32."""
    return _half(precision, device, cpu_ok=True)


def training_autocast(precision: str, device: torch.device | str) -> torch.dtype | None:
    """Diffusion training's (steps 1 and 3, pretraining) autocast dtype; None: fp32. CUDA only."""
    return _half(precision, device, cpu_ok=False)


def describe(precision: str, device: torch.device | str) -> str:
    """One phrase for logs and the report, e.g. 'generation bf16, classifier bf16, training fp32 (cpu)'."""
    name = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return (f"generation {name[weights_dtype(precision, device)]}, classifier "
            f"{name[classifier_autocast(precision, device)]}, training {name[training_autocast(precision, device)]} "
            f"({torch.device(device).type})")
