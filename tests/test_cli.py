"""The ``raysd`` command end to end through subprocesses."""

import json
import subprocess
import sys

import pytest

from conftest import shared_file

COMMANDS = ["run", "prepare", "train-encoder", "finetune", "search", "generate", "cas", "report", "export", "config",
            "verify"]


def raysd(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "raysd", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r, needle):
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("raysd: error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_help_for_every_command():
    r = raysd("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)
    for c in COMMANDS:
        r = raysd(c, "--help")
        assert r.returncode == 0 and "usage: raysd " + c in r.stdout, (c, r.stderr)


@pytest.mark.ray
def test_prepare_real_retinamnist(tmp_path):
    data_dir = shared_file("retinamnist.npz").parent
    r = raysd("prepare", "--dataset", "retinamnist", "--data-dir", str(data_dir), "--out", str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr
    assert "train: 1080 images" in r.stdout and "val: 120 images" in r.stdout and "test: 400 images" in r.stdout
    meta = json.loads((tmp_path / "x" / "test" / "meta.json").read_text())
    assert meta["counts_per_class"] == [174, 46, 92, 68, 20]


@pytest.mark.parametrize("args,needle", [
    (["prepare", "--dataset", "imagenet", "--out", "OUT"], "unknown dataset 'imagenet'"),
    (["prepare", "--dataset", "npz:/nonexistent/x.npz", "--out", "OUT"], "does not exist"),
    (["prepare", "--dataset", "pathmnist", "--data-dir", "EMPTY", "--no-download", "--out", "OUT"],
     "pathmnist.npz not found"),
    (["prepare", "--out", "OUT"], "the following arguments are required: --dataset"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_bad_input_one_line(tmp_path, args, needle):
    (tmp_path / "EMPTY").mkdir()
    args = [a.replace("OUT", str(tmp_path / "o")).replace("EMPTY", str(tmp_path / "EMPTY")) for a in args]
    r = raysd(*args)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("meta.json"))


def test_corrupt_npz_through_the_cli(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    r = raysd("prepare", "--dataset", f"npz:{bad}", "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "not a readable npz file")
