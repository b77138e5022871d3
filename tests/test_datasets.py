"""Loaders on small files written in the real formats, the real RetinaMNIST/CIFAR-10 files,
and every bad-input case of the foundation issue."""

import pickle

import numpy as np
import pytest

from conftest import (balanced_labels, random_images, shared_file, write_cifar10_layout, write_cifar100_layout,
                      write_image_folder, write_medmnist_npz)
from raysd.data.sources import as_images, load_dataset, stratified_split
from raysd.errors import RaysdError


def test_cifar10_layout_splits_last_fifth_as_val(tmp_path):
    x, y = random_images(50, 32), balanced_labels(50, 10)
    write_cifar10_layout(tmp_path, x, y, random_images(20, 32, 1), balanced_labels(20, 10), [f"c{i}" for i in range(10)])
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    assert ds.class_names == [f"c{i}" for i in range(10)]
    assert [len(ds.splits[s].labels) for s in ("train", "val", "test")] == [40, 10, 20]
    # the official order is kept: train = first 40, val = last 10; CHW rows decoded to HWC
    np.testing.assert_array_equal(ds.splits["train"].images, x[:40])
    np.testing.assert_array_equal(ds.splits["val"].images, x[40:])
    np.testing.assert_array_equal(ds.splits["val"].labels, y[40:])
    assert ds.image_shape == (32, 32, 3)


