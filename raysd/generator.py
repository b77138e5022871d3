"""A trained generator: base model + Class-Encoder checkpoint (+ UNet checkpoint), loaded once.

Ray-free: the generation actors, the search trials and the pipeline all load through
:func:`load_generator`, which caches per process (many search trials share an epoch).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch

from raysd import checkpoints as ck
from raysd.errors import RaysdError
from raysd.sampling import SamplerParams


@dataclass(frozen=True)
class GeneratorSpec:
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
    seed: int = 0  # run seed: sample i's noise comes from (seed, i)
    compile: bool = False  # fast paths (DESIGN section 5): same images within fp tolerance
    fuse_qkv: bool = False
    tiny_decoder: str | None = None  # AutoencoderTiny instead of the VAE decoder (an option)

    def params(self) -> SamplerParams:
        return SamplerParams(self.num_inference_steps, self.guidance_scale, self.scheduler)  # type: ignore[arg-type]

    def schedule(self):
        from raysd.models.diffusion import NoiseSchedule

        return NoiseSchedule(self.beta_start, self.beta_end, self.num_train_timesteps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def provenance(self) -> dict[str, Any]:
        """Parameters plus the checkpoints' weight checksums (what a set's meta.json records)."""
        d = self.to_dict()
        d["encoder_sha256"] = ck.read_meta(self.encoder_dir)["files"][ck.MODEL_FILE]
        d["unet_sha256"] = ck.read_meta(self.unet_dir)["files"][ck.MODEL_FILE] if self.unet_dir else None
        for k in ("encoder_dir", "unet_dir"):
            d[k] = str(d[k]).rsplit("/", 2)[-2:] if d[k] else None  # kind/epoch_NNN, not the machine's path
        return d


def spec_from_dict(d: dict[str, Any]) -> GeneratorSpec:
    d = dict(d)
    d["out_size"] = tuple(d["out_size"])
    return GeneratorSpec(**d)


@functools.lru_cache(maxsize=4)
def _load_cached(base: str, resolution: int, encoder_dir: str, unet_dir: str | None, device: str, precision: str,
                 seed: int, compile: bool = False, fuse_qkv: bool = False, tiny_decoder: str | None = None):
    from raysd.models import ClassEncoder
    from raysd.models.diffusion import load_base_model, resolve_dtype

    dtype = resolve_dtype(precision, device)
    model = load_base_model(base, resolution=resolution, dtype=torch.float32, device="cpu", seed=seed)
    state, meta = ck.load_weights(encoder_dir)
    info = meta.get("class_encoder")
    if not info:
        raise RaysdError(f"checkpoint {encoder_dir} does not describe a Class-Encoder")
    encoder = ClassEncoder(info["num_classes"], info["seq_len"], info["dim"], info["hidden_dim"], info["null_class"])
    encoder.load_state_dict(state)
    if info["dim"] != model.cross_attention_dim:
        raise RaysdError(f"checkpoint {encoder_dir}: Class-Encoder dim {info['dim']} does not match the base UNet's "
                         f"cross_attention_dim {model.cross_attention_dim}")
    if unet_dir:
        ustate, _ = ck.load_weights(unet_dir)
        model.unet.load_state_dict(ustate)
    model.unet.eval()
    model.to(device, dtype)
    if tiny_decoder:
        from raysd.models.diffusion import load_tiny_decoder

        if model.vae is None:
            raise RaysdError("model.tiny_decoder: the base model works in pixel space (no VAE to replace)")
        model.tiny_decoder = load_tiny_decoder(tiny_decoder, latent_channels=model.vae.config.latent_channels,
                                               dtype=dtype, device=device, seed=seed)
    model.unet.to(memory_format=torch.channels_last)  # +16 % UNet forward on a 2-core CPU
    apply_fast_paths(model, compile=compile, fuse_qkv=fuse_qkv)
    return model, encoder.to(device).eval()


def apply_fast_paths(model: Any, *, compile: bool, fuse_qkv: bool) -> Any:
    """Fused Q/K/V projections and ``torch.compile`` of the UNet and the VAE decoder, in place.

    Compiled with static shapes: callers pad every batch to one size (``generate(pad_to=...)``),
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


def load_generator(spec: GeneratorSpec, device: str | torch.device) -> tuple[Any, Any]:
    """(BaseModel, ClassEncoder) on ``device``; cached per process for identical arguments."""
    return _load_cached(spec.base, spec.resolution, spec.encoder_dir, spec.unet_dir, str(device), spec.precision,
                        spec.seed, spec.compile, spec.fuse_qkv, spec.tiny_decoder)


def generate_images(spec: GeneratorSpec, labels, seeds, device: str | torch.device, batch_size: int = 256,
                    progress=None):
    """uint8 images (N, H, W, 3) for ``labels`` with per-sample ``seeds``."""
    from raysd.sampling import generate

    base, encoder = load_generator(spec, device)
    return generate(base, encoder, labels, seeds, spec.params(), spec.schedule(), out_size=spec.out_size,
                    batch_size=batch_size, progress=progress, pad_to=batch_size if spec.compile else None)
