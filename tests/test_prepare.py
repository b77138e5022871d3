"""The prepare stage (Ray-free: the driver writes the splits it holds): real files in, canonical
Parquet out."""

import json

import numpy as np
import pytest

from conftest import shared_file, write_medmnist_npz
from raysd.data import imageset as sets
from raysd.data import storage
from raysd.data.sources import load_dataset
from raysd.errors import RaysdError
from raysd.stages.prepare import prepare_dataset


def test_real_retinamnist(tmp_path):
    data_dir = str(shared_file("retinamnist.npz").parent)
    out = str(tmp_path / "retina")
    metas = prepare_dataset("retinamnist", out, data_dir=data_dir, download=False)
    assert {s: m["num_rows"] for s, m in metas.items()} == {"train": 1080, "val": 120, "test": 400}
    assert metas["train"]["counts_per_class"] == [486, 128, 206, 194, 66]
    test = sets.read_set(storage.join(out, "test"))
    raw = np.load(shared_file("retinamnist.npz"))
    np.testing.assert_array_equal(test.images, raw["test_images"])
    np.testing.assert_array_equal(test.labels, raw["test_labels"].ravel())
    assert test.meta["provenance"]["sources"]["retinamnist.npz"].startswith("2549")  # README's sha256


def test_rerun_is_idempotent_and_other_content_refused(tmp_path):
    p = write_medmnist_npz(tmp_path / "a.npz")
    out = str(tmp_path / "out")
    first = prepare_dataset(f"npz:{p}", out)
    files = sorted((tmp_path / "out" / "train").iterdir())
    again = prepare_dataset(f"npz:{p}", out)
    assert first == again and sorted((tmp_path / "out" / "train").iterdir()) == files
    q = write_medmnist_npz(tmp_path / "b.npz", n=(31, 10, 10))
    with pytest.raises(RaysdError, match="already holds a different dataset"):
        prepare_dataset(f"npz:{q}", out)


def test_interrupted_write_is_not_complete_and_is_redone(tmp_path):
    p = write_medmnist_npz(tmp_path / "a.npz")
    out = tmp_path / "out"
    # what a crash mid-split leaves: the split claimed, a half-written shard, no meta.json
    (out / "train").mkdir(parents=True)
    fp = load_dataset(f"npz:{p}").fingerprint()
    (out / "train" / "claim.json").write_text(json.dumps({"fingerprint": fp}))
    (out / "train" / "part-00007-0.parquet").write_bytes(b"half")
    assert not sets.is_complete(str(out / "train"))
    prepare_dataset(f"npz:{p}", str(out))
    assert sets.read_set(str(out / "train")).labels.shape == (30,)
    assert sorted(x.name for x in out.iterdir()) == ["test", "train", "val"]
    assert not (out / "train" / "part-00007-0.parquet").exists()  # the leftover, listed nowhere, is gone


def test_foreign_directory_is_refused(tmp_path):
    p = write_medmnist_npz(tmp_path / "a.npz")
    (tmp_path / "out" / "val").mkdir(parents=True)
    (tmp_path / "out" / "val" / "mine.txt").write_text("user data")
    with pytest.raises(RaysdError, match="exists and is not a raysd prepare directory"):
        prepare_dataset(f"npz:{p}", str(tmp_path / "out"))
    assert (tmp_path / "out" / "val" / "mine.txt").read_text() == "user data"


def test_prepare_starts_no_ray(tmp_path):
    """The splits are in the driver's memory: writing them needs no cluster (one used to cost
    seconds of Ray Data start-up per run). In a fresh process, since the suite shares one Ray."""
    import subprocess
    import sys

    p = write_medmnist_npz(tmp_path / "a.npz")
    code = ("import sys, ray; from raysd.stages.prepare import prepare_dataset; "
            f"m = prepare_dataset('npz:{p}', sys.argv[1]); print(ray.is_initialized(), m['val']['num_rows'])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "10"]
    assert sets.read_set(str(tmp_path / "out" / "val")).labels.shape == (10,)