def test_cifar100_layout(tmp_path):
    names = [f"f{i}" for i in range(100)]
    write_cifar100_layout(tmp_path, random_images(500, 32), balanced_labels(500, 100), random_images(100, 32, 2),
                          balanced_labels(100, 100), names)
    ds = load_dataset("cifar100", str(tmp_path), download=False)
    assert ds.num_classes == 100 and len(ds.splits["train"].labels) == 400 and len(ds.splits["val"].labels) == 100


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    write_cifar10_layout(tmp_path, random_images(10, 32), balanced_labels(10, 2), random_images(4, 32),
                         balanced_labels(4, 2), ["a", "b"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(RaysdError, match="forbidden global builtins.print"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_cifar_absent_offline_names_expected_path(tmp_path):
    with pytest.raises(RaysdError, match=r"cifar-10-batches-py not found \(download disabled\)"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_medmnist_named_reader(tmp_path):
    write_medmnist_npz(tmp_path / "bloodmnist.npz", classes=8, n=(40, 16, 16))
    ds = load_dataset("bloodmnist", str(tmp_path), download=False)
    assert ds.class_names[0] == "basophil" and ds.num_classes == 8
    assert ds.splits["train"].labels.dtype == np.int64 and ds.splits["train"].labels.ndim == 1


def test_npz_without_val_splits_train(tmp_path):
    p = write_medmnist_npz(tmp_path / "own.npz", n=(100, 10, 10), val_images=None, val_labels=None)
    ds = load_dataset(f"npz:{p}")
    n_train, n_val = len(ds.splits["train"].labels), len(ds.splits["val"].labels)
    assert n_train + n_val == 100 and 9 <= n_val <= 11
    assert "val = stratified 10 %" in ds.provenance["split_rule"]


def test_grey_npz_becomes_rgb(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    p = write_medmnist_npz(tmp_path / "g.npz", n=(12, 12, 12), train_images=grey, val_images=grey, test_images=grey)
    ds = load_dataset(f"npz:{p}")
    assert ds.image_shape == (28, 28, 3)
    np.testing.assert_array_equal(ds.splits["train"].images[..., 2], grey)


def test_digits_offline_split_and_upsampling():
    ds = load_dataset("digits")
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
    sizes = [len(ds.splits[s].labels) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[1] == 360 and abs(sizes[2] - 360) <= 1
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.splits["test"].labels, again.splits["test"].labels)
    assert ds.fingerprint() == again.fingerprint()


def test_image_folder_split_here(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=10)
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert ds.class_names == ["cat", "dog", "eel"]
    assert [len(ds.splits[s].labels) for s in ("train", "val", "test")] == [24, 3, 3]
    assert ds.image_shape == (12, 12, 3)


def test_image_folder_with_user_splits(tmp_path):
    for s in ("train", "val", "test"):
        write_image_folder(tmp_path / "d" / s, per_class=4 if s == "train" else 2)
    ds = load_dataset(f"folder:{tmp_path / 'd'}")
    assert [len(ds.splits[s].labels) for s in ("train", "val", "test")] == [12, 6, 6]


def test_stratified_split_is_exhaustive_and_seeded():
    y = balanced_labels(103, 4)
    a = stratified_split(y, (0.8, 0.1, 0.1), 0)
    assert sorted(np.concatenate(a).tolist()) == list(range(103))
    b = stratified_split(y, (0.8, 0.1, 0.1), 0)
    assert all((u == v).all() for u, v in zip(a, b))


# --------------------------------------------------------------------------------------------
# Real files (skipped with a reason where ../shared/data is absent)


def test_real_retinamnist_counts():
    ds = load_dataset("retinamnist", str(shared_file("retinamnist.npz").parent), download=False)
    expect = {"train": [486, 128, 206, 194, 66], "val": [54, 12, 28, 20, 6], "test": [174, 46, 92, 68, 20]}
    for split, counts in expect.items():
        assert np.bincount(ds.splits[split].labels).tolist() == counts
    assert ds.image_shape == (28, 28, 3)


def test_real_cifar10_through_the_torchvision_layout(tmp_path):
    tr = np.load(shared_file("cifar10_train_10k.npz"))
    te = np.load(shared_file("cifar10_test.npz"))
    order = np.random.default_rng(0).permutation(10000)  # the file is sorted by class
    write_cifar10_layout(tmp_path, tr["images"][order], tr["labels"][order], te["images"], te["labels"],
                         [str(c) for c in tr["class_names"]])
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    assert ds.class_names[:3] == ["airplane", "automobile", "bird"]
    assert [len(ds.splits[s].labels) for s in ("train", "val", "test")] == [8000, 2000, 10000]
    assert np.bincount(ds.splits["test"].labels).tolist() == [1000] * 10
    np.testing.assert_array_equal(ds.splits["val"].images[-1], tr["images"][order][-1])


# --------------------------------------------------------------------------------------------
# Bad input: one clear line each


def _bad_npz(tmp_path, **replace):
    """A file named like the official one, so the class count (5) comes from MedMNIST's INFO."""
    write_medmnist_npz(tmp_path / "retinamnist.npz", classes=5, **replace)
    return "retinamnist"


@pytest.mark.parametrize("replace,needle", [
    ({"train_images": None}, "missing key(s) ['train_images']"),
    ({"train_labels": np.zeros((29, 1), np.uint8)}, "30 images but 29 labels"),
    ({"test_labels": np.full((10, 1), 7, np.uint8)}, "test labels must lie in 0..4"),
    ({"train_labels": np.full((30, 1), -1, np.int64)}, "labels must lie in 0..4"),
    ({"val_images": np.zeros((0, 28, 28, 3), np.uint8), "val_labels": np.zeros((0, 1), np.uint8)}, "val split is empty"),
    ({"train_images": np.zeros((30, 28, 28, 2), np.uint8)}, "must have 1 or 3 channels"),
    ({"train_images": np.zeros((30, 784), np.uint8)}, "must have shape (N, H, W) or (N, H, W, C)"),
    ({"train_images": np.full((30, 28, 28, 3), np.nan, np.float32)}, "NaN or infinite"),
    ({"train_images": np.full((30, 28, 28, 3), 3.0, np.float32)}, "float images must lie in [0, 1]"),
    ({"train_images": np.full((30, 28, 28, 3), 300, np.int32)}, "integer pixels must lie in 0..255"),
    ({"train_labels": np.zeros((30, 3), np.uint8)}, "multi-label data is not supported"),
    ({"val_images": np.zeros((10, 32, 32, 3), np.uint8)}, "val images are (32, 32, 3), train images are (28, 28, 3)"),
    ({"train_labels": (np.arange(30) % 2).reshape(-1, 1), "test_labels": np.full((10, 1), 2)},
     "class(es) ['2', '3', '4'] have no training images"),
])
def test_bad_npz_inputs(tmp_path, replace, needle):
    with pytest.raises(RaysdError) as e:
        load_dataset(_bad_npz(tmp_path, **replace), str(tmp_path), download=False)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_truncated_and_corrupt_npz(tmp_path):
    p = write_medmnist_npz(tmp_path / "t.npz")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(RaysdError, match="truncated or corrupt"):
        load_dataset(f"npz:{p}")
    p.write_bytes(b"not a zip at all")
    with pytest.raises(RaysdError, match="not a readable npz"):
        load_dataset(f"npz:{p}")
    with pytest.raises(RaysdError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_huge_images_refused():
    with pytest.raises(RaysdError, match="outside 1..1024 px"):
        as_images(np.zeros((1, 2048, 8, 3), np.uint8), "x")


def test_unknown_dataset_name():
    with pytest.raises(RaysdError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_folder_bad_inputs(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=5)
    (root / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(RaysdError, match="notes.txt is not an image file"):
        load_dataset(f"folder:{root}")
    (root / "cat" / "notes.txt").unlink()
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(RaysdError, match="broken.png cannot be decoded"):
        load_dataset(f"folder:{root}")
    (root / "cat" / "broken.png").unlink()
    (root / "dog" / "001.png").unlink()
    write_image_folder(tmp_path / "big", classes=("dog",), per_class=1, size=20)
    (tmp_path / "big" / "dog" / "000.png").rename(root / "dog" / "001.png")
    with pytest.raises(RaysdError, match="different sizes"):
        load_dataset(f"folder:{root}")


def test_folder_class_with_too_few_images_and_links_out(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=5)
    write_image_folder(tmp_path / "few", classes=("ant",), per_class=1)
    (tmp_path / "few" / "ant").rename(root / "ant")
    with pytest.raises(RaysdError, match=r"class\(es\) \['ant'\] have fewer than 3 images"):
        load_dataset(f"folder:{root}")
    (root / "ant" / "000.png").unlink()
    (root / "ant").rmdir()
    outside = tmp_path / "secret.png"
    (root / "cat" / "000.png").rename(outside)
    (root / "cat" / "000.png").symlink_to(outside)
    with pytest.raises(RaysdError, match="outside"):
        load_dataset(f"folder:{root}")
    with pytest.raises(RaysdError, match="is not a directory"):
        load_dataset(f"folder:{tmp_path / 'absent'}")
