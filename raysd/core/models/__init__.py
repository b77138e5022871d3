"""Models: the Class-Encoder, the two ResNet20 variants, the diffusion base (SD or tiny).

Public API (DESIGN.md section 4): ``ClassEncoder(num_classes, seq_len, dim)`` and
``resnet20(num_classes, variant="paper"|"standard")``. Nothing here imports training code.
"""

from raysd.core.models.class_encoder import ClassEncoder
from raysd.core.models.resnet import resnet20

__all__ = ["ClassEncoder", "resnet20"]
