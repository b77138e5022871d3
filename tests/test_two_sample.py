"""The two-sample test measures what it claims on real data: real digits against other real digits
are not told apart (measured: 49.0 %, interval 43.3-55.0 %), real digits against noise are told apart
always, and so is a 2x2 blur of the real digits (a generator's typical fault; measured 100 %): a
synthetic set whose CAS looks fine is still caught when it does not look like the data."""

import numpy as np
import pytest

from raysd.config import CasConfig
from raysd.core.two_sample import two_sample_test
from raysd.data.sources import load_dataset

CAS = CasConfig(image_size=16, batch_size=64)


@pytest.fixture(scope="module")
def digits():
    s = load_dataset("digits").splits
    return np.concatenate([s["train"].images, s["val"].images, s["test"].images])


def _test(a, b, seed=0):
    return two_sample_test(a, b, images=600, epochs=6, cas=CAS, seed=seed, device="cpu", precision="fp32")


def test_real_against_real_is_indistinguishable(digits):
    half = len(digits) // 2
    res = _test(digits[:half], digits[half:])
    lo, hi = res["interval"]
    assert lo < 0.5 < hi and res["images_per_kind"] == 600 and res["test_images"] == 300, res


def test_noise_is_trivially_told_apart_and_a_blur_in_between(digits):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, digits.shape).astype(np.uint8)
    res = _test(digits[:900], noise[900:])
    assert res["accuracy"] > 0.95 and res["auc"] > 0.99, res
    # a 2x2 box blur keeps the digit and loses its strokes' edges: still told apart
    x = digits[900:].astype(np.float32)
    blur = ((x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(np.roll(x, 1, 1), 1, 2)) / 4).astype(np.uint8)
    res = _test(digits[:900], blur)
    assert res["interval"][0] > 0.5, res


def test_too_few_images_is_a_clear_error(digits):
    with pytest.raises(ValueError, match="at least 8"):
        _test(digits[:4], digits[4:8])
