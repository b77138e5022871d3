"""Shared fixtures: a session-wide local Ray cluster, the real data folder, tiny file writers."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
NIGHTLY = os.environ.get("RAYSD_NIGHTLY") == "1"


def pytest_collection_modifyitems(config, items):
    """The nightly set (long fault schedules, load) runs with RAYSD_NIGHTLY=1 pytest -m nightly."""
    skip = pytest.mark.skip(reason="nightly set: RAYSD_NIGHTLY=1 pytest -m nightly")
    for item in items:
        if "nightly" in item.keywords and not NIGHTLY:
            item.add_marker(skip)
SHARED_DATA = Path(os.environ.get("RAYSD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole test session (2 CPUs, no dashboard). Its workers stage
    checkpoints under a temp root of their own (``RAYSD_TMPDIR``), so tests can see what is left."""
    import os

    import ray

    os.environ.setdefault("RAYSD_TMPDIR", str(tmp_path_factory.mktemp("worker-tmp")))
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def private_ray_env():
    """Environment for a subprocess that starts its own Ray cluster under a private temp dir,
    and a function that kills that whole cluster (driver, raylet, workers) with SIGKILL."""
    import signal
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    # The `ray` CLI sits beside this interpreter, also when the venv is not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": tmp, "PATH": path}

    def kill(proc=None):
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        # Ray's workers run in process groups of their own and rename themselves ("ray::..."):
        # find every process of that cluster by the RAY_TMPDIR it inherited.
        marker = f"RAY_TMPDIR={tmp}".encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    yield env, kill
    kill()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set RAYSD_SHARED_DATA to point at it)")
    return SHARED_DATA


def shared_file(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.is_file():
        pytest.skip(f"real data file {p} is absent")
    return p


# ---------------------------------------------------------------------------------------------
# Writers of small files in the real on-disk formats


def write_cifar10_layout(root: Path, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                         test_y: np.ndarray, names: list[str], batches: int = 5) -> Path:
    """torchvision's cifar-10-batches-py: pickled dicts with 'data' (N, 3072) CHW rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(fn: str, obj: dict) -> None:
        with open(folder / fn, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    def rows(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1), dtype=np.uint8)

    for i, (xs, ys) in enumerate(zip(np.array_split(train_x, batches), np.array_split(train_y, batches)), 1):
        dump(f"data_batch_{i}", {b"batch_label": b"training batch", b"labels": [int(v) for v in ys],
                                 b"data": rows(xs), b"filenames": [b"x.png"] * len(ys)})
    dump("test_batch", {b"batch_label": b"testing batch", b"labels": [int(v) for v in test_y],
                        b"data": rows(test_x), b"filenames": [b"x.png"] * len(test_y)})
    dump("batches.meta", {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10000,
                          b"num_vis": 3072})
    return folder


def write_cifar100_layout(root: Path, train_x, train_y, test_x, test_y, names) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)

    def rows(x):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1), dtype=np.uint8)

    for fn, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        with open(folder / fn, "wb") as f:
            pickle.dump({b"fine_labels": [int(v) for v in y], b"coarse_labels": [0] * len(y), b"data": rows(x)}, f,
                        protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"]}, f, protocol=2)
    return folder


def flip_bit(path: Path, offset: int | None = None) -> None:
    """Flip one bit of a file (its middle byte unless ``offset``): damage a SHA-256 must catch."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def random_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def balanced_labels(n: int, classes: int) -> np.ndarray:
    return (np.arange(n) % classes).astype(np.int64)


def write_medmnist_npz(path: Path, n=(30, 10, 10), classes: int = 3, size: int = 28, **replace) -> Path:
    arrays = {}
    for i, split in enumerate(("train", "val", "test")):
        arrays[f"{split}_images"] = random_images(n[i], size, seed=i)
        arrays[f"{split}_labels"] = balanced_labels(n[i], classes).reshape(-1, 1).astype(np.uint8)
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez_compressed(path, **arrays)
    return path


def write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 10, size: int = 12) -> Path:
    from PIL import Image

    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.full((size, size, 3), ci * 80 + i, np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
    return root


def make_tiny_run(root: Path, encoder_epochs: int = 1, **overrides):
    """A prepared run (4-class toy npz, tiny model) with randomly initialised Class-Encoder
    checkpoints for epochs 1..encoder_epochs: enough for generation and search, no training."""
    import torch

    from raysd.data import checkpoints as ck
    from raysd.config import load_config
    from raysd.core.models import ClassEncoder
    from raysd.run.rundir import Run
    from raysd.stages.prepare import ensure_prepared

    npz = write_medmnist_npz(root / "toy.npz", n=(40, 12, 12), classes=4, size=8)
    cfg = load_config("demo", overrides={
        "run_dir": str(root / "run"), "dataset.name": f"npz:{npz}", "model.base_model": "tiny",
        "model.pretrain_steps": 0, "model.resolution": 16, "sampling.num_inference_steps": 3,
        "sampling.batch_size": 8, "scale.shard_size": 10, "resources.torch_threads": 1,
        "resources.generation_actors": 2, **overrides})
    Run(cfg).save_config()
    ensure_prepared(Run(cfg))
    for epoch in range(1, encoder_epochs + 1):
        with torch.random.fork_rng():
            torch.manual_seed(4 + epoch)
            enc = ClassEncoder(4, cfg.model.seq_len, 32, cfg.model.hidden_dim)
        meta = {"kind": "encoder", "epoch": epoch, "loss": 0.0, "config_hash": "test", "module": "class_encoder",
                "class_encoder": {"num_classes": 4, "seq_len": cfg.model.seq_len, "dim": 32,
                                  "hidden_dim": cfg.model.hidden_dim, "null_class": False}}
        ck.write_checkpoint(ck.epoch_dir(Run(cfg).ckpt_root("encoder"), epoch), model_state=enc.state_dict(),
                            meta=meta)
    return cfg


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server with the bucket ``raysd``; yields the environment that reaches it."""
    import subprocess
    import sys
    import time

    pytest.importorskip("moto")
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    deadline = time.time() + 30
    while True:
        try:
            client.create_bucket(Bucket="raysd")
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    yield env
    proc.terminate()
    proc.wait()


def bytes_under(root: str) -> int:
    """Bytes of every file below ``root``."""
    import os

    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def s3_client(env: dict):
    """A boto3 client for the ``s3`` fixture's server (its credentials are in ``env``, not os.environ)."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
