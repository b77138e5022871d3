"""The sample plan of a synthetic set: (sample_id, label, seed) for every image, deterministic.

Counts per class: ``real`` apportions N in proportion to the real training split by the
largest-remainder method (exactly N in all, ties to the lower class index); ``uniform`` splits
N evenly, the remainder going to the first classes. Classes are interleaved along sample_id
(each class spread evenly over the range), so every shard holds a near-stratified mix. The
seed of a sample comes from (run seed, sample_id) alone (:func:`raysd.core.seeds.derive_seed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysd.errors import RaysdError
from raysd.core.seeds import derive_seed


@dataclass
class Plan:
    sample_ids: np.ndarray  # (N,) int64, 0..N-1
    labels: np.ndarray  # (N,) int64
    seeds: np.ndarray  # (N,) int64
    counts: list[int]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def shard(self, index: int, shard_size: int) -> slice:
        return slice(index * shard_size, min(len(self), (index + 1) * shard_size))

    def num_shards(self, shard_size: int) -> int:
        return -(-len(self) // shard_size)


def class_counts(n: int, num_classes: int, mode: str, real_counts: list[int] | None = None) -> list[int]:
    """How many images of each class a set of ``n`` images gets."""
    if n < 0 or num_classes < 1:
        raise RaysdError(f"plan: need n >= 0 and at least one class; got n={n}, classes={num_classes}")
    if mode == "uniform":
        q, r = divmod(n, num_classes)
        return [q + (1 if c < r else 0) for c in range(num_classes)]
    if mode != "real":
        raise RaysdError(f"plan: class balance must be 'real' or 'uniform'; got {mode!r}")
    if real_counts is None or len(real_counts) != num_classes or sum(real_counts) <= 0:
        raise RaysdError("plan: 'real' class balance needs the real training split's counts per class")
    w = np.asarray(real_counts, np.float64)
    quota = n * w / w.sum()
    base = np.floor(quota).astype(np.int64)
    rest = n - int(base.sum())
    order = sorted(range(num_classes), key=lambda c: (-(quota[c] - base[c]), c))  # largest remainder first
    for c in order[:rest]:
        base[c] += 1
    return base.astype(int).tolist()


def interleave(counts: list[int]) -> np.ndarray:
    """Labels ordered so each class is spread evenly: sort by (i + 0.5) / n_c, then class."""
    keys, labels = [], []
    for c, n_c in enumerate(counts):
        keys.append((np.arange(n_c) + 0.5) / max(n_c, 1))
        labels.append(np.full(n_c, c, np.int64))
    if not keys:
        return np.zeros(0, np.int64)
    k, lab = np.concatenate(keys), np.concatenate(labels)
    return lab[np.lexsort((lab, k))]


def make_plan(n: int, counts: list[int], run_seed: int) -> Plan:
    if sum(counts) != n:
        raise RaysdError(f"plan: counts {counts} sum to {sum(counts)}, not {n}")
    labels = interleave(counts)
    ids = np.arange(n, dtype=np.int64)
    seeds = np.fromiter((derive_seed(run_seed, i) for i in range(n)), dtype=np.int64, count=n)
    return Plan(ids, labels, seeds, list(counts))


def stratified_prefix(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Indices of the first ``counts[c]`` samples of each class c (in sample_id order).

    The x_k sets of a scaling study are such prefixes of the largest one (x_k within x_k+1).
    """
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    limit = np.asarray(counts, np.int64)
    have = np.bincount(labels, minlength=len(counts))
    short = [c for c, k in enumerate(counts) if k > have[c]]
    if short:
        raise RaysdError(f"plan: the larger set has too few images of class(es) {short} for this prefix")
    return np.flatnonzero(rank < limit[labels])
