"""ResNet20 for the Classification Accuracy Score: the paper's variant and He et al.'s.

``paper`` (the released Keras code): stem conv3x3/64 + BN + ReLU; three stages of three
BasicBlocks with 64/128/256 filters, stride 2 at stages 2 and 3; where stride or width change,
the shortcut is a 3x3 max-pool (stride s, TF 'same' padding) then zero channel padding (no 1x1
conv); global average pool; Dense. Exactly the released blocks: convolutions without bias
(``use_bias=False``), He-normal (Keras' truncated normal), TF 'same' padding;
``BatchNormalization(momentum=0.9, epsilon=1e-5)``; a GlorotNormal Dense head. 4,286,026
trainable parameters for 10 classes (Keras' count_params adds the 5,504 BN moving statistics).

``standard`` (He et al. 2016, CIFAR ResNet20): 16/32/64 filters, option-A shortcut
(subsample + zero channel padding), about 0.27M parameters.

Both take 28x28 or 32x32 inputs (any size >= 8) in [0, 1], channels first.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) for one spatial axis."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pads(x.shape[-2], k, s)
    left, right = _same_pads(x.shape[-1], k, s)
    return F.pad(x, (left, right, top, bottom), value=value)


class ConvSame(nn.Conv2d):
    """3x3 convolution with TensorFlow 'same' padding (asymmetric at stride 2)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, bias: bool = True):
        super().__init__(cin, cout, 3, stride=stride, padding=1 if stride == 1 else 0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            x = _pad_same(x, 3, self.stride[0])
        return super().forward(x)


def _released_bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # Keras momentum 0.9 == torch 0.1 (torch weighs the new batch)


def keras_truncated_normal_(w: torch.Tensor, std: float) -> torch.Tensor:
    """Keras' truncated normal initialisers: cut at 2 std, std rescaled so the result has ``std``."""
    std = std / 0.87962566103423978
    return nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)


class _ZeroPadShortcut(nn.Module):
    """Downsample spatially (max-pool or subsample) and zero-pad the channels."""

    def __init__(self, cin: int, cout: int, stride: int, pool: bool):
        super().__init__()
        self.extra, self.stride, self.pool = cout - cin, stride, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = F.max_pool2d(_pad_same(x, 3, self.stride, value=float("-inf")), 3, self.stride)
        elif self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, variant: str):
        super().__init__()
        paper = variant == "paper"
        conv = (lambda a, b, s: ConvSame(a, b, s, bias=False)) if paper else (
            lambda a, b, s: nn.Conv2d(a, b, 3, stride=s, padding=1, bias=False))
        bn = _released_bn if paper else nn.BatchNorm2d
        self.conv1, self.bn1 = conv(cin, cout, stride), bn(cout)
        self.conv2, self.bn2 = conv(cout, cout, 1), bn(cout)
        changed = stride != 1 or cin != cout
        self.shortcut = _ZeroPadShortcut(cin, cout, stride, pool=paper) if changed else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int, variant: Literal["paper", "standard"] = "paper"):
        super().__init__()
        if variant not in ("paper", "standard"):
            raise ValueError(f"resnet20: variant must be 'paper' or 'standard', got {variant!r}")
        widths = (64, 128, 256) if variant == "paper" else (16, 32, 64)
        paper = variant == "paper"
        self.variant = variant
        self.stem = nn.Sequential(
            ConvSame(3, widths[0], 1, bias=False) if paper else nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            _released_bn(widths[0]) if paper else nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks, cin = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(3):
                blocks.append(BasicBlock(cin, w, 2 if (stage > 0 and i == 0) else 1, variant))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        self._init(paper)

    def _init(self, paper: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                if paper:  # Keras HeNormal
                    keras_truncated_normal_(m.weight, math.sqrt(2.0 / fan_in))
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if paper:  # the released Dense: GlorotNormal, zero bias
            keras_truncated_normal_(self.fc.weight, math.sqrt(2.0 / (self.fc.in_features + self.fc.out_features)))
            nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: globally pooled (N, width) features the head classifies."""
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet20(num_classes: int, variant: Literal["paper", "standard"] = "paper") -> ResNet20:
    """ResNet20 for (N, 3, H, W) inputs in [0, 1]; see the module docstring for the variants."""
    return ResNet20(num_classes, variant)
