"""The metrics beside top-1 agree with scikit-learn's definitions, the baselines are what a constant or
a random classifier scores, and the bootstrap intervals have the width the binomial noise of the test
split implies (RetinaMNIST's 400 test images: about +-4.9 points at 50 %)."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from raysd.core import metrics as M

RETINA_TEST = [174, 46, 92, 68, 20]  # class counts of RetinaMNIST's official test split (400 images)


def _labels(counts, seed=0):
    y = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(y)


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(1)
    y = _labels(RETINA_TEST)
    logits = rng.normal(size=(len(y), 5)) + 1.5 * np.eye(5)[y] * rng.random((len(y), 1))
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = prob.argmax(1)
    m = M.split_metrics(y, prob)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    lo, hi = m["interval"]["top1"]
    assert lo < np.mean(pred == y) < hi


def test_a_class_absent_from_the_split_is_left_out_not_counted_as_zero():
    y = np.array([0, 0, 1, 1, 2, 2])  # class 3 of 4 never occurs
    prob = np.eye(4)[[0, 0, 1, 1, 2, 3]] * 0.9 + 0.025
    m = M.split_metrics(y, prob)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y == c, prob[:, c]) for c in range(3)]))


def test_baselines_are_what_a_constant_and_a_random_classifier_score():
    y = _labels(RETINA_TEST)
    b = M.baselines(RETINA_TEST)
    majority = np.zeros_like(y)
    assert b["majority"]["top1"] == pytest.approx(0.435) and b["majority"]["class"] == 0
    assert b["majority"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, majority)) == 0.2
    assert b["majority"]["macro_f1"] == pytest.approx(f1_score(y, majority, labels=range(5), average="macro"))
    rng = np.random.default_rng(0)  # the chance row is the expectation of uniform guessing
    guesses = [rng.integers(0, 5, len(y)) for _ in range(400)]
    assert b["chance"]["top1"] == pytest.approx(np.mean([np.mean(g == y) for g in guesses]), abs=0.005)
    assert b["chance"]["macro_f1"] == pytest.approx(np.mean([f1_score(y, g, average="macro") for g in guesses]),
                                                    abs=0.005)


def test_intervals_have_the_binomial_width_of_the_split():
    y = _labels(RETINA_TEST)
    rng = np.random.default_rng(2)
    pred = np.where(rng.random(len(y)) < 0.5, y, (y + 1) % 5)  # right half the time
    lo, hi = M.intervals(y, pred)["top1"]
    half_width = 1.96 * np.sqrt(0.25 / len(y))  # 4.9 points
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.12)
    blo, bhi = M.intervals(y, pred)["balanced_accuracy"]
    assert blo < M.balanced_accuracy(y, pred) < bhi and bhi - blo > hi - lo  # rare classes: wider


def test_paired_differences_are_claimed_only_beyond_the_noise():
    y = _labels(RETINA_TEST)
    rng = np.random.default_rng(3)
    a = np.where(rng.random(len(y)) < 0.5, y, (y + 1) % 5)
    same = M.paired_difference(y, a, a)
    assert same["difference"] == 0 and same["interval"] == [0, 0] and not same["clear"]
    slightly = a.copy()  # 6 of 400 images fixed, 2 broken: +1 point, inside the noise of 8 discordant images
    wrong, right = np.flatnonzero(a != y), np.flatnonzero(a == y)
    slightly[wrong[:6]] = y[wrong[:6]]
    slightly[right[:2]] = (y[right[:2]] + 2) % 5
    d = M.paired_difference(y, slightly, a)
    assert d["difference"] == pytest.approx(0.01) and not d["clear"]
    better = np.where(rng.random(len(y)) < 0.5, y, a)  # right about 75 % of the time
    d = M.paired_difference(y, better, a)
    assert d["difference"] > 0.15 and d["clear"] and d["interval"][0] > 0
    d = M.paired_difference(y, better, a, metric="balanced_accuracy")
    assert d["clear"] and d["difference"] == pytest.approx(
        balanced_accuracy_score(y, better) - balanced_accuracy_score(y, a))
