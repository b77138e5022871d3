"""Ray Train stages on a real local cluster with the tiny model (CPU)."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import write_medmnist_npz
from raysd import checkpoints as ck
from raysd import runs
from raysd.config import load_config
from raysd.errors import RaysdError
from raysd.training import train

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_medmnist_npz(tmp_path_factory.mktemp("data") / "toy.npz", n=(48, 12, 12), classes=3, size=8)


def tiny_overrides(run_dir, npz, **extra):
    base = {
        "run_dir": str(run_dir), "dataset.name": f"npz:{npz}", "model.base_model": "tiny", "model.pretrain_steps": 0,
        "model.resolution": 16, "encoder.epochs": 2, "encoder.steps_per_epoch": 3, "encoder.global_batch_size": 8,
        "finetune.epochs": 2, "finetune.steps_per_epoch": 3, "finetune.global_batch_size": 8,
        "resources.num_workers": 2, "resources.torch_threads": 1,
    }
    base.update(extra)
    return base


def tiny_cfg(run_dir, npz, **extra):
    return load_config("demo", overrides=tiny_overrides(run_dir, npz, **extra))


def test_both_steps_two_workers_change_only_their_module(tmp_path, npz, ray_session):
    cfg = tiny_cfg(tmp_path / "run", npz)
    assert train(cfg, "encoder") == [1, 2]
    enc_root = runs.ckpt_root(cfg, "encoder")
    state, meta = ck.load_weights(ck.epoch_dir(enc_root, 2))
    assert sorted(state) == ["fc1.bias", "fc1.weight", "fc2.weight"]  # only the Class-Encoder is stored
    assert meta["frozen_digest_start"] == meta["frozen_digest_end"]  # the UNet did not move, bit for bit
    first, _ = ck.load_weights(ck.epoch_dir(enc_root, 1))
    assert not torch.equal(first["fc2.weight"], state["fc2.weight"])  # the encoder did
    enc_files = {e: ck.read_meta(ck.epoch_dir(enc_root, e))["files"] for e in (1, 2)}

    assert train(cfg, "unet", encoder_epoch=1) == [1, 2]
    unet_root = runs.ckpt_root(cfg, "unet")
    ustate, umeta = ck.load_weights(ck.epoch_dir(unet_root, 2))
    assert umeta["encoder_epoch"] == 1 and "conv_in.weight" in ustate
    assert umeta["frozen_digest_start"] == umeta["frozen_digest_end"]  # the encoder did not move
    assert {e: ck.read_meta(ck.epoch_dir(enc_root, e))["files"] for e in (1, 2)} == enc_files
    # optimizer state is kept for the newest epoch only (resuming needs no more)
    assert ck.is_valid(ck.epoch_dir(unet_root, 2), resumable=True)
    assert not ck.is_valid(ck.epoch_dir(unet_root, 1), resumable=True) and ck.is_valid(ck.epoch_dir(unet_root, 1))
    # the posterior cache was written once and reused by both steps
    assert len(os.listdir(tmp_path / "run" / "cache")) == 1
    # a rerun finds everything done and trains nothing
    assert train(cfg, "unet", encoder_epoch=1) == [1, 2]


def test_loss_goes_down_on_a_learnable_set(tmp_path, npz, ray_session):
    cfg = tiny_cfg(tmp_path / "run", npz, **{"finetune.epochs": 4, "finetune.steps_per_epoch": 6,
                                             "finetune.lr": 2e-3, "encoder.epochs": 1, "resources.num_workers": 1})
    train(cfg, "encoder")
    train(cfg, "unet")
    root = runs.ckpt_root(cfg, "unet")
    losses = [ck.read_meta(ck.epoch_dir(root, e))["loss"] for e in (1, 2, 3, 4)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_changed_settings_refuse_stale_checkpoints(tmp_path, npz, ray_session):
    cfg = tiny_cfg(tmp_path / "run", npz, **{"encoder.epochs": 1, "resources.num_workers": 1})
    train(cfg, "encoder")
    other = tiny_cfg(tmp_path / "run", npz, **{"encoder.epochs": 1, "encoder.lr": 0.5, "resources.num_workers": 1})
    with pytest.raises(RaysdError, match="made with other settings"):
        train(other, "encoder")
    assert train(other, "encoder", restart=True) == [1]
    with pytest.raises(RaysdError, match="--encoder-epoch 7 has no valid checkpoint"):
        train(other, "unet", encoder_epoch=7)


def test_corrupt_checkpoint_is_refused_and_ignored(tmp_path, npz, ray_session):
    cfg = tiny_cfg(tmp_path / "run", npz, **{"resources.num_workers": 1})
    train(cfg, "encoder")
    root = runs.ckpt_root(cfg, "encoder")
    f = tmp_path / "run" / "checkpoints" / "encoder" / "epoch_002" / ck.MODEL_FILE
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(RaysdError, match="damaged"):
        ck.load_weights(ck.epoch_dir(root, 2))
    assert ck.valid_epochs(root) == [1]
    (tmp_path / "run" / "checkpoints" / "encoder" / "epoch_001" / ck.CKPT_JSON).write_text("{trunc")
    with pytest.raises(RaysdError, match="not valid JSON"):
        ck.load_weights(ck.epoch_dir(root, 1))
    assert ck.valid_epochs(root) == [] and ck.latest_resumable(root) is None


def _cli(run_dir, npz, *extra):
    sets = [f"--set={k}={v}" for k, v in tiny_overrides(run_dir, npz, **{
        "encoder.epochs": 3, "encoder.steps_per_epoch": 40, "resources.num_workers": 1}).items()
        if k != "run_dir"]
    return [sys.executable, "-m", "raysd", "train-encoder", "--preset", "demo", "--run", str(run_dir), *sets, *extra]


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, npz, private_ray_env):
    env, kill_cluster = private_ray_env
    full = subprocess.run(_cli(tmp_path / "a", npz), capture_output=True, text=True, env=env, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    proc = subprocess.Popen(_cli(tmp_path / "b", npz), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    first = tmp_path / "b" / "checkpoints" / "encoder" / "epoch_001" / ck.CKPT_JSON
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.exists(), "the first checkpoint never appeared"
    kill_cluster(proc)  # the driver and the local cluster it started, mid-epoch 2
    time.sleep(1)
    done = sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "encoder").glob("epoch_*"))
    assert "epoch_003" not in done

    again = subprocess.run(_cli(tmp_path / "b", npz), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming encoder after epoch" in again.stdout + again.stderr
    cfg_a, cfg_b = (load_config("demo", overrides=tiny_overrides(tmp_path / d, npz)) for d in ("a", "b"))
    assert ck.valid_epochs(runs.ckpt_root(cfg_b, "encoder")) == [1, 2, 3]
    wa, _ = ck.load_weights(ck.epoch_dir(runs.ckpt_root(cfg_a, "encoder"), 3))
    wb, _ = ck.load_weights(ck.epoch_dir(runs.ckpt_root(cfg_b, "encoder"), 3))
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
