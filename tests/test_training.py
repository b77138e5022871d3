"""Ray Train stages on a real local cluster with the tiny model (CPU)."""

import os

import pytest
import torch

from conftest import bytes_under, write_medmnist_npz
from raysd.data import checkpoints as ck
from raysd.run.rundir import Run
from raysd.config import load_config
from raysd.errors import RaysdError
from raysd.stages.train import train

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
    worker_tmp = os.environ["RAYSD_TMPDIR"]  # where the workers stage checkpoints (conftest's ray_session)
    assert ray_session.get(ray_session.remote(lambda: os.environ.get("RAYSD_TMPDIR")).remote()) == worker_tmp
    before = bytes_under(worker_tmp)
    assert train(cfg, "encoder") == [1, 2]
    assert bytes_under(worker_tmp) == before  # uploaded, then deleted: nothing of the stage left on the worker
    enc_root = Run(cfg).ckpt_root("encoder")
    state, meta = ck.load_weights(ck.epoch_dir(enc_root, 2))
    assert sorted(state) == ["fc1.bias", "fc1.weight", "fc2.weight"]  # only the Class-Encoder is stored
    assert meta["frozen_digest_start"] == meta["frozen_digest_end"]  # the UNet did not move, bit for bit
    first, _ = ck.load_weights(ck.epoch_dir(enc_root, 1))
    assert not torch.equal(first["fc2.weight"], state["fc2.weight"])  # the encoder did
    enc_files = {e: ck.read_meta(ck.epoch_dir(enc_root, e))["files"] for e in (1, 2)}

    assert train(cfg, "unet", encoder_epoch=1) == [1, 2]
    unet_root = Run(cfg).ckpt_root("unet")
    ustate, umeta = ck.load_weights(ck.epoch_dir(unet_root, 2))
    assert umeta["encoder_epoch"] == 1 and "conv_in.weight" in ustate
    assert bytes_under(worker_tmp) == before
    assert umeta["frozen_digest_start"] == umeta["frozen_digest_end"]  # the encoder did not move
    assert {e: ck.read_meta(ck.epoch_dir(enc_root, e))["files"] for e in (1, 2)} == enc_files
    # the optimizer state lives apart from the registered weights (never edited afterwards), the
    # newest two epochs' only: epoch N-1's pair is the fallback while N's weights are uploading
    assert ck.is_resumable(unet_root, 2) and ck.is_resumable(unet_root, 1)
    assert sorted(os.listdir(os.path.join(unet_root, "resume"))) == ["epoch_001", "epoch_002"]
    assert sorted(os.listdir(ck.epoch_dir(unet_root, 2))) == ["checkpoint.json", "model.safetensors"]
    # the posterior cache was written once and reused by both steps
    assert len(os.listdir(tmp_path / "run" / "cache")) == 1
    # a rerun finds everything done and trains nothing
    assert train(cfg, "unet", encoder_epoch=1) == [1, 2]


