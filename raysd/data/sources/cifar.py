"""CIFAR-10 and CIFAR-100 in torchvision's extracted python layout (``cifar-10-batches-py/``,
``cifar-100-python/``), read through an unpickler that admits only the numpy types they hold;
downloaded with torchvision's checksums when absent and online. Split: train = the first 4/5 of
the official training order (40,000), val = the last 1/5, test = the official test set."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raysd.data.sources.common import RealDataset, Split, fetch, split_from, validate
from raysd.data.storage import sha256_file
from raysd.errors import RaysdError


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
    return split_from(np.concatenate(xs), np.concatenate(ys), f"{where} {files[0]}")


def cifar_loader(name: str) -> Callable[..., RealDataset]:
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
            fetch(tv.url, root, tv.filename, tv.tgz_md5, name, folder, extract=True)
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
        prov = {"sources": {f: sha256_file(str(folder / f)) for f in files},
                "split_rule": "train = first 4/5 of the official training order (40,000), val = last 1/5 "
                              "(10,000), test = official test"}
        return validate(RealDataset(name, class_names, splits, prov))

    return load
