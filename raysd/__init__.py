"""raysd: class-conditional synthetic dataset generation with Stable Diffusion on Ray.

Reimplements Lomurno, D'Oria, Matteucci, "Stable Diffusion Dataset Generation for Downstream
Classification Tasks" (ESANN 2024, arXiv:2405.02698). Importing the package does no work: no
Ray, no torch, no directories, no logging configuration. The public API (DESIGN.md section 4)
is imported lazily on first use:

- ``raysd.ClassEncoder(num_classes, seq_len, dim)`` and ``raysd.resnet20(num_classes, variant)``;
- ``raysd.ddim_timesteps(num_inference_steps)``, the released code's DDIM steps;
- ``raysd.train_and_evaluate(train, val, test, num_classes, ...)``, the CAS protocol;
- ``raysd.load_config(preset, ...)`` and ``raysd.run(config)``, the whole pipeline.

Layout: ``core/`` (Ray-free maths), ``data/`` (formats and storage), ``run/`` (the run
directory), ``stages/`` (the only Ray importers), ``config/``, ``pipeline.py``, ``cli.py``.
"""

from __future__ import annotations

import importlib
from typing import Any

from raysd.errors import RaysdError

__version__ = "0.1.0"

_PUBLIC = {
    "ClassEncoder": "raysd.core.models.class_encoder",
    "resnet20": "raysd.core.models.resnet",
    "ddim_timesteps": "raysd.core.schedulers",
    "train_and_evaluate": "raysd.core.cas",
    "load_config": "raysd.config.loading",
    "run": "raysd.pipeline",
}

__all__ = ["RaysdError", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'raysd' has no attribute {name!r}")