def test_loss_goes_down_on_a_learnable_set(tmp_path, npz, ray_session):
    cfg = tiny_cfg(tmp_path / "run", npz, **{"finetune.epochs": 4, "finetune.steps_per_epoch": 6,
                                             "finetune.lr": 2e-3, "encoder.epochs": 1, "resources.num_workers": 1})
    train(cfg, "encoder")
    train(cfg, "unet")
    root = Run(cfg).ckpt_root("unet")
    losses = [ck.read_meta(ck.epoch_dir(root, e))["loss"] for e in (1, 2, 3, 4)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_changed_settings_refuse_stale_checkpoints(tmp_path, npz, ray_session):
    cfg = tiny_cfg(tmp_path / "run", npz, **{"encoder.epochs": 1, "resources.num_workers": 1})
    train(cfg, "encoder")
    other = tiny_cfg(tmp_path / "run", npz, **{"encoder.epochs": 1, "encoder.lr": 0.5, "resources.num_workers": 1})
    saved = (tmp_path / "run" / "config.json").read_bytes()
    with pytest.raises(RaysdError, match=r"made with other settings \(encoder.lr 0.01 -> 0.5\); pass --restart"):
        train(other, "encoder")
    assert (tmp_path / "run" / "config.json").read_bytes() == saved  # refused before anything was written
    assert train(other, "encoder", restart=True) == [1]
    with pytest.raises(RaysdError, match="--encoder-epoch 7 has no valid checkpoint"):
        train(other, "unet", encoder_epoch=7)


def test_corrupt_checkpoint_is_refused_and_ignored(tmp_path, npz, ray_session):
    cfg = tiny_cfg(tmp_path / "run", npz, **{"resources.num_workers": 1})
    train(cfg, "encoder")
    root = Run(cfg).ckpt_root("encoder")
    f = tmp_path / "run" / "checkpoints" / "encoder" / "epoch_002" / ck.MODEL_FILE
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(RaysdError, match="damaged"):
        ck.load_weights(ck.epoch_dir(root, 2))
    assert ck.valid_epochs(root) == [1]
    (tmp_path / "run" / "checkpoints" / "encoder" / "epoch_001" / ck.CKPT_JSON).write_text("{trunc")
    with pytest.raises(RaysdError, match="not valid JSON"):
        ck.load_weights(ck.epoch_dir(root, 1))
    assert ck.valid_epochs(root) == [] and ck.latest_resumable(root) is None


def test_a_latent_base_trains_on_its_cached_vae_posteriors(tmp_path, npz, ray_session):
    """A VAE base: the cache is written by Ray Data's encoder actor (mean and logvar of every
    image); the worker reads it straight from the run directory."""
    from raysd.data import latents

    cfg = tiny_cfg(tmp_path / "run", npz, **{"model.base_model": "tiny-vae", "encoder.epochs": 1,
                                             "resources.num_workers": 1})
    assert train(cfg, "encoder") == [1]
    cache = str(next((tmp_path / "run" / "cache").iterdir()))
    labels, mean, logvar = latents.read_cache(cache)
    assert len(labels) == 48 and mean.shape == logvar.shape == (48, 4, 8, 8)
    assert not (logvar == float("-inf")).any()  # a real posterior, not the pixel-space point mass


def test_worker_threads_never_oversubscribe_a_node():
    import os as _os

    from raysd.stages.train_worker import worker_threads

    cores = len(_os.sched_getaffinity(0))
    assert worker_threads(None, 1.0, 1) == 1  # its CPU reservation
    assert worker_threads(cores, 1.0, 1) == cores  # torch_threads, when the node has them
    assert worker_threads(cores, 1.0, 2) == max(1, cores // 2)  # two workers on the node share its cores
    assert worker_threads(4 * cores, 1.0, 1) == cores and worker_threads(None, 2.0, 4 * cores) == 1


def test_lora_fine_tuning_keeps_an_adapter_of_its_base(tmp_path, npz, ray_session):
    """finetune.method=lora: the checkpoints hold the adapter alone (with the base's identity), the
    generator merges it into the base UNet, and an adapter is refused on another base."""
    import json
    import shutil

    import numpy as np

    from raysd.core.models.diffusion import build_tiny
    from raysd.data.models import _load_models, load_generator
    from raysd.run.generators import resolve_spec

    from conftest import make_tiny_run

    cfg = make_tiny_run(tmp_path, **{"finetune.method": "lora", "finetune.lora_rank": 4, "finetune.lr": 1e-2,
                                     "finetune.epochs": 1, "finetune.steps_per_epoch": 3,
                                     "finetune.global_batch_size": 8, "model.null_class": False,
                                     "resources.cpu_finetune_workers": 1})
    assert train(cfg, "unet", encoder_epoch=1) == [1]
    root = Run(cfg).ckpt_root("unet")
    state, meta = ck.load_weights(ck.epoch_dir(root, 1))
    assert meta["adapter"]["method"] == "lora" and meta["adapter"]["rank"] == 4 and meta["base_identity"] == "tiny"
    assert state and all("lora_" in k for k in state)
    full = sum(p.numel() for p in build_tiny("tiny", 16, seed=0).unet.parameters())
    assert sum(v.numel() for v in state.values()) < 0.05 * full  # an adapter, not a UNet
    spec = resolve_spec(Run(cfg), num_inference_steps=3, guidance_scale=2.0)
    assert spec.unet_dir and spec.unet_dir.endswith("epoch_001")
    _load_models.cache_clear()
    images = load_generator(spec, "cpu").images(np.array([0, 1, 2, 3]), np.arange(4), batch_size=4)
    assert images.shape == (4, 8, 8, 3)
    other = tmp_path / "other-base" / "epoch_001"  # the same adapter, said to be of another base
    shutil.copytree(ck.epoch_dir(root, 1), other)
    record = json.loads((other / ck.CKPT_JSON).read_text())
    (other / ck.CKPT_JSON).write_text(json.dumps({**record, "base_identity": "raysd base sha256:0123456789abcdef"}))
    _load_models.cache_clear()
    with pytest.raises(RaysdError, match="a LoRA adapter of the base raysd base sha256:0123456789abcdef, not of tiny"):
        _load_models("tiny", 16, spec.encoder_dir, str(other), "auto", 0, False, False, None, "cpu")
