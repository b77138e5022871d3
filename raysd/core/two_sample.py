"""A number that needs no labels: how well a small classifier tells real training images from
synthetic ones (a classifier two-sample test, Lopez-Paz & Oquab, ICLR 2017).

Equal numbers of real and synthetic images are drawn (seeded), labelled real/synthetic, and split
in halves per kind: one half trains a standard ResNet20, the other half is split again into the
validation quarter (early stopping) and the test quarter it is scored on. Test accuracy near 50 %:
the classifier cannot tell them apart; near 100 %: the synthetic images are trivially told from
real ones, whatever their CAS says (colourful noise can still train a classifier to 48 % top-1 on
RetinaMNIST). Ray-free.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from raysd.config import CasConfig
from raysd.core.cas import train_and_evaluate


def two_sample_test(real: np.ndarray, synthetic: np.ndarray, *, images: int, epochs: int, cas: CasConfig,
                    seed: int = 0, device: Any = None, precision: str = "auto") -> dict[str, Any]:
    """Accuracy (with its 95 % bootstrap interval) and AUC of real-vs-synthetic on held-out images.
    ``real`` and ``synthetic``: uint8 (N, H, W, 3) of one shape; ``images`` caps the images per kind."""
    rng = np.random.default_rng(seed)
    n = min(len(real), len(synthetic), images)
    if n < 8:
        raise ValueError(f"two-sample test: {n} images per kind; at least 8 are needed")
    kinds = [real[np.sort(rng.choice(len(real), n, replace=False))],
             synthetic[np.sort(rng.choice(len(synthetic), n, replace=False))]]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for label, x in enumerate(kinds):
        order = rng.permutation(n)
        half, three_q = n // 2, n // 2 + (n - n // 2) // 2
        for split, idx in (("train", order[:half]), ("val", order[half:three_q]), ("test", order[three_q:])):
            parts[split].append((x[idx], np.full(len(idx), label, np.int64)))
    data = {k: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v])) for k, v in parts.items()}
    cfg = replace(cas, protocol="paper", variant="standard", max_epochs=epochs, early_stopping_patience=max(1, epochs),
                  plateau_patience=max(1, epochs), batch_size=min(cas.batch_size, 128), min_steps_per_epoch=4,
                  label_smoothing=0.0, seeds=1)
    res = train_and_evaluate(data["train"], data["val"], data["test"], 2, cfg=cfg, seed=seed, device=device,
                             precision=precision)
    return {"accuracy": res.top1, "interval": res.metrics["interval"]["top1"], "auc": res.metrics["auc"],
            "images_per_kind": n, "test_images": int(len(data["test"][1])), "epochs_run": res.epochs_run}
