"""Real datasets: a registry of loaders that return validated uint8 arrays per split.

Names: ``cifar10``, ``cifar100`` (torchvision's on-disk layout), ``pathmnist``, ``dermamnist``,
``bloodmnist``, ``retinamnist`` (MedMNIST npz, 28 x 28), ``digits`` (scikit-learn, offline),
``npz:PATH`` (MedMNIST-style keys) and ``folder:PATH`` (a sub-folder of images per class).
Splits follow the paper (DESIGN.md section 1). Nothing here imports Ray; the ``prepare``
stage writes the result as canonical Parquet sets.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _load_npz(path: Path, where: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise RaysdError(f"{where}: file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise RaysdError(f"{where}: {path} is not a readable npz file ({type(e).__name__}: {e}); "
                         "it may be truncated or corrupt") from None


def _split_from(images: np.ndarray, labels: np.ndarray, where: str) -> Split:
    x = as_images(images, f"{where} images")
    return Split(x, as_labels(labels, len(x), f"{where} labels"))


# --------------------------------------------------------------------------------------------
# MedMNIST-style npz (registered MedMNIST names and npz:PATH)

MEDMNIST = ("pathmnist", "dermamnist", "bloodmnist", "retinamnist")


def read_medmnist_npz(path: Path, name: str, class_names: list[str] | None, seed: int = 0) -> RealDataset:
    """Keys ``{train,val,test}_{images,labels}``; without ``val_*`` a seeded 10 % of train."""
    where = f"dataset {name} ({path})"
    z = _load_npz(path, where)
    required = ["train_images", "train_labels", "test_images", "test_labels"]
    missing = [k for k in required if k not in z]
    if missing:
        raise RaysdError(f"{where}: missing key(s) {missing}; found {sorted(z)}; expected MedMNIST keys "
                         "train_images/train_labels/val_images/val_labels/test_images/test_labels")
    splits = {s: _split_from(z[f"{s}_images"], z[f"{s}_labels"], f"{where} {s}") for s in ("train", "test")}
    rule = "official train/val/test"
    if "val_images" in z and "val_labels" in z:
        splits["val"] = _split_from(z["val_images"], z["val_labels"], f"{where} val")
    else:
        tr = splits["train"]
        keep, val = stratified_split(tr.labels, (0.9, 0.1), seed)
        splits["train"], splits["val"] = Split(tr.images[keep], tr.labels[keep]), Split(tr.images[val], tr.labels[val])
        rule = f"official train/test; val = stratified 10 % of train (seed {seed})"
    if class_names is None and "class_names" in z:
        class_names = [str(c) for c in z["class_names"].tolist()]
    if class_names is None:
        top = max(int(s.labels.max()) for s in splits.values() if len(s.labels))
        class_names = [str(i) for i in range(top + 1)]
    prov = {"sources": {path.name: file_digest(path)}, "split_rule": rule}
    return validate(RealDataset(name, class_names, splits, prov))


def _medmnist_loader(name: str) -> Callable[..., RealDataset]:
    def load(data_dir: str | None, download: bool) -> RealDataset:
        from medmnist import INFO
        from medmnist.info import DEFAULT_ROOT

        info = INFO[name]
        root = Path(data_dir or DEFAULT_ROOT).expanduser()
        path = root / f"{name}.npz"
        if not path.is_file():
            if not download:
                raise RaysdError(f"dataset {name}: {path} not found (download disabled); "
                                 f"place the official {name}.npz there or pass --data-dir")
            _download(info["url"], root, f"{name}.npz", info["MD5"], name, path)
        names = [info["label"][str(i)] for i in range(len(info["label"]))]
        return read_medmnist_npz(path, name, names)

    return load


def _download(url: str, root: Path, filename: str, md5: str, name: str, expected: Path, extract: bool = False) -> None:
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


# --------------------------------------------------------------------------------------------
# CIFAR (torchvision's extracted python layout), read through a restricted unpickler


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches hold dicts of numpy arrays, lists and strings; admit nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def load_cifar_pickle(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        raise RaysdError(f"{where}: {path} not found")
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise RaysdError(f"{where}: {path} is not a valid CIFAR batch ({e})") from None
    if not isinstance(d, dict):
        raise RaysdError(f"{where}: {path} is not a valid CIFAR batch (not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test="test_batch", meta="batches.meta", names_key="label_names", label_key="labels",
                    tv="CIFAR10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test="test", meta="meta",
                     names_key="fine_label_names", label_key="fine_labels", tv="CIFAR100"),
}


def _cifar_split(folder: Path, files: list[str], spec: dict, where: str) -> Split:
    xs, ys = [], []
    for fn in files:
        d = load_cifar_pickle(folder / fn, where)
        if "data" not in d or spec["label_key"] not in d:
            raise RaysdError(f"{where}: {folder / fn} lacks 'data' or '{spec['label_key']}'")
        data = np.asarray(d["data"])
        if data.ndim != 2 or data.shape[1] != 3072:
            raise RaysdError(f"{where}: {folder / fn} data must be (N, 3072); got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[spec["label_key"]]))
    return _split_from(np.concatenate(xs), np.concatenate(ys), f"{where} {files[0]}")


def _cifar_loader(name: str) -> Callable[..., RealDataset]:
    spec = CIFAR[name]

    def load(data_dir: str | None, download: bool) -> RealDataset:
        root = Path(data_dir or "data").expanduser()
        folder = root / spec["folder"]
        where = f"dataset {name}"
        if not folder.is_dir():
            if not download:
                raise RaysdError(f"{where}: {folder} not found (download disabled); extract the python "
                                 f"version of {name} there (torchvision's layout) or pass --data-dir")
            import torchvision.datasets as tvd

            tv = getattr(tvd, spec["tv"])
            _download(tv.url, root, tv.filename, tv.tgz_md5, name, folder, extract=True)
        meta = load_cifar_pickle(folder / spec["meta"], where)
        class_names = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(spec["names_key"], [])]
        full = _cifar_split(folder, spec["train"], spec, where)
        # Paper split: train = first 40,000 official training images, val = last 10,000,
        # i.e. the last fifth in the official order (also for smaller copies used in tests).
        n_val = len(full.labels) // 5
        cut = len(full.labels) - n_val
        splits = {
            "train": Split(full.images[:cut], full.labels[:cut]),
            "val": Split(full.images[cut:], full.labels[cut:]),
            "test": _cifar_split(folder, [spec["test"]], spec, where),
        }
        files = spec["train"] + [spec["test"], spec["meta"]]
        prov = {"sources": {f: file_digest(folder / f) for f in files},
                "split_rule": "train = first 4/5 of the official training order (40,000), val = last 1/5 "
                              "(10,000), test = official test"}
        return validate(RealDataset(name, class_names, splits, prov))

    return load


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled, offline): the demo's dataset


def load_digits_dataset(data_dir: str | None = None, download: bool = True) -> RealDataset:
    """8x8 grey digits (0..16) -> 32x32 RGB uint8; fixed seeded stratified 1077/360/360 split."""
    import sklearn
    from sklearn.datasets import load_digits

    from raysd.imaging import upsample_uint8

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    rgb = upsample_uint8(np.repeat(grey[..., None], 3, axis=3), 32)
    labels = d.target.astype(np.int64)
    train, val, test = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    splits = {k: Split(rgb[i], labels[i]) for k, i in (("train", train), ("val", val), ("test", test))}
    prov = {"sources": {"sklearn.datasets.load_digits": hashlib.sha256(d.images.tobytes()).hexdigest()},
            "split_rule": "stratified 60/20/20, seed 0; 8x8 upsampled to 32x32 (bilinear, TF semantics)",
            "sklearn": sklearn.__version__}
    return validate(RealDataset("digits", [str(i) for i in range(10)], splits, prov))


# --------------------------------------------------------------------------------------------
# Registry


def load_dataset(name: str, data_dir: str | None = None, download: bool = True) -> RealDataset:
    """Load a dataset by name (see module docstring); every split validated."""
    if name.startswith("npz:"):
        path = Path(name[4:]).expanduser()
        return read_medmnist_npz(path, name, None)
    if name.startswith("folder:"):
        from raysd.folders import read_image_folder

        return validate(read_image_folder(Path(name[7:]).expanduser(), name))
    loader = LOADERS.get(name)
    if loader is None:
        raise RaysdError(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}, or npz:PATH / folder:PATH")
    return loader(data_dir, download)


LOADERS: dict[str, Callable[..., RealDataset]] = {
    **{n: _cifar_loader(n) for n in CIFAR},
    **{n: _medmnist_loader(n) for n in MEDMNIST},
    "digits": load_digits_dataset,
}

CLASSIFIER_SIZE = {"cifar10": 32, "cifar100": 32, "digits": 32, **{n: 28 for n in MEDMNIST}}


def dataset_label(name: str) -> str:
    """A short name for reports and file names (``npz:/x/y.npz`` -> ``y``)."""
    if ":" in name:
        return os.path.splitext(os.path.basename(name.split(":", 1)[1].rstrip("/")))[0] or name
    return name
