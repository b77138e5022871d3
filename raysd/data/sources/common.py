"""What every dataset source shares: the in-memory dataset (uint8 arrays per split), the checks
every stage relies on, a seeded stratified split, npz reading and checksum-verified downloads."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raysd.errors import RaysdError

SPLITS = ("train", "val", "test")
MAX_SIDE = 1024  # larger images are refused: the classifier works at 28-64 px
LOADER_VERSION = 1  # bump when a split rule changes (part of the provenance fingerprint)


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64


@dataclass
class RealDataset:
    name: str
    class_names: list[str]
    splits: dict[str, Split]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"].images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Identity of the content: same name, classes, sources and split rule -> same value."""
        h = hashlib.sha256()
        h.update(repr((self.name, self.class_names, sorted(self.provenance.get("sources", {}).items()),
                       self.provenance.get("split_rule"), LOADER_VERSION)).encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Validation shared by every loader


def as_images(x: np.ndarray, where: str) -> np.ndarray:
    """Any supported pixel array -> (N, H, W, 3) uint8, or one clear error naming ``where``."""
    x = np.asarray(x)
    if x.dtype == object or x.dtype.kind not in "uif":
        raise RaysdError(f"{where}: images must be numeric arrays, got dtype {x.dtype}")
    if x.ndim == 3:  # (N, H, W) grey
        x = x[..., None]
    if x.ndim != 4:
        raise RaysdError(f"{where}: images must have shape (N, H, W) or (N, H, W, C); got {x.shape}")
    n, h, w, c = x.shape
    if c not in (1, 3):
        raise RaysdError(f"{where}: images must have 1 or 3 channels (last axis); got shape {x.shape}")
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise RaysdError(f"{where}: image size {h}x{w} is outside 1..{MAX_SIDE} px; resize the images first")
    if x.dtype.kind == "f":
        if n and not np.isfinite(x).all():
            raise RaysdError(f"{where}: float images contain NaN or infinite values")
        if n and (x.min() < 0.0 or x.max() > 1.0):
            raise RaysdError(f"{where}: float images must lie in [0, 1]; found [{x.min():g}, {x.max():g}] "
                             "(store uint8 0..255 instead)")
        x = np.rint(x * 255.0)
    elif x.dtype != np.uint8 and n and (x.min() < 0 or x.max() > 255):
        raise RaysdError(f"{where}: integer pixels must lie in 0..255; found [{x.min()}, {x.max()}]")
    x = x.astype(np.uint8, copy=False)
    if c == 1:
        x = np.repeat(x, 3, axis=3)
    return np.ascontiguousarray(x)


def as_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise RaysdError(f"{where}: labels must have shape (N,) or (N, 1); got {y.shape} "
                         "(multi-label data is not supported)")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.rint(y)).all()):
            raise RaysdError(f"{where}: labels must be whole numbers")
    elif y.dtype.kind not in "iu":
        raise RaysdError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if len(y) != n:
        raise RaysdError(f"{where}: {n} images but {len(y)} labels")
    return y.astype(np.int64)


def validate(ds: RealDataset) -> RealDataset:
    """Check the rules every stage relies on; return ``ds`` unchanged."""
    where = f"dataset {ds.name}"
    missing = [s for s in SPLITS if s not in ds.splits]
    if missing:
        raise RaysdError(f"{where}: missing split(s) {missing}")
    c = ds.num_classes
    if c < 2:
        raise RaysdError(f"{where}: needs at least 2 classes, found {c}")
    shape = ds.image_shape
    for s in SPLITS:
        sp = ds.splits[s]
        if len(sp.labels) == 0:
            raise RaysdError(f"{where}: the {s} split is empty")
        if sp.images.shape[1:] != shape:
            raise RaysdError(f"{where}: {s} images are {sp.images.shape[1:]}, train images are {shape}")
        lo, hi = int(sp.labels.min()), int(sp.labels.max())
        if lo < 0 or hi >= c:
            raise RaysdError(f"{where}: {s} labels must lie in 0..{c - 1} ({c} classes); found {lo}..{hi}")
    counts = np.bincount(ds.splits["train"].labels, minlength=c)
    empty = [ds.class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise RaysdError(f"{where}: class(es) {empty} have no training images")
    single = [ds.class_names[i] for i in np.flatnonzero(counts == 1)]
    if single:  # nothing to learn a class-conditional distribution from, nor to stratify
        raise RaysdError(f"{where}: class(es) {single} have a single training image; each class needs at least 2")
    return ds


# --------------------------------------------------------------------------------------------
# Helpers


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Index arrays, one per fraction, each class divided in those proportions (seeded)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.floor(np.cumsum(fractions)[:-1] * len(idx) + 0.5).astype(int)
        for i, chunk in enumerate(np.split(idx, bounds)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def load_npz(path: Path, where: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise RaysdError(f"{where}: file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise RaysdError(f"{where}: {path} is not a readable npz file ({type(e).__name__}: {e}); "
                         "it may be truncated or corrupt") from None


def split_from(images: np.ndarray, labels: np.ndarray, where: str) -> Split:
    x = as_images(images, f"{where} images")
    return Split(x, as_labels(labels, len(x), f"{where} labels"))


def fetch(url: str, root: Path, filename: str, md5: str, name: str, expected: Path, extract: bool = False) -> None:
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    try:
        root.mkdir(parents=True, exist_ok=True)
        if extract:
            download_and_extract_archive(url, str(root), filename=filename, md5=md5)
        else:
            download_url(url, str(root), filename=filename, md5=md5)
    except Exception as e:  # URLError, HTTPError, RuntimeError on a bad checksum
        raise RaysdError(f"dataset {name}: {expected} not found and the download from {url} failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"put the files at {expected} or pass --data-dir") from None
    if not expected.exists():
        raise RaysdError(f"dataset {name}: download finished but {expected} is still missing")
