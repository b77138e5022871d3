"""Bad input, all through the CLI: malformed datasets, configs and out-of-range flags always give
one clear line on stderr and exit 2 — never a traceback, never an output marked complete."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_images, write_image_folder, write_medmnist_npz
from raysd import config as C
from raysd.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code, err, needle=None):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("raysd: error:"), err
    assert "Traceback" not in err
    if needle:
        assert needle in lines[0], lines[0]


def nothing_complete(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("meta.json"))


# --------------------------------------------------------------------------------------------
# A corpus of malformed datasets


def _npz(tmp_path, **replace):
    return f"npz:{write_medmnist_npz(tmp_path / 'd.npz', n=(12, 6, 6), classes=3, size=8, **replace)}"


NPZ_CORPUS = {
    "flat images": ({"train_images": np.zeros((12, 64), np.uint8)}, "must have shape (N, H, W)"),
    "five-d images": ({"train_images": np.zeros((12, 8, 8, 3, 1), np.uint8)}, "must have shape (N, H, W)"),
    "two channels": ({"train_images": np.zeros((12, 8, 8, 2), np.uint8)}, "1 or 3 channels"),
    "nan pixels": ({"train_images": np.full((12, 8, 8), np.nan, np.float32)}, "NaN or infinite"),
    "inf pixels": ({"val_images": np.full((6, 8, 8), np.inf, np.float64)}, "NaN or infinite"),
    "float pixels over 1": ({"train_images": np.full((12, 8, 8), 200.0, np.float32)}, "must lie in [0, 1]"),
    "int pixels over 255": ({"train_images": np.full((12, 8, 8), 300, np.int32)}, "must lie in 0..255"),
    "negative pixels": ({"test_images": np.full((6, 8, 8), -1, np.int16)}, "must lie in 0..255"),
    "string pixels": ({"train_images": np.array([["x"] * 8] * 12)}, "must be numeric"),
    "negative label": ({"train_labels": np.array([-1] + [0, 1, 2] * 3 + [0, 1]).reshape(-1, 1)}, "labels must lie in"),
    "test label out of range": ({"test_labels": np.array([0, 1, 2, 0, 1, 7])}, "['3', '4', '5', '6', '7'] have no training"),
    "fractional labels": ({"train_labels": np.linspace(0, 2, 12)}, "whole numbers"),
    "label count mismatch": ({"train_labels": np.zeros(5, np.int64)}, "12 images but 5 labels"),
    "multi-label": ({"train_labels": np.zeros((12, 3), np.int64)}, "multi-label"),
    "empty class": ({"train_labels": np.array([0, 2] * 6), "val_labels": np.array([0, 2] * 3),
                     "test_labels": np.array([0, 1, 2] * 2)}, "have no training images"),
    "class with one image": ({"train_labels": np.array([0, 1] * 5 + [0, 2])}, "a single training image"),
    "empty split": ({"val_images": np.zeros((0, 8, 8), np.uint8), "val_labels": np.zeros(0, np.int64)},
                    "the val split is empty"),
    "mismatched sizes": ({"test_images": random_images(6, 10)}, "train images are"),
    "huge images": ({"train_images": np.zeros((12, 1, 20000), np.uint8)}, "is outside 1.."),
    "missing keys": ({"train_labels": None}, "missing key(s)"),
}


@pytest.mark.parametrize("case", sorted(NPZ_CORPUS))
def test_malformed_npz_datasets(tmp_path, capsys, case):
    replace, needle = NPZ_CORPUS[case]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prepare", "--dataset", _npz(tmp_path, **replace), "--out", out)
    assert_refused(code, err, needle)
    assert nothing_complete(out)


def test_malformed_files_and_folders(tmp_path, capsys):
    out = tmp_path / "out"
    cases = []
    bad = tmp_path / "truncated.npz"
    write_medmnist_npz(bad, n=(12, 6, 6), classes=3, size=8)
    bad.write_bytes(bad.read_bytes()[:200])
    cases.append((f"npz:{bad}", "not a readable npz file"))
    (tmp_path / "text.npz").write_text("not an archive")
    cases.append((f"npz:{tmp_path / 'text.npz'}", "not a readable npz file"))
    cases.append((f"npz:{tmp_path / 'absent.npz'}", "does not exist"))
    # folders: a non-image file, a corrupt image, a class with one image, an empty class, a link out
    for name, damage, needle in [
        ("notes", lambda r: (r / "cat" / "notes.txt").write_text("hello"), "notes.txt"),
        ("corrupt", lambda r: (r / "dog" / "000.png").write_bytes(b"\x89PNG broken"), "000.png"),
        ("single", lambda r: [p.unlink() for p in sorted((r / "eel").iterdir())[1:]], "eel"),
        ("empty", lambda r: [p.unlink() for p in (r / "eel").iterdir()], "eel"),
        ("linkout", lambda r: os.symlink(tmp_path / "text.npz", r / "cat" / "999.png"), "outside"),
        ("dirlink", lambda r: os.symlink(tmp_path, r / "zzz"), "outside"),
    ]:
        root = write_image_folder(tmp_path / name, per_class=6, size=8)
        damage(root)
        cases.append((f"folder:{root}", needle))
    cases.append((f"folder:{tmp_path / 'nowhere'}", "nowhere"))
    for dataset, needle in cases:
        code, _, err = run_cli(capsys, "prepare", "--dataset", dataset, "--out", out)
        assert_refused(code, err, needle)
        assert nothing_complete(out), dataset


# --------------------------------------------------------------------------------------------
# Malformed configuration files


@pytest.mark.parametrize("text,needle", [
    ("encoder: {epochs: [1, 2}", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("encoder:\n  epochs: ten\n", "encoder.epochs"),
    ("encoder:\n  epochs: -3\n", "encoder.epochs"),
    ("encoder:\n  epoch: 3\n", "unknown"),
    ("sampling: {guidance_scale: .nan}\n", "sampling.guidance_scale"),
    ("scale: {scales: [0, 2]}\n", "scale.scales"),
    ("dataset: {name: imagenet}\n", "imagenet"),
    ('{"cas": {"max_epochs": 1e400}}', "cas.max_epochs"),
])
def test_malformed_config_files(tmp_path, capsys, text, needle):
    f = tmp_path / ("c.json" if text.startswith("{") else "c.yaml")
    f.write_text(text)
    code, _, err = run_cli(capsys, "config", "--config", f)
    assert_refused(code, err, needle)


def test_unreadable_config_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "config", "--config", tmp_path / "absent.yaml")
    assert_refused(code, err, "absent.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run_cli(capsys, "config", "--config", tmp_path / "bin.yaml")
    assert_refused(code, err, "bin.yaml")


# --------------------------------------------------------------------------------------------
# Property-based: every numeric setting and every numeric flag


NUMERIC_KEYS = [(k, t) for k, _, t in C.all_keys() if t in ("int", "float", "int or None", "float or None")]
COUNT_KEYS = [k for k, t in NUMERIC_KEYS if t.startswith("int")]
numbers = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "", "x", "1.5.2", "0x10", "--1", "1_000"]),
)


def test_numeric_keys_cover_every_section():
    assert {k.split(".")[0] for k, _ in NUMERIC_KEYS} >= {"model", "encoder", "finetune", "sampling", "cas", "search",
                                                          "scale", "resources", "seed"} - {"scale"}
    assert len(NUMERIC_KEYS) >= 35


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([k for k, _ in NUMERIC_KEYS]), value=numbers)
def test_every_numeric_setting_is_accepted_as_given_or_refused_in_one_line(capsys, key, value):
    text = repr(value) if isinstance(value, float) else str(value)
    code, out, err = run_cli(capsys, "config", "--set", f"{key}={text}")
    if code == 0:  # accepted: the value is exactly what was asked for, finite and not negative
        got = json.loads(out)
        for part in key.split("."):
            got = got[part]
        if got is None:  # an optional key: empty means "not set"
            assert dict(NUMERIC_KEYS)[key].endswith("or None") and text.strip().lower() in ("", "none", "null")
            return
        assert math.isfinite(got) and got >= 0, (key, text, got)
        assert got == pytest.approx(float(text)), (key, text, got)
        if key in COUNT_KEYS:
            assert isinstance(got, int)
    else:
        assert_refused(code, err, key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(COUNT_KEYS), value=st.integers(min_value=-(10**6), max_value=-1))
def test_negative_counts_are_always_refused(capsys, key, value):
    code, _, err = run_cli(capsys, "config", "--set", f"{key}={value}")
    assert_refused(code, err, key)


FLAGS = {  # command prefix, flag, accepted range
    "--seed": (["config"], 0, 2**32 - 1),
    "--scale": (["generate", "--run", "RUN"], 1, 1000),
    "--num-images": (["generate", "--run", "RUN"], 1, 2**63 - 1),
    "--num-inference-steps": (["generate", "--run", "RUN", "--num-images", "4"], 1, 1000),
    "--guidance-scale": (["generate", "--run", "RUN", "--num-images", "4"], 0.0, 100.0),
    "--encoder-epoch": (["finetune", "--run", "RUN"], 1, 2**63 - 1),
    "--unet-epoch": (["generate", "--run", "RUN", "--num-images", "4"], 1, 2**63 - 1),
    "--num-trials": (["search", "--run", "RUN", "--phase", "1"], 1, 2**63 - 1),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(sorted(FLAGS)), value=numbers)
def test_every_numeric_flag_is_range_checked_before_any_work(tmp_path_factory, capsys, flag, value):
    prefix, lo, hi = FLAGS[flag]
    run = tmp_path_factory.getbasetemp() / "no-such-run"  # valid values then fail on the missing run
    text = repr(value) if isinstance(value, float) else str(value)
    args = [a.replace("RUN", str(run)) for a in prefix] + [f"{flag}={text}"]
    code, out, err = run_cli(capsys, *args)
    try:
        v = float(text)
        in_range = math.isfinite(v) and lo <= v <= hi and (isinstance(lo, float) or v == int(v) and
                                                            "." not in text and "e" not in text.lower())
    except ValueError:
        in_range = False
    if prefix[0] == "config" and in_range:
        assert code == 0 and json.loads(out)["seed"] == int(text)
        return
    assert_refused(code, err)
    if not in_range:
        assert flag in err, err
    assert not run.exists()
