"""What a stage needs in memory, estimated from the model's size and the settings (no model is
loaded: the preflight, the resources every Ray worker asks for, and out-of-memory messages use
these).

Training a UNet keeps, per trained parameter, its fp32 weight, gradient and AdamW's two moments
(16 bytes; an 8-bit AdamW keeps 2 bytes of moments); a frozen module only its weights (4 bytes,
2 in bf16); every sample of a batch adds its activations. ``ACTIVATION_BYTES_PER_PARAM_PIXEL``
was measured on the CPU with the SD2-base architecture at 16x16 latents (128 px) in fp32
(``benchmarks/memory.py``: 5.7e-4 for step 1, 5.9e-4 for step 3); bf16 autocast is taken to halve it
and gradient checkpointing to keep about a sixth (both unmeasured: no GPU here).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3
MB = 1024**2
# a Ray worker process with torch, diffusers and raysd imported: 0.67 GB idle on the CPU; Ray Data
# measured a demo generation actor (a 1.7 M-parameter model) at up to 1.1 GB, and the SD2-base
# training steps peaked 0.3-0.6 GB above the estimate with 0.75 (benchmarks/memory.py)
PROCESS_BYTES = 1.0 * GB
# the CAS classifier on the CPU (python benchmarks/memory.py --classifier; fp32, Adam, best-weights copy):
# (bytes at batch 0, activation bytes per sample and pixel of the classified image)
CLASSIFIER = {"paper": (575 * MB, 6.5 * 1024), "standard": (225 * MB, 2.1 * 1024)}
HALF_ACTIVATIONS = 0.65  # bf16 autocast's share of the fp32 activations (measured on the CPU, paper variant)
# activation bytes per sample = this x UNet parameters x latent pixels (measured: benchmarks/memory.py)
ACTIVATION_BYTES_PER_PARAM_PIXEL = 5.9e-4
CHECKPOINTING_KEEPS = 1 / 6
# sampling (no gradients): bytes per UNet parameter and latent pixel of each sample of a guided batch
# (two UNet samples per image) and the VAE decode, fp32 (bf16 halves it), and a fixed part; measured
# on the CPU with SD2-base at 16x16 latents: 64 MB per image fp32, 31 MB bf16 (benchmarks/memory.py)
INFERENCE_BYTES_PER_PARAM_PIXEL = 1.5e-4
SAMPLING_BYTES = 160 * 1024**2


@dataclass(frozen=True)
class Need:
    """Bytes a stage needs on one worker, and the settings that lower it."""

    stage: str
    bytes: float
    lower: str  # e.g. "--set finetune.gradient_checkpointing=true"

    def gb(self) -> float:
        return self.bytes / GB


def activation_bytes(unet_params: int, latent_side: int, batch: int, *, bf16: bool, checkpointing: bool) -> float:
    per_sample = ACTIVATION_BYTES_PER_PARAM_PIXEL * unet_params * latent_side**2
    return batch * per_sample * (0.5 if bf16 else 1.0) * (CHECKPOINTING_KEEPS if checkpointing else 1.0)


def training_need(kind: str, *, unet_params: int, encoder_params: int, latent_side: int, batch: int, bf16: bool,
                  checkpointing: bool = False, optimizer: str = "adamw", frozen_bf16: bool = False,
                  adapter_params: int = 0) -> Need:
    """One data-parallel worker of step 1 (``encoder``) or step 3 (``unet``; with ``adapter_params``, a
    LoRA adapter on the frozen UNet) at ``batch`` per worker."""
    moments = 2 if optimizer == "adamw_8bit" else 8
    act = activation_bytes(unet_params, latent_side, batch, bf16=bf16, checkpointing=checkpointing)
    if kind == "encoder":  # the UNet frozen (gradients flow through it to the context), the encoder trained
        total = unet_params * (2 if frozen_bf16 else 4) + encoder_params * (8 + moments) + act
        lower = ("--set encoder.gradient_checkpointing=true, --set model.frozen_dtype=bf16 (CUDA) or a smaller "
                 "encoder.global_batch_size")
    elif adapter_params:  # the UNet frozen, its adapter trained (the gradients flow through the UNet as in step 1)
        total = unet_params * 4 + adapter_params * (8 + moments) + encoder_params * 4 + act
        lower = "--set finetune.gradient_checkpointing=true or a smaller finetune.global_batch_size"
    else:  # the UNet trained, the encoder frozen
        total = unet_params * (8 + moments) + encoder_params * 4 + act
        lower = ("--set finetune.gradient_checkpointing=true, --set finetune.optimizer=adamw_8bit (CUDA, needs "
                 "bitsandbytes) or a smaller finetune.global_batch_size")
    return Need("train_encoder" if kind == "encoder" else "finetune", total, lower)


def sampling_need(*, unet_params: int, vae_params: int, latent_side: int, batch: int, guided: bool,
                  half: bool) -> Need:
    """A generation actor or search trial: weights and one guided batch's activations (no gradients)."""
    weights = (unet_params + vae_params) * (2 if half else 4)
    act = activation_bytes(unet_params, latent_side, batch * (2 if guided else 1), bf16=half, checkpointing=False) / 3
    return Need("generate", weights + act, "a smaller --set sampling.batch_size")


def classifier_need(variant: str, *, side: int, batch: int, images: int, half: bool) -> float:
    """A CAS classifier: its model, optimizer and best weights, one batch's activations, and the
    images it trains and is scored on (uint8, on the device)."""
    const, per_pixel = CLASSIFIER.get(variant, CLASSIFIER["paper"])
    return const + batch * per_pixel * side * side * (HALF_ACTIVATIONS if half else 1.0) + images * side * side * 3


@dataclass(frozen=True)
class GeneratorNeed:
    """A loaded generator: the peak while loading (fp32 weights, before the cast to half) and what it
    holds afterwards while sampling (its weights and one guided batch's activations)."""

    load: float
    sampling: float


def generator_need(*, unet_params: int, vae_params: int, latent_side: int, batch: int, half: bool,
                   adapter: bool = False) -> GeneratorNeed:
    """The generator of a trial or a generation actor. A fine-tuned UNet's weights take the place of
    the base's (never both); a LoRA adapter is merged into the base's (the adapter is small)."""
    load = (unet_params + vae_params) * 4 * (1.02 if adapter else 1.0)
    weights = (unet_params + vae_params) * (2 if half else 4)
    act = SAMPLING_BYTES + 2 * batch * INFERENCE_BYTES_PER_PARAM_PIXEL * unet_params * latent_side**2 * (
        0.5 if half else 1.0)
    return GeneratorNeed(load=load, sampling=weights + act)


def process_need(*parts: float) -> float:
    """One worker process: its fixed share plus the largest of the phases it goes through."""
    return PROCESS_BYTES + max(parts)


def per_device(capacity: float, need: float, headroom: float = 0.9) -> int:
    """How many workers of ``need`` fit in ``capacity`` (keeping a tenth free for what estimates miss)."""
    return int(capacity * headroom // need) if need > 0 else 1


def lora_params(unet_params: int, rank: int) -> int:
    """About how many weights a LoRA adapter of ``rank`` on the attention projections has (SD2-base: 1.66 M
    at rank 8, 0.19 % of the UNet; counted in a checkpoint)."""
    return int(unet_params * 0.00024 * rank)
