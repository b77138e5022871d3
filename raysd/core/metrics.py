"""What a classifier's test predictions say beyond top-1: balanced accuracy, macro-F1 and macro
one-vs-rest AUC (MedMNIST's benchmarks report AUC beside accuracy), the baselines a score must
beat (the test split's majority class, chance), and the test split's own noise as bootstrap
intervals, alone and paired between two classifiers scored on the same images.

On imbalanced data top-1 alone misleads: a classifier that predicts RetinaMNIST's commonest class
only scores 43.5 % top-1 and 20 % balanced accuracy. Ray-free, numpy and scikit-learn only.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

B = 1000  # bootstrap resamples: the interval's ends move by ~0.1 point between seeds at 400 test images
LEVEL = 0.95


def _present(y: np.ndarray) -> np.ndarray:
    return np.unique(y)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (sklearn's definition)."""
    classes = _present(y)
    return float(np.mean([np.mean(pred[y == c] == c) for c in classes])) if len(classes) else float("nan")


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """F1 averaged over every class that occurs in ``y`` or the predictions."""
    from sklearn.metrics import f1_score

    labels = np.union1d(_present(y), _present(pred))
    labels = labels[labels < num_classes]
    return float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))


def macro_auc(y: np.ndarray, prob: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC AUC over the classes present in ``y`` (None: fewer than two)."""
    from sklearn.metrics import roc_auc_score

    classes = _present(y)
    if len(classes) < 2:
        return None
    aucs = [roc_auc_score(y == c, prob[:, c]) for c in classes]
    return float(np.mean(aucs))


def split_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Every metric of a test split from its labels (N,) and class probabilities (N, C)."""
    y = np.asarray(y, np.int64)
    prob = np.asarray(prob, np.float64)
    pred = prob.argmax(1)
    return {"balanced_accuracy": balanced_accuracy(y, pred), "macro_f1": macro_f1(y, pred, prob.shape[1]),
            "auc": macro_auc(y, prob), "interval": intervals(y, pred)}


def baselines(counts: list[int] | np.ndarray) -> dict[str, dict[str, float]]:
    """The rows a score must beat on a test split of these class counts: always predicting its
    commonest class, and guessing uniformly at random (expected values); AUC 0.5 for both. Macro
    means run over the classes present, as :func:`split_metrics`'s do."""
    counts = np.asarray(counts, np.float64)
    n, c = counts.sum(), len(counts)
    present = counts[counts > 0]
    prevalence = present / n
    top, k = int(counts.argmax()), min(5, c)
    p_top = counts[top] / n
    return {
        "majority": {"top1": float(p_top), "top5": float(np.sort(counts)[::-1][:k].sum() / n),
                     "balanced_accuracy": float(1 / len(present)),
                     "macro_f1": float(2 * p_top / (p_top + 1) / len(present)), "auc": 0.5, "class": top},
        "chance": {"top1": 1 / c, "top5": k / c, "balanced_accuracy": 1 / c,
                   "macro_f1": float(np.mean(2 * prevalence / c / (prevalence + 1 / c))), "auc": 0.5},
    }


def _resamples(n: int, seed: int, b: int = B) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def _boot_top1(correct: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return correct[idx].mean(1)


def _boot_balanced(y: np.ndarray, correct: np.ndarray, idx: np.ndarray) -> np.ndarray:
    classes = _present(y)
    ys, cs = y[idx], correct[idx]
    recalls = []
    for c in classes:
        mask = ys == c
        n = mask.sum(1)
        hit = (cs & mask).sum(1)
        recalls.append(np.where(n > 0, hit / np.maximum(n, 1), np.nan))
    return np.nanmean(np.stack(recalls, 1), 1)


def _interval(values: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


BOOTSTRAPPED: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "top1": lambda y, correct, idx: _boot_top1(correct, idx),
    "balanced_accuracy": _boot_balanced,
}


def intervals(y: np.ndarray, pred: np.ndarray, seed: int = 0) -> dict[str, list[float]]:
    """95 % percentile-bootstrap intervals of top-1 and balanced accuracy over the test split."""
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    if not len(y):
        return {}
    idx = _resamples(len(y), seed)
    correct = pred == y
    return {name: _interval(fn(y, correct, idx)) for name, fn in BOOTSTRAPPED.items()}


def paired_difference(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, metric: str = "top1",
                      seed: int = 0) -> dict[str, Any]:
    """``metric`` of A minus B on the same test images, with its 95 % paired-bootstrap interval (the
    same resamples for both); ``clear`` when the interval excludes 0."""
    y = np.asarray(y, np.int64)
    a, b = np.asarray(pred_a, np.int64) == y, np.asarray(pred_b, np.int64) == y
    idx = _resamples(len(y), seed)
    fn = BOOTSTRAPPED[metric]
    diffs = fn(y, a, idx) - fn(y, b, idx)
    full = np.arange(len(y))[None]
    diff = float((fn(y, a, full) - fn(y, b, full))[0])
    lo, hi = _interval(diffs)
    return {"metric": metric, "difference": diff, "interval": [lo, hi], "clear": bool(lo > 0 or hi < 0)}
