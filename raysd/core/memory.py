"""What a stage needs in memory, estimated from the model's size and the settings (no model is
loaded: preflight checks and out-of-memory messages use these).

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
# activation bytes per sample = this x UNet parameters x latent pixels (measured: benchmarks/memory.py)
ACTIVATION_BYTES_PER_PARAM_PIXEL = 5.9e-4
CHECKPOINTING_KEEPS = 1 / 6


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
                  checkpointing: bool = False, optimizer: str = "adamw", frozen_bf16: bool = False) -> Need:
    """One data-parallel worker of step 1 (``encoder``) or step 3 (``unet``) at ``batch`` per worker."""
    moments = 2 if optimizer == "adamw_8bit" else 8
    act = activation_bytes(unet_params, latent_side, batch, bf16=bf16, checkpointing=checkpointing)
    if kind == "encoder":  # the UNet frozen (gradients flow through it to the context), the encoder trained
        total = unet_params * (2 if frozen_bf16 else 4) + encoder_params * (8 + moments) + act
        lower = ("--set encoder.gradient_checkpointing=true, --set model.frozen_dtype=bf16 (CUDA) or a smaller "
                 "encoder.global_batch_size")
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
