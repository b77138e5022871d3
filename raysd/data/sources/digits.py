"""scikit-learn's bundled digits (offline): the demo's dataset."""

from __future__ import annotations

import hashlib

import numpy as np

from raysd.data.sources.common import RealDataset, Split, stratified_split, validate


def load_digits_dataset(data_dir: str | None = None, download: bool = True) -> RealDataset:
    """8x8 grey digits (0..16) -> 32x32 RGB uint8; fixed seeded stratified 1077/360/360 split."""
    import sklearn
    from sklearn.datasets import load_digits

    from raysd.core.imaging import upsample_uint8

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
