"""Run directories on an object store: a real S3-protocol server (moto's standalone server) on
127.0.0.1, reached through pyarrow's S3FileSystem with the endpoint override raysd documents
(``storage_endpoint`` / ``AWS_ENDPOINT_URL``)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, write_medmnist_npz
from raysd.data import storage

pytestmark = pytest.mark.ray


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    return s3


def test_storage_primitives_on_s3(s3_env, tmp_path):
    root = "s3://raysd/prims"
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_json(storage.join(root, "a", "meta.json"), {"k": 1})
    assert storage.exists(storage.join(root, "a", "x.bin")) and storage.isdir(storage.join(root, "a"))
    assert storage.isfile(storage.join(root, "a", "x.bin")) and not storage.isfile(storage.join(root, "a"))
    assert storage.listdir(storage.join(root, "a")) == ["meta.json", "x.bin"]
    assert storage.read_json(storage.join(root, "a", "meta.json")) == {"k": 1}
    assert storage.sha256_file(storage.join(root, "a", "x.bin")) == storage.sha256_bytes(b"hello")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f.txt").write_text("f")
    (tmp_path / "d" / "g.txt").write_text("g")
    assert storage.upload_dir(str(tmp_path / "d"), storage.join(root, "up")) == ["g.txt", "sub/f.txt"]
    assert storage.walk_files(storage.join(root, "up")) == ["g.txt", "sub/f.txt"]
    storage.download_dir(storage.join(root, "up"), str(tmp_path / "back"), ["sub/f.txt"])
    assert (tmp_path / "back" / "sub" / "f.txt").read_text() == "f"
    assert storage.remove_unlisted(storage.join(root, "a"), {"meta.json"}) == ["x.bin"]
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "meta.json")) and storage.listdir(storage.join(root, "a")) == []


def test_a_fresh_process_reaches_s3_through_the_storage_endpoint_setting(s3, tmp_path):
    """`--set storage_endpoint=URL` alone (no AWS_ENDPOINT_URL in the environment) points s3:// at the server."""
    npz = write_medmnist_npz(tmp_path / "toy.npz", n=(12, 6, 6), classes=3, size=8)
    env = {k: v for k, v in s3.items() if k != "AWS_ENDPOINT_URL"}
    r = subprocess.run([sys.executable, "-m", "raysd", "config", "--dataset", f"npz:{npz}", "--run", "s3://raysd/cfg",
                        "--set", f"storage_endpoint={s3['AWS_ENDPOINT_URL']}"],
                       env={**_base_env(), **env}, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["storage_endpoint"] == s3["AWS_ENDPOINT_URL"]


def _base_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
