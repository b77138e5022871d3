"""The demo's shipped base and the command that makes it: deterministic bytes, train split only,
a record that checks, loadable as ``builtin:tiny-digits``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from raysd.cli import main
from raysd.commands import PINNED_NUMERICS
from raysd.data.models import BASE_META, BUILTIN_DIR, load_base_model, resolve_base
from raysd.data.storage import sha256_file
from raysd.errors import RaysdError

SHIPPED = BUILTIN_DIR / "tiny-digits"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _record(path: Path) -> dict:
    return json.loads((path / BASE_META).read_text())


def test_shipped_base_matches_its_record_and_loads_as_a_builtin():
    rec = _record(SHIPPED)
    for name, digest in rec["files"].items():
        assert sha256_file(str(SHIPPED / name)) == digest, name
    prov = rec["provenance"]
    assert prov["data"]["split"] == "train" and prov["data"]["dataset"] == "digits"
    assert prov["command"].startswith("raysd pretrain-base ") and prov["settings"]["seed"] == 0
    assert {k: prov["numerics"][k] for k in PINNED_NUMERICS} == PINNED_NUMERICS  # built on the pinned code paths
    assert resolve_base("builtin:tiny-digits") == str(SHIPPED)
    base = load_base_model("builtin:tiny-digits", resolution=16)
    assert base.unet.config.cross_attention_dim and base.vae is None
    # it learned to denoise: the recorded loss fell by an order of magnitude
    assert prov["losses"][-1] < prov["losses"][0] / 10
    with pytest.raises(RaysdError, match="no such built-in base .*tiny-digits"):
        resolve_base("builtin:nope")


def test_pretrain_base_is_deterministic_and_sees_the_train_split_only(tmp_path, capsys):
    outs = []
    for name in ("a", "b"):
        assert main(["pretrain-base", "--out", str(tmp_path / name), "--steps", "6", "--threads", "1"]) == 0
        outs.append(_record(tmp_path / name))
    assert outs[0]["files"][WEIGHTS] == outs[1]["files"][WEIGHTS]
    assert outs[0]["provenance"]["data"]["num_images"] == 1078  # digits' 60 % train split, not val/test
    assert outs[0]["provenance"]["settings"]["steps"] == 6 and len(outs[0]["provenance"]["losses"]) == 1
    assert f"weights SHA-256 {outs[0]['files'][WEIGHTS]}" in capsys.readouterr().out  # the child's lines, relayed
    # torch was loaded in this process, so each run went to a child with the pinned CPU code paths
    assert outs[0]["provenance"]["numerics"] == {**PINNED_NUMERICS, "cpu_capability": "AVX2"}
    loaded = load_base_model(str(tmp_path / "a"), resolution=16)
    assert loaded.unet.dtype == torch.float32  # stored fp16, loaded at the asked dtype
    # a different seed gives different bytes (the check above is not vacuous)
    assert main(["pretrain-base", "--out", str(tmp_path / "c"), "--steps", "6", "--seed", "1"]) == 0
    assert _record(tmp_path / "c")["files"][WEIGHTS] != outs[0]["files"][WEIGHTS]


def test_pretrain_base_refuses_to_overwrite_what_is_not_a_base(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    assert main(["pretrain-base", "--out", str(tmp_path / "x"), "--steps", "2"]) == 2
    assert "is not a raysd base directory" in capsys.readouterr().err
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


@pytest.mark.nightly
def test_rebuilding_the_shipped_base_gives_its_checksum(tmp_path):
    """The shipped command, rerun from scratch: the same weight bytes (about 15-30 min on 2 cores)."""
    command = _record(SHIPPED)["provenance"]["command"].split()
    assert command[:2] == ["raysd", "pretrain-base"]
    r = subprocess.run([sys.executable, "-m", "raysd", *command[1:], "--out", str(tmp_path / "base")],
                       capture_output=True, text=True, cwd=REPO, timeout=7200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _record(tmp_path / "base")["files"][WEIGHTS] == _record(SHIPPED)["files"][WEIGHTS]


@pytest.mark.ray
def test_the_small_preset_keeps_its_pretrained_base_for_later_runs(tmp_path, ray_session):
    """A base pretrained in a run is kept under model.base_cache by the pretrain stage's key; a later
    run on the same data and settings copies it (not trained), other settings train their own, and
    a damaged entry is trained again and rewritten."""
    from conftest import write_medmnist_npz
    from raysd import pipeline
    from raysd.config import load_config
    from raysd.run.base_cache import RECORD

    npz = write_medmnist_npz(tmp_path / "toy.npz", n=(32, 8, 8), classes=4, size=8)
    cache = tmp_path / "cache"

    def run(name: str, **extra) -> dict:
        cfg = load_config("small", overrides={
            "run_dir": str(tmp_path / name), "dataset.name": f"npz:{npz}", "model.pretrain_steps": 4,
            "model.pretrain_batch_size": 8, "model.base_cache": str(cache), "resources.torch_threads": 1, **extra})
        pipeline.run(cfg, until="pretrain")
        return json.loads((tmp_path / name / "manifest.json").read_text())["stages"]["pretrain"]

    a = run("a")
    (entry,) = cache.iterdir()
    assert entry.name == a["key"] and (entry / RECORD).is_file() and "cached_from" not in a["outputs"]
    b = run("b")
    assert b["outputs"]["cached_from"] == str(entry) and b["outputs"]["base_sha256"] == a["outputs"]["base_sha256"]
    assert not (tmp_path / "b" / "checkpoints" / "pretrain").exists()  # copied, not trained
    for name in _record(tmp_path / "a" / "base")["files"]:
        assert (tmp_path / "b" / "base" / name).read_bytes() == (tmp_path / "a" / "base" / name).read_bytes()
    c = run("c", **{"model.pretrain_steps": 5})
    assert "cached_from" not in c["outputs"] and c["key"] != a["key"] and len(list(cache.iterdir())) == 2
    weights = entry / WEIGHTS
    weights.write_bytes(b"\0" + weights.read_bytes()[1:])
    d = run("d")
    assert "cached_from" not in d["outputs"] and (tmp_path / "d" / "checkpoints" / "pretrain").exists()
    assert sha256_file(str(weights)) == _record(entry)["files"][WEIGHTS]  # rewritten by the run that trained
