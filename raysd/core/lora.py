"""LoRA on the UNet's attention projections (peft, as diffusers' training scripts use it): the
adapter trained in step 3 with ``finetune.method=lora``, its state alone in the checkpoints (a few
MB instead of a 3.5 GB UNet), and merged into the base UNet's weights to sample (no adapter
layers left at inference, so the sampler runs the plain UNet).

An adapter belongs to the base it was trained on: its checkpoint records that base's identity,
and a base with another one is refused where the adapter is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from raysd.errors import RaysdError

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections (train_text_to_image_lora.py)


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS

    def to_json(self) -> dict[str, Any]:
        return {"method": "lora", **asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LoraSpec":
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))


def add_lora(unet: Any, spec: LoraSpec, seed: int = 0) -> Any:
    """Attach a fresh adapter (seeded Gaussian A, zero B: the UNet's output is unchanged at first);
    afterwards only the adapter's weights require gradients."""
    from peft import LoraConfig

    targets = [n for n, _ in unet.named_modules() if n.endswith(spec.targets)]
    if not targets:
        raise RaysdError(f"finetune.lora_targets {list(spec.targets)}: no module of this UNet ends so")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian",
                                    target_modules=list(spec.targets)))
    return unet


def adapter_state(unet: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights alone (what a LoRA checkpoint stores)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(unet).items()}


def load_adapter(unet: Any, state: dict[str, torch.Tensor]) -> None:
    """Put trained adapter weights back into a UNet that has the adapter (a resumed training)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise RaysdError(f"LoRA adapter weights do not fit this UNet: unexpected {unexpected[:3]}")


def merge_adapter(unet: Any, spec: LoraSpec, state: dict[str, torch.Tensor]) -> Any:
    """The base UNet with a trained adapter merged into its weights, the adapter layers removed."""
    add_lora(unet, spec)
    load_adapter(unet, state)
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return unet
