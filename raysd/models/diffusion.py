"""The diffusion base: SD's UNet and VAE from diffusers, or a built-in tiny model.

Only ``UNet2DConditionModel``, ``AutoencoderKL`` and the noise schedule are used; the text
encoder and tokenizer are never loaded (the Class-Encoder replaces them). A base is given as a
hub id (``stabilityai/stable-diffusion-2-base``), a local diffusers directory (``unet/``,
optional ``vae/``), or ``tiny`` (pixel space, no VAE) / ``tiny-vae`` (a small latent model) for
tests and the offline demo. Without a VAE the UNet works on pixels in [-1, 1] directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raysd.errors import RaysdError

TINY = ("tiny", "tiny-vae")
# The real architectures with random weights (timing and memory checks; no download needed).
RANDOM = ("random:sd2-base", "random:sd-v1")
BASE_META = "raysd_base.json"


@dataclass
class NoiseSchedule:
    """DDPM training schedule (SD's): scaled_linear betas, epsilon prediction."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def betas(self) -> torch.Tensor:
        # scaled_linear: linear in sqrt(beta), as SD and diffusers define it (float64 for accuracy)
        return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps, dtype=torch.float64) ** 2

    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def diffusers_config(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


@dataclass
class BaseModel:
    """A UNet (and VAE, unless pixel space) plus what the stages need to know about them."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any | None  # diffusers.AutoencoderKL, None in pixel space
    resolution: int  # pixel size of the images the model sees
    source: str
    tiny_decoder: Any | None = None  # diffusers.AutoencoderTiny decoding in place of the VAE (an option)

    @property
    def cross_attention_dim(self) -> int:
        d = self.unet.config.cross_attention_dim
        return int(d[0] if isinstance(d, (list, tuple)) else d)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = int(self.unet.config.in_channels)
        if self.vae is None:
            return (c, self.resolution, self.resolution)
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (c, self.resolution // down, self.resolution // down)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BaseModel":
        if dtype == self.unet.dtype:
            dtype = None  # diffusers warns on every dtype cast, also a no-op one
        for m in (self.unet, self.vae):
            if m is not None:
                m.to(device=device, dtype=dtype) if dtype is not None else m.to(device=device)
        return self

    @torch.no_grad()
    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (N, 3, R, R) -> posterior (mean, logvar) of the latents (unscaled).

        Pixel space: mean = x, logvar = -inf (a point mass, so sampling returns x exactly).
        """
        if self.vae is None:
            return x, torch.full_like(x, float("-inf"))
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.logvar.float()

    def sample_latents(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents from a cached posterior and scale them (x scaling_factor, SD: 0.18215)."""
        if self.vae is None:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
        return (mean + std * noise.to(mean.device)) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32)."""
        if self.tiny_decoder is not None:  # TAESD reads SD's scaled latents as they are
            return self.tiny_decoder.decode(latents.to(self.tiny_decoder.dtype)).sample.float().clamp(-1, 1)
        if self.vae is None:
            return latents.float()
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample.float()


# --------------------------------------------------------------------------------------------
# Tiny models (random init) for tests and the offline demo


def tiny_unet_config(in_channels: int, sample_size: int, cross_attention_dim: int = 32) -> dict[str, Any]:
    """About 1.7M parameters in pixel space: no cross-attention at full resolution (2x faster)."""
    return dict(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_vae_config() -> dict[str, Any]:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)


def build_tiny(kind: str, resolution: int, seed: int = 0) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):  # random init must not touch the caller's RNG state
        torch.manual_seed(seed)
        if kind == "tiny":
            unet = UNet2DConditionModel(**tiny_unet_config(3, resolution))
            vae = None
        else:
            vae = AutoencoderKL(**tiny_vae_config())
            unet = UNet2DConditionModel(**tiny_unet_config(4, resolution // 2))
    return BaseModel(unet=unet, vae=vae, resolution=resolution, source=kind)


SD2_BASE_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)


def build_random(spec: str, resolution: int, seed: int = 0) -> BaseModel:
    """SD2-base (or SD v1: 768-d context, 8 heads) architecture with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = dict(SD2_BASE_UNET_CONFIG)
    if spec == "random:sd-v1":
        cfg.update(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = UNet2DConditionModel(**cfg), AutoencoderKL(**SD_VAE_CONFIG)
    return BaseModel(unet=unet, vae=vae, resolution=resolution, source=spec)


# --------------------------------------------------------------------------------------------
# Loading and saving


def is_local_model_dir(spec: str) -> bool:
    return (Path(spec).expanduser() / "unet" / "config.json").is_file()


def load_base_model(spec: str, *, resolution: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", seed: int = 0) -> BaseModel:
    """Load (or build, for ``tiny``) the base model; one clear error when it is unavailable."""
    if spec in TINY:
        return build_tiny(spec, resolution, seed).to(device, dtype)
    if spec in RANDOM:
        return build_random(spec, resolution, seed).to(device, dtype)
    local = Path(spec).expanduser()
    if local.exists() and not is_local_model_dir(spec):
        raise RaysdError(f"base model {spec}: directory exists but has no unet/config.json "
                         "(expected a diffusers layout: unet/, vae/, scheduler/)")
    base = _load_diffusers(str(local) if local.exists() else spec, resolution, dtype)
    return base.to(device)


def _load_diffusers(spec: str, resolution: int, dtype: torch.dtype) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available

    is_dir = os.path.isdir(spec)
    lean = {"low_cpu_mem_usage": is_accelerate_available()}  # without accelerate: no warning per load
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if is_dir and (Path(spec) / BASE_META).is_file():  # written by raysd: its checksums are checked first
        problems = verify_base_dir(spec)
        if problems:
            raise RaysdError(f"base model {problems[0]}")
    try:
        unet = UNet2DConditionModel.from_pretrained(spec, subfolder="unet", torch_dtype=dtype, local_files_only=offline,
                                                    **lean)
        vae = None
        if not is_dir or (Path(spec) / "vae" / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(spec, subfolder="vae", torch_dtype=dtype, local_files_only=offline,
                                                **lean)
    except Exception as e:  # OSError / EnvironmentError / hub HTTP and connection errors
        if is_dir:
            raise RaysdError(f"base model {spec}: cannot load the diffusers weights ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
        raise RaysdError(
            f"base model {spec!r} is not available: not in the local Hugging Face cache and the hub could not "
            f"be reached ({type(e).__name__}). Where there is internet, run `hf download {spec} --include "
            f"'unet/*' 'vae/*' 'scheduler/*' 'model_index.json' --local-dir DIR` and pass --base-model DIR "
            "(or set HF_HOME to a cache that holds it)"
        ) from None
    meta = Path(spec) / BASE_META
    if is_dir and meta.is_file():
        resolution = int(json.loads(meta.read_text()).get("resolution", resolution))
    return BaseModel(unet=unet, vae=vae, resolution=resolution, source=spec)


def load_tiny_decoder(spec: str, *, latent_channels: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", seed: int = 0) -> Any:
    """An ``AutoencoderTiny`` (TAESD) from a local directory or hub id, or ``random:taesd`` (a
    randomly initialised one of TAESD's shape, for tests); one clear error when unavailable."""
    from diffusers import AutoencoderTiny

    if spec == "random:taesd":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tae = AutoencoderTiny(latent_channels=latent_channels)
    else:
        local = Path(spec).expanduser()
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            tae = AutoencoderTiny.from_pretrained(str(local) if local.exists() else spec, torch_dtype=dtype,
                                                  local_files_only=offline)
        except Exception as e:  # OSError / hub errors
            raise RaysdError(f"tiny decoder {spec!r} is not available ({type(e).__name__}: {_first_line(e)}); "
                             "download it where there is internet (`hf download madebyollin/taesd --local-dir DIR`) "
                             "and set model.tiny_decoder=DIR") from None
    if tae.config.latent_channels != latent_channels:
        raise RaysdError(f"tiny decoder {spec}: {tae.config.latent_channels} latent channels, the base model's VAE "
                         f"has {latent_channels}")
    return tae.to(device, dtype).eval()


def save_base_model(base: BaseModel, directory: str | Path, schedule: NoiseSchedule | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """A diffusers directory (unet/, vae/, scheduler/) that :func:`load_base_model` reads back."""
    d = Path(directory)
    base.unet.save_pretrained(d / "unet", safe_serialization=True)
    if base.vae is not None:
        base.vae.save_pretrained(d / "vae", safe_serialization=True)
    sched = (schedule or NoiseSchedule()).diffusers_config()
    (d / "scheduler").mkdir(parents=True, exist_ok=True)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **sched}, indent=2))
    from raysd.storage import sha256_file

    files = {str(f.relative_to(d)): sha256_file(str(f)) for f in sorted(d.rglob("*")) if f.is_file() and f.name != BASE_META}
    (d / BASE_META).write_text(json.dumps({"resolution": base.resolution, "source": base.source, **(extra or {}),
                                           "files": files}, indent=2))


def verify_base_dir(directory: str | Path) -> list[str]:
    """Check the files a raysd-written base directory lists; returns the problems found."""
    from raysd.storage import check_member_name, sha256_file

    d = Path(directory)
    meta = json.loads((d / BASE_META).read_text())
    problems = []
    for rel, sha in (meta.get("files") or {}).items():
        check_member_name(rel, f"base model {d}: {BASE_META}", nested=True)
        f = d / rel
        if not f.is_file():
            problems.append(f"{f}: missing (listed in {BASE_META})")
        elif sha256_file(str(f)) != sha:
            problems.append(f"{f}: damaged (SHA-256 does not match {BASE_META})")
    return problems


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 elsewhere."""
    dev = torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if precision != "fp32" and dev.type != "cuda":
        return torch.float32  # half precision on the CPU is slow and inexact: keep fp32 there
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
