"""The latent cache format without Ray: the pixel-space cache the driver writes holds exactly what
the encoder actor computes, a cache Ray Data wrote reads back without Ray, damage is refused."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, flip_bit, random_images
from raysd.data import imageset, latents, storage
from raysd.data.models import is_pixel_space, save_base_model
from raysd.errors import RaysdError


def _write(d, n=20, logvar=True):
    rng = np.random.default_rng(0)
    ids = rng.permutation(n)  # rows out of order: the reader sorts them
    mean = rng.normal(size=(n, 4, 2, 2)).astype(np.float32)
    lv = rng.normal(size=(n, 4, 2, 2)).astype(np.float32) if logvar else None
    latents.write_cache(str(d), ids, ids % 3, mean, lv, base="b", keep={"claim.json"})
    order = np.argsort(ids)
    return ids[order] % 3, mean[order], lv[order] if logvar else None


def test_round_trip_in_sample_id_order(tmp_path, monkeypatch):
    monkeypatch.setattr(latents, "ROWS_PER_SHARD", 7)  # three shards
    labels, mean, lv = _write(tmp_path)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".parquet")]) == 3
    got = latents.read_cache(str(tmp_path))
    np.testing.assert_array_equal(got[0], labels)
    np.testing.assert_array_equal(got[1], mean)
    np.testing.assert_array_equal(got[2], lv)
    _write(tmp_path / "pix", logvar=False)
    assert latents.read_cache(str(tmp_path / "pix"))[2] is None


def test_an_interrupted_write_leaves_nothing_behind(tmp_path):
    (tmp_path / "claim.json").write_text("{}")
    (tmp_path / "part-00009-stale.parquet").write_bytes(b"half a shard")
    _write(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["claim.json", "meta.json", "part-00000.parquet"]


def test_damaged_incomplete_or_foreign_caches_are_refused_by_name(tmp_path):
    _write(tmp_path)
    flip_bit(tmp_path / "part-00000.parquet")
    with pytest.raises(RaysdError, match="part-00000.parquet is damaged"):
        latents.read_cache(str(tmp_path))
    os.remove(tmp_path / "meta.json")
    with pytest.raises(RaysdError, match="incomplete"):
        latents.read_cache(str(tmp_path))
    storage.write_json(str(tmp_path / "meta.json"), {"format": imageset.SET_FORMAT, "files": {}})
    with pytest.raises(RaysdError, match="not a latent cache"):
        latents.read_cache(str(tmp_path))


def test_the_driver_pixel_cache_equals_the_encoder_actor_output(tmp_path):
    """What ensure_latent_cache writes for a pixel-space base without an actor is bit for bit what
    the PosteriorEncoder (the Ray Data path) computes from the same images."""
    import torch

    from raysd.core.imaging import uint8_to_model
    from raysd.stages.train import PosteriorEncoder

    images = random_images(10, 8)
    enc = PosteriorEncoder("tiny", 16, "cpu")
    out = enc({"image": images, "sample_id": np.arange(10), "label": np.arange(10) % 2})
    assert "logvar" not in out
    with torch.inference_mode():
        mine = uint8_to_model(images, 16).numpy()
    latents.write_cache(str(tmp_path), np.arange(10), np.arange(10) % 2, mine, None, base="tiny", keep=set())
    np.testing.assert_array_equal(latents.read_cache(str(tmp_path))[1], out["mean"])


def test_which_bases_are_pixel_space(tmp_path):
    from raysd.core.models.diffusion import build_tiny

    assert is_pixel_space("tiny") and is_pixel_space("builtin:tiny-digits")
    assert not is_pixel_space("tiny-vae") and not is_pixel_space("random:sd2-base")
    assert not is_pixel_space("stabilityai/stable-diffusion-2-base")
    save_base_model(build_tiny("tiny-vae", 16), tmp_path / "latent")
    save_base_model(build_tiny("tiny", 16), tmp_path / "pixel")
    assert not is_pixel_space(str(tmp_path / "latent")) and is_pixel_space(str(tmp_path / "pixel"))


def test_a_cache_ray_data_wrote_reads_without_ray(tmp_path, ray_session):
    """The VAE path writes with Ray Data; the training worker's reader needs no Ray extension type."""
    import ray.data

    from raysd.stages.prepare import write_parquet_set

    rng = np.random.default_rng(1)
    mean = rng.normal(size=(12, 4, 2, 2)).astype(np.float32)
    ds = ray.data.from_items([{"sample_id": i, "label": i % 3, "mean": mean[i], "logvar": -mean[i]}
                              for i in range(12)])
    (tmp_path / "claim.json").write_text("{}")
    write_parquet_set(ds, str(tmp_path), lambda files, rows: latents.describe(files, rows, expected_rows=12, base="b"))
    code = ("import sys, numpy as np; from raysd.data import latents; l, m, v = latents.read_cache(sys.argv[1]); "
            "assert 'ray' not in sys.modules; np.save(sys.argv[2], np.concatenate([m, v]))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "out.npy")], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.concatenate([mean, -mean]))
