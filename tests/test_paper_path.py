"""The paper's own path on the real Stable Diffusion architectures (random weights): every stage of
`--preset paper` with random:sd2-base and of `--preset official` with random:sd-v1, on the CPU with
tiny budgets (benchmarks/paper_cpu.py). Minutes each: the nightly set."""

import json
import sys

import pytest
from safetensors import safe_open

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from paper_cpu import run  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.nightly]


@pytest.mark.parametrize("preset,seq_len,dim", [("paper", 77, 1024), ("official", 100, 768)])
def test_every_stage_on_the_real_architecture(tmp_path, preset, seq_len, dim):
    got = run(preset, tmp_path)
    assert got["returncode"] == 0, got["stderr"]
    print(preset, json.dumps(got["stages"]), f"{got['seconds']:.0f}s")
    res = json.loads(got["results"].read_text())
    assert set(res["scaling"]) == {"real", "x1"} and list(res["steps"]) == ["after_1", "after_2", "after_3", "after_4"]
    ckpt = tmp_path / "run" / "checkpoints" / "encoder" / "epoch_001" / "model.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        assert tuple(f.get_slice("fc2.weight").get_shape()) == (seq_len * dim, 500)  # the Class-Encoder's context
    cache = next((tmp_path / "run" / "cache").iterdir())
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_rows"] == 50  # 128 px through the VAE: latents of every train image
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
