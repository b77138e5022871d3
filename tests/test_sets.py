"""The canonical Parquet layout: round trip, Ray compatibility, refusal of damaged sets."""

import numpy as np
import pytest

from conftest import random_images
from raysd.data import imageset as sets
from raysd.data import storage
from raysd.errors import RaysdError


def _write(d, n=10, name="part-0.parquet"):
    imgs = random_images(n, 6)
    labels = np.arange(n) % 3
    info = sets.write_shard(str(d), name, np.arange(n), labels, imgs)
    meta = sets.set_meta(dataset="t", split="train", class_names=["a", "b", "c"], labels=labels,
                         image_shape=(6, 6, 3), files={name: info}, provenance={})
    sets.write_meta(str(d), meta)
    return imgs, labels


def test_round_trip(tmp_path):
    imgs, labels = _write(tmp_path)
    s = sets.read_set(str(tmp_path))
    np.testing.assert_array_equal(s.images, imgs)
    np.testing.assert_array_equal(s.labels, labels)
    assert s.meta["counts_per_class"] == [4, 3, 3] and s.class_names == ["a", "b", "c"]


def test_ray_reads_the_image_column_as_tensors(tmp_path, ray_session):
    import ray.data

    imgs, _ = _write(tmp_path)
    ds = ray.data.read_parquet(str(tmp_path / "part-0.parquet"))
    batch = ds.take_batch(10, batch_format="numpy")
    assert batch["image"].shape == (10, 6, 6, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"], imgs)


def test_missing_meta_is_refused(tmp_path):
    sets.write_shard(str(tmp_path), "part-0.parquet", np.arange(3), np.zeros(3), random_images(3, 6))
    with pytest.raises(RaysdError, match="incomplete: meta.json is missing"):
        sets.read_set(str(tmp_path))
    with pytest.raises(RaysdError, match="does not exist"):
        sets.read_set(str(tmp_path / "nope"))


def test_bit_flip_and_truncation_are_detected(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "part-0.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RaysdError, match="damaged"):
        sets.read_set(str(tmp_path))
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(RaysdError, match="damaged"):
        sets.read_set(str(tmp_path))
    shard.unlink()
    with pytest.raises(RaysdError, match="listed in meta.json but missing"):
        sets.read_set(str(tmp_path))


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = str(tmp_path / "x.bin")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_bytes(target, b"data")
    assert not (tmp_path / "x.bin").exists()
    assert storage.listdir(str(tmp_path)) == []  # the temporary name is hidden from listings


def test_file_uri_paths(tmp_path):
    uri = f"file://{tmp_path}/s"
    imgs, _ = _write(storage.local_path(uri))
    assert sets.is_complete(uri)
    np.testing.assert_array_equal(sets.read_set(uri).images, imgs)
