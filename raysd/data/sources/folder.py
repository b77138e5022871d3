"""``folder:PATH`` datasets: one sub-folder of images per class (torchvision ImageFolder style).

Either ``PATH/<class>/*.png`` (split here: stratified 80/10/10 with a fixed seed) or
``PATH/{train,val,test}/<class>/*`` with the user's own splits (``val`` optional: then 10 % of
train). Every image must decode and all must share one size; files or links that resolve
outside ``PATH`` are refused; dotfiles are ignored.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from raysd.data.sources.common import RealDataset, Split, as_images, stratified_split
from raysd.errors import RaysdError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_SEED = 0


def _inside(root: Path, p: Path, where: str) -> Path:
    real = p.resolve()
    if real != root and root not in real.parents:
        raise RaysdError(f"{where}: {p} resolves to {real}, outside {root}; links out of the dataset are refused")
    return real


def _visible(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if not p.name.startswith("."))


def _read_image(path: Path, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_EXTS:
        raise RaysdError(f"{where}: {path} is not an image file (allowed extensions: {' '.join(IMAGE_EXTS)})")
    try:
        with Image.open(path) as im:
            if im.width > 4096 or im.height > 4096:
                raise RaysdError(f"{where}: {path} is {im.width}x{im.height} px; images over 4096 px are refused")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RaysdError(f"{where}: {path} cannot be decoded as an image ({type(e).__name__})") from None


def _read_classes(root: Path, d: Path, where: str, digest: "hashlib._Hash") -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for cdir in _visible(d):
        _inside(root, cdir, where)
        if not cdir.is_dir():
            raise RaysdError(f"{where}: {cdir} is a file; expected one sub-folder of images per class")
        imgs = []
        for f in _visible(cdir):
            _inside(root, f, where)
            if f.is_dir():
                raise RaysdError(f"{where}: {f} is a folder; class folders must hold image files only")
            digest.update(f"{cdir.name}/{f.name}".encode())
            digest.update(f.read_bytes())
            imgs.append(_read_image(f, where))
        if not imgs:
            raise RaysdError(f"{where}: class folder {cdir} holds no images")
        out[cdir.name] = imgs
    return out


def _stack(per_class: dict[str, list[np.ndarray]], names: list[str], where: str) -> Split:
    images, labels = [], []
    for i, n in enumerate(names):
        for im in per_class.get(n, []):
            images.append(im)
            labels.append(i)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise RaysdError(f"{where}: images have different sizes {sorted(shapes)[:3]}; resize them to one size first")
    x = as_images(np.stack(images), where)
    return Split(x, np.asarray(labels, np.int64))


def read_image_folder(path: Path, name: str) -> RealDataset:
    where = f"dataset {name}"
    if not path.is_dir():
        raise RaysdError(f"{where}: {path} is not a directory")
    root = path.resolve()
    digest = hashlib.sha256()
    top = [p.name for p in _visible(path)]
    if "train" in top and "test" in top:
        parts = {s: _read_classes(root, path / s, where, digest) for s in ("train", "val", "test") if s in top}
        names = sorted(parts["train"])
        for s, pc in parts.items():
            extra = sorted(set(pc) - set(names))
            if extra:
                raise RaysdError(f"{where}: {s}/ has class folder(s) {extra} that train/ lacks")
        splits = {s: _stack(pc, names, f"{where} {s}") for s, pc in parts.items()}
        rule = "user's train/val/test folders"
        if "val" not in splits:
            tr = splits["train"]
            keep, val = stratified_split(tr.labels, (0.9, 0.1), SPLIT_SEED)
            splits["train"], splits["val"] = Split(tr.images[keep], tr.labels[keep]), Split(tr.images[val], tr.labels[val])
            rule = f"user's train/test folders; val = stratified 10 % of train (seed {SPLIT_SEED})"
    else:
        per_class = _read_classes(root, path, where, digest)
        names = sorted(per_class)
        small = [n for n in names if len(per_class[n]) < 3]
        if small:
            raise RaysdError(f"{where}: class(es) {small} have fewer than 3 images; each class needs at least "
                             "one image for each of train, val and test")
        full = _stack(per_class, names, where)
        idx = stratified_split(full.labels, (0.8, 0.1, 0.1), SPLIT_SEED)
        splits = {s: Split(full.images[i], full.labels[i]) for s, i in zip(("train", "val", "test"), idx)}
        rule = f"stratified 80/10/10, seed {SPLIT_SEED}"
    prov = {"sources": {os.path.basename(str(root)): digest.hexdigest()}, "split_rule": rule}
    return RealDataset(name, names, splits, prov)
