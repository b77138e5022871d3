"""The driver's checks before any Ray work (raysd/run/preflight.py) and how a stage's out-of-memory
failure reaches the user: one `raysd: error:` line, exit status 2. Also the two offline forms of a
hub base: a diffusers directory in the hub layout and a Hugging Face cache holding its snapshot."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from raysd.cli import main
from raysd.config import load_config
from raysd.data.models import BASE_META, build_tiny, save_base_model
from raysd.errors import RaysdError
from raysd.run.preflight import check_base, oom_as_error, out_of_memory

MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "scheduler": ["diffusers", "DDPMScheduler"]}


def one_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysd: error:") and "\n" not in err and needle in err, err
    return err


def test_a_run_directory_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    assert main(["run", "--out", str(tmp_path / "run")]) == 2
    one_line(capsys, f"run directory {tmp_path / 'run'} is a file")


def test_a_missing_base_directory_and_an_incomplete_one(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "run"), "--base-model", str(tmp_path / "sd2")]) == 2
    one_line(capsys, "no such directory")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    (tmp_path / "half" / "unet" / "config.json").write_text("{}")
    assert main(["run", "--out", str(tmp_path / "run"), "--base-model", str(tmp_path / "half")]) == 2
    one_line(capsys, "missing model_index.json, vae/config.json, scheduler/scheduler_config.json")
    assert not (tmp_path / "run" / "manifest.json").exists()  # refused before any stage


def test_a_missing_dataset_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["run", "--out", str(tmp_path / "run"), "--dataset", "pathmnist", "--data-dir",
                 str(tmp_path / "empty"), "--set", "dataset.download=false", "--base-model", "builtin:tiny-digits"]) == 2
    one_line(capsys, f"{tmp_path / 'empty' / 'pathmnist.npz'} not found (download disabled)")


def test_the_demo_preset_on_other_data_names_the_two_paths_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """The demo's base knows only digits: `raysd run --dataset retinamnist` (no preset, no base) is
    refused before any work, naming the paper's path and the small base pretrained on the data."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--dataset", "retinamnist", "--data-dir", str(tmp_path / "data")]) == 2
    err = one_line(capsys, "pretrained on digits only")
    assert "--preset paper --base-model" in err and "`--preset small`" in err
    assert not any(tmp_path.iterdir())  # no run directory, nothing downloaded
    for named in (["--base-model", "tiny"], ["--set", "model.base_model=tiny"]):  # a base the user chose is used
        from raysd.commands import _check_demo_base, config_from_args
        from raysd.cli import build_parser

        args = build_parser().parse_args(["run", "--dataset", "retinamnist", *named])
        _check_demo_base(config_from_args(args), args)


def _offline_env(hf_home) -> dict:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_a_hub_model_missing_offline_is_one_line_before_ray(tmp_path):
    r = subprocess.run([sys.executable, "-m", "raysd", "run", "--out", str(tmp_path / "run"), "--preset", "paper",
                        "--dataset", "digits"], env=_offline_env(tmp_path / "hf"), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "base model 'stabilityai/stable-diffusion-2-base' is not in the Hugging Face cache" in err[0]
    assert "hf download stabilityai/stable-diffusion-2-base" in err[0]
    assert not (tmp_path / "run" / "config.json").exists()  # nothing started


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    """A tiny latent base written as a hub repository is laid out (model_index.json, unet/, vae/, scheduler/)."""
    d = tmp_path_factory.mktemp("hub") / "tiny-sd"
    save_base_model(build_tiny("tiny-vae", 32, seed=1), d)
    (d / BASE_META).unlink()  # a plain diffusers directory, not one raysd wrote
    (d / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return d


def test_a_diffusers_directory_and_a_hugging_face_cache_load_the_same_weights(hub_layout, tmp_path):
    check_base(str(hub_layout))
    snapshot = tmp_path / "hf" / "hub" / "models--raysd-test--tiny-sd" / "snapshots" / ("a" * 40)
    shutil.copytree(hub_layout, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = ("import torch; from raysd.run.preflight import check_base; from raysd.data.models import load_base_model\n"
            "check_base('raysd-test/tiny-sd')\n"
            "b = load_base_model('raysd-test/tiny-sd', resolution=32)\n"
            "print(float(sum(p.double().sum() for p in b.unet.parameters())), b.vae is not None)")
    r = subprocess.run([sys.executable, "-c", code], env=_offline_env(tmp_path / "hf"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from raysd.data.models import load_base_model

    local = load_base_model(str(hub_layout), resolution=32)
    total, has_vae = r.stdout.split()
    assert float(total) == pytest.approx(float(sum(p.detach().double().sum() for p in local.unet.parameters())), rel=1e-12)
    assert has_vae == "True" and local.vae is not None


def test_out_of_memory_becomes_one_line_with_the_need_and_the_fix():
    cfg = load_config("paper", overrides={"model.base_model": "random:sd2-base", "run_dir": "/tmp/x"})
    with pytest.raises(RaysdError) as e:
        with oom_as_error("finetune", cfg):
            try:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            except torch.OutOfMemoryError as oom:
                raise RuntimeError("the Ray task failed") from oom  # as it arrives wrapped by Ray
    msg = str(e.value)
    assert msg.startswith("finetune: out of memory: it needs about ") and " GB per worker, there are " in msg
    assert "finetune.gradient_checkpointing=true" in msg and "\n" not in msg
    assert "sampling.batch_size" in str(out_of_memory("generate", cfg))
    with pytest.raises(ValueError):  # anything else passes through untouched
        with oom_as_error("finetune", cfg):
            raise ValueError("not memory")
