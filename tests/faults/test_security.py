"""Nothing is trusted that should not be: names read from sidecars, CLI names and dataset links
cannot leave their directories; weights never come from pickle; CIFAR pickles admit only numpy."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_cifar10_layout
from raysd.data import checkpoints as ck
from raysd.data import imageset as sets
from raysd.data import storage
from raysd.cli import main
from raysd.errors import RaysdError
from raysd.run.export import class_folder
from raysd.core.models.diffusion import build_tiny
from raysd.data.models import load_base_model, save_base_model
from raysd.run.verify import verify_run


@pytest.mark.parametrize("name", ["../escape.parquet", "/etc/passwd", "a/../../b", "..", "", "sub/x.parquet"])
def test_set_and_checkpoint_sidecars_cannot_name_files_outside(tmp_path, name):
    ids, labels = np.arange(4), np.array([0, 1, 0, 1])
    entry = sets.write_shard(str(tmp_path / "set"), "shard-000000.parquet", ids, labels,
                             np.zeros((4, 8, 8, 3), np.uint8))
    sets.write_meta(str(tmp_path / "set"), {"files": {name: entry}, "num_rows": 4, "image_shape": [8, 8, 3]})
    with pytest.raises(RaysdError, match="would leave its directory"):
        sets.read_set(str(tmp_path / "set"))
    d = tmp_path / "ckpt"
    ck.write_checkpoint(str(d), model_state={"w": torch.zeros(2)}, meta={"kind": "encoder", "epoch": 1})
    meta = json.loads((d / ck.CKPT_JSON).read_text())
    meta["files"] = {name: meta["files"][ck.MODEL_FILE]}
    (d / ck.CKPT_JSON).write_text(json.dumps(meta))
    with pytest.raises(RaysdError, match="would leave its directory"):
        ck.load_weights(str(d))
    assert not ck.is_valid(str(d))


def test_base_model_sidecar_cannot_point_outside_and_verify_reports_it(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    save_base_model(build_tiny("tiny", 16), run / "base")
    meta = json.loads((run / "base" / "raysd_base.json").read_text())
    meta["files"]["../../secret"] = "0" * 64
    (run / "base" / "raysd_base.json").write_text(json.dumps(meta))
    with pytest.raises(RaysdError, match="would leave its directory"):
        load_base_model(str(run / "base"), resolution=16)
    rep = verify_run(str(run))
    assert not rep.ok and any("leaves" in d for d in rep.damaged)


def test_weights_are_safetensors_not_pickle(tmp_path):
    d = tmp_path / "ckpt"
    ck.write_checkpoint(str(d), model_state={"w": torch.ones(3)}, meta={"kind": "encoder", "epoch": 1})
    assert sorted(p.name for p in d.iterdir() if p.suffix in (".pt", ".pth", ".pkl", ".bin")) == []

    class Evil:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").write_text, ("owned",))

    (d / ck.MODEL_FILE).write_bytes(pickle.dumps(Evil()))  # a pickle where the weights belong
    with pytest.raises(RaysdError):
        ck.load_weights(str(d))
    assert not (tmp_path / "pwned").exists()


def test_cifar_pickle_can_only_build_numpy(tmp_path, capsys):
    folder = write_cifar10_layout(tmp_path / "c", np.zeros((10, 32, 32, 3), np.uint8), np.arange(10) % 2,
                                  np.zeros((4, 32, 32, 3), np.uint8), np.arange(4) % 2, ["a", "b"])
    batch = folder / "data_batch_1"

    class Evil:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").write_text, ("owned",))

    batch.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    code = main(["prepare", "--dataset", "cifar10", "--data-dir", str(tmp_path / "c"), "--no-download",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "pwned").exists()
    assert "forbidden global" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../outside", "/abs", "..", ".hidden", "a/b"])
def test_cli_names_cannot_leave_the_run(tmp_path, capsys, ray_session, name):
    from conftest import make_tiny_run

    cfg = make_tiny_run(tmp_path)
    code = main(["generate", "--run", cfg.run_dir, "--num-images", "4", "--name", name])
    err = capsys.readouterr().err
    assert code == 2 and "must be a plain folder name" in err, err
    assert not (tmp_path / "outside").exists()


def test_class_names_become_safe_folder_names():
    for hostile in ("../../etc", "/abs/path", "a/b\\c", "..", "\x00x", "ok name"):
        folder = class_folder(3, hostile)
        assert "/" not in folder and "\\" not in folder and ".." not in folder and "\x00" not in folder
        assert folder.startswith("003_")


def test_member_names(tmp_path):
    assert storage.check_member_name("unet/model.safetensors", "x", nested=True)
    for bad in ("../x", "a/../b", "/x", "a//b", "."):
        with pytest.raises(RaysdError):
            storage.check_member_name(bad, "x", nested=True)
