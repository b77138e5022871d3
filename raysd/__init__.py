"""raysd: class-conditional synthetic dataset generation with Stable Diffusion on Ray.

Reimplements Lomurno, D'Oria, Matteucci, "Stable Diffusion Dataset Generation for Downstream
Classification Tasks" (ESANN 2024, arXiv:2405.02698). Importing the package does no work: no
Ray, no torch, no directories, no logging configuration.
"""

__version__ = "0.1.0"

from raysd.errors import RaysdError  # noqa: E402  (light, no dependencies)

__all__ = ["RaysdError", "__version__"]
