"""MedMNIST-style npz files: the four registered MedMNIST datasets (the official ``NAME.npz``
under ``--data-dir`` or ``~/.medmnist``, downloaded with its MD5 checked when absent and online)
and ``npz:PATH`` (your own file with the same keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from raysd.data.sources.common import RealDataset, Split, fetch, load_npz, split_from, stratified_split, validate
from raysd.data.storage import sha256_file
from raysd.errors import RaysdError

MEDMNIST = ("pathmnist", "dermamnist", "bloodmnist", "retinamnist")


def read_medmnist_npz(path: Path, name: str, class_names: list[str] | None, seed: int = 0) -> RealDataset:
    """Keys ``{train,val,test}_{images,labels}``; without ``val_*`` a seeded 10 % of train."""
    where = f"dataset {name} ({path})"
    z = load_npz(path, where)
    required = ["train_images", "train_labels", "test_images", "test_labels"]
    missing = [k for k in required if k not in z]
    if missing:
        raise RaysdError(f"{where}: missing key(s) {missing}; found {sorted(z)}; expected MedMNIST keys "
                         "train_images/train_labels/val_images/val_labels/test_images/test_labels")
    splits = {s: split_from(z[f"{s}_images"], z[f"{s}_labels"], f"{where} {s}") for s in ("train", "test")}
    rule = "official train/val/test"
    if "val_images" in z and "val_labels" in z:
        splits["val"] = split_from(z["val_images"], z["val_labels"], f"{where} val")
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
    prov = {"sources": {path.name: sha256_file(str(path))}, "split_rule": rule}
    return validate(RealDataset(name, class_names, splits, prov))


def medmnist_loader(name: str) -> Callable[..., RealDataset]:
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
            fetch(info["url"], root, f"{name}.npz", info["MD5"], name, path)
        names = [info["label"][str(i)] for i in range(len(info["label"]))]
        return read_medmnist_npz(path, name, names)

    return load
