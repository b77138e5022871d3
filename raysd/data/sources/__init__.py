"""Real datasets: a registry of loaders, one module per family, each returning validated uint8
arrays per split (:class:`RealDataset`). The prepare stage writes them as canonical Parquet sets.

Names: ``cifar10``, ``cifar100`` (:mod:`.cifar`), ``pathmnist``, ``dermamnist``, ``bloodmnist``,
``retinamnist`` and ``npz:PATH`` (:mod:`.medmnist`), ``digits`` (:mod:`.digits`, offline) and
``folder:PATH`` (:mod:`.folder`). Splits follow the paper (DESIGN.md section 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from raysd.data.sources.cifar import CIFAR, cifar_loader
from raysd.data.sources.common import SPLITS, RealDataset, Split, as_images, stratified_split, validate
from raysd.data.sources.digits import load_digits_dataset
from raysd.data.sources.folder import read_image_folder
from raysd.data.sources.medmnist import MEDMNIST, medmnist_loader, read_medmnist_npz
from raysd.errors import RaysdError

LOADERS: dict[str, Callable[..., RealDataset]] = {
    **{n: cifar_loader(n) for n in CIFAR},
    **{n: medmnist_loader(n) for n in MEDMNIST},
    "digits": load_digits_dataset,
}


def load_dataset(name: str, data_dir: str | None = None, download: bool = True) -> RealDataset:
    """Load a dataset by name (see the module docstring); every split validated."""
    if name.startswith("npz:"):
        return read_medmnist_npz(Path(name[4:]).expanduser(), name, None)
    if name.startswith("folder:"):
        return validate(read_image_folder(Path(name[7:]).expanduser(), name))
    loader = LOADERS.get(name)
    if loader is None:
        raise RaysdError(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}, or npz:PATH / folder:PATH")
    return loader(data_dir, download)


__all__ = ["LOADERS", "SPLITS", "RealDataset", "Split", "as_images", "load_dataset", "stratified_split", "validate"]
