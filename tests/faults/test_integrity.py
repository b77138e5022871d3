"""Integrity: every shard, checkpoint and base-model file is checked against the checksum
recorded beside it; `raysd verify` names each damaged file; readers refuse damaged files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import flip_bit, make_tiny_run
from raysd.data import checkpoints as ck
from raysd.run.rundir import Run
from raysd.cli import main
from raysd.errors import RaysdError
from raysd.stages.evaluate import cas_of_set
from raysd.stages.generate import generate_set
from raysd.run.generators import resolve_spec
from raysd.core.models.diffusion import build_tiny
from raysd.data.models import load_base_model, save_base_model

pytestmark = pytest.mark.ray


def verify(capsys, run_dir) -> tuple[int, str]:
    code = main(["verify", str(run_dir)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def run(tmp_path, ray_session):
    cfg = make_tiny_run(tmp_path, encoder_epochs=2)
    generate_set(cfg, Run(cfg).synthetic_dir("x1"), num_images=20, class_balance="real",
                 spec=resolve_spec(Run(cfg), guidance_scale=2.0))
    save_base_model(build_tiny("tiny", 16), Run(cfg).base_dir)
    return cfg


def test_verify_names_every_damaged_file_and_readers_refuse_them(run, capsys):
    root = Path(run.run_dir)
    code, out = verify(capsys, root)
    assert code == 0 and "ok" in out and "DAMAGED" not in out, out

    shard = sorted((root / "synthetic" / "x1").glob("shard-*.parquet"))[0]
    flip_bit(shard)
    weights = root / "checkpoints" / "encoder" / "epoch_002" / ck.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    unet = root / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    flip_bit(unet, offset=len(unet.read_bytes()) - 3)  # in the tensor data, where safetensors itself cannot notice
    train = sorted((root / "data" / "train").glob("*.parquet"))[0]
    os.remove(train)
    (root / "synthetic" / "half").mkdir()  # an interrupted write: incomplete, not damaged

    code, out = verify(capsys, root)
    assert code == 1, out
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 4, out
    for f in (shard, weights, unet, train):
        assert any(str(f) in line for line in damaged), (f, out)
    assert any(line.startswith("incomplete") and "half" in line for line in out.splitlines())
    js = main(["verify", str(root), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert js == 1 and len(report["damaged"]) == 4

    with pytest.raises(RaysdError, match="damaged"):
        cas_of_set(run, str(root / "synthetic" / "x1"))
    with pytest.raises(RaysdError, match="damaged"):
        ck.load_weights(str(weights.parent))
    assert ck.valid_epochs(Run(run).ckpt_root("encoder")) == [1]  # the damaged epoch is never offered
    with pytest.raises(RaysdError, match="damaged"):
        load_base_model(str(root / "base"), resolution=16)


def test_damaged_trial_image_cache_is_regenerated_not_used(run):
    from raysd.stages.search_trial import TrialContext, trial_images

    cfg = run
    cfg.search.num_images = 12
    ctx = TrialContext(Run(cfg), 1, {}, "cpu", val=(np.zeros((1, 8, 8, 3), np.uint8), np.zeros(1, np.int64)),
                       num_classes=4, checkpoints={"encoder": ck.recorded_epochs(Run(cfg).ckpt_root("encoder"))},
                       base_identity=Run(cfg).base_identity())
    params = {"num_inference_steps": 2, "guidance_scale": 1.5, "epoch": 1}
    images, labels, _ = trial_images(ctx, params, "cpu")
    cached = next((Path(Run(cfg).search_dir(1)) / "images").glob("*.safetensors"))
    flip_bit(cached, offset=len(cached.read_bytes()) - 5)
    again, labels2, _ = trial_images(ctx, params, "cpu")
    assert torch.equal(torch.from_numpy(again), torch.from_numpy(images)) and (labels2 == labels).all()
    assert main(["verify", cfg.run_dir]) == 0  # regenerated and rewritten with a matching checksum


def test_verify_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a raysd run directory" in capsys.readouterr().err
