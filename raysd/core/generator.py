"""A trained generator: the base model with a Class-Encoder (and possibly a fine-tuned UNet) and
the sampler settings that make its images. Loading it from checkpoints is data I/O
(:func:`raysd.data.models.load_generator`); this module is the maths and the settings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from raysd.config import CasConfig
from raysd.core.cas import CasResult, train_and_evaluate
from raysd.core.models.class_encoder import ClassEncoder
from raysd.core.models.diffusion import BaseModel, NoiseSchedule
from raysd.core.plan import class_counts, make_plan
from raysd.core.sampling import SamplerParams, generate
from raysd.errors import RaysdError


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything that decides a generated image besides its label and sample_id (hashable)."""

    base: str  # base model spec: hub id, directory, tiny
    resolution: int
    encoder_dir: str  # checkpoints/encoder/epoch_NNN
    unet_dir: str | None  # checkpoints/unet/epoch_NNN, or None for the base UNet
    out_size: tuple[int, int]  # classifier resolution (H, W)
    num_inference_steps: int
    guidance_scale: float
    scheduler: str = "ddim"
    precision: str = "auto"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    seed: int = 0  # run seed: sample i's noise comes from (seed, i)
    compile: bool = False  # fast paths (DESIGN section 5): same images within fp tolerance
    fuse_qkv: bool = False
    tiny_decoder: str | None = None  # AutoencoderTiny instead of the VAE decoder (an option)

    def params(self) -> SamplerParams:
        return SamplerParams(self.num_inference_steps, self.guidance_scale, self.scheduler)  # type: ignore[arg-type]

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.beta_start, self.beta_end, self.num_train_timesteps, self.prediction_type)

    def model_key(self) -> tuple:
        """The fields that decide the loaded models (not IS/UGS): many search trials share them."""
        return (self.base, self.resolution, self.encoder_dir, self.unet_dir, self.precision, self.seed, self.compile,
                self.fuse_qkv, self.tiny_decoder)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generator:
    """Loaded models for a spec, on one device."""

    base: BaseModel
    encoder: ClassEncoder
    spec: GeneratorSpec

    def images(self, labels: np.ndarray, seeds: np.ndarray, *, batch_size: int = 256, full_size: int | None = None,
               progress: Callable[[int], None] | None = None) -> Any:
        """uint8 (N, H, W, 3) at the classifier's size (and at ``full_size`` too, when given).

        With ``compile`` every batch is padded to ``batch_size``: one static shape, one compilation."""
        s = self.spec
        return generate(self.base, self.encoder, labels, seeds, s.params(), s.schedule(), out_size=s.out_size,
                        batch_size=batch_size, progress=progress, full_size=full_size,
                        pad_to=batch_size if s.compile else None)

    def with_spec(self, spec: GeneratorSpec) -> "Generator":
        return Generator(self.base, self.encoder, spec)


def generated_cas(gen: Generator, num_images: int, balance: str, real_counts: list[int], val: Any, test: Any,
                  num_classes: int, *, cas: CasConfig, seed: int, device: str, precision: str,
                  batch_size: int) -> tuple[CasResult, float]:
    """CAS of ``num_images`` images the generator draws for the run's plan (``seed``): the classifier
    trained on them, scored on ``test``; with the seconds generation took."""
    plan = make_plan(num_images, class_counts(num_images, num_classes, balance, real_counts), seed)
    t0 = time.perf_counter()
    images = gen.images(plan.labels, plan.seeds, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    result = train_and_evaluate((images, plan.labels), val, test, num_classes, cfg=cas, seed=seed, device=device,
                                precision=precision)
    return result, seconds


def apply_fast_paths(model: BaseModel, *, compile: bool, fuse_qkv: bool) -> BaseModel:
    """Fused Q/K/V projections and ``torch.compile`` of the UNet and the VAE decoder, in place.

    Compiled with static shapes: callers pad every batch to one size (``Generator.images``),
    so each process compiles once per shape (two: the guided and the shortcut batch) and the
    cost is paid once per generation actor or search worker, not per batch.
    """
    if fuse_qkv:
        if not hasattr(model.unet, "fuse_qkv_projections"):
            raise RaysdError("sampling.fuse_qkv: this diffusers UNet has no fuse_qkv_projections()")
        model.unet.fuse_qkv_projections()
    if compile:
        model.unet = torch.compile(model.unet, dynamic=False)
        if model.tiny_decoder is not None:
            model.tiny_decoder.decoder = torch.compile(model.tiny_decoder.decoder, dynamic=False)
        elif model.vae is not None:
            model.vae.decoder = torch.compile(model.vae.decoder, dynamic=False)
    return model
