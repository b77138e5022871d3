"""The CAS trainer on real data (digits) and its pause/resume state."""

import numpy as np
import pytest
import torch

from raysd.core.cas import CasTrainer, train_and_evaluate
from raysd.core.strong import STRONG_BATCH, crop_and_flip, one_cycle
from raysd.config import CasConfig
from raysd.data.sources import load_dataset
from raysd.errors import RaysdError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").splits


def test_digits_standard_resnet_reaches_90_percent(digits):
    cfg = CasConfig(variant="standard", max_epochs=12, batch_size=128)
    seen = []
    res = train_and_evaluate(digits["train"], digits["val"], digits["test"], 10, cfg=cfg, seed=0, device="cpu",
                             callback=lambda e, loss, v: seen.append((e, loss, v)) and False)
    assert res.top1 >= 0.90, res
    assert res.top5 >= res.top1 and res.epochs_run == len(seen) == 12
    assert 1 <= res.best_epoch <= 12 and res.best_val_top1 == max(v for _, _, v in seen)
    assert len(res.per_class_accuracy) == 10 and np.array(res.confusion).sum() == len(digits["test"].labels)


def test_image_size_area_resizes_and_still_classifies_digits(digits):
    """cas.image_size (the demo's 16): every batch is area-resized, i.e. 2x2 means of the 32x32 digits,
    and the classifier still learns them."""
    cfg = CasConfig(variant="standard", max_epochs=12, batch_size=128, image_size=16)
    tr = CasTrainer(digits["train"], digits["val"], 10, cfg=cfg, device="cpu")
    x = torch.from_numpy(digits["train"].images[:4])
    got = tr._inputs(x)
    want = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2).float() / 255.0, 2)
    assert got.shape == (4, 3, 16, 16)
    torch.testing.assert_close(got, want)
    res = train_and_evaluate(digits["train"], digits["val"], digits["test"], 10, cfg=cfg, seed=0, device="cpu")
    assert res.top1 >= 0.90, res
    with pytest.raises(RaysdError, match="image_size"):
        from raysd.config import load_config
        load_config("demo", overrides={"cas.image_size": 2})


def test_callback_can_stop_and_early_stopping_restores_best(digits):
    cfg = CasConfig(variant="standard", max_epochs=50, batch_size=256, early_stopping_patience=2)
    small = (digits["train"].images[:200], digits["train"].labels[:200])
    res = train_and_evaluate(small, digits["val"], digits["test"], 10, cfg=cfg, callback=lambda e, l, v: e >= 3)
    assert res.epochs_run == 3
    tr = CasTrainer(small, digits["val"], 10, cfg=cfg, device="cpu")
    while not tr.done:
        tr.train_epoch()
    assert tr.wait == 2 and tr.epoch < 50  # stopped by patience


@pytest.mark.parametrize("protocol", ["paper", "strong"])
def test_pause_and_resume_equals_uninterrupted(digits, protocol):
    cfg = CasConfig(variant="standard", max_epochs=3, batch_size=64, protocol=protocol, strong_epochs=3)
    data = (digits["train"].images[:256], digits["train"].labels[:256])
    val = (digits["val"].images[:64], digits["val"].labels[:64])
    a = CasTrainer(data, val, 10, cfg=cfg, seed=5, device="cpu")
    for _ in range(3):
        a.train_epoch()
    b = CasTrainer(data, val, 10, cfg=cfg, seed=5, device="cpu")
    b.train_epoch()
    state = b.state_dict()
    c = CasTrainer(data, val, 10, cfg=cfg, seed=99, device="cpu")  # a fresh process, other seed
    c.load_state_dict(state)
    c.train_epoch()
    c.train_epoch()
    for (k, x), (_, y) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        torch.testing.assert_close(x, y, msg=k)
    assert [h["val_top1"] for h in a.history] == [h["val_top1"] for h in c.history]


def test_bad_cas_inputs(digits):
    x, y = digits["train"].images[:10], digits["train"].labels[:10]
    with pytest.raises(RaysdError, match="labels must lie in 0..3"):
        CasTrainer((x, y), (x, y), 4)
    with pytest.raises(RaysdError, match="must be uint8"):
        CasTrainer((x.astype(np.float32), y), (x, y), 10)
    with pytest.raises(RaysdError, match="10 images and 9 labels"):
        CasTrainer((x, y[:9]), (x, y), 10)


def test_plateau_and_early_stopping_count_as_keras_does():
    """Hand-computed: patience 2, factor 0.1, min_lr 1e-5 (lr 1e-3); early stopping patience 4.

    val: .50 .60 .60 .59 .61 .61 .61 .61 .61 (epochs 1..9)
    Keras' ReduceLROnPlateau (min_delta 1e-4): best .50, .60 (wait 0), then wait 1 (e3), 2 (e4): the
    LR drops after epoch 4 (torch's scheduler would wait for epoch 5); .61 at e5 improves; e6 wait
    1, e7 wait 2: drops again after epoch 7. EarlyStopping: improvements at 1, 2, 5; wait 1..4 at
    epochs 6..9: it stops after epoch 9 with the weights of epoch 5."""
    from raysd.core.cas import KerasPlateau

    vals = [0.50, 0.60, 0.60, 0.59, 0.61, 0.61, 0.61, 0.61, 0.61]
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    plateau = KerasPlateau(factor=0.1, patience=2, min_lr=1e-5)
    lrs = []
    for v in vals:
        plateau.step(v, opt)
        lrs.append(round(opt.param_groups[0]["lr"], 8))
    assert lrs == [1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5]

    cfg = CasConfig(variant="standard", max_epochs=20, batch_size=8, plateau_patience=2, early_stopping_patience=4)
    x = np.zeros((16, 8, 8, 3), np.uint8)
    y = np.arange(16) % 2
    tr = CasTrainer((x, y), (x, y), 2, cfg=cfg, device="cpu")
    feed = iter(vals)
    tr.evaluate = lambda xs, ys: (next(feed), 0.0, None)  # the val accuracies of the hand computation
    while not tr.done:
        tr.train_epoch()
    assert tr.epoch == 9 and tr.best_epoch == 5 and tr.best_val == 0.61
    assert [round(h["lr"], 8) for h in tr.history] == lrs


