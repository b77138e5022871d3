"""Image conversions between the classifier's uint8 pixels and the diffusion model's range.

Resizes follow TensorFlow's ``tf.image.resize(method="bilinear")`` (the released code's):
half-pixel centres, no antialiasing, i.e. ``F.interpolate(mode="bilinear",
align_corners=False, antialias=False)``. PIL's BILINEAR antialiases when downsampling and
does not match.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_bilinear(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, *size), TensorFlow bilinear semantics."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


def uint8_to_model(images: torch.Tensor | np.ndarray, resolution: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, R, R) float32 in [-1, 1] at the model's resolution."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.require(images, requirements=["C", "W"]))
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return resize_bilinear(x, resolution)


def model_to_uint8(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> (N, H, W, 3) uint8 at the classifier's resolution.

    Resizing happens in float before quantisation (one rounding, as the released code).
    """
    x = resize_bilinear(x.float(), size)
    x = ((x.clamp(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def upsample_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, size, size, 3) uint8 with the same resize semantics."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = resize_bilinear(x, size).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()
