"""The Class-Encoder that replaces SD's text encoder (paper, section 2).

one-hot (B, C) -> Linear(C, 500, bias) -> Linear(500, L*D, no bias) -> (B, L, D), no
activations. D is the UNet's ``cross_attention_dim``; L the context length. Its output goes to
the UNet as ``encoder_hidden_states``. The unconditional context for guidance is the encoder
applied to the all-zero vector (the paper's behaviour), or, with ``null_class=True``, a learned
extra class that training substitutes for the label with probability ``label_dropout``
(classifier-free-guidance training, which the paper lacks).
"""

from __future__ import annotations

import torch
from torch import nn


class ClassEncoder(nn.Module):
    """Class label -> cross-attention context of shape (seq_len, dim)."""

    def __init__(self, num_classes: int, seq_len: int, dim: int, hidden_dim: int = 500, null_class: bool = False):
        super().__init__()
        if num_classes < 1 or seq_len < 1 or dim < 1 or hidden_dim < 1:
            raise ValueError(f"ClassEncoder: sizes must be >= 1, got C={num_classes} L={seq_len} D={dim} H={hidden_dim}")
        self.num_classes = num_classes
        self.seq_len = seq_len
        self.dim = dim
        self.null_class = null_class
        in_features = num_classes + (1 if null_class else 0)
        self.fc1 = nn.Linear(in_features, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, seq_len * dim, bias=False)

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        """(B, in_features) float -> (B, seq_len, dim)."""
        return self.fc2(self.fc1(onehot)).view(-1, self.seq_len, self.dim)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(labels.long(), self.in_features).to(self.fc1.weight.dtype)

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) int class indices -> (B, seq_len, dim)."""
        return self(self.one_hot(labels))

    def uncond_input(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The unconditional input: the zero vector, or the null class's one-hot."""
        x = torch.zeros(batch, self.in_features, device=device or self.fc1.weight.device, dtype=self.fc1.weight.dtype)
        if self.null_class:
            x[:, self.num_classes] = 1.0
        return x

    def uncond(self, batch: int = 1) -> torch.Tensor:
        """(batch, seq_len, dim) unconditional context."""
        return self(self.uncond_input(batch))

    def training_input(self, labels: torch.Tensor, label_dropout: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """One-hot inputs for a training step; with a null class, labels dropped to it at random."""
        if self.null_class and label_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device) < label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.one_hot(labels)
