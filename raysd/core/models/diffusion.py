"""The diffusion base: SD's UNet and VAE (diffusers modules), the noise schedule, and builders of
the random-weight models (``tiny``, ``tiny-vae``, ``random:sd2-base``, ``random:sd-v1``).

Only ``UNet2DConditionModel``, ``AutoencoderKL`` and the noise schedule are used; the text
encoder and tokenizer are never loaded (the Class-Encoder replaces them). Without a VAE the UNet
works on pixels in [-1, 1] directly. Loading weights from a hub id or a directory is data I/O:
:mod:`raysd.data.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

TINY = ("tiny", "tiny-vae")
# The real architectures with random weights (timing and memory checks; no download needed).
RANDOM = ("random:sd2-base", "random:sd-v1")


@dataclass
class NoiseSchedule:
    """DDPM schedule (SD's): scaled_linear betas; the UNet predicts the noise (``epsilon``) or
    ``v_prediction`` (v = sqrt(abar) eps - sqrt(1 - abar) x0, as SD 2's 768-px models)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"

    def target(self, x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
        return eps if self.prediction_type == "epsilon" else abar.sqrt() * eps - (1.0 - abar).sqrt() * x0

    def to_epsilon(self, output: torch.Tensor, x_t: torch.Tensor, abar: float) -> torch.Tensor:
        """The noise a UNet output stands for (identity for epsilon prediction)."""
        if self.prediction_type == "epsilon":
            return output
        return abar**0.5 * output + (1.0 - abar) ** 0.5 * x_t

    def betas(self) -> torch.Tensor:
        # scaled_linear: linear in sqrt(beta), as SD and diffusers define it (float64 for accuracy)
        return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps, dtype=torch.float64) ** 2

    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def diffusers_config(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": "scaled_linear", "prediction_type": self.prediction_type}

    def mismatch(self, scheduler_config: dict[str, Any]) -> list[str]:
        """Keys where a base model's ``scheduler_config.json`` disagrees with this schedule."""
        mine = self.diffusers_config()
        out = [k for k in ("num_train_timesteps", "beta_schedule", "prediction_type")
               if k in scheduler_config and scheduler_config[k] != mine[k]]
        return out + [k for k in ("beta_start", "beta_end")
                      if k in scheduler_config and abs(float(scheduler_config[k]) - mine[k]) > 1e-9]


@dataclass
class BaseModel:
    """A UNet (and VAE, unless pixel space) plus what the stages need to know about them."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any | None  # diffusers.AutoencoderKL, None in pixel space
    resolution: int  # pixel size of the images the model sees
    source: str
    tiny_decoder: Any | None = None  # diffusers.AutoencoderTiny decoding in place of the VAE (an option)
    scheduler_config: dict[str, Any] | None = None  # the base's scheduler/scheduler_config.json, when it has one
    batch_limit: int | None = None  # the sampling batch that fitted after a CUDA out-of-memory here (sampling.py)

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


def build_random(spec: str, resolution: int, seed: int = 0,
                 unet_state: dict[str, torch.Tensor] | None = None) -> BaseModel:
    """SD2-base (or SD v1: 768-d context, 8 heads) architecture with random weights; with
    ``unet_state``, the UNet takes those weights instead (never drawn: no second copy in memory).
    The VAE has its own seed stream, so it is the same either way."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = dict(SD2_BASE_UNET_CONFIG)
    if spec == "random:sd-v1":
        cfg.update(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = (UNet2DConditionModel(**cfg) if unet_state is None
                else with_weights(lambda: UNet2DConditionModel(**cfg), unet_state))
        torch.manual_seed(seed + 7919)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    return BaseModel(unet=unet, vae=vae, resolution=resolution, source=spec)


def with_weights(make: Callable[[], Any], state: dict[str, torch.Tensor]) -> Any:
    """The model ``make()`` builds, holding ``state``: built on the meta device, so no weights of
    its own are drawn or allocated before ``state`` takes their place."""
    with torch.device("meta"):
        model = make()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"weights do not fit {type(model).__name__}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    return model