def test_fp32_precision_and_the_test_companion():
    digits_x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    cfg = CasConfig(variant="standard", max_epochs=2, batch_size=16)
    tr = CasTrainer((digits_x, y), (digits_x[:12], y[:12]), 4, cfg=cfg, device="cpu", precision="fp32",
                    test=(digits_x[12:24], y[12:24]))
    assert tr.autocast_dtype is None
    tr.train_epoch()
    assert tr.best_test is not None and 0 <= tr.best_test <= 1  # the test accuracy of the best-val weights
    state = tr.state_dict()
    assert state["best_test"] == tr.best_test


def test_a_trainer_can_watch_balanced_accuracy_on_imbalanced_data(digits):
    """search.metric=balanced_accuracy: the callbacks and best_val follow the mean recall over
    classes, which a classifier that favours the commonest class cannot inflate."""
    from raysd.core.metrics import balanced_accuracy

    def skew(split, keep_other):  # class 0 whole, every other class cut to its first few images
        y = split.labels
        idx = np.concatenate([np.flatnonzero(y == 0)] + [np.flatnonzero(y == c)[:keep_other] for c in range(1, 10)])
        return split.images[idx], y[idx]

    train, val = skew(digits["train"], 12), skew(digits["val"], 6)
    cfg = CasConfig(variant="standard", max_epochs=3, image_size=16, batch_size=32)
    tr = CasTrainer(train, val, 10, cfg=cfg, seed=0, device="cpu", monitor="balanced_accuracy")
    rows = [tr.train_epoch() for _ in range(3)]
    tr.restore_best()
    _, _, pred = tr.evaluate(tr.xv, tr.yv)
    assert tr.best_val == pytest.approx(balanced_accuracy(val[1], pred.numpy()))
    assert max(r["val_metric"] for r in rows) == tr.best_val
    assert any(abs(r["val_metric"] - r["val_top1"]) > 0.05 for r in rows)  # they differ on this split


def test_the_strong_protocol_schedule_and_augmentation():
    """One-cycle: a tenth of the peak at step 0, the peak after 20 % of the steps, 0 after the last;
    crops are windows of the reflect-padded image, flips mirror them, both drawn from the generator."""
    lrs = [one_cycle(i, 100, 0.1) for i in range(101)]
    assert lrs[0] == pytest.approx(0.01) and max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 20
    assert lrs[100] == 0.0 and all(a <= b for a, b in zip(lrs[:20], lrs[1:21])) and all(
        a >= b for a, b in zip(lrs[20:], lrs[21:]))
    x = torch.rand(64, 3, 16, 16)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    out = crop_and_flip(x, torch.Generator().manual_seed(0), flip=True)
    again = crop_and_flip(x, torch.Generator().manual_seed(0), flip=True)
    assert out.shape == x.shape and torch.equal(out, again)
    windows = [padded[:, :, i:i + 16, j:j + 16] for i in range(5) for j in range(5)]
    mirrored = 0
    for b in range(64):
        plain = any(torch.equal(out[b], w[b]) for w in windows)
        flipped = any(torch.equal(out[b], w[b].flip(2)) for w in windows)
        assert plain or flipped, b
        mirrored += flipped and not plain
    assert 10 < mirrored < 54  # about half
    moved = crop_and_flip(x, torch.Generator().manual_seed(1), flip=False)
    assert all(any(torch.equal(moved[b], w[b]) for w in windows) for b in range(64))
    assert sum(torch.equal(moved[b], x[b]) for b in range(64)) < 16  # most crops are shifted


def test_the_strong_protocol_on_digits(digits):
    """He et al.'s ResNet20 with crops, SGD-Nesterov and one cycle: every epoch runs (no early stopping),
    the LR ends at 0, and it classifies digits (mirror flips off: a mirrored digit is another one)."""
    cfg = CasConfig(protocol="strong", strong_flip=False, image_size=16, min_steps_per_epoch=10)
    tr = CasTrainer(digits["train"], digits["val"], 10, cfg=cfg, device="cpu")
    n = len(digits["train"].labels)
    assert tr.model.variant == "standard" and isinstance(tr.opt, torch.optim.SGD)
    assert tr.batch_size == min(STRONG_BATCH, n // 10) and tr.peak_lr == pytest.approx(0.1 * tr.batch_size / 128)
    assert tr.opt.param_groups[0]["nesterov"] and tr.total_steps == 30 * -(-n // tr.batch_size)
    res = train_and_evaluate(digits["train"], digits["val"], digits["test"], 10, cfg=cfg, seed=0, device="cpu")
    assert res.epochs_run == 30 and res.history[-1]["lr"] < 0.1 * 0.05
    assert res.top1 >= 0.97 and res.metrics["balanced_accuracy"] >= 0.97, res.top1
