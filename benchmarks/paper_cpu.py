"""The paper's own path on the CPU: `raysd run --preset paper` (random:sd2-base) or `--preset
official` (random:sd-v1) through every stage with tiny budgets, timing each stage and sampling the
machine's used memory while it runs (the peak per stage, above what was used before the run).

    python benchmarks/paper_cpu.py --preset paper --out /tmp/paper-run
    python benchmarks/paper_cpu.py --preset official --out /tmp/official-run

The dataset is 50 images of the real RetinaMNIST (../shared/data) when present, else random
28x28 images. The real SD architectures with random weights: what is measured is what the
stages cost and hold, not what they learn.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASES = {"paper": "random:sd2-base", "official": "random:sd-v1"}
TINY = ["encoder.epochs=1", "encoder.steps_per_epoch=2", "encoder.global_batch_size=2", "finetune.epochs=1",
        "finetune.steps_per_epoch=2", "finetune.global_batch_size=2", "search.num_trials=2", "search.num_images=10",
        "search.min_inference_steps=5", "search.max_inference_steps=5", "cas.max_epochs=2", "cas.batch_size=16",
        "sampling.num_inference_steps=5", "sampling.batch_size=10", "scale.scales=1", "scale.shard_size=64",
        "resources.torch_threads=2"]


def dataset(path: Path) -> Path:
    """50 train / 10 val / 20 test images, 5 classes, 28x28 RGB (real RetinaMNIST when available)."""
    src = REPO.parent / "shared" / "data" / "retinamnist.npz"
    arrays = {}
    if src.is_file():
        z = np.load(src)
        for split, n in (("train", 50), ("val", 10), ("test", 20)):
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = z[f"{split}_images"][:n], z[f"{split}_labels"][:n]
    else:
        rng = np.random.default_rng(0)
        for split, n in (("train", 50), ("val", 10), ("test", 20)):
            arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % 5).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def run(preset: str, out: Path, extra: list[str] | None = None) -> dict:
    """Run the whole pipeline in a subprocess; returns {stage: {seconds, peak_gb}} and the results."""
    import psutil

    out.mkdir(parents=True, exist_ok=True)
    npz = dataset(out / "data.npz")
    cmd = [sys.executable, "-m", "raysd", "run", "--preset", preset, "--base-model", BASES[preset], "--dataset",
           f"npz:{npz}", "--out", str(out / "run"), *[f"--set={s}" for s in TINY + (extra or [])]]
    baseline = psutil.virtual_memory().used
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        manifest = out / "run" / "manifest.json"
        while not done.is_set():
            try:
                stages = json.loads(manifest.read_text())["stages"]
                running = [k for k, v in stages.items() if v.get("status") == "running"]
            except (OSError, ValueError, KeyError):
                running = ["(start)"]
            for stage in running or ["(between stages)"]:
                peaks[stage] = max(peaks.get(stage, 0), psutil.virtual_memory().used - baseline)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": "local"})
    done.set()
    sampler.join()
    manifest = json.loads((out / "run" / "manifest.json").read_text()) if (out / "run" / "manifest.json").exists() else {}
    stages = {k: {"seconds": v.get("seconds"), "peak_gb": peaks.get(k, 0) / 2**30}
              for k, v in manifest.get("stages", {}).items()}
    return {"returncode": proc.returncode, "stderr": proc.stderr[-4000:], "seconds": time.perf_counter() - t0,
            "stages": stages, "results": out / "run" / "results.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(BASES), default="paper")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    got = run(args.preset, args.out)
    rows = [[k, f"{v['seconds']:.0f}" if v["seconds"] else "-", f"{v['peak_gb']:.1f}"] for k, v in got["stages"].items()]
    print(table(f"--preset {args.preset} --base-model {BASES[args.preset]} on the CPU, tiny budgets "
                f"(exit {got['returncode']}, {got['seconds']:.0f} s in all)", ["stage", "seconds", "peak used GB"],
                rows))
    if got["returncode"] != 0:
        print(got["stderr"])
        sys.exit(1)


if __name__ == "__main__":
    main()
