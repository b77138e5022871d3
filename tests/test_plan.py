"""The sample plan: counts per class, interleaving, seeds, stratified prefixes."""

import numpy as np
import pytest

from raysd.errors import RaysdError
from raysd.core.plan import class_counts, interleave, make_plan, stratified_prefix
from raysd.core.seeds import derive_seed as sample_seed


def test_uniform_counts_spread_the_remainder_over_the_first_classes():
    assert class_counts(4000, 9, "uniform") == [445] * 4 + [444] * 5
    assert sum(class_counts(4000, 9, "uniform")) == 4000
    assert class_counts(3, 5, "uniform") == [1, 1, 1, 0, 0]


def test_real_counts_by_largest_remainder():
    real = [486, 128, 206, 194, 66]  # RetinaMNIST train
    c = class_counts(4000, 5, "real", real)
    assert sum(c) == 4000
    quota = 4000 * np.array(real) / sum(real)
    assert all(abs(ci - q) < 1 for ci, q in zip(c, quota))
    assert class_counts(1080, 5, "real", real) == real  # x1 of the real size reproduces it exactly
    assert class_counts(10800, 5, "real", real) == [10 * r for r in real]
    assert class_counts(7, 3, "real", [1, 1, 1]) == [3, 2, 2]  # ties go to the lower index


def test_bad_counts():
    with pytest.raises(RaysdError, match="'real' or 'uniform'"):
        class_counts(10, 2, "balanced")
    with pytest.raises(RaysdError, match="needs the real training split"):
        class_counts(10, 2, "real", None)


def test_plan_interleaves_and_seeds_by_sample_id():
    p = make_plan(4000, class_counts(4000, 9, "uniform"), run_seed=3)
    assert len(p) == 4000 and np.bincount(p.labels).tolist() == p.counts
    assert p.seeds[17] == sample_seed(3, 17)
    first = p.labels[:900]  # any window holds every class about equally
    assert np.bincount(first, minlength=9).min() >= 99
    again = make_plan(4000, p.counts, run_seed=3)
    assert (again.labels == p.labels).all() and (again.seeds == p.seeds).all()
    assert p.num_shards(1024) == 4 and p.shard(3, 1024) == slice(3072, 4000)
    assert interleave([2, 1]).tolist() == [0, 1, 0]


def test_stratified_prefixes_are_nested_with_exact_counts():
    real = [50, 30, 20]
    big = make_plan(300, class_counts(300, 3, "real", real), 0)
    prev = set()
    for k in (1, 2, 3):
        counts = class_counts(100 * k, 3, "real", real)
        idx = stratified_prefix(big.labels, counts)
        assert np.bincount(big.labels[idx], minlength=3).tolist() == counts
        assert prev <= set(idx.tolist())
        prev = set(idx.tolist())
    with pytest.raises(RaysdError, match="too few images"):
        stratified_prefix(big.labels, [1000, 0, 0])
